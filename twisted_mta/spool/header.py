"""Writing and reading -H files byte for byte as Exim 4.96 does.

The layout (spec chapter "Format of spool files"): the file's own name;
``login uid gid``; ``<sender>``; ``time warnings``; ``-name value`` lines
(``--`` when the value is tainted, ``--(quoter)`` when it was quoted for a
lookup), with ACL variables as ``-aclc name length`` / ``-aclm name
length`` followed by the value and a newline; the non-recipients tree
(``XX`` when empty, else pre-order ``YN name`` lines saying whether a node
has left and right children); the recipient count and one recipient per
line; a blank line; then each header as its byte length in three or more
digits, its flag letter, a space and the text.

Behaviour worth knowing, all checked against exim4 4.96:

* ``-dsn_envid`` is never marked tainted, so it reads back untainted.
* A recipient's ORCPT is only kept when it also has NOTIFY flags.
* ``-tls_peerdn`` and ``-tls_sni`` are written with non-printing bytes
  escaped but backslashes left alone, and unescaped on reading, so a DN
  such as ``O=Test\\, Org`` loses its backslash when Exim rewrites the
  file.
* ACL variables are written in the pre-order of Exim's AVL tree, and
  rebuilt on reading by inserting them in file order; the order written
  after a read can therefore differ from the order that was read.
  :func:`format_header_file` treats ``SpoolMessage.acl_vars`` as insertion
  order and :func:`parse_header_file` returns file order, which gives
  exactly that behaviour.
"""

from __future__ import annotations

from collections.abc import Iterator

from twisted_mta.spool.flags import classify_headers, header_flag, header_type
from twisted_mta.spool.ids import MESSAGE_ID_LENGTH
from twisted_mta.spool.message import (
    Quoted,
    Recipient,
    SpoolHeader,
    SpoolMessage,
)
from twisted_mta.spool.tree import TreeNode, fix_balances, preorder
from twisted_mta.taint import Tainted, is_tainted
from twisted_mta.values import interpret_escape

__all__ = [
    "SpoolFormatError", "format_header_file", "parse_header_file", "parse_envelope",
    "header_flag", "header_type", "classify_headers", "printing", "unprinting",
]

# Exim refuses a -H file claiming more recipients than this.
MAX_RECIPIENTS = 16384
# The C library's isdigit() in the C locale: ASCII digits only.
_DIGITS = frozenset("0123456789")
_ESCAPES = {"\n": "n", "\r": "r", "\b": "b", "\v": "v", "\f": "f", "\t": "t"}


class SpoolFormatError(ValueError):
    """A -H file that Exim would refuse; *in_headers* tells whether the
    fault is in the header section (Exim's spool_read_hdrerror) or in the
    envelope before it."""

    def __init__(self, message: str, in_headers: bool = False) -> None:
        super().__init__(message)
        self.in_headers = in_headers


# ---------------------------------------------------------------- writing

def printing(text: str) -> str:
    """Exim's ``string_printing()``: bytes outside 0x20-0x7e escaped
    (``\\n``, ``\\t``..., otherwise ``\\ooo``); backslashes are not."""
    if all(" " <= c <= "~" for c in text):
        return text
    out = []
    for c in text:
        if " " <= c <= "~":
            out.append(c)
        elif c in _ESCAPES:
            out.append("\\" + _ESCAPES[c])
        else:
            out.append(f"\\{ord(c):03o}")
    return "".join(out)


def _same_taint(new: str, old: str) -> str:
    if isinstance(old, Quoted):
        return Quoted(new, old.quoter)
    return Tainted(new) if is_tainted(old) else new


def _zap_newlines(text: str) -> str:
    return text.replace("\n", " ")


def _prefix(value: str) -> str:
    if not is_tainted(value):
        return "-"
    if isinstance(value, Quoted):
        return f"--({value.quoter})"
    return "--"


def _var(name: str, value: str) -> str:
    return f"{_prefix(value)}{name} {value}\n"


def _tree_lines(root: TreeNode | None) -> Iterator[str]:
    if root is None:
        yield "XX\n"
        return
    for node in preorder(root):
        left = "Y" if node.left is not None else "N"
        right = "Y" if node.right is not None else "N"
        yield f"{left}{right} {node.name}\n"


def _recipient_line(r: Recipient) -> str:
    address = _zap_newlines(r.address)
    if r.pno < 0 and not r.errors_to and r.dsn_flags == 0:
        return address + "\n"
    errors_to = _zap_newlines(r.errors_to or "")
    orcpt = _zap_newlines(r.orcpt or "")
    return (f"{address} {orcpt} {len(orcpt)},{r.dsn_flags} "
            f"{errors_to} {len(errors_to)},{r.pno}#3\n")


def _acl_lines(msg: SpoolMessage) -> Iterator[str]:
    for name in msg.acl_vars:
        if not name.startswith(("acl_c", "acl_m")) or len(name) < 6:
            raise ValueError(f"not an ACL variable name: {name!r}")
    for name in msg.acl_var_order():
        value = msg.acl_vars[name]
        # The tree holds "c0", "m_count": the file shows "aclc 0", "aclm _count".
        yield f"{_prefix(value)}acl{name[4]} {name[5:]} {len(value)}\n{value}\n"


def _envelope_lines(msg: SpoolMessage) -> Iterator[str]:
    yield f"{msg.id}-H\n"
    yield f"{msg.originator_login[:63]} {msg.originator_uid} {msg.originator_gid}\n"
    yield f"<{msg.sender}>\n"
    yield f"{msg.received[0]} {msg.warning_count}\n"
    yield f"-received_time_usec .{msg.received[1]:06d}\n"
    yield f"-received_time_complete {msg.received_complete[0]}.{msg.received_complete[1]:06d}\n"
    if msg.helo_name is not None:
        yield _var("helo_name", msg.helo_name)
    if msg.host_address is not None:
        # Only the taint mark: a quoter is never shown for the addresses.
        dash = "-" if is_tainted(msg.host_address) else ""
        yield f"{dash}-host_address [{msg.host_address}]:{msg.host_port}\n"
        if msg.host_name is not None:
            yield _var("host_name", msg.host_name)
    for name in ("host_auth", "host_auth_pubname"):
        value = getattr(msg, name)
        if value is not None:
            yield _var(name, value)
    if msg.interface_address is not None:
        dash = "-" if is_tainted(msg.interface_address) else ""
        yield f"{dash}-interface_address [{msg.interface_address}]:{msg.interface_port}\n"
    for name in ("active_hostname", "ident", "received_protocol"):
        value = getattr(msg, name)
        if value is not None:
            yield _var(name, value)
    yield from _acl_lines(msg)
    if msg.debuglog_name:
        yield f"-debug_selector 0x{msg.debug_selector:x}\n"
        yield f"-debuglog_name {msg.debuglog_name}\n"
    if msg.wireformat:
        yield "-spool_file_wireformat\n"
    else:
        yield f"-body_linecount {msg.body_linecount}\n"
    yield f"-max_received_linelength {msg.max_received_linelength}\n"
    if msg.body_zerocount > 0:
        yield f"-body_zerocount {msg.body_zerocount}\n"
    if msg.auth_id is not None:
        yield _var("auth_id", msg.auth_id)
    if msg.auth_sender is not None:
        yield _var("auth_sender", _same_taint(_zap_newlines(msg.auth_sender), msg.auth_sender))
    yield from _flag_lines(msg)
    yield from _tls_lines(msg)
    if msg.smtputf8:
        yield "-smtputf8\n"
        if msg.utf8_downconvert:
            yield "-utf8_optdowncvt\n" if msg.utf8_downconvert < 0 else "-utf8_downcvt\n"
    if msg.dsn_envid is not None:
        # Written without a taint mark whatever its origin.
        yield f"-dsn_envid {msg.dsn_envid}\n"
    if msg.dsn_ret:
        yield f"-dsn_ret {msg.dsn_ret}\n"
    for line in msg.unknown_lines:
        yield line + "\n"


def _flag_lines(msg: SpoolMessage) -> Iterator[str]:
    if msg.allow_unqualified_recipient:
        yield "-allow_unqualified_recipient\n"
    if msg.allow_unqualified_sender:
        yield "-allow_unqualified_sender\n"
    if msg.deliver_firsttime:
        yield "-deliver_firsttime\n"
    if msg.frozen_at is not None:
        yield f"-frozen {msg.frozen_at}\n"
    if msg.dont_deliver:
        yield "-N\n"
    if msg.host_lookup_deferred:
        yield "-host_lookup_deferred\n"
    if msg.host_lookup_failed:
        yield "-host_lookup_failed\n"
    if msg.sender_local:
        yield "-local\n"
    if msg.local_error_message:
        yield "-localerror\n"
    for name, attr in (("local_scan", "local_scan_data"), ("spam_bar", "spam_bar"),
                       ("spam_score", "spam_score"), ("spam_score_int", "spam_score_int")):
        value = getattr(msg, attr)
        if value is not None:
            yield _var(name, value)
    if msg.manual_thaw:
        yield "-manual_thaw\n"
    if msg.sender_set_untrusted:
        yield "-sender_set_untrusted\n"


def _tls_lines(msg: SpoolMessage) -> Iterator[str]:
    if msg.tls_certificate_verified:
        yield "-tls_certificate_verified\n"
    if msg.tls_cipher is not None:
        yield _var("tls_cipher", msg.tls_cipher)
    if msg.tls_peercert is not None:
        yield f"--tls_peercert {msg.tls_peercert}\n"
    for name in ("tls_peerdn", "tls_sni"):
        value = getattr(msg, name)
        if value is not None:
            yield _var(name, _same_taint(printing(value), value))
    if msg.tls_ourcert is not None:
        yield f"-tls_ourcert {msg.tls_ourcert}\n"
    if msg.tls_ocsp:
        yield f"-tls_ocsp {msg.tls_ocsp}\n"
    if msg.tls_resumption is not None:
        yield f"-tls_resumption {chr(ord('A') + msg.tls_resumption)}\n"
    if msg.tls_ver is not None:
        yield _var("tls_ver", msg.tls_ver)


def format_header_file(msg: SpoolMessage) -> bytes:
    """The bytes of *msg*'s -H file, as Exim 4.96 writes them."""
    parts = list(_envelope_lines(msg))
    parts.extend(_tree_lines(msg.non_recipients))
    parts.append(f"{len(msg.recipients)}\n")
    parts.extend(_recipient_line(r) for r in msg.recipients)
    parts.append("\n")
    for h in msg.headers:
        parts.append(f"{len(h.text):03d}{h.flag} {h.text}")
    text = "".join(parts)
    try:
        return text.encode("latin-1")
    except UnicodeEncodeError as e:
        raise ValueError(f"spool text must be one byte per character: {e}") from None


def header_section_size(msg: SpoolMessage) -> int:
    """Bytes of the headers that will be sent (flag not ``*``): the header
    part of $message_size."""
    return sum(len(h.text) for h in msg.headers if h.flag != "*")


# ---------------------------------------------------------------- reading

def unprinting(text: str) -> str:
    """Exim's ``string_unprinting()``: undo backslash escapes."""
    if "\\" not in text:
        return text
    out = []
    i = 0
    while i < len(text):
        if text[i] == "\\":
            c, i = interpret_escape(text, i)
            out.append(c)
        else:
            out.append(text[i])
            i += 1
    return "".join(out)


class _Reader:
    """A cursor over the decoded file with fgets-like line reads."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.pos = 0
        self.in_headers = False

    def error(self, message: str) -> SpoolFormatError:
        return SpoolFormatError(message, self.in_headers)

    def line(self, what: str) -> str:
        """The next line including its newline."""
        end = self.text.find("\n", self.pos)
        if end < 0:
            raise self.error(f"unexpected end of file in {what}")
        line = self.text[self.pos:end + 1]
        self.pos = end + 1
        return line

    def read(self, n: int, what: str) -> str:
        if self.pos + n > len(self.text):
            raise self.error(f"unexpected end of file in {what}")
        chunk = self.text[self.pos:self.pos + n]
        self.pos += n
        return chunk


def _taint_as(value: str, tainted: bool, quoter: str | None) -> str:
    if quoter is not None:
        return Quoted(value, quoter)
    return Tainted(value) if tainted else value


def _parse_login(line: str, r: _Reader) -> tuple[str, int, int]:
    # Read from the right, as the login itself may contain spaces.
    s = line.rstrip(" \t\n\r\v\f")
    numbers = []
    for _ in range(2):
        if not s or s[-1] not in _DIGITS:
            raise r.error("bad login/uid/gid line")
        i = len(s)
        while i > 0 and (s[i - 1] in _DIGITS or s[i - 1] == "-"):
            i -= 1
        if i == 0 or s[i - 1] != " ":
            raise r.error("bad login/uid/gid line")
        numbers.append(_atoi(s[i:]))
        s = s[:i - 1]
    return s, numbers[1], numbers[0]


def _is_number(text: str, signed: bool = True) -> bool:
    """True for ASCII digits, with a leading minus sign when *signed*."""
    if signed and text.startswith("-"):
        text = text[1:]
    return bool(text) and all(c in _DIGITS for c in text)


def _atoi(text: str) -> int:
    """C's atoi(): optional sign and leading digits, 0 when there are none."""
    text = text.lstrip(" \t\n\r\v\f")
    sign = 1
    if text[:1] in ("-", "+"):
        sign = -1 if text[0] == "-" else 1
        text = text[1:]
    digits = ""
    for c in text:
        if c not in _DIGITS:
            break
        digits += c
    return sign * int(digits) if digits else 0


def _host_and_port(value: str) -> tuple[str, int]:
    # "[ip]:port" as written; an old file may lack the port.
    if value.startswith("["):
        end = value.find("]")
        if end > 0:
            port = value[end + 1:]
            return value[1:end], _atoi(port[1:]) if port.startswith(":") else 0
    return value, 0


def _parse_acl(r: _Reader, var: str, tainted: bool, quoter: str | None,
               msg: SpoolMessage) -> None:
    # "aclc <name> <length>": the name runs to the first space.
    name, space, count_text = var[5:].partition(" ")
    count = _atoi(count_text)
    if not space or count < 0:
        raise r.error("bad ACL variable line")
    value = r.read(count + 1, "ACL variable")[:count]
    msg.acl_vars[f"acl_{var[3]}{name}"] = _taint_as(value, tainted, quoter)


def _parse_old_acl(r: _Reader, var: str, tainted: bool, quoter: str | None,
                   msg: SpoolMessage) -> None:
    # "-acl N len": numbered variables from before named ones existed.
    fields = var[4:].split()
    if len(fields) < 2 or not all(_is_number(f, False) for f in fields[:2]):
        raise r.error("bad old-style ACL variable line")
    index, count = int(fields[0]), int(fields[1])
    if index >= 20 or count > 16384:
        raise r.error("bad old-style ACL variable line")
    value = r.read(count + 1, "ACL variable")[:count]
    name = f"acl_c{index}" if index < 10 else f"acl_m{index - 10}"
    msg.acl_vars[name] = _taint_as(value, tainted, quoter)


_STRING_VARS = {
    "helo_name": "helo_name", "host_name": "host_name", "host_auth": "host_auth",
    "host_auth_pubname": "host_auth_pubname", "active_hostname": "active_hostname",
    "ident": "ident", "received_protocol": "received_protocol", "auth_id": "auth_id",
    "auth_sender": "auth_sender", "local_scan": "local_scan_data", "spam_bar": "spam_bar",
    "spam_score": "spam_score", "spam_score_int": "spam_score_int",
    "tls_cipher": "tls_cipher", "tls_ver": "tls_ver", "tls_peercert": "tls_peercert",
    "tls_ourcert": "tls_ourcert", "dsn_envid": "dsn_envid", "debuglog_name": "debuglog_name",
}
_BOOL_VARS = {
    "allow_unqualified_recipient": "allow_unqualified_recipient",
    "allow_unqualified_sender": "allow_unqualified_sender",
    "deliver_firsttime": "deliver_firsttime", "N": "dont_deliver",
    "host_lookup_deferred": "host_lookup_deferred", "host_lookup_failed": "host_lookup_failed",
    "local": "sender_local", "localerror": "local_error_message",
    "manual_thaw": "manual_thaw", "sender_set_untrusted": "sender_set_untrusted",
    "spool_file_wireformat": "wireformat", "smtputf8": "smtputf8",
    "tls_certificate_verified": "tls_certificate_verified",
}
_INT_VARS = {
    "body_linecount": "body_linecount", "body_zerocount": "body_zerocount",
    "max_received_linelength": "max_received_linelength", "dsn_ret": "dsn_ret",
}


def _parse_variable(r: _Reader, line: str, msg: SpoolMessage) -> None:
    body = line[:-1]
    tainted = body[1:2] == "-"
    var = body[2:] if tainted else body[1:]
    quoter = None
    if var.startswith("("):
        end = var.find(")")
        if end < 0:
            raise r.error("bad quoter mark")
        quoter, var = var[1:end], var[end + 1:]
    name, _, value = var.partition(" ")
    if var.startswith(("aclc ", "aclm ")):
        _parse_acl(r, var, tainted, quoter, msg)
    elif var.startswith("acl "):
        _parse_old_acl(r, var, tainted, quoter, msg)
    elif name in _STRING_VARS:
        setattr(msg, _STRING_VARS[name], _taint_as(value, tainted, quoter))
    elif name in ("tls_peerdn", "tls_sni"):
        setattr(msg, name, _taint_as(unprinting(value), tainted, quoter))
    elif name in _BOOL_VARS and not value:
        setattr(msg, _BOOL_VARS[name], True)
    elif name in _INT_VARS:
        setattr(msg, _INT_VARS[name], _atoi(value))
    elif name in ("host_address", "interface_address"):
        address, port = _host_and_port(value)
        setattr(msg, name, _taint_as(address, tainted, quoter))
        setattr(msg, "host_port" if name == "host_address" else "interface_port", port)
    elif name == "received_time_usec":
        # Exim means to copy this to the completion time when the file has
        # no -received_time_complete, but tests the seconds it has already
        # copied from the received time, so the copy never happens.
        msg.received = (msg.received[0], _atoi(value.lstrip(".")))
    elif name == "received_time_complete":
        sec, _, usec = value.partition(".")
        msg.received_complete = (_atoi(sec), _atoi(usec))
    elif name == "frozen":
        if not _is_number(value.strip()):
            raise r.error("bad -frozen line")
        msg.frozen_at = int(value)
    elif name == "debug_selector":
        msg.debug_selector = int(value, 0) if value else 0
    elif name == "tls_ocsp":
        msg.tls_ocsp = ord(value[0]) - ord("0") if value else 0
    elif name == "tls_resumption":
        msg.tls_resumption = ord(value[0]) - ord("A") if value else 0
    elif name in ("utf8_downcvt", "utf8_optdowncvt"):
        msg.utf8_downconvert = 1 if name == "utf8_downcvt" else -1
    else:
        # Exim ignores lines it does not know so that a newer version's
        # files can be read; keep them so that they are written back.
        msg.unknown_lines.append(body)


def _parse_tree(r: _Reader, line: str) -> TreeNode:
    if len(line) < 5:
        raise r.error("bad non-recipients line")
    node = TreeNode(Tainted(line[3:-1]))
    if line[0] == "Y":
        node.left = _parse_tree(r, r.line("non-recipients"))
    if line[1] == "Y":
        node.right = _parse_tree(r, r.line("non-recipients"))
    return node


def _scan_back(s: str, p: int) -> int:
    # Exim's "while (isdigit(*(--p)) || *p == ',' || *p == '-');"
    p -= 1
    while p >= 0 and (s[p] in _DIGITS or s[p] in ",-"):
        p -= 1
    return p


def _two_ints(text: str) -> tuple[int, int]:
    first, _, second = text.partition(",")
    return _atoi(first), _atoi(second)


def _parse_recipient(line: str) -> Recipient:
    """One recipient line (without its newline), read from the right as
    Exim does, since an address may contain spaces.

    ``addr orcpt len,dsnflags errors_to len,pno#3`` is the current form;
    ``addr pno`` (early Exim 4) and ``addr n,pno,n`` (Exim 3) are older.
    """
    s = line
    p = len(s) - 1
    while p >= 0 and s[p] in _DIGITS:
        p -= 1
    pno, dsn_flags = -1, 0
    orcpt = errors_to = None
    end = len(s)  # where the address ends
    if p >= 0 and s[p] == ",":
        p -= 1
        while p >= 0 and (s[p] in _DIGITS or s[p] == ","):
            p -= 1
        if p >= 0 and s[p] == " ":
            pno = _two_ints(s[p + 1:])[1]
            end = p
    elif p >= 0 and s[p] == " ":
        pno = _atoi(s[p + 1:])
        end = p
    elif p >= 0 and s[p] == "#":
        flags = _atoi(s[p + 1:])
        if flags & 0x01:
            stop = p
            p = _scan_back(s, p)
            length, pno = _two_ints(s[p + 1:stop])
            if length > 0:
                errors_to = Tainted(s[max(p - length, 0):max(p, 0)])
                p -= length
        p -= 1
        if flags & 0x02:
            stop = p
            p = _scan_back(s, p)
            length, dsn_flags = _two_ints(s[p + 1:stop])
            if length > 0:
                orcpt = Tainted(s[max(p - length, 0):max(p, 0)])
                p -= length
        # Exim steps back once more whatever the flags, so a "#1" line (from
        # before DSN support) loses the last character of its address.
        p -= 1
        end = p
    return Recipient(Tainted(s[:max(end, 0)]), orcpt, dsn_flags, errors_to, pno)


def _parse_headers(r: _Reader) -> list[SpoolHeader]:
    headers = []
    text = r.text
    while r.pos < len(text):
        start = r.pos
        while r.pos < len(text) and text[r.pos] in _DIGITS:
            r.pos += 1
        if r.pos == start:
            raise r.error("header line does not start with a length")
        length = int(text[start:r.pos])
        flag = r.read(1, "header flag")
        # fscanf("%d%c ") skips all white space after the flag letter.
        while r.pos < len(text) and text[r.pos] in " \t\n\r\v\f":
            r.pos += 1
        body = r.read(length, "header")
        if "\0" in body:
            raise r.error("binary zero in header")
        headers.append(SpoolHeader(Tainted(body), flag))
    return headers


def parse_header_file(data: bytes, expected_id: str | None = None) -> SpoolMessage:
    """Read a -H file as Exim 4.96's ``spool_read_header()`` does.

    Raises :class:`SpoolFormatError` for a file Exim would reject.  Values
    come back tainted where Exim's would be: the sender, recipients,
    non-recipients and headers always, variables when marked ``--``.
    """
    msg, r = _parse_envelope(data, expected_id)
    r.in_headers = True
    if r.line("blank line") != "\n":
        raise r.error("no blank line before the headers")
    msg.headers = _parse_headers(r)
    return msg


def parse_envelope(data: bytes, expected_id: str | None = None) -> tuple[SpoolMessage, int]:
    """Read the envelope of a -H file (up to the last recipient) as
    :func:`parse_header_file` does, and return it with the offset of what
    follows: the blank line that should start the header section.  A fault
    in the envelope raises :class:`SpoolFormatError`; the rest is not
    looked at, so the caller can deal with a fault there as Exim's ``-bp``
    does (it still lists the envelope)."""
    msg, r = _parse_envelope(data, expected_id)
    return msg, r.pos


def _parse_envelope(data: bytes, expected_id: str | None) -> tuple[SpoolMessage, _Reader]:
    r = _Reader(data.decode("latin-1"))
    first = r.line("first line")
    if len(first) != MESSAGE_ID_LENGTH + 3 or not first.endswith("-H\n"):
        raise r.error("first line is not the file's name")
    message_id = first[:MESSAGE_ID_LENGTH]
    if expected_id is not None and message_id != expected_id:
        raise r.error(f"file names message {message_id}, not {expected_id}")
    login, uid, gid = _parse_login(r.line("login line"), r)
    sender_line = r.line("sender line")
    n = len(sender_line)
    if n < 3 or sender_line[0] != "<" or sender_line[n - 2] != ">":
        raise r.error("bad sender line")
    time_fields = r.line("time line").split()
    if len(time_fields) < 2 or not all(_is_number(f) for f in time_fields[:2]):
        raise r.error("bad time line")
    received = (int(time_fields[0]), 0)
    msg = SpoolMessage(id=message_id, sender=Tainted(sender_line[1:n - 2]),
                       originator_login=login, originator_uid=uid, originator_gid=gid,
                       received=received, received_complete=received,
                       warning_count=int(time_fields[1]), tls_resumption=None)
    while True:
        line = r.line("variables")
        if not line.startswith("-"):
            break
        _parse_variable(r, line, msg)

    if not line.startswith("XX\n"):
        msg.non_recipients = _parse_tree(r, line)
        fix_balances(msg.non_recipients)
    count_fields = r.line("recipient count").split()
    if not count_fields or not _is_number(count_fields[0]):
        raise r.error("bad recipient count")
    count = int(count_fields[0])
    if count > MAX_RECIPIENTS:
        raise r.error("too many recipients")
    for _ in range(max(count, 0)):
        line = r.line("recipients")
        if len(line) < 2:
            raise r.error("empty recipient line")
        msg.recipients.append(_parse_recipient(line[:-1]))

    return msg, r
