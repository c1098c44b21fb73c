"""``${readsocket}``: a request/response exchange over a Unix or TCP socket."""

from __future__ import annotations

import socket
from typing import TYPE_CHECKING

from twisted.internet import threads

from twisted_mta.expand.errors import ExpansionError
from twisted_mta.values import parse_time

if TYPE_CHECKING:
    from twisted_mta.expand.context import ExpansionContext


def _parse_options(text: str) -> tuple[float, bool]:
    """The timeout and shutdown flag from readsocket's third argument."""
    timeout = 5.0
    shutdown = True
    for part in text.split(":") if text else []:
        part = part.strip()
        if part.startswith("shutdown="):
            shutdown = part[9:] != "no"
        elif "=" in part:
            continue
        elif part:
            seconds = parse_time(part)
            if seconds is None:
                raise ExpansionError(f'bad time value "{part}" in readsocket')
            timeout = float(seconds)
    return timeout, shutdown


def _exchange(path: str, request: str, timeout: float, shutdown: bool) -> str:
    if path.startswith("inet:"):
        host, _, port = path[5:].rpartition(":")
        host = host.strip("[]")
        try:
            sock = socket.create_connection((host, int(port)), timeout=timeout)
        except (OSError, ValueError) as e:
            raise ExpansionError(
                f"failed to connect to socket {path}: {getattr(e, 'strerror', None) or e}"
            ) from None
    else:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(timeout)
        try:
            sock.connect(path)
        except OSError as e:
            sock.close()
            raise ExpansionError(f"failed to connect to socket {path}: {e.strerror}") from None
    with sock:
        try:
            if request:
                sock.sendall(request.encode("latin-1"))
            if shutdown:
                sock.shutdown(socket.SHUT_WR)
            chunks = []
            while True:
                data = sock.recv(65536)
                if not data:
                    break
                chunks.append(data)
        except TimeoutError:
            raise ExpansionError("socket read timed out") from None
        except OSError as e:
            raise ExpansionError(f"socket error: {e.strerror}") from None
    return b"".join(chunks).decode("latin-1")


async def read_socket(
    ctx: ExpansionContext, path: str, request: str, options: str = "", eol: str | None = None
) -> str:
    """Send *request* to *path* and return the whole reply."""
    timeout, shutdown = _parse_options(options)
    if ctx.reactor is None or ctx.threadpool is None:
        reply = _exchange(path, request, timeout, shutdown)
    else:
        reply = await threads.deferToThreadPool(
            ctx.reactor, ctx.threadpool, _exchange, path, request, timeout, shutdown
        )
    if eol is not None:
        reply = reply.replace("\n", eol)
    return reply
