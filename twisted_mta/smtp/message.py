"""Assembling an incoming message: DATA and BDAT input, the header
section, sizes and line counts as Exim counts them.

End of data is only ``CRLF . CRLF``: a dot line ends the message only
when it and the line before it end in CRLF, so no bare LF or bare CR can
smuggle a second message (CVE-2023-51766); Exim 4.97 and later behave the
same way.  Lines are stored with LF endings, as in Exim's ``-D`` file.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from twisted_mta.spool.flags import header_flag

_HEADER_NAME_CHARS = frozenset(bytes(range(33, 127))) - {ord(":")}


@dataclass
class Header:
    """One header line (with continuations), text ending in LF; flag is
    Exim's spool flag letter (space, F, T, C, B, I, P, R, S, or * when
    removed)."""

    text: str
    flag: str = " "

    @property
    def name(self) -> str:
        return self.text.split(":", 1)[0].rstrip(" \t")

    @property
    def value(self) -> str:
        return self.text.split(":", 1)[1] if ":" in self.text else ""


@dataclass
class IncomingMessage:
    """The message as read from the client."""

    headers: list[Header] = field(default_factory=list)
    body: bytes = b""
    body_linecount: int = 0
    max_linelength: int = 0
    body_zerocount: int = 0
    size_read: int = 0
    too_big: bool = False
    added_size: int = 0
    #: $message_linecount: the header lines received, one for the blank
    #: line (counted even when the sender left it out, as Exim does) and
    #: the body lines; headers added here do not count.
    lines_read: int = 0

    def add_header(self, header: Header, index: int | None = None) -> None:
        """Add a header the MTA made (Received, ACL headers); Exim counts
        these on top of the bytes read."""
        if index is None:
            self.headers.append(header)
        else:
            self.headers.insert(index, header)
        self.added_size += len(header.text)  # one character per byte

    def size(self) -> int:
        """The ``S=`` size: the data as read (LF line endings, the blank
        line included) plus the headers added here."""
        return self.size_read + self.added_size

    def header_values(self) -> dict[str, str]:
        """Name (lower case) to value for ``$h_``: repeated headers joined
        with newlines, as Exim does for $h_name."""
        found: dict[str, list[str]] = {}
        for h in self.headers:
            if h.flag != "*":
                found.setdefault(h.name.lower(), []).append(h.value)
        return {k: "\n".join(v) for k, v in found.items()}

    def decoded_header_values(self) -> dict[str, str]:
        """For ``$h_name:``: leading blanks and the final newline removed."""
        return {k: v.lstrip(" \t").rstrip("\n") for k, v in self.header_values().items()}


class DataReader:
    """Collects the lines of a DATA transfer; C{feed} returns the bytes
    after the terminating dot line once it is seen."""

    def __init__(self, size_limit: int, *, dot_ends: bool = True) -> None:
        self.size_limit = size_limit
        self.dot_ends = dot_ends
        self._lines: list[bytes] = []
        self._prev_crlf = True
        self._pending = b""
        self.size_read = 0
        self.too_big = False
        self.max_linelength = 0
        self.done = False

    def feed(self, data: bytes) -> bytes | None:
        """Consume *data*; returns the unconsumed remainder once the end
        of data was seen, else None."""
        buf = self._pending + data if self._pending else data
        pos = 0
        n = len(buf)
        while pos < n:
            nl = buf.find(b"\n", pos)
            if nl < 0:
                break
            crlf = nl > pos and buf[nl - 1] == 13
            line = buf[pos:nl - 1] if crlf else buf[pos:nl]
            pos = nl + 1
            if self.dot_ends and crlf and self._prev_crlf and line == b".":
                self.done = True
                self._pending = b""
                return buf[pos:]
            if self.dot_ends and line[:1] == b".":
                line = line[1:]
            self._prev_crlf = crlf
            self._add(line)
        self._pending = buf[pos:]
        return None

    def feed_chunk(self, data: bytes, last: bool) -> None:
        """BDAT: a chunk of raw message bytes (CRLF lines, no dot stuffing)."""
        buf = self._pending + data
        pos = 0
        while True:
            nl = buf.find(b"\n", pos)
            if nl < 0:
                break
            line = buf[pos:nl - 1] if nl > pos and buf[nl - 1] == 13 else buf[pos:nl]
            self._add(line)
            pos = nl + 1
        self._pending = buf[pos:]
        if last:
            if self._pending:
                self._add(self._pending)
                self._pending = b""
            self.done = True

    def _add(self, line: bytes) -> None:
        self.size_read += len(line) + 1
        if self.size_limit and self.size_read > self.size_limit:
            self.too_big = True
            return
        if len(line) > self.max_linelength:
            self.max_linelength = len(line)
        self._lines.append(line)

    def message(self) -> IncomingMessage:
        """Split what was read into headers and body."""
        lines = self._lines
        headers: list[Header] = []
        i = 0
        current: list[bytes] | None = None
        while i < len(lines):
            line = lines[i]
            if line == b"":
                i += 1
                break
            if line[:1] in (b" ", b"\t") and current is not None:
                current.append(line)
                i += 1
                continue
            if not _is_header_line(line):
                break
            if current is not None:
                headers.append(_header(current))
            current = [line]
            i += 1
        if current is not None:
            headers.append(_header(current))
        body_lines = lines[i:]
        body = b"".join(line + b"\n" for line in body_lines)
        return IncomingMessage(
            headers=headers, body=body, body_linecount=len(body_lines),
            max_linelength=self.max_linelength, body_zerocount=body.count(b"\0"),
            size_read=self.size_read, too_big=self.too_big,
            lines_read=sum(h.text.count("\n") for h in headers) + 1 + len(body_lines))


def logged_message_id(headers: list[Header]) -> str | None:
    """The Message-ID as the ``<=`` line's ``id=`` shows it: read as an
    address (no angle brackets; domain literals allowed), None when there
    is none or it does not parse."""
    from twisted_mta.expand.addresses import AddressError, extract_address

    for header in headers:
        if header.flag == "I":
            try:
                return extract_address(header.value, allow_domain_literals=True)[0]
            except AddressError:
                return None
    return None


def _is_header_line(line: bytes) -> bool:
    colon = line.find(b":")
    if colon <= 0:
        return False
    name = line[:colon].rstrip(b" \t")
    return bool(name) and all(c in _HEADER_NAME_CHARS for c in name)


def _header(lines: list[bytes]) -> Header:
    text = b"\n".join(lines).decode("latin-1") + "\n"
    return Header(text, header_flag(text))
