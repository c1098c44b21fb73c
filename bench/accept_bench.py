"""Compare how fast exim-py and Exim 4.96 accept mail over SMTP.

Both servers run as daemons on loopback with equivalent configurations
(an RCPT ACL accepting the local domain, spool in a temporary directory,
no DNS or ident look-ups, ``queue_only = true`` for both: nothing is
delivered, so every message stays on the spool to be counted), and Postfix's
``smtp-source`` sends a fixed number of messages to each, for 1 KB and
100 KB messages over 1 and 50 concurrent sessions.  Each cell reports
messages accepted per second for both and the ratio exim-py / Exim.  After
each run the spool must hold exactly the messages sent; a server that loses
or duplicates mail stops the benchmark with its output and log lines.

smtp-source comes from Debian's postfix package, which cannot be installed
beside exim4: the script runs ``apt-get download postfix`` and unpacks the
.deb into ``bench/.cache/postfix`` the first time.

Usage: .venv/bin/python bench/accept_bench.py [--repeat N] [--quick] [--json]
       [--small N] [--large N] [--exim PATH] [--twistd PATH] [--tmpdir DIR]
       [--timeout S]
(as root: Exim runs with ``-C`` and ``exim_user = root``)
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
CACHE = HERE / ".cache"
POSTFIX = CACHE / "postfix"
SMTP_SOURCE = POSTFIX / "usr" / "sbin" / "smtp-source"
POSTFIX_LIBS = POSTFIX / "usr" / "lib" / "postfix"

SMALL, LARGE = 1024, 102_400
CELLS = [(SMALL, 1), (SMALL, 50), (LARGE, 1), (LARGE, 50)]
SENDER, RECIPIENT = "sender@localhost", "rcpt@localhost"

# The same text for both; Exim gets EXIM_ONLY in front.  Messages per
# connection are unlimited so that one session can carry a whole run
# (Exim's default smtp_accept_max_per_connection is 1000).  Exim's listen
# backlog defaults to 20: 50 sessions connecting at once overflow it and the
# kernel drops SYNs, which clients retry a second later; exim-py (Twisted's
# default of 50) accepts the option but does not use it yet.  queue_only is
# common: exim-py delivers straight after reception too, and a delivery
# (here an unroutable address and a bounce) would empty the spool.
COMMON = """\
primary_hostname = mta.test
queue_only = true
domainlist local_domains = localhost
daemon_smtp_ports = {port}
local_interfaces = 127.0.0.1
spool_directory = {spool}
log_file_path = {spool}/log/%slog
host_lookup =
rfc1413_hosts =
smtp_accept_max = 100
smtp_accept_max_per_connection = 1000000
smtp_connect_backlog = 100
tls_advertise_hosts =
acl_smtp_rcpt = acl_rcpt

begin acl

acl_rcpt:
  accept domains = +local_domains
  deny   message = relay not permitted
"""
EXIM_ONLY = """\
exim_user = root
exim_group = root
never_users =
"""


def ensure_smtp_source() -> Path:
    """smtp-source, downloaded and unpacked into bench/.cache if missing."""
    if SMTP_SOURCE.exists():
        return SMTP_SOURCE
    CACHE.mkdir(exist_ok=True)
    print("fetching smtp-source: apt-get download postfix", file=sys.stderr)
    subprocess.run(["apt-get", "download", "postfix"], cwd=CACHE, check=True,
                   stdout=subprocess.DEVNULL)
    deb = sorted(CACHE.glob("postfix_*.deb"))[-1]
    subprocess.run(["dpkg", "-x", str(deb), str(POSTFIX)], check=True)
    if not SMTP_SOURCE.exists():
        raise SystemExit(f"{deb.name} has no usr/sbin/smtp-source")
    return SMTP_SOURCE


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class BenchError(Exception):
    """A run that cannot be counted; the text says what happened."""


class Server:
    """One MTA daemon on a free port, with its own directory and spool.
    Subclasses change the configuration by overriding config_text()."""

    prefix = "accept-bench"

    def __init__(self, name: str, argv: list[str], tmpdir: str | None = None) -> None:
        self.name = name
        self.argv = argv  # the command, without the config and port
        self.directory = Path(tempfile.mkdtemp(prefix=f"{self.prefix}-{name}-", dir=tmpdir))
        self.config = self.directory / "configure"
        self.output = self.directory / "daemon.out"
        self.port = 0
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def spool(self) -> Path:
        return self.directory / "spool"

    def config_text(self) -> str:
        """The configuration for the current port and spool."""
        text = COMMON.format(port=self.port, spool=self.spool)
        return EXIM_ONLY + text if self.name == "exim" else text

    def start(self) -> None:
        """Start on a fresh spool and wait for the banner."""
        shutil.rmtree(self.spool, ignore_errors=True)
        (self.spool / "log").mkdir(parents=True)
        self.port = free_port()
        text = self.config_text()
        if self.name == "exim":
            argv = self.argv + ["-C", str(self.config), "-bdf", "-oX", str(self.port)]
        else:
            argv = self.argv + ["-C", str(self.config)]
        self.config.write_text(text)
        env = dict(os.environ, PYTHONPATH=str(REPO))
        with open(self.output, "wb") as out:
            self.process = subprocess.Popen(argv, cwd=self.directory, env=env,
                                            stdin=subprocess.DEVNULL, stdout=out,
                                            stderr=subprocess.STDOUT)
        if not wait_for_banner(self.port, 30, lambda: self.process.poll() is None):
            if self.process.poll() is not None:
                raise BenchError(f"{self.name} exited with {self.process.returncode} "
                                 f"at start-up\n{self.report()}")
            raise BenchError(f"{self.name}: no banner on port {self.port} in 30 s\n"
                             f"{self.report()}")

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def stop(self) -> None:
        if self.process is None:
            return
        stop_process(self.process, 15)
        self.process = None

    def spooled(self) -> int:
        """Messages on the spool: -H files under input/ (split or not)."""
        found = 0
        for _, _, files in os.walk(self.spool / "input"):
            found += sum(1 for f in files if f.endswith("-H"))
        return found

    def last_written(self) -> float:
        """The newest modification time of a -H file: when the last message
        was safely on the spool (a -H file is written, then renamed)."""
        newest = 0.0
        for top, _, files in os.walk(self.spool / "input"):
            for f in files:
                if f.endswith("-H"):
                    newest = max(newest, os.stat(os.path.join(top, f)).st_mtime)
        return newest

    def report(self, lines: int = 30) -> str:
        """The tail of the daemon's output and of its main and panic logs."""
        parts = []
        for label, path in (("output", self.output),
                            ("mainlog", self.spool / "log" / "mainlog"),
                            ("paniclog", self.spool / "log" / "paniclog"),
                            ("rejectlog", self.spool / "log" / "rejectlog")):
            try:
                text = path.read_text(errors="replace").splitlines()
            except OSError:
                continue
            if text:
                parts.append(f"--- {self.name} {label} (last {min(lines, len(text))} "
                             f"of {len(text)} lines) ---")
                parts.extend(text[-lines:])
        return "\n".join(parts)

    def cleanup(self) -> None:
        self.stop()
        shutil.rmtree(self.directory, ignore_errors=True)


def send(server: Server, size: int, sessions: int, count: int,
         timeout: float, recipient: str = RECIPIENT) -> tuple[float, float]:
    """When smtp-source started (time.time()) and how many seconds it took to
    send *count* messages; raises on failure."""
    argv = [str(SMTP_SOURCE), "-d", "-s", str(sessions), "-m", str(count),
            "-l", str(size), "-f", SENDER, "-t", recipient, f"127.0.0.1:{server.port}"]
    env = dict(os.environ, LD_LIBRARY_PATH=str(POSTFIX_LIBS))
    wall = time.time()
    started = time.perf_counter()
    try:
        proc = subprocess.run(argv, env=env, capture_output=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise BenchError(f"{server.name}: smtp-source ({count} x {size} B, {sessions} "
                         f"sessions) timed out after {timeout:.0f} s\n{server.report()}") from None
    seconds = time.perf_counter() - started
    said = (proc.stdout + proc.stderr).decode(errors="replace").strip()
    if proc.returncode or said:
        # smtp-source is silent when all goes well; warnings (a 4xx or 5xx
        # reply, a dropped connection) mean messages may not have gone.
        raise BenchError(f"{server.name}: smtp-source ({count} x {size} B, {sessions} "
                         f"sessions) exit {proc.returncode}:\n{said[-3000:]}\n"
                         f"{server.report()}")
    return wall, seconds


def wait_spooled(server: Server, expected: int) -> int:
    """The spool count once it reaches *expected* (or stops changing)."""
    deadline = time.monotonic() + 10
    found = server.spooled()
    while found < expected and time.monotonic() < deadline:
        time.sleep(0.05)
        found = server.spooled()
    return found


def one_run(server: Server, size: int, sessions: int, count: int,
            timeout: float) -> tuple[float, float]:
    """Messages per second for one timed run on a freshly started server:
    measured to the last -H file written, and as smtp-source saw it."""
    server.start()
    try:
        warm = max(sessions, count // 10)
        send(server, size, sessions, warm, timeout)
        wall, seconds = send(server, size, sessions, count, timeout)
        expected = warm + count
        found = wait_spooled(server, expected)
        if not server.alive():
            raise BenchError(f"{server.name} died during the run\n{server.report()}")
        if found != expected:
            raise BenchError(f"{server.name}: sent {expected} messages ({warm} warm-up + "
                             f"{count}), the spool holds {found}\n{server.report()}")
        # smtp-source's own time ends after every session's QUIT is answered,
        # which Exim holds for 200 ms; the spool's time ends with the last
        # message written.  File times come from the kernel's coarse clock
        # (a few ms), so the spool's time is not allowed below half the client's.
        spool_seconds = max(server.last_written() - wall, seconds / 2)
    finally:
        server.stop()
    # Recount after shutdown: nothing may vanish or appear when it stops.
    after = server.spooled()
    if after != expected:
        raise BenchError(f"{server.name}: {expected} messages spooled, {after} after "
                         f"shutdown\n{server.report()}")
    return count / spool_seconds, count / seconds


def stop_process(process: subprocess.Popen, seconds: float) -> None:
    """SIGTERM, then SIGKILL if it has not exited after *seconds*."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(seconds)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def wait_for_banner(port: int, seconds: float, running: Callable[[], bool]) -> bool:
    """Wait until a server on *port* sends a 220 banner (True), gives up
    after *seconds* or as soon as *running()* is false (False)."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and running():
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
                if s.recv(200).startswith(b"220"):
                    s.sendall(b"QUIT\r\n")
                    return True
        except OSError:
            pass
        time.sleep(0.05)
    return False


def arguments(doc: str, small: int, large: int) -> argparse.ArgumentParser:
    """The options both benchmarks take (*small*, *large*: default counts)."""
    ap = argparse.ArgumentParser(description=doc.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=1, help="runs per cell; best is reported")
    ap.add_argument("--quick", action="store_true",
                    help="smoke run: 200 small and 50 large messages")
    ap.add_argument("--small", type=int, help=f"messages per 1 KB cell (default {small})")
    ap.add_argument("--large", type=int, help=f"messages per 100 KB cell (default {large})")
    ap.add_argument("--json", action="store_true", help="print one JSON line, no table")
    ap.add_argument("--exim", default="/usr/sbin/exim4")
    ap.add_argument("--twistd", default=str(Path(sys.executable).parent / "twistd"))
    ap.add_argument("--tmpdir", help="where the spools go (default: the system's temporary "
                    "directory); /dev/shm takes the disk's fsync cost out")
    ap.add_argument("--timeout", type=float, default=600.0, help="per smtp-source run, s")
    return ap


def cannot_run(args: argparse.Namespace) -> str | None:
    """Why the benchmark cannot run here (programs, root), or None; fetches
    smtp-source on first use."""
    for label, path in (("exim4", args.exim), ("twistd", args.twistd)):
        if not (os.path.isfile(path) and os.access(path, os.X_OK)):
            return f"{label} not found or not executable: {path}"
    if os.geteuid() != 0:
        return "run as root: Exim needs it for -C with exim_user = root"
    ensure_smtp_source()
    return None


def print_json(args: argparse.Namespace, elapsed: float, results: list[dict]) -> None:
    """The --json output: one line with the options and every cell."""
    print(json.dumps({"repeat": args.repeat, "seconds": round(elapsed, 1),
                      "spool_in": tempfile.gettempdir() if args.tmpdir is None
                      else args.tmpdir,
                      "cells": results}))


def main() -> int:
    args = arguments(__doc__, 2000, 300).parse_args()
    small = args.small or (200 if args.quick else 2000)
    large = args.large or (50 if args.quick else 300)
    problem = cannot_run(args)
    if problem:
        print(problem, file=sys.stderr)
        return 2

    servers = {
        "exim": Server("exim", [args.exim], args.tmpdir),
        "exim-py": Server("exim-py", [args.twistd, "-n", "--pidfile=", "exim-py"], args.tmpdir),
    }
    results = []
    started = time.perf_counter()
    try:
        for size, sessions in CELLS:
            count = small if size == SMALL else large
            runs: dict[str, list[float]] = {name: [] for name in servers}
            client: dict[str, list[float]] = {name: [] for name in servers}
            # Alternate the two so that machine-load drift hits both alike.
            for _ in range(max(1, args.repeat)):
                for name, server in servers.items():
                    rate, seen = one_run(server, size, sessions, count, args.timeout)
                    runs[name].append(rate)
                    client[name].append(seen)
            best = {name: max(r) for name, r in runs.items()}
            seen_best = {name: max(r) for name, r in client.items()}
            results.append({"size": size, "sessions": sessions, "messages": count,
                            "exim": round(best["exim"], 1),
                            "exim_py": round(best["exim-py"], 1),
                            "ratio": round(best["exim-py"] / best["exim"], 3),
                            "client_exim": round(seen_best["exim"], 1),
                            "client_exim_py": round(seen_best["exim-py"], 1),
                            "client_ratio": round(seen_best["exim-py"] / seen_best["exim"], 3),
                            "runs": {n: [round(x, 1) for x in r] for n, r in runs.items()}})
            if not args.json:
                print(f"  {size // 1024} KB x {sessions}: done", file=sys.stderr)
    except BenchError as e:
        print(f"FAILED: {e}", file=sys.stderr)
        return 1
    finally:
        for server in servers.values():
            server.cleanup()
    elapsed = time.perf_counter() - started

    if args.json:
        print_json(args, elapsed, results)
        return 0
    print(f"{'size':>6} {'sessions':>8} {'messages':>8} {'exim4 msg/s':>12} "
          f"{'exim-py msg/s':>13} {'py/exim4':>8}   as smtp-source saw it")
    for r in results:
        print(f"{r['size'] // 1024:>4}KB {r['sessions']:>8} {r['messages']:>8} "
              f"{r['exim']:>12.0f} {r['exim_py']:>13.0f} {r['ratio']:>8.2f}   "
              f"{r['client_exim']:.0f} / {r['client_exim_py']:.0f} = "
              f"{r['client_ratio']:.2f}")
    if args.repeat > 1:
        for r in results:
            print(f"{r['size'] // 1024} KB x {r['sessions']} runs: " + "; ".join(
                f"{n} " + " ".join(f"{x:.0f}" for x in xs) for n, xs in r["runs"].items()))
    print(f"spool checked after every run; total time {elapsed:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
