"""The ``lmtp`` transport: Exim's ``transports/lmtp.c``.

LMTP (RFC 2033) to a command run on this host (``command``: it reads
LMTP on its standard input and answers on its standard output) or to a
Unix socket (``socket``).  The dialogue: wait for the greeting, ``LHLO``
with the primary host name, ``MAIL FROM``, one ``RCPT TO`` per address,
``DATA`` and the message (dot-stuffed, CRLF lines, ending with ``.``),
then one reply per accepted recipient, which gives that recipient's
result; finally ``QUIT``.  Each reply is awaited for at most ``timeout``.

A 5xx reply to RCPT or after the data fails that recipient, a 4xx defers
it (``LMTP error after RCPT TO:<...>: 4xx ...``).  A failure of the
connection or of MAIL or DATA applies to every address of the batch, as
in Exim.  With ``ignore_quota``, ``IGNOREQUOTA`` is added to RCPT when the
server advertises it.  A delivered address gets the server's reply as its
``confirmation`` and ``address.extra["lmtp"] = True``, which is what the
delivery log's ``C=`` needs.

Differences from Exim: a reply may be up to 16 KiB long (Exim stops at
256 bytes); the command's standard error is not read as part of the
dialogue (Exim's child shares one pipe for both).
"""

from __future__ import annotations

import errno as E
import os
import re
import socket
from collections import deque
from typing import Any

from twisted.internet import defer as tdefer
from twisted.internet.protocol import Factory, Protocol
from zope.interface import implementer

from twisted_mta.expand.errors import ExpansionError
from twisted_mta.interfaces import ITransport
from twisted_mta.log import log_quote
from twisted_mta.smtp.client import MAX_REPLY, split_reply_lines
from twisted_mta.transports import common as C
from twisted_mta.transports.appendfile import rcpt_address
from twisted_mta.transports.common import Outcome, defer, expand, panic
from twisted_mta.transports.message import (
    HeaderChangeError,
    MessageStream,
    WriteOptions,
    build_headers,
)
from twisted_mta.transports.process import (
    Backpressure,
    ChildProtocol,
    kill_group,
    pump,
    set_up_command,
    spawn,
    wait_for,
)

_IGNOREQUOTA = re.compile(r"\n250[\s\-]IGNOREQUOTA(\s|\n|$)")


class _Closed(Exception):
    pass


class _Lines:
    """The server's output split into lines, waited for one at a time."""

    def __init__(self) -> None:
        self.buffer = b""
        self.lines: deque[bytes] = deque()
        self.closed = False
        self._waiter: tdefer.Deferred[None] | None = None

    def data(self, data: bytes) -> None:
        self.buffer = split_reply_lines(self.buffer + data, self.lines)
        self._wake()

    def lost(self) -> None:
        self.closed = True
        self._wake()

    def _wake(self) -> None:
        waiter, self._waiter = self._waiter, None
        if waiter is not None and not waiter.called:
            waiter.callback(None)

    async def read_line(self, timeout: float, clock: Any) -> bytes | None:
        """The next line, None at the end; raises TimeoutError."""
        while not self.lines:
            if self.closed:
                return None
            self._waiter = tdefer.Deferred()
            done, _ = await wait_for(self._waiter, timeout, clock)
            if not done:
                raise TimeoutError
        return self.lines.popleft()


class _SocketProtocol(Protocol):
    def __init__(self) -> None:
        self.lines = _Lines()
        self.pressure = Backpressure()

    def connectionMade(self) -> None:
        self.transport.registerProducer(self.pressure, True)

    def dataReceived(self, data: bytes) -> None:
        self.lines.data(data)

    def connectionLost(self, reason: Any = None) -> None:
        self.lines.lost()
        self.pressure.stopProducing()


class _CommandProtocol(ChildProtocol):
    def __init__(self) -> None:
        super().__init__()
        self.lines = _Lines()

    def outReceived(self, data: bytes) -> None:
        self.lines.data(data)

    def errReceived(self, data: bytes) -> None:
        pass

    def childConnectionLost(self, childFD: int) -> None:
        super().childConnectionLost(childFD)
        if childFD == 1:
            self.lines.lost()

    def processEnded(self, reason: Any) -> None:
        super().processEnded(reason)
        self.lines.lost()


class _Session:
    """One LMTP conversation: Exim's lmtp_write_command() and
    lmtp_read_response(), with *last* the last command (for messages)."""

    def __init__(self, job: Any, transport: Any, protocol: Any, timeout: int) -> None:
        self.job = job
        self.transport = transport
        self.protocol = protocol
        self.timeout = timeout
        self.last = "initial connection"
        self.count = 0          # bytes of message data written
        self.kill = False       # end the command's process group

    @property
    def closed(self) -> bool:
        lines = self.protocol.lines
        return lines.closed or getattr(self.protocol, "stdin_closed", False)

    def command(self, text: str) -> None:
        if self.closed:
            raise _Closed
        self.transport.write(text.encode("latin-1") + b"\r\n")
        self.last = text

    async def response(self, okdigit: str, timeout: float | None = None) -> tuple[bool, str, int]:
        """(ok, reply, error): error is 0, ETIMEDOUT or ERRNO_SMTPFORMAT;
        an empty reply with error 0 means the connection closed."""
        lines: list[str] = []
        total = 0
        while True:
            try:
                raw = await self.protocol.lines.read_line(
                    self.timeout if timeout is None else timeout, self.job.clock)
            except TimeoutError:
                return False, "", E.ETIMEDOUT
            if raw is None:
                return False, "", 0
            total += len(raw)
            text = raw.decode("latin-1").rstrip(" \t\n\r\v\f")
            lines.append(text)
            if total > MAX_REPLY or len(text) < 3 or not text[:3].isdigit() or \
                    text[3:4] not in ("-", " ", ""):
                return False, "\n".join(lines), C.ERRNO_SMTPFORMAT
            if text[3:4] != "-":
                break
        reply = "\n".join(lines)
        return reply[0] == okdigit, reply, 0


def _check_response(session: _Session, error: int, reply: str) -> tuple[bool, str, str]:
    """check_response(): (send QUIT?, result digit, message)."""
    if error == E.ETIMEDOUT:
        message = f"LMTP timeout after {session.last}"
        if session.count > 0:
            message += f" ({session.count} bytes written)"
        return False, "4", message
    if error == C.ERRNO_SMTPFORMAT:
        return False, "4", f"Malformed LMTP response after {session.last}: {log_quote(reply)}"
    if reply:
        return True, reply[0], f"LMTP error after {session.last}: {log_quote(reply)}"
    return False, "4", f"LMTP connection closed after {session.last}"


@implementer(ITransport)
class LmtpTransport:
    """``driver = lmtp``."""

    name = "lmtp"
    local = True

    async def deliver(self, instance: Any, job: Any) -> None:
        outcome = await C.guard_delivery(instance, self._deliver(instance, job))
        if outcome is not None:
            outcome.apply(job.addresses)

    async def _deliver(self, instance: Any, job: Any) -> Outcome | None:
        name = instance.name
        cmd, sock = instance.get("command"), instance.get("socket")
        if (cmd is None) == (sock is None):
            return panic(f"one (and only one) of command or socket must be set for the {name} "
                         "transport")
        if instance.get("body_only") and instance.get("headers_only"):
            return panic(f"{name} transport: body_only and headers_only are mutually exclusive")
        setup = await C.start_delivery(instance, job)
        if isinstance(setup, Outcome):
            return setup
        timeout = int(instance.get("timeout"))

        stream = await _message_stream(job, instance, setup.return_path)
        if isinstance(stream, Outcome):
            return stream

        if cmd is not None:
            argv = await set_up_command(job, str(cmd), expand_arguments=True,
                                        expand_fail=C.PANIC, etext=f"{name[:50]} transport")
            if isinstance(argv, Outcome):
                return argv
            if job.message.dont_deliver:
                return Outcome(C.OK)
            protocol: Any = _CommandProtocol()
            try:
                transport = spawn(job.reactor, protocol, argv[0], argv, {}, None, 0)
            except OSError as e:
                return defer(f"Failed to create child process for {name} transport: "
                             f"{os.strerror(e.errno or 0)}")
        else:
            try:
                path = await expand(job, str(sock))
            except ExpansionError as e:
                return defer(f'Expansion of "{sock}" (socket setting for {name} transport) '
                             f"failed: {e.message}")
            if job.message.dont_deliver:
                return Outcome(C.OK)
            connected = await _connect_unix(job, path, name)
            if isinstance(connected, Outcome):
                return connected
            protocol = connected
            transport = protocol.transport

        session = _Session(job, transport, protocol, timeout)
        try:
            outcome = await self._dialogue(session, instance, stream, setup.return_path)
        finally:
            await self._finish(session, cmd is not None, timeout)
        return outcome

    async def _finish(self, session: _Session, is_command: bool, timeout: int) -> None:
        transport, protocol = session.transport, session.protocol
        if is_command:
            try:
                transport.closeStdin()
            except Exception:
                pass
            if session.kill:
                kill_group(transport)
            exited, _ = await wait_for(protocol.when_exited(), timeout, session.job.clock)
            if not exited:
                kill_group(transport)
            try:
                transport.loseConnection()
            except Exception:
                pass
        else:
            transport.loseConnection()

    async def _dialogue(self, session: _Session, instance: Any, stream: MessageStream,
                        return_path: str) -> Outcome | None:
        """The LMTP transaction; None when each address has its own result,
        else the Outcome for all of them."""
        job = session.job
        addresses = job.addresses
        try:
            ok, reply, error = await session.response("2")
            if not ok:
                return await self._response_failed(session, error, reply)
            hostname = await job.ctx.expand("$primary_hostname")
            session.command(f"LHLO {hostname}")
            ok, reply, error = await session.response("2")
            if not ok:
                return await self._response_failed(session, error, reply)
            ignore_quota = ""
            if instance.get("ignore_quota") and _IGNOREQUOTA.search(reply):
                ignore_quota = " IGNOREQUOTA"

            session.command(f"MAIL FROM:<{return_path}>")
            ok, reply, error = await session.response("2")
            if not ok:
                return await self._response_failed(session, error, reply, C.ERRNO_MAIL4XX)

            pending = []
            include = bool(instance.get("rcpt_include_affixes"))
            for address in addresses:
                session.command(f"RCPT TO:<{rcpt_address(address, include)}>{ignore_quota}")
                ok, reply, error = await session.response("2")
                if ok:
                    pending.append(address)
                    continue
                if error != 0 or not reply:
                    return await self._response_failed(session, error, reply)
                message = f"LMTP error after {session.last}: {log_quote(reply)}"
                if reply[0] == "5":
                    address.fail(message)
                else:
                    address.defer(message, errno=C.ERRNO_RCPT4XX,
                                  more_errno=address.more_errno | (_code(reply) << 8))
                address.extra["pass_message"] = True

            if pending:
                session.command("DATA")
                ok, reply, error = await session.response("3")
                if not ok:
                    return await self._response_failed(session, error, reply, C.ERRNO_DATA4XX)
                session.last = "sending data block"
                writing = tdefer.Deferred.fromCoroutine(self._send(session, stream))
                done, _ = await wait_for(writing, session.timeout, job.clock)
                if not done:
                    return await self._response_failed(session, E.ETIMEDOUT, "")
                if session.closed:
                    return await self._response_failed(session, 0, "")
                session.last = "end of data"
                for i, address in enumerate(pending):
                    ok, reply, error = await session.response("2")
                    if ok:
                        address.succeed(log_quote(reply))
                        address.extra["lmtp"] = True
                        continue
                    if error != 0 or not reply:
                        _, digit, message = _check_response(session, error, reply)
                        for rest in pending[i:]:
                            if digit == "5":
                                rest.fail(message, errno=address.basic_errno)
                            else:
                                rest.defer(message, errno=address.basic_errno)
                        break
                    message = f"LMTP error after {session.last}: {log_quote(reply)}"
                    if reply[0] == "4":
                        address.defer(message, errno=C.ERRNO_DATA4XX,
                                      more_errno=address.more_errno | (_code(reply) << 8))
                    elif reply[0] == "5":
                        address.fail(message)
                    else:
                        address.defer(message)
                    address.extra["pass_message"] = True
            try:
                session.command("QUIT")
                await session.response("2", 1)
            except _Closed:
                pass
            return None
        except _Closed:
            session.kill = True
            return panic(f"Error {E.EPIPE}", E.EPIPE)

    async def _send(self, session: _Session, stream: MessageStream) -> None:
        def write(data: bytes) -> None:
            session.transport.write(data)
            session.count += len(data)

        await pump(session.job, iter(stream), write, session.protocol.pressure,
                   lambda: session.closed)

    async def _response_failed(self, session: _Session, error: int, reply: str,
                               errno_4xx: int | None = None) -> Outcome:
        """RESPONSE_FAILED in lmtp.c: one result for every address.  A 4xx
        reply to MAIL or DATA is recorded as *errno_4xx*, with the reply
        code in more_errno."""
        more_errno = 0
        if errno_4xx is not None and error == 0 and reply[:1] == "4":
            error, more_errno = errno_4xx, _code(reply) << 8
        basic = error if error not in (E.ETIMEDOUT, 0) else 0
        quit_, digit, message = _check_response(session, error, reply)
        if quit_:
            try:
                session.command("QUIT")
                await session.response("2", 1)
            except _Closed:
                pass
        if digit == "4" and error > 0 and error != E.ETIMEDOUT:
            message = f"{message}: {os.strerror(error)}"
        session.kill = True
        status = C.FAIL if digit == "5" else C.DEFER
        return Outcome(status, message, basic, more_errno)


def _code(reply: str) -> int:
    return int(reply[1:3]) if reply[1:3].isdigit() else 0


async def _connect_unix(job: Any, path: str, name: str) -> _SocketProtocol | Outcome:
    """Connect to a Unix socket, with Exim's messages for the failures."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.setblocking(False)
        sock.connect(path[:107])
    except BlockingIOError:
        sock.close()
        return await _connect_unix_slowly(job, path, name)
    except OSError as e:
        sock.close()
        return defer(f"Failed to connect to socket {path} for {name} transport: "
                     f"{os.strerror(e.errno or 0)}")
    protocol = _SocketProtocol()
    factory = Factory.forProtocol(lambda: protocol)
    try:
        job.reactor.adoptStreamConnection(sock.fileno(), socket.AF_UNIX, factory)
    finally:
        sock.close()
    return protocol


async def _connect_unix_slowly(job: Any, path: str, name: str) -> _SocketProtocol | Outcome:
    """The listener's queue was full: let the reactor wait for it."""
    from twisted.internet.endpoints import UNIXClientEndpoint, connectProtocol

    protocol = _SocketProtocol()
    try:
        await connectProtocol(UNIXClientEndpoint(job.reactor, path), protocol)
    except Exception as e:
        return defer(f"Failed to connect to socket {path} for {name} transport: {e}")
    return protocol


async def _message_stream(job: Any, instance: Any, return_path: str) -> MessageStream | Outcome:
    options = WriteOptions.from_instance(instance, use_crlf=True, end_dot=True,
                                         check_string=".", escape_string="..")
    try:
        headers = await build_headers(job, instance, options, return_path)
    except HeaderChangeError as e:
        if e.routing is not None:
            return defer(e.routing)
        return defer(f"failed to expand headers_add or headers_remove: {e.message}",
                     C.ERRNO_CHHEADER_FAIL)
    return MessageStream(headers, job.data_path, options,
                         wireformat=bool(job.message.wireformat))
