"""Compare how fast exim-py and Exim 4.96 relay mail over SMTP.

Each server runs as a daemon on loopback, accepts messages from Postfix's
``smtp-source`` for the non-local domain ``relay.test`` (an RCPT ACL
accepts it), and delivers every message straight away with its ``smtp``
transport, through a ``manualroute`` router, to Postfix's ``smtp-sink`` on
another loopback port.  Nothing is queued: Exim forks a delivery process
per message, exim-py delivers in-process after reception.  Each cell is
timed from the start of the timed batch until the sink has counted every
message, and reports messages relayed per second for both servers and the
ratio exim-py / Exim.  After each run the sink must have received exactly
the messages sent, the main log must hold one ``=>`` line per message and
no deferral or failure, and the spool's input directory must be empty (with
the server running and again after it has stopped); otherwise the benchmark
stops with the servers' output and log lines.

smtp-source and smtp-sink come from Debian's postfix package (see
accept_bench.py, whose helpers this script uses): the first run unpacks it
into ``bench/.cache/postfix``.

Usage: .venv/bin/python bench/relay_bench.py [--repeat N] [--quick] [--json]
       [--small N] [--large N] [--no-large] [--exim PATH] [--twistd PATH]
       [--tmpdir DIR] [--timeout S]
(as root: Exim runs with ``-C`` and ``exim_user = root``; smtp-sink drops to
``nobody``)
"""

from __future__ import annotations

import os
import pwd
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from accept_bench import (  # noqa: E402
    EXIM_ONLY,
    POSTFIX,
    POSTFIX_LIBS,
    BenchError,
    Server,
    arguments,
    cannot_run,
    free_port,
    print_json,
    send,
    stop_process,
    wait_for_banner,
)

SMTP_SINK = POSTFIX / "usr" / "sbin" / "smtp-sink"
SMALL, LARGE = 1024, 102_400
RECIPIENT = "rcpt@relay.test"
SINK_USER = "nobody"
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")

# The same text for both servers; Exim gets EXIM_ONLY in front.  As in
# accept_bench.py, sessions carry unlimited messages and the listen backlog
# is raised.  smtp_accept_queue_per_connection = 0: Exim's default (10)
# would queue every message after the tenth of a connection instead of
# delivering it (exim-py reads the option but does not act on it).  The
# sink is this machine (127.0.0.1 is a local interface), so the router
# needs self = send; the transport's port is the sink's.  One address per
# message, so each delivery is one SMTP transaction on a new connection.
# The transport has a user because Exim runs remote transports as exim_user
# (root here), which Debian's build refuses (fixed_never_users = root);
# exim-py looks the user up but does not change uid.
RELAY_COMMON = """\
primary_hostname = mta.test
domainlist local_domains = localhost
domainlist relay_domains = relay.test
daemon_smtp_ports = {port}
local_interfaces = 127.0.0.1
spool_directory = {spool}
log_file_path = {spool}/log/%slog
host_lookup =
rfc1413_hosts =
smtp_accept_max = 100
smtp_accept_max_per_connection = 1000000
smtp_accept_queue_per_connection = 0
smtp_connect_backlog = 100
tls_advertise_hosts =
acl_smtp_rcpt = acl_rcpt

begin acl

acl_rcpt:
  accept domains = +relay_domains
  deny   message = relay not permitted

begin routers

to_sink:
  driver = manualroute
  domains = +relay_domains
  route_list = * 127.0.0.1
  self = send
  transport = to_sink_smtp
  no_more

begin transports

to_sink_smtp:
  driver = smtp
  port = {sink_port}
  hosts_avoid_tls = *
  user = {transport_user}

begin retry

*  *  F,1h,1m
"""


def transport_user() -> str:
    """Debian's Exim user when there is one, else nobody."""
    try:
        return pwd.getpwnam("Debian-exim").pw_name
    except KeyError:
        return "nobody"


class Sink:
    """smtp-sink on a free loopback port, with its running message counter
    (``-c``) read from a pipe by a thread."""

    def __init__(self) -> None:
        self.port = 0
        self.process: subprocess.Popen[bytes] | None = None
        self.count = 0
        self.target = 0
        self.reached: float | None = None  # time.time() when count >= target
        self._cond = threading.Condition()
        self._reader: threading.Thread | None = None
        self._tail = b""

    def start(self) -> None:
        self.port = free_port()
        self.count, self.target, self.reached, self._tail = 0, 0, None, b""
        argv = [str(SMTP_SINK), "-c", "-u", SINK_USER, f"127.0.0.1:{self.port}", "1000"]
        env = dict(os.environ, LD_LIBRARY_PATH=str(POSTFIX_LIBS))
        self.process = subprocess.Popen(argv, env=env, stdin=subprocess.DEVNULL,
                                        stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        if wait_for_banner(self.port, 10, lambda: self.process.poll() is None):
            return
        if self.process.poll() is not None:
            said = self.process.stderr.read() if self.process.stderr else b""
            raise BenchError(f"smtp-sink exited with {self.process.returncode}: "
                             f"{said.decode(errors='replace')}")
        raise BenchError(f"smtp-sink: no banner on port {self.port} in 10 s")

    def _read(self) -> None:
        """Follow the counter line: "sess=N quit=N mesg=N", one per update,
        each ended by a carriage return."""
        assert self.process is not None and self.process.stdout is not None
        fd = self.process.stdout.fileno()
        while True:
            chunk = os.read(fd, 4096)
            if not chunk:
                return
            now = time.time()
            records = (self._tail + chunk).split(b"\r")
            self._tail = records.pop()
            for record in reversed(records):
                found = re.search(rb"mesg=(\d+)", record)
                if found:
                    with self._cond:
                        self.count = int(found.group(1))
                        if self.target and self.reached is None and self.count >= self.target:
                            self.reached = now
                        self._cond.notify_all()
                    break

    def expect(self, target: int) -> None:
        """Note the time at which the count reaches *target*."""
        with self._cond:
            self.target, self.reached = target, None
            if self.count >= target:
                self.reached = time.time()

    def wait(self, target: int, timeout: float) -> int:
        """The count once it reaches *target*, or when *timeout* runs out."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while self.count < target:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._cond.wait(left)
            return self.count

    def stop(self) -> None:
        if self.process is None:
            return
        stop_process(self.process, 10)
        if self._reader is not None:
            self._reader.join(5)
        for stream in (self.process.stdout, self.process.stderr):
            if stream is not None:
                stream.close()
        self.process = None


class RelayServer(Server):
    """A server whose configuration relays relay.test to the sink."""

    prefix = "relay-bench"

    def __init__(self, name: str, argv: list[str], sink: Sink,
                 tmpdir: str | None = None) -> None:
        super().__init__(name, argv, tmpdir)
        self.sink = sink

    def start(self) -> None:
        # Exim's transport process runs as transport_user(): it must reach
        # the spool (mkdtemp makes the directory 0700).
        self.directory.chmod(0o755)
        super().start()

    def config_text(self) -> str:
        text = RELAY_COMMON.format(port=self.port, spool=self.spool, sink_port=self.sink.port,
                                   transport_user=transport_user())
        return EXIM_ONLY + text if self.name == "exim" else text

    def on_spool(self) -> int:
        """Files left under the spool's input/ (-H, -D, -J, split or not)."""
        return sum(len(files) for _, _, files in os.walk(self.spool / "input"))

    def log_counts(self) -> dict[str, int]:
        """Deliveries (=>), deferrals (==) and failures (**) in the main log."""
        counts = {"=>": 0, "==": 0, "**": 0}
        try:
            lines = (self.spool / "log" / "mainlog").read_text(errors="replace").splitlines()
        except OSError:
            return counts
        for line in lines:
            for flag in counts:
                if f" {flag} " in line:
                    counts[flag] += 1
        return counts


def wait_empty(server: RelayServer, timeout: float) -> int:
    """Files on the spool once it is empty, or when *timeout* runs out."""
    deadline = time.monotonic() + timeout
    left = server.on_spool()
    while left and time.monotonic() < deadline:
        time.sleep(0.05)
        left = server.on_spool()
    return left


def machine_busy() -> float:
    """CPU seconds the whole machine has spent busy (all CPUs), from /proc/stat."""
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    # user nice system idle iowait irq softirq steal ...
    return (sum(fields[:3]) + sum(fields[5:8])) / CLOCK_TICKS


def process_busy(pid: int) -> float:
    """CPU seconds (user + system, all threads) a process and its live
    children have used: exim-py's daemon and its delivery workers."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    total = (int(fields[11]) + int(fields[12])) / CLOCK_TICKS
    children: list[int] = []
    for task in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{task}/children") as f:
                children += [int(c) for c in f.read().split()]
        except OSError:
            continue
    for child in children:
        try:
            total += process_busy(child)
        except OSError:
            continue    # gone since it was listed
    return total


def one_run(server: RelayServer, sink: Sink, size: int, sessions: int, count: int,
            timeout: float) -> dict[str, float]:
    """One timed run on a fresh sink and server: messages per second until
    the sink has them all ("rate") and as smtp-source saw it ("client");
    the whole machine's CPU milliseconds per message ("cpu_ms"); and the
    server's own CPU milliseconds per message, its live children included
    ("process_cpu_ms", meaningful for exim-py only, whose delivery workers
    live as long as it: Exim's work is in short-lived children)."""
    sink.start()
    try:
        server.start()
        try:
            warm = max(sessions, count // 10)
            send(server, size, sessions, warm, timeout, RECIPIENT)
            if sink.wait(warm, 60) != warm or wait_empty(server, 30):
                raise BenchError(f"{server.name}: warm-up of {warm} messages: the sink has "
                                 f"{sink.count}, {server.on_spool()} files on the spool\n"
                                 f"{server.report()}")
            expected = warm + count
            sink.expect(expected)
            assert server.process is not None
            pid = server.process.pid
            busy, own = machine_busy(), process_busy(pid)
            wall, seconds = send(server, size, sessions, count, timeout, RECIPIENT)
            got = sink.wait(expected, 60)
            busy, own = machine_busy() - busy, process_busy(pid) - own
            reached = sink.reached
            left = wait_empty(server, 30)
            time.sleep(0.2)  # a late duplicate would show up in the count
            if not server.alive():
                raise BenchError(f"{server.name} died during the run\n{server.report()}")
            if reached is None or sink.count != expected or left:
                raise BenchError(f"{server.name}: sent {expected} messages ({warm} warm-up + "
                                 f"{count}), the sink has {sink.count} (had {got} at the "
                                 f"wait's end), {left} files on the spool\n{server.report()}")
        finally:
            server.stop()
    finally:
        sink.stop()
    after = server.on_spool()
    logged = server.log_counts()
    panic = server.spool / "log" / "paniclog"
    if panic.exists() and panic.stat().st_size:
        raise BenchError(f"{server.name}: the panic log is not empty\n{server.report()}")
    if after or sink.count != expected or logged != {"=>": expected, "==": 0, "**": 0}:
        raise BenchError(f"{server.name}: after shutdown {after} files on the spool, the sink "
                         f"has {sink.count} of {expected}, main log: {logged}\n"
                         f"{server.report()}")
    return {"rate": count / (reached - wall), "client": count / seconds,
            "cpu_ms": 1000 * busy / count, "process_cpu_ms": 1000 * own / count}


def main() -> int:
    ap = arguments(__doc__, 1000, 200)
    ap.add_argument("--no-large", action="store_true", help="leave out the 100 KB cell")
    args = ap.parse_args()
    small = args.small or (200 if args.quick else 1000)
    large = args.large or (50 if args.quick else 200)
    cells = [(SMALL, 1), (SMALL, 20)] + ([] if args.no_large else [(LARGE, 20)])
    problem = cannot_run(args)
    if problem:
        print(problem, file=sys.stderr)
        return 2
    if not SMTP_SINK.exists():
        print(f"no smtp-sink in {POSTFIX}", file=sys.stderr)
        return 2

    sink = Sink()
    servers = {
        "exim": RelayServer("exim", [args.exim], sink, args.tmpdir),
        "exim-py": RelayServer("exim-py", [args.twistd, "-n", "--pidfile=", "exim-py"],
                               sink, args.tmpdir),
    }
    results = []
    started = time.perf_counter()
    try:
        for size, sessions in cells:
            count = small if size == SMALL else large
            runs: dict[str, list[dict[str, float]]] = {name: [] for name in servers}
            # Alternate the two so that machine-load drift hits both alike.
            for _ in range(max(1, args.repeat)):
                for name, server in servers.items():
                    runs[name].append(one_run(server, sink, size, sessions, count,
                                              args.timeout))
            # The fastest run of each server, with that run's CPU figures.
            best = {name: max(r, key=lambda run: run["rate"]) for name, r in runs.items()}
            seen = {name: max(run["client"] for run in r) for name, r in runs.items()}
            results.append({"size": size, "sessions": sessions, "messages": count,
                            "exim": round(best["exim"]["rate"], 1),
                            "exim_py": round(best["exim-py"]["rate"], 1),
                            "ratio": round(best["exim-py"]["rate"] / best["exim"]["rate"], 3),
                            "client_exim": round(seen["exim"], 1),
                            "client_exim_py": round(seen["exim-py"], 1),
                            "client_ratio": round(seen["exim-py"] / seen["exim"], 3),
                            "cpu_ms_exim": round(best["exim"]["cpu_ms"], 2),
                            "cpu_ms_exim_py": round(best["exim-py"]["cpu_ms"], 2),
                            "process_cpu_ms_exim_py":
                                round(best["exim-py"]["process_cpu_ms"], 2),
                            "runs": {n: [{k: round(v, 2) for k, v in run.items()}
                                         for run in r] for n, r in runs.items()}})
            if not args.json:
                print(f"  {size // 1024} KB x {sessions}: done", file=sys.stderr)
    except BenchError as e:
        print(f"FAILED: {e}", file=sys.stderr)
        return 1
    finally:
        sink.stop()
        for server in servers.values():
            server.cleanup()
    elapsed = time.perf_counter() - started

    if args.json:
        print_json(args, elapsed, results)
        return 0
    print(f"{'':>24} {'relayed msg/s':^22} {'':>8}   {'machine CPU ms/msg':^18}"
          f"   accepted msg/s (smtp-source)")
    print(f"{'size':>6} {'sessions':>8} {'messages':>8} {'exim4':>10} {'exim-py':>10} "
          f"{'py/exim4':>9}   {'exim4':>8} {'exim-py':>8}   exim4 / exim-py")
    for r in results:
        print(f"{r['size'] // 1024:>4}KB {r['sessions']:>8} {r['messages']:>8} "
              f"{r['exim']:>10.0f} {r['exim_py']:>10.0f} {r['ratio']:>9.2f}   "
              f"{r['cpu_ms_exim']:>8.2f} {r['cpu_ms_exim_py']:>8.2f}   "
              f"{r['client_exim']:.0f} / {r['client_exim_py']:.0f}")
    print("exim-py's own CPU per message (ms): " + ", ".join(
        f"{r['size'] // 1024} KB x {r['sessions']} {r['process_cpu_ms_exim_py']:.2f}"
        for r in results))
    if args.repeat > 1:
        for r in results:
            print(f"{r['size'] // 1024} KB x {r['sessions']} runs (msg/s): " + "; ".join(
                f"{n} " + " ".join(f"{run['rate']:.0f}" for run in xs)
                for n, xs in r["runs"].items()))
    print(f"sink count, main log and spool checked after every run; "
          f"total time {elapsed:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
