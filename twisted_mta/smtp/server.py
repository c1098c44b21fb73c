"""The inbound ESMTP server: Exim 4.96's ``smtp_in.c`` on Twisted.

L{ESMTPServer} extends C{twisted.mail.smtp.ESMTP} for its timeout
handling and transport plumbing but owns everything on the wire: input
framing, the verb table, MAIL/RCPT/DATA/BDAT, STARTTLS, AUTH, replies and
the Received header.  Stock ESMTP drops ESMTP parameters, reorders
pipelined replies when a validator returns a Deferred, answers a
pipelined QUIT before the message's 250, keeps plaintext pipelined after
STARTTLS and crashes building its Received header on Python 3; none of
that code runs here.

Each command is an ``async def``; while one is pending (an ACL waiting for
DNS, a delay, the spool fsync) no further input is processed, so replies
always go out in command order.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from twisted.internet import defer, error, threads
from twisted.internet.interfaces import IHalfCloseableProtocol, IHandshakeListener
from twisted.mail import smtp
from twisted.python import log as twisted_log
from zope.interface import implementer

from twisted_mta.acl.engine import run_acl
from twisted_mta.expand.errors import ExpansionError
from twisted_mta.lists import HostIdentity, ListDefer, match_list
from twisted_mta.smtp.message import DataReader, IncomingMessage
from twisted_mta.smtp.replies import format_reply, printing, split_user_code
from twisted_mta.smtp.session import Recipient, SmtpAclSession, Transaction
from twisted_mta.values import format_time

MAX_COMMAND_LINE = 16384
READ_BUFFER_HIGH_WATER = 1 << 20

# Commands Exim recognises by prefix; (name, takes an argument, is a mail command).
_COMMANDS = (
    ("rset", False, False), ("helo", True, False), ("ehlo", True, False),
    ("auth", True, True), ("starttls", False, False),
    ("mail from:", True, True), ("rcpt to:", True, True), ("data", False, True),
    ("bdat", True, True), ("quit", False, True), ("noop", True, False),
    ("etrn", True, False), ("vrfy", True, False), ("expn", True, False),
    ("help", True, False),
)
# Commands that must wait for their reply (Exim's sync commands); MAIL,
# RCPT and RSET join them when PIPELINING was not advertised.
_SYNC = frozenset(("helo", "ehlo", "data", "vrfy", "expn", "noop", "etrn", "starttls"))
_PIPELINABLE = frozenset(("mail from:", "rcpt to:", "rset"))

_ACL_WHERE = {  # where -> (option, default, reply code, log name)
    "connect": ("acl_smtp_connect", "accept", "550", "connection"),
    "helo": ("acl_smtp_helo", "accept", "550", "EHLO or HELO"),
    "mail": ("acl_smtp_mail", "accept", "550", "MAIL"),
    "rcpt": ("acl_smtp_rcpt", "deny", "550", "RCPT"),
    "predata": ("acl_smtp_predata", "accept", "550", "PREDATA"),
    "mime": ("acl_smtp_mime", "accept", "550", "MIME"),
    "data": ("acl_smtp_data", "accept", "550", "DATA"),
    "prdr": ("acl_smtp_data_prdr", "accept", "550", "PRDR"),
    "vrfy": ("acl_smtp_vrfy", "deny", "252", "VRFY"),
    "expn": ("acl_smtp_expn", "deny", "550", "EXPN"),
    "etrn": ("acl_smtp_etrn", "deny", "458", "ETRN"),
    "starttls": ("acl_smtp_starttls", "accept", "550", "STARTTLS"),
    "auth": ("acl_smtp_auth", "accept", "503", "AUTH"),
    "quit": ("acl_smtp_quit", "accept", "221", "QUIT"),
    "notquit": ("acl_smtp_notquit", "accept", "0", "NOTQUIT"),
}


def _identify(text: str) -> tuple[str, bool, bool]:
    """The command *text* starts with: (name, takes an argument, is a mail
    command); name is empty for an unknown command."""
    lower = text.lower()
    for name, has_arg, is_mail in _COMMANDS:
        if lower.startswith(name) and (name.endswith(":") or len(text) == len(name)
                                       or text[len(name)] == " "):
            return name, has_arg, is_mail
    return "", False, False


class ConnectionSettings:
    """Per-daemon things every connection needs."""

    def __init__(self, config: Any, *, reactor: Any, clock: Any, log: Any,
                 spool: Any = None, id_allocator: Any = None, resolver: Any = None,
                 threadpool: Any = None, ratelimit_store: Any = None,
                 tls: Any = None, host_checking: bool = False,
                 trace: Callable[[str], None] | None = None,
                 on_message: Callable[[str], None] | None = None) -> None:
        self.config = config
        self.reactor = reactor
        self.clock = clock
        self.log = log
        self.spool = spool
        self.id_allocator = id_allocator
        self.resolver = resolver
        self.threadpool = threadpool
        self.ratelimit_store = ratelimit_store
        self.tls = tls
        self.host_checking = host_checking
        self.trace = trace
        self.on_message = on_message


@implementer(IHandshakeListener, IHalfCloseableProtocol)
class ESMTPServer(smtp.ESMTP):
    """One inbound SMTP connection."""

    def __init__(self, settings: ConnectionSettings, *, peer: tuple[str, int] | None,
                 local: tuple[str, int] | None, tls_on_connect: bool = False) -> None:
        smtp.ESMTP.__init__(self)
        from twisted_mta.expand.context import ExpansionContext

        self.settings = settings
        self.config = settings.config
        self.clock = settings.clock
        # TimeoutMixin schedules through self.callLater: use the injected clock.
        self.callLater = settings.clock.callLater
        self.host_checking = settings.host_checking
        self.resolver = settings.resolver
        self.ratelimit_store = settings.ratelimit_store
        self.ratelimit_conn_state: dict = {}
        self.ratelimit_cmd_state: dict = {}
        self.dnslist_cache: dict = {}
        self.tls_on_connect = tls_on_connect
        self.ctx = ExpansionContext(config=self.config, reactor=settings.reactor,
                                    threadpool=settings.threadpool, resolver=settings.resolver)
        self.vars = self.ctx.variables
        self.acl_session = SmtpAclSession(self)
        self.ctx.acl_session = self.acl_session
        self.peer = peer
        self.local = local
        self.host_identity: HostIdentity | None = None
        self._set_host(peer)
        if local is not None:
            self.vars["interface_address"] = self.vars["received_ip_address"] = local[0]
            self.vars["interface_port"] = self.vars["received_port"] = str(local[1])
        self.transaction = Transaction()
        self.helo: str | None = None
        self.esmtp = False
        self.advertised: set[str] = set()
        self.pipelining_allowed = True
        self.enforce_sync = bool(self.config.get("smtp_enforce_sync", True))
        self.no_multiline = False
        self.unknown_count = 0
        self.synprot_count = 0
        self.nonmail_count = 0
        self.mail_count = 0
        self.proxy_failed = False
        self.authenticated: str | None = None
        self.closed = False
        self._buffer = b""
        self._busy = False
        self._reader: DataReader | None = None
        self._bdat_remaining = 0
        self._bdat_last = False
        self._mode = "command"
        self._eof = False
        self._history: list[str] = []
        self._last_was_rcpt = False
        self._quit_requested = False
        self._auth_wait: defer.Deferred | None = None
        self._last_chunk_size = 0
        self._chunked_total = 0
        self.last_message_id: str | None = None
        self.authenticators: list[Any] = []
        self.auth_mechanisms: list[str] = []
        self.auth_defer_text = ""
        self.pending_prdr_logs: list[str] = []
        self.prdr_results: list[str] = []
        self.all_recipients: list[Recipient] = []
        self.pipelining_used = False
        self.chunking_used = False
        self.helo_accept_junk = False
        self.pipe_connect_acceptable = False
        self.reject_targets: tuple[str, ...] = ("main", "reject")
        # Set by the daemon: this connection's place in its count, and
        # whether smtp_accept_queue leaves its messages on the queue.
        self.connection_count = 0
        self.queue_only = False
        self.log_connections = False
        self.early_pipe_advertised = False
        self.early_pipe_used = False
        self._proxy_leftover = 0
        self._handshake_pending = False
        self.sender_unqualified = False
        self.recipient_unqualified = False
        self.utf8_domains = False
        self._data_started = 0.0
        self._connected_at = settings.clock.seconds()

    # -- identity ---------------------------------------------------------------

    def _set_host(self, peer: tuple[str, int] | None) -> None:
        if peer is None:
            self.vars.pop("sender_host_address", None)
            self.host_identity = None
            return
        address, port = peer
        self.vars["sender_host_address"] = address
        self.vars["sender_host_port"] = str(port)
        lookup_host = self.config.get("host_lookup")
        self.host_identity = HostIdentity(address, None if lookup_host else "")
        if not lookup_host:
            # Without host_lookup Exim matches host names only after a lookup
            # that a name item forces; HostIdentity(name=None) does that.
            self.host_identity = HostIdentity(address)

    @property
    def sender_host_address(self) -> str:
        return self.vars.get("sender_host_address", "")

    def authenticated_public_name(self) -> str | None:
        for authenticator in self.authenticators:
            if authenticator.name == self.authenticated:
                return authenticator.public_name
        return None

    def _host_texts(self) -> tuple[str, str]:
        """($sender_fullhost, $sender_rcvhost) for the client as now known."""
        from twisted_mta.log import received_host_text, sender_fullhost

        address = self.sender_host_address
        if not address:
            return "", ""
        name = self.vars.get("sender_host_name") or None
        port = int(self.vars.get("sender_host_port") or 0)
        ident = self.vars.get("sender_ident") or None
        with_port = "incoming_port" in self.selector()
        return (sender_fullhost(name, self.helo, address, port, with_port=with_port,
                                ident=ident),
                received_host_text(name, self.helo, address, port, with_port=with_port,
                                   ident=ident))

    def sender_fullhost(self) -> str:
        return self._host_texts()[0]

    def host_and_ident(self, flag: bool) -> str:
        from twisted_mta.log import host_and_ident

        full = self.sender_fullhost()
        interface = self.local if "incoming_interface" in self.selector() else None
        return host_and_ident(full or None, self.vars.get("sender_ident") or None,
                              use_flag=flag, interface=interface)

    def _update_host_variables(self) -> None:
        fullhost, rcvhost = self._host_texts()
        for name, value in (("sender_fullhost", fullhost), ("sender_rcvhost", rcvhost)):
            if value:
                self.vars[name] = value
            else:
                self.vars.pop(name, None)

    def selector(self) -> frozenset[str]:
        log = self.settings.log
        return getattr(log, "selectors", frozenset())

    # -- output -----------------------------------------------------------------

    def trace(self, text: str) -> None:
        if self.settings.trace is not None:
            self.settings.trace(f">>> {text}")

    def log_write(self, text: str, targets: tuple[str, ...] = ("main",),
                  message_id: str | None = None) -> None:
        log = self.settings.log
        if log is not None:
            # Exim keeps the last message's id for the rest of the session,
            # and every log line shows it.
            log.write(text, targets, message_id or self.last_message_id)

    def log_flushed(self) -> defer.Deferred:
        """Fires once every line logged so far is in its file."""
        log = self.settings.log
        return log.when_flushed() if log is not None else defer.succeed(None)

    def send(self, data: bytes) -> None:
        if not self.closed and self.transport is not None:
            self.transport.write(data)

    def reply(self, code: str, text: str) -> None:
        if self.no_multiline and "\n" in text.rstrip("\n"):
            text = text.split("\n", 1)[0]
        self.send(format_reply(code, text))

    def user_reply(self, default_code: str, message: str, check: bool = True) -> None:
        code, text, valid = split_user_code(default_code, message, check)
        if not valid:
            self.log_write(f'configured error code starts with incorrect digit (expected '
                           f'{default_code[0]}) in "{message}"', ("main", "panic"))
        self.reply(code, text)

    def close_connection(self) -> None:
        self.closed = True
        self._mode = "closed"
        self.setTimeout(None)
        if self.transport is not None:
            self.transport.loseConnection()

    # -- connection start ---------------------------------------------------------

    def connectionMade(self) -> None:
        self.setTimeout(self._receive_timeout())
        if self.local is None and not self.host_checking:
            host = self.transport.getHost()
            if hasattr(host, "host") and hasattr(host, "port"):
                self.local = (host.host, host.port)
                self.vars["interface_address"] = self.vars["received_ip_address"] = host.host
                self.vars["interface_port"] = self.vars["received_port"] = str(host.port)
        self._update_host_variables()
        self._run(self._start())

    def _receive_timeout(self) -> int | None:
        value = self.config.get("smtp_receive_timeout", 300)
        return None if self.host_checking or not value else int(value)

    def timeoutConnection(self) -> None:
        self._run(self._timed_out())

    async def _timed_out(self) -> None:
        tls = " TLS" if self.vars.get("tls_in_cipher") else ""
        hostname = self.active_hostname()
        if self._mode in ("data", "bdat"):
            if "lost_incoming_connection" in self.selector():
                self.log_write(f"SMTP data timeout (message abandoned) on connection from "
                               f"{self.sender_fullhost() or 'local process'} "
                               f"F=<{self.transaction.sender or ''}>")
            reason, text = "data-timeout", f"{hostname} SMTP incoming data timeout - " \
                                           f"closing connection."
        else:
            if "lost_incoming_connection" in self.selector():
                self.log_write(f"SMTP command timeout on{tls} connection from "
                               f"{self.host_and_ident(False)}")
            reason, text = "command-timeout", f"{hostname}: SMTP command timeout - " \
                                              f"closing connection"
        await self._notquit(reason)
        self.reply("421", text)
        self.close_connection()

    def active_hostname(self) -> str:
        return self.vars.get("smtp_active_hostname") or self.config.get("primary_hostname")

    async def _start(self) -> None:
        nolog = await self.host_in("hosts_connection_nolog")
        self.log_connections = "smtp_connection" in self.selector() and not nolog
        if self.log_connections and self.connection_count:
            self.log_write(f"SMTP connection from {self._whofrom()} "
                           f"(TCP/IP connection count = {self.connection_count})")
        if await self.host_in("host_lookup"):
            await self._look_up_host_name()
        if await self.host_in("host_reject_connection"):
            if "connection_reject" in self.selector():
                self.log_write(f"refused connection from {self.host_and_ident(False)} "
                               f"(host_reject_connection)", ("main", "reject"))
            self.send(b"554 SMTP service not available\r\n")
            self.close_connection()
            return
        self.sender_unqualified = await self.host_in("sender_unqualified_hosts")
        self.recipient_unqualified = await self.host_in("recipient_unqualified_hosts")
        for option in ("helo_verify_hosts", "helo_try_verify_hosts"):
            await self.host_in(option)
        self.helo_accept_junk = await self.host_in("helo_accept_junk_hosts")
        if await self.host_in("hosts_proxy") or (
                self.config.get("proxy_required_hosts") is not None
                and await self.host_in("proxy_required_hosts")):
            await self._read_proxy_header()
        self.pipe_connect_acceptable = bool(self.sender_host_address) and \
            await self.host_in("pipelining_connect_advertise_hosts")
        if self.tls_on_connect and self.settings.tls is not None:
            if not await self._start_tls():
                self.close_connection()
                return
        outcome = await self.acl("connect")
        if outcome.verdict != "accept":
            self.acl_failed("connect", outcome, "")
            self.close_connection()
            return
        try:
            banner = await self.ctx.expand(self.config.get("smtp_banner"))
        except ExpansionError as e:
            self.log_write(f'Expansion of "{self.config.get("smtp_banner")}" (smtp_banner) '
                           f"failed: {e.message}", ("main", "panic"))
            self.reply("421", "Internal error")
            self.close_connection()
            return
        if outcome.user_message:
            banner = outcome.user_message
        await self._sync_check_banner()
        if not self.closed:
            self.reply("220", banner)

    async def _sync_check_banner(self) -> None:
        # Commands that came in the PROXY header's packet are let through,
        # as Exim 4.96 does.
        if len(self._buffer) <= self._proxy_leftover or not self._sync_enforced():
            return
        if self.pipe_connect_acceptable:
            self.early_pipe_used = True
        elif not self.proxy_failed:
            self.log_write(
                f"SMTP protocol synchronization error (input sent without waiting for "
                f"greeting): rejected connection from {self.host_and_ident(True)} "
                f'input="{printing(self._buffer[:128].decode("latin-1"))}"',
                ("main", "reject"))
            self.reply("554", "SMTP synchronization error")
            self.close_connection()

    async def _read_proxy_header(self) -> None:
        from twisted_mta.smtp.proxy import ProxyHeaderReader

        self.vars["proxy_session"] = "yes"
        reader = ProxyHeaderReader()
        waiting: defer.Deferred = defer.Deferred()
        timeout = self.config.get("proxy_protocol_timeout", 3) or 3
        timer = self.clock.callLater(timeout, lambda: waiting.called or waiting.callback(
            reader.timed_out()))
        self._proxy_reader = (reader, waiting)
        self._mode = "proxy"
        self._drain_proxy()
        result = await waiting
        if timer.active():
            timer.cancel()
        self._mode = "command"
        self._proxy_reader = None
        self._buffer = result.leftover + self._buffer
        self._proxy_leftover = len(result.leftover)
        if not result.ok:
            self.proxy_failed = True
            self.trace(f"PROXY negotiation failed: {result.error}")
            return
        self._apply_proxy(result)
        if result.source_address is not None:
            # Exim 4.96 looks the proxied client up whatever host_lookup
            # says and logs a failure, but does not use a name it finds.
            self.vars.pop("sender_host_name", None)
            await self._look_up_host_name(keep_name=False)

    async def _look_up_host_name(self, keep_name: bool = True) -> None:
        """Find the client's verified name, or say that there is none, as
        Exim does on connection when host_lookup matches."""
        identity = self.host_identity
        if identity is None:
            return
        try:
            names = await identity.names(self.ctx)
        except Exception:
            names = ()
        if names:
            if keep_name:
                self.vars["sender_host_name"] = names[0]
        else:
            self.vars["host_lookup_failed"] = "1"
            if "host_lookup_failed" in self.selector():
                self.log_write(f"no host name found for IP address {self.sender_host_address}")
        self._update_host_variables()

    def _drain_proxy(self) -> None:
        reader, waiting = self._proxy_reader
        if self._buffer and not waiting.called:
            data, self._buffer = self._buffer, b""
            result = reader.feed(data)
            if result is not None:
                waiting.callback(result)

    def _apply_proxy(self, result: Any) -> None:
        proxy_address = self.sender_host_address
        proxy_port = self.vars.get("sender_host_port", "")
        if result.source_address is None:
            # UNKNOWN and LOCAL headers keep the TCP peer; like Exim 4.96,
            # no proxy addresses are set for them.
            return
        self.vars["proxy_local_address"] = self.vars["proxy_host_address"] = proxy_address
        self.vars["proxy_local_port"] = self.vars["proxy_host_port"] = proxy_port
        self.vars["proxy_external_address"] = self.vars["proxy_target_address"] = \
            result.dest_address or ""
        self.vars["proxy_external_port"] = self.vars["proxy_target_port"] = \
            str(result.dest_port or "")
        # Beyond Exim: the v2 TLVs a proxy such as haproxy sends.
        for name, value in (("proxy_tlv_authority", result.authority),
                            ("proxy_tlv_unique_id", result.unique_id)):
            if value is not None:
                self.vars[name] = value
        for key, value in (result.ssl or {}).items():
            self.vars[f"proxy_tlv_ssl_{key}"] = value
        self._set_host((result.source_address, result.source_port or 0))
        self.vars.pop("sender_host_name", None)
        self._update_host_variables()

    # -- input ------------------------------------------------------------------

    def dataReceived(self, data: bytes) -> None:
        self.resetTimeout()
        self._buffer += data
        if self._mode == "proxy":
            self._drain_proxy()
            return
        self._pump()
        if len(self._buffer) > READ_BUFFER_HIGH_WATER and self.transport is not None:
            self.transport.pauseProducing()
            self._paused = True

    def _pump(self) -> None:
        if self._mode == "auth":
            # The AUTH command is busy waiting for exactly this input.
            self._feed_auth_line()
            return
        while not self._busy and not self.closed and self._buffer:
            if self._mode == "data":
                rest = self._reader.feed(self._buffer)
                if rest is None:
                    self._buffer = b""
                    return
                self._buffer = rest
                self._run(self._end_of_data())
                continue
            if self._mode == "bdat":
                take = min(self._bdat_remaining, len(self._buffer))
                chunk, self._buffer = self._buffer[:take], self._buffer[take:]
                self._bdat_remaining -= take
                if self._bdat_remaining == 0:
                    self._reader.feed_chunk(chunk, self._bdat_last)
                    self._run(self._end_of_chunk())
                else:
                    self._reader.feed_chunk(chunk, False)
                continue
            if self._mode != "command":
                return
            nl = self._buffer.find(b"\n")
            if nl < 0 and len(self._buffer) <= MAX_COMMAND_LINE:
                return
            if nl < 0 or nl > MAX_COMMAND_LINE:
                # Exim reads at most this much as one command; the rest of
                # the line becomes the next one.
                line, self._buffer = self._buffer[:MAX_COMMAND_LINE], \
                    self._buffer[MAX_COMMAND_LINE:]
                self._run(self._command(line, overlong=True))
                continue
            line, self._buffer = self._buffer[:nl], self._buffer[nl + 1:]
            self._run(self._command(line))
        if not self._busy and getattr(self, "_paused", False) and self.transport is not None:
            self._paused = False
            self.transport.resumeProducing()
        if self._eof and not self._busy and not self.closed:
            self._run(self._input_lost())

    def readConnectionLost(self) -> None:
        """The client shut down its sending side (Exim does after a
        pipelined QUIT): answer what it sent, then close."""
        self.input_ended()

    def writeConnectionLost(self) -> None:
        self.close_connection()

    def input_ended(self) -> None:
        """The input stream ended (``-bh``, ``-bs``)."""
        self._eof = True
        self._pump()

    async def _input_lost(self, read_error: str = "") -> None:
        """EOF (or a read error) from the client, as Exim's EOF_CMD: only a
        lost transaction is worth a line by default."""
        self._buffer = b""
        if self._mode in ("data", "bdat"):
            self._log_lost_in_data(read_error)
            await self._notquit("connection-lost")
        else:
            self._incomplete_transaction_log("connection lost")
            await self._notquit("connection-lost")
            self.reply("421", f"{self.active_hostname()} lost input connection")
            self._log_lost_between_commands(read_error)
        self.close_connection()

    def _log_lost_in_data(self, read_error: str) -> None:
        if {"lost_incoming_connection", "smtp_connection"} & self.selector():
            self.log_write(f"{self._connection_info()} lost while reading message "
                           f"data{read_error}")

    def _log_lost_between_commands(self, read_error: str) -> None:
        txn = self.transaction
        if txn.sender is not None or txn.recipients:
            if not self.host_checking and "lost_incoming_connection" in self.selector():
                eof = "EOF" if not self.sender_host_address else "disconnection"
                self.log_write(f"unexpected {eof} while reading SMTP command from "
                               f"{self.host_and_ident(False)}{read_error} "
                               f"D={self._time_connected()}")
        elif self.log_connections:
            self.log_write(f"{self._connection_info()} lost{read_error} "
                           f"D={self._time_connected()}")

    def _time_connected(self) -> str:
        """string_timesince(smtp_connection_start)."""
        elapsed = max(0.0, self.clock.seconds() - self._connected_at)
        if elapsed >= 5 or "millisec" not in self.selector():
            return format_time(int(elapsed))
        return f"{elapsed:.3f}s"

    def _incomplete_transaction_log(self, what: str) -> None:
        txn = self.transaction
        if txn.sender is None or "smtp_incomplete_transaction" not in self.selector():
            return
        text = f"{self.host_and_ident(True)} incomplete transaction ({what}) from <{txn.sender}>"
        if txn.recipients:
            text += " for " + " ".join(r.address for r in txn.recipients)
        self.log_write(text)

    def _run(self, coroutine: Awaitable[Any]) -> None:
        """Run a command; hold input until it has replied."""
        self._busy = True
        d = defer.Deferred.fromCoroutine(coroutine)
        d.addErrback(self._internal_error)
        if d.called:
            self._busy = False
            return
        d.addBoth(self._resume)

    def _resume(self, _: Any) -> None:
        self._busy = False
        if not self.closed:
            self._pump()

    def _internal_error(self, failure: Any) -> None:
        twisted_log.err(failure, "exim-py: internal error in SMTP session")
        self.log_write(f"internal error in SMTP session from {self.host_and_ident(False)}: "
                       f"{failure.getErrorMessage()}", ("main", "panic"))
        if not self.closed:
            self.reply("421", f"{self.active_hostname()} Internal error - closing connection")
            self.close_connection()

    def connectionLost(self, reason: Any = None) -> None:
        self.setTimeout(None)
        was_closed = self.closed
        self.closed = True
        if self._auth_wait is not None and not self._auth_wait.called:
            self._auth_wait.errback(ConnectionError("connection lost"))
        if self._handshake_pending:
            # The handshake failed (or the client left during it).
            self._handshake_pending = False
            self._log_tls_failure(reason.getErrorMessage() if reason is not None
                                  else "connection lost")
            return
        if not was_closed and not self._quit_requested:
            # Reset rather than closed: nothing more can be said to the client.
            clean = reason is None or reason.check(error.ConnectionDone)
            read_error = "" if clean else " (error: Connection reset by peer)"
            if self._mode in ("data", "bdat"):
                self._log_lost_in_data(read_error)
            else:
                self._incomplete_transaction_log("connection lost")
                self._log_lost_between_commands(read_error)

    # -- command dispatch ---------------------------------------------------------------

    def _note_pipelined_input(self) -> None:
        """pipeline_response(): after a good MAIL or RCPT, input already
        waiting means the client pipelines (the L flag without "-")."""
        if self._buffer and self._sync_enforced() and self.pipelining_advertised():
            self.pipelining_used = True

    def _sync_enforced(self) -> bool:
        return (self.enforce_sync and bool(self.sender_host_address)
                and not self.host_checking)

    async def _command(self, raw: bytes, overlong: bool = False) -> None:
        text = raw.decode("latin-1").rstrip(" \t\r\n\v\f")
        self.vars["smtp_command"] = text
        if "\0" in text:
            self._synprot_log("syntax", text, "NUL character(s) present (shown as '?')")
            self.reply("501", "NUL characters are not allowed in SMTP commands")
            return
        name, has_arg, is_mail = _identify(text)
        if self.proxy_failed and name != "quit":
            self.reply("503", "Command refused, required Proxy negotiation failed")
            return
        if not name or overlong:
            if self._buffer and self._sync_enforced():
                await self._sync_failure(text)
                return
            await self._unknown(text)
            return
        sync_limit = _SYNC if self.pipelining_advertised() else _SYNC | _PIPELINABLE
        if self._buffer and name in sync_limit and self._sync_enforced() and not (
                self.pipe_connect_acceptable and name in ("helo", "ehlo")):
            await self._sync_failure(text)
            return
        argument = text[len(name):].lstrip(" \t")
        self.vars["smtp_command_argument"] = argument
        if not is_mail and not self._count_nonmail(name):
            return
        if not has_arg and argument:
            await self.synprot("syntax", "501", None, "Unexpected argument data", text)
            return
        handler = getattr(self, "do_" + name.split()[0].upper())
        self._history.append(name.split()[0].upper())
        await handler(argument)
        self._last_was_rcpt = name == "rcpt to:"

    def pipelining_advertised(self) -> bool:
        return "PIPELINING" in self.advertised

    def _count_nonmail(self, name: str) -> bool:
        # Exim lets one HELO/EHLO, RSET and STARTTLS per message go free;
        # they are not counted here at all.
        if name in ("helo", "ehlo", "rset", "starttls"):
            return True
        self.nonmail_count += 1
        limit = self.config.get("smtp_accept_max_nonmail", 10)
        if limit and self.nonmail_count > limit:
            self.log_write(f"SMTP call from {self.host_and_ident(False)} dropped: too many "
                           f"nonmail commands (last was \"{name.split()[0].upper()}\")",
                           ("main", "reject"))
            self.reply("554", "Too many nonmail commands")
            self.close_connection()
            return False
        return True

    async def _unknown(self, text: str) -> None:
        self.unknown_count += 1
        limit = self.config.get("smtp_max_unknown_commands", 3)
        if self.unknown_count > limit:
            self.log_write(f"SMTP call from {self.host_and_ident(False)} dropped: too many "
                           f"unrecognized commands (last was \"{printing(text)}\")",
                           ("main", "reject"))
            self.reply("500", "Too many unrecognized commands")
            self.close_connection()
            return
        await self.synprot("syntax", "500", None, "unrecognized command", text)

    def _synprot_log(self, kind: str, text: str, message: str) -> None:
        selector = "smtp_syntax_error" if kind == "syntax" else "smtp_protocol_error"
        if selector in self.selector():
            self.log_write(f'SMTP {kind} error in "{printing(text)}" '
                           f"{self.host_and_ident(True)} {message}")

    async def synprot(self, kind: str, code: str, data: str | None, message: str,
                       command: str | None = None) -> bool:
        """Exim's synprot_error(): reply, count, and drop after too many.
        Returns True when the connection was dropped."""
        command = self.vars.get("smtp_command", "") if command is None else command
        self._synprot_log(kind, command, message)
        self.synprot_count += 1
        dropped = self.synprot_count > self.config.get("smtp_max_synprot_errors", 3)
        if dropped:
            self.log_write(
                f"SMTP call from {self.host_and_ident(False)} dropped: too many syntax or "
                f'protocol errors (last command was "{printing(command)}", '
                f"{self._connection_had()})", ("main", "reject"))
        prefix = f"{data}: " if data is not None else ""
        self.send(f"{code}{'-' if dropped else ' '}{prefix}{message}\r\n".encode(
            "latin-1", "replace"))
        if dropped:
            self.send(f"{code} Too many syntax or protocol errors\r\n".encode())
            self.close_connection()
        return dropped

    def _connection_had(self) -> str:
        return "C=" + ",".join(self._history[-20:])

    async def _sync_failure(self, text: str) -> None:
        pending = printing(self._buffer[:150].decode("latin-1"))
        self.log_write(
            f"SMTP protocol synchronization error (next input sent too soon: pipelining was"
            f"{'' if self.pipelining_advertised() else ' not'} advertised): rejected "
            f'"{printing(text)}" {self.host_and_ident(True)} next input="{pending}"',
            ("main", "reject"))
        await self._notquit("synchronization-error")
        self.reply("554", "SMTP synchronization error")
        self.close_connection()

    # -- ACLs ---------------------------------------------------------------------

    async def acl(self, where: str) -> Any:
        option, default, _, _ = _ACL_WHERE[where]
        self.acl_session.where = where
        self.ratelimit_cmd_state.clear()
        self.reject_targets = ("main", "reject")
        text = self.config.get(option)
        if where == "prdr" and text is None:
            text = "accept"
        return await run_acl(self.acl_session, text, default)

    def acl_failed(self, where: str, outcome: Any, what_arg: str) -> bool:
        """Exim's smtp_handle_acl_fail(): reply and log; True for a drop."""
        _, _, default_code, where_name = _ACL_WHERE[where]
        verdict = outcome.verdict
        drop = verdict == "drop"
        failed = verdict in ("deny", "drop")
        code = default_code if failed else "451"
        user_msg, log_msg = outcome.user_message, outcome.log_message
        if where == "predata":
            what = "DATA"
        elif where == "mime":
            what = "during MIME ACL checks"
        elif where == "data":
            what = "after DATA"
        elif where == "prdr":
            what = "after DATA PRDR"
        else:
            # Only the connect ACL has no command data (STARTTLS has an
            # empty one, hence Exim's "rejected STARTTLS : ...").
            place = 'in "connect" ACL' if where == "connect" else what_arg
            if where == "auth":
                place = place.split(" ", 1)[0]
            what = f"{where_name} {place[:100]}"
        sender_info = ""
        if where in ("rcpt", "data", "mime"):
            auth = ""
            if self.authenticated:
                auth = f" A={self.authenticated}"
                if self.vars.get("authenticated_id"):
                    auth += f":{self.vars['authenticated_id']}"
            sender_info = f"F=<{self.transaction.sender or ''}>{auth} "
        if failed:
            self.user_reply(code, user_msg or "Administrative prohibition", where != "vrfy")
        elif verdict == "defer" and user_msg:
            self.user_reply(code, user_msg)
        else:
            self.reply(code, "Temporary local problem - please try later")
        log_text = f": {log_msg.split(chr(10))[0]}" if log_msg else ""
        temporarily = "" if failed else "temporarily "
        if self.reject_targets:  # the ACL's log_reject_target
            self.log_write(f"{self.host_and_ident(True)} {sender_info}{temporarily}rejected "
                           f"{what}{log_text}", self.reject_targets,
                           message_id=self.vars.get("message_exim_id")
                           if where in ("data", "prdr", "mime") else None)
        if drop:
            if self.log_connections:
                self.log_write(f"{self._connection_info()} closed by DROP in ACL")
            self.close_connection()
        return drop

    def _connection_info(self) -> str:
        return f"SMTP connection from {self.host_and_ident(False)}"

    def _whofrom(self) -> str:
        """The client as the daemon names it when it connects."""
        from twisted_mta.log import sender_fullhost

        selector = self.selector()
        text = sender_fullhost(None, None, self.peer[0], self.peer[1],
                               with_port="incoming_port" in selector)
        if "incoming_interface" in selector and self.local:
            text += f" I=[{self.local[0]}]:{self.local[1]}"
        return text

    async def _notquit(self, reason: str) -> None:
        if not self.config.get("acl_smtp_notquit"):
            return
        self.vars["smtp_notquit_reason"] = reason
        self._log_acl_error("not-QUIT", await self.acl("notquit"))

    def _log_acl_error(self, name: str, outcome: Any) -> None:
        """The QUIT and not-QUIT ACLs cannot refuse anything: an error is
        only logged."""
        if outcome.verdict == "error":
            self.log_write(f"ACL for {name} returned ERROR: {outcome.log_message}",
                           ("main", "panic"))

    async def host_in(self, option: str) -> bool:
        """Whether the client matches host-list *option* (unset: no)."""
        text = self.config.get(option)
        if text is None:
            self.trace(f"host in {option}? no (option unset)")
            return False
        try:
            expanded = await self.ctx.expand(text)
            found = await match_list(self.sender_host_address, expanded, "host", self.ctx,
                                     host=self.host_identity)
        except (ListDefer, ExpansionError):
            return False
        self.trace(f"host in {option}? {'yes' if found else 'no'}")
        return found is not None

    async def delay(self, seconds: float) -> None:
        from twisted.internet import task

        await task.deferLater(self.clock, seconds, lambda: None)

    # -- commands -----------------------------------------------------------------

    async def do_QUIT(self, argument: str) -> None:
        self._quit_requested = True
        self._incomplete_transaction_log("QUIT")
        outcome = None
        if self.config.get("acl_smtp_quit"):
            outcome = await self.acl("quit")
            self._log_acl_error("QUIT", outcome)
        if outcome is not None and outcome.user_message:
            self.reply("221", outcome.user_message)
        else:
            self.reply("221", f"{self.active_hostname()} closing connection")
        if self.log_connections:
            self.log_write(f"{self._connection_info()} closed by QUIT")
        self.close_connection()

    async def do_RSET(self, argument: str) -> None:
        self._incomplete_transaction_log("RSET")
        self._reset_transaction()
        self.reply("250", "Reset OK")

    async def do_NOOP(self, argument: str) -> None:
        self.reply("250", "OK")

    async def do_HELP(self, argument: str) -> None:
        words = " AUTH"
        if self.settings.tls is not None and not self.vars.get("tls_in_cipher") \
                and await self.host_in("tls_advertise_hosts"):
            words += " STARTTLS"
        words += " HELO EHLO MAIL RCPT DATA BDAT NOOP QUIT RSET HELP"
        for option, word in (("acl_smtp_etrn", "ETRN"), ("acl_smtp_expn", "EXPN"),
                             ("acl_smtp_vrfy", "VRFY")):
            if self.config.get(option):
                words += f" {word}"
        self.send(f"214-Commands supported:\r\n214{words}\r\n".encode())

    def _reset_transaction(self) -> None:
        self.transaction = Transaction()
        for name in [n for n in self.vars if n.startswith("acl_m")]:
            del self.vars[name]
        for name in ("sender_address", "sender_address_domain", "sender_address_local_part",
                     "local_part", "domain",
                     "recipients", "recipients_count", "prdr_requested"):
            self.vars.pop(name, None)

    async def do_HELO(self, argument: str) -> None:
        await self._hello(argument, esmtp=False)

    async def do_EHLO(self, argument: str) -> None:
        await self._hello(argument, esmtp=True)

    async def _hello(self, argument: str, esmtp: bool) -> None:
        from twisted_mta.smtp.hello import check_helo_argument

        verb = "EHLO" if esmtp else "HELO"
        name = check_helo_argument(argument, self.config.get("helo_allow_chars") or "",
                                   self.helo_accept_junk)
        if name is None:
            self.reply("501", f"Syntactically invalid {verb} argument(s)")
            given = printing(argument) if argument else "(no argument given)"
            self.log_write(f"rejected {verb} from {self.host_and_ident(False)}: "
                           f"syntactically invalid argument(s): {given}", ("main", "reject"))
            self.synprot_count += 1
            if self.synprot_count > self.config.get("smtp_max_synprot_errors", 3):
                self.log_write(
                    f"SMTP call from {self.host_and_ident(False)} dropped: too many syntax or "
                    f'protocol errors (last command was "{printing(self.vars["smtp_command"])}"'
                    f", {self._connection_had()})", ("main", "reject"))
                self.close_connection()
            return
        self.helo = name.lower() if self.sender_host_address else name
        self.vars["sender_helo_name"] = self.helo
        self._update_host_variables()
        if self.sender_host_address:
            await self._maybe_lookup_host_for_helo()
        outcome = await self.acl("helo") if self.config.get("acl_smtp_helo") else None
        if outcome is not None and outcome.verdict != "accept":
            self.acl_failed("helo", outcome, argument)
            self.helo = None
            self.vars.pop("sender_helo_name", None)
            self._update_host_variables()
            return
        self._reset_transaction()
        self.esmtp = esmtp
        self.vars["received_protocol"] = self.protocol_name()
        lines = [self._hello_greeting(outcome)]
        self.advertised = set()
        if esmtp:
            lines.extend(await self._ehlo_keywords())
        for i, line in enumerate(lines):
            sep = " " if i == len(lines) - 1 else "-"
            self.send(f"250{sep}{line}\r\n".encode("latin-1", "replace"))

    async def _maybe_lookup_host_for_helo(self) -> None:
        lookup_domains = self.config.get("helo_lookup_domains")
        if not lookup_domains or self.vars.get("sender_host_name"):
            return
        try:
            found = await match_list(self.helo or "", lookup_domains, "domain", self.ctx)
        except (ListDefer, ExpansionError):
            found = None
        self.trace(f"{self.helo} in helo_lookup_domains? {'yes' if found else 'no'}")
        if found is not None and self.host_identity is not None:
            names = await self.host_identity.names(self.ctx)
            if names:
                self.vars["sender_host_name"] = names[0]

    def _hello_greeting(self, outcome: Any) -> str:
        if outcome is not None and outcome.user_message:
            _, text, _ = split_user_code("250", outcome.user_message)
            return text.split("\n", 1)[0].split("\r", 1)[0]
        ident = self.vars.get("sender_ident")
        who = f"{ident} at " if ident else ""
        name = self.vars.get("sender_host_name") or self.helo
        text = f"{self.active_hostname()} Hello {who}{name}"
        if self.sender_host_address:
            text += f" [{self.sender_host_address}]"
        return text

    async def _ehlo_keywords(self) -> list[str]:
        config = self.config
        keywords: list[str] = []
        limit = self.message_size_limit()
        keywords.append(f"SIZE {limit}" if limit > 0 else "SIZE")
        if config.get("accept_8bitmime", True):
            keywords.append("8BITMIME")
        if await self.host_in("dsn_advertise_hosts"):
            keywords.append("DSN")
            self.advertised.add("DSN")
        for option, word in (("acl_smtp_etrn", "ETRN"), ("acl_smtp_vrfy", "VRFY"),
                             ("acl_smtp_expn", "EXPN")):
            if config.get(option):
                keywords.append(word)
        if self.pipelining_allowed and await self.host_in("pipelining_advertise_hosts"):
            keywords.append("PIPELINING")
            self.advertised.add("PIPELINING")
            if self.pipe_connect_acceptable:
                keywords.append("PIPECONNECT")
                self.early_pipe_advertised = True
        mechanisms = await self._auth_mechanisms()
        if mechanisms:
            keywords.append("AUTH " + " ".join(mechanisms))
            self.advertised.add("AUTH")
        if await self.host_in("chunking_advertise_hosts"):
            keywords.append("CHUNKING")
            self.advertised.add("CHUNKING")
        if (self.settings.tls is not None and not self.vars.get("tls_in_cipher")
                and await self.host_in("tls_advertise_hosts")):
            keywords.append("STARTTLS")
            self.advertised.add("STARTTLS")
        if config.get("prdr_enable"):
            keywords.append("PRDR")
            self.advertised.add("PRDR")
        if await self.host_in("smtputf8_advertise_hosts"):
            keywords.append("SMTPUTF8")
            self.advertised.add("SMTPUTF8")
        keywords.append("HELP")
        return keywords

    async def _auth_mechanisms(self) -> list[str]:
        if self.authenticated or not self.config.authenticators:
            return []
        if not await self.host_in("auth_advertise_hosts"):
            return []
        from twisted_mta.smtp.auth import advertised_mechanisms, server_authenticators

        self.authenticators = server_authenticators(self.config)
        self.auth_mechanisms = await advertised_mechanisms(self.authenticators, self.ctx)
        return self.auth_mechanisms

    def protocol_name(self) -> str:
        tls = bool(self.vars.get("tls_in_cipher"))
        auth = bool(self.authenticated)
        if not self.esmtp:
            base = "smtp"
        else:
            base = "esmtp" + ("s" if tls else "") + ("a" if auth else "")
            return ("local-" if not self.sender_host_address else "") + base
        if tls:
            base = "smtps"
        return ("local-" if not self.sender_host_address else "") + base

    def message_size_limit(self) -> int:
        from twisted_mta.values import parse_integer

        text = self.config.get("message_size_limit", "50M")
        value = parse_integer(str(text)) if text is not None else 0
        return value or 0

    # -- MAIL ---------------------------------------------------------------------

    async def do_MAIL(self, argument: str) -> None:
        from twisted_mta.smtp.params import SmtpError, parse_envelope_address, parse_mail_argument

        self.mail_count += 1
        if self.helo is None and await self.host_in("hosts_require_helo"):
            self.reply("503", "HELO or EHLO required")
            self.log_write(f"rejected MAIL from {self.host_and_ident(False)}: no HELO/EHLO "
                           f"given", ("main", "reject"))
            return
        if self.transaction.sender is not None:
            await self.synprot("protocol", "503", None, "sender already given")
            return
        if not argument:
            await self.synprot("protocol", "501", None, "MAIL must have an address operand")
            return
        if self.mail_count > await self._max_per_connection():
            self.reply("421", "too many messages in this connection")
            self.log_write(f"rejected MAIL command {self.host_and_ident(True)}: too many "
                           f"messages in one connection", ("main", "reject"))
            return
        self._reset_transaction()
        txn = self.transaction
        try:
            address_text, params = parse_mail_argument(
                argument, esmtp=self.esmtp, dsn_advertised="DSN" in self.advertised,
                prdr_enabled=bool(self.config.get("prdr_enable")),
                smtputf8_advertised="SMTPUTF8" in self.advertised,
                auth_advertised="AUTH" in self.advertised,
                size_limit=self.message_size_limit(),
                accept_8bitmime=bool(self.config.get("accept_8bitmime", True)),
                utf8_domains=self.utf8_domains)
            sender = parse_envelope_address(
                address_text, is_sender=True, qualify_domain=self.config.get("qualify_domain"),
                allow_unqualified=self.sender_unqualified, utf8_domains=self.utf8_domains)
        except SmtpError as e:
            if e.params is not None and e.params.smtputf8:
                self.utf8_domains = True
            if e.code == 552:
                self.reply("552", e.text)
                size = e.params.size if e.params is not None else 0
                self.log_write(f"rejected MAIL FROM:{e.address_text or argument} "
                               f"{self.host_and_ident(True)}: "
                               f"message too big: size={size} max={self.message_size_limit()}",
                               ("main", "reject"))
                return
            await self._argument_error(e)
            return
        if params.smtputf8:
            self.utf8_domains = True
        txn.sender_param = argument
        txn.size = params.size
        txn.body_type = params.body
        txn.dsn_ret = params.ret
        txn.dsn_envid = params.envid
        txn.prdr = params.prdr
        txn.smtputf8 = params.smtputf8
        txn.auth_sender = params.auth
        self.vars["sender_address"] = sender
        self.vars["prdr_requested"] = "yes" if params.prdr else "no"
        self.vars["message_size"] = str(params.size if params.size is not None else -1)
        local_part, at, domain = sender.rpartition("@")
        self.vars["sender_address_local_part"] = local_part if at else sender
        self.vars["sender_address_domain"] = domain if at else ""
        outcome = await self.acl("mail") if self.config.get("acl_smtp_mail") else None
        if outcome is not None and outcome.verdict not in ("accept", "discard"):
            self.vars.pop("sender_address", None)
            self.acl_failed("mail", outcome, argument)
            return
        txn.sender = sender
        if outcome is not None and outcome.verdict == "discard":
            txn.discarded = True
        message = outcome.user_message if outcome is not None else None
        self._note_pipelined_input()
        if params.prdr:
            self.send(f"250 {split_user_code('250', message)[1] if message else 'OK'}, "
                      f"PRDR Requested\r\n".encode("latin-1", "replace"))
        elif message:
            self.user_reply("250", message)
        else:
            self.reply("250", "OK")

    async def _max_per_connection(self) -> float:
        """smtp_accept_max_per_connection (0: no limit)."""
        text = self.config.get("smtp_accept_max_per_connection", "1000")
        try:
            limit = int(await self.ctx.expand(str(text)))
        except (ExpansionError, ValueError):
            return 1000
        return limit if limit > 0 else float("inf")

    # -- RCPT ---------------------------------------------------------------------

    async def do_RCPT(self, argument: str) -> None:
        from twisted_mta.smtp.params import SmtpError, parse_envelope_address, parse_rcpt_argument

        txn = self.transaction
        if txn.sender is None:
            # Exim remembers the whole line as this RCPT's response.
            self._note_rcpt_reply("503 sender not yet given")
            await self.synprot("protocol", "503", None, "sender not yet given")
            return
        if not argument:
            await self.synprot("syntax", "501", None, "RCPT must have an address operand")
            txn.rcpt_fail_count += 1
            return
        txn.rcpt_count += 1
        try:
            address_text, params = parse_rcpt_argument(
                argument, esmtp=self.esmtp, dsn_advertised="DSN" in self.advertised)
            recipient = parse_envelope_address(
                address_text, is_sender=False,
                qualify_domain=self.config.get("qualify_recipient"),
                allow_unqualified=self.recipient_unqualified, utf8_domains=self.utf8_domains)
        except SmtpError as e:
            txn.rcpt_fail_count += 1
            await self._argument_error(e)
            return
        limit = self.config.get("recipients_max", 50000)
        if limit and txn.rcpt_count > limit:
            if self.config.get("recipients_max_reject"):
                txn.rcpt_fail_count += 1
                self.reply("552", "too many recipients")
                what = "message rejected"
            else:
                txn.rcpt_defer_count += 1
                self.reply("452", "too many recipients")
                what = "excess temporarily rejected"
            if not txn.too_many:
                self.log_write(f"too many recipients: {what}: sender=<{txn.sender}> "
                               f"{self.host_and_ident(True)}", ("main", "reject"))
            txn.too_many = True
            return
        local_part, _, domain = recipient.rpartition("@")
        self.vars["local_part"] = local_part
        self.vars["domain"] = domain
        self.vars["recipients_count"] = str(len(txn.recipients))
        self.vars["rcpt_count"] = str(txn.rcpt_count)
        if txn.discarded:
            outcome = None
            verdict = "discard"
        else:
            outcome = await self.acl("rcpt")
            verdict = outcome.verdict
        message = outcome.user_message if outcome is not None else None
        if verdict == "accept":
            self._note_pipelined_input()
            self._note_rcpt_reply(split_user_code("250", message, False)[1] if message
                                  else "Accepted")
            if message:
                self.user_reply("250", message)
            else:
                self.reply("250", "Accepted")
            txn.recipients.append(Recipient(recipient, params.notify, params.orcpt))
            self.vars["recipients_count"] = str(len(txn.recipients))
        elif verdict == "discard":
            if message:
                self.user_reply("250", message)
            else:
                self.reply("250", "Accepted")
            txn.rcpt_fail_count += 1
            txn.rcpt_discarded = True
            log_msg = outcome.log_message if outcome is not None else None
            self.log_write(f"{self.host_and_ident(True)} F=<{txn.sender}> RCPT {argument}: "
                           f"discarded by {'MAIL' if txn.discarded else 'RCPT'} ACL"
                           f"{': ' + log_msg if log_msg else ''}", ("main", "reject"))
        else:
            if verdict == "defer":
                txn.rcpt_defer_count += 1
            else:
                txn.rcpt_fail_count += 1
            self._note_rcpt_reply(split_user_code("550", outcome.user_message, False)[1]
                                  if outcome.user_message else
                                  "Administrative prohibition" if verdict in ("deny", "drop")
                                  else "Temporary local problem - please try later")
            self.acl_failed("rcpt", outcome, argument)
        self.vars.pop("local_part", None)
        self.vars.pop("domain", None)

    async def _argument_error(self, e: Any) -> None:
        """A refused MAIL or RCPT operand: counted as Exim counts it."""
        if e.syntax or e.protocol:
            await self.synprot("protocol" if e.protocol else "syntax", str(e.code), None, e.text)
        else:
            self.reply(str(e.code), e.text)

    def _note_rcpt_reply(self, text: str) -> None:
        """Keep the first RCPT response (an ACL message without its code)
        for the 503 to a DATA that has no recipients."""
        txn = self.transaction
        if txn.first_rcpt_reply is None:
            txn.first_rcpt_reply = text
        elif txn.first_rcpt_reply != text:
            txn.rcpt_replies_same = False

    # -- DATA and BDAT ---------------------------------------------------------------

    async def _check_data_allowed(self, verb: str) -> bool:
        txn = self.transaction
        if not (txn.discarded or txn.rcpt_discarded) and not txn.recipients:
            if txn.rcpt_replies_same and txn.first_rcpt_reply is not None:
                self.send(b"503-All RCPT commands were rejected with this error:\r\n")
                for line in txn.first_rcpt_reply.split("\n"):
                    self.send(f"503-{line}\r\n".encode("latin-1", "replace"))
            if self.pipelining_advertised() and self._last_was_rcpt:
                self.reply("503", f"Valid RCPT command must precede {verb}")
            else:
                await self.synprot("protocol", "503", None,
                                    f"valid RCPT command must precede {verb}")
            return False
        if txn.too_many and self.config.get("recipients_max_reject"):
            txn.sender = None
            self.reply("554", "Too many recipients")
            return False
        return True

    async def do_DATA(self, argument: str) -> None:
        if not await self._check_data_allowed("DATA"):
            return
        self._set_recipients_variable()
        outcome = await self.acl("predata") if self.config.get("acl_smtp_predata") else None
        if outcome is not None and outcome.verdict != "accept":
            self.acl_failed("predata", outcome, "")
            return
        if self._buffer and self._sync_enforced() and outcome is not None:
            await self._sync_failure(self.vars.get("smtp_command", "DATA"))
            return
        self._start_message(dot_ends=True)
        if outcome is not None and outcome.user_message:
            self.user_reply("354", outcome.user_message)
        else:
            self.reply("354", 'Enter message, ending with "." on a line by itself')
        self._mode = "data"

    def _start_message(self, dot_ends: bool) -> None:
        self._reader = DataReader(self.message_size_limit(), dot_ends=dot_ends)
        self._chunked_total = 0
        self.all_recipients = list(self.transaction.recipients)
        self._data_started = self.clock.seconds()

    def receive_time(self) -> float:
        return max(0.0, self.clock.seconds() - self._data_started)

    def allocate_message_id(self) -> tuple[str, float]:
        message_id, received = self.settings.id_allocator.allocate()
        self.last_message_id = message_id
        return message_id, received

    @property
    def last_chunk_size(self) -> int:
        return self._last_chunk_size

    @property
    def chunked_total(self) -> int:
        return self._chunked_total

    def finish_transaction(self, accepted: bool = False) -> None:
        """After the reply to the data: the next message starts afresh.
        Exim's log lines go on showing an accepted message's id until the
        next message; a refused one's id is forgotten at once."""
        if not accepted:
            self.last_message_id = None
        self._reset_transaction()

    def after_message_reply(self) -> None:
        if self.host_checking:
            self.send(b"\n**** SMTP testing: that is not a real message id!\n\n")

    async def store_message(self, message_id: str, received_time: float,
                            message: IncomingMessage) -> None:
        """Write the message to the spool and wait until it is durable."""
        from twisted_mta.smtp.spooling import spool_message

        record = spool_message(self, message_id, received_time, message)
        await threads.deferToThreadPool(self.settings.reactor, self.settings.threadpool,
                                        self.settings.spool.write_message, record,
                                        message.body)

    def _set_recipients_variable(self) -> None:
        self.vars["recipients"] = ", ".join(r.address for r in self.transaction.recipients)
        self.vars["recipients_count"] = str(len(self.transaction.recipients))

    async def do_BDAT(self, argument: str) -> None:
        if "CHUNKING" not in self.advertised:
            await self.synprot("protocol", "503", None,
                                "BDAT command used when CHUNKING not advertised")
            return
        words = argument.split()
        size = words[0] if words else ""
        last = len(words) > 1 and words[1].upper() == "LAST"
        if not size.isdigit() or len(words) > 2 or (len(words) == 2 and not last):
            await self.synprot("protocol", "501", None, "missing size for BDAT command")
            return
        if self._mode != "bdat_between" and self._reader is None:
            if not await self._check_data_allowed("BDAT"):
                self._skip_bytes(int(size))
                return
            self._set_recipients_variable()
            self._start_message(dot_ends=False)
        self._bdat_remaining = self._last_chunk_size = int(size)
        self._chunked_total += int(size)
        self._bdat_last = last
        self.chunking_used = True
        self._mode = "bdat"
        if self._bdat_remaining == 0:
            self._reader.feed_chunk(b"", last)
            await self._end_of_chunk()

    def _skip_bytes(self, count: int) -> None:
        take = min(count, len(self._buffer))
        self._buffer = self._buffer[take:]

    async def _end_of_chunk(self) -> None:
        if not self._bdat_last:
            self._mode = "command"
            self.reply("250", f"{self._last_chunk_size} byte chunk received")
            return
        await self._end_of_data()

    async def _end_of_data(self) -> None:
        from twisted_mta.smtp.receive import receive_message

        reader, self._reader = self._reader, None
        self._mode = "command"
        message = reader.message()
        await receive_message(self, message, chunked=not reader.dot_ends)

    # -- VRFY, EXPN, ETRN -------------------------------------------------------------

    async def do_VRFY(self, argument: str) -> None:
        from twisted_mta.smtp.params import SmtpError, parse_envelope_address

        try:
            address = parse_envelope_address(argument, is_sender=False,
                                             qualify_domain=self.config.get("qualify_recipient"),
                                             allow_unqualified=False)
        except SmtpError as e:
            self.reply("501", e.text)
            return
        local_part, _, domain = address.rpartition("@")
        self.vars["local_part"], self.vars["domain"] = local_part, domain
        outcome = await self.acl("vrfy")
        self.vars.pop("local_part", None)
        self.vars.pop("domain", None)
        if outcome.verdict != "accept":
            self.acl_failed("vrfy", outcome, argument)
            return
        if outcome.user_message:
            self.user_reply("250", outcome.user_message)
            return
        from twisted_mta.smtp.verify import verify_address

        result = await verify_address(self.acl_session, address, recipient=True)
        if result.ok:
            self.reply("250", f"<{address}> is deliverable")
        elif result.defer:
            self.reply("451", f"<{address}> {result.message or 'cannot be verified now'}")
        else:
            self.reply("550", f"<{address}> {result.message or 'Unrouteable address'}")

    async def do_EXPN(self, argument: str) -> None:
        outcome = await self.acl("expn")
        if outcome.verdict != "accept":
            self.acl_failed("expn", outcome, argument)
            return
        self.reply("550", f"{argument} cannot be expanded")

    async def do_ETRN(self, argument: str) -> None:
        if "etrn" in self.selector():
            self.log_write(f"ETRN {argument} received from {self.host_and_ident(False)}")
        outcome = await self.acl("etrn")
        if outcome.verdict != "accept":
            self.acl_failed("etrn", outcome, argument)
            return
        if not self.config.get("smtp_etrn_command"):
            if not argument.startswith("#"):
                self.reply("501", "argument must begin with #")
                return
            if outcome.user_message:
                self.user_reply("250", outcome.user_message)
            else:
                self.reply("250", "OK")
            return
        self.reply("250", "OK")

    # -- AUTH ---------------------------------------------------------------------

    async def do_AUTH(self, argument: str) -> None:
        from twisted_mta.smtp.authcmd import run_auth_command

        await run_auth_command(self, argument)

    def read_auth_line(self) -> defer.Deferred:
        """The client's next line during an AUTH exchange; fails with
        ConnectionError if the client goes away first."""
        self._auth_wait = defer.Deferred()
        self._mode = "auth"
        waiting = self._auth_wait
        self._feed_auth_line()
        return waiting

    def _feed_auth_line(self) -> None:
        waiting = self._auth_wait
        if waiting is None:
            return
        nl = self._buffer.find(b"\n")
        if nl >= 0:
            line, self._buffer = self._buffer[:nl], self._buffer[nl + 1:]
        elif self._eof:
            line = None
        else:
            return
        self._auth_wait = None
        self._mode = "command"
        if line is None:
            waiting.errback(ConnectionError("connection lost during AUTH"))
        else:
            waiting.callback(line.decode("latin-1"))

    # -- STARTTLS -----------------------------------------------------------------

    async def do_STARTTLS(self, argument: str) -> None:
        if "STARTTLS" not in self.advertised or self.vars.get("tls_in_cipher"):
            await self.synprot("protocol", "503", None,
                                "STARTTLS command used when not advertised")
            return
        outcome = await self.acl("starttls") if self.config.get("acl_smtp_starttls") else None
        if outcome is not None and outcome.verdict != "accept":
            self.acl_failed("starttls", outcome, "")
            return
        # Anything pipelined after STARTTLS arrived in plaintext: discard it,
        # never run it inside TLS (the CVE-2011-0411 class of attack).
        self._buffer = b""
        if not await self._start_tls(reply=True):
            return
        self._reset_transaction()
        self.helo = None
        self.esmtp = False
        self.advertised = set()
        self.vars.pop("sender_helo_name", None)

    async def _start_tls(self, reply: bool = False) -> bool:
        from twisted_mta.smtp.tls import TLSConfigError

        try:
            creator = await self.settings.tls.creator_for(self)
        except TLSConfigError as e:
            self.log_write(f"TLS error on connection from {self.host_and_ident(False)} "
                           f"(cert/key setup): {e}", ("main", "panic"))
            if reply:
                self.reply("454", "TLS currently unavailable")
            return False
        if reply:
            self.reply("220", "TLS go ahead")
        if not hasattr(self.transport, "startTLS"):
            # -bh: standard input cannot do a handshake, as in Exim, whose
            # session ends here too.
            self._log_tls_failure("host checking input cannot start TLS")
            self.close_connection()
            return False
        self._handshake_pending = True
        self.transport.startTLS(creator)
        return True

    def _log_tls_failure(self, reason: str) -> None:
        self.log_write(f"TLS error on connection from {self.host_and_ident(False)} "
                       f"(SSL_accept): {reason}")

    def handshakeCompleted(self) -> None:
        """IHandshakeListener: the TLS handshake finished."""
        from twisted_mta.smtp.tls import session_for, tls_in_variables

        self._handshake_pending = False
        connection = self.transport.getHandle()
        self.vars.update(tls_in_variables(connection))
        session = session_for(connection)
        if session is not None:
            for text in session.verify_errors:
                self.log_write(f"{self.host_and_ident(True)} {text}")
            for text in session.problems:
                self.log_write(text, ("main", "panic"))
        self.vars["received_protocol"] = self.protocol_name()

