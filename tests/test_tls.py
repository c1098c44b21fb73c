"""Server-side TLS (twisted_mta.smtp.tls): real handshakes between a
pyOpenSSL client and ServerTLS over memory BIOs, and real peers
(``openssl s_client``, Exim 4.96 as an SMTP client) against a Twisted
listener using ServerTLS.  Certificates and OCSP responses come from
tests/pki.py."""

from __future__ import annotations

import atexit
import datetime
import functools
import os
import pwd
import shutil
import subprocess
import tempfile

from OpenSSL import SSL
from twisted.internet import defer, protocol, reactor, task
from twisted.internet.interfaces import IHandshakeListener
from twisted.protocols.basic import LineReceiver
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.trial import unittest
from zope.interface import implementer

from tests.peers import require_program
from tests.pki import DAY, HOUR, TestPKI
from twisted_mta.smtp.tls import (
    OCSP_NOT_REQ,
    OCSP_NOT_RESP,
    OCSP_VFIED,
    ServerTLS,
    ServerTLSOptions,
    TLSConfigError,
    cipher_standard_name,
    load_context,
    ocsp_problem,
    read_ocsp_file,
    session_for,
    tls_in_variables,
)

OPENSSL = "/usr/bin/openssl"
EXIM = "/usr/sbin/exim4"
HOST = "mail.example.com"
OTHER = "other.example.net"


@functools.cache
def pki() -> TestPKI:
    """One PKI for the whole module: key generation is cheap but not free."""
    directory = tempfile.mkdtemp(prefix="exim-py-pki-")
    os.chmod(directory, 0o755)        # the Exim peer reads the CA as its own user
    atexit.register(shutil.rmtree, directory, True)
    return TestPKI(directory)


def options_for(hostname: str = HOST, **changes) -> ServerTLSOptions:
    leaf = pki().leaf(hostname)
    values = dict(certificate=leaf.chain_path, privatekey=leaf.key_path)
    values.update(changes)
    return ServerTLSOptions(**values)


def copy_to_scratch(path: str) -> str:
    """A copy of *path* a test may overwrite."""
    fd, target = tempfile.mkstemp(prefix="ocsp-", dir=pki().directory)
    os.close(fd)
    shutil.copyfile(path, target)
    return target


# -- an in-memory handshake ---------------------------------------------------

class Client:
    """A pyOpenSSL client connection that records the OCSP status it gets."""

    def __init__(self, *, sni: str | None = HOST, request_ocsp: bool = True,
                 certificate=None, max_version: int | None = None) -> None:
        self.stapled: bytes | None = None       # None: the callback never ran
        context = SSL.Context(SSL.TLS_CLIENT_METHOD)
        context.load_verify_locations(pki().ca_path)
        context.set_verify(SSL.VERIFY_NONE)       # the tests inspect, not judge
        if certificate is not None:
            context.use_certificate_chain_file(certificate.chain_path)
            context.use_privatekey_file(certificate.key_path)
        if max_version is not None:
            context.set_max_proto_version(max_version)
        context.set_ocsp_client_callback(self._ocsp)
        self.connection = SSL.Connection(context, None)
        self.connection.set_connect_state()
        if sni is not None:
            self.connection.set_tlsext_host_name(sni.encode())
        if request_ocsp:
            self.connection.request_ocsp()

    def _ocsp(self, connection: SSL.Connection, data: bytes, _: object) -> bool:
        self.stapled = data
        return True

    def server_subject(self) -> str:
        cert = self.connection.get_peer_certificate(as_cryptography=True)
        return cert.subject.rfc4514_string()


def _pump(source: SSL.Connection, sink: SSL.Connection) -> bool:
    moved = False
    while True:
        try:
            data = source.bio_read(65536)
        except SSL.WantReadError:
            return moved
        sink.bio_write(data)
        moved = True


def handshake(server: SSL.Connection, client: Client) -> tuple[Exception | None,
                                                                Exception | None]:
    """Run a TLS handshake to its end; return (server error, client error).

    After the handshake one byte of application data goes each way, so that
    a TLS 1.3 server's verdict on the client's certificate reaches the
    client."""
    ends = {"server": server, "client": client.connection}
    errors: dict[str, Exception | None] = {"server": None, "client": None}
    done = {"server": False, "client": False}
    for _ in range(30):
        for me, peer in (("client", "server"), ("server", "client")):
            if not done[me] and errors[me] is None:
                try:
                    ends[me].do_handshake()
                    done[me] = True
                except SSL.WantReadError:
                    pass
                except SSL.Error as exc:
                    errors[me] = exc
            _pump(ends[me], ends[peer])
        if all(done.values()) or any(errors.values()):
            break
    if all(done.values()):
        for me, peer in (("client", "server"), ("server", "client")):
            try:
                ends[me].send(b"x")
                _pump(ends[me], ends[peer])
                ends[peer].recv(1)
            except SSL.Error as exc:
                errors[peer] = errors[peer] or exc
    for me, peer in (("client", "server"), ("server", "client")):
        _pump(ends[me], ends[peer])
    if any(errors.values()):
        # Let the side still standing read the other's alert.
        for me in ("client", "server"):
            if errors[me] is None:
                try:
                    ends[me].recv(1)
                except SSL.WantReadError:
                    pass
                except SSL.Error as exc:
                    errors[me] = exc
    if errors["client"] is None and not done["client"]:
        errors["client"] = RuntimeError("client handshake did not finish")
    return errors["server"], errors["client"]


def connect(tls: ServerTLS, client: Client | None = None):
    """Handshake *client* (default: a plain one) with a new connection from
    *tls*; return (server connection, client, server error, client error)."""
    client = client or Client()
    server = tls.serverConnectionForTLS(None)
    server_error, client_error = handshake(server, client)
    return server, client, server_error, client_error


# -- the test PKI itself -------------------------------------------------------

class PKITests(unittest.TestCase):
    """The fixtures are what they claim to be, as judged by OpenSSL."""

    def ocsp_verdict(self, path: str) -> str:
        p = pki()
        leaf = p.leaf(HOST)
        result = subprocess.run(
            [require_program(OPENSSL), "ocsp", "-respin", path, "-CAfile", p.ca_path,
             "-issuer", p.intermediate_path, "-cert", leaf.cert_path, "-no_nonce"],
            capture_output=True, text=True, timeout=30)
        return result.stdout + result.stderr

    def test_chains_verify(self) -> None:
        p = pki()
        for leaf in (p.leaf(HOST), p.leaf(HOST, wildcard=True), p.client()):
            result = subprocess.run(
                [require_program(OPENSSL), "verify", "-CAfile", p.ca_path,
                 "-untrusted", p.intermediate_path, leaf.cert_path],
                capture_output=True, text=True, timeout=30)
            self.assertIn(": OK", result.stdout, result.stderr)
        expired = p.leaf(HOST, expired=True)
        result = subprocess.run(
            [OPENSSL, "verify", "-CAfile", p.ca_path, "-untrusted", p.intermediate_path,
             expired.cert_path], capture_output=True, text=True, timeout=30)
        self.assertIn("certificate has expired", result.stdout + result.stderr)

    def test_ocsp_responses_verify(self) -> None:
        p = pki()
        leaf = p.leaf(HOST)
        out = self.ocsp_verdict(p.ocsp_response(leaf))
        self.assertIn("Response verify OK", out)
        self.assertIn(": good", out)
        out = self.ocsp_verdict(p.ocsp_response(leaf, "revoked"))
        self.assertIn("Response verify OK", out)
        self.assertIn(": revoked", out)
        self.assertIn("Response verify OK", self.ocsp_verdict(
            p.ocsp_response(leaf, signer="delegated")))
        self.assertIn("Verify error", self.ocsp_verdict(p.ocsp_response(leaf, signer="bad")))
        self.assertIn("status expired", self.ocsp_verdict(
            p.ocsp_response(leaf, this_update=-2 * DAY, next_update=-DAY)))


# -- OCSP rules ------------------------------------------------------------------

class OCSPRuleTests(unittest.TestCase):
    """ocsp_problem and read_ocsp_file: which proofs Exim would staple."""

    def problem(self, *, serial_of=HOST, at=None, **kwargs) -> str | None:
        p = pki()
        path = p.ocsp_response(p.leaf(HOST), **kwargs)
        with open(path, "rb") as f:
            der = f.read()
        now = at or datetime.datetime.now(datetime.UTC)
        return ocsp_problem(der, p.leaf(serial_of).certificate.serial_number, now)

    def test_good_is_stapled(self) -> None:
        self.assertIsNone(self.problem())
        self.assertIsNone(self.problem(signer="delegated"))

    def test_bad_signature_is_left_to_the_client(self) -> None:
        # Exim's load-time OCSP_basic_verify() only rejects on internal
        # errors, so a proof from an untrusted signer is still served.
        self.assertIsNone(self.problem(signer="bad"))

    def test_status_must_be_good(self) -> None:
        self.assertIn("bad cert status: REVOKED", self.problem(status="revoked"))
        self.assertIn("bad cert status: UNKNOWN", self.problem(status="unknown"))
        self.assertIn("not valid: TRY_LATER", self.problem(response_status="try_later"))

    def test_dates_with_300s_skew(self) -> None:
        s = datetime.timedelta(seconds=1)
        self.assertIn("expired", self.problem(this_update=-DAY, next_update=-HOUR))
        self.assertIn("expired", self.problem(this_update=-DAY, next_update=-310 * s))
        self.assertIsNone(self.problem(this_update=-DAY, next_update=-290 * s))
        self.assertIn("not yet valid", self.problem(this_update=310 * s))
        self.assertIsNone(self.problem(this_update=290 * s))
        self.assertIn("no nextUpdate", self.problem(next_update=None))

    def test_judged_at_the_given_time(self) -> None:
        later = datetime.datetime.now(datetime.UTC) + 2 * DAY
        self.assertIn("expired", self.problem(at=later))

    def test_serial_must_match_the_certificate_sent(self) -> None:
        self.assertEqual(self.problem(serial_of=OTHER), "failed to find match for ocsp")

    def test_garbage(self) -> None:
        self.assertIn("Error reading", ocsp_problem(b"not DER", 1,
                                                    datetime.datetime.now(datetime.UTC)))

    def test_file_formats(self) -> None:
        p = pki()
        leaf = p.leaf(HOST)
        der_path = p.ocsp_response(leaf)
        pem_path = p.ocsp_response(leaf, pem=True)
        with open(der_path, "rb") as f:
            der = f.read()
        self.assertEqual(read_ocsp_file(der_path), der)
        self.assertEqual(read_ocsp_file("DER " + der_path), der)
        pem_der = read_ocsp_file("PEM " + pem_path)
        self.assertIsNone(ocsp_problem(pem_der, leaf.certificate.serial_number,
                                       datetime.datetime.now(datetime.UTC)))
        self.assertRaises(ValueError, read_ocsp_file, "PEM " + der_path)
        self.assertRaises(OSError, read_ocsp_file, "/nonexistent/ocsp.der")


# -- loading -----------------------------------------------------------------------

class LoadContextTests(unittest.TestCase):
    """load_context: unusable files and cipher lists give clear errors."""

    def assertConfigError(self, options: ServerTLSOptions, *fragments: str) -> None:
        exc = self.assertRaises(TLSConfigError, load_context, options)
        for fragment in fragments:
            self.assertIn(fragment, str(exc))

    def test_good(self) -> None:
        self.assertIsInstance(load_context(options_for()), SSL.Context)

    def test_key_in_certificate_file(self) -> None:
        leaf = pki().leaf(HOST)
        combined = os.path.join(pki().directory, "combined.pem")
        with open(combined, "wb") as out:
            for path in (leaf.chain_path, leaf.key_path):
                with open(path, "rb") as f:
                    out.write(f.read())
        load_context(ServerTLSOptions(certificate=combined))
        load_context(ServerTLSOptions(certificate=combined, privatekey=""))

    def test_missing_certificate(self) -> None:
        self.assertConfigError(
            options_for(certificate="/nonexistent/cert.pem"),
            "(SSL_CTX_use_certificate_chain_file file=/nonexistent/cert.pem): "
            "No such file or directory")

    def test_certificate_file_without_certificate(self) -> None:
        key = pki().leaf(HOST).key_path
        self.assertConfigError(options_for(certificate=key),
                               f"(SSL_CTX_use_certificate_chain_file file={key}): no start line")

    def test_missing_key(self) -> None:
        self.assertConfigError(options_for(privatekey="/nonexistent/key.pem"),
                               "(SSL_CTX_use_PrivateKey_file file=/nonexistent/key.pem): "
                               "No such file or directory")

    def test_key_does_not_match(self) -> None:
        wrong = pki().leaf(OTHER).key_path
        self.assertConfigError(options_for(privatekey=wrong),
                               f"(SSL_CTX_use_PrivateKey_file file={wrong}): "
                               "key values mismatch")

    def test_bad_cipher_list(self) -> None:
        self.assertConfigError(options_for(require_ciphers="NO-SUCH-CIPHER"),
                               "(SSL_CTX_set_cipher_list): no cipher match")

    def test_missing_ca_file(self) -> None:
        self.assertConfigError(
            options_for(verify="require", verify_certificates="/nonexistent/ca.pem"),
            "failed to stat /nonexistent/ca.pem for certificates")
        # Not verifying: the CA option is not even looked at, as in Exim.
        load_context(options_for(verify="none", verify_certificates="/nonexistent/ca.pem"))

    def test_missing_crl(self) -> None:
        self.assertConfigError(
            options_for(verify="try", verify_certificates=pki().ca_path,
                        crl="/nonexistent/crl.pem"),
            "failed to stat /nonexistent/crl.pem")

    def test_unreadable_crl(self) -> None:
        key = pki().leaf(HOST).key_path
        self.assertConfigError(
            options_for(verify="try", verify_certificates=pki().ca_path, crl=key),
            f"(X509_STORE_load_locations file={key}):")

    def test_bad_verify_mode(self) -> None:
        self.assertRaises(ValueError, options_for, verify="sometimes")

    def test_context_reloads_changed_files(self) -> None:
        leaf = pki().leaf(HOST)
        chain = os.path.join(pki().directory, "reloaded-chain.pem")
        shutil.copyfile(leaf.chain_path, chain)
        tls = ServerTLS(options_for(certificate=chain))
        first = tls.context()
        self.assertIs(tls.context(), first)
        other = pki().leaf(OTHER)
        shutil.copyfile(other.chain_path, chain)
        self.assertRaises(TLSConfigError, tls.context)     # key no longer matches


# -- handshakes ---------------------------------------------------------------------

class OCSPStaplingTests(unittest.TestCase):
    """The staple sent (or not) on a real handshake, and $tls_in_ocsp."""

    def staple(self, ocsp_file: str | None, client: Client | None = None,
               clock=None) -> tuple[Client, dict[str, str]]:
        tls = ServerTLS(options_for(ocsp_file=ocsp_file), clock=clock)
        server, client, server_error, client_error = connect(tls, client)
        self.assertIsNone(server_error)
        self.assertIsNone(client_error)
        return client, tls_in_variables(server)

    def test_good_response_is_stapled(self) -> None:
        path = pki().ocsp_response(pki().leaf(HOST))
        client, variables = self.staple(path)
        with open(path, "rb") as f:
            self.assertEqual(client.stapled, f.read())
        self.assertEqual(variables["tls_in_ocsp"], str(OCSP_VFIED))

    def test_prefixed_names(self) -> None:
        p = pki()
        for spec in ("DER " + p.ocsp_response(p.leaf(HOST)),
                     "PEM " + p.ocsp_response(p.leaf(HOST), pem=True)):
            client, variables = self.staple(spec)
            self.assertTrue(client.stapled, spec)
            self.assertEqual(variables["tls_in_ocsp"], "4")

    def test_unusable_responses_are_not_stapled(self) -> None:
        p = pki()
        leaf = p.leaf(HOST)
        for kwargs in (dict(status="revoked"), dict(status="unknown"),
                       dict(this_update=-2 * DAY, next_update=-DAY),
                       dict(next_update=None), dict(this_update=HOUR),
                       dict(response_status="try_later")):
            client, variables = self.staple(p.ocsp_response(leaf, **kwargs))
            self.assertEqual(client.stapled, b"", kwargs)
            self.assertEqual(variables["tls_in_ocsp"], str(OCSP_NOT_RESP), kwargs)

    def test_response_for_another_certificate(self) -> None:
        p = pki()
        client, variables = self.staple(p.ocsp_response(p.leaf(OTHER)))
        self.assertEqual(client.stapled, b"")
        self.assertEqual(variables["tls_in_ocsp"], "1")

    def test_not_requested(self) -> None:
        path = pki().ocsp_response(pki().leaf(HOST))
        client, variables = self.staple(path, Client(request_ocsp=False))
        self.assertIsNone(client.stapled)
        self.assertEqual(variables["tls_in_ocsp"], str(OCSP_NOT_REQ))

    def test_no_ocsp_file_configured(self) -> None:
        # Requested, but with tls_ocsp_file unset Exim never looks: 0, not 1.
        client, variables = self.staple(None)
        self.assertEqual(client.stapled, b"")
        self.assertEqual(variables["tls_in_ocsp"], "0")
        client, variables = self.staple("")
        self.assertEqual(variables["tls_in_ocsp"], "1")

    def test_missing_file_is_reported_not_fatal(self) -> None:
        tls = ServerTLS(options_for(ocsp_file="/nonexistent/ocsp.der"))
        server, client, server_error, client_error = connect(tls)
        self.assertIsNone(server_error)
        self.assertEqual(client.stapled, b"")
        self.assertEqual(session_for(server).problems, [
            'Failed to open OCSP response file "/nonexistent/ocsp.der": '
            "No such file or directory"])

    def test_file_is_read_for_each_connection(self) -> None:
        p = pki()
        leaf = p.leaf(HOST)
        path = copy_to_scratch(p.ocsp_response(leaf, "revoked"))
        tls = ServerTLS(options_for(ocsp_file=path))
        self.assertEqual(connect(tls)[1].stapled, b"")
        shutil.copyfile(p.ocsp_response(leaf), path)
        self.assertTrue(connect(tls)[1].stapled)

    def test_dates_judged_by_the_given_clock(self) -> None:
        path = pki().ocsp_response(pki().leaf(HOST))
        clock = task.Clock()
        clock.advance((datetime.datetime.now(datetime.UTC) + 2 * DAY).timestamp())
        client, variables = self.staple(path, clock=clock)
        self.assertEqual(client.stapled, b"")
        self.assertEqual(variables["tls_in_ocsp"], "1")


class SNITests(unittest.TestCase):
    """A client's SNI name can switch the certificate (and OCSP proof)."""

    def test_switch(self) -> None:
        p = pki()
        other = options_for(OTHER, ocsp_file=p.ocsp_response(p.leaf(OTHER)))
        seen = []

        def sni(name: str) -> ServerTLSOptions | None:
            seen.append(name)
            return other if name == OTHER else None

        tls = ServerTLS(options_for(), sni=sni)
        server, client, server_error, _ = connect(tls, Client(sni=OTHER))
        self.assertIsNone(server_error)
        self.assertIn(f"CN={OTHER}", client.server_subject())
        self.assertTrue(client.stapled)
        variables = tls_in_variables(server)
        self.assertEqual((variables["tls_in_sni"], variables["tls_sni"]), (OTHER, OTHER))
        self.assertEqual(variables["tls_in_ocsp"], "4")
        self.assertIs(session_for(server).options, other)

        server, client, _, _ = connect(tls, Client(sni=HOST))
        self.assertIn(f"CN={HOST}", client.server_subject())
        self.assertEqual(tls_in_variables(server)["tls_in_sni"], HOST)
        self.assertEqual(seen, [OTHER, HOST])

    def test_no_sni_sent(self) -> None:
        tls = ServerTLS(options_for(), sni=lambda name: self.fail("called"))
        server, client, server_error, _ = connect(tls, Client(sni=None))
        self.assertIsNone(server_error)
        self.assertIn(f"CN={HOST}", client.server_subject())
        self.assertEqual(tls_in_variables(server)["tls_in_sni"], "")

    def test_name_recorded_without_a_switcher(self) -> None:
        server, _, _, _ = connect(ServerTLS(options_for()), Client(sni="anything.example"))
        self.assertEqual(tls_in_variables(server)["tls_in_sni"], "anything.example")

    def test_unloadable_options_end_the_handshake(self) -> None:
        broken = options_for(certificate="/nonexistent/cert.pem")
        tls = ServerTLS(options_for(), sni=lambda name: broken)
        server, _, server_error, client_error = connect(tls, Client(sni=OTHER))
        self.assertIsNotNone(server_error)
        self.assertIsNotNone(client_error)
        self.assertIn("/nonexistent/cert.pem", session_for(server).problems[0])


class ClientCertificateTests(unittest.TestCase):
    """tls_verify_hosts (require), tls_try_verify_hosts (try) and neither."""

    def run_with(self, verify: str, certificate=None, **changes):
        changes.setdefault("verify_certificates", pki().ca_path)
        tls = ServerTLS(options_for(verify=verify, **changes))
        return connect(tls, Client(certificate=certificate))

    def test_require_with_good_certificate(self) -> None:
        server, _, server_error, client_error = self.run_with("require", pki().client())
        self.assertIsNone(server_error)
        self.assertIsNone(client_error)
        variables = tls_in_variables(server)
        self.assertEqual(variables["tls_in_certificate_verified"], "1")
        self.assertEqual(variables["tls_certificate_verified"], "1")
        self.assertEqual(variables["tls_in_peerdn"],
                         "/C=UK/O=exim-py tests/CN=client.example.com")
        self.assertEqual(variables["tls_peerdn"], variables["tls_in_peerdn"])

    def test_require_without_certificate(self) -> None:
        server, _, server_error, _ = self.run_with("require")
        self.assertIn("peer did not return a certificate", str(server_error))

    def test_require_with_untrusted_certificate(self) -> None:
        untrusted = pki().leaf("rogue.example.com", self_signed=True, client=True)
        server, _, server_error, client_error = self.run_with("require", untrusted)
        self.assertIsNotNone(server_error)
        self.assertIsNotNone(client_error)
        self.assertEqual(session_for(server).verify_errors, [
            "SSL verify error: depth=0 error=self-signed certificate "
            "cert=/C=UK/O=exim-py tests/CN=rogue.example.com"])

    def test_try_without_certificate(self) -> None:
        server, _, server_error, _ = self.run_with("try")
        self.assertIsNone(server_error)
        variables = tls_in_variables(server)
        self.assertEqual(variables["tls_in_certificate_verified"], "0")
        self.assertEqual(variables["tls_in_peerdn"], "")

    def test_try_with_untrusted_certificate(self) -> None:
        untrusted = pki().leaf("rogue.example.com", self_signed=True, client=True)
        server, _, server_error, client_error = self.run_with("try", untrusted)
        self.assertIsNone(server_error)
        self.assertIsNone(client_error)
        variables = tls_in_variables(server)
        self.assertEqual(variables["tls_in_certificate_verified"], "0")
        self.assertEqual(variables["tls_in_peerdn"],
                         "/C=UK/O=exim-py tests/CN=rogue.example.com")
        self.assertEqual(len(session_for(server).verify_errors), 1)

    def test_try_with_good_certificate(self) -> None:
        server, _, server_error, _ = self.run_with("try", pki().client())
        self.assertIsNone(server_error)
        self.assertEqual(tls_in_variables(server)["tls_in_certificate_verified"], "1")

    def test_none_asks_for_nothing(self) -> None:
        server, _, server_error, _ = self.run_with("none", pki().client())
        self.assertIsNone(server_error)
        variables = tls_in_variables(server)
        self.assertEqual(variables["tls_in_peerdn"], "")
        self.assertEqual(variables["tls_in_certificate_verified"], "0")

    def test_verify_without_ca_setting_asks_for_nothing(self) -> None:
        # Exim sets up checking only when tls_verify_certificates is non-empty.
        server, _, server_error, _ = self.run_with("require", verify_certificates=None)
        self.assertIsNone(server_error)

    def test_crl_revokes(self) -> None:
        p = pki()
        victim = p.leaf("revoked-client.example.com", client=True)
        crl = p.crl([victim])
        server, _, server_error, _ = self.run_with("require", victim, crl=crl)
        self.assertIsNotNone(server_error)
        self.assertIn("error=certificate revoked", session_for(server).verify_errors[0])
        server, _, server_error, _ = self.run_with("require", p.client(), crl=crl)
        self.assertIsNone(server_error)


class VariableTests(unittest.TestCase):
    """$tls_in_cipher and friends, in Exim's OpenSSL spelling."""

    def test_tls13(self) -> None:
        server, _, _, _ = connect(ServerTLS(options_for()))
        variables = tls_in_variables(server)
        self.assertEqual(variables["tls_in_ver"], "TLS1.3")
        self.assertEqual(variables["tls_in_cipher"], "TLS1.3:TLS_AES_256_GCM_SHA384:256")
        self.assertEqual(variables["tls_in_cipher_std"], "TLS_AES_256_GCM_SHA384")
        self.assertEqual(variables["tls_in_bits"], "256")
        self.assertEqual(variables["tls_cipher"], variables["tls_in_cipher"])
        self.assertEqual(variables["tls_bits"], "256")
        self.assertEqual(variables["tls_in_resumption"], "0")

    def test_tls12_with_required_ciphers(self) -> None:
        # Underscores are accepted for hyphens, as Exim does.
        tls = ServerTLS(options_for(require_ciphers="ECDHE_ECDSA_AES128_GCM_SHA256"))
        server, _, server_error, _ = connect(tls, Client(max_version=SSL.TLS1_2_VERSION))
        self.assertIsNone(server_error)
        variables = tls_in_variables(server)
        self.assertEqual(variables["tls_in_cipher"],
                         "TLS1.2:ECDHE-ECDSA-AES128-GCM-SHA256:128")
        self.assertEqual(variables["tls_in_cipher_std"],
                         "TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256")
        self.assertEqual(variables["tls_in_ver"], "TLS1.2")

    def test_required_ciphers_leave_tls13_alone(self) -> None:
        tls = ServerTLS(options_for(require_ciphers="ECDHE-ECDSA-AES128-GCM-SHA256"))
        server, _, server_error, _ = connect(tls)
        self.assertIsNone(server_error)
        self.assertEqual(tls_in_variables(server)["tls_in_ver"], "TLS1.3")

    def test_explicit_ocsp_flag(self) -> None:
        server, _, _, _ = connect(ServerTLS(options_for()))
        self.assertEqual(tls_in_variables(server, ocsp_stapled=True)["tls_in_ocsp"], "4")
        self.assertEqual(tls_in_variables(server, ocsp_stapled=False)["tls_in_ocsp"], "0")

    def test_standard_names_match_openssl(self) -> None:
        listing = subprocess.run(
            [require_program(OPENSSL), "ciphers", "-stdname", "ALL:!PSK:!SRP:!aNULL"],
            capture_output=True, text=True, timeout=30, check=True).stdout
        pairs = [(line.split()[2], line.split()[0]) for line in listing.splitlines()
                 if " - " in line]
        self.assertGreater(len(pairs), 30)
        for openssl_name, standard in pairs:
            self.assertEqual(cipher_standard_name(openssl_name), standard, openssl_name)
        self.assertEqual(cipher_standard_name("NOT-A-CIPHER"), "")


# -- real peers ---------------------------------------------------------------------

@implementer(IHandshakeListener)
class Recorder(protocol.Protocol):
    """The application side of the test server: remembers the TLS variables
    and sends a greeting once the handshake is over."""

    def __init__(self, finished: defer.Deferred) -> None:
        self.finished = finished
        self.variables: dict[str, str] | None = None

    def handshakeCompleted(self) -> None:
        self.variables = tls_in_variables(self.transport.getHandle())
        self.transport.write(b"220 ready\r\n")

    def connectionLost(self, reason=None) -> None:
        self.finished.callback(self.variables)


class OutputCollector(protocol.ProcessProtocol):
    """Gathers a child's stdout and stderr; writes *stdin* to it and closes
    its stdin at once."""

    def __init__(self, done: defer.Deferred, stdin: bytes = b"") -> None:
        self.done = done
        self.stdin = stdin
        self.output = b""

    def connectionMade(self) -> None:
        self.transport.write(self.stdin)
        self.transport.closeStdin()

    def outReceived(self, data: bytes) -> None:
        self.output += data

    errReceived = outReceived

    def processEnded(self, reason) -> None:
        self.done.callback(self.output.decode("utf-8", "replace"))


class OpenSSLClientTests(unittest.TestCase):
    """``openssl s_client`` against a Twisted TLS-on-connect listener."""

    timeout = 60

    def listen(self, tls: ServerTLS) -> int:
        self.sessions: list[defer.Deferred] = []

        def build(addr):
            finished = defer.Deferred()
            self.sessions.append(finished)
            return Recorder(finished)

        factory = protocol.Factory()
        factory.buildProtocol = build
        port = reactor.listenTCP(0, TLSMemoryBIOFactory(tls, False, factory),
                                 interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        return port.getHost().port

    @defer.inlineCallbacks
    def s_client(self, tls: ServerTLS, *extra: str):
        port = self.listen(tls)
        done = defer.Deferred()
        args = [OPENSSL, "s_client", "-connect", f"127.0.0.1:{port}", "-status",
                "-CAfile", pki().ca_path, *extra]
        reactor.spawnProcess(OutputCollector(done), require_program(OPENSSL), args,
                             env={"PATH": "/usr/bin:/bin"})
        output = yield done
        variables = yield self.sessions[0] if self.sessions else None
        return output, variables

    @defer.inlineCallbacks
    def test_good_staple(self):
        path = pki().ocsp_response(pki().leaf(HOST))
        output, variables = yield self.s_client(ServerTLS(options_for(ocsp_file=path)),
                                                "-servername", HOST)
        self.assertIn("OCSP Response Status: successful", output)
        self.assertIn("Cert Status: good", output)
        self.assertIn("Verify return code: 0 (ok)", output)
        self.assertEqual(variables["tls_in_ocsp"], "4")
        self.assertEqual(variables["tls_in_sni"], HOST)
        self.assertTrue(variables["tls_in_cipher"].startswith("TLS1.3:"))

    @defer.inlineCallbacks
    def test_unusable_responses_not_stapled(self):
        p = pki()
        leaf = p.leaf(HOST)
        for kwargs in (dict(status="revoked"), dict(this_update=-2 * DAY, next_update=-DAY),
                       dict(next_update=None)):
            tls = ServerTLS(options_for(ocsp_file=p.ocsp_response(leaf, **kwargs)))
            output, variables = yield self.s_client(tls)
            self.assertIn("OCSP response: no response sent", output, kwargs)
            self.assertNotIn("Cert Status", output, kwargs)
            self.assertEqual(variables["tls_in_ocsp"], "1", kwargs)

    @defer.inlineCallbacks
    def test_sni_switches_certificate(self):
        other = options_for(OTHER)
        tls = ServerTLS(options_for(), sni=lambda name: other if name == OTHER else None)
        output, variables = yield self.s_client(tls, "-servername", OTHER)
        self.assertIn(f"CN = {OTHER}", output)
        self.assertEqual(variables["tls_in_sni"], OTHER)
        output, _ = yield self.s_client(tls, "-servername", HOST)
        self.assertIn(f"CN = {HOST}", output)

    @defer.inlineCallbacks
    def test_client_certificate(self):
        client = pki().client()
        tls = ServerTLS(options_for(verify="require", verify_certificates=pki().ca_path))
        output, variables = yield self.s_client(
            tls, "-cert", client.cert_path, "-key", client.key_path,
            "-cert_chain", pki().intermediate_path)
        self.assertIn("Verify return code: 0 (ok)", output)
        self.assertEqual(variables["tls_in_certificate_verified"], "1")
        self.assertEqual(variables["tls_in_peerdn"],
                         "/C=UK/O=exim-py tests/CN=client.example.com")

    @defer.inlineCallbacks
    def test_client_certificate_required_but_missing(self):
        tls = ServerTLS(options_for(verify="require", verify_certificates=pki().ca_path))
        output, variables = yield self.s_client(tls)
        # Under TLS 1.3 the client finishes first and may leave before it reads
        # the server's alert; the server side never completes.
        self.assertIn("Acceptable client certificate CA names", output)
        self.assertIsNone(variables)



@implementer(IHandshakeListener)
class SMTPStub(LineReceiver):
    """Just enough of an ESMTP server, with STARTTLS through ServerTLS, to
    take one message from Exim."""

    def __init__(self, tls: ServerTLS, finished: defer.Deferred) -> None:
        self.tls = tls
        self.finished = finished
        self.variables: dict[str, str] | None = None
        self.in_data = False

    def connectionMade(self) -> None:
        self.sendLine(b"220 stub ESMTP")

    def handshakeCompleted(self) -> None:
        self.variables = tls_in_variables(self.transport.getHandle())

    def lineReceived(self, line: bytes) -> None:
        if self.in_data:
            if line == b".":
                self.in_data = False
                self.sendLine(b"250 OK id=stub")
            return
        verb = line.split(b" ", 1)[0].upper()
        if verb == b"EHLO":
            self.sendLine(b"250-stub\r\n250-STARTTLS\r\n250 HELP")
        elif verb == b"STARTTLS":
            self.sendLine(b"220 TLS go ahead")
            self.transport.startTLS(self.tls)
        elif verb == b"DATA":
            self.in_data = True
            self.sendLine(b"354 Enter message")
        elif verb == b"QUIT":
            self.sendLine(b"221 bye")
            self.transport.loseConnection()
        else:
            self.sendLine(b"250 OK")

    def connectionLost(self, reason=None) -> None:
        self.finished.callback(self.variables)


EXIM_CLIENT_CONFIG = """\
primary_hostname = client.test
spool_directory = {directory}/spool
log_file_path = {directory}/%slog
keep_environment =
begin routers
stub:
  driver = manualroute
  route_list = * 127.0.0.1
  transport = stub_smtp
  self = send
begin transports
stub_smtp:
  driver = smtp
  port = {port}
  hosts_require_tls = *
  hosts_require_ocsp = *
  tls_verify_certificates = {ca}
  tls_verify_cert_hostnames =
  tls_sni = {sni}
begin retry
* * F,1d,1d
"""


class EximClientTests(unittest.TestCase):
    """Exim 4.96 (a GnuTLS build) as the sending client, with
    hosts_require_ocsp: it must accept our staple and check it."""

    timeout = 60

    def setUp(self) -> None:
        require_program(EXIM)
        if os.geteuid() != 0:
            raise unittest.SkipTest("exim4 -C needs root")
        try:
            pwd.getpwnam("Debian-exim")
        except KeyError:
            raise unittest.SkipTest("no Debian-exim user") from None

    @defer.inlineCallbacks
    def deliver(self, tls: ServerTLS):
        """Have Exim send one message to an SMTPStub using *tls*; return
        Exim's main log and the stub's TLS variables."""
        finished = defer.Deferred()
        connections = []

        def build(addr):
            connections.append(addr)
            return SMTPStub(tls, finished)

        factory = protocol.Factory()
        factory.buildProtocol = build
        port = reactor.listenTCP(0, factory, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        # Exim drops to its own user, which must reach and write its spool and
        # logs: a directory of its own outside the (private) pytest tree.
        directory = tempfile.mkdtemp(prefix="exim-py-client-")
        self.addCleanup(shutil.rmtree, directory, True)
        os.makedirs(os.path.join(directory, "spool"))
        exim_user = pwd.getpwnam("Debian-exim")
        for path in (directory, os.path.join(directory, "spool")):
            os.chown(path, exim_user.pw_uid, exim_user.pw_gid)
            os.chmod(path, 0o755)
        config = os.path.join(directory, "configure")
        with open(config, "w") as f:
            f.write(EXIM_CLIENT_CONFIG.format(directory=directory, port=port.getHost().port,
                                              ca=pki().ca_path, sni=HOST))
        done = defer.Deferred()
        reactor.spawnProcess(
            OutputCollector(done, b"Subject: test\n\nhello\n"), EXIM,
            [EXIM, "-C", config, "-odi", "-f", "sender@client.test", "rcpt@dest.test"],
            env={"PATH": "/usr/sbin:/usr/bin:/bin"})
        output = yield done
        variables = (yield finished) if connections else None
        try:
            with open(os.path.join(directory, "mainlog")) as f:
                return f.read(), variables
        except OSError:
            self.fail(f"exim4 wrote no main log:\n{output}")

    @defer.inlineCallbacks
    def test_good_staple_accepted(self):
        tls = ServerTLS(options_for(ocsp_file=pki().ocsp_response(pki().leaf(HOST))))
        log, variables = yield self.deliver(tls)
        self.assertIn("=> rcpt@dest.test R=stub T=stub_smtp", log)
        self.assertIn("CV=yes", log)
        self.assertEqual(variables["tls_in_ocsp"], "4")
        self.assertEqual(variables["tls_in_sni"], HOST)

    @defer.inlineCallbacks
    def test_withheld_staple_defers(self):
        revoked = pki().ocsp_response(pki().leaf(HOST), "revoked")
        log, variables = yield self.deliver(ServerTLS(options_for(ocsp_file=revoked)))
        self.assertIn("== rcpt@dest.test R=stub T=stub_smtp defer (-37)", log)
        self.assertIn("certificate status check failed", log)
        self.assertEqual(variables["tls_in_ocsp"], "1")
