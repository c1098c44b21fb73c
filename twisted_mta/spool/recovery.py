"""Tidying the spool at start-up after a crash.

A message is complete once its -H file exists (see
:mod:`twisted_mta.spool.store`), so a crash can leave only:

* a temporary header ``hdr.<id>`` (the rename never happened, or a rewrite
  after a delivery attempt was cut short; the old -H is still valid);
* a -D file with no -H (reception did not finish; the client was never
  told 250, so it will send the message again);
* a -J journal or msglog file whose message has gone.

:func:`recover` removes these and keeps every message that has a -H file.
Exim never removes a lone -D file itself; we do, because nothing can
complete it.  It does not remove files that are still being written:
those whose -D file another process holds Exim's lock on (a real exim4
receiving into the same spool, say), those this process's
:class:`~twisted_mta.spool.store.Spool` is writing, and, when *min_age* is
set, those modified less than *min_age* seconds ago.  At start-up nothing
of ours can be in progress, so the default *min_age* is 0: the lock check
alone protects other processes (which lock -D as soon as they create it).

A -H file whose -D file is missing is kept and reported: Exim logs
"Spool file ... -D not found" for it and the queue runner deals with it.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field

from twisted_mta.spool.ids import MESSAGE_ID_LENGTH, is_message_id
from twisted_mta.spool.store import TEMP_HEADER_PREFIX, Spool, lock_data_file


@dataclass
class RecoveryReport:
    """What :func:`recover` found."""

    kept: list[str] = field(default_factory=list)          # ids of complete messages
    removed: list[str] = field(default_factory=list)       # paths deleted
    busy: list[str] = field(default_factory=list)          # paths left: in use or too new
    missing_data: list[str] = field(default_factory=list)  # ids with -H but no -D


def _locked_elsewhere(path: str) -> bool:
    """True when another process holds Exim's lock on the -D file *path*."""
    try:
        fd = os.open(path, os.O_RDWR)
    except FileNotFoundError:
        return False
    try:
        lock_data_file(fd)
    except (BlockingIOError, PermissionError):
        return True
    finally:
        os.close(fd)  # also drops our lock
    return False


def _unlink(path: str, report: RecoveryReport) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        return
    report.removed.append(path)


class _Recovery:
    """One run of :func:`recover`."""

    def __init__(self, spool: Spool, min_age: float, now: float) -> None:
        self.spool = spool
        self.min_age = min_age
        self.now = now
        self.writing = spool.writing()
        self.report = RecoveryReport()

    def leave(self, path: str, message_id: str, data_path: str) -> bool:
        """True when *path* may still be in use and must stay."""
        if message_id in self.writing or _locked_elsewhere(data_path):
            return True
        try:
            return self.now - os.stat(path).st_mtime < self.min_age
        except FileNotFoundError:
            return False

    def directory(self, subdir: str, directory: str) -> None:
        try:
            names = sorted(os.listdir(directory))
        except FileNotFoundError:
            return
        temps: set[str] = set()
        by_suffix: dict[str, set[str]] = {"-H": set(), "-D": set(), "-J": set()}
        for name in names:
            if name.startswith(TEMP_HEADER_PREFIX) and is_message_id(name[4:]):
                temps.add(name[4:])
            elif (len(name) == MESSAGE_ID_LENGTH + 2 and name[-2:] in by_suffix
                  and is_message_id(name[:-2])):
                by_suffix[name[-2:]].add(name[:-2])
        headers, data, journals = by_suffix["-H"], by_suffix["-D"], by_suffix["-J"]
        report = self.report

        for message_id in sorted(temps):
            temp = os.path.join(directory, TEMP_HEADER_PREFIX + message_id)
            if self.leave(temp, message_id, os.path.join(directory, message_id + "-D")):
                report.busy.append(temp)
            else:
                _unlink(temp, report)

        for message_id in sorted(headers):
            report.kept.append(message_id)
            if message_id not in data:
                report.missing_data.append(message_id)

        for message_id in sorted((data | journals) - headers):
            data_file = os.path.join(directory, message_id + "-D")
            if message_id in data and self.leave(data_file, message_id, data_file):
                report.busy.append(data_file)
                continue
            _unlink(data_file, report)
            _unlink(os.path.join(directory, message_id + "-J"), report)
            _unlink(os.path.join(self.spool.directory, "msglog", subdir, message_id), report)


def recover(spool: Spool, *, min_age: float = 0.0, now: float | None = None) -> RecoveryReport:
    """Remove what a crash left in *spool* and list the complete messages.

    Run it before the daemon starts receiving.  Files younger than
    *min_age* seconds (by modification time, against *now*) are left.
    """
    run = _Recovery(spool, min_age, time.time() if now is None else now)
    for subdir, directory in spool.scan_directories():
        run.directory(subdir, directory)
    run.report.kept.sort(key=lambda i: (i[:6], i[14:], i))
    return run.report
