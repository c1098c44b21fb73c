"""The PROXY protocol header (haproxy's v1 text line and v2 binary block),
read the way Exim 4.96 reads it before the banner of a ``hosts_proxy``
connection.

:class:`ProxyHeaderReader` is sans-IO: the server feeds it the bytes it
receives and calls :meth:`~ProxyHeaderReader.timed_out` when
``proxy_protocol_timeout`` expires first.  The result says whether the
header was accepted, the proxied addresses, and the bytes that follow the
header (SMTP input, or a TLS handshake on a TLS-on-connect port).

Exim's acceptance rules, all followed here:

* v2: the 12-byte signature, then the version nibble must be 2 (otherwise
  only 16 bytes are consumed and the rest is left for SMTP), then
  ``16 + length`` must fit Exim's 232-byte header buffer (otherwise, again,
  only 16 bytes are consumed).  Command LOCAL is accepted whatever the
  family and keeps the real peer; command PROXY needs family 0x11 (TCP over
  IPv4) or 0x21 (TCP over IPv6); UDP, UNIX and anything else fail.  Ports are
  not checked for zero.
* v1: ``PROXY``, exactly one C ``isspace`` character, then a word starting
  with ``UNKNOWN`` (the rest of the line is ignored and the peer kept), or
  ``TCP4``/``TCP6`` followed by one whitespace character and four fields
  separated by single spaces.  The addresses need only be valid under
  Exim's ``string_is_ip_address`` (either family, whatever the keyword, and
  they are passed on as written); the ports are read as C ``strtol`` into an
  ``int`` and must fill their field and be non-zero (no upper limit).  The
  line must end in CR LF within 232 bytes; a bare LF is just part of the
  line, so the reader goes on waiting (normally until the timeout).
* Anything else is swallowed up to the next CR and one more byte, and
  fails.

Where this reader differs from Exim, on purpose:

* Exim decides between v1, v2 and garbage on what its first ``read()`` of
  at most 14 bytes returns, so a proxy that splits the header into small
  TCP segments fails.  Here the first 14 bytes are awaited instead (or
  fewer, when a line end -- CR and one more byte -- arrives first outside a
  v2 signature); that prefix then plays the part of Exim's first read, so
  a header split anywhere gives the same result as one sent whole.  A short
  fragment of a header therefore waits for the timeout where Exim would
  fail at once; either way the session fails.
* Exim does not check that a v2 PROXY block is long enough for its address
  family and then reads stale memory; here a short block fails.
* A NUL byte in a v1 line makes the header fail (Exim's string handling
  would stop at it, with undefined results).
* Exim ignores v2 TLVs; here they are decoded (authority, unique id, SSL)
  for logging and variables.  Malformed TLVs, or a CRC32C TLV that does not
  match, make the reader ignore all TLVs without affecting acceptance.
"""

from __future__ import annotations

import socket
from dataclasses import dataclass, field

V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
# Exim reads the header into a union of 232 bytes: 16 fixed v2 bytes plus
# room for two AF_UNIX paths.  Neither version may be longer.
HEADER_LIMIT = 232
# Exim's first read(): enough to tell v1 ("PROXY UNKNOWN\r\n" is 15 bytes)
# from v2 without taking bytes that belong to what follows.
FIRST_READ = 14
V2_FIXED = 16

PP2_TYPE_AUTHORITY = 0x02
PP2_TYPE_CRC32C = 0x03
PP2_TYPE_UNIQUE_ID = 0x05
PP2_TYPE_SSL = 0x20
PP2_CLIENT_CERT_CONN = 0x02
PP2_CLIENT_CERT_SESS = 0x04
SSL_SUBTYPES = {0x21: "version", 0x22: "cn", 0x23: "cipher", 0x24: "sig_alg", 0x25: "key_alg"}

# The characters for which C's isspace() is true in the C locale.
C_SPACE = " \t\n\v\f\r"
LONG_MAX = 2**63 - 1


@dataclass
class ProxyResult:
    """The outcome of reading a PROXY header: accepted or not, what it
    said, and the bytes received after it."""

    ok: bool
    version: int | None = None
    command: str | None = None
    source_address: str | None = None
    source_port: int | None = None
    dest_address: str | None = None
    dest_port: int | None = None
    tlvs: dict[int, bytes] = field(default_factory=dict)
    authority: str | None = None
    unique_id: str | None = None
    ssl: dict[str, str] | None = None
    leftover: bytes = b""
    error: str | None = None


class ProxyHeaderReader:
    """An incremental reader of one PROXY header at the start of a
    connection; see the module docstring for the rules."""

    def __init__(self) -> None:
        self._buffer = b""
        self.result: ProxyResult | None = None

    def feed(self, data: bytes) -> ProxyResult | None:
        """Add received bytes; return the result once the header is
        complete or has failed, None while more bytes are needed."""
        if self.result is not None:
            raise RuntimeError("the PROXY header has already been read")
        self._buffer += data
        self.result = _read(self._buffer)
        return self.result

    def timed_out(self) -> ProxyResult:
        """The timeout fired before a result: fail.  Exim has consumed
        every byte received so far, so nothing is left over."""
        if self.result is not None:
            raise RuntimeError("the PROXY header has already been read")
        self.result = ProxyResult(ok=False, error="timeout while reading the PROXY header")
        return self.result


def _read(buffer: bytes) -> ProxyResult | None:
    """The result for the bytes received so far, or None to wait."""
    head = buffer[:len(V2_SIGNATURE)]
    if head == V2_SIGNATURE[:len(head)]:
        return _read_v2(buffer) if len(buffer) >= V2_FIXED else None
    first = _first_read_size(buffer)
    if first is None:
        return None
    # Exim takes a first read of fewer than 8 bytes as "not v1" even when
    # it says PROXY; such a line has ended early and fails either way.
    if first >= 8 and buffer.startswith(b"PROXY"):
        return _read_v1(buffer, first)
    end = _line_end(buffer, first)
    if end is None:
        return None
    return _failure(buffer, end[1], "not a PROXY header")


def _first_read_size(buffer: bytes) -> int | None:
    """How much Exim's first read would have taken, once that is known."""
    if len(buffer) >= FIRST_READ:
        return FIRST_READ
    cr = buffer.find(b"\r")
    if 0 <= cr < len(buffer) - 1:
        return len(buffer)
    return None


def _line_end(buffer: bytes, first: int) -> tuple[int | None, int] | None:
    """Where the first line ends, as Exim finds it: (index of its CR, or
    None when the 232 bytes ran out, and the number of bytes consumed).
    None means wait for more."""
    cr = buffer.find(b"\r")
    if 0 <= cr < first - 1:
        # The CR and the byte after it came in the first read, which also
        # took whatever followed; Exim reads nothing more.
        return cr, first
    # Otherwise Exim reads a byte at a time until a CR and one more byte,
    # which must all fit in its buffer.
    if 0 <= cr <= HEADER_LIMIT - 2:
        return (cr, cr + 2) if len(buffer) >= cr + 2 else None
    if len(buffer) >= HEADER_LIMIT:
        return None, HEADER_LIMIT
    return None


def _failure(buffer: bytes, consumed: int, error: str, version: int | None = None) -> ProxyResult:
    return ProxyResult(ok=False, version=version, leftover=bytes(buffer[consumed:]), error=error)


# --- v1 -----------------------------------------------------------------

def _read_v1(buffer: bytes, first: int) -> ProxyResult | None:
    end = _line_end(buffer, first)
    if end is None:
        return None
    cr, consumed = end
    if cr is None:
        return _failure(buffer, consumed, "PROXY v1 line too long", 1)
    if buffer[cr + 1:cr + 2] != b"\n":
        return _failure(buffer, consumed, "PROXY v1 line does not end in CRLF", 1)
    parsed = _parse_v1(buffer[:cr])
    if isinstance(parsed, str):
        return _failure(buffer, consumed, parsed, 1)
    parsed.leftover = bytes(buffer[consumed:])
    return parsed


def _parse_v1(line: bytes) -> ProxyResult | str:
    """The result for a v1 line without its CRLF, or why it is refused."""
    if b"\0" in line:
        return "NUL in PROXY v1 line"
    text = line.decode("latin-1")[len("PROXY"):]
    if not text or text[0] not in C_SPACE:
        return "missing space after PROXY"
    text = text[1:]
    # Exim compares only a prefix: "UNKNOWNxyz" is UNKNOWN too.
    if text.startswith("UNKNOWN"):
        return ProxyResult(ok=True, version=1, command="UNKNOWN")
    if not text.startswith(("TCP4", "TCP6")):
        return "invalid protocol in PROXY v1 line"
    text = text[4:]
    if not text or text[0] not in C_SPACE:
        return "missing space after TCP4/TCP6"
    fields = []
    rest = text[1:]
    for name in ("source address", "destination address", "source port"):
        value, separator, rest = rest.partition(" ")
        if not separator:
            return f"missing {name}"
        fields.append(value)
    source, dest, source_port_text = fields
    if not is_ip_address(source):
        return f"source {source!r} is not an IP address"
    if not is_ip_address(dest):
        return f"destination {dest!r} is not an IP address"
    source_port = _c_port(source_port_text)
    if not source_port:
        return f"source port {source_port_text!r} is not a non-zero integer"
    dest_port = _c_port(rest)
    if not dest_port:
        return f"destination port {rest!r} is not a non-zero integer"
    return ProxyResult(
        ok=True, version=1, command="PROXY", source_address=source, source_port=source_port,
        dest_address=dest, dest_port=dest_port,
    )


def _c_strtol(text: str, start: int) -> tuple[int, int]:
    """C strtol(base 10) from *start*: (value, end index); the end is
    *start* itself when there are no digits."""
    i = start
    while i < len(text) and text[i] in C_SPACE:
        i += 1
    sign = 1
    if i < len(text) and text[i] in "+-":
        sign = -1 if text[i] == "-" else 1
        i += 1
    digits = i
    while i < len(text) and text[i].isascii() and text[i].isdigit():
        i += 1
    if i == digits:
        return 0, start
    value = sign * int(text[digits:i])
    return max(-LONG_MAX - 1, min(LONG_MAX, value)), i


def _c_port(text: str) -> int | None:
    """A port as Exim reads it: strtol over the whole field, stored in an
    int (so it may be negative or above 65535).  None if the field has
    anything else in it."""
    value, end = _c_strtol(text, 0)
    if end != len(text):
        return None
    return (value + 2**31) % 2**32 - 2**31


def is_ip_address(text: str) -> bool:
    """Whether Exim accepts *text* as an IP address where no mask is
    allowed: Debian's 4.96 carries the CVE-2023-42117 fix, which checks
    with inet_pton(), the family chosen by the presence of a colon, and
    lets an IPv6 address end in a "%" scope of printable ASCII."""
    if "/" in text:
        return False
    address, percent, scope = text.partition("%")
    if percent and not all("!" <= char <= "~" for char in scope):
        return False
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    if percent and family == socket.AF_INET:
        return False
    try:
        socket.inet_pton(family, address)
    except (OSError, ValueError):
        return False
    return True


# --- v2 -----------------------------------------------------------------

def _read_v2(buffer: bytes) -> ProxyResult | None:
    version_command, family = buffer[12], buffer[13]
    if version_command >> 4 != 2:
        return _failure(buffer, V2_FIXED, f"invalid PROXY v2 version {version_command >> 4}")
    size = V2_FIXED + int.from_bytes(buffer[14:16], "big")
    if size > HEADER_LIMIT:
        return _failure(buffer, V2_FIXED, f"PROXY v2 header of {size} bytes is too long", 2)
    if len(buffer) < size:
        return None
    command = version_command & 0x0F
    block = buffer[V2_FIXED:size]
    if command == 0x0:
        result = ProxyResult(ok=True, version=2, command="LOCAL")
    elif command == 0x1:
        parsed = _parse_v2_addresses(family, block)
        if isinstance(parsed, str):
            return _failure(buffer, size, parsed, 2)
        result = parsed
    else:
        return _failure(buffer, size, f"unsupported PROXY v2 command 0x{command:x}", 2)
    _decode_tlvs(result, bytes(buffer[:size]), _address_size(family))
    result.leftover = bytes(buffer[size:])
    return result


def _address_size(family: int) -> int:
    """The length of the address block for a v2 family byte."""
    return {0x1: 12, 0x2: 36, 0x3: 216}.get(family >> 4, 0)


def _parse_v2_addresses(family: int, block: bytes) -> ProxyResult | str:
    if family == 0x11:
        address_family, length = socket.AF_INET, 4
    elif family == 0x21:
        address_family, length = socket.AF_INET6, 16
    else:
        return f"unsupported PROXY v2 address family 0x{family:02x}"
    if len(block) < 2 * length + 4:
        return f"PROXY v2 address block of {len(block)} bytes is too short"
    ports = block[2 * length:2 * length + 4]
    return ProxyResult(
        ok=True, version=2, command="PROXY",
        # inet_ntop, as Exim uses, e.g. for "::ffff:192.0.2.1".
        source_address=socket.inet_ntop(address_family, block[:length]),
        source_port=int.from_bytes(ports[:2], "big"),
        dest_address=socket.inet_ntop(address_family, block[length:2 * length]),
        dest_port=int.from_bytes(ports[2:], "big"),
    )


def _split_tlvs(data: bytes, base: int = 0) -> list[tuple[int, int, bytes]] | None:
    """(type, offset of the value from *base*, value) for each TLV, or
    None when the data is not a whole number of TLVs."""
    items = []
    i = 0
    while i < len(data):
        if i + 3 > len(data):
            return None
        length = int.from_bytes(data[i + 1:i + 3], "big")
        if i + 3 + length > len(data):
            return None
        items.append((data[i], base + i + 3, data[i + 3:i + 3 + length]))
        i += 3 + length
    return items


def _decode_tlvs(result: ProxyResult, header: bytes, address_size: int) -> None:
    """Fill in the TLV fields of an accepted v2 *result*, unless the TLVs
    cannot be trusted."""
    start = V2_FIXED + address_size
    if start >= len(header):
        return
    items = _split_tlvs(header[start:], start)
    if items is None:
        return
    tlvs: dict[int, bytes] = {}
    for kind, offset, value in items:
        if kind == PP2_TYPE_CRC32C:
            zeroed = header[:offset] + bytes(len(value)) + header[offset + len(value):]
            if len(value) != 4 or int.from_bytes(value, "big") != crc32c(zeroed):
                return
        tlvs.setdefault(kind, value)
    result.tlvs = tlvs
    if PP2_TYPE_AUTHORITY in tlvs:
        result.authority = tlvs[PP2_TYPE_AUTHORITY].decode("utf-8", "backslashreplace")
    if PP2_TYPE_UNIQUE_ID in tlvs:
        result.unique_id = tlvs[PP2_TYPE_UNIQUE_ID].decode("utf-8", "backslashreplace")
    if PP2_TYPE_SSL in tlvs:
        result.ssl = decode_ssl_tlv(tlvs[PP2_TYPE_SSL])


def decode_ssl_tlv(value: bytes) -> dict[str, str] | None:
    """The PP2_TYPE_SSL value as text fields (version, cn, cipher, sig_alg,
    key_alg, and verified: "yes" only when the client sent a certificate
    and it verified); None if malformed."""
    if len(value) < 5:
        return None
    client, verify = value[0], int.from_bytes(value[1:5], "big")
    items = _split_tlvs(value[5:])
    if items is None:
        return None
    decoded: dict[str, str] = {}
    for kind, _offset, sub_value in items:
        name = SSL_SUBTYPES.get(kind)
        if name is not None:
            decoded.setdefault(name, sub_value.decode("utf-8", "backslashreplace"))
    # haproxy leaves verify at 0 when no certificate was presented.
    has_certificate = client & (PP2_CLIENT_CERT_CONN | PP2_CLIENT_CERT_SESS)
    decoded["verified"] = "yes" if has_certificate and verify == 0 else "no"
    return decoded


def _crc32c_table() -> list[int]:
    table = []
    for byte in range(256):
        crc = byte
        for _ in range(8):
            crc = (crc >> 1) ^ 0x82F63B78 if crc & 1 else crc >> 1
        table.append(crc)
    return table


_CRC32C_TABLE = _crc32c_table()


def crc32c(data: bytes) -> int:
    """CRC-32C (Castagnoli), as PP2_TYPE_CRC32C uses."""
    crc = 0xFFFFFFFF
    for byte in data:
        crc = _CRC32C_TABLE[(crc ^ byte) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF
