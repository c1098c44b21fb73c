"""haproxy as a test peer: a TCP frontend on a free loopback port that
relays each connection to a backend and starts it with a PROXY header.

Usage::

    with Haproxy(backend_port=server_port, mode="send-proxy-v2") as proxy:
        socket.create_connection(("127.0.0.1", proxy.port))

haproxy connects to the backend from ``source`` (127.0.0.2 by default), so
the backend can tell proxied connections from direct ones.  It runs in the
foreground in master-worker mode (``-W -db``): the process we started is the
master, whose pid haproxy writes to its pidfile, and stopping it by that pid
(as every peer is stopped) stops the worker too.
"""

from __future__ import annotations

import ipaddress
import os
import socket
from collections.abc import Sequence

from tests.peers import Peer, free_port

MODES = ("send-proxy", "send-proxy-v2", "send-proxy-v2-ssl", "send-proxy-v2-ssl-cn")


class Haproxy(Peer):
    """haproxy in TCP mode: frontend 127.0.0.1:``port`` to one backend
    server with a PROXY header of the given *mode*.

    *server_options* are added to the ``server`` line (for instance
    ``proxy-v2-options unique-id,authority``), *bind_options* to the
    frontend's ``bind`` line (for instance ``accept-proxy`` or ``ssl crt
    FILE``), and *frontend_lines* are extra lines for the frontend section
    (for instance ``unique-id-format %{+X}o\\ %ci:%cp``)."""

    program = "/usr/sbin/haproxy"

    def __init__(
        self,
        backend_port: int,
        backend_host: str = "127.0.0.1",
        mode: str = "send-proxy",
        server_options: str = "",
        bind_options: str = "",
        frontend_lines: Sequence[str] = (),
        source: str = "127.0.0.2",
        port: int | None = None,
    ) -> None:
        super().__init__()
        if mode not in MODES:
            raise ValueError(f"unknown PROXY mode {mode!r}; one of {', '.join(MODES)}")
        # The peer must never reach or listen beyond this machine.
        for address in (backend_host, source):
            if not ipaddress.ip_address(address).is_loopback:
                raise ValueError(f"{address} is not a loopback address")
        self.backend_host = backend_host
        self.backend_port = backend_port
        self.mode = mode
        self.server_options = server_options
        self.bind_options = bind_options
        self.frontend_lines = list(frontend_lines)
        self.source = source
        self.port = port or free_port()

    @property
    def stats_socket(self) -> str:
        """The admin socket (a Unix socket in the peer's directory): used
        to tell when haproxy is up without opening a proxied connection."""
        return os.path.join(self.directory or ".", "stats.sock")

    @property
    def pidfile(self) -> str:
        return os.path.join(self.directory or ".", "haproxy.pid")

    def config(self) -> str:
        """The text of haproxy.cfg."""
        backend = self.backend_host
        if ":" in backend:
            backend = f"[{backend}]"
        frontend = "".join(f"    {line}\n" for line in self.frontend_lines)
        return (
            "global\n"
            f"    pidfile {self.pidfile}\n"
            f"    stats socket {self.stats_socket} mode 600 level user\n"
            "    maxconn 256\n"
            "    nbthread 1\n"
            "\n"
            "defaults\n"
            "    mode tcp\n"
            "    timeout connect 5s\n"
            "    timeout client 30s\n"
            "    timeout server 30s\n"
            "\n"
            "frontend fe\n"
            f"    bind 127.0.0.1:{self.port} {self.bind_options}\n"
            f"{frontend}"
            "    default_backend be\n"
            "\n"
            "backend be\n"
            # No "check": health checks would open extra connections.
            f"    server s1 {backend}:{self.backend_port} {self.mode}"
            f" source {self.source} {self.server_options}\n"
        )

    def command(self) -> list[str]:
        path = os.path.join(self.directory or ".", "haproxy.cfg")
        with open(path, "w") as handle:
            handle.write(self.config())
        # -db keeps haproxy in the foreground, so the pid we hold is its
        # master; -W because haproxy writes no pidfile in plain -db mode.
        return [self.program, "-W", "-db", "-f", path]

    def ready(self) -> bool:
        if not (os.path.exists(self.pidfile) and os.path.exists(self.stats_socket)):
            return False
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
            try:
                probe.connect(self.stats_socket)
            except OSError:
                return False
        return True
