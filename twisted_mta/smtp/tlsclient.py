"""The client side of TLS for the smtp transport (STARTTLS), set up the way
Exim 4.96's ``tls-openssl.c`` sets up a client session.

``ClientTLS`` is a Twisted ``IOpenSSLClientConnectionCreator``: hand it to
``transport.startTLS``.  It builds an OpenSSL client context from
already-expanded option values (``ClientTLSOptions``): trust anchors
(``tls_verify_certificates``), an optional client certificate
(``tls_certificate``/``tls_privatekey``), ``tls_require_ciphers``, the SNI
name (``tls_sni``).  Its verify callback follows Exim's:

* ``verify="require"`` (the host is in ``tls_verify_hosts``): a chain that
  does not verify, or (with ``check_hostnames``) a leaf whose names do not
  match, ends the handshake;
* ``verify="try"`` (``tls_try_verify_hosts``): the failure is logged and
  overridden; ``$tls_out_certificate_verified`` is then 0;
* ``verify="none"``: nothing is checked.

Each failure is recorded as Exim logs it (``SSL verify error: depth=0
error=... cert=...``, ``SSL verify error: certificate name mismatch:
DN="..." H="..."``), for the caller to write with ``[ip]`` in front.

With ``ocsp`` set to ``request`` or ``require`` (the host is in
``hosts_request_ocsp`` or ``hosts_require_ocsp``) the client asks for a
stapled OCSP response and judges it with ``twisted_mta.smtp.stapling``; a
host that must staple and sends nothing or a bad response fails the
handshake.  The verdict is ``$tls_out_ocsp`` and its log lines wait in
``ClientTLSSession.ocsp_log`` for the caller.

Host names are checked with service_identity (subjectAltName DNS names, a
single leading wildcard label; the subject CN only when there is no SAN,
which is what OpenSSL's X509_check_host does too).
"""

from __future__ import annotations

import datetime
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from cryptography import x509
from OpenSSL import SSL, crypto
from service_identity import CertificateError, VerificationError
from service_identity.cryptography import (
    verify_certificate_hostname,
    verify_certificate_ip_address,
)
from twisted.internet import defer as tdefer
from twisted.internet.interfaces import IOpenSSLClientConnectionCreator
from zope.interface import implementer

from twisted_mta.smtp.stapling import StapleVerdict, judge_staple, no_staple
from twisted_mta.smtp.tls import (
    _CONTEXT_OPTIONS,
    OCSP_FAILED,
    OCSP_NOT_REQ,
    OCSP_NOT_RESP,
    TLSConfigError,
    _oneline,
    _openssl_reason,
    _verify_error_text,
    cipher_standard_name,
    load_certificate_and_key,
    load_crl,
)

__all__ = ["ClientTLS", "ClientTLSOptions", "ClientTLSSession", "TLSConfigError",
           "handshake_error_text", "names_match", "tls_out_variables", "verifies_against"]


@dataclass(frozen=True)
class ClientTLSOptions:
    """The transport's TLS options for one host, every value expanded.

    ``verify`` is ``require`` (host in tls_verify_hosts), ``try`` (in
    tls_try_verify_hosts) or ``none``; ``check_hostnames`` is the name the
    leaf must carry (host in tls_verify_cert_hostnames), else None.
    ``ocsp`` is ``require`` (host in hosts_require_ocsp), ``request``
    (hosts_request_ocsp) or ``none``."""

    verify_certificates: str | None = "system"
    verify: str = "try"
    check_hostnames: str | None = None
    sni: str | None = None
    certificate: str | None = None
    privatekey: str | None = None
    require_ciphers: str | None = None
    crl: str | None = None
    ocsp: str = "none"


@dataclass(eq=False)
class ClientTLSSession:
    """What happened during one client handshake."""

    options: ClientTLSOptions
    verify_failed: bool = False
    verify_errors: list[str] = field(default_factory=list)
    handshake_done: tdefer.Deferred[None] = field(default_factory=tdefer.Deferred)
    connection: SSL.Connection | None = None
    ocsp_status: int = OCSP_NOT_REQ
    ocsp_log: list[str] = field(default_factory=list)
    contexts: list[SSL.Context] = field(default_factory=list, repr=False)


def _load_context(options: ClientTLSOptions) -> SSL.Context:
    context = SSL.Context(SSL.TLS_CLIENT_METHOD)
    context.set_options(_CONTEXT_OPTIONS)
    if options.certificate:
        load_certificate_and_key(context, options.certificate, options.privatekey)
    if options.require_ciphers:
        try:
            context.set_cipher_list(options.require_ciphers.encode())
        except SSL.Error as exc:
            raise TLSConfigError(f"(SSL_CTX_set_cipher_list): {_openssl_reason(exc)}") from None
    if options.verify != "none" or options.ocsp != "none":
        # The anchors also vouch for an OCSP response's signer.
        cas = options.verify_certificates or "system"
        context.set_default_verify_paths()
        if cas != "system" and not cas.startswith("system,"):
            if not os.path.exists(cas):
                raise TLSConfigError(f"failed to stat {cas} for certificates")
            try:
                if os.path.isdir(cas):
                    context.load_verify_locations(None, cas)
                elif os.path.getsize(cas) > 0:
                    context.load_verify_locations(cas)
            except SSL.Error as exc:
                raise TLSConfigError(f"(SSL_CTX_load_verify_locations file={cas}): "
                                     f"{_openssl_reason(exc)}") from None
        if options.crl:
            load_crl(context, options.crl)
    return context


def verifies_against(store: crypto.X509Store, certificate: x509.Certificate,
                     untrusted: Sequence[x509.Certificate]) -> bool:
    """Whether *certificate* chains to the anchors in *store*, with
    *untrusted* as the intermediates to build the chain from."""
    check = crypto.X509StoreContext(
        store, crypto.X509.from_cryptography(certificate),
        [crypto.X509.from_cryptography(c) for c in untrusted])
    try:
        check.verify_certificate()
    except crypto.X509StoreContextError:
        return False
    return True


def names_match(certificate: Any, hostname: str) -> bool:
    """Whether *certificate* (cryptography) is for *hostname* (SAN, one
    leading wildcard label; CN only without a SAN)."""
    import ipaddress
    try:
        try:
            address = ipaddress.ip_address(hostname)
        except ValueError:
            verify_certificate_hostname(certificate, hostname)
        else:
            # An IP-literal host: an iPAddress SAN must carry it.
            verify_certificate_ip_address(certificate, str(address))
        return True
    except (VerificationError, ValueError):
        return False
    except CertificateError:
        # No subjectAltName: X509_check_host falls back to the subject CN.
        from cryptography.x509.oid import NameOID
        cns = certificate.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
        return any(str(cn.value).lower() == hostname.lower() for cn in cns)


@implementer(IOpenSSLClientConnectionCreator)
class ClientTLS:
    """A connection creator for one STARTTLS handshake.

    Build it (``TLSConfigError`` for an unusable file) before sending
    STARTTLS; ``session`` tells how the handshake went."""

    def __init__(self, options: ClientTLSOptions,
                 now: Callable[[], datetime.datetime] | None = None) -> None:
        self.options = options
        self.context = _load_context(options)
        self.session = ClientTLSSession(options)
        self._now = now or (lambda: datetime.datetime.now(datetime.UTC))
        if options.ocsp != "none":
            self.context.set_ocsp_client_callback(self._staple)

    def clientConnectionForTLS(self, tlsProtocol: Any) -> SSL.Connection:
        options, session = self.options, self.session
        context = self.context
        if options.verify == "none":
            context.set_verify(SSL.VERIFY_NONE)
        else:
            context.set_verify(SSL.VERIFY_PEER, self._verify)
        connection = SSL.Connection(context, None)
        connection.set_app_data(tlsProtocol)
        if options.sni:
            connection.set_tlsext_host_name(options.sni.encode("idna"))
        connection.set_info_callback(self._info)
        if options.ocsp != "none":
            connection.request_ocsp()
            session.ocsp_status = OCSP_NOT_RESP
        session.connection = connection
        session.contexts.append(context)
        return connection

    def _info(self, connection: SSL.Connection, where: int, ret: int) -> None:
        if where & SSL.SSL_CB_HANDSHAKE_DONE:
            done = self.session.handshake_done
            if not done.called:
                done.callback(None)

    def _staple(self, connection: SSL.Connection, data: bytes, _: Any) -> bool:
        """OpenSSL's status callback: False ends the handshake."""
        required = self.options.ocsp == "require"
        if not data:
            verdict = no_staple(required)
        else:
            chain = [c.to_cryptography() for c in connection.get_peer_cert_chain() or []]
            try:
                verdict = judge_staple(data, chain, self._chains_to_anchor, self._now())
            except Exception:  # noqa: BLE001 - hostile bytes must not end the client
                verdict = StapleVerdict(OCSP_FAILED, "Received TLS cert status response, "
                                        "parse error", fatal=True)
        session = self.session
        session.ocsp_status = verdict.status
        if verdict.log:
            session.ocsp_log.append(verdict.log)
        if verdict.fatal:
            return False
        return verdict.good or not required

    def _chains_to_anchor(self, certificate: x509.Certificate,
                          untrusted: Sequence[x509.Certificate]) -> bool:
        store = self.context.get_cert_store()
        return store is not None and verifies_against(store, certificate, untrusted)

    def _verify(self, connection: SSL.Connection, cert: crypto.X509, errnum: int,
                depth: int, ok: int) -> bool:
        session, options = self.session, self.options
        subject = cert.to_cryptography().subject
        if not ok:
            session.verify_failed = True
            session.verify_errors.append(
                f"SSL verify error: depth={depth} error={_verify_error_text(errnum)} "
                f"cert={_oneline(subject)}")
            return options.verify == "try"
        if depth == 0 and options.check_hostnames:
            if not names_match(cert.to_cryptography(), options.check_hostnames):
                session.verify_failed = True
                session.verify_errors.append(
                    f'SSL verify error: certificate name mismatch: DN="{_oneline(subject)}" '
                    f'H="{options.check_hostnames}"')
                return options.verify == "try"
        return True


def handshake_error_text(reason: Any) -> str:
    """Exim's tls_errstr for a failed SSL_connect: ``(SSL_connect): error:
    ...`` from the OpenSSL error in *reason* (a Failure or exception)."""
    exc = getattr(reason, "value", reason)
    if isinstance(exc, SSL.Error):
        entries = exc.args[0] if exc.args and isinstance(exc.args[0], list) else []
        for entry in entries:
            if len(entry) == 3 and entry[2]:
                return f"(SSL_connect): error:{entry[0]}::{entry[2]}"
        return f"(SSL_connect): {exc}"
    if exc is None:
        return "(SSL_connect): connection closed"
    return f"(SSL_connect): {exc}"


def tls_out_variables(session: ClientTLSSession) -> dict[str, str]:
    """``$tls_out_*`` for a client session whose handshake finished."""
    connection = session.connection
    assert connection is not None
    version = (connection.get_protocol_version_name() or "").replace("v", "", 1)
    name = connection.get_cipher_name() or ""
    bits = connection.get_cipher_bits() or 0
    peer = connection.get_peer_certificate(as_cryptography=True)
    verified = (peer is not None and not session.verify_failed
                and session.options.verify != "none")
    raw_sni = session.options.sni or ""
    return {
        "tls_out_bits": str(bits),
        "tls_out_certificate_verified": "1" if verified else "0",
        "tls_out_cipher": f"{version}:{name}:{bits}" if name else "",
        "tls_out_cipher_std": cipher_standard_name(name) if name else "",
        "tls_out_peerdn": _oneline(peer.subject) if peer is not None else "",
        "tls_out_sni": raw_sni,
        "tls_out_ver": version if name else "",
        "tls_out_resumption": "0",
        "tls_out_ocsp": str(session.ocsp_status),
    }
