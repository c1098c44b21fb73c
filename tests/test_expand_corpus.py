"""Replay Exim 4.96's recorded ``-be`` results through ``exim-py -be``.

Two corpora run through the real command: the shared
``corpora/expand/expand-corpus.tsv`` and our own ``tests/data/expand-extra.tsv``
(1,125 further strings recorded from ``exim4 -be`` with the same
configuration and data files).  A row that differs must be listed, with its
reason, in the corpus's known-differences file; at least 95% must match.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile

from twisted.trial import unittest

from tests.corpus import decode_corpus_field, exim_py_command

DATA = os.path.join(os.path.dirname(__file__), "data")
# A copy of the shared reference corpus (corpora/expand), so CI has it.
EXPAND = os.path.join(DATA, "expand-corpus")
SEPARATOR = "@@corpus-separator@@"
PLACEHOLDER = "/EXPCORPUS/"
CORPUS_PORT = "127.0.0.1:27555"


def load_rows(path: str) -> list[tuple[str, str]]:
    rows = []
    with open(path, encoding="latin-1") as f:
        for line in f:
            line = line.rstrip("\n")
            if not line:
                continue
            string, _, result = line.partition("\t")
            rows.append((string, result))
    return rows


def load_known(path: str) -> dict[str, str]:
    known = {}
    with open(path, encoding="latin-1") as f:
        for line in f:
            if line.startswith("#") or not line.strip():
                continue
            string, _, reason = line.rstrip("\n").partition("\t")
            known[string] = reason
    return known


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ExpansionCorpusMixin:
    """Runs one corpus file against ``exim-py -be``."""

    corpus: str
    known_differences: str

    def setUp(self) -> None:
        # A short directory: the Unix socket's path must fit in 108 bytes.
        self.dir = tempfile.mkdtemp(prefix="expcorpus") + "/"
        self.addCleanup(shutil.rmtree, self.dir, True)
        for name in os.listdir(os.path.join(EXPAND, "data")):
            source = os.path.join(EXPAND, "data", name)
            target = os.path.join(self.dir, name)
            if os.path.isdir(source):
                shutil.copytree(source, target)
            else:
                shutil.copy(source, target)
        for sub in ("spool", "log"):
            os.makedirs(os.path.join(self.dir, sub))
        with open(os.path.join(EXPAND, "exim.conf"), encoding="latin-1") as f:
            config = f.read().replace(PLACEHOLDER, self.dir)
        self.config = os.path.join(self.dir, "exim.conf")
        with open(self.config, "w", encoding="latin-1") as f:
            f.write(config)
        self.port = free_port()
        self.server = subprocess.Popen(
            [sys.executable, os.path.join(EXPAND, "sockserver.py"),
             os.path.join(self.dir, "sock"), str(self.port)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        self.addCleanup(self._stop_server)
        self._wait_for_server()

    def _stop_server(self) -> None:
        self.server.kill()
        self.server.wait()

    def _wait_for_server(self) -> None:
        # The server is a real peer started by this fixture: poll, bounded.
        for _ in range(500):
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.1).close()
                if os.path.exists(os.path.join(self.dir, "sock")):
                    return
            except OSError:
                pass
            self.server.poll()
            if self.server.returncode is not None:
                break
            import time

            time.sleep(0.01)
        self.fail("sockserver.py did not start")

    def localise(self, text: str) -> str:
        return text.replace(PLACEHOLDER, self.dir).replace(CORPUS_PORT, f"127.0.0.1:{self.port}")

    def run_exim_py(self, strings: list[str]) -> list[str]:
        """Expand *strings* in one ``exim-py -be`` run; return the outputs."""
        args: list[str] = []
        for s in strings:
            args.extend([s, SEPARATOR])
        env = {k: v for k, v in os.environ.items()}
        env["EXPCORPUS_ENV"] = "env-value"
        proc = subprocess.run(
            exim_py_command() + ["-C", self.config, "-be", *[a.encode("latin-1") for a in args]],
            capture_output=True, env=env, timeout=300,
        )
        self.assertEqual(proc.returncode, 0, proc.stderr.decode("latin-1"))
        out = proc.stdout.decode("latin-1")
        pieces = out.split("\n" + SEPARATOR + "\n")
        self.assertEqual(pieces[-1], "", "output did not end with the separator")
        return pieces[:-1]

    def test_corpus(self) -> None:
        rows = load_rows(self.corpus)
        known = load_known(self.known_differences)
        strings = [self.localise(s) for s, _ in rows]
        outputs = self.run_exim_py(strings)
        self.assertEqual(len(outputs), len(rows))
        matched = 0
        unexpected = []
        fixed = []
        for (string, expected), output in zip(rows, outputs, strict=True):
            want = self.localise(decode_corpus_field(expected))
            if want.startswith("FAIL:"):
                want = "Failed: " + want[5:]
            if output == want:
                matched += 1
                if string in known:
                    fixed.append(string)
            elif string not in known:
                unexpected.append(f"{string!r}: expected {want!r}, got {output!r}")
        if unexpected:
            self.fail("rows differ from Exim 4.96 and are not listed as known:\n"
                      + "\n".join(unexpected))
        self.assertEqual(fixed, [], "rows listed as known differences now match: unlist them")
        self.assertGreaterEqual(matched / len(rows), 0.95, f"{matched}/{len(rows)} rows match")


class SharedCorpusTests(ExpansionCorpusMixin, unittest.TestCase):
    corpus = os.path.join(EXPAND, "expand-corpus.tsv")
    known_differences = os.path.join(DATA, "expand-known-differences.tsv")


class ExtraCorpusTests(ExpansionCorpusMixin, unittest.TestCase):
    corpus = os.path.join(DATA, "expand-extra.tsv")
    known_differences = os.path.join(DATA, "expand-extra-known-differences.tsv")
