"""Typed option values: reading ``name = value`` lines and printing them
for ``-bP`` (readconf.c ``readconf_handle_option()`` and ``print_ol()``)."""

from __future__ import annotations

import grp
import pwd
import re
from collections.abc import Callable
from typing import Any

from twisted_mta.values import format_time, split_list_with

WHITESPACE = " \t\n\r\v\f"
HIDDEN_TEXT = "<value not displayable>"
# (type, default, flags) as in optiontables.
Spec = tuple[str, Any, str]

# Older names that still set the current option.
MAIN_ALIASES = {"proxy_required_hosts": "hosts_proxy"}
TRANSPORT_ALIASES = {"tpda_event_action": "event_action"}

_BOOL_TYPES = frozenset({"bool", "expand_bool"})
_NAME = re.compile(r"[A-Za-z0-9_]*")
_INT = re.compile(r"[ \t\n\r\v\f]*([-+]?)(0[xX][0-9a-fA-F]+|0[0-7]*|[1-9][0-9]*)")
_OCT = re.compile(r"[ \t\n\r\v\f]*([-+]?)([0-7]+)")
_SUFFIX_POWER = {"k": 1, "m": 2, "g": 3, "t": 4}
_ESCAPES = {"b": "\b", "f": "\f", "n": "\n", "r": "\r", "t": "\t", "v": "\v"}
_INT_MAX = 2 ** 31 - 1


class OptionError(Exception):
    """A bad option line; the reader turns it into a located ConfigError."""


def read_time(text: str) -> int | None:
    """Exim's ``readconf_readtime()``: ``1h30m`` style; None if malformed."""
    total = 0
    pos = 0
    units = {"w": 604800, "d": 86400, "h": 3600, "m": 60, "s": 1}
    while True:
        m = re.match(r"\d+", text[pos:])
        if m is None:
            return None
        pos += m.end()
        unit = text[pos:pos + 1]
        if unit not in units:
            return None
        total += int(m.group()) * units[unit]
        pos += 1
        if pos == len(text):
            return total


def dequote(text: str) -> tuple[str, str]:
    """Read a double-quoted string with backslash escapes from the start of
    *text*; return (value, the text after it)."""
    out: list[str] = []
    pos = 1
    n = len(text)
    while pos < n and text[pos] != '"':
        c = text[pos]
        if c == "\\" and pos + 1 < n:
            pos += 1
            c = text[pos]
            if c in "01234567":
                digits = re.match(r"[0-7]{1,3}", text[pos:]).group()
                pos += len(digits) - 1
                c = chr(int(digits, 8) & 0xFF)
            elif c == "x":
                digits = re.match(r"[0-9a-fA-F]{0,2}", text[pos + 1:]).group()
                pos += len(digits)
                c = chr(int(digits, 16)) if digits else "\0"
            else:
                c = _ESCAPES.get(c, c)
        out.append(c)
        pos += 1
    if pos < n:
        pos += 1
    return "".join(out), text[pos:]


def read_string(text: str, name: str) -> str:
    """A string value: literal, or quoted with escapes processed."""
    if not text.startswith('"'):
        return text
    value, rest = dequote(text)
    consumed = text[: len(text) - len(rest)]
    if len(consumed) == 1 or not consumed.endswith('"'):
        raise OptionError(f"missing quote at end of string value for {name}")
    if rest:
        _extra(rest, "string value for ", name)
    return value


def _extra(rest: str, what: str, name: str) -> None:
    comment = " (# is comment only at line start)" if rest.startswith("#") else ""
    raise OptionError(f"extra characters follow {what}{name}{comment}")


def _read_int(text: str, name: str, octal: bool, kilo: bool) -> int:
    kind = "octal " if octal else ""
    m = (_OCT if octal else _INT).match(text)
    if m is None:
        raise OptionError(f"{kind}integer expected for {name}")
    sign, digits = m.groups()
    if octal:
        value = int(digits, 8)
    elif digits[:2].lower() == "0x":
        value = int(digits, 16)
    elif len(digits) > 1 and digits[0] == "0":
        value = int(digits, 8)
    else:
        value = int(digits)
    if sign == "-":
        value = -value
    rest = text[m.end():]
    power = _SUFFIX_POWER.get(rest[:1].lower()) if rest else None
    if power is not None:
        rest = rest[1:]
        value *= 1024 ** (power - 1 if kilo else power)
    elif kilo and rest:
        # Exim's quirk: any other trailing text means "bytes", rounded to K.
        value = (value + 512) // 1024
    if not kilo and abs(value) > _INT_MAX:
        raise OptionError(f'absolute value of integer "{text}" is too large (overflow)')
    rest = rest.lstrip(WHITESPACE)
    if rest:
        _extra(rest, f"{kind}integer value for ", name)
    return value


def _read_fixed(text: str, name: str) -> int:
    m = re.match(r"[ \t\n\r\v\f]*([-+]?\d+)", text)
    if m is None:
        raise OptionError(f"fixed-point number expected for {name}")
    value = int(m.group(1))
    if value < 0 or value * 1000 > _INT_MAX:
        raise OptionError(f'integer "{text}" is too large (overflow)')
    value *= 1000
    pos = m.end()
    if text[pos:pos + 1] == ".":
        digits = re.match(r"\d*", text[pos + 1:]).group()
        scale = 100
        for d in digits:
            value += int(d) * scale
            scale //= 10
        pos += 1 + len(digits)
    rest = text[pos:].lstrip(WHITESPACE)
    if rest:
        _extra(rest, "fixed-point value for ", name)
    return value


def _lookup_user(text: str) -> int:
    if text.isdigit():
        return int(text)
    try:
        return pwd.getpwnam(text).pw_uid
    except KeyError:
        raise OptionError(f"user {text} was not found") from None


def _lookup_group(text: str) -> int:
    if text.isdigit():
        return int(text)
    try:
        return grp.getgrnam(text).gr_gid
    except KeyError:
        raise OptionError(f"group {text} was not found") from None


def _read_timelist(text: str, name: str) -> tuple[int, ...]:
    values: list[int] = []
    for item in text.split(":") if text else []:
        value = read_time(item.strip(WHITESPACE))
        if value is None:
            raise OptionError(f"invalid time value for {name}")
        if values and value <= values[-1]:
            raise OptionError(f"time value out of order for {name}")
        values.append(value)
    if len(values) > 30:
        raise OptionError(f"too many time values for {name}")
    return () if values and values[0] == 0 else tuple(values)


def convert(typ: str, text: str, name: str) -> Any:
    """The typed value of *text* (what follows ``=``) for an option of *typ*."""
    if typ in ("str", "rewrite"):
        return read_string(text, name)
    if typ in ("int", "mkint"):
        return _read_int(text, name, False, False)
    if typ == "octint":
        return _read_int(text, name, True, False)
    if typ == "kint":
        return _read_int(text, name, False, True)
    if typ == "fixed":
        return _read_fixed(text, name)
    if typ == "time" or (typ == "time_or_str" and not text.startswith("$")):
        value = read_time(text)
        if value is None:
            raise OptionError(f"invalid time value for {name}")
        return value
    if typ == "time_or_str":
        return text
    if typ == "timelist":
        return _read_timelist(text, name)
    value = read_string(text, name)
    if typ in ("expand_uid", "expand_gid") and "$" in value:
        return value
    if typ in ("uid", "expand_uid"):
        return _lookup_user(value)
    if typ in ("gid", "expand_gid"):
        return _lookup_group(value)
    if typ == "uidlist":
        return tuple(_lookup_user(v) for v in split_list_with(value, ":"))
    if typ == "gidlist":
        return tuple(_lookup_group(v) for v in split_list_with(value, ":"))
    raise AssertionError(typ)


def _read_bool(text: str, name: str) -> bool:
    m = _NAME.match(text)
    word = m.group() if text[:1].isalpha() else ""
    if word.lower() in ("true", "yes"):
        value = True
    elif word.lower() in ("false", "no"):
        value = False
    else:
        raise OptionError(f'"{word}" is not a valid value for the "{name}" option')
    rest = text[len(word):].lstrip(WHITESPACE)
    if rest:
        _extra(rest, f'"{word}" for boolean option ', name)
    return value


def _join_repeat(flags: str, name: str, old: str, new: str) -> str:
    if "c" in flags:
        return f"${{if and{{{{bool_lax{{{old}}}}}{{bool_lax{{{new}}}}}}}}}"
    sep = "\n" if name.startswith("headers_add") else ";" if name.startswith("set") else ":"
    items = [old] if old else []
    items += [item.replace(sep, sep + sep) for item in split_list_with(new, sep)]
    return sep.join(items)


def handle_option(line: str, table: dict[str, Spec], aliases: dict[str, str],
                  values: dict[str, Any], hidden: set[str],
                  unknown: str | None) -> bool:
    """Apply one ``[hide] [no_|not_]name [= value]`` line to *values*.

    Returns False when the name is not in *table* and *unknown* is None
    (so that the caller can try another table); otherwise an unknown name
    raises OptionError with *unknown* formatted with the name."""
    text = line.lstrip(WHITESPACE)
    if not text[:1].isalpha():
        raise OptionError(f"option setting expected: {text}")
    hide = False
    for _ in range(2):
        name = _NAME.match(text).group()
        text = text[len(name):].lstrip(WHITESPACE)
        if name != "hide":
            break
        hide = True
    negated = 0
    if name.startswith("no_"):
        negated = 3
    if name.startswith("not_"):
        negated = 4
    key = aliases.get(name[negated:], name[negated:])
    spec = table.get(key)
    if spec is None:
        if unknown is None:
            return False
        raise OptionError(unknown % name)
    typ, _, flags = spec
    repeatable = "c" in flags or "s" in flags
    if key in values and not repeatable:
        raise OptionError(f'"{name}" option set for the second time')
    if typ not in _BOOL_TYPES:
        if negated:
            raise OptionError("negation prefix applied to a non-boolean option")
        if not text:
            raise OptionError(f"unexpected end of line (data missing) after {name}")
        if text[0] != "=":
            raise OptionError(f'missing "=" after {name}')
    elif text and (negated or text[0] != "="):
        _extra(text, "boolean option ", name)
    if text.startswith("="):
        text = text[1:].lstrip(WHITESPACE)
    if typ in _BOOL_TYPES:
        if typ == "expand_bool" and "$" in text:
            value: Any = read_string(text, name)
        else:
            value = _read_bool(text, name) if text else not negated
        if key in ("verify", "fail_verify"):
            # These set both the _sender and _recipient forms.
            values[f"{key}_sender"] = values[f"{key}_recipient"] = value
    else:
        value = convert(typ, text, name)
        if repeatable and values.get(key):
            value = _join_repeat(flags, key, values[key], value)
    values[key] = value
    if hide:
        hidden.add(key)
    return True


_PRINTABLE = {"\n": "\\n", "\r": "\\r", "\b": "\\b", "\v": "\\v", "\f": "\\f", "\t": "\\t"}


def printable(text: str) -> str:
    """Escape non-printing characters as Exim's ``string_printing2()``."""
    if all(" " <= c <= "~" for c in text):
        return text
    return "".join(c if " " <= c <= "~" else _PRINTABLE.get(c, f"\\{ord(c):03o}") for c in text)


def _user_name(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)


def _group_name(gid: int) -> str:
    try:
        return grp.getgrgid(gid).gr_name
    except KeyError:
        return str(gid)


def _mkint(value: int) -> str:
    if value and value % 1024 == 0:
        value //= 1024
        if value % 1024 == 0:
            return f"{value // 1024}M"
        return f"{value}K"
    return str(value)


def _kint(value: int) -> str:
    if value == 0:
        return "0"
    for shift, unit in ((30, "T"), (20, "G"), (10, "M")):
        if value % (1 << shift) == 0:
            return f"{value >> shift}{unit}"
    return f"{value}K"


def _fixed(value: int) -> str:
    whole, frac = divmod(value, 1000)
    digits = f"{frac:03d}".rstrip("0") or "0"
    return f"{whole}.{digits}"


_FORMATTERS: dict[str, Callable[[Any], str]] = {
    "str": printable, "rewrite": printable, "int": str, "mkint": _mkint,
    "kint": _kint, "octint": lambda v: "0" if v == 0 else f"0{v:o}",
    "time": format_time, "timelist": lambda v: ":".join(format_time(t) for t in v),
    "uid": _user_name, "gid": _group_name,
    "expand_uid": lambda v: printable(v) if isinstance(v, str) else _user_name(v),
    "expand_gid": lambda v: printable(v) if isinstance(v, str) else _group_name(v),
    "time_or_str": lambda v: printable(v) if isinstance(v, str) else format_time(v),
}


def format_value(name: str, typ: str, value: Any, hide: bool = False) -> str:
    """One ``-bP`` line (no newline) for an option and its value."""
    if hide:
        return f"{name} = {HIDDEN_TEXT}"
    if typ in _BOOL_TYPES:
        if isinstance(value, str):
            return f"{name} = {printable(value)}"
        return name if value else f"no_{name}"
    if typ == "fixed":
        return f"{name} =" if value is None else f"{name} = {_fixed(value)}"
    if typ in ("uidlist", "gidlist"):
        show = _user_name if typ == "uidlist" else _group_name
        return f"{name} =" + (" " + ":".join(show(v) for v in value) if value else "")
    if value is None:
        return f"{name} = "
    return f"{name} = {_FORMATTERS[typ](value)}"

