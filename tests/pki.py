"""A throw-away test PKI: a root CA, an intermediate CA that issues every
leaf, and DER OCSP responses about those leaves, written as files into one
directory.

Keys are EC P-256 so that making a PKI costs milliseconds; everything is
made on first use and cached on the instance.  Time is the real UTC clock:
certificates are valid from an hour ago, OCSP responses take offsets from
now.
"""

from __future__ import annotations

import base64
import datetime
import os
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import count

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.ocsp import (
    OCSPCertStatus,
    OCSPResponderEncoding,
    OCSPResponseBuilder,
    OCSPResponseStatus,
)
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

HOUR = datetime.timedelta(hours=1)
DAY = datetime.timedelta(days=1)


@dataclass(frozen=True)
class LeafFiles:
    """One end-entity certificate as files, and the objects they hold.

    ``chain_path`` is the leaf followed by its issuing intermediate (what a
    server hands to ``use_certificate_chain_file``)."""

    cert_path: str
    key_path: str
    chain_path: str
    certificate: x509.Certificate
    key: ec.EllipticCurvePrivateKey
    issuer: x509.Certificate


@dataclass(frozen=True)
class _Authority:
    certificate: x509.Certificate
    key: ec.EllipticCurvePrivateKey


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC).replace(microsecond=0)


def _new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _name(common_name: str) -> x509.Name:
    return x509.Name([
        x509.NameAttribute(NameOID.COUNTRY_NAME, "UK"),
        x509.NameAttribute(NameOID.ORGANIZATION_NAME, "exim-py tests"),
        x509.NameAttribute(NameOID.COMMON_NAME, common_name),
    ])


class TestPKI:
    """Certificates, keys and OCSP responses made on demand in *directory*.

    ``ca_path`` is the root certificate (a client's trust anchor);
    ``ca_bundle_path`` is root plus intermediate."""

    __test__ = False        # not a pytest test class despite the name

    def __init__(self, directory: str) -> None:
        self.directory = directory
        os.makedirs(directory, exist_ok=True)
        self._root: _Authority | None = None
        self._intermediate: _Authority | None = None
        self._leaves: dict[tuple, LeafFiles] = {}
        self._responder: _Authority | None = None
        self._bad_signer: _Authority | None = None
        self._serial = count(1000)
        self._files = count(1)

    # -- authorities ---------------------------------------------------

    @property
    def root(self) -> _Authority:
        """The self-signed root CA."""
        if self._root is None:
            key = _new_key()
            name = _name("exim-py test root CA")
            cert = self._build(name, key.public_key(), name, key, ca=True)
            self._root = _Authority(cert, key)
            self._write_pem("root-ca.pem", [cert])
        return self._root

    @property
    def intermediate(self) -> _Authority:
        """The intermediate CA, signed by the root, that issues leaves."""
        if self._intermediate is None:
            root = self.root
            key = _new_key()
            cert = self._build(_name("exim-py test intermediate CA"), key.public_key(),
                               root.certificate.subject, root.key, ca=True)
            self._intermediate = _Authority(cert, key)
            self._write_pem("intermediate-ca.pem", [cert])
            self._write_pem("ca-bundle.pem", [root.certificate, cert])
        return self._intermediate

    @property
    def ca_path(self) -> str:
        """PEM file holding the root certificate only."""
        assert self.root is not None     # writes the file
        return os.path.join(self.directory, "root-ca.pem")

    @property
    def intermediate_path(self) -> str:
        """PEM file holding the intermediate certificate only."""
        assert self.intermediate is not None     # writes the file
        return os.path.join(self.directory, "intermediate-ca.pem")

    @property
    def ca_bundle_path(self) -> str:
        """PEM file holding root and intermediate."""
        assert self.intermediate is not None     # writes the files
        return os.path.join(self.directory, "ca-bundle.pem")

    # -- leaves --------------------------------------------------------

    def leaf(self, hostname: str, *, wildcard: bool = False, expired: bool = False,
             not_yet_valid: bool = False, self_signed: bool = False,
             client: bool = False) -> LeafFiles:
        """A server (or, with *client*, client) certificate for *hostname*.

        *wildcard* names ``*.hostname`` in the SAN instead; *expired* and
        *not_yet_valid* move the validity window; *self_signed* makes a leaf
        that no CA vouches for (its chain file holds only itself).  A wrong
        name is just a leaf for another host name."""
        spec = (hostname, wildcard, expired, not_yet_valid, self_signed, client)
        if spec in self._leaves:
            return self._leaves[spec]
        key = _new_key()
        san = f"*.{hostname}" if wildcard else hostname
        now = _now()
        if expired:
            window = (now - 30 * DAY, now - DAY)
        elif not_yet_valid:
            window = (now + DAY, now + 30 * DAY)
        else:
            window = (now - HOUR, now + 30 * DAY)
        usage = ExtendedKeyUsageOID.CLIENT_AUTH if client else ExtendedKeyUsageOID.SERVER_AUTH
        if self_signed:
            issuer_name, signing_key = _name(san), key
        else:
            issuer_name = self.intermediate.certificate.subject
            signing_key = self.intermediate.key
        cert = self._build(_name(san), key.public_key(), issuer_name, signing_key, ca=False,
                           window=window, san=san, usage=usage)
        issuer_cert = cert if self_signed else self.intermediate.certificate
        label = "-".join([("client-" if client else "") + hostname.replace("*", "_")]
                         + [flag for flag, on in (("wildcard", wildcard), ("expired", expired),
                                                  ("future", not_yet_valid),
                                                  ("selfsigned", self_signed)) if on])
        cert_path = self._write_pem(f"{label}.pem", [cert])
        key_path = os.path.join(self.directory, f"{label}.key")
        with open(key_path, "wb") as f:
            f.write(key.private_bytes(serialization.Encoding.PEM,
                                      serialization.PrivateFormat.PKCS8,
                                      serialization.NoEncryption()))
        chain = [cert] if self_signed else [cert, issuer_cert]
        chain_path = self._write_pem(f"{label}-chain.pem", chain)
        files = LeafFiles(cert_path, key_path, chain_path, cert, key, issuer_cert)
        self._leaves[spec] = files
        return files

    def client(self, name: str = "client.example.com") -> LeafFiles:
        """A client certificate (clientAuth) for *name*, from the intermediate."""
        return self.leaf(name, client=True)

    # -- revocation ----------------------------------------------------

    def crl(self, revoked: Sequence[LeafFiles] = ()) -> str:
        """A PEM file with a CRL from each CA (both are needed for a
        whole-chain check); the intermediate's lists *revoked*."""
        now = _now()
        pems = []
        for authority, victims in ((self.root, []), (self.intermediate, list(revoked))):
            builder = (x509.CertificateRevocationListBuilder()
                       .issuer_name(authority.certificate.subject)
                       .last_update(now - HOUR).next_update(now + DAY))
            for leaf in victims:
                builder = builder.add_revoked_certificate(
                    x509.RevokedCertificateBuilder()
                    .serial_number(leaf.certificate.serial_number)
                    .revocation_date(now - HOUR).build())
            crl = builder.sign(authority.key, hashes.SHA256())
            pems.append(crl.public_bytes(serialization.Encoding.PEM))
        path = os.path.join(self.directory, f"crl-{next(self._files)}.pem")
        with open(path, "wb") as f:
            f.write(b"".join(pems))
        return path

    @property
    def ocsp_responder(self) -> _Authority:
        """A delegated OCSP signer: issued by the intermediate, with the
        OCSPSigning usage and id-pkix-ocsp-nocheck."""
        if self._responder is None:
            issuer = self.intermediate
            key = _new_key()
            now = _now()
            cert = (self._builder(_name("exim-py test OCSP responder"), key.public_key(),
                                  issuer.certificate.subject, (now - HOUR, now + 30 * DAY))
                    .add_extension(x509.BasicConstraints(ca=False, path_length=None), True)
                    .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.OCSP_SIGNING]),
                                   False)
                    .add_extension(x509.OCSPNoCheck(), False)
                    .sign(issuer.key, hashes.SHA256()))
            self._responder = _Authority(cert, key)
        return self._responder

    @property
    def _impostor(self) -> _Authority:
        """A self-signed certificate bearing the intermediate's name: a
        signer no client should trust."""
        if self._bad_signer is None:
            key = _new_key()
            name = self.intermediate.certificate.subject
            self._bad_signer = _Authority(
                self._build(name, key.public_key(), name, key, ca=True), key)
        return self._bad_signer

    def ocsp_response(self, leaf: LeafFiles, status: str = "good", *,
                      this_update: datetime.timedelta = -HOUR,
                      next_update: datetime.timedelta | None = DAY,
                      signer: str = "issuer", response_status: str = "successful",
                      include_certs: bool = True, pem: bool = False) -> str:
        """Write an OCSP response about *leaf* and return its path.

        *status* is good, revoked or unknown; *this_update* and *next_update*
        are offsets from now (``next_update=None`` leaves the field out);
        *signer* is ``issuer`` (the intermediate signs), ``delegated`` (the
        responder certificate signs) or ``bad`` (a self-signed impostor
        with the intermediate's name signs); the signer's certificate is
        included unless *include_certs* is false.  *response_status* other than
        successful (``try_later``, ``internal_error``, ...) makes a bare
        error response.  With *pem* the DER is wrapped as an
        ``OCSP RESPONSE`` PEM block."""
        if response_status != "successful":
            data = OCSPResponseBuilder.build_unsuccessful(
                OCSPResponseStatus[response_status.upper()]
            ).public_bytes(serialization.Encoding.DER)
            return self._write_ocsp(data, f"{response_status}", pem)
        now = _now()
        issuer = self.intermediate
        cert_status = {"good": OCSPCertStatus.GOOD, "revoked": OCSPCertStatus.REVOKED,
                       "unknown": OCSPCertStatus.UNKNOWN}[status]
        revoked = status == "revoked"
        builder = OCSPResponseBuilder().add_response(
            cert=leaf.certificate, issuer=leaf.issuer, algorithm=hashes.SHA1(),
            cert_status=cert_status, this_update=now + this_update,
            next_update=None if next_update is None else now + next_update,
            revocation_time=now - DAY if revoked else None,
            revocation_reason=x509.ReasonFlags.superseded if revoked else None,
        )
        responder = {"issuer": issuer, "delegated": self.ocsp_responder,
                     "bad": self._impostor}[signer]
        builder = builder.responder_id(OCSPResponderEncoding.HASH, responder.certificate)
        if include_certs:
            builder = builder.certificates([responder.certificate])
        data = builder.sign(responder.key, hashes.SHA256()).public_bytes(
            serialization.Encoding.DER)
        return self._write_ocsp(data, f"{status}-{signer}", pem)

    # -- helpers -------------------------------------------------------

    def _write_ocsp(self, data: bytes, label: str, pem: bool) -> str:
        if pem:
            body = base64.encodebytes(data).decode().replace("\n", "")
            lines = [body[i:i + 64] for i in range(0, len(body), 64)]
            data = ("-----BEGIN OCSP RESPONSE-----\n" + "\n".join(lines)
                    + "\n-----END OCSP RESPONSE-----\n").encode()
        path = os.path.join(self.directory,
                            f"ocsp-{next(self._files)}-{label}.{'pem' if pem else 'der'}")
        with open(path, "wb") as f:
            f.write(data)
        return path

    def _write_pem(self, filename: str, certs: list[x509.Certificate]) -> str:
        path = os.path.join(self.directory, filename)
        with open(path, "wb") as f:
            for cert in certs:
                f.write(cert.public_bytes(serialization.Encoding.PEM))
        return path

    def _builder(self, subject: x509.Name, public_key, issuer: x509.Name,
                 window: tuple[datetime.datetime, datetime.datetime]) -> x509.CertificateBuilder:
        return (x509.CertificateBuilder().subject_name(subject).issuer_name(issuer)
                .public_key(public_key).serial_number(next(self._serial))
                .not_valid_before(window[0]).not_valid_after(window[1])
                .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), False))

    def _build(self, subject: x509.Name, public_key, issuer: x509.Name,
               signing_key: ec.EllipticCurvePrivateKey, *, ca: bool,
               window: tuple[datetime.datetime, datetime.datetime] | None = None,
               san: str | None = None, usage=None) -> x509.Certificate:
        now = _now()
        builder = self._builder(subject, public_key, issuer,
                                window or (now - HOUR, now + 3650 * DAY))
        builder = builder.add_extension(
            x509.BasicConstraints(ca=ca, path_length=None), True)
        if ca:
            builder = builder.add_extension(x509.KeyUsage(
                digital_signature=True, content_commitment=False, key_encipherment=False,
                data_encipherment=False, key_agreement=False, key_cert_sign=True,
                crl_sign=True, encipher_only=False, decipher_only=False), True)
        if san is not None:
            builder = builder.add_extension(
                x509.SubjectAlternativeName([x509.DNSName(san)]), False)
        if usage is not None:
            builder = builder.add_extension(x509.ExtendedKeyUsage([usage]), False)
        if issuer != subject:
            issuer_key = signing_key.public_key()
            builder = builder.add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_key), False)
        return builder.sign(signing_key, hashes.SHA256())
