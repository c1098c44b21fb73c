"""``exim-py -bh IP[.port]``: a host-checking SMTP session on standard
input and output, as Exim runs it.

The session is the daemon's own L{ESMTPServer}; it replies on standard
output, writes the ACL trace (``>>>`` lines) and would-be log lines
(``LOG:``) on standard error, and never touches the spool.
"""

from __future__ import annotations

import io
import os
from typing import Any, BinaryIO

from twisted.internet import defer
from twisted.internet.interfaces import ITransport
from zope.interface import implementer

from twisted_mta.lists import ip_version

BANNER = ("\n**** SMTP testing session as if from host {ip}\n"
          "**** but without any ident (RFC 1413) callback.\n"
          "**** This is not for real!\n\n")


class HostCheckError(Exception):
    pass


def parse_host_argument(text: str) -> tuple[str, int]:
    """``ip`` or ``ip.port`` (the port is the last dot-separated part of an
    IPv4 address with five parts, or after the last dot of an IPv6 one)."""
    if ip_version(text):
        return text, 0
    head, dot, tail = text.rpartition(".")
    if dot and tail.isdigit() and ip_version(head):
        return head, int(tail)
    raise HostCheckError(f"Bad IP address given with -bh: {text}")


@implementer(ITransport)
class OutputTransport:
    """A transport whose writes go to a byte stream."""

    def __init__(self, out: BinaryIO, on_close: Any) -> None:
        self.out = out
        self.on_close = on_close
        self.disconnecting = False

    def write(self, data: bytes) -> None:
        self.out.write(data)
        self.out.flush()

    def writeSequence(self, data: list[bytes]) -> None:
        for chunk in data:
            self.write(chunk)

    def loseConnection(self) -> None:
        if not self.disconnecting:
            self.disconnecting = True
            self.on_close()

    def getPeer(self) -> None:
        return None

    def getHost(self) -> None:
        return None

    def pauseProducing(self) -> None:
        pass

    def resumeProducing(self) -> None:
        pass


async def host_check_session(reactor: Any, config: Any, address: str | None, port: int,
                             stdin: BinaryIO, stdout: BinaryIO, stderr: BinaryIO) -> None:
    """Run one session, returning when it ends; *address* None is ``-bs``
    (a local caller whose message goes to the spool)."""
    from twisted.python.threadpool import ThreadPool

    from twisted_mta.acl.ratelimit import RatelimitStore
    from twisted_mta.log import EximLog, SyncLogWriter
    from twisted_mta.smtp.server import ConnectionSettings, ESMTPServer
    from twisted_mta.smtp.tlsserver import SessionTLS
    from twisted_mta.spool.ids import MessageIdAllocator
    from twisted_mta.spool.store import Spool

    err = io.TextIOWrapper(stderr, encoding="utf-8", errors="surrogateescape",
                           write_through=True)

    def trace(text: str) -> None:
        err.write(text + "\n")

    checking = address is not None
    if checking:
        log = EximLog.from_config(config, reactor, os.getpid(), SyncLogWriter(),
                                  testing_stream=err, host_checking=True)
    else:
        log = EximLog.from_config(config, reactor, os.getpid(), SyncLogWriter())
    spool_directory = config.get("spool_directory") or "."
    pool = ThreadPool(minthreads=0, maxthreads=4, name="exim-py-bh")
    pool.start()
    finished: defer.Deferred = defer.Deferred()
    settings = ConnectionSettings(
        config, reactor=reactor, clock=reactor, log=log, threadpool=pool,
        id_allocator=MessageIdAllocator(reactor.seconds, os.getpid()),
        resolver=_resolver(config, pool, reactor), host_checking=checking,
        trace=trace if checking else None, tls=SessionTLS(config),
        spool=None if checking else Spool(spool_directory),
        ratelimit_store=RatelimitStore(os.path.join(spool_directory, "db", "ratelimit")))
    try:
        if checking:
            stdout.write(BANNER.format(ip=address).encode())
            stdout.flush()
        server = ESMTPServer(settings, peer=(address, port) if checking else None, local=None)
        if not checking:
            from twisted_mta.cli import caller_login

            server.vars["sender_ident"] = caller_login()
        transport = OutputTransport(stdout, lambda: finished.called or finished.callback(None))
        server.makeConnection(transport)
        server.dataReceived(stdin.read())
        server.input_ended()
        await finished
    finally:
        pool.stop()


def _resolver(config: Any, pool: Any, reactor: Any) -> Any:
    from twisted_mta.dns import Resolver

    return Resolver(threadpool=pool, reactor=reactor)


def host_check(config: Any, argument: str, stdin: BinaryIO, stdout: BinaryIO,
               stderr: BinaryIO) -> int:
    """The ``-bh`` mode; returns the exit status."""
    try:
        address, port = parse_host_argument(argument)
    except HostCheckError as e:
        stderr.write(f"exim-py: {e}\n".encode())
        return 1
    from twisted.internet import task

    def main(reactor: Any) -> defer.Deferred:
        return defer.Deferred.fromCoroutine(
            host_check_session(reactor, config, address, port, stdin, stdout, stderr))

    try:
        task.react(main)
    except SystemExit as e:
        return int(e.code or 0)
    return 0


def local_session(config: Any, stdin: BinaryIO, stdout: BinaryIO, stderr: BinaryIO) -> int:
    """``-bs``: an SMTP session with the local caller on standard input and
    output; ``hosts = :`` matches it and accepted messages are spooled."""
    from twisted.internet import task

    def main(reactor: Any) -> defer.Deferred:
        return defer.Deferred.fromCoroutine(
            host_check_session(reactor, config, None, 0, stdin, stdout, stderr))

    try:
        task.react(main)
    except SystemExit as e:
        return int(e.code or 0)
    return 0
