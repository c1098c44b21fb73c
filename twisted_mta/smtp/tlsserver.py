"""The server's TLS as configured: options expanded per connection (and
again for SNI), and a self-signed certificate when none is configured,
as Exim 4.92 and later make one so STARTTLS always works."""

from __future__ import annotations

import atexit
import datetime
import os
import shutil
import tempfile
from typing import Any

from twisted_mta.expand.errors import ExpansionError
from twisted_mta.smtp.tls import ServerTLS, ServerTLSOptions, TLSConfigError


def make_self_signed(hostname: str, directory: str) -> tuple[str, str]:
    """A throwaway self-signed certificate for *hostname*: (cert, key) paths."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hostname)])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=365))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(hostname)]), False)
            .sign(key, hashes.SHA256()))
    cert_path = os.path.join(directory, "selfsigned.crt")
    key_path = os.path.join(directory, "selfsigned.key")
    with open(cert_path, "wb") as f:
        f.write(cert.public_bytes(serialization.Encoding.PEM))
    fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(key.private_bytes(serialization.Encoding.PEM,
                                  serialization.PrivateFormat.PKCS8,
                                  serialization.NoEncryption()))
    return cert_path, key_path


class SessionTLS:
    """Builds the TLS connection creator for one SMTP session."""

    def __init__(self, config: Any) -> None:
        self.config = config
        self._self_signed: tuple[str, str] | None = None
        self._creators: dict[ServerTLSOptions, ServerTLS] = {}

    def _fallback_certificate(self) -> tuple[str, str]:
        if self._self_signed is None:
            directory = tempfile.mkdtemp(prefix="exim-py-tls-")
            # The pair is made afresh by each process; don't leave it behind.
            atexit.register(shutil.rmtree, directory, True)
            self._self_signed = make_self_signed(self.config.get("primary_hostname"), directory)
        return self._self_signed

    async def _option(self, server: Any, name: str) -> str | None:
        text = self.config.get(name)
        if text is None:
            return None
        return await server.ctx.expand(text)

    async def options_for(self, server: Any) -> ServerTLSOptions:
        """The options for *server*'s connection; raises TLSConfigError."""
        try:
            certificate = await self._option(server, "tls_certificate")
            privatekey = await self._option(server, "tls_privatekey")
            if not certificate:
                certificate, privatekey = self._fallback_certificate()
            verify = "none"
            if await server.host_in("tls_verify_hosts"):
                verify = "require"
            elif await server.host_in("tls_try_verify_hosts"):
                verify = "try"
            return ServerTLSOptions(
                certificate=certificate, privatekey=privatekey or None,
                require_ciphers=await self._option(server, "tls_require_ciphers") or None,
                verify_certificates=(await self._option(server, "tls_verify_certificates")
                                     if verify != "none" else None),
                verify=verify, ocsp_file=await self._option(server, "tls_ocsp_file"),
                crl=await self._option(server, "tls_crl") or None)
        except ExpansionError as e:
            raise TLSConfigError(f"expansion of TLS option failed: {e.message}") from None

    async def creator_for(self, server: Any) -> ServerTLS:
        """A connection creator for *server* (cached per distinct options).
        With SNI, options that mention ``$tls_in_sni`` are expanded again
        for the name the client sent."""
        options = await self.options_for(server)
        creator = self._creators.get(options)
        if creator is None:
            creator = ServerTLS(options, sni=self._sni_resolver(server),
                                clock=server.clock)
            creator.context()  # fail now, before the 220, if the files are bad
            self._creators[options] = creator
        return creator

    def _sni_resolver(self, server: Any) -> Any:
        names = ("tls_certificate", "tls_privatekey", "tls_ocsp_file")
        if not any("tls_in_sni" in str(self.config.get(n) or "") or
                   "tls_sni" in str(self.config.get(n) or "") for n in names):
            return None

        def for_name(name: str) -> ServerTLSOptions | None:
            from twisted_mta.expand.evaluate import expand_now

            server.vars["tls_in_sni"] = server.vars["tls_sni"] = name
            base = self._creators and next(iter(self._creators))
            try:
                certificate = expand_now(self.config.get("tls_certificate"), server.ctx)
                key_text = self.config.get("tls_privatekey")
                privatekey = expand_now(key_text, server.ctx) if key_text else None
                ocsp_text = self.config.get("tls_ocsp_file")
                ocsp = expand_now(ocsp_text, server.ctx) if ocsp_text else None
            except ExpansionError:
                return None
            if not base:
                return None
            return ServerTLSOptions(certificate=certificate, privatekey=privatekey or None,
                                    require_ciphers=base.require_ciphers,
                                    verify_certificates=base.verify_certificates,
                                    verify=base.verify, ocsp_file=ocsp, crl=base.crl)

        return for_name
