"""Operators that need more than their argument: the configuration, the
lookup registry or the expander itself.  Everything else is a plain function
in :mod:`twisted_mta.expand.operators`."""

from __future__ import annotations

from twisted_mta.expand import operators as ops
from twisted_mta.expand.errors import ExpansionError, TaintError
from twisted_mta.expand.nodes import ContextOperator, Evaluation, Node, Operator, Seq
from twisted_mta.taint import is_tainted

_LIST_KINDS = {"": None, "d": "domain", "h": "host", "a": "address", "l": "localpart"}
_LIST_ORDER = ("domain", "host", "address", "localpart")


def make_operator(name: str, arg: Seq) -> Node:
    """The node for ``${name:arg}``; raises for an unknown operator."""
    if name == "expand":
        return ContextOperator(name, arg, _expand)
    if name == "listnamed" or name.startswith("listnamed_"):
        suffix = name[10:]
        if suffix not in _LIST_KINDS:
            raise ExpansionError(f'unknown expansion operator "{name}"')
        return ContextOperator(name, arg, _listnamed(_LIST_KINDS[suffix]))
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


def _listnamed(kind: str | None):
    async def run(ev: Evaluation, list_name: str) -> str:
        kinds = (kind,) if kind else _LIST_ORDER
        for candidate in kinds:
            text = ev.ctx.named_list(candidate, list_name)
            if text is not None:
                return await _inline_named(ev, text, candidate, set())
        raise ExpansionError(f'"{list_name}" is not a named list')

    return run


async def _inline_named(ev: Evaluation, text: str, kind: str, seen: set[str]) -> str:
    """A named list's expanded text with nested ``+name`` items inlined."""
    from twisted_mta.values import list_separator, split_list_with

    expanded = await ev.ctx.expand(text)
    sep, rest = list_separator(expanded)
    items = split_list_with(rest, sep)
    out: list[str] = []
    for element in items:
        if element.startswith("+") and element[1:] not in seen:
            nested = ev.ctx.named_list(kind, element[1:])
            if nested is not None:
                out.append(await _inline_named(ev, nested, kind, seen | {element[1:]}))
                continue
        out.append(element.replace(sep, sep + sep))
    return f" {sep} ".join(out)


def _quote_operator(name: str, arg: Seq) -> Node:
    from twisted_mta.lookups.search import get_lookup, quote_for_lookup

    lookup_name, _, option = name[6:].partition("_")
    get_lookup(lookup_name)  # unknown lookup types are an error at parse time

    def quote(value: str) -> str:
        return quote_for_lookup(lookup_name, value, option or None)

    return Operator(name, arg, quote)
