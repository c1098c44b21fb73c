"""Expansion items: ``${name{arg}...}``, how each parses and what it does."""

from __future__ import annotations

import base64
import os
import re
from collections.abc import Callable
from typing import TYPE_CHECKING

from twisted_mta.expand import operators as ops
from twisted_mta.expand.errors import ExpansionError, ForcedFailure, LookupDefer, TaintError
from twisted_mta.expand.nodes import Evaluation, Item, Seq, YesNo
from twisted_mta.expand.regex import compile_regex
from twisted_mta.taint import Tainted, is_tainted
from twisted_mta.values import list_separator, split_list_with

if TYPE_CHECKING:
    from twisted_mta.expand.parser import Parser

ItemParser = Callable[["Parser", str, int], "tuple[Item, int]"]
ITEM_PARSERS: dict[str, ItemParser] = {}


def item(*names: str) -> Callable[[ItemParser], ItemParser]:
    def register(fn: ItemParser) -> ItemParser:
        for name in names:
            ITEM_PARSERS[name] = fn
        return fn

    return register


def _subs_item(most: int, least: int, handler: Callable) -> ItemParser:
    """An item made of ``read_subs`` arguments and nothing else."""

    def parse(p: Parser, name: str, pos: int) -> tuple[Item, int]:
        args, pos = p.read_subs(pos, most, least, True, name)
        return Item(name, args, handler), pos

    return parse


def _subs_yesno_item(most: int, least: int, handler: Callable) -> ItemParser:
    """Arguments followed by a ``{yes}{no}`` tail."""

    def parse(p: Parser, name: str, pos: int) -> tuple[Item, int]:
        args, pos = p.read_subs(pos, most, least, False, name)
        tail, pos = p.parse_yesno(name, pos)
        return Item(name, args, handler, tail), pos

    return parse


async def _with_value(ev: Evaluation, tail: YesNo, value: str | None) -> str:
    """Run a yes/no tail with ``$value`` set for the yes part only."""
    saved = ev.value
    ev.value = value
    try:
        if value is not None:
            return await tail.choose(ev, True, value)
    finally:
        ev.value = saved
    return await tail.choose(ev, False, None)


# -- if ------------------------------------------------------------------------


@item("if")
def _parse_if(p: Parser, name: str, pos: int) -> tuple[Item, int]:
    cond, pos = p.parse_condition(p.skip_space(pos))
    tail, pos = p.parse_yesno("if", pos)
    return Item(name, [], _run_if, tail, cond), pos


async def _run_if(ev: Evaluation, it: Item) -> str:
    saved = ev.numeric, ev.value
    try:
        result = await it.extra.evaluate(ev)
        return await it.tail.choose(ev, result, "true")
    finally:
        ev.numeric, ev.value = saved


# -- lookup --------------------------------------------------------------------


@item("lookup")
def _parse_lookup(p: Parser, name: str, pos: int) -> tuple[Item, int]:
    from twisted_mta.lookups.search import get_lookup, parse_lookup_type

    key = None
    pos = p.skip_space(pos)
    if p.char(pos) == "{":
        key, pos = p.parse_seq(pos + 1, True)
        if p.char(pos) != "}":
            raise ExpansionError("missing '}' after lookup key")
        pos = p.skip_space(pos + 1)
    c = p.char(pos)
    if not c or not c.isalpha():
        raise ExpansionError("missing lookup type")
    start = pos
    while pos < p.n and p.s[pos] != "{" and not p.s[pos].isspace():
        pos += 1
    type_text = p.s[start:pos]
    pos = p.skip_space(pos)
    spec = parse_lookup_type(type_text)
    query_style = get_lookup(spec.name).query_style
    if not query_style and key is None:
        raise ExpansionError(f'missing {{key}} for single-key "{type_text}" lookup')
    if query_style and key is not None:
        raise ExpansionError(
            f'a single key was given for lookup type "{type_text}", which is not '
            "a single-key lookup type"
        )
    if p.char(pos) != "{":
        raise ExpansionError("missing '{' for lookup file-or-query arg")
    source, pos = p.parse_seq(pos + 1, True)
    if p.char(pos) != "}":
        raise ExpansionError("missing '}' closing lookup file-or-query arg")
    tail, pos = p.parse_yesno("lookup", pos + 1)
    args = [key, source] if key is not None else [source]
    return Item(name, args, _run_lookup, tail, spec), pos


async def _run_lookup(ev: Evaluation, it: Item) -> str:
    from twisted_mta.lookups.search import lookup_defer_message, search_find

    spec = it.extra
    if len(it.args) == 2:
        key = await it.args[0].run(ev)
        source: str | None = await it.args[1].run(ev)
    else:
        key = await it.args[0].run(ev)
        source = None
    try:
        found = await search_find(spec, source, key, ev.ctx)
    except LookupDefer as e:
        raise LookupDefer(lookup_defer_message(key, e)) from None
    return await _with_value(ev, it.tail, found)


# -- simple argument items ----------------------------------------------------


async def _run_length(ev: Evaluation, it: Item) -> str:
    a = await it.arg_values(ev)
    return _keep_taint(ops.item_length(a[0], a[1]), a[1])


async def _run_hash(ev: Evaluation, it: Item) -> str:
    a = await it.arg_values(ev)
    if len(a) == 2:
        return ops.item_hash(a[0], None, a[1])
    return ops.item_hash(a[0], a[1], a[2])


async def _run_nhash(ev: Evaluation, it: Item) -> str:
    a = await it.arg_values(ev)
    if len(a) == 2:
        return ops.item_nhash(a[0], None, a[1])
    return ops.item_nhash(a[0], a[1], a[2])


async def _run_hmac(ev: Evaluation, it: Item) -> str:
    a = await it.arg_values(ev)
    return ops.item_hmac(a[0], a[1], a[2])


async def _run_tr(ev: Evaluation, it: Item) -> str:
    a = await it.arg_values(ev)
    return _keep_taint(ops.item_tr(a[0], a[1], a[2]), a[0])


async def _run_listquote(ev: Evaluation, it: Item) -> str:
    a = await it.arg_values(ev)
    return _keep_taint(ops.item_listquote(a[0], a[1]), a[1])


def _keep_taint(result: str, source: str) -> str:
    if is_tainted(source) and not is_tainted(result):
        return Tainted(result)
    return result


ITEM_PARSERS["length"] = _subs_item(2, 2, _run_length)
ITEM_PARSERS["hash"] = _subs_item(3, 2, _run_hash)
ITEM_PARSERS["nhash"] = _subs_item(3, 2, _run_nhash)
ITEM_PARSERS["hmac"] = _subs_item(3, 3, _run_hmac)
ITEM_PARSERS["tr"] = _subs_item(3, 3, _run_tr)
ITEM_PARSERS["listquote"] = _subs_item(2, 2, _run_listquote)


async def _run_substr_item(ev: Evaluation, it: Item) -> str:
    a = await it.arg_values(ev)
    if len(a) == 2:
        return _keep_taint(ops.item_substr(a[0], None, a[1]), a[1])
    return _keep_taint(ops.item_substr(a[0], a[1], a[2]), a[2])


# -- sg ------------------------------------------------------------------------


@item("sg")
def _parse_sg(p: Parser, name: str, pos: int) -> tuple[Item, int]:
    args, pos = p.read_subs(pos, 3, 3, True, name)
    return Item(name, args, _run_sg), pos


async def _run_sg(ev: Evaluation, it: Item) -> str:
    from twisted_mta.expand.parser import parse

    subject, pattern, replacement = await it.arg_values(ev)
    regex = compile_regex(pattern)
    out: list[str] = []
    pos = 0
    saved = ev.numeric
    insert_tree = parse(replacement)
    try:
        for m in regex.finditer(subject):
            out.append(subject[pos:m.start()])
            ev.numeric = _captures(m)
            out.append(await insert_tree.run(ev))
            pos = m.end()
    finally:
        ev.numeric = saved
    out.append(subject[pos:])
    return _keep_taint("".join(out), subject)


def _captures(m: re.Match) -> tuple[str, ...]:
    return tuple(g if g is not None else "" for g in (m.group(0), *m.groups()))


# -- extract -------------------------------------------------------------------


@item("extract")
def _parse_extract(p: Parser, name: str, pos: int) -> tuple[Item, int]:
    pos = p.skip_space(pos)
    fmt = "basic"
    if p.char(pos) != "{" and p.s.startswith("json", pos):
        pos += 4
        if p.char(pos) == "s":
            fmt = "jsons"
            pos += 1
        else:
            fmt = "json"
    groups: list[tuple[Seq, int]] = []
    while True:
        pos = p.skip_space(pos)
        if p.char(pos) != "{":
            break
        start = pos
        seq, pos = p.parse_braced(pos)
        groups.append((seq, start))
    forced = False
    if p.s.startswith("fail", pos) and p.char(pos + 4) in ("}", " ", "\t", ""):
        forced = True
        pos = p.skip_space(pos + 4)
    if p.char(pos) != "}":
        if not groups:
            raise ExpansionError("missing '{' for arg 1 of extract")
        raise p.curly_problem("did not close with '}'", pos)
    return Item(name, [g[0] for g in groups], _run_extract, extra=(fmt, groups, forced, p)), pos + 1


async def _run_extract(ev: Evaluation, it: Item) -> str:
    fmt, groups, forced, p = it.extra
    if not groups:
        raise ExpansionError("missing '{' for arg 1 of extract")
    first = (await groups[0][0].run(ev)).strip(" \t\n\r\f\v")
    if not first:
        raise ExpansionError('first argument of "extract" must not be empty')
    numeric = re.fullmatch(r"-?\d*", first) is not None
    needed = 3 if numeric and fmt == "basic" else 2
    if len(groups) < needed:
        raise ExpansionError(f"missing '{{' for arg {len(groups) + 1} of extract")
    extra_groups = groups[needed:]
    if len(extra_groups) > 2:
        raise p.curly_problem("did not close with '}'", extra_groups[2][1])
    args = [first] + [await g[0].run(ev) for g in groups[1:needed]]
    if fmt == "basic":
        if numeric:
            found = ops.extract_field(args[0], args[1], args[2])
        else:
            found = ops.extract_keyed(args[0], args[1])
    else:
        found = ops.extract_json(args[0], args[1], fmt == "jsons")
    if found is not None and is_tainted(args[-1]):
        found = Tainted(found)
    yes = extra_groups[0][0] if extra_groups else None
    no = extra_groups[1][0] if len(extra_groups) > 1 else None
    if forced and no is not None:
        raise ExpansionError('syntax error in "extract" item - "fail" expected')
    return await _with_value(ev, YesNo("extract", yes, no, forced), found)


# -- listextract, env ----------------------------------------------------------


async def _run_listextract(ev: Evaluation, it: Item) -> str:
    index, list_text = await it.arg_values(ev)
    found = ops.listextract(index, list_text)
    if found is not None and is_tainted(list_text):
        found = Tainted(found)
    return await _with_value(ev, it.tail, found)


async def _run_env(ev: Evaluation, it: Item) -> str:
    (name,) = await it.arg_values(ev)
    value = ev.ctx.variables.get("__environ__", os.environ).get(name)
    return await _with_value(ev, it.tail, value)


ITEM_PARSERS["listextract"] = _subs_yesno_item(2, 2, _run_listextract)


@item("env")
def _parse_env(p: Parser, name: str, pos: int) -> tuple[Item, int]:
    if p.char(p.skip_space(pos)) != "{":
        raise ExpansionError("")  # Exim reports this with no message
    args, pos = p.read_subs(pos, 1, 1, False, name)
    tail, pos = p.parse_yesno(name, pos)
    return Item(name, args, _run_env, tail), pos


# -- map, filter, reduce, sort ---------------------------------------------------


@item("map", "filter", "reduce")
def _parse_iterate(p: Parser, name: str, pos: int) -> tuple[Item, int]:
    pos = p.skip_space(pos)
    if p.char(pos) != "{":
        raise ExpansionError(f"missing '{{' for first arg of {name}")
    list_seq, pos = p.parse_seq(pos + 1, True)
    pos += 1
    args = [list_seq]
    if name == "reduce":
        pos = p.skip_space(pos)
        if p.char(pos) != "{":
            raise ExpansionError("missing '{' for second arg of reduce")
        init, pos = p.parse_seq(pos + 1, True)
        pos += 1
        args.append(init)
    pos = p.skip_space(pos)
    if p.char(pos) != "{":
        raise ExpansionError(f"missing '{{' for last arg of {name}")
    try:
        if name == "filter":
            body, pos = p.parse_condition(pos + 1)
        else:
            body, pos = p.parse_seq(pos + 1, True)
    except ExpansionError as e:
        raise type(e)(f'{e.message} inside "{name}" item') from None
    pos = p.skip_space(pos)
    if p.char(pos) != "}":
        raise ExpansionError(
            f'missing }} at end of condition or expression inside "{name}"; '
            "could be an unquoted } in the content"
        )
    pos = p.skip_space(pos + 1)
    if p.char(pos) != "}":
        raise ExpansionError(f'missing }} at end of "{name}"')
    return Item(name, args, _run_iterate, extra=body), pos + 1


async def _run_iterate(ev: Evaluation, it: Item) -> str:
    list_text = await it.args[0].run(ev)
    sep, rest = list_separator(list_text)
    saved = ev.item, ev.value
    out: list[str] = []
    try:
        if it.name == "reduce":
            ev.value = await it.args[1].run(ev)
        for element in split_list_with(rest, sep):
            ev.item = element
            if it.name == "filter":
                try:
                    keep = await it.extra.evaluate(ev)
                except ExpansionError as e:
                    raise type(e)(f'{e.message} inside "filter" condition') from None
                if keep:
                    out.append(element)
            elif it.name == "map":
                out.append(await _iterate_body(ev, it))
            else:
                ev.value = await _iterate_body(ev, it)
        if it.name == "reduce":
            return ev.value or ""
    finally:
        ev.item, ev.value = saved
    return join_output_list(out, sep)


def join_output_list(elements: list[str], sep: str) -> str:
    """Build an output list as map and filter do: separators inside an
    element are doubled, and an element after the first that is empty or
    starts with the separator gets a leading space, so it reads back as one
    element."""
    doubled = sep + sep
    parts = []
    for i, element in enumerate(elements):
        if i and (not element or element[0] == sep):
            element = " " + element
        parts.append(element.replace(sep, doubled))
    return sep.join(parts)


async def _iterate_body(ev: Evaluation, it: Item) -> str:
    try:
        return await it.extra.run(ev)
    except ForcedFailure:
        raise
    except ExpansionError as e:
        raise type(e)(f'{e.message} inside "{it.name}" item') from None


@item("sort")
def _parse_sort(p: Parser, name: str, pos: int) -> tuple[Item, int]:
    args: list[Seq] = []
    for what in ("list", "comparator", "extractor"):
        pos = p.skip_space(pos)
        if p.char(pos) != "{":
            raise ExpansionError(f"missing '{{' for {what} arg of sort")
        seq, pos = p.parse_braced(pos)
        args.append(seq)
    pos = p.skip_space(pos)
    if p.char(pos) != "}":
        raise ExpansionError('missing } at end of "sort"')
    return Item(name, args[:2], _run_sort, extra=args[2]), pos + 1


# Exim sorts with the ordering comparisons only: equality cannot order.
_SORT_COMPARATORS = {
    "<", "<=", ">", ">=", "lt", "lti", "le", "lei", "gt", "gti", "ge", "gei",
}
_UNORDERED = {"=", "==", "eq", "eqi"}


async def _run_sort(ev: Evaluation, it: Item) -> str:
    from twisted_mta.expand.conditions import compare

    list_text = await it.args[0].run(ev)
    comparator = (await it.args[1].run(ev)).strip()
    if comparator in _UNORDERED:
        raise ExpansionError("comparator not handled for sort")
    if comparator not in _SORT_COMPARATORS:
        raise ExpansionError("")
    sep, rest = list_separator(list_text)
    saved = ev.item
    keyed: list[tuple[str, str]] = []
    try:
        for element in split_list_with(rest, sep):
            ev.item = element
            key = await it.extra.run(ev)
            if not key:
                raise ExpansionError(f'field-extract in sort: "{it.extra.source}"')
            keyed.append((key, element))
    finally:
        ev.item = saved
    # Insertion sort, as Exim does: an element goes before the first one it
    # compares "true" against, which keeps equal keys in input order.  A key
    # that is not a number makes a numeric comparison false.
    ordered: list[tuple[str, str]] = []
    for key, element in keyed:
        index = len(ordered)
        for i, (other_key, _) in enumerate(ordered):
            try:
                before = compare(comparator, key, other_key)
            except ExpansionError:
                before = False
            if before:
                index = i
                break
        ordered.insert(index, (key, element))
    doubled = sep + sep
    return sep.join(e.replace(sep, doubled) for _, e in ordered)


# -- files, sockets, commands ----------------------------------------------------


async def _run_readfile(ev: Evaluation, it: Item) -> str:
    values = await it.arg_values(ev)
    path = values[0]
    if is_tainted(path):
        raise TaintError(f"Tainted arg 1 for readfile item: '{path}'")
    try:
        with open(path, "rb") as f:
            data = f.read().decode("latin-1")
    except IsADirectoryError:
        data = ""  # fopen() succeeds on a directory and reading gives nothing
    except OSError as e:
        raise ExpansionError(f"failed to open {path}: {e.strerror}") from None
    if len(values) > 1:
        data = data.replace("\n", values[1])
    return data


ITEM_PARSERS["readfile"] = _subs_item(2, 1, _run_readfile)


@item("readsocket")
def _parse_readsocket(p: Parser, name: str, pos: int) -> tuple[Item, int]:
    args, pos = p.read_subs(pos, 4, 2, False, name)
    pos = p.skip_space(pos)
    fail_string = None
    if p.char(pos) == "{":
        fail_string, pos = p.parse_braced(pos)
        pos = p.skip_space(pos)
    if p.char(pos) != "}":
        raise ExpansionError("missing '}' closing readsocket")
    return Item(name, args, _run_readsocket, extra=fail_string), pos + 1


async def _run_readsocket(ev: Evaluation, it: Item) -> str:
    from twisted_mta.expand.sockets import read_socket

    values = await it.arg_values(ev)
    try:
        return await read_socket(ev.ctx, *values)
    except ExpansionError:
        if it.extra is None:
            raise
        return await it.extra.run(ev)


@item("run")
def _parse_run(p: Parser, name: str, pos: int) -> tuple[Item, int]:
    preexpand = False
    while p.char(pos) == ",":
        if p.s.startswith("preexpand", pos + 1):
            preexpand = True
            pos += 10
        else:
            end = pos + 1
            while end < p.n and p.s[end].isalpha():
                end += 1
            raise ExpansionError(f"bad option '{p.s[pos + 1:end]}' for run")
    pos = p.skip_space(pos)
    if p.char(pos) != "{":
        raise ExpansionError("missing '{' for command arg of run")
    start = pos + 1
    try:
        command, pos = p.parse_seq(start, True)
    except ExpansionError:
        if preexpand or p.fail_pos is None:
            raise
        # Without preexpand Exim only scans for the end of the command and
        # expands each argument later, so a scanning error just marks where
        # the command stops.
        command, pos = Seq([]), p.fail_pos
    raw = p.s[start:pos]
    if p.char(pos) != "}":
        raise ExpansionError("missing '}' closing command arg of run")
    tail, pos = p.parse_yesno("run", pos + 1)
    return Item(name, [command], _run_run, tail, (preexpand, raw)), pos


async def _run_run(ev: Evaluation, it: Item) -> str:
    from twisted_mta.expand.commands import run_command

    preexpand, raw = it.extra
    if preexpand:
        argv = split_command(await it.args[0].run(ev))
    else:
        argv = [await _expand_command_arg(ev, arg, raw) for arg in split_command(raw)]
    code, output = await run_command(ev.ctx, argv)
    ev.runrc = code
    return await _with_value(ev, it.tail, output if code == 0 else None) if code == 0 else (
        await _run_failed(ev, it, output)
    )


async def _run_failed(ev: Evaluation, it: Item, output: str) -> str:
    saved = ev.value
    ev.value = output
    try:
        return await it.tail.choose(ev, False, None)
    finally:
        ev.value = saved


async def _expand_command_arg(ev: Evaluation, arg: str, raw: str) -> str:
    from twisted_mta.expand.parser import parse

    try:
        return await parse(arg).run(ev)
    except ExpansionError as e:
        raise ExpansionError(
            f'Expansion of "{arg}" from command "{raw}" in ${{run}} expansion failed: '
            f"{e.message}"
        ) from None


def split_command(command: str) -> list[str]:
    """Split a command line into arguments as Exim does for pipes and
    ``${run}``: blanks separate, double quotes group with backslash escapes,
    single quotes group literally.  No shell is involved."""
    argv: list[str] = []
    pos = 0
    n = len(command)
    while True:
        while pos < n and command[pos].isspace():
            pos += 1
        if pos >= n:
            return argv
        arg: list[str] = []
        if command[pos] == '"':
            pos += 1
            while pos < n and command[pos] != '"':
                if command[pos] == "\\" and pos + 1 < n:
                    pos += 1
                arg.append(command[pos])
                pos += 1
            pos += 1
        elif command[pos] == "'":
            end = command.find("'", pos + 1)
            end = n if end < 0 else end
            arg.append(command[pos + 1:end])
            pos = end + 1
        else:
            while pos < n and not command[pos].isspace():
                arg.append(command[pos])
                pos += 1
        argv.append("".join(arg))


# -- acl -------------------------------------------------------------------------


async def _run_acl(ev: Evaluation, it: Item) -> str:
    from twisted_mta.acl import acl_failure, run_acl_for_expansion

    values = await it.arg_values(ev)
    verdict, message = await run_acl_for_expansion(ev, values[0], values[1:])
    if verdict in ("accept", "deny"):
        return message or ""
    raise acl_failure(verdict, values[0])


ITEM_PARSERS["acl"] = _subs_item(10, 1, _run_acl)


# -- unsupported and feature items --------------------------------------------------


def _unsupported(what: str) -> Callable:
    async def run(ev: Evaluation, it: Item) -> str:
        raise ExpansionError(f"{what} is not supported by exim-py")

    return run


ITEM_PARSERS["perl"] = _subs_item(9, 1, _unsupported("${perl}"))
ITEM_PARSERS["dlfunc"] = _subs_item(10, 2, _unsupported("${dlfunc}"))


async def _run_authresults(ev: Evaluation, it: Item) -> str:
    (system,) = await it.arg_values(ev)
    results = ev.ctx.variables.get("__authresults__")
    text = f"Authentication-Results: {system}"
    if results:
        text += "".join(f";\n\t{r}" for r in results)
    return text


ITEM_PARSERS["authresults"] = _subs_item(1, 1, _run_authresults)


@item("certextract")
def _parse_certextract(p: Parser, name: str, pos: int) -> tuple[Item, int]:
    args, pos = p.read_subs(pos, 2, 2, False, name)
    certvar = args[1].source.strip()
    tail, pos = p.parse_yesno(name, pos)
    return Item(name, args, _run_certextract, tail, certvar), pos


_CERT_VARIABLES = frozenset(
    ("tls_in_peercert", "tls_in_ourcert", "tls_out_peercert", "tls_out_ourcert")
)


async def _run_certextract(ev: Evaluation, it: Item) -> str:
    var = it.extra.lstrip("$").strip("{}")
    if var not in _CERT_VARIABLES:
        raise ExpansionError('second argument of "certextract" must be a certificate variable')
    cert = ev.ctx.variables.get("__certs__", {}).get(var)
    value = None
    if cert is not None:
        from twisted_mta.expand.certs import cert_field

        value = cert_field(cert, await it.args[0].run(ev))
    return await _with_value(ev, it.tail, value)


async def _run_imapfolder(ev: Evaluation, it: Item) -> str:
    values = await it.arg_values(ev)
    sep = values[1] if len(values) > 1 and values[1] else "/"
    specials = values[2] if len(values) > 2 else ""
    return imap_folder(values[0], sep[0], specials)


ITEM_PARSERS["imapfolder"] = _subs_item(3, 1, _run_imapfolder)


async def _run_prvs(ev: Evaluation, it: Item) -> str:
    from twisted_mta.expand.prvs import prvs_encode

    values = await it.arg_values(ev)
    address = values[0]
    local, at, domain = address.rpartition("@")
    if not at or not local or not domain:
        raise ExpansionError("prvs first argument must be a qualified email address")
    keynum = values[2] if len(values) > 2 else "0"
    if len(keynum) != 1 or not keynum.isdigit():
        raise ExpansionError("prvs third argument must be a single digit")
    return prvs_encode(address, values[1], keynum, _now(ev))


@item("prvscheck")
def _parse_prvscheck(p: Parser, name: str, pos: int) -> tuple[Item, int]:
    # Exim reads the address, then the secret, then an optional result, each
    # on its own: a missing secret reports "(min is 1)".
    args, pos = p.read_subs(pos, 1, 1, False, name)
    secret, pos = p.read_subs(pos, 1, 1, False, name)
    result, pos = p.read_subs(pos, 1, 0, True, name)
    return Item(name, args + secret + result, _run_prvscheck), pos


async def _run_prvscheck(ev: Evaluation, it: Item) -> str:
    from twisted_mta.expand.prvs import prvs_check

    address = await it.args[0].run(ev)
    parsed = prvs_check(address)
    if parsed is None:
        return ""
    ev.ctx.variables["prvscheck_address"] = parsed.address
    ev.ctx.variables["prvscheck_keynum"] = parsed.keynum
    secret = await it.args[1].run(ev)
    ok = parsed.valid(secret, _now(ev))
    ev.ctx.variables["prvscheck_result"] = "1" if ok else ""
    if len(it.args) > 2:
        return await it.args[2].run(ev)
    return parsed.address


def _now(ev: Evaluation) -> float:
    import time

    return ev.ctx.reactor.seconds() if ev.ctx.reactor is not None else time.time()


@item("srs_encode")
def _parse_srs(p: Parser, name: str, pos: int) -> tuple[Item, int]:
    args, pos = p.read_subs(pos, 3, 3, True, name)
    return Item(name, args, _unsupported("${srs_encode}")), pos



def imap_folder(name: str, sep: str, specials: str) -> str:
    """IMAP modified UTF-7 (RFC 3501) of a UTF-8 folder name whose hierarchy
    separator is *sep*; the result uses ``.`` as separator."""
    out: list[str] = []
    pending: list[str] = []

    def flush() -> None:
        if pending:
            raw = "".join(pending).encode("utf-16-be")
            out.append("&" + base64.b64encode(raw).decode().rstrip("=").replace("/", ",") + "-")
            pending.clear()

    for c in name.encode("latin-1").decode("utf-8", "replace"):
        if c == sep:
            flush()
            out.append(".")
        elif c == "." or c in specials:
            raise ExpansionError(f"imapfolder: illegal character '{c}'")
        elif c == "&":
            flush()
            out.append("&-")
        elif " " <= c <= "~":
            flush()
            out.append(c)
        else:
            pending.append(c)
    flush()
    return "".join(out)


ITEM_PARSERS["substr"] = _subs_item(3, 2, _run_substr_item)


ITEM_PARSERS["prvs"] = _subs_item(3, 2, _run_prvs)


