"""Real peers for tests: servers started on free loopback ports in
temporary directories and stopped by their pid.

Policy: when a peer's program is missing the test is skipped, unless the
environment variable ``EXIMPY_REQUIRE_PEERS=1`` is set, in which case it
fails.  Use a peer as a context manager or call ``start()``/``stop()``;
``stop()`` is safe to call twice.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import unittest
from typing import Any


def require_program(path: str) -> str:
    """Return *path* if it is an executable, else skip (or fail under
    EXIMPY_REQUIRE_PEERS=1)."""
    if os.access(path, os.X_OK):
        return path
    message = f"{path} is not installed"
    if os.environ.get("EXIMPY_REQUIRE_PEERS") == "1":
        raise AssertionError(f"{message} (EXIMPY_REQUIRE_PEERS=1)")
    raise unittest.SkipTest(message)


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free a moment ago (bind to port 0)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def wait_until(check: Any, timeout: float = 10.0, interval: float = 0.05) -> None:
    """Poll *check()* until it is true; AssertionError after *timeout*."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(interval)
    raise AssertionError(f"peer not ready after {timeout}s")


class Peer:
    """A server process in its own temporary directory."""

    program = ""

    def __init__(self) -> None:
        self.process: subprocess.Popen | None = None
        self.directory: str | None = None

    def command(self) -> list[str]:
        raise NotImplementedError

    def ready(self) -> bool:
        raise NotImplementedError

    def start(self) -> Peer:
        require_program(self.program)
        if self.directory is None:
            self.directory = tempfile.mkdtemp(prefix=f"peer-{os.path.basename(self.program)}-")
        log = open(os.path.join(self.directory, "output.log"), "ab")
        with log:
            self.process = subprocess.Popen(
                self.command(), cwd=self.directory, stdout=log, stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )
        try:
            wait_until(lambda: self.process.poll() is None and self.ready())
        except AssertionError:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        """Stop the process by its pid (SIGTERM, then SIGKILL)."""
        if self.process is not None and self.process.poll() is None:
            os.kill(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                os.kill(self.process.pid, signal.SIGKILL)
                self.process.wait()
        self.process = None

    def cleanup(self) -> None:
        """Stop the process and remove its directory."""
        self.stop()
        if self.directory is not None:
            shutil.rmtree(self.directory, ignore_errors=True)
            self.directory = None

    def __enter__(self) -> Peer:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.cleanup()


class RedisServer(Peer):
    """redis-server on 127.0.0.1, no persistence, optional password.

    Restarting (stop() then start()) keeps the port, so clients can see a
    server come back."""

    program = "/usr/bin/redis-server"
    cli = "/usr/bin/redis-cli"

    def __init__(self, password: str | None = None, port: int | None = None) -> None:
        super().__init__()
        self.password = password
        self.port = port or free_port()

    def command(self) -> list[str]:
        args = [
            self.program, "--port", str(self.port), "--bind", "127.0.0.1",
            "--save", "", "--appendonly", "no", "--daemonize", "no",
            "--dir", self.directory or ".",
        ]
        if self.password is not None:
            args += ["--requirepass", self.password]
        return args

    def command_reply(self, *args: str, db: int = 0) -> bytes:
        """Send one command over a raw socket (AUTH and SELECT first when
        needed) and return the raw RESP reply of the command."""
        commands = []
        if self.password is not None:
            commands.append(["AUTH", self.password])
        if db:
            commands.append(["SELECT", str(db)])
        commands.append(list(args))
        payload = b""
        for command in commands:
            payload += b"*%d\r\n" % len(command)
            for arg in command:
                data = arg.encode("latin-1")
                payload += b"$%d\r\n%s\r\n" % (len(data), data)
        with socket.create_connection(("127.0.0.1", self.port), timeout=5) as s:
            s.sendall(payload)
            replies = _read_replies(s, len(commands))
        return replies[-1]

    def ready(self) -> bool:
        try:
            return self.command_reply("PING") == b"+PONG\r\n"
        except OSError:
            return False

    def server_spec(self, db: str = "", password: str | None = None) -> str:
        """An entry for redis_servers: ``127.0.0.1::PORT/db/password``."""
        pw = self.password if password is None else password
        return f"127.0.0.1::{self.port}/{db}/{pw or ''}"


def _read_replies(sock: socket.socket, count: int) -> list[bytes]:
    """Read *count* complete RESP replies (raw bytes each)."""
    buffer = b""
    replies: list[bytes] = []
    while len(replies) < count:
        end = _reply_end(buffer, 0)
        if end is None:
            chunk = sock.recv(65536)
            if not chunk:
                raise OSError("connection closed")
            buffer += chunk
            continue
        replies.append(buffer[:end])
        buffer = buffer[end:]
    return replies


def _reply_end(buffer: bytes, pos: int) -> int | None:
    line_end = buffer.find(b"\r\n", pos)
    if line_end < 0:
        return None
    kind = buffer[pos:pos + 1]
    if kind in (b"+", b"-", b":"):
        return line_end + 2
    size = int(buffer[pos + 1:line_end])
    if kind == b"$":
        end = line_end + 2 + max(size, 0) + (2 if size >= 0 else 0)
        return end if len(buffer) >= end else None
    pos = line_end + 2
    for _ in range(max(size, 0)):
        next_pos = _reply_end(buffer, pos)
        if next_pos is None:
            return None
        pos = next_pos
    return pos
