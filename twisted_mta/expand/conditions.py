"""Expansion conditions (``${if cond ...}``, filter, forall...)."""

from __future__ import annotations

import ipaddress
import json
import os
from collections.abc import Callable
from typing import TYPE_CHECKING

from twisted_mta.expand import operators as ops
from twisted_mta.expand.errors import ExpansionError, ForcedFailure
from twisted_mta.expand.nodes import Condition, Evaluation, Seq
from twisted_mta.expand.regex import compile_regex
from twisted_mta.expand.variables import unknown_variable_hint, variable_getter
from twisted_mta.taint import Tainted, is_tainted
from twisted_mta.values import list_separator, split_list_with

if TYPE_CHECKING:
    from twisted_mta.expand.parser import Parser

CondParser = Callable[["Parser", str, bool, int], "tuple[Condition, int]"]
CONDITION_PARSERS: dict[str, CondParser] = {}


def _register(names: str, parser: CondParser) -> None:
    for name in names.split():
        CONDITION_PARSERS[name] = parser


def _curly_start(name: str) -> ExpansionError:
    return ExpansionError(f'missing {{ after "{name}"')


def _curly_end(name: str) -> ExpansionError:
    return ExpansionError(f'missing }} at end of "{name}" condition')


# -- no arguments ------------------------------------------------------------------


def _parse_flag(p: Parser, name: str, negated: bool, pos: int) -> tuple[Condition, int]:
    return Condition(name, negated, [], _test_flag), pos


async def _test_flag(ev: Evaluation, c: Condition) -> bool:
    value = ev.ctx.variables.get(f"__{c.name}__")
    return bool(value)


_register("first_delivery queue_running", _parse_flag)


# -- def: ---------------------------------------------------------------------------


def _parse_def(p: Parser, name: str, negated: bool, pos: int) -> tuple[Condition, int]:
    from twisted_mta.expand.parser import _header_prefix

    if p.char(pos) != ":":
        raise ExpansionError('":" expected after "def"')
    var, pos = p.read_name(pos + 1, "_")
    prefix = _header_prefix(var)
    if prefix is not None:
        header, pos = p.parse_header(var, prefix, pos)
        return Condition(name, negated, [header], _test_def_header), pos
    getter = variable_getter(var)
    if getter is None:
        if var:
            raise ExpansionError(
                f'unknown variable "{var}" after "def:"' + unknown_variable_hint(var)
            )
        raise ExpansionError('variable name omitted after "def:"')
    from twisted_mta.expand.nodes import Variable

    return Condition(name, negated, [Variable(var, getter)], _test_def_var), pos


async def _test_def_header(ev: Evaluation, c: Condition) -> bool:
    headers = ev.ctx.variables.get("__headers__") or {}
    return c.args[0].name.lower() in headers


async def _test_def_var(ev: Evaluation, c: Condition) -> bool:
    return bool(await c.args[0].run(ev))


_register("def", _parse_def)


# -- one argument ---------------------------------------------------------------


def _one_arg(test: Callable) -> CondParser:
    def parse(p: Parser, name: str, negated: bool, pos: int) -> tuple[Condition, int]:
        pos = p.skip_space(pos)
        if p.char(pos) != "{":
            raise _curly_start(name)
        arg, pos = p.parse_seq(pos + 1, True)
        if p.char(pos) != "}":
            raise _curly_end(name)
        return Condition(name, negated, [arg], test), pos + 1

    return parse


async def _test_exists(ev: Evaluation, c: Condition) -> bool:
    return os.path.exists(await c.args[0].run(ev))


def _ip_version(text: str) -> int:
    try:
        if "%" in text:
            text = text.split("%", 1)[0]
        return ipaddress.ip_address(text).version
    except ValueError:
        return 0


async def _test_isip(ev: Evaluation, c: Condition) -> bool:
    version = _ip_version(await c.args[0].run(ev))
    if c.name == "isip":
        return version != 0
    return version == (4 if c.name == "isip4" else 6)


async def _test_bool(ev: Evaluation, c: Condition) -> bool:
    return ops.parse_bool(await c.args[0].run(ev), c.name == "bool_lax")


async def _test_not_compiled(ev: Evaluation, c: Condition) -> bool:
    raise ExpansionError(f'support for "{c.name}" not compiled')


_register("exists", _one_arg(_test_exists))
_register("isip isip4 isip6", _one_arg(_test_isip))
_register("bool bool_lax", _one_arg(_test_bool))
_register("pam radius ldapauth pwcheck", _one_arg(_test_not_compiled))


# -- two arguments -------------------------------------------------------------


def _two_args(test: Callable, honour_second_dollar: bool = True) -> CondParser:
    def parse(p: Parser, name: str, negated: bool, pos: int) -> tuple[Condition, int]:
        args: list[Seq] = []
        for i in range(2):
            pos = p.skip_space(pos)
            if p.char(pos) != "{":
                if i == 0:
                    raise _curly_start(name)
                raise ExpansionError(f'missing 2nd string in {{}} after "{name}"')
            seq, pos = p.parse_seq(pos + 1, True, i == 0 or honour_second_dollar)
            if p.char(pos) != "}":
                raise _curly_end(name)
            pos += 1
            args.append(seq)
        return Condition(name, negated, args, test), pos

    return parse


_NUMERIC = {
    "<": lambda a, b: a < b,
    "<=": lambda a, b: a <= b,
    "=": lambda a, b: a == b,
    "==": lambda a, b: a == b,
    ">": lambda a, b: a > b,
    ">=": lambda a, b: a >= b,
}


def compare(op: str, a: str, b: str) -> bool:
    """A numeric or string comparison by its condition name."""
    numeric = _NUMERIC.get(op)
    if numeric is not None:
        return numeric(ops.condition_integer(a), ops.condition_integer(b))
    return ops.string_compare(op, a, b)


async def _test_compare(ev: Evaluation, c: Condition) -> bool:
    a = await c.args[0].run(ev)
    b = await c.args[1].run(ev)
    return compare(c.name, a, b)


async def _test_crypteq(ev: Evaluation, c: Condition) -> bool:
    return ops.crypteq(await c.args[0].run(ev), await c.args[1].run(ev))


async def _test_match(ev: Evaluation, c: Condition) -> bool:
    subject = await c.args[0].run(ev)
    regex = compile_regex(await c.args[1].run(ev))
    m = regex.search(subject)
    if m is None:
        return False
    groups = (m.group(0), *m.groups())
    wrap = Tainted if is_tainted(subject) else str
    ev.numeric = tuple(wrap(g) if g is not None else "" for g in groups)
    return True


async def _test_inlist(ev: Evaluation, c: Condition) -> bool:
    subject = await c.args[0].run(ev)
    list_text = await c.args[1].run(ev)
    sep, rest = list_separator(list_text)
    caseless = c.name == "inlisti"
    folded = _ascii_lower(subject) if caseless else subject
    for element in split_list_with(rest, sep):
        if (_ascii_lower(element) if caseless else element) == folded:
            ev.value = element
            return True
    return False


_LIST_KIND = {
    "match_domain": "domain",
    "match_address": "address",
    "match_local_part": "localpart",
    "match_ip": "host",
}


async def _test_match_list(ev: Evaluation, c: Condition) -> bool:
    from twisted_mta.lists import ListDefer, ip_version, match_list

    subject = await c.args[0].run(ev)
    list_text = await c.args[1].run(ev)
    kind = _LIST_KIND[c.name]
    if kind == "host" and subject and not ip_version(subject):
        raise ExpansionError(f'"{subject}" is not an IP address')
    try:
        # match_ip matches IP items only: no host name is looked up.
        found = await match_list(subject, list_text, kind, ev.ctx, host=None)
    except ForcedFailure:
        return False
    except ListDefer as e:
        raise ExpansionError(
            f'unable to complete match against "{list_text}": {e.message}'
        ) from None
    if found is None:
        return False
    # As in Exim, the condition sets $value but leaves $domain_data and
    # friends alone: only ACLs and routers set those.
    ev.value = found.value
    return True


_register("< <= = == > >= eq eqi lt lti le lei gt gti ge gei", _two_args(_test_compare))
_register("crypteq", _two_args(_test_crypteq))
_register("match", _two_args(_test_match))
_register("inlist inlisti", _two_args(_test_inlist))
_register(
    "match_domain match_address match_local_part match_ip",
    _two_args(_test_match_list, honour_second_dollar=False),
)


# -- and / or ---------------------------------------------------------------------


def _parse_and_or(p: Parser, name: str, negated: bool, pos: int) -> tuple[Condition, int]:
    pos = p.skip_space(pos)
    if p.char(pos) != "{":
        raise _curly_start(name)
    pos += 1
    subs: list[Condition] = []
    while True:
        pos = p.skip_space(pos)
        if p.char(pos) == "}":
            break
        if p.char(pos) != "{":
            raise ExpansionError(
                f'each subcondition inside an "{name}{{...}}" condition must be in its own {{}}'
            )
        try:
            sub, pos = p.parse_condition(pos + 1)
        except ExpansionError as e:
            raise type(e)(f'{e.message} inside "{name}{{...}}" condition') from None
        pos = p.skip_space(pos)
        if p.char(pos) != "}":
            raise ExpansionError(f'missing }} at end of condition inside "{name}" group')
        pos += 1
        subs.append(sub)
    return Condition(name, negated, subs, _test_and_or), pos + 1


async def _test_and_or(ev: Evaluation, c: Condition) -> bool:
    want_all = c.name == "and"
    for sub in c.args:
        if await sub.evaluate(ev) != want_all:
            return not want_all
    return want_all


_register("and or", _parse_and_or)


# -- forall / forany -----------------------------------------------------------


def _parse_forall(p: Parser, name: str, negated: bool, pos: int) -> tuple[Condition, int]:
    pos = p.skip_space(pos)
    if p.char(pos) != "{":
        raise _curly_start(name)
    list_seq, pos = p.parse_seq(pos + 1, True)
    pos = p.skip_space(pos + 1)
    if p.char(pos) != "{":
        raise _curly_start(name)
    try:
        sub, pos = p.parse_condition(pos + 1)
    except ExpansionError as e:
        raise type(e)(f'{e.message} inside "{name}" condition') from None
    pos = p.skip_space(pos)
    if p.char(pos) != "}":
        raise ExpansionError(f'missing }} at end of condition inside "{name}"')
    return Condition(name, negated, [list_seq, sub], _test_forall), pos + 1


async def _test_forall(ev: Evaluation, c: Condition) -> bool:
    list_text = await c.args[0].run(ev)
    is_any = c.name.startswith("forany")
    if c.name.endswith("_json") or c.name.endswith("_jsons"):
        elements = _json_elements(list_text, c.name.endswith("_jsons"))
    else:
        sep, rest = list_separator(list_text)
        elements = split_list_with(rest, sep)
    if not elements:
        return False
    saved = ev.item
    try:
        for element in elements:
            ev.item = element
            if await c.args[1].evaluate(ev) == is_any:
                return is_any
    finally:
        ev.item = saved
    return not is_any


def _json_elements(text: str, strip: bool) -> list[str]:
    try:
        data = json.loads(text.encode("latin-1").decode("utf-8"))
    except ValueError:
        raise ExpansionError(f"json parse error in \"{text}\"") from None
    if not isinstance(data, list):
        return []
    out = []
    for value in data:
        if strip:
            if not isinstance(value, str):
                raise ExpansionError("missing '\"' wrapping string result for extract jsons")
            out.append(value.encode("utf-8").decode("latin-1"))
        else:
            out.append(json.dumps(value, separators=(",", ":")))
    return out


_register("forall forany forall_json forany_json forall_jsons forany_jsons", _parse_forall)


# -- acl ----------------------------------------------------------------------------


def _braced_subs(most: int, least: int, test: Callable, bad: str | None = None) -> CondParser:
    """``name{{a}{b}...}``: arguments inside one more pair of braces.  *bad*
    replaces the message for a bracketing error, as Exim does for acl."""

    def parse(p: Parser, name: str, negated: bool, pos: int) -> tuple[Condition, int]:
        pos = p.skip_space(pos)
        if p.char(pos) != "{":
            raise _curly_start(name)
        try:
            args, pos = p.read_subs(pos + 1, most, least, True, name)
        except ExpansionError as e:
            if bad is None or e.message.startswith("Too many"):
                raise
            raise ExpansionError(bad) from None
        return Condition(name, negated, args, test), pos

    return parse


async def _test_acl(ev: Evaluation, c: Condition) -> bool:
    from twisted_mta.acl import acl_failure, run_acl_for_expansion

    values = [await a.run(ev) for a in c.args]
    verdict, message = await run_acl_for_expansion(ev, values[0], values[1:])
    if verdict in ("accept", "deny"):
        ev.value = message
        return verdict == "accept"
    raise acl_failure(verdict, values[0])


_register("acl", _braced_subs(10, 1, _test_acl, "too few arguments or bracketing error for acl"))
_register("saslauthd", _braced_subs(4, 2, _test_not_compiled))


def _parse_inbound_srs(p: Parser, name: str, negated: bool, pos: int) -> tuple[Condition, int]:
    return _two_args(_test_not_compiled)(p, name, negated, pos)


_register("inbound_srs", _parse_inbound_srs)


_LOWER = str.maketrans("ABCDEFGHIJKLMNOPQRSTUVWXYZ", "abcdefghijklmnopqrstuvwxyz")


def _ascii_lower(text: str) -> str:
    return text.translate(_LOWER)
