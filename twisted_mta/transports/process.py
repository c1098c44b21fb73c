"""Child processes for the ``pipe`` and ``lmtp`` transports: building the
argument list as Exim's ``transport_set_up_command()`` does, starting the
command as the leader of a new process group (so that a timeout can kill
everything it started), and feeding its standard input without blocking.

Exim's ``child_open()`` makes the child a process group leader and sets
its umask; Twisted's ``spawnProcess()`` can do neither, so on a real POSIX
reactor the process is created with a small subclass of Twisted's
``Process`` that does both between fork and exec (and exits 127 if the
exec fails, as Exim's child does).  The child's signals are as Exim
leaves them: SIGPIPE at its default, SIGHUP, SIGINT, SIGUSR1 and SIGTERM
ignored (so a command cannot be stopped by those, as with Exim).  Other reactors (test doubles) get a
plain ``spawnProcess()`` call.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator
from typing import Any

from twisted.internet import defer as tdefer
from twisted.internet import process as tprocess
from twisted.internet.error import ProcessDone, ProcessTerminated
from twisted.internet.interfaces import IPushProducer
from twisted.internet.protocol import ProcessProtocol
from twisted.python.failure import Failure
from zope.interface import implementer

from twisted_mta.expand.errors import ExpansionError
from twisted_mta.taint import is_tainted
from twisted_mta.transports.common import FAIL, Outcome, expand
from twisted_mta.transports.message import next_chunk
from twisted_mta.values import interpret_escape

#: Exim's exit code for a child that could not exec its command.
EX_EXECFAILED = 127
_WHITESPACE = " \t\n\r\v\f"


# -- the argument list -----------------------------------------------------------


def split_command(cmd: str) -> list[str]:
    """Split a command into arguments: white space separates them;
    ``'...'`` is taken as it is; ``"..."`` may contain backslash escapes;
    other text runs to the next white space."""
    args: list[str] = []
    i, n = 0, len(cmd)
    while i < n and cmd[i] in _WHITESPACE:
        i += 1
    while i < n:
        if cmd[i] == "'":
            end = cmd.find("'", i + 1)
            if end < 0:
                end = n
            args.append(cmd[i + 1:end])
            i = end + 1 if end < n else n
        elif cmd[i] == '"':
            out: list[str] = []
            i += 1
            while i < n and cmd[i] != '"':
                if cmd[i] == "\\":
                    c, i = interpret_escape(cmd, i)
                    out.append(c)
                else:
                    out.append(cmd[i])
                    i += 1
            if i < n:
                i += 1
            args.append("".join(out))
        else:
            start = i
            while i < n and cmd[i] not in _WHITESPACE:
                i += 1
            args.append(cmd[start:i])
        while i < n and cmd[i] in _WHITESPACE:
            i += 1
    return args


async def set_up_command(job: Any, cmd: str, *, expand_arguments: bool, expand_fail: str,
                         etext: str, force_pipe: str | None = None,
                         allow_tainted: bool = False) -> list[str] | Outcome:
    """transport_set_up_command(): the argument list for *cmd*, each
    argument expanded separately when *expand_arguments*.  An argument that
    is just ``$pipe_addresses`` becomes one argument per address; with
    ``force_command``, ``$address_pipe`` becomes the arguments of the
    redirected pipe (*force_pipe*).  A failure is an Outcome (*expand_fail*
    for an expansion error, FAIL otherwise)."""
    addresses = job.addresses
    max_args = len(addresses) + 60
    argv = split_command(cmd)
    if len(argv) > max_args:
        return Outcome(FAIL, f'Too many arguments in command "{cmd}" in {etext}')
    if not expand_arguments:
        return argv
    out: list[str] = []
    for i, arg in enumerate(argv):
        if arg in ("$pipe_addresses", "${pipe_addresses}"):
            if len(argv) + len(addresses) - 1 > max_args:
                return Outcome(FAIL, f'Too many arguments to command "{cmd}" in {etext}')
            out.extend(a.address for a in addresses)
            continue
        if force_pipe is not None and arg in ("$address_pipe", "${address_pipe}"):
            try:
                text = await expand(job, force_pipe)
            except ExpansionError as e:
                return Outcome(FAIL, f'Expansion of "{force_pipe}" from command "{cmd}" in '
                               f"{etext} failed: {e.message}")
            if not text:
                return Outcome(FAIL, f'Expansion of "{force_pipe}" from command "{cmd}" in '
                               f"{etext} failed: ")
            extra = split_command(text)
            if len(out) + len(extra) + len(argv) - i - 1 > max_args:
                return Outcome(FAIL, f'Too many arguments to command "{cmd}" after expanding '
                               f"$address_pipe in {etext}")
            for piece in extra:
                if is_tainted(piece):
                    return Outcome(FAIL, f"Tainted arg {len(out)} for {etext} command: "
                                   f"'{piece}'")
                out.append(piece)
            continue
        try:
            value = await expand(job, arg)
        except ExpansionError as e:
            return Outcome(expand_fail, f'Expansion of "{arg}" from command "{cmd}" in {etext} '
                           f"failed: {e.message}")
        if not allow_tainted and is_tainted(value):
            return Outcome(FAIL, f"Tainted arg {len(out)} for {etext} command: '{value}'")
        out.append(value)
    return out


# -- starting and stopping -------------------------------------------------------


class _GroupProcess(tprocess.Process):
    """A Twisted process whose child leads a new process group and has its
    own umask; it exits 127 if it cannot exec."""

    def __init__(self, *args: Any, umask: int = 0o022, **kwargs: Any) -> None:
        self._exim_umask = umask
        super().__init__(*args, **kwargs)

    def _trySpawnInsteadOfFork(self, *args: Any, **kwargs: Any) -> bool:
        return False    # posix_spawn cannot set the umask

    def _execChild(self, path: Any, uid: Any, gid: Any, executable: Any, args: Any,
                   environment: Any) -> None:
        try:
            os.setpgid(0, 0)
            os.umask(self._exim_umask)
            # What Exim's delivery children start with: SIGPIPE as default,
            # and HUP, INT, USR1 and TERM ignored.
            for sig in (signal.SIGPIPE, signal.SIGXFSZ):
                signal.signal(sig, signal.SIG_DFL)
            for sig in (signal.SIGHUP, signal.SIGINT, signal.SIGUSR1, signal.SIGTERM):
                signal.signal(sig, signal.SIG_IGN)
            if path:
                os.chdir(path)
            os.execve(executable, args, environment)
        except BaseException:
            pass
        os._exit(EX_EXECFAILED)


def spawn(reactor: Any, protocol: ProcessProtocol, executable: str, args: list[str],
          env: dict[str, str], path: str | None, umask: int) -> Any:
    """Start *args* (``args[0]`` is *executable*) with stdin, stdout and
    stderr on pipes; the process transport."""
    from twisted.internet.posixbase import PosixReactorBase

    encoded_args = [a.encode("latin-1", "surrogateescape") for a in args]
    encoded_env = {k.encode("latin-1", "surrogateescape"): v.encode("latin-1", "surrogateescape")
                   for k, v in env.items()}
    exe = executable.encode("latin-1", "surrogateescape")
    if isinstance(reactor, PosixReactorBase):
        return _GroupProcess(reactor, exe, encoded_args, encoded_env, path, protocol, None, None,
                             {0: "w", 1: "r", 2: "r"}, umask=umask)
    return reactor.spawnProcess(protocol, exe, encoded_args, encoded_env, path)


def kill_group(transport: Any) -> None:
    """SIGKILL the child's process group (or just the child when it could
    not be made a group leader)."""
    pid = getattr(transport, "pid", None)
    if pid:
        try:
            os.killpg(pid, signal.SIGKILL)
            return
        except OSError:
            pass
    try:
        transport.signalProcess("KILL")
    except Exception:
        pass


# -- talking to the child --------------------------------------------------------


@implementer(IPushProducer)
class Backpressure:
    """Registered as the producer for a transport, so that writing waits
    while the transport's buffer is full."""

    def __init__(self) -> None:
        self._paused: tdefer.Deferred[None] | None = None
        self.stopped = False

    def pauseProducing(self) -> None:
        if self._paused is None:
            self._paused = tdefer.Deferred()

    def resumeProducing(self) -> None:
        paused, self._paused = self._paused, None
        if paused is not None:
            paused.callback(None)

    def stopProducing(self) -> None:
        self.stopped = True
        self.resumeProducing()

    async def wait(self) -> None:
        if self._paused is not None:
            await self._paused


async def pump(job: Any, chunks: Iterator[bytes], write: Any, pressure: Backpressure,
               closed: Any) -> int:
    """Copy the chunks of a message stream to *write*, waiting whenever the
    consumer is full; stop early when *closed()* (the reader went away,
    Exim's ignored EPIPE).  The number of bytes handed over."""
    count = 0
    while True:
        chunk = await next_chunk(job, chunks)
        if chunk is None or closed() or pressure.stopped:
            return count
        write(chunk)
        count += len(chunk)
        await pressure.wait()


def exit_status(reason: Failure) -> int:
    """Exim's child_close() value: the exit code, or minus the signal."""
    value = reason.value
    if isinstance(value, ProcessDone):
        return 0
    if isinstance(value, ProcessTerminated):
        if value.signal is not None:
            return -int(value.signal)
        return int(value.exitCode or 0)
    return -1


class ChildProtocol(ProcessProtocol):
    """The parent's side of a child's pipes: its output (stdout and stderr
    together, in the order they arrive) goes to :meth:`output_received`;
    :meth:`when_exited` and :meth:`when_ended` give the exit status and
    the end of all output."""

    def __init__(self) -> None:
        self.pressure = Backpressure()
        self.stdin_closed = False
        self.status: int | None = None
        self.ended = False
        self._exit_waiters: list[tdefer.Deferred[int]] = []
        self._end_waiters: list[tdefer.Deferred[None]] = []

    def connectionMade(self) -> None:
        self.transport.registerProducer(self.pressure, True)

    def outReceived(self, data: bytes) -> None:
        self.output_received(data)

    def errReceived(self, data: bytes) -> None:
        self.output_received(data)

    def output_received(self, data: bytes) -> None:
        """Override: a piece of the child's output."""

    def childConnectionLost(self, childFD: int) -> None:
        if childFD == 0:
            self.stdin_closed = True
            self.pressure.stopProducing()

    def processExited(self, reason: Failure) -> None:
        self.status = exit_status(reason)
        waiters, self._exit_waiters = self._exit_waiters, []
        for d in waiters:
            if not d.called:    # a waiter that timed out is already done
                d.callback(self.status)

    def processEnded(self, reason: Failure) -> None:
        if self.status is None:
            self.processExited(reason)
        self.ended = True
        self.stdin_closed = True
        self.pressure.stopProducing()
        waiters, self._end_waiters = self._end_waiters, []
        for d in waiters:
            if not d.called:
                d.callback(None)

    def when_exited(self) -> tdefer.Deferred[int]:
        if self.status is not None:
            return tdefer.succeed(self.status)
        d: tdefer.Deferred[int] = tdefer.Deferred()
        self._exit_waiters.append(d)
        return d

    def when_ended(self) -> tdefer.Deferred[None]:
        if self.ended:
            return tdefer.succeed(None)
        d: tdefer.Deferred[None] = tdefer.Deferred()
        self._end_waiters.append(d)
        return d


async def wait_for(d: tdefer.Deferred[Any], timeout: float, clock: Any) -> tuple[bool, Any]:
    """(True, result) if *d* fires within *timeout* seconds (no limit when
    0), else (False, None)."""
    if timeout > 0:
        d.addTimeout(timeout, clock)
    try:
        return True, await d
    except tdefer.TimeoutError:
        return False, None
