"""The MIME ACL (``acl_smtp_mime``): the message cut into its MIME parts,
the ACL run once for each, and the ``decode`` and ``mime_regex``
conditions that look into the current part.

This follows Exim 4.96 as Debian ships it (``mime.c`` with the 2024 fixes
for parameters split RFC 2231 style), quirks included, because ACLs are
written against what Exim does:

* Header lines of a part are read character by character: blanks and
  comments in parentheses vanish outside parameter values, control
  characters (tabs too) vanish everywhere, and the value of each
  interesting header is lower-cased (so ``Content-Description: My File``
  gives ``myfile``).
* Boundary lines are found by prefix (``--boundary`` at the start of a
  line), and a nested multipart only looks for its own boundary.
* A message/rfc822 part is decoded to ``scan/<id>/__rfc822_NNNNN`` under
  the spool directory and, once every part of the message has passed,
  checked as a message of its own with ``$mime_is_rfc822`` set.

Reading and decoding run in the server's thread pool, so that a large
message does not hold up the reactor; the ACL itself runs in the reactor.
Decoded files live in ``<spool>/scan/<message id>/`` and are removed when
the message is done with (:func:`unspool`).
"""

from __future__ import annotations

import binascii
import os
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from twisted.internet import threads

from twisted_mta.acl.engine import DEFER, FAIL, OK, AclOutcome
from twisted_mta.expand.errors import ExpansionError
from twisted_mta.expand.operators import _b64decode, _qp_decode
from twisted_mta.expand.regex import compile_regex
from twisted_mta.smtp.message import IncomingMessage
from twisted_mta.values import split_list

if TYPE_CHECKING:
    from twisted_mta.smtp.server import ESMTPServer
    from twisted_mta.smtp.session import SmtpAclSession

#: Exim's MIME_MAX_HEADER_SIZE (a header line, and the buffer boundary
#: lines are read into) and MIME_MAX_LINE_LENGTH (the decoders' buffer).
MAX_HEADER_SIZE = 8192
MAX_LINE_LENGTH = 32768
#: How much of a decoded part ``mime_regex`` looks at.
REGEX_SCAN_SIZE = 32766
#: How many capture groups fill $regex1..$regex9.
REGEX_VARS = 9

ANOMALY_QP = (1, "Broken Quoted-Printable encoding detected")
ANOMALY_BASE64 = (2, "Broken BASE64 encoding detected")

# Boundary contexts: the parts after the first of a multipart/mixed are
# attachments; every part of an alternative or related one is part of the
# cover letter (Exim's MBC_*).
ATTACHMENT, COVERLETTER_ONESHOT, COVERLETTER_ALL = 0, 1, 2

_HEADERS = (
    (b"content-type:", "mime_content_type"),
    (b"content-disposition:", "mime_content_disposition"),
    (b"content-transfer-encoding:", "mime_content_transfer_encoding"),
    (b"content-id:", "mime_content_id"),
    (b"content-description:", "mime_content_description"),
)
_PARAMETERS = (
    (b"name", "mime_filename"),
    (b"filename", "mime_filename"),
    (b"charset", "mime_charset"),
    (b"boundary", "mime_boundary"),
)
# What a part's headers set (None: unset); reset for every part.
_PART_VARIABLES = tuple(name for _, name in _HEADERS) + (
    "mime_filename", "mime_charset", "mime_boundary")
_RESET_VARIABLES = _PART_VARIABLES + (
    "mime_anomaly_level", "mime_anomaly_text", "mime_decoded_filename",
    "mime_is_multipart", "mime_content_size")
# The ones that outlive the parts, until the message is done.
_MESSAGE_VARIABLES = ("mime_part_count", "mime_is_coverletter", "mime_is_rfc822")

_HEX = frozenset(b"0123456789abcdefABCDEF")
_C_SPACE = frozenset(b" \t\n\v\f\r")
_B64_ALPHABET = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
_B64_VALUE = {c: i for i, c in enumerate(_B64_ALPHABET)}
# Bytes the base64 decoder skips as bad (everything but the alphabet and "=").
_B64_BAD = bytes(c for c in range(256) if c not in _B64_VALUE and c != ord("="))
_B64_LINE_END = re.compile(rb"[\r\n\0]")


# -- reading the message ------------------------------------------------------------

class Stream:
    """The message (or a decoded message/rfc822 part) as bytes, with a read
    position: what Exim reads with fgets()/fgetc() from its mbox file."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0


def read_header(stream: Stream) -> tuple[bytes, bool]:
    """One header line of a part, folded and cleaned as Exim's
    mime_get_header() does, ending in ``;``; the flag is False at the end
    of the header block (an empty line) or of the data."""
    data, pos, n = stream.data, stream.pos, len(stream.data)
    out = bytearray()
    value_mode = 0      # 0: outside a value; 1: before it; 2: in it; 3: at a quote
    brackets = 0
    c = -1
    done = False
    while not done:
        if pos >= n:
            c = -1
            break
        c = data[pos]
        pos += 1
        if c == 13:
            continue
        if c == 10:
            if out:
                if pos >= n:
                    c = -1
                    break
                if data[pos] in (9, 32):      # a continuation line
                    pos += 1
                    continue
            c = 59
            done = True
        if c < 32:
            continue
        if value_mode:
            if c in (9, 32) and value_mode == 1:
                continue
            value_mode = 3 if c == 34 else 2
            if value_mode == 2 and c == 59:
                value_mode = 0
        else:
            if c in (9, 32):
                continue
            if c == 92:                       # backslash: the next byte as it is
                if pos >= n:
                    c = -1
                    break
                c = data[pos]
                pos += 1
            elif c == 40:
                brackets += 1
                continue
            elif c == 41 and brackets:
                brackets -= 1
                continue
            elif c == 61 and not brackets:
                value_mode = 1
            if brackets:
                continue
        out.append(c)
        if len(out) > MAX_HEADER_SIZE - 1:
            done = True
    if out and out[-1] != 59:
        out[-1] = 59
    stream.pos = pos
    return bytes(out), not (c == -1 or len(out) == 1)


def find_boundary(data: bytes, start: int, marker: bytes, limit: int) -> tuple[int, int]:
    """(start, end) of the first line piece at or after *start* that begins
    with *marker*, reading as fgets() with a buffer of *limit* + 1 bytes
    would (a long line comes in pieces of *limit* bytes); (-1, -1) if none.
    *start* must be where such reading begins."""
    pos = start
    n = len(data)
    while True:
        i = data.find(marker, pos)
        if i < 0:
            return -1, -1
        newline = data.rfind(b"\n", pos, i)
        line_start = newline + 1 if newline >= 0 else pos
        offset = (i - line_start) % limit
        piece = i - offset
        newline = data.find(b"\n", piece, piece + limit)
        end = newline + 1 if newline >= 0 else min(piece + limit, n)
        if offset == 0 and i + len(marker) <= end:
            return i, end
        pos = end


def _pieces(data: bytes, limit: int) -> Iterator[bytes]:
    """The pieces fgets() with a buffer of *limit* + 1 bytes reads."""
    pos, n = 0, len(data)
    while pos < n:
        newline = data.find(b"\n", pos, pos + limit)
        end = newline + 1 if newline >= 0 else min(pos + limit, n)
        yield data[pos:end]
        pos = end


# -- parameters and encoded words ---------------------------------------------------

def _param_value(h: bytes, p: int) -> tuple[bytes | None, int]:
    """A parameter value up to the next ``;`` outside quotes, quotes
    removed; None when empty."""
    n = len(h)
    value = bytearray()
    while p < n and h[p] != 59:
        if h[p] == 34:
            p += 1
            while p < n and h[p] != 34:
                value.append(h[p])
                p += 1
            if p < n:
                p += 1
        else:
            value.append(h[p])
            p += 1
    return (bytes(value) if value else None), p


def _next_semicolon(h: bytes, p: int) -> int:
    n = len(h)
    while p < n and h[p] != 59:
        if h[p] == 34:
            p += 1
            while p < n and h[p] != 34:
                p += 1
            if p < n:
                p += 1
        else:
            p += 1
    return p


def _encoded_word(s: bytes, pos: int, lencheck: bool) -> tuple[int, int, bytes] | None:
    """The next valid ``=?charset?X?data?=`` at or after *pos*: its start,
    the position of its ``?=``, and the decoded bytes."""
    while True:
        start = s.find(b"=?", pos)
        if start < 0:
            return None
        q1 = s.find(b"?", start + 2)
        q2 = s.find(b"?", q1 + 1) if q1 >= 0 else -1
        end = s.find(b"?=", q2 + 1) if q2 >= 0 else -1
        if end < 0:
            return None
        pos = start + 2
        if (lencheck and end - start > 73) or q2 - q1 != 2:
            continue
        encoding = s[q1 + 1:q1 + 2].upper()
        text = s[q2 + 1:end].decode("latin-1")
        decoded = _b64decode(text) if encoding == b"B" else \
            _qp_decode(text) if encoding == b"Q" else None
        if decoded is not None:
            return start, end, decoded.encode("latin-1")


def decode_words(s: bytes, lencheck: bool = True) -> bytes:
    """RFC 2047 encoded words decoded, with no charset conversion (Exim's
    rfc2047_decode() with no target): blanks between two words vanish and
    a zero byte becomes a space."""
    word = _encoded_word(s, 0, lencheck)
    if word is None:
        return s
    out = bytearray()
    pos = 0
    while word is not None:
        start, end, decoded = word
        out += s[pos:start]
        out += decoded.replace(b"\0", b" ")
        pos = end + 2
        word = _encoded_word(s, pos, lencheck)
        if word is not None:
            gap = pos
            while gap < len(s) and s[gap] in _C_SPACE:
                gap += 1
            if gap == word[0]:
                pos = gap
    out += s[pos:]
    return bytes(out)


def _rfc2231_to_2047(value: bytes, charset: bytes | None) -> bytes:
    """An RFC 2231 value (``%XX`` escapes) as a Q encoded word."""
    out = bytearray(b"=?" + (charset or b"") + b"?Q?")
    i, n = 0, len(value)
    while i < n:
        if value[i] == 37 and i + 2 < n and value[i + 1] in _HEX and value[i + 2] in _HEX:
            out += b"=" + value[i + 1:i + 3]
            i += 3
        else:
            out.append(value[i])
            i += 1
    return bytes(out + b"?=")


@dataclass
class PartHeaders:
    """What a part's headers say: the values of the $mime_* variables
    (None: unset), as bytes."""

    values: dict[str, bytes | None] = field(
        default_factory=lambda: dict.fromkeys(_PART_VARIABLES))

    @property
    def content_type(self) -> bytes | None:
        return self.values["mime_content_type"]

    @property
    def boundary(self) -> bytes | None:
        return self.values["mime_boundary"]

    @property
    def transfer_encoding(self) -> bytes | None:
        return self.values["mime_content_transfer_encoding"]


def parse_headers(lines: list[bytes], lencheck: bool = True) -> PartHeaders:
    """The $mime_* values from a part's header lines (as
    :func:`read_header` returns them); *lencheck* is
    ``check_rfc2047_length``."""
    part = PartHeaders()
    values = part.values
    for line in lines:
        h = line.split(b"\0", 1)[0]
        for name, variable in _HEADERS:
            if h[:len(name)].lower() == name:
                _parse_header(h, len(name), variable, values, lencheck)
                break
    return part


def _parse_header(h: bytes, p: int, variable: str, values: dict[str, bytes | None],
                  lencheck: bool) -> None:
    n = len(h)
    q = h.find(b";", p)
    if q < 0:
        q = n
    values[variable] = h[p:q].lower()
    p = q + 1 if q < n else q
    filename: bytes | None = None          # RFC 2231 pieces, decoded
    raw: bytes | None = None               # ... and as they came
    charset: bytes | None = None
    failed = False
    while p < n:
        handled = False
        for name, target in _PARAMETERS:
            if h[p:p + len(name)].lower() != name:
                continue
            p += len(name)
            c = h[p] if p < n else 0
            if c == 42:                                     # "*": RFC 2231
                p += 1
                while p < n and 48 <= h[p] <= 57:           # continuation number
                    p += 1
                if p < n and h[p] == 42:
                    p += 1
                if p < n and h[p] == 61:
                    value, p = _param_value(h, p + 1)
                    if value:
                        raw = (raw or b"") + value
                        if not failed:
                            piece = value
                            if charset is None:
                                quote = value.find(b"'")
                                if quote >= 0:
                                    if quote > 0:
                                        charset = value[:quote]
                                    piece = value[quote + 1:].lstrip(b"'")
                            word = _rfc2231_to_2047(piece, charset)
                            plain = decode_words(word, lencheck=False)
                            if len(plain) == len(word):
                                failed = True
                            elif target == "mime_filename":
                                filename = (filename or b"") + plain
                                values["mime_filename"] = filename
                    if p < n:
                        p += 1
                    handled = True
                    break
            elif c == 61:                                   # "="
                value, p = _param_value(h, p + 1)
                values[target] = decode_words(value, lencheck) if value else None
                if p < n:
                    p += 1
                handled = True
                break
        if not handled:
            p = _next_semicolon(h, p)
            if p < n:
                p += 1
    if variable == "mime_content_disposition" and failed:
        values["mime_filename"] = raw


def next_part(stream: Stream, boundary: bytes | None) -> list[bytes] | None:
    """Move to the next part and read its headers: with a *boundary*, past
    the next ``--boundary`` line first (None at the closing boundary or the
    end of the data); without, the headers start where *stream* is."""
    if boundary is not None:
        marker = b"--" + boundary
        start, end = find_boundary(stream.data, stream.pos, marker, MAX_HEADER_SIZE - 1)
        if start < 0:
            stream.pos = len(stream.data)
            return None
        stream.pos = end
        if stream.data[start + len(marker):end][:2] == b"--":
            return None
    lines = []
    while True:
        line, more = read_header(stream)
        if not more:
            return lines
        lines.append(line)


# -- decoding -----------------------------------------------------------------------

def part_body(data: bytes, start: int, boundary: bytes | None) -> bytes:
    """A part's encoded body: from *start* to the enclosing *boundary* line
    (or the end), as the decoders read it."""
    if boundary is None:
        return data[start:]
    end, _ = find_boundary(data, start, b"--" + boundary, MAX_LINE_LENGTH - 1)
    return data[start:] if end < 0 else data[start:end]


def decode_asis(body: bytes) -> tuple[bytes, tuple[int, str] | None]:
    """No (or an unknown) transfer encoding: the bytes as they are, each
    line cut at a zero byte as C strings are."""
    if b"\0" not in body:
        return body, None
    return b"".join(piece.split(b"\0", 1)[0]
                    for piece in _pieces(body, MAX_LINE_LENGTH - 1)), None


def decode_qp(body: bytes) -> tuple[bytes, tuple[int, str] | None]:
    """Quoted-printable: ``=XX`` escapes and soft line breaks; a stray
    ``=`` is kept and flagged as an anomaly."""
    out = bytearray()
    anomaly = None
    for piece in _pieces(body, MAX_LINE_LENGTH - 1):
        piece = piece.split(b"\0", 1)[0]
        i, n = 0, len(piece)
        while i < n:
            eq = piece.find(b"=", i)
            if eq < 0:
                out += piece[i:]
                break
            out += piece[i:eq]
            if eq + 2 < n and piece[eq + 1] in _HEX and piece[eq + 2] in _HEX:
                out.append(int(piece[eq + 1:eq + 3], 16))
                i = eq + 3
                continue
            j = eq + 1
            while j < n and piece[j] in (9, 32, 13):
                j += 1
            if j < n and piece[j] == 10:        # soft line break
                break
            anomaly = ANOMALY_QP
            out.append(61)
            i = eq + 1
    return bytes(out), anomaly


def decode_base64(body: bytes) -> tuple[bytes, tuple[int, str] | None]:
    """Base64 as Exim's stream decoder does it: bad characters skipped
    (and flagged), ``=`` counted as a (silent) position, a last incomplete
    byte written out."""
    kept = []
    anomaly = None
    for piece in _pieces(body, MAX_LINE_LENGTH - 1):
        cut = _B64_LINE_END.search(piece)
        if cut is not None:
            piece = piece[:cut.start()]
        clean = piece.translate(None, _B64_BAD)
        if len(clean) != len(piece):
            anomaly = ANOMALY_BASE64
        kept.append(clean)
    text = b"".join(kept)
    core = text.rstrip(b"=")
    padding = len(text) - len(core)
    out = bytearray()
    if b"=" not in core:
        whole = len(core) // 4 * 4
        out += binascii.a2b_base64(core[:whole])
        rest = core[whole:]
    else:
        rest, padding = text, 0
    state, current = 0, 0
    for ch in rest:
        if ch == 61:
            state += 1
            continue
        v = _B64_VALUE[ch]
        step = state & 3
        state += 1
        if step == 0:
            current = (v << 2) & 0xFF
        elif step == 1:
            out.append(current | (v >> 4))
            current = (v << 4) & 0xFF
        elif step == 2:
            out.append(current | (v >> 2))
            current = (v << 6) & 0xFF
        else:
            out.append(current | v)
            current = 0
    state += padding
    if state & 3:
        out.append(current)
    return bytes(out), anomaly


_DECODERS: dict[bytes | None, Callable[[bytes], tuple[bytes, tuple[int, str] | None]]] = {
    b"base64": decode_base64, b"quoted-printable": decode_qp,
}


def decode_body(body: bytes, encoding: bytes | None
                ) -> tuple[bytes, tuple[int, str] | None]:
    """Decode a part's body for its (lower-cased) transfer encoding."""
    return _DECODERS.get(encoding, decode_asis)(body)


# -- one run of the MIME ACL ----------------------------------------------------------

@dataclass
class _Context:
    """A multipart being walked: its boundary and cover-letter state."""

    boundary: bytes
    kind: int


@dataclass
class CurrentPart:
    """The part the ACL is looking at, for ``decode`` and ``mime_regex``."""

    scan: MimeScan
    stream: Stream
    body_start: int
    boundary: bytes | None
    encoding: bytes | None


def scan_directory(server: ESMTPServer, message_id: str) -> str:
    """``<spool_directory>/scan/<message id>``."""
    spool = server.settings.spool
    base = spool.directory if spool is not None else \
        str(server.config.get("spool_directory") or ".")
    return os.path.join(base, "scan", message_id)


def is_mime_message(message: IncomingMessage) -> bool:
    """Whether the MIME ACL runs at all: some (not deleted) header starts
    ``Content-Type:``."""
    return any(h.flag != "*" and h.text[:13].lower() == "content-type:"
               for h in message.headers)


def message_image(message: IncomingMessage) -> bytes:
    """The message as the MIME parser reads it: the headers (not the
    deleted ones), an empty line, the body."""
    head = "".join(h.text for h in message.headers if h.flag != "*")
    return head.encode("latin-1") + b"\n" + message.body


class MimeScan:
    """The MIME ACL over one message (Exim's run_mime_acl())."""

    def __init__(self, server: ESMTPServer, message_id: str) -> None:
        self.server = server
        self.message_id = message_id
        self.directory = scan_directory(server, message_id)
        self.lencheck = bool(server.config.get("check_rfc2047_length", True))
        self.part_count = -1

    async def in_thread(self, function: Callable[..., Any], *args: Any) -> Any:
        """Run *function* in the server's thread pool and wait for it."""
        settings = self.server.settings
        return await threads.deferToThreadPool(settings.reactor, settings.threadpool,
                                               function, *args)

    async def run(self, message: IncomingMessage) -> AclOutcome:
        """Every part, then every message/rfc822 part found, through the
        ACL; the first verdict other than accept ends it."""
        variables = self.server.vars
        variables["mime_is_rfc822"] = "0"
        stream = Stream(message_image(message))
        rfc822_file: str | None = None
        saved_count = -1
        while True:
            outcome = await self._check(stream, None)
            if rfc822_file is not None:
                self._set_count(saved_count)
                try:
                    await self.in_thread(os.unlink, rfc822_file)
                except OSError:
                    self.server.log_write("acl_smtp_mime: can't unlink RFC822 spool file, "
                                          "skipping.", ("panic",))
                    return outcome
                rfc822_file = None
            if outcome.verdict != "accept":
                return outcome
            rfc822_file = await self.in_thread(self._find_rfc822)
            if rfc822_file is None:
                return outcome
            try:
                data = await self.in_thread(_read_file, rfc822_file, None)
            except OSError:
                self.server.log_write("acl_smtp_mime: can't open RFC822 spool file, "
                                      "skipping.", ("panic",))
                await self.in_thread(_unlink_quietly, rfc822_file)
                return outcome
            variables["mime_is_rfc822"] = "1"
            saved_count = self.part_count
            stream = Stream(data)

    def _set_count(self, count: int) -> None:
        self.part_count = count
        self.server.vars["mime_part_count"] = str(count)

    def _find_rfc822(self) -> str | None:
        try:
            names = sorted(os.listdir(self.directory))
        except OSError:
            return None
        for name in names:
            if name[:9].lower() == "__rfc822_":
                return os.path.join(self.directory, name)
        return None

    async def _check(self, stream: Stream, context: _Context | None) -> AclOutcome:
        """Exim's mime_acl_check(): the parts at one level of nesting."""
        server = self.server
        variables = server.vars
        if context is None:
            self._set_count(-1)
        outcome = AclOutcome("accept")
        while True:
            _reset(variables)
            lines = await self.in_thread(next_part, stream,
                                         context.boundary if context else None)
            if lines is None:
                return outcome
            part = parse_headers(lines, self.lencheck)
            for name, value in part.values.items():
                if value is None:
                    variables.pop(name, None)
                else:
                    variables[name] = value.decode("latin-1")
            content_type = part.content_type or b""
            variables["mime_is_multipart"] = "1" if content_type.startswith(b"multipart") else "0"
            self._set_count(self.part_count + 1)
            variables["mime_is_coverletter"] = \
                "0" if context is not None and context.kind == ATTACHMENT else "1"
            current = CurrentPart(self, stream, stream.pos,
                                  context.boundary if context else None,
                                  part.transfer_encoding)
            server.acl_session.mime_part = current
            try:
                outcome = await server.acl("mime")
            finally:
                server.acl_session.mime_part = None
            if outcome.verdict != "accept":
                break
            if part.boundary is not None and content_type.startswith(b"multipart"):
                if context is not None and context.kind == ATTACHMENT:
                    kind = ATTACHMENT
                elif content_type in (b"multipart/alternative", b"multipart/related"):
                    kind = COVERLETTER_ALL
                else:
                    kind = COVERLETTER_ONESHOT
                outcome = await self._check(stream, _Context(part.boundary, kind))
                if outcome.verdict != "accept":
                    break
            elif content_type.startswith(b"message/rfc822"):
                written = await self.in_thread(self._save_rfc822, current)
                if written is False:
                    server.log_write("MIME acl condition warning - could not decode RFC822 "
                                     "MIME part to file.", ("main",))
                    outcome = AclOutcome("defer")
                    break
            if context is None:
                break
            if context.kind == COVERLETTER_ONESHOT:
                context.kind = ATTACHMENT
        _reset(variables)
        return outcome

    def _save_rfc822(self, part: CurrentPart) -> bool | None:
        """Decode a message/rfc822 part to the first free
        ``__rfc822_NNNNN``: False if that failed, None if no name was free."""
        for number in range(128):
            path = os.path.join(self.directory, f"__rfc822_{number:05d}")
            if not os.path.exists(path):
                break
        else:
            return None
        return decode_to_file(part, path) is not None

    def make_directory(self) -> None:
        os.makedirs(self.directory, 0o750, exist_ok=True)


def _reset(variables: dict[str, Any]) -> None:
    for name in _RESET_VARIABLES:
        variables.pop(name, None)


def _unlink_quietly(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


def _read_file(path: str, size: int | None) -> bytes:
    with open(path, "rb") as f:
        return f.read() if size is None else f.read(size)


def decode_to_file(part: CurrentPart, path: str) -> tuple[int, tuple[int, str] | None] | None:
    """Decode *part* into the file *path* (mode 0640): (bytes written,
    anomaly), or None if the file could not be written."""
    body = part_body(part.stream.data, part.body_start, part.boundary)
    decoded, anomaly = decode_body(body, part.encoding)
    if os.path.dirname(path) == part.scan.directory:
        try:
            part.scan.make_directory()
        except OSError:
            return None
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o640)
        with os.fdopen(fd, "wb") as f:
            f.write(decoded)
    except OSError:
        return None
    return len(decoded), anomaly


def _decode_target(part: CurrentPart, option: str | None) -> str:
    """The file a ``decode`` option names (Exim's mime_get_decode_file())."""
    directory = part.scan.directory
    if option is not None and option != "default":
        if not option.startswith("/"):
            return f"{directory}/{option}"
        if not os.path.isdir(option):
            return option
        directory = option
    name = ""
    for number in range(1024):
        name = f"{directory}/{part.scan.message_id}-{number:05d}"
        if not os.path.exists(name):
            break
    return name


def _decode_job(part: CurrentPart, option: str | None
                ) -> tuple[str, tuple[int, tuple[int, str] | None] | None]:
    path = _decode_target(part, option)
    return path, decode_to_file(part, path)


async def decode_part(session: SmtpAclSession, option: str | None) -> str:
    """Decode the current part to a file (Exim's mime_decode()); OK, FAIL
    or DEFER."""
    part = session.mime_part
    if part is None:
        return FAIL
    if option in ("false", "0"):
        return FAIL
    variables = session.server.vars
    path, result = await part.scan.in_thread(_decode_job, part, option)
    variables["mime_decoded_filename"] = path
    if result is None:
        return DEFER
    size, anomaly = result
    if anomaly is not None:
        variables["mime_anomaly_level"] = str(anomaly[0])
        variables["mime_anomaly_text"] = anomaly[1]
    variables["mime_content_size"] = str((size + 1023) // 1024)
    return OK


async def decode_condition(session: SmtpAclSession, value: str
                           ) -> tuple[str, str | None, str | None]:
    """``decode = default | false | /directory | /file | name``."""
    items = split_list(value)
    return await decode_part(session, items[0] if items else None), None, None


def _compile_list(session: SmtpAclSession, value: str) -> list[tuple[str, re.Pattern[str]]]:
    """The regexes of a ``mime_regex`` list, last first (as Exim tries
    them); a bad one is logged and skipped."""
    compiled = []
    for pattern in split_list(value):
        if pattern.lower() == "false" or pattern == "0":
            continue
        try:
            compiled.append((pattern, compile_regex(pattern)))
        except ExpansionError as e:
            reason = e.message.removeprefix(f'regular expression error in "{pattern}": ')
            session.server.log_write(f"regex acl condition warning - error in regex "
                                     f"'{pattern}': {reason}, skipped.", ("main",))
    compiled.reverse()
    return compiled


def match_regexes(regexes: list[tuple[str, re.Pattern[str]]], text: str
                  ) -> tuple[str, list[str]] | None:
    """The first regex that matches *text*: its pattern and the captured
    groups for $regex1..$regex9 (a match that sets a later group does not
    count, as in Exim)."""
    for pattern, regex in regexes:
        m = regex.search(text)
        if m is None:
            continue
        groups = m.groups()
        if any(g is not None for g in groups[REGEX_VARS:]):
            continue
        last = max((i for i, g in enumerate(groups, 1) if g is not None), default=0)
        return pattern, [g or "" for g in groups[:last]]
    return None


async def mime_regex_condition(session: SmtpAclSession, value: str
                               ) -> tuple[str, str | None, str | None]:
    """``mime_regex = <list>``: the first 32 KiB of the decoded part
    (decoded first, to the default place, if ``decode`` has not been
    used)."""
    server = session.server
    variables = server.vars
    for name in ["regex_match_string"] + [f"regex{i}" for i in range(1, REGEX_VARS + 1)]:
        variables.pop(name, None)
    regexes = _compile_list(session, value)
    if not regexes:
        return FAIL, None, None
    part = session.mime_part
    if part is None:
        return FAIL, None, None
    if not variables.get("mime_decoded_filename"):
        await decode_part(session, None)
        if not variables.get("mime_decoded_filename"):
            server.log_write("mime_regex acl condition warning - could not decode MIME "
                             "part to file", ("main",))
            return DEFER, None, None
    path = variables["mime_decoded_filename"]
    try:
        data = await part.scan.in_thread(_read_file, path, REGEX_SCAN_SIZE)
    except OSError:
        server.log_write(f"mime_regex acl condition warning - can't open '{path}' for "
                         f"reading", ("main",))
        return DEFER, None, None
    found = match_regexes(regexes, data.decode("latin-1"))
    if found is None:
        return FAIL, None, None
    pattern, groups = found
    variables["regex_match_string"] = pattern[:1023]
    for number, text in enumerate(groups, 1):
        variables[f"regex{number}"] = text
    return OK, None, None


# -- the message ----------------------------------------------------------------------

async def run_mime_acl(server: ESMTPServer, message: IncomingMessage,
                       message_id: str) -> AclOutcome | None:
    """Run ``acl_smtp_mime`` over *message*; None when it is not a MIME
    message (no Content-Type header) and the ACL did not run."""
    if not is_mime_message(message):
        return None
    scan = MimeScan(server, message_id)
    return await scan.run(message)


def _remove_directory(directory: str) -> None:
    try:
        names = os.listdir(directory)
    except OSError:
        return
    for name in names:
        try:
            os.unlink(os.path.join(directory, name))
        except OSError:
            pass
    try:
        os.rmdir(directory)
    except OSError:
        pass


async def unspool(server: ESMTPServer, message_id: str | None, keep: bool = False) -> None:
    """The message is done with: its scan directory (decoded parts) goes,
    unless ``control = no_mbox_unspool``; the MIME variables that outlive
    the parts are reset."""
    for name in _MESSAGE_VARIABLES:
        server.vars.pop(name, None)
    if not message_id or keep:
        return
    directory = scan_directory(server, message_id)
    settings = server.settings
    if os.path.isdir(directory):
        await threads.deferToThreadPool(settings.reactor, settings.threadpool,
                                        _remove_directory, directory)
