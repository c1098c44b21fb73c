"""Tests for twisted_mta.expand.operators, .arith and .addresses.

The corpus rows that are a single ``${op:literal}`` are checked by calling
the operator directly; other expectations were taken from Exim 4.96
(Debian 12) with ``exim4 -be``.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import ClassVar

from twisted.trial import unittest

from twisted_mta.expand import operators as ops
from twisted_mta.expand.arith import eval_expression
from twisted_mta.expand.errors import ExpansionError

CORPUS = Path("/work/shared/reference/corpora/expand/expand-corpus.tsv")
_SIMPLE_OP = re.compile(r"\$\{([a-z0-9_-]+):([^${}]*)\}")
_CORPUS_ESCAPE = re.compile(r"\\(x[0-9a-f]{2}|.)")
_EXIM_ESCAPE = re.compile(r"\\(x[0-9a-fA-F]{0,2}|[0-7]{1,3}|.)")


def _corpus_value(text: str) -> str:
    """Decode column 2 of the corpus."""
    named = {"\\": "\\", "n": "\n", "t": "\t", "r": "\r"}
    return _CORPUS_ESCAPE.sub(
        lambda m: chr(int(m.group(1)[1:], 16)) if len(m.group(1)) == 3 else named[m.group(1)], text
    )


def _exim_literal(text: str) -> str:
    """Interpret the backslash escapes of an expansion string literal."""

    def one(m: re.Match[str]) -> str:
        e = m.group(1)
        if e[0] == "x":
            return chr(int(e[1:], 16)) if len(e) > 1 else "\0"
        if e[0] in "01234567":
            return chr(int(e, 8) & 0xFF)
        return {"n": "\n", "t": "\t", "r": "\r"}.get(e, e)

    return _EXIM_ESCAPE.sub(one, text)


def _corpus_rows() -> list[tuple[str, str, str]]:
    """(operator name, argument, expected) for every ``${op:literal}`` row
    whose operator is ours."""
    rows = []
    for line in CORPUS.read_text(encoding="ascii").splitlines():
        source, expected = line.split("\t", 1)
        m = _SIMPLE_OP.fullmatch(source)
        if m is None:
            continue
        name = m.group(1)
        base, _ = ops.split_operator_name(name)
        if base in ops.EVALUATOR_OPERATORS or (base == "quote" and "_" in name and name != "quote_local_part"):
            continue
        rows.append((name, _exim_literal(m.group(2)), expected))
    return rows


def _run(name: str, arg: str) -> str:
    try:
        return ops.get_operator(name)(arg)
    except ExpansionError as e:
        return "FAIL:" + e.message


class CorpusTests(unittest.TestCase):
    def test_simple_operator_rows(self) -> None:
        rows = _corpus_rows()
        self.assertGreater(len(rows), 70)
        failures = []
        for name, arg, expected in rows:
            got = _run(name, arg)
            want = expected if expected.startswith("FAIL:") else _corpus_value(expected)
            if got != want:
                failures.append(f"${{{name}:{arg!r}}}: got {got!r}, want {want!r}")
        self.assertEqual(failures, [])

    def test_item_rows(self) -> None:
        """Corpus rows for items whose evaluation is one of our helpers."""
        self.assertEqual(ops.item_substr("-4", None, "abcdef"), "ab")
        self.assertEqual(ops.item_hash("3", "5", "abcdefgh"), "bba")
        self.assertEqual(ops.item_nhash("8", "64", "monty"), "7/3")
        self.assertEqual(ops.item_tr("hello", "lo", "x"), "hexxx")
        self.assertEqual(ops.item_tr("a.b.c", ".", "/"), "a/b/c")
        self.assertEqual(ops.item_listquote(",", "a,b,c"), "a,,b,,c")
        self.assertEqual(
            ops.item_hmac("sha1", "key", "The quick brown fox"),
            "22f9e077a3cebd09248154f85d9a56c79941fd96",
        )
        self.assertEqual(ops.listextract("-1", "a:b:c"), "c")
        self.assertIsNone(ops.listextract("4", "a:b:c"))
        self.assertEqual(ops.listextract("2", "<, x,y,z"), "y")
        self.assertEqual(ops.extract_keyed("key2", "key1=val1 key2=val2"), "val2")
        self.assertIsNone(ops.extract_keyed("missing", "key1=val1"))
        self.assertEqual(ops.extract_keyed("KEY1", "key1=val1"), "val1")
        self.assertEqual(ops.extract_field("-1", ":", "a:b:c"), "c")
        self.assertIsNone(ops.extract_field("5", ":", "a:b:c"))
        self.assertEqual(ops.extract_field("2", ":", "a:b:c"), "b")
        self.assertEqual(ops.extract_json("name", '{"name":"alice","age":30}', False), '"alice"')
        self.assertEqual(ops.extract_json("name", '{"name":"alice"}', True), "alice")
        self.assertEqual(ops.extract_json("2", '[1,"two",3]', True), "two")
        self.assertTrue(ops.crypteq("abc", "{md5}kAFQmDzST7DWlj99KOF/cg=="))
        self.assertFalse(ops.crypteq("abd", "{md5}900150983cd24fb0d6963f7d28e17f72"))
        self.assertTrue(ops.crypteq("abc", "{md5}900150983cd24fb0d6963f7d28e17f72"))
        self.assertTrue(ops.crypteq("secret", "{crypt}abNANd1rDfiNc"))
        self.assertFalse(ops.crypteq("wrong", "abNANd1rDfiNc"))
        self.assertTrue(ops.parse_bool("true", False))
        self.assertTrue(ops.parse_bool(" 1 ", False))
        self.assertFalse(ops.parse_bool("false", False))
        self.assertFalse(ops.parse_bool("", False))
        self.assertFalse(ops.parse_bool("", True))
        self.assertTrue(ops.parse_bool("anything", True))
        self.assertFalse(ops.parse_bool("0", True))
        self.assertEqual(ops.condition_integer("1M"), 1048576)
        self.assertEqual(ops.condition_integer(" 5"), 5)
        self.assertEqual(ops.condition_integer("010"), 10)
        self.assertTrue(ops.string_compare("lti", "ABC", "abd"))
        self.assertTrue(ops.string_compare("lei", "ABC", "abc"))
        self.assertTrue(ops.string_compare("gti", "B", "a"))
        self.assertTrue(ops.string_compare("gei", "A", "a"))
        self.assertFalse(ops.string_compare("eq", "abc", "ABC"))

    def test_item_error_rows(self) -> None:
        cases = [
            (lambda: ops.item_length("x", "abc"), '"x" is not a positive number (in "length" expansion)'),
            (lambda: ops.item_substr("x", "1", "abcdef"), '"x" is not a number (in "substr" expansion)'),
            (lambda: ops.listextract("x", "a:b"), 'first argument of "listextract" must be numeric'),
            (lambda: ops.condition_integer("0x10"), 'invalid integer "0x10"'),
            (lambda: ops.condition_integer("1x"), 'invalid integer "1x"'),
            (lambda: ops.parse_bool("maybe", False), 'unrecognised boolean value "maybe"'),
        ]
        for call, message in cases:
            self.assertEqual(self.assertRaises(ExpansionError, call).message, message)


class OperatorNameTests(unittest.TestCase):
    def test_unknown(self) -> None:
        for name in ("trim", "headerwrap", "local_part_x", "nosuch"):
            e = self.assertRaises(ExpansionError, ops.get_operator, name)
            self.assertEqual(e.message, f'unknown expansion operator "{name}"')

    def test_ignored_suffix(self) -> None:
        # Exim cuts at the first underscore and most operators ignore the rest.
        self.assertEqual(_run("lc_foo", "ABC"), "abc")
        self.assertEqual(_run("strlen_3", "abc"), "3")
        self.assertEqual(_run("mask_x", "1.2.3.4/8"), "1.0.0.0/8")

    def test_numeric_suffix_forms(self) -> None:
        cases = [
            ("length_", "abc", ""),
            ("substr_", "abc", "abc"),
            ("substr_-", "abcdef", "abcdef"),
            ("l_3_4", "abcdef", 'FAIL:non-digit after underscore in "l_3_4"'),
            ("substr_1_", "abcdef", 'FAIL:non-digit after underscore in "substr_1_"'),
            ("substr__1", "abcdef", 'FAIL:non-digit after underscore in "substr__1"'),
            ("substr_1_-2", "abcdef", 'FAIL:non-digit after underscore in "substr_1_-2"'),
            ("hash_3_", "abcdef", 'FAIL:non-digit after underscore in "hash_3_"'),
            ("hash_2_63", "abcdef", 'FAIL:hash count "63" too big'),
            ("nhash_5", "abc", "1"),
            ("substr_-10_3", "abcdef", ""),
            ("substr_-10_6", "abcdef", "ab"),
            ("substr_-2", "abcdef", "abcd"),
            ("sha2_", "abc", "FAIL:unrecognised sha2 variant"),
            ("sha3_100", "abc", "FAIL:unrecognised sha3 variant"),
        ]
        for name, arg, want in cases:
            self.assertEqual(_run(name, arg), want, name)
        self.assertEqual(_run("sha256_384", "abc"), _run("sha2_384", "abc"))
        e = self.assertRaises(ExpansionError, ops.get_operator, "length")
        self.assertEqual(e.message, "missing values after length")

    def test_zero_divisors_fail(self) -> None:
        # Exim 4.96 dies with SIGFPE on these; we fail the expansion.
        self.assertRaises(ExpansionError, ops.item_nhash, "0", None, "abc")
        self.assertRaises(ExpansionError, ops.item_nhash, "5", "0", "abc")
        self.assertRaises(ExpansionError, _run_raw, "nhash_0", "abc")
        self.assertRaises(ExpansionError, _run_raw, "hash_2_0", "abcdef")

    def test_evaluator_operators(self) -> None:
        for name in ("expand", "listnamed", "listnamed_d", "quote_mysql"):
            self.assertRaises(LookupError, ops.get_operator, name)


def _run_raw(name: str, arg: str) -> str:
    return ops.get_operator(name)(arg)


class EvalTests(unittest.TestCase):
    cases: ClassVar[list[tuple]] = [
        ("0xg", False, "0"),
        ("0x+1", False, "1"),
        ("08", False, 'FAIL:error in expression evaluation: expecting operator (after processing "0")'),
        ("019", False, 'FAIL:error in expression evaluation: expecting operator (after processing "01")'),
        ("-9223372036854775808", False, "-9223372036854775807"),
        ("9223372036854775808", False, "9223372036854775807"),
        ("0x8000000000000000", False, "9223372036854775807"),
        ("4611686018427387904+1", False,
         'FAIL:error in expression evaluation: overflow in sum (after processing "4611686018427387904+1")'),
        ("1+4611686018427387904", False, "4611686018427387905"),
        ("9223372036854775807*2", False, "-2"),
        ("1<<64", False, "1"),
        ("1<<-1", False, "-9223372036854775808"),
        ("-8>>1", False, "-4"),
        ("10000000000G", False, "-7709325833709551616"),
        ("(1+2", False,
         'FAIL:error in expression evaluation: expecting closing parenthesis (after processing "(1+2")'),
        ("  ", False,
         'FAIL:error in expression evaluation: expecting number or opening parenthesis (after processing "  ")'),
        ("!0", False,
         'FAIL:error in expression evaluation: expecting number or opening parenthesis (after processing "")'),
        ("1 2", False, 'FAIL:error in expression evaluation: expecting operator (after processing "1 ")'),
        ("1%0", False, 'FAIL:error in expression evaluation: modulo by zero (after processing "1%0")'),
        ("(-9223372036854775807-1)/-1", False, "9223372036854775807"),
        ("(-9223372036854775807-1)%-1", False, "9223372036854775807"),
        ("2^3&1", False, "3"),
        ("- - 3", False, "3"),
        ("10/-3", False, "-3"),
        ("10%-3", False, "1"),
        ("1 <<2", False, "4"),
        ("0x10", True, 'FAIL:error in expression evaluation: expecting operator (after processing "0")'),
        ("1k", True, "1024"),
    ]

    def test_cases(self) -> None:
        for text, decimal, want in self.cases:
            try:
                got = str(eval_expression(text, decimal))
            except ExpansionError as e:
                got = "FAIL:" + e.message
            self.assertEqual(got, want, text)


class MiscOperatorTests(unittest.TestCase):
    """Behaviour checked against exim4 -be beyond the corpus."""

    cases: ClassVar[list[tuple]] = [
        ("ipv6norm", "::", ":"),
        ("ipv6norm", "2001:db8:0:1:1:1:1:1", "2001:db8::1:1:1:1:1"),
        ("ipv6norm", "1:0:0:2:0:0:0:3", "1:0:0:2::3"),
        ("ipv6norm", "FE80::1%eth0", "fe80::1"),
        ("mask", "2001:db8:abcd::1/48", "2001.0db8.abcd.0000.0000.0000.0000.0000/48"),
        ("mask", "1.2.3.4", 'FAIL:missing mask value in "1.2.3.4"'),
        ("mask", "1.2.3.4/", "0.0.0.0/0"),
        ("mask", "1.2.3.4/8x", 'FAIL:"1.2.3.4/8x" is not an IP address'),
        ("mask", "01.2.3.4/8", 'FAIL:"01.2.3.4/8" is not an IP address'),
        ("mask_n", "1.2.3.4/8", "1.0.0.0/8"),
        ("mask_n", "::1/0", ":/0"),
        ("reverse_ip", "1.2.3.4/8", "4.3.2.1"),
        ("reverse_ip", "::ffff:1.2.3.4", "4.3.2.1"),
        ("ipv6denorm", "::1", "0000:0000:0000:0000:0000:0000:0000:0001"),
        ("base32", "abc", 'FAIL:argument for base32 operator is "abc", which is not a decimal number'),
        ("base64d", "YWJj ZA==", "abcd"),
        ("base64d", "AGE=", ""),
        ("base64d", "YQ", 'FAIL:string "YQ" is not well-formed for "base64d" operator'),
        ("randint", "0", "0"),
        ("randint", "x", 'FAIL:integer expected but "x" found'),
        ("stat", "/nonexist", "FAIL:stat(/nonexist) failed: No such file or directory"),
        ("rfc2047", "caf\xc3\xa9", "=?UTF-8?Q?caf=C3=A9?="),
        ("rfc2047d", "=?iso-8859-1?q?caf=E9?= =?iso-8859-1?q?_x?=", "caf\xc3\xa9 x"),
        ("rfc2047d", "=?foo?q?abc?=",
         'FAIL:iconv_open("UTF-8", "foo") failed: Invalid argument (maybe unsupported conversion)'),
        ("utf8_domain_to_alabel", "B\xc3\xbccher.Example", "xn--bcher-kva.example"),
        ("utf8_localpart_to_alabel", "j\xc3\xb6rg", "xn--jrg-sna"),
        ("utf8_domain_from_alabel", "XN--bcher-kva.example", "XN--bcher-kva.example"),
        ("utf8_domain_to_alabel", "\xff",
         "FAIL:error converting utf8 (\\377) to alabel: string encoding error"),
        ("utf8_localpart_from_alabel", "abc", "FAIL:error converting alabel (abc) to utf8: bad alabel prefix"),
        ("from_utf8", "\xe2\x82\xac", "_"),
        ("time_interval", "", "0s"),
        ("time_eval", "", 'FAIL:string "" is not an Exim time interval in "time_eval" operator'),
        ("addresses", ">", "FAIL:output separator missing in expanding ${addresses:>}"),
        ("addresses", ">; a@b, c@d", "a@b;c@d"),
        ("addresses", "a@b, bad address, c@d", "a@b:c@d"),
        ("hexquote", "a b\x7f\xff", "a\\x20b\\x7f\\xff"),
        ("escape", "tab\there\x08", "tab\there\\b"),
        ("quote", "a\nb\\", '"a\\nb\\\\"'),
        ("quote_local_part", ".ab", '".ab"'),
        ("quote_local_part", "ab.", '"ab."'),
        ("quote_local_part", "a+b=c", "a+b=c"),
    ]

    def test_cases(self) -> None:
        for name, arg, want in self.cases:
            self.assertEqual(_run(name, arg), want, f"{name}:{arg!r}")

    def test_stat_format(self) -> None:
        st = os.stat("/")
        got = _run("stat", "/")
        self.assertTrue(got.startswith(f"mode={st.st_mode & 0o77777:04o} smode=d"), got)
        self.assertIn(f" inode={st.st_ino} ", got)

    def test_listquote_empty(self) -> None:
        self.assertEqual(ops.item_listquote(":", ""), " ")

    def test_condition_integer_messages(self) -> None:
        for text, message in [
            ("a", 'integer expected but "a" found'),
            ("99999999999999999999", 'absolute value of integer "99999999999999999999" is too large (overflow)'),
            ("9999999999999G", 'absolute value of integer "9999999999999G" is too large (overflow)'),
        ]:
            self.assertEqual(self.assertRaises(ExpansionError, ops.condition_integer, text).message, message)
        self.assertEqual(ops.condition_integer("   "), 0)
        self.assertEqual(ops.condition_integer("-2k "), -2048)


class FidelityRegressionTests(unittest.TestCase):
    """Differences from exim4 -be found and fixed; expectations from Exim
    4.96 (Debian 12)."""

    def test_empty_numeric_operand_is_zero(self) -> None:
        self.assertEqual(ops.condition_integer(""), 0)
        self.assertEqual(_run("randint", ""), 'FAIL:integer expected but "" found')

    def test_base32_base62_read_unsigned(self) -> None:
        cases = [
            ("base32", "18446744073709551615", "p777777777777"),
            ("base32", "9223372036854775808", "iaaaaaaaaaaaa"),
            ("base32", "99999999999999999999999", "p777777777777"),
            ("base32", "-18446744073709551615", "b"),
            ("base32", "-18446744073709551616", "p777777777777"),
            ("base32", " 5", "f"),
            ("base62", "18446744073709551615", "16AHYF"),
        ]
        for name, arg, want in cases:
            self.assertEqual(_run(name, arg), want, arg)

    def test_domain_literal_in_plain_address(self) -> None:
        cases = [
            ("address", "joe@[192.168.1.1]", "joe@[192.168.1.1]"),
            ("address", "joe@[IPv6:2001:db8::1]", "joe@[IPv6:2001:db8::1]"),
            ("domain", "joe@[1.2.3.4]", "[1.2.3.4]"),
            ("local_part", "joe@[1.2.3.4]", "joe"),
            ("addresses", "joe@[1.2.3.4], b@c", "joe@[1.2.3.4]:b@c"),
            ("address", "joe@[abc]", "joe@[abc]"),
            ("address", "joe@[1.2.3.4", ""),
            ("address", "<joe@[1.2.3.4]>", ""),  # allow_domain_literals is off
        ]
        for name, arg, want in cases:
            self.assertEqual(_run(name, arg), want, arg)

    def test_rfc2047_word_split(self) -> None:
        self.assertEqual(_run("rfc2047", "a" * 85 + "\xc3\xa9"),
                         "=?UTF-8?Q?" + "a" * 68 + "?= =?UTF-8?Q?" + "a" * 17 + "=C3=A9?=")
        self.assertEqual(_run("rfc2047", "a" * 81 + "=b"),
                         "=?UTF-8?Q?" + "a" * 68 + "?= =?UTF-8?Q?" + "a" * 13 + "=3Db?=")
        self.assertEqual(_run("rfc2047", "\xc3\xa9" * 24),
                         "=?UTF-8?Q?" + "=C3=A9" * 12 + "?= =?UTF-8?Q?" + "=C3=A9" * 10
                         + "?= =?UTF-8?Q?" + "=C3=A9" * 2 + "?=")

    def test_utf8clean_surrogates(self) -> None:
        self.assertEqual(_run("utf8clean", "\xed\xa0\x80"), "?")
        self.assertEqual(_run("utf8clean", "a\xed\xbf\xbfz"), "a?z")
        self.assertEqual(_run("utf8clean", "\xed\x9f\xbf"), "\xed\x9f\xbf")

    def test_rfc2047d_charset_names(self) -> None:
        self.assertEqual(_run("rfc2047d", "=??q?abc?="), "abc")
        self.assertEqual(_run("rfc2047d", "=?lat*in1?q?=E9?="), "\xc3\xa9")
        self.assertEqual(_run("rfc2047d", "=?latin1//TRANSLIT?q?=E9?="), "\xc3\xa9")
        self.assertEqual(_run("rfc2047d", "=?latin-1?q?=E9?="),
                         'FAIL:iconv_open("UTF-8", "latin-1") failed: Invalid argument'
                         " (maybe unsupported conversion)")
        self.assertEqual(_run("rfc2047d", "=?bad1?q?a?= =?bad2?q?b?="),
                         'FAIL:iconv_open("UTF-8", "bad2") failed: Invalid argument'
                         " (maybe unsupported conversion)")

    def test_extract_json_messages(self) -> None:
        cases = [
            ("a", "not json", False, "missing '{' wrapping object for extract json"),
            ("a", '{"a":1', False, "missing '}' wrapping object for extract json"),
            ("1", "not", False, "missing '[' wrapping array for extract json"),
            ("1", "[1,2", False, "missing ']' wrapping array for extract json"),
            ("a", '{"a":5}', True, "missing '\"' wrapping string result for extract jsons"),
        ]
        for key, text, strip, message in cases:
            e = self.assertRaises(ExpansionError, ops.extract_json, key, text, strip)
            self.assertEqual(e.message, message, text)

    def test_hash_zero_count_short_subject(self) -> None:
        self.assertEqual(_run("hash_3_0", "abc"), "abc")

    def test_time_eval_int_overflow(self) -> None:
        for arg in ("2147483648s", "4294967295s", "99999999999999999999w", "2147483647s1s"):
            self.assertEqual(
                _run("time_eval", arg),
                f'FAIL:string "{arg}" is not an Exim time interval in "time_eval" operator')
        self.assertEqual(_run("time_eval", "2147483647s2147483647s2s"), "0")
        self.assertEqual(_run("time_interval", "2147483648"), "-5d3h14m8s")
        self.assertEqual(_run("time_interval", "2147483649"), "-3550w5d3h14m7s")

    def test_idn_libraries(self) -> None:
        cases = [
            ("utf8_domain_to_alabel", "\xc3\x89.com", "xn--9ca.com"),
            ("utf8_domain_to_alabel", "\xe2\x85\xab.com", "xii.com"),
            ("utf8_domain_to_alabel", "e\xcc\x81.com", "xn--9ca.com"),
            ("utf8_domain_to_alabel", "\xc3\xa9..com", "xn--9ca..com"),
            ("utf8_domain_to_alabel", "-\xc3\xa9.com",
             "FAIL:error converting utf8 (-\\303\\251.com) to alabel: string start/ends with forbidden hyphen"),
            ("utf8_localpart_from_alabel", "xn--9ca.x", "\xc3\xa9\xc3\xbd\xc3\xb5"),
        ]
        for name, arg, want in cases:
            self.assertEqual(_run(name, arg), want, arg)


class RegexTests(unittest.TestCase):
    def test_errors(self) -> None:
        from twisted_mta.expand.regex import compile_regex

        for pattern, reason in [
            ("[z-a]", "range out of order in character class at offset 3"),
            ("(", "missing closing parenthesis at offset 1"),
            ("a)", "unmatched closing parenthesis at offset 1"),
            ("*a", "quantifier does not follow a repeatable item at offset 0"),
            ("x\\", "\\ at end of pattern at offset 2"),
            ("[a", "missing terminating ] for character class at offset 2"),
        ]:
            e = self.assertRaises(ExpansionError, compile_regex, pattern)
            self.assertEqual(e.message, f'regular expression error in "{pattern}": {reason}')

    def test_pcre_syntax(self) -> None:
        from twisted_mta.expand.regex import compile_regex

        self.assertTrue(compile_regex("^(?i)ABC$").match("abc"))
        self.assertTrue(compile_regex("a(?i)b|c").fullmatch("C"))
        self.assertFalse(compile_regex("a(?i)b|c").fullmatch("AB"))
        self.assertTrue(compile_regex(r"\Qa.b\E").fullmatch("a.b"))
        self.assertTrue(compile_regex("[[:alpha:]]+").fullmatch("abZ"))
        self.assertTrue(compile_regex(r"(?<n>a)\g1").fullmatch("aa"))
        self.assertFalse(compile_regex(r"\w").match("\xe9"))  # no UTF mode: ASCII \w
        self.assertIsNone(compile_regex(r"a\z").search("a\n"))
        self.assertTrue(compile_regex(r"a\Z").search("a\n"))
