"""Delivery worker processes, so that deliveries use the other CPUs.

Exim forks a process for each delivery, so a busy Exim keeps every CPU at
work.  The exim-py daemon is one process; on its own it delivers in the
same process that receives, on one CPU.  With delivery workers (twistd's
``--delivery-workers``, ``exim-py -bd -oW``; by default one fewer than the
CPUs, at least one) each message received is delivered by a worker
process instead: ``python -m twisted_mta.queue.workers CONFIG [-D NAME=VALUE
...]``, which runs a reactor, a thread pool and the same
L{twisted_mta.queue.deliver.MessageDelivery} as the daemon.

The line protocol is as small as it can be.  The daemon writes a message id
(and, for a queue run, a space and flags: ``q`` queue run, ``f`` forced,
``t`` thawed, ``2`` the first pass of a two-stage run) and a newline to a worker's stdin; the worker delivers it (up to
L{twisted_mta.queue.runner.IMMEDIATE_DELIVERIES} at once) and writes the id,
a space and the outcome (``completed``, ``incomplete``, ``locked`` ...;
``invalid`` for what is not a message id) to its stdout.  End of input: the worker finishes what it has, flushes its log
and exits.

Only the id crosses: the message is on the spool, and whichever process
delivers it holds Exim's lock on its -D file.  A worker that dies loses
nothing; what it had in hand is sent to its replacement (a delivery cut off
half way goes on from its -J journal), and a queue run would find it anyway.
"""

from __future__ import annotations

import os
import sys
from typing import Any

from twisted.application import service
from twisted.internet import defer, protocol
from twisted.internet.interfaces import IHalfCloseableProtocol
from twisted.python import log as twisted_log
from zope.interface import implementer

__all__ = ["DeliveryWorkers", "default_worker_count", "main"]

# How long a stopping worker may take to finish its deliveries before it
# is killed (its messages stay on the spool, journalled).
STOP_TIMEOUT = 60.0


def default_worker_count() -> int:
    """One fewer than the CPUs this process may use, at least one."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cpus = os.cpu_count() or 1
    return max(1, cpus - 1)


def worker_command(config: Any) -> list[str]:
    """The command line that starts a worker on *config* (its file and its
    ``-D`` macros)."""
    command = [sys.executable, "-m", "twisted_mta.queue.workers", config.filename]
    for name, value in config.macro_table.command_line.items():
        command += ["-D", f"{name}={value}"]
    return command


class _WorkerProcess(protocol.ProcessProtocol):
    """One worker, from the daemon's side: the ids sent to it and not yet
    answered."""

    def __init__(self, pool: DeliveryWorkers) -> None:
        self.pool = pool
        self.in_hand: dict[str, list[defer.Deferred[str]]] = {}
        self.flags: dict[str, str] = {}
        self.buffer = b""
        self.ended: defer.Deferred[None] = defer.Deferred()
        self.stopping = False

    def send(self, message_id: str, waiter: defer.Deferred[str], flags: str = "") -> None:
        first = message_id not in self.in_hand
        self.in_hand.setdefault(message_id, []).append(waiter)
        self.flags[message_id] = flags
        if first:
            self.transport.write(f"{message_id} {flags}".rstrip().encode("ascii") + b"\n")

    def outReceived(self, data: bytes) -> None:
        self.buffer += data
        *lines, self.buffer = self.buffer.split(b"\n")
        for line in lines:
            message_id, _, outcome = line.decode("ascii", "replace").partition(" ")
            self.flags.pop(message_id, None)
            for waiter in self.in_hand.pop(message_id, []):
                waiter.callback(outcome)

    def errReceived(self, data: bytes) -> None:
        for line in data.decode("utf-8", "replace").splitlines():
            twisted_log.msg(f"exim-py delivery worker: {line}")

    def processEnded(self, reason: Any) -> None:
        self.pool._ended(self)
        self.ended.callback(None)


class DeliveryWorkers(service.Service):
    """*count* worker processes for *config*, restarted when one dies."""

    name = "delivery-workers"

    def __init__(self, config: Any, count: int, reactor: Any,
                 command: list[str] | None = None) -> None:
        self.config = config
        self.count = count
        self.reactor = reactor
        self.command = command or worker_command(config)
        self.workers: list[_WorkerProcess] = []

    def startService(self) -> None:
        super().startService()
        for _ in range(self.count):
            self._spawn()

    def _spawn(self) -> _WorkerProcess:
        worker = _WorkerProcess(self)
        self.reactor.spawnProcess(worker, self.command[0], self.command,
                                  env=dict(os.environ), childFDs={0: "w", 1: "r", 2: "r"})
        self.workers.append(worker)
        return worker

    def deliver(self, message_id: str, flags: str = "") -> defer.Deferred[str]:
        """Have the least busy worker deliver *message_id* (*flags* as in
        the line protocol); fires with the outcome (``stopped`` when the
        workers stop first)."""
        waiter: defer.Deferred[str] = defer.Deferred()
        live = [w for w in self.workers if not w.stopping]
        if not live:
            waiter.callback("stopped")
            return waiter
        min(live, key=lambda w: len(w.in_hand)).send(message_id, waiter, flags)
        return waiter

    def _ended(self, worker: _WorkerProcess) -> None:
        if worker in self.workers:
            self.workers.remove(worker)
        left, flags = worker.in_hand, worker.flags
        worker.in_hand, worker.flags = {}, {}
        if self.running and not worker.stopping:
            twisted_log.msg("exim-py: a delivery worker ended; starting another")
            replacement = self._spawn()
            for message_id, waiters in left.items():
                for waiter in waiters:
                    replacement.send(message_id, waiter, flags.get(message_id, ""))
            return
        for waiters in left.values():
            for waiter in waiters:
                waiter.callback("stopped")

    def stopService(self) -> defer.Deferred[Any]:
        super().stopService()
        ended = []
        for worker in list(self.workers):
            worker.stopping = True
            worker.transport.closeStdin()
            timer = self.reactor.callLater(STOP_TIMEOUT, _kill, worker)
            worker.ended.addBoth(lambda result, t=timer: (t.active() and t.cancel(), result)[1])
            ended.append(worker.ended)
        return defer.DeferredList(ended, consumeErrors=True)


def _kill(worker: _WorkerProcess) -> None:
    try:
        worker.transport.signalProcess("KILL")
    except Exception:  # noqa: BLE001 - it may have gone already
        pass


# -- the worker's side -----------------------------------------------------------------

@implementer(IHalfCloseableProtocol)
class _Requests(protocol.Protocol):
    """Message ids on stdin, outcomes on stdout."""

    def __init__(self, settings: Any, done: defer.Deferred[int]) -> None:
        from twisted_mta.queue.runner import IMMEDIATE_DELIVERIES

        self.settings = settings
        self.done = done
        self.buffer = b""
        self.slots = defer.DeferredSemaphore(IMMEDIATE_DELIVERIES)
        self.running: set[defer.Deferred[Any]] = set()

    def dataReceived(self, data: bytes) -> None:
        self.buffer += data
        *lines, self.buffer = self.buffer.split(b"\n")
        for line in lines:
            message_id, _, flags = line.decode("ascii", "replace").strip().partition(" ")
            if message_id:
                d = self.slots.run(self._deliver, message_id, flags)
                self.running.add(d)
                d.addBoth(lambda result, d=d: (self.running.discard(d), result)[1])

    def _deliver(self, message_id: str, flags: str) -> defer.Deferred[None]:
        from twisted_mta.queue.deliver import MessageDelivery
        from twisted_mta.spool.ids import is_message_id

        if not is_message_id(message_id):
            self.transport.write(f"{message_id} invalid\n".encode("ascii", "replace"))
            return defer.succeed(None)

        d = defer.Deferred.fromCoroutine(MessageDelivery(
            self.settings, message_id, queue_running="q" in flags, force="f" in flags,
            thaw="t" in flags, first_pass="2" in flags).run())

        def answer(result: Any) -> None:
            outcome = getattr(result, "outcome", None)
            if outcome is None:
                twisted_log.err(result, f"exim-py: delivery of {message_id} failed")
                outcome = "error"
            self.transport.write(f"{message_id} {outcome}\n".encode("ascii"))

        return d.addBoth(answer)

    def readConnectionLost(self) -> None:
        """End of input: finish the deliveries in hand, answer them, flush
        the log, then close (stdout stays open until then)."""
        d = defer.DeferredList(list(self.running), consumeErrors=True)
        d.addCallback(lambda _: self.settings.log.when_flushed())
        d.addBoth(lambda _: self.transport.loseConnection())

    def writeConnectionLost(self) -> None:
        """The daemon has gone: the deliveries in hand go on regardless."""

    def connectionLost(self, reason: Any = None) -> None:
        if not self.done.called:
            self.done.callback(0)


def main(argv: list[str] | None = None) -> int:
    """``python -m twisted_mta.queue.workers CONFIG [-D NAME=VALUE]...``"""
    from twisted.internet import reactor, stdio

    from twisted_mta.log import ThreadLogWriter
    from twisted_mta.queue.command import run_with_reactor
    from twisted_mta.service import load_or_exit

    args = list(sys.argv[1:] if argv is None else argv)
    if not args:
        sys.stderr.write("usage: python -m twisted_mta.queue.workers CONFIG [-D NAME=VALUE]...\n")
        return 2
    path, rest, defines = args[0], args[1:], {}
    while rest:
        option = rest.pop(0)
        text = option[2:] if option.startswith("-D") and len(option) > 2 else \
            (rest.pop(0) if option == "-D" and rest else None)
        if text is None:
            sys.stderr.write(f"unknown option {option}\n")
            return 2
        name, _, value = text.partition("=")
        defines[name.strip()] = value.strip()
    config = load_or_exit(path, defines)
    # stdout carries the protocol: Twisted's messages go to stderr, which
    # the daemon copies into its own log.
    twisted_log.startLogging(sys.stderr, setStdout=False)

    async def work(settings: Any) -> int:
        done: defer.Deferred[int] = defer.Deferred()
        stdio.StandardIO(_Requests(settings, done), reactor=reactor)
        return await done

    return run_with_reactor(config, work,
                            log_writer=ThreadLogWriter(reactor.callFromThread))


if __name__ == "__main__":
    sys.exit(main())
