"""Every event of a few smtp deliveries, recorded and checked in order.

exim-py delivers (in-process, manualroute to the smtp transport) to a real
Exim 4.96 daemon (``tests.test_smtp_tls_client``'s STARTTLS receiver with
``tests.pki``'s root -> intermediate -> leaf chain, or the plain receiver
of ``tests.test_smtp_transport``), with an ``event_action`` (main and
transport) running an ACL whose ``logwrite`` records every event.  The
tests compare the whole sequence of ``($event_name, $event_data)``, among
the ``=>``/``**``/``==``/``Completed`` lines, with what Exim 4.96 does
(src/src/deliver.c, transports/smtp.c, smtp_out.c, tls-openssl.c at tag
exim-4.96, and the test suite's test/log/5700, 5703, 5707 and 5720):

- ``tcp:connect`` (empty) before connecting, ``smtp:connect`` (the
  banner) after it, ``smtp:ehlo`` (the EHLO reply's lines joined by
  newlines, smtp_reap_ehlo()) after each EHLO, the one after STARTTLS
  included, ``tls:cert`` (the depth, 2, 1, 0) from OpenSSL's verify
  callback, ``tcp:close`` (empty) when the connection is closed; a
  connection never made raises no ``tcp:close``;
- ``msg:host:defer`` for each host that deferred and ``msg:defer`` when the
  last one did (``$event_data`` the message, ``: strerror`` added for a
  positive errno; ``$event_defer_errno`` the errno), before the ``==``
  lines; ``msg:defer`` also when the main hosts deferred, before the
  fallback hosts are tried (a second run of the transport);
- ``msg:rcpt:host:defer`` for a RCPT 4xx, then ``msg:rcpt:defer`` when
  the host was the last (sync_responses(): ``$event_data`` the address's
  message, ``$event_defer_errno`` its more_errno);
- ``msg:delivery`` after each ``=>``/``->`` line (the confirmation,
  newlines printed as ``\\n`` by string_printing()), ``msg:fail:delivery``
  before each ``**`` line of a transport failure (the error message),
  ``msg:fail:internal`` (main action) before the ``**`` line of an address
  failed by its router, ``msg:complete`` (main action, empty) after
  ``Completed``;
- the forced results: ``tcp:connect`` skips the host (errno -58, logged
  as exim_errstr()'s "Event requests alternate response"), ``tls:cert``
  refuses verification (stopping the handshake at the first refused
  certificate when verification is required), ``smtp:connect`` closes
  the connection (QUIT; errno -27);
- the transport's events for several addresses have no ``$local_part``
  (deliver_set_expansions()).
"""

from __future__ import annotations

import re
from typing import Any

from twisted.trial import unittest as trial

from tests import test_smtp_tls_client as tls_tests
from tests import test_smtp_transport as peer_tests
from tests.peers import free_port
from tests.test_delivery_peers import ID
from twisted_mta.queue.deliver import COMPLETED, INCOMPLETE, DeliverySettings

#: One line per event: the name, the defer errno, the host, the address,
#: the certificate's subject for tls:cert, and the data last (it may
#: contain the separator).
RECORD = (r"EV $event_name|$event_defer_errno|$host_address|$host_port|"
          r"$local_part@$domain|"
          r"${if eq{$event_name}{tls:cert}{${certextract{subject}{$tls_out_peercert}}}}|"
          r"$event_data")

#: The same with the old (TPDA) variable names.
RECORD_OLD = (r"EV $tpda_event_name|$tpda_event_defer_errno|$host_address|$host_port|"
              r"$local_part@$domain||$tpda_event_data")

CONFIG = r"""
primary_hostname = exim-py.test
log_selector = +smtp_confirmation
event_action = ${acl{ev}}
begin acl
ev:
  warn logwrite = @RECORD@
  accept
old:
  warn logwrite = @RECORD_OLD@
  accept
begin retry
*  *  F,1h,10m
begin routers
gone:
  driver = redirect
  domains = gone.test
  allow_fail
  data = :fail: no longer here
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
  connect_timeout = 10s
  @ACTION_OPTION@ = @ACTION@
@EXTRA@
"""

RECORD_ALL = "${acl{ev}}"

ROOT = "CN=exim-py test root CA,O=exim-py tests,C=UK"
INTERMEDIATE = "CN=exim-py test intermediate CA,O=exim-py tests,C=UK"
LEAF = "CN=localhost,O=exim-py tests,C=UK"

#: OpenSSL 3's text for a failed verification, as Exim 4.96 logs it.
VERIFY_FAILED = "TLS session: (SSL_connect): error:0A000086:SSL routines::certificate " \
                "verify failed"

#: The ``220 ... ESMTP Exim 4.96 ...`` banner of the receiving Exim.
BANNER = re.compile(r"220 mta\.test ESMTP Exim 4\.96 .+")
#: The receiving Exim's EHLO reply, as smtp_reap_ehlo() leaves it: the
#: lines joined by newlines, printed as ``\n`` by string_printing().
EHLO = re.compile(r"250-mta\.test Hello [^\\]+(\\n250-[^\\]+)*\\n250 HELP")
#: The BDAT LAST reply as string_printing() puts it (a literal ``\n``).
CONFIRMATION = re.compile(rf"250- \d+ byte chunk, total \d+\\n250 OK id={ID}")


def event_action(name: str, result: str) -> str:
    """An action that records every event and forces *result* for *name*."""
    return "${acl{ev}}${if eq{$event_name}{" + name + "}{" + result + "}}"


class Event:
    """One recorded event."""

    def __init__(self, line: str) -> None:
        fields = line[3:].split("|", 6)
        (self.name, self.errno, self.host_address, self.host_port, self.address,
         self.cert, self.data) = fields

    @property
    def pair(self) -> tuple[str, str]:
        return self.name, self.data

    def __repr__(self) -> str:
        return f"Event({self.name!r}, {self.data!r}, errno={self.errno}, " \
               f"host={self.host_address}:{self.host_port}, {self.address!r})"


class RecordedEventsTests(trial.TestCase):
    """Deliveries to Exim 4.96 with every event recorded."""

    setUp = tls_tests.StartTLSToEximTests.setUp
    start_exim = tls_tests.StartTLSToEximTests.start_exim
    deliver = peer_tests.DeliveryToEximTests.deliver
    exim_messages = peer_tests.DeliveryToEximTests.exim_messages
    exim_received = tls_tests.StartTLSToEximTests.exim_received

    def settings(self, hosts: str, action: str, extra: str,
                 option: str = "event_action", record: str = RECORD) -> DeliverySettings:
        text = CONFIG
        for key, value in (("@HOSTS@", hosts), ("@PORT@", str(self.exim.port)),
                           ("@ACTION_OPTION@", option), ("@ACTION@", action),
                           ("@EXTRA@", extra), ("@RECORD@", record),
                           ("@RECORD_OLD@", RECORD_OLD)):
            text = text.replace(key, value)
        return peer_tests.delivery_settings(self, text)

    async def send(self, recipients: list[str], *, hosts: str = "127.0.0.1",
                  action: str = RECORD_ALL, extra: str = "", subject: str = "events",
                  **kw: Any) -> tuple[str, list[str]]:
        self.settings_used = self.settings(hosts, action, extra, **kw)
        return await self.deliver(self.settings_used, recipients, subject=subject)

    async def run_tls(self, action: str = RECORD_ALL, extra: str = "",
                      **kw: Any) -> tuple[str, list[str]]:
        """To ``localhost`` (the leaf's name) with STARTTLS, the test CA
        trusted."""
        options = (f"  hosts = localhost\n  hosts_override\n"
                   f"  tls_verify_certificates = {tls_tests.pki().ca_path}\n{extra}")
        return await self.send(["a@y.test"], action=action, extra=options, **kw)

    def events(self, lines: list[str]) -> list[Event]:
        return [Event(line) for line in lines if line.startswith("EV ")]

    def pairs(self, lines: list[str]) -> list[tuple[str, str]]:
        return [e.pair for e in self.events(lines)]

    def outline(self, lines: list[str]) -> list[str]:
        """The event names among the delivery's outcome lines."""
        out = []
        for line in lines:
            if line.startswith("EV "):
                out.append(Event(line).name)
            elif line[:3] in ("=> ", "-> ", "** ", "== ") or line == "Completed":
                out.append(line.split(" R=")[0] if " R=" in line else line)
        return out

    def assertPairs(self, lines: list[str], expected: list[tuple[str, Any]]) -> None:
        """The (name, data) sequence; a pattern as data must match fully."""
        got = self.pairs(lines)
        self.assertEqual([n for n, _ in got], [n for n, _ in expected], lines)
        for (name, data), (_, want) in zip(got, expected, strict=True):
            if isinstance(want, re.Pattern):
                self.assertRegex(data, want, (name, lines))
                self.assertIsNotNone(want.fullmatch(data), (name, data))
            else:
                self.assertEqual(data, want, (name, lines))

    # -- a successful STARTTLS delivery

    async def test_starttls_delivery(self) -> None:
        self.start_exim(tls_tests.pki().leaf("localhost"))
        outcome, lines = await self.run_tls(extra="  tls_verify_hosts = *\n")
        self.assertEqual(outcome, COMPLETED, lines)
        port = str(self.exim.port)
        delivered = [x for x in lines if x.startswith("=> ")]
        self.assertEqual(len(delivered), 1, lines)
        self.assertIn(" CV=yes ", delivered[0])
        confirmation = re.search(r' C="(.*)"$', delivered[0]).group(1)
        self.assertPairs(lines, [
            ("tcp:connect", ""),
            ("smtp:connect", BANNER),
            ("smtp:ehlo", EHLO),
            # OpenSSL's verify callback: the top of the chain first.
            ("tls:cert", "2"), ("tls:cert", "1"), ("tls:cert", "0"),
            # The EHLO after STARTTLS.
            ("smtp:ehlo", EHLO),
            ("tcp:close", ""),
            # The C= text, whose backslashes the log line doubles.
            ("msg:delivery", confirmation.replace("\\\\", "\\")),
            ("msg:complete", "")])
        events = self.events(lines)
        self.assertRegex(events[8].data, CONFIRMATION)
        self.assertEqual([e.cert for e in events[3:6]], [ROOT, INTERMEDIATE, LEAF])
        for event in events[:9]:
            self.assertEqual((event.host_address, event.host_port), ("127.0.0.1", port),
                             event)
        self.assertEqual(events[8].address, "a@y.test")
        self.assertEqual(self.outline(lines), [
            "tcp:connect", "smtp:connect", "smtp:ehlo", "tls:cert", "tls:cert", "tls:cert",
            "smtp:ehlo", "tcp:close", "=> a@y.test", "msg:delivery", "Completed", "msg:complete"])
        self.assertRegex(self.exim_received()[0], r" X=TLS1\.[23]:")

    async def test_starttls_delivery_with_smtp_ehlo(self) -> None:
        self.start_exim(tls_tests.pki().leaf("localhost"))
        outcome, lines = await self.run_tls(extra="  tls_verify_hosts = *\n")
        self.assertEqual(outcome, COMPLETED, lines)
        self.assertEqual([n for n, _ in self.pairs(lines)], [
            "tcp:connect", "smtp:connect", "smtp:ehlo", "tls:cert", "tls:cert", "tls:cert",
            "smtp:ehlo", "tcp:close", "msg:delivery", "msg:complete"])
        ehlo = [d for n, d in self.pairs(lines) if n == "smtp:ehlo"]
        self.assertRegex(ehlo[0], r"^250-mta\.test Hello .*\\n250-STARTTLS\\n")
        self.assertNotIn("STARTTLS", ehlo[1])

    # -- a refusing host, then the fallback host

    async def refused_then_fallback(self) -> tuple[list[str], str]:
        # Nothing listens on 127.0.0.2 (Exim is bound to 127.0.0.1).
        self.start_exim(None)
        outcome, lines = await self.send(["a@y.test"], hosts="127.0.0.2",
                                         extra="  fallback_hosts = 127.0.0.1\n")
        self.assertEqual(outcome, COMPLETED, lines)
        return lines, str(self.exim.port)

    async def test_refusing_host_then_fallback(self) -> None:
        lines, port = await self.refused_then_fallback()
        self.assertPairs(lines, [
            ("tcp:connect", ""),
            # No tcp:close: there was no connection (Exim returns from
            # smtp_setup_conn() before its SEND_QUIT/tcp:close).
            ("msg:host:defer", "Connection refused"),
            # The last of the main hosts (the transport's first run).
            ("msg:defer", "Connection refused"),
            ("tcp:connect", ""),
            ("smtp:connect", BANNER),
            ("smtp:ehlo", EHLO),
            ("tcp:close", ""),
            ("msg:delivery", CONFIRMATION),
            ("msg:complete", "")])
        events = self.events(lines)
        for event in events[:3]:
            self.assertEqual((event.host_address, event.host_port), ("127.0.0.2", port))
        for event in events[1:3]:
            self.assertEqual((event.errno, event.address), ("111", "a@y.test"))
        for event in events[3:8]:
            self.assertEqual((event.host_address, event.host_port), ("127.0.0.1", port))
        self.assertEqual(events[7].address, "a@y.test")
        self.assertIn("H=127.0.0.2 [127.0.0.2] Connection refused", lines)
        self.assertEqual(self.outline(lines), [
            "tcp:connect", "msg:host:defer", "msg:defer",
            "tcp:connect", "smtp:connect", "smtp:ehlo", "tcp:close",
            "=> a@y.test", "msg:delivery", "Completed", "msg:complete"])

    async def test_msg_defer_before_the_fallback_hosts(self) -> None:
        lines, port = await self.refused_then_fallback()
        self.assertEqual(self.pairs(lines)[:4], [
            ("tcp:connect", ""), ("msg:host:defer", "Connection refused"),
            ("msg:defer", "Connection refused"), ("tcp:connect", "")])
        self.assertEqual(self.events(lines)[2].host_address, "127.0.0.2")

    async def test_refused_everywhere(self) -> None:
        self.start_exim(None)
        dead = str(free_port())
        outcome, lines = await self.send(["a@y.test"], hosts=f"127.0.0.1::{dead}")
        self.assertEqual(outcome, INCOMPLETE, lines)
        self.assertPairs(lines, [("tcp:connect", ""),
                                 ("msg:host:defer", "Connection refused"),
                                 ("msg:defer", "Connection refused")])
        self.assertEqual([(e.errno, e.host_port) for e in self.events(lines)[1:]],
                         [("111", dead), ("111", dead)])
        # Raised by the transport, before the delivery's == line; no
        # msg:complete for a message still on the queue.
        self.assertEqual(self.outline(lines)[-1], "== a@y.test")

    # -- the remote's 4xx and 5xx

    async def test_data_4xx_is_a_message_deferral(self) -> None:
        self.start_exim(None)
        outcome, lines = await self.send(["a@y.test", "b@y.test"], subject="later please")
        self.assertEqual(outcome, INCOMPLETE, lines)
        message = ("SMTP error from remote mail server after pipelined end of data: "
                   "451 content deferred")
        # A message error leaves the host's result OK (no msg:host:defer);
        # message_defer makes the last host raise msg:defer
        # (transports/smtp.c, FAILED: *message_defer = TRUE).
        self.assertPairs(lines, [("tcp:connect", ""), ("smtp:connect", BANNER),
                                 ("smtp:ehlo", EHLO), ("tcp:close", ""),
                                 ("msg:defer", message)])
        deferral = self.events(lines)[4]
        # ERRNO_DATA4XX, negative: no strerror added.
        self.assertEqual((deferral.errno, deferral.address, deferral.host_address),
                         ("-46", "a@y.test", "127.0.0.1"))
        self.assertEqual(self.outline(lines), ["tcp:connect", "smtp:connect", "smtp:ehlo",
                                               "tcp:close", "msg:defer", "== a@y.test",
                                               "== b@y.test"])

    async def test_rcpt_5xx_and_router_failure(self) -> None:
        self.start_exim(None)
        outcome, lines = await self.send(["a@y.test", "nosuch@y.test", "x@gone.test"])
        self.assertEqual(outcome, COMPLETED, lines)
        self.assertPairs(lines, [
            ("msg:fail:internal", "no longer here"),
            ("tcp:connect", ""), ("smtp:connect", BANNER), ("smtp:ehlo", EHLO),
            ("tcp:close", ""),
            ("msg:delivery", CONFIRMATION),
            ("msg:fail:delivery", "SMTP error from remote mail server after "
                                  "RCPT TO:<nosuch@y.test>: 550 no such user"),
            ("msg:complete", "")])
        events = self.events(lines)
        self.assertEqual([e.address for e in events[:1] + events[5:7]],
                         ["x@gone.test", "a@y.test", "nosuch@y.test"])
        self.assertEqual(events[6].host_address, "127.0.0.1")
        self.assertEqual(self.outline(lines), [
            "msg:fail:internal", "** x@gone.test",
            "tcp:connect", "smtp:connect", "smtp:ehlo", "tcp:close",
            "=> a@y.test", "msg:delivery", "msg:fail:delivery", "** nosuch@y.test",
            "Completed", "msg:complete"])

    async def test_data_5xx_fails_every_recipient(self) -> None:
        self.start_exim(None)
        outcome, lines = await self.send(["a@y.test", "b@y.test"], subject="please reject")
        self.assertEqual(outcome, COMPLETED, lines)
        message = ("SMTP error from remote mail server after pipelined end of data: "
                   "550 content rejected")
        self.assertPairs(lines, [("tcp:connect", ""), ("smtp:connect", BANNER),
                                 ("smtp:ehlo", EHLO), ("tcp:close", ""),
                                 ("msg:fail:delivery", message),
                                 ("msg:fail:delivery", message), ("msg:complete", "")])
        self.assertEqual([e.address for e in self.events(lines)[4:6]],
                         ["a@y.test", "b@y.test"])

    async def test_rcpt_4xx_events(self) -> None:
        self.start_exim(None)
        outcome, lines = await self.send(["later@y.test", "a@y.test"])
        self.assertEqual(outcome, INCOMPLETE, lines)
        message = ("SMTP error from remote mail server after RCPT TO:<later@y.test>: "
                   "451 try again later")
        self.assertPairs(lines, [("tcp:connect", ""), ("smtp:connect", BANNER),
                                 ("smtp:ehlo", EHLO),
                                 ("msg:rcpt:host:defer", message),
                                 ("msg:rcpt:defer", message),
                                 ("tcp:close", ""), ("msg:delivery", CONFIRMATION)])
        # The more_errno: the code's last two digits << 8, over the 'A' (a
        # host not from an MX record) of prepare_addresses(); test/log/5700
        # has err <12865> for a 450.
        rcpt_events = self.events(lines)[3:5]
        self.assertEqual([(e.errno, e.address) for e in rcpt_events],
                         [(str(51 << 8 | ord("A")), "later@y.test")] * 2)

    # -- forced results

    async def test_tcp_connect_result_skips_the_host(self) -> None:
        self.start_exim(None)
        outcome, lines = await self.send(["a@y.test"],
                                        action=event_action("tcp:connect", "skip"))
        self.assertEqual(outcome, INCOMPLETE, lines)
        self.assertEqual(self.exim_messages(), [])
        self.assertNotIn("<=", self.exim.mainlog())
        # No connection, so no tcp:close; no message, errno ERRNO_EVENT
        # (smtp_out.c: event_raise(..., US"tcp:connect", NULL, &errno)).
        self.assertPairs(lines, [("tcp:connect", ""), ("msg:host:defer", ""),
                                 ("msg:defer", "")])
        self.assertEqual([e.errno for e in self.events(lines)[1:]], ["-58", "-58"])
        self.assertIn("== a@y.test R=remote T=remote_smtp defer (-58)", lines)

    async def test_tcp_connect_result_log_line(self) -> None:
        self.start_exim(None)
        outcome, lines = await self.send(["a@y.test"],
                                        action=event_action("tcp:connect", "skip"))
        self.assertEqual(outcome, INCOMPLETE, lines)
        self.assertIn("H=127.0.0.1 [127.0.0.1] Event requests alternate response", lines)

    async def test_smtp_connect_result_closes_the_connection(self) -> None:
        self.start_exim(None)
        outcome, lines = await self.send(["a@y.test"],
                                        action=event_action("smtp:connect", "stop"))
        self.assertEqual(outcome, INCOMPLETE, lines)
        self.assertEqual(self.exim_messages(), [])
        message = "deferred by smtp:connect event expansion: stop"
        self.assertPairs(lines, [("tcp:connect", ""), ("smtp:connect", BANNER),
                                 ("tcp:close", ""), ("msg:host:defer", message),
                                 ("msg:defer", message)])
        # ERRNO_EXPANDFAIL (transports/smtp.c: set_errno_nohost(sx->addrlist,
        # ERRNO_EXPANDFAIL, ...); goto SEND_QUIT).
        self.assertEqual([e.errno for e in self.events(lines)[3:]], ["-27", "-27"])
        self.assertIn(f"H=127.0.0.1 [127.0.0.1]: {message}", lines)

    async def test_tls_cert_result_refuses_verification(self) -> None:
        # Verification tried (tls_try_verify_hosts = * by default): the
        # refusal is overridden, the events go on down the chain, and the
        # session is unverified (Exim's verify_event(): verify_override).
        self.start_exim(tls_tests.pki().leaf("localhost"))
        outcome, lines = await self.run_tls(action=event_action("tls:cert", "no"))
        self.assertEqual(outcome, COMPLETED, lines)
        self.assertEqual([n for n, _ in self.pairs(lines)], [
            "tcp:connect", "smtp:connect", "smtp:ehlo", "tls:cert", "tls:cert", "tls:cert",
            "smtp:ehlo", "tcp:close", "msg:delivery", "msg:complete"])
        denied = [x for x in lines if "verify denied by event-action" in x]
        self.assertEqual([re.sub(r" cert=.*", "", x) for x in denied], [
            f"[127.0.0.1] SSL verify denied by event-action: depth={d}" for d in (2, 1, 0)])
        self.assertTrue(all(x.endswith(": no") for x in denied), denied)
        self.assertIn(" CV=no ", [x for x in lines if x.startswith("=> ")][0])

    async def test_tls_cert_result_with_verification_required(self) -> None:
        self.start_exim(tls_tests.pki().leaf("localhost"))
        outcome, lines = await self.run_tls(
            action=event_action("tls:cert", "no"),
            extra="  tls_verify_hosts = *\n  hosts_require_tls = *\n")
        self.assertEqual(outcome, INCOMPLETE, lines)
        self.assertEqual(self.exim_received(), [])
        names = [n for n, _ in self.pairs(lines)]
        self.assertEqual(names[:4], ["tcp:connect", "smtp:connect", "smtp:ehlo", "tls:cert"])
        self.assertEqual(self.pairs(lines)[3], ("tls:cert", "2"))
        # The handshake failed: the host and the message are deferred with
        # the TLS failure (ERRNO_TLSFAILURE, -37), the connection closed.
        self.assertEqual(self.pairs(lines)[-3:], [("tcp:close", ""),
                                                  ("msg:host:defer", VERIFY_FAILED),
                                                  ("msg:defer", VERIFY_FAILED)])
        self.assertEqual([e.errno for e in self.events(lines)[-2:]], ["-37", "-37"])

    async def test_tls_cert_required_refusal_stops_at_the_first(self) -> None:
        self.start_exim(tls_tests.pki().leaf("localhost"))
        outcome, lines = await self.run_tls(
            action=event_action("tls:cert", "no"),
            extra="  tls_verify_hosts = *\n  hosts_require_tls = *\n")
        self.assertEqual(outcome, INCOMPLETE, lines)
        self.assertEqual([d for n, d in self.pairs(lines) if n == "tls:cert"], ["2"])
        self.assertEqual(len([x for x in lines if "verify denied by event-action" in x]), 1)

    async def test_tls_cert_refusal_log_line(self) -> None:
        self.start_exim(tls_tests.pki().leaf("localhost"))
        outcome, lines = await self.run_tls(action=event_action("tls:cert|0", "no").replace(
            "{$event_name}", "{$event_name|$event_data}"))
        self.assertEqual(outcome, COMPLETED, lines)
        self.assertIn("[127.0.0.1] SSL verify denied by event-action: depth=0 "
                      "cert=/C=UK/O=exim-py tests/CN=localhost: no", lines)

    # -- the old names

    async def test_tpda_names(self) -> None:
        # exim-py's compatibility: Exim 4.96 knows neither tpda_event_action
        # nor $tpda_* (renamed in 4.85, ChangeLog JH/08; no "tpda" in its
        # src/; exim4 -bV: 'option "tpda_event_action" unknown').
        self.start_exim(None)
        outcome, lines = await self.send(
            ["a@y.test"], extra="  hosts = 127.0.0.2 : 127.0.0.1\n  hosts_override\n",
            option="tpda_event_action", action="${acl{old}}")
        self.assertEqual(outcome, COMPLETED, lines)
        self.assertPairs(lines, [
            ("tcp:connect", ""),
            # Not the last host: no msg:defer.
            ("msg:host:defer", "Connection refused"),
            ("tcp:connect", ""), ("smtp:connect", BANNER), ("smtp:ehlo", EHLO),
            ("tcp:close", ""),
            ("msg:delivery", CONFIRMATION),
            # The main event_action, with the new names.
            ("msg:complete", "")])
        self.assertEqual(self.events(lines)[1].errno, "111")
        self.assertEqual(self.events(lines)[1].host_address, "127.0.0.2")

    async def test_connection_events_of_a_batch_have_no_local_part(self) -> None:
        self.start_exim(None)
        outcome, lines = await self.send(["a@y.test", "b@y.test"])
        self.assertEqual(outcome, COMPLETED, lines)
        self.assertEqual([(e.name, e.address) for e in self.events(lines)[:4]], [
            ("tcp:connect", "@y.test"), ("smtp:connect", "@y.test"),
            ("smtp:ehlo", "@y.test"), ("tcp:close", "@y.test")])
