"""Retry rules and the retry hints database.

Behaviour follows Exim 4.96: ``readconf_retries()`` and
``readconf_retry_error()`` (readconf.c) for the rule syntax and its error
messages, ``retry.c`` for choosing a rule and computing the next try, the
``-brt`` code in exim.c for L{brt_output}, and exim_dbutil.c for the
``exim_dumpdb`` and ``exim_tidydb`` output.  See doc/retry.md.

Three layers:

  - L{RetryRules}: the ``begin retry`` section parsed and checked, and
    L{RetryRules.find}, which picks the rule for a key, error and sender.
  - L{RetryRecord} and L{next_retry}: one retry record and the pure
    computation that updates it after a failure (``retry_update()``).
  - L{RetryDatabase}: the records in a L{twisted_mta.hints.HintsStore}
    (``<spool>/db/retry``) with the queries deliveries make: whether a host
    or address may be tried now, whether it has passed its cutoff, and the
    updates after an attempt.

All times are whole seconds from an injected clock: a callable returning
the time, or an object with a ``seconds()`` method such as
C{twisted.internet.task.Clock}.
"""

from __future__ import annotations

import errno
import os
import random
import re
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from twisted_mta.config.errors import ConfigError
from twisted_mta.expand.context import ExpansionContext
from twisted_mta.expand.errors import ExpansionError, ForcedFailure
from twisted_mta.hints import HintsStore
from twisted_mta.lists import ListDefer, match_list
from twisted_mta.spool.header import printing
from twisted_mta.values import format_time

# Exim's own error numbers (macros.h), negative so as not to clash with the
# system's errno values.  These are what the database records and what
# exim_dumpdb prints.
ERRNO_UNKNOWNERROR = -1
ERRNO_SMTPCLOSED = -18
ERRNO_EXIMQUOTA = -22
ERRNO_UNKNOWNHOST = -32
ERRNO_TLSFAILURE = -37
ERRNO_TLSREQUIRED = -38
ERRNO_AUTHFAIL = -42
ERRNO_RCPT4XX = -44
ERRNO_MAIL4XX = -45
ERRNO_DATA4XX = -46
ERRNO_RRETRY = -52  # routing: retry time not reached
ERRNO_LRETRY = -53  # local delivery: retry time not reached
ERRNO_HRETRY = -54  # no host's retry time reached

ECONNREFUSED = errno.ECONNREFUSED
ETIMEDOUT = errno.ETIMEDOUT
ENOSPC = errno.ENOSPC
EDQUOT = getattr(errno, "EDQUOT", 122)

#: In more_errno of a timeout: the connection itself timed out.
RTEF_CTOUT = 0x100

#: The longest message text a record keeps (Exim's EXIM_DB_RLIMIT).
TEXT_LIMIT = 150

#: exim_tidydb's default age limit (30 days).
TIDY_KEEP = 30 * 24 * 3600

_WHITESPACE = " \t\n\v\f\r"
_TIME = re.compile(r"(?:[0-9]+[smhdw])+")
_TIME_PART = re.compile(r"([0-9]+)([smhdw])")
_UNIT = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
_MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")
# Exim 4.96 message ids: 6-6-2 base-62 characters.
_MESSAGE_ID = re.compile(r"[0-9A-Za-z]{6}-[0-9A-Za-z]{6}-[0-9A-Za-z]{2}")


class RetryRuleError(ValueError):
    """A malformed retry rule or error name; ``message`` is Exim's text."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


# -- reading rules -----------------------------------------------------------------

def _is_alnum(c: str) -> bool:
    # C's isalnum() in the C locale: ASCII only.
    return c.isascii() and c.isalnum()


def _read_time(text: str) -> int:
    """Exim's readconf_readtime() on a whole token: seconds, or -1."""
    if not _TIME.fullmatch(text):
        return -1
    return sum(int(n) * _UNIT[u] for n, u in _TIME_PART.findall(text))


def _read_fixed(text: str) -> int:
    """Exim's readconf_readfixed(): a decimal number times 1000 (digits
    after the third decimal place count for nothing), or -1."""
    m = re.fullmatch(r"([0-9]+)(?:\.([0-9]*))?", text)
    if m is None:
        return -1
    value = int(m.group(1)) * 1000
    for digit, weight in zip(m.group(2) or "", (100, 10, 1), strict=False):
        value += int(digit) * weight
    return value


def _prefix_of(word: str, keyword: str) -> bool:
    """strncmpic(word, keyword, len(word)) == 0: *word* is a caseless
    prefix of *keyword* (Exim accepts abbreviations this way)."""
    return keyword.lower().startswith(word.lower())


def parse_retry_error(word: str) -> tuple[int, int, str | None]:
    """The (basic_errno, more_errno) an error field names, and a warning
    for the obsolete ``timeout_dns``.  ``*`` is (0, 0).  Raises
    L{RetryRuleError} with Exim's message."""
    under = word.find("_")
    head = word if under < 0 else word[:under]
    tail = None if under < 0 else word[under + 1:]
    lower = head.lower()
    if lower == "quota":
        if tail is None:
            return ERRNO_EXIMQUOTA, 0, None
        seconds = _read_time(tail)
        if seconds < 0:
            raise RetryRuleError("bad time value")
        return ERRNO_EXIMQUOTA, seconds, None
    if lower == "refused":
        if tail is None:
            return ECONNREFUSED, 0, None
        if _prefix_of(tail, "MX"):
            return ECONNREFUSED, ord("M"), None
        if _prefix_of(tail, "A"):
            return ECONNREFUSED, ord("A"), None
        raise RetryRuleError('A or MX expected after "refused"')
    if lower == "timeout":
        if tail is None:
            return ETIMEDOUT, 0, None
        for extra, value in (("A", ord("A")), ("MX", ord("M")), ("connect", RTEF_CTOUT),
                             ("connect_A", RTEF_CTOUT | ord("A")),
                             ("connect_MX", RTEF_CTOUT | ord("M"))):
            if _prefix_of(tail, extra):
                return ETIMEDOUT, value, None
        if _prefix_of(tail, "DNS"):
            return ETIMEDOUT, 0, ('"timeout_dns" is no longer available in retry rules '
                                  '(it has never worked) - treated as "timeout"')
        raise RetryRuleError('"A", "MX", or "connect" expected after "timeout"')
    if word[:6].lower() in ("mail_4", "rcpt_4", "data_4"):
        code = _smtp_code_pattern(word)
        if code is None:
            raise RetryRuleError(f"{word[:4]}_4 must be followed by xx, dx, or dd, "
                                 "where x is literal and d is any digit")
        # Exim looks at the first letter as written: "MAIL_4xx" is a DATA rule.
        basic = (ERRNO_MAIL4XX if word[0] == "m" else
                 ERRNO_RCPT4XX if word[0] == "r" else ERRNO_DATA4XX)
        return basic, code << 8, None
    # "auth" with no underscore never matches (Exim compares past the word).
    if lower == "auth" and tail is not None and _prefix_of(tail, "failed"):
        return ERRNO_AUTHFAIL, 0, None
    if _prefix_of(word, "lost_connection"):
        return ERRNO_SMTPCLOSED, 0, None
    if _prefix_of(word, "tls_required"):
        return ERRNO_TLSREQUIRED, 0, None
    if _prefix_of(word, "lookup"):
        return ERRNO_UNKNOWNHOST, 0, None
    if word != "*":
        raise RetryRuleError(f'unknown or malformed retry error "{word}"')
    return 0, 0, None


def _smtp_code_pattern(word: str) -> int | None:
    """The code byte of ``xxxx_4ab``: 255 for any 4xx, 100 + the tens
    digit for ``d x``, the last two digits for ``dd``; None if malformed."""
    if len(word) != 8:
        return None
    a, b = word[6], word[7]
    if a.isascii() and a.isdigit():
        if b.isascii() and b.isdigit():
            return int(a) * 10 + int(b)
        if b == "x":
            return int(a) * 10 + 100
        return None
    if a == "x" and b == "x":
        return 255
    return None


@dataclass(frozen=True)
class RetryParam:
    """One ``letter,cutoff,...`` set of a rule.

    @ivar letter: ``F`` (fixed), ``G`` (geometric) or ``H`` (randomised).
    @ivar cutoff: seconds since the first failure after which this set no
        longer applies.
    @ivar interval: F's interval, or G's and H's starting interval.
    @ivar multiplier: G's and H's multiplier times 1000 (0 for F).
    """

    letter: str
    cutoff: int
    interval: int
    multiplier: int = 0

    def describe(self) -> str:
        """The set as ``-brt`` prints it (H's multiplier is not shown)."""
        text = f"{self.letter},{format_time(self.cutoff)},{format_time(self.interval)}"
        if self.letter == "G":
            whole, frac = divmod(self.multiplier, 1000)
            digits = f"{frac:03d}".rstrip("0") or "0"
            text += f",{whole}.{digits}"
        return text


def parse_retry_params(text: str) -> tuple[RetryParam, ...]:
    """The parameter sets of a rule (``F,2h,15m; G,16h,1h,1.5``).  Raises
    L{RetryRuleError} with Exim's message."""
    params = []
    pos, end = 0, len(text)
    while pos < end:
        c = text[pos]
        letter = c.upper() if "a" <= c <= "z" else c
        pos += 1
        cutoff, pos = _retry_arg(text, pos, fixed=False)
        multiplier = 0
        if letter == "F":
            interval, pos = _retry_arg(text, pos, fixed=False)
        elif letter in ("G", "H"):
            interval, pos = _retry_arg(text, pos, fixed=False)
            multiplier, pos = _retry_arg(text, pos, fixed=True)
        else:
            raise RetryRuleError("unknown retry rule letter")
        if cutoff <= 0 or interval <= 0 or (letter != "F" and multiplier < 1000):
            raise RetryRuleError("bad parameters for retry rule")
        params.append(RetryParam(letter, cutoff, interval, multiplier))
        while pos < end and text[pos] in _WHITESPACE:
            pos += 1
        if pos < end and text[pos] == ";":
            pos += 1
            while pos < end and text[pos] in _WHITESPACE:
                pos += 1
        elif pos < end:
            raise RetryRuleError("semicolon expected")
    return tuple(params)


def _retry_arg(text: str, pos: int, fixed: bool) -> tuple[int, int]:
    """``,value``: a time, or with *fixed* a decimal number times 1000;
    the value is -1 when malformed (reported as bad parameters)."""
    if pos >= len(text) or text[pos] != ",":
        raise RetryRuleError("comma expected")
    pos += 1
    while pos < len(text) and text[pos] in _WHITESPACE:
        pos += 1
    start = pos
    while pos < len(text) and (_is_alnum(text[pos]) or (fixed and text[pos] == ".")):
        pos += 1
    if pos < len(text) and text[pos] not in _WHITESPACE and text[pos] not in ",;":
        raise RetryRuleError("comma or semicolon expected")
    token = text[start:pos]
    return (_read_fixed(token) if fixed else _read_time(token)), pos


@dataclass(frozen=True)
class RetryEntry:
    """One line of the retry section, parsed.

    @ivar pattern: the one-item address list, as written (dequoted).
    @ivar error: the error field as written.
    @ivar senders: the ``senders=`` address list, or None.
    """

    pattern: str
    error: str
    basic_errno: int
    more_errno: int
    senders: str | None
    params: tuple[RetryParam, ...]
    filename: str = ""
    lineno: int = 0

    @property
    def final_cutoff(self) -> int | None:
        """The last set's cutoff: how long a destination may fail before
        it times out (None when the rule has no parameters)."""
        return self.params[-1].cutoff if self.params else None

    def error_text(self) -> str:
        """The error as ``-brt`` prints it: the kinds it knows, else ``*``."""
        more = self.more_errno
        if self.basic_errno == ERRNO_EXIMQUOTA:
            return f"quota_{format_time(more)}" if more > 0 else "quota"
        if self.basic_errno == ECONNREFUSED:
            suffix = "MX" if more == ord("M") else "A" if more == ord("A") else ""
            return f"refused_{suffix}" if more > 0 else "refused"
        if self.basic_errno == ETIMEDOUT:
            text = "timeout_connect" if more & RTEF_CTOUT else "timeout"
            if more & 255:
                text += "_MX" if more & 255 == ord("M") else "_A"
            return text
        if self.basic_errno == ERRNO_AUTHFAIL:
            return "auth_failed"
        return "*"

    def describe(self) -> str:
        """The ``Retry rule:`` line ``exim -brt`` prints (no newline)."""
        return (f"Retry rule: {self.pattern}  {self.error_text()}  "
                + "".join(f"{p.describe()}; " for p in self.params))

    def error_matches(self, basic_errno: int, more_errno: int) -> bool:
        """Whether this rule's error field covers the error."""
        want_basic, want_more = self.basic_errno, self.more_errno
        if want_basic == 0:
            return True
        if want_basic == ERRNO_EXIMQUOTA:
            # System quotas and a full disk count as quota errors too; the
            # time is how long the mailbox has gone unread.
            if basic_errno not in (ERRNO_EXIMQUOTA, EDQUOT, ENOSPC):
                return False
            return want_more == 0 or want_more <= more_errno
        if want_basic == ERRNO_TLSREQUIRED:
            return basic_errno in (ERRNO_TLSREQUIRED, ERRNO_TLSFAILURE)
        if want_basic in (ERRNO_MAIL4XX, ERRNO_RCPT4XX, ERRNO_DATA4XX):
            if basic_errno != want_basic:
                return False
            wanted = (want_more >> 8) & 255
            if wanted == 255:
                return True
            got = (more_errno >> 8) & 255
            if wanted >= 100:
                return (got // 10) * 10 == wanted - 100
            return got == wanted
        if want_basic == ETIMEDOUT:
            if basic_errno != ETIMEDOUT:
                return False
            if want_more == RTEF_CTOUT:
                return bool(more_errno & RTEF_CTOUT)
            if want_more != 0:
                got = more_errno if want_more & RTEF_CTOUT else more_errno & ~RTEF_CTOUT
                return want_more == got
            return True
        return basic_errno == want_basic and (want_more == 0 or want_more == more_errno)


class RetryRules:
    """The retry section of a configuration, parsed and checked.

    @param config: a L{twisted_mta.config.model.Config}; its ``retry_rules``
        are read, and its main options ``retry_interval_max`` (at most 24h,
        as Exim enforces) and ``retry_data_expire``.
    @param rules: rules to use instead of ``config.retry_rules``.
    @raise ConfigError: a malformed rule, located by file and line and
        worded as Exim words it.
    @ivar entries: the L{RetryEntry} list, in configuration order.
    @ivar warnings: messages Exim would write to the main and panic logs
        while reading the rules (``timeout_dns``).
    @ivar maximum_timeout: the largest cutoff of any set (Exim's
        ``retry_maximum_timeout``).
    """

    def __init__(self, config: Any = None, rules: Iterable[Any] | None = None) -> None:
        self.config = config
        self.entries: list[RetryEntry] = []
        self.warnings: list[str] = []
        get = getattr(config, "get", None)
        interval_max = get("retry_interval_max", 86400) if get else 86400
        self.interval_max = min(int(interval_max), 86400)
        expire = get("retry_data_expire", 604800) if get else 604800
        self.data_expire = int(expire)
        self.maximum_timeout = 0
        default_file = getattr(config, "filename", "") or ""
        source = rules if rules is not None else getattr(config, "retry_rules", [])
        for rule in source:
            filename = getattr(rule, "filename", None) or default_file
            try:
                entry = self._parse(rule, filename)
            except RetryRuleError as e:
                raise ConfigError(e.message, filename, rule.lineno) from None
            self.entries.append(entry)
            for param in entry.params:
                self.maximum_timeout = max(self.maximum_timeout, param.cutoff)

    def _parse(self, rule: Any, filename: str) -> RetryEntry:
        if not rule.error:
            raise RetryRuleError("missing error type in retry rule")
        basic, more, warning = parse_retry_error(rule.error)
        if warning is not None:
            self.warnings.append(warning)
        return RetryEntry(rule.pattern, rule.error, basic, more, rule.senders,
                          parse_retry_params(rule.params), filename, rule.lineno)

    def __len__(self) -> int:
        return len(self.entries)

    async def find(self, key: str, alternate: str | None = None, basic_errno: int = 0,
                   more_errno: int = 0, sender: str | None = None, ctx: Any = None,
                   log: Callable[[str], None] | None = None) -> RetryEntry | None:
        """The first rule that applies (Exim's ``retry_find_config()``).

        @param key: what failed: a host name, a domain, an address, or a
            retry key without its ``R:``/``T:`` (``host:ip:port`` gives the
            host name; ``|pipe:addr`` or ``/file:addr`` the address).  A key
            without ``@`` is matched as ``*@key``.
        @param alternate: for host errors, the address's domain, tried
            against each rule after the host name.
        @param sender: the message's sender (``""`` for a bounce); None
            (as in ``-brt`` without ``-f``) never matches a ``senders=``
            rule.
        @param ctx: the expansion context for the patterns (they are
            expanded, and may use lookups and named lists); by default one
            made from the configuration.
        @param log: called with the message of a pattern that could not be
            expanded or matched (the rule is then passed over, as in Exim).
        """
        colon = key.find(":")
        if colon >= 0:
            key = key[:colon] if _is_alnum(key[:1]) else key[key.rfind(":") + 1:]
        if "@" not in key:
            key = f"*@{key}"
        if alternate is not None:
            alternate = f"*@{alternate}"
        if ctx is None:
            ctx = ExpansionContext(self.config)
        for entry in self.entries:
            if not entry.error_matches(basic_errno, more_errno):
                continue
            if entry.senders is not None:
                if sender is None or not await _match(sender, entry.senders, ctx, log,
                                                      single=False):
                    continue
            if await _match(key, entry.pattern, ctx, log, single=True):
                return entry
            if alternate is not None and await _match(alternate, entry.pattern, ctx, log,
                                                      single=True):
                return entry
        return None


async def _match(subject: str, list_text: str, ctx: Any, log: Callable[[str], None] | None,
                 single: bool) -> bool:
    """Exim's match_address_list_basic(): the list is expanded, and matching
    is caseless; *single* treats the whole text as one item."""
    try:
        expanded = await ctx.expand(list_text)
    except ForcedFailure:
        return False
    except ExpansionError as e:
        if log is not None:
            log(f'failed to expand "{list_text}" while checking a list: {e.message}')
        return False
    try:
        if single:
            # A retry pattern is a one-item list: colons in it are not
            # separators.  match_list() has no public way to say so.
            from twisted_mta.lists import _Matcher

            matcher = _Matcher(subject, "address", ctx, True, None)
            return await matcher.scan(expanded, "address", single=True) is not None
        return await match_list(subject, expanded, "address", ctx) is not None
    except ListDefer as e:
        if log is not None:
            log(e.message)
        return False


# -- exim -brt ---------------------------------------------------------------------

async def brt_output(rules: RetryRules, args: Sequence[str], sender: str | None = None,
                     ctx: Any = None) -> tuple[str, int]:
    """What ``exim -brt`` prints on stdout for *args*, and its exit code.

    *args* are the words after ``-brt``: a host name, domain or address;
    optionally a second domain (taken only if it contains a dot); and
    optionally an error name.  *sender* is the ``-f`` address, if given.
    """
    if not args:
        return "-brt needs a domain or address argument\n", 1
    out = []
    first = args[0]
    rest = list(args[1:])
    if "@" not in first and "." not in first:
        out.append(f'Warning: "{first}" contains no \'@\' and no \'.\' characters. It is '
                   "being \ntreated as a one-component domain, not as a local part.\n\n")
    second = None
    if rest and "." in rest[0]:
        second = rest.pop(0)
    basic = more = 0
    if rest:
        try:
            basic, more, _warning = parse_retry_error(rest[0])
        except RetryRuleError as e:
            return "".join(out) + e.message + "\n", 1
        if basic in (ERRNO_MAIL4XX, ERRNO_RCPT4XX, ERRNO_DATA4XX):
            # Turn "any" and "decade" patterns into one real code to test.
            code = (more >> 8) & 255
            if code == 255:
                more = (more & ~0xFF00) | (21 << 8)
            elif code > 100:
                more = (more & ~0xFF00) | ((code - 96) << 8)
    entry = await rules.find(first, second, basic, more, sender, ctx)
    if entry is None:
        out.append("No retry information found\n")
    else:
        out.append(entry.describe() + "\n")
    return "".join(out), 0


# -- records and the next-try computation -----------------------------------------

@dataclass
class RetryRecord:
    """One record of the retry database (Exim's ``dbdata_retry``).

    @ivar time_stamp: when the record was last written.
    @ivar first_failed: when this run of failures began.
    @ivar last_try: the latest failed attempt.
    @ivar next_try: the earliest time for the next attempt.
    @ivar expired: the destination has passed its final cutoff.
    @ivar basic_errno: the error (an errno value, or one of Exim's ERRNO_*).
    @ivar more_errno: details: ``A``/``M`` for the host's origin, an SMTP
        code in the second byte, or a time for quota errors.
    @ivar text: the error message (the strerror() text for errno values).
    """

    time_stamp: int
    first_failed: int
    last_try: int
    next_try: int
    expired: bool = False
    basic_errno: int = 0
    more_errno: int = 0
    text: str = ""

    def to_value(self) -> dict[str, Any]:
        """The record as a hints-store value."""
        return asdict(self)

    @classmethod
    def from_value(cls, value: dict[str, Any]) -> RetryRecord | None:
        """A record from a hints-store value; None if it is damaged."""
        try:
            return cls(int(value["time_stamp"]), int(value["first_failed"]),
                       int(value["last_try"]), int(value["next_try"]),
                       bool(value.get("expired", False)), int(value.get("basic_errno", 0)),
                       int(value.get("more_errno", 0)), str(value.get("text", "")))
        except (KeyError, TypeError, ValueError):
            return None


def record_text(basic_errno: int, message: str | None) -> str:
    """The text a record keeps for an error: strerror() for system errors,
    else the message made printable, cut to 150 characters."""
    if basic_errno > 0:
        text = os.strerror(basic_errno)
    elif message is not None:
        text = printing(message)
    else:
        text = "unknown error"
    return text[:TEXT_LIMIT]


def _c_div(a: int, b: int) -> int:
    """C integer division (truncates towards zero)."""
    q = abs(a) // abs(b)
    return q if (a >= 0) == (b > 0) else -q


@dataclass
class RetryOutcome:
    """The result of recording one failure.

    @ivar record: the record written, or None when no rule applied (no
        record is written then).
    @ivar timed_out: this key counts as timed out: no rule applied, the
        final cutoff has passed, or the message has been on the queue
        longer than the final cutoff.
    @ivar entry: the rule used.
    """

    record: RetryRecord | None
    timed_out: bool
    entry: RetryEntry | None = None


def next_retry(record: RetryRecord | None, entry: RetryEntry | None, now: int, *,
               basic_errno: int, more_errno: int, text: str, host: bool,
               message_age: int = 0, received_time: int | None = None,
               interval_max: int = 86400,
               randrange: Callable[[int], int] | None = None) -> RetryOutcome:
    """The record after a failure at *now* (Exim's ``retry_update()`` for
    one retry item).  Pure: reads nothing, writes nothing.

    @param record: the current record, already discarded by the caller if
        older than ``retry_data_expire``; None starts a new one.
    @param entry: the rule found for the key and error, or None.
    @param text: the record's text (see L{record_text}).
    @param host: a remote host's key (``T:host:ip...``, Exim's rf_host;
        not a local delivery's ``T:`` key): the message's age does not
        stretch the failing interval.
    @param message_age: seconds the message has been on the queue; for an
        address error, if longer than the failing interval it is used
        instead, so intermittent successes do not keep a message forever.
    @param received_time: the message's arrival, for the top-level address
        only: if the message arrived no later than the first failure and
        has been waiting longer than the final cutoff, the key times out
        and the next try is set to now.  None skips that check.
    @param randrange: for H rules, returns a number in [0, n); by default
        C{random.randrange}.
    """
    if entry is None:
        return RetryOutcome(None, True)
    if record is None:
        record = RetryRecord(now, now, now, now)
    else:
        record = replace(record)
    timed_out = False
    failing = now - record.first_failed
    if not host and message_age > failing:
        failing = message_age
    rule: RetryParam | None = None
    final: RetryParam | None = None
    for param in entry.params:
        if failing <= param.cutoff:
            rule = param
            break
        final = param
    if rule is not None:
        record.expired = False
    else:
        # Past every cutoff: the key times out, but a next try is still
        # computed from the last set, for later messages to use.
        rule = final
        record.expired = True
        timed_out = True
    if (received_time is not None and received_time <= record.first_failed
            and not record.expired and rule is not None):
        if now - received_time > entry.params[-1].cutoff:
            timed_out = True
            rule = None
    if rule is None:
        next_try = now
    elif rule.letter == "F":
        next_try = now + rule.interval
    else:
        predicted = record.next_try - record.last_try
        actual = now - record.last_try
        last_gap = min(predicted, actual)
        next_gap = _c_div(last_gap * rule.multiplier, 1000)
        if rule.letter == "G":
            next_try = now + (rule.interval if last_gap < rule.interval else next_gap)
        else:
            next_try = now + rule.interval
            if next_gap > rule.interval:
                spread = next_gap - rule.interval
                pick = (randrange or random.randrange)(spread)
                next_try += _c_div(pick, 2) + _c_div(spread, 2)
    if next_try - now > interval_max:
        next_try = now + interval_max
    record.time_stamp = now
    record.last_try = now
    record.next_try = next_try
    record.basic_errno = basic_errno
    record.more_errno = more_errno
    record.text = text
    return RetryOutcome(record, timed_out, entry)


# -- the database ------------------------------------------------------------------

def clock_function(clock: Any) -> Callable[[], int]:
    """A zero-argument callable giving whole seconds from *clock*: None
    (the system clock), a callable, or an object with ``seconds()``."""
    if clock is None:
        return lambda: int(time.time())
    seconds = getattr(clock, "seconds", None)
    if callable(seconds):
        return lambda: int(seconds())
    if callable(clock):
        return lambda: int(clock())
    raise TypeError(f"not a clock: {clock!r}")


@dataclass
class RetryItem:
    """A retry key to update after a delivery attempt (Exim's
    ``retry_item``).

    @ivar host: a host key (``T:host:ip``): rules are looked up by host
        name, then by the address's domain (Exim's rf_host).
    @ivar message_specific: a key for one message at a host; dropped when
        the message leaves the queue (rf_message).
    @ivar delete: the destination worked: remove the record (rf_delete).
    """

    key: str
    basic_errno: int = 0
    more_errno: int = 0
    message: str | None = None
    host: bool = False
    message_specific: bool = False
    delete: bool = False


@dataclass
class HostRetryStatus:
    """Whether a host may be tried (Exim's ``retry_check_address()``).

    @ivar status: ``usable``, ``unusable`` (retry time not reached) or
        ``unusable_expired`` (not reached, and past the final cutoff).
    @ivar expired: the host is usable but has passed its cutoff: a
        failure now times it out (the function's return value in Exim).
    @ivar last_try: the record's last try, for an unusable host.
    @ivar host_key: the host key, when a current record was found (so a
        success can delete it).
    @ivar message_key: the message-at-host key, likewise.
    """

    status: str
    expired: bool = False
    last_try: int = 0
    host_key: str | None = None
    message_key: str | None = None

    @property
    def usable(self) -> bool:
        return self.status == USABLE


USABLE, UNUSABLE, UNUSABLE_EXPIRED = "usable", "unusable", "unusable_expired"


@dataclass
class RoutingRetryStatus:
    """The routing check before an address is routed (deliver.c).

    @ivar defer: defer the address without routing it.
    @ivar message: the log message for the deferral.
    @ivar text: the recorded error, passed on in delay warnings.
    @ivar exists: a retry record exists (delete it after success).
    """

    defer: bool
    message: str | None = None
    text: str | None = None
    exists: bool = False
    domain_key: str = ""
    address_key: str = ""


@dataclass
class RetryDatabase:
    """The retry hints database with Exim's queries and updates.

    @param store: where records live (L{open_retry_database} makes one for
        ``<spool>/db/retry``).
    @param rules: the configuration's L{RetryRules}.
    @param clock: None, a callable returning the time, or an object with
        ``seconds()`` (C{twisted.internet.task.Clock}).
    @param randrange: for H rules: returns an integer in [0, n).
    """

    store: HintsStore
    rules: RetryRules
    clock: Any = None
    randrange: Callable[[int], int] | None = None
    _now: Callable[[], int] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self._now = clock_function(self.clock)

    def now(self) -> int:
        """The current time from the clock, in whole seconds."""
        return self._now()

    # -- plain record access ----------------------------------------------------

    def read_any(self, key: str) -> RetryRecord | None:
        """The record for *key*, however old."""
        value = self.store.get(key)
        return None if value is None else RetryRecord.from_value(value)

    def read(self, key: str, now: int | None = None) -> RetryRecord | None:
        """The record for *key*, or None if there is none or it was last
        written more than ``retry_data_expire`` ago."""
        record = self.read_any(key)
        if record is None:
            return None
        now = self.now() if now is None else now
        if now - record.time_stamp > self.rules.data_expire:
            return None
        return record

    def write(self, key: str, record: RetryRecord) -> None:
        """Store *record* as it is (as exim_fixdb would)."""
        self.store.put(key, record.to_value())

    def delete(self, key: str) -> bool:
        """Forget *key* (after a success); False if there was no record."""
        return self.store.delete(key)

    def retry_ok(self, key: str, now: int | None = None) -> bool:
        """Whether *key* may be tried now: no current record, or its next
        try time has come.  (The decisions deliveries make, which also
        weigh the expired flag and the message's age, are
        L{check_host}, L{routing_check} and L{local_delivery_check}.)"""
        now = self.now() if now is None else now
        record = self.read(key, now)
        return record is None or now >= record.next_try

    def is_expired(self, key: str, now: int | None = None) -> bool:
        """Whether *key* has a current record past its final cutoff."""
        record = self.read(key, now)
        return record is not None and record.expired

    # -- updates -------------------------------------------------------------------

    async def record_failure(self, key: str, *, basic_errno: int = 0, more_errno: int = 0,
                             message: str | None = None, host: bool = False,
                             domain: str | None = None, sender: str | None = None,
                             received_time: int | None = None,
                             end_address: bool = True, now: int | None = None,
                             ctx: Any = None) -> RetryOutcome:
        """Record a failure of *key* at *now* under the rule that applies,
        and write it.

        @param host: a host key; *domain* (the address's domain) is then
            also tried against the rules.
        @param sender: the message's sender, for ``senders=`` rules.
        @param received_time: the message's arrival time; its age stretches
            the failing interval of address errors.
        @param end_address: False for a parent of the delivered address:
            only the age is used then, not the on-queue-too-long check.
        """
        now = self.now() if now is None else now
        entry = await self.rules.find(key[2:], domain if host else None, basic_errno,
                                      more_errno, sender, ctx)
        message_age = 0 if received_time is None else now - received_time
        outcome = next_retry(
            self.read(key, now), entry, now, basic_errno=basic_errno, more_errno=more_errno,
            text=record_text(basic_errno, message), host=host, message_age=message_age,
            received_time=received_time if end_address else None,
            interval_max=self.rules.interval_max, randrange=self.randrange)
        if outcome.record is not None:
            self.write(key, outcome.record)
        if not end_address:
            outcome.timed_out = False
        return outcome

    async def update_address(self, items: Iterable[RetryItem], *, domain: str,
                             sender: str | None, received_time: int | None,
                             message_completing: bool, end_address: bool = True,
                             hosts_skipped: bool = False, now: int | None = None,
                             ctx: Any = None) -> bool:
        """Apply one address's retry items at the end of a delivery
        attempt (the body of Exim's ``retry_update()`` loop); True if the
        address has timed out and should be failed ("retry timeout
        exceeded").

        @param message_completing: no address of the message is deferred:
            message-specific items are deleted rather than updated.
        @param hosts_skipped: some hosts were not tried because their retry
            time had not come (or hosts_max_try): never time out then.
        """
        now = self.now() if now is None else now
        updated = timed_out = 0
        for item in items:
            if item.delete or (message_completing and item.message_specific):
                self.delete(item.key)
                continue
            updated += 1
            outcome = await self.record_failure(
                item.key, basic_errno=item.basic_errno, more_errno=item.more_errno,
                message=item.message, host=item.host, domain=domain, sender=sender,
                received_time=received_time, end_address=end_address, now=now, ctx=ctx)
            if outcome.timed_out:
                timed_out += 1
        return updated > 0 and updated == timed_out and not hosts_skipped

    # -- the checks before an attempt ---------------------------------------------------

    async def ultimate_address_timeout(self, key: str, domain: str | None,
                                       record: RetryRecord, *, received_time: int,
                                       sender: str | None = None, now: int | None = None,
                                       ctx: Any = None) -> bool:
        """Whether the message has been on the queue longer than the final
        cutoff of the rule for *key* and the recorded error (so it is tried
        even though the retry time has not come); True if no rule applies."""
        now = self.now() if now is None else now
        entry = await self.rules.find(key[2:], domain, record.basic_errno, record.more_errno,
                                      sender, ctx)
        if entry is None or not entry.params:
            return True
        return now - received_time > entry.params[-1].cutoff

    async def check_host(self, domain: str, host_name: str, host_address: str, *,
                         port_string: str = "", include_ip: bool = True,
                         message_id: str = "", received_time: int, sender: str | None = None,
                         force: bool = False, now: int | None = None,
                         ctx: Any = None) -> HostRetryStatus:
        """May this host (IP address) be tried for this message?  (Exim's
        ``retry_check_address()``; hosts that failed earlier in the same
        delivery are the caller's to remember.)

        @param port_string: ``""`` for port 25, else ``":<port>"``, plus
            ``"/<interface>"`` when the transport sets one.
        @param include_ip: the transport's ``retry_include_ip_address``.
        @param force: ``-M``/``-qf``: ignore retry times.
        """
        now = self.now() if now is None else now
        name = host_name.lower()
        host_key = (f"T:{name}:{host_address}{port_string}" if include_ip
                    else f"T:{name}{port_string}")
        message_key = f"{host_key}:{message_id}"
        host_record = self.read(host_key, now)
        message_record = self.read(message_key, now)
        result = HostRetryStatus(USABLE)
        if host_record is not None:
            result.host_key = host_key
            if now < host_record.next_try and not force:
                if not host_record.expired and await self.ultimate_address_timeout(
                        host_key, domain, host_record, received_time=received_time,
                        sender=sender, now=now, ctx=ctx):
                    return result
                result.status = UNUSABLE_EXPIRED if host_record.expired else UNUSABLE
                result.last_try = host_record.last_try
                return result
            result.expired = host_record.expired
        if message_record is not None:
            result.message_key = message_key
            if now < message_record.next_try and not force:
                if not await self.ultimate_address_timeout(
                        host_key, domain, message_record, received_time=received_time,
                        sender=sender, now=now, ctx=ctx):
                    result.status = UNUSABLE
                result.expired = False
        return result

    async def routing_check(self, domain: str, local_part: str, *, sender: str,
                            received_time: int, queue_running: bool, force: bool = False,
                            continued: bool = False, now: int | None = None,
                            ctx: Any = None) -> RoutingRetryStatus:
        """Should this address be routed now?  Only queue runs (not forced)
        and deliveries down an existing connection (*continued*) respect
        routing retry times; a domain past its cutoff is always routed."""
        now = self.now() if now is None else now
        domain_key = f"R:{domain}"
        address_key = f"R:{local_part}@{domain}"
        domain_record = self.read(domain_key, now)
        address_record = self.read(address_key, now)
        if address_record is None:
            address_record = self.read(f"{address_key}:<{sender}>", now)
        status = RoutingRetryStatus(False, domain_key=domain_key, address_key=address_key)
        if continued and domain_record is not None:
            status.defer = True
            status.message = "reusing SMTP connection skips previous routing defer"
            status.text = domain_record.text
            return status
        waiting = ((domain_record is not None and now < domain_record.next_try
                    and not domain_record.expired)
                   or (address_record is not None and now < address_record.next_try))
        if (((queue_running and not force) or continued) and waiting
                and (domain_record is not None or address_record is None
                     or not await self.ultimate_address_timeout(
                         address_key, domain, address_record, received_time=received_time,
                         sender=sender, now=now, ctx=ctx))):
            status.defer = True
            status.message = "retry time not reached"
            record = domain_record if domain_record is not None else address_record
            status.text = record.text if record is not None else None
            return status
        status.exists = domain_record is not None or address_record is not None
        return status

    async def local_delivery_check(self, key: str, domain: str, *, received_time: int,
                                   queue_running: bool, force: bool = False,
                                   sender: str | None = None, now: int | None = None,
                                   ctx: Any = None) -> tuple[bool, bool]:
        """(deliver now?, a record exists) for a local delivery.  *key* is
        ``T:`` plus the address (``retry_use_local_part``) or the domain.
        Outside queue runs, and when forced, delivery always happens."""
        now = self.now() if now is None else now
        record = self.read_any(key)
        if record is None:
            return True, False
        if not queue_running or force:
            return True, True
        ok = (now - record.time_stamp > self.rules.data_expire or now >= record.next_try
              or record.expired)
        if not ok:
            ok = await self.ultimate_address_timeout(key, domain, record,
                                                     received_time=received_time,
                                                     sender=sender, now=now, ctx=ctx)
        return ok, True

    # -- maintenance -------------------------------------------------------------------

    def tidy(self, now: int | None = None, keep: int = TIDY_KEEP,
             message_exists: Callable[[str], bool] | None = None) -> list[str]:
        """Delete records not written for *keep* seconds, and records for a
        message (keys ending ``:<message id>``) that is no longer on the
        spool.  Returns the lines ``exim_tidydb`` prints for them."""
        now = self.now() if now is None else now
        oldest = now - keep
        lines = []
        for key in reversed(self.store.keys()):
            record = self.read_any(key)
            if record is None or record.time_stamp < oldest:
                self.delete(key)
                lines.append(f"deleted {key} (too old)")
                continue
            if message_exists is None or len(key) < 17 or key[-17] != ":":
                continue
            message_id = key[-16:]
            if _MESSAGE_ID.fullmatch(message_id) and not message_exists(message_id):
                self.delete(key)
                lines.append(f"deleted {key} (no message)")
        return lines

    def dump(self, utc: bool = False, keys_only: bool = False) -> str:
        """The records as ``exim_dumpdb <spool> retry`` prints them (with
        ``-z`` for *utc*, ``-k`` for *keys_only*), in key order."""
        out = []
        for key in sorted(self.store.keys()):
            if keys_only:
                out.append(f"  {key}\n")
                continue
            record = self.read_any(key)
            if record is None:
                continue
            out.append(f"  {key} {record.basic_errno} {record.more_errno} {record.text}\n"
                       f"{format_db_time(record.first_failed, utc)}  "
                       f"{format_db_time(record.last_try, utc)}  "
                       f"{format_db_time(record.next_try, utc)} "
                       f"{'*' if record.expired else ''}\n")
        return "".join(out)


def format_db_time(t: int, utc: bool = False) -> str:
    """A time as exim_dbutil prints it: ``22-Nov-2026 14:29:45`` (local
    time unless *utc*; English month names whatever the locale)."""
    tm = time.gmtime(t) if utc else time.localtime(t)
    return (f"{tm.tm_mday:02d}-{_MONTHS[tm.tm_mon - 1]}-{tm.tm_year:04d} "
            f"{tm.tm_hour:02d}:{tm.tm_min:02d}:{tm.tm_sec:02d}")


def spool_message_exists(spool_directory: str) -> Callable[[str], bool]:
    """For L{RetryDatabase.tidy}: whether a message's -D file is on the
    spool (in ``input/`` or its split subdirectory).  Blocking."""
    def exists(message_id: str) -> bool:
        base = os.path.join(spool_directory, "input")
        return (os.path.exists(os.path.join(base, f"{message_id}-D"))
                or os.path.exists(os.path.join(base, message_id[5], f"{message_id}-D")))
    return exists


def open_retry_database(spool_directory: str, rules: RetryRules,
                        run_io: Callable[[Callable[[], None]], Any] | None = None,
                        clock: Any = None,
                        randrange: Callable[[int], int] | None = None) -> RetryDatabase:
    """The retry database at ``<spool>/db/retry`` (read now, blocking)."""
    store = HintsStore(os.path.join(spool_directory, "db", "retry"), run_io, name="retry")
    return RetryDatabase(store, rules, clock, randrange)


# -- helpers for the transports --------------------------------------------------------

def host_more_errno(mx: bool, code: int | None = None) -> int:
    """more_errno for a host error: ``M`` or ``A`` for whether the host came
    from an MX record, plus a 4xx reply's last two digits in the second
    byte (what the mail_4xx/rcpt_4xx/data_4xx rules test)."""
    value = ord("M") if mx else ord("A")
    if code is not None:
        value |= (code % 100) << 8
    return value


def cutoff_retry_hosts(statuses: Sequence[HostRetryStatus], received_time: int) -> list[int]:
    """With ``delay_after_cutoff = false``, when every host was skipped as
    expired: the indexes of the expired hosts not tried since the message
    arrived, which get one more attempt."""
    return [i for i, s in enumerate(statuses)
            if s.status == UNUSABLE_EXPIRED and s.last_try <= received_time]


def all_hosts_expired_message(domain: str | None, delay_after_cutoff: bool) -> str:
    """The deferral text (turned into a bounce unless fallback hosts
    remain) when all hosts are past their cutoff and none was tried."""
    where = f" for '{domain}'" if domain else ""
    why = ("(and retry time not reached)" if delay_after_cutoff
           else "and were last tried after this message arrived")
    return f"all hosts{where} have been failing for a long time {why}"
