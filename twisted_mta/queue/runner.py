"""The queue runner: delivery straight after reception and periodic runs
over the spool (``-q30m``), inside the daemon.

Exim forks a process per delivery and per queue run; here each is a
coroutine.  ``queue_run_max`` limits the queue runs going on at once, as it
limits Exim's runner processes; immediate deliveries are limited separately
(they are Exim's per-connection delivery processes), and a message is never
delivered by two coroutines at once (L{DeliverySettings.active} and the
-D file lock).

A DSN spooled during a delivery is delivered as a message just received
is (L{QueueRunner.deliver_now}); a queue run waits for those it caused
before it ends, so that ``-q`` from the command line delivers them too.

With delivery workers (twisted_mta/queue/workers.py) the deliveries run in
those processes instead, on the other CPUs: the runner hands them message
ids, one at a time for a queue run.
"""

from __future__ import annotations

import os
import random
from collections.abc import Iterable
from typing import Any

from twisted.application import service
from twisted.internet import defer, task
from twisted.python import log as twisted_log

from twisted_mta.queue.deliver import DeliveryResult, DeliverySettings, MessageDelivery

#: Deliveries started by reception that may run at once.
IMMEDIATE_DELIVERIES = 20


class QueueRunner(service.Service):
    """Runs deliveries for the daemon.

    @param interval: seconds between queue runs, or None for none (the
        daemon then delivers only on reception).
    @param workers: a L{twisted_mta.queue.workers.DeliveryWorkers} to run
        the deliveries, or None to run them here.
    """

    name = "queue-runner"

    def __init__(self, settings: DeliverySettings, interval: float | None = None,
                 rng: random.Random | None = None, workers: Any = None) -> None:
        self.settings = settings
        self.workers = workers
        self.interval = interval
        self.rng = rng or random.Random()
        self.runs_in_progress = 0
        self._immediate = defer.DeferredSemaphore(IMMEDIATE_DELIVERIES)
        self._pending: set[defer.Deferred] = set()
        self._new: set[defer.Deferred] = set()
        self._loop: task.LoopingCall | None = None
        if settings.deliver_new is None:
            settings.deliver_new = self._deliver_new

    # -- service -------------------------------------------------------------------

    def startService(self) -> None:
        super().startService()
        if self.interval:
            self._loop = task.LoopingCall(self.start_queue_run)
            self._loop.clock = self.settings.clock
            self._loop.start(self.interval, now=True)

    def stopService(self) -> defer.Deferred:
        super().stopService()
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        # Deliveries in flight finish (their journal keeps a crash safe).
        return defer.DeferredList(list(self._pending), consumeErrors=True)

    def _track(self, d: defer.Deferred) -> defer.Deferred:
        self._pending.add(d)
        d.addErrback(lambda f: twisted_log.err(f, "exim-py: delivery failed"))
        d.addBoth(lambda result: (self._pending.discard(d), result)[1])
        return d

    # -- what the daemon asks for --------------------------------------------------------

    def deliver_now(self, message_id: str) -> defer.Deferred:
        """A message just received: deliver it unless queue_only says not."""
        if self.workers is not None:
            # Each worker limits its own deliveries at once.
            return self._track(self.workers.deliver(message_id))
        return self._track(self._immediate.run(self._deliver, message_id))

    def _deliver_new(self, message_id: str) -> defer.Deferred:
        """A DSN a delivery just spooled."""
        d = self.deliver_now(message_id)
        self._new.add(d)
        d.addBoth(lambda result: (self._new.discard(d), result)[1])
        return d

    def _deliver(self, message_id: str, **kwargs: Any) -> defer.Deferred:
        return defer.Deferred.fromCoroutine(
            MessageDelivery(self.settings, message_id, **kwargs).run())

    def start_queue_run(self, *, force: bool = False, thaw: bool = False) -> defer.Deferred | None:
        """Start a queue run unless ``queue_run_max`` are going already."""
        limit = self._queue_run_max()
        if limit and self.runs_in_progress >= limit:
            return None
        self.runs_in_progress += 1
        d = defer.Deferred.fromCoroutine(self.queue_run(force=force, thaw=thaw))

        def done(result: Any) -> Any:
            self.runs_in_progress -= 1
            return result

        d.addBoth(done)
        return self._track(d)

    def _queue_run_max(self) -> int:
        value = self.settings.config.get("queue_run_max", 5)
        try:
            return int(value)
        except (TypeError, ValueError):
            return 5

    async def queue_run(self, *, force: bool = False, thaw: bool = False,
                        ids: Iterable[str] | None = None, dont_deliver: bool = False,
                        two_stage: bool = False) -> list[DeliveryResult]:
        """One pass over the queue, in random order unless
        ``queue_run_in_order``; each message is delivered in turn.

        *two_stage* (``-qq``): first a pass that routes every message and
        runs the local deliveries, but only records the remote ones as
        waiting for their hosts (twisted_mta/queue/waiting.py); then the
        ordinary pass, in which a connection to a host carries all the
        messages waiting for it, as in Exim."""
        spool = self.settings.spool
        flags = ("q" if two_stage else "") + ("f" if force else "") + ("f" if thaw else "")
        self._log(f"Start queue run: pid={os.getpid()}" + (f" -q{flags}" if flags else ""))
        if ids is None:
            ids = await _in_thread(self.settings, spool.list_ids)
        order = list(ids)
        if not self.settings.config.get("queue_run_in_order"):
            self.rng.shuffle(order)
        results = []
        for first_pass in ([True, False] if two_stage else [False]):
            results = []
            for message_id in order:
                if message_id in self.settings.active:
                    continue
                results.append(await self._queue_delivery(
                    message_id, force=force, thaw=thaw, dont_deliver=dont_deliver,
                    first_pass=first_pass))
        while self._new:
            await defer.DeferredList(list(self._new), consumeErrors=True)
        self._log(f"End queue run: pid={os.getpid()}{flags}")
        return results

    async def _queue_delivery(self, message_id: str, *, force: bool, thaw: bool,
                              dont_deliver: bool, first_pass: bool) -> DeliveryResult:
        if self.workers is not None and not dont_deliver:
            flags = "q" + ("f" if force else "") + ("t" if thaw else "") + \
                ("2" if first_pass else "")
            return DeliveryResult(await self.workers.deliver(message_id, flags))
        return await MessageDelivery(self.settings, message_id, force=force, thaw=thaw,
                                     queue_running=True, dont_deliver=dont_deliver,
                                     first_pass=first_pass).run()

    def _log(self, text: str) -> None:
        log = self.settings.log
        if "queue_run" in getattr(log, "selectors", frozenset()):
            log.write(text, ("main",))


async def _in_thread(settings: DeliverySettings, function: Any) -> Any:
    if settings.threadpool is None:
        return function()
    from twisted.internet import threads

    return await threads.deferToThreadPool(settings.reactor, settings.threadpool, function)
