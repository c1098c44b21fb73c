"""SOCKS5 client for the smtp transport's ``socks_proxy`` option, as Exim
4.96 does it (``src/transports/smtp_socks.c``).

Three pieces:

* :func:`parse_socks_proxy` reads the expanded option: a list (colon
  separated by default) of proxies, each a space-separated list of an IP
  literal and ``name=value`` options (``auth``, ``name``, ``pass``, ``port``,
  ``tmo``, ``pri``, ``weight``).
* :class:`SOCKS5Negotiation` is the sans-IO client side of RFC 1928 (method
  selection, CONNECT) and RFC 1929 (username/password).
* :class:`SOCKS5ClientEndpoint` is an ``IStreamClientEndpoint``: it picks
  proxies by priority and weight, connects to each with its own ``tmo``
  until one accepts the TCP connection, negotiates, and then hands the
  connection to the caller's protocol.  The caller's protocol gets the real
  TCP transport, so ``transport.startTLS()`` works through the tunnel.

Failures are :class:`SOCKSError`, carrying the errno Exim would have set;
``str()`` of one is the ``strerror`` text that Exim logs against the target
host (``Connection refused``, ``Permission denied``...).  The log lines Exim
writes on the way (``socks_sock_connect: <strerror>`` for each proxy that
could not be reached, ``socks auth failed`` and ``Unrecognised socks auth
method <n>`` to the main and panic logs) go to the optional *log*.

See doc/socks.md for the differences from Exim.
"""

from __future__ import annotations

import errno as E
import inspect
import ipaddress
import os
import random
import struct
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any
from typing import Protocol as TypingProtocol

from twisted.internet import error as twisted_error
from twisted.internet.defer import CancelledError, Deferred, ensureDeferred
from twisted.internet.endpoints import TCP4ClientEndpoint, TCP6ClientEndpoint
from twisted.internet.interfaces import (
    IAddress,
    IDelayedCall,
    IHandshakeListener,
    IProtocol,
    IProtocolFactory,
    IReactorTime,
    IStreamClientEndpoint,
    ITransport,
)
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.python.failure import Failure
from zope.interface import implementer

from twisted_mta.values import split_list

#: Defaults from smtp_socks.c.
SOCKS_PORT = 1080
SOCKS_TIMEOUT = 5
SOCKS_WEIGHT = 1
SOCKS_PRIORITY = 1
#: Exim keeps at most this many proxies (``socks_opts proxies[32]``).
MAX_PROXIES = 32
#: A connect_timeout of 0 means "indefinite", which Exim takes as one day.
INDEFINITE = 24 * 60 * 60

#: Exim's errno for "an event asked for an alternate response".
ERRNO_EVENT = -58

AUTH_NONE = 0
AUTH_NAME = 2
AUTH_NAME_VER = 1

#: RFC 1928 reply codes, with Exim's reason text and errno (``socks_errs[]``).
SOCKS_REPLY_ERRORS: dict[int, tuple[str, int]] = {
    1: ("general SOCKS server failure", E.EIO),
    2: ("connection not allowed by ruleset", E.EACCES),
    3: ("Network unreachable", E.ENETUNREACH),
    4: ("Host unreachable", E.EHOSTUNREACH),
    5: ("Connection refused", E.ECONNREFUSED),
    6: ("TTL expired", E.ECANCELED),
    7: ("Command not supported", E.EOPNOTSUPP),
    8: ("Address type not supported", E.EAFNOSUPPORT),
}
UNKNOWN_REPLY = "unknown error code received"


# ---------------------------------------------------------------------------
# The option


@dataclass(frozen=True)
class SOCKSProxy:
    """One proxy of ``socks_proxy``.  *auth* is the RFC 1928 method number
    (0 none, 2 username/password); *host* is an IP literal (not checked
    here: a proxy that is not an IP literal fails when it is tried)."""

    host: str
    auth: int = AUTH_NONE
    name: str = ""
    password: str = ""
    port: int = SOCKS_PORT
    timeout: int = SOCKS_TIMEOUT
    priority: int = SOCKS_PRIORITY
    weight: int = SOCKS_WEIGHT

    @property
    def is_ipv6(self) -> bool:
        """Exim's test: the address has a colon in it."""
        return ":" in self.host


def _atoi(text: str) -> int:
    """C ``atoi()``: optional space and sign, then digits; 0 if none."""
    s = text.lstrip(" \t\n\v\f\r")
    sign = 1
    if s[:1] in ("+", "-"):
        sign = -1 if s[0] == "-" else 1
        s = s[1:]
    digits = ""
    for c in s:
        if not "0" <= c <= "9":
            break
        digits += c
    return sign * int(digits) if digits else 0


def _unsigned(value: int) -> int:
    return value & 0xFFFFFFFF


def _apply_option(values: dict[str, Any], option: str) -> None:
    """``socks_option()``: unknown options, and ``auth=`` values other than
    ``none`` and ``name``, are ignored silently."""
    if option.startswith("auth="):
        if option[5:] == "none":
            values["auth"] = AUTH_NONE
        elif option[5:] == "name":
            values["auth"] = AUTH_NAME
    elif option.startswith("name="):
        values["name"] = option[5:]
    elif option.startswith("pass="):
        values["password"] = option[5:]
    elif option.startswith("port="):
        # a C short, then htons(): only the low 16 bits reach the wire
        values["port"] = _atoi(option[5:]) & 0xFFFF
    elif option.startswith("tmo="):
        values["timeout"] = _unsigned(_atoi(option[4:]))
    elif option.startswith("pri="):
        values["priority"] = _unsigned(_atoi(option[4:]))
    elif option.startswith("weight="):
        values["weight"] = _unsigned(_atoi(option[7:]))


class SOCKSConfigError(ValueError):
    """A ``socks_proxy`` value that cannot be used at all."""


def parse_socks_proxy(text: str) -> list[SOCKSProxy]:
    """Parse an expanded ``socks_proxy`` value.

    The outer list is colon-separated by default and each proxy is a
    space-separated list (both allow a ``<c`` separator change; a doubled
    separator is a literal one, as everywhere in Exim).  The first element
    of a proxy is its address; the rest are options.  An empty value gives
    no proxies (the transport then connects directly).  Items past the
    32nd are dropped, as Exim does."""
    proxies: list[SOCKSProxy] = []
    for spec in split_list(text, ":")[:MAX_PROXIES]:
        elements = split_list(spec, " ")
        if not elements:
            # Exim returns -1 here without a message; an all-blank item
            # cannot come out of split_list, but a "<" alone can.
            raise SOCKSConfigError(f"no proxy address in socks_proxy item \"{spec}\"")
        values: dict[str, Any] = {"host": elements[0]}
        for option in elements[1:]:
            _apply_option(values, option)
        proxies.append(SOCKSProxy(**values))
    return proxies


def proxy_order(
    proxies: Sequence[SOCKSProxy], randbelow: Callable[[int], int] | None = None,
) -> Iterator[SOCKSProxy]:
    """The proxies in the order ``socks_get_proxy()`` tries them: the
    highest priority first, and within one priority a weighted random
    choice (``randbelow(total weight)``, default :func:`random.randrange`),
    each proxy once.

    Exim stops as soon as the highest remaining priority has a total weight
    of 0, even when proxies of lower priority remain; here such a group is
    tried in list order and then lower priorities follow."""
    draw = randbelow or random.randrange
    remaining = list(range(len(proxies)))
    if len(remaining) == 1:
        yield proxies[0]
        return
    while remaining:
        top = max(proxies[i].priority for i in remaining)
        group = [i for i in remaining if proxies[i].priority == top]
        total = sum(proxies[i].weight for i in group)
        chosen = group[0]
        if total > 0:
            rnd = draw(total)
            for i in group:
                rnd -= proxies[i].weight
                if rnd < 0:
                    chosen = i
                    break
        remaining.remove(chosen)
        yield proxies[chosen]


# ---------------------------------------------------------------------------
# Errors and results


class SOCKSError(twisted_error.ConnectError):
    """A SOCKS connection failure.

    *errno* is what Exim leaves in ``errno`` (the transport logs
    ``strerror(errno)`` against the target host and uses it for retry);
    *reason* is Exim's debug text for it (the ``socks_errs[]`` reason for a
    reply code); *state* is ``"method select"`` or ``"connect"``."""

    def __init__(self, errno: int, reason: str = "", state: str = "",
                 proxy: SOCKSProxy | None = None) -> None:
        super().__init__(osError=errno, string=reason)
        self.errno = errno
        self.reason = reason or os.strerror(errno)
        self.state = state
        self.proxy = proxy

    @property
    def strerror(self) -> str:
        return os.strerror(self.errno)

    def __str__(self) -> str:
        return self.strerror


@implementer(IAddress)
@dataclass(frozen=True)
class SOCKSSession:
    """A SOCKS tunnel that is up.  What Exim puts into variables:

    * ``$proxy_local_address``/``$proxy_local_port``: :attr:`proxy_local_address`,
      :attr:`proxy_local_port` (the proxy, as configured);
    * ``$proxy_external_address``/``$proxy_external_port``: the proxy's
      BND.ADDR/BND.PORT from the CONNECT reply;
    * ``$proxy_session``: ``yes``.

    It is also the address given to the factory's ``buildProtocol()``."""

    proxy: SOCKSProxy
    proxy_external_address: str
    proxy_external_port: int
    target_host: str = ""
    target_port: int = 0

    @property
    def proxy_local_address(self) -> str:
        return self.proxy.host

    @property
    def proxy_local_port(self) -> int:
        return self.proxy.port

    def prx_log(self, outgoing_port: bool = False) -> str:
        """The `` PRX=[ip]`` (``:port`` with ``+outgoing_port``) part of a
        ``=>`` line under ``log_selector = +proxy``."""
        text = f" PRX=[{self.proxy_local_address}]"
        if outgoing_port:
            text += f":{self.proxy_local_port}"
        return text


# ---------------------------------------------------------------------------
# The protocol, sans IO


def _address_block(host: str, port: int) -> bytes:
    """ATYP, DST.ADDR and DST.PORT of a CONNECT request."""
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        name = host.encode("idna") if not host.isascii() else host.encode("ascii")
        if not 0 < len(name) < 256:
            raise SOCKSError(E.EINVAL, "bad target host name", "connect") from None
        return b"\x03" + bytes([len(name)]) + name + struct.pack("!H", port)
    atyp = b"\x01" if ip.version == 4 else b"\x04"
    return atyp + ip.packed + struct.pack("!H", port & 0xFFFF)


class SOCKS5Negotiation:
    """The client side of a SOCKS5 negotiation with one proxy.

    :meth:`start` gives the method-selection message; feed everything the
    proxy sends to :meth:`received`, which returns the bytes to send next
    (possibly none) and raises :class:`SOCKSError` on failure.  When
    :attr:`done` is true, :attr:`session` is set and :attr:`leftover` holds
    bytes received after the CONNECT reply (the start of the tunnelled
    stream).  *log_panic* receives the lines Exim writes to the main and
    panic logs (``socks auth failed``, ``Unrecognised socks auth method
    <n>``)."""

    def __init__(self, proxy: SOCKSProxy, target_host: str, target_port: int,
                 log_panic: Callable[[str], None] | None = None) -> None:
        self.proxy = proxy
        self.target_host = target_host
        self.target_port = target_port
        self._log_panic = log_panic or (lambda text: None)
        self.state = "method select"
        self._step = "method"
        self._buffer = b""
        self._method = -1
        self.done = False
        self.session: SOCKSSession | None = None
        self.leftover = b""
        self._request = b"\x05\x01\x00" + _address_block(target_host, target_port)

    def start(self) -> bytes:
        """``05 01 <method>``: only the configured method is offered."""
        return bytes([5, 1, self.proxy.auth])

    def _fail(self, code: int) -> SOCKSError:
        """Exim's ``proxy_err``: the errno comes from ``socks_errs[code]``;
        code 0 (no errno) and codes past the table give EPROTO."""
        if code in SOCKS_REPLY_ERRORS:
            reason, errno = SOCKS_REPLY_ERRORS[code]
            return SOCKSError(errno, reason, self.state, self.proxy)
        return SOCKSError(E.EPROTO, UNKNOWN_REPLY, self.state, self.proxy)

    def received(self, data: bytes) -> bytes:
        if self.done:
            self.leftover += data
            return b""
        self._buffer += data
        out = b""
        while not self.done:
            sent = self._advance()
            if sent is None:
                break
            out += sent
        return out

    def _take(self, n: int) -> bytes | None:
        if len(self._buffer) < n:
            return None
        chunk, self._buffer = self._buffer[:n], self._buffer[n:]
        return chunk

    def _advance(self) -> bytes | None:
        """One step; None when more input is needed."""
        if self._step == "method":
            reply = self._take(2)
            if reply is None:
                return None
            if reply[0] != 5:
                raise self._fail(reply[1])
            self._method = reply[1]
            if reply[1] == AUTH_NONE:
                return self._send_connect()
            if reply[1] == AUTH_NAME:
                self._step = "auth"
                name = self.proxy.name.encode("latin-1", "replace")[:255]
                password = self.proxy.password.encode("latin-1", "replace")[:255]
                return (bytes([AUTH_NAME_VER, len(name)]) + name
                        + bytes([len(password)]) + password)
            self._log_panic(f"Unrecognised socks auth method {reply[1]}")
            raise self._fail(reply[1])
        if self._step == "auth":
            reply = self._take(2)
            if reply is None:
                return None
            if reply[0] == AUTH_NAME_VER and reply[1] == 0:
                return self._send_connect()
            self._log_panic("socks auth failed")
            # Exim then goes to proxy_err with the method (2) as the code
            raise self._fail(self._method)
        if self._step == "connect":
            if len(self._buffer) < 2:
                return None
            if self._buffer[0] != 5 or self._buffer[1] != 0:
                raise self._fail(self._buffer[1])
            if len(self._buffer) < 4:
                return None
            atyp = self._buffer[3]
            if atyp == 1:
                size = 4 + 4 + 2
            elif atyp == 4:
                size = 4 + 16 + 2
            elif atyp == 3:
                if len(self._buffer) < 5:
                    return None
                size = 4 + 1 + self._buffer[4] + 2
            else:
                raise SOCKSError(E.EPROTO, "bad address type in reply", self.state, self.proxy)
            reply = self._take(size)
            if reply is None:
                return None
            if atyp == 1:
                address = str(ipaddress.IPv4Address(reply[4:8]))
            elif atyp == 4:
                address = str(ipaddress.IPv6Address(reply[4:20]))
            else:
                address = reply[5:5 + reply[4]].decode("latin-1")
            (port,) = struct.unpack("!H", reply[-2:])
            self.session = SOCKSSession(self.proxy, address, port,
                                        self.target_host, self.target_port)
            self.done = True
            self.leftover, self._buffer = self._buffer, b""
            return b""
        return None  # pragma: no cover

    def _send_connect(self) -> bytes:
        self.state = "connect"
        self._step = "connect"
        return self._request

    def connection_lost(self) -> SOCKSError:
        """The error for a proxy that closed the connection mid-negotiation:
        a failed RFC 1929 read is an auth failure (EACCES, by way of the
        method code, as in Exim), anything else EPROTO."""
        if self._step == "auth":
            return self._fail(self._method)
        return SOCKSError(E.EPROTO, "connection closed by proxy", self.state, self.proxy)


# ---------------------------------------------------------------------------
# Twisted glue


class SOCKSLog(TypingProtocol):
    """Where the SOCKS log lines go (an adapter around
    :class:`twisted_mta.log.EximLog`): *panic* lines go to the main log as
    well (Exim's ``LOG_MAIN|LOG_PANIC``)."""

    def main(self, text: str) -> None: ...

    def panic(self, text: str) -> None: ...


@implementer(IHandshakeListener)
class _SOCKS5Protocol(Protocol):
    """Runs the negotiation on the proxy connection, then passes everything
    on to the caller's protocol, which was given the same TCP transport (so
    its ``startTLS()`` wraps this connection)."""

    def __init__(self, attempt: _Attempt, negotiation: SOCKS5Negotiation) -> None:
        self._attempt = attempt
        self._negotiation = negotiation
        self.wrapped: IProtocol | None = None
        self._finished = False

    def connectionMade(self) -> None:
        assert self.transport is not None
        self.transport.write(self._negotiation.start())

    def dataReceived(self, data: bytes) -> None:
        if self.wrapped is not None:
            self.wrapped.dataReceived(data)
            return
        if self._finished:
            return
        try:
            out = self._negotiation.received(data)
        except SOCKSError as exc:
            self._finished = True
            self._attempt.negotiation_failed(exc)
            return
        if out:
            assert self.transport is not None
            self.transport.write(out)
        if self._negotiation.done:
            self._finished = True
            self._attempt.negotiated(self, self._negotiation)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if self.wrapped is not None:
            self.wrapped.connectionLost(reason)
            return
        if not self._finished:
            self._finished = True
            self._attempt.negotiation_failed(self._negotiation.connection_lost())

    def handshakeCompleted(self) -> None:
        if self.wrapped is not None and IHandshakeListener.providedBy(self.wrapped):
            self.wrapped.handshakeCompleted()


class _NegotiationFactory(Factory):
    def __init__(self, attempt: _Attempt, negotiation: SOCKS5Negotiation) -> None:
        self._attempt = attempt
        self._negotiation = negotiation

    def buildProtocol(self, addr: IAddress) -> _SOCKS5Protocol:
        return _SOCKS5Protocol(self._attempt, self._negotiation)


def _connect_errno(failure: Failure) -> int:
    value = failure.value
    if isinstance(value, twisted_error.ConnectionRefusedError):
        return E.ECONNREFUSED
    if isinstance(value, twisted_error.TimeoutError):
        return E.ETIMEDOUT
    os_error = getattr(value, "osError", None)
    if isinstance(os_error, int):
        return os_error
    if isinstance(value, OSError) and value.errno:
        return value.errno
    return E.ECONNREFUSED


@dataclass
class _Attempt:
    """One call of :meth:`SOCKS5ClientEndpoint.connect`."""

    endpoint: SOCKS5ClientEndpoint
    factory: IProtocolFactory
    result: Deferred[tuple[IProtocol, SOCKSSession]] = field(init=False)
    order: Iterator[SOCKSProxy] = field(init=False)
    tcp: Deferred[Any] | None = None
    transport: ITransport | None = None
    proxy_timer: IDelayedCall | None = None
    overall_timer: IDelayedCall | None = None
    deadline: float = 0.0
    finished: bool = False
    proxy_timed_out: bool = False

    def __post_init__(self) -> None:
        self.result = Deferred(lambda d: self._cancel())
        self.order = proxy_order(self.endpoint.proxies, self.endpoint.randbelow)

    def start(self) -> None:
        clock = self.endpoint.clock
        self.deadline = clock.seconds() + self.endpoint.timeout
        self.overall_timer = clock.callLater(self.endpoint.timeout, self._overall_timeout)
        self._next_proxy()

    # -- proxies

    def _next_proxy(self) -> None:
        if self.finished:
            return
        hook = self.endpoint.tcp_connect_event
        for proxy in self.order:
            try:
                ipaddress.ip_address(proxy.host)
            except ValueError:
                self._log_main(f"socks_sock_connect: {os.strerror(E.EINVAL)}")
                continue
            if hook is not None:
                result = hook(proxy)
                if inspect.isawaitable(result):
                    ensureDeferred(result).addBoth(self._event_done, proxy)
                    return
                if result:
                    self._log_main(f"socks_sock_connect: {os.strerror(ERRNO_EVENT)}")
                    continue
            self._connect_proxy(proxy)
            return
        self._fail(SOCKSError(E.EBUSY, "no proxies left", "method select"))

    def _event_done(self, result: object, proxy: SOCKSProxy) -> None:
        """A ``tcp:connect`` event answered: a non-empty string refuses this
        proxy (errno ERRNO_EVENT, as ``event_raise()`` sets); a failure of
        the hook itself is like Exim's failed expansion: connect anyway."""
        if self.finished:
            return
        if isinstance(result, str) and result:
            self._log_main(f"socks_sock_connect: {os.strerror(ERRNO_EVENT)}")
            self._next_proxy()
        else:
            self._connect_proxy(proxy)

    def _connect_proxy(self, proxy: SOCKSProxy) -> None:
        ep = self.endpoint
        negotiation = SOCKS5Negotiation(proxy, ep.target_host, ep.target_port,
                                        log_panic=self._log_panic)
        endpoint_class = TCP6ClientEndpoint if proxy.is_ipv6 else TCP4ClientEndpoint
        bind = (ep.bind_address, 0) if ep.bind_address else None
        # a long endpoint timeout: ours, on the injected clock, rule
        tcp_endpoint = endpoint_class(ep.reactor, proxy.host, proxy.port,
                                      timeout=INDEFINITE * 2, bindAddress=bind)
        self.proxy_timed_out = False
        remaining = max(self.deadline - ep.clock.seconds(), 0.0)
        limit = min(proxy.timeout, remaining) if proxy.timeout else remaining
        self.proxy_timer = ep.clock.callLater(limit, self._proxy_timeout)
        try:
            self.tcp = tcp_endpoint.connect(_NegotiationFactory(self, negotiation))
        except Exception:  # an unusable address: fail this proxy
            self._clear_proxy_timer()
            self._log_main(f"socks_sock_connect: {os.strerror(E.EINVAL)}")
            self._next_proxy()
            return
        self.tcp.addCallbacks(self._tcp_connected, self._tcp_failed)

    def _proxy_timeout(self) -> None:
        self.proxy_timer = None
        self.proxy_timed_out = True
        if self.tcp is not None:
            self.tcp.cancel()

    def _clear_proxy_timer(self) -> None:
        if self.proxy_timer is not None and self.proxy_timer.active():
            self.proxy_timer.cancel()
        self.proxy_timer = None

    def _tcp_connected(self, protocol: Any) -> None:
        self.tcp = None
        self._clear_proxy_timer()
        self.transport = getattr(protocol, "transport", None)
        if self.finished and self.transport is not None:
            self.transport.abortConnection()

    def _tcp_failed(self, failure: Failure) -> None:
        self.tcp = None
        self._clear_proxy_timer()
        if self.finished:
            return
        if failure.check(CancelledError, twisted_error.ConnectingCancelledError):
            code = E.ETIMEDOUT if self.proxy_timed_out else E.ECANCELED
        else:
            code = _connect_errno(failure)
        self._log_main(f"socks_sock_connect: {os.strerror(code)}")
        self._next_proxy()

    # -- negotiation outcome

    def negotiated(self, protocol: _SOCKS5Protocol, negotiation: SOCKS5Negotiation) -> None:
        transport = protocol.transport
        session = negotiation.session
        assert transport is not None and session is not None
        if self.finished:
            transport.abortConnection()  # type: ignore[attr-defined]
            return
        wrapped = self.factory.buildProtocol(session)
        if wrapped is None:
            transport.abortConnection()  # type: ignore[attr-defined]
            self._fail(twisted_error.NoProtocol())
            return
        self._stop_timers()
        self.finished = True
        protocol.wrapped = wrapped
        wrapped.makeConnection(transport)
        self.result.callback((wrapped, session))
        if negotiation.leftover:
            data, negotiation.leftover = negotiation.leftover, b""
            wrapped.dataReceived(data)

    def negotiation_failed(self, exc: SOCKSError) -> None:
        if self.transport is not None:
            self.transport.abortConnection()  # type: ignore[attr-defined]
        self._fail(exc)

    # -- endings

    def _overall_timeout(self) -> None:
        self.overall_timer = None
        if self.finished:
            return
        self._fail(SOCKSError(E.ETIMEDOUT, os.strerror(E.ETIMEDOUT)))

    def _cancel(self) -> None:
        if not self.finished:
            self.finished = True
            self._stop_timers()
            self._abort_pending()

    def _stop_timers(self) -> None:
        self._clear_proxy_timer()
        if self.overall_timer is not None and self.overall_timer.active():
            self.overall_timer.cancel()
        self.overall_timer = None

    def _abort_pending(self) -> None:
        if self.tcp is not None:
            tcp, self.tcp = self.tcp, None
            tcp.cancel()
        if self.transport is not None:
            self.transport.abortConnection()  # type: ignore[attr-defined]

    def _fail(self, exc: Exception) -> None:
        if self.finished:
            return
        self.finished = True
        self._stop_timers()
        self._abort_pending()
        self.result.errback(Failure(exc))

    def _log_main(self, text: str) -> None:
        if self.endpoint.log is not None:
            self.endpoint.log.main(text)

    def _log_panic(self, text: str) -> None:
        if self.endpoint.log is not None:
            self.endpoint.log.panic(text)


@implementer(IStreamClientEndpoint)
class SOCKS5ClientEndpoint:
    """Connect to *target_host*:*target_port* through the first of
    *proxies* (in :func:`proxy_order`) that accepts a TCP connection.

    * *reactor* provides ``IReactorTCP`` (the proxies are reached with
      ``TCP4ClientEndpoint``/``TCP6ClientEndpoint`` on it);
    * *clock* (default: *reactor*) times each proxy's ``tmo`` and the
      overall *timeout* (the transport's ``connect_timeout``; 0 means one
      day, as in Exim), which covers every proxy tried and the negotiation;
    * *target_host* is an IP literal (the smtp transport always passes one,
      like Exim) or a domain name (sent as ATYP 3; Exim never does that);
    * *bind_address* is the transport's ``interface``;
    * *randbelow(n)* draws the weighted choice (default
      :func:`random.randrange`);
    * *log* receives Exim's log lines;
    * *tcp_connect_event(proxy)* is called before each proxy is tried
      (Exim raises ``tcp:connect`` there, with ``$host_address`` and
      ``$host_port`` set to the proxy); a non-empty result (or a Deferred or
      coroutine giving one) skips that proxy, logged as
      ``socks_sock_connect: Unknown error -58``.

    ``connect(factory)`` fires with the protocol built by
    ``factory.buildProtocol(session)`` where *session* is the
    :class:`SOCKSSession`; :meth:`connect_session` fires with
    ``(protocol, session)``.  The protocol's transport is the TCP connection
    to the proxy, so ``getPeer()`` is the proxy and ``startTLS()`` works.
    Failures are :class:`SOCKSError` (or ``NoProtocol``)."""

    def __init__(
        self,
        reactor: Any,
        proxies: Sequence[SOCKSProxy],
        target_host: str,
        target_port: int,
        clock: IReactorTime | None = None,
        *,
        timeout: float = 0,
        bind_address: str | None = None,
        randbelow: Callable[[int], int] | None = None,
        log: SOCKSLog | None = None,
        tcp_connect_event: Callable[[SOCKSProxy], str | None | Awaitable[str | None]]
        | None = None,
    ) -> None:
        self.reactor = reactor
        self.proxies = list(proxies)[:MAX_PROXIES]
        self.target_host = target_host
        self.target_port = target_port
        self.clock: IReactorTime = clock if clock is not None else reactor
        self.timeout = timeout if timeout and timeout > 0 else INDEFINITE
        self.bind_address = bind_address
        self.randbelow = randbelow
        self.log = log
        self.tcp_connect_event = tcp_connect_event

    def connect_session(
        self, protocolFactory: IProtocolFactory,
    ) -> Deferred[tuple[IProtocol, SOCKSSession]]:
        """Like :meth:`connect`, but fire with ``(protocol, session)``."""
        attempt = _Attempt(self, protocolFactory)
        if not self.proxies:
            attempt.result.errback(Failure(SOCKSError(E.EBUSY, "no proxies left",
                                                      "method select")))
            return attempt.result
        attempt.start()
        return attempt.result

    def connect(self, protocolFactory: IProtocolFactory) -> Deferred[IProtocol]:
        """``IStreamClientEndpoint.connect``."""
        return self.connect_session(protocolFactory).addCallback(lambda pair: pair[0])
