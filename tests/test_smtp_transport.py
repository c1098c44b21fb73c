"""The smtp transport and its client protocol (twisted_mta/smtp/client.py,
twisted_mta/transports/smtp.py).

The protocol tests run in memory: a StringTransport stands for the
connection, the test writes the server's replies, and timeouts run on a
task.Clock.  The peer tests deliver from exim-py (in-process, manualroute
to the smtp transport) to a real Exim 4.96 daemon on a free port that
queues what it accepts (``queue_only``), and read Exim's spool and log.
"""

from __future__ import annotations

import glob
import io
import os
import re
import shutil
import tempfile
import time
from typing import Any

from twisted.internet import defer, reactor, task
from twisted.internet import error as terror
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool
from twisted.trial import unittest as trial

from tests.peers import free_port, require_program
from tests.test_delivery_peers import EXIM, ID, Exim4Daemon, message_lines
from twisted_mta.config import parse_config_text
from twisted_mta.log import EximLog, SyncLogWriter
from twisted_mta.queue.deliver import COMPLETED, INCOMPLETE, DeliverySettings, MessageDelivery
from twisted_mta.queue.retry import RetryRules, open_retry_database
from twisted_mta.smtp.client import (
    ClientProtocol,
    ClientSettings,
    ConnectError,
    SMTPClient,
    SMTPClientError,
    connect,
    dot_stuffed,
)
from twisted_mta.spool.message import Recipient, SpoolHeader, SpoolMessage
from twisted_mta.spool.store import Spool
from twisted_mta.transports import drivers

SENDER = "s@x.test"


def _client(settings: ClientSettings | None = None) -> tuple[SMTPClient, StringTransport,
                                                             task.Clock]:
    clock = task.Clock()
    protocol = ClientProtocol()
    transport = StringTransport()
    protocol.makeConnection(transport)
    client = SMTPClient(protocol, transport, clock, settings or ClientSettings())
    return client, transport, clock


def _take(transport: StringTransport) -> bytes:
    value = transport.value()
    transport.clear()
    return value


EHLO_FULL = (b"250-mx.test Hello\r\n250-SIZE 52428800\r\n250-8BITMIME\r\n"
             b"250-PIPELINING\r\n250 HELP\r\n")


class ClientProtocolTests(trial.TestCase):

    def _start(self, ehlo: bytes = EHLO_FULL, **kw: Any) -> tuple[SMTPClient, StringTransport,
                                                                  task.Clock]:
        client, transport, clock = _client(**kw)
        d = defer.Deferred.fromCoroutine(client.greeting())
        client.protocol.dataReceived(b"220 mx.test ESMTP\r\n")
        self.assertEqual(self.successResultOf(d).code, 220)
        d = defer.Deferred.fromCoroutine(client.hello("me.test"))
        self.assertEqual(_take(transport), b"EHLO me.test\r\n")
        client.protocol.dataReceived(ehlo)
        self.successResultOf(d)
        return client, transport, clock

    def test_pipelined_transaction_with_per_recipient_replies(self) -> None:
        client, transport, _ = self._start()
        self.assertTrue(client.offers("pipelining"))
        self.assertEqual(client.extensions["SIZE"], "52428800")
        data = list(dot_stuffed([b"Subject: x\n", b"\n", b".hidden\n", b"end\n"]))
        d = defer.Deferred.fromCoroutine(client.transaction(
            SENDER, ["a@y", "b@y", "c@y"], data, size=1234, eight_bit=True))
        # MAIL, the RCPTs and DATA go in one write.
        self.assertEqual(_take(transport), (
            b"MAIL FROM:<s@x.test> SIZE=1234 BODY=8BITMIME\r\nRCPT TO:<a@y>\r\n"
            b"RCPT TO:<b@y>\r\nRCPT TO:<c@y>\r\nDATA\r\n"))
        client.protocol.dataReceived(b"250 OK\r\n250 Accepted\r\n450 later\r\n"
                                     b"550-no such\r\n550 user\r\n354 go ahead\r\n")
        self.assertEqual(_take(transport),
                         b"Subject: x\r\n\r\n..hidden\r\nend\r\n.\r\n")
        self.assertNoResult(d)
        client.protocol.dataReceived(b"250 OK id=1abc\r\n")
        result = self.successResultOf(d)
        self.assertIsNone(result.error)
        self.assertEqual([r.code for r in result.rcpt_replies], [250, 450, 550])
        self.assertEqual(result.rcpt_replies[2].text, "550-no such\n550 user")
        self.assertEqual(result.data_reply.text, "250 OK id=1abc")

    def test_hosts_avoid_pipelining_waits_for_each_reply(self) -> None:
        client, transport, _ = self._start(EHLO_FULL)
        client.pipelining = False
        d = defer.Deferred.fromCoroutine(client.transaction(SENDER, ["a@y"], [b".\r\n"]))
        self.assertEqual(_take(transport), b"MAIL FROM:<s@x.test>\r\n")
        client.protocol.dataReceived(b"250 OK\r\n")
        self.assertEqual(_take(transport), b"RCPT TO:<a@y>\r\n")
        client.protocol.dataReceived(b"250 OK\r\n")
        self.assertEqual(_take(transport), b"DATA\r\n")
        client.protocol.dataReceived(b"354 go\r\n")
        self.assertEqual(_take(transport), b".\r\n")
        client.protocol.dataReceived(b"250 done\r\n")
        self.assertEqual(self.successResultOf(d).data_reply.code, 250)

    def test_without_pipelining_commands_wait_for_replies(self) -> None:
        client, transport, _ = self._start(b"250-mx.test\r\n250 SIZE\r\n")
        d = defer.Deferred.fromCoroutine(client.transaction(
            SENDER, ["a@y", "b@y"], [b".\r\n"], size=10, eight_bit=True))
        # SIZE offered, 8BITMIME not.
        self.assertEqual(_take(transport), b"MAIL FROM:<s@x.test> SIZE=10\r\n")
        client.protocol.dataReceived(b"250 OK\r\n")
        self.assertEqual(_take(transport), b"RCPT TO:<a@y>\r\n")
        client.protocol.dataReceived(b"550 no\r\n")
        self.assertEqual(_take(transport), b"RCPT TO:<b@y>\r\n")
        client.protocol.dataReceived(b"250 OK\r\n")
        self.assertEqual(_take(transport), b"DATA\r\n")
        client.protocol.dataReceived(b"354 go\r\n")
        self.assertEqual(_take(transport), b".\r\n")
        client.protocol.dataReceived(b"250 done\r\n")
        result = self.successResultOf(d)
        self.assertEqual([r.code for r in result.rcpt_replies], [550, 250])
        self.assertEqual(result.data_reply.code, 250)

    def test_no_recipient_accepted_sends_no_data(self) -> None:
        client, transport, _ = self._start(b"250 mx.test\r\n")
        d = defer.Deferred.fromCoroutine(client.transaction(SENDER, ["a@y"], [b".\r\n"]))
        client.protocol.dataReceived(b"250 OK\r\n")
        _take(transport)
        client.protocol.dataReceived(b"550 no\r\n")
        result = self.successResultOf(d)
        self.assertIsNone(result.data_reply)
        self.assertEqual(transport.value(), b"")

    def test_helo_when_ehlo_is_refused(self) -> None:
        # Any reply but 2xx, 4xx too, as Exim's smtp_reap_ehlo().
        for refusal in (b"500 what?\r\n", b"421 later\r\n"):
            client, transport, _ = _client()
            d = defer.Deferred.fromCoroutine(client.hello("me.test"))
            self.assertEqual(_take(transport), b"EHLO me.test\r\n")
            client.protocol.dataReceived(refusal)
            self.assertEqual(_take(transport), b"HELO me.test\r\n")
            client.protocol.dataReceived(b"250 mx.test\r\n")
            self.assertEqual(self.successResultOf(d).code, 250)
            self.assertFalse(client.esmtp)
            self.assertEqual(client.ehlo_reply.lines, [refusal.decode().strip()])

    def test_4xx_greeting_is_an_error_reply(self) -> None:
        client, _, _ = _client()
        d = defer.Deferred.fromCoroutine(client.greeting())
        client.protocol.dataReceived(b"421 busy\r\n")
        error = self.failureResultOf(d, SMTPClientError).value
        self.assertEqual(error.message,
                         "SMTP error from remote mail server after initial connection: "
                         "421 busy")

    def test_command_timeout(self) -> None:
        client, _, clock = self._start(settings=ClientSettings(command_timeout=30))
        d = defer.Deferred.fromCoroutine(client.transaction(SENDER, ["a@y"], [b".\r\n"]))
        clock.advance(29)
        self.assertNoResult(d)
        clock.advance(1)
        result = self.successResultOf(d)
        self.assertEqual(result.error.message,
                         "SMTP timeout after pipelined MAIL FROM:<s@x.test>")
        self.assertEqual(result.error.errno, 110)

    def test_final_timeout(self) -> None:
        client, _, clock = self._start(
            settings=ClientSettings(command_timeout=30, final_timeout=100))
        d = defer.Deferred.fromCoroutine(client.transaction(SENDER, ["a@y"], [b"x\r\n.\r\n"]))
        client.protocol.dataReceived(b"250 OK\r\n250 OK\r\n354 go\r\n")
        clock.advance(99)
        self.assertNoResult(d)
        clock.advance(1)
        result = self.successResultOf(d)
        self.assertEqual(result.error.message,
                         "SMTP timeout after end of data (6 bytes written)")

    def test_error_after_data(self) -> None:
        client, _, _ = self._start()
        d = defer.Deferred.fromCoroutine(client.transaction(SENDER, ["a@y"], [b".\r\n"]))
        client.protocol.dataReceived(b"250 OK\r\n250 OK\r\n354 go\r\n451 local problem\r\n")
        result = self.successResultOf(d)
        self.assertEqual(result.error.message,
                         "SMTP error from remote mail server after end of data: "
                         "451 local problem")

    def test_malformed_and_closed(self) -> None:
        client, _, _ = _client()
        d = defer.Deferred.fromCoroutine(client.greeting())
        client.protocol.dataReceived(b"hello there\r\n")
        self.assertEqual(self.failureResultOf(d, SMTPClientError).value.message,
                         "Malformed SMTP reply in response to initial connection: "
                         "hello there")
        client, _, _ = _client()
        d = defer.Deferred.fromCoroutine(client.greeting())
        client.protocol.connectionLost(None)
        error = self.failureResultOf(d, SMTPClientError).value
        self.assertEqual((error.message, error.errno),
                         ("Remote host closed connection in response to initial connection",
                          -18))

    def test_data_timeout_while_the_connection_is_full(self) -> None:
        client, transport, clock = self._start(settings=ClientSettings(data_timeout=50))
        client.protocol.pauseProducing()
        d = defer.Deferred.fromCoroutine(client.transaction(
            SENDER, ["a@y"], [b"x" * 70000 + b"\r\n", b".\r\n"]))
        client.protocol.dataReceived(b"250 OK\r\n250 OK\r\n354 go\r\n")
        clock.advance(49)
        self.assertNoResult(d)
        clock.advance(1)
        self.assertEqual(self.successResultOf(d).error.message,
                         "SMTP timeout after sending data block (70002 bytes written)")

    def test_data_resumes_when_the_transport_drains(self) -> None:
        client, transport, clock = self._start(settings=ClientSettings(data_timeout=50))
        client.protocol.pauseProducing()
        d = defer.Deferred.fromCoroutine(client.transaction(
            SENDER, ["a@y"], [b"x" * 70000 + b"\r\n", b".\r\n"]))
        client.protocol.dataReceived(b"250 OK\r\n250 OK\r\n354 go\r\n")
        clock.advance(10)
        client.protocol.resumeProducing()
        self.assertTrue(transport.value().endswith(b"\r\n.\r\n"))
        client.protocol.dataReceived(b"250 OK id=x\r\n")
        self.assertIsNone(self.successResultOf(d).error)

    def test_connect_timeout_on_the_clock(self) -> None:
        memory = MemoryReactorClock()
        d = defer.Deferred.fromCoroutine(connect(memory, memory, "192.0.2.1", 25,
                                                 timeout=30, interface="127.0.0.1"))
        host, port, _, timeout, bind = memory.tcpClients[0]
        self.assertEqual((host, port, bind), ("192.0.2.1", 25, ("127.0.0.1", 0)))
        memory.advance(29)
        self.assertNoResult(d)
        memory.advance(1)
        error = self.failureResultOf(d, ConnectError).value
        self.assertEqual((error.errno, error.message), (110, "Connection timed out"))

    def test_connection_refused(self) -> None:
        memory = MemoryReactorClock()
        d = defer.Deferred.fromCoroutine(connect(memory, memory, "192.0.2.1", 25,
                                                 timeout=30))
        factory = memory.tcpClients[0][2]
        factory.clientConnectionFailed(None, Failure(terror.ConnectionRefusedError()))
        error = self.failureResultOf(d, ConnectError).value
        self.assertEqual((error.errno, error.message), (111, "Connection refused"))

    def test_dot_stuffing(self) -> None:
        self.assertEqual(b"".join(dot_stuffed([b".\n", b"..a\n", b"b\r\n"])),
                         b"..\r\n...a\r\nb\r\n.\r\n")

    def test_driver_is_registered_as_remote(self) -> None:
        driver = drivers()["smtp"]
        self.assertFalse(driver.local)


# -- against Exim 4.96 -------------------------------------------------------------------

RECEIVER_CONFIG = r"""
queue_only
acl_smtp_rcpt = acl_rcpt
acl_smtp_data = acl_data
tls_advertise_hosts =
begin acl
acl_data:
  deny    condition = ${if match{$h_subject:}{reject}}
          message = content rejected
  defer   condition = ${if match{$h_subject:}{later}}
          message = content deferred
  accept
acl_rcpt:
  deny    local_parts = nosuch
          message = no such user
  defer   local_parts = later
          message = try again later
  accept
"""

SENDER_CONFIG = r"""
primary_hostname = exim-py.test
log_selector = +smtp_confirmation
begin retry
*  *  F,1h,10m
begin routers
remote:
  driver = manualroute
  route_list = * "@HOSTS@"
  transport = remote_smtp
  self = send
begin transports
remote_smtp:
  driver = smtp
  port = @PORT@
  command_timeout = 20s
@EXTRA@
"""

BODY = b"first line\n.dot line\n..two dots\n.\nlast line\n"


def _require_exim() -> None:
    require_program(EXIM)
    if os.geteuid() != 0:
        from tests.test_delivery_peers import _require

        _require(False, "exim4 -C needs root")


def spool_message(spool: Spool, recipients: list[str], number: int = 1,
                  subject: str = "smtp transport", age: int = 0) -> str:
    """Write message ``1xa0Ih-00035i-0<number>`` to *spool*; its id."""
    message_id = f"1xa0Ih-00035i-0{number}"
    now = int(time.time()) - age
    spool.write_message(SpoolMessage(
        id=message_id, sender=SENDER, received=(now, 0), received_complete=(now, 1),
        received_protocol="esmtp", recipients=[Recipient(r) for r in recipients],
        headers=[SpoolHeader(f"Subject: {subject}\n"), SpoolHeader("From: s@x.test\n")],
        deliver_firsttime=True, body_linecount=5), BODY)
    return message_id


def delivery_settings(test: Any, text: str, **kw: Any) -> DeliverySettings:
    """Delivery settings for the configuration *text* in a peer test: the
    log lines go to ``test.stream``, failures to ``test.bounced`` (no DSNs
    unless *kw* gives a ``dsn``), retry hints under ``test.tmp``, blocking
    work to ``test.pool``."""
    config = parse_config_text(text)
    test.stream = io.StringIO()
    log = EximLog.from_config(config, reactor, os.getpid(), SyncLogWriter(),
                              testing_stream=test.stream)
    test.retry = open_retry_database(test.tmp, RetryRules(config), clock=reactor)

    async def bounce(message: Any, failed: list[Any]) -> None:
        test.bounced.extend(failed)

    kw.setdefault("send_dsns", "dsn" in kw)
    return DeliverySettings(config, test.spool, log, reactor, reactor,
                            threadpool=test.pool, retry=test.retry, bounce=bounce, **kw)


class DeliveryToEximTests(trial.TestCase):

    def setUp(self) -> None:
        _require_exim()
        self.exim = Exim4Daemon(RECEIVER_CONFIG)
        self.addCleanup(self.exim.cleanup)
        self.exim.start()
        self.pool = ThreadPool(1, 4)
        self.pool.start()
        self.addCleanup(self.pool.stop)
        self.tmp = tempfile.mkdtemp(prefix="exim-py-smtp-")
        self.addCleanup(shutil.rmtree, self.tmp, True)
        self.spool = Spool(self.tmp)
        self.bounced: list[Any] = []

    def settings(self, hosts: str = "127.0.0.1", port: int | None = None,
                 extra: str = "") -> DeliverySettings:
        text = SENDER_CONFIG.replace("@HOSTS@", hosts).replace(
            "@PORT@", str(port or self.exim.port)).replace("@EXTRA@", extra)
        return delivery_settings(self, text)

    async def deliver(self, settings: DeliverySettings, recipients: list[str],
                      number: int = 1, subject: str = "smtp transport",
                      age: int = 0) -> tuple[str, list[str]]:
        message_id = spool_message(self.spool, recipients, number, subject, age)
        result = await MessageDelivery(self.settings_used, message_id).run()
        return result.outcome, message_lines(self.stream.getvalue(), message_id)

    async def run_delivery(self, recipients: list[str], subject: str = "smtp transport",
                           age: int = 0, **kw: Any) -> tuple[str, list[str]]:
        self.settings_used = self.settings(**kw)
        return await self.deliver(self.settings_used, recipients, subject=subject, age=age)

    def exim_messages(self) -> list[bytes]:
        found = []
        for path in sorted(glob.glob(os.path.join(self.exim.directory, "spool", "input",
                                                  "**", "*-D"), recursive=True)):
            with open(path, "rb") as f:
                found.append(f.read())
        return found

    def exim_header(self) -> str:
        paths = glob.glob(os.path.join(self.exim.directory, "spool", "input", "**", "*-H"),
                          recursive=True)
        self.assertEqual(len(paths), 1)
        with open(paths[0], encoding="latin-1") as f:
            return f.read()

    async def test_two_recipients_one_transaction(self) -> None:
        outcome, lines = await self.run_delivery(["a@y.test", "b@y.test"])
        self.assertEqual(outcome, COMPLETED, lines)
        self.assertEqual(len(lines), 3, lines)
        # Exim offers CHUNKING: BDAT, " K", and its two-line reply to BDAT LAST.
        confirmation = rf'C="250- (\d+) byte chunk, total \1\\\\n250 OK id={ID}"$'
        self.assertRegex(lines[0], r'^=> a@y\.test R=remote T=remote_smtp H=127\.0\.0\.1 '
                         r'\[127\.0\.0\.1\] K ' + confirmation)
        self.assertRegex(lines[1], r'^-> b@y\.test R=remote T=remote_smtp H=127\.0\.0\.1 '
                         r'\[127\.0\.0\.1\] K ' + confirmation)
        self.assertEqual(lines[2], "Completed")
        exim_id = re.search(rf"id=({ID})", lines[0]).group(1)
        messages = self.exim_messages()
        self.assertEqual(len(messages), 1)
        self.assertEqual(messages[0], f"{exim_id}-D\n".encode() + BODY)
        header = self.exim_header()
        self.assertIn("<s@x.test>\n", header)
        self.assertIn("a@y.test\nb@y.test\n", header)
        self.assertIn("Subject: smtp transport\n", header)
        self.assertIn("helo_name exim-py.test", header)
        log = self.exim.mainlog()
        self.assertIn(f"{exim_id} <= s@x.test H=(exim-py.test) [127.0.0.1]", log)

    async def test_rejected_recipient_fails_and_is_bounced(self) -> None:
        outcome, lines = await self.run_delivery(["a@y.test", "nosuch@y.test"])
        self.assertEqual(outcome, COMPLETED, lines)
        self.assertIn("** nosuch@y.test R=remote T=remote_smtp H=127.0.0.1 [127.0.0.1]: "
                      "SMTP error from remote mail server after RCPT TO:<nosuch@y.test>: "
                      "550 no such user", lines)
        self.assertRegex(lines[0], r"^=> a@y\.test R=remote T=remote_smtp H=127\.0\.0\.1 ")
        self.assertEqual([a.address for a in self.bounced], ["nosuch@y.test"])
        self.assertTrue(self.bounced[0].extra["pass_message"])
        self.assertTrue(self.bounced[0].extra["smtp_greeting"].startswith("220 "))
        self.assertIn("Hello exim-py.test", self.bounced[0].extra["helo_response"])
        self.assertEqual(len(self.exim_messages()), 1)
        # The remote reply reaches the bounce, and with dsn_extra_info the
        # remote MTA's greeting, EHLO reply and X-Exim-Diagnostic too.
        from twisted_mta.dsn import DsnOptions, bounce_dsn
        text = bounce_dsn(SpoolMessage(id="1xa0Ih-00035i-01", sender=SENDER, received=(0, 0),
                                       received_complete=(0, 0)), self.bounced,
                          SENDER, DsnOptions("M", "exim-py.test", "exim-py.test",
                                             extra_info=True), "B", "", with_body=False)
        self.assertIn("Remote-MTA: dns; 127.0.0.1\n", text)
        self.assertIn("Diagnostic-Code: smtp; 550 no such user\n", text)
        self.assertIn("Remote-MTA: X-ip; [127.0.0.1]:", text)
        self.assertRegex(text, r"X-Remote-MTA-smtp-greeting: X-str; 220 ")
        self.assertIn("X-Exim-Diagnostic: X-str; SMTP error from remote mail server after "
                      "RCPT\n TO:<nosuch@y.test>: 550 no such user\n", text)

    async def test_4xx_recipient_is_deferred_with_a_retry_record(self) -> None:
        outcome, lines = await self.run_delivery(["later@y.test", "a@y.test"])
        self.assertEqual(outcome, INCOMPLETE, lines)
        self.assertIn("== later@y.test R=remote T=remote_smtp defer (-44) H=127.0.0.1 "
                      "[127.0.0.1]: SMTP error from remote mail server after "
                      "RCPT TO:<later@y.test>: 451 try again later", lines)
        self.assertRegex(lines[1], r"^=> a@y\.test ")
        record = self.retry.read_any("R:later@y.test:<s@x.test>")
        self.assertIsNotNone(record)
        self.assertEqual(record.basic_errno, -44)
        # The message stays for later@y.test only.
        header = self.spool.read_header("1xa0Ih-00035i-01")
        self.assertEqual([r.address for r in header.recipients
                          if r.address not in _non_recipients(header)], ["later@y.test"])

    async def test_4xx_for_a_message_older_than_the_cutoff_fails(self) -> None:
        outcome, lines = await self.run_delivery(["later@y.test"], age=7200)
        self.assertEqual(outcome, COMPLETED, lines)
        self.assertEqual(lines[0], "** later@y.test R=remote T=remote_smtp H=127.0.0.1 "
                         "[127.0.0.1]: SMTP error from remote mail server after "
                         "RCPT TO:<later@y.test>: 451 try again later: retry timeout exceeded")
        self.assertEqual([a.address for a in self.bounced], ["later@y.test"])

    async def test_hosts_failing_past_the_cutoff_fail_the_address(self) -> None:
        port = free_port()
        outcome, lines = await self.run_delivery(["a@y.test"], port=port, age=7200)
        self.assertEqual(outcome, COMPLETED, lines)
        self.assertEqual(lines[:2], ["H=127.0.0.1 [127.0.0.1] Connection refused",
                                     "** a@y.test R=remote T=remote_smtp: Connection refused: "
                                     "retry timeout exceeded"])

    async def test_refused_port_goes_to_the_fallback_host(self) -> None:
        # Nothing listens on 127.0.0.2 (exim4 is bound to 127.0.0.1 only).
        # (A router's list drops a local host after the first, as Exim's
        # does, so the second host is the transport's fallback_hosts.)
        outcome, lines = await self.run_delivery(["a@y.test"], hosts="127.0.0.2",
                                                 extra="  fallback_hosts = 127.0.0.1")
        self.assertEqual(outcome, COMPLETED, lines)
        self.assertEqual(lines[0], "H=127.0.0.2 [127.0.0.2] Connection refused")
        self.assertRegex(lines[1], r"^=> a@y\.test R=remote T=remote_smtp "
                         r"H=127\.0\.0\.1 \[127\.0\.0\.1\] ")
        port = self.exim.port
        record = self.retry.read_any(f"T:127.0.0.2:127.0.0.2:{port}")
        self.assertIsNotNone(record)
        self.assertEqual(record.basic_errno, 111)

    async def test_rcpt_4xx_is_tried_at_the_next_host(self) -> None:
        # The first Exim defers later@y.test at RCPT; a second one takes it.
        second = Exim4Daemon(RECEIVER_CONFIG.replace(
            "  defer   local_parts = later\n          message = try again later\n", ""))
        self.addCleanup(second.cleanup)
        second.start()
        hosts = (f"  hosts = 127.0.0.1::{self.exim.port} : 127.0.0.1::{second.port}\n"
                 "  hosts_override\n")
        outcome, lines = await self.run_delivery(["a@y.test", "later@y.test"], extra=hosts)
        self.assertEqual(outcome, COMPLETED, lines)
        self.assertEqual(lines[0], "H=127.0.0.1 [127.0.0.1]: SMTP error from remote mail "
                         "server after RCPT TO:<later@y.test>: 451 try again later")
        self.assertRegex(lines[1], r"^=> a@y\.test R=remote T=remote_smtp H=127\.0\.0\.1 ")
        # One transport run: "->", as for any address after the first.
        self.assertRegex(lines[2], r"^-> later@y\.test R=remote T=remote_smtp "
                         r"H=127\.0\.0\.1 \[127\.0\.0\.1\] K C=")
        self.assertEqual(len(self.exim_messages()), 1)
        self.assertIn(" <= s@x.test ", second.mainlog())
        # Delivered: the address retry record made at the first host is gone.
        self.assertIsNone(self.retry.read_any("R:later@y.test:<s@x.test>"))

    async def test_hosts_max_try(self) -> None:
        # Nothing listens on 127.0.0.2-4 (exim4 is bound to 127.0.0.1 only).
        hosts = "  hosts = 127.0.0.2 : 127.0.0.3 : 127.0.0.4\n  hosts_override\n"
        outcome, lines = await self.run_delivery(["a@y.test"],
                                                 extra=hosts + "  hosts_max_try = 2\n")
        self.assertEqual(outcome, INCOMPLETE, lines)
        refused = [x for x in lines if x.startswith("H=")]
        self.assertEqual(refused, ["H=127.0.0.2 [127.0.0.2] Connection refused",
                                   "H=127.0.0.3 [127.0.0.3] Connection refused"])

    async def test_hosts_max_try_hardlimit(self) -> None:
        hosts = "  hosts = 127.0.0.2 : 127.0.0.3 : 127.0.0.4\n  hosts_override\n"
        outcome, lines = await self.run_delivery(
            ["a@y.test"], extra=hosts + "  hosts_max_try_hardlimit = 1\n")
        self.assertEqual([x for x in lines if x.startswith("H=")],
                         ["H=127.0.0.2 [127.0.0.2] Connection refused"])

    async def test_hosts_randomize(self) -> None:
        import twisted_mta.transports.smtp as smtp_transport
        self.patch(smtp_transport.random, "sample", lambda items, n: list(reversed(items)))
        hosts = "  hosts = 127.0.0.2 : 127.0.0.3 : 127.0.0.4\n  hosts_override\n"
        for number, option, first in ((1, "", "127.0.0.2"),
                                      (2, "  hosts_randomize\n", "127.0.0.4")):
            # A fresh retry database: the first run's hosts must not be skipped.
            shutil.rmtree(os.path.join(self.tmp, "db"), ignore_errors=True)
            self.settings_used = self.settings(extra=hosts + option)
            outcome, lines = await self.deliver(self.settings_used, ["a@y.test"],
                                                number=number)
            refused = [x for x in lines if x.startswith("H=")]
            self.assertEqual(refused[0], f"H={first} [{first}] Connection refused")

    async def test_hosts_avoid_esmtp(self) -> None:
        outcome, lines = await self.run_delivery(["a@y.test"],
                                                 extra="  hosts_avoid_esmtp = *\n")
        self.assertEqual(outcome, COMPLETED, lines)
        self.assertRegex(self.exim.mainlog(), r" <= s@x\.test H=\(exim-py\.test\) "
                         r"\[127\.0\.0\.1\] P=smtp ")

    async def test_max_rcpt_splits_the_batch(self) -> None:
        outcome, lines = await self.run_delivery(["a@y.test", "b@y.test", "c@y.test"],
                                                 extra="  max_rcpt = 2")
        self.assertEqual(outcome, COMPLETED, lines)
        # The two transactions run side by side (remote_max_parallel = 2),
        # so their lines may interleave; each starts with "=>".
        self.assertEqual(sorted(line[:12] for line in lines),
                         ["-> b@y.test ", "=> a@y.test ", "=> c@y.test ", "Completed"])
        starts = [line[:12] for line in lines]
        self.assertLess(starts.index("=> a@y.test "), starts.index("-> b@y.test "))
        self.assertEqual(len(self.exim_messages()), 2)

    async def test_5xx_after_data_fails_every_accepted_recipient(self) -> None:
        outcome, lines = await self.run_delivery(["a@y.test", "nosuch@y.test", "b@y.test"],
                                                 subject="please reject")
        self.assertEqual(outcome, COMPLETED, lines)
        self.assertEqual(sorted(lines[:3]), sorted([
            "** a@y.test R=remote T=remote_smtp H=127.0.0.1 [127.0.0.1]: SMTP error from "
            "remote mail server after pipelined end of data: 550 content rejected",
            "** nosuch@y.test R=remote T=remote_smtp H=127.0.0.1 [127.0.0.1]: SMTP error "
            "from remote mail server after RCPT TO:<nosuch@y.test>: 550 no such user",
            "** b@y.test R=remote T=remote_smtp H=127.0.0.1 [127.0.0.1]: SMTP error from "
            "remote mail server after pipelined end of data: 550 content rejected"]))
        self.assertEqual(sorted(a.address for a in self.bounced),
                         ["a@y.test", "b@y.test", "nosuch@y.test"])
        self.assertEqual(self.exim_messages(), [])

    async def test_4xx_after_data_defers_every_accepted_recipient(self) -> None:
        outcome, lines = await self.run_delivery(["a@y.test", "b@y.test"],
                                                 subject="later please")
        self.assertEqual(outcome, INCOMPLETE, lines)
        self.assertEqual(lines, [
            f"== {r} R=remote T=remote_smtp defer (-46) H=127.0.0.1 [127.0.0.1]: SMTP "
            "error from remote mail server after pipelined end of data: 451 content deferred"
            for r in ("a@y.test", "b@y.test")])

    async def test_4xx_greeting_goes_to_the_next_host(self) -> None:
        from twisted.internet.protocol import Factory, Protocol

        class Busy(Protocol):
            def connectionMade(self) -> None:
                self.transport.write(b"421 busy, try later\r\n")
                self.transport.loseConnection()

        listener = reactor.listenTCP(self.exim.port, Factory.forProtocol(Busy),
                                     interface="127.0.0.2")
        self.addCleanup(listener.stopListening)
        outcome, lines = await self.run_delivery(["a@y.test"], hosts="127.0.0.2",
                                                 extra="  fallback_hosts = 127.0.0.1")
        self.assertEqual(outcome, COMPLETED, lines)
        self.assertEqual(lines[0], "H=127.0.0.2 [127.0.0.2]: SMTP error from remote mail "
                         "server after initial connection: 421 busy, try later")
        self.assertRegex(lines[1], r"^=> a@y\.test R=remote T=remote_smtp "
                         r"H=127\.0\.0\.1 \[127\.0\.0\.1\] ")
        record = self.retry.read_any(f"T:127.0.0.2:127.0.0.2:{self.exim.port}")
        self.assertIsNotNone(record)
        self.assertIn("421 busy, try later", record.text)

    async def test_addresses_deferred_by_the_hosts_go_to_the_fallback_hosts(self) -> None:
        from twisted.internet.protocol import Factory
        from twisted.protocols.basic import LineReceiver

        class Grumpy(LineReceiver):
            replies = {"EHLO": "250 fake.test", "MAIL": "250 OK", "RCPT": "451 not now",
                       "DATA": "503 no valid recipients", "QUIT": "221 bye"}

            def connectionMade(self) -> None:
                self.sendLine(b"220 fake.test ESMTP")

            def lineReceived(self, line: bytes) -> None:
                verb = line.decode().split(" ")[0].split(":")[0].upper()
                self.sendLine(self.replies.get(verb, "500 what").encode())

        listener = reactor.listenTCP(self.exim.port, Factory.forProtocol(Grumpy),
                                     interface="127.0.0.2")
        self.addCleanup(listener.stopListening)
        outcome, lines = await self.run_delivery(["a@y.test", "b@y.test"], hosts="127.0.0.2",
                                                 extra="  fallback_hosts = 127.0.0.1")
        self.assertEqual(outcome, COMPLETED, lines)
        self.assertRegex(lines[0], r"^=> a@y\.test R=remote T=remote_smtp "
                         r"H=127\.0\.0\.1 \[127\.0\.0\.1\] ")
        self.assertRegex(lines[1], r"^-> b@y\.test R=remote T=remote_smtp "
                         r"H=127\.0\.0\.1 \[127\.0\.0\.1\] ")
        self.assertEqual(lines[2:], ["Completed"])
        self.assertIsNone(self.retry.read_any("R:a@y.test:<s@x.test>"))

    async def test_transport_hosts_override(self) -> None:
        outcome, lines = await self.run_delivery(
            ["a@y.test"], hosts="127.0.0.2",
            extra="  hosts = 127.0.0.2 : 127.0.0.1\n  hosts_override")
        self.assertEqual(outcome, COMPLETED, lines)
        self.assertEqual(lines[0], "H=127.0.0.2 [127.0.0.2] Connection refused")
        self.assertRegex(lines[1], r"^=> a@y\.test R=remote T=remote_smtp "
                         r"H=127\.0\.0\.1 \[127\.0\.0\.1\] ")

    async def test_refused_everywhere_defers_and_the_retry_time_is_honoured(self) -> None:
        port = free_port()
        outcome, lines = await self.run_delivery(["a@y.test"], port=port)
        self.assertEqual(outcome, INCOMPLETE, lines)
        self.assertEqual(lines, ["H=127.0.0.1 [127.0.0.1] Connection refused",
                                 "== a@y.test R=remote T=remote_smtp defer (111): "
                                 "Connection refused"])
        self.assertIsNotNone(self.retry.read_any(f"T:127.0.0.1:127.0.0.1:{port}"))
        # Tried again at once: the host waits for its retry time.
        outcome, lines = await self.deliver(self.settings_used, ["a@y.test"], number=2)
        self.assertEqual(lines, ["== a@y.test R=remote T=remote_smtp defer (-54): "
                                 "retry time not reached for any host for 'y.test'"])


def _non_recipients(header: Any) -> set[str]:
    from twisted_mta.spool.tree import tree_contains

    return {r.address for r in header.recipients
            if tree_contains(header.non_recipients, r.address)}
