"""The SMTP client side: what Exim's ``transports/smtp.c`` says on the wire.

L{connect} opens a TCP connection (``connect_timeout``, ``interface``) and
returns an L{SMTPClient}; its coroutines run the dialogue: L{SMTPClient.greeting},
L{SMTPClient.hello} (EHLO, HELO when EHLO is refused), L{SMTPClient.transaction}
(MAIL, RCPTs and DATA, pipelined when the server offers PIPELINING, with
``SIZE=`` and ``BODY=8BITMIME`` where offered) and L{SMTPClient.quit}.
Every reply is waited for on the injected clock (``command_timeout``,
``data_timeout`` for each block of message data, ``final_timeout`` for the
reply to the final dot).

A failure that ends the dialogue raises L{SMTPClientError}, which carries
Exim's message (``SMTP timeout after ...``, ``SMTP error from remote mail
server after ...``, ``Remote host closed connection in response to ...``)
and errno.  Per-recipient replies are returned, not raised.

L{SMTPClient.starttls} sends STARTTLS and, after a 2xx, runs the TLS
handshake on the connection (an C{IOpenSSLClientConnectionCreator}, see
L{twisted_mta.smtp.tlsclient}); the caller then sends EHLO again.

L{SMTPClient.transaction} also asks for PRDR (``MAIL ... PRDR``, then the
353, the per-recipient replies and the overall reply after the final dot)
and appends the DSN parameters the caller builds (RET/ENVID on MAIL,
NOTIFY/ORCPT on RCPT).

CHUNKING (RFC 3030): given the chunks L{bdat_chunks} plans, the message
goes as ``BDAT <n>`` commands (the last one ``BDAT <n> LAST``) instead of
DATA, without dot-stuffing, as Exim's smtp_chunk_cmd_callback() and
transport_write_message() send it; ``SMTPUTF8`` on MAIL is asked for by
the caller (RFC 6531).

L{SMTPClient.auth} runs one client authenticator's exchange (AUTH, after
L{SMTPClient.hello}).

Commands are sent as Latin-1: addresses and configuration text are bytes
decoded that way throughout (an SMTPUTF8 address is its UTF-8 bytes).
"""

from __future__ import annotations

import errno as E
import os
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from twisted.internet import defer as tdefer
from twisted.internet import error as terror
from twisted.internet.protocol import ClientFactory, Protocol

ERRNO_SMTPCLOSED = -18
ERRNO_SMTPFORMAT = -19
#: The longest reply accepted (Exim's buffer is 4 KiB; kept generous).
MAX_REPLY = 16 * 1024


def split_reply_lines(buffer: bytes, lines: deque[bytes]) -> bytes:
    """Move the complete lines of *buffer* onto *lines* (a line longer than
    MAX_REPLY is cut there); return what is left of the last one."""
    while True:
        end = buffer.find(b"\n")
        if end < 0:
            break
        lines.append(buffer[:end + 1])
        buffer = buffer[end + 1:]
    if len(buffer) > MAX_REPLY:
        lines.append(buffer)
        buffer = b""
    return buffer
#: How much message data is written before waiting for the buffer to drain.
_CHUNK = 64 * 1024


@dataclass
class Reply:
    """An SMTP reply: the code and the lines as received (without CRLF)."""

    code: int
    lines: list[str]

    @property
    def text(self) -> str:
        """The reply as Exim prints it in messages (lines joined with newline)."""
        return "\n".join(self.lines)

    @property
    def digit(self) -> str:
        return str(self.code)[0]

    @property
    def positive(self) -> bool:
        return 200 <= self.code < 400


class SMTPClientError(Exception):
    """A failure that ends the dialogue.

    @ivar message: Exim's text for it.
    @ivar errno: ETIMEDOUT, ERRNO_SMTPCLOSED, ERRNO_SMTPFORMAT, 0 for an
        error reply, or a socket errno.
    @ivar reply: the error reply, when there was one.
    @ivar send_quit: whether QUIT may still be sent.
    """

    def __init__(self, message: str, errno: int = 0, reply: Reply | None = None,
                 send_quit: bool = False) -> None:
        super().__init__(message)
        self.message = message
        self.errno = errno
        self.reply = reply
        self.send_quit = send_quit

    @property
    def permanent(self) -> bool:
        return self.reply is not None and self.reply.digit == "5"


class TLSHandshakeError(Exception):
    """The TLS handshake after STARTTLS failed: *text* is Exim's reason
    (``(SSL_connect): timed out``, ``synch error before connect``) when known, else *reason* is the connection's loss."""

    def __init__(self, text: str | None, reason: Any = None) -> None:
        super().__init__(text)
        self.text = text
        self.reason = reason


class ClientProtocol(Protocol):
    """Bytes in, lines out; the writing side with flow control."""

    def __init__(self) -> None:
        self.buffer = b""
        self.lines: deque[bytes] = deque()
        self.closed = False
        self.reason: Any = None
        self._waiter: tdefer.Deferred[None] | None = None
        self.connected_d: tdefer.Deferred[ClientProtocol] = tdefer.Deferred()
        self._paused = False
        self._drained: tdefer.Deferred[None] | None = None

    # IProtocol
    def connectionMade(self) -> None:
        self.transport.registerProducer(self, True)
        if not self.connected_d.called:
            self.connected_d.callback(self)

    def dataReceived(self, data: bytes) -> None:
        self.buffer = split_reply_lines(self.buffer + data, self.lines)
        self._wake()

    def connectionLost(self, reason: Any = None) -> None:
        self.closed = True
        self.reason = reason
        self._wake()
        self.resumeProducing()

    # IPushProducer: the transport tells us when its buffer is full.
    def pauseProducing(self) -> None:
        self._paused = True

    def resumeProducing(self) -> None:
        self._paused = False
        drained, self._drained = self._drained, None
        if drained is not None and not drained.called:
            drained.callback(None)

    def stopProducing(self) -> None:
        self.resumeProducing()

    def _wake(self) -> None:
        waiter, self._waiter = self._waiter, None
        if waiter is not None and not waiter.called:
            waiter.callback(None)

    async def read_line(self, timeout: float, clock: Any) -> bytes | None:
        """The next line, None once the connection is closed; raises
        TimeoutError."""
        while not self.lines:
            if self.closed:
                return None
            self._waiter = tdefer.Deferred()
            if not await _wait(self._waiter, timeout, clock):
                raise TimeoutError
        return self.lines.popleft()

    async def drained(self, timeout: float, clock: Any) -> bool:
        """Wait until the transport wants more data; False on timeout."""
        if not self._paused or self.closed:
            return True
        self._drained = tdefer.Deferred()
        return await _wait(self._drained, timeout, clock)


async def _wait(d: tdefer.Deferred[Any], timeout: float, clock: Any) -> bool:
    if timeout > 0:
        d.addTimeout(timeout, clock)
    try:
        await d
    except tdefer.TimeoutError:
        return False
    return True


class _Factory(ClientFactory):
    # Not noisy: Twisted would log "Starting factory" and "Stopping
    # factory" for every delivery connection.
    noisy = False

    def __init__(self, protocol: ClientProtocol) -> None:
        self.protocol_instance = protocol

    def buildProtocol(self, addr: Any) -> ClientProtocol:
        return self.protocol_instance

    def clientConnectionFailed(self, connector: Any, reason: Any) -> None:
        d = self.protocol_instance.connected_d
        if not d.called:
            d.errback(reason)


class ConnectError(Exception):
    """The TCP connection could not be made: errno and Exim's message."""

    def __init__(self, errno: int, message: str) -> None:
        super().__init__(message)
        self.errno = errno
        self.message = message


async def connect(reactor: Any, clock: Any, address: str, port: int, *,
                  timeout: float, interface: str | None = None,
                  settings: ClientSettings | None = None) -> SMTPClient:
    """Connect to *address*:*port* within *timeout* seconds (on *clock*);
    raises L{ConnectError} (``Connection refused``, ``Connection timed
    out`` ...)."""
    protocol = ClientProtocol()
    factory = _Factory(protocol)
    bind = (interface, 0) if interface else None
    connector = reactor.connectTCP(address, port, factory, timeout=max(timeout, 1),
                                   bindAddress=bind)
    try:
        if not await _wait(protocol.connected_d, timeout, clock):
            if getattr(connector, "state", "") == "connecting":
                connector.stopConnecting()
            raise ConnectError(E.ETIMEDOUT, "Connection timed out")
    except terror.ConnectionRefusedError:
        raise ConnectError(E.ECONNREFUSED, "Connection refused") from None
    except (terror.TCPTimedOutError, terror.TimeoutError):
        raise ConnectError(E.ETIMEDOUT, "Connection timed out") from None
    except terror.ConnectError as e:
        number = getattr(e, "osError", None)
        if not isinstance(number, int):
            number = E.EHOSTUNREACH
        raise ConnectError(number, os.strerror(number)) from None
    return SMTPClient(protocol, protocol.transport, clock, settings or ClientSettings())


async def connect_socks(reactor: Any, clock: Any, proxies: Any, address: str, port: int, *,
                        timeout: float, interface: str | None = None,
                        settings: ClientSettings | None = None, log: Any = None,
                        tcp_connect_event: Any = None) -> tuple[SMTPClient, Any]:
    """Like L{connect}, through the SOCKS5 *proxies* (see
    L{twisted_mta.smtp.socks.SOCKS5ClientEndpoint}); returns the client and
    the L{twisted_mta.smtp.socks.SOCKSSession}.  Raises L{ConnectError}
    with the errno Exim sets."""
    from twisted_mta.smtp.socks import SOCKS5ClientEndpoint, SOCKSError

    protocol = ClientProtocol()
    endpoint = SOCKS5ClientEndpoint(reactor, proxies, address, port, clock,
                                    timeout=timeout, bind_address=interface, log=log,
                                    tcp_connect_event=tcp_connect_event)
    try:
        _, session = await endpoint.connect_session(_Factory(protocol))
    except SOCKSError as e:
        raise ConnectError(e.errno, e.strerror) from None
    except terror.ConnectError as e:
        number = getattr(e, "osError", None)
        if not isinstance(number, int):
            number = E.EHOSTUNREACH
        raise ConnectError(number, os.strerror(number)) from None
    return SMTPClient(protocol, protocol.transport, clock,
                      settings or ClientSettings()), session


@dataclass
class ClientSettings:
    """The transport's timeouts, in seconds."""

    command_timeout: float = 300
    data_timeout: float = 300
    final_timeout: float = 600


@dataclass
class TransactionResult:
    """What one mail transaction gave.

    @ivar rcpt_replies: one reply per recipient, in order (None when the
        transaction ended before its reply was read).
    @ivar data_reply: the reply after the final dot (None if no data was
        sent because no recipient was accepted).
    @ivar error: an error that ended the transaction for every accepted
        recipient (raised by MAIL, DATA, the data or the final reply).
    """

    rcpt_replies: list[Reply | None] = field(default_factory=list)
    data_reply: Reply | None = None
    error: SMTPClientError | None = None
    bytes_written: int = 0
    #: PRDR: whether MAIL asked for it, whether the server answered the
    #: final dot with 3xx (``prdr``), and then the per-recipient replies,
    #: aligned with ``rcpt_replies`` (None for a recipient not accepted, or
    #: one whose reply was not read); ``data_reply`` is the overall reply.
    prdr_requested: bool = False
    prdr: bool = False
    prdr_replies: list[Reply | None] = field(default_factory=list)
    #: CHUNKING: whether the message went by BDAT, and the command whose
    #: reply is ``data_reply`` (Exim's data_command, for PRDR messages).
    chunking: bool = False
    data_command: str = "DATA"


#: Exim's DELIVER_OUT_BUFFER_SIZE: transport_write_message() sends the
#: headers in a BDAT of their own when the message is bigger than this, and
#: a header section longer than it in several.
BDAT_BUFFER = 8192


@dataclass
class BDATChunk:
    """One ``BDAT <size>`` and its data: *blocks* are bytes, or iterables
    or async iterables of bytes, written in order."""

    size: int
    blocks: list[Any]


def bdat_chunks(head: bytes, body: Any, body_size: int) -> list[BDATChunk]:
    """Exim's choice of chunks for a message: *head* is the header section
    as sent (CRLF lines), *body* the body's bytes (an iterable or async
    iterable) and *body_size* their number.

    Exim fills an 8 KiB buffer with the headers and sends it as a
    non-last chunk whenever it holds more than 8190 bytes and more header
    data follows (8191 bytes, or 8192 when the LF that crossed the line
    became CRLF).  Then, if what is left of the headers plus the body is
    more than 8192 bytes, the rest of the headers go as one more non-last
    chunk, so that the RCPT replies are known before the body is sent; the
    body (or the whole message) is the ``LAST`` chunk."""
    chunks: list[BDATChunk] = []
    start = 0
    while True:
        end = start + BDAT_BUFFER - 1
        if head[end - 1:end + 1] == b"\r\n":
            end += 1
        if end >= len(head):
            break
        chunks.append(BDATChunk(end - start, [head[start:end]]))
        start = end
    rest = head[start:]
    if rest and len(rest) + body_size > BDAT_BUFFER:
        chunks.append(BDATChunk(len(rest), [rest]))
        chunks.append(BDATChunk(body_size, [body]))
    else:
        chunks.append(BDATChunk(len(rest) + body_size, [rest, body]))
    return chunks


class SMTPClient:
    """One SMTP conversation over a connected L{ClientProtocol}."""

    def __init__(self, protocol: ClientProtocol, transport: Any, clock: Any,
                 settings: ClientSettings) -> None:
        self.protocol = protocol
        self.transport = transport
        self.clock = clock
        self.settings = settings
        self.last = "initial connection"
        self.pipelining_active = False
        self.esmtp = False
        #: EHLO keywords (upper case) and their parameters.
        self.extensions: dict[str, str] = {}
        self.greeting_reply: Reply | None = None
        self.hello_reply: Reply | None = None
        self.ehlo_reply: Reply | None = None
        #: False for a host in hosts_avoid_pipelining: never pipeline.
        self.pipelining = True
        self.count = 0

    # -- the primitives ---------------------------------------------------------------

    def send(self, command: str) -> None:
        if self.protocol.closed:
            raise SMTPClientError(f"Remote host closed connection in response to "
                                  f"{self._pl()}{self.last}", ERRNO_SMTPCLOSED)
        self.transport.write(_wire(command) + b"\r\n")
        self.last = command

    def _pl(self) -> str:
        return "pipelined " if self.pipelining_active else ""

    async def read_reply(self, timeout: float | None = None,
                         command: str | None = None) -> Reply:
        """Read one (possibly multi-line) reply; raises L{SMTPClientError}
        for a timeout, a closed connection or a malformed reply.  *command*
        names what the reply answers, for messages."""
        what = command if command is not None else self.last
        lines: list[str] = []
        total = 0
        limit = self.settings.command_timeout if timeout is None else timeout
        while True:
            try:
                raw = await self.protocol.read_line(limit, self.clock)
            except TimeoutError:
                message = f"SMTP timeout after {self._pl()}{what}"
                if self.count > 0:
                    message += f" ({self.count} bytes written)"
                raise SMTPClientError(message, E.ETIMEDOUT) from None
            if raw is None:
                raise SMTPClientError(f"Remote host closed connection in response to "
                                      f"{self._pl()}{what}", ERRNO_SMTPCLOSED)
            total += len(raw)
            text = raw.decode("latin-1").rstrip("\r\n").rstrip()
            if total > MAX_REPLY or len(text) < 3 or not text[:3].isdigit() or \
                    text[3:4] not in ("-", " ", "") or \
                    (lines and text[:3] != lines[0][:3]):
                shown = text.strip()
                raise SMTPClientError(
                    f"Malformed SMTP reply in response to {self._pl()}{what}: {shown}"
                    if shown else "Malformed SMTP reply (an empty line) in response to "
                    f"{self._pl()}{what}", ERRNO_SMTPFORMAT)
            lines.append(text)
            if text[3:4] != "-":
                return Reply(int(text[:3]), lines)

    def error_reply(self, reply: Reply, what: str | None = None) -> SMTPClientError:
        what = self.last if what is None else what
        return SMTPClientError(
            f"SMTP error from remote mail server after {self._pl()}{what}: {reply.text}",
            0, reply, send_quit=True)

    # -- the dialogue -------------------------------------------------------------------

    async def greeting(self) -> Reply:
        """The banner; raises for anything but 2xx."""
        reply = await self.read_reply(command="initial connection")
        self.greeting_reply = reply
        if reply.digit != "2":
            raise self.error_reply(reply, "initial connection")
        return reply

    async def hello(self, name: str, esmtp: bool = True) -> Reply:
        """EHLO, then HELO when EHLO is refused (any reply but 2xx, as Exim's
        smtp_reap_ehlo()) or when *esmtp* is false.  ``ehlo_reply`` keeps
        the reply to EHLO."""
        self.ehlo_reply = None
        if esmtp:
            self.send(f"EHLO {name}")
            reply = self.ehlo_reply = await self.read_reply()
            if reply.digit == "2":
                self.esmtp = True
                self.hello_reply = reply
                self.extensions = _extensions(reply)
                return reply
        self.send(f"HELO {name}")
        reply = await self.read_reply()
        self.hello_reply = reply
        if reply.digit != "2":
            raise self.error_reply(reply)
        self.extensions = {}
        return reply

    async def starttls(self, creator: Any, handshake_done: tdefer.Deferred[None]) -> Reply:
        """STARTTLS; on a 2xx reply start TLS with *creator* and wait (up to
        command_timeout) for *handshake_done*.  Returns the STARTTLS reply
        (a non-2xx one is left to the caller).  Raises L{SMTPClientError}
        for a timeout or a closed connection while waiting for the reply,
        and L{TLSHandshakeError} when the handshake fails."""
        self.send("STARTTLS")
        reply = await self.read_reply()
        if reply.digit != "2":
            return reply
        await self.handshake(creator, handshake_done)
        return reply

    async def handshake(self, creator: Any, handshake_done: tdefer.Deferred[None]) -> None:
        """Start TLS with *creator* (after STARTTLS, or at once for
        ``protocol = smtps``) and wait up to command_timeout for
        *handshake_done*; raises L{TLSHandshakeError} when it fails."""
        if self.protocol.lines or self.protocol.buffer:
            # Data sent before the handshake: RFC 3207 forbids it.
            raise TLSHandshakeError("synch error before connect")
        self.transport.startTLS(creator)
        protocol = self.protocol
        while not handshake_done.called:
            if protocol.closed:
                raise TLSHandshakeError(None, protocol.reason)
            waiter: tdefer.Deferred[None] = tdefer.Deferred()
            protocol._waiter = waiter

            def wake(_: Any, w: tdefer.Deferred[None] = waiter) -> None:
                if not w.called:
                    w.callback(None)
            handshake_done.addCallback(lambda value, wake=wake: (wake(None), value)[1])
            if not await _wait(waiter, self.settings.command_timeout, self.clock):
                raise TLSHandshakeError("(SSL_connect): timed out")
        if protocol.closed:
            raise TLSHandshakeError(None, protocol.reason)
        self.extensions = {}

    def offers(self, keyword: str) -> bool:
        return keyword.upper() in self.extensions

    async def auth(self, mechanism: str, items: list[bytes]) -> tuple[str, Reply | None]:
        """Exim's auth_client_item() loop for a plaintext-style client:
        the first item (base64) with ``AUTH <mechanism>``, each next one
        after a 334.  Returns ("ok", reply) on a 2xx, ("fail", reply) for
        any other non-3xx reply, ("error", None) when the server still
        prompts after the last item (a ``*`` cancels the exchange)."""
        import base64

        for i, item in enumerate(items):
            encoded = base64.b64encode(item).decode("ascii")
            if i == 0:
                self.send(f"AUTH {mechanism}{' ' if item else ''}{encoded}")
            else:
                self.send(encoded)
            self.last = f"AUTH {mechanism}" if i == 0 else "AUTH data"
            reply = await self.read_reply()
            if reply.digit == "2":
                return "ok", reply
            if reply.digit != "3":
                return "fail", reply
        self.send("*")
        await self.read_reply()
        return "error", None

    async def transaction(self, sender: str, recipients: list[str],
                          data: Any, *, size: int | None = None,
                          eight_bit: bool = False, prdr: bool = False,
                          smtputf8: bool = False, mail_params: str = "",
                          rcpt_params: list[str] | None = None,
                          chunks: list[BDATChunk] | None = None) -> TransactionResult:
        """MAIL, one RCPT each, DATA, the data (already dot-stuffed, CRLF,
        ending with ``.``) and the final reply.  Replies to RCPT are
        returned per recipient; a failure of MAIL, DATA or after it is in
        ``error`` (and the connection may be unusable after it).

        *prdr*: ask for PRDR (``MAIL ... PRDR``) when the server offers it
        and there are two or more recipients (Exim's ``hosts_try_prdr``
        has been checked by the caller).  *smtputf8*: add `` SMTPUTF8``
        (after PRDR, as Exim orders them; the caller has checked the
        offer).  *mail_params* (`` RET=... ENVID=...``) is appended to
        MAIL after those, and ``rcpt_params[i]`` (`` NOTIFY=...
        ORCPT=...``) to the i-th RCPT.

        *chunks* (from L{bdat_chunks}): send the message with BDAT instead
        (*data* is then unused); see L{_bdat}."""
        result = TransactionResult()
        pipelining = self.pipelining and self.offers("PIPELINING")
        mail = f"MAIL FROM:<{sender}>"
        if size is not None and self.offers("SIZE"):
            mail += f" SIZE={size}"
        if eight_bit and self.offers("8BITMIME"):
            mail += " BODY=8BITMIME"
        if prdr and self.offers("PRDR") and len(recipients) >= 2:
            mail += " PRDR"
            result.prdr_requested = True
        if smtputf8:
            mail += " SMTPUTF8"
        mail += mail_params
        params = rcpt_params or [""] * len(recipients)
        rcpts = [f"RCPT TO:<{r}>{p}" for r, p in zip(recipients, params, strict=False)]
        try:
            if chunks is not None:
                if await self._bdat(result, mail, rcpts, chunks, pipelining):
                    await self._final_reply(result)
                return result
            if pipelining:
                self.pipelining_active = True
                self.transport.write(
                    _wire("".join(f"{c}\r\n" for c in [mail, *rcpts, "DATA"])))
                self.last = mail
            else:
                self.send(mail)
            reply = await self.read_reply(command=mail)
            if reply.digit != "2":
                result.error = self.error_reply(reply, mail)
                if pipelining:
                    # Read the RCPT and DATA replies the server still sends.
                    for command in [*rcpts, "DATA"]:
                        await self.read_reply(command=command)
                    self.pipelining_active = False
                return result
            accepted = 0
            for command in rcpts:
                if not pipelining:
                    self.send(command)
                reply = await self.read_reply(command=command)
                result.rcpt_replies.append(reply)
                if reply.digit == "2":
                    accepted += 1
            if not pipelining:
                if accepted == 0:
                    return result
                self.send("DATA")
            reply = await self.read_reply(command="DATA")
            self.pipelining_active = False
            if accepted == 0:
                # Pipelined DATA with no recipient: a 354 needs an empty message.
                if reply.digit == "3":
                    self.transport.write(b".\r\n")
                    await self.read_reply(command="end of data")
                return result
            if reply.digit != "3":
                result.error = self.error_reply(reply, "DATA")
                return result
            self.last = "sending data block"
            await self._send_data(data)
            self.last = "end of data"
            await self._final_reply(result)
        except SMTPClientError as e:
            result.error = e
        finally:
            self.pipelining_active = False
            result.bytes_written = self.count
            self.count = 0
        return result

    async def _final_reply(self, result: TransactionResult) -> None:
        """The reply to the final dot or to ``BDAT ... LAST`` (final_timeout);
        after PRDR's 353, the per-recipient replies and the overall one."""
        reply = await self.read_reply(self.settings.final_timeout)
        if result.prdr_requested and reply.digit == "3":
            # 353: one reply per accepted recipient, in RCPT order, then
            # the overall reply (a 2xx instead of the 3xx: no PRDR).
            result.prdr = True
            for rcpt_reply in result.rcpt_replies:
                if rcpt_reply is not None and rcpt_reply.digit == "2":
                    result.prdr_replies.append(
                        await self.read_reply(self.settings.final_timeout))
                else:
                    result.prdr_replies.append(None)
            reply = await self.read_reply(self.settings.final_timeout)
        result.data_reply = reply
        if reply.digit != "2":
            result.error = self.error_reply(reply)

    async def _bdat(self, result: TransactionResult, mail: str, rcpts: list[str],
                    chunks: list[BDATChunk], pipelining: bool) -> bool:
        """MAIL, the RCPTs and the chunks, as Exim's smtp transport with
        CHUNKING: True when ``BDAT ... LAST`` and its data have been sent
        (its reply is next), False when the transaction ended before.

        Without PIPELINING, MAIL and each RCPT wait for their reply, and no
        BDAT is sent when no recipient was accepted.  With it, MAIL and the
        RCPTs go with the first BDAT and its data, and their replies are
        read after that chunk (before its own reply, which for a non-last
        chunk comes next).  A non-last chunk's reply is waited for with
        command_timeout before the next chunk is sent.  Exim names what
        failed after its data stage: errors and timeouts of the pipelined
        MAIL too are ``after [pipelined ]sending data block`` or ``after
        [pipelined ]end of data``."""
        result.chunking = True
        pending: list[str] = []
        commands = ""
        if pipelining:
            self.pipelining_active = True
            pending = [mail, *rcpts]
            commands = "".join(f"{c}\r\n" for c in pending)
        else:
            self.send(mail)
            reply = await self.read_reply(command=mail)
            if reply.digit != "2":
                result.error = self.error_reply(reply, mail)
                return False
            for command in rcpts:
                self.send(command)
                result.rcpt_replies.append(await self.read_reply(command=command))
            if not any(r.digit == "2" for r in result.rcpt_replies if r is not None):
                return False
        for number, chunk in enumerate(chunks, 1):
            last = number == len(chunks)
            command = f"BDAT {chunk.size}{' LAST' if last else ''}"
            self.transport.write(_wire(f"{commands}{command}\r\n"))
            commands = ""
            self.last = "sending data block"
            for block in chunk.blocks:
                await self._send_data([block] if isinstance(block, bytes) else block)
            if last:
                result.data_command = command
                self.last = "end of data"
            if pending and not await self._reap(result, pending):
                return False
            pending = []
            if last:
                return True
            reply = await self.read_reply()
            if reply.digit != "2":
                result.error = self.error_reply(reply)
                return False
            self.pipelining_active = False
        return True

    async def _reap(self, result: TransactionResult, pending: list[str]) -> bool:
        """The replies to the pipelined MAIL and RCPTs (Exim's
        sync_responses()); False when MAIL was refused (``error``), the
        RCPT replies then being read and dropped."""
        reply = await self.read_reply(command=self.last)
        if reply.digit != "2":
            result.error = self.error_reply(reply)
            try:
                for command in pending[1:]:
                    await self.read_reply(command=command)
            except SMTPClientError:
                pass
            return False
        for command in pending[1:]:
            result.rcpt_replies.append(await self.read_reply(command=command))
        return True

    async def _send_data(self, data: Any) -> None:
        """Write the data (bytes blocks, from an iterable or an async
        iterable), waiting at most data_timeout whenever the transport's
        buffer is full."""
        pending = 0
        if hasattr(data, "__aiter__"):
            async for block in data:
                pending = await self._write_block(block, pending)
        else:
            for block in data:
                pending = await self._write_block(block, pending)

    async def _write_block(self, block: bytes, pending: int) -> int:
        if self.protocol.closed:
            raise SMTPClientError("Remote host closed connection in response to "
                                  "sending data block", ERRNO_SMTPCLOSED)
        self.transport.write(block)
        self.count += len(block)
        pending += len(block)
        if pending < _CHUNK:
            return pending
        if not await self.protocol.drained(self.settings.data_timeout, self.clock):
            raise SMTPClientError(
                f"SMTP timeout after sending data block ({self.count} bytes written)",
                E.ETIMEDOUT)
        return 0

    async def quit(self) -> None:
        """QUIT; the reply is waited for briefly, then the connection closed."""
        try:
            if not self.protocol.closed:
                self.send("QUIT")
                await self.read_reply(1)
        except SMTPClientError:
            pass
        self.close()

    def close(self) -> None:
        try:
            self.transport.loseConnection()
        except Exception:
            pass


def _wire(text: str) -> bytes:
    """A command's bytes.  Addresses from the spool are bytes decoded as
    Latin-1 (an SMTPUTF8 address is its UTF-8 bytes that way), so Latin-1
    gives them back unchanged; text beyond Latin-1 can only be real
    Unicode (from an expansion), sent as UTF-8."""
    try:
        return text.encode("latin-1")
    except UnicodeEncodeError:
        return text.encode("utf-8", "surrogateescape")


def _extensions(reply: Reply) -> dict[str, str]:
    found: dict[str, str] = {}
    for line in reply.lines[1:]:
        words = line[4:].strip().split(None, 1)
        if words:
            found[words[0].upper()] = words[1] if len(words) > 1 else ""
    return found


def dot_stuffed(lines: Iterable[bytes]) -> Iterable[bytes]:
    """Lines (each ending in a newline) as SMTP data: CRLF line ends, a
    leading dot doubled, and the final ``.`` line."""
    for line in lines:
        body = line.rstrip(b"\r\n") if line.endswith(b"\n") else line
        if body.startswith(b"."):
            body = b"." + body
        yield body + b"\r\n"
    yield b".\r\n"
