"""Exim's readers and printers for numbers, times and lists.

Shared by the configuration reader and the expansion engine, so an option and
``${time_eval:}`` agree on what ``1h30m`` means.
"""

from __future__ import annotations

import re
import socket

_TIME_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
_TIME_PART = re.compile(r"(\d+)([smhdw])")
_SIZE_SUFFIX = {"k": 1024, "m": 1024 ** 2, "g": 1024 ** 3}


def parse_time(text: str) -> int | None:
    """Seconds in an Exim time interval such as ``1h30m``; None if malformed.

    A bare number is not a time interval, as in Exim."""
    if not text:
        return None
    total = 0
    pos = 0
    while pos < len(text):
        m = _TIME_PART.match(text, pos)
        if m is None:
            return None
        total += int(m.group(1)) * _TIME_UNITS[m.group(2)]
        pos = m.end()
    return total


def format_time(seconds: int) -> str:
    """Print *seconds* as Exim does (``5400`` -> ``1h30m``; 0 -> ``0s``)."""
    if seconds <= 0:
        return "0s"
    parts = []
    for unit in "wdhms":
        size = _TIME_UNITS[unit]
        count, seconds = divmod(seconds, size)
        if count:
            parts.append(f"{count}{unit}")
    return "".join(parts)


def parse_integer(text: str, *, decimal_only: bool = False) -> int | None:
    """An integer with an optional K/M/G suffix, None if malformed.

    Leading ``0`` means octal and ``0x`` hex unless *decimal_only*."""
    m = re.fullmatch(r"\s*([-+]?)(0[xX][0-9a-fA-F]+|\d+)([kKmMgG]?)\s*", text)
    if m is None:
        return None
    sign, digits, suffix = m.groups()
    if decimal_only:
        if digits[:2].lower() == "0x":
            return None
        value = int(digits, 10)
    elif digits[:2].lower() == "0x":
        value = int(digits, 16)
    elif len(digits) > 1 and digits[0] == "0":
        try:
            value = int(digits, 8)
        except ValueError:
            return None
    else:
        value = int(digits)
    if suffix:
        value *= _SIZE_SUFFIX[suffix.lower()]
    return -value if sign == "-" else value


def list_separator(text: str, default: str = ":") -> tuple[str, str]:
    """Split a ``<c`` separator change off the start of a list.

    Returns (separator, the rest of the list)."""
    stripped = text.lstrip()
    if stripped[:1] == "<":
        if len(stripped) == 1:
            return "\0", ""  # "<" then the end: Exim reads the NUL as separator
        if _is_separator_char(stripped[1]):
            return stripped[1], stripped[2:]
    return default, text


def _is_separator_char(c: str) -> bool:
    o = ord(c)
    return o < 32 or o == 127 or (c.isascii() and not c.isalnum() and not c.isspace())


def split_list(text: str, default: str = ":") -> list[str]:
    """The items of an Exim list: ``::`` is a literal colon (any doubled
    separator is literal), items are trimmed, and a trailing empty item is
    dropped, as in Exim's ``string_nextinlist()``."""
    sep, rest = list_separator(text, default)
    return split_list_with(rest, sep)


def split_list_with(rest: str, sep: str) -> list[str]:
    """Split *rest* on the given separator (no ``<c`` prefix processing)."""
    items: list[str] = []
    pos = 0
    while True:
        item, pos = _next_item(rest, sep, pos)
        if item is None:
            return items
        items.append(item)


def take_list_items(text: str, count: int, default: str = ":") -> tuple[list[str], str]:
    """The first *count* items of a list and the unparsed rest after them,
    as repeated ``string_nextinlist()`` calls leave it (``udpsend``)."""
    sep, rest = list_separator(text, default)
    items: list[str] = []
    pos = 0
    while len(items) < count:
        item, pos = _next_item(rest, sep, pos)
        if item is None:
            break
        items.append(item)
    return items, rest[pos:]


def _next_item(rest: str, sep: str, pos: int) -> tuple[str | None, int]:
    """The item starting at *pos* (None at the end) and where the next one
    starts; a doubled separator is a literal one."""
    n = len(rest)
    while pos < n and rest[pos].isspace() and rest[pos] != sep:
        pos += 1
    if pos >= n:
        return None, pos
    chunk: list[str] = []
    while pos < n:
        c = rest[pos]
        if c == sep:
            if pos + 1 < n and rest[pos + 1] == sep:
                chunk.append(sep)
                pos += 2
                continue
            pos += 1
            break
        chunk.append(c)
        pos += 1
    return "".join(chunk).rstrip(), pos


def interpret_escape(s: str, i: int) -> tuple[str, int]:
    """Exim's backslash escape whose backslash is at *i*: returns the
    character and the position after the escape (``\\ooo`` takes at most
    three octal digits, ``\\xhh`` at most two hex digits)."""
    if i + 1 >= len(s):
        return "\\", i + 1
    c = s[i + 1]
    j = i + 2
    if "0" <= c <= "7":
        value = ord(c) - 48
        for _ in range(2):
            if j < len(s) and "0" <= s[j] <= "7":
                value = value * 8 + ord(s[j]) - 48
                j += 1
            else:
                break
        return chr(value & 0xFF), j
    if c == "x":
        value = 0
        for _ in range(2):
            if j < len(s) and s[j] in "0123456789abcdefABCDEF":
                value = value * 16 + int(s[j], 16)
                j += 1
            else:
                break
        return chr(value), j
    return {"b": "\b", "f": "\f", "n": "\n", "r": "\r", "t": "\t", "v": "\v"}.get(c, c), j


def parse_port(text: str) -> int | None:
    """A TCP port: a number or a service name (``smtp``); None if neither."""
    text = text.strip()
    if text.isdigit():
        return int(text)
    try:
        return socket.getservbyname(text, "tcp")
    except OSError:
        return None
