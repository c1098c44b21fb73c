"""Linear searches of text files: ``lsearch``, ``wildlsearch``,
``nwildlsearch`` and ``iplsearch`` (Exim's ``lookups/lsearch.c``).

A file is a sequence of entries ``key: data``.  The key runs to the first
colon or blank, or is ``"quoted"`` (with backslash escapes); the data is the
rest of the line after blanks and one optional colon, plus continuation lines
(lines starting with a blank), each joined with a single space.  Empty lines
and ``#`` lines are skipped, and end an entry's continuation.  The first
entry whose key matches wins.

Files are read synchronously, as Exim does.  The parsed form of a file is
kept between calls only while its inode, size and modification time are
unchanged.
"""

from __future__ import annotations

import os
import re
import stat
from dataclasses import dataclass
from typing import Any

from twisted.logger import Logger
from zope.interface import implementer

from twisted_mta.expand.errors import ExpansionError, ForcedFailure, LookupDefer
from twisted_mta.interfaces import ILookup
from twisted_mta.lookups.iputil import ip_address_version, ip_in_network
from twisted_mta.lookups.search import register_lookup

log = Logger()

C_SPACE = " \t\n\v\f\r"
_ASCII_LOWER = str.maketrans("ABCDEFGHIJKLMNOPQRSTUVWXYZ", "abcdefghijklmnopqrstuvwxyz")
_SIMPLE_ESCAPES = {"b": "\b", "f": "\f", "n": "\n", "r": "\r", "t": "\t", "v": "\v"}


def ascii_lower(text: str) -> str:
    """Lower-case ASCII letters only, like C's tolower() in the "C" locale."""
    return text.translate(_ASCII_LOWER)


def interpret_escape(text: str, pos: int) -> tuple[str, int]:
    """Exim's ``string_interpret_escape()``: *pos* is just after a
    backslash; return the character and the position after the escape."""
    if pos >= len(text):
        return "\\", pos
    c = text[pos]
    if c in "01234567":
        end = pos
        while end < len(text) and end < pos + 3 and text[end] in "01234567":
            end += 1
        return chr(int(text[pos:end], 8) & 0xFF), end
    if c == "x":
        end = pos + 1
        while end < len(text) and end < pos + 3 and text[end] in "0123456789abcdefABCDEF":
            end += 1
        if end == pos + 1:
            return "x", end
        return chr(int(text[pos + 1:end], 16)), end
    return _SIMPLE_ESCAPES.get(c, c), pos + 1


@dataclass(frozen=True)
class Entry:
    """One logical entry of an lsearch file.

    @ivar key: the key (dequoted).
    @ivar data: the data, continuations joined.
    @ivar full: the whole entry, key included (for ``ret=full``).
    """

    key: str
    data: str
    full: str


def parse_lsearch(text: str) -> list[Entry]:
    """Parse the text of an lsearch file into its entries, in file order."""
    raw_lines = text.split("\n")
    lines = []
    for index, line in enumerate(raw_lines):
        if index < len(raw_lines) - 1:
            lines.append(line.rstrip(C_SPACE))
        elif line:
            lines.append(line)     # no final newline: Exim keeps trailing blanks
    entries = []
    for index, line in enumerate(lines):
        if not line or line[0] == "#" or line[0] in C_SPACE:
            continue
        if line[0] == '"':
            pos = 1
            key_chars = []
            while pos < len(line) and line[pos] != '"':
                if line[pos] == "\\":
                    char, pos = interpret_escape(line, pos + 1)
                    key_chars.append(char)
                else:
                    key_chars.append(line[pos])
                    pos += 1
            key = "".join(key_chars)
            if pos < len(line):
                pos += 1
        else:
            pos = 0
            while pos < len(line) and line[pos] != ":" and line[pos] not in C_SPACE:
                pos += 1
            key = line[:pos]
        rest = line[pos:]
        full = key + rest
        data = rest.lstrip(C_SPACE)
        if data.startswith(":"):
            data = data[1:].lstrip(C_SPACE)
        for follow in lines[index + 1:]:
            if not follow or follow[0] == "#" or follow[0] not in C_SPACE:
                break
            more = " " + follow.lstrip(C_SPACE)
            data += more
            full += more
        entries.append(Entry(key, data, full))
    return entries


_file_cache: dict[str, tuple[tuple[int, int, int, int], list[Entry]]] = {}


def read_lsearch_file(path: str) -> list[Entry]:
    """The entries of the lsearch file *path*, with Exim's errors for a
    missing or unusable file (ExpansionError)."""
    try:
        handle = open(path, "rb")
    except IsADirectoryError:
        raise ExpansionError(f"{path} is not a regular file (lsearch lookup)") from None
    except OSError as e:
        raise ExpansionError(f"failed to open {path} for linear search: {e.strerror}") from None
    with handle:
        info = os.fstat(handle.fileno())
        if not stat.S_ISREG(info.st_mode):
            raise ExpansionError(f"{path} is not a regular file (lsearch lookup)")
        signature = (info.st_dev, info.st_ino, info.st_size, info.st_mtime_ns)
        cached = _file_cache.get(path)
        if cached is not None and cached[0] == signature:
            return cached[1]
        entries = parse_lsearch(handle.read().decode("latin-1"))
    _file_cache[path] = (signature, entries)
    return entries


def _match_string(subject: str, pattern: str) -> bool:
    """Match one caseless string-list item: ``^regex``, ``*suffix`` or a
    literal (Exim's check_string() for MCL_STRING)."""
    if pattern.startswith("^"):
        try:
            regex = re.compile(pattern, re.IGNORECASE | re.ASCII)
        except re.error as e:
            raise LookupDefer(f'failed to compile regular expression "{pattern}": {e}') from None
        return regex.search(subject) is not None
    if pattern.startswith("*"):
        suffix = pattern[1:]
        return len(suffix) <= len(subject) and ascii_lower(subject).endswith(ascii_lower(suffix))
    return ascii_lower(subject) == ascii_lower(pattern)


@implementer(ILookup)
class LinearSearch:
    """One of the four linear-search lookup types (an L{ILookup})."""

    query_style = False
    cacheable = True

    def __init__(self, name: str) -> None:
        self.name = name

    async def find(self, source: str, key: str, options: dict[str, str], context: Any) -> str | None:
        if self.name == "iplsearch" and key != "*" and ip_address_version(key) == 0:
            raise LookupDefer(
                f'"{key}" is not a valid iplsearch key (an IP address, with optional '
                "CIDR mask, is wanted): in a host list, use net-iplsearch as the search type"
            )
        ret_full = options.get("ret") == "full"
        for entry in read_lsearch_file(source):
            if await self._matches(entry.key, key, context):
                return entry.full if ret_full else entry.data
        return None

    async def _matches(self, line_key: str, key: str, context: Any) -> bool:
        if self.name == "lsearch":
            return len(line_key) == len(key) and ascii_lower(line_key) == ascii_lower(key)
        if self.name == "iplsearch":
            if line_key == "*" or key == "*":
                return line_key == key
            return ip_in_network(key, line_key)
        pattern = line_key
        if self.name == "wildlsearch":
            try:
                pattern = await context.expand(pattern)
            except ForcedFailure:
                return False
            except ExpansionError as e:
                log.error(
                    "failed to expand {pattern!r} while checking a list: {message}",
                    pattern=line_key, message=e.message,
                )
                raise LookupDefer("") from None
        pattern = pattern.strip(C_SPACE)
        negated = pattern.startswith("!")
        if negated:
            pattern = pattern[1:].lstrip(C_SPACE)
        # A negated single-item list matches everything the item does not.
        return _match_string(key, pattern) != negated

    def quote(self, value: str, extra: str | None) -> None:
        return None


for _name in ("lsearch", "wildlsearch", "nwildlsearch", "iplsearch"):
    register_lookup(LinearSearch(_name))
