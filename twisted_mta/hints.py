"""Hints databases: small key/value stores under ``<spool>/db``.

Exim keeps its hints (retry times, ratelimit rates, callout results...) in
DBM files that may be deleted at any time.  exim-py keeps the same kind of
data in a format of its own: a text file of JSON lines.  The first line is a
header naming the format and the database; each later line is one update::

    {"format": "exim-py hints", "db": "retry", "version": 1}
    {"key": "T:mx.example:192.0.2.1", "value": {"first_failed": 1796000000, ...}}
    {"key": "R:example.com", "delete": true}

The newest line for a key wins.  A line cut short by a crash (no newline,
not valid JSON) is ignored, and the file is rewritten from memory, through
a temporary file and a rename, when it has grown to several times the
number of live keys.

L{HintsStore} holds the records in memory, so reads never touch the disk.
Writes are queued and handed to a *run_io* callable (for example
C{reactor.callInThread}) so that no file I/O happens on the reactor thread.
Appends and rewrites take an exclusive lock on ``<file>.lockfile`` (the name
Exim uses) and first pick up lines that other processes appended, so
several exim-py processes can share one file.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import threading
from collections.abc import Callable, Iterator
from typing import Any

FORMAT = "exim-py hints"
FORMAT_VERSION = 1

# Rewrite once the file has this many lines more than a rewrite would leave,
# but never for fewer than this many lines in all.
_COMPACT_FACTOR = 4
_COMPACT_MIN_LINES = 1000


class HintsStore:
    """One hints database.

    Values are JSON-compatible dicts of plain values (numbers, strings,
    booleans, None); callers get copies, so changing one does not change
    the store.

    @param path: the file (``<spool>/db/<name>``), or None for a store that
        lives only in memory.
    @param run_io: called with a zero-argument callable that writes the
        queued updates, for example C{reactor.callInThread}.  None writes at
        once, on the caller's thread (command-line modes and tests).
    @param name: the database name written in the header line.
    @ivar available: False when the file could not be opened, created or
        written, or is not an exim-py hints file (an Exim DBM file is left
        alone); the store then works in memory only, as Exim carries on
        without hints it cannot open.
    """

    def __init__(self, path: str | None,
                 run_io: Callable[[Callable[[], None]], Any] | None = None,
                 name: str = "hints") -> None:
        self.path = path
        self.name = name
        self.available = True
        self._run_io = run_io
        self._records: dict[str, dict[str, Any]] = {}
        # Updates not yet written, in order: (key, value or None to delete).
        self._pending: list[tuple[str, dict[str, Any] | None]] = []
        self._scheduled = False
        self._lock = threading.Lock()      # guards the fields above
        self._io_lock = threading.Lock()   # one writer thread at a time
        # What of the file is already reflected in memory: its identity,
        # the offset just after the last complete line read, the line count.
        self._identity: tuple[int, int] | None = None
        self._consumed = 0
        self._lines = 0
        if path is not None:
            self._open(path)

    # -- reading -----------------------------------------------------------

    def get(self, key: str) -> dict[str, Any] | None:
        """A copy of the value stored for *key*, or None."""
        with self._lock:
            value = self._records.get(key)
            return None if value is None else dict(value)

    def __contains__(self, key: object) -> bool:
        with self._lock:
            return key in self._records

    def __len__(self) -> int:
        with self._lock:
            return len(self._records)

    def keys(self) -> list[str]:
        """The keys, in the order they were first stored."""
        with self._lock:
            return list(self._records)

    def items(self) -> list[tuple[str, dict[str, Any]]]:
        """(key, copy of value) pairs, in the order of L{keys}."""
        with self._lock:
            return [(k, dict(v)) for k, v in self._records.items()]

    def __iter__(self) -> Iterator[str]:
        return iter(self.keys())

    # -- writing -----------------------------------------------------------

    def put(self, key: str, value: dict[str, Any]) -> None:
        """Store *value* for *key*: in memory now, in the file soon."""
        value = dict(value)
        json.dumps(value)  # fail here, not later on the I/O thread
        with self._lock:
            self._records[key] = value
            start = self._queue(key, dict(value))
        self._start_flush(start)

    def delete(self, key: str) -> bool:
        """Remove *key*; False if it was not there."""
        with self._lock:
            if self._records.pop(key, None) is None:
                return False
            start = self._queue(key, None)
        self._start_flush(start)
        return True

    def _queue(self, key: str, value: dict[str, Any] | None) -> bool:
        """Queue one update (self._lock held); True if a flush must start."""
        if self.path is None:
            return False
        self._pending.append((key, value))
        if self._scheduled:
            return False
        self._scheduled = True
        return True

    def _start_flush(self, start: bool) -> None:
        if not start:
            return
        if self._run_io is None:
            self.flush()
        else:
            self._run_io(self.flush)

    # -- file I/O (blocking: run on a thread, or in command-line modes) -----

    def flush(self) -> None:
        """Write queued updates to the file, first picking up what other
        processes appended, and rewrite the file if it has grown too much.
        Blocking: for threads, command-line modes and shutting down."""
        if self.path is None:
            return
        with self._io_lock:
            with self._lock:
                if not self._pending:
                    self._scheduled = False
                    return
            try:
                with _FileLock(self.path + ".lockfile"):
                    # Catch up first: it reapplies what is still queued on
                    # top of what others wrote.
                    self._catch_up()
                    with self._lock:
                        pending, self._pending = self._pending, []
                        self._scheduled = False
                        compact = (self._lines + len(pending) >
                                   max(_COMPACT_MIN_LINES, _COMPACT_FACTOR * len(self._records)))
                    if compact:
                        self._rewrite()
                    else:
                        self._append(pending)
                self.available = True
            except OSError:
                # Lost hints only mean an early or late retry; keep going.
                with self._lock:
                    self._scheduled = False
                    self._pending.clear()
                self.available = False

    def refresh(self) -> None:
        """Read lines that other processes have appended since we last
        looked (the whole file again if it was replaced).  Blocking: run it
        on a thread, for instance at the start of a queue run."""
        if self.path is None:
            return
        with self._io_lock:
            try:
                self._catch_up()
            except OSError:
                self.available = False

    def compact(self) -> None:
        """Rewrite the file from memory now (blocking)."""
        if self.path is None:
            return
        self.flush()
        with self._io_lock:
            try:
                with _FileLock(self.path + ".lockfile"):
                    self._catch_up()
                    self._rewrite()
            except OSError:
                self.available = False

    def close(self) -> None:
        """Write anything still queued (blocking)."""
        self.flush()

    def _open(self, path: str) -> None:
        try:
            os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
            self._catch_up()
        except OSError:
            self.available = False

    def _catch_up(self) -> None:
        """Apply the lines past self._consumed, or reload if the file was
        replaced or shrank; then reapply our own unwritten updates, which
        are newer than anything in the file."""
        assert self.path is not None
        try:
            f = open(self.path, "rb")
        except FileNotFoundError:
            if self._identity is None:
                return  # not made yet: memory is all there is
            # Deleted: hints may be deleted at any time.
            identity, start, data = None, 0, b""
        else:
            with f:
                st = os.fstat(f.fileno())
                identity = (st.st_dev, st.st_ino)
                start = self._consumed
                if identity != self._identity or st.st_size < self._consumed:
                    start = 0
                f.seek(start)
                data = f.read()
        if start == 0 and data and not data.startswith(b"{"):
            # Not ours (an Exim DBM file, say): never write into it.
            raise OSError(errno.EINVAL, "not an exim-py hints file", self.path)
        end = data.rfind(b"\n") + 1
        complete, partial = data[:end], data[end:]
        # A last line without its newline counts if it parses (its writer
        # died just before the newline); either way it is read again next
        # time, in case its writer is still busy with it.
        updates = []
        for raw in complete.split(b"\n")[:-1] + ([partial] if partial else []):
            entry = _decode(raw)
            if entry is not None:
                updates.append(entry)
        with self._lock:
            if start == 0:
                self._records = {}
                self._lines = 0
            for key, value in updates:
                if value is None:
                    self._records.pop(key, None)
                else:
                    self._records[key] = value
            for key, value in self._pending:
                if value is None:
                    self._records.pop(key, None)
                else:
                    self._records[key] = dict(value)
            self._identity = identity
            self._consumed = start + end
            self._lines += complete.count(b"\n")

    def _header(self) -> bytes:
        return (json.dumps({"format": FORMAT, "db": self.name, "version": FORMAT_VERSION})
                + "\n").encode()

    def _append(self, pending: list[tuple[str, dict[str, Any] | None]]) -> None:
        assert self.path is not None
        out = bytearray()
        for key, value in pending:
            entry: dict[str, Any] = {"key": key}
            if value is None:
                entry["delete"] = True
            else:
                entry["value"] = value
            out += json.dumps(entry).encode() + b"\n"
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640)
        try:
            st = os.fstat(fd)
            prefix = b""
            if st.st_size == 0:
                prefix = self._header()
            elif st.st_size > self._consumed:
                # Someone's line was cut short by a crash: end it so that
                # ours starts on a line of its own.
                prefix = b"\n"
            _write_all(fd, prefix + bytes(out))
            st = os.fstat(fd)
        finally:
            os.close(fd)
        with self._lock:
            self._identity = (st.st_dev, st.st_ino)
            self._consumed = st.st_size
            self._lines += (prefix + bytes(out)).count(b"\n")

    def _rewrite(self) -> None:
        assert self.path is not None
        with self._lock:
            snapshot = [(k, dict(v)) for k, v in self._records.items()]
        temp = f"{self.path}.{os.getpid()}.new"
        out = bytearray(self._header())
        for key, value in snapshot:
            out += json.dumps({"key": key, "value": value}).encode() + b"\n"
        fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o640)
        try:
            _write_all(fd, bytes(out))
            os.fsync(fd)
            st = os.fstat(fd)
        finally:
            os.close(fd)
        os.replace(temp, self.path)
        with self._lock:
            self._identity = (st.st_dev, st.st_ino)
            self._consumed = st.st_size
            self._lines = len(snapshot) + 1


def _decode(raw: bytes) -> tuple[str, dict[str, Any] | None] | None:
    """One data line as (key, value or None for a deletion), or None for
    the header, a blank line or a damaged line."""
    try:
        entry = json.loads(raw)
    except ValueError:
        return None
    if not isinstance(entry, dict) or not isinstance(entry.get("key"), str):
        return None
    if entry.get("delete"):
        return entry["key"], None
    value = entry.get("value")
    if not isinstance(value, dict):
        return None
    return entry["key"], value


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]


class _FileLock:
    """An exclusive flock() on a lock file, held for a ``with`` block."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.fd = -1

    def __enter__(self) -> _FileLock:
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o640)
        while True:
            try:
                fcntl.flock(self.fd, fcntl.LOCK_EX)
                break
            except OSError as e:
                if e.errno != errno.EINTR:
                    os.close(self.fd)
                    raise
        return self

    def __exit__(self, *exc: object) -> None:
        os.close(self.fd)  # closing releases the lock
