"""OCSP stapling on the client side of the smtp transport:
``hosts_request_ocsp``/``hosts_require_ocsp``, twisted_mta/smtp/stapling.py
and its use in twisted_mta/smtp/tlsclient.py.

The verdicts are checked on responses made by tests/pki.py's CA, in a TLS
handshake in memory against a server stapling any bytes, and against real
peers: Exim 4.96 (STARTTLS, stapling a good response or none; Debian's
GnuTLS build refuses to staple a bad one), haproxy stapling a revoked one in
front of Exim (TLS on connect, ``protocol = smtps``) and ``openssl
s_server -status_file`` stapling whatever it is given.
"""

from __future__ import annotations

import datetime
import os
import shutil
from typing import Any

from cryptography.hazmat.primitives import serialization
from OpenSSL import SSL, crypto
from twisted.trial import unittest as trial

from tests import test_smtp_tls_client as tls_tests
from tests.peer_haproxy import Haproxy
from tests.peers import Peer, free_port
from tests.pki import DAY, HOUR
from tests.test_delivery_peers import Exim4Daemon, _listening
from tests.test_tls import handshake
from twisted_mta.queue.deliver import COMPLETED, INCOMPLETE
from twisted_mta.smtp.stapling import judge_staple
from twisted_mta.smtp.tls import OCSP_FAILED, OCSP_NOT_REQ, OCSP_NOT_RESP, OCSP_VFIED
from twisted_mta.smtp.tlsclient import (
    ClientTLS,
    ClientTLSOptions,
    tls_out_variables,
    verifies_against,
)

pki = tls_tests.pki


def _read(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def _anchored(certificate: Any, untrusted: Any) -> bool:
    store = crypto.X509Store()
    store.add_cert(crypto.X509.from_cryptography(pki().root.certificate))
    return verifies_against(store, certificate, untrusted)


class JudgeStapleTests(trial.TestCase):
    """judge_staple() on responses from the test CA."""

    def judge(self, path: str, leaf: Any = None) -> Any:
        leaf = leaf or pki().leaf("mx.example.com")
        return judge_staple(_read(path), [leaf.certificate, leaf.issuer], _anchored,
                            datetime.datetime.now(datetime.UTC))

    def response(self, status: str = "good", **kw: Any) -> str:
        return pki().ocsp_response(pki().leaf("mx.example.com"), status, **kw)

    def test_good_signed_by_the_issuer(self) -> None:
        verdict = self.judge(self.response())
        self.assertEqual((verdict.status, verdict.log, verdict.fatal), (OCSP_VFIED, None, False))

    def test_good_signed_by_a_delegated_responder(self) -> None:
        self.assertEqual(self.judge(self.response(signer="delegated")).status, OCSP_VFIED)

    def test_signer_found_in_the_servers_chain(self) -> None:
        # The issuer signs and the response carries no certificate: the
        # server's chain supplies the signer, as OpenSSL's verify_stack.
        self.assertEqual(self.judge(self.response(include_certs=False)).status, OCSP_VFIED)

    def test_revoked(self) -> None:
        verdict = self.judge(self.response("revoked"))
        self.assertEqual((verdict.status, verdict.log, verdict.fatal),
                         (OCSP_FAILED, "Server certificate revoked; reason: superseded", False))

    def test_unknown(self) -> None:
        self.assertEqual(self.judge(self.response("unknown")).log,
                         "Server certificate status unknown, in OCSP stapling")

    def test_dates(self) -> None:
        for kw in ({"next_update": -HOUR, "this_update": -DAY},
                   {"this_update": HOUR, "next_update": DAY}):
            with self.subTest(**{k: str(v) for k, v in kw.items()}):
                verdict = self.judge(self.response(**kw))
                self.assertEqual((verdict.status, verdict.log), (OCSP_FAILED,
                                                                 "OCSP dates invalid"))
        # Within Exim's five minutes of skew, and without a nextUpdate: good.
        self.assertEqual(self.judge(self.response(next_update=-datetime.timedelta(
            minutes=4))).status, OCSP_VFIED)
        self.assertEqual(self.judge(self.response(next_update=None)).status, OCSP_VFIED)

    def test_untrusted_signer(self) -> None:
        verdict = self.judge(self.response(signer="bad"))
        self.assertEqual(verdict.log, "Received TLS cert status response, itself "
                         "unverifiable: certificate verify error")
        self.assertFalse(verdict.fatal)

    def test_signer_not_found(self) -> None:
        leaf = pki().leaf("mx.example.com")
        path = pki().ocsp_response(leaf, signer="delegated", include_certs=False)
        self.assertEqual(self.judge(path, leaf).log, "Received TLS cert status response, "
                         "itself unverifiable: signer certificate not found")

    def test_response_about_another_certificate(self) -> None:
        # Exim accepts it (it does not match the CertID); we do not.
        other = pki().ocsp_response(pki().leaf("other.example.com"))
        verdict = self.judge(other, pki().leaf("mx.example.com"))
        self.assertEqual(verdict.status, OCSP_FAILED)
        self.assertIn("not about the server's certificate", verdict.log)

    def test_unsuccessful_and_garbage_are_fatal(self) -> None:
        verdict = self.judge(self.response(response_status="try_later"))
        self.assertEqual((verdict.log, verdict.fatal),
                         ("Received TLS cert status response, error parsing response", True))
        garbage = os.path.join(pki().directory, "garbage.der")
        with open(garbage, "wb") as f:
            f.write(b"\x30\x03\x02\x01")
        verdict = self.judge(garbage)
        self.assertEqual((verdict.log, verdict.fatal),
                         ("Received TLS cert status response, parse error", True))


class _End:
    def __init__(self, connection: Any) -> None:
        self.connection = connection


class StaplingHandshakeTests(trial.TestCase):
    """ClientTLS against an OpenSSL server that staples whatever it is given."""

    def handshake(self, staple: bytes, ocsp: str,
                  verify: str = "require") -> tuple[ClientTLS, Exception | None]:
        leaf = pki().leaf("mx.example.com")
        context = SSL.Context(SSL.TLS_SERVER_METHOD)
        context.use_certificate_chain_file(leaf.chain_path)
        context.use_privatekey_file(leaf.key_path)
        context.set_ocsp_server_callback(lambda connection, data: staple)
        server = SSL.Connection(context, None)
        server.set_accept_state()
        client = ClientTLS(ClientTLSOptions(verify_certificates=pki().ca_path, verify=verify,
                                            check_hostnames="mx.example.com", ocsp=ocsp))
        connection = client.clientConnectionForTLS(None)
        connection.set_connect_state()
        _, error = handshake(server, _End(connection))
        return client, error

    def staple(self, status: str = "good", **kw: Any) -> bytes:
        return _read(pki().ocsp_response(pki().leaf("mx.example.com"), status, **kw))

    def test_good_staple_required(self) -> None:
        client, error = self.handshake(self.staple(), "require")
        self.assertIsNone(error)
        self.assertEqual(tls_out_variables(client.session)["tls_out_ocsp"], str(OCSP_VFIED))
        self.assertEqual(client.session.ocsp_log, [])

    def test_not_requested(self) -> None:
        client, error = self.handshake(self.staple(), "none")
        self.assertIsNone(error)
        self.assertEqual(client.session.ocsp_status, OCSP_NOT_REQ)

    def test_missing_staple(self) -> None:
        client, error = self.handshake(b"", "request")
        self.assertIsNone(error)
        self.assertEqual((client.session.ocsp_status, client.session.ocsp_log),
                         (OCSP_NOT_RESP, []))
        client, error = self.handshake(b"", "require")
        self.assertIsInstance(error, SSL.Error)
        self.assertEqual(client.session.ocsp_log,
                         ["Required TLS certificate status not received"])

    def test_revoked_staple(self) -> None:
        client, error = self.handshake(self.staple("revoked"), "request")
        self.assertIsNone(error)
        self.assertEqual(client.session.ocsp_status, OCSP_FAILED)
        client, error = self.handshake(self.staple("revoked"), "require")
        self.assertIsInstance(error, SSL.Error)
        self.assertEqual(client.session.ocsp_log,
                         ["Server certificate revoked; reason: superseded"])

    def test_unparsable_staple_is_never_verified(self) -> None:
        # judge_staple() makes a parse error fatal, as Exim does; the OpenSSL
        # in pyOpenSSL's wheel already drops a staple that is not DER, so
        # here it arrives as no staple at all.
        client, error = self.handshake(b"not DER", "require", verify="none")
        self.assertIsInstance(error, SSL.Error)
        self.assertNotEqual(client.session.ocsp_status, OCSP_VFIED)
        self.assertEqual(len(client.session.ocsp_log), 1)


class OpenSSLServer(Peer):
    """``openssl s_server`` on a free port, TLS on connect, stapling the
    DER file *status_file* to clients that ask."""

    program = "/usr/bin/openssl"

    def __init__(self, leaf: Any, status_file: str) -> None:
        super().__init__()
        self.leaf, self.status_file = leaf, status_file
        self.port = free_port()

    def command(self) -> list[str]:
        return [self.program, "s_server", "-accept", f"127.0.0.1:{self.port}", "-naccept", "10",
                "-cert", self.leaf.cert_path, "-key", self.leaf.key_path,
                "-cert_chain", self.leaf.chain_path, "-status_file", self.status_file,
                "-quiet"]

    def ready(self) -> bool:
        return _listening(self.port)


EVENTS = """\
  event_action = ${acl{ev}}
begin acl
ev:
  warn logwrite = EV $event_name OCSP=$tls_out_ocsp
  accept
"""


class StaplingPeerTests(trial.TestCase):
    """The smtp transport against real servers that staple, or don't."""

    setUp = tls_tests.StartTLSToEximTests.setUp
    start_exim = tls_tests.StartTLSToEximTests.start_exim
    settings = tls_tests.StartTLSToEximTests.settings
    deliver = tls_tests.StartTLSToEximTests.deliver
    run_delivery = tls_tests.StartTLSToEximTests.run_delivery
    exim_received = tls_tests.StartTLSToEximTests.exim_received

    async def send(self, extra: str, port: int | None = None) -> tuple[str, list[str]]:
        options = (f"  hosts = localhost\n  hosts_override\n"
                   f"  tls_verify_certificates = {pki().ca_path}\n{extra}{EVENTS}")
        return await self.run_delivery(["a@y.test"], hosts="127.0.0.1", extra=options,
                                       port=port)

    def good_staple(self) -> str:
        return pki().ocsp_response(pki().leaf("localhost"))

    def assertOCSP(self, lines: list[str], event: str, value: int) -> None:
        self.assertIn(f"EV {event} OCSP={value}", lines)

    def assertDeferred(self, outcome: str, lines: list[str], reason: str) -> None:
        self.assertEqual(outcome, INCOMPLETE, lines)
        self.assertIn(reason, lines)
        deferred = [x for x in lines if x.startswith("== ")]
        self.assertEqual(len(deferred), 1, lines)
        self.assertRegex(deferred[0], r"^== a@y\.test R=remote T=remote_smtp defer \(-37\) "
                         r"H=localhost \[127\.0\.0\.1\]: TLS session: \(SSL_connect\): "
                         r"error:.*")
        # The log line comes first, as Exim writes it from its callback.
        self.assertLess(lines.index(reason), lines.index(deferred[0]))

    # -- Exim stapling over STARTTLS

    async def test_exim_good_staple_required(self) -> None:
        self.start_exim(pki().leaf("localhost"), f"tls_ocsp_file = {self.good_staple()}\n")
        outcome, lines = await self.send("  hosts_require_ocsp = *\n")
        self.assertEqual(outcome, COMPLETED, lines)
        self.assertOCSP(lines, "msg:delivery", OCSP_VFIED)
        self.assertRegex(self.exim_received()[0], r" X=TLS1\.[23]:")

    async def test_exim_good_staple_requested_by_default(self) -> None:
        self.start_exim(pki().leaf("localhost"), f"tls_ocsp_file = {self.good_staple()}\n")
        outcome, lines = await self.send("")
        self.assertEqual(outcome, COMPLETED, lines)
        self.assertOCSP(lines, "msg:delivery", OCSP_VFIED)

    async def test_exim_not_requested(self) -> None:
        self.start_exim(pki().leaf("localhost"), f"tls_ocsp_file = {self.good_staple()}\n")
        outcome, lines = await self.send("  hosts_request_ocsp =\n")
        self.assertEqual(outcome, COMPLETED, lines)
        self.assertOCSP(lines, "msg:delivery", OCSP_NOT_REQ)

    async def test_exim_no_staple_requested(self) -> None:
        self.start_exim(pki().leaf("localhost"))
        outcome, lines = await self.send("")
        self.assertEqual(outcome, COMPLETED, lines)
        self.assertOCSP(lines, "msg:delivery", OCSP_NOT_RESP)

    async def test_exim_no_staple_required_with_require_tls(self) -> None:
        self.start_exim(pki().leaf("localhost"))
        outcome, lines = await self.send("  hosts_require_ocsp = *\n  hosts_require_tls = *\n")
        self.assertDeferred(outcome, lines, "Required TLS certificate status not received")
        self.assertEqual(self.exim_received(), [])

    async def test_exim_no_staple_required_falls_back_to_clear(self) -> None:
        # As Exim: hosts_require_ocsp alone lets tls_tempfail_tryclear
        # deliver in clear; hosts_require_tls is what forbids it.
        self.start_exim(pki().leaf("localhost"))
        outcome, lines = await self.send("  hosts_require_ocsp = *\n")
        self.assertEqual(outcome, COMPLETED, lines)
        self.assertIn("Required TLS certificate status not received", lines)
        self.assertTrue(any("delivering unencrypted to H=localhost [127.0.0.1]" in x
                            for x in lines), lines)
        self.assertNotRegex(self.exim_received()[0], r" X=")

    # -- haproxy (TLS on connect) in front of Exim, stapling a revoked status

    def start_exim_behind_proxy(self) -> None:
        self.exim = Exim4Daemon(tls_tests.peer.RECEIVER_CONFIG.replace(
            "tls_advertise_hosts =\n", "tls_advertise_hosts =\nhosts_proxy = 127.0.0.2\n"))
        self.addCleanup(self.exim.cleanup)
        self.exim.start()

    def haproxy_with_staple(self, staple: str) -> Haproxy:
        leaf = pki().leaf("localhost")
        directory = os.path.join(self.tmp, "haproxy-crt")
        os.makedirs(directory, exist_ok=True)
        bundle = os.path.join(directory, "localhost.pem")
        with open(bundle, "wb") as f:
            f.write(_read(leaf.chain_path))
            f.write(leaf.key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
        shutil.copyfile(staple, bundle + ".ocsp")
        proxy = Haproxy(backend_port=self.exim.port, mode="send-proxy-v2",
                        bind_options=f"ssl crt {bundle}")
        self.addCleanup(proxy.cleanup)
        proxy.start()
        return proxy

    async def test_smtps_through_haproxy_good(self) -> None:
        self.start_exim_behind_proxy()
        proxy = self.haproxy_with_staple(self.good_staple())
        outcome, lines = await self.send("  protocol = smtps\n  hosts_require_ocsp = *\n",
                                         port=proxy.port)
        self.assertEqual(outcome, COMPLETED, lines)
        self.assertOCSP(lines, "msg:delivery", OCSP_VFIED)
        delivered = [x for x in lines if x.startswith("=> ")]
        self.assertRegex(delivered[0], tls_tests.X_CV.replace("(yes|no)", "yes"))
        self.assertEqual(len(self.exim_received()), 1)

    async def test_smtps_through_haproxy_revoked(self) -> None:
        self.start_exim_behind_proxy()
        revoked = pki().ocsp_response(pki().leaf("localhost"), "revoked")
        proxy = self.haproxy_with_staple(revoked)
        outcome, lines = await self.send("  protocol = smtps\n  hosts_require_ocsp = *\n",
                                         port=proxy.port)
        self.assertDeferred(outcome, lines, "Server certificate revoked; reason: superseded")
        # TLS on connect is never retried in clear.
        self.assertFalse(any("delivering unencrypted" in x for x in lines), lines)
        self.assertEqual(self.exim_received(), [])

    async def test_smtps_through_haproxy_revoked_only_requested(self) -> None:
        self.start_exim_behind_proxy()
        revoked = pki().ocsp_response(pki().leaf("localhost"), "revoked")
        proxy = self.haproxy_with_staple(revoked)
        outcome, lines = await self.send("  protocol = smtps\n", port=proxy.port)
        self.assertEqual(outcome, COMPLETED, lines)
        self.assertIn("Server certificate revoked; reason: superseded", lines)
        self.assertOCSP(lines, "msg:delivery", OCSP_FAILED)

    # -- openssl s_server stapling what neither Exim nor haproxy will

    def s_server(self, staple: str) -> OpenSSLServer:
        server = OpenSSLServer(pki().leaf("localhost"), staple)
        self.addCleanup(server.cleanup)
        server.start()
        return server

    async def test_expired_staple_required(self) -> None:
        server = self.s_server(pki().ocsp_response(pki().leaf("localhost"),
                                                   this_update=-2 * DAY, next_update=-DAY))
        outcome, lines = await self.send("  protocol = smtps\n  hosts_require_ocsp = *\n",
                                         port=server.port)
        self.assertDeferred(outcome, lines, "OCSP dates invalid")
        self.assertOCSP(lines, "msg:host:defer", OCSP_FAILED)

    async def test_untrusted_signer_required(self) -> None:
        server = self.s_server(pki().ocsp_response(pki().leaf("localhost"), signer="bad"))
        outcome, lines = await self.send("  protocol = smtps\n  hosts_require_ocsp = *\n",
                                         port=server.port)
        self.assertDeferred(outcome, lines, "Received TLS cert status response, itself "
                            "unverifiable: certificate verify error")
