"""Exim's log files: the main, reject and panic logs, ``log_selector``, and the
host and escaping texts that go into log lines.

Log text is a ``str`` in which every character is one byte (Latin-1), like all
other text in exim-py; it is written to files byte for byte.
"""

from __future__ import annotations

import errno as errno_module
import functools
import ipaddress
import os
import queue
import re
import sys
import threading
import time
import traceback
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, TextIO

from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IReactorTime

from twisted_mta.values import split_list_with

# ---------------------------------------------------------------------------
# log_selector

# The selectors of the first bit word, in bit order.  Only these can gate a
# whole log line, and the undocumented "=<number>" form sets exactly these.
_WORD0 = (
    "address_rewrite", "all_parents", "connection_reject", "delay_delivery",
    "dnslist_defer", "etrn", "host_lookup_failed", "lost_incoming_connection",
    "queue_run", "retry_defer", "size_reject", "skip_delivery", "smtp_connection",
    "smtp_incomplete_transaction", "smtp_protocol_error", "smtp_syntax_error",
)
# The other selectors, in bit order (bit 32 onwards).
_LATER_WORDS = (
    "8bitmime", "acl_warn_skipped", "arguments", "deliver_time", "delivery_size", "dkim",
    "dkim_verbose", "dnssec", "ident_timeout", "incoming_interface", "incoming_port",
    "millisec", "msg_id", "msg_id_created", "outgoing_interface", "outgoing_port", "pid",
    "pipelining", "protocol_detail", "proxy", "queue_time", "queue_time_exclusive",
    "queue_time_overall", "receive_time", "received_sender", "received_recipients",
    "rejected_header", "return_path_on_delivery", "sender_on_delivery", "sender_verify_fail",
    "smtp_confirmation", "smtp_mailauth", "smtp_no_mail", "subject",
    "tls_certificate_verified", "tls_cipher", "tls_peerdn", "tls_resumption", "tls_sni",
    "unknown_in_list",
)

#: Every log_selector name of Exim 4.96, in bit order (``all`` is not one).
LOG_SELECTOR_BITS: tuple[str, ...] = _WORD0 + _LATER_WORDS
#: The same names as a set.
LOG_SELECTOR_NAMES: frozenset[str] = frozenset(LOG_SELECTOR_BITS)
#: What is logged when log_selector is unset (Exim's ``log_default[]``).
DEFAULT_LOG_SELECTOR: frozenset[str] = frozenset({
    "acl_warn_skipped", "connection_reject", "delay_delivery", "dkim", "dnslist_defer",
    "etrn", "host_lookup_failed", "lost_incoming_connection", "outgoing_interface",
    "msg_id", "queue_run", "queue_time_exclusive", "rejected_header", "retry_defer",
    "sender_verify_fail", "size_reject", "skip_delivery", "smtp_confirmation",
    "tls_certificate_verified", "tls_cipher",
})
_ALIASES = {"rejected_headers": "rejected_header"}

_C_SPACE = " \t\n\v\f\r"
_SELECTOR_NAME = re.compile(r"[A-Za-z0-9_]*")
# strtoul(..., 0): blanks, a sign, then hex, octal or decimal digits.
_C_UNSIGNED = re.compile(r"[ \t\n\v\f\r]*([+-]?)(0[xX][0-9a-fA-F]+|0[0-7]*|[1-9][0-9]*)")


class LogSelectorError(ValueError):
    """A bad log_selector setting; the message is Exim's text.

    ``partial`` is the selection in force when Exim stopped reading, which
    is what the line reporting the error is written with."""

    def __init__(self, message: str, partial: frozenset[str]) -> None:
        super().__init__(message)
        self.partial = partial


def parse_log_selector(
    text: str | None, start: frozenset[str] = DEFAULT_LOG_SELECTOR
) -> frozenset[str]:
    """The selectors turned on by a log_selector setting such as
    ``+pid -retry_defer``, applied to *start* (Exim's defaults).

    ``+all`` turns on every selector and ``-all`` turns every one off.
    Raises LogSelectorError (a ValueError) with Exim's message."""
    current = set(start)
    if not text:
        return frozenset(current)
    if text[0] == "=":
        return _numeric_selector(text)
    pos, end = 0, len(text)
    while True:
        while pos < end and text[pos] in _C_SPACE:
            pos += 1
        if pos >= end:
            return frozenset(current)
        if text[pos] not in "+-":
            raise LogSelectorError(
                "malformed log_selector setting: + or - expected but found "
                f'"{text[pos:]}"', frozenset(current))
        adding = text[pos] == "+"
        match = _SELECTOR_NAME.match(text, pos + 1)
        name, pos = match.group(), match.end()
        name = _ALIASES.get(name, name)
        if name == "all":
            current = set(LOG_SELECTOR_NAMES) if adding else set()
        elif name in LOG_SELECTOR_NAMES:
            if adding:
                current.add(name)
            else:
                current.discard(name)
        else:
            raise LogSelectorError(
                f"unknown log_selector setting: {'+' if adding else '-'}{name}",
                frozenset(current))


def _numeric_selector(text: str) -> frozenset[str]:
    # Exim's internal "=<number>" form replaces the whole selection with the
    # given first bit word; it is what Exim passes to itself on re-exec.
    rest = text[1:]
    value = 0
    if rest:
        match = _C_UNSIGNED.fullmatch(rest)
        if match is None:
            raise LogSelectorError(
                f"malformed numeric log_selector setting: {text}", frozenset())
        digits = match.group(2)
        if digits[:2] in ("0x", "0X"):
            value = int(digits, 16)
        elif len(digits) > 1:
            value = int(digits, 8)
        else:
            value = int(digits)
        value = min(value, 2**64 - 1)
        if match.group(1) == "-":
            value = -value % 2**64
    value &= 0xFFFFFFFF
    return frozenset(name for bit, name in enumerate(_WORD0) if value >> bit & 1)


# ---------------------------------------------------------------------------
# Escaping


def log_quote(
    text: str, *, top_bit_chars: bool = False, tabs: bool = False, spaces: bool = False
) -> str:
    """*text* with non-printing characters escaped, as Exim's
    ``string_printing()`` does before putting untrusted text in a log line.

    ``\\n \\r \\b \\v \\f`` (and ``\\t`` with *tabs*) get their C escapes and
    other control characters a three-digit octal escape; a tab is printing
    unless *tabs*, a space is escaped (octal) only with *spaces*.  Characters
    above 126 are escaped unless *top_bit_chars* (print_topbitchars)."""
    if _all_printing(text, top_bit_chars, tabs, spaces):
        return text
    out: list[str] = []
    for c in text:
        if _printing(c, top_bit_chars, tabs, spaces):
            out.append(c)
        elif c in _C_ESCAPES:
            out.append(_C_ESCAPES[c])
        elif ord(c) < 256:
            out.append(f"\\{ord(c):03o}")
        else:
            # Not a byte: escape the bytes Exim would have seen.
            out.extend(f"\\{b:03o}" for b in c.encode("utf-8", "surrogateescape"))
    return "".join(out)


_C_ESCAPES = {"\n": "\\n", "\r": "\\r", "\b": "\\b", "\v": "\\v", "\f": "\\f", "\t": "\\t"}


def _printing(c: str, top_bit_chars: bool, tabs: bool, spaces: bool) -> bool:
    o = ord(c)
    if c == "\t":
        return not tabs
    if c == " ":
        return not spaces
    return 32 <= o <= 126 or (o > 127 and top_bit_chars)


def _all_printing(text: str, top_bit_chars: bool, tabs: bool, spaces: bool) -> bool:
    return all(_printing(c, top_bit_chars, tabs, spaces) for c in text)


# ---------------------------------------------------------------------------
# Host texts (host.c)


def sender_fullhost(
    host_name: str | None,
    helo: str | None,
    address: str,
    port: int | None,
    *,
    with_port: bool,
    ident: str | None = None,
) -> str:
    """The ``H=`` text of a connected client (``$sender_fullhost``):
    ``name [ip]``, ``(helo) [ip]``, ``name (helo) [ip]`` or ``[ip]``, with
    ``:port`` when *with_port* (the incoming_port selector) and a port is known.

    The HELO name is left out when it equals the verified host name
    (caselessly) or is an IP literal for the client's own address; without a
    verified name it is always shown."""
    return _host_texts(host_name, helo, address, port, with_port, ident)[0]


def received_host_text(
    host_name: str | None,
    helo: str | None,
    address: str,
    port: int | None,
    *,
    with_port: bool,
    ident: str | None = None,
) -> str:
    """The host text of a Received: header (``$sender_rcvhost``):
    ``name ([ip] helo=x)``, ``[ip] (port=n helo=x ident=y)`` and so on."""
    return _host_texts(host_name, helo, address, port, with_port, ident)[1]


def host_and_ident(
    fullhost: str | None,
    ident: str | None,
    *,
    use_flag: bool = True,
    interface: tuple[str, int] | None = None,
) -> str:
    """The client part of rejection and SMTP incident lines: ``H=<fullhost>``,
    then `` I=[ip]:port`` (pass *interface* only with +incoming_interface) and
    `` U=ident``; ``U=ident`` (or ``U=unknown``) when there is no host."""
    if fullhost is None:
        return f"{'U=' if use_flag else ''}{ident if ident is not None else 'unknown'}"
    text = f"{'H=' if use_flag else ''}{fullhost}"
    if interface is not None:
        text += f" I=[{interface[0]}]:{interface[1]}"
    if ident is not None:
        text += f" U={ident}"
    return text


def _host_texts(
    host_name: str | None, helo: str | None, address: str, port: int | None,
    with_port: bool, ident: str | None,
) -> tuple[str, str]:
    ip = f"[{address}]"
    port_text = f":{port}" if with_port and port is not None and port > 0 else ""
    show_helo = helo is not None and not _helo_is_own_literal(helo, address)
    if not host_name:
        fullhost = f"({helo}) {ip}{port_text}" if helo is not None else ip + port_text
        extras = []
        if port_text:
            extras.append(f"port={port}")
        if show_helo:
            extras.append(f"helo={helo}")
        if ident is not None:
            extras.append(f"ident={ident}")
        rcvhost = f"{ip} ({' '.join(extras)})" if extras else ip
        return fullhost, rcvhost
    if show_helo and _ascii_lower(host_name) == _ascii_lower(helo or ""):
        show_helo = False
    where = ip + port_text
    if show_helo:
        fullhost = f"{host_name} ({helo}) {where}"
        if ident is not None:
            # Exim folds this one, the longest form, onto a second line.
            rcvhost = f"{host_name}\n\t({where} helo={helo} ident={ident})"
        else:
            rcvhost = f"{host_name} ({where} helo={helo})"
    else:
        fullhost = f"{host_name} {where}"
        tail = f" ident={ident}" if ident is not None else ""
        rcvhost = f"{host_name} ({where}{tail})"
    return fullhost, rcvhost


def _ascii_lower(text: str) -> str:
    return text.translate(_ASCII_LOWER)


_ASCII_LOWER = str.maketrans("ABCDEFGHIJKLMNOPQRSTUVWXYZ", "abcdefghijklmnopqrstuvwxyz")
_IPV4 = re.compile(r"(\d{1,3})\.(\d{1,3})\.(\d{1,3})\.(\d{1,3})")


def _helo_is_own_literal(helo: str, address: str) -> bool:
    """True when HELO was ``[ip]`` (optionally ``[IPv6:..]``/``[IPv4:..]``)
    naming the client's own address, in any spelling of it."""
    if len(helo) < 2 or helo[0] != "[" or helo[-1] != "]":
        return False
    inner = helo[1:-1]
    if inner[:5].lower() in ("ipv6:", "ipv4:"):
        inner = inner[5:]
    mine = _ip_value(inner)
    return mine is not None and mine == _ip_value(address)


def _ip_value(text: str) -> tuple[int, int] | None:
    # (version, integer) so that spellings of one address compare equal.
    match = _IPV4.fullmatch(text)
    if match:
        parts = [int(p) for p in match.groups()]
        if all(p <= 255 for p in parts):
            return 4, int.from_bytes(bytes(parts), "big")
        return None
    try:
        return 6, int(ipaddress.IPv6Address(text.partition("%")[0]))
    except ValueError:
        return None


def reject_log_headers(
    sender: str, recipients: Sequence[str], headers: Iterable[tuple[str, str | None]]
) -> list[str]:
    """The pieces Exim adds to a reject-log entry after DATA: the envelope
    (``Envelope-from:``, ``Envelope-to:`` and up to four more recipients,
    then ``    ...``) when there are recipients, then each header as its
    type letter, a space and its text.

    *headers* are (type letter, text with its own trailing newline) pairs in
    message order; a None text (an unfilled Received:) is skipped.  Pass the
    result to :meth:`EximLog.reject`."""
    pieces: list[str] = []
    if recipients:
        pieces.append(f"Envelope-from: <{sender}>\n")
        pieces.append(f"Envelope-to: <{recipients[0]}>\n")
        pieces.extend(f"    <{r}>\n" for r in recipients[1:5])
        if len(recipients) > 5:
            pieces.append("    ...\n")
    pieces.extend(f"{kind} {text}" for kind, text in headers if text is not None)
    return pieces


# ---------------------------------------------------------------------------
# Log file paths


def check_log_file_path(text: str) -> None:
    """Exim's start-up check of an (expanded) log_file_path: each file item
    needs ``%s`` and may have one ``%D`` or ``%M`` and no other ``%``.
    Raises ValueError with Exim's message."""
    for item in split_list_with(text, ":"):
        if not item or item == "syslog":
            continue
        if "%s" not in item:
            raise ValueError(f'log_file_path "{item}" does not contain "%s"')
        rest = item.replace("%s", "X", 1)
        cut = rest.find("%")
        if cut >= 0 and (rest[cut + 1:cut + 2] not in ("D", "M") or "%" in rest[cut + 2:]):
            raise ValueError(f'log_file_path "{text}" contains unexpected "%" character')


@dataclass(frozen=True)
class LogDestinations:
    """Where log lines go, from log_file_path: a file-name template with
    ``%s`` (or None for no files), whether syslog is used, and the complaint
    Exim logs when more than one file path was given."""

    template: str | None
    syslog: bool
    notice: str | None = None


def log_destinations(
    log_file_path: str | None, spool_directory: str, build_default: str = ""
) -> LogDestinations:
    """Interpret log_file_path as Exim does.

    None means unset, which is the build's LOG_FILE_PATH (*build_default*;
    empty upstream, ``/var/log/exim4/%slog`` in Debian).  An empty setting
    means ``<spool_directory>/log/%slog``; an empty item in a list means the
    first file item of the build default.  Raises ValueError when neither
    files nor syslog are left."""
    text = build_default if log_file_path is None else log_file_path
    if not text:
        return LogDestinations(f"{spool_directory}/log/%slog", False)
    template: str | None = None
    files = use_syslog = multiple = False
    for item in split_list_with(text, ":"):
        if item == "syslog":
            use_syslog = True
        elif files:
            multiple = True
        else:
            files = True
            template = item or _first_file_item(build_default)
    if not files and not use_syslog:
        raise ValueError("Neither syslog nor file logging set in log_file_path")
    if files and not template:
        template = f"{spool_directory}/log/%slog"
    notice = f"More than one path given in log_file_path: using {template}" if multiple else None
    return LogDestinations(template if files else None, use_syslog, notice)


def _first_file_item(build_default: str) -> str:
    for item in split_list_with(build_default, ":"):
        if item and item != "syslog":
            return item
    return ""


def format_log_path(template: str, name: str, when: time.struct_time) -> str:
    """The file name of log *name* (main, reject, panic) from a
    log_file_path template: ``%s`` is the name, ``%D`` the day (YYYYMMDD),
    ``%M`` the month (YYYYMM).

    The panic log never has a date: the datestamp is removed together with
    the non-alphanumeric character after it (when it starts a path
    component) or before it (otherwise)."""
    return _format_log_path(template, name, when.tm_year, when.tm_mon, when.tm_mday)


@functools.lru_cache(maxsize=32)
def _format_log_path(template: str, name: str, year: int, month: int, day: int) -> str:
    # Every log line needs its file's name, which only changes with the
    # date: the cache keeps the character-by-character scan below to once
    # a day per log.
    out: list[str] = []
    length = 0
    stamp_at, stamp_len = -1, 0
    i, n = 0, len(template)
    while i < n:
        c = template[i]
        if c == "%" and i + 1 < n:
            code = template[i + 1]
            piece = {
                "s": name,
                "D": f"{year:04d}{month:02d}{day:02d}",
                "M": f"{year:04d}{month:02d}",
                "%": "%",
            }.get(code)
            if piece is not None:
                if code in "DM":
                    stamp_at, stamp_len = length, len(piece)
                out.append(piece)
                length += len(piece)
                i += 2
                continue
        out.append(c)
        length += 1
        i += 1
    path = "".join(out)
    if name != "panic" or stamp_at < 0:
        return path
    start, stop = stamp_at, stamp_at + stamp_len
    if start == 0 or path[start - 1] == "/":
        if stop < len(path) and not _ascii_alnum(path[stop]):
            stop += 1
    elif not _ascii_alnum(path[start - 1]):
        start -= 1
    return path[:start] + path[stop:]


def _ascii_alnum(c: str) -> bool:
    return c.isascii() and c.isalnum()


# ---------------------------------------------------------------------------
# Time stamps


def log_timestamp(
    seconds: float, *, millisec: bool = False, zone: bool = False, utc: bool = False
) -> str:
    """``YYYY-MM-DD HH:MM:SS`` in local time (UTC with *utc*), then ``.mmm``
    with *millisec* and `` +hhmm`` with *zone* (log_timezone)."""
    whole, micro = divmod(round(seconds * 1_000_000), 1_000_000)
    t, offset = _broken_down(whole, utc)
    text = (f"{t.tm_year:04d}-{t.tm_mon:02d}-{t.tm_mday:02d} "
            f"{t.tm_hour:02d}:{t.tm_min:02d}:{t.tm_sec:02d}")
    if millisec:
        text += f".{micro // 1000:03d}"
    if zone:
        text += " " + _zone_text(offset)
    return text


def _broken_down(whole: int, utc: bool) -> tuple[time.struct_time, int]:
    if utc:
        return time.gmtime(whole), 0
    local = time.localtime(whole)
    offset = local.tm_gmtoff or 0
    if offset % 60:
        # A sub-minute offset (TAI and the like): Exim then shows UTC.
        return time.gmtime(whole), 0
    return local, offset


def _zone_text(offset_seconds: int) -> str:
    minutes = offset_seconds // 60
    # C division truncates, so Exim shows -00:30 as "+0030"; keep that.
    hours = int(minutes / 60)
    return f"{hours:+03d}{abs(minutes - hours * 60):02d}"


# ---------------------------------------------------------------------------
# Writers: where the blocking work runs


class LogWriter(Protocol):
    """Runs log jobs (blocking callables) in the order they were given."""

    def submit(self, job: Callable[[], None]) -> None: ...

    def flush(self, timeout: float | None = None) -> bool: ...

    def when_flushed(self) -> Deferred[None]: ...

    def close(self) -> None: ...


_STOP = object()


class ThreadLogWriter:
    """A single thread fed by a queue, so that log writes never block the
    reactor and stay in order.

    *call_from_thread* (``reactor.callFromThread``) lets :meth:`when_flushed`
    fire its Deferred on the reactor thread; without it that method blocks."""

    def __init__(
        self, call_from_thread: Callable[..., Any] | None = None, name: str = "exim-log-writer"
    ) -> None:
        self._call_from_thread = call_from_thread
        self._name = name
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._closed = False

    def submit(self, job: Callable[[], None]) -> None:
        """Queue *job*; after close() it runs at once, so that lines logged
        while shutting down are not lost."""
        with self._lock:
            if not self._closed:
                if self._thread is None:
                    self._thread = threading.Thread(target=self._run, name=self._name, daemon=True)
                    self._thread.start()
                self._queue.put(job)
                return
        _run_job(job)

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until everything queued so far is written; False on timeout."""
        done = threading.Event()
        with self._lock:
            if self._closed or self._thread is None:
                return True
            self._queue.put(done.set)
        return done.wait(timeout)

    def when_flushed(self) -> Deferred[None]:
        """A Deferred that fires once everything queued so far is written."""
        d: Deferred[None] = Deferred()
        if self._call_from_thread is not None:
            call = self._call_from_thread
            with self._lock:
                if not self._closed and self._thread is not None:
                    self._queue.put(lambda: call(d.callback, None))
                    return d
        self.flush()
        d.callback(None)
        return d

    def close(self) -> None:
        """Finish the queued jobs and stop the thread."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            thread = self._thread
            if thread is not None:
                self._queue.put(_STOP)
        if thread is not None and thread is not threading.current_thread():
            thread.join()

    def _run(self) -> None:
        while True:
            job = self._queue.get()
            if job is _STOP:
                return
            _run_job(job)


class SyncLogWriter:
    """Runs each log job at once, in the caller's thread: for one-shot
    commands that have no reactor to keep responsive."""

    def submit(self, job: Callable[[], None]) -> None:
        _run_job(job)

    def flush(self, timeout: float | None = None) -> bool:
        return True

    def when_flushed(self) -> Deferred[None]:
        return succeed(None)

    def close(self) -> None:
        pass


def _run_job(job: Callable[[], None]) -> None:
    try:
        job()
    except Exception:
        # A logging failure must not stop later lines being written.
        traceback.print_exc(file=sys.stderr)


# ---------------------------------------------------------------------------
# The log files themselves (run by the writer)

LOG_MODE = 0o640
LOG_DIRECTORY_MODE = 0o750

# Measured on Exim 4.96 (Debian): a line's stamp, pid, id and text fit in
# 8189 characters; the reject log's extra pieces fit while the entry stays
# within 8191, and an entry that overflows is cut back from 8190.
_LINE_ROOM = 8189
_REJECT_ROOM = 8191
_REJECT_CUT = 8190
_OVERFLOW = "**** log string overflowed log buffer ****\n"
_TRUNCATED = "\n*** truncated ***\n"


def _to_bytes(text: str) -> bytes:
    try:
        return text.encode("latin-1")
    except UnicodeEncodeError:
        return b"".join(
            c.encode("latin-1") if ord(c) < 256 else c.encode("utf-8", "surrogateescape")
            for c in text)


class _LogFiles:
    """The open main and reject log files, reopened when their name changes
    (a new %D/%M date) or the file was moved away (log cycling).  The panic
    log is opened for each line, as Exim does."""

    def __init__(self, failure_line: Callable[[str], str], panic_path: Callable[[], str],
                 on_failure: Callable[[str], None] | None) -> None:
        self._kept: dict[str, tuple[str, int, int]] = {}
        self._failure_line = failure_line
        self._panic_path = panic_path
        self._on_failure = on_failure
        self.failures: list[str] = []

    def append(self, kind: str, path: str, data: str) -> None:
        """Append *data* to log *kind* (main, reject or panic) at *path*."""
        raw = _to_bytes(data)
        try:
            fd = self._panic_open(path) if kind == "panic" else self._kept_open(kind, path)
        except OSError as e:
            self._fail(kind, raw, f'Cannot open {kind} log file "{path}": '
                       f"{os.strerror(e.errno or 0)}: euid={os.geteuid()} egid={os.getegid()}")
            return
        try:
            _write_all(fd, raw)
        except OSError as e:
            what = {"main": "main log", "reject": "reject log"}.get(kind, "panic log")
            self._fail(kind, raw, f"failed to write to {what}: length={len(raw)} result=-1 "
                       f"errno={e.errno} ({os.strerror(e.errno or 0)})")
        finally:
            if kind == "panic":
                os.close(fd)

    def close_all(self) -> None:
        """Close the kept files (they reopen on the next line)."""
        for kind in list(self._kept):
            self._drop(kind)

    def _kept_open(self, kind: str, path: str) -> int:
        kept = self._kept.get(kind)
        if kept is not None:
            old_path, fd, inode = kept
            if old_path != path:
                self._drop(kind)
            else:
                try:
                    moved = os.stat(path).st_ino != inode
                except OSError:
                    moved = True
                if not moved:
                    return fd
                self._drop(kind)
        fd = _open_log(path)
        self._kept[kind] = (path, fd, os.fstat(fd).st_ino)
        return fd

    def _panic_open(self, path: str) -> int:
        return _open_log(path)

    def _drop(self, kind: str) -> None:
        _, fd, _ = self._kept.pop(kind)
        try:
            os.close(fd)
        except OSError:
            pass

    def _fail(self, kind: str, raw: bytes, message: str) -> None:
        # Exim puts the line it could not write and the complaint in the
        # panic log, then dies; the service decides about dying.
        self.failures.append(message)
        line = _to_bytes(self._failure_line(message))
        if kind != "panic":
            try:
                fd = self._panic_open(self._panic_path())
            except (OSError, LookupError):
                fd = -1
            if fd >= 0:
                try:
                    _write_all(fd, raw + line)
                except OSError:
                    pass
                finally:
                    os.close(fd)
        try:
            sys.stderr.write(line.decode("latin-1"))
        except (OSError, ValueError):
            pass
        if self._on_failure is not None:
            self._on_failure(message)


def _open_log(path: str) -> int:
    flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | getattr(os, "O_CLOEXEC", 0)
    try:
        return _create_or_open(path, flags)
    except FileNotFoundError:
        _make_directories(os.path.dirname(path))
        return _create_or_open(path, flags)


def _create_or_open(path: str, flags: int) -> int:
    try:
        fd = os.open(path, flags | os.O_EXCL, LOG_MODE)
    except FileExistsError:
        return os.open(path, flags, LOG_MODE)
    # Exim runs with umask 0, so a new log has exactly LOG_MODE.
    os.fchmod(fd, LOG_MODE)
    return fd


def _make_directories(directory: str) -> None:
    if not directory or os.path.isdir(directory):
        return
    _make_directories(os.path.dirname(directory))
    try:
        os.mkdir(directory, LOG_DIRECTORY_MODE)
    except FileExistsError:
        return
    os.chmod(directory, LOG_DIRECTORY_MODE)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        try:
            done = os.write(fd, view)
        except InterruptedError:
            continue
        if done <= 0:
            raise OSError(errno_module.EIO, "write incomplete")
        view = view[done:]


# ---------------------------------------------------------------------------
# syslog

SYSLOG_FACILITIES = ("mail", "user", "news", "uucp", "local0", "local1", "local2", "local3",
                     "local4", "local5", "local6", "local7", "daemon")
_MAX_SYSLOG_LEN = 870
# syslog priorities (<syslog.h>), so that tests need not import syslog.
LOG_ALERT, LOG_NOTICE, LOG_INFO = 1, 5, 6


@dataclass(frozen=True)
class SyslogSettings:
    """The syslog_* options, and the build's SYSLOG_LONG_LINES."""

    facility: str | None = None
    processname: str = "exim"
    pid: bool = True
    timestamp: bool = True
    duplication: bool = True
    long_lines: bool = False

    def facility_name(self) -> str:
        """The facility, without an optional ``log_`` prefix; ValueError
        with Exim's message for an unknown one."""
        if self.facility is None:
            return "mail"
        name = self.facility
        if len(name) >= 4 and name[:4].lower() == "log_":
            name = name[4:]
        if name.lower() not in SYSLOG_FACILITIES:
            raise ValueError(f'failed to interpret syslog_facility "{self.facility}"')
        return name.lower()


def syslog_pieces(text: str, long_lines: bool = False) -> list[str]:
    """What Exim hands to syslog() for one log text: one piece per line,
    long lines cut at 870 characters unless *long_lines*, and several pieces
    numbered ``[i/n]`` (``[i\\n]`` when a newline follows)."""
    chunks: list[tuple[str, bool]] = []
    pos, left = 0, len(text)
    while left > 0:
        newline = text.find("\n", pos)
        size = left if newline < 0 else newline - pos
        if not long_lines:
            size = min(size, _MAX_SYSLOG_LEN)
        left -= size
        at_newline = pos + size < len(text) and text[pos + size] == "\n"
        if at_newline:
            left -= 1
        chunks.append((text[pos:pos + size], at_newline and left != 0))
        pos += size + (1 if at_newline else 0)
    if len(chunks) == 1:
        return [chunks[0][0]]
    count = len(chunks)
    marks = {True: "\\", False: "/"}
    return [f"[{i}{marks[more]}{count}] {piece}" for i, (piece, more) in enumerate(chunks, 1)]


class SystemSyslog:
    """Sends to the system logger with Python's syslog module, opened on
    first use (in the writer thread)."""

    def __init__(self, settings: SyslogSettings) -> None:
        self._settings = settings
        self._facility = settings.facility_name()
        self._opened = False

    def __call__(self, priority: int, message: str) -> None:
        # Imported here: the module exists only on Unix, and only syslog users need it.
        import syslog

        if not self._opened:
            syslog.openlog(self._settings.processname, syslog.LOG_PID | syslog.LOG_CONS,
                           getattr(syslog, f"LOG_{self._facility.upper()}"))
            self._opened = True
        syslog.syslog(priority, message)


# ---------------------------------------------------------------------------
# The log


_TARGETS = frozenset({"main", "reject", "panic"})


class EximLog:
    """Exim's main, reject and panic logs (and syslog), written in the
    background by a :class:`LogWriter` in the order lines were logged.

    Lines are ``YYYY-MM-DD HH:MM:SS[.mmm] [[pid] ][id ]text`` and a newline;
    a text with newlines is written as it is, as Exim does.  With
    *testing_stream* nothing goes to files: each line is printed there at
    once, as Exim does when testing; with *host_checking* (``-bh``) the line
    is ``LOG: `` and the line without its first 20 characters."""

    def __init__(
        self,
        log_file_path: str | None,
        spool_directory: str,
        selectors: frozenset[str],
        clock: IReactorTime,
        pid: int,
        writer: LogWriter | None = None,
        *,
        testing_stream: TextIO | None = None,
        host_checking: bool = False,
        stderr: TextIO | None = None,
        write_rejectlog: bool = True,
        log_timezone: bool = False,
        timestamps_utc: bool = False,
        syslog: SyslogSettings | None = None,
        syslog_writer: Callable[[int, str], None] | None = None,
        build_default_path: str = "",
        on_failure: Callable[[str], None] | None = None,
    ) -> None:
        self.selectors = selectors
        self.destinations = log_destinations(log_file_path, spool_directory, build_default_path)
        self._clock = clock
        self._pid = pid
        self._writer: LogWriter = writer if writer is not None else ThreadLogWriter()
        self._testing_stream = testing_stream
        self._host_checking = host_checking
        self._stderr = stderr
        self._write_rejectlog = write_rejectlog
        self._zone = log_timezone
        self._utc = timestamps_utc
        self._syslog_settings = syslog or SyslogSettings()
        self._syslog = None
        if self.destinations.syslog and testing_stream is None:
            self._syslog = syslog_writer or SystemSyslog(self._syslog_settings)
        self._notice = self.destinations.notice
        self._files = _LogFiles(self._failure_line, self._panic_path_now, on_failure)

    @classmethod
    def from_config(
        cls,
        config: Any,
        clock: IReactorTime,
        pid: int,
        writer: LogWriter | None = None,
        *,
        log_file_path: str | None = None,
        **options: Any,
    ) -> EximLog:
        """An EximLog set up from a Config's options.  Pass the expanded
        log_file_path when it needs expanding (the raw option is used
        otherwise).  Raises ValueError for a bad log_selector or
        syslog_facility."""
        path = config.get("log_file_path") if log_file_path is None else log_file_path
        settings = SyslogSettings(
            facility=config.get("syslog_facility"),
            processname=config.get("syslog_processname") or "exim",
            pid=bool(config.get("syslog_pid", True)),
            timestamp=bool(config.get("syslog_timestamp", True)),
            duplication=bool(config.get("syslog_duplication", True)),
        )
        settings.facility_name()
        options.setdefault("write_rejectlog", bool(config.get("write_rejectlog", True)))
        options.setdefault("log_timezone", bool(config.get("log_timezone", False)))
        options.setdefault("timestamps_utc",
                           str(config.get("timezone") or "").lower() == "utc")
        options.setdefault("syslog", settings)
        return cls(path, config.get("spool_directory") or "",
                   parse_log_selector(config.get("log_selector")), clock, pid, writer, **options)

    # -- logging ------------------------------------------------------------

    def main(self, text: str, message_id: str | None = None, *,
             selector: str | None = None) -> None:
        """Write a main-log line; with *selector*, only when it is selected."""
        self.write(text, ("main",), message_id, selector=selector)

    def reject(self, text: str, message_id: str | None = None,
               headers: str | Sequence[str] | None = None) -> None:
        """Write a rejection to the main and reject logs.  The reject log
        also gets *headers* (see :func:`reject_log_headers`; a list keeps
        Exim's truncation exact) when rejected_header is selected."""
        self.write(text, ("main", "reject"), message_id, headers=headers)

    def panic(self, text: str, message_id: str | None = None, *, main: bool = True) -> None:
        """Write to the panic log, and to the main log as Exim's own panics
        do (``main=False`` for a panic-only line such as ``logwrite = :panic:``)."""
        self.write(text, ("main", "panic") if main else ("panic",), message_id)

    def write(
        self,
        text: str,
        targets: Iterable[str] = ("main",),
        message_id: str | None = None,
        *,
        selector: str | None = None,
        headers: str | Sequence[str] | None = None,
    ) -> None:
        """Log *text* to the given logs (``main``, ``reject``, ``panic``).

        A *selector* gates the main log line (and, when testing, the whole
        line); reject and panic lines are always written."""
        flags = frozenset(targets)
        if not flags or flags - _TARGETS:
            raise ValueError(f"bad log targets: {sorted(flags)}")
        if selector is not None and selector not in LOG_SELECTOR_NAMES:
            raise ValueError(f"unknown log selector {selector!r}")
        if self._notice is not None:
            notice, self._notice = self._notice, None
            self.write(notice, ("main", "panic"))
        now = self._clock.seconds()
        line, pid_span = self._line(now, text, message_id)
        selected = selector is None or selector in self.selectors
        if self._testing_stream is not None:
            if selected:
                self._testing_stream.write("LOG: " + line[20:] if self._host_checking else line)
                self._testing_stream.flush()
            return
        if not self._write_rejectlog:
            flags -= {"reject"}
        actions = self._actions(now, flags, line, pid_span, selected, headers)
        if actions:
            self._writer.submit(lambda: self._perform(actions))

    # -- flushing and closing -----------------------------------------------

    def flush(self, timeout: float | None = None) -> bool:
        """Wait (blocking) until every line logged so far is written."""
        return self._writer.flush(timeout)

    def when_flushed(self) -> Deferred[None]:
        """A Deferred firing once every line logged so far is written."""
        return self._writer.when_flushed()

    def close(self) -> None:
        """Write what is queued, stop the writer and close the files."""
        self._writer.submit(self._files.close_all)
        self._writer.close()

    @property
    def failures(self) -> list[str]:
        """Complaints about logs that could not be opened or written."""
        return self._files.failures

    def path(self, name: str) -> str | None:
        """The file log *name* (main, reject, panic) would be written to now."""
        if self.destinations.template is None:
            return None
        when = self._when(self._clock.seconds())
        return format_log_path(self.destinations.template, name, when)

    # -- internals ------------------------------------------------------------

    def _line(self, now: float, text: str, message_id: str | None) -> tuple[str, tuple[int, int]]:
        prefix = log_timestamp(now, millisec="millisec" in self.selectors, zone=self._zone,
                               utc=self._utc) + " "
        pid_span = (len(prefix), len(prefix))
        if "pid" in self.selectors:
            prefix += f"[{self._pid}] "
            pid_span = (pid_span[0], len(prefix))
        if message_id:
            prefix += f"{message_id} "
        if len(prefix) + len(text) > _LINE_ROOM:
            text = _OVERFLOW
        return prefix + text + "\n", pid_span

    def _actions(
        self, now: float, flags: frozenset[str], line: str, pid_span: tuple[int, int],
        selected: bool, headers: str | Sequence[str] | None,
    ) -> list[tuple[Any, ...]]:
        actions: list[tuple[Any, ...]] = []
        template = self.destinations.template
        when = self._when(now)
        dup = self._syslog_settings.duplication
        if "main" in flags and selected:
            if self._syslog is not None and (dup or not flags & {"reject", "panic"}):
                actions.append(("syslog", LOG_INFO, self._for_syslog(line, pid_span)))
            if template is not None:
                actions.append(("file", "main", format_log_path(template, "main", when), line))
        entry = line
        if "reject" in flags:
            if headers and "rejected_header" in self.selectors:
                entry = _with_headers(line, [headers] if isinstance(headers, str) else headers)
            if self._syslog is not None and (dup or "panic" not in flags):
                actions.append(("syslog", LOG_NOTICE, self._for_syslog(entry, pid_span)))
            if template is not None:
                actions.append(("file", "reject", format_log_path(template, "reject", when),
                                entry))
        if "panic" in flags:
            if self._stderr is not None:
                self._stderr.write(entry)
                self._stderr.flush()
            if self._syslog is not None:
                actions.append(("syslog", LOG_ALERT, self._for_syslog(entry, pid_span)))
            if template is not None:
                actions.append(("file", "panic", format_log_path(template, "panic", when), entry))
        return actions

    def _perform(self, actions: list[tuple[Any, ...]]) -> None:
        for action in actions:
            if action[0] == "syslog":
                for piece in action[2]:
                    self._syslog(action[1], piece)
            else:
                self._files.append(action[1], action[2], action[3])

    def _for_syslog(self, text: str, pid_span: tuple[int, int]) -> list[str]:
        settings = self._syslog_settings
        if not settings.pid and "pid" in self.selectors:
            text = text[:pid_span[0]] + text[pid_span[1]:]
        if not settings.timestamp:
            skip = (26 if self._zone else 20) + (4 if "millisec" in self.selectors else 0)
            text = text[skip:]
        return syslog_pieces(text, settings.long_lines)

    def _when(self, now: float) -> time.struct_time:
        whole = int(now // 1)
        return time.gmtime(whole) if self._utc else time.localtime(whole)

    def _failure_line(self, message: str) -> str:
        # Runs in the writer thread; the clock is only read.
        return self._line(self._clock.seconds(), message, None)[0]

    def _panic_path_now(self) -> str:
        if self.destinations.template is None:
            raise LookupError("no log files")
        return format_log_path(self.destinations.template, "panic",
                               self._when(self._clock.seconds()))


def _with_headers(line: str, pieces: Sequence[str]) -> str:
    entry = line
    for piece in pieces:
        if len(entry) + len(piece) <= _REJECT_ROOM:
            entry += piece
            continue
        # Exim fills its buffer, backs off 100 characters and says so.
        cut = max(_REJECT_CUT, len(entry))
        entry = (entry + piece)[:cut][:-100]
        if entry.endswith("\n"):
            entry = entry[:-1]
        return entry + _TRUNCATED
    return entry
