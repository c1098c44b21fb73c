"""Delivery worker processes (twisted_mta/queue/workers.py): the daemon's
side in memory, with a reactor that records the processes it is asked to
start.  The real processes are exercised by the daemon tests in
tests/test_delivery_peers.py (every delivery of a twistd daemon goes
through one), including a worker killed in the middle of a delivery."""

from __future__ import annotations

from typing import Any

from twisted.internet import task
from twisted.python.failure import Failure
from twisted.trial import unittest as trial

from twisted_mta.config import parse_config_text
from twisted_mta.queue.workers import DeliveryWorkers, default_worker_count, worker_command


class _Transport:
    def __init__(self) -> None:
        self.written = b""
        self.stdin_closed = False
        self.signals: list[str] = []

    def write(self, data: bytes) -> None:
        self.written += data

    def closeStdin(self) -> None:
        self.stdin_closed = True

    def signalProcess(self, name: str) -> None:
        self.signals.append(name)


class _Reactor(task.Clock):
    def __init__(self) -> None:
        super().__init__()
        self.started: list[Any] = []

    def spawnProcess(self, process: Any, executable: str, args: list[str], env: Any = None,
                     childFDs: Any = None) -> None:
        process.transport = _Transport()
        self.started.append((process, args))


class DeliveryWorkersTests(trial.TestCase):

    def pool(self, count: int = 2) -> tuple[DeliveryWorkers, _Reactor]:
        reactor = _Reactor()
        workers = DeliveryWorkers(parse_config_text("", "/etc/exim-py.conf"), count, reactor,
                                  command=["python", "-m", "twisted_mta.queue.workers", "c"])
        workers.startService()
        return workers, reactor

    def test_ids_go_to_the_least_busy_worker_and_outcomes_come_back(self) -> None:
        workers, reactor = self.pool()
        first, second = (p for p, _ in reactor.started)
        d1 = workers.deliver("1xa0Ih-00035i-01")
        d2 = workers.deliver("1xa0Ih-00035i-02", "qf")
        self.assertEqual(first.transport.written, b"1xa0Ih-00035i-01\n")
        self.assertEqual(second.transport.written, b"1xa0Ih-00035i-02 qf\n")
        # Outcomes may come in pieces.
        second.outReceived(b"1xa0Ih-00035i-02 incom")
        self.assertNoResult(d2)
        second.outReceived(b"plete\n")
        self.assertEqual(self.successResultOf(d2), "incomplete")
        first.outReceived(b"1xa0Ih-00035i-01 completed\n")
        self.assertEqual(self.successResultOf(d1), "completed")

    def test_a_dead_worker_is_replaced_and_its_ids_sent_again(self) -> None:
        workers, reactor = self.pool(1)
        (worker, _), = reactor.started
        d = workers.deliver("1xa0Ih-00035i-01", "q")
        worker.processEnded(Failure(Exception("killed")))
        self.assertEqual(len(reactor.started), 2)
        replacement = reactor.started[1][0]
        self.assertEqual(replacement.transport.written, b"1xa0Ih-00035i-01 q\n")
        replacement.outReceived(b"1xa0Ih-00035i-01 completed\n")
        self.assertEqual(self.successResultOf(d), "completed")
        self.assertEqual(workers.workers, [replacement])

    def test_stopping_closes_their_input_and_waits(self) -> None:
        workers, reactor = self.pool(1)
        (worker, _), = reactor.started
        d = workers.deliver("1xa0Ih-00035i-01")
        stopped = workers.stopService()
        self.assertTrue(worker.transport.stdin_closed)
        self.assertNoResult(stopped)
        # Nothing new is taken while stopping.
        self.assertEqual(self.successResultOf(workers.deliver("1xa0Ih-00035i-02")), "stopped")
        worker.processEnded(Failure(Exception("done")))
        self.assertEqual(self.successResultOf(d), "stopped")
        self.successResultOf(stopped)
        self.assertEqual(len(reactor.started), 1)

    def test_a_worker_that_will_not_stop_is_killed(self) -> None:
        workers, reactor = self.pool(1)
        (worker, _), = reactor.started
        workers.stopService()
        reactor.advance(61)
        self.assertEqual(worker.transport.signals, ["KILL"])

    def test_command_carries_the_configuration_and_its_macros(self) -> None:
        config = parse_config_text("", "/etc/exim-py.conf", {"A": "1", "B": "x=y"})
        command = worker_command(config)
        self.assertEqual(command[1:], ["-m", "twisted_mta.queue.workers", "/etc/exim-py.conf",
                                       "-D", "A=1", "-D", "B=x=y"])
        self.assertGreaterEqual(default_worker_count(), 1)


class WorkerProcessTests(trial.TestCase):
    """``python -m twisted_mta.queue.workers`` itself: ids in, outcomes out."""

    def test_delivers_what_it_is_given(self) -> None:
        import os
        import shutil
        import subprocess
        import sys
        import tempfile

        from tests.test_smtp_transport import spool_message
        from twisted_mta.spool.store import Spool

        tmp = tempfile.mkdtemp(prefix="exim-py-worker-")
        self.addCleanup(shutil.rmtree, tmp, True)
        config = os.path.join(tmp, "configure")
        with open(config, "w") as f:
            f.write(f"primary_hostname = mta.test\nspool_directory = {tmp}/spool\n"
                    f"log_file_path = {tmp}/log/%slog\n"
                    "begin routers\ndiscard:\n  driver = redirect\n  data = :blackhole:\n")
        message_id = spool_message(Spool(f"{tmp}/spool"), ["a@y.test"])
        env = dict(os.environ, PYTHONPATH=os.getcwd())
        done = subprocess.run([sys.executable, "-m", "twisted_mta.queue.workers", config],
                              input=f"{message_id}\nnot-an-id q\n1xa0Ih-00035i-0Z\n".encode(),
                              capture_output=True, timeout=60, env=env)
        self.assertEqual(done.returncode, 0, done.stderr)
        self.assertEqual(sorted(done.stdout.decode().splitlines()),
                         [f"{message_id} completed", "1xa0Ih-00035i-0Z missing",
                          "not-an-id invalid"])
        with open(f"{tmp}/log/mainlog") as f:
            log = f.read()
        self.assertIn(f"{message_id} => :blackhole: <a@y.test> R=discard", log)
        self.assertIn(f"{message_id} Completed", log)
