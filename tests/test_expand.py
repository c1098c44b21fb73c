"""The expansion engine in memory: parsing, evaluation, failures, taint."""

from __future__ import annotations

from twisted.internet.defer import Deferred
from twisted.trial import unittest

from tests.fakes import FakeConfig
from twisted_mta.expand import parser as expand_parser
from twisted_mta.expand.context import ExpansionContext
from twisted_mta.expand.errors import ExpansionError, ForcedFailure, TaintError
from twisted_mta.expand.evaluate import expand_deferred, expand_now
from twisted_mta.taint import Tainted, is_tainted


def context(**variables) -> ExpansionContext:
    config = FakeConfig(primary_hostname="mail.example.com", qualify_domain="example.com")
    return ExpansionContext(config=config, variables=variables)


class ExpandTests(unittest.TestCase):
    def expand(self, text: str, **variables) -> str:
        return expand_now(text, context(**variables))

    def test_plain_text_is_returned_unchanged(self) -> None:
        self.assertEqual(self.expand("no dollars here"), "no dollars here")

    def test_parse_is_cached(self) -> None:
        text = "${lc:CACHED-$primary_hostname}"
        self.assertIs(expand_parser.parse(text), expand_parser.parse(text))

    def test_variables_and_operators(self) -> None:
        self.assertEqual(self.expand("${uc:$primary_hostname}"), "MAIL.EXAMPLE.COM")

    def test_context_variables_override(self) -> None:
        self.assertEqual(self.expand("<$sender_address>", sender_address="a@b"), "<a@b>")

    def test_unused_branch_is_still_parsed(self) -> None:
        # Exim scans the arm it skips: an unknown operator there is an error.
        with self.assertRaises(ExpansionError) as e:
            self.expand("${if eq{a}{a}{yes}{${nosuch:x}}}")
        self.assertEqual(e.exception.message, 'unknown expansion operator "nosuch"')

    def test_forced_failure_is_distinguished(self) -> None:
        with self.assertRaises(ForcedFailure) as e:
            self.expand("${if eq{a}{b}{y}fail}")
        self.assertEqual(e.exception.message, '"if" failed and "fail" requested')

    def test_nhash_zero_fails_instead_of_crashing(self) -> None:
        # Exim 4.96 dies with SIGFPE here.
        self.assertRaises(ExpansionError, self.expand, "${nhash{0}{abc}}")

    def test_nul_escape_truncates(self) -> None:
        self.assertEqual(self.expand("ab\\xcd"), "ab\xcd")
        self.assertEqual(self.expand("ab\\xgh"), "ab")

    def test_match_sets_captures_for_the_arms_only(self) -> None:
        self.assertEqual(
            self.expand("${if match{abc}{^a(b)}{[$1]}{n}}[$1]"), "[b][]"
        )

    def test_bytes_are_kept(self) -> None:
        self.assertEqual(self.expand("${strlen:caf\xc3\xa9}"), "5")
        self.assertEqual(self.expand("${uc:\xe9a}"), "\xe9A")


class TaintTests(unittest.TestCase):
    def ctx(self) -> ExpansionContext:
        ctx = context()
        ctx.variables["__headers__"] = {"subject": "${readfile{/etc/passwd}}"}
        return ctx

    def test_header_is_tainted(self) -> None:
        result = expand_now("x$h_subject:", self.ctx())
        self.assertTrue(is_tainted(result))

    def test_expand_refuses_tainted_data(self) -> None:
        with self.assertRaises(TaintError):
            expand_now("${expand:$h_subject:}", self.ctx())

    def test_readfile_refuses_tainted_path(self) -> None:
        ctx = context(sender_address=Tainted("/etc/passwd"))
        self.assertRaises(TaintError, expand_now, "${readfile{$sender_address}}", ctx)

    def test_config_text_is_untainted(self) -> None:
        self.assertFalse(is_tainted(expand_now("${lc:ABC}", context())))


class AsyncTests(unittest.TestCase):
    def test_expansion_waits_for_io(self) -> None:
        # A value that arrives later (as from a lookup over the network)
        # suspends the expansion; it resumes when the Deferred fires.
        from twisted_mta.expand import nodes

        pending = Deferred()

        class Later(nodes.Node):
            async def run(self, ev):
                return await pending

        tree = nodes.Seq([nodes.Text("<"), Later(), nodes.Text(">")])
        ev = nodes.Evaluation(context())
        d = Deferred.fromCoroutine(tree.run(ev))
        self.assertNoResult(d)
        pending.callback("later")
        self.assertEqual(self.successResultOf(d), "<later>")

    def test_expand_deferred_at_protocol_edges(self) -> None:
        # Protocol code gets a Deferred from the same engine.
        ctx = context()
        d = expand_deferred("${lc:X}", ctx)
        self.assertEqual(self.successResultOf(d), "x")
