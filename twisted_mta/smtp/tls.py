"""The server side of TLS for the ESMTP server (STARTTLS and TLS-on-connect),
set up the way Exim 4.96 built with OpenSSL sets it up.

``ServerTLS`` is a Twisted ``IOpenSSLServerConnectionCreator``: hand it to
``transport.startTLS`` or a ``TLSMemoryBIOFactory``.  It builds an OpenSSL
context from already-expanded option values (``ServerTLSOptions``), staples
an OCSP proof when the client asks and the proof is usable, switches to
other options when the client's SNI name calls for it, and checks client
certificates as tls_verify_hosts / tls_try_verify_hosts say.  After the
handshake ``tls_in_variables`` gives the ``$tls_in_*`` values.

Call ``ServerTLS.context()`` before answering STARTTLS: it raises
``TLSConfigError`` (Exim then answers 454 and logs the message) when a
file cannot be used.
"""

from __future__ import annotations

import base64
import datetime
import os
import re
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from cryptography import x509
from cryptography.x509 import ocsp
from cryptography.x509.oid import NameOID
from OpenSSL import SSL, crypto
from twisted.internet.interfaces import IOpenSSLServerConnectionCreator, IReactorTime
from zope.interface import implementer

__all__ = [
    "OCSP_FAILED", "OCSP_NOT_REQ", "OCSP_NOT_RESP", "OCSP_VFIED", "OCSP_VFY_NOT_TRIED",
    "REQUIRE_NEXT_UPDATE", "VERIFY_MODES",
    "ServerTLS", "ServerTLSOptions", "TLSConfigError", "TLSSession",
    "cipher_standard_name", "load_context", "ocsp_problem", "read_ocsp_file", "session_for",
    "tls_in_variables",
]

# $tls_in_ocsp / $tls_out_ocsp values, as Exim numbers them.
OCSP_NOT_REQ = 0         # the client did not ask for a status
OCSP_NOT_RESP = 1        # asked, but nothing was sent
OCSP_VFY_NOT_TRIED = 2   # (client side) received, not verified
OCSP_FAILED = 3          # (client side) verification failed
OCSP_VFIED = 4           # the server sets this when it staples

# Exim allows this much clock skew when judging an OCSP proof's dates.
OCSP_SKEW = datetime.timedelta(seconds=300)

# Exim's own spec says a proof without nextUpdate is ignored, and this module
# follows it.  Exim 4.96's code does not: OpenSSL's OCSP_check_validity()
# accepts a missing nextUpdate, and the GnuTLS build staples such a proof too.
REQUIRE_NEXT_UPDATE = True

# Exim's openssl_options default: +no_sslv2 +no_sslv3 +single_dh_use +no_ticket
# +no_renegotiation (single_dh_use is a no-op in OpenSSL 3).
_CONTEXT_OPTIONS = SSL.OP_NO_SSLv2 | SSL.OP_NO_SSLv3 | SSL.OP_NO_TICKET | SSL.OP_NO_RENEGOTIATION

VERIFY_MODES = ("none", "try", "require")


class TLSConfigError(Exception):
    """A TLS option's value cannot be used: an unreadable or unmatched
    certificate or key, a bad cipher list, a missing CA or CRL file.  The
    message reads like Exim's, e.g.
    ``(SSL_CTX_use_PrivateKey_file file=/x.key): key values mismatch``."""


@dataclass(frozen=True)
class ServerTLSOptions:
    """The server's TLS options for one connection, every value already
    expanded by the caller.

    ``certificate`` is tls_certificate (a PEM file holding the leaf and any
    chain); ``privatekey`` is tls_privatekey, ``None`` or empty meaning the
    key is in the certificate file.  ``verify_certificates`` is
    tls_verify_certificates (a file, a directory or ``system``); ``verify``
    is ``require`` when the client is in tls_verify_hosts, ``try`` when in
    tls_try_verify_hosts, otherwise ``none``.  ``ocsp_file`` is
    tls_ocsp_file (``None`` when unset; an empty string when set but
    expanding to nothing), optionally prefixed ``DER `` or ``PEM ``."""

    certificate: str
    privatekey: str | None = None
    require_ciphers: str | None = None
    verify_certificates: str | None = None
    verify: str = "none"
    ocsp_file: str | None = None
    crl: str | None = None

    def __post_init__(self) -> None:
        if self.verify not in VERIFY_MODES:
            raise ValueError(f"verify must be one of {VERIFY_MODES}, not {self.verify!r}")


@dataclass(eq=False)
class TLSSession:
    """What ServerTLS learnt about one connection while it negotiated.

    ``verify_errors`` holds Exim's log texts (``SSL verify error: depth=0
    error=... cert=...``) for the caller to log with the peer's address;
    ``problems`` holds panic-log texts (an unreadable OCSP file, options
    for an SNI name that could not be loaded)."""

    options: ServerTLSOptions
    verify: str = "none"                    # fixed when the connection is made
    sni: str | None = None
    ocsp: int = OCSP_NOT_REQ
    ocsp_reason: str | None = None          # why a proof was not stapled
    verify_failed: bool = False
    verify_errors: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    # Every context the connection used, kept alive with it: OpenSSL still
    # calls the first context's callbacks after an SNI switch.
    contexts: list[SSL.Context] = field(default_factory=list, repr=False)


_sessions: weakref.WeakKeyDictionary[SSL.Connection, TLSSession] = weakref.WeakKeyDictionary()


def session_for(connection: SSL.Connection) -> TLSSession | None:
    """The TLSSession ServerTLS recorded for *connection*, if it made it."""
    return _sessions.get(connection)


# -- reading files -----------------------------------------------------------

def _openssl_reason(error: SSL.Error | crypto.Error) -> str:
    """The first (earliest) reason in a pyOpenSSL error, as Exim reports
    ERR_get_error()'s."""
    for entry in error.args[0] if error.args and isinstance(error.args[0], list) else ():
        if len(entry) == 3 and entry[2]:
            return entry[2]
    return str(error)


def _readable(path: str, what: str) -> None:
    """Raise TLSConfigError naming *path* when it cannot be opened; OpenSSL's
    own message for that case ("system lib") says nothing useful."""
    try:
        with open(path, "rb"):
            pass
    except OSError as exc:
        raise TLSConfigError(f"({what} file={path}): {exc.strerror}") from None


def _load_verify(context: SSL.Context, options: ServerTLSOptions) -> None:
    """Trust anchors, the CA names sent to the client, and any CRL."""
    cas = options.verify_certificates or ""
    context.set_default_verify_paths()
    if cas != "system" and not cas.startswith("system,"):
        try:
            info = os.stat(cas)
        except OSError:
            raise TLSConfigError(f"failed to stat {cas} for certificates") from None
        try:
            if os.path.isdir(cas):
                context.load_verify_locations(None, cas)
            elif info.st_size > 0:
                # An empty file makes OpenSSL fail obscurely; Exim skips it.
                context.load_verify_locations(cas)
                context.load_client_ca(cas.encode())
        except SSL.Error as exc:
            raise TLSConfigError(
                f"(SSL_CTX_load_verify_locations file={cas}): {_openssl_reason(exc)}") from None
    if options.crl:
        load_crl(context, options.crl)


def load_crl(context: SSL.Context, path: str) -> None:
    """tls_crl: a CRL file or a hashed directory of them, checked for the
    whole chain (Exim's setup_certs(), which stats the path first)."""
    if not os.path.exists(path):
        raise TLSConfigError(f"failed to stat {path} for certificates revocation lists")
    store = context.get_cert_store()
    try:
        if os.path.isdir(path):
            store.load_locations(None, path)
        else:
            store.load_locations(path)
    except crypto.Error as exc:
        raise TLSConfigError(
            f"(X509_STORE_load_locations file={path}): {_openssl_reason(exc)}") from None
    store.set_flags(crypto.X509StoreFlags.CRL_CHECK | crypto.X509StoreFlags.CRL_CHECK_ALL)


def load_context(options: ServerTLSOptions) -> SSL.Context:
    """A server SSL context for *options*: certificate chain and key,
    cipher list and client-certificate checking; no callbacks.

    Raises TLSConfigError naming the file (or cipher list) at fault."""
    context = SSL.Context(SSL.TLS_SERVER_METHOD)
    context.set_options(_CONTEXT_OPTIONS)
    # No session cache and no tickets: a resumed session skips the verify and
    # OCSP callbacks, and Exim offers no resumption unless configured to.
    context.set_session_cache_mode(SSL.SESS_CACHE_OFF)
    context.set_session_id(b"exim")

    load_certificate_and_key(context, options.certificate, options.privatekey)

    if options.require_ciphers:
        # GnuTLS-style names use underscores; Exim turns them into hyphens.
        # Only the TLS 1.2-and-older list is set: Exim 4.96 leaves TLS 1.3
        # suites at OpenSSL's default.
        ciphers = options.require_ciphers.replace("_", "-")
        try:
            context.set_cipher_list(ciphers.encode())
        except SSL.Error as exc:
            raise TLSConfigError(
                f"(SSL_CTX_set_cipher_list): {_openssl_reason(exc)} in {ciphers!r}") from None

    if options.verify != "none" and options.verify_certificates:
        _load_verify(context, options)
        mode = SSL.VERIFY_PEER
        if options.verify == "require":
            mode |= SSL.VERIFY_FAIL_IF_NO_PEER_CERT
        context.set_verify(mode)
    return context


# -- OCSP --------------------------------------------------------------------

def read_ocsp_file(spec: str) -> bytes:
    """The DER OCSP response named by a tls_ocsp_file value.

    A ``DER `` or ``PEM `` prefix chooses the format (DER by default); a
    PEM file contributes its first block.  Raises OSError or ValueError."""
    pem = spec.startswith("PEM ")
    path = spec[4:] if spec.startswith(("PEM ", "DER ")) else spec
    with open(path, "rb") as f:
        data = f.read()
    if not pem:
        return data
    match = re.search(rb"-----BEGIN [^-]*-----\r?\n(.*?)-----END ", data, re.DOTALL)
    if not match:
        raise ValueError(f"Failed to read PEM file \"{path}\": no PEM block")
    body = b"".join(line for line in match.group(1).splitlines() if b":" not in line)
    return base64.b64decode(body)


def ocsp_problem(der: bytes, serial: int | None, now: datetime.datetime) -> str | None:
    """Why the OCSP response *der* must not be stapled for the certificate
    with *serial* at time *now* (UTC), or None when it may be.

    As Exim: the response must be successful, its first single response
    must be for the certificate sent and GOOD, thisUpdate no later than now
    (plus skew) and nextUpdate no earlier than now (less skew).  The
    signature is not checked, as Exim's check lets a bad one through; the
    client judges it."""
    try:
        response = ocsp.load_der_ocsp_response(der)
    except ValueError as exc:
        return f"Error reading OCSP response: {exc}"
    if response.response_status != ocsp.OCSPResponseStatus.SUCCESSFUL:
        return f"OCSP response not valid: {response.response_status.name}"
    single = next(iter(response.responses), None)
    if single is None:
        return "Unable to get first response from OCSP basic response."
    if serial is not None and single.serial_number != serial:
        return "failed to find match for ocsp"
    if single.certificate_status != ocsp.OCSPCertStatus.GOOD:
        return f"OCSP response bad cert status: {single.certificate_status.name}"
    this_update = single.this_update_utc
    next_update = single.next_update_utc
    if this_update > now + OCSP_SKEW:
        return "OCSP status invalid times: not yet valid"
    if next_update is None:
        return "OCSP status invalid times: no nextUpdate" if REQUIRE_NEXT_UPDATE else None
    if next_update < now - OCSP_SKEW:
        return "OCSP status invalid times: expired"
    if next_update < this_update:
        return "OCSP status invalid times: nextUpdate before thisUpdate"
    return None


# -- the connection creator --------------------------------------------------

@dataclass(frozen=True)
class _Loaded:
    """A built context and what its callbacks need to know."""

    context: SSL.Context
    options: ServerTLSOptions
    serial: int | None          # the leaf's serial number, to match OCSP proofs


def _file_state(path: str | None) -> tuple | None:
    """Enough of a file's stat to notice that it was replaced or changed."""
    if not path or path == "system":
        return None
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_ino, st.st_size, st.st_mtime_ns)


def _leaf_serial(path: str) -> int | None:
    """The serial number of the first certificate in *path* (the leaf)."""
    try:
        with open(path, "rb") as f:
            return x509.load_pem_x509_certificate(f.read()).serial_number
    except (OSError, ValueError):
        return None


@implementer(IOpenSSLServerConnectionCreator)
class ServerTLS:
    """Makes the server end of each TLS connection, as Exim's OpenSSL code
    does.

    *sni*, if given, is called with the client's SNI name and returns the
    options to use instead (Exim re-expands the TLS options with
    $tls_in_sni set when tls_certificate mentions it) or None to keep the
    current ones.  *clock* (an IReactorTime) dates OCSP checks.

    Contexts are cached per options and rebuilt when a certificate, key,
    CA or CRL file changes, so one ServerTLS may serve many connections.
    The OCSP file is read afresh for every connection that asks."""

    def __init__(self, options: ServerTLSOptions,
                 sni: Callable[[str], ServerTLSOptions | None] | None = None,
                 clock: IReactorTime | None = None) -> None:
        self.options = options
        self._sni = sni
        self._clock = clock
        self._loaded: dict[ServerTLSOptions, tuple[tuple, _Loaded]] = {}

    def context(self) -> SSL.Context:
        """The context for the base options; raises TLSConfigError."""
        return self._load(self.options).context

    def serverConnectionForTLS(self, tlsProtocol: Any) -> SSL.Connection:
        """A new server-side connection (IOpenSSLServerConnectionCreator)."""
        loaded = self._load(self.options)
        connection = SSL.Connection(loaded.context, None)
        connection.set_accept_state()
        session = TLSSession(options=self.options, verify=self.options.verify,
                             contexts=[loaded.context])
        _sessions[connection] = session
        if loaded.context.get_verify_mode() != SSL.VERIFY_NONE:
            # Per connection, so that try-verify can let failures through and
            # every failure is recorded; an SNI switch keeps this callback.
            connection.set_verify(loaded.context.get_verify_mode(), self._verify)
        return connection

    # -- building contexts --------------------------------------------

    def _load(self, options: ServerTLSOptions) -> _Loaded:
        files = (options.certificate, options.privatekey, options.verify_certificates,
                 options.crl)
        state = tuple(_file_state(path) for path in files)
        cached = self._loaded.get(options)
        if cached is not None and cached[0] == state:
            return cached[1]
        context = load_context(options)
        context.set_tlsext_servername_callback(self._servername)
        loaded = _Loaded(context, options, _leaf_serial(options.certificate))
        if options.ocsp_file is not None:
            # Exim only answers status requests when tls_ocsp_file is set;
            # otherwise $tls_in_ocsp stays 0 even if the client asked.
            context.set_ocsp_server_callback(self._staple, loaded)
        self._loaded[options] = (state, loaded)
        return loaded

    def _now(self) -> datetime.datetime:
        seconds = self._clock.seconds() if self._clock is not None else time.time()
        return datetime.datetime.fromtimestamp(seconds, datetime.UTC)

    # -- OpenSSL callbacks --------------------------------------------
    # An exception escaping one of these would upset the handshake (pyOpenSSL
    # turns it into a fatal alert or a traceback on stderr), which Exim never
    # does for these reasons, so each guards the steps that can fail.

    def _servername(self, connection: SSL.Connection) -> None:
        session = _sessions.get(connection)
        raw = connection.get_servername()
        if session is None or raw is None:
            return
        session.sni = raw.decode("utf-8", "replace")
        if self._sni is None:
            return
        try:
            options = self._sni(session.sni)
            if options is None or options == session.options:
                return
            loaded = self._load(options)
        except Exception as exc:
            # Exim answers with a fatal alert; a context with no certificate
            # makes OpenSSL send one.
            session.problems.append(f"TLS SNI {session.sni!r}: {exc}")
            refusal = SSL.Context(SSL.TLS_SERVER_METHOD)
            session.contexts.append(refusal)
            connection.set_context(refusal)
            return
        session.options = options
        session.contexts.append(loaded.context)
        connection.set_context(loaded.context)

    def _staple(self, connection: SSL.Connection, loaded: _Loaded) -> bytes:
        session = _sessions.get(connection)
        if session is None:
            return b""
        session.ocsp = OCSP_NOT_RESP
        spec = loaded.options.ocsp_file
        if not spec:
            return b""
        try:
            der = read_ocsp_file(spec)
        except OSError as exc:
            session.problems.append(
                f'Failed to open OCSP response file "{exc.filename}": {exc.strerror}')
            return b""
        except ValueError as exc:
            session.problems.append(str(exc))
            return b""
        try:
            problem = ocsp_problem(der, loaded.serial, self._now())
        except Exception as exc:          # a malformed field cryptography rejects late
            problem = f"OCSP response parse error: {exc}"
        if problem is not None:
            # Silent in Exim (debug output only); kept for the curious.
            session.ocsp_reason = problem
            return b""
        session.ocsp = OCSP_VFIED
        return der

    def _verify(self, connection: SSL.Connection, cert: crypto.X509, errnum: int,
                depth: int, ok: int) -> bool:
        if ok:
            return True
        session = _sessions.get(connection)
        if session is None:
            return False
        session.verify_failed = True
        session.verify_errors.append(
            f"SSL verify error: depth={depth} error={_verify_error_text(errnum)} "
            f"cert={_oneline(cert.to_cryptography().subject)}")
        # In tls_try_verify_hosts the failure only clears
        # $tls_in_certificate_verified; in tls_verify_hosts it ends the handshake.
        # The mode chosen for the connection holds even after an SNI switch,
        # as OpenSSL keeps the first context's verify settings.
        return session.verify == "try"


# -- names and variables -----------------------------------------------------

# X509_verify_cert_error_string() texts that changed after OpenSSL 3.0, the
# library an Exim 4.96 is linked with: Exim's texts are kept.
_EXIM_VERIFY_ERROR_TEXTS = {
    9: "certificate is not yet valid",      # X509_V_ERR_CERT_NOT_YET_VALID
}


def _verify_error_text(errnum: int) -> str:
    """OpenSSL's text for a certificate verification error number."""
    if errnum in _EXIM_VERIFY_ERROR_TEXTS:
        return _EXIM_VERIFY_ERROR_TEXTS[errnum]
    try:
        # Not public in pyOpenSSL, but the binding carries it.
        from OpenSSL._util import ffi, lib
        return ffi.string(lib.X509_verify_cert_error_string(errnum)).decode()
    except Exception:        # pragma: no cover - a binding without it
        return f"error number {errnum}"


# OpenSSL's short names where they differ from RFC 4514's (which cryptography
# knows); an attribute in neither table is shown by its dotted OID, as
# OpenSSL does.
_SHORT_NAMES = {
    NameOID.EMAIL_ADDRESS: "emailAddress", NameOID.SERIAL_NUMBER: "serialNumber",
    NameOID.SURNAME: "SN", NameOID.GIVEN_NAME: "GN", NameOID.TITLE: "title",
    NameOID.INITIALS: "initials", NameOID.GENERATION_QUALIFIER: "generationQualifier",
    NameOID.DN_QUALIFIER: "dnQualifier", NameOID.PSEUDONYM: "pseudonym",
    NameOID.POSTAL_CODE: "postalCode", NameOID.STREET_ADDRESS: "street",
    NameOID.BUSINESS_CATEGORY: "businessCategory",
    NameOID.JURISDICTION_COUNTRY_NAME: "jurisdictionC",
    NameOID.JURISDICTION_STATE_OR_PROVINCE_NAME: "jurisdictionST",
    NameOID.JURISDICTION_LOCALITY_NAME: "jurisdictionL",
    NameOID.ORGANIZATION_IDENTIFIER: "organizationIdentifier",
    NameOID.UNSTRUCTURED_NAME: "unstructuredName",
    NameOID.X500_UNIQUE_IDENTIFIER: "x500UniqueIdentifier",
}


def _oneline(name: x509.Name) -> str:
    """A distinguished name in OpenSSL's X509_NAME_oneline form, which Exim
    uses for $tls_in_peerdn: ``/C=UK/O=Org/CN=host``, bytes outside
    printable ASCII as ``\\xHH``."""
    parts = []
    for attribute in name:
        key = _SHORT_NAMES.get(attribute.oid) or attribute.rfc4514_attribute_name
        value = attribute.value if isinstance(attribute.value, str) else ""
        text = "".join(chr(b) if 0x20 <= b <= 0x7E else f"\\x{b:02X}"
                       for b in value.encode("utf-8"))
        parts.append(f"/{key}={text}")
    return "".join(parts)


_CIPHER_ALGORITHMS = re.compile(r"(AES|CAMELLIA|ARIA)(128|256)$")


def cipher_standard_name(openssl_name: str) -> str:
    """The IETF (RFC) name of a cipher suite from its OpenSSL name, as
    $tls_in_cipher_std; empty when the name is not understood.

    ``ECDHE-RSA-AES256-GCM-SHA384`` becomes
    ``TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384``; TLS 1.3 names are already
    standard."""
    if openssl_name.startswith("TLS_"):
        return openssl_name
    tokens = openssl_name.split("-")
    if tokens[0] in ("ECDHE", "DHE"):
        exchange = tokens.pop(0)
        # OpenSSL drops "RSA" from ECDHE-RSA-ARIA names.
        auth = tokens.pop(0) if tokens and tokens[0] in ("RSA", "ECDSA", "DSS") else "RSA"
        prefix = f"{exchange}_{auth}"
    else:
        prefix = "RSA"
    if tokens[:2] == ["CHACHA20", "POLY1305"]:
        return f"TLS_{prefix}_WITH_CHACHA20_POLY1305_SHA256" if len(tokens) == 2 else ""
    if tokens[:2] == ["DES", "CBC3"] and tokens[2:] == ["SHA"]:
        return f"TLS_{prefix}_WITH_3DES_EDE_CBC_SHA"
    match = _CIPHER_ALGORITHMS.match(tokens[0]) if tokens else None
    if not match:
        return ""
    cipher = f"{match.group(1)}_{match.group(2)}"
    rest = tokens[1:]
    if rest and rest[0] in ("CCM", "CCM8"):
        return f"TLS_{prefix}_WITH_{cipher}_{'CCM_8' if rest[0] == 'CCM8' else 'CCM'}" \
            if len(rest) == 1 else ""
    mode = "CBC"
    if rest and rest[0] == "GCM":
        mode = rest.pop(0)
    if len(rest) != 1 or rest[0] not in ("SHA", "SHA256", "SHA384"):
        return ""
    return f"TLS_{prefix}_WITH_{cipher}_{mode}_{rest[0]}"


def tls_in_variables(connection: SSL.Connection, *,
                     ocsp_stapled: bool | None = None) -> dict[str, str]:
    """The ``$tls_in_*`` values (and their old ``$tls_*`` names) for a
    connection whose handshake has finished, as Exim sets them.

    ``tls_in_ocsp`` comes from what ServerTLS recorded for the connection;
    *ocsp_stapled* overrides it (True: 4; False: 1 if the client asked,
    else 0).  ``tls_in_certificate_verified`` is 1 only when the client
    sent a certificate and it passed every check."""
    session = _sessions.get(connection)
    version = connection.get_protocol_version_name()
    # TLSv1.2 -> TLS1.2, as Exim writes it.
    version = version.replace("v", "", 1)
    name = connection.get_cipher_name() or ""
    bits = connection.get_cipher_bits() or 0
    peer = connection.get_peer_certificate(as_cryptography=True)
    verified = (peer is not None and session is not None and not session.verify_failed
                and connection.get_verify_mode() != SSL.VERIFY_NONE)
    ocsp_code = session.ocsp if session is not None else OCSP_NOT_REQ
    if ocsp_stapled is True:
        ocsp_code = OCSP_VFIED
    elif ocsp_stapled is False:
        ocsp_code = OCSP_NOT_RESP if ocsp_code != OCSP_NOT_REQ else OCSP_NOT_REQ
    raw_sni = connection.get_servername()
    sni = raw_sni.decode("utf-8", "replace") if raw_sni is not None else ""
    values = {
        "tls_in_bits": str(bits),
        "tls_in_certificate_verified": "1" if verified else "0",
        "tls_in_cipher": f"{version}:{name}:{bits}" if name else "",
        "tls_in_cipher_std": cipher_standard_name(name) if name else "",
        "tls_in_ocsp": str(ocsp_code),
        "tls_in_peerdn": _oneline(peer.subject) if peer is not None else "",
        # Resumption is never offered (see load_context).
        "tls_in_resumption": "0",
        "tls_in_sni": sni,
        "tls_in_ver": version if name else "",
    }
    for old in ("bits", "certificate_verified", "cipher", "peerdn", "sni"):
        values[f"tls_{old}"] = values[f"tls_in_{old}"]
    return values


def load_certificate_and_key(context: SSL.Context, certificate: str,
                             privatekey: str | None) -> None:
    """Load a certificate chain and its key (in the same file when
    *privatekey* is unset) as Exim does, with its error texts; raises
    TLSConfigError.  Used by both the server and the client side."""
    _readable(certificate, "SSL_CTX_use_certificate_chain_file")
    try:
        context.use_certificate_chain_file(certificate)
    except SSL.Error as exc:
        raise TLSConfigError(f"(SSL_CTX_use_certificate_chain_file file={certificate}): "
                             f"{_openssl_reason(exc)}") from None
    key = privatekey or certificate
    _readable(key, "SSL_CTX_use_PrivateKey_file")
    try:
        context.use_privatekey_file(key)
        context.check_privatekey()
    except SSL.Error as exc:
        raise TLSConfigError(
            f"(SSL_CTX_use_PrivateKey_file file={key}): {_openssl_reason(exc)}") from None
