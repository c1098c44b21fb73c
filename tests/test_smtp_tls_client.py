"""STARTTLS in the smtp transport (twisted_mta/smtp/tlsclient.py and the TLS
parts of twisted_mta/smtp/client.py and twisted_mta/transports/smtp.py).

exim-py delivers (manualroute to ``localhost``, the smtp transport) to a
real Exim 4.96 daemon that offers STARTTLS with a certificate made by
tests/pki.py's CA, and the ``=>`` / ``==`` lines and Exim's own log are
read.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
import warnings
from typing import Any

from twisted.python.threadpool import ThreadPool
from twisted.trial import unittest as trial

from tests import test_smtp_transport as peer
from tests.pki import TestPKI
from tests.test_delivery_peers import Exim4Daemon
from twisted_mta.queue.deliver import COMPLETED, INCOMPLETE
from twisted_mta.smtp.tlsclient import (
    ClientTLS,
    ClientTLSOptions,
    handshake_error_text,
    names_match,
    tls_out_variables,
)
from twisted_mta.spool.store import Spool

_PKI: TestPKI | None = None


def pki() -> TestPKI:
    global _PKI
    if _PKI is None:
        directory = tempfile.mkdtemp(prefix="exim-py-pki-client-")
        os.chmod(directory, 0o755)
        import atexit
        atexit.register(shutil.rmtree, directory, True)
        _PKI = TestPKI(directory)
    return _PKI


def receiver(certificate: Any | None, extra: str = "") -> str:
    """RECEIVER_CONFIG with STARTTLS offered with *certificate* (None: not offered)."""
    if certificate is None:
        return peer.RECEIVER_CONFIG
    tls = (f"tls_advertise_hosts = *\ntls_certificate = {certificate.chain_path}\n"
           f"tls_privatekey = {certificate.key_path}\n{extra}")
    return peer.RECEIVER_CONFIG.replace("tls_advertise_hosts =\n", tls)


def crl_blocks(path: str) -> list[str]:
    """The PEM CRLs in a pki().crl() file: the root's, then the intermediate's."""
    with open(path, encoding="ascii") as f:
        blocks = re.findall(r"(?s)-----BEGIN X509 CRL-----.*?-----END X509 CRL-----\n",
                            f.read())
    assert len(blocks) == 2, path
    return blocks


X_CV = r" X=TLS1\.[23]:[A-Z0-9_-]+:\d+ CV=(yes|no)"


class NamesTests(trial.TestCase):

    def test_san_and_single_wildcard(self) -> None:
        leaf = pki().leaf("mx.example.com").certificate
        self.assertTrue(names_match(leaf, "mx.example.com"))
        self.assertTrue(names_match(leaf, "MX.Example.COM"))
        self.assertFalse(names_match(leaf, "other.example.com"))
        wild = pki().leaf("example.com", wildcard=True).certificate
        self.assertTrue(names_match(wild, "mx.example.com"))
        self.assertFalse(names_match(wild, "a.mx.example.com"))
        self.assertFalse(names_match(wild, "example.com"))
        self.assertFalse(names_match(leaf, "127.0.0.1"))

    def test_config_errors(self) -> None:
        from twisted_mta.smtp.tls import TLSConfigError
        with self.assertRaises(TLSConfigError) as cm:
            ClientTLS(ClientTLSOptions(verify_certificates="/nonexistent/ca.pem"))
        self.assertIn("failed to stat /nonexistent/ca.pem", str(cm.exception))
        with self.assertRaises(TLSConfigError):
            ClientTLS(ClientTLSOptions(certificate="/nonexistent/c.pem"))

    def test_missing_crl_file(self) -> None:
        from twisted_mta.smtp.tls import TLSConfigError
        with self.assertRaises(TLSConfigError) as cm:
            ClientTLS(ClientTLSOptions(verify_certificates=pki().ca_path,
                                       crl="/nonexistent/crl.pem"))
        self.assertEqual(str(cm.exception), "failed to stat /nonexistent/crl.pem for "
                         "certificates revocation lists")

    def test_crl_not_read_when_nothing_is_verified(self) -> None:
        # Exim calls setup_certs() (CAs and CRL) only for a host in
        # tls_verify_hosts or tls_try_verify_hosts.
        ClientTLS(ClientTLSOptions(verify="none", crl="/nonexistent/crl.pem"))


class StartTLSCommandTests(trial.TestCase):
    """SMTPClient.starttls on a StringTransport and a task.Clock."""

    def client(self) -> Any:
        from twisted.internet import task
        from twisted.internet.testing import StringTransport

        from twisted_mta.smtp.client import ClientProtocol, ClientSettings, SMTPClient

        class TLSStringTransport(StringTransport):
            started: list[Any] = []

            def startTLS(self, creator: Any) -> None:
                self.started.append(creator)

        clock = task.Clock()
        protocol = ClientProtocol()
        transport = TLSStringTransport()
        protocol.makeConnection(transport)
        return SMTPClient(protocol, transport, clock, ClientSettings(command_timeout=30)), \
            transport, clock

    def test_refused_reply_is_returned(self) -> None:
        from twisted.internet import defer
        client, transport, _ = self.client()
        d = defer.Deferred.fromCoroutine(client.starttls(object(), defer.Deferred()))
        self.assertEqual(transport.value(), b"STARTTLS\r\n")
        client.protocol.dataReceived(b"454 TLS currently unavailable\r\n")
        self.assertEqual(self.successResultOf(d).code, 454)
        self.assertEqual(transport.started, [])

    def test_handshake_done(self) -> None:
        from twisted.internet import defer
        client, transport, _ = self.client()
        done: defer.Deferred[None] = defer.Deferred()
        creator = object()
        client.extensions = {"STARTTLS": ""}
        d = defer.Deferred.fromCoroutine(client.starttls(creator, done))
        client.protocol.dataReceived(b"220 go ahead\r\n")
        self.assertEqual(transport.started, [creator])
        self.assertNoResult(d)
        done.callback(None)
        self.assertEqual(self.successResultOf(d).code, 220)
        self.assertEqual(client.extensions, {})

    def test_handshake_timeout(self) -> None:
        from twisted.internet import defer

        from twisted_mta.smtp.client import TLSHandshakeError
        client, _, clock = self.client()
        d = defer.Deferred.fromCoroutine(client.starttls(object(), defer.Deferred()))
        client.protocol.dataReceived(b"220 go ahead\r\n")
        clock.advance(31)
        self.assertEqual(self.failureResultOf(d, TLSHandshakeError).value.text,
                         "(SSL_connect): timed out")

    def test_data_before_the_handshake_is_a_synch_error(self) -> None:
        from twisted.internet import defer

        from twisted_mta.smtp.client import TLSHandshakeError
        client, transport, _ = self.client()
        d = defer.Deferred.fromCoroutine(client.starttls(object(), defer.Deferred()))
        client.protocol.dataReceived(b"220 go ahead\r\n250 injected\r\n")
        self.assertEqual(self.failureResultOf(d, TLSHandshakeError).value.text,
                         "synch error before connect")
        self.assertEqual(transport.started, [])


class _End:
    def __init__(self, connection: Any) -> None:
        self.connection = connection


class InMemoryHandshakeTests(trial.TestCase):
    """ClientTLS against the server side's ServerTLS, in memory."""

    def handshake(self, server_name: str, **options: Any) -> tuple[ClientTLS, Any]:
        from tests.test_tls import handshake
        from twisted_mta.smtp.tls import ServerTLS, ServerTLSOptions
        leaf = pki().leaf(server_name)
        server = ServerTLS(ServerTLSOptions(certificate=leaf.chain_path,
                                            privatekey=leaf.key_path))
        options.setdefault("verify_certificates", pki().ca_path)
        client = ClientTLS(ClientTLSOptions(**options))
        connection = client.clientConnectionForTLS(None)
        connection.set_connect_state()
        _, client_error = handshake(server.serverConnectionForTLS(None), _End(connection))
        return client, client_error

    def test_verified_session_and_variables(self) -> None:
        client, error = self.handshake("mx.example.com", verify="require",
                                       check_hostnames="mx.example.com", sni="mx.example.com")
        self.assertIsNone(error)
        self.assertTrue(client.session.handshake_done.called)
        values = tls_out_variables(client.session)
        self.assertEqual(values["tls_out_certificate_verified"], "1")
        self.assertRegex(values["tls_out_cipher"], r"^TLS1\.3:TLS_AES_\d+_GCM_SHA\d+:\d+$")
        self.assertEqual(values["tls_out_peerdn"], "/C=UK/O=exim-py tests/CN=mx.example.com")
        self.assertEqual(values["tls_out_sni"], "mx.example.com")

    def test_wrong_name_required_fails_the_handshake(self) -> None:
        client, error = self.handshake("mx.example.com", verify="require",
                                       check_hostnames="other.example.com")
        self.assertIsNotNone(error)
        self.assertIn("certificate verify failed", handshake_error_text(error))
        self.assertEqual(client.session.verify_errors, [
            'SSL verify error: certificate name mismatch: '
            'DN="/C=UK/O=exim-py tests/CN=mx.example.com" H="other.example.com"'])

    def test_untrusted_with_try_is_unverified(self) -> None:
        client, error = self.handshake("mx.example.com", verify="try",
                                       verify_certificates="system")
        self.assertIsNone(error)
        self.assertEqual(tls_out_variables(client.session)["tls_out_certificate_verified"], "0")
        self.assertTrue(client.session.verify_errors)

    def test_none_checks_nothing(self) -> None:
        client, error = self.handshake("mx.example.com", verify="none",
                                       verify_certificates="system")
        self.assertIsNone(error)
        self.assertEqual(client.session.verify_errors, [])
        self.assertEqual(tls_out_variables(client.session)["tls_out_certificate_verified"], "0")


class StartTLSToEximTests(trial.TestCase):
    """exim-py's smtp transport against Exim 4.96 offering STARTTLS."""

    settings = peer.DeliveryToEximTests.settings
    deliver = peer.DeliveryToEximTests.deliver
    run_delivery = peer.DeliveryToEximTests.run_delivery

    def setUp(self) -> None:
        peer._require_exim()
        self.pool = ThreadPool(1, 4)
        self.pool.start()
        self.addCleanup(self.pool.stop)
        self.tmp = tempfile.mkdtemp(prefix="exim-py-smtp-tls-")
        self.addCleanup(shutil.rmtree, self.tmp, True)
        self.spool = Spool(self.tmp)
        self.bounced: list[Any] = []

    def start_exim(self, certificate: Any | None, extra: str = "") -> None:
        self.exim = Exim4Daemon(receiver(certificate, extra))
        self.addCleanup(self.exim.cleanup)
        self.exim.start()

    async def send(self, extra: str, age: int = 0) -> tuple[str, list[str]]:
        ca = pki().ca_path
        # The router's host is an IP; the transport's name (resolved with
        # getaddrinfo) is what the certificate is checked against.
        options = (f"  hosts = localhost\n  hosts_override\n"
                   f"  tls_verify_certificates = {ca}\n{extra}")
        return await self.run_delivery(["a@y.test"], hosts="127.0.0.1", extra=options,
                                       age=age)

    def assertDelivered(self, outcome: str, lines: list[str], cv: str | None) -> str:
        self.assertEqual(outcome, COMPLETED, lines)
        delivery = [line for line in lines if line.startswith("=> ")]
        self.assertEqual(len(delivery), 1, lines)
        if cv is None:
            self.assertNotIn(" X=", delivery[0])
            self.assertNotIn(" CV=", delivery[0])
        else:
            self.assertRegex(delivery[0], r"^=> a@y\.test R=remote T=remote_smtp "
                             r"H=localhost \[127\.0\.0\.1\]" + X_CV + r" K C=")
            self.assertIn(f" CV={cv} ", delivery[0])
        self.assertEqual(len(self.exim_received()), 1)
        return delivery[0]

    def exim_received(self) -> list[str]:
        return re.findall(r"(?m)^.* <= s@x\.test .*$", self.exim.mainlog())

    async def test_verified_certificate(self) -> None:
        self.start_exim(pki().leaf("localhost"))
        outcome, lines = await self.send("  tls_verify_hosts = *\n")
        line = self.assertDelivered(outcome, lines, "yes")
        self.assertEqual([x for x in lines if "SSL verify" in x], [])
        self.assertIn(" CV=yes ", line)
        # Exim saw an encrypted session, and the EHLO sent again after it.
        received = self.exim_received()[0]
        self.assertRegex(received, r" X=TLS1\.[23]:")

    async def test_opportunistic_by_default(self) -> None:
        # tls_try_verify_hosts = * and tls_verify_cert_hostnames = * by default.
        self.start_exim(pki().leaf("localhost"))
        outcome, lines = await self.send("")
        self.assertDelivered(outcome, lines, "yes")

    async def test_wrong_name_with_try_verify_is_delivered_unverified(self) -> None:
        self.start_exim(pki().leaf("wrong.example"))
        outcome, lines = await self.send("")
        self.assertDelivered(outcome, lines, "no")
        self.assertIn('[127.0.0.1] SSL verify error: certificate name mismatch: '
                      'DN="/C=UK/O=exim-py tests/CN=wrong.example" H="localhost"', lines)

    async def test_wrong_name_without_name_checks_is_verified(self) -> None:
        self.start_exim(pki().leaf("wrong.example"))
        outcome, lines = await self.send("  tls_verify_cert_hostnames =\n"
                                         "  tls_verify_hosts = *\n")
        self.assertDelivered(outcome, lines, "yes")

    async def test_wrong_name_with_verify_falls_back_to_clear(self) -> None:
        # Exim: a failed handshake, host not in hosts_require_tls and
        # tls_tempfail_tryclear (default true): a new connection, in clear.
        self.start_exim(pki().leaf("wrong.example"))
        outcome, lines = await self.send("  tls_verify_hosts = *\n")
        self.assertDelivered(outcome, lines, None)
        self.assertIn('[127.0.0.1] SSL verify error: certificate name mismatch: '
                      'DN="/C=UK/O=exim-py tests/CN=wrong.example" H="localhost"', lines)
        fallback = [x for x in lines if "delivering unencrypted" in x]
        self.assertEqual(len(fallback), 1, lines)
        self.assertRegex(fallback[0], r"^TLS session: \(SSL_connect\): .*certificate verify "
                         r"failed: delivering unencrypted to H=localhost \[127\.0\.0\.1\] "
                         r"\(not in hosts_require_tls\)$")
        self.assertNotRegex(self.exim_received()[0], r" X=")

    async def test_wrong_name_with_verify_and_require_tls_defers(self) -> None:
        self.start_exim(pki().leaf("wrong.example"))
        outcome, lines = await self.send("  tls_verify_hosts = *\n  hosts_require_tls = *\n")
        self.assertTLSFailureDeferred(outcome, lines)

    async def test_wrong_name_with_verify_and_no_tryclear_defers(self) -> None:
        self.start_exim(pki().leaf("wrong.example"))
        outcome, lines = await self.send("  tls_verify_hosts = *\n"
                                         "  tls_tempfail_tryclear = false\n")
        self.assertEqual(outcome, INCOMPLETE, lines)
        self.assertEqual(self.exim_received(), [])

    async def test_self_signed_with_try_verify(self) -> None:
        self.start_exim(pki().leaf("localhost", self_signed=True))
        outcome, lines = await self.send("")
        self.assertDelivered(outcome, lines, "no")
        self.assertIn("[127.0.0.1] SSL verify error: depth=0 error=self-signed certificate "
                      "cert=/C=UK/O=exim-py tests/CN=localhost", lines)

    async def test_self_signed_with_verify_and_require_tls_defers(self) -> None:
        self.start_exim(pki().leaf("localhost", self_signed=True))
        outcome, lines = await self.send("  tls_verify_hosts = *\n  hosts_require_tls = *\n")
        self.assertEqual(outcome, INCOMPLETE, lines)
        self.assertIn("[127.0.0.1] SSL verify error: depth=0 error=self-signed certificate "
                      "cert=/C=UK/O=exim-py tests/CN=localhost", lines)

    def verify_errors(self, lines: list[str]) -> list[str]:
        return [x for x in lines if "SSL verify" in x]

    def assertFellBackToClear(self, outcome: str, lines: list[str]) -> None:
        self.assertDelivered(outcome, lines, None)
        fallback = [x for x in lines if "delivering unencrypted" in x]
        self.assertEqual(len(fallback), 1, lines)
        self.assertRegex(fallback[0], r"^TLS session: \(SSL_connect\): .*certificate verify "
                         r"failed: delivering unencrypted to H=localhost \[127\.0\.0\.1\] "
                         r"\(not in hosts_require_tls\)$")
        self.assertNotRegex(self.exim_received()[0], r" X=")

    def assertTLSFailureDeferred(self, outcome: str, lines: list[str]) -> None:
        self.assertEqual(outcome, INCOMPLETE, lines)
        deferred = [x for x in lines if x.startswith("== ")]
        self.assertEqual(len(deferred), 1, lines)
        self.assertRegex(deferred[0], r"^== a@y\.test R=remote T=remote_smtp defer \(-37\) "
                         r"H=localhost \[127\.0\.0\.1\]: TLS session: \(SSL_connect\): "
                         r".*certificate verify failed$")
        self.assertEqual(self.exim_received(), [])
        self.assertFalse(any("delivering unencrypted" in x for x in lines), lines)

    # -- validity window (X509_V_ERR_CERT_HAS_EXPIRED, _NOT_YET_VALID) ----

    EXPIRED = ("[127.0.0.1] SSL verify error: depth=0 error=certificate has expired "
               "cert=/C=UK/O=exim-py tests/CN=localhost")
    # OpenSSL 1.1.1 and 3.0 (what an Exim 4.96 is linked with) say "certificate
    # is not yet valid"; OpenSSL 4 adds " or the system clock is incorrect".
    NOT_YET_VALID = ("[127.0.0.1] SSL verify error: depth=0 error=certificate is not yet "
                     "valid cert=/C=UK/O=exim-py tests/CN=localhost")
    NOT_YET_VALID_ANY = (r"^\[127\.0\.0\.1\] SSL verify error: depth=0 error=certificate "
                         r"is not yet valid.* cert=/C=UK/O=exim-py tests/CN=localhost$")

    async def test_expired_with_try_verify_is_delivered_unverified(self) -> None:
        self.start_exim(pki().leaf("localhost", expired=True))
        outcome, lines = await self.send("")
        self.assertDelivered(outcome, lines, "no")
        self.assertEqual(self.verify_errors(lines), [self.EXPIRED])
        self.assertRegex(self.exim_received()[0], r" X=TLS1\.[23]:")

    async def test_expired_with_verify_falls_back_to_clear(self) -> None:
        self.start_exim(pki().leaf("localhost", expired=True))
        outcome, lines = await self.send("  tls_verify_hosts = *\n")
        self.assertFellBackToClear(outcome, lines)
        self.assertEqual(self.verify_errors(lines), [self.EXPIRED])

    async def test_expired_with_verify_and_require_tls_defers(self) -> None:
        self.start_exim(pki().leaf("localhost", expired=True))
        outcome, lines = await self.send("  tls_verify_hosts = *\n  hosts_require_tls = *\n")
        self.assertTLSFailureDeferred(outcome, lines)
        self.assertEqual(self.verify_errors(lines), [self.EXPIRED])

    async def test_not_yet_valid_with_try_verify_is_delivered_unverified(self) -> None:
        self.start_exim(pki().leaf("localhost", not_yet_valid=True))
        outcome, lines = await self.send("")
        self.assertDelivered(outcome, lines, "no")
        errors = self.verify_errors(lines)
        self.assertEqual(len(errors), 1, lines)
        self.assertRegex(errors[0], self.NOT_YET_VALID_ANY)

    async def test_not_yet_valid_with_verify_and_require_tls_defers(self) -> None:
        self.start_exim(pki().leaf("localhost", not_yet_valid=True))
        outcome, lines = await self.send("  tls_verify_hosts = *\n  hosts_require_tls = *\n")
        self.assertTLSFailureDeferred(outcome, lines)
        errors = self.verify_errors(lines)
        self.assertEqual(len(errors), 1, lines)
        self.assertRegex(errors[0], self.NOT_YET_VALID_ANY)

    async def test_not_yet_valid_logs_exims_text(self) -> None:
        self.start_exim(pki().leaf("localhost", not_yet_valid=True))
        outcome, lines = await self.send("")
        self.assertDelivered(outcome, lines, "no")
        self.assertEqual(self.verify_errors(lines), [self.NOT_YET_VALID])

    # -- tls_crl (X509_V_FLAG_CRL_CHECK | X509_V_FLAG_CRL_CHECK_ALL) -------

    REVOKED = ("[127.0.0.1] SSL verify error: depth=0 error=certificate revoked "
               "cert=/C=UK/O=exim-py tests/CN=localhost")

    # pki().leaf() is cached per name and flags and is shared with the other
    # tests; revoking it in a CRL affects only the test that passes the CRL
    # as tls_crl.

    async def test_crl_revoked_with_verify_and_require_tls_defers(self) -> None:
        leaf = pki().leaf("localhost")
        self.start_exim(leaf)
        crl = pki().crl(revoked=[leaf])
        outcome, lines = await self.send(f"  tls_crl = {crl}\n  tls_verify_hosts = *\n"
                                         "  hosts_require_tls = *\n")
        self.assertTLSFailureDeferred(outcome, lines)
        self.assertEqual(self.verify_errors(lines), [self.REVOKED])

    async def test_crl_revoked_with_verify_falls_back_to_clear(self) -> None:
        leaf = pki().leaf("localhost")
        self.start_exim(leaf)
        crl = pki().crl(revoked=[leaf])
        outcome, lines = await self.send(f"  tls_crl = {crl}\n  tls_verify_hosts = *\n")
        self.assertFellBackToClear(outcome, lines)
        self.assertEqual(self.verify_errors(lines), [self.REVOKED])

    async def test_crl_revoked_with_try_verify_is_delivered_unverified(self) -> None:
        leaf = pki().leaf("localhost")
        self.start_exim(leaf)
        crl = pki().crl(revoked=[leaf])
        outcome, lines = await self.send(f"  tls_crl = {crl}\n")
        self.assertDelivered(outcome, lines, "no")
        self.assertEqual(self.verify_errors(lines), [self.REVOKED])

    async def test_crl_not_revoked_is_verified(self) -> None:
        # The same CRL file, listing another leaf of the same intermediate.
        self.start_exim(pki().leaf("localhost"))
        crl = pki().crl(revoked=[pki().leaf("revoked.example")])
        outcome, lines = await self.send(f"  tls_crl = {crl}\n  tls_verify_hosts = *\n"
                                         "  hosts_require_tls = *\n")
        self.assertDelivered(outcome, lines, "yes")
        self.assertEqual(self.verify_errors(lines), [])
        self.assertRegex(self.exim_received()[0], r" X=TLS1\.[23]:")

    def intermediate_only_crl(self) -> str:
        """A CRL file with the intermediate's CRL but not the root's."""
        blocks = crl_blocks(pki().crl())
        path = os.path.join(self.tmp, "intermediate-only-crl.pem")
        with open(path, "w", encoding="ascii") as f:
            f.write(blocks[1])
        return path

    async def test_crl_missing_for_a_ca_with_try_verify_is_unverified(self) -> None:
        # CRL_CHECK_ALL wants a CRL from every CA in the chain: with only
        # the intermediate's, the intermediate itself (depth 1, issued by
        # the root) cannot be checked.
        self.start_exim(pki().leaf("localhost"))
        outcome, lines = await self.send(f"  tls_crl = {self.intermediate_only_crl()}\n")
        self.assertDelivered(outcome, lines, "no")
        self.assertEqual(self.verify_errors(lines), [
            "[127.0.0.1] SSL verify error: depth=1 error=unable to get certificate CRL "
            "cert=/C=UK/O=exim-py tests/CN=exim-py test intermediate CA"])

    async def test_crl_missing_for_a_ca_with_verify_and_require_tls_defers(self) -> None:
        self.start_exim(pki().leaf("localhost"))
        outcome, lines = await self.send(f"  tls_crl = {self.intermediate_only_crl()}\n"
                                         "  tls_verify_hosts = *\n  hosts_require_tls = *\n")
        self.assertTLSFailureDeferred(outcome, lines)
        self.assertEqual(self.verify_errors(lines), [
            "[127.0.0.1] SSL verify error: depth=1 error=unable to get certificate CRL "
            "cert=/C=UK/O=exim-py tests/CN=exim-py test intermediate CA"])

    def crl_directory(self, revoked: list[Any]) -> str:
        """tls_crl as a directory: each CA's CRL as <issuer hash>.r0, the
        layout X509_LOOKUP_hash_dir reads (what c_rehash makes)."""
        from OpenSSL import crypto
        directory = os.path.join(self.tmp, "crls")
        os.mkdir(directory)
        blocks = crl_blocks(pki().crl(revoked=revoked))
        for authority, block in zip((pki().root, pki().intermediate), blocks, strict=True):
            with warnings.catch_warnings():
                # X509_NAME_hash has no equivalent in cryptography.
                warnings.simplefilter("ignore", DeprecationWarning)
                name = crypto.X509.from_cryptography(authority.certificate).get_subject()
                subject_hash = name.hash()
            with open(os.path.join(directory, f"{subject_hash:08x}.r0"), "w",
                      encoding="ascii") as f:
                f.write(block)
        return directory

    async def test_crl_directory_not_revoked_is_verified(self) -> None:
        self.start_exim(pki().leaf("localhost"))
        crl = self.crl_directory([pki().leaf("revoked.example")])
        outcome, lines = await self.send(f"  tls_crl = {crl}\n  tls_verify_hosts = *\n")
        self.assertDelivered(outcome, lines, "yes")
        self.assertEqual(self.verify_errors(lines), [])

    async def test_crl_directory_revoked_with_try_verify_is_unverified(self) -> None:
        leaf = pki().leaf("localhost")
        self.start_exim(leaf)
        crl = self.crl_directory([leaf])
        outcome, lines = await self.send(f"  tls_crl = {crl}\n")
        self.assertDelivered(outcome, lines, "no")
        self.assertEqual(self.verify_errors(lines), [self.REVOKED])

    async def test_require_tls_without_starttls_offered_defers(self) -> None:
        self.start_exim(None)
        outcome, lines = await self.send("  hosts_require_tls = *\n")
        self.assertEqual(outcome, INCOMPLETE, lines)
        self.assertIn("H=localhost [127.0.0.1]: a TLS session is required, but the server "
                      "did not offer TLS support", lines)
        deferred = [x for x in lines if x.startswith("== ")]
        self.assertEqual(deferred, [
            "== a@y.test R=remote T=remote_smtp defer (-38) H=localhost [127.0.0.1]: "
            "a TLS session is required, but the server did not offer TLS support"])
        self.assertEqual(self.exim_received(), [])

    async def test_clear_when_not_offered(self) -> None:
        self.start_exim(None)
        outcome, lines = await self.send("")
        self.assertDelivered(outcome, lines, None)

    async def test_hosts_avoid_tls(self) -> None:
        self.start_exim(pki().leaf("localhost"))
        outcome, lines = await self.send("  hosts_avoid_tls = 127.0.0.1\n")
        self.assertDelivered(outcome, lines, None)
        self.assertNotRegex(self.exim_received()[0], r" X=")

    async def test_client_certificate_and_sni(self) -> None:
        client = pki().client()
        self.start_exim(pki().leaf("localhost"),
                        f"tls_verify_hosts = *\ntls_verify_certificates = {pki().ca_bundle_path}\n"
                        "log_selector = +tls_peerdn +tls_sni\n")
        outcome, lines = await self.send(
            f"  tls_certificate = {client.chain_path}\n"
            f"  tls_privatekey = {client.key_path}\n"
            "  tls_sni = sni.example\n")
        self.assertDelivered(outcome, lines, "yes")
        received = self.exim_received()[0]
        self.assertIn('DN="C=UK,O=exim-py tests,CN=client.example.com"', received)
        self.assertIn("SNI=sni.example", received)

    def start_exim_refusing_starttls(self) -> None:
        # Exim answers STARTTLS with 454 when its certificate cannot be read.
        broken = type("Broken", (), {"chain_path": "/nonexistent/cert.pem",
                                     "key_path": "/nonexistent/key.pem"})()
        self.start_exim(broken)

    async def test_starttls_refused_goes_on_in_clear(self) -> None:
        self.start_exim_refusing_starttls()
        outcome, lines = await self.send("")
        self.assertDelivered(outcome, lines, None)

    async def test_starttls_refused_with_require_tls_defers(self) -> None:
        self.start_exim_refusing_starttls()
        outcome, lines = await self.send("  hosts_require_tls = *\n")
        self.assertEqual(outcome, INCOMPLETE, lines)
        self.assertIn("== a@y.test R=remote T=remote_smtp defer (-38) H=localhost "
                      "[127.0.0.1]: a TLS session is required, but an attempt to start TLS "
                      "failed", lines)

    async def test_starttls_4xx_without_tryclear_defers(self) -> None:
        self.start_exim_refusing_starttls()
        outcome, lines = await self.send("  tls_tempfail_tryclear = false\n")
        self.assertEqual(outcome, INCOMPLETE, lines)
        deferred = [x for x in lines if x.startswith("== ")]
        self.assertEqual(len(deferred), 1, lines)
        self.assertRegex(deferred[0], r"defer \(0\) H=localhost \[127\.0\.0\.1\]: SMTP error "
                         r"from remote mail server after STARTTLS: 454 ")
