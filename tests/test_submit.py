"""Local submission (``-bm``, ``-t``, ``-i``, ``-f``): the spool files and
the ``<=`` line, compared with what Exim 4.96 writes for the same input."""

from __future__ import annotations

import glob
import io
import os
import re
import shutil
import subprocess
import tempfile
import time
import unittest

from twisted.internet.task import Clock

from tests.peers import require_program
from tests.test_delivery import run
from twisted_mta.config import parse_config_text
from twisted_mta.log import EximLog, SyncLogWriter
from twisted_mta.spool.ids import MessageIdAllocator
from twisted_mta.spool.store import Spool
from twisted_mta.submit import Caller, Submission, SubmissionError, read_message, submit

EXIM = "/usr/sbin/exim4"
ID = re.compile(r"1[0-9A-Za-z]{5}-[0-9A-Za-z]{6}-[0-9A-Za-z]{2}")
TIMES = re.compile(r"(\d{10} 0\n|-received_time_usec \.\d+|-received_time_complete [\d.]+|"
                   r"\w\w\w, \d\d \w\w\w \d{4} \d\d:\d\d:\d\d [+-]\d{4})")

MESSAGES = {
    "extract": (b"Subject: hello\nTo: a@test.ex, b\nBcc: c@test.ex\n\nbody line\r\n"
                b".\nafter dot\n", ["-t"], Submission(b"", extract_recipients=True)),
    "arguments": (b"Subject: two\nFrom: Someone <s@elsewhere.ex>\nMessage-ID: <m1@x>\n\n"
                  b"text\n.\nmore\n", ["-i", "-f", "sender@test.ex", "u1@test.ex", "u2"],
                  Submission(b"", recipients=["u1@test.ex", "u2"], dot_ends=False,
                             sender="sender@test.ex")),
}


def normalise(text: str) -> str:
    return TIMES.sub("TIME", ID.sub("ID", text))


class SubmitTests(unittest.TestCase):

    def setUp(self) -> None:
        self.tmp = tempfile.mkdtemp(prefix="exim-py-submit-")
        os.chmod(self.tmp, 0o777)
        self.addCleanup(shutil.rmtree, self.tmp, True)

    def config_text(self, spool: str) -> str:
        return (f"primary_hostname = myhost.test.ex\nspool_directory = {spool}\n"
                f"log_file_path = {spool}/%slog\nqueue_only\ndeliver_drop_privilege = true\n")

    def ours(self, data: bytes, submission: Submission) -> tuple[str, bytes, str]:
        spool_dir = os.path.join(self.tmp, "py")
        config = parse_config_text(self.config_text(spool_dir))
        clock = Clock()
        clock.advance(time.time())
        stream = io.StringIO()
        log = EximLog.from_config(config, clock, 4242, SyncLogWriter(), testing_stream=stream)
        spool = Spool(spool_dir)
        submission.data = data
        message_id = run(submit(submission, config=config, spool=spool, log=log,
                                id_allocator=MessageIdAllocator(clock.seconds, 4242),
                                clock=clock, caller=Caller.current(config)))
        with open(spool.header_path(message_id), encoding="latin-1") as f:
            header = f.read()
        return header, spool.read_body(message_id), stream.getvalue()

    def exims(self, data: bytes, arguments: list[str]) -> tuple[str, bytes, str]:
        require_program(EXIM)
        if os.getuid() != 0:
            raise unittest.SkipTest("exim4 -C needs root")
        spool_dir = os.path.join(self.tmp, "exim")
        os.makedirs(spool_dir, mode=0o777)
        os.chmod(spool_dir, 0o777)
        path = os.path.join(self.tmp, "exim.conf")
        with open(path, "w") as f:
            f.write(self.config_text(spool_dir))
        subprocess.run([EXIM, "-C", path, "-odq", *arguments], input=data, check=True,
                       timeout=30, capture_output=True)
        (header_path,) = glob.glob(os.path.join(spool_dir, "input", "*-H"))
        with open(header_path, encoding="latin-1") as f:
            header = f.read()
        with open(header_path[:-2] + "-D", "rb") as f:
            body = f.read().split(b"\n", 1)[1]
        with open(os.path.join(spool_dir, "mainlog"), encoding="latin-1") as f:
            log = "".join(line for line in f if " <= " in line)
        return header, body, log

    def compare(self, name: str) -> None:
        data, arguments, submission = MESSAGES[name]
        header, body, log = self.ours(data, submission)
        exim_header, exim_body, exim_log = self.exims(data, arguments)
        self.assertEqual(normalise(header), normalise(exim_header))
        self.assertEqual(body, exim_body)
        line = normalise(log.splitlines()[-1])
        self.assertEqual(line[line.index("<="):], normalise(exim_log.strip())[
            normalise(exim_log.strip()).index("<="):])

    def test_extract_recipients(self) -> None:
        self.compare("extract")

    def test_arguments_no_dot_and_trusted_sender(self) -> None:
        self.compare("arguments")


class ReadMessageTests(unittest.TestCase):

    def test_dot_ends_unless_i(self) -> None:
        self.assertEqual(read_message(b"A: b\n\nx\n.\ny\n", True).body, b"x\n")
        self.assertEqual(read_message(b"A: b\n\nx\n.\ny\n", False).body, b"x\n.\ny\n")
        self.assertEqual(read_message(b".\n", True).body, b"")

    def test_no_recipients(self) -> None:
        config = parse_config_text("primary_hostname = h.test\n")
        with self.assertRaises(SubmissionError):
            run(submit(Submission(b"Subject: x\n\nbody\n", extract_recipients=True),
                       config=config, spool=None, log=None, id_allocator=None,
                       clock=Clock(), caller=Caller("u", 1, 1)))
