"""The ``ratelimit`` ACL condition and its hints database.

Behaviour follows Exim 4.96's ``acl_ratelimit()`` (acl.c).  The condition's
argument, already expanded, is a ``/`` list::

    m / p [/ per_conn|per_mail|per_rcpt|per_byte|per_cmd|per_addr]
          [/ strict|leaky|readonly] [/ noupdate] [/ count=n] [/ unique=x] [/ key]

The rate is an exponentially weighted moving average with time constant *p*,
measured in events per *p*; the condition is true when it is at least *m*.
Leaky mode (the default) stores a new rate only while the client is under
the limit; strict mode always does; readonly never counts.  A rate computed
once is remembered for the rest of the connection (per_conn), message
(per_mail, per_byte; per_rcpt outside RCPT) or ACL run (the rest), in dicts
the caller owns and resets when Exim would.

The database (L{RatelimitStore}) keeps the rates across connections and
restarts, under ``<spool>/db/ratelimit`` in a format of exim-py's own (JSON
lines; Exim's own DBM file is not read or written).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import threading
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

from twisted_mta.acl.where import WHERE_NAMES, WHERE_ORDER
from twisted_mta.values import parse_time, split_list_with

OK, FAIL, DEFER, ERROR = "ok", "fail", "defer", "error"

# The per_* validity rules compare positions in Exim's ACL_WHERE_* order.
_ORDER = WHERE_ORDER
_NOTSMTP = _ORDER["notsmtp"]

# Bytes in the smallest Bloom filter (Exim's dbdata_ratelimit_unique).
BLOOM_MIN = 40

FORMAT = "exim-py ratelimit"
FORMAT_VERSION = 1


@dataclass
class RateRecord:
    """One key's entry in the ratelimit database: the smoothed rate at a
    time, and for ``unique=`` keys a Bloom filter of the events seen since
    its epoch."""

    time_stamp: int
    time_usec: int
    rate: float
    bloom_epoch: int | None = None
    bloom: bytes | None = None


@dataclass
class RatelimitOutcome:
    """The result of a ``ratelimit`` condition.

    @ivar result: ``ok`` (the rate is at or over the limit: the condition
        is true), ``fail`` (under), ``defer`` (no database) or ``error``
        (bad arguments: see C{error}).
    @ivar sender_rate: the new ``$sender_rate`` (``%.1f``).  For this and
        the next two, None means Exim leaves the variable as it was, and an
        empty string that it unsets it.
    @ivar sender_rate_limit: the new ``$sender_rate_limit`` (the text of *m*).
    @ivar sender_rate_period: the new ``$sender_rate_period`` (the text of *p*).
    @ivar error: the log message for ``error`` and ``defer``.
    """

    result: str
    sender_rate: str | None = None
    sender_rate_limit: str | None = None
    sender_rate_period: str | None = None
    error: str = ""


class RatelimitStore:
    """The ratelimit hints database.

    Records live in memory; each update is appended to the file at *path*
    (one JSON object a line, after a header line) by *run_io*, which is
    given a callable to run, for example C{reactor.callInThread}, so that no
    file I/O happens on the caller's path.  Without *run_io* writes are
    done at once (command-line modes such as ``-bh``, and tests).  The file
    is read when the store is made, and rewritten from memory when it has
    grown to several times the number of keys.

    @param path: the database file (``<spool>/db/ratelimit``), or None for a
        store that lives only in memory.
    """

    def __init__(self, path: str | None,
                 run_io: Callable[[Callable[[], None]], Any] | None = None) -> None:
        self.path = path
        self.available = True
        self._run_io = run_io
        self._records: dict[str, RateRecord] = {}
        self._pending: list[str] = []
        self._lines = 0
        self._lock = threading.Lock()
        self._io_lock = threading.Lock()
        self._scheduled = False
        if path is not None:
            self._load(path)

    def _load(self, path: str) -> None:
        try:
            os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
            with open(path, "a+", encoding="utf-8") as f:
                f.seek(0)
                lines = f.read().splitlines()
        except OSError:
            # Exim defers the condition when it cannot open its database.
            self.available = False
            return
        for line in lines[1:] if lines and FORMAT in lines[0] else lines:
            try:
                entry = json.loads(line)
                key = entry["key"]
                bloom = entry.get("bloom")
                self._records[key] = RateRecord(
                    int(entry["time"]), int(entry["usec"]), float(entry["rate"]),
                    entry.get("epoch"), bytes.fromhex(bloom) if bloom is not None else None)
            except (ValueError, KeyError, TypeError):
                continue  # a line cut short by a crash: the hints are only hints
        self._lines = len(lines)

    def get(self, key: str) -> RateRecord | None:
        """A copy of the record for *key*, or None."""
        record = self._records.get(key)
        return None if record is None else replace(record)

    def put(self, key: str, record: RateRecord) -> None:
        """Store *record* for *key*, in memory now and in the file soon."""
        line = json.dumps({
            "key": key, "time": record.time_stamp, "usec": record.time_usec,
            "rate": record.rate, "epoch": record.bloom_epoch,
            "bloom": None if record.bloom is None else record.bloom.hex(),
        })
        with self._lock:
            self._records[key] = replace(record)
            if self.path is None:
                return
            self._pending.append(line)
            if self._scheduled:
                return
            self._scheduled = True
        if self._run_io is None:
            self.flush()
        else:
            self._run_io(self.flush)

    def flush(self) -> None:
        """Write pending updates to the file (blocking: for threads, and for
        shutting down)."""
        with self._io_lock:
            with self._lock:
                lines, self._pending = self._pending, []
                self._scheduled = False
                compact = self._lines + len(lines) > max(1000, 4 * len(self._records))
                snapshot = list(self._records.items()) if compact else None
            if not lines or self.path is None:
                return
            try:
                if snapshot is not None:
                    self._rewrite(self.path, snapshot)
                else:
                    with open(self.path, "a", encoding="utf-8") as f:
                        if self._lines == 0:
                            f.write(self._header())
                            self._lines = 1
                        f.write("".join(f"{line}\n" for line in lines))
                    self._lines += len(lines)
            except OSError:
                pass  # lost hints only make the next rates lower

    def _header(self) -> str:
        return json.dumps({"format": FORMAT, "version": FORMAT_VERSION}) + "\n"

    def _rewrite(self, path: str, snapshot: list[tuple[str, RateRecord]]) -> None:
        temp = f"{path}.new"
        with open(temp, "w", encoding="utf-8") as f:
            f.write(self._header())
            for key, r in snapshot:
                f.write(json.dumps({
                    "key": key, "time": r.time_stamp, "usec": r.time_usec, "rate": r.rate,
                    "epoch": r.bloom_epoch, "bloom": None if r.bloom is None else r.bloom.hex(),
                }) + "\n")
        os.replace(temp, path)
        self._lines = len(snapshot) + 1


class _ArgError(Exception):
    """Bad ratelimit arguments: the text after Exim's prefix.  Exim sets
    ``$sender_rate_period`` only once the limit has been read."""

    def __init__(self, text: str, period_set: bool = True) -> None:
        super().__init__(text)
        self.period_set = period_set


_DEC = re.compile(r"[+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?", re.ASCII)
_HEX = re.compile(r"[+-]?0[xX](?:[0-9a-fA-F]+\.?[0-9a-fA-F]*|\.[0-9a-fA-F]+)(?:[pP][+-]?\d+)?",
                  re.ASCII)
_SPECIAL = re.compile(r"[+-]?(?:inf(?:inity)?|nan(?:\([0-9A-Za-z_]*\))?)",
                      re.IGNORECASE | re.ASCII)


def strtod(text: str) -> tuple[float, str]:
    """C's ``strtod()``: the number at the start of *text* and the rest; no
    number gives 0.0 and all of *text*."""
    stripped = text.lstrip(" \t\n\v\f\r")
    for pattern in (_HEX, _DEC, _SPECIAL):
        m = pattern.match(stripped)
        if m is None:
            continue
        number = m.group()
        if pattern is _HEX:
            sign = -1.0 if number[0] == "-" else 1.0
            value = sign * float.fromhex(number.lstrip("+-"))
        elif pattern is _SPECIAL:
            value = float(number.split("(")[0])
        else:
            value = float(number)
        return value, stripped[m.end():]
    return 0.0, text


def _parse_limit(text: str) -> float:
    limit, rest = strtod(text)
    scale = {"k": 1024.0, "m": 1024.0 ** 2, "g": 1024.0 ** 3}.get(rest[:1].lower())
    if scale is not None:
        limit *= scale
        rest = rest[1:]
    if limit < 0.0 or rest:
        raise _ArgError(f'"{text}" is not a positive number', period_set=False)
    return limit


@dataclass
class _Options:
    """The parsed arguments."""

    limit: float
    period: float
    mode: str            # per_conn ... per_cmd; "per_allrcpts" is per_rcpt outside RCPT
    count: float
    readonly: bool
    leaky: bool
    strict: bool
    unique: str | None
    key: str | None


def _parse(items: list[str], where: str, recipients_count: int,
           message_size: int | None, recipient: str | None) -> _Options:
    limit = _parse_limit(items[0])
    period_text = items[1] if len(items) > 1 else None
    period = -1.0 if period_text is None else float(_readtime(period_text))
    if period <= 0.0:
        raise _ArgError(f'"{period_text if period_text is not None else "NULL"}"'
                        " is not a time value")
    order = _ORDER.get(where, _ORDER["unknown"])
    leaky = strict = readonly = noupdate = badacl = False
    mode: str | None = None
    clash = False
    count = 1.0
    unique: str | None = None
    key: str | None = None

    def set_mode(new: str) -> None:
        nonlocal mode, clash
        if mode is None and not clash:
            mode = new
        else:
            clash = True

    for item in items[2:]:
        word = item.lower()
        if word == "leaky":
            leaky = True
        elif word == "strict":
            strict = True
        elif word == "noupdate":
            noupdate = True
        elif word == "readonly":
            readonly = True
        elif word == "per_cmd":
            set_mode("per_cmd")
        elif word == "per_conn":
            set_mode("per_conn")
            badacl = badacl or where in ("notsmtp", "notsmtp_start")
        elif word == "per_mail":
            set_mode("per_mail")
            badacl = badacl or order > _NOTSMTP
        elif word == "per_rcpt":
            # Counted one by one in the RCPT ACL; all at once once the
            # recipients are known.
            if where == "rcpt":
                set_mode("per_rcpt")
            elif _ORDER["predata"] <= order <= _NOTSMTP:
                set_mode("per_allrcpts")
                count = float(recipients_count)
            elif where == "mail" or order > _NOTSMTP:
                set_mode("per_rcpt")
                badacl = True
        elif word == "per_byte":
            # Exim counts bytes under the per_mail name (and so shares its key).
            set_mode("per_mail")
            if order > _NOTSMTP:
                badacl = True
            else:
                count = 0.0 if message_size is None or message_size < 0 else float(message_size)
        elif word == "per_addr":
            set_mode("per_rcpt")
            if where != "rcpt":
                badacl = True
                unique = "*"
            else:
                unique = recipient or "@"
        elif word.startswith("count="):
            count, rest = strtod(item[6:])
            if count < 0.0 or rest:
                raise _ArgError(f'"{item}" is not a positive number')
        elif word.startswith("unique="):
            unique = item[7:]
        else:
            key = item if key is None else f"{key}/{item}"

    if clash:
        raise _ArgError("conflicting per_* options")
    if leaky + strict + readonly > 1:
        raise _ArgError("conflicting update modes")
    if badacl and (leaky or strict) and not noupdate:
        raise _ArgError(f'"{_MODE_NAMES[mode or "per_mail"]}" must not have /leaky or /strict'
                        f" option, or cannot be used in {WHERE_NAMES.get(where, 'unknown')} ACL")
    if noupdate:
        readonly, leaky, strict = True, False, False
    if badacl:
        readonly = True
    if readonly:
        count = 0.0
    if not strict and not readonly:
        leaky = True
    return _Options(limit, period, mode or "per_mail", count, readonly, leaky, strict,
                    unique, key)


_MODE_NAMES = {"per_allrcpts": "per_rcpt", "per_conn": "per_conn", "per_mail": "per_mail",
               "per_rcpt": "per_rcpt", "per_cmd": "per_cmd"}


def _readtime(text: str) -> int:
    """Exim's readconf_readtime(): seconds, or -1 (a bare number is not a
    time)."""
    seconds = parse_time(text) if text.isascii() else None
    return -1 if seconds is None else seconds


def _format_rate(rate: float) -> str:
    return f"{rate:.1f}"


def _text_bytes(text: str) -> bytes:
    if all(ord(c) < 256 for c in text):
        return text.encode("latin-1")
    return text.encode("utf-8", "surrogateescape")


def _bloom_seen(bloom: bytearray, event: str) -> bool:
    """Add *event* to the Bloom filter; True if it was there already."""
    digest = hashlib.md5(_text_bytes(event)).digest()
    value = int.from_bytes(digest[0:4], "little")
    step = int.from_bytes(digest[4:8], "little")
    seen = True
    for _ in range(8):
        bit = 1 << (value % 8)
        index = (value // 8) % len(bloom)
        if not bloom[index] & bit:
            bloom[index] |= bit
            seen = False
        value = (value + step) & 0xFFFFFFFF
    return seen


def _bloom_size(limit: float) -> int:
    # Two bytes per event allowed, and at least BLOOM_MIN.  (Exim's int
    # arithmetic misbehaves for limits of 2^30 and more; here they get the
    # minimum.)
    if not limit < 2 ** 30:
        return BLOOM_MIN
    return max(BLOOM_MIN, int(limit) * 2)


def check_ratelimit(
    arg: str,
    *,
    where: str,
    default_key: str | None,
    now: float,
    store: RatelimitStore,
    per_conn_state: dict,
    per_mail_state: dict,
    per_cmd_state: dict | None = None,
    message_size: int | None = None,
    recipients_count: int = 0,
    recipient: str | None = None,
) -> RatelimitOutcome:
    """Evaluate a ``ratelimit`` condition whose (expanded) argument is *arg*.

    @param where: the ACL (``rcpt``, ``mail``, ``predata``, ``data``,
        ``connect``, ``helo``, ``notsmtp`` ...: the keys of L{WHERE_NAMES}).
    @param default_key: ``$sender_host_address`` (None: no host).
    @param now: the time, in seconds since the epoch.
    @param per_conn_state: rates remembered for the connection.
    @param per_mail_state: rates remembered for the message: a new dict at
        each MAIL, RSET, HELO/EHLO, STARTTLS and after each message.
    @param per_cmd_state: rates remembered for this ACL run: a new dict for
        each ACL check (None: a fresh one for this call).
    @param message_size: ``$message_size`` for per_byte (None or negative:
        not known yet, counted as zero).
    @param recipients_count: the accepted recipients, for per_rcpt outside
        the RCPT ACL.
    @param recipient: ``local_part@domain`` of the recipient being checked
        (per_addr in the RCPT ACL).
    """
    items = split_list_with(arg, "/")
    if not items:
        return RatelimitOutcome(ERROR, sender_rate_limit="",
                                error=_error_text("sender rate limit not set"))
    limit_text = items[0]
    period_text = items[1] if len(items) > 1 else ""
    try:
        options = _parse(items, where, recipients_count, message_size, recipient)
    except _ArgError as e:
        return RatelimitOutcome(ERROR, sender_rate_limit=limit_text,
                                sender_rate_period=period_text if e.period_set else None,
                                error=_error_text(str(e)))

    key = options.key if options.key is not None else (default_key or "")
    key = (f"{period_text}/{_MODE_NAMES[options.mode]}/"
           f"{'unique/' if options.unique is not None else ''}{key}")
    if options.readonly:
        cache = per_cmd_state
    elif options.mode == "per_conn":
        cache = per_conn_state
    elif options.mode in ("per_mail", "per_allrcpts"):
        cache = per_mail_state
    else:
        cache = per_cmd_state
    if cache is None:
        cache = {}

    def outcome(rate: float) -> RatelimitOutcome:
        return RatelimitOutcome(FAIL if rate < options.limit else OK, _format_rate(rate),
                                limit_text, period_text)

    if key in cache:
        return outcome(cache[key])
    if not store.available:
        return RatelimitOutcome(DEFER, "", limit_text, period_text,
                                error="ratelimit database not available")
    rate = _update(store, key, options, now)
    cache[key] = rate
    return outcome(rate)


def _update(store: RatelimitStore, key: str, options: _Options, now: float) -> float:
    """Compute the new rate for *key*, storing it when the mode says so."""
    seconds = math.floor(now)
    usec = min(999999, int(round((now - seconds) * 1e6)))
    record = store.get(key)
    count = options.count
    bloom: bytearray | None = None
    epoch: int | None = None
    if options.unique is not None:
        if (record is not None and record.bloom and record.bloom_epoch is not None
                and not seconds > record.bloom_epoch + options.period):
            bloom, epoch = bytearray(record.bloom), record.bloom_epoch
        else:
            # A new filter each period, so that a repeated event counts
            # once a period; any rate already recorded is kept.
            bloom, epoch = bytearray(_bloom_size(options.limit)), seconds
        if not options.readonly and _bloom_seen(bloom, options.unique):
            count = 0.0

    if record is None:
        rate = count
    else:
        this_time = seconds + usec / 1000000.0
        prev_time = record.time_stamp + record.time_usec / 1000000.0
        interval = this_time - prev_time
        if interval <= 0.0:
            interval = 1e-9  # the clock went backwards, or no time passed
        i_over_p = interval / options.period
        a = math.exp(-i_over_p)
        rate = (1 - a) * count / i_over_p + a * record.rate
        # After a long quiet spell the first event counts as a full event
        # per period, not as a tiny rate.
        if rate < count:
            rate = count

    over = not rate < options.limit
    if (not over and options.leaky) or options.strict:
        store.put(key, RateRecord(seconds, usec, rate, epoch,
                                  None if bloom is None else bytes(bloom)))
    return rate


def _error_text(text: str) -> str:
    return f'error in arguments to "ratelimit" condition: {text}'
