"""The ``exim-py`` command: -be, -bV, -bP and configuration errors."""

from __future__ import annotations

import os
import subprocess

from twisted.trial import unittest

from tests.corpus import exim_py_command

CONFIG = """\
primary_hostname = mail.example.com
qualify_domain = example.com
MY_MACRO = macro-value
domainlist local_domains = example.com : *.example.net
"""


class CommandTests(unittest.TestCase):
    def setUp(self) -> None:
        self.dir = os.path.abspath(self.mktemp())
        os.makedirs(self.dir)
        self.config = self.write("exim.conf", CONFIG)

    def write(self, name: str, text: str) -> str:
        path = os.path.join(self.dir, name)
        with open(path, "w") as f:
            f.write(text)
        return path

    def run_command(self, *args: str, stdin: bytes = b"") -> subprocess.CompletedProcess:
        return subprocess.run(
            exim_py_command() + list(args), input=stdin, capture_output=True, timeout=60
        )

    def test_be_arguments(self) -> None:
        proc = self.run_command("-C", self.config, "-be", "${uc:abc}", "x MY_MACRO", "$nosuch")
        self.assertEqual(proc.returncode, 0)
        self.assertEqual(
            proc.stdout,
            b"ABC\nx macro-value\nFailed: unknown variable name \"nosuch\"\n",
        )

    def test_be_stdin_prompts_and_continuation(self) -> None:
        # Exim prompts "> " before each line and prints a newline at the end;
        # a trailing backslash continues the line, leading blanks dropped.
        stdin = b"${lc:ABC}\nline \\\n   continued\n"
        proc = self.run_command("-C", self.config, "-be", stdin=stdin)
        self.assertEqual(proc.stdout, b"> abc\n> line continued\n> \n")

    def test_be_macro_definition(self) -> None:
        proc = self.run_command("-C", self.config, "-be", "NEW_ONE = x", "NEW_ONE")
        self.assertEqual(proc.stdout, b"Defined macro 'NEW_ONE'\nx\n")

    def test_define_overrides_file(self) -> None:
        proc = self.run_command("-C", self.config, "-DMY_MACRO=other", "-be", "MY_MACRO")
        self.assertEqual(proc.stdout, b"other\n")

    def test_bv_reports_version_and_file(self) -> None:
        proc = self.run_command("-C", self.config, "-bV")
        self.assertEqual(proc.returncode, 0)
        self.assertTrue(proc.stdout.startswith(b"Exim version 4.96"))
        self.assertIn(f"Configuration file is {self.config}".encode(), proc.stdout)

    def test_bad_option_is_reported_with_file_and_line(self) -> None:
        bad = self.write("bad.conf", "primary_hostname = x\nfoo = bar\n")
        proc = self.run_command("-C", bad, "-bV")
        self.assertEqual(proc.returncode, 1)
        self.assertRegex(
            proc.stderr.decode(),
            r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d Exim configuration error in line 2 of "
            + bad + ':\n  main option "foo" unknown\n',
        )

    def test_bp_prints_options(self) -> None:
        proc = self.run_command("-C", self.config, "-bP", "primary_hostname", "nosuch")
        self.assertEqual(proc.returncode, 1)
        self.assertEqual(
            proc.stdout, b"primary_hostname = mail.example.com\nnosuch is not a known option\n"
        )

    def test_default_configuration_loads(self) -> None:
        proc = self.run_command("-bV")
        self.assertEqual(proc.returncode, 0, proc.stderr)

    def test_bh_starttls_ends_the_session(self) -> None:
        # exim4 -bh answers "220 TLS go ahead", fails the handshake on its
        # standard input, logs it and stops; it never crashes.
        config = self.write("tls.conf", "primary_hostname = myhost.test.ex\n"
                                        "acl_smtp_rcpt = accept\n")
        proc = self.run_command("-C", config, "-bh", "192.0.2.1",
                                stdin=b"EHLO x\r\nSTARTTLS\r\nQUIT\r\n")
        lines = [line for line in proc.stdout.decode().splitlines()
                 if not line.startswith((">>>", "250-", "**** "))]
        self.assertEqual(lines[-1], "220 TLS go ahead")
        self.assertIn(b"LOG: TLS error on connection from (x) [192.0.2.1] (SSL_accept): "
                      b"host checking input cannot start TLS\n", proc.stderr)
        self.assertNotIn(b"Traceback", proc.stderr)

    def test_brt_prints_the_matching_rule(self) -> None:
        config = self.write("retry.conf", "primary_hostname = h.test\nbegin retry\n"
                                          "*.example.com  refused  F,1h,5m\n"
                                          "*  *  F,2h,15m; G,16h,1h,1.5; F,4d,6h\n")
        proc = self.run_command("-C", config, "-brt", "mx.example.com", "refused")
        self.assertEqual(proc.stdout, b"Retry rule: *.example.com  refused  F,1h,5m; \n")
        proc = self.run_command("-C", config, "-brt", "a@other.test")
        self.assertEqual(proc.stdout, b"Retry rule: *  *  F,2h,15m; G,16h,1h,1.5; F,4d,6h; \n")

    def test_bad_retry_rule_is_a_configuration_error(self) -> None:
        config = self.write("bad.conf", "primary_hostname = h.test\nbegin retry\n* * X,1h\n")
        proc = self.run_command("-C", config, "-bV")
        self.assertEqual(proc.returncode, 1)
        self.assertIn(b"Exim configuration error in line 3", proc.stderr)
