"""``${certextract}`` fields of an X.509 certificate (cryptography objects)."""

from __future__ import annotations

from cryptography import x509
from cryptography.hazmat.primitives import serialization


def cert_field(cert: x509.Certificate, field: str) -> str | None:
    """The named field of *cert* as Exim formats it, None if unknown."""
    getters = {
        "version": lambda: str(cert.version.value + 1),
        "serial_number": lambda: format(cert.serial_number, "x"),
        "subject": lambda: cert.subject.rfc4514_string(),
        "issuer": lambda: cert.issuer.rfc4514_string(),
        "notbefore": lambda: cert.not_valid_before_utc.strftime("%b %d %H:%M:%S %Y GMT"),
        "notafter": lambda: cert.not_valid_after_utc.strftime("%b %d %H:%M:%S %Y GMT"),
        "sig_algorithm": lambda: cert.signature_algorithm_oid._name,
        "der_b64": lambda: __import__("base64").b64encode(
            cert.public_bytes(serialization.Encoding.DER)
        ).decode(),
    }
    getter = getters.get(field.lower())
    return getter() if getter else None
