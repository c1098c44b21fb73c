"""Operators that need more than their argument: the configuration, the
lookup registry or the expander itself.  Everything else is a plain function
in :mod:`twisted_mta.expand.operators`."""

from __future__ import annotations

from twisted_mta.expand import operators as ops
from twisted_mta.expand.errors import ExpansionError, TaintError
from twisted_mta.expand.nodes import ContextOperator, Evaluation, Node, Operator, Seq
from twisted_mta.taint import is_tainted

_LIST_KINDS = {"d": "domain", "h": "host", "a": "address", "l": "localpart"}
# Without a suffix Exim looks for the name among these kinds, in this order.
_LIST_ORDER = ("address", "domain", "host", "localpart")


def make_operator(name: str, arg: Seq) -> Node:
    """The node for ``${name:arg}``; raises for an unknown operator."""
    if name == "expand":
        return ContextOperator(name, arg, _expand)
    if name == "listnamed" or name.startswith("listnamed_"):
        return ContextOperator(name, arg, _listnamed(name[10:] if len(name) > 9 else None))
    if name.startswith("quote_") and name != "quote_local_part":
        return _quote_operator(name, arg)
    return Operator(name, arg, ops.get_operator(name))


async def _expand(ev: Evaluation, text: str) -> str:
    from twisted_mta.expand.parser import parse

    if is_tainted(text):
        raise TaintError(f"attempt to expand tainted string '{text}'")
    try:
        return await parse(text).run(ev)
    except ExpansionError as e:
        raise type(e)(f'internal expansion of "{text}" failed: {e.message}') from None


def _listnamed(suffix: str | None):
    async def run(ev: Evaluation, list_name: str) -> str:
        return named_list_text(ev, list_name.removeprefix("+"), suffix)

    return run


def named_list_text(ev: Evaluation, name: str, suffix: str | None) -> str:
    """``${listnamed}``: the named list's items, unexpanded, joined with
    `` : `` and nested ``+name`` lists inlined, as Exim prints them."""
    from twisted_mta.values import list_separator, split_list_with

    if suffix is None:
        kinds = _LIST_ORDER
    elif suffix[:1] in _LIST_KINDS:
        kinds = (_LIST_KINDS[suffix[0]],)
    else:
        raise ExpansionError('bad suffix on "list" operator')
    text = None
    for kind in kinds:
        text = ev.ctx.named_list(kind, name)
        if text is not None:
            break
    if text is None:
        label = "" if suffix is None else f"{_LIST_KINDS[suffix[0]]} "
        raise ExpansionError(f'"{name}" is not a {label}named list')
    sep, rest = list_separator(text)
    out: list[str] = []
    for element in split_list_with(rest, sep):
        if element.startswith("+"):
            out.append(named_list_text(ev, element[1:], suffix))
        elif sep != ":":
            # Re-quote for a colon-separated result: colons double.
            out.append(element.replace(":", "::"))
        else:
            out.append(element)
    return " : ".join(out)


def _quote_operator(name: str, arg: Seq) -> Node:
    from twisted_mta.lookups.search import get_lookup, quote_for_lookup

    lookup_name, _, option = name[6:].partition("_")
    get_lookup(lookup_name)  # unknown lookup types are an error at parse time

    def quote(value: str) -> str:
        return quote_for_lookup(lookup_name, value, option or None)

    return Operator(name, arg, quote)
