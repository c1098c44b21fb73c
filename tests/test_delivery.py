"""Delivering a spooled message (twisted_mta.queue.deliver): routing each
recipient, the journal, the rewritten -H file, ``Completed``, and the
``=>``/``**``/``==`` log lines, with a recording transport in memory."""

from __future__ import annotations

import io
import os
import shutil
import tempfile
import unittest
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.task import Clock

from twisted_mta.config import parse_config_text
from twisted_mta.log import EximLog, SyncLogWriter
from twisted_mta.queue.address import DeliveryAddress
from twisted_mta.queue.deliver import (
    COMPLETED,
    FROZEN,
    INCOMPLETE,
    LOCKED,
    DeliverySettings,
    MessageDelivery,
)
from twisted_mta.spool.message import Recipient, SpoolHeader, SpoolMessage
from twisted_mta.spool.store import Spool
from twisted_mta.spool.tree import tree_names

MESSAGE_ID = "1xa0Ih-00035i-29"
NOW = 1_790_000_000

CONFIG = r"""
primary_hostname = myhost.test.ex
qualify_domain = test.ex
log_selector = +deliver_time
begin routers
fails:
  driver = redirect
  allow_fail
  local_parts = gone
  data = :fail: no longer here
aliases:
  driver = redirect
  local_parts = team
  data = alice, bob, |/bin/true
  pipe_transport = record
local:
  driver = accept
  domains = test.ex
  transport = record
begin transports
record:
  driver = pipe
"""


class RecordingTransport:
    """Delivers by remembering; local parts starting "later" defer."""

    name = "recorder"
    local = True

    def __init__(self) -> None:
        self.delivered: list[str] = []

    async def deliver(self, instance: Any, job: Any) -> None:
        for address in job.addresses:
            if address.local_part.startswith("later"):
                address.defer("try again", errno=0)
            else:
                self.delivered.append(address.address)
                address.succeed()


def run(coroutine: Any) -> Any:
    """Run a coroutine that must not wait for I/O (fakes answer at once)."""
    results: list[Any] = []
    Deferred.fromCoroutine(coroutine).addBoth(results.append)
    assert results, "the coroutine waited for I/O"
    if hasattr(results[0], "raiseException"):
        results[0].raiseException()
    return results[0]


class _DeliveryCase(unittest.TestCase):
    """A spool, a clock, a log and a recording transport."""

    def setUp(self) -> None:
        self.tmp = tempfile.mkdtemp(prefix="exim-py-delivery-")
        self.addCleanup(shutil.rmtree, self.tmp, True)
        self.spool = Spool(self.tmp)
        self.clock = Clock()
        self.clock.advance(NOW + 60)
        self.config = parse_config_text(CONFIG)
        self.log_stream = io.StringIO()
        self.log = EximLog.from_config(self.config, self.clock, 4242, SyncLogWriter(),
                                       testing_stream=self.log_stream)
        self.transport = RecordingTransport()
        self.settings = DeliverySettings(self.config, self.spool, self.log, self.clock,
                                         self.clock, transports={"pipe": self.transport})

    def spool_message(self, *recipients: str, frozen: bool = False) -> None:
        message = SpoolMessage(
            id=MESSAGE_ID, sender="sender@example.com", received=(NOW, 0),
            received_complete=(NOW, 100), received_protocol="esmtp",
            recipients=[Recipient(r) for r in recipients],
            headers=[SpoolHeader("Subject: test\n"), SpoolHeader("From: s@example.com\n", "F")],
            frozen_at=NOW if frozen else None, deliver_firsttime=True, body_linecount=1)
        self.spool.write_message(message, b"body\n")

    def deliver(self, **kwargs: Any) -> Any:
        return run(MessageDelivery(self.settings, MESSAGE_ID, **kwargs).run())

    def log_lines(self) -> list[str]:
        return [line[20:] for line in self.log_stream.getvalue().splitlines()]

class DeliveryTests(_DeliveryCase):

    def test_all_delivered(self) -> None:
        self.spool_message("alice@test.ex", "bob@test.ex")
        result = self.deliver()
        self.assertEqual(result.outcome, COMPLETED)
        self.assertEqual(self.transport.delivered, ["alice@test.ex", "bob@test.ex"])
        self.assertEqual(self.spool.list_ids(), [])
        self.assertEqual(self.log_lines(), [
            f"{MESSAGE_ID} => alice <alice@test.ex> R=local T=record DT=0s",
            f"{MESSAGE_ID} => bob <bob@test.ex> R=local T=record DT=0s",
            f"{MESSAGE_ID} Completed"])

    def test_deferred_recipient_stays(self) -> None:
        self.spool_message("alice@test.ex", "later@test.ex")
        result = self.deliver()
        self.assertEqual(result.outcome, INCOMPLETE)
        message = self.spool.read_header(MESSAGE_ID)
        self.assertEqual(tree_names(message.non_recipients), ["alice@test.ex"])
        self.assertFalse(message.deliver_firsttime)
        self.assertFalse(os.path.exists(self.spool.locate(MESSAGE_ID).journal))
        self.assertIn(f"{MESSAGE_ID} == later@test.ex R=local T=record defer (0) DT=0s: try again",
                      self.log_lines())
        # The next attempt delivers only what is left.
        self.transport.delivered.clear()
        self.deliver()
        self.assertEqual(self.transport.delivered, [])

    def test_failure_and_bounce_hook(self) -> None:
        bounced: list[list[str]] = []

        async def bounce(message: Any, failed: list[DeliveryAddress]) -> None:
            bounced.append([a.address for a in failed])

        self.settings.bounce = bounce
        self.spool_message("gone@test.ex", "alice@test.ex")
        result = self.deliver()
        self.assertEqual(result.outcome, COMPLETED)
        self.assertEqual(bounced, [["gone@test.ex"]])
        self.assertIn(f"{MESSAGE_ID} ** gone@test.ex R=fails: no longer here", self.log_lines())

    def test_redirect_children_and_pipe(self) -> None:
        self.spool_message("team@test.ex")
        self.deliver()
        self.assertEqual(self.transport.delivered,
                         ["alice@test.ex", "bob@test.ex", "|/bin/true"])
        lines = self.log_lines()
        self.assertIn(f"{MESSAGE_ID} => alice <team@test.ex> R=local T=record DT=0s", lines)
        self.assertIn(f"{MESSAGE_ID} => |/bin/true <team@test.ex> R=aliases T=record DT=0s",
                      lines)

    def test_journal_from_a_crash_is_honoured(self) -> None:
        self.spool_message("alice@test.ex", "bob@test.ex")
        with open(self.spool.locate(MESSAGE_ID).journal, "w") as f:
            f.write("alice@test.ex\n")
        self.assertEqual(self.deliver().outcome, COMPLETED)
        self.assertEqual(self.transport.delivered, ["bob@test.ex"])

    def test_frozen_message_keeps_its_journal_until_delivered(self) -> None:
        """_open reads the journal with the -H file, but it is applied only
        once the message is not left frozen, as before."""
        self.spool_message("alice@test.ex", "bob@test.ex", frozen=True)
        journal = self.spool.locate(MESSAGE_ID).journal
        with open(journal, "w") as f:
            f.write("alice@test.ex\n")
        self.assertEqual(self.deliver().outcome, FROZEN)
        self.assertTrue(os.path.exists(journal))
        self.assertEqual(tree_names(self.spool.read_header(MESSAGE_ID).non_recipients), [])
        self.assertEqual(self.deliver(thaw=True).outcome, COMPLETED)
        self.assertEqual(self.transport.delivered, ["bob@test.ex"])

    def test_trips_to_the_thread_pool(self) -> None:
        """Locking, the -H file and the journal take one trip to the thread
        pool, and the last trip closes the -D file too (closing an unlinked
        file is slow); no descriptor is left open, whatever the outcome."""
        from tests.fakes import ImmediateReactor, ImmediateThreadPool

        trips: list[str] = []

        class CountingPool(ImmediateThreadPool):
            def callInThreadWithCallback(self, on_result: Any, f: Any, *args: Any,
                                         **kwargs: Any) -> None:
                if f.__name__ != "_working_directory_problem":  # local deliveries' own
                    trips.append(f.__name__)
                super().callInThreadWithCallback(on_result, f, *args, **kwargs)

        self.settings.threadpool = CountingPool()
        self.settings.reactor = ImmediateReactor()
        descriptors = len(os.listdir("/proc/self/fd"))
        self.spool_message("alice@test.ex", "later@test.ex")
        self.assertEqual(self.deliver().outcome, INCOMPLETE)
        self.assertEqual(trips, ["_open", "_append_synced", "_rewrite_header"])
        self.assertEqual(len(os.listdir("/proc/self/fd")), descriptors)
        trips.clear()
        self.spool.remove(MESSAGE_ID)
        self.spool_message("alice@test.ex")
        self.assertEqual(self.deliver().outcome, COMPLETED)
        self.assertEqual(trips, ["_open", "_append_synced", "_remove"])
        self.assertEqual(len(os.listdir("/proc/self/fd")), descriptors)
        self.spool_message("alice@test.ex", frozen=True)
        self.assertEqual(self.deliver().outcome, FROZEN)
        self.assertEqual(len(os.listdir("/proc/self/fd")), descriptors)

    def test_frozen_message_is_left(self) -> None:
        self.spool_message("alice@test.ex", frozen=True)
        self.assertEqual(self.deliver().outcome, FROZEN)
        self.assertEqual(self.deliver(thaw=True).outcome, COMPLETED)
        self.assertIn(f"{MESSAGE_ID} Unfrozen by forced delivery", self.log_lines())

    def test_one_delivery_at_a_time(self) -> None:
        self.spool_message("alice@test.ex")
        self.settings.active.add(MESSAGE_ID)
        self.assertEqual(self.deliver().outcome, LOCKED)

    def test_lock_held_by_another_process(self) -> None:
        import fcntl
        import multiprocessing

        self.spool_message("alice@test.ex")
        path = self.spool.locate(MESSAGE_ID).data
        ready, release = multiprocessing.Event(), multiprocessing.Event()

        def hold() -> None:
            fd = os.open(path, os.O_RDWR)
            fcntl.lockf(fd, fcntl.LOCK_EX, 19, 0, os.SEEK_SET)
            ready.set()
            release.wait(10)

        child = multiprocessing.get_context("fork").Process(target=hold)
        child.start()
        try:
            self.assertTrue(ready.wait(10))
            self.assertEqual(self.deliver().outcome, LOCKED)
        finally:
            release.set()
            child.join(10)
        self.assertEqual(self.deliver().outcome, COMPLETED)

    def test_duplicate_through_a_redirect_completes(self) -> None:
        # team@ expands to alice@, who is also a recipient: alice gets one
        # copy, and both recipients are done.
        self.spool_message("alice@test.ex", "team@test.ex")
        self.assertEqual(self.deliver().outcome, COMPLETED)
        self.assertEqual(self.transport.delivered.count("alice@test.ex"), 1)


class RetryScheduleTests(unittest.TestCase):
    """Days of retries in milliseconds: a local delivery that keeps
    deferring is skipped until its retry time in queue runs, tried again
    when it comes, and failed once the rule's cutoff has passed."""

    CONFIG = CONFIG + """
begin retry
*  *  F,1h,15m
"""

    def setUp(self) -> None:
        from twisted_mta.queue.retry import RetryRules, open_retry_database

        self.tmp = tempfile.mkdtemp(prefix="exim-py-retry-")
        self.addCleanup(shutil.rmtree, self.tmp, True)
        self.spool = Spool(self.tmp)
        self.clock = Clock()
        self.clock.advance(NOW)
        self.config = parse_config_text(self.CONFIG)
        self.log_stream = io.StringIO()
        log = EximLog.from_config(self.config, self.clock, 4242, SyncLogWriter(),
                                  testing_stream=self.log_stream)
        self.transport = RecordingTransport()
        self.bounced: list[str] = []

        async def bounce(message: Any, failed: list[DeliveryAddress]) -> list:
            self.bounced.extend(a.address for a in failed)
            return failed

        self.settings = DeliverySettings(
            self.config, self.spool, log, self.clock, self.clock,
            transports={"pipe": self.transport}, bounce=bounce,
            retry=open_retry_database(self.tmp, RetryRules(self.config), clock=self.clock))
        message = SpoolMessage(
            id=MESSAGE_ID, sender="sender@example.com", received=(NOW, 0),
            received_complete=(NOW, 0), recipients=[Recipient("later@test.ex")],
            headers=[SpoolHeader("Subject: test\n")], deliver_firsttime=True)
        self.spool.write_message(message, b"body\n")

    def attempt(self, minutes: float, queue_running: bool = True) -> list[str]:
        self.clock.advance(minutes * 60)
        start = len(self.log_stream.getvalue())
        run(MessageDelivery(self.settings, MESSAGE_ID, queue_running=queue_running).run())
        return [line[20:].removeprefix(MESSAGE_ID + " ")
                for line in self.log_stream.getvalue()[start:].splitlines()]

    def test_schedule(self) -> None:
        first = self.attempt(0, queue_running=False)
        self.assertEqual(first, ["== later@test.ex R=local T=record defer (0) DT=0s: try again"])
        # Ten minutes on, a queue run leaves it alone...
        self.assertEqual(self.attempt(10), ["== later@test.ex R=local T=record defer (-53): "
                                            "retry time not reached"])
        self.assertEqual(self.transport.delivered, [])
        # ...fifteen minutes after the failure it is tried again.
        self.assertIn("== later@test.ex R=local T=record defer (0) DT=0s: try again",
                      self.attempt(6))
        # Past the one-hour cutoff it fails and is bounced.
        lines: list[str] = []
        for _ in range(4):
            lines += self.attempt(16)
        self.assertIn("** later@test.ex R=local T=record: try again: retry timeout exceeded DT=0s",
                      lines)
        self.assertEqual(self.bounced, ["later@test.ex"])
        self.assertEqual(self.spool.list_ids(), [])


class CancelTests(_DeliveryCase):
    """-Mg and timeout_frozen_after."""

    def test_give_up_bounces_what_is_left(self) -> None:
        bounced: list[str] = []

        async def bounce(message: Any, failed: list[DeliveryAddress]) -> list:
            bounced.extend(f"{a.address}: {a.message}" for a in failed)
            return failed

        self.settings.bounce = bounce
        self.spool_message("alice@test.ex", "later@test.ex")
        self.assertEqual(self.deliver(give_up=True).outcome, COMPLETED)
        self.assertEqual(self.transport.delivered, [])
        self.assertEqual(sorted(bounced), ["alice@test.ex: delivery cancelled by administrator",
                                           "later@test.ex: delivery cancelled by administrator"])
        self.assertRegex(self.log_lines()[0], rf"^{MESSAGE_ID} cancelled by \S+$")

    def test_frozen_too_long(self) -> None:
        self.config = parse_config_text("timeout_frozen_after = 1m\n" + CONFIG)
        self.settings.config = self.config
        self.spool_message("alice@test.ex", frozen=True)
        self.settings.bounce = None
        self.assertEqual(self.deliver().outcome, COMPLETED)
        self.assertEqual(self.transport.delivered, [])
        self.assertIn(f"{MESSAGE_ID} cancelled by timeout_frozen_after", self.log_lines())

    def test_dont_deliver(self) -> None:
        # -N, as exim4 -N -odi logs it: routed, no transport, "*>".
        self.spool_message("alice@test.ex")
        self.assertEqual(self.deliver(dont_deliver=True).outcome, COMPLETED)
        self.assertEqual(self.transport.delivered, [])
        self.assertIn(f"{MESSAGE_ID} *> alice <alice@test.ex> R=local T=record DT=0s",
                      self.log_lines())
