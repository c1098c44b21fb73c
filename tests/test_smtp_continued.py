"""Several messages per connection: the wait-<transport> hints
(twisted_mta/queue/waiting.py) and the smtp transport's connections handed
on to waiting messages (ContinuedConnection in twisted_mta/transports/smtp.py).

Against a real Exim 4.96: messages deferred while it was down are recorded
as waiting for it; when it is up, the next delivery to it carries them down
the same connection (Exim logs one client port for all of them), each
``=>`` line after the first connection's marked with ``*``, as Exim marks
continued deliveries.
"""

from __future__ import annotations

import random
import re
import shutil
import tempfile
from typing import Any

from twisted.python.threadpool import ThreadPool
from twisted.trial import unittest as trial

from tests import test_smtp_transport as peer
from tests.test_delivery_peers import Exim4Daemon, message_lines
from twisted_mta.queue.deliver import COMPLETED, INCOMPLETE, MISSING, MessageDelivery
from twisted_mta.queue.waiting import BUSY, GONE, READY, WaitingDatabase
from twisted_mta.spool.store import Spool


class WaitingDatabaseTests(trial.TestCase):

    def setUp(self) -> None:
        self.tmp = tempfile.mkdtemp(prefix="exim-py-waiting-")
        self.addCleanup(shutil.rmtree, self.tmp, True)

    def test_add_keeps_order_and_no_duplicates(self) -> None:
        db = WaitingDatabase(self.tmp)
        db.add("remote_smtp", ["MX1.example", "mx2.example", "mx1.example"], "m1")
        db.add("remote_smtp", ["mx1.example"], "m2")
        db.add("remote_smtp", ["mx1.example"], "m1")
        self.assertEqual(db.waiting("remote_smtp", "mx1.example"), ["m1", "m2"])
        self.assertEqual(db.waiting("remote_smtp", "MX2.EXAMPLE"), ["m1"])
        self.assertEqual(db.waiting("other", "mx1.example"), [])
        # On disk, for the next process.
        self.assertEqual(WaitingDatabase(self.tmp).waiting("remote_smtp", "mx1.example"),
                         ["m1", "m2"])

    def test_take_skips_busy_and_drops_gone(self) -> None:
        db = WaitingDatabase(self.tmp)
        for message_id in ("gone", "busy", "ready1", "ready2"):
            db.add("t", ["h"], message_id)
        states = {"gone": GONE, "busy": BUSY, "ready1": READY, "ready2": READY}
        self.assertEqual(db.take("t", "h", states.__getitem__), "ready1")
        self.assertEqual(db.waiting("t", "h"), ["busy", "ready2"])
        self.assertEqual(db.take("t", "h", states.__getitem__), "ready2")
        self.assertIsNone(db.take("t", "h", states.__getitem__))
        self.assertEqual(db.waiting("t", "h"), ["busy"])
        states["busy"] = GONE
        self.assertIsNone(db.take("t", "h", states.__getitem__))
        self.assertEqual(db.waiting("t", "h"), [])


class ContinuedToEximTests(trial.TestCase):
    """Messages waiting for an Exim that was down go down one connection."""

    settings = peer.DeliveryToEximTests.settings
    deliver = peer.DeliveryToEximTests.deliver

    def setUp(self) -> None:
        peer._require_exim()
        # Exim's port is chosen now; the daemon starts later.
        self.exim = Exim4Daemon(peer.RECEIVER_CONFIG.replace(
            "queue_only\n", "queue_only\nlog_selector = +incoming_port\n"))
        self.addCleanup(self.exim.cleanup)
        self.pool = ThreadPool(1, 4)
        self.pool.start()
        self.addCleanup(self.pool.stop)
        self.tmp = tempfile.mkdtemp(prefix="exim-py-continued-")
        self.addCleanup(shutil.rmtree, self.tmp, True)
        self.spool = Spool(self.tmp)
        self.bounced: list[Any] = []

    async def queue_while_down(self, count: int, extra: str = "") -> Any:
        """*count* messages deferred (connection refused) while Exim is
        down, each now waiting for it."""
        settings = self.settings(extra=extra)
        settings.waiting = WaitingDatabase(self.tmp)
        self.settings_used = settings
        for number in range(1, count + 1):
            outcome, lines = await self.deliver(settings, ["a@y.test"], number=number)
            self.assertEqual(outcome, INCOMPLETE, lines)
        ids = [f"1xa0Ih-00035i-0{n}" for n in range(1, count + 1)]
        self.assertEqual(settings.waiting.waiting("remote_smtp", "127.0.0.1"), ids)
        return settings

    def received_ports(self) -> list[str]:
        return re.findall(r"(?m)^.* <= s@x\.test H=\S+ \[127\.0\.0\.1\]:(\d+) ",
                          self.exim.mainlog())

    def delivery_lines(self) -> list[str]:
        return [line for line in self.stream.getvalue().splitlines() if " => " in line]

    async def test_backlog_goes_down_one_connection(self) -> None:
        settings = await self.queue_while_down(3)
        self.exim.start()
        result = await MessageDelivery(settings, "1xa0Ih-00035i-01", force=True).run()
        self.assertEqual(result.outcome, COMPLETED)
        for number in (2, 3):
            self.assertEqual(message_lines(self.stream.getvalue(),
                                           f"1xa0Ih-00035i-0{number}")[-1], "Completed")
        ports = self.received_ports()
        self.assertEqual(len(ports), 3, self.exim.mainlog())
        self.assertEqual(len(set(ports)), 1, ports)
        marks = [re.search(r" H=127\.0\.0\.1 \[127\.0\.0\.1\](\*?) ", line).group(1)
                 for line in self.delivery_lines()]
        self.assertEqual(marks, ["", "*", "*"], self.delivery_lines())
        self.assertEqual(settings.waiting.waiting("remote_smtp", "127.0.0.1"), [])
        self.assertEqual(list(self.spool.list_ids()), [])

    async def test_connection_max_messages(self) -> None:
        settings = await self.queue_while_down(3, extra="  connection_max_messages = 2\n")
        self.exim.start()
        await MessageDelivery(settings, "1xa0Ih-00035i-01", force=True).run()
        ports = self.received_ports()
        self.assertEqual(len(ports), 2, self.exim.mainlog())
        self.assertEqual(len(set(ports)), 1, ports)
        # The third still waits, and goes on the next connection.
        self.assertEqual(settings.waiting.waiting("remote_smtp", "127.0.0.1"),
                         ["1xa0Ih-00035i-03"])
        result = await MessageDelivery(settings, "1xa0Ih-00035i-03", force=True).run()
        self.assertEqual(result.outcome, COMPLETED)
        self.assertEqual(len(set(self.received_ports())), 2)

    async def test_two_stage_queue_run(self) -> None:
        # -qq: the first pass routes all three and records them as waiting
        # (no "==" lines); the second sends them down one connection.
        self.exim.start()
        settings = self.settings()
        settings.waiting = WaitingDatabase(self.tmp)
        self.settings_used = settings
        for number in (1, 2, 3):
            peer.spool_message(self.spool, ["a@y.test"], number=number)
        from twisted_mta.queue.runner import QueueRunner

        runner = QueueRunner(settings, rng=random.Random(1))
        results = await runner.queue_run(two_stage=True, ids=sorted(self.spool.list_ids()))
        # The first message of the second pass took the other two along,
        # so the pass finds them gone.
        self.assertEqual([r.outcome for r in results], [COMPLETED, MISSING, MISSING])
        self.assertEqual(list(self.spool.list_ids()), [])
        self.assertNotIn(" == ", self.stream.getvalue())
        ports = self.received_ports()
        self.assertEqual(len(ports), 3, self.exim.mainlog())
        self.assertEqual(len(set(ports)), 1, ports)
        marks = [re.search(r" H=127\.0\.0\.1 \[127\.0\.0\.1\](\*?) ", line).group(1)
                 for line in self.delivery_lines()]
        self.assertEqual(sorted(marks), ["", "*", "*"], self.delivery_lines())

    async def test_queue_smtp_domains(self) -> None:
        # Outside queue runs a domain in queue_smtp_domains is only routed
        # (and waits); a forced delivery goes ahead.
        self.exim.start()
        text = "queue_smtp_domains = y.test\n" + peer.SENDER_CONFIG.replace(
            "@HOSTS@", "127.0.0.1").replace("@PORT@", str(self.exim.port)).replace(
            "@EXTRA@", "")
        settings = peer.delivery_settings(self, text)
        settings.waiting = WaitingDatabase(self.tmp)
        self.settings_used = settings
        outcome, lines = await self.deliver(settings, ["a@y.test"])
        self.assertEqual(outcome, INCOMPLETE, lines)
        self.assertEqual(lines, ["== a@y.test R=remote T=remote_smtp defer (0): first-pass "
                                 "only routing due to -odqs, queue_smtp_domains or "
                                 "control=queue"])
        self.assertEqual(settings.waiting.waiting("remote_smtp", "127.0.0.1"),
                         ["1xa0Ih-00035i-01"])
        self.assertEqual(self.received_ports(), [])
        result = await MessageDelivery(settings, "1xa0Ih-00035i-01", force=True).run()
        self.assertEqual(result.outcome, COMPLETED)

    async def test_connection_max_messages_one_records_nothing(self) -> None:
        settings = self.settings(extra="  connection_max_messages = 1\n")
        settings.waiting = WaitingDatabase(self.tmp)
        self.settings_used = settings
        outcome, lines = await self.deliver(settings, ["a@y.test"])
        self.assertEqual(outcome, INCOMPLETE, lines)
        self.assertEqual(settings.waiting.waiting("remote_smtp", "127.0.0.1"), [])

    async def test_nothing_waiting_quits_at_once(self) -> None:
        self.exim.start()
        settings = self.settings()
        settings.waiting = WaitingDatabase(self.tmp)
        self.settings_used = settings
        outcome, lines = await self.deliver(settings, ["a@y.test"])
        self.assertEqual(outcome, COMPLETED, lines)
        self.assertNotIn("*", [x for x in lines if x.startswith("=> ")][0])


class DeliveryLineFlagsTests(trial.TestCase):
    """The host part of a remote ``=>`` line: ``*`` for a handed-on
    connection, `` L`` (with ``+pipelining``) before `` PRDR`` and `` K``,
    in deliver.c's order."""

    def line(self, selector: frozenset[str], **extra: Any) -> str:
        from twisted_mta.queue.address import DeliveryAddress, Host
        from twisted_mta.queue.deliverylog import delivery_line
        from twisted_mta.transports.smtp import SmtpTransport

        address = DeliveryAddress("a@y.test", router="remote", transport="remote_smtp")
        address.extra.update(extra)
        address.succeed("250 OK", host=Host("mx.y.test", "192.0.2.1", 2525))
        return delivery_line(address, logchar="=", sender="s@x.test", transport=SmtpTransport(),
                             log_as_local=False, selector=selector)

    def test_continued_mark_after_the_port(self) -> None:
        self.assertIn(" H=mx.y.test [192.0.2.1]:2525* C=",
                      self.line(frozenset({"outgoing_port", "smtp_confirmation"}),
                                continued=True))
        self.assertIn(" H=mx.y.test [192.0.2.1] C=",
                      self.line(frozenset({"smtp_confirmation"})))

    def test_flags_order(self) -> None:
        flags = {"flags": ["PRDR", "L", "K"]}
        self.assertIn(" H=mx.y.test [192.0.2.1] L PRDR K C=",
                      self.line(frozenset({"pipelining", "smtp_confirmation"}), **flags))
        self.assertIn(" H=mx.y.test [192.0.2.1] PRDR K C=",
                      self.line(frozenset({"smtp_confirmation"}), **flags))
