"""The ``appendfile`` transport: Exim's ``transports/appendfile.c`` and
``tf_maildir.c``.

Two kinds of delivery:

* ``file``: append to one mailbox file (``mbox``), locked as Exim locks
  it: a lock file ``<file>.lock`` made by linking a unique "hitching post"
  file to it (safe over NFS), then ``fcntl()`` and/or ``flock()`` locks on
  the open file, each tried ``lock_retries`` times ``lock_interval``
  apart.  The default ``message_prefix`` is the ``From sender date`` line,
  the default ``message_suffix`` a blank line, and lines of the body that
  start ``From `` get a ``>``.
* ``directory``: a new file in a directory for each message: Maildir
  (``maildir_format``: written in ``tmp/``, synced, then renamed into
  ``new/`` as ``<seconds>.M<microseconds>P<pid>.<host>[<tag>]``), mailstore
  (``mailstore_format``: ``<id>-<pid>.env`` and ``.msg``), or a plain
  directory (a name from ``directory_file``).

Quotas (``quota``, ``quota_filecount``, ``quota_warn_threshold``,
``maildir_use_size_file`` with a Maildir++ ``maildirsize`` file) are
checked before writing; exceeding one defers with ``mailbox is full``,
Exim's error -22, and ``address.extra["retry_error"] = "quota"`` so that a
``quota`` retry rule matches.

Differences from Exim: the delivery is not run under another uid.
``user`` and ``group`` are looked up (an unknown one defers) and give the
owner that ``check_owner`` and ``check_group`` expect and that new files
are given when exim-py runs as root; otherwise files belong to the
daemon's user.  MBX mailboxes (``mbx_format``) are not supported.  The
blocking file work runs in the job's thread pool, and the waits between
locking attempts are timed by the job's clock, not slept; a blocking lock
(``lock_fcntl_timeout``, ``lock_flock_timeout``) is tried every quarter
second until its timeout.  Deliveries inside this process to the same
mailbox are also serialised (POSIX locks cannot tell two threads apart).
"""

from __future__ import annotations

import errno as E
import fcntl
import os
import re
import socket
import stat
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from twisted.internet import defer as tdefer
from twisted.internet import task
from zope.interface import implementer

from twisted_mta.expand.errors import ExpansionError
from twisted_mta.interfaces import ITransport
from twisted_mta.taint import is_tainted
from twisted_mta.transports import common as C
from twisted_mta.transports.common import (
    DeliverySetup,
    Outcome,
    defer,
    expand,
    expand_or_none,
    fail,
    lookup_deferred,
    option_set,
    panic,
    run_blocking,
    set_variable,
)
from twisted_mta.transports.message import (
    HeaderChangeError,
    MessageStream,
    WriteOptions,
    build_headers,
    spool_message_size,
    write_all_to_fd,
)
from twisted_mta.values import split_list

DEFAULT_PREFIX = "From ${if def:return_path{$return_path}{MAILER-DAEMON}} ${tod_bsdinbox}\n"
DEFAULT_WARN_MESSAGE = (
    "To: $local_part@$domain\n"
    "Subject: Your mailbox\n\n"
    "This message is automatically created by mail delivery software (Exim).\n\n"
    "The size of your mailbox has exceeded a warning threshold that is\n"
    "set by the system administrator.\n")
_CREATE = {"anywhere": "anywhere", "belowhome": "belowhome", "inhome": "inhome"}
_NUMBER = re.compile(r"[ \t\n\r\v\f]*[+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?")
_LOCK_POLL = 0.25


@dataclass
class _Quota:
    """What appendfile_transport_setup() works out from the quota options."""

    value: int = 0
    no_check: bool = False
    filecount: int = 0
    filecount_no_check: bool = False
    warn: int = 0
    warn_percent: bool = False
    mailbox_size: int = -1
    mailbox_filecount: int = -1
    use_size_file: bool = False

    @property
    def threshold_check(self) -> bool:
        return self.warn > 0 and (not self.warn_percent or self.value > 0)


@dataclass
class _Delivery:
    """The state of one delivery as it moves between the reactor and the
    worker threads."""

    instance: Any
    job: Any
    setup: DeliverySetup
    path: str
    mode: int
    hostname: str
    message_size: int
    quota: _Quota
    is_directory: bool = False
    fd: int = -1
    lockname: str | None = None
    filename: str | None = None        # as Exim names it in messages
    dataname: str | None = None
    newname: str | None = None
    real_filename: str | None = None   # absolute paths of the same files
    real_dataname: str | None = None
    saved_size: int = -1
    times: tuple[float, float] = (0.0, 0.0)
    is_fifo: bool = False
    file_opened: bool = False
    disable_quota: bool = False
    maildirsize_fd: int = -1
    check_path: str = ""
    mailbox_size: int = -1
    mailbox_filecount: int = -1
    written: int = 0
    tick: tuple[int, int] = (0, 0)
    extra: dict[str, Any] = field(default_factory=dict)


# -- serialising deliveries inside this process -------------------------------------

_mailbox_locks: dict[str, tdefer.DeferredLock] = {}


async def _inprocess_lock(path: str) -> tdefer.DeferredLock:
    lock = _mailbox_locks.get(path)
    if lock is None:
        lock = _mailbox_locks[path] = tdefer.DeferredLock()
    await lock.acquire()
    return lock


def _inprocess_release(path: str, lock: tdefer.DeferredLock) -> None:
    lock.release()
    if not lock.locked and not lock.waiting and _mailbox_locks.get(path) is lock:
        del _mailbox_locks[path]


_tick_lock = threading.Lock()
_last_tick = (0, 0)


def _unique_tick() -> tuple[int, int]:
    """(seconds, microseconds) for a Maildir name, later than any given
    before in this process: Exim makes the name unique by waiting for the
    clock to tick before its delivery process ends."""
    global _last_tick
    with _tick_lock:
        now = time.time_ns() // 1000
        sec, usec = divmod(now, 1_000_000)
        if (sec, usec) <= _last_tick:
            sec, usec = _last_tick
            usec += 1
            if usec >= 1_000_000:
                sec, usec = sec + 1, 0
        _last_tick = (sec, usec)
        return sec, usec


_temp_sequence = 0


def _next_temp() -> int:
    global _temp_sequence
    with _tick_lock:
        _temp_sequence += 1
        return _temp_sequence


# -- the driver ---------------------------------------------------------------------


@implementer(ITransport)
class AppendfileTransport:
    """``driver = appendfile``."""

    name = "appendfile"
    local = True

    async def deliver(self, instance: Any, job: Any) -> None:
        outcome = await C.guard_delivery(instance, self._deliver(instance, job))
        if outcome is None:
            outcome = Outcome(C.OK)
        if outcome.status != "ok" or not any(a.status != "pending" for a in job.addresses):
            outcome.apply(job.addresses)

    async def _deliver(self, instance: Any, job: Any) -> Outcome | None:
        problem = _config_problem(instance)
        if problem is not None:
            return panic(problem)
        setup = await C.start_delivery(instance, job)
        if isinstance(setup, Outcome):
            return setup
        first = job.addresses[0]
        name = instance.name
        file_opt, dir_opt = instance.get("file"), instance.get("directory")
        maildir, mailstore = bool(instance.get("maildir_format")), \
            bool(instance.get("mailstore_format"))
        af_file = first.file_path is not None
        if af_file:
            set_variable(job, "address_file", first.file_path)
        if af_file and file_opt is None and dir_opt is None:
            fdname = "$address_file"
            is_directory = first.file_path.endswith("/") or maildir or mailstore
        else:
            fdname = file_opt if file_opt is not None else dir_opt
            is_directory = file_opt is None
            if fdname is None:
                return panic(f"Mandatory file or directory option missing from {name} "
                             "transport")
        if (maildir or mailstore) and not is_directory:
            which = "dir" if maildir else "store"
            return panic(f'mail{which}_format requires "directory" to be specified for '
                         f"the {name} transport")
        if instance.get("mbx_format") and not is_directory:
            return panic(f"{name} transport: mbx_format is not supported by exim-py")

        try:
            path = await expand(job, str(fdname))
        except ExpansionError as e:
            return panic(f'Expansion of "{fdname}" (file or directory name for {name} '
                         f"transport) failed: {e.message}")
        if not path.startswith("/"):
            return defer(f'appendfile: file or directory name "{path}" is not absolute',
                         C.ERRNO_NOTABSOLUTE)
        if af_file:
            for address in job.addresses:
                address.extra["delivered_file"] = str(path)

        quota = await _setup_quota(instance, job)
        if isinstance(quota, Outcome):
            return quota

        if job.message.dont_deliver:
            return Outcome(C.OK)

        mode = first.extra.get("mode") or int(instance.get("mode"))
        hostname = await job.ctx.expand("$primary_hostname")
        size = await run_blocking(job, spool_message_size, job.message, job.data_path)
        job.ctx.variables.setdefault("message_size", str(size))
        d = _Delivery(instance, job, setup, path, mode, hostname, size, quota,
                      is_directory=is_directory)
        if is_directory:
            return await self._deliver_directory(d, maildir, mailstore)
        return await self._deliver_file(d)

    # -- one mailbox file -------------------------------------------------------

    async def _deliver_file(self, d: _Delivery) -> Outcome | None:
        instance, job, path = d.instance, d.job, d.path
        if path == "/dev/null":
            return Outcome(C.OK)
        create = _create_file(instance)
        deliver_dir = _deliver_dir(instance, d.setup)
        allowed = await run_blocking(job, _check_creation, path, create, deliver_dir)
        if allowed and create == "belowhome" and is_tainted(path):
            path = d.path = str(path)
        if is_tainted(path):
            return _tainted(path, instance)
        d.filename = d.dataname = d.real_filename = d.real_dataname = path

        key = os.path.abspath(path)
        lock = await _inprocess_lock(key)
        try:
            return await self._file_locked(d, allowed)
        finally:
            if d.fd >= 0 or d.lockname is not None:
                await run_blocking(job, _close_file, d)
            _inprocess_release(key, lock)

    async def _file_locked(self, d: _Delivery, allowed: bool) -> Outcome | None:
        instance, job, path = d.instance, d.job, d.path
        if instance.get("create_directory") and allowed:
            problem = await run_blocking(job, _make_parent, path,
                                         int(instance.get("directory_mode")))
            if problem is not None:
                return problem

        if instance.get("file_format"):
            other = await run_blocking(job, _check_format_of_path, path, instance)
            if isinstance(other, Outcome):
                return other
            if other is not None and other != instance.name:
                return await _pass_to(other, instance, job)

        retries = max(1, int(instance.get("lock_retries")))
        interval = float(instance.get("lock_interval"))
        use_fcntl, use_flock, use_lockfile = _locking(instance)
        if use_lockfile:
            outcome = await self._make_lockfile(d, retries, interval)
            if outcome is not None:
                return outcome
        outcome = await self._open_and_lock(d, retries, interval, use_fcntl, use_flock)
        if outcome is not None:
            return outcome
        outcome = await run_blocking(job, _finish_open, d)
        if outcome is not None:
            return outcome

        d.mailbox_size = d.quota.mailbox_size if d.quota.mailbox_size >= 0 else d.saved_size
        d.mailbox_filecount = 0
        return await self._write(d)

    async def _make_lockfile(self, d: _Delivery, retries: int,
                             interval: float) -> Outcome | None:
        lockname = f"{d.path}.lock"
        stamp = int(time.time()) & 0xFFFFFFFF
        hitch = f"{lockname}.{d.hostname}.{stamp:08x}.{os.getpid():08x}"
        mode = int(d.instance.get("lockfile_mode"))
        timeout = int(d.instance.get("lockfile_timeout"))
        for attempt in range(retries):
            result = await run_blocking(d.job, _try_lockfile, lockname, hitch, mode, timeout)
            if isinstance(result, Outcome):
                return result
            if result:
                d.lockname = lockname
                return None
            if attempt + 1 < retries:
                await _sleep(d.job, interval)
        return defer(f"failed to lock mailbox {d.path} (lock file)", C.ERRNO_LOCKFAILED)

    async def _open_and_lock(self, d: _Delivery, retries: int, interval: float,
                             use_fcntl: bool, use_flock: bool) -> Outcome | None:
        instance = d.instance
        fcntl_timeout = int(instance.get("lock_fcntl_timeout")) if use_fcntl else 0
        flock_timeout = int(instance.get("lock_flock_timeout")) if use_flock else 0
        blocking = max(fcntl_timeout, flock_timeout)
        use_lstat = True
        i = 0
        while i < retries:
            result = await run_blocking(d.job, _open_mailbox, d, use_lstat)
            if isinstance(result, Outcome):
                return result
            if result == "symlink":
                use_lstat = False
                continue
            if result == "again":
                use_lstat = True
                i += 1
                continue
            # The file is open: lock it.
            if not (use_fcntl or use_flock):
                return None
            timed_out = False
            deadline = d.job.clock.seconds() + blocking
            while True:
                if await run_blocking(d.job, _apply_lock, d.fd, use_fcntl, use_flock):
                    return None
                if blocking <= 0 or d.job.clock.seconds() >= deadline:
                    timed_out = blocking > 0
                    break
                await _sleep(d.job, _LOCK_POLL)
            await run_blocking(d.job, _close_fd, d)
            use_lstat = True
            if timed_out and (i + 1) * blocking >= retries * interval:
                i = retries
                break
            i += 1
            if i < retries and not blocking:
                await _sleep(d.job, interval)
        if not d.file_opened:
            return defer(f"mailbox {d.path}: existence unclear", C.ERRNO_EXISTRACE,
                         special_action="freeze")
        return defer(f"failed to lock mailbox {d.path} (fcntl/flock)", C.ERRNO_LOCKFAILED)

    # -- a new file in a directory ------------------------------------------------

    async def _deliver_directory(self, d: _Delivery, maildir: bool,
                                 mailstore: bool) -> Outcome | None:
        instance, job, path = d.instance, d.job, d.path
        name = instance.name
        create = _create_file(instance)
        if not await run_blocking(job, _check_creation, path + "/any", create,
                                  _deliver_dir(instance, d.setup)):
            return defer(f"tried to create file in {path}, but file creation outside the "
                         "home directory is not permitted", C.ERRNO_BADCREATE)
        if is_tainted(path):
            if create != "belowhome":
                return _tainted(path, instance)
            path = d.path = str(path)
        d.check_path = path
        quota = d.quota

        size_regex = None
        if quota.value > 0 or quota.threshold_check or quota.use_size_file:
            text = instance.get("quota_size_regex")
            if text:
                compiled = _compile_regex(text)
                if isinstance(compiled, Outcome):
                    return compiled
                size_regex = compiled
            qdir = instance.get("quota_directory")
            if qdir is not None:
                try:
                    d.check_path = await expand(job, str(qdir))
                except ExpansionError as e:
                    return panic(f'Expansion of "{qdir}" (quota_directory name for {name} '
                                 f"transport) failed: {e.message}")
                if not d.check_path.startswith("/"):
                    return defer(f'appendfile: quota_directory name "{d.check_path}" is not '
                                 "absolute", C.ERRNO_NOTABSOLUTE)
        if maildir:
            problem = await run_blocking(job, _maildir_ensure_directories, path,
                                         bool(instance.get("create_directory")),
                                         int(instance.get("directory_mode")),
                                         instance.get("maildirfolder_create_regex"),
                                         (d.setup.uid, d.setup.gid))
            if problem is not None:
                return problem
            if (quota.value > 0 or quota.threshold_check or quota.use_size_file) and \
                    instance.get("quota_directory") is None:
                d.check_path = await run_blocking(job, _maildirfolder_parent, path)

        d.mailbox_size, d.mailbox_filecount = quota.mailbox_size, quota.mailbox_filecount
        dir_regex = None
        if maildir and quota.use_size_file:
            text = instance.get("maildir_quota_directory_regex")
            if text:
                compiled = _compile_regex(text)
                if isinstance(compiled, Outcome):
                    return compiled
                dir_regex = compiled
                if path.startswith(d.check_path):
                    rest = path[len(d.check_path):].lstrip("/")
                    rest = f"{rest}/new" if rest else "new"
                    if not dir_regex.search(rest.encode("latin-1")):
                        d.disable_quota = True
            if not d.disable_quota:
                result = await run_blocking(job, _maildir_ensure_sizefile, d.check_path,
                                            quota, size_regex, dir_regex, d.message_size,
                                            bool(instance.get("quota_is_inclusive")),
                                            d.hostname, int(instance.get("mode")))
                if isinstance(result, Outcome):
                    return result
                d.maildirsize_fd, size, count = result
                if d.mailbox_size < 0:
                    d.mailbox_size = size
                if d.mailbox_filecount < 0:
                    d.mailbox_filecount = count
        try:
            return await self._directory_files(d, maildir, mailstore, size_regex)
        finally:
            if d.maildirsize_fd >= 0:
                await run_blocking(job, _close_sizefile, d)

    async def _directory_files(self, d: _Delivery, maildir: bool, mailstore: bool,
                               size_regex: re.Pattern[bytes] | None) -> Outcome | None:
        instance, job, quota = d.instance, d.job, d.quota
        name = instance.name
        if not d.disable_quota and (quota.value > 0 or quota.threshold_check) and \
                (d.mailbox_size < 0 or (d.mailbox_filecount < 0 and quota.filecount > 0)):
            size, count = await run_blocking(job, _check_dir_size, d.check_path, size_regex)
            if d.mailbox_size < 0:
                d.mailbox_size = size
            if d.mailbox_filecount < 0:
                d.mailbox_filecount = count

        create_dirs = bool(instance.get("create_directory"))
        dirmode = int(instance.get("directory_mode"))
        try:
            if maildir:
                tag = instance.get("maildir_tag")
                if tag is not None:
                    try:
                        await expand_or_none(job, str(tag))
                    except ExpansionError as e:
                        return panic(f'Expansion of "{tag}" (maildir_tag for {name} transport) '
                                     f"failed: {e.message}")
                retries = max(1, int(instance.get("maildir_retries")))
                for attempt in range(1, retries + 1):
                    result = await run_blocking(job, _maildir_open, d, attempt, retries)
                    if result is True:
                        break
                    if isinstance(result, Outcome):
                        return result
                    await _sleep(job, 2)
            elif mailstore:
                outcome = await self._mailstore_envelope(d, create_dirs, dirmode)
                if outcome is not None:
                    return outcome
            else:
                outcome = await run_blocking(job, _smail_open, d, create_dirs, dirmode)
                if outcome is not None:
                    return outcome
            outcome = await run_blocking(job, _set_perms, d, d.real_filename, d.filename,
                                         "while setting perms on file %s")
            if outcome is not None:
                return outcome
            outcome = await self._write(d)
            if outcome is not None and outcome.status != C.OK:
                return outcome
            return await self._rename(d, maildir, mailstore, outcome)
        finally:
            await run_blocking(job, _discard_directory_files, d)

    async def _mailstore_envelope(self, d: _Delivery, create_dirs: bool,
                                  dirmode: int) -> Outcome | None:
        instance, job = d.instance, d.job
        base = f"{d.path}/{job.message.id}-{_base62(os.getpid())}"
        if await run_blocking(job, _mailstore_taken, base):
            base += f"-{_next_temp()}"     # another delivery of this message here
        job.ctx.variables["mailstore_basename"] = base
        d.filename = d.real_filename = f"{base}.tmp"
        d.newname = f"{base}.env"
        d.dataname = d.real_dataname = f"{base}.msg"
        texts = []
        for option, what in (("mailstore_prefix", "prefix"), ("mailstore_suffix", "suffix")):
            raw = instance.get(option)
            text = None
            if raw is not None:
                try:
                    text = await expand_or_none(job, str(raw))
                except ExpansionError as e:
                    texts.append(panic(f'Expansion of "{raw}" (mailstore {what} for '
                                       f"{instance.name} transport) failed: {e.message}"))
                    continue
                if text is not None and not text.endswith("\n"):
                    text += "\n"
            texts.append(text)
        lines = [job.message.sender + "\n"]
        for address in job.addresses:
            lines.append(f"{_rcpt_local_part(address)}@{address.domain}\n")
        return await run_blocking(job, _mailstore_write_envelope, d, texts, lines,
                                  create_dirs, dirmode)

    # -- writing (both kinds) -------------------------------------------------------

    async def _write(self, d: _Delivery) -> Outcome | None:
        """The quota check, then prefix, message and suffix; the Outcome
        of a failure (the file is then truncated back), or None."""
        instance, job, quota = d.instance, d.job, d.quota
        failure: Outcome | None = None
        filecount_msg = ""
        if not d.disable_quota and quota.value > 0:
            inclusive = bool(instance.get("quota_is_inclusive"))
            if d.mailbox_size + (d.message_size if inclusive else 0) > quota.value \
                    and not quota.no_check:
                failure = Outcome(C.DEFER, None, C.ERRNO_EXIMQUOTA)
            if quota.filecount > 0 and not quota.filecount_no_check and \
                    d.mailbox_filecount + (1 if inclusive else 0) > quota.filecount:
                failure = Outcome(C.DEFER, None, C.ERRNO_EXIMQUOTA)
                filecount_msg = " filecount"

        stream = None
        if failure is None:
            failure, stream = await self._prepare_stream(d)
        if failure is None and stream is not None:
            failure = await run_blocking(job, _write_stream, d, stream)
        if failure is None:
            d.written = stream.count if stream is not None else 0
            job.ctx.variables["message_size"] = str(d.written)
            job.ctx.variables["message_linecount"] = \
                str(max(0, (stream.newlines if stream else 0) - 1))
            if not d.disable_quota and d.maildirsize_fd >= 0:
                await run_blocking(job, _maildir_record_length, d.maildirsize_fd, d.written)
            if not d.disable_quota and quota.threshold_check:
                threshold = quota.warn
                if quota.warn_percent:
                    threshold = int(quota.value * threshold / 100)
                if d.mailbox_size <= threshold < d.mailbox_size + d.written:
                    d.extra["quota_warn_message"] = instance.get("quota_warn_message") \
                        or DEFAULT_WARN_MESSAGE
                    return Outcome(C.OK, special_action="warn", extra=d.extra)
            return None

        if failure.errno == C.ERRNO_EXIMQUOTA or failure.errno in (E.EDQUOT, E.ENOSPC):
            failure.more_errno = await run_blocking(job, _time_since_read, d)
        if failure.errno == E.EDQUOT:
            failure.message = "mailbox is full"
            failure.user_message = "mailbox is full"
            failure.retry_error = "quota"
        elif failure.errno == C.ERRNO_EXIMQUOTA:
            failure.message = (f"mailbox is full (MTA-imposed{filecount_msg} quota exceeded "
                               f"while writing to {d.dataname})")
            failure.user_message = "mailbox is full"
            failure.retry_error = "quota"
        elif failure.errno == C.ERRNO_WRITEINCOMPLETE:
            failure.message = f"failed to write data block while writing to {d.dataname}"
        elif failure.message is None:
            failure.message = f"error while writing to {d.dataname}"
        if not d.is_directory and d.fd >= 0:
            await run_blocking(job, _truncate, d)
        return failure

    async def _prepare_stream(self, d: _Delivery) -> tuple[Outcome | None,
                                                            MessageStream | None]:
        instance, job = d.instance, d.job
        bsmtp = bool(instance.get("use_bsmtp"))
        crlf = bool(instance.get("use_crlf"))
        plain_file = not d.is_directory and not instance.get("maildir_format") \
            and not instance.get("mailstore_format")
        prefix_opt = _string_option(instance, "message_prefix",
                                    DEFAULT_PREFIX if plain_file and not bsmtp else None)
        suffix_opt = _string_option(instance, "message_suffix",
                                    "\n" if plain_file and not bsmtp else None)
        if bsmtp:
            check, escape = ".", ".."
        else:
            check = _string_option(instance, "check_string",
                                   "From " if plain_file else None)
            escape = _string_option(instance, "escape_string",
                                    ">From " if plain_file else None)
        before = await _expand_affix(job, instance, "prefix", prefix_opt)
        if isinstance(before, Outcome):
            return before, None
        if bsmtp:
            cr = "\r" if crlf else ""
            before += f"MAIL FROM:<{d.setup.return_path}>{cr}\n"
            for address in job.addresses:
                target = address.parent if (address.file_path is not None
                                            or address.pipe_command is not None) \
                    and address.parent is not None else address
                rcpt = rcpt_address(target, bool(instance.get("rcpt_include_affixes")))
                before += f"RCPT TO:<{rcpt}>{cr}\n"
            before += f"DATA{cr}\n"
        options = WriteOptions.from_instance(
            instance, use_crlf=crlf, escape_headers=bsmtp,
            check_string=check if escape is not None else None, escape_string=escape)
        try:
            headers = await build_headers(job, instance, options, d.setup.return_path)
        except HeaderChangeError as e:
            if e.routing is not None:
                return Outcome(C.DEFER, e.routing, C.ERRNO_CHHEADER_FAIL), None
            return Outcome(C.PANIC, f"failed to expand headers_add or headers_remove while "
                           f"writing to {d.dataname}: {e.message}",
                           C.ERRNO_CHHEADER_FAIL), None
        after = await _expand_affix(job, instance, "suffix", suffix_opt)
        if isinstance(after, Outcome):
            return after, None
        if bsmtp:
            after += ".\r\n" if crlf else ".\n"
        stream = MessageStream(headers, job.data_path, options,
                               wireformat=bool(job.message.wireformat),
                               before=before.encode("latin-1"), after=after.encode("latin-1"))
        return None, stream

    async def _rename(self, d: _Delivery, maildir: bool, mailstore: bool,
                      warned: Outcome | None) -> Outcome | None:
        """Close the new file and give it its final name."""
        instance, job = d.instance, d.job
        closed = await run_blocking(job, _close_new_file, d)
        if isinstance(closed, Outcome):
            return closed
        inode = closed
        if d.newname is None:
            template = str(instance.get("directory_file"))
            old_leaf = ""
            for attempt in range(5):
                job.ctx.variables["inode"] = str(inode)
                try:
                    leaf = await expand(job, template)
                except ExpansionError as e:
                    return panic(f'Expansion of "{template}" (directory_file for '
                                 f"{instance.name} transport) failed: {e.message}")
                finally:
                    job.ctx.variables.pop("inode", None)
                target = f"{d.path}/{leaf}"
                result = await run_blocking(job, _link_new, d, target)
                if result is None:
                    return warned
                if result != E.EEXIST or attempt >= 4 or leaf == old_leaf:
                    return defer(f"while renaming {d.filename} as {target}", result)
                old_leaf = leaf
                await _sleep(job, 1)
            return None
        target = d.newname
        tag = instance.get("maildir_tag") if maildir else None
        if tag is not None:
            try:
                text = await expand_or_none(job, str(tag))
            except ExpansionError:
                text = None
            if text is not None:
                target = d.newname + _clean_tag(text)
        result = await run_blocking(job, _rename_new, d, target,
                                    d.newname if tag is not None else None)
        if isinstance(result, Outcome):
            return result
        return warned


# -- configuration ------------------------------------------------------------------


def _config_problem(instance: Any) -> str | None:
    """The checks appendfile_transport_init() makes when Exim starts."""
    name = instance.name
    if instance.get("file") is not None and instance.get("directory") is not None:
        return f'{name} transport:\n  only one of "file" or "directory" can be specified'
    if instance.get("file") is not None:
        for option in ("quota_filecount", "quota_directory"):
            if instance.get(option) is not None:
                return f'{name} transport:\n  {option} must not be set without "directory"'
    if not any(_locking(instance)):
        return f"{name} transport:\n  no locking configured"
    if instance.get("directory") is not None:
        if instance.get("maildir_format") and instance.get("mailstore_format"):
            return f"{name} transport:\n  only one of maildir and mailstore may be specified"
        for option in ("quota_filecount", "quota_directory"):
            if instance.get(option) is not None and instance.get("quota") is None:
                return f"{name} transport:\n  quota must be set if {option} is set"
    create = instance.get("create_file")
    if create and _create_file(instance) is None:
        return (f'invalid value given for "create_file" for the {name} transport: '
                f"'{create}'")
    if instance.get("body_only") and instance.get("headers_only"):
        return f"{name} transport: body_only and headers_only are mutually exclusive"
    return None


def _locking(instance: Any) -> tuple[bool, bool, bool]:
    """(use_fcntl, use_flock, use_lockfile): flock turns the fcntl default
    off unless fcntl was set explicitly."""
    use_flock = bool(instance.get("use_flock_lock"))
    use_fcntl = bool(instance.get("use_fcntl_lock"))
    if use_flock and not option_set(instance, "use_fcntl_lock"):
        use_fcntl = False
    return use_fcntl, use_flock, bool(instance.get("use_lockfile"))


def _create_file(instance: Any) -> str | None:
    text = instance.get("create_file") or "anywhere"
    if text.startswith("/"):
        return "belowhome"
    return _CREATE.get(text)


def _deliver_dir(instance: Any, setup: DeliverySetup) -> str | None:
    text = instance.get("create_file") or ""
    return text if text.startswith("/") else setup.home


def _string_option(instance: Any, name: str, default: str | None) -> str | None:
    """A string option whose default depends on the kind of delivery (the
    option tables give the mbox defaults)."""
    return instance.options[name] if name in instance.options else default


async def _expand_affix(job: Any, instance: Any, which: str, text: str | None) -> str | Outcome:
    """``message_prefix`` or ``message_suffix`` (*which*: "prefix" or
    "suffix") expanded; empty when unset; a failed expansion defers."""
    if not text:
        return ""
    try:
        return await expand(job, text)
    except ExpansionError:
        return Outcome(C.DEFER, f'Expansion of "{text}" ({which} for {instance.name} '
                       "transport) failed", C.ERRNO_EXPANDFAIL)


def _compile_regex(text: str) -> re.Pattern[bytes] | Outcome:
    """A regex option (``quota_size_regex``, ``maildir_quota_directory_regex``,
    ``maildirfolder_create_regex``) compiled, or the deferral Exim gives
    for a bad one."""
    try:
        return re.compile(text.encode("latin-1"))
    except re.error as e:
        return defer(f"appendfile: regular expression error: {e.msg} at offset "
                     f"{e.pos or 0} while compiling {text}")


def _tainted(path: str, instance: Any) -> Outcome:
    return panic(f"Tainted '{path}' (file or directory name for {instance.name} transport) "
                 "not permitted")


async def _setup_quota(instance: Any, job: Any) -> _Quota | Outcome:
    """appendfile_transport_setup(): expand and read the quota options."""
    quota = _Quota()
    use_size = instance.get("maildir_use_size_file")
    if isinstance(use_size, str):
        try:
            value = await expand(job, use_size)
            quota.use_size_file = bool(value) and value != "0" and \
                value.lower() not in ("no", "false")
        except ExpansionError:
            quota.use_size_file = False
    else:
        quota.use_size_file = bool(use_size)
    options = ("quota", "quota_filecount", "quota_warn_threshold", "mailbox_size",
               "mailbox_filecount")
    for i, option in enumerate(options):
        raw = instance.get(option)
        number = 0.0 if i < 3 else -1.0
        no_check = False
        percent = False
        if raw is not None:
            try:
                text = await expand(job, str(raw))
            except ExpansionError as e:
                message = f'Expansion of "{raw}" in {instance.name} transport failed: ' \
                    f"{e.message}"
                return defer(message) if lookup_deferred(e) else fail(message)
            m = _NUMBER.match(text)
            number, rest = (float(m.group()), text[m.end():]) if m else (0.0, text)
            suffix = rest[:1].lower()
            if suffix in ("k", "m", "g"):
                number *= {"k": 1024.0, "m": 1024.0 ** 2, "g": 1024.0 ** 3}[suffix]
                rest = rest[1:]
            elif rest[:1] == "%" and i == 2:
                if quota.value <= 0 and not quota.use_size_file:
                    number = 0.0
                elif int(number) < 0 or int(number) > 100:
                    return fail(f"Invalid quota_warn_threshold percentage ({int(number)}) "
                                f"for {instance.name} transport")
                percent = True
                rest = rest[1:]
            if i < 2 and rest.startswith("/no_check"):
                no_check = True
                rest = rest[9:]
            if rest.strip(" \t\n\r\v\f"):
                return fail(f'Malformed value "{text}" (expansion of "{raw}") in '
                            f"{instance.name} transport")
        if i in (1, 4) and number >= 2.0 * 1024 ** 3:
            return fail(f"{option} value {number:.10g} is too large (overflow) in "
                        f"{instance.name} transport")
        value = int(number)
        if i == 0:
            quota.value, quota.no_check = value, no_check
        elif i == 1:
            quota.filecount, quota.filecount_no_check = value, no_check
        elif i == 2:
            quota.warn, quota.warn_percent = value, percent
        elif i == 3:
            quota.mailbox_size = value
        else:
            quota.mailbox_filecount = value
    return quota


def _check_creation(filename: str, create: str | None, deliver_dir: str | None) -> bool:
    """check_creation(): whether ``create_file`` lets a file be made here."""
    if not deliver_dir or create in (None, "anywhere"):
        return True
    file = filename
    while file.startswith("//"):
        file = file[1:]
    n = len(deliver_dir)
    if not file.startswith(deliver_dir) or file[n:n + 1] != "/":
        return False
    if "/" in file[n + 2:] and (create != "belowhome" or "/../" in file[n:]):
        return False
    if create == "belowhome":
        # The real path of the longest existing part must be inside home.
        probe = file
        real = None
        while real is None:
            slash = probe.rfind("/")
            if slash <= 0:
                break
            probe = probe[:slash]
            if os.path.exists(probe):
                real = os.path.realpath(probe)
        if real is not None:
            home = os.path.realpath(deliver_dir) if os.path.exists(deliver_dir) \
                else deliver_dir
            length = min(len(real), len(home))
            if real[:length] != home[:length]:
                return False
    return True


def rcpt_address(address: Any, include_affixes: bool) -> str:
    """transport_rcpt_address(): the address without its local part
    prefix and suffix unless *include_affixes*."""
    if include_affixes or (not address.prefix and not address.suffix):
        return address.address
    return f"{_rcpt_local_part(address)}@{address.domain}"


def _rcpt_local_part(address: Any) -> str:
    local = address.local_part
    if address.prefix and local.startswith(address.prefix):
        local = local[len(address.prefix):]
    if address.suffix and local.endswith(address.suffix):
        local = local[:len(local) - len(address.suffix)]
    return local


def _clean_tag(text: str) -> str:
    """A maildir_tag as Exim uses it: printing characters other than
    ``/``, with a colon in front when it starts with a letter or digit."""
    out = []
    for c in text:
        if 33 <= ord(c) <= 126 and c != "/":
            if not out and c.isascii() and c.isalnum():
                out.append(":")
            out.append(c)
    return "".join(out)


def _base62(n: int) -> str:
    chars = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
    out = ""
    for _ in range(6):
        n, r = divmod(n, 62)
        out = chars[r] + out
    return out


async def _sleep(job: Any, seconds: float) -> None:
    if seconds > 0:
        await task.deferLater(job.clock, seconds, lambda: None)


async def _pass_to(transport_name: str, instance: Any, job: Any) -> Outcome | None:
    """file_format chose another transport: deliver with it instead."""
    config = job.config
    other = config.transport(transport_name) if config is not None else None
    from twisted_mta.transports import drivers

    driver = drivers().get(other.driver or "") if other is not None else None
    if other is None or driver is None:
        return defer(f"{transport_name} transport not found", C.ERRNO_BADTRANSPORT)
    for address in job.addresses:
        address.transport = other.name
    await driver.deliver(other, job)
    return None


# -- blocking work (worker threads) -------------------------------------------------


def _make_parent(path: str, mode: int) -> Outcome | None:
    parent = path[:path.rfind("/")]
    try:
        _directory_make(parent, mode)
    except OSError as e:
        return defer(f"failed to create directories for {path}: {os.strerror(e.errno or 0)}",
                     e.errno or 0)
    return None


def _directory_make(path: str, mode: int, owner: tuple[int, int] | None = None) -> None:
    """directory_make(): create the missing directories of *path*, each
    with *mode* (umask ignored, as Exim runs with umask 0), owned by the
    delivery's user when we run as root (Exim creates them as that user)."""
    if is_tainted(path):
        raise OSError(E.EACCES, "tainted")
    pos = 1
    while pos <= len(path):
        slash = path.find("/", pos)
        if slash < 0:
            slash = len(path)
        part = path[:slash]
        if part and not os.path.exists(part):
            try:
                os.mkdir(part, mode)
                os.chmod(part, mode)
                if owner is not None and os.geteuid() == 0:
                    os.chown(part, *owner)
            except FileExistsError:
                pass
        pos = slash + 1


def _check_format_of_path(path: str, instance: Any) -> str | Outcome | None:
    """check_file_format() on an existing file: the transport to use."""
    try:
        with open(path, "rb") as f:
            data = f.read(256)
    except OSError:
        return None
    if not data:
        return None
    items = split_list(str(instance.get("file_format")))
    for i in range(0, len(items), 2):
        text = items[i].encode("latin-1")
        target = items[i + 1] if i + 1 < len(items) else None
        if data.startswith(text) and target is not None:
            return target
    return defer("mailbox file format unrecognized", C.ERRNO_FORMATUNKNOWN)


def _try_lockfile(lockname: str, hitch: str, mode: int, timeout: int) -> bool | Outcome:
    try:
        hd = os.open(hitch, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    except OSError as e:
        return defer(f"creating lock file hitching post {hitch} (euid={os.geteuid()} "
                     f"egid={os.getegid()})", e.errno or 0)
    nlink = 0
    try:
        os.link(hitch, lockname)
        linked = True
    except OSError:
        linked = False
        nlink = os.fstat(hd).st_nlink
    os.close(hd)
    try:
        os.unlink(hitch)
    except OSError:
        pass
    if linked or nlink == 2:
        return True
    if timeout > 0:
        try:
            st = os.stat(lockname)
            if time.time() - st.st_ctime > timeout:
                os.unlink(lockname)
        except OSError:
            pass
    return False


def _open_mailbox(d: _Delivery, use_lstat: bool) -> str | Outcome:
    """One pass of Exim's open loop: "ok" (d.fd is open), "again" (the
    file came or went: go round again), "symlink" (follow it), or the
    Outcome of an error."""
    instance, filename, mode = d.instance, d.path, d.mode
    d.file_opened = False
    try:
        st = os.lstat(filename) if use_lstat else os.stat(filename)
    except FileNotFoundError as e:
        if instance.get("file_must_exist"):
            return defer(f"mailbox {filename} does not exist, but file_must_exist is set",
                         e.errno)
        if not _check_creation(filename, _create_file(instance),
                               _deliver_dir(instance, d.setup)):
            return defer(f"mailbox {filename} does not exist, but creation outside the home "
                         "directory is not permitted", C.ERRNO_BADCREATE)
        flags = os.O_RDWR | os.O_APPEND | os.O_CREAT | (os.O_EXCL if use_lstat else 0)
        try:
            d.fd = os.open(filename, flags, mode)
        except OSError as e2:
            if e2.errno == E.EEXIST:
                return "again"
            out = defer(f"while creating mailbox {filename}", e2.errno or 0)
            if d.job.addresses[0].file_path is not None and \
                    e2.errno in (E.EPERM, E.ENOENT, E.EACCES):
                out.status = C.FAIL
            return out
        outcome = _set_perms(d, filename, filename, "while setting perms on mailbox %s")
        if outcome is not None:
            outcome.status = C.FAIL
            return outcome
        d.file_opened = True
        d.is_fifo = False
        return "ok"
    except OSError as e:
        return defer(f"attempting to stat mailbox {filename}", e.errno or 0)

    uid, gid = d.setup.uid, d.setup.gid
    oldmode = st.st_mode
    inode = st.st_ino
    islink = stat.S_ISLNK(oldmode)
    link_text = " (symlink)" if islink else ""
    d.is_fifo = False
    if instance.get("check_owner") and st.st_uid != uid:
        return defer(f"mailbox {filename}{link_text} has wrong uid ({st.st_uid} != {uid})",
                     C.ERRNO_BADUGID)
    if instance.get("check_group") and st.st_gid != gid:
        return defer(f"mailbox {filename}{link_text} has wrong gid ({st.st_gid} != {gid})",
                     C.ERRNO_BADUGID)
    if st.st_nlink != 1:
        return defer(f"mailbox {filename}{link_text} has too many links ({st.st_nlink})",
                     C.ERRNO_NOTREGULAR)
    if islink and instance.get("allow_symlink"):
        return "symlink"
    if instance.get("allow_fifo") and stat.S_ISFIFO(oldmode):
        d.is_fifo = True
    elif not stat.S_ISREG(oldmode):
        fifo = " or named pipe" if instance.get("allow_fifo") else ""
        return defer(f"mailbox {filename} is not a regular file{fifo}", C.ERRNO_NOTREGULAR)
    perms = oldmode & 0o7777
    if perms != mode:
        diffs = perms ^ mode
        if d.job.addresses[0].extra.get("mode") or (diffs & perms) == diffs:
            try:
                os.chmod(filename, mode)
            except OSError as e:
                return defer(f"attempting to chmod mailbox {filename}", e.errno or 0)
            perms = mode
        elif instance.get("mode_fail_narrower"):
            return defer(f"mailbox {filename} has the wrong mode {perms:o} ({mode:o} expected)",
                         C.ERRNO_BADMODE)
    flags = (os.O_WRONLY | os.O_NDELAY) if d.is_fifo else (os.O_RDWR | os.O_APPEND)
    try:
        d.fd = os.open(filename, flags, mode)
    except OSError as e:
        if e.errno == E.ENOENT:
            return "again"
        if d.is_fifo:
            return defer(f"while opening named pipe {filename} (could mean no process is "
                         "reading it)", e.errno or 0)
        return defer(f"while opening mailbox {filename}", e.errno or 0)
    st2 = os.fstat(d.fd)
    if st2.st_ino != inode:
        return defer(f"opened mailbox {filename} inode number changed from {inode} to "
                     f"{st2.st_ino}", C.ERRNO_INODECHANGED, special_action="freeze")
    if (not d.is_fifo and not stat.S_ISREG(st2.st_mode)) or \
            (d.is_fifo and not stat.S_ISFIFO(st2.st_mode)):
        kind = "named pipe" if d.is_fifo else "regular file"
        return defer(f"opened mailbox {filename} is no longer a {kind}", C.ERRNO_NOTREGULAR,
                     special_action="freeze")
    if (instance.get("check_owner") and st2.st_uid != uid) or \
            (instance.get("check_group") and st2.st_gid != gid):
        return defer(f"opened mailbox {filename} has wrong uid or gid", C.ERRNO_BADUGID,
                     special_action="freeze")
    if st2.st_mode & 0o7777 != perms:
        return defer(f"opened mailbox {filename} has wrong mode {st2.st_mode & 0o7777:o} "
                     f"({mode:o} expected)", C.ERRNO_BADMODE, special_action="freeze")
    if instance.get("file_format"):
        found = _check_format_of_path(filename, instance)
        if found is not None and found != instance.name:
            return defer("open mailbox has changed format", C.ERRNO_FORMATUNKNOWN)
    d.file_opened = True
    return "ok"


def _apply_lock(fd: int, use_fcntl: bool, use_flock: bool) -> bool:
    """apply_lock() without blocking: True when every lock asked for is held."""
    try:
        if use_fcntl:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        if use_flock:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        return False
    return True


def _finish_open(d: _Delivery) -> Outcome | None:
    """Note the locked mailbox's times and size (to restore them if the
    delivery fails)."""
    try:
        st = os.fstat(d.fd)
    except OSError as e:
        return defer(f"while fstatting opened mailbox {d.path}", e.errno or 0)
    d.times = (st.st_atime, st.st_mtime)
    d.saved_size = st.st_size
    return None


def _close_fd(d: _Delivery) -> None:
    if d.fd >= 0:
        os.close(d.fd)
        d.fd = -1


def _close_file(d: _Delivery) -> None:
    """End of a mailbox delivery: close (dropping the locks), then remove
    the lock file."""
    _close_fd(d)
    if d.lockname is not None:
        try:
            os.unlink(d.lockname)
        except OSError:
            pass
        d.lockname = None


def _write_stream(d: _Delivery, stream: MessageStream) -> Outcome | None:
    """Write the message to d.fd and sync it; for a mailbox, restore its
    access time and notify comsat."""
    try:
        write_all_to_fd(stream, d.fd)
        if not d.is_fifo:
            os.fsync(d.fd)
    except OSError as e:
        return Outcome(C.DEFER, None, e.errno or C.ERRNO_WRITEINCOMPLETE)
    if not d.is_directory:
        try:
            os.utime(d.path, (d.times[0], time.time()))
        except OSError:
            pass
        if d.instance.get("notify_comsat"):
            local_part = d.job.ctx.variables.get("local_part")
            if local_part:
                _notify_comsat(str(local_part), d.saved_size)
    return None


def _truncate(d: _Delivery) -> None:
    try:
        os.ftruncate(d.fd, max(0, d.saved_size))
        os.utime(d.path, d.times)
    except OSError:
        pass


def _time_since_read(d: _Delivery) -> int:
    if not d.is_directory:
        return int(time.time() - d.times[0])
    if d.instance.get("maildir_format"):
        try:
            return int(time.time() - os.stat(os.path.join(d.path, "new")).st_mtime)
        except OSError:
            return 0
    return 0


def _notify_comsat(user: str, offset: int) -> None:
    try:
        port = socket.getservbyname("biff", "udp")
    except OSError:
        return
    message = f"{user[:200]}@{offset}\n\0".encode("latin-1", "replace")
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.sendto(message, ("127.0.0.1", port))
    except OSError:
        pass


def _set_perms(d: _Delivery, real: str | None, shown: str | None,
               text: str) -> Outcome | None:
    """Give a new file the delivery's owner (when running as root) and mode."""
    assert real is not None
    try:
        if os.geteuid() == 0:
            os.chown(real, d.setup.uid, d.setup.gid)
        os.chmod(real, d.mode)
    except OSError as e:
        return defer(text % shown, e.errno or 0)
    return None


def _smail_open(d: _Delivery, create_dirs: bool, dirmode: int) -> Outcome | None:
    name = f"{d.path}/temp.{os.getpid()}.{_next_temp()}.{d.hostname}"
    d.filename = d.dataname = d.real_filename = d.real_dataname = name
    try:
        d.fd = os.open(name, os.O_WRONLY | os.O_CREAT, d.mode)
        return None
    except OSError as e:
        if e.errno != E.ENOENT or not create_dirs:
            return defer(f"while creating file {name}", e.errno or 0)
    try:
        _directory_make(d.path, dirmode, (d.setup.uid, d.setup.gid))
        d.fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, d.mode)
    except OSError as e:
        return defer(f"while creating file {name}", e.errno or 0)
    return None


def _maildir_open(d: _Delivery, attempt: int, retries: int) -> bool | Outcome:
    sec, usec = _unique_tick()
    basename = f"{sec}.M{usec}P{os.getpid()}.{d.hostname}"
    d.filename = d.dataname = f"tmp/{basename}"
    d.newname = f"new/{basename}"
    d.real_filename = d.real_dataname = f"{d.path}/tmp/{basename}"
    error = E.EEXIST
    if not os.path.lexists(d.real_filename):
        try:
            d.fd = os.open(d.real_filename, os.O_WRONLY | os.O_CREAT | os.O_EXCL, d.mode)
            outcome = _set_perms(d, d.real_filename, d.filename,
                                 "while setting perms on maildir %s")
            return True if outcome is None else outcome
        except OSError as e:
            error = e.errno or 0
    if attempt >= retries:
        out = defer(f"failed to open {d.filename} ({attempt} tr{'y' if attempt == 1 else 'ies'})",
                    error)
        if error in (E.EDQUOT, E.ENOSPC):
            out.user_message = "mailbox is full"
        d.filename = d.real_filename = None
        return out
    d.filename = d.real_filename = None
    return False


def _mailstore_taken(base: str) -> bool:
    return any(os.path.lexists(base + ext) for ext in (".tmp", ".env", ".msg"))


def _mailstore_write_envelope(d: _Delivery, texts: list[Any], lines: list[str],
                              create_dirs: bool, dirmode: int) -> Outcome | None:
    assert d.real_filename is not None and d.real_dataname is not None
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL
    try:
        fd = os.open(d.real_filename, flags, d.mode)
    except OSError as e:
        if e.errno != E.ENOENT or not create_dirs:
            return defer(f"while creating file {d.filename}", e.errno or 0)
        try:
            _directory_make(d.path, dirmode, (d.setup.uid, d.setup.gid))
            fd = os.open(d.real_filename, flags, d.mode)
        except OSError as e2:
            return defer(f"while creating file {d.filename}", e2.errno or 0)
    try:
        outcome = _set_perms(d, d.real_filename, d.filename, "while setting perms on file %s")
        if outcome is not None:
            return outcome
        for text in texts:
            if isinstance(text, Outcome):
                return text
        body = (texts[0] or "") + "".join(lines) + (texts[1] or "")
        os.write(fd, body.encode("latin-1"))
    except OSError as e:
        return defer(f"while closing {d.filename}", e.errno or 0)
    finally:
        os.close(fd)
    try:
        d.fd = os.open(d.real_dataname, flags, d.mode)
    except OSError as e:
        return defer(f"while creating file {d.dataname}", e.errno or 0)
    return _set_perms(d, d.real_dataname, d.dataname, "while setting perms on file %s")


def _close_new_file(d: _Delivery) -> int | Outcome:
    """fstat and close the file just written: its inode, or an error."""
    try:
        inode = os.fstat(d.fd).st_ino
    except OSError as e:
        return defer(f"while fstatting opened message file {d.filename}", e.errno or 0)
    fd, d.fd = d.fd, -1
    try:
        os.close(fd)
    except OSError as e:
        name = d.dataname if d.instance.get("mailstore_format") else d.filename
        return defer(f"close() error for {name}", e.errno or 0)
    return inode


def _link_new(d: _Delivery, target: str) -> int | None:
    assert d.real_filename is not None
    try:
        os.link(d.real_filename, target)
    except OSError as e:
        return e.errno or 0
    os.unlink(d.real_filename)
    d.filename = d.real_filename = d.dataname = d.real_dataname = None
    return None


def _rename_new(d: _Delivery, target: str, untagged: str | None) -> Outcome | None:
    assert d.real_filename is not None
    real_target = target if target.startswith("/") else f"{d.path}/{target}"
    try:
        os.rename(d.real_filename, real_target)
    except OSError as e:
        if untagged is not None and e.errno == E.ENAMETOOLONG:
            target = untagged
            try:
                os.rename(d.real_filename, f"{d.path}/{target}")
            except OSError as e2:
                return defer(f"while renaming {d.filename} as {target}", e2.errno or 0)
        else:
            return defer(f"while renaming {d.filename} as {target}", e.errno or 0)
    d.filename = d.real_filename = d.dataname = d.real_dataname = None
    return None


def _discard_directory_files(d: _Delivery) -> None:
    """After a failed directory delivery: close and remove what was made."""
    _close_fd(d)
    for name in {d.real_filename, d.real_dataname}:
        if name:
            try:
                os.unlink(name)
            except OSError:
                pass


# -- Maildir (tf_maildir.c) ---------------------------------------------------------


def _maildir_ensure_directories(path: str, create: bool, mode: int,
                                folder_regex: str | None,
                                owner: tuple[int, int] | None = None) -> Outcome | None:
    for sub in ("", "/tmp", "/new", "/cur"):
        target = path + sub
        for _ in range(10):
            try:
                st = os.stat(target)
            except OSError as e:
                if e.errno == E.ENOENT and create:
                    try:
                        _directory_make(target, mode, owner)
                    except OSError as e2:
                        if e2.errno == E.EEXIST:
                            continue
                        return defer(f"cannot create {path}{sub}", e2.errno or 0)
                    break
                return defer(f"stat() error for {path}{sub}: {os.strerror(e.errno or 0)}",
                             e.errno or 0)
            if stat.S_ISDIR(st.st_mode):
                break
            return defer(f"{path}{sub} is not a directory", C.ERRNO_NOTDIRECTORY)
        else:
            return defer(f"existence of {path}{sub} unclear\n", special_action="freeze")
    if folder_regex:
        regex = _compile_regex(folder_regex)
        if isinstance(regex, Outcome):
            return regex
        if regex.search(path.encode("latin-1")):
            name = f"{path}/maildirfolder"
            if not os.path.exists(name):
                try:
                    os.close(os.open(name, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600))
                except OSError as e:
                    return defer(f"appendfile: failed to create maildirfolder file in {path} "
                                 f"directory: {os.strerror(e.errno or 0)}")
    return None


def _maildirfolder_parent(path: str) -> str:
    """A Maildir++ folder (with a ``maildirfolder`` file) has its quota
    counted in its parent."""
    if not os.path.exists(f"{path}/maildirfolder"):
        return path
    check = path
    slash = check.rfind("/")
    if slash >= 0 and slash == len(check) - 1:
        check = check[:slash]
        slash = check.rfind("/")
    return check[:slash] if slash >= 0 else path


def _check_dir_size(directory: str, regex: re.Pattern[bytes] | None,
                    count: int = 0) -> tuple[int, int]:
    """check_dir_size(): the total size and number of files below
    *directory*, a size taken from a file's name by *regex* when it can."""
    total = 0
    try:
        names = os.listdir(directory)
    except OSError:
        return 0, count
    for name in names:
        count += 1
        if regex is not None:
            m = regex.search(name.encode("latin-1", "surrogateescape"))
            if m is not None and m.lastindex:
                digits = m.group(1)
                if digits.isdigit():
                    total += int(digits)
                    continue
        full = f"{directory}/{name}"
        try:
            st = os.stat(full)
        except OSError:
            continue
        if stat.S_ISREG(st.st_mode):
            total += st.st_size // st.st_nlink
        elif stat.S_ISDIR(st.st_mode):
            size, count = _check_dir_size(full, regex, count)
            total += size
    return total, count


def _maildir_compute_size(path: str, regex: re.Pattern[bytes] | None,
                          dir_regex: re.Pattern[bytes] | None,
                          timestamp_only: bool) -> tuple[int, int, float]:
    """maildir_compute_size(): (size, file count, latest directory mtime)."""
    total, count, latest = 0, 0, 0.0
    try:
        names = os.listdir(path)
    except OSError:
        return 0, 0, 0.0
    for name in names:
        if dir_regex is not None and \
                not dir_regex.search(name.encode("latin-1", "surrogateescape")):
            continue
        full = f"{path}/{name}"
        try:
            st = os.stat(full)
        except OSError:
            continue
        if not stat.S_ISDIR(st.st_mode):
            continue
        latest = max(latest, int(st.st_mtime))
        if name.startswith("."):
            size, n, sub_latest = _maildir_compute_size(full, regex, dir_regex, timestamp_only)
            total += size
            count += n
            latest = max(latest, sub_latest)
        elif not timestamp_only:
            size, count = _check_dir_size(full, regex, count)
            total += size
    return total, count, latest


_SIZEFILE_MAX = 5120


def _maildir_ensure_sizefile(path: str, quota: _Quota, regex: re.Pattern[bytes] | None,
                             dir_regex: re.Pattern[bytes] | None, message_size: int,
                             inclusive: bool, hostname: str,
                             mode: int) -> tuple[int, int, int] | Outcome:
    """maildir_ensure_sizefile(): open (or rebuild) ``maildirsize``;
    (fd or -1/-2, size, file count)."""
    filename = f"{path}/maildirsize"
    mode = mode or 0o600
    fd = -1
    try:
        fd = os.open(filename, os.O_RDWR | os.O_APPEND, mode)
    except OSError as e:
        if e.errno != E.ENOENT:
            return defer(f"while opening or reading {path}/maildirsize", e.errno or 0)
    if fd >= 0:
        parsed = _read_sizefile(fd, quota, message_size if inclusive else 0,
                                1 if inclusive else 0)
        if parsed is not None:
            return fd, parsed[0], parsed[1]
        os.close(fd)
    # Recalculate.
    size, count, old_latest = _maildir_compute_size(path, regex, dir_regex, False)
    sec, usec = _unique_tick()
    temp = f"{path}/tmp/{sec}.H{usec}P{os.getpid()}.{hostname}"
    try:
        fd = os.open(temp, os.O_RDWR | os.O_CREAT | os.O_EXCL, mode)
        data = f"{quota.value}S,{quota.filecount}C\n{size} {count}\n".encode("ascii")
        try:
            if os.write(fd, data) != len(data):
                raise OSError(E.EIO, "short write")
            os.rename(temp, filename)
        except OSError:
            os.close(fd)
            fd = -1
    except OSError:
        fd = -1
    _, _, new_latest = _maildir_compute_size(path, None, dir_regex, True)
    if new_latest > old_latest:
        try:
            os.unlink(filename)
        except OSError:
            pass
        if fd >= 0:
            os.close(fd)
        fd = -2
    return fd, size, count


def _read_sizefile(fd: int, quota: _Quota, message_size: int,
                   one: int) -> tuple[int, int] | None:
    """The size and count a valid, current ``maildirsize`` gives, or None
    when it has to be recalculated."""
    data = os.read(fd, _SIZEFILE_MAX)
    if len(data) >= _SIZEFILE_MAX:
        return None
    text = data.decode("latin-1")
    first, _, rest = text.partition("\n")
    cached_size, cached_count = 0, 0
    for item in first.split(","):
        m = re.fullmatch(r"\s*([+-]?\d+)([A-Za-z])", item)
        if m is None:
            return None
        if m.group(2) == "S":
            cached_size = int(m.group(1))
        elif m.group(2) == "C":
            cached_count = int(m.group(1))
    if cached_size != quota.value or cached_count != quota.filecount:
        return None
    size = count = lines = 0
    for line in rest.split("\n"):
        if not line:
            continue
        m = re.fullmatch(r"\s*([+-]?\d+) +([+-]?\d+)", line)
        if m is None:
            return None
        size += int(m.group(1))
        count += int(m.group(2))
        lines += 1
    if size < 0 or count < 0:
        return None
    if quota.value > 0:
        over = size + message_size > quota.value or \
            (quota.filecount > 0 and count + one > quota.filecount)
        if over and (lines > 1 or time.time() - os.fstat(fd).st_mtime > 15 * 60):
            return None
    return size, count


def _close_sizefile(d: _Delivery) -> None:
    os.close(d.maildirsize_fd)
    d.maildirsize_fd = -1


def _maildir_record_length(fd: int, size: int) -> None:
    try:
        os.lseek(fd, 0, os.SEEK_END)
        os.write(fd, f"{size} 1\n".encode("ascii"))
    except OSError:
        pass

