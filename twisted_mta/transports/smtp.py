"""The ``smtp`` transport: Exim's ``transports/smtp.c`` (remote delivery).

One job is one message to a batch of addresses that share the transport
and the host list (the delivery process batches them, up to ``max_rcpt``).
The hosts are the addresses' (set by manualroute or dnslookup), or the
transport's ``hosts`` when the router gave none or ``hosts_override`` is
set; then the ``fallback_hosts`` (the router's, else the transport's).
They are tried in order: a host whose retry time has not come is skipped
(unless the delivery is forced); a connection failure, a 4xx greeting or
a failure before MAIL moves on to the next host.  Once a transaction has
been attempted, its per-recipient results stand (a 4xx on RCPT defers
only that recipient, a 5xx fails only that one; an error after DATA
applies to every accepted recipient).  Deferred recipients are not tried
again at the next host in this version.

Retry: each host failure is recorded as a host retry item
(``T:name:ip[:port]``) and a host that worked has its record deleted
(see L{twisted_mta.queue.retry.RetryDatabase}).  The database, the force
flag and the message's times come through ``job.extra`` from the
delivery process.

STARTTLS (client side, OpenSSL via pyOpenSSL; see doc/smtp-transport.md,
"TLS"): opportunistic when offered, ``hosts_avoid_tls``,
``hosts_require_tls``, ``tls_tempfail_tryclear`` (a failed handshake is
retried in clear on a new connection, as Exim does), ``tls_verify_hosts``,
``tls_try_verify_hosts``, ``tls_verify_cert_hostnames``, ``tls_sni``,
client certificates, ``tls_require_ciphers``, ``tls_crl``.

PRDR (``hosts_try_prdr``) and DSN pass-through (RET/ENVID/NOTIFY/ORCPT,
``dsn_lasthop``, ``extra["dsn_aware"]``): see doc/smtp-transport.md,
"PRDR and DSN".  ``socks_proxy`` connects through SOCKS5 proxies
(doc/socks.md), and the connection events (``tcp:connect``,
``smtp:connect``, ``tls:cert``, ``tcp:close``, ``msg:host:defer``,
``msg:defer``) are raised here (doc/events.md).

AUTH (client side, ``hosts_try_auth``/``hosts_require_auth``, the
``plaintext`` driver's ``client_send``, ``authenticated_sender``): see
doc/smtp-transport.md, "AUTH".

CHUNKING (BDAT) and SMTPUTF8 (with downconversion): "CHUNKING and
SMTPUTF8".  OCSP stapling and ``protocol = smtps``: doc/ocsp.md.

Several messages per connection (``ContinuedConnection``, with
twisted_mta/queue/waiting.py), ``hosts_max_try``, ``hosts_randomize``,
``hosts_avoid_esmtp``, ``hosts_avoid_pipelining``: doc/smtp-transport.md.
Not yet: DANE, ``serialize_hosts``, transport filters.
"""

from __future__ import annotations

import datetime
import errno as E
import ipaddress
import os
import random
import socket
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace
from typing import Any

import idna
from zope.interface import implementer

from twisted_mta.dsn import dsn_data
from twisted_mta.events import ERRNO_EVENT, deferred_event, transport_action, transport_event
from twisted_mta.expand.errors import ExpansionError, ForcedFailure
from twisted_mta.interfaces import ITransport
from twisted_mta.lists import HostIdentity, ListDefer, match_list
from twisted_mta.queue.address import DEFERRED, PENDING, DeliveryAddress, Host
from twisted_mta.queue.retry import ERRNO_HRETRY, RetryItem
from twisted_mta.smtp.auth import expand_check_condition
from twisted_mta.smtp.client import (
    ClientSettings,
    ConnectError,
    Reply,
    SMTPClient,
    SMTPClientError,
    TLSHandshakeError,
    bdat_chunks,
    connect,
    connect_socks,
)
from twisted_mta.smtp.params import xtext_encode
from twisted_mta.smtp.socks import SOCKSConfigError, parse_socks_proxy
from twisted_mta.smtp.tls import _oneline
from twisted_mta.smtp.tlsclient import (
    ClientTLS,
    ClientTLSOptions,
    TLSConfigError,
    handshake_error_text,
    tls_out_variables,
)
from twisted_mta.spool.message import (
    DSN_LASTHOP,
    DSN_RET_FULL,
    DSN_RET_HDRS,
    NOTIFY_DELAY,
    NOTIFY_FAILURE,
    NOTIFY_NEVER,
    NOTIFY_SUCCESS,
)
from twisted_mta.transports import common as C
from twisted_mta.transports.appendfile import rcpt_address
from twisted_mta.transports.common import Outcome, defer, expand
from twisted_mta.transports.message import (
    CHUNK_SIZE,
    HeaderChangeError,
    MessageStream,
    WriteOptions,
    build_headers,
    message_size,
    next_chunk,
    read_spooled_body,
)
from twisted_mta.values import parse_port, split_list

#: The address.extra keys the DSN code reads (twisted_mta/dsn.py).
SMTP_GREETING, HELO_RESPONSE, PASS_MESSAGE = "smtp_greeting", "helo_response", "pass_message"
#: Whether the next hop offered DSN (True/False; read by twisted_mta/dsn.py).
DSN_AWARE = "dsn_aware"
#: Internal, during one transaction: a recipient's PRDR reply.
_PRDR_RESULT = "_prdr_result"
_NOTIFY_NAMES = ((NOTIFY_NEVER, "NEVER"), (NOTIFY_SUCCESS, "SUCCESS"),
                 (NOTIFY_FAILURE, "FAILURE"), (NOTIFY_DELAY, "DELAY"))
#: Exim's errno values for TLS (macros.h).
ERRNO_TLSFAILURE = -37
ERRNO_TLSREQUIRED = -38
#: The address.extra keys for the => line (twisted_mta/queue/deliverylog.py).
TLS_EXTRA_KEYS = ("tls_cipher", "tls_cv", "tls_peerdn")
#: The client authenticator's name, for A= on the => line.
AUTHENTICATOR = "authenticator"
#: Set on an address sent down a connection handed on by another delivery:
#: Exim's continue_sequence > 1, a ``*`` after the host in the log line.
CONTINUED = "continued"
# What the set-up of a connection gave each address delivered down it.
_CONNECTION_EXTRA = (SMTP_GREETING, HELO_RESPONSE, AUTHENTICATOR, "proxy", *TLS_EXTRA_KEYS)
#: Exim's errno values for AUTH (macros.h).
ERRNO_AUTHFAIL = -42
ERRNO_AUTHPROB = -48


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def _host_list(text: str) -> list[tuple[str, int | None]]:
    """A colon-separated host list of ``name`` and ``[ip]`` items, each
    with an optional port after a doubled colon (``name::2525``)."""
    return _split_bracketed(text)


def _split_bracketed(text: str) -> list[tuple[str, int | None]]:
    out: list[tuple[str, int | None]] = []
    for raw in text.replace("::", "\x00").split(":"):
        raw = raw.strip().replace("\x00", ":")
        if not raw:
            continue
        port = None
        if raw.startswith("["):
            end = raw.find("]")
            name, rest = raw[1:end], raw[end + 1:]
            if rest.startswith(":") and rest[1:].isdigit():
                port = int(rest[1:])
        else:
            name, _, p = raw.partition(":")
            if p.isdigit():
                port = int(p)
        out.append((name, port))
    return out


@implementer(ITransport)
class SmtpTransport:
    """``driver = smtp``."""

    name = "smtp"
    local = False

    async def deliver(self, instance: Any, job: Any) -> None:
        outcome = await C.guard_delivery(instance, self._deliver(instance, job))
        if isinstance(outcome, Outcome):
            _apply(outcome, job.addresses)
        for address in job.addresses:
            if address.status == PENDING:
                address.defer("smtp transport gave no result")

    # -- setting up ---------------------------------------------------------------------

    async def _hosts(self, instance: Any, job: Any) -> tuple[list[Host], list[Host]] | Outcome:
        """The hosts, and the fallback hosts, each with its addresses."""
        first = job.addresses[0]
        option = instance.get("hosts")
        hosts = list(first.hosts)
        if option and (not hosts or instance.get("hosts_override")):
            try:
                text = await expand(job, str(option))
            except ExpansionError as e:
                return defer(f"failed to expand list of hosts \"{option}\" in "
                             f"{instance.name} transport: {e.message}", C.ERRNO_EXPANDFAIL)
            hosts = await self._resolve(job, _host_list(text))
        if not hosts:
            return defer(f"No hosts specified for {instance.name} transport",
                         C.ERRNO_UNKNOWNERROR)
        if instance.get("hosts_randomize") and all(h.mx < 0 for h in hosts):
            # Exim: a list that did not come from MX records, in random order.
            hosts = random.sample(hosts, len(hosts))
        fallback = first.extra.get("fallback_hosts") or instance.get("fallback_hosts")
        fallback_hosts: list[Host] = []
        if fallback:
            items = [(h.name, h.port) for h in fallback] if isinstance(fallback, list) \
                else _host_list(str(fallback))
            fallback_hosts = await self._resolve(job, items)
        resolved: list[Host] = []
        for host in hosts:
            if host.address is None:
                resolved += await self._resolve(job, [(host.name, host.port)])
            else:
                resolved.append(host)
        return resolved, fallback_hosts

    async def _resolve(self, job: Any, items: list[tuple[str, int | None]]) -> list[Host]:
        hosts: list[Host] = []
        for name, port in items:
            if _is_ip(name):
                hosts.append(Host(name, name, port))
                continue
            try:
                infos = await C.run_blocking(job, socket.getaddrinfo, name, None, 0,
                                             socket.SOCK_STREAM)
            except OSError:
                hosts.append(Host(name, None, port))
                continue
            seen: list[str] = []
            for info in infos:
                ip = str(info[4][0])
                if ip not in seen:
                    seen.append(ip)
                    hosts.append(Host(name, ip, port))
        return hosts

    async def _deliver(self, instance: Any, job: Any) -> Outcome | None:
        name = instance.name
        setup = await C.start_delivery(instance, job)
        if isinstance(setup, Outcome):
            return setup
        hosts = await self._hosts(instance, job)
        if isinstance(hosts, Outcome):
            return hosts
        try:
            # Exim's default port follows the protocol (smtps: 465).
            port_text = await expand(job, str(instance.options.get("port") or (
                "smtps" if _smtps(instance) else "smtp")))
            helo = await expand(job, str(instance.get("helo_data") or "$primary_hostname"))
            interface = instance.get("interface")
            interface = await expand(job, str(interface)) if interface else None
        except ExpansionError as e:
            return defer(f"failed to expand an option of the {name} transport: {e.message}",
                         C.ERRNO_EXPANDFAIL)
        default_port = parse_port(port_text)
        if default_port is None:
            return defer(f'Invalid port "{port_text}" for {name} transport',
                         C.ERRNO_UNKNOWNERROR)
        options = WriteOptions.from_instance(instance, use_crlf=True, end_dot=True,
                                             check_string=".", escape_string="..")
        try:
            headers = await build_headers(job, instance, options, setup.return_path)
        except HeaderChangeError as e:
            if e.routing is not None:
                return defer(e.routing)
            return defer(f"failed to expand headers_add or headers_remove: {e.message}",
                         C.ERRNO_CHHEADER_FAIL)
        body = job.extra.get("spooled_body")
        if body is not None:
            # Read by the delivery process with the -H file: no trip to the
            # thread pool.
            size, eight_bit = message_size(job.message, len(body)), not body.isascii()
        else:
            size, eight_bit, body = await C.run_blocking(job, _size_and_8bit, job)
        # size_addition: what the size may grow by on the way (-1: no SIZE).
        addition = int(instance.get("size_addition") or 0)
        size_param = size + addition if addition >= 0 else None
        settings = ClientSettings(float(instance.get("command_timeout")),
                                  float(instance.get("data_timeout")),
                                  float(instance.get("final_timeout")))
        main, fallback = hosts
        attempt = _Attempt(self, instance, job, setup.return_path, headers, options,
                           size_param, eight_bit, helo, interface, settings, body)
        if await _routing_only(instance, job):
            # Exim: no delivery now; the message waits for these hosts.
            for address in job.addresses:
                address.defer(ROUTING_ONLY)
            job.extra["defer_events"] = True
            if int(instance.get("connection_max_messages") or 0) != 1:
                job.extra.setdefault("waiting_hosts", []).extend(h.name for h in main)
            return None
        outcome = await attempt.run(main, default_port, job.addresses)
        _apply(outcome, job.addresses)
        deferred = [a for a in job.addresses if a.status == DEFERRED]
        if fallback and deferred:
            # Exim's fallback hosts are a second run of the transport; the
            # first raises its msg:defer.
            await attempt.defer_event(outcome)
            # Exim's fallback pass: the addresses the hosts deferred, once more
            # at the fallback hosts; only the final result is logged.
            for address in deferred:
                address.status, address.host_used = PENDING, None
            outcome = await attempt.run(fallback, default_port, deferred)
            _apply(outcome, deferred)
        await attempt.defer_event(outcome)
        return None


@dataclass(eq=False)
class ContinuedConnection:
    """A connection left open after a message went through it cleanly, to
    carry the messages waiting for its host (twisted_mta/queue/waiting.py).

    The delivery process that parked it hands it on and at the end calls
    ``close()`` (QUIT, then the ``tcp:close`` event).  ``sequence`` counts
    the messages sent down it, up to ``limit`` (connection_max_messages;
    0: no limit); ``usable`` goes false when a transaction leaves it in a
    state that another must not inherit."""

    transport: str
    host: Host
    port: int
    client: SMTPClient
    address_extra: dict[str, Any]
    variables: dict[str, str]
    auth: str | None
    limit: int
    close: Callable[[], Awaitable[None]]
    sequence: int = 1
    usable: bool = True

    def serves(self, transport: str, host: Host, port: int) -> bool:
        """Whether a delivery by *transport* to *host*:*port* may use it."""
        return (self.usable and not self.client.protocol.closed
                and transport == self.transport and port == self.port
                and str(host.address) == str(self.host.address))

    @property
    def has_room(self) -> bool:
        return self.usable and (self.limit <= 0 or self.sequence < self.limit)


ROUTING_ONLY = "first-pass only routing due to -odqs, queue_smtp_domains or control=queue"


async def _routing_only(instance: Any, job: Any) -> bool:
    """Whether the transport only routes this time (Exim's "first-pass
    routing only"): the first pass of a ``-qq`` queue run, or, outside
    queue runs and unless forced, a domain in ``queue_smtp_domains``."""
    extra = job.extra
    if extra.get("first_pass"):
        return True
    domains = job.config.get("queue_smtp_domains") if job.config is not None else None
    if not domains or extra.get("queue_running") or extra.get("force"):
        return False
    try:
        text = await expand(job, str(domains))
        return await match_list(job.addresses[0].domain.lower(), text, "domain",
                                job.ctx) is not None
    except (ListDefer, ExpansionError):
        # Exim: a defer in the lookup does not hold SMTP deliveries up.
        return False


def _smtps(instance: Any) -> bool:
    """``protocol = smtps``: TLS from the start of the connection."""
    return str(instance.get("protocol") or "smtp").lower() == "smtps"


def _size_and_8bit(job: Any) -> tuple[int, bool, bytes | None]:
    """The message's size, whether its body has 8-bit bytes (for
    BODY=8BITMIME), and the body itself when it is at most CHUNK_SIZE bytes,
    so that the transaction sends it without reading the -D file again
    (blocking)."""
    size, body = read_spooled_body(job.message, job.data_path, CHUNK_SIZE)
    if body is not None:
        return size, not body.isascii(), body
    with open(job.data_path, "rb") as f:
        f.readline()
        while True:
            block = f.read(65536)
            if not block:
                return size, False, None
            if not block.isascii():
                return size, True, None


class _Attempt:
    """One job's walk through its host list."""

    def __init__(self, driver: SmtpTransport, instance: Any, job: Any, return_path: str,
                 headers: str | None, options: WriteOptions, size: int | None,
                 eight_bit: bool,
                 helo: str, interface: str | None, settings: ClientSettings,
                 body: bytes | None = None) -> None:
        self.instance, self.job = instance, job
        self.return_path = return_path
        self.headers, self.options = headers, options
        #: The -D file's body when _size_and_8bit kept it (small messages).
        self.body = body
        self.size, self.eight_bit = size, eight_bit
        self.helo, self.interface = helo, interface
        self.settings = settings
        extra = job.extra
        self.retry = extra.get("retry")
        self.force = bool(extra.get("force"))
        self.message = job.message
        self.hosts_skipped = False
        self.addresses: list[DeliveryAddress] = list(job.addresses)
        #: Host retry items, for the delivery process to apply.
        self.retry_items: list[RetryItem] = job.extra.setdefault("retry_items", [])
        self._clean = False
        self._parked = False
        self._more_hosts = False

    def _retry_port_string(self, port: int) -> str:
        text = "" if port == 25 else f":{port}"
        if self.interface:
            text += f"/{self.interface}"
        return text

    async def run(self, hosts: list[Host], default_port: int,
                  addresses: list[DeliveryAddress]) -> Outcome | None:
        """Try *hosts* in order for *addresses*: None when a transaction
        gave each address its result, else the outcome for them all."""
        job = self.job
        self.addresses = addresses
        last: Outcome | None = None
        max_try = int(self.instance.get("hosts_max_try") or 0)
        hard_limit = int(self.instance.get("hosts_max_try_hardlimit") or 0)
        unexpired_tried = total_tried = 0
        index = 0
        while index < len(hosts):
            host = hosts[index]
            index += 1
            if total_tried and (unexpired_tried >= max_try or total_tried >= hard_limit):
                # Exim's hosts_max_try: the rest wait for the next attempt.
                break
            port = host.port or default_port
            if host.address is None:
                last = defer(f"host lookup for {host.name} did not complete",
                             C.ERRNO_UNKNOWNERROR)
                continue
            shown = Host(host.name, host.address, port if port != 25 else host.port,
                         host.mx, host.dnssec)
            include_ip = bool(self.instance.get("retry_include_ip_address", True))
            key_string = self._retry_port_string(port)
            if self.retry is not None:
                status = await self.retry.check_host(
                    addresses[0].domain.lower(), host.name, host.address,
                    port_string=key_string, include_ip=include_ip,
                    message_id=job.message_id, received_time=self.message.received[0],
                    sender=self.message.sender, force=self.force, ctx=job.ctx)
                expired = status.expired
                if not status.usable:
                    self.hosts_skipped = True
                    job.extra["hosts_skipped"] = True
                    if last is None:
                        last = defer("retry time not reached for any host for "
                                     f"'{addresses[0].domain.lower()}'", ERRNO_HRETRY)
                    continue
            else:
                expired = False
            key = (f"T:{host.name.lower()}:{host.address}{key_string}" if include_ip
                   else f"T:{host.name.lower()}{key_string}")
            total_tried += 1
            if not expired:
                unexpired_tried += 1
                if unexpired_tried >= max_try:
                    # Exim: a later host with another MX value still gets
                    # its turn, the ones between are passed over.
                    later = next((i for i in range(index, len(hosts))
                                  if hosts[i].mx != host.mx), None)
                    if later is not None:
                        index = later
                        unexpired_tried -= 1
            self._more_hosts = index < len(hosts)
            done, outcome = await self._try_host(shown, port)
            if not done and outcome is not None and outcome.errno == ERRNO_TLSFAILURE \
                    and self.instance.get("tls_tempfail_tryclear", True) \
                    and not _smtps(self.instance) \
                    and not await self._host_in("hosts_require_tls", shown):
                # Exim closes the connection (its state is unknown) and tries
                # the same host in clear on a new one.
                if self.job.log is not None:
                    self.job.log.write(
                        f"{outcome.message}: delivering unencrypted to H={host.name} "
                        f"[{host.address}] (not in hosts_require_tls)", ("main",),
                        job.message_id)
                for address in addresses:
                    for k in TLS_EXTRA_KEYS:
                        address.extra.pop(k, None)
                done, outcome = await self._try_host(shown, port, suppress_tls=True)
            if done:
                self.retry_items.append(RetryItem(key, host=True, delete=True))
                later = [a for a in self.addresses
                         if a.status == DEFERRED and a.basic_errno == C.ERRNO_RCPT4XX]
                if not (later and self._more_hosts):
                    return None
                # Exim: a RCPT 4xx defers the address at this host only; it
                # is logged and tried at the next one.
                for address in later:
                    self._log_host_error(host, port, Outcome(C.DEFER, address.message, 0))
                    address.status, address.host_used = PENDING, None
                self.addresses = addresses = later
                last = None
                continue
            if outcome is not None:
                if outcome.errno != ERRNO_TLSFAILURE:
                    # Exim's write_logs() is skipped for TLS failures.
                    self._log_host_error(host, port, outcome)
                self.retry_items.append(RetryItem(key, basic_errno=outcome.errno,
                                                  more_errno=outcome.more_errno,
                                                  message=outcome.message, host=True))
                await self._host_defer_event(addresses[0], host, port, outcome)
            last = outcome
        if last is None:
            last = defer("all hosts have been failing", C.ERRNO_UNKNOWNERROR)
        if last.status == C.DEFER and int(self.instance.get("connection_max_messages")
                                          or 0) != 1:
            # Exim's transport_update_waiting(): the message waits for these
            # hosts, and a delivery that reaches one of them will hand on
            # its connection (twisted_mta/queue/waiting.py).
            job.extra.setdefault("waiting_hosts", []).extend(h.name for h in hosts)
        return last

    async def defer_event(self, outcome: Outcome | None) -> None:
        """``msg:defer`` when the last host tried deferred the message
        (Exim's deferred_event_raise()); the delivery then raises none of
        its own (``job.extra["defer_events"]``)."""
        if outcome is None or outcome.status != C.DEFER:
            return
        host = outcome.extra.get("last_host")
        first = self.addresses[0]
        if not isinstance(host, Host) or not transport_action(self.instance):
            return
        job = self.job
        job.extra["defer_events"] = True
        await deferred_event(job.ctx, job.config, "msg:defer", first, host, log=job.log,
                             message_id=job.message_id)

    async def _rcpt_defer_events(self, address: DeliveryAddress, host: Host) -> None:
        """``msg:rcpt:host:defer`` for a RCPT 4xx, and ``msg:rcpt:defer``
        too at the last host (Exim's sync_responses()), with
        ``$event_defer_errno`` the more_errno (the code's digits << 8)."""
        if not transport_action(self.instance):
            return
        job = self.job
        names = ["msg:rcpt:host:defer"] + ([] if self._more_hosts else ["msg:rcpt:defer"])
        for name in names:
            await deferred_event(job.ctx, job.config, name, address, host, log=job.log,
                                 message_id=job.message_id, defer_errno=address.more_errno)

    async def _host_defer_event(self, first: DeliveryAddress, host: Host, port: int,
                                outcome: Outcome) -> None:
        """``msg:host:defer`` for a host that deferred (Exim's
        deferred_event_raise() in the host loop), with the host's error on
        the first address while it runs."""
        if outcome.status != C.DEFER or not transport_action(self.instance):
            return
        job = self.job
        saved = first.message, first.basic_errno, first.host_used
        first.message, first.basic_errno = outcome.message, outcome.errno
        first.host_used = Host(host.name, host.address, port, host.mx, host.dnssec)
        try:
            await deferred_event(job.ctx, job.config, "msg:host:defer", first,
                                 first.host_used, log=job.log, message_id=job.message_id)
        finally:
            first.message, first.basic_errno, first.host_used = saved

    def _log_host_error(self, host: Host, port: int, outcome: Outcome) -> None:
        """Exim's write_logs(): a line for each host that deferred,
        ``H=name [ip] Connection refused`` or ``H=name [ip]: message``."""
        log = self.job.log
        if log is None:
            return
        text = f"H={host.name} [{host.address}]"
        if "outgoing_port" in getattr(log, "selectors", frozenset()):
            text += f":{port}"
        if outcome.message:
            text += f": {outcome.message}"
            if outcome.errno > 0:
                text += f": {os.strerror(outcome.errno)}"
        elif outcome.errno == ERRNO_EVENT:
            text += " Event requests alternate response"   # Exim's exim_errstr()
        elif outcome.errno > 0:
            text += f" {os.strerror(outcome.errno)}"
        log.write(text, ("main",), self.job.message_id)

    async def _host_in(self, option: str, host: Host) -> bool:
        """Whether *host* is in the transport's host-list *option*
        (Exim's verify_check_given_host; unset: no)."""
        text = self.instance.get(option)
        if text is None:
            return False
        try:
            expanded = await expand(self.job, str(text))
            found = await match_list(str(host.address), expanded, "host", self.job.ctx,
                                     host=HostIdentity(str(host.address), host.name))
        except (ListDefer, ExpansionError):
            return False
        return found is not None

    async def _tls_options(self, host: Host) -> ClientTLSOptions | Outcome:
        job, get = self.job, self.instance.get
        values: dict[str, str | None] = {}
        for option in ("tls_verify_certificates", "tls_sni", "tls_certificate",
                       "tls_privatekey", "tls_require_ciphers", "tls_crl"):
            raw = get(option)
            try:
                values[option] = await expand(job, str(raw)) if raw is not None else None
            except ExpansionError as e:
                return Outcome(C.DEFER, f"TLS session: failed to expand {option}: "
                               f"{e.message}", ERRNO_TLSFAILURE, _more_errno(host),
                               extra={"last_host": host})
        if await self._host_in("tls_verify_hosts", host):
            verify = "require"
        elif await self._host_in("tls_try_verify_hosts", host):
            verify = "try"
        else:
            verify = "none"
        check = host.name if verify != "none" and \
            await self._host_in("tls_verify_cert_hostnames", host) else None
        if await self._host_in("hosts_require_ocsp", host):
            ocsp = "require"
        elif await self._host_in("hosts_request_ocsp", host):
            ocsp = "request"
        else:
            ocsp = "none"
        return ClientTLSOptions(
            verify_certificates=values["tls_verify_certificates"] or "system",
            verify=verify, check_hostnames=check, sni=values["tls_sni"] or None,
            certificate=values["tls_certificate"] or None,
            privatekey=values["tls_privatekey"] or None,
            require_ciphers=values["tls_require_ciphers"] or None,
            crl=values["tls_crl"] or None, ocsp=ocsp)

    async def _starttls(self, client: SMTPClient, host: Host,
                        suppress_tls: bool) -> Outcome | None:
        """STARTTLS when offered and wanted, then EHLO again; None to go on
        with the transaction (encrypted or in clear), else the host's
        outcome.  Raises SMTPClientError for a broken dialogue."""
        require = await self._host_in("hosts_require_tls", host)
        offered = client.offers("STARTTLS")
        if offered and not suppress_tls and not await self._host_in("hosts_avoid_tls", host):
            result = await self._start_tls(client, host, starttls=True)
            if isinstance(result, Outcome):
                return result
            if result is None:
                await self._hello(client, host)
                return None
            if result.digit == "4" and not self.instance.get("tls_tempfail_tryclear", True):
                raise client.error_reply(result, "STARTTLS")
        if require:
            what = "an attempt to start TLS failed" if offered \
                else "the server did not offer TLS support"
            await client.quit()
            return Outcome(C.DEFER, f"a TLS session is required, but {what}",
                           ERRNO_TLSREQUIRED, _more_errno(host), extra={"last_host": host})
        return None

    async def _hello(self, client: SMTPClient, host: Host) -> None:
        """EHLO (HELO when refused), and the ``smtp:ehlo`` event with the
        EHLO reply's lines, refused or not (its result is ignored, as in
        Exim, which raises it before any HELO)."""
        esmtp = not await self._host_in("hosts_avoid_esmtp", host)
        try:
            hello = await client.hello(self.helo, esmtp=esmtp)
        finally:
            if client.ehlo_reply is not None:
                await self._connection_event("smtp:ehlo", "\n".join(client.ehlo_reply.lines))
        for address in self.addresses:
            address.extra[HELO_RESPONSE] = hello.text

    async def _start_tls(self, client: SMTPClient, host: Host,
                         starttls: bool) -> Outcome | Reply | None:
        """A TLS session on *client*: after a STARTTLS command, or at once
        (``protocol = smtps``).  None when it is up (``$tls_out_*`` set and
        the addresses told); the host's outcome when it failed; the
        STARTTLS reply when that was not a 2xx."""
        def failed(text: str) -> Outcome:
            return Outcome(C.DEFER, f"TLS session: {text}", ERRNO_TLSFAILURE,
                           _more_errno(host), extra={"last_host": host})

        options = await self._tls_options(host)
        if isinstance(options, Outcome):
            return options
        clock = self.job.clock
        try:
            creator = ClientTLS(options, now=lambda: datetime.datetime.fromtimestamp(
                clock.seconds(), datetime.UTC))
        except TLSConfigError as e:
            # Exim reads its files in tls_client_start(), after STARTTLS.
            return failed(str(e))
        session = creator.session
        try:
            if starttls:
                reply = await client.starttls(creator, session.handshake_done)
                if reply.digit != "2":
                    return reply
            else:
                await client.handshake(creator, session.handshake_done)
        except TLSHandshakeError as e:
            self._log_verify_errors(host, session.verify_errors)
            self._log_ocsp(session)
            # The host's defer event sees the stapling verdict, as in Exim.
            self.job.ctx.variables["tls_out_ocsp"] = str(session.ocsp_status)
            return failed(e.text or handshake_error_text(e.reason))
        self._log_ocsp(session)
        if await self._tls_cert_events(host, session) and options.verify == "require":
            # Exim's verify callback fails the handshake here.
            return failed("(SSL_connect): error:0A000086:SSL routines::certificate verify "
                          "failed")
        self._log_verify_errors(host, session.verify_errors)
        variables = tls_out_variables(session)
        self.job.ctx.variables.update(variables)
        for address in self.addresses:
            address.extra["tls_cipher"] = variables["tls_out_cipher"]
            address.extra["tls_cv"] = variables["tls_out_certificate_verified"] == "1"
            address.extra["tls_peerdn"] = variables["tls_out_peerdn"]
        return None

    def _log_ocsp(self, session: Any) -> None:
        """The stapling verdict's lines (Exim writes them from its status
        callback, before the delivery's own lines)."""
        if self.job.log is not None:
            for text in session.ocsp_log:
                self.job.log.write(text, ("main",), self.job.message_id)

    async def _tls_cert_events(self, host: Host, session: Any) -> bool:
        """``tls:cert`` for each certificate of the server's chain, from
        the top (``$event_data`` the depth, ``$tls_out_peercert`` the
        certificate), raised once the handshake is done (Exim raises it in
        its verify callback).  A non-empty result is logged and marks the
        session unverified; True when one was refused."""
        connection = session.connection
        if not transport_action(self.instance) or connection is None:
            return False
        chain = connection.get_verified_chain() or connection.get_peer_cert_chain() or []
        variables = self.job.ctx.variables
        certs = variables.setdefault("__certs__", {})
        refused = False
        required = session.options.verify == "require"
        for depth in range(len(chain) - 1, -1, -1):
            cert = chain[depth].to_cryptography()
            certs["tls_out_peercert"] = cert
            result = await self._connection_event("tls:cert", str(depth))
            if result:
                refused = True
                session.verify_failed = True
                if self.job.log is not None:
                    self.job.log.write(
                        f"[{host.address}] SSL verify denied by event-action: depth={depth} "
                        f"cert={_oneline(cert.subject)}: {result}", ("main",),
                        self.job.message_id)
                if required:
                    # Exim's verify callback fails the handshake right there.
                    break
        return refused

    def _log_verify_errors(self, host: Host, errors: list[str]) -> None:
        log = self.job.log
        if log is None:
            return
        for text in errors:
            log.write(f"[{host.address}] {text}", ("main",), self.job.message_id)

    async def _try_host(self, host: Host, port: int,
                        suppress_tls: bool = False) -> tuple[bool, Outcome | None]:
        """(True, None) when a transaction took place (the addresses have
        their results); (False, outcome) to go on to the next host."""
        job = self.job
        continued = job.extra.get("continued")
        if isinstance(continued, ContinuedConnection) and \
                continued.serves(self.instance.name, host, port):
            return await self._continue(continued, host)
        variables = job.ctx.variables
        for k in ("proxy_session", "proxy_local_address", "proxy_local_port",
                  "proxy_external_address", "proxy_external_port"):
            variables.pop(k, None)
        for address in self.addresses:
            address.extra.pop("proxy", None)
        self._host_variables(host, port)
        failed = Outcome(C.DEFER, None, E.ECONNREFUSED, _more_errno(host),
                         extra={"last_host": host})
        proxies = await self._socks_proxies()
        if isinstance(proxies, Outcome):
            failed.errno = proxies.errno
            return False, failed
        timeout = float(self.instance.get("connect_timeout"))
        try:
            if proxies:
                client, session = await connect_socks(
                    job.reactor, job.clock, proxies, str(host.address), port,
                    timeout=timeout, interface=self.interface, settings=self.settings,
                    log=_SocksLog(job), tcp_connect_event=self._proxy_event(host, port))
                self._host_variables(host, port)
                variables.update({
                    "proxy_session": "yes",
                    "proxy_local_address": session.proxy_local_address,
                    "proxy_local_port": str(session.proxy_local_port),
                    "proxy_external_address": session.proxy_external_address,
                    "proxy_external_port": str(session.proxy_external_port)})
                for address in self.addresses:
                    address.extra["proxy"] = (session.proxy_local_address,
                                              session.proxy_local_port)
            else:
                if await self._connection_event("tcp:connect"):
                    failed.errno = ERRNO_EVENT
                    return False, failed
                client = await connect(job.reactor, job.clock, str(host.address), port,
                                       timeout=timeout, interface=self.interface,
                                       settings=self.settings)
        except ConnectError as e:
            failed.errno = e.errno
            return False, failed
        self._parked = False
        try:
            return await self._dialogue(client, host, port, suppress_tls)
        finally:
            if not self._parked:
                client.close()
                self._host_variables(host, port)
                await self._connection_event("tcp:close")

    def _host_variables(self, host: Host, port: int) -> None:
        """``$host``, ``$host_address``, ``$host_port`` during a connection
        (Exim's deliver_host*), as its connection events see them."""
        variables = self.job.ctx.variables
        variables["host"] = host.name
        variables["host_address"] = str(host.address)
        variables["host_port"] = str(port)

    async def _connection_event(self, name: str, data: str | None = None) -> str | None:
        """A connection event with the transport's action (see
        twisted_mta/events.py): its non-empty result, or None."""
        if not transport_action(self.instance):
            return None
        return await transport_event(self.job.ctx, self.instance, name, data,
                                     log=self.job.log, message_id=self.job.message_id)

    def _proxy_event(self, host: Host, port: int) -> Any:
        """The SOCKS endpoint's ``tcp:connect`` hook: the event with
        ``$host_address``/``$host_port`` set to the proxy, as in Exim."""
        async def hook(proxy: Any) -> str | None:
            variables = self.job.ctx.variables
            variables["host_address"] = proxy.host
            variables["host_port"] = str(proxy.port)
            try:
                return await self._connection_event("tcp:connect")
            finally:
                self._host_variables(host, port)
        return hook

    async def _socks_proxies(self) -> list[Any] | Outcome:
        """The expanded ``socks_proxy`` (``[]``: connect directly); a
        failed expansion is logged and defers the host."""
        raw = self.instance.get("socks_proxy")
        if not raw:
            return []
        try:
            text = await expand(self.job, str(raw))
            return parse_socks_proxy(text)
        except (ExpansionError, SOCKSConfigError):
            if self.job.log is not None:
                self.job.log.write(f"Bad expansion for socks_proxy in {self.instance.name}",
                                   ("main", "panic"), self.job.message_id)
            return Outcome(C.DEFER, None, C.ERRNO_EXPANDFAIL)

    async def _dialogue(self, client: SMTPClient, host: Host, port: int,
                        suppress_tls: bool = False) -> tuple[bool, Outcome | None]:
        job = self.job
        addresses = self.addresses
        if _smtps(self.instance):
            # TLS on connect: a failed handshake is never retried in clear.
            started = await self._start_tls(client, host, starttls=False)
            if isinstance(started, Outcome):
                return False, started
        try:
            greeting = await client.greeting()
            for address in addresses:
                address.extra[SMTP_GREETING] = greeting.text
            forced = await self._connection_event("smtp:connect", greeting.text)
            if forced:
                await client.quit()
                return False, Outcome(C.DEFER, "deferred by smtp:connect event expansion: "
                                      f"{forced}", C.ERRNO_EXPANDFAIL, _more_errno(host),
                                      extra={"last_host": host})
            await self._hello(client, host)
            tls_outcome = None if _smtps(self.instance) else \
                await self._starttls(client, host, suppress_tls)
            if tls_outcome is not None:
                return False, tls_outcome
        except SMTPClientError as e:
            if client.greeting_reply is not None:
                for address in addresses:
                    address.extra[SMTP_GREETING] = client.greeting_reply.text
            if e.send_quit:
                await client.quit()
            return False, self._error_outcome(e, host)
        for address in addresses:
            address.extra.pop(AUTHENTICATOR, None)
        try:
            auth_outcome = await self._auth(client, host)
        except SMTPClientError as e:
            if e.send_quit:
                await client.quit()
            return False, self._error_outcome(e, host)
        if isinstance(auth_outcome, Outcome):
            await client.quit()
            return False, auth_outcome
        done, outcome = await self._transaction(client, host, auth_outcome)
        if self._clean:
            connection = await self._parkable(client, host, port, auth_outcome)
            if connection is None:
                await client.quit()
            else:
                job.extra["parked"] = connection
        return done, outcome

    async def _transaction(self, client: SMTPClient, host: Host,
                           auth_outcome: str | None) -> tuple[bool, Outcome | None]:
        """MAIL, RCPT, DATA or BDAT on a connection that is set up; as
        _dialogue's result.  ``self._clean`` tells whether the message went
        through with nothing left to reset (the connection could carry
        another), in which case QUIT is left to the caller."""
        job = self.job
        addresses = self.addresses
        self._clean = False
        # SMTPUTF8 (Exim checks it once the connection is set up, after AUTH):
        # ask for it, or downconvert the envelope to A-labels, or fail.
        smtputf8 = downconvert = False
        if self.message.smtputf8:
            mode = await _utf8_downconvert_mode(job, self.instance, self.message)
            if isinstance(mode, Outcome):
                await client.quit()
                return False, mode
            if mode == 0 and not client.offers("SMTPUTF8"):
                await client.quit()
                return False, Outcome(C.FAIL, "utf8 support required but not offered for "
                                      "forwarding", ERRNO_UTF8_FWD, _more_errno(host),
                                      extra={"last_host": host})
            smtputf8 = mode != 1 and client.offers("SMTPUTF8")
            downconvert = not smtputf8
        include = bool(self.instance.get("rcpt_include_affixes"))
        recipients = [rcpt_address(a, include) for a in addresses]
        dsn_offered = client.offers("DSN")
        mail_params, rcpt_params = _dsn_params(job, addresses, dsn_offered)
        mail_auth = await self._mail_auth(auth_outcome)
        if isinstance(mail_auth, Outcome):
            await client.quit()
            return False, mail_auth
        mail_params += mail_auth
        sender = self.return_path
        if downconvert:
            try:
                sender = _address_to_alabel(sender)
                recipients = [_address_to_alabel(r) for r in recipients]
            except UnicodeError as e:
                await client.quit()
                return False, Outcome(C.DEFER, str(e), C.ERRNO_EXPANDFAIL)
        for address in addresses:
            address.extra[DSN_AWARE] = dsn_offered
        prdr = client.offers("PRDR") and await self._host_in("hosts_try_prdr", host)
        chunks = None
        data = None
        if client.offers("CHUNKING") and await self._host_in("hosts_try_chunking", host):
            chunks = await _bdat_chunks(job, self.headers, self.options, self.body)
        else:
            data = _chunks(job, MessageStream(self.headers, job.data_path, self.options,
                                              wireformat=bool(job.message.wireformat),
                                              body=self.body))
        client.pipelining = not await self._host_in("hosts_avoid_pipelining", host)
        result = await client.transaction(sender, recipients, data, size=self.size,
                                          eight_bit=self.eight_bit, prdr=prdr,
                                          smtputf8=smtputf8, mail_params=mail_params,
                                          rcpt_params=rcpt_params, chunks=chunks)
        accepted: list[DeliveryAddress] = []
        for address, recipient, reply in zip(addresses, recipients,
                                             result.rcpt_replies + [None] * len(addresses),
                                             strict=False):
            if reply is None:
                continue
            if reply.digit == "2":
                accepted.append(address)
                continue
            message = (f"SMTP error from remote mail server after RCPT TO:<{recipient}>: "
                       f"{reply.text}")
            address.extra[PASS_MESSAGE] = True
            if reply.digit == "5":
                address.fail(message, host=host)
            else:
                address.defer(message, errno=C.ERRNO_RCPT4XX,
                              more_errno=_more_errno(host, reply.code), host=host)
                await self._rcpt_defer_events(address, host)
                key = f"R:{address.address}"
                if self.instance.get("address_retry_include_sender", True):
                    key += f":<{self.message.sender}>"
                address.extra.setdefault("retry_items", []).append(
                    RetryItem(key, basic_errno=C.ERRNO_RCPT4XX,
                              more_errno=address.more_errno, message=message))
        error = result.error
        if result.prdr:
            self._prdr_results(result, addresses, accepted, host)
            accepted = [a for a in accepted if a.status == PENDING]
        if error is not None:
            pending = [a for a in addresses if a.status == PENDING]
            if result.prdr and error.reply is not None and error.reply.digit == "5":
                # Exim: an overall 5xx after PRDR fails the recipients the
                # per-recipient replies had deferred or failed too.
                for address in addresses:
                    if address.extra.get(_PRDR_RESULT) == "" and address.status != PENDING:
                        address.status = PENDING
                        pending.append(address)
            if not result.rcpt_replies:
                # MAIL failed or the dialogue broke before any RCPT reply.
                if error.send_quit:
                    await client.quit()
                outcome = self._error_outcome(error, host, C.ERRNO_MAIL4XX)
                if outcome.status == C.FAIL:
                    for address in pending:
                        address.extra[PASS_MESSAGE] = True
                        address.fail(outcome.message or "", host=host)
                    return True, None
                return False, outcome
            outcome = self._error_outcome(error, host, C.ERRNO_DATA4XX)
            for address in pending:
                if error.reply is not None:
                    address.extra[PASS_MESSAGE] = True
                if outcome.status == C.FAIL:
                    address.fail(outcome.message or "", host=host)
                else:
                    address.defer(outcome.message or "", errno=outcome.errno,
                                  more_errno=outcome.more_errno, host=host)
            for address in addresses:
                address.extra.pop(_PRDR_RESULT, None)
            if error.send_quit:
                await client.quit()
            return True, None
        if result.data_reply is not None:
            # string_printing(): a multi-line reply (Exim's to BDAT LAST is
            # "250- <n> byte chunk, total <n>" and "250 OK id=...") keeps its
            # lines apart with a literal backslash-n.
            confirmation = _printing(result.data_reply)
            for address in accepted:
                if result.prdr:
                    # The recipient's reply and the overall one, joined with a
                    # literal backslash-n as Exim does.
                    confirmation = (address.extra.pop(_PRDR_RESULT, "") + "\\n"
                                    + _printing(result.data_reply))
                    address.extra.setdefault("flags", []).append("PRDR")
                if client.pipelining and client.offers("PIPELINING"):
                    address.extra.setdefault("flags", []).append("L")
                if result.chunking:
                    address.extra.setdefault("flags", []).append("K")
                address.succeed(confirmation, host=host)
        for address in addresses:
            address.extra.pop(_PRDR_RESULT, None)
        self._clean = result.data_reply is not None and result.data_reply.positive
        if not self._clean:
            await client.quit()
        return True, None

    async def _parkable(self, client: SMTPClient, host: Host, port: int,
                        auth_outcome: str | None) -> ContinuedConnection | None:
        """The connection, kept open for messages waiting for *host*
        (doc/smtp-transport.md, "Several messages per connection"), or
        None to QUIT now: nothing waits, the delivery process does not hand
        connections on, or connection_max_messages is 1."""
        wants = self.job.extra.get("hand_on")
        limit = int(self.instance.get("connection_max_messages") or 0)
        if wants is None or limit == 1 or not wants(self.instance.name, host):
            return None
        first = self.addresses[0]
        variables = self.job.ctx.variables
        self._parked = True

        async def close() -> None:
            try:
                await client.quit()
            finally:
                client.close()
                self._host_variables(host, port)
                await self._connection_event("tcp:close")
        return ContinuedConnection(
            transport=self.instance.name, host=host, port=port, client=client,
            address_extra={k: first.extra[k] for k in _CONNECTION_EXTRA if k in first.extra},
            variables={k: v for k, v in variables.items()
                       if k.startswith(("tls_out_", "proxy_"))},
            auth=auth_outcome, limit=limit, close=close)

    async def _continue(self, connection: ContinuedConnection,
                        host: Host) -> tuple[bool, Outcome | None]:
        """Send this message down a connection another delivery handed on
        (Exim's continued transport): no greeting, EHLO, TLS or AUTH; the
        addresses get what that connection's set-up gave, and ``*`` in
        their log lines."""
        self._host_variables(host, connection.port)
        self.job.ctx.variables.update(connection.variables)
        for address in self.addresses:
            address.extra.update(connection.address_extra)
            address.extra[CONTINUED] = True
        try:
            done, outcome = await self._transaction(connection.client, host, connection.auth)
        except SMTPClientError as e:
            done, outcome = False, self._error_outcome(e, host)
        connection.usable = self._clean
        return done, outcome

    async def _auth(self, client: SMTPClient, host: Host) -> str | Outcome | None:
        """Exim's smtp_auth(): when the server offers AUTH and the host is
        in ``hosts_require_auth`` or ``hosts_try_auth``, try each client
        authenticator (``plaintext`` with ``client_send``, its
        ``client_condition`` true) whose public name is on offer, in
        configuration order.  The authenticator's name on success (also
        put on the addresses for ``A=``), None to go on unauthenticated,
        or the host's outcome (authentication required but not done, or
        an authenticator's internal problem)."""
        job = self.job
        require = await self._host_in("hosts_require_auth", host)
        reason = "server did not advertise AUTH support"
        offered = client.extensions.get("AUTH") if client.esmtp else None
        if offered is not None and \
                (require or await self._host_in("hosts_try_auth", host)):
            reason = "no common mechanisms were found"
            names = [n.upper() for n in offered.split()]
            for auth in getattr(job.config, "authenticators", []):
                send = auth.get("client_send") if auth.driver == "plaintext" else None
                if send is None:
                    continue
                condition = auth.get("client_condition")
                if condition is not None and not await expand_check_condition(
                        str(condition), job.ctx, auth.name):
                    continue
                public = str(auth.get("public_name") or auth.name)
                if public.upper() not in names:
                    continue
                reason = "authentication attempt(s) failed"
                items: list[bytes] = []
                try:
                    for item in split_list(str(send)):
                        items.append(_nul_escapes(await expand(job, item)))
                except ForcedFailure:
                    continue
                except ExpansionError as e:
                    return Outcome(C.DEFER, f'expansion of "{send}" failed in {auth.name} '
                                   f"authenticator: {e.message}", ERRNO_AUTHPROB,
                                   _more_errno(host), extra={"last_host": host})
                if not items:
                    continue
                result, reply = await client.auth(public, items)
                if result == "ok":
                    for address in self.addresses:
                        address.extra[AUTHENTICATOR] = auth.name
                    return str(auth.name)
                if result == "error":
                    return Outcome(C.DEFER, "Too few items in client_send in "
                                   f"{auth.name} authenticator", ERRNO_AUTHPROB,
                                   _more_errno(host), extra={"last_host": host})
                if reply is not None and reply.digit == "5":
                    if job.log is not None:
                        job.log.write(f"{auth.name} authenticator failed H={host.name} "
                                      f"[{host.address}] {reply.lines[-1]}", ("main",),
                                      job.message_id)
                    continue
                if reply is not None:
                    raise client.error_reply(reply)
        if require:
            return Outcome(C.DEFER, f"authentication required but {reason}",
                           ERRNO_AUTHFAIL, _more_errno(host), extra={"last_host": host})
        return None

    async def _mail_auth(self, authenticated: str | Outcome | None) -> str | Outcome:
        """Exim's smtp_mail_auth_str(): `` AUTH=<xtext>`` for MAIL with
        ``authenticated_sender`` once authenticated (or with
        ``authenticated_sender_force``); a forced failure or an empty
        result sends none."""
        raw = self.instance.get("authenticated_sender")
        if raw is None or not (authenticated or self.instance.get("authenticated_sender_force")):
            return ""
        try:
            value = await expand(self.job, str(raw))
        except ForcedFailure:
            return ""
        except ExpansionError as e:
            return Outcome(C.DEFER, f"failed to expand authenticated_sender: {e.message}",
                           C.ERRNO_EXPANDFAIL)
        return f" AUTH={xtext_encode(value)}" if value else ""

    def _prdr_results(self, result: Any, addresses: list[DeliveryAddress],
                      accepted: list[DeliveryAddress], host: Host) -> None:
        """Apply the per-recipient replies after PRDR's 353 (Exim's
        ``PRDR error after DATA: ...``, or ``BDAT <n> LAST`` with CHUNKING; a deferral has errno 0 and an
        address retry record).  The reply of a recipient that got a 2xx is
        kept (under _PRDR_RESULT) for its confirmation."""
        replies = dict(zip(map(id, addresses), result.prdr_replies, strict=False))
        for address in accepted:
            reply = replies.get(id(address))
            if reply is None:
                continue
            if reply.digit == "2":
                address.extra[_PRDR_RESULT] = _printing(reply)
                continue
            message = f"PRDR error after {result.data_command}: {_printing(reply)}"
            address.extra[PASS_MESSAGE] = True
            address.extra[_PRDR_RESULT] = ""
            if reply.digit == "5":
                address.fail(message, host=host)
                continue
            address.defer(message, errno=0, more_errno=_more_errno(host, reply.code),
                          host=host)
            key = f"R:{address.address}"
            if self.instance.get("address_retry_include_sender", True):
                key += f":<{self.message.sender}>"
            address.extra.setdefault("retry_items", []).append(
                RetryItem(key, basic_errno=0, more_errno=address.more_errno,
                          message=message))

    def _error_outcome(self, error: SMTPClientError, host: Host,
                       errno_4xx: int = 0) -> Outcome:
        more = _more_errno(host)
        number = error.errno
        if error.reply is not None:
            if error.reply.digit == "5":
                return Outcome(C.FAIL, error.message, 0, more, extra={"last_host": host})
            number = errno_4xx
            more = _more_errno(host, error.reply.code)
        elif number == E.ETIMEDOUT:
            number = E.ETIMEDOUT
        return Outcome(C.DEFER, error.message, number, more, extra={"last_host": host})


class _SocksLog:
    """The SOCKS client's log (main and panic lines) on the job's log."""

    def __init__(self, job: Any) -> None:
        self.job = job

    def main(self, text: str) -> None:
        if self.job.log is not None:
            self.job.log.write(text, ("main",), self.job.message_id)

    def panic(self, text: str) -> None:
        if self.job.log is not None:
            self.job.log.write(text, ("main", "panic"), self.job.message_id)


def _nul_escapes(text: str) -> bytes:
    """Exim's client_send escapes: ``^`` is a NUL, ``^^`` a ``^``."""
    out = bytearray()
    i = 0
    data = text.encode("latin-1", "replace") if not isinstance(text, bytes) else text
    while i < len(data):
        if data[i] == 0x5E:
            if data[i + 1:i + 2] == b"^":
                out.append(0x5E)
                i += 2
                continue
            out.append(0)
        else:
            out.append(data[i])
        i += 1
    return bytes(out)


def _printing(reply: Any) -> str:
    """A reply as Exim's string_printing() shows it: the lines joined with
    a literal backslash-n."""
    return "\\n".join(reply.lines)


def _dsn_params(job: Any, addresses: list[DeliveryAddress],
                offered: bool) -> tuple[str, list[str]]:
    """The DSN parameters for MAIL (`` RET=... ENVID=...``) and each RCPT
    (`` NOTIFY=... ORCPT=...``), as Exim's build_mailcmd_options() and
    build_rcptcmd_options(): only to a next hop that offers DSN, none for
    an address whose router has ``dsn_lasthop`` (and no RET/ENVID when
    every address has it); ENVID and ORCPT are passed on as they were
    received (still xtext); the NOTIFY keywords are rebuilt in the order
    NEVER, SUCCESS, FAILURE, DELAY."""
    if not offered:
        return "", [""] * len(addresses)
    data = [dsn_data(a, job.config) for a in addresses]
    mail = ""
    message = job.message
    if not all(flags & DSN_LASTHOP for flags, _ in data):
        if message.dsn_ret == DSN_RET_HDRS:
            mail += " RET=HDRS"
        elif message.dsn_ret == DSN_RET_FULL:
            mail += " RET=FULL"
        if message.dsn_envid:
            mail += f" ENVID={message.dsn_envid}"
    rcpts: list[str] = []
    for flags, orcpt in data:
        text = ""
        if not flags & DSN_LASTHOP:
            names = [name for bit, name in _NOTIFY_NAMES if flags & bit]
            if names:
                text += " NOTIFY=" + ",".join(names)
            if orcpt:
                text += f" ORCPT={orcpt}"
        rcpts.append(text)
    return mail, rcpts


def _apply(outcome: Outcome | None, addresses: list[DeliveryAddress]) -> None:
    """Put a whole-job outcome on the addresses still without a result."""
    if outcome is None:
        return
    pending = [a for a in addresses if a.status == PENDING]
    outcome.apply(pending)
    last = outcome.extra.get("last_host")
    for address in pending:
        address.extra.pop("last_host", None)
        if isinstance(last, Host) and outcome.message:
            address.host_used = last


def _more_errno(host: Host, code: int | None = None) -> int:
    value = ord("M") if host.mx >= 0 else ord("A")
    if code is not None:
        value |= (code % 100) << 8
    return value


async def _chunks(job: Any, stream: MessageStream) -> Any:
    it = iter(stream)
    if stream.body is not None:
        # Nothing to read: no trip to the thread pool.
        for chunk in it:
            yield chunk
        return
    while True:
        chunk = await next_chunk(job, it)
        if chunk is None:
            return
        yield chunk




#: Exim's ERRNO_UTF8_FWD (macros.h): the message needs SMTPUTF8, the host
#: does not offer it and downconversion is not allowed.
ERRNO_UTF8_FWD = -49


async def _utf8_downconvert_mode(job: Any, instance: Any, message: Any) -> int | Outcome:
    """For a message received with SMTPUTF8: 1 to downconvert the envelope
    to A-labels, -1 to do so only when the host does not offer SMTPUTF8,
    0 never (Exim's utf8_downcvt/utf8_downcvt_maybe).  The message's
    value (ACL ``control = utf8_downconvert``) is overridden by the
    transport's ``utf8_downconvert`` when that expands to 1, 0 or -1."""
    mode = int(message.utf8_downconvert)
    raw = instance.get("utf8_downconvert")
    if raw is None:
        return mode
    try:
        value = await expand(job, str(raw))
    except ExpansionError as e:
        return Outcome(C.DEFER, f"failed to expand utf8_downconvert: {e.message}",
                       C.ERRNO_EXPANDFAIL)
    # Exim looks at the first character only ("-" needs a "1" after it).
    if value.startswith("1"):
        return 1
    if value.startswith("0"):
        return 0
    if value.startswith("-1"):
        return -1
    return mode


def _address_to_alabel(address: str) -> str:
    """Exim's string_address_utf8_to_alabel(): a non-ASCII local part
    becomes ``xn--`` and its Punycode, a non-ASCII domain its IDNA
    (UTS #46, non-transitional, as libidn2's lookup) A-labels.  Raises
    UnicodeError when either cannot be converted."""
    # Spool addresses are their bytes decoded as Latin-1: UTF-8 underneath.
    local, at, domain = address.encode("latin-1").decode("utf-8").partition("@")
    if not local.isascii():
        local = "xn--" + local.encode("punycode").decode("ascii")
    if at and not domain.isascii():
        try:
            domain = idna.encode(domain, uts46=True).decode("ascii")
        except idna.IDNAError as e:
            raise UnicodeError(str(e)) from None
    return f"{local}{at}{domain}"


async def _bdat_chunks(job: Any, headers: str | None, options: WriteOptions,
                       spooled: bytes | None = None) -> list[Any]:
    """The message as BDAT chunks (see twisted_mta.smtp.client.bdat_chunks):
    what DATA would send but without dot-stuffing or the final dot, as
    Exim clears check_string and topt_end_dot for CHUNKING.  The body's
    size must be known before it is sent: it is measured by producing it
    once (exact whatever the line-ending conversion), in the thread pool
    unless *spooled*, the -D file's body already read, is given."""
    plain = replace(options, check_string=None, escape_string=None, end_dot=False)
    wireformat = bool(job.message.wireformat)
    head = b"".join(MessageStream(headers, job.data_path, replace(plain, no_body=True),
                                  wireformat=wireformat))

    def body() -> MessageStream:
        return MessageStream(None, job.data_path, plain, wireformat=wireformat, body=spooled)

    if spooled is not None:
        size = sum(len(chunk) for chunk in body())
    else:
        size = await C.run_blocking(job, lambda: sum(len(chunk) for chunk in body()))
    return bdat_chunks(head, _chunks(job, body()), size)

