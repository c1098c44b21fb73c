"""Judging an OCSP response stapled by a server we connect to, as Exim
4.96's ``tls_client_stapling_cb()`` (OpenSSL build) does.

``judge_staple()`` is pure: it takes the DER bytes the server sent, the
server's certificate chain (leaf first), a function that says whether a
certificate chains to our trust anchors, and the time.  Its verdict gives
``$tls_out_ocsp`` (see ``twisted_mta/smtp/tls.py``), the line Exim writes to
the main log, and whether the handshake must end even when the host is
only in ``hosts_request_ocsp``.

As OpenSSL's OCSP_basic_verify(), the signer is looked for among the
certificates in the response and the server's chain, must have signed the
response, and must chain to a trust anchor.  Two checks are stricter than
Exim's (see doc/ocsp.md): the signer must be the certificate's issuer or a
responder the issuer authorised (Exim passes OCSP_NOEXPLICIT, which lets any
trusted certificate sign), and one of the responses must be about the
certificate the server presented (Exim accepts a response about any
certificate).
"""

from __future__ import annotations

import datetime
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, padding, rsa
from cryptography.x509 import ocsp
from cryptography.x509.oid import ExtendedKeyUsageOID

from twisted_mta.smtp.tls import OCSP_FAILED, OCSP_NOT_RESP, OCSP_SKEW, OCSP_VFIED

__all__ = ["StapleVerdict", "judge_staple", "no_staple"]

# OpenSSL's OCSP_crl_reason_str() names.
_REASONS = {
    x509.ReasonFlags.unspecified: "unspecified",
    x509.ReasonFlags.key_compromise: "keyCompromise",
    x509.ReasonFlags.ca_compromise: "cACompromise",
    x509.ReasonFlags.affiliation_changed: "affiliationChanged",
    x509.ReasonFlags.superseded: "superseded",
    x509.ReasonFlags.cessation_of_operation: "cessationOfOperation",
    x509.ReasonFlags.certificate_hold: "certificateHold",
    x509.ReasonFlags.remove_from_crl: "removeFromCRL",
}

_UNVERIFIABLE = "Received TLS cert status response, itself unverifiable: "


@dataclass(frozen=True)
class StapleVerdict:
    """``status`` is the ``$tls_out_ocsp`` value; ``log`` the main-log
    line (None: nothing to log); ``fatal`` ends the handshake whatever
    the host lists say (Exim's parse errors); ``good`` is a verified
    GOOD status."""

    status: int
    log: str | None = None
    fatal: bool = False

    @property
    def good(self) -> bool:
        return self.status == OCSP_VFIED


def no_staple(required: bool) -> StapleVerdict:
    """The server sent no status although we asked."""
    return StapleVerdict(OCSP_NOT_RESP,
                         "Required TLS certificate status not received" if required else None)


def _key_hash(certificate: x509.Certificate) -> bytes:
    """SHA-1 of the subjectPublicKey bits: the ResponderID and CertID key hash."""
    return x509.SubjectKeyIdentifier.from_public_key(certificate.public_key()).digest


def _signature_holds(certificate: x509.Certificate, response: ocsp.OCSPResponse) -> bool:
    key = certificate.public_key()
    signature, data = response.signature, response.tbs_response_bytes
    algorithm = response.signature_hash_algorithm
    try:
        if isinstance(key, rsa.RSAPublicKey) and algorithm is not None:
            key.verify(signature, data, padding.PKCS1v15(), algorithm)
        elif isinstance(key, ec.EllipticCurvePublicKey) and algorithm is not None:
            key.verify(signature, data, ec.ECDSA(algorithm))
        elif isinstance(key, (ed25519.Ed25519PublicKey, ed448.Ed448PublicKey)):
            key.verify(signature, data)
        else:
            return False
    except InvalidSignature:
        return False
    return True


def _find_signer(response: ocsp.OCSPResponse,
                 candidates: Sequence[x509.Certificate]) -> x509.Certificate | None:
    for certificate in candidates:
        if response.responder_name is not None:
            if certificate.subject == response.responder_name:
                return certificate
        elif _key_hash(certificate) == response.responder_key_hash:
            return certificate
    return None


def _issued_by(certificate: x509.Certificate, issuer: x509.Certificate) -> bool:
    try:
        certificate.verify_directly_issued_by(issuer)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True


def _issuer_of(leaf: x509.Certificate,
               candidates: Sequence[x509.Certificate]) -> x509.Certificate | None:
    """The certificate in the server's chain that issued *leaf* (servers
    may send the leaf twice, or the chain out of order)."""
    for candidate in candidates:
        if candidate.subject == leaf.issuer and _issued_by(leaf, candidate):
            return candidate
    return None


def _is_about(single: ocsp.OCSPSingleResponse, certificate: x509.Certificate,
              issuer: x509.Certificate) -> bool:
    """Whether a CertID names *certificate* issued by *issuer*."""
    if single.serial_number != certificate.serial_number:
        return False
    return single.issuer_key_hash == _key_hash(issuer)


def _authorised(signer: x509.Certificate, issuer: x509.Certificate) -> str | None:
    """None when *signer* may speak for *issuer*'s certificates (RFC 6960
    4.2.2.2: the issuer itself, or a certificate it issued for OCSP
    signing), else OpenSSL's reason."""
    if _key_hash(signer) == _key_hash(issuer) and signer.subject == issuer.subject:
        return None
    if not _issued_by(signer, issuer):
        return "root ca not trusted"
    try:
        usage = signer.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    except x509.ExtensionNotFound:
        return "missing ocspsigning usage"
    if ExtendedKeyUsageOID.OCSP_SIGNING not in usage:
        return "missing ocspsigning usage"
    return None


def judge_staple(der: bytes, chain: Sequence[x509.Certificate],
                 chains_to_anchor: Callable[[x509.Certificate, Sequence[x509.Certificate]], bool],
                 now: datetime.datetime) -> StapleVerdict:
    """The verdict on the stapled response *der* for the server whose
    certificates are *chain* (leaf first), at *now* (UTC, aware).

    *chains_to_anchor(certificate, untrusted)* says whether *certificate*
    verifies against the transport's trust anchors with *untrusted* as
    intermediates."""
    try:
        response = ocsp.load_der_ocsp_response(der)
    except ValueError:
        return StapleVerdict(OCSP_FAILED, "Received TLS cert status response, parse error",
                             fatal=True)
    if response.response_status != ocsp.OCSPResponseStatus.SUCCESSFUL:
        return StapleVerdict(OCSP_FAILED,
                             "Received TLS cert status response, error parsing response",
                             fatal=True)
    included = list(response.certificates)
    signer = _find_signer(response, included + list(chain))
    if signer is None:
        return StapleVerdict(OCSP_FAILED, _UNVERIFIABLE + "signer certificate not found")
    if not _signature_holds(signer, response):
        return StapleVerdict(OCSP_FAILED, _UNVERIFIABLE + "signature failure")
    if not chains_to_anchor(signer, included + list(chain)):
        return StapleVerdict(OCSP_FAILED, _UNVERIFIABLE + "certificate verify error")
    singles = list(response.responses)
    if not singles:
        return StapleVerdict(OCSP_FAILED, _UNVERIFIABLE + "response contains no revocation data")
    leaf = chain[0] if chain else None
    issuer = _issuer_of(leaf, chain[1:]) if leaf is not None else None
    if leaf is None or issuer is None or \
            not any(_is_about(single, leaf, issuer) for single in singles):
        return StapleVerdict(OCSP_FAILED, _UNVERIFIABLE + "response is not about the "
                             "server's certificate")
    problem = _authorised(signer, issuer)
    if problem is not None:
        return StapleVerdict(OCSP_FAILED, _UNVERIFIABLE + problem)
    # Exim walks the responses from the last; the first bad one decides.
    for single in reversed(singles):
        this_update, next_update = single.this_update_utc, single.next_update_utc
        if this_update > now + OCSP_SKEW or \
                (next_update is not None
                 and (next_update < now - OCSP_SKEW or next_update < this_update)):
            return StapleVerdict(OCSP_FAILED, "OCSP dates invalid")
        status = single.certificate_status
        if status == ocsp.OCSPCertStatus.GOOD:
            continue
        if status == ocsp.OCSPCertStatus.REVOKED:
            reason = single.revocation_reason
            text = "Server certificate revoked"
            if reason is not None:
                text += f"; reason: {_REASONS.get(reason, '(UNKNOWN)')}"
            return StapleVerdict(OCSP_FAILED, text)
        return StapleVerdict(OCSP_FAILED, "Server certificate status unknown, in OCSP stapling")
    return StapleVerdict(OCSP_VFIED)
