"""The exim-py daemon: the twistd plugin's options and the service tree.

L{MTAService} owns what every connection shares (log, spool, message-id
allocator, thread pool, resolver, ratelimit hints, TLS) and one listener
per interface and port from ``local_interfaces`` and
``daemon_smtp_ports`` (``-oX`` overrides them).  ``twistd -n exim-py`` and
``exim-py -bd`` run exactly this service.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping
from datetime import datetime
from typing import Any

from twisted.application import service
from twisted.application.service import IServiceMaker
from twisted.internet import protocol
from twisted.plugin import IPlugin
from twisted.python import usage
from zope.interface import implementer

from twisted_mta import EXIM_COMPAT_VERSION
from twisted_mta.cli import DEFAULT_CONFIG
from twisted_mta.manhole import ManholeError, ManholeOptionsMixin, manhole_service
from twisted_mta.values import list_separator, parse_port, split_list, split_list_with

DEFAULT_INTERFACES = "<; 0.0.0.0 ; ::0"


class Options(ManholeOptionsMixin, usage.Options):
    optParameters = [
        ["config", "C", DEFAULT_CONFIG, "The Exim configuration file to run."],
        ["ports", "X", None, "Override daemon_smtp_ports/local_interfaces (as -oX)."],
        ["queue-interval", "q", None, "Start a queue run this often (as -q30m)."],
        ["delivery-workers", "W", None, "Processes that deliver (default: one fewer than "
         "the CPUs, at least one; 0: deliver in the daemon's own process)."],
    ]

    def __init__(self) -> None:
        super().__init__()
        self["defines"] = {}

    def opt_D(self, text: str) -> None:
        """Define a macro, NAME=value, overriding the configuration file."""
        name, _, value = text.partition("=")
        self["defines"][name.strip()] = value.strip()


def _port_number(text: str) -> int:
    port = parse_port(text)
    if port is None:
        raise ValueError(f'TCP port "{text.strip()}" is not defined')
    return port


def listening_addresses(config: Any, override: str | None = None) -> list[tuple[str, int]]:
    """(address, port) pairs to listen on.

    ``local_interfaces`` items may carry their own port (``ip.port`` or
    ``[ip]:port``); the others get every port of ``daemon_smtp_ports``.
    *override* is ``-oX``: a port list, or an interface list when it
    contains dots or colons other than list separators."""
    ports_text = config.get("daemon_smtp_ports") or "smtp"
    interfaces_text = config.get("local_interfaces") or DEFAULT_INTERFACES
    if override:
        if all(c.isdigit() or c in ": ," for c in override):
            ports_text = override.replace(",", ":")
        else:
            interfaces_text = override
    ports = [_port_number(p) for p in split_list(ports_text)]
    sep, rest = list_separator(interfaces_text)
    found: list[tuple[str, int]] = []
    for item in split_list_with(rest, sep):
        address, port = _interface_item(item)
        for p in [port] if port is not None else ports:
            if (address, p) not in found:
                found.append((address, p))
    return found


def describe_listeners(listeners: list[tuple[str, int, bool]]) -> str:
    """The "listening for ..." part of Exim's start-up line: plain SMTP
    sockets, then "and for SMTPS on" the tls_on_connect ones; ports of one
    address merged as ``[ip]:{25,587}``, wildcards as ``port 25 (IPv4)``,
    at most ten sockets named per kind."""
    v6_wildcards, v4_wildcards = ("::", "::0"), ("", "0.0.0.0")
    text = []
    for tls in (False, True):
        kind = [(a, p) for a, p, t in listeners if t == tls]
        if not kind:
            continue
        text.append(("and for SMTPS on" if text else "SMTPS on") if tls else "SMTP on")
        items: list[list] = []  # [address, ports, label]
        skip = False
        for index, (address, port) in enumerate(kind[:10]):
            if skip:
                skip = False
                continue
            following = kind[index + 1] if index + 1 < len(kind) else None
            if address in v6_wildcards + v4_wildcards and following \
                    and following[1] == port and following[0] in v6_wildcards + v4_wildcards \
                    and (address in v6_wildcards) != (following[0] in v6_wildcards):
                items.append([None, [port], f"port {port} (IPv6 and IPv4)"])
                skip = True
            elif address in v6_wildcards:
                items.append([None, [port], f"port {port} (IPv6 with IPv4)"])
            elif address in v4_wildcards:
                items.append([None, [port], f"port {port} (IPv4)"])
            else:
                earlier = next((item for item in items if item[0] == address), None)
                if earlier:
                    earlier[1].append(port)
                else:
                    items.append([address, [port], None])
        for address, ports, label in items:
            if label:
                text.append(label)
            elif len(ports) == 1:
                text.append(f"[{address}]:{ports[0]}")
            else:
                text.append(f"[{address}]:{{{','.join(map(str, ports))}}}")
        if len(kind) > 10:
            text.append("...")
    return " ".join(text)


def _interface_item(item: str) -> tuple[str, int | None]:
    from twisted_mta.lists import ip_version

    item = item.strip()
    if item.startswith("[") and "]" in item:
        address, _, rest = item[1:].partition("]")
        port = rest.lstrip(":.")
        return address, int(port) if port.isdigit() else None
    if ip_version(item):
        return item, None
    head, _, tail = item.rpartition(".")
    if tail.isdigit() and ip_version(head):
        return head, int(tail)
    raise ValueError(f'malformed IP address "{item}" in local_interfaces')


class SMTPFactory(protocol.ServerFactory):
    """Builds an ESMTP session per connection, applying Exim's connection
    limits (smtp_accept_max, smtp_accept_max_per_host, smtp_accept_queue)."""

    def __init__(self, mta: MTAService, tls_on_connect: bool = False) -> None:
        self.mta = mta
        self.tls_on_connect = tls_on_connect

    def buildProtocol(self, addr: Any) -> protocol.Protocol:
        from twisted_mta.smtp.server import ESMTPServer

        mta = self.mta
        peer = (addr.host, addr.port)
        refusal = mta.connection_refusal(addr.host, addr.port)
        if refusal is not None:
            return _Refuse(refusal, mta, addr.host)
        server = ESMTPServer(mta.settings, peer=peer, local=None,
                             tls_on_connect=self.tls_on_connect)
        server.factory = self
        mta.connection_opened(server)
        return server


class _Refuse(protocol.Protocol):
    """Says 421 and hangs up (too many connections)."""

    def __init__(self, text: str, mta: MTAService, address: str) -> None:
        self.text = text
        self.mta = mta
        self.address = address

    def connectionMade(self) -> None:
        self.transport.write(f"421 {self.text}\r\n".encode())
        self.transport.loseConnection()


class MTAService(service.MultiService):
    """The daemon: the configuration, the listeners, and (as they land)
    the queue runner and the manhole as child services."""

    def __init__(self, config: Any, reactor: Any = None, ports: str | None = None,
                 queue_interval: int | None = None,
                 options: Mapping[str, Any] | None = None,
                 delivery_workers: int = 0) -> None:
        super().__init__()
        self.config = config
        #: Worker processes that deliver (twisted_mta/queue/workers.py); 0:
        #: deliver in this process.
        self.delivery_workers = delivery_workers
        self.reactor = reactor
        self.ports_override = ports
        self.queue_interval = queue_interval
        self.queue_runner: Any = None
        self.spool: Any = None
        self.sessions: set[Any] = set()
        manhole = manhole_service(config, options, self.manhole_namespace, reactor,
                                  log=lambda: self.settings.log if self.settings else None)
        if manhole is not None:
            manhole.setServiceParent(self)
        self.listeners: list[Any] = []
        self.connections: dict[str, int] = {}
        self.total_connections = 0
        self.settings: Any = None
        self.threadpool: Any = None

    def manhole_namespace(self) -> dict[str, Any]:
        """What the manhole's Python prompt starts with."""
        return {"service": self, "config": self.config, "spool": self.spool,
                "settings": self.settings, "sessions": self.sessions,
                "queue": self.queue_runner,
                "workers": getattr(self.queue_runner, "workers", None)}

    # -- connection accounting -----------------------------------------------

    def connection_refusal(self, address: str, port: int) -> str | None:
        """The 421 text for a connection over smtp_accept_max or
        smtp_accept_max_per_host (Exim names no host in it), or None."""
        config = self.config
        limit = config.get("smtp_accept_max", 20)
        if limit and self.total_connections >= limit:
            self.settings.log.write(f"Connection from {self._whofrom(address, port)} refused: "
                                    f"too many connections", targets=("main",))
            return "Too many concurrent SMTP connections; please try again later."
        per_host = config.get("smtp_accept_max_per_host")
        if per_host:
            try:
                per_host_limit = int(per_host)
            except ValueError:
                per_host_limit = 0
            if per_host_limit and self.connections.get(address, 0) >= per_host_limit:
                self.settings.log.write(
                    f"Connection from {self._whofrom(address, port)} refused: too many "
                    f"connections from that IP address", targets=("main",))
                return ("Too many concurrent SMTP connections from this IP "
                        "address; please try again later.")
        return None

    def _whofrom(self, address: str, port: int) -> str:
        from twisted_mta.log import sender_fullhost

        return sender_fullhost(None, None, address, port,
                               with_port="incoming_port" in self.settings.log.selectors)

    def connection_opened(self, server: Any) -> None:
        address = server.sender_host_address
        self.connections[address] = self.connections.get(address, 0) + 1
        self.total_connections += 1
        server.connection_count = self.total_connections
        self.sessions.add(server)
        queue_over = self.config.get("smtp_accept_queue", 0)
        if queue_over and self.total_connections > queue_over:
            server.queue_only = True
        original = server.connectionLost

        def lost(reason: Any = None) -> None:
            self.sessions.discard(server)
            self.total_connections -= 1
            remaining = self.connections.get(address, 1) - 1
            if remaining:
                self.connections[address] = remaining
            else:
                self.connections.pop(address, None)
            original(reason)

        server.connectionLost = lost

    # -- start and stop ---------------------------------------------------------

    def _build_settings(self) -> None:
        from twisted.python.threadpool import ThreadPool

        from twisted_mta.acl.ratelimit import RatelimitStore
        from twisted_mta.dns import Resolver
        from twisted_mta.log import EximLog, ThreadLogWriter
        from twisted_mta.smtp.server import ConnectionSettings
        from twisted_mta.spool.ids import MessageIdAllocator
        from twisted_mta.spool.store import Spool

        config = self.config
        reactor = self.reactor
        spool_directory = config.get("spool_directory") or "./exim-py-spool"
        self.threadpool = ThreadPool(minthreads=1, maxthreads=64, name="exim-py")
        self.threadpool.start()
        log = EximLog.from_config(config, reactor, os.getpid(),
                                  ThreadLogWriter(reactor.callFromThread))
        spool = Spool(spool_directory, split=bool(config.get("split_spool_directory")))
        self.spool = spool
        self.settings = ConnectionSettings(
            config, reactor=reactor, clock=reactor, log=log, spool=spool,
            id_allocator=MessageIdAllocator(reactor.seconds, os.getpid(),
                                            config.get("localhost_number")),
            resolver=Resolver(reactor, self.threadpool), threadpool=self.threadpool,
            ratelimit_store=RatelimitStore(os.path.join(spool_directory, "db", "ratelimit"),
                                           run_io=self.threadpool.callInThread),
            tls=_server_tls(config))
        self._build_queue_runner()

    def _build_queue_runner(self) -> None:
        from twisted_mta.queue.deliver import DeliverySettings
        from twisted_mta.queue.retry import RetryRules, open_retry_database
        from twisted_mta.queue.runner import QueueRunner
        from twisted_mta.queue.waiting import WaitingDatabase

        settings = self.settings
        delivery = DeliverySettings(self.config, settings.spool, settings.log, self.reactor,
                                    self.reactor, threadpool=self.threadpool,
                                    resolver=settings.resolver,
                                    id_allocator=settings.id_allocator,
                                    retry=open_retry_database(
                                        settings.spool.directory, RetryRules(self.config),
                                        run_io=self.threadpool.callInThread,
                                        clock=self.reactor),
                                    waiting=WaitingDatabase(
                                        settings.spool.directory,
                                        run_io=self.threadpool.callInThread,
                                        transports=[t.name for t in self.config.transports
                                                    if t.driver == "smtp"]))
        workers = None
        if self.delivery_workers:
            from twisted_mta.queue.workers import DeliveryWorkers

            # Before the runner: stopped after it, once its deliveries end.
            workers = DeliveryWorkers(self.config, self.delivery_workers, self.reactor)
            workers.setServiceParent(self)
        self.queue_runner = QueueRunner(delivery, interval=self.queue_interval,
                                        workers=workers)
        self.queue_runner.setServiceParent(self)
        settings.on_message = self.queue_runner.deliver_now

    def _queue_info(self) -> str:
        if not self.queue_interval:
            return "no queue runs"
        from twisted_mta.values import format_time

        return f"-q{format_time(self.queue_interval)}"

    def startService(self) -> None:
        from twisted_mta.spool.recovery import recover

        if self.reactor is None:
            from twisted.internet import reactor

            self.reactor = reactor
        self._build_settings()
        report = recover(self.spool)
        for path in report.removed:
            self.settings.log.write(f"removed unfinished spool file {path}", targets=("main",))
        tls_ports = {_port_number(p) for p in split_list(
            self.config.get("tls_on_connect_ports") or "")}
        listening = []
        described = []
        for address, port in listening_addresses(self.config, self.ports_override):
            factory = SMTPFactory(self, tls_on_connect=port in tls_ports)
            try:
                listener = self.reactor.listenTCP(port, factory, interface=address)
            except Exception as e:
                # A dual-stack wildcard socket already covers the other one.
                wildcards = {"::0", "::", "0.0.0.0"}
                if address in wildcards and any(a in wildcards and p == port
                                                for a, p in listening):
                    described.append((address, port, port in tls_ports))
                    continue
                self.settings.log.write(f"socket bind() to port {port} for address "
                                        f"{address} failed: {e}: daemon abandoned",
                                        targets=("main", "panic"))
                raise
            self.listeners.append(listener)
            host = listener.getHost()
            listening.append((address, host.port))
            described.append((address, host.port, port in tls_ports))
        self.listening = listening
        self.settings.log.write(
            f"exim {EXIM_COMPAT_VERSION} daemon started: pid={os.getpid()}, {self._queue_info()}, "
            f"listening for {describe_listeners(described)}", targets=("main",))
        super().startService()

    def stopService(self) -> Any:
        from twisted.internet import defer

        stopping = [defer.maybeDeferred(listener.stopListening) for listener in self.listeners]
        self.listeners = []
        result = defer.gatherResults(stopping + [defer.maybeDeferred(
            super().stopService)])

        def finish(_: Any) -> Any:
            if self.settings is not None:
                self.settings.log.close()
            if self.threadpool is not None:
                self.threadpool.stop()
            return _

        return result.addBoth(finish)


def _server_tls(config: Any) -> Any:
    """The STARTTLS context source (a self-signed certificate stands in
    when tls_certificate is unset, as in Exim)."""
    from twisted_mta.smtp.tlsserver import SessionTLS

    return SessionTLS(config)


@implementer(IServiceMaker, IPlugin)
class ServiceMaker:
    tapname = "exim-py"
    description = "A mail transfer agent configured in Exim's language."
    options = Options

    def makeService(self, options: Options) -> service.IService:
        config = load_or_exit(options["config"], options["defines"])
        try:
            return MTAService(config, ports=options["ports"],
                              queue_interval=parse_queue_interval(options["queue-interval"]),
                              options=options,
                              delivery_workers=parse_worker_count(options["delivery-workers"]))
        except ManholeError as e:
            sys.stderr.write(f"exim-py: {e}\n")
            raise SystemExit(1) from None


def parse_worker_count(text: str | None) -> int:
    """``--delivery-workers``: a count, or the default for this machine."""
    from twisted_mta.queue.workers import default_worker_count

    if text is None:
        return default_worker_count()
    if not text.strip().isdigit():
        raise usage.UsageError(f'bad number of delivery workers: "{text}"')
    return int(text)


def parse_queue_interval(text: str | None) -> int | None:
    """``30m`` (or ``-q30m``'s tail) to seconds; None when not given."""
    from twisted_mta.values import parse_time

    if not text:
        return None
    seconds = parse_time(text.removeprefix("-q"))
    if seconds is None or seconds <= 0:
        raise usage.UsageError(f'bad time value for the queue interval: "{text}"')
    return seconds


def load_or_exit(path: str, defines: dict[str, str] | None) -> Any:
    from twisted_mta.config import ConfigError, load_config

    try:
        return load_config(path, defines=defines or None)
    except ConfigError as e:
        sys.stderr.write(e.format(datetime.now()) + "\n")
        raise SystemExit(1) from None


def run_daemon(config: Any, ports: str | None = None, pid_file: str | None = None,
               queue_interval: int | None = None, delivery_workers: str | None = None) -> int:
    """``exim-py -bd [-q30m]``: the same service as the twistd plugin, in
    the foreground."""
    from twisted.internet import reactor

    try:
        mta = MTAService(config, reactor=reactor, ports=ports, queue_interval=queue_interval,
                         delivery_workers=parse_worker_count(delivery_workers))
    except ManholeError as e:
        sys.stderr.write(f"exim-py: {e}\n")
        return 1
    if pid_file:
        with open(pid_file, "w") as f:
            f.write(f"{os.getpid()}\n")
    reactor.callWhenRunning(mta.startService)
    reactor.addSystemEventTrigger("before", "shutdown", mta.stopService)
    reactor.run()
    return 0
