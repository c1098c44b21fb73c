"""Where ACL conditions, modifiers and controls may be used, and long ACL
messages split into reply lines.

The replies and log lines expected here are what ``exim4 -bh`` (4.96)
gives for the same configuration and session (std_prefix.conf first).
"""

from __future__ import annotations

import unittest

from tests.test_dialogues import Harness, _TempDirCase, config_from_text
from twisted_mta.acl.where import control_error, item_error, verify_error
from twisted_mta.smtp.replies import split_message

LONG = ("This is a rather long rejection message that goes on: and on beyond "
        "seventy-five characters for sure")


class SplitMessageTests(unittest.TestCase):
    """split_message() against Exim's string_split_message()."""

    def test_short_unchanged(self) -> None:
        for text in ("", "short", "x" * 75, " " * 75):
            self.assertEqual(split_message(text), text)

    def test_prefers_space_after_colon(self) -> None:
        self.assertEqual(split_message(LONG),
                         "This is a rather long rejection message that goes on:\n"
                         "and on beyond seventy-five characters for sure")

    def test_colon_wins_over_later_space(self) -> None:
        text = "a" * 40 + ": " + "b" * 10 + " " + "c" * 30
        self.assertEqual(split_message(text), "a" * 40 + ":\n" + "b" * 10 + " " + "c" * 30)

    def test_last_space_without_colon(self) -> None:
        text = ("The quick brown fox jumps over the lazy dog and keeps running until "
                "far past the limit")
        self.assertEqual(split_message(text),
                         "The quick brown fox jumps over the lazy dog and keeps running until far\n"
                         "past the limit")

    def test_space_at_76th_character_used(self) -> None:
        text = "x" * 75 + " " + "y" * 10
        self.assertEqual(split_message(text), "x" * 75 + "\n" + "y" * 10)

    def test_not_within_first_36_characters(self) -> None:
        # The only early space is at index 35: too soon, so the split
        # happens at the next space after the 76th character.
        text = "a" * 35 + " " + "b" * 50 + " " + "c" * 5
        self.assertEqual(split_message(text), "a" * 35 + " " + "b" * 50 + "\n" + "c" * 5)
        text = "a" * 36 + " " + "b" * 50
        self.assertEqual(split_message(text), "a" * 36 + "\n" + "b" * 50)

    def test_no_space_at_all(self) -> None:
        self.assertEqual(split_message("x" * 100), "x" * 100)
        self.assertEqual(split_message("x" * 100 + " y"), "x" * 100 + "\ny")

    def test_newlines_restart_the_count(self) -> None:
        text = "first line\n" + "word " * 20
        self.assertEqual(split_message(text),
                         "first line\n" + "word " * 14 + "word\n" + "word " * 5)
        # A line that cannot be split before its end is split at the
        # newline that ends it, and the lines after it are split as usual.
        text = "x" * 80 + "\n" + "word " * 20
        self.assertEqual(split_message(text),
                         "x" * 80 + "\n" + "word " * 14 + "word\n" + "word " * 5)

    def test_several_lines(self) -> None:
        text = " ".join(f"w{i:02d}" for i in range(60))
        lines = split_message(text).split("\n")
        self.assertEqual([len(line) for line in lines], [75, 75, 75, 11])
        self.assertEqual(" ".join(lines), text)


class TableTests(unittest.TestCase):

    def test_items(self) -> None:
        self.assertEqual(item_error("local_parts", False, "data"),
                         "cannot test local_parts condition in DATA ACL")
        self.assertIsNone(item_error("local_parts", False, "rcpt"))
        self.assertEqual(item_error("add_header", True, "helo"),
                         "cannot use add_header condition in EHLO or HELO ACL")
        self.assertEqual(item_error("delay", True, "notquit"),
                         "cannot use delay condition in NOTQUIT ACL")
        self.assertEqual(item_error("recipients", False, ""),
                         "cannot test recipients condition in unknown ACL")
        self.assertIsNone(item_error("condition", False, "connect"))

    def test_controls(self) -> None:
        self.assertEqual(control_error("freeze/no_tell", "connect"),
                         ("freeze", 'cannot use "control=freeze" in connection ACL'))
        self.assertEqual(control_error("queue_only", "rcpt"), ("queue", None))
        self.assertEqual(control_error("no_pipelining/x", "rcpt"),
                         (None, 'syntax error in "control=no_pipelining/x"'))
        self.assertEqual(control_error("freezer", "rcpt"),
                         (None, 'syntax error in "control=freezer"'))
        self.assertEqual(control_error("allow_auth_unadvertised", "helo"),
                         ("allow_auth_unadvertised", None))

    def test_verify(self) -> None:
        self.assertEqual(verify_error("recipient/callout", "mail"),
                         "cannot verify recipient in ACL for MAIL")
        self.assertEqual(verify_error("sender=a@b.c", "helo"),
                         "cannot verify sender in ACL for EHLO or HELO")
        self.assertEqual(verify_error("header_syntax", "quit"), None)
        self.assertEqual(verify_error("not_blind", "rcpt"),
                         "cannot verify not_blind in ACL for RCPT")
        self.assertIsNone(verify_error("helo", "connect"))
        # Options a type does not take are the verify code's business.
        self.assertIsNone(verify_error("header_syntax/x", "rcpt"))


class SessionTests(_TempDirCase):
    """Whole SMTP exchanges; each expectation is exim4 -bh's."""

    def session(self, acls: str, commands: list[bytes]) -> tuple[bytes, list[str]]:
        harness = Harness(config_from_text(acls), self.tmp, peer=("192.0.2.1", 40000))
        harness.connect()
        for command in commands:
            harness.send(command)
        reply = harness.output()
        # Replies after the banner; the log without message ids.
        reply = reply.split(b"\r\n", 1)[1]
        return reply, [line.split(" ", 1)[1] if line[:1].isdigit() else line
                       for line in harness.log_lines()]

    MESSAGE = [b"HELO x\r\n", b"MAIL FROM:<a@b.c>\r\n", b"RCPT TO:<ok@test.ex>\r\n",
               b"DATA\r\n", b"Subject: x\r\n\r\nhi\r\n.\r\n"]

    def test_condition_forbidden_in_data(self) -> None:
        reply, log = self.session(
            "acl_smtp_rcpt = r\nacl_smtp_data = d\nbegin acl\nr:\n  accept\n"
            "d:\n  accept local_parts = *\n", self.MESSAGE)
        self.assertTrue(reply.endswith(b"\r\n451 Temporary local problem - please try later\r\n"),
                        reply)
        self.assertEqual(log, ["H=(x) [192.0.2.1] F=<a@b.c> temporarily rejected after DATA: "
                               "cannot test local_parts condition in DATA ACL"])

    def test_condition_forbidden_in_helo(self) -> None:
        reply, log = self.session(
            "acl_smtp_helo = h\nbegin acl\nh:\n  accept senders = a@b.c\n", [b"HELO x\r\n"])
        self.assertEqual(reply, b"451 Temporary local problem - please try later\r\n")
        self.assertEqual(log, ["H=(x) [192.0.2.1] temporarily rejected EHLO or HELO x: "
                               "cannot test senders condition in EHLO or HELO ACL"])

    def test_condition_allowed(self) -> None:
        reply, log = self.session(
            "acl_smtp_rcpt = r\nbegin acl\nr:\n  deny local_parts = bad\n"
            "  accept control = caseful_local_part\n",
            [b"HELO x\r\n", b"MAIL FROM:<a@b.c>\r\n", b"RCPT TO:<bad@test.ex>\r\n",
             b"RCPT TO:<ok@test.ex>\r\n"])
        self.assertTrue(reply.endswith(b"250 OK\r\n550 Administrative prohibition\r\n"
                                       b"250 Accepted\r\n"), reply)
        self.assertEqual(log, ["H=(x) [192.0.2.1] F=<a@b.c> rejected RCPT <bad@test.ex>"])

    def test_modifier_forbidden_in_connect(self) -> None:
        harness = Harness(config_from_text(
            "acl_smtp_connect = c\nbegin acl\nc:\n  accept add_header = X-A: b\n"),
            self.tmp, peer=("192.0.2.1", 40000))
        harness.connect()
        self.assertEqual(harness.output(), b"451 Temporary local problem - please try later\r\n")
        self.assertEqual(harness.log_lines(), [
            'H=[192.0.2.1] temporarily rejected connection in "connect" ACL: '
            "cannot use add_header condition in connection ACL"])

    def test_modifier_forbidden_in_data(self) -> None:
        reply, log = self.session(
            "acl_smtp_rcpt = r\nacl_smtp_data = d\nbegin acl\nr:\n  accept\n"
            "d:\n  accept queue = other\n", self.MESSAGE)
        self.assertTrue(reply.endswith(b"\r\n451 Temporary local problem - please try later\r\n"))
        self.assertEqual(log, ["H=(x) [192.0.2.1] F=<a@b.c> temporarily rejected after DATA: "
                               "cannot use queue condition in DATA ACL"])

    def test_forced_failure_skips_the_check(self) -> None:
        # add_header is expanded before the check, and a forced failure
        # ignores it; local_parts is checked before it is expanded.
        reply, log = self.session(
            "acl_smtp_mail = m\nbegin acl\n"
            "m:\n  warn add_header = ${if eq{1}{2}{x}fail}\n"
            "  accept local_parts = ${if eq{1}{2}{x}fail}\n",
            [b"HELO x\r\n", b"MAIL FROM:<a@b.c>\r\n"])
        self.assertTrue(reply.endswith(b"451 Temporary local problem - please try later\r\n"))
        self.assertEqual(log, ["H=(x) [192.0.2.1] temporarily rejected MAIL <a@b.c>: "
                               "cannot test local_parts condition in MAIL ACL"])

    def test_control_forbidden(self) -> None:
        reply, log = self.session(
            "acl_smtp_mail = m\nbegin acl\nm:\n  accept control = caseful_local_part\n",
            [b"HELO x\r\n", b"MAIL FROM:<a@b.c>\r\n"])
        self.assertTrue(reply.endswith(b"451 Temporary local problem - please try later\r\n"))
        self.assertEqual(log, ['H=(x) [192.0.2.1] temporarily rejected MAIL <a@b.c>: '
                               'cannot use "control=caseful_local_part" in MAIL ACL'])

    def test_control_unknown(self) -> None:
        reply, log = self.session(
            "acl_smtp_rcpt = r\nbegin acl\nr:\n  accept control = nonesuch/x\n",
            [b"HELO x\r\n", b"MAIL FROM:<a@b.c>\r\n", b"RCPT TO:<ok@test.ex>\r\n"])
        self.assertTrue(reply.endswith(b"451 Temporary local problem - please try later\r\n"))
        self.assertEqual(log, ['H=(x) [192.0.2.1] F=<a@b.c> temporarily rejected RCPT '
                               '<ok@test.ex>: syntax error in "control=nonesuch/x"'])

    def test_control_error_has_no_message(self) -> None:
        reply, log = self.session(
            "acl_smtp_rcpt = r\nbegin acl\nr:\n  accept control = error\n",
            [b"HELO x\r\n", b"MAIL FROM:<a@b.c>\r\n", b"RCPT TO:<ok@test.ex>\r\n"])
        self.assertTrue(reply.endswith(b"451 Temporary local problem - please try later\r\n"))
        self.assertEqual(log, ["H=(x) [192.0.2.1] F=<a@b.c> temporarily rejected RCPT "
                               "<ok@test.ex>"])

    def test_verify_forbidden(self) -> None:
        reply, log = self.session(
            "acl_smtp_mail = m\nbegin acl\nm:\n  require verify = recipient\n  accept\n",
            [b"HELO x\r\n", b"MAIL FROM:<a@b.c>\r\n"])
        self.assertTrue(reply.endswith(b"451 Temporary local problem - please try later\r\n"))
        self.assertEqual(log, ["H=(x) [192.0.2.1] temporarily rejected MAIL <a@b.c>: "
                               "cannot verify recipient in ACL for MAIL"])

    def test_discard_and_warn_message_outside_message_acls(self) -> None:
        reply, log = self.session(
            "acl_smtp_helo = h\nbegin acl\nh:\n  warn message = X-Warn: helo\n  discard\n",
            [b"HELO x\r\n"])
        self.assertEqual(reply, b"451 Temporary local problem - please try later\r\n")
        self.assertEqual(log, [
            'ACL "warn" with "message" setting found in a non-message (EHLO or HELO) ACL: '
            "cannot specify header lines here: message ignored",
            '"discard" verb not allowed in EHLO or HELO ACL',
            "H=(x) [192.0.2.1] temporarily rejected EHLO or HELO x"])

    def test_logwrite_log_names(self) -> None:
        reply, log = self.session(
            "acl_smtp_mail = m\nbegin acl\nm:\n  warn logwrite = :foo: hi there\n"
            "  warn logwrite = :main,reject: to main and reject\n"
            "  warn logwrite = :mainly: x\n  accept\n",
            [b"HELO x\r\n", b"MAIL FROM:<a@b.c>\r\n"])
        self.assertTrue(reply.endswith(b"250 OK\r\n"))
        self.assertEqual(log, ['unknown log name in ":foo: hi there" in "logwrite" in MAIL ACL',
                               "to main and reject",
                               'unknown log name in ":mainly: x" in "logwrite" in MAIL ACL'])

    def test_long_messages_split(self) -> None:
        reply, log = self.session(
            "acl_smtp_rcpt = r\nbegin acl\nr:\n"
            f"  deny local_parts = bad\n       message = {LONG}\n"
            "  deny local_parts = worse\n       message = 553 5.7.1 The quick brown fox "
            "jumps over the lazy dog and keeps running until far past the limit\n  accept\n",
            [b"HELO x\r\n", b"MAIL FROM:<a@b.c>\r\n", b"RCPT TO:<bad@test.ex>\r\n",
             b"RCPT TO:<worse@test.ex>\r\n"])
        self.assertTrue(reply.endswith(
            b"250 OK\r\n"
            b"550-This is a rather long rejection message that goes on:\r\n"
            b"550 and on beyond seventy-five characters for sure\r\n"
            b"553-5.7.1 The quick brown fox jumps over the lazy dog and keeps running\r\n"
            b"553 5.7.1 until far past the limit\r\n"), reply)
        self.assertEqual(log, [
            f"H=(x) [192.0.2.1] F=<a@b.c> rejected RCPT <bad@test.ex>: {LONG}",
            "H=(x) [192.0.2.1] F=<a@b.c> rejected RCPT <worse@test.ex>: 553 5.7.1 The quick "
            "brown fox jumps over the lazy dog and keeps running until far past the limit"])

    def test_nested_acl_message_not_split(self) -> None:
        # ${acl} gives the message whole; the top-level ACL's reply is split.
        reply, log = self.session(
            "acl_smtp_rcpt = r\nbegin acl\nr:\n  warn logwrite = got ${acl{n}}\n"
            f"  deny acl = n\nn:\n  accept message = {LONG}\n",
            [b"HELO x\r\n", b"MAIL FROM:<a@b.c>\r\n", b"RCPT TO:<bad@test.ex>\r\n"])
        self.assertTrue(reply.endswith(
            b"550-This is a rather long rejection message that goes on:\r\n"
            b"550 and on beyond seventy-five characters for sure\r\n"), reply)
        self.assertEqual(log, [
            f"got {LONG}",
            f"H=(x) [192.0.2.1] F=<a@b.c> rejected RCPT <bad@test.ex>: {LONG}"])

    def test_fake_response_split(self) -> None:
        reply, _ = self.session(
            "acl_smtp_rcpt = r\nbegin acl\nr:\n  accept control = fakedefer\n", self.MESSAGE)
        self.assertTrue(reply.endswith(
            b"450-Your message has been rejected but is being kept for evaluation.\r\n"
            b"450-If it was a legitimate message, it may still be delivered to the target\r\n"
            b"450 recipient(s).\r\n"), reply)


if __name__ == "__main__":
    unittest.main()
