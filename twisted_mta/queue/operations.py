"""Operator commands on queued messages: ``-Mvh``, ``-Mvb``, ``-Mvl``,
``-Mrm``, ``-Mf`` and ``-Mt``, and the command-line glue for ``-bp``.

What each command prints, logs and exits with is Exim 4.96's
(``queue_action()`` in queue.c, ``spool_open_datafile()`` in
spool_in.c):

* ``-Mvh``/``-Mvb``/``-Mvl`` copy the -H file, the -D file (its first
  line ``<id>-D`` included) or the message log to standard output as they
  are, looking in the split and the unsplit place;
* ``-Mrm``/``-Mf``/``-Mt`` first open the -D file and take Exim's lock on
  it (:func:`twisted_mta.spool.store.lock_data_file`), so they never act
  on a message that a delivery process is working on, and hold it until
  they have finished; then read the -H file, act, and log to the main log
  with the message id (``frozen by root``, ``unfrozen by root``,
  ``removed by root`` and ``Completed``);
* a message that is locked gives ``Message <id> is locked`` (and the main
  log line ``Spool file for <id> is locked (another process is handling
  this message)`` under the ``skip_delivery`` selector);
* ``-Mrm`` carries on when files are missing, to clear up the debris of
  a broken message.

Freezing and thawing rewrite the -H file from what was read, exactly as
Exim does (which may reorder ACL variables, and adds ``-tls_resumption``
where it was missing).  Only admin users (root, the Exim user and group,
``admin_groups``) may act, except that the sender of a message may remove
it; ``event_action`` is not run for ``-Mrm``.
"""

from __future__ import annotations

import errno
import os
import pwd
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, BinaryIO

from twisted_mta.queue.listing import count_queue, list_option, list_queue
from twisted_mta.spool.header import SpoolFormatError, parse_header_file
from twisted_mta.spool.ids import MESSAGE_ID_RE
from twisted_mta.spool.message import SpoolMessage
from twisted_mta.spool.store import Spool, lock_data_file

__all__ = [
    "MESSAGE_ACTIONS", "QueueCommands", "QueueUsageError", "is_admin_user",
    "parse_queue_option", "run_queue_command",
]

REMOVE = "Mrm"
FREEZE = "Mf"
THAW = "Mt"
SHOW_HEADER = "Mvh"
SHOW_BODY = "Mvb"
SHOW_LOG = "Mvl"

#: The -M options handled here; the first three take any number of ids,
#: the others exactly one.
MESSAGE_ACTIONS = (REMOVE, FREEZE, THAW, SHOW_HEADER, SHOW_BODY, SHOW_LOG)
_MANY_IDS = (REMOVE, FREEZE, THAW)
# What the show actions print: directory under the spool and file suffix.
_SHOWN = {SHOW_HEADER: ("input", "-H"), SHOW_BODY: ("input", "-D"), SHOW_LOG: ("msglog", "")}


class QueueUsageError(ValueError):
    """A command line Exim refuses; the text is Exim's, for stderr."""


def _is_message_id(text: str) -> bool:
    return MESSAGE_ID_RE.match(text) is not None


def parse_queue_option(arg: str, following: Sequence[str]) -> tuple[str, list[str], int] | None:
    """Recognise a queue option at *arg*, with *following* the arguments
    after it.  Returns None when *arg* is not one of ours, else ``(mode,
    ids, used)``: the mode (``bp``, ``bpa``, ``bpu``, ``bpr``, ``bpra``,
    ``bpru``, ``bpc``, or one of :data:`MESSAGE_ACTIONS`), the message ids
    taken from *following* and how many of them were used.  ``-Mrm``,
    ``-Mf`` and ``-Mt`` use them all; ``-Mv*`` one (anything else that is
    not an option then counts as a surplus id, as Exim sees it); ``-bp``
    none (its ids are the ordinary arguments after the options).
    Raises QueueUsageError with Exim's text for a bad one."""
    if arg.startswith("-bp"):
        if list_option(arg) is None:
            raise QueueUsageError(
                f"exim abandoned: unknown, malformed, or incomplete option {arg}")
        return arg[1:], [], 0
    if not arg.startswith("-M") or arg[1:] not in MESSAGE_ACTIONS:
        return None
    mode = arg[1:]
    if not following:
        raise QueueUsageError(f"exim: no message ids given after {arg} option")
    ids = list(following) if mode in _MANY_IDS else [following[0]]
    for message_id in ids:
        if not _is_message_id(message_id):
            raise QueueUsageError(f"exim: malformed message id {message_id} after {arg} option")
    return mode, ids, len(ids)


# ---------------------------------------------------------------- who may act

def _exim_ids(config: Any, spool_directory: str) -> tuple[int | None, int | None]:
    """The Exim user's uid and gid: ``exim_user``/``exim_group``, else (as
    exim-py runs as whoever starts it) the owner of the spool directory."""
    uid = config.get("exim_user")
    gid = config.get("exim_group")
    if uid is not None and gid is None:
        try:
            gid = pwd.getpwuid(uid).pw_gid
        except KeyError:
            gid = None
    if uid is None:
        try:
            st = os.stat(spool_directory)
        except OSError:
            return None, gid
        uid = st.st_uid
        if gid is None:
            gid = st.st_gid
    return uid, gid


def is_admin_user(config: Any, spool_directory: str, uid: int | None = None,
                  gid: int | None = None, groups: Sequence[int] | None = None) -> bool:
    """Exim's admin user test: root, the Exim user, the Exim group as the
    real group, or a supplementary group that is the Exim group or is in
    ``admin_groups``."""
    uid = os.getuid() if uid is None else uid
    gid = os.getgid() if gid is None else gid
    groups = os.getgroups() if groups is None else groups
    exim_uid, exim_gid = _exim_ids(config, spool_directory)
    if uid == 0 or uid == exim_uid or (exim_gid is not None and gid == exim_gid):
        return True
    admin_groups = set(config.get("admin_groups") or ())
    return any(g == exim_gid or g in admin_groups for g in groups)


def _user_name(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return f"uid {uid}"


# ---------------------------------------------------------------- acting on messages

class _SecondsClock:
    """The little of IReactorTime that EximLog uses."""

    def __init__(self, now: Callable[[], float]) -> None:
        self._now = now

    def seconds(self) -> float:
        return self._now()


@dataclass
class QueueCommands:
    """The spool and settings one command works with.

    *log* is an :class:`twisted_mta.log.EximLog` (anything with its
    ``main(text, message_id, selector=...)``); *clock* gives the time
    (seconds since the epoch) for freezing; *out* gets what Exim prints
    on standard output."""

    spool_directory: str
    out: BinaryIO
    log: Any
    split: bool = False
    message_logs: bool = True
    admin: bool = True
    real_uid: int = field(default_factory=os.getuid)
    clock: Callable[[], float] = time.time

    def _print(self, text: str) -> None:
        self.out.write(text.encode("latin-1", "replace"))

    def _places(self, message_id: str) -> list[str]:
        # Exim's set_subdir_str(): the configured place first.
        sub = message_id[5]
        return [sub, ""] if self.split else ["", sub]

    # ------------------------------------------------------------ -Mv*

    def show(self, message_id: str, action: str, surplus: Sequence[str] = ()) -> bool:
        """``-Mvh``/``-Mvb``/``-Mvl``: copy the file to *out*."""
        if not self.admin:
            self._print("Permission denied\n")
            return False
        if surplus:
            self._print("*** Only one message can be listed at once\n")
            return False
        directory, suffix = _SHOWN[action]
        fd = -1
        error = 0
        for place in self._places(message_id):
            path = os.path.join(self.spool_directory, directory, place, message_id + suffix)
            try:
                fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
                break
            except OSError as e:
                error = e.errno or errno.EIO
        if fd < 0:
            self._print(f"Failed to open {directory} file for {message_id}{suffix}: "
                        f"{os.strerror(error)}\n")
            if action == SHOW_LOG and not self.message_logs:
                self._print("(No message logs are being created because the message_logs "
                            "option is false.)\n")
            return False
        try:
            while True:
                chunk = os.read(fd, 65536)
                if not chunk:
                    break
                self.out.write(chunk)
        finally:
            os.close(fd)
        return True

    # ------------------------------------------------------------ -Mrm, -Mf, -Mt

    def _open_data_file(self, message_id: str) -> tuple[int, int]:
        """Exim's ``spool_open_datafile()``: open and lock the -D file,
        logging failures as Exim does.  Returns ``(fd, 0)``, or ``(-1,
        errno)`` with errno 0 when another process holds the lock."""
        flags = os.O_RDWR | os.O_APPEND | getattr(os, "O_CLOEXEC", 0) | \
            getattr(os, "O_NOFOLLOW", 0)
        for i, place in enumerate(self._places(message_id)):
            path = os.path.join(self.spool_directory, "input", place, message_id + "-D")
            try:
                fd = os.open(path, flags)
            except OSError as e:
                code = e.errno or errno.EIO
                if code == errno.ENOENT:
                    if i == 0:
                        continue
                    self.log.main(f"Spool file {message_id}-D not found", message_id)
                else:
                    self.log.main(f"Spool error for {path}: {os.strerror(code)}", message_id)
                return -1, code
            try:
                lock_data_file(fd)
            except OSError:
                self.log.main(f"Spool file for {message_id} is locked (another process is "
                              "handling this message)", message_id, selector="skip_delivery")
                os.close(fd)
                return -1, 0
            return fd, 0
        raise AssertionError("not reached")

    def _read_header(self, message_id: str) -> SpoolMessage:
        error: OSError | None = None
        for place in self._places(message_id):
            path = os.path.join(self.spool_directory, "input", place, message_id + "-H")
            try:
                with open(path, "rb") as f:
                    data = f.read()
            except FileNotFoundError as e:
                error = e
                continue
            return parse_header_file(data, expected_id=message_id)
        assert error is not None
        raise error

    def act(self, message_id: str, action: str) -> bool:
        """``-Mrm``, ``-Mf`` or ``-Mt`` on one message; False when Exim's
        would count as a failure (exit status 1)."""
        ok = True
        fd, error = self._open_data_file(message_id)
        if fd < 0:
            if error == errno.ENOENT:
                ok = False
                self._print(f"Spool data file for {message_id} does not exist\n")
                if action != REMOVE or not self.admin:
                    return False
                self._print("Continuing, to ensure all files removed\n")
            else:
                if error == 0:
                    self._print(f"Message {message_id} is locked\n")
                else:
                    self._print(f"Couldn't open spool file for {message_id}: "
                                f"{os.strerror(error)}\n")
                return False
        try:
            return self._act_locked(message_id, action, fd, ok)
        finally:
            if fd >= 0:
                os.close(fd)  # releases the lock

    def _act_locked(self, message_id: str, action: str, fd: int, ok: bool) -> bool:
        msg: SpoolMessage | None = None
        try:
            msg = self._read_header(message_id)
        except (OSError, SpoolFormatError) as e:
            ok = False
            if isinstance(e, SpoolFormatError):
                self._print(f"Spool format error for {message_id}-H\n")
            else:
                self._print(f"Spool read error for {message_id}-H: "
                            f"{os.strerror(e.errno or errno.EIO)}\n")
            if action != REMOVE or not self.admin:
                return False
            self._print("Continuing to ensure all files removed\n")
        if not self.admin and (action != REMOVE or msg is None
                               or self.real_uid != msg.originator_uid):
            self._print("Permission denied\n")
            return False
        username = _user_name(self.real_uid)
        self._print(f"Message {message_id} ")
        if action == REMOVE:
            return self._remove(message_id, fd, username) and ok
        assert msg is not None
        if action == FREEZE:
            if msg.frozen_at is not None:
                self._print("is already frozen\n")
                return False
            msg.frozen_at = int(self.clock())
            msg.manual_thaw = False
            done, past = "is now frozen", "frozen"
        else:
            if msg.frozen_at is None:
                self._print("is not frozen\n")
                return False
            msg.frozen_at = None
            msg.manual_thaw = True
            done, past = "is no longer frozen", "unfrozen"
        if msg.tls_resumption is None:
            msg.tls_resumption = 0  # Exim's build has it, and writes it
        try:
            Spool(self.spool_directory, self.split, create=False).write_header(msg)
        except OSError as e:
            self._print(f"could not be {past}: spool file write error while modifying: "
                        f"{os.strerror(e.errno or errno.EIO)}\n")
            return False
        self._print(done + "\n")
        self.log.main(f"{past} by {username}", message_id)
        return True

    def _remove(self, message_id: str, fd: int, username: str) -> bool:
        ok = True
        removed = False
        for place in (message_id[5], ""):
            paths = [os.path.join(self.spool_directory, "msglog", place, message_id)]
            paths += [os.path.join(self.spool_directory, "input", place, message_id + suffix)
                      for suffix in ("-D", "-H", "-J")]
            for path in paths:
                try:
                    os.unlink(path)
                    removed = True
                except FileNotFoundError:
                    pass
                except OSError as e:
                    ok = False
                    self._print(f"Error while removing {path}: "
                                f"{os.strerror(e.errno or errno.EIO)}\n")
        self._print("has been removed\n" if fd >= 0 else
                    "has been removed or did not exist\n")
        if removed:
            self.log.main(f"removed by {username}", message_id)
            self.log.main("Completed", message_id)
        return ok


# ---------------------------------------------------------------- the command line

def run_queue_command(config: Any, mode: str, arguments: Sequence[str], out: BinaryIO,
                      err: BinaryIO, *, clock: Callable[[], float] = time.time,
                      log: Any = None, admin: bool | None = None) -> int:
    """Run ``-bp...`` or ``-M...`` (*mode* from :func:`parse_queue_option`)
    with *arguments* (the message ids) and return the exit status.
    A main log is opened from *config* unless *log* is given."""
    spool_directory = config.get("spool_directory") or "."
    split = bool(config.get("split_spool_directory"))
    if admin is None:
        admin = is_admin_user(config, spool_directory)
    if mode.startswith("bp"):
        if not admin and config.get("queue_list_requires_admin", True):
            err.write(b"exim: permission denied\n")
            err.flush()
            return 1
        if mode == "bpc":
            out.write(f"{count_queue(spool_directory, split)}\n".encode("ascii"))
            out.flush()
            return 0
        parsed = list_option("-" + mode)
        assert parsed is not None
        list_queue(spool_directory, out, split=split, option=parsed[1],
                   message_ids=arguments, now=int(clock()))
        return 0
    own_log = log is None
    if log is None:
        from twisted_mta.log import EximLog, SyncLogWriter

        log = EximLog.from_config(config, _SecondsClock(clock), os.getpid(), SyncLogWriter())
    commands = QueueCommands(spool_directory, out, log, split=split,
                             message_logs=bool(config.get("message_logs", True)),
                             admin=admin, clock=clock)
    status = 0
    try:
        if mode in _MANY_IDS:
            for message_id in arguments:
                if not commands.act(message_id, mode):
                    status = 1
        elif not commands.show(arguments[0], mode, arguments[1:]):
            status = 1
    finally:
        out.flush()
        if own_log:
            log.close()
    return status


def main_queue_command(config: Any, mode: str, arguments: Sequence[str]) -> int:
    """:func:`run_queue_command` on the process's standard streams."""
    return run_queue_command(config, mode, arguments, sys.stdout.buffer, sys.stderr.buffer)
