"""The smtp transport's socks_proxy and connection events, against real
peers: exim-py delivers (in-process) through Debian's microsocks (with and
without a password) to a real Exim 4.96 daemon, and an ``event_action``
ACL records every event with ``logwrite``."""

from __future__ import annotations

from typing import Any

from twisted.trial import unittest as trial

from tests import test_smtp_tls_client as tls_tests
from tests import test_smtp_transport as peer_tests
from tests.peers import free_port
from tests.test_delivery_peers import ID
from tests.test_socks import Microsocks
from twisted_mta.queue.deliver import COMPLETED, INCOMPLETE, DeliverySettings

CONFIG = r"""
primary_hostname = exim-py.test
log_selector = +smtp_confirmation @SELECTOR@
begin acl
ev:
  warn logwrite = EV $event_name|$event_data|$host_address|$host_port|\
                  $event_defer_errno|$proxy_local_address
  accept
evc:
  warn logwrite = EV $event_name|$event_data|${certextract{subject}{$tls_out_peercert}}
  accept
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
  connect_timeout = 10s
@EXTRA@
"""

EVENT = "  event_action = ${acl{ev}}\n"


class SocksAndEventsTests(trial.TestCase):

    setUp = peer_tests.DeliveryToEximTests.setUp
    deliver = peer_tests.DeliveryToEximTests.deliver
    exim_messages = peer_tests.DeliveryToEximTests.exim_messages

    def settings(self, hosts: str = "127.0.0.1", port: int | None = None,
                 extra: str = "", selector: str = "") -> DeliverySettings:
        text = CONFIG.replace("@HOSTS@", hosts).replace(
            "@PORT@", str(port or self.exim.port)).replace("@EXTRA@", extra).replace(
            "@SELECTOR@", selector)
        return peer_tests.delivery_settings(self, text)

    async def run_delivery(self, recipients: list[str], **kw: Any) -> tuple[str, list[str]]:
        self.settings_used = self.settings(**kw)
        return await self.deliver(self.settings_used, recipients)

    def socks(self, user: str | None = None, password: str | None = None) -> Microsocks:
        proxy = Microsocks(user, password)
        self.addCleanup(proxy.cleanup)
        proxy.start()
        return proxy

    # -- SOCKS

    async def _through_proxy(self, proxy: Microsocks, option: str) -> None:
        outcome, lines = await self.run_delivery(
            ["a@y.test"], extra=f"  socks_proxy = {option}\n" + EVENT,
            selector="+proxy +outgoing_port")
        self.assertEqual(outcome, COMPLETED, lines)
        delivered = [line for line in lines if line.startswith("=>")]
        self.assertEqual(len(delivered), 1, lines)
        self.assertRegex(delivered[0], rf'^=> a@y\.test R=remote T=remote_smtp H=127\.0\.0\.1 '
                         rf'\[127\.0\.0\.1\]:{self.exim.port} '
                         rf'PRX=\[127\.0\.0\.1\]:{proxy.port} K '
                         rf'C="250- \d+ byte chunk, total \d+\\\\n250 OK id={ID}"$')
        self.assertEqual(len(self.exim_messages()), 1)
        events = [line for line in lines if line.startswith("EV ")]
        # tcp:connect sees the proxy; the others the target and the proxy used
        self.assertEqual(events[0], f"EV tcp:connect||127.0.0.1|{proxy.port}|0|")
        self.assertRegex(events[1], rf"^EV smtp:connect\|220 .*\|127\.0\.0\.1\|"
                         rf"{self.exim.port}\|0\|127\.0\.0\.1$")
        # The EHLO reply, its lines joined with a literal "\n".
        self.assertRegex(events[2], rf"^EV smtp:ehlo\|250-mta\.test Hello .*\\n250 HELP\|"
                         rf"127\.0\.0\.1\|{self.exim.port}\|0\|127\.0\.0\.1$")
        self.assertEqual(events[3], f"EV tcp:close||127.0.0.1|{self.exim.port}|0|127.0.0.1")
        # $value: the BDAT LAST reply, its lines joined with a literal "\n".
        self.assertRegex(events[4], r"^EV msg:delivery\|250- \d+ byte chunk, total \d+"
                         r"\\n250 OK id=")

    async def test_through_microsocks(self) -> None:
        proxy = self.socks()
        await self._through_proxy(proxy, f"127.0.0.1 port={proxy.port}")

    async def test_through_microsocks_with_a_password(self) -> None:
        proxy = self.socks("mta", "secret")
        await self._through_proxy(proxy, f"127.0.0.1 port={proxy.port} auth=name "
                                         "name=mta pass=secret")

    async def test_without_prx_when_the_selector_is_off(self) -> None:
        proxy = self.socks()
        outcome, lines = await self.run_delivery(
            ["a@y.test"], extra=f"  socks_proxy = 127.0.0.1 port={proxy.port}\n")
        self.assertEqual(outcome, COMPLETED, lines)
        self.assertNotIn("PRX=", lines[0])

    async def test_wrong_password_defers(self) -> None:
        proxy = self.socks("mta", "secret")
        outcome, lines = await self.run_delivery(
            ["a@y.test"], extra=f"  socks_proxy = 127.0.0.1 port={proxy.port} auth=name "
                                "name=mta pass=wrong\n" + EVENT)
        self.assertEqual(outcome, INCOMPLETE, lines)
        self.assertIn("socks auth failed", lines)
        self.assertIn("H=127.0.0.1 [127.0.0.1] Permission denied", lines)
        self.assertIn(f"EV msg:host:defer|Permission denied|127.0.0.1|{self.exim.port}|13|",
                      lines)
        self.assertEqual(self.exim_messages(), [])

    async def test_bad_expansion(self) -> None:
        outcome, lines = await self.run_delivery(
            ["a@y.test"], extra="  socks_proxy = ${if\n")
        self.assertEqual(outcome, INCOMPLETE, lines)
        self.assertIn("Bad expansion for socks_proxy in remote_smtp", lines)

    async def test_tcp_connect_event_skips_the_proxy(self) -> None:
        proxy = self.socks()
        outcome, lines = await self.run_delivery(
            ["a@y.test"], extra=f"  socks_proxy = 127.0.0.1 port={proxy.port}\n"
            "  event_action = ${if eq{$event_name}{tcp:connect}{no}}\n")
        self.assertEqual(outcome, INCOMPLETE, lines)
        # socks_sock_connect() logs strerror(errno), not exim_errstr().
        self.assertIn("socks_sock_connect: Unknown error -58", lines)

    # -- events without a proxy

    async def test_connection_events(self) -> None:
        outcome, lines = await self.run_delivery(["a@y.test"], extra=EVENT)
        self.assertEqual(outcome, COMPLETED, lines)
        events = [line for line in lines if line.startswith("EV ")]
        port = self.exim.port
        self.assertEqual(events[0], f"EV tcp:connect||127.0.0.1|{port}|0|")
        self.assertRegex(events[1], rf"^EV smtp:connect\|220 .*ESMTP Exim 4\.96.*\|"
                         rf"127\.0\.0\.1\|{port}\|0\|$")
        # The EHLO reply, its lines joined with a literal "\n".
        self.assertRegex(events[2], rf"^EV smtp:ehlo\|250-mta\.test Hello .*\\n250 HELP\|"
                         rf"127\.0\.0\.1\|{port}\|0\|$")
        self.assertEqual(events[3], f"EV tcp:close||127.0.0.1|{port}|0|")
        # $value: the BDAT LAST reply, its lines joined with a literal "\n".
        self.assertRegex(events[4], r"^EV msg:delivery\|250- \d+ byte chunk, total \d+"
                         r"\\n250 OK id=")
        self.assertEqual(len(events), 5, events)

    async def test_tcp_connect_result_skips_the_host(self) -> None:
        outcome, lines = await self.run_delivery(
            ["a@y.test"], extra="  event_action = ${if eq{$event_name}{tcp:connect}{no}}\n")
        self.assertEqual(outcome, INCOMPLETE, lines)
        # exim_errstr(ERRNO_EVENT)
        self.assertIn("H=127.0.0.1 [127.0.0.1] Event requests alternate response", lines)
        self.assertEqual(self.exim_messages(), [])
        self.assertNotIn("<=", self.exim.mainlog())

    async def test_smtp_connect_result_closes_the_connection(self) -> None:
        outcome, lines = await self.run_delivery(
            ["a@y.test"], extra="  event_action = ${if eq{$event_name}{smtp:connect}"
                                "{stop}{${acl{ev}}}}\n")
        self.assertEqual(outcome, INCOMPLETE, lines)
        self.assertIn("H=127.0.0.1 [127.0.0.1]: deferred by smtp:connect event "
                      "expansion: stop", lines)
        self.assertEqual(self.exim_messages(), [])
        events = [line for line in lines if line.startswith("EV ")]
        self.assertEqual(events[0], f"EV tcp:connect||127.0.0.1|{self.exim.port}|0|")
        self.assertEqual(events[1], f"EV tcp:close||127.0.0.1|{self.exim.port}|0|")
        self.assertTrue(events[2].startswith(
            "EV msg:host:defer|deferred by smtp:connect event expansion: stop|"), events)
        self.assertTrue(events[3].startswith("EV msg:defer|deferred by smtp:connect"),
                        events)
        self.assertEqual(len(events), 4, events)

    async def test_host_defer_for_each_host(self) -> None:
        dead = free_port()
        outcome, lines = await self.run_delivery(
            ["a@y.test"], hosts=f"127.0.0.1::{dead} : 127.0.0.2::{dead}", extra=EVENT)
        self.assertEqual(outcome, INCOMPLETE, lines)
        events = [line for line in lines if line.startswith("EV msg:")]
        self.assertEqual(events, [
            f"EV msg:host:defer|Connection refused|127.0.0.1|{dead}|111|",
            f"EV msg:host:defer|Connection refused|127.0.0.2|{dead}|111|",
            f"EV msg:defer|Connection refused|127.0.0.2|{dead}|111|"])


# -- STARTTLS: tls:cert, and TLS through the proxy


class TLSEventsTests(trial.TestCase):

    setUp = tls_tests.StartTLSToEximTests.setUp
    start_exim = tls_tests.StartTLSToEximTests.start_exim
    send = tls_tests.StartTLSToEximTests.send
    settings = SocksAndEventsTests.settings
    deliver = peer_tests.DeliveryToEximTests.deliver
    run_delivery = peer_tests.DeliveryToEximTests.run_delivery

    async def test_tls_cert_once_per_certificate(self) -> None:
        self.start_exim(tls_tests.pki().leaf("localhost"))
        outcome, lines = await self.send(
            "  event_action = ${if eq{$event_name}{tls:cert}"
            "{${acl{evc}}}}\n"
            "  tls_verify_hosts = *\n", )
        self.assertEqual(outcome, COMPLETED, lines)
        events = [line for line in lines if line.startswith("EV ")]
        # the test PKI's chain: root, intermediate, leaf
        self.assertEqual(events, [
            "EV tls:cert|2|CN=exim-py test root CA,O=exim-py tests,C=UK",
            "EV tls:cert|1|CN=exim-py test intermediate CA,O=exim-py tests,C=UK",
            "EV tls:cert|0|CN=localhost,O=exim-py tests,C=UK"])
        self.assertIn(" CV=yes ", [x for x in lines if x.startswith("=>")][0])

    async def test_tls_cert_result_refuses_verification(self) -> None:
        self.start_exim(tls_tests.pki().leaf("localhost"))
        outcome, lines = await self.send(
            "  event_action = ${if eq{$event_name|$event_data}{tls:cert|0}{no}}\n")
        self.assertEqual(outcome, COMPLETED, lines)
        # The certificate's X509_NAME_oneline() (tls-openssl.c, verify_event()).
        self.assertIn("[127.0.0.1] SSL verify denied by event-action: depth=0 "
                      "cert=/C=UK/O=exim-py tests/CN=localhost: no", lines)
        self.assertIn(" CV=no ", [x for x in lines if x.startswith("=>")][0])

    async def test_tls_cert_result_with_verification_required_defers(self) -> None:
        self.start_exim(tls_tests.pki().leaf("localhost"))
        outcome, lines = await self.send(
            "  event_action = ${if eq{$event_name}{tls:cert}{no}}\n"
            "  tls_verify_hosts = *\n  hosts_require_tls = *\n")
        self.assertEqual(outcome, INCOMPLETE, lines)
        self.assertEqual(tls_tests.StartTLSToEximTests.exim_received(self), [])

    async def test_starttls_through_microsocks(self) -> None:
        self.start_exim(tls_tests.pki().leaf("localhost"))
        proxy = Microsocks()
        self.addCleanup(proxy.cleanup)
        proxy.start()
        outcome, lines = await self.send(f"  socks_proxy = 127.0.0.1 port={proxy.port}\n"
                                         "  tls_verify_hosts = *\n  hosts_require_tls = *\n")
        self.assertEqual(outcome, COMPLETED, lines)
        self.assertIn(" CV=yes ", [x for x in lines if x.startswith("=>")][0])
        self.assertRegex(tls_tests.StartTLSToEximTests.exim_received(self)[0],
                         r" X=TLS1\.[23]:")
