"""The exim-py daemon as a test peer: ``twistd -n exim-py -C FILE`` (or
``exim-py -C FILE -bd -oX PORT``) in a temporary directory, listening on
127.0.0.1 on a free port.

Usage::

    with EximPyDaemon(CONFIG_TEXT) as daemon:
        socket.create_connection(("127.0.0.1", daemon.port))
        wait_until(lambda: "<= " in daemon.mainlog())

The configuration text comes from the test; :meth:`EximPyDaemon.config`
puts in front of it whichever of ``primary_hostname``,
``daemon_smtp_ports``, ``local_interfaces``, ``spool_directory`` and
``log_file_path`` the text does not set itself (Exim refuses a main option
set twice).  The spool and the logs live in the peer's directory.

The daemon is ready when its port is in the LISTEN state (read from
``/proc/net/tcp``, so that no probe connection shows up in its log or
counts against its connection limits).  It is stopped by its pid (SIGTERM,
then SIGKILL); :meth:`kill9` kills it at once and :meth:`restart` starts it
again with the same directory, port and configuration, so start-up
recovery sees the spool as the crash left it.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import tempfile

from tests.peers import Peer, free_port, require_program, wait_until

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.path.dirname(sys.executable)
MODES = ("twistd", "bd")
#: Exim's message ids: 6-6-2 base-62 characters (4.96) or 6-11-4 (4.97 and later).
_MESSAGE_ID = re.compile(r"^[0-9A-Za-z]{6}-[0-9A-Za-z]{6,11}-[0-9A-Za-z]{2,4}$")


def _listening(port: int, host: str = "127.0.0.1") -> bool:
    """Whether something listens on *host*:*port* (TCP, IPv4), without
    connecting to it."""
    wanted = f"{int.from_bytes(socket.inet_aton(host), 'little'):08X}:{port:04X}"
    try:
        with open("/proc/net/tcp") as table:
            next(table)
            for line in table:
                fields = line.split()
                if fields[1] == wanted and fields[3] == "0A":     # 0A: LISTEN
                    return True
        return False
    except OSError:
        try:
            with socket.create_connection((host, port), timeout=1):
                return True
        except OSError:
            return False


def exim_py_environment() -> dict[str, str]:
    """The environment for exim-py's programs: ours, with the source tree
    first on PYTHONPATH (the twistd plugin lives there)."""
    env = dict(os.environ)
    env["PYTHONPATH"] = REPO + (os.pathsep + env["PYTHONPATH"]
                                if env.get("PYTHONPATH") else "")
    return env


class EximPyDaemon(Peer):
    """exim-py's daemon on 127.0.0.1:``port``.

    *config* is the configuration text (main options first, then any
    ``begin`` sections).  *mode* is ``twistd`` (``twistd -n --pidfile=
    exim-py -C FILE``) or ``bd`` (``exim-py -C FILE -bd -oX PORT``).
    *queue_interval* (``"1h"``) adds periodic queue runs, the first at
    start-up (the plugin's ``-q 1h``, or ``-bd -q1h``)."""

    program = os.path.join(BIN, "twistd")
    cli = os.path.join(BIN, "exim-py")

    def __init__(self, config: str = "", *, mode: str = "twistd",
                 hostname: str = "mta.test", port: int | None = None,
                 directory: str | None = None,
                 queue_interval: str | None = None) -> None:
        super().__init__()
        self.queue_interval = queue_interval
        if mode not in MODES:
            raise ValueError(f"unknown mode {mode!r}; one of {', '.join(MODES)}")
        self.text = config
        self.mode = mode
        self.hostname = hostname
        self.port = port or free_port()
        if mode == "bd":
            self.program = self.cli
        self.directory = directory or tempfile.mkdtemp(prefix="peer-exim-py-")
        # Exim (as a peer client) and the tests read files here.
        os.chmod(self.directory, 0o755)

    # -- paths -----------------------------------------------------------

    @property
    def config_path(self) -> str:
        return os.path.join(self.directory, "configure")

    @property
    def spool_directory(self) -> str:
        return os.path.join(self.directory, "spool")

    @property
    def log_directory(self) -> str:
        return os.path.join(self.directory, "log")

    @property
    def input_directory(self) -> str:
        return os.path.join(self.spool_directory, "input")

    # -- configuration ---------------------------------------------------

    def config(self) -> str:
        """The whole configuration file: the defaults the test's text does
        not set, then the text."""
        defaults = {
            "primary_hostname": self.hostname,
            "daemon_smtp_ports": str(self.port),
            "local_interfaces": "127.0.0.1",
            "spool_directory": self.spool_directory,
            "log_file_path": os.path.join(self.log_directory, "%slog"),
            # Messages stay on the spool for the test to read, unless the
            # test asks for delivery (no_queue_only).
            "queue_only": "true",
        }
        head = "".join(
            f"{name} = {value}\n" for name, value in defaults.items()
            if not re.search(rf"(?m)^\s*(no_)?{name}\b", self.text))
        return head + self.text

    def command(self) -> list[str]:
        with open(self.config_path, "w") as f:
            f.write(self.config())
        if self.mode == "bd":
            queue = [f"-q{self.queue_interval}"] if self.queue_interval else []
            return [self.cli, "-C", self.config_path, "-bd", "-oX", str(self.port), *queue]
        queue = ["-q", self.queue_interval] if self.queue_interval else []
        return [self.program, "-n", "--pidfile=", "exim-py", "-C", self.config_path, *queue]

    # -- start and stop --------------------------------------------------

    def environment(self) -> dict[str, str]:
        return exim_py_environment()

    def start(self) -> EximPyDaemon:
        require_program(self.program)
        env = self.environment()
        with open(os.path.join(self.directory, "output.log"), "ab") as log:
            # A session of its own: kill9() takes its delivery workers too.
            self.process = subprocess.Popen(
                self.command(), cwd=self.directory, stdout=log, stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL, env=env, start_new_session=True)
        try:
            wait_until(lambda: self.process.poll() is None and self.ready(), timeout=30)
        except AssertionError:
            output = self.output()
            self.stop()
            raise AssertionError(f"exim-py did not start listening on {self.port}:\n"
                                 f"{output[-3000:]}") from None
        return self

    def ready(self) -> bool:
        return _listening(self.port)

    @property
    def pid(self) -> int | None:
        return None if self.process is None else self.process.pid

    def kill9(self) -> None:
        """SIGKILL the daemon and its delivery workers (its process group)
        and reap it: a crash.  The pipe commands they started run on."""
        if self.process is not None:
            if self.process.poll() is None:
                for pid in self.worker_pids():
                    os.kill(pid, signal.SIGKILL)
                os.kill(self.process.pid, signal.SIGKILL)
            self.process.wait()
        self.process = None

    def worker_pids(self) -> list[int]:
        """The daemon's delivery worker processes (its children running
        twisted_mta.queue.workers)."""
        if self.process is None:
            return []
        found = []
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                with open(f"/proc/{entry}/stat") as f:
                    parent = int(f.read().rsplit(")", 1)[1].split()[1])
                with open(f"/proc/{entry}/cmdline", "rb") as f:
                    command = f.read()
            except (OSError, ValueError, IndexError):
                continue
            if parent == self.process.pid and b"twisted_mta.queue.workers" in command:
                found.append(int(entry))
        return found

    def restart(self) -> EximPyDaemon:
        """Stop (if still running) and start again: same port, directory,
        spool and configuration."""
        self.stop()
        wait_until(lambda: not _listening(self.port), timeout=10)
        return self.start()

    def exim_py(self, *args: str, input: bytes | None = None,
                timeout: float = 30) -> subprocess.CompletedProcess:
        """Run ``exim-py -C <this daemon's configuration> ARGS`` (``-bp``,
        ``-M id``, ``-odq -bm``...) in the daemon's directory, on the same
        spool and logs; standard output and error are bytes."""
        require_program(self.cli)
        if not os.path.exists(self.config_path):
            with open(self.config_path, "w") as f:
                f.write(self.config())
        return subprocess.run([self.cli, "-C", self.config_path, *args], input=input,
                              capture_output=True, cwd=self.directory, timeout=timeout,
                              env=self.environment())

    # -- what it wrote ---------------------------------------------------

    def _read(self, path: str) -> str:
        try:
            with open(path, encoding="utf-8", errors="surrogateescape") as f:
                return f.read()
        except FileNotFoundError:
            return ""

    def output(self) -> str:
        """twistd's (or exim-py -bd's) standard output and error."""
        return self._read(os.path.join(self.directory, "output.log"))

    def mainlog(self) -> str:
        return self._read(os.path.join(self.log_directory, "mainlog"))

    def rejectlog(self) -> str:
        return self._read(os.path.join(self.log_directory, "rejectlog"))

    def paniclog(self) -> str:
        return self._read(os.path.join(self.log_directory, "paniclog"))

    def wait_for_log(self, text: str | re.Pattern, count: int = 1,
                     timeout: float = 10.0) -> str:
        """Wait until the main log holds *text* (a string or a compiled
        pattern) *count* times; return the log."""
        def found() -> bool:
            log = self.mainlog()
            n = len(text.findall(log)) if isinstance(text, re.Pattern) else log.count(text)
            return n >= count
        try:
            wait_until(found, timeout=timeout)
        except AssertionError:
            raise AssertionError(f"{text!r} x{count} not in exim-py's main log:\n"
                                 f"{self.mainlog()}") from None
        return self.mainlog()

    def _input_directories(self) -> list[str]:
        top = self.input_directory
        found = [top]
        try:
            names = sorted(os.listdir(top))
        except FileNotFoundError:
            return []
        found += [os.path.join(top, n) for n in names
                  if len(n) == 1 and os.path.isdir(os.path.join(top, n))]
        return found

    def spool_files(self) -> list[str]:
        """Every file name under input/ (and its split subdirectories)."""
        names = []
        for directory in self._input_directories():
            names += [n for n in os.listdir(directory)
                      if os.path.isfile(os.path.join(directory, n))]
        return sorted(names)

    def spool_ids(self) -> list[str]:
        """Ids of the messages in the spool (those with a -H file)."""
        return sorted(n[:-2] for n in self.spool_files()
                      if n.endswith("-H") and _MESSAGE_ID.match(n[:-2]))

    def _spool_path(self, message_id: str, suffix: str) -> str:
        for directory in self._input_directories():
            path = os.path.join(directory, f"{message_id}-{suffix}")
            if os.path.exists(path):
                return path
        raise FileNotFoundError(f"no {message_id}-{suffix} in {self.input_directory}")

    def header_file(self, message_id: str) -> str:
        """The text of the message's -H file."""
        with open(self._spool_path(message_id, "H"), encoding="latin-1") as f:
            return f.read()

    def data_file(self, message_id: str) -> bytes:
        """The bytes of the message's -D file (its ``<id>-D`` line included)."""
        with open(self._spool_path(message_id, "D"), "rb") as f:
            return f.read()

    def body(self, message_id: str) -> bytes:
        """The body as spooled: the -D file after its first line."""
        return self.data_file(message_id).split(b"\n", 1)[1]
