"""Deliveries started from the command line: ``-q`` (one queue run, with
``f``/``ff``), ``-M id...`` (forced delivery), and the delivery of a
message submitted with ``-bm``/``-t`` (``-odi``, or in the background by
default as Exim's ``-odb``).

Each runs the Twisted reactor until its deliveries are done: pipe
transports need it for their child processes, and file work goes to a
thread pool as in the daemon.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Awaitable, Callable
from typing import Any, BinaryIO

from twisted_mta.queue.deliver import DeliverySettings, MessageDelivery


def _settings(config: Any, reactor: Any, threadpool: Any,
              log_writer: Any = None) -> DeliverySettings:
    from twisted_mta.dns import Resolver
    from twisted_mta.log import EximLog, SyncLogWriter
    from twisted_mta.queue.retry import RetryRules, open_retry_database
    from twisted_mta.queue.waiting import WaitingDatabase
    from twisted_mta.spool.ids import MessageIdAllocator
    from twisted_mta.spool.store import Spool

    spool = Spool(config.get("spool_directory") or "./exim-py-spool",
                  split=bool(config.get("split_spool_directory")))
    log = EximLog.from_config(config, reactor, os.getpid(), log_writer or SyncLogWriter())
    return DeliverySettings(config, spool, log, reactor, reactor, threadpool=threadpool,
                            resolver=Resolver(reactor, threadpool),
                            id_allocator=MessageIdAllocator(reactor.seconds, os.getpid(),
                                                            config.get("localhost_number")),
                            retry=open_retry_database(spool.directory, RetryRules(config),
                                                      clock=reactor),
                            waiting=WaitingDatabase(spool.directory))


def run_with_reactor(config: Any,
                     work: Callable[[DeliverySettings], Awaitable[int]],
                     log_writer: Any = None) -> int:
    """Run *work* with a reactor and a thread pool; its result is the exit
    status.  The log is written synchronously unless *log_writer* says
    otherwise."""
    from twisted.internet import defer, reactor
    from twisted.python.threadpool import ThreadPool

    threadpool = ThreadPool(minthreads=1, maxthreads=8, name="exim-py-cli")
    threadpool.start()
    status: list[int] = []

    def finished(result: Any) -> None:
        if isinstance(result, int):
            status.append(result)
        else:
            result.printTraceback(file=sys.stderr)
            status.append(1)
        threadpool.stop()
        reactor.stop()

    def start() -> None:
        settings = _settings(config, reactor, threadpool, log_writer)
        defer.Deferred.fromCoroutine(work(settings)).addBoth(finished)

    reactor.callWhenRunning(start)
    reactor.run()  # with SIGCHLD handling: pipe transports need it
    return status[0] if status else 1


def queue_run(config: Any, *, force: bool, thaw: bool, dont_deliver: bool = False,
              two_stage: bool = False) -> int:
    """``-q``, ``-qf``, ``-qff``: one pass over the queue (``-N``: no
    transport is run); ``-qq...``: two, routing first."""
    from twisted_mta.queue.runner import QueueRunner

    async def work(settings: DeliverySettings) -> int:
        await QueueRunner(settings).queue_run(force=force, thaw=thaw,
                                              dont_deliver=dont_deliver, two_stage=two_stage)
        return 0

    return run_with_reactor(config, work)


def deliver_messages(config: Any, message_ids: list[str], out: BinaryIO, *,
                     give_up: bool = False, dont_deliver: bool = False) -> int:
    """``-M id...``: deliver now, thawing and ignoring retry times; with
    *give_up* (``-Mg``), fail every address left instead."""
    from twisted_mta.queue.deliver import LOCKED, MISSING

    async def work(settings: DeliverySettings) -> int:
        status = 0
        for message_id in message_ids:
            result = await MessageDelivery(settings, message_id, force=True, thaw=True,
                                           give_up=give_up, dont_deliver=dont_deliver).run()
            if result.outcome == MISSING:
                out.write(f"Spool file not found: {message_id}-H\n".encode())
                status = 1
            elif result.outcome == LOCKED:
                out.write(f"Message {message_id} is locked\n".encode())
                status = 1
        out.flush()
        return status

    return run_with_reactor(config, work)


def deliver_in_background(config_file: str, defines: dict[str, str], message_id: str) -> None:
    """Exim's ``-odb``: a detached process delivers the new message."""
    command = [sys.executable, "-c", "from twisted_mta.cli import main; raise SystemExit(main())",
               "-C", config_file]
    for name, value in defines.items():
        command += ["-D", f"{name}={value}"]
    command += ["-M", message_id]
    subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                     stderr=subprocess.DEVNULL, start_new_session=True)
