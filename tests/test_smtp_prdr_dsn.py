"""PRDR and DSN pass-through in the smtp transport (the client side).

In memory: the dialogues of tests/data/prdr-09-client-full-sequence.txt and
tests/data/dsn-05-client-relays-dsn-params.txt (Exim 4.96 as a client).
Against a real Exim 4.96 receiving daemon: PRDR with an
``acl_smtp_data_prdr`` that accepts, defers and refuses recipients; the
DSN parameters arriving intact in Exim's -H file; a next hop without DSN
and the "relayed to non-DSN-aware mailer" success DSN
(tests/data/dsn-success-nondsn-nexthop.eml).
"""

from __future__ import annotations

import glob
import os
import re
import shutil
import tempfile
import time
from typing import Any

from twisted.internet import defer, reactor
from twisted.python.threadpool import ThreadPool
from twisted.trial import unittest as trial

from tests.test_delivery_peers import ID, Exim4Daemon, message_lines
from tests.test_smtp_transport import (
    BODY,
    SENDER,
    SENDER_CONFIG,
    _client,
    _require_exim,
    _take,
    delivery_settings,
)
from twisted_mta.config import parse_config_text
from twisted_mta.dsn import DsnOptions, success_dsn, wants_success_dsn
from twisted_mta.queue.deliver import COMPLETED, INCOMPLETE, DeliverySettings, MessageDelivery
from twisted_mta.spool.header import parse_header_file
from twisted_mta.spool.message import (
    DSN_RET_FULL,
    NOTIFY_DELAY,
    NOTIFY_NEVER,
    NOTIFY_SUCCESS,
    Recipient,
    SpoolHeader,
    SpoolMessage,
)
from twisted_mta.spool.store import Spool

EHLO_PRDR_DSN = (b"250-fake\r\n250-DSN\r\n250-PRDR\r\n250 OK\r\n")


class ClientDialogueTests(trial.TestCase):

    def _start(self, ehlo: bytes) -> Any:
        client, transport, clock = _client()
        d = defer.Deferred.fromCoroutine(client.greeting())
        client.protocol.dataReceived(b"220 fake ESMTP\r\n")
        self.successResultOf(d)
        d = defer.Deferred.fromCoroutine(client.hello("myhost.test.ex"))
        _take(transport)
        client.protocol.dataReceived(ehlo)
        self.successResultOf(d)
        return client, transport

    def test_prdr_full_sequence(self) -> None:
        # tests/data/prdr-09-client-full-sequence.txt
        client, transport = self._start(b"250-\r\n250-PRDR\r\n250 OK\r\n")
        d = defer.Deferred.fromCoroutine(client.transaction(
            "userx@test.ex", ["usery@test.ex", "userz@test.ex"], [b".\r\n"], prdr=True))
        self.assertEqual(_take(transport), b"MAIL FROM:<userx@test.ex> PRDR\r\n")
        client.protocol.dataReceived(b"250 OK\r\n")
        self.assertEqual(_take(transport), b"RCPT TO:<usery@test.ex>\r\n")
        client.protocol.dataReceived(b"250 OK\r\n")
        self.assertEqual(_take(transport), b"RCPT TO:<userz@test.ex>\r\n")
        client.protocol.dataReceived(b"250 OK\r\n")
        self.assertEqual(_take(transport), b"DATA\r\n")
        client.protocol.dataReceived(b"300 gimme yer body\r\n")
        self.assertEqual(_take(transport), b".\r\n")
        client.protocol.dataReceived(b"353 prdr responses coming up\r\n"
                                     b"250 first rcpt was good\r\n")
        self.assertNoResult(d)
        client.protocol.dataReceived(b"250 second rcpt was good\r\n250 OK, overall\r\n")
        result = self.successResultOf(d)
        self.assertTrue(result.prdr)
        self.assertIsNone(result.error)
        self.assertEqual([r.text for r in result.prdr_replies],
                         ["250 first rcpt was good", "250 second rcpt was good"])
        self.assertEqual(result.data_reply.text, "250 OK, overall")

    def test_prdr_not_done_by_the_server_and_single_recipient(self) -> None:
        client, transport = self._start(b"250-x\r\n250 PRDR\r\n")
        d = defer.Deferred.fromCoroutine(client.transaction(
            "s@x", ["a@y", "b@y"], [b".\r\n"], prdr=True))
        client.protocol.dataReceived(b"250 OK\r\n250 OK\r\n250 OK\r\n354 go\r\n")
        client.protocol.dataReceived(b"250 OK got that\r\n")
        result = self.successResultOf(d)
        self.assertTrue(result.prdr_requested)
        self.assertFalse(result.prdr)
        self.assertEqual(result.data_reply.text, "250 OK got that")
        # One recipient: no PRDR asked for.
        d = defer.Deferred.fromCoroutine(client.transaction("s@x", ["a@y"], [b".\r\n"],
                                                            prdr=True))
        self.assertEqual(_take(transport).split(b"\r\n")[-2], b"MAIL FROM:<s@x>")

    def test_dsn_parameters_order(self) -> None:
        # tests/data/dsn-05-client-relays-dsn-params.txt
        client, transport = self._start(EHLO_PRDR_DSN)
        defer.Deferred.fromCoroutine(client.transaction(
            "sender@test.ex", ["r1@remote.ex", "r2@remote.ex", "r3@remote.ex"],
            [b".\r\n"], prdr=True, mail_params=" RET=FULL ENVID=abc+2Bd",
            rcpt_params=[" NOTIFY=SUCCESS,DELAY ORCPT=rfc822;r1@remote.ex", "",
                         " NOTIFY=NEVER"]))
        self.assertEqual(_take(transport), b"MAIL FROM:<sender@test.ex> PRDR RET=FULL "
                         b"ENVID=abc+2Bd\r\n")


# -- against Exim 4.96 -------------------------------------------------------------------

PRDR_RECEIVER = r"""
queue_only
acl_smtp_rcpt = accept
prdr_enable
tls_advertise_hosts =
acl_smtp_data_prdr = acl_prdr
begin acl
acl_prdr:
  deny    local_parts = bad
  defer   local_parts = later
  accept
"""

DSN_RECEIVER = r"""
queue_only
acl_smtp_rcpt = accept
dsn_advertise_hosts = *
tls_advertise_hosts =
"""

NO_DSN_RECEIVER = r"""
queue_only
acl_smtp_rcpt = accept
tls_advertise_hosts =
"""


class _Dsn:
    """Stands for the DsnSender: keeps the success DSN text it would send."""

    def __init__(self, config: Any) -> None:
        self.config = config
        self.texts: list[str] = []
        self.delivered: list[Any] = []

    async def send_success(self, message: Any, delivered: list[Any],
                           ctx: Any = None) -> list[str]:
        self.delivered.extend(delivered)
        wanted = [a for a in delivered if wants_success_dsn(a, self.config)]
        if wanted:
            options = DsnOptions(from_text="Mail Delivery System <Mailer-Daemon@x.test>",
                                 reporting_mta="exim-py.test",
                                 primary_hostname="exim-py.test", config=self.config)
            self.texts.append(success_dsn(message, wanted, options, "BOUNDARY"))
        return []

    async def send_warning(self, *args: Any, **kw: Any) -> None:
        return None


class _Base(trial.TestCase):

    def setUp(self) -> None:
        _require_exim()
        self.pool = ThreadPool(1, 4)
        self.pool.start()
        self.addCleanup(self.pool.stop)
        self.tmp = tempfile.mkdtemp(prefix="exim-py-prdr-")
        self.addCleanup(shutil.rmtree, self.tmp, True)
        self.spool = Spool(self.tmp)
        self.bounced: list[Any] = []

    def start_exim(self, text: str) -> None:
        self.exim = Exim4Daemon(text)
        self.addCleanup(self.exim.cleanup)
        self.exim.start()

    def settings(self, extra: str = "", router_extra: str = "") -> DeliverySettings:
        text = SENDER_CONFIG.replace("@HOSTS@", "127.0.0.1").replace(
            "@PORT@", str(self.exim.port)).replace("@EXTRA@", extra)
        if router_extra:
            text = text.replace("  self = send\n", f"  self = send\n{router_extra}\n")
        self.dsn = _Dsn(parse_config_text(text))
        return delivery_settings(self, text, dsn=self.dsn)

    async def deliver(self, recipients: list[Recipient], *, dsn_ret: int = 0,
                      dsn_envid: str | None = None, **kw: Any) -> tuple[str, list[str]]:
        settings = self.settings(**kw)
        message_id = "1xa0Ih-00035i-01"
        now = int(time.time())
        self.spool.write_message(SpoolMessage(
            id=message_id, sender=SENDER, received=(now, 0), received_complete=(now, 1),
            received_protocol="esmtp", recipients=recipients,
            headers=[SpoolHeader("Subject: prdr and dsn\n"),
                     SpoolHeader("From: s@x.test\n")],
            deliver_firsttime=True, body_linecount=5, dsn_ret=dsn_ret,
            dsn_envid=dsn_envid), BODY)
        result = await MessageDelivery(settings, message_id).run()
        return result.outcome, message_lines(self.stream.getvalue(), message_id)

    def exim_header(self) -> tuple[str, Any]:
        paths = glob.glob(os.path.join(self.exim.directory, "spool", "input", "**", "*-H"),
                          recursive=True)
        self.assertEqual(len(paths), 1)
        with open(paths[0], "rb") as f:
            data = f.read()
        return data.decode("latin-1"), parse_header_file(data)



class PrdrDsnToEximTests(_Base):

    async def test_prdr_mixed_per_recipient_verdicts(self) -> None:
        self.start_exim(PRDR_RECEIVER)
        outcome, lines = await self.deliver(
            [Recipient(r) for r in ("a@y.test", "bad@y.test", "later@y.test", "b@y.test")])
        self.assertEqual(outcome, INCOMPLETE, lines)
        host = "R=remote T=remote_smtp H=127.0.0.1 [127.0.0.1]"
        final = rf"250 id=({ID}) message accepted for some recipients"
        # Exim offers CHUNKING: PRDR with BDAT, " K", errors after "BDAT <n> LAST".
        self.assertRegex(lines[0], rf'^=> a@y\.test {re.escape(host)} PRDR K '
                         rf'C="250 PRDR R=<a@y\.test> acceptance\\\\n{final}"$')
        self.assertTrue(any(re.fullmatch(rf"\*\* bad@y\.test {re.escape(host)}: PRDR error "
                                         r"after BDAT \d+ LAST: 550 PRDR R=<bad@y\.test> "
                                         "refusal", line) for line in lines), lines)
        self.assertTrue(any(re.fullmatch(
            r"== later@y\.test R=remote T=remote_smtp defer \(0\) H=127\.0\.0\.1 "
            r"\[127\.0\.0\.1\]: PRDR error after BDAT \d+ LAST: 450 PRDR R=<later@y\.test> "
            "temporary refusal", line) for line in lines), lines)
        self.assertTrue(any(re.match(rf'^-> b@y\.test {re.escape(host)} PRDR K '
                                     r'C="250 PRDR R=<b@y\.test> acceptance', line)
                            for line in lines), lines)
        self.assertEqual([a.address for a in self.bounced], ["bad@y.test"])
        self.assertEqual(self.bounced[0].extra["pass_message"], True)
        self.assertIsNotNone(self.retry.read_any("R:later@y.test:<s@x.test>"))
        # What Exim got and logged.
        exim_id = re.search(final, lines[0]).group(1)
        log = self.exim.mainlog()
        self.assertIn(f"{exim_id} <= s@x.test H=(exim-py.test) [127.0.0.1] P=esmtp PRDR K ",
                      log)
        self.assertIn("PRDR R=<bad@y.test> refusal", log)
        self.assertIn("PRDR R=<later@y.test> temporary refusal", log)
        _, header = self.exim_header()
        self.assertEqual([r.address for r in header.recipients], ["a@y.test", "b@y.test"])

    async def test_no_prdr_with_hosts_try_prdr_unset_or_one_recipient(self) -> None:
        self.start_exim(PRDR_RECEIVER)
        outcome, lines = await self.deliver(
            [Recipient("a@y.test"), Recipient("bad@y.test")], extra="  hosts_try_prdr =")
        self.assertEqual(outcome, COMPLETED, lines)
        self.assertRegex(lines[0], rf'^=> a@y\.test .*\] K C="250- .*\\\\n250 OK id={ID}"$')
        self.assertRegex(lines[1], rf'^-> bad@y\.test .*\] K C="250- .*\\\\n250 OK id={ID}"$')
        self.assertNotIn(" PRDR", self.exim.mainlog())

    async def test_dsn_parameters_arrive_at_exim_intact(self) -> None:
        self.start_exim(DSN_RECEIVER)
        outcome, lines = await self.deliver(
            [Recipient("r1@y.test", orcpt="rfc822;r1+2Bx@y.test",
                       dsn_flags=NOTIFY_SUCCESS | NOTIFY_DELAY),
             Recipient("r2@y.test"),
             Recipient("r3@y.test", dsn_flags=NOTIFY_NEVER)],
            dsn_ret=DSN_RET_FULL, dsn_envid="abc+2Bd")
        self.assertEqual(outcome, COMPLETED, lines)
        text, header = self.exim_header()
        self.assertIn("-dsn_ret 1\n", text)
        self.assertIn("-dsn_envid abc+2Bd\n", text)
        self.assertEqual(header.dsn_ret, DSN_RET_FULL)
        self.assertEqual(header.dsn_envid, "abc+2Bd")
        got = {r.address: (r.orcpt, r.dsn_flags) for r in header.recipients}
        self.assertEqual(got, {"r1@y.test": ("rfc822;r1+2Bx@y.test",
                                             NOTIFY_SUCCESS | NOTIFY_DELAY),
                               "r2@y.test": (None, 0),
                               "r3@y.test": (None, NOTIFY_NEVER)})
        # The next hop takes the DSN duty: no success DSN here.
        self.assertEqual(self.dsn.texts, [])
        self.assertTrue(all(a.extra["dsn_aware"] is True for a in self.dsn.delivered))

    async def test_dsn_lasthop_stops_the_parameters(self) -> None:
        self.start_exim(DSN_RECEIVER)
        outcome, lines = await self.deliver(
            [Recipient("r1@y.test", orcpt="rfc822;r1@y.test", dsn_flags=NOTIFY_SUCCESS)],
            dsn_ret=DSN_RET_FULL, dsn_envid="e1", router_extra="  dsn_lasthop")
        self.assertEqual(outcome, COMPLETED, lines)
        text, header = self.exim_header()
        self.assertNotIn("-dsn_ret", text)
        self.assertNotIn("-dsn_envid", text)
        self.assertEqual((header.recipients[0].orcpt, header.recipients[0].dsn_flags),
                         (None, 0))
        self.assertEqual(len(self.dsn.texts), 1)
        self.assertIn("<r1@y.test> (relayed via non DSN router)", self.dsn.texts[0])

    async def test_next_hop_without_dsn_gets_none_and_a_relayed_dsn_is_made(self) -> None:
        self.start_exim(NO_DSN_RECEIVER)
        outcome, lines = await self.deliver(
            [Recipient("nd1@y.test", orcpt="rfc822;nd1@y.test", dsn_flags=NOTIFY_SUCCESS)],
            dsn_ret=DSN_RET_FULL, dsn_envid="e2")
        self.assertEqual(outcome, COMPLETED, lines)
        text, _ = self.exim_header()
        self.assertNotIn("-dsn_", text)
        self.assertIs(self.dsn.delivered[0].extra["dsn_aware"], False)
        self.assertEqual(len(self.dsn.texts), 1)
        dsn = self.dsn.texts[0]
        # tests/data/dsn-success-nondsn-nexthop.eml
        self.assertIn("<nd1@y.test> (relayed to non-DSN-aware mailer)\n", dsn)
        self.assertIn("Original-Envelope-ID: e2\n", dsn)
        self.assertIn("Action: delivered\nFinal-Recipient: rfc822;nd1@y.test\n"
                      "Status: 2.0.0\nRemote-MTA: dns; 127.0.0.1\n"
                      "Diagnostic-Code: smtp; 250 Ok\n", dsn)


class _FakePrdrServer:
    """A server offering PRDR whose replies after the final dot are
    *after_dot* (the 353, per-recipient replies and the overall reply)."""

    def __init__(self, after_dot: bytes) -> None:
        from twisted.internet.protocol import Factory
        from twisted.protocols.basic import LineReceiver

        class Server(LineReceiver):
            in_data = False

            def connectionMade(self) -> None:
                self.sendLine(b"220 fake.test ESMTP")

            def lineReceived(self, line: bytes) -> None:
                if self.in_data:
                    if line == b".":
                        self.in_data = False
                        self.transport.write(after_dot)
                    return
                verb = line.split(b" ")[0].split(b":")[0].upper()
                if verb == b"EHLO":
                    self.sendLine(b"250-fake.test\r\n250-PIPELINING\r\n250 PRDR")
                elif verb == b"DATA":
                    self.in_data = True
                    self.sendLine(b"354 go")
                elif verb == b"QUIT":
                    self.sendLine(b"221 bye")
                else:
                    self.sendLine(b"250 OK")

        self.listener = reactor.listenTCP(0, Factory.forProtocol(Server),
                                          interface="127.0.0.1")
        self.port = self.listener.getHost().port


class OverallReplyAfterPrdrTests(_Base):
    """The overall reply overrides the per-recipient ones as in Exim."""

    def start_fake(self, after_dot: bytes) -> None:
        server = _FakePrdrServer(after_dot)
        self.addCleanup(server.listener.stopListening)
        self.exim = server  # settings() reads .port

    async def test_overall_5xx_fails_every_recipient(self) -> None:
        self.start_fake(b"353 go on\r\n250 first ok\r\n450 second later\r\n"
                        b"550 oops, overall rejection\r\n")
        outcome, lines = await self.deliver([Recipient("a@y.test"), Recipient("b@y.test")])
        self.assertEqual(outcome, COMPLETED, lines)
        self.assertEqual(sorted(lines[:2]), [
            f"** {r} R=remote T=remote_smtp H=127.0.0.1 [127.0.0.1]: SMTP error from "
            "remote mail server after end of data: 550 oops, overall rejection"
            for r in ("a@y.test", "b@y.test")])

    async def test_overall_4xx_defers_the_accepted_ones(self) -> None:
        self.start_fake(b"353 go on\r\n250 first ok\r\n550 second no\r\n"
                        b"451 overall later\r\n")
        outcome, lines = await self.deliver([Recipient("a@y.test"), Recipient("b@y.test")])
        self.assertEqual(outcome, INCOMPLETE, lines)
        self.assertIn("== a@y.test R=remote T=remote_smtp defer (-46) H=127.0.0.1 "
                      "[127.0.0.1]: SMTP error from remote mail server after end of data: "
                      "451 overall later", lines)
        self.assertIn("** b@y.test R=remote T=remote_smtp H=127.0.0.1 [127.0.0.1]: "
                      "PRDR error after DATA: 550 second no", lines)

    async def test_multiline_per_recipient_reply_in_the_confirmation(self) -> None:
        self.start_fake(b"353 go on\r\n250-first\r\n250 ok\r\n250 second ok\r\n"
                        b"250 OK, overall\r\n")
        outcome, lines = await self.deliver([Recipient("a@y.test"), Recipient("b@y.test")])
        self.assertEqual(outcome, COMPLETED, lines)
        self.assertTrue(lines[0].endswith(' PRDR C="250-first\\\\n250 ok\\\\n'
                                          '250 OK, overall"'), lines)
