"""The queue commands: -bp and its variants, -Mvh/-Mvb/-Mvl, -Mrm/-Mf/-Mt.

Spools are built with the spool writer (and a few files damaged by hand).
``EximDifferentialTests`` runs exim4 4.96 and exim-py on the same spool, or
on two copies of it for the commands that change it, and compares what
they print, their exit codes, the files they leave and their main log
lines; it is skipped when exim4 is missing (failed under
EXIMPY_REQUIRE_PEERS=1).  The other tests run in-process with a fixed clock.
"""

from __future__ import annotations

import io
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import unittest
from collections.abc import Sequence
from pathlib import Path

from tests.corpus import exim_py_command
from tests.peers import require_program
from twisted_mta.cli import UsageError, parse_arguments
from twisted_mta.config import load_config
from twisted_mta.queue.listing import (
    LIST_ALL,
    LIST_RANDOM,
    LIST_TOP,
    LIST_UNDELIVERED,
    count_queue,
    format_age,
    format_size,
    list_option,
    list_queue,
    queue_files,
)
from twisted_mta.queue.operations import (
    QueueUsageError,
    is_admin_user,
    parse_queue_option,
    run_queue_command,
)
from twisted_mta.spool.header import format_header_file, parse_header_file
from twisted_mta.spool.ids import make_message_id
from twisted_mta.spool.message import Recipient, SpoolHeader, SpoolMessage
from twisted_mta.spool.store import Spool
from twisted_mta.spool.tree import tree_build

EXIM = "/usr/sbin/exim4"
ROOT = Path(__file__).resolve().parent.parent

#: A configuration both exim4 (as root, with -C) and exim-py accept.
CONFIG = """\
primary_hostname = mx.example.com
qualify_domain = example.com
spool_directory = SPOOL
log_file_path = SPOOL/log/%slog
exim_user = root
exim_group = root
never_users =
deliver_drop_privilege = true
keep_environment =
queue_only = true
.ifdef SPLIT
split_spool_directory = true
.endif
"""

NOW = 1796520000  # a fixed "current time" for the in-process tests


def H(text: str, flag: str = " ") -> SpoolHeader:  # noqa: N802 - reads like the file
    return SpoolHeader(text + "\n", flag)


def message(message_id: str, received: int, sender: str = "a@example.org",
            recipients: Sequence[str] = ("b@example.com",), **kw: object) -> SpoolMessage:
    base: dict[str, object] = dict(
        id=message_id, sender=sender, received=(received, 15000),
        received_complete=(received, 16000), originator_login="joe",
        recipients=[Recipient(r) for r in recipients],
        headers=[H("Subject: queued"), H("Old: gone", "*")], body_linecount=1)
    base.update(kw)
    return SpoolMessage(**base)  # type: ignore[arg-type]


class SpoolBuilder:
    """Writes messages received *age* seconds before *now*."""

    def __init__(self, directory: str, now: int) -> None:
        self.directory = directory
        self.now = now
        self.spool = Spool(directory)
        self.split_spool = Spool(directory, split=True, create=False)
        self.pid = 100

    def add(self, age: int, body: bytes = b"hello\n", *, size: int | None = None,
            split: bool = False, fraction: int = 3, pid: int | None = None,
            **kw: object) -> str:
        if pid is None:
            self.pid += 1
            pid = self.pid
        received = self.now - age
        msg = message(make_message_id(received, pid, fraction), received, **kw)
        (self.split_spool if split else self.spool).write_message(msg, body)
        if size is not None:  # a sparse -D file of this size
            os.truncate(self.spool.data_path(msg.id), size)
        return msg.id

    def path(self, message_id: str, suffix: str) -> str:
        return getattr(self.spool.locate(message_id), suffix)


def build_queue(directory: str, now: int, fillers: int = 0) -> dict[str, str]:
    """A queue with one message for each thing -bp shows; returns their ids
    by name."""
    b = SpoolBuilder(directory, now)
    ids = {
        "plain": b.add(60, recipients=["b@example.com", "c@example.com"]),
        "bounce": b.add(25 * 60, sender="", frozen_at=now - 100),
        "delivered": b.add(3 * 3600, recipients=["b@example.com", "c@example.com", "d@e"],
                           non_recipients=tree_build(["c@example.com", "gen@x", "zz@q",
                                                      "aa@q"])),
        "untrusted": b.add(5 * 86400, b"x" * 5000, sender_set_untrusted=True),
        "tens": b.add(91 * 60, b"x" * 20000),
        "mega": b.add(100 * 86400, size=2_000_019),
        "huge": b.add(73 * 3600, size=20_000_019),
        "future": b.add(-300),
        "journal": b.add(7200, recipients=["b@example.com", "c@example.com"]),
        "split": b.add(1800, split=True),
        "norcpt": b.add(40 * 60, recipients=[]),
        "hdrerror": b.add(50 * 60),
        "enverror": b.add(55 * 60),
        "nodata": b.add(65 * 60),
        # Same second and sub-second part: Exim's merge sort decides.
        "tie1": b.add(4000, pid=900, fraction=7),
        "tie2": b.add(4000, pid=800, fraction=7),
        "tie3": b.add(4000, pid=850, fraction=7),
    }
    for i in range(fillers):
        ids[f"filler{i}"] = b.add(10 * i + 5, fraction=i % 200)
    with open(b.path(ids["journal"], "journal"), "w") as f:
        f.write("b@example.com\nother@x\n")
    _replace(b.path(ids["hdrerror"], "header"), b"\n016  Subject", b"\n099  Subject")
    _replace(b.path(ids["enverror"], "header"), b"\n<a@example.org>\n", b"\na@example.org\n")
    os.unlink(b.path(ids["nodata"], "data"))
    return ids


def _replace(path: str, old: bytes, new: bytes) -> None:
    with open(path, "rb") as f:
        data = f.read()
    assert old in data, (path, old)
    with open(path, "wb") as f:
        f.write(data.replace(old, new, 1))


def write_config(directory: str) -> str:
    path = os.path.join(directory, "exim.conf")
    with open(path, "w") as f:
        f.write(CONFIG)
    return path


def load(directory: str, spool: str, split: bool = False):
    defines = {"SPOOL": spool}
    if split:
        defines["SPLIT"] = ""
    return load_config(write_config(directory), defines=defines)


def listing(spool: str, option: int = LIST_TOP, ids: Sequence[str] = (), now: int = NOW,
            split: bool = False) -> str:
    out = io.BytesIO()
    list_queue(spool, out, option=option, message_ids=ids, now=now, split=split)
    return out.getvalue().decode("latin-1")


# ---------------------------------------------------------------- units

class FormatTests(unittest.TestCase):
    def test_sizes(self) -> None:
        cases = {0: "     ", 1: "    1", 1023: " 1023", 1024: " 1.0K", 5019: " 4.9K",
                 10239: "10.0K", 10240: "  10K", 20019: "  20K", 1048575: "1024K",
                 1048576: " 1.0M", 2_000_000: " 1.9M", 10 * 1048576: "  10M",
                 20_000_000: "  19M", -3: "   -3"}
        for size, text in cases.items():
            self.assertEqual(format_size(size), text, size)

    def test_ages(self) -> None:
        cases = {0: " 0m", 59: " 0m", 60: " 1m", 90 * 60: "90m", 91 * 60: " 2h",
                 72 * 3600 + 29 * 60: "72h", 73 * 3600: " 3d", 100 * 86400: "100d",
                 -300: "-5m", -30: " 0m"}
        for age, text in cases.items():
            self.assertEqual(format_age(age), text, age)

    def test_list_options(self) -> None:
        self.assertEqual(list_option("-bp"), ("bp", LIST_TOP))
        self.assertEqual(list_option("-bpu"), ("bp", LIST_UNDELIVERED))
        self.assertEqual(list_option("-bpa"), ("bp", LIST_ALL))
        self.assertEqual(list_option("-bpr"), ("bp", LIST_RANDOM))
        self.assertEqual(list_option("-bpra"), ("bp", LIST_RANDOM + LIST_ALL))
        self.assertEqual(list_option("-bpru"), ("bp", LIST_RANDOM + LIST_UNDELIVERED))
        self.assertEqual(list_option("-bpc"), ("bpc", 0))
        for bad in ("-bpx", "-bpcx", "-bpi", "-bpur", "-bprr"):
            self.assertIsNone(list_option(bad), bad)


class ArgumentTests(unittest.TestCase):
    ID = "1xa0Mo-00001c-03"

    def test_queue_modes(self) -> None:
        inv = parse_arguments(["-C", "x.conf", "-bpra", self.ID, "junk"])
        self.assertEqual((inv.mode, inv.arguments, inv.config_file),
                         ("bpra", [self.ID, "junk"], "x.conf"))
        inv = parse_arguments(["-Mrm", self.ID, self.ID])
        self.assertEqual((inv.mode, inv.arguments), ("Mrm", [self.ID, self.ID]))
        # -Mvh takes one id and then goes on with the options.
        inv = parse_arguments(["-Mvh", self.ID, "-C", "y.conf", "extra"])
        self.assertEqual((inv.mode, inv.arguments, inv.config_file),
                         ("Mvh", [self.ID, "extra"], "y.conf"))

    def test_queue_run_options(self) -> None:
        for option, expected in (("-q", (False, False, False)), ("-qf", (False, True, False)),
                                 ("-qff", (False, True, True)), ("-qq", (True, False, False)),
                                 ("-qqff", (True, True, True))):
            inv = parse_arguments([option])
            self.assertEqual((inv.mode, inv.queue_two_stage, inv.queue_force,
                              inv.queue_thaw), ("q", *expected), option)

    def test_exim_errors(self) -> None:
        with self.assertRaisesRegex(UsageError, "^exim: malformed message id x after -Mf "
                                    "option$"):
            parse_arguments(["-Mf", self.ID, "x"])
        with self.assertRaisesRegex(UsageError, "^exim: no message ids given after -Mvb"):
            parse_arguments(["-Mvb"])
        with self.assertRaisesRegex(UsageError, "^exim abandoned: unknown, malformed, or "
                                    "incomplete option -bpx$"):
            parse_arguments(["-bpx"])
        with self.assertRaises(UsageError):  # not ours: the general complaint
            parse_arguments(["-Mar", self.ID, "x@y"])
        self.assertIsNone(parse_queue_option("-Mg", [self.ID]))
        with self.assertRaises(QueueUsageError):
            parse_queue_option("-Mt", ["1xa0Mo-00001c-0_"])


# ---------------------------------------------------------------- listing, in-process

class ListingTests(unittest.TestCase):
    def setUp(self) -> None:
        self.dir = tempfile.mkdtemp(prefix="queue-list-")
        self.addCleanup(shutil.rmtree, self.dir, True)
        self.spool = os.path.join(self.dir, "spool")

    def test_small_queue(self) -> None:
        b = SpoolBuilder(self.spool, NOW)
        first = b.add(3 * 3600, recipients=["b@example.com", "c@example.com", "d@e"],
                      non_recipients=tree_build(["c@example.com", "gen@x"]))
        second = b.add(25 * 60, sender="", frozen_at=NOW - 60)
        expected = (
            f" 3h    23 {first} <a@example.org>\n"
            "          b@example.com\n"
            "        D c@example.com\n"
            "          d@e\n"
            "\n"
            f"25m    23 {second} <> *** frozen ***\n"
            "          b@example.com\n"
            "\n")
        self.assertEqual(listing(self.spool), expected)
        self.assertEqual(listing(self.spool, LIST_UNDELIVERED),
                         expected.replace("        D c@example.com\n", ""))
        self.assertEqual(listing(self.spool, LIST_ALL),
                         expected.replace("          d@e\n", "          d@e\n       +D gen@x\n"))
        self.assertEqual(count_queue(self.spool), 2)
        # The size: the headers but the "*" one ("Subject: queued\n", 16),
        # one for the blank line, and the body without the -D file's first
        # line ("hello\n", 6).

    def test_every_kind(self) -> None:
        ids = build_queue(self.spool, NOW)
        text = listing(self.spool)
        self.assertIn(f"100d  1.9M {ids['mega']} <a@example.org>\n", text)
        self.assertIn(f" 3d   19M {ids['huge']} ", text)
        self.assertIn(f" 5d  4.9K {ids['untrusted']} <a@example.org> (joe)\n", text)
        self.assertIn(f" 2h   20K {ids['tens']} ", text)
        self.assertIn(f"-5m    23 {ids['future']} ", text)
        self.assertIn(f"30m    23 {ids['split']} ", text)
        self.assertIn(f"40m    23 {ids['norcpt']} <a@example.org>\n\n", text)
        self.assertIn(f"65m       {ids['nodata']} ", text)  # no -D file: no size
        self.assertIn(f"\n\n 2h    23 {ids['journal']} <a@example.org>\n"
                      "        D b@example.com\n          c@example.com\n\n", text)
        # A fault in the headers: listed, with the recipients; the size
        # counts the bad header's length (99 instead of 16).
        header_size = os.path.getsize(Spool(self.spool).header_path(ids["hdrerror"]))
        self.assertIn(f"50m   106 {ids['hdrerror']} <a@example.org>\n"
                      f"    *** spool format error: size={header_size} ***\n"
                      "          b@example.com\n\n", text)
        # A fault in the envelope: only the id and the error.
        header_size = os.path.getsize(Spool(self.spool).header_path(ids["enverror"]))
        self.assertIn(f"\n      {ids['enverror']}\n"
                      f"    *** spool format error: size={header_size} ***\n\n", text)
        # Same time and sub-second part: together, in an order that depends
        # on the directory's (EximDifferentialTests checks it is Exim's).
        order = [qf.message_id for qf in queue_files(self.spool)]
        where = sorted(order.index(ids[n]) for n in ("tie1", "tie2", "tie3"))
        self.assertEqual(where, list(range(where[0], where[0] + 3)))
        self.assertEqual(order[where[-1] + 1], ids["nodata"])
        self.assertEqual(count_queue(self.spool), len(ids))
        all_text = listing(self.spool, LIST_ALL)
        self.assertIn("        D c@example.com\n          d@e\n       +D aa@q\n"
                      "       +D gen@x\n       +D zz@q\n\n", all_text)
        self.assertIn("        D b@example.com\n          c@example.com\n"
                      "       +D other@x\n\n", all_text)

    def test_named_messages(self) -> None:
        ids = build_queue(self.spool, NOW)
        missing = ids["plain"][:-1] + "Z"
        text = listing(self.spool, ids=[ids["split"], missing, ids["plain"]])
        self.assertEqual(text.split("\n\n")[1],
                         f"      {missing}\n    *** spool read error: No such file or "
                         "directory ***")
        self.assertTrue(text.startswith(f"30m    23 {ids['split']} <a@example.org>\n"))
        self.assertTrue(text.endswith("          c@example.com\n\n"))

    def test_random_order(self) -> None:
        ids = build_queue(self.spool, NOW, fillers=20)
        names = [n for n in os.listdir(os.path.join(self.spool, "input")) if n.endswith("-H")]
        # Not sorted, but every message once; another second, another order.
        shuffled = [qf.name for qf in queue_files(self.spool, randomize=True, now=NOW)]
        self.assertEqual(sorted(shuffled), sorted(names + [ids["split"] + "-H"]))
        self.assertNotEqual(shuffled,
                            [qf.name for qf in queue_files(self.spool, randomize=True,
                                                           now=NOW + 1)])
        # Low bits all zero: each file goes to the front.
        front = [qf.name for qf in queue_files(self.spool, randomize=True, now=0x10000)]
        self.assertEqual(front[-1], names[0])

    def test_empty_subdirectory_is_removed(self) -> None:
        Spool(self.spool)
        for top in ("input", "msglog"):
            os.makedirs(os.path.join(self.spool, top, "Q"))
        self.assertEqual(listing(self.spool, split=True), "")
        self.assertTrue(os.path.isdir(os.path.join(self.spool, "input", "Q")))
        self.assertEqual(listing(self.spool), "")
        for top in ("input", "msglog"):
            self.assertFalse(os.path.exists(os.path.join(self.spool, top, "Q")))

    def test_permission(self) -> None:
        config = load(self.dir, self.spool)
        out, err = io.BytesIO(), io.BytesIO()
        self.assertEqual(run_queue_command(config, "bp", [], out, err, admin=False), 1)
        self.assertEqual(err.getvalue(), b"exim: permission denied\n")
        self.assertTrue(is_admin_user(config, self.spool, uid=0, gid=5, groups=[]))
        self.assertFalse(is_admin_user(config, self.spool, uid=1000, gid=1000, groups=[7]))
        self.assertTrue(is_admin_user(config, self.spool, uid=1000, gid=0, groups=[]))


# ---------------------------------------------------------------- actions, in-process

class _FixedClock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


class LockHolder:
    """Another process holding Exim's lock on a -D file, as a delivery
    does (POSIX locks do not conflict within one process)."""

    def __init__(self, path: str) -> None:
        code = ("import os, sys\n"
                "from twisted_mta.spool.store import lock_data_file\n"
                f"fd = os.open({path!r}, os.O_RDWR)\n"
                "lock_data_file(fd)\n"
                "print('locked', flush=True)\n"
                "sys.stdin.read()\n")
        self.process = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT,
                                        stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                        env={**os.environ, "PYTHONPATH": str(ROOT)})
        assert self.process.stdout is not None
        line = self.process.stdout.readline()
        assert line == b"locked\n", line

    def release(self) -> None:
        assert self.process.stdin is not None
        self.process.stdin.close()
        self.process.wait(timeout=30)
        if self.process.stdout is not None:
            self.process.stdout.close()

    def __enter__(self) -> LockHolder:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


class ActionTests(unittest.TestCase):
    def setUp(self) -> None:
        self.dir = tempfile.mkdtemp(prefix="queue-act-")
        self.addCleanup(shutil.rmtree, self.dir, True)
        self.spool = os.path.join(self.dir, "spool")
        self.config = load(self.dir, self.spool)
        self.builder = SpoolBuilder(self.spool, NOW)
        self.clock = _FixedClock(NOW + 30)
        self.user = _user()

    def run_mode(self, mode: str, *ids: str) -> tuple[int, str]:
        out, err = io.BytesIO(), io.BytesIO()
        status = run_queue_command(self.config, mode, list(ids), out, err, clock=self.clock,
                                   admin=True)
        self.assertEqual(err.getvalue(), b"")
        return status, out.getvalue().decode("latin-1")

    def mainlog(self) -> list[str]:
        path = os.path.join(self.spool, "log", "mainlog")
        if not os.path.exists(path):
            return []
        with open(path) as f:
            lines = f.read().splitlines()
        stamp = time.strftime("%Y-%m-%d %H:%M:%S ", time.localtime(self.clock.now))
        for line in lines:
            self.assertTrue(line.startswith(stamp), line)
        return [line[len(stamp):] for line in lines]

    def test_freeze_and_thaw(self) -> None:
        mid = self.builder.add(60)
        header = self.builder.path(mid, "header")
        self.assertEqual(self.run_mode("Mf", mid), (0, f"Message {mid} is now frozen\n"))
        msg = parse_header_file(Path(header).read_bytes())
        self.assertEqual(msg.frozen_at, NOW + 30)
        self.assertFalse(msg.manual_thaw)
        self.assertEqual(self.run_mode("Mf", mid), (1, f"Message {mid} is already frozen\n"))
        self.assertEqual(self.run_mode("Mt", mid), (0, f"Message {mid} is no longer frozen\n"))
        msg = parse_header_file(Path(header).read_bytes())
        self.assertIsNone(msg.frozen_at)
        self.assertTrue(msg.manual_thaw)
        self.assertIn(b"\n-manual_thaw\n", Path(header).read_bytes())
        self.assertEqual(self.run_mode("Mt", mid), (1, f"Message {mid} is not frozen\n"))
        self.assertEqual(self.mainlog(), [f"{mid} frozen by {self.user}",
                                          f"{mid} unfrozen by {self.user}"])
        # Nothing else in the file changed.
        msg.manual_thaw = False
        self.assertEqual(format_header_file(msg),
                         format_header_file(message(mid, NOW - 60)))

    def test_remove(self) -> None:
        mid = self.builder.add(60, split=True)
        other = self.builder.add(120)
        Spool(self.spool).append_msglog(other, "a line\n")
        with open(self.builder.path(other, "journal"), "w") as f:
            f.write("b@example.com\n")
        status, text = self.run_mode("Mrm", mid, other)
        self.assertEqual((status, text), (0, f"Message {mid} has been removed\n"
                                             f"Message {other} has been removed\n"))
        self.assertEqual(Spool(self.spool).list_ids(), [])
        self.assertEqual(os.listdir(os.path.join(self.spool, "msglog")), [])
        self.assertEqual(self.mainlog(), [f"{mid} removed by {self.user}", f"{mid} Completed",
                                          f"{other} removed by {self.user}",
                                          f"{other} Completed"])

    def test_remove_debris(self) -> None:
        gone = self.builder.add(60)
        os.unlink(self.builder.path(gone, "data"))
        no_header = self.builder.add(70)
        os.unlink(self.builder.path(no_header, "header"))
        data = os.path.join(self.spool, "input", no_header + "-D")
        status, text = self.run_mode("Mrm", gone, no_header)
        self.assertEqual(status, 1)
        self.assertEqual(text, (
            f"Spool data file for {gone} does not exist\n"
            "Continuing, to ensure all files removed\n"
            f"Message {gone} has been removed or did not exist\n"
            f"Spool read error for {no_header}-H: No such file or directory\n"
            "Continuing to ensure all files removed\n"
            f"Message {no_header} has been removed\n"))
        self.assertFalse(os.path.exists(data))
        self.assertEqual(self.mainlog(), [
            f"{gone} Spool file {gone}-D not found",
            f"{gone} removed by {self.user}", f"{gone} Completed",
            f"{no_header} removed by {self.user}", f"{no_header} Completed"])
        # Nothing there at all: no "removed" lines.
        status, text = self.run_mode("Mrm", gone)
        self.assertEqual(status, 1)
        self.assertTrue(text.endswith(f"Message {gone} has been removed or did not exist\n"))
        self.assertEqual(self.mainlog()[-1], f"{gone} Spool file {gone}-D not found")
        self.assertEqual(self.run_mode("Mf", gone),
                         (1, f"Spool data file for {gone} does not exist\n"))

    def test_locked_message_is_left_alone(self) -> None:
        mid = self.builder.add(60)
        before = Path(self.builder.path(mid, "header")).read_bytes()
        with LockHolder(self.builder.path(mid, "data")):
            for mode in ("Mrm", "Mf", "Mt"):
                self.assertEqual(self.run_mode(mode, mid), (1, f"Message {mid} is locked\n"))
            # Looking is allowed while a delivery runs.
            self.assertEqual(self.run_mode("Mvh", mid), (0, before.decode("latin-1")))
        self.assertEqual(Path(self.builder.path(mid, "header")).read_bytes(), before)
        self.assertEqual(self.mainlog(), [
            f"{mid} Spool file for {mid} is locked (another process is handling this message)"
        ] * 3)
        # Once the lock is released the removal goes ahead.
        self.assertEqual(self.run_mode("Mrm", mid), (0, f"Message {mid} has been removed\n"))

    def test_show(self) -> None:
        mid = self.builder.add(60, body=b"line 1\nline 2\n", split=True)
        Spool(self.spool, split=True).append_msglog(mid, "2026-12-06 00:00:00 a line\n")
        header = Path(self.builder.path(mid, "header")).read_bytes()
        self.assertEqual(self.run_mode("Mvh", mid), (0, header.decode()))
        self.assertEqual(self.run_mode("Mvb", mid), (0, f"{mid}-D\nline 1\nline 2\n"))
        self.assertEqual(self.run_mode("Mvl", mid), (0, "2026-12-06 00:00:00 a line\n"))
        missing = mid[:-1] + "Z"
        for mode, text in (("Mvh", f"input file for {missing}-H"),
                           ("Mvb", f"input file for {missing}-D"),
                           ("Mvl", f"msglog file for {missing}")):
            self.assertEqual(self.run_mode(mode, missing),
                             (1, f"Failed to open {text}: No such file or directory\n"))
        self.assertEqual(self.run_mode("Mvh", mid, "more"),
                         (1, "*** Only one message can be listed at once\n"))
        self.config.main["message_logs"] = False
        self.assertEqual(self.run_mode("Mvl", missing)[1].splitlines()[1],
                         "(No message logs are being created because the message_logs "
                         "option is false.)")

    def test_not_admin(self) -> None:
        mid = self.builder.add(60, originator_uid=4242)
        out, err = io.BytesIO(), io.BytesIO()
        for mode in ("Mvh", "Mf"):
            status = run_queue_command(self.config, mode, [mid], out, err, admin=False)
            self.assertEqual(status, 1)
        self.assertEqual(out.getvalue(), b"Permission denied\nPermission denied\n")


def _user() -> str:
    import pwd

    try:
        return pwd.getpwuid(os.getuid()).pw_name
    except KeyError:
        return f"uid {os.getuid()}"


# ---------------------------------------------------------------- against exim4

def _exim_usable() -> None:
    require_program(EXIM)
    if os.geteuid() != 0:
        if os.environ.get("EXIMPY_REQUIRE_PEERS") == "1":
            raise AssertionError("exim4 -C runs need root (EXIMPY_REQUIRE_PEERS=1)")
        raise unittest.SkipTest("exim4 -C runs need root")


class EximDifferentialTests(unittest.TestCase):
    def setUp(self) -> None:
        _exim_usable()
        self.dir = tempfile.mkdtemp(prefix="queue-diff-")
        self.addCleanup(shutil.rmtree, self.dir, True)
        self.config = write_config(self.dir)

    def spool_dir(self, name: str = "spool") -> str:
        return os.path.join(self.dir, name)

    def run_program(self, program: list[str], spool: str, args: Sequence[str],
                    split: bool = False) -> subprocess.CompletedProcess:
        macros = [f"-DSPOOL={spool}"] + (["-DSPLIT"] if split else [])
        return subprocess.run(program + ["-C", self.config, *macros, *args], cwd=ROOT,
                              capture_output=True, timeout=60, check=False,
                              env={**os.environ, "PYTHONPATH": str(ROOT)})

    def exim(self, spool: str, *args: str, split: bool = False) -> subprocess.CompletedProcess:
        return self.run_program([EXIM], spool, args, split)

    def ours(self, spool: str, *args: str, split: bool = False) -> subprocess.CompletedProcess:
        return self.run_program(exim_py_command(), spool, args, split)

    def same(self, spool: str, *args: str, split: bool = False) -> None:
        theirs, mine = self.exim(spool, *args, split=split), self.ours(spool, *args, split=split)
        self.assertEqual((mine.stdout.decode("latin-1"), mine.returncode),
                         (theirs.stdout.decode("latin-1"), theirs.returncode), args)
        self.assertEqual(mine.stderr, theirs.stderr, args)

    def same_listing(self, spool: str, option: int, *args: str, split: bool = False) -> None:
        """exim4's listing at some second against ours for that second,
        computed in-process (the order of -bpr and the ages depend on it)."""
        for _ in range(10):
            before = int(time.time())
            theirs = self.exim(spool, *args, split=split)
            if int(time.time()) != before:
                continue  # crossed a second: which one did exim4 see?
            self.assertEqual(theirs.returncode, 0)
            self.assertEqual(listing(spool, option, now=before, split=split),
                             theirs.stdout.decode("latin-1"), args)
            return
        self.fail("could not run exim4 within one second")

    def test_listings(self) -> None:
        spool = self.spool_dir()
        ids = build_queue(spool, int(time.time()), fillers=25)
        for option, arg in ((LIST_TOP, "-bp"), (LIST_UNDELIVERED, "-bpu"), (LIST_ALL, "-bpa"),
                            (LIST_RANDOM, "-bpr"), (LIST_RANDOM + LIST_ALL, "-bpra"),
                            (LIST_RANDOM + LIST_UNDELIVERED, "-bpru")):
            with self.subTest(arg=arg):
                self.same_listing(spool, option, arg)
        # The commands themselves (ages here are minutes old at most a
        # second apart; a retry covers a minute boundary).
        for args in (["-bpc"], ["-bpc", ids["plain"]], ["-bp", ids["split"], ids["plain"],
                                                         ids["plain"][:-1] + "Z"],
                     ["-bpa", "-bp", ids["delivered"]]):
            for attempt in range(3):
                try:
                    self.same(spool, *args)
                    break
                except AssertionError:
                    if attempt == 2:
                        raise

    def test_split_spool(self) -> None:
        spool = self.spool_dir()
        b = SpoolBuilder(spool, int(time.time()))
        for age in (10, 20, 30):
            b.add(age * 60, split=True)
        b.add(40 * 60)  # left over from before the split
        self.same_listing(spool, LIST_TOP, "-bp", split=True)
        self.same(spool, "-bpc", split=True)

    def test_show_commands(self) -> None:
        spool = self.spool_dir()
        ids = build_queue(spool, int(time.time()))
        Spool(spool).append_msglog(ids["plain"], "2026-12-06 00:00:00 something\n")
        missing = ids["plain"][:-1] + "Z"
        for args in (["-Mvh", ids["plain"]], ["-Mvb", ids["plain"]], ["-Mvl", ids["plain"]],
                     ["-Mvh", ids["split"]], ["-Mvb", ids["split"]], ["-Mvh", ids["hdrerror"]],
                     ["-Mvh", missing], ["-Mvb", missing], ["-Mvl", missing],
                     ["-Mvl", ids["split"]], ["-Mvh", ids["plain"], "x@y"],
                     ["-Mvh"], ["-Mvh", "1xa0Mo-00001c-0"], ["-bpx"], ["-bpcx"],
                     ["-Mrm", ids["plain"], "bad"]):
            with self.subTest(args=args):
                self.same(spool, *args)

    def test_actions(self) -> None:
        """Freeze, thaw and remove on two copies of one spool."""
        first = self.spool_dir("theirs")
        ids = build_queue(first, int(time.time()))
        Spool(first).append_msglog(ids["plain"], "a line\n")
        second = self.spool_dir("ours")
        shutil.copytree(first, second)
        missing = ids["plain"][:-1] + "Z"
        steps = [
            ["-Mf", ids["plain"], ids["split"], missing],
            ["-Mf", ids["plain"]],
            ["-Mt", ids["plain"], ids["bounce"]],
            ["-Mt", ids["plain"]],
            ["-Mf", ids["hdrerror"]],
            ["-Mrm", ids["plain"], ids["split"], ids["journal"], missing],
            ["-Mrm", ids["hdrerror"], ids["enverror"], ids["nodata"]],
        ]
        start = int(time.time())
        for args in steps:
            theirs, mine = self.exim(first, *args), self.ours(second, *args)
            with self.subTest(args=args):
                self.assertEqual((mine.stdout.decode(), mine.returncode, mine.stderr),
                                 (theirs.stdout.decode(), theirs.returncode, theirs.stderr))
        end = int(time.time())
        self.assertEqual(_tree(first, start, end), _tree(second, start, end))
        self.assertEqual(_log_texts(first), _log_texts(second))
        self.assertIn(f"{ids['plain']} frozen by root", _log_texts(second))
        # exim4 lists what we left exactly as we do.
        self.same_listing(second, LIST_ALL, "-bpa")

    def test_locked(self) -> None:
        first = self.spool_dir("theirs")
        ids = build_queue(first, int(time.time()))
        second = self.spool_dir("ours")
        shutil.copytree(first, second)
        mid = ids["plain"]
        with LockHolder(os.path.join(first, "input", mid + "-D")), \
                LockHolder(os.path.join(second, "input", mid + "-D")):
            for args in (["-Mrm", mid], ["-Mf", mid], ["-Mt", mid], ["-Mvb", mid]):
                theirs, mine = self.exim(first, *args), self.ours(second, *args)
                with self.subTest(args=args):
                    self.assertEqual((mine.stdout, mine.returncode),
                                     (theirs.stdout, theirs.returncode))
        self.assertEqual(_tree(first, 0, 0), _tree(second, 0, 0))
        self.assertEqual(_log_texts(first), _log_texts(second))
        self.assertEqual(len(_log_texts(first)), 3)
        # And exim4 respects a lock we hold (the one deliveries will take).
        with LockHolder(os.path.join(first, "input", mid + "-D")):
            self.assertEqual(self.exim(first, "-Mrm", mid).stdout,
                             f"Message {mid} is locked\n".encode())


def _tree(spool: str, start: int, end: int) -> dict[str, bytes]:
    """The input/ and msglog/ files of a spool, with a -frozen time
    checked to lie in [start, end] and then blanked."""
    files = {}
    for top in ("input", "msglog"):
        for path in sorted(Path(spool, top).rglob("*")):
            if path.is_file():
                data = path.read_bytes()
                for m in re.finditer(rb"\n-frozen (\d+)\n", data):
                    stamp = int(m.group(1))
                    if start or end:
                        assert start <= stamp <= end, (path, stamp, start, end)
                data = re.sub(rb"\n-frozen \d+\n", b"\n-frozen T\n", data)
                files[str(path.relative_to(spool))] = data
    return files


def _log_texts(spool: str) -> list[str]:
    """Main log lines without their time stamps."""
    path = Path(spool, "log", "mainlog")
    if not path.exists():
        return []
    return [line[20:] for line in path.read_text("latin-1").splitlines()]


if __name__ == "__main__":
    unittest.main()
