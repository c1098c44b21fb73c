"""Tests for twisted_mta.log: log_selector, line format, log file names,
the writer thread, the -bh mode, H= and Received host texts.

Values marked [exim] were checked against Exim 4.96 (Debian
exim4-daemon-heavy): ``-bV``/``-d`` for selectors, ``-bh`` for LOG: lines and
host texts, and a daemon (``-bd -oX``) for the log files themselves.  The
live tests at the end repeat the comparison when exim4 is installed and we
are root."""

from __future__ import annotations

import calendar
import io
import os
import re
import shutil
import stat
import subprocess
import sys
import tempfile
import threading
import time

from twisted.internet import reactor
from twisted.internet.task import Clock
from twisted.trial import unittest

from tests.fakes import FakeConfig
from tests.peers import require_program
from twisted_mta.log import (
    DEFAULT_LOG_SELECTOR,
    LOG_ALERT,
    LOG_INFO,
    LOG_NOTICE,
    LOG_SELECTOR_BITS,
    LOG_SELECTOR_NAMES,
    EximLog,
    LogSelectorError,
    SyncLogWriter,
    SyslogSettings,
    ThreadLogWriter,
    check_log_file_path,
    format_log_path,
    host_and_ident,
    log_destinations,
    log_quote,
    log_timestamp,
    parse_log_selector,
    received_host_text,
    reject_log_headers,
    sender_fullhost,
    syslog_pieces,
)

EXIM = "/usr/sbin/exim4"
# 2026-12-01 11:28:58 UTC, a time seen in the reference runs.
NOON = calendar.timegm((2026, 12, 1, 11, 28, 58, 0, 0, 0))


def _clock(at: float = NOON + 0.586) -> Clock:
    clock = Clock()
    clock.advance(at)
    return clock


def _require_exim() -> str:
    if os.geteuid() != 0:
        raise unittest.SkipTest("running exim4 -C needs root")
    return require_program(EXIM)


class SelectorTests(unittest.TestCase):
    def test_defaults(self) -> None:
        # [exim] -d shows "log selectors = 00000ffc 64205022 0000000c" for
        # an unset log_selector: these twenty names.
        self.assertEqual(parse_log_selector(""), DEFAULT_LOG_SELECTOR)
        self.assertEqual(parse_log_selector(None), DEFAULT_LOG_SELECTOR)
        self.assertEqual(len(DEFAULT_LOG_SELECTOR), 20)
        self.assertIn("outgoing_interface", DEFAULT_LOG_SELECTOR)
        self.assertIn("queue_time_exclusive", DEFAULT_LOG_SELECTOR)
        self.assertNotIn("smtp_connection", DEFAULT_LOG_SELECTOR)

    def test_names(self) -> None:
        self.assertEqual(len(LOG_SELECTOR_NAMES), 56)
        self.assertEqual(len(LOG_SELECTOR_BITS), 56)
        for name in ("8bitmime", "proxy", "protocol_detail", "tls_resumption", "dkim_verbose"):
            self.assertIn(name, LOG_SELECTOR_NAMES)

    def test_plus_and_minus(self) -> None:
        got = parse_log_selector("+pid -retry_defer\t+millisec\n+smtp_connection")
        self.assertEqual(got, DEFAULT_LOG_SELECTOR - {"retry_defer"}
                         | {"pid", "millisec", "smtp_connection"})

    def test_no_space_needed_between_items(self) -> None:
        self.assertEqual(parse_log_selector("+all-pid"), LOG_SELECTOR_NAMES - {"pid"})

    def test_all(self) -> None:
        self.assertEqual(parse_log_selector("+all"), LOG_SELECTOR_NAMES)
        self.assertEqual(parse_log_selector("-all"), frozenset())
        self.assertEqual(parse_log_selector("-all +pid"), frozenset({"pid"}))
        self.assertEqual(parse_log_selector("+pid -all"), frozenset())

    def test_alias(self) -> None:
        self.assertEqual(parse_log_selector("-all +rejected_headers"),
                         frozenset({"rejected_header"}))

    def test_start(self) -> None:
        self.assertEqual(parse_log_selector("+pid", frozenset()), frozenset({"pid"}))

    def test_numeric(self) -> None:
        # [exim] "=5" gives "00000005 00000000 00000000".
        self.assertEqual(parse_log_selector("=5"),
                         frozenset({"address_rewrite", "connection_reject"}))
        self.assertEqual(parse_log_selector("=0x1000"), frozenset({"smtp_connection"}))
        self.assertEqual(parse_log_selector("=010"), frozenset({"delay_delivery"}))
        self.assertEqual(parse_log_selector("="), frozenset())

    def _error(self, text: str) -> LogSelectorError:
        with self.assertRaises(LogSelectorError) as caught:
            parse_log_selector(text)
        self.assertIsInstance(caught.exception, ValueError)
        return caught.exception

    def test_errors(self) -> None:
        # [exim] -bV with each setting.
        cases = {
            "+foo": "unknown log_selector setting: +foo",
            "+pid,+millisec":
                'malformed log_selector setting: + or - expected but found ",+millisec"',
            "+": "unknown log_selector setting: +",
            "=abc": "malformed numeric log_selector setting: =abc",
            "+all -bar": "unknown log_selector setting: -bar",
            "pid": 'malformed log_selector setting: + or - expected but found "pid"',
            "+All": "unknown log_selector setting: +All",
            "=0x": "malformed numeric log_selector setting: =0x",
        }
        for text, message in cases.items():
            self.assertEqual(str(self._error(text)), message, text)

    def test_error_keeps_partial_selection(self) -> None:
        # [exim] the complaint about ",+millisec" is logged with [pid].
        self.assertIn("pid", self._error("+pid,+millisec").partial)
        self.assertIn("millisec", self._error("+all -bar").partial)


class QuoteTests(unittest.TestCase):
    def test_controls(self) -> None:
        # [exim] logwrite = multi\nline\ttab\x01ctl
        self.assertEqual(log_quote("multi\nline\ttab\x01ctl"), "multi\\nline\ttab\\001ctl")
        self.assertEqual(log_quote("a\rb\bc\vd\fe\x7f"), "a\\rb\\bc\\vd\\fe\\177")

    def test_plain_text_unchanged(self) -> None:
        text = "H=(x) [192.0.2.1] F=<a@b.c>"
        self.assertIs(log_quote(text), text)

    def test_top_bit(self) -> None:
        self.assertEqual(log_quote("caf\xe9"), "caf\\351")
        self.assertEqual(log_quote("caf\xe9", top_bit_chars=True), "caf\xe9")
        self.assertEqual(log_quote("\u20ac"), "\\342\\202\\254")

    def test_tabs_and_spaces(self) -> None:
        self.assertEqual(log_quote("a\tb c", tabs=True), "a\\tb c")
        self.assertEqual(log_quote("a\tb c", spaces=True), "a\tb\\040c")


# (host name, helo, address, port, incoming_port, ident) -> (H= text, Received text),
# all [exim] from -bh with logwrite = FH=<$sender_fullhost> RH=<$sender_rcvhost>.
HOST_CASES = [
    ((None, None, "192.0.2.1", None, False, None), ("[192.0.2.1]", "[192.0.2.1]")),
    ((None, "client.test", "192.0.2.1", None, False, None),
     ("(client.test) [192.0.2.1]", "[192.0.2.1] (helo=client.test)")),
    ((None, None, "192.0.2.1", 4321, True, None),
     ("[192.0.2.1]:4321", "[192.0.2.1] (port=4321)")),
    ((None, "client.test", "192.0.2.1", 4321, True, None),
     ("(client.test) [192.0.2.1]:4321", "[192.0.2.1] (port=4321 helo=client.test)")),
    ((None, "client.test", "192.0.2.1", 4321, False, None),
     ("(client.test) [192.0.2.1]", "[192.0.2.1] (helo=client.test)")),
    ((None, "client.test", "192.0.2.1", 4321, True, "identuser"),
     ("(client.test) [192.0.2.1]:4321",
      "[192.0.2.1] (port=4321 helo=client.test ident=identuser)")),
    ((None, None, "192.0.2.1", None, False, "identuser"),
     ("[192.0.2.1]", "[192.0.2.1] (ident=identuser)")),
    ((None, "[192.0.2.1]", "192.0.2.1", None, False, None),
     ("([192.0.2.1]) [192.0.2.1]", "[192.0.2.1]")),
    ((None, "[IPv4:192.0.2.1]", "192.0.2.1", None, False, None),
     ("([IPv4:192.0.2.1]) [192.0.2.1]", "[192.0.2.1]")),
    ((None, "[IPv6:2001:db8:0::1]", "2001:0db8:0000:0000:0000:0000:0000:0001", 25, True, None),
     ("([IPv6:2001:db8:0::1]) [2001:0db8:0000:0000:0000:0000:0000:0001]:25",
      "[2001:0db8:0000:0000:0000:0000:0000:0001] (port=25)")),
    (("host.example", None, "192.0.2.1", None, False, None),
     ("host.example [192.0.2.1]", "host.example ([192.0.2.1])")),
    (("host.example", "client.test", "192.0.2.1", None, False, None),
     ("host.example (client.test) [192.0.2.1]",
      "host.example ([192.0.2.1] helo=client.test)")),
    (("host.example", "HOST.example", "192.0.2.1", None, False, None),
     ("host.example [192.0.2.1]", "host.example ([192.0.2.1])")),
    (("host.example", "client.test", "192.0.2.1", 99, True, "idu"),
     ("host.example (client.test) [192.0.2.1]:99",
      "host.example\n\t([192.0.2.1]:99 helo=client.test ident=idu)")),
    (("host.example", None, "192.0.2.1", None, False, "idu"),
     ("host.example [192.0.2.1]", "host.example ([192.0.2.1] ident=idu)")),
    (("host.example", "[192.0.2.1]", "192.0.2.1", None, False, None),
     ("host.example [192.0.2.1]", "host.example ([192.0.2.1])")),
]


class HostTextTests(unittest.TestCase):
    def test_cases(self) -> None:
        for (name, helo, address, port, with_port, ident), (full, rcv) in HOST_CASES:
            args = (name, helo, address, port)
            self.assertEqual(sender_fullhost(*args, with_port=with_port, ident=ident), full)
            self.assertEqual(received_host_text(*args, with_port=with_port, ident=ident), rcv)

    def test_other_literal_is_shown(self) -> None:
        self.assertEqual(received_host_text(None, "[192.0.2.9]", "192.0.2.1", None,
                                            with_port=False), "[192.0.2.1] (helo=[192.0.2.9])")
        self.assertEqual(received_host_text(None, "[ipv6:2001:DB8::1]", "2001:db8:0:0::1",
                                            None, with_port=False), "[2001:db8:0:0::1]")

    def test_zero_port_is_not_shown(self) -> None:
        self.assertEqual(sender_fullhost(None, None, "192.0.2.1", 0, with_port=True),
                         "[192.0.2.1]")

    def test_host_and_ident(self) -> None:
        # [exim] "rejected MAIL from host.example [192.0.2.1] U=idu: ..."
        self.assertEqual(host_and_ident("host.example [192.0.2.1]", "idu", use_flag=False),
                         "host.example [192.0.2.1] U=idu")
        self.assertEqual(host_and_ident("[192.0.2.1]", None), "H=[192.0.2.1]")
        self.assertEqual(host_and_ident("[192.0.2.1]", None, interface=("127.0.0.1", 25)),
                         "H=[192.0.2.1] I=[127.0.0.1]:25")
        self.assertEqual(host_and_ident(None, None), "U=unknown")
        self.assertEqual(host_and_ident(None, "root", use_flag=False), "root")


class PathTests(unittest.TestCase):
    def test_check(self) -> None:
        # [exim] -bV with each log_file_path
        check_log_file_path("/var/log/%slog")
        check_log_file_path("syslog : /var/log/exim-%D-%slog")
        check_log_file_path(":syslog")
        cases = {
            "/tmp/lt/log/mainlog": 'log_file_path "/tmp/lt/log/mainlog" does not contain "%s"',
            "/tmp/lt/log/%s-%x":
                'log_file_path "/tmp/lt/log/%s-%x" contains unexpected "%" character',
            "/tmp/lt/log/%D/%s-%M":
                'log_file_path "/tmp/lt/log/%D/%s-%M" contains unexpected "%" character',
            "/tmp/lt/log/%s-%s":
                'log_file_path "/tmp/lt/log/%s-%s" contains unexpected "%" character',
            "syslog : /a/%slog%%":
                'log_file_path "syslog : /a/%slog%%" contains unexpected "%" character',
        }
        for text, message in cases.items():
            with self.assertRaises(ValueError) as caught:
                check_log_file_path(text)
            self.assertEqual(str(caught.exception), message)

    def test_destinations(self) -> None:
        spool = "/var/spool/exim"
        self.assertEqual(log_destinations(None, spool).template, "/var/spool/exim/log/%slog")
        self.assertEqual(log_destinations("", spool).template, "/var/spool/exim/log/%slog")
        self.assertEqual(log_destinations(None, spool, "/var/log/exim4/%slog").template,
                         "/var/log/exim4/%slog")
        # An explicitly empty setting is the spool default, not the build's.
        self.assertEqual(log_destinations("", spool, "/var/log/exim4/%slog").template,
                         "/var/spool/exim/log/%slog")
        only = log_destinations("syslog", spool)
        self.assertEqual((only.template, only.syslog), (None, True))
        both = log_destinations("syslog : /l/%slog", spool)
        self.assertEqual((both.template, both.syslog, both.notice), ("/l/%slog", True, None))
        empty_item = log_destinations(" : syslog", spool, "syslog:/var/log/exim4/%slog")
        self.assertEqual((empty_item.template, empty_item.syslog),
                         ("/var/log/exim4/%slog", True))
        # [exim] "More than one path given in log_file_path: using /tmp/lt/log2/%slog"
        many = log_destinations("syslog : /tmp/lt/log2/%slog : /tmp/lt/log3/%slog", spool)
        self.assertEqual(many.notice,
                         "More than one path given in log_file_path: using /tmp/lt/log2/%slog")
        with self.assertRaises(ValueError):
            log_destinations("   ", spool)

    def test_names(self) -> None:
        when = time.struct_time((2026, 12, 1, 11, 28, 58, 1, 335, 0))
        self.assertEqual(format_log_path("/l/%slog", "main", when), "/l/mainlog")
        # [exim] exim-%D-%slog gave exim-20261201-mainlog and exim-paniclog.
        self.assertEqual(format_log_path("/l/exim-%D-%slog", "main", when),
                         "/l/exim-20261201-mainlog")
        self.assertEqual(format_log_path("/l/exim-%D-%slog", "reject", when),
                         "/l/exim-20261201-rejectlog")
        self.assertEqual(format_log_path("/l/exim-%D-%slog", "panic", when), "/l/exim-paniclog")
        self.assertEqual(format_log_path("/l/%D-%slog", "panic", when), "/l/paniclog")
        self.assertEqual(format_log_path("/l/%slog.%M", "main", when), "/l/mainlog.202612")
        self.assertEqual(format_log_path("/l/%slog.%M", "panic", when), "/l/paniclog")
        self.assertEqual(format_log_path("%M%slog", "panic", when), "paniclog")
        self.assertEqual(format_log_path("/l/%slog%D", "panic", when), "/l/paniclog")


class TimestampTests(unittest.TestCase):
    def test_formats(self) -> None:
        self.assertEqual(log_timestamp(NOON + 0.586, utc=True), "2026-12-01 11:28:58")
        self.assertEqual(log_timestamp(NOON + 0.586, millisec=True, utc=True),
                         "2026-12-01 11:28:58.586")
        self.assertEqual(log_timestamp(NOON + 0.0009, millisec=True, utc=True),
                         "2026-12-01 11:28:58.000")
        self.assertEqual(log_timestamp(NOON + 0.586, millisec=True, zone=True, utc=True),
                         "2026-12-01 11:28:58.586 +0000")

    def test_local_time(self) -> None:
        expected = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(NOON))
        self.assertEqual(log_timestamp(NOON), expected)

    def test_zone_offsets(self) -> None:
        saved = os.environ.get("TZ")
        try:
            for tz, zone in (("EST5EDT", "-0500"), ("IST-5:30", "+0530"), ("XST0:30", "+0030")):
                os.environ["TZ"] = tz
                time.tzset()
                # XST0:30 is UTC-00:30: C's division loses the sign, as in Exim.
                self.assertTrue(log_timestamp(NOON, zone=True).endswith(" " + zone), tz)
        finally:
            if saved is None:
                os.environ.pop("TZ", None)
            else:
                os.environ["TZ"] = saved
            time.tzset()


class _LogCase(unittest.TestCase):
    def setUp(self) -> None:
        self.dir = tempfile.mkdtemp(prefix="test-log-")
        self.addCleanup(shutil.rmtree, self.dir, True)

    def make(self, selector: str = "", path: str | None = "%s", **kw) -> EximLog:
        if path is not None:
            path = os.path.join(self.dir, "log", path + "log") if path == "%s" else path
        kw.setdefault("timestamps_utc", True)
        log = EximLog(path, os.path.join(self.dir, "spool"), parse_log_selector(selector),
                      kw.pop("clock", _clock()), kw.pop("pid", 4242),
                      kw.pop("writer", SyncLogWriter()), **kw)
        self.addCleanup(log.close)
        return log

    def read(self, name: str) -> str:
        with open(os.path.join(self.dir, "log", name), "rb") as f:
            return f.read().decode("latin-1")


class LineFormatTests(_LogCase):
    def test_default_line(self) -> None:
        log = self.make()
        log.main("Start queue run: pid=1 -qff")
        self.assertEqual(self.read("mainlog"), "2026-12-01 11:28:58 Start queue run: pid=1 -qff\n")

    def test_millisec_pid_and_id(self) -> None:
        # [exim] "2026-12-01 11:28:58.568 [20135] 1xYM2c-0005El-1p H=(client.test) ..."
        log = self.make("+millisec +pid")
        log.main("Completed", "1xYM2c-0005El-1p")
        log.main("no id")
        self.assertEqual(self.read("mainlog"),
                         "2026-12-01 11:28:58.586 [4242] 1xYM2c-0005El-1p Completed\n"
                         "2026-12-01 11:28:58.586 [4242] no id\n")

    def test_multi_line_text_is_written_as_is(self) -> None:
        # [exim] "Warning: purging the environment.\n Suggested action: ..."
        log = self.make()
        log.main("Warning: purging the environment.\n Suggested action: use keep_environment.")
        self.assertEqual(self.read("mainlog"),
                         "2026-12-01 11:28:58 Warning: purging the environment.\n"
                         " Suggested action: use keep_environment.\n")

    def test_bytes_are_written_as_latin1(self) -> None:
        self.make().main("caf\xe9")
        with open(os.path.join(self.dir, "log", "mainlog"), "rb") as f:
            self.assertTrue(f.read().endswith(b"caf\xe9\n"))

    def test_overflow(self) -> None:
        # [exim] with +millisec +pid and an id, 8140 characters of text fit
        # and 8141 give the overflow line followed by an empty line.
        log = self.make("+millisec +pid", pid=21073)
        log.main("y" * 8140, "1xYM3G-0005Tt-2z")
        log.main("y" * 8141, "1xYM3G-0005Tt-2z")
        lines = self.read("mainlog").split("\n")
        self.assertEqual(len(lines[0]), 8189)
        self.assertEqual(lines[1], "2026-12-01 11:28:58.586 [21073] 1xYM3G-0005Tt-2z "
                                   "**** log string overflowed log buffer ****")
        self.assertEqual(lines[2:], ["", ""])

    def test_selector_gates_main_lines(self) -> None:
        log = self.make()
        log.main("not logged", selector="smtp_connection")
        log.main("logged", selector="queue_run")
        log.write("rejected anyway", ("main", "reject"), selector="smtp_connection")
        self.assertEqual(self.read("mainlog"), "2026-12-01 11:28:58 logged\n")
        self.assertEqual(self.read("rejectlog"), "2026-12-01 11:28:58 rejected anyway\n")
        with self.assertRaises(ValueError):
            log.main("x", selector="nonsense")
        with self.assertRaises(ValueError):
            log.write("x", ("mainlog",))
        with self.assertRaises(ValueError):
            log.write("x", ())


class RejectAndPanicTests(_LogCase):
    def test_reject_with_headers(self) -> None:
        # [exim] daemon, DATA ACL "deny message = data denied", eight recipients.
        log = self.make("+millisec +pid", pid=20135, clock=_clock(NOON + 0.568))
        headers = reject_log_headers(
            "alice@example.net", [f"r{i}@example.com" for i in range(7)],
            [("P", "Received: from [127.0.0.1] (helo=client.test)\n"
                   "\tby mx.example.com with esmtp (Exim 4.96)\n"
                   "\t(envelope-from <alice@example.net>)\n"
                   "\tid 1xYM2c-0005El-1p;\n"
                   "\tTue, 01 Dec 2026 11:28:58 +0000\n"),
             (" ", "Subject: hi\n"), ("F", "From: alice@example.net\n"),
             ("T", "To: r1@example.com\n"), (" ", "X-Long: a\n continued\n"), ("P", None)])
        text = "H=(client.test) [127.0.0.1] F=<alice@example.net> rejected after DATA: data denied"
        log.reject(text, "1xYM2c-0005El-1p", headers)
        line = f"2026-12-01 11:28:58.568 [20135] 1xYM2c-0005El-1p {text}\n"
        self.assertEqual(self.read("mainlog"), line)
        self.assertEqual(self.read("rejectlog"), line + (
            "Envelope-from: <alice@example.net>\n"
            "Envelope-to: <r0@example.com>\n"
            "    <r1@example.com>\n"
            "    <r2@example.com>\n"
            "    <r3@example.com>\n"
            "    <r4@example.com>\n"
            "    ...\n"
            "P Received: from [127.0.0.1] (helo=client.test)\n"
            "\tby mx.example.com with esmtp (Exim 4.96)\n"
            "\t(envelope-from <alice@example.net>)\n"
            "\tid 1xYM2c-0005El-1p;\n"
            "\tTue, 01 Dec 2026 11:28:58 +0000\n"
            "  Subject: hi\n"
            "F From: alice@example.net\n"
            "T To: r1@example.com\n"
            "  X-Long: a\n"
            " continued\n"))

    def test_no_envelope_without_recipients(self) -> None:
        self.assertEqual(reject_log_headers("a@b", [], [(" ", "Subject: x\n")]),
                         ["  Subject: x\n"])

    def test_headers_need_rejected_header(self) -> None:
        log = self.make("-rejected_header")
        log.reject("rejected", headers=["  Subject: x\n"])
        self.assertEqual(self.read("rejectlog"), "2026-12-01 11:28:58 rejected\n")

    def test_header_truncation(self) -> None:
        # [exim] a 131-character line and pieces up to 3419 characters, then
        # "  X-B: bbb...": the entry is kept while it is at most 8191 long;
        # one more and it is cut to 8090 and the marker added (8109).
        line_text = "x" * (131 - 20)
        before = ["e" * 34 + "\n", "f" * 28 + "\n", "r" * (3419 - 132 - 35 - 29 - 1) + "\n"]
        sizes = {}
        for n in (4764, 4765):
            log = self.make()
            log.reject(line_text, headers=before + ["  X-B: " + "b" * n + "\n"])
            sizes[n] = self.read("rejectlog")
            os.unlink(os.path.join(self.dir, "log", "rejectlog"))
        self.assertEqual(len(sizes[4764]), 8191)
        self.assertTrue(sizes[4764].endswith("b\n"))
        self.assertEqual(len(sizes[4765]), 8109)
        self.assertTrue(sizes[4765].endswith("bbb\n*** truncated ***\n"))

    def test_write_rejectlog_false(self) -> None:
        log = self.make(write_rejectlog=False)
        log.reject("rejected RCPT <x@y>: no")
        self.assertEqual(self.read("mainlog"), "2026-12-01 11:28:58 rejected RCPT <x@y>: no\n")
        self.assertFalse(os.path.exists(os.path.join(self.dir, "log", "rejectlog")))

    def test_panic(self) -> None:
        stderr = io.StringIO()
        log = self.make("+pid", stderr=stderr)
        log.panic("failed to expand x")
        log.panic("panic here a@b.c", main=False)
        line1 = "2026-12-01 11:28:58 [4242] failed to expand x\n"
        line2 = "2026-12-01 11:28:58 [4242] panic here a@b.c\n"
        self.assertEqual(self.read("mainlog"), line1)
        self.assertEqual(self.read("paniclog"), line1 + line2)
        self.assertEqual(stderr.getvalue(), line1 + line2)

    def test_more_than_one_path(self) -> None:
        # [exim] the complaint comes first, in the main and panic logs.
        one = os.path.join(self.dir, "log", "%slog")
        log = self.make(path=f"syslog : {one} : /nowhere/%slog", syslog_writer=lambda p, m: None)
        log.main("first")
        log.main("second")
        notice = f"2026-12-01 11:28:58 More than one path given in log_file_path: using {one}\n"
        self.assertEqual(self.read("mainlog"), notice + "2026-12-01 11:28:58 first\n"
                         "2026-12-01 11:28:58 second\n")
        self.assertEqual(self.read("paniclog"), notice)


class FromConfigTests(_LogCase):
    def test_options(self) -> None:
        config = FakeConfig(log_selector="+pid", spool_directory=self.dir, timezone="utc",
                            log_file_path=os.path.join(self.dir, "log", "%slog"),
                            write_rejectlog=False)
        log = EximLog.from_config(config, _clock(), 77, SyncLogWriter())
        self.addCleanup(log.close)
        self.assertIn("pid", log.selectors)
        log.reject("refused")
        self.assertEqual(self.read("mainlog"), "2026-12-01 11:28:58 [77] refused\n")
        self.assertFalse(os.path.exists(os.path.join(self.dir, "log", "rejectlog")))

    def test_bad_options(self) -> None:
        with self.assertRaises(LogSelectorError):
            EximLog.from_config(FakeConfig(log_selector="+nope"), _clock(), 1, SyncLogWriter())
        with self.assertRaises(ValueError):
            EximLog.from_config(FakeConfig(syslog_facility="nope"), _clock(), 1, SyncLogWriter())


class FileTests(_LogCase):
    def test_directories_and_modes(self) -> None:
        log = self.make(path=os.path.join(self.dir, "log", "deep", "er", "%slog"))
        log.main("x")
        deep = os.path.join(self.dir, "log", "deep")
        self.assertEqual(stat.S_IMODE(os.stat(deep).st_mode), 0o750)
        self.assertEqual(stat.S_IMODE(os.stat(os.path.join(deep, "er", "mainlog")).st_mode),
                         0o640)

    def test_default_path_is_in_the_spool(self) -> None:
        log = self.make(path=None)
        log.main("x")
        self.assertTrue(os.path.exists(os.path.join(self.dir, "spool", "log", "mainlog")))
        self.assertEqual(log.path("panic"), os.path.join(self.dir, "spool", "log", "paniclog"))

    def test_datestamp_rolls_over(self) -> None:
        clock = _clock(calendar.timegm((2026, 12, 31, 23, 59, 59, 0, 0, 0)))
        log = self.make(path=os.path.join(self.dir, "log", "%slog-%D"), clock=clock)
        log.main("old day")
        log.panic("panic")
        clock.advance(2)
        log.main("new day")
        self.assertEqual(self.read("mainlog-20261231"),
                         "2026-12-31 23:59:59 old day\n2026-12-31 23:59:59 panic\n")
        self.assertEqual(self.read("mainlog-20270101"), "2027-01-01 00:00:01 new day\n")
        self.assertEqual(self.read("paniclog"), "2026-12-31 23:59:59 panic\n")

    def test_cycled_log_is_reopened(self) -> None:
        log = self.make()
        log.main("one")
        os.rename(os.path.join(self.dir, "log", "mainlog"),
                  os.path.join(self.dir, "log", "mainlog.0"))
        log.main("two")
        self.assertEqual(self.read("mainlog.0"), "2026-12-01 11:28:58 one\n")
        self.assertEqual(self.read("mainlog"), "2026-12-01 11:28:58 two\n")

    def test_open_failure(self) -> None:
        failures: list[str] = []
        blocker = os.path.join(self.dir, "file")
        with open(blocker, "w"):
            pass
        self.patch(sys, "stderr", io.StringIO())
        log = self.make(path=os.path.join(blocker, "%slog"), on_failure=failures.append)
        log.main("lost")
        self.assertEqual(len(failures), 1)
        self.assertTrue(failures[0].startswith(
            f'Cannot open main log file "{blocker}/mainlog": Not a directory: euid='))
        self.assertEqual(log.failures, failures)

    def test_syslog(self) -> None:
        sent: list[tuple[int, str]] = []
        log = self.make("+pid", path="syslog", syslog_writer=lambda p, m: sent.append((p, m)))
        log.main("hello")
        log.reject("no\nsecond line")
        log.panic("oops", main=False)
        self.assertEqual(sent, [
            (LOG_INFO, "2026-12-01 11:28:58 [4242] hello"),
            (LOG_INFO, "[1\\2] 2026-12-01 11:28:58 [4242] no"),
            (LOG_INFO, "[2/2] second line"),
            (LOG_NOTICE, "[1\\2] 2026-12-01 11:28:58 [4242] no"),
            (LOG_NOTICE, "[2/2] second line"),
            (LOG_ALERT, "2026-12-01 11:28:58 [4242] oops"),
        ])
        self.assertFalse(os.path.exists(os.path.join(self.dir, "log")))

    def test_syslog_options(self) -> None:
        sent: list[tuple[int, str]] = []
        settings = SyslogSettings(pid=False, timestamp=False, duplication=False)
        log = self.make("+pid +millisec", path="syslog", syslog=settings,
                        syslog_writer=lambda p, m: sent.append((p, m)))
        log.main("hello", "1xYM2c-0005El-1p")
        log.reject("refused")
        self.assertEqual(sent, [(LOG_INFO, "1xYM2c-0005El-1p hello"), (LOG_NOTICE, "refused")])

    def test_system_syslog_does_not_crash(self) -> None:
        log = self.make(path="syslog", writer=ThreadLogWriter())
        log.main("exim-py test_log: syslog item")
        self.assertTrue(log.flush(10))

    def test_syslog_pieces(self) -> None:
        self.assertEqual(syslog_pieces("one line\n"), ["one line"])
        long = "a" * 900 + "\n"
        self.assertEqual(syslog_pieces(long), ["[1/2] " + "a" * 870, "[2/2] " + "a" * 30])
        self.assertEqual(syslog_pieces(long, long_lines=True), ["a" * 900])

    def test_facility(self) -> None:
        self.assertEqual(SyslogSettings(facility="LOG_LOCAL3").facility_name(), "local3")
        with self.assertRaises(ValueError) as caught:
            SyslogSettings(facility="bogus").facility_name()
        self.assertEqual(str(caught.exception), 'failed to interpret syslog_facility "bogus"')


class WriterTests(_LogCase):
    def test_order_of_many_writes(self) -> None:
        log = self.make(writer=ThreadLogWriter())
        for i in range(3000):
            log.write(f"line {i}", ("main", "reject") if i % 7 == 0 else ("main",))
        self.assertTrue(log.flush(30))
        main = self.read("mainlog").splitlines()
        self.assertEqual(main, [f"2026-12-01 11:28:58 line {i}" for i in range(3000)])
        self.assertEqual(self.read("rejectlog").splitlines(),
                         [f"2026-12-01 11:28:58 line {i}" for i in range(0, 3000, 7)])

    def test_writes_happen_off_the_calling_thread(self) -> None:
        writer = ThreadLogWriter()
        seen: list[threading.Thread] = []
        release = threading.Event()
        writer.submit(release.wait)
        writer.submit(lambda: seen.append(threading.current_thread()))
        self.assertEqual(seen, [])  # the caller did not wait for the blocked job
        release.set()
        self.assertTrue(writer.flush(10))
        self.assertNotEqual(seen, [threading.current_thread()])
        writer.close()

    def test_flush_timeout(self) -> None:
        writer = ThreadLogWriter()
        release = threading.Event()
        writer.submit(release.wait)
        self.assertFalse(writer.flush(0.05))
        release.set()
        self.assertTrue(writer.flush(10))
        writer.close()

    def test_close_writes_queued_lines_then_runs_inline(self) -> None:
        log = self.make(writer=ThreadLogWriter())
        for i in range(100):
            log.main(f"line {i}")
        log.close()
        self.assertEqual(len(self.read("mainlog").splitlines()), 100)
        log.main("after close")
        self.assertTrue(self.read("mainlog").endswith("after close\n"))

    def test_when_flushed(self):
        log = self.make(writer=ThreadLogWriter(reactor.callFromThread))
        for i in range(500):
            log.main(f"line {i}")
        d = log.when_flushed()

        def check(_: object) -> None:
            self.assertEqual(threading.current_thread(), threading.main_thread())
            self.assertEqual(len(self.read("mainlog").splitlines()), 500)

        return d.addCallback(check)

    def test_when_flushed_without_reactor(self) -> None:
        log = self.make(writer=ThreadLogWriter())
        log.main("x")
        fired: list[object] = []
        log.when_flushed().addCallback(fired.append)
        self.assertEqual(fired, [None])
        self.assertEqual(self.read("mainlog"), "2026-12-01 11:28:58 x\n")


class HostCheckingTests(_LogCase):
    def hostcheck(self, selector: str = "") -> tuple[EximLog, io.StringIO]:
        stream = io.StringIO()
        return self.make(selector, testing_stream=stream, host_checking=True), stream

    def test_lines(self) -> None:
        # [exim] the corpus and -bh runs: no stamp, message id when there is one
        log, stream = self.hostcheck()
        log.main("<= alice@example.net H=(client.example.net) [192.0.2.10] P=esmtp S=230",
                 "1xYM20-0004vM-1n")
        log.reject("H=(client.test) [192.0.2.1] F=<a@b.c> rejected RCPT <bad@example.com>: no",
                   headers=["  Subject: x\n"])
        log.panic("panic here a@b.c", main=False)
        log.main("SMTP connection from [192.0.2.1]", selector="smtp_connection")
        self.assertEqual(stream.getvalue(), (
            "LOG: 1xYM20-0004vM-1n <= alice@example.net H=(client.example.net) "
            "[192.0.2.10] P=esmtp S=230\n"
            "LOG: H=(client.test) [192.0.2.1] F=<a@b.c> rejected RCPT <bad@example.com>: no\n"
            "LOG: panic here a@b.c\n"))
        self.assertFalse(os.path.exists(os.path.join(self.dir, "log")))

    def test_millisec_and_pid(self) -> None:
        # [exim] "LOG: 636 [18944] SMTP connection from [192.0.2.1]": Exim
        # skips 20 characters of the stamp, which leaves the milliseconds.
        log, stream = self.hostcheck("+millisec +pid +smtp_connection")
        log.main("SMTP connection from [192.0.2.1]", selector="smtp_connection")
        log.main("<= a@b.c", "1xYM20-0004vY-23")
        self.assertEqual(stream.getvalue(),
                         "LOG: 586 [4242] SMTP connection from [192.0.2.1]\n"
                         "LOG: 586 [4242] 1xYM20-0004vY-23 <= a@b.c\n")

    def test_log_timezone(self) -> None:
        # [exim] log_timezone = true: "LOG: +0000 SMTP connection from [192.0.2.1]"
        stream = io.StringIO()
        log = self.make(testing_stream=stream, host_checking=True, log_timezone=True)
        log.main("SMTP connection from [192.0.2.1]")
        self.assertEqual(stream.getvalue(), "LOG: +0000 SMTP connection from [192.0.2.1]\n")

    def test_testing_stream_without_host_checking(self) -> None:
        stream = io.StringIO()
        log = self.make(testing_stream=stream)
        log.main("Exim configuration error:\n  unknown log_selector setting: +foo")
        self.assertEqual(stream.getvalue(), "2026-12-01 11:28:58 Exim configuration error:\n"
                                            "  unknown log_selector setting: +foo\n")


# ---------------------------------------------------------------------------
# Live comparisons with exim4

_HOST_CONF = """\
primary_hostname = mx.example.com
qualify_domain = example.com
spool_directory = {dir}/spool
log_file_path = {dir}/log/%slog
exim_user = root
exim_group = root
never_users =
tls_advertise_hosts =
host_lookup =
log_selector = {selector}
acl_smtp_connect = acl_c
acl_smtp_mail = acl_m
begin acl
acl_c:
  accept logwrite = C FH=<$sender_fullhost> RH=<$sender_rcvhost>
acl_m:
  warn logwrite = M FH=<$sender_fullhost> RH=<$sender_rcvhost>
  accept logwrite = :reject: rejected MAIL <$sender_address>
"""


class LiveEximTests(_LogCase):
    def run_exim(self, selector: str, helo: str | None, args: list[str]) -> str:
        exim = _require_exim()
        conf = os.path.join(self.dir, "exim.conf")
        with open(conf, "w") as f:
            f.write(_HOST_CONF.format(dir=self.dir, selector=selector))
        session = (f"HELO {helo}\r\n" if helo else "") + "MAIL FROM:<a@b.c>\r\nQUIT\r\n"
        done = subprocess.run([exim, "-C", conf, *args], input=session.encode(),
                              capture_output=True, timeout=60)
        return done.stderr.decode("latin-1")

    def test_host_texts(self) -> None:
        for (name, helo, address, port, with_port, ident), _ in HOST_CASES:
            if ":" in address:
                continue  # -bh writes IPv6 addresses in full; covered by HOST_CASES
            args = ["-bh", f"{address}.{port}" if port else address]
            if name:
                args += ["-oMs", name]
            if ident:
                args += ["-oMt", ident]
            err = self.run_exim("+incoming_port" if with_port else "", helo or "client.x", args)
            helo_used = helo or "client.x"
            found = re.search(r"^LOG: M FH=<(.*)> RH=<(.*)>$", err, re.M)
            self.assertIsNotNone(found, err)
            kw = {"with_port": with_port, "ident": ident}
            self.assertEqual(found.group(1),
                             sender_fullhost(name, helo_used, address, port, **kw))
            self.assertEqual(found.group(2), log_quote(
                received_host_text(name, helo_used, address, port, **kw)))
            before = re.search(r"^LOG: C FH=<(.*)> RH=<(.*)>$", err, re.M)
            self.assertEqual(before.group(1), sender_fullhost(name, None, address, port, **kw))
            self.assertEqual(before.group(2), log_quote(
                received_host_text(name, None, address, port, **kw)))

    def test_bh_log_lines(self) -> None:
        err = self.run_exim("+millisec +pid +smtp_connection", "client.test",
                            ["-bh", "192.0.2.1"])
        lines = [line for line in err.splitlines() if line.startswith("LOG: ")]
        self.assertEqual(len(lines), 5, err)
        stream = io.StringIO()
        for line in lines:
            ms, pid, text = re.fullmatch(r"LOG: (\d{3}) \[(\d+)\] (.*)", line).groups()
            log = self.make("+millisec +pid", pid=int(pid), testing_stream=stream,
                            host_checking=True, clock=_clock(NOON + int(ms) / 1000 + 0.0001))
            log.write(text, ("main", "reject") if "rejected" in text else ("main",))
        self.assertEqual(stream.getvalue().splitlines(), lines)

    def test_selectors(self) -> None:
        exim = _require_exim()
        for selector in ("", "+all", "-all", "+pid -retry_defer +subject", "=5",
                         "-all +rejected_headers +tls_sni +8bitmime +unknown_in_list"):
            conf = os.path.join(self.dir, "sel.conf")
            with open(conf, "w") as f:
                f.write(_HOST_CONF.format(dir=self.dir, selector=selector))
            done = subprocess.run([exim, "-C", conf, "-d", "-bV"], capture_output=True,
                                  timeout=60)
            found = re.search(r"log selectors = ([0-9a-f]+) ([0-9a-f]+) ([0-9a-f]+)",
                              done.stderr.decode("latin-1"))
            self.assertIsNotNone(found, selector)
            words = [int(w, 16) for w in found.groups()]
            names = {name for bit, name in enumerate(LOG_SELECTOR_BITS[:16])
                     if words[0] >> bit & 1}
            names |= {name for bit, name in enumerate(LOG_SELECTOR_BITS[16:])
                      if (words[1] | words[2] << 32) >> bit & 1}
            self.assertEqual(parse_log_selector(selector), names, selector)

    def test_selector_errors(self) -> None:
        exim = _require_exim()
        for selector in ("+foo", "+pid,+millisec", "=abc", "+all -bar", "pid"):
            conf = os.path.join(self.dir, "bad.conf")
            with open(conf, "w") as f:
                f.write(_HOST_CONF.format(dir=self.dir, selector=selector))
            done = subprocess.run([exim, "-C", conf, "-bV"], capture_output=True, timeout=60)
            with self.assertRaises(ValueError) as caught:
                parse_log_selector(selector)
            self.assertIn(f"Exim configuration error:\n  {caught.exception}\n",
                          done.stderr.decode("latin-1"))
