"""RFC 2822 address extraction, as Exim's parse.c does it.

Used by the ``${address:}``, ``${addresses:}``, ``${domain:}`` and
``${local_part:}`` operators.  Values are byte-per-character strings.  The
main options that change parsing (allow_domain_literals, strip_trailing_dot,
strip_excess_angle_brackets, allow_utf8_domains) are at Exim's defaults: off.
(The plain local@domain form accepts a domain literal regardless, as Exim's
parse_extract_address() reads that domain with msg_id_literals set.)
"""

from __future__ import annotations

import re

_SPACE = " \t\n\r\f\v"
_SPECIALS = frozenset(' ()<>@,;:\\".[]\x7f')
_EMAILADDR_MAX = 256

# The common case, local@domain or <local@domain> with only white space
# around it, without comments, quotes, escapes, routes or literals. The
# character-by-character parse costs 20-40 us per address and runs several
# times for every message received; for these forms its result is just the
# matched text and offsets, so one match stands in for it. Local part: any
# run of non-special characters and dots (read_local_part()); domain:
# dot-separated labels of letters, digits and hyphens, none starting with
# a hyphen (read_domain()). Longer than _EMAILADDR_MAX, the full parse
# gives the error.
_PLAIN = re.compile(
    r"[ \t\n\r\f\v]*(<?)"
    r"([^\x00-\x20()<>@,;:\\\"\[\]\x7f]+@[A-Za-z0-9][A-Za-z0-9-]*(?:\.[A-Za-z0-9][A-Za-z0-9-]*)*)"
    r"(>?)[ \t\n\r\f\v]*")


def _special(c: str) -> bool:
    """mac_iscntrl_or_special(); the end of the string counts as special."""
    return c == "" or c < " " or c in _SPECIALS


def _alnum(c: str) -> bool:
    return c.isascii() and c.isalnum()


class AddressError(Exception):
    """The text is not a valid address; ``args[0]`` is Exim's reason."""


class _Parser:
    """One parse of one mailbox; mirrors parse_extract_address()."""

    def __init__(self, text: str, allow_group: bool,
                 allow_domain_literals: bool = False) -> None:
        self.s = text
        self.allow_domain_literals = allow_domain_literals
        self.i = 0
        self.allow_group = allow_group
        self.found_group = False
        self.last_comment = 0

    def ch(self, offset: int = 0) -> str:
        j = self.i + offset
        return self.s[j] if j < len(self.s) else ""

    def skip_comment(self) -> None:
        self.last_comment = self.i
        while self.i < len(self.s):
            while self.ch() and self.ch() in _SPACE:
                self.i += 1
            if self.ch() != "(":
                break
            level = 1
            self.i += 1
            while self.i < len(self.s):
                c = self.s[self.i]
                self.i += 1
                if c == "(":
                    level += 1
                elif c == ")":
                    level -= 1
                    if level <= 0:
                        break
                elif c == "\\" and self.i < len(self.s):
                    self.i += 1

    def read_local_part(self, allow_null: bool) -> str:
        out: list[str] = []
        while True:
            self.skip_comment()
            before = len(out)
            if self.ch() == '"':
                out.append('"')
                self.i += 1
                while self.ch() and self.ch() != '"':
                    c = self.ch()
                    out.append(c)
                    self.i += 1
                    if c == "\\" and self.ch():
                        out.append(self.ch())
                        self.i += 1
                if self.ch() != '"':
                    raise AddressError("unmatched doublequote in local part")
                self.i += 1
                out.append('"')
            else:
                while not _special(self.ch()) or self.ch() == "\\":
                    c = self.ch()
                    out.append(c)
                    self.i += 1
                    if c == "\\" and self.ch():
                        out.append(self.ch())
                        self.i += 1
            self.skip_comment()
            if len(out) == before and self.ch() != ".":
                if not out and not allow_null:
                    raise AddressError("missing or malformed local part")
                return "".join(out)
            if self.ch() != ".":
                return "".join(out)
            while self.ch() == ".":
                out.append(".")
                self.i += 1

    def read_domain(self, msg_id_literals: bool = False) -> str:
        self.skip_comment()
        if self.ch() == "[":
            return self.read_domain_literal(msg_id_literals)
        out: list[str] = []
        while True:
            start = len(out)
            if self.ch() != "-":
                self.read_subdomain(out)
            self.skip_comment()
            if len(out) == start:
                raise AddressError("domain missing or malformed")
            if self.ch() != ".":
                return "".join(out)
            out.append(".")
            self.i += 1
            self.skip_comment()

    def read_subdomain(self, out: list[str]) -> None:
        """Letters, digits and hyphens (a subclass may allow more)."""
        while _alnum(self.ch()) or self.ch() == "-":
            out.append(self.ch())
            self.i += 1

    def read_domain_literal(self, msg_id_literals: bool) -> str:
        """A bracketed literal.  With *msg_id_literals* (the plain
        local@domain case) any printable character but ``[ \\ ]`` is taken
        and allow_domain_literals is not consulted; otherwise only IP
        address characters are, and the option (off) rejects it."""
        out = ["["]
        self.i += 1
        if self.s[self.i:self.i + 5].lower() in ("ipv6:", "ipv4:"):
            out.append(self.s[self.i:self.i + 5])
            self.i += 5
        while True:
            c = self.ch()
            if msg_id_literals:
                ok = c != "" and ("!" <= c <= "Z" or "^" <= c <= "~")
            else:
                ok = c != "" and (c in ".:" or c in "0123456789abcdefABCDEF")
            if not ok:
                break
            out.append(c)
            self.i += 1
        if self.ch() != "]":
            raise AddressError("malformed domain literal")
        self.i += 1
        out.append("]")
        if not msg_id_literals and not self.allow_domain_literals:
            raise AddressError("domain literals not allowed")
        self.skip_comment()
        return "".join(out)

    def read_route(self) -> None:
        commas = False
        while self.ch() == "@":
            self.i += 1
            self.read_domain()
            if self.ch() != ",":
                break
            self.i += 1
            commas = True
            self.skip_comment()
        if self.ch() == ":":
            self.i += 1
        else:
            raise AddressError("colon expected after route list" if commas else "no local part")
        self.skip_comment()

    def read_addr_spec(self, term: str) -> tuple[str, int]:
        """local-part[@domain]; returns the address and the domain offset."""
        local = self.read_local_part(False)
        if self.ch() == term:
            return local, 0
        if self.ch() != "@":
            raise AddressError(f'"@" or "." expected after "{local}"')
        self.i += 1
        return f"{local}@{self.read_domain()}", len(local) + 1

    def extract(self) -> tuple[str, int, int, int]:
        """Returns (address, domain offset or 0, start, end)."""
        try:
            return self._extract()
        except AddressError:
            if self.found_group and self.ch() == ";":
                self.found_group = False
                self.allow_group = True
            raise

    def _extract(self) -> tuple[str, int, int, int]:
        plain = _PLAIN.fullmatch(self.s)
        if plain is not None and plain[1] == ("<" if plain[3] else "") \
                and plain.end(2) - plain.start(2) <= _EMAILADDR_MAX:
            address = plain[2]
            return address, address.index("@") + 1, plain.start(2), plain.end(2)
        domain = 0
        while True:  # restarts after a group name
            self.skip_comment()
            start = self.i
            address = self.read_local_part(True)
            if self.ch() in ("@", "<"):
                break
            if self.ch() in ("", ";"):
                if not address:
                    raise AddressError("empty address")
                return self._finish(address, 0, start, self.last_comment)
            while self.ch() != "<" and not (self.allow_group and self.ch() == ":"):
                try:
                    self.read_local_part(False)
                except AddressError as e:
                    raise AddressError(f'{e.args[0]} (expected word or "<")') from None
            if self.ch() == ":":
                self.found_group = True
                self.allow_group = False
                self.i += 1
                continue
            break

        if self.ch() == "<":
            self.i += 1
            start = self.i
            self.skip_comment()
            routed = False
            if self.ch() == "@":
                self.read_route()
                routed = True
            address, domain = self.read_addr_spec(">")
            if routed and domain == 0:
                raise AddressError("domain missing in source-routed address")
            end = self.i
            if self.ch() != ">":
                self.i += 1
                if self.i > len(self.s):
                    raise AddressError("'>' missing at end of address")
                raise AddressError(
                    f"malformed address: {self.s[self.i - 1:self.i + 31]} may not follow "
                    f"{self.s[:self.i - 1]}"
                )
            self.i += 1
            self.skip_comment()
        elif not address:
            self.read_route()
            address, domain = self.read_addr_spec("")
            end = self.last_comment
            if domain == 0:
                raise AddressError("domain missing in source-routed address")
        else:
            self.i += 1
            domain = len(address) + 1
            address = f"{address}@{self.read_domain(True)}"
            end = self.last_comment
        return self._finish(address, domain, start, end)

    def _finish(self, address: str, domain: int, start: int, end: int) -> tuple[str, int, int, int]:
        if self.ch():
            if self.found_group and self.ch() == ";":
                self.found_group = False
                self.allow_group = True
            else:
                raise AddressError(
                    f"malformed address: {self.s[self.i:self.i + 32]} may not follow {self.s[:self.i]}"
                )
        while end > 0 and self.s[end - 1] in _SPACE:
            end -= 1
        if end - start > _EMAILADDR_MAX:
            raise AddressError(f"address is ridiculously long: {address[:64]}...")
        return address, domain, start, end


def extract_address(mailbox: str, allow_domain_literals: bool = False) -> tuple[str, int]:
    """The operative address in an RFC 2822 mailbox and the offset of its
    domain (0 if it has none); raises AddressError."""
    address, domain, _start, _end = _Parser(mailbox, False, allow_domain_literals).extract()
    return address, domain


def find_address_end(s: str, pos: int = 0) -> int:
    """Index of the comma (or end) ending the address at *pos*, skipping
    quotes, comments and commas inside a source route; parse_find_address_end()."""
    n = len(s)
    source_routing = pos < n and s[pos] == "@"
    no_term = 1 if source_routing else 0
    i = pos
    while i < n and (s[i] != "," or no_term > 0):
        c = s[i]
        if c == "\\" and i + 1 < n:
            i += 2
        elif c == '"':
            i += 1
            while i < n:
                if s[i] == "\\" and i + 1 < n:
                    i += 1
                elif s[i] == '"':
                    i += 1
                    break
                i += 1
        elif c == "(":
            level = 1
            i += 1
            while i < n:
                if s[i] == "\\" and i + 1 < n:
                    i += 1
                elif s[i] == "(":
                    level += 1
                elif s[i] == ")":
                    level -= 1
                    if level <= 0:
                        i += 1
                        break
                i += 1
        else:
            if c == "<":
                source_routing = i + 1 < n and s[i + 1] == "@"
                no_term = 2 if source_routing else 1
            elif c == ">" or source_routing and c == ":":
                no_term -= 1
            i += 1
    return i


def extract_addresses(text: str, sep: str = ":") -> list[str]:
    """Every valid address in a comma-separated header value, with group
    syntax allowed; invalid entries are skipped, as ``${addresses:}`` does."""
    found: list[str] = []
    allow_group, found_group = True, False
    pos = 0
    while True:
        end = find_address_end(text, pos)
        parser = _Parser(text[pos:end], allow_group)
        parser.found_group = found_group
        try:
            found.append(parser.extract()[0])
        except AddressError:
            pass
        allow_group, found_group = parser.allow_group, parser.found_group
        if end >= len(text):
            return found
        pos = end + 1


def qualify_addresses(text: str, domain: str) -> str | None:
    """*text* (a header value of addresses) with ``@domain`` added to each
    address that has none, as Exim qualifies the headers of a local
    message; None when every address already has a domain."""
    out: list[str] = []
    changed = False
    allow_group, found_group = True, False
    pos = 0
    while True:
        end = find_address_end(text, pos)
        item = text[pos:end]
        parser = _Parser(item, allow_group)
        parser.found_group = found_group
        try:
            address, domain_at, _start, address_end = parser.extract()
        except AddressError:
            address, domain_at = "", 1
        if address and not domain_at:
            item = f"{item[:address_end]}@{domain}{item[address_end:]}"
            changed = True
        out.append(item)
        allow_group, found_group = parser.allow_group, parser.found_group
        if end >= len(text):
            return "".join(out) if changed else None
        out.append(text[end])
        pos = end + 1
