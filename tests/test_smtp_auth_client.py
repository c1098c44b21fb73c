"""AUTH on the client side of the smtp transport (Exim's smtp_auth() and
the plaintext driver's client_send), against a real Exim 4.96 receiving
daemon with a plaintext PLAIN server authenticator offered in clear.
"""

from __future__ import annotations

import re
from typing import Any

from twisted.internet import defer
from twisted.trial import unittest as trial

from tests.test_smtp_prdr_dsn import _Base
from tests.test_smtp_transport import _client, _take
from twisted_mta.queue.deliver import COMPLETED, INCOMPLETE
from twisted_mta.spool.message import Recipient
from twisted_mta.transports.smtp import _nul_escapes

AUTH_RECEIVER = r"""
queue_only
acl_smtp_rcpt = acl_rcpt
tls_advertise_hosts =
auth_advertise_hosts = *
begin acl
acl_rcpt:
  accept
begin authenticators
plain:
  driver = plaintext
  public_name = PLAIN
  server_prompts = :
  server_condition = ${if and {{eq{$auth2}{user}}{eq{$auth3}{secret}}}}
  server_set_id = $auth2
"""


def _sender(option: str, password: str, more: str = "") -> str:
    return (f"  {option} = *\n{more}"
            "begin authenticators\n"
            "unused:\n"
            "  driver = plaintext\n"
            "  public_name = LOGIN\n"
            "  client_send = : user : secret\n"
            "client_plain:\n"
            "  driver = plaintext\n"
            "  public_name = PLAIN\n"
            f"  client_send = ^user^{password}\n")


class AuthClientTests(_Base):

    async def test_success_logs_a_on_both_sides(self) -> None:
        self.start_exim(AUTH_RECEIVER)
        outcome, lines = await self.deliver(
            [Recipient("a@y.test")],
            extra=_sender("hosts_try_auth", "secret",
                          "  authenticated_sender = auth+sender@x.test\n"))
        self.assertEqual(outcome, COMPLETED, lines)
        self.assertRegex(lines[0], r"^=> a@y\.test R=remote T=remote_smtp "
                         r"H=127\.0\.0\.1 \[127\.0\.0\.1\] A=client_plain K C=")
        log = self.exim.mainlog()
        self.assertRegex(log, r"<= s@x\.test H=\(exim-py\.test\) \[127\.0\.0\.1\] "
                         r"P=esmtpa A=plain:user ")
        text, _ = self.exim_header()
        self.assertIn("-auth_sender auth+sender@x.test\n", text)
        self.assertIn("-auth_id user\n", text)

    async def test_wrong_password_with_hosts_require_auth_defers(self) -> None:
        self.start_exim(AUTH_RECEIVER)
        outcome, lines = await self.deliver(
            [Recipient("a@y.test")], extra=_sender("hosts_require_auth", "wrong"))
        self.assertEqual(outcome, INCOMPLETE, lines)
        self.assertIn("client_plain authenticator failed H=127.0.0.1 [127.0.0.1] "
                      "535 Incorrect authentication data", lines)
        self.assertTrue(any(
            line.startswith("== a@y.test R=remote T=remote_smtp defer (-42) ")
            and line.endswith("authentication required but authentication "
                              "attempt(s) failed") for line in lines), lines)
        self.assertNotIn(" <= ", self.exim.mainlog())

    async def test_wrong_password_with_hosts_try_auth_delivers_unauthenticated(self) -> None:
        self.start_exim(AUTH_RECEIVER)
        outcome, lines = await self.deliver(
            [Recipient("a@y.test")],
            extra=_sender("hosts_try_auth", "wrong",
                          "  authenticated_sender = auth+sender@x.test\n"))
        self.assertEqual(outcome, COMPLETED, lines)
        self.assertNotIn(" A=", lines[0])
        log = self.exim.mainlog()
        self.assertRegex(log, r"<= s@x\.test H=\(exim-py\.test\) \[127\.0\.0\.1\] P=esmtp ")
        self.assertNotIn(" A=plain", log)
        text, _ = self.exim_header()
        self.assertNotIn("-auth_sender", text)

    async def test_no_auth_without_the_host_options(self) -> None:
        self.start_exim(AUTH_RECEIVER)
        outcome, lines = await self.deliver(
            [Recipient("a@y.test")], extra=_sender("hosts_avoid_tls", "secret"))
        self.assertEqual(outcome, COMPLETED, lines)
        self.assertFalse(re.search(r" A=", lines[0]), lines)
        self.assertNotIn(" A=plain", self.exim.mainlog())


class ClientAuthDialogueTests(trial.TestCase):

    def test_nul_escapes(self) -> None:
        self.assertEqual(_nul_escapes("^user^pa^^ss"), b"\x00user\x00pa^ss")

    def test_prompts_then_success(self) -> None:
        client, transport = _started(self)
        d = defer.Deferred.fromCoroutine(client.auth("LOGIN", [b"", b"user", b"secret"]))
        self.assertEqual(_take(transport), b"AUTH LOGIN\r\n")
        client.protocol.dataReceived(b"334 VXNlcm5hbWU6\r\n")
        self.assertEqual(_take(transport), b"dXNlcg==\r\n")
        client.protocol.dataReceived(b"334 UGFzc3dvcmQ6\r\n")
        self.assertEqual(_take(transport), b"c2VjcmV0\r\n")
        client.protocol.dataReceived(b"235 Authentication succeeded\r\n")
        self.assertEqual(self.successResultOf(d)[0], "ok")

    def test_too_few_items_cancels(self) -> None:
        client, transport = _started(self)
        d = defer.Deferred.fromCoroutine(client.auth("PLAIN", [b"\x00u\x00p"]))
        self.assertEqual(_take(transport), b"AUTH PLAIN AHUAcA==\r\n")
        client.protocol.dataReceived(b"334 \r\n")
        self.assertEqual(_take(transport), b"*\r\n")
        client.protocol.dataReceived(b"501 Authentication cancelled\r\n")
        self.assertEqual(self.successResultOf(d), ("error", None))


def _started(test: trial.TestCase) -> Any:
    client, transport, _ = _client()
    d = defer.Deferred.fromCoroutine(client.greeting())
    client.protocol.dataReceived(b"220 fake ESMTP\r\n")
    test.successResultOf(d)
    d = defer.Deferred.fromCoroutine(client.hello("myhost.test.ex"))
    _take(transport)
    client.protocol.dataReceived(b"250-fake\r\n250 AUTH PLAIN LOGIN\r\n")
    test.successResultOf(d)
    return client, transport
