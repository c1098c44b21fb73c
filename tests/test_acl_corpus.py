"""The ACL corpus: host-checking sessions recorded from real Exim 4.96
(``exim4 -bh``), replayed through ``exim-py -bh``; every SMTP reply must
match, and so must the log lines Exim printed (``LOG:`` on stderr)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
import unittest

from tests.corpus import exim_py_command

# A copy of ../shared/reference/corpora/acl (the recorded cases only), so
# the suite runs them wherever it is cloned.
ACL_CORPUS = os.path.join(os.path.dirname(__file__), "data", "acl-corpus")
_ID = re.compile(rb"\b[0-9A-Za-z]{6}-[0-9A-Za-z]{6}-[0-9A-Za-z]{2}\b")


def cases() -> list[str]:
    if not os.path.isdir(ACL_CORPUS):
        return []
    return sorted(d for d in os.listdir(ACL_CORPUS)
                  if os.path.isfile(os.path.join(ACL_CORPUS, d, "session.txt")))


def run_case(name: str) -> tuple[bytes, bytes]:
    """Run one case; (stdout, stderr) with message ids normalised."""
    source = os.path.join(ACL_CORPUS, name)
    scratch = tempfile.mkdtemp(prefix=f"aclcorpus-{name}-")
    try:
        for entry in os.listdir(source):
            if entry not in ("exim.conf", "session.txt", "ip") and not entry.endswith(".txt"):
                shutil.copy(os.path.join(source, entry), scratch)
        with open(os.path.join(source, "exim.conf")) as f:
            config = f.read().replace("/ACLCORPUS/", scratch + "/")
        config_path = os.path.join(scratch, "exim.conf")
        with open(config_path, "w") as f:
            f.write(config)
        with open(os.path.join(source, "session.txt"), "rb") as f:
            session = f.read().replace(b"\n", b"\r\n")
        with open(os.path.join(source, "ip")) as f:
            ip = f.read().strip()
        result = subprocess.run(exim_py_command() + ["-C", config_path, "-bh", ip],
                                input=session, capture_output=True, timeout=60, cwd=scratch)
        return (_ID.sub(b"XXXXXX-XXXXXX-XX", result.stdout),
                _ID.sub(b"XXXXXX-XXXXXX-XX", result.stderr.replace(
                    scratch.encode() + b"/", b"/ACLCORPUS/")))
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _replies(stdout: bytes) -> list[bytes]:
    return [line for line in stdout.split(b"\n") if line[:3].isdigit()]


def _log_lines(stderr: bytes) -> list[bytes]:
    return [line for line in stderr.split(b"\n") if line.startswith(b"LOG: ")]


class AclCorpusTests(unittest.TestCase):
    """One test per case (generated below)."""

    def check_case(self, name: str) -> None:
        stdout, stderr = run_case(name)
        with open(os.path.join(ACL_CORPUS, name, "stdout.txt"), "rb") as f:
            expected_stdout = f.read()
        with open(os.path.join(ACL_CORPUS, name, "stderr.txt"), "rb") as f:
            expected_stderr = f.read()
        self.assertEqual(_replies(stdout), _replies(expected_stdout),
                         f"replies differ in case {name}; stderr:\n{stderr.decode()[-3000:]}")
        self.assertEqual(stdout, expected_stdout, f"stdout differs in case {name}")
        self.assertEqual(_log_lines(stderr), _log_lines(expected_stderr),
                         f"log lines differ in case {name}")


def _make_test(name: str):
    def test(self: AclCorpusTests) -> None:
        self.check_case(name)
    test.__name__ = f"test_{name.replace('-', '_')}"
    return test


for _case in cases():
    setattr(AclCorpusTests, f"test_{_case.replace('-', '_')}", _make_test(_case))


class CorpusPresentTests(unittest.TestCase):
    def test_corpus_found(self) -> None:
        """The corpus must be there, or the cases above silently vanish."""
        self.assertGreaterEqual(len(cases()), 15)
