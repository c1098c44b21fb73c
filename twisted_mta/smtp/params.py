"""The arguments of MAIL and RCPT, parsed as Exim 4.96's smtp_in.c does.

The ESMTP server recognises the two verbs when the command line starts with
``mail from:`` or ``rcpt to:`` in any mixture of case; nothing may come between
the verb and the colon (``MAIL FROM :<a@b>`` is ``500 unrecognized command``).
The argument handed to this module is the rest of the line after the colon.
Exim skips the whitespace that follows the colon and has already removed the
whitespace (CR included) that ends the line; the functions here do both again,
so the raw remainder may be passed.  A line of more than 16384 characters never
reaches these functions: Exim treats it as an unrecognised command.

What the server checks before calling, in Exim's order:

* MAIL: ``503 HELO or EHLO required``, ``503 sender already given``, then
  (inside ``parse_mail_argument``) ``501 MAIL must have an address operand``.
  Exim's ``421 too many messages in this connection`` comes straight after
  the empty-operand check, before the parameters are looked at.
* RCPT: ``503 sender not yet given``, then (inside ``parse_rcpt_argument``)
  ``501 RCPT must have an address operand``.

After the parameters, the operand text is parsed by ``parse_envelope_address``.
For MAIL the order of the remaining replies is: address syntax (501), the SIZE
limit (552), spool space (452, the server's business), unqualified sender
(501).  ``parse_mail_argument`` therefore checks the address syntax itself
before it applies the size limit.  For RCPT the order is address syntax (501),
unqualified recipient (501), then recipients_max and the ACL.

Strings are byte-per-character (latin-1), like the rest of the package.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from twisted_mta.expand.addresses import AddressError, _Parser

# C isspace() in the "C" locale; str.isspace() also accepts \x1c-\x1f, \x85
# and \xa0, which Exim treats as ordinary characters.
_C_SPACE = " \t\n\v\f\r"
_ASCII_UPPER = str.maketrans("abcdefghijklmnopqrstuvwxyz", "ABCDEFGHIJKLMNOPQRSTUVWXYZ")
_HEX = "0123456789abcdefABCDEF"
_ULONG_MAX = 2**64 - 1
_INT_MAX = 2**31 - 1
_STRTOUL_DIGITS = re.compile(r"([+-]?)([0-9]+)\Z")

# MAIL keywords that must have a value: an empty value ends parameter parsing.
_MAIL_NEEDS_VALUE = frozenset({"SIZE", "BODY", "AUTH", "RET", "ENVID"})
_MAIL_KEYWORDS = _MAIL_NEEDS_VALUE | {"PRDR", "SMTPUTF8"}
_NOTIFY_KEYWORDS = frozenset({"SUCCESS", "FAILURE", "DELAY"})


class SmtpError(Exception):
    """A reply refusing a MAIL or RCPT argument.

    ``code`` is the reply code and ``text`` the reply text without it.
    ``syntax`` is true when Exim counts the error towards
    smtp_max_synprot_errors; such a reply becomes ``<code>-<text>`` followed by
    ``<code> Too many syntax or protocol errors`` and a disconnect once the
    limit is exceeded.  ``protocol`` is true when Exim logs it as a protocol
    error rather than a syntax error (only the empty MAIL operand).
    ``params`` (MAIL only) holds the parameters read before the error: a
    SMTPUTF8 among them still switches UTF-8 domains on for the session.
    """

    def __init__(self, code: int, text: str, *, syntax: bool, protocol: bool = False) -> None:
        super().__init__(f"{code} {text}")
        self.code = code
        self.text = text
        self.syntax = syntax
        self.protocol = protocol
        self.params: MailParams | None = None
        self.address_text: str | None = None  # the operand, for the 552 log line


@dataclass
class MailParams:
    """The ESMTP parameters Exim took from one MAIL command.

    ``size`` is clamped to 2**31-1 as Exim clamps it; ``envid`` and ``auth``
    keep what the client sent (``auth`` xtext-decoded, ``'<>'`` kept as is).
    """

    size: int | None = None
    body: str | None = None  # '7BIT' | '8BITMIME'
    ret: str | None = None  # 'HDRS' | 'FULL'
    envid: str | None = None  # as received: xtext, unvalidated as in Exim
    prdr: bool = False
    smtputf8: bool = False
    auth: str | None = None


@dataclass
class RcptParams:
    """The DSN parameters Exim took from one RCPT command.

    ``notify`` is None when no flag was set: NOTIFY absent, or ``NOTIFY=``
    with an empty value, which Exim accepts and records as no flags at all.
    """

    notify: frozenset[str] | None = None  # subset of {NEVER, SUCCESS, FAILURE, DELAY}
    orcpt: str | None = None


@dataclass
class _Option:
    """One parameter cut off the end of the operand by ``_extract_option``."""

    name: str
    value: str
    has_equals: bool


def _upper(text: str) -> str:
    """ASCII-only upper case, as strcmpic() compares."""
    return text.translate(_ASCII_UPPER)


def _isalpha(c: str) -> bool:
    """C isalpha() in the "C" locale."""
    return c.isascii() and c.isalpha()


def _strip(arg: str) -> str:
    """The operand without the blanks Exim drops around it."""
    return arg.strip(_C_SPACE)


def _extract_option(data: str) -> tuple[str, _Option | None]:
    """Cut the last ``NAME=value`` or ``WORD`` off *data*: extract_option().

    Returns the remaining text and the option, or the text with its trailing
    whitespace removed and None when no option could be found.  Exim trims
    that whitespace even when it finds nothing, which shows in later replies.
    """
    if not data:
        return data, None
    v = len(data) - 1
    while v > 0 and data[v] in _C_SPACE:
        v -= 1
    data = data[: v + 1]
    while v > 0 and data[v] != "=" and data[v] not in _C_SPACE:
        if data[v] == '"':
            # A quoted string may hold spaces: jump to its opening quote.
            v -= 1
            while v > 0 and data[v] != '"':
                v -= 1
            if v <= 0:
                return data, None
        v -= 1
    if v <= 0:
        return data, None
    if data[v] != "=":
        word = data[v + 1 :]
        return data[:v], _Option(word, word, False)
    n = v
    while n > 0 and _isalpha(data[n - 1]):
        n -= 1
    # The name must follow a space or a tab (RFC 5321 says SP only).
    if n <= 0 or data[n - 1] not in _C_SPACE:
        return data, None
    return data[: n - 1], _Option(data[n:v], data[v + 1 :], True)


def _restore_mail(data: str, opt: _Option) -> str:
    """Put an unknown MAIL option back; its separator comes back as a space."""
    return f"{data} {opt.name}={opt.value}" if opt.has_equals else f"{data} {opt.name}"


def _restore_rcpt(data: str, opt: _Option) -> str:
    """Put an unknown RCPT option back as Exim does.  Exim restores the
    separator before the equals sign here, so a word without ``=`` gets an
    ``=`` in place of its separator (``<a@b> XYZ`` becomes ``<a@b>=XYZ``)."""
    return f"{data} {opt.name}={opt.value}" if opt.has_equals else f"{data}={opt.name}"


def _strtoul_size(value: str) -> int | None:
    """The SIZE value as Ustrtoul() and the INT_MAX clamp make it, or None
    when it is not entirely a number."""
    m = _STRTOUL_DIGITS.match(value)
    if m is None:
        return None
    number = int(m.group(2))
    if number > _ULONG_MAX:
        number = _ULONG_MAX
    elif m.group(1) == "-":
        # strtoul() negates in unsigned arithmetic: "-5" is 2**64-5.
        number = -number % 2**64
    return min(number, _INT_MAX)


def _syntax(text: str) -> SmtpError:
    """A 501 that counts towards smtp_max_synprot_errors."""
    return SmtpError(501, text, syntax=True)


class _MailState:
    """The MAIL flags that decide how each parameter is treated."""

    def __init__(self, dsn: bool, prdr: bool, smtputf8: bool, accept_8bitmime: bool) -> None:
        self.dsn = dsn
        self.prdr = prdr
        self.smtputf8 = smtputf8
        self.accept_8bitmime = accept_8bitmime
        self.params = MailParams()

    def apply(self, keyword: str, value: str) -> bool:
        """Record one known parameter; False ends parameter parsing silently."""
        handler = getattr(self, f"_opt_{keyword.lower()}")
        return handler(value)

    def _opt_size(self, value: str) -> bool:
        size = _strtoul_size(value)
        if size is None:
            return False
        self.params.size = size
        return True

    def _opt_body(self, value: str) -> bool:
        if not self.accept_8bitmime:
            return False
        body = _upper(value)
        if body not in ("8BITMIME", "7BIT"):
            raise _syntax("invalid data for BODY")
        self.params.body = body
        return True

    def _opt_ret(self, value: str) -> bool:
        if not self.dsn:
            return True
        if self.params.ret is not None:
            raise _syntax("RET can be specified once only")
        ret = _upper(value)
        if ret not in ("HDRS", "FULL"):
            raise _syntax("Value for RET is invalid")
        self.params.ret = ret
        return True

    def _opt_envid(self, value: str) -> bool:
        if not self.dsn:
            return True
        if self.params.envid is not None:
            raise _syntax("ENVID can be specified once only")
        self.params.envid = value
        return True

    def _opt_auth(self, value: str) -> bool:
        if value == "<>":
            # "<>" leaves an AUTH= value found further right in place.
            if self.params.auth is None:
                self.params.auth = value
            return True
        decoded = xtext_decode(value)
        if decoded is None:
            raise _syntax("invalid data for AUTH")
        # Exim keeps the result as a C string: it ends at a decoded NUL.
        self.params.auth = decoded.split("\0", 1)[0]
        return True

    def _opt_prdr(self, value: str) -> bool:
        if self.prdr:
            self.params.prdr = True
        return True

    def _opt_smtputf8(self, value: str) -> bool:
        if not self.smtputf8:
            raise _syntax("SMTPUTF8 used when not advertised")
        self.params.smtputf8 = True
        return True


def _peel_mail_options(data: str, state: _MailState) -> str:
    """Take the parameters off the end of a MAIL operand, last first."""
    while True:
        data, opt = _extract_option(data)
        if opt is None:
            return data
        keyword = _upper(opt.name)
        if keyword not in _MAIL_KEYWORDS:
            return _restore_mail(data, opt)
        if keyword in _MAIL_NEEDS_VALUE and not opt.value:
            return data
        if not state.apply(keyword, opt.value):
            return data


def parse_mail_argument(
    arg: str,
    *,
    esmtp: bool,
    dsn_advertised: bool,
    prdr_enabled: bool,
    smtputf8_advertised: bool,
    auth_advertised: bool,
    size_limit: int,
    accept_8bitmime: bool = True,
    utf8_domains: bool = False,
) -> tuple[str, MailParams]:
    """Split a MAIL operand into the address text and its ESMTP parameters.

    Parameters come off the end one at a time; the first one that is not
    recognised, and everything before it, is the address text, whose parse
    then fails with ``501 <text>: malformed address: ...``.  After HELO
    (*esmtp* false) nothing is taken off.  RET and ENVID are ignored unless
    DSN was advertised, PRDR unless *prdr_enabled*; with *accept_8bitmime*
    off any BODY= ends parsing silently, as an unparsable SIZE= does.
    *auth_advertised* changes nothing: Exim 4.96 reads AUTH= either way.

    The address syntax is checked here (with ``"<>"`` allowed) because Exim
    reports it before the SIZE limit (552, when *size_limit* > 0).
    *utf8_domains* is true once any earlier MAIL of the session had SMTPUTF8,
    even a MAIL that was refused (see ``SmtpError.params``): Exim never turns
    that back off.  Raises SmtpError.
    """
    del auth_advertised  # kept for the server's convenience; see above
    data = _strip(arg)
    if not data:
        raise SmtpError(501, "MAIL must have an address operand", syntax=True, protocol=True)
    state = _MailState(dsn_advertised, prdr_enabled, smtputf8_advertised, accept_8bitmime)
    try:
        data = _check_mail(data, state, esmtp, utf8_domains, size_limit)
    except SmtpError as e:
        e.params = state.params
        raise
    return data, state.params


def _check_mail(data: str, state: _MailState, esmtp: bool, utf8: bool, size_limit: int) -> str:
    """Parameters, then address syntax, then the size limit, in Exim's order."""
    if esmtp:
        data = _peel_mail_options(data, state)
    params = state.params
    _extract(data, allow_null=True, utf8_domains=utf8 or params.smtputf8)
    if size_limit > 0 and params.size is not None and params.size > size_limit:
        error = SmtpError(552, "Message size exceeds maximum permitted", syntax=False)
        error.address_text = data
        raise error
    return data


def _parse_notify(value: str) -> frozenset[str]:
    """NOTIFY=NEVER or a comma list of SUCCESS, FAILURE and DELAY.  A comma
    at the very end is accepted, an empty item anywhere else is not."""
    if _upper(value) == "NEVER":
        return frozenset({"NEVER"})
    flags: set[str] = set()
    rest = value
    while rest:
        item, _comma, rest = rest.partition(",")
        flag = _upper(item)
        if flag not in _NOTIFY_KEYWORDS:
            raise _syntax("Invalid value for NOTIFY parameter")
        flags.add(flag)
    return frozenset(flags)


def _peel_rcpt_options(data: str, params: RcptParams, dsn: bool) -> str:
    """Take NOTIFY and ORCPT off the end of a RCPT operand, last first."""
    while True:
        data, opt = _extract_option(data)
        if opt is None:
            return data
        keyword = _upper(opt.name) if dsn else ""
        if keyword == "ORCPT":
            if params.orcpt is not None:
                raise _syntax("ORCPT can be specified once only")
            params.orcpt = opt.value
        elif keyword == "NOTIFY":
            # Exim tests its flag word, so an earlier empty NOTIFY= does not count.
            if params.notify:
                raise _syntax("NOTIFY can be specified once only")
            params.notify = _parse_notify(opt.value) or None
        else:
            return _restore_rcpt(data, opt)


def parse_rcpt_argument(arg: str, *, esmtp: bool, dsn_advertised: bool) -> tuple[str, RcptParams]:
    """Split a RCPT operand into the address text and its DSN parameters.

    NOTIFY and ORCPT are recognised only when DSN was advertised; otherwise
    they, like any unknown word, are left in the address text, which then
    fails to parse.  ORCPT is kept verbatim, unvalidated.  After HELO
    (*esmtp* false) nothing is taken off.  Raises SmtpError.
    """
    data = _strip(arg)
    if not data:
        raise _syntax("RCPT must have an address operand")
    params = RcptParams()
    if esmtp:
        data = _peel_rcpt_options(data, params, dsn_advertised)
    return data, params


class _EnvelopeParser(_Parser):
    """parse_extract_address() for an SMTP operand: ``<>`` may be allowed
    and domains may hold UTF-8 (allow_utf8_domains, set by SMTPUTF8)."""

    def __init__(self, text: str, allow_null: bool, utf8_domains: bool) -> None:
        super().__init__(text, False)
        self.allow_null = allow_null
        self.utf8_domains = utf8_domains
        self.routed = False

    def read_route(self) -> None:
        self.routed = True
        super().read_route()

    def read_addr_spec(self, term: str) -> tuple[str, int]:
        if self.allow_null and term == ">" and not self.routed and self.ch() == ">":
            return "", 0
        return super().read_addr_spec(term)

    def read_subdomain(self, out: list[str]) -> None:
        """Letters, digits, hyphens and, with UTF-8 domains allowed, whole
        UTF-8 sequences."""
        if not self.utf8_domains:
            super().read_subdomain(out)
            return
        while True:
            c = self.ch()
            if (c.isascii() and c.isalnum()) or c == "-":
                out.append(c)
                self.i += 1
                continue
            if not c or ord(c) & 0xC0 != 0xC0:
                return
            out.append(c)
            self.i += 1
            for _ in range(_utf8_trailing(ord(c))):
                c = self.ch()
                if not c or ord(c) & 0xC0 != 0x80:
                    raise AddressError("invalid UTF-8 byte sequence")
                out.append(c)
                self.i += 1


def _utf8_trailing(lead: int) -> int:
    """How many continuation bytes Exim expects after *lead* (up to five,
    the old 6-byte UTF-8); a byte of seven leading ones is invalid."""
    count = 1
    bit = 0x20
    while count < 6 and lead & bit:
        count += 1
        bit >>= 1
    if count == 6:
        raise AddressError("invalid UTF-8 byte sequence")
    return count


def _extract(text: str, *, allow_null: bool, utf8_domains: bool) -> tuple[str, int]:
    """The operative address and its domain offset; 501 with Exim's reason."""
    try:
        address, domain, _start, _end = _EnvelopeParser(text, allow_null, utf8_domains).extract()
    except AddressError as e:
        raise _syntax(f"{text}: {e.args[0]}") from None
    return address, domain


def parse_envelope_address(
    text: str,
    *,
    is_sender: bool,
    qualify_domain: str | None,
    allow_unqualified: bool,
    utf8_domains: bool = False,
) -> str:
    """The envelope address in a MAIL or RCPT operand (with the parameters
    already removed), as parse_extract_address() and the qualification
    checks that follow it in smtp_in.c produce it.

    ``<>`` gives ``''`` for a sender and is an error for a recipient.  Angle
    brackets, a phrase before them, comments and source routes go; quotes
    in the local part stay.  An address without a domain is qualified with
    *qualify_domain* when *allow_unqualified* (sender_unqualified_hosts or
    recipient_unqualified_hosts matched); a recipient ``postmaster`` (any
    case, unquoted) always is.  Otherwise ``501 <text>: sender address must
    contain a domain`` (or ``recipient``), which does not count as a syntax
    error.  *utf8_domains*: SMTPUTF8 was used in this session.
    """
    address, domain = _extract(text, allow_null=is_sender, utf8_domains=utf8_domains)
    if domain or not address:
        return address
    if allow_unqualified or (not is_sender and _upper(address) == "POSTMASTER"):
        if qualify_domain is None:
            raise ValueError(f"no qualify domain for unqualified address {address!r}")
        return f"{address}@{qualify_domain}"
    role = "sender" if is_sender else "recipient"
    raise SmtpError(501, f"{text}: {role} address must contain a domain", syntax=False)


def xtext_decode(text: str) -> str | None:
    """Decode RFC 3461 xtext as Exim's auth_xtextdecode() does: ``+HH``
    (either case of hex) is a byte; a control character, space, ``=`` or a
    byte above 127 makes the text malformed (None).  DEL is accepted."""
    out: list[str] = []
    i = 0
    while i < len(text):
        c = text[i]
        if c < "!" or c > "\x7f" or c == "=":
            return None
        if c != "+":
            out.append(c)
            i += 1
            continue
        pair = text[i + 1 : i + 3]
        if len(pair) != 2 or pair[0] not in _HEX or pair[1] not in _HEX:
            return None
        out.append(chr(int(pair, 16)))
        i += 3
    return "".join(out)


def xtext_encode(text: str) -> str:
    """Encode bytes (a latin-1 string) as xtext, as auth_xtextencode() does:
    ``+``, ``=``, controls, space and bytes above 127 become ``+hh`` in lower
    case hex; DEL is left alone."""
    return "".join(
        f"+{b:02x}" if b < 33 or b > 127 or b in (0x2B, 0x3D) else chr(b)
        for b in text.encode("latin-1")
    )
