"""Tests for twisted_mta.lookups: type parsing, lsearch family, dsearch,
partial matching and defaults, quoting, against Exim 4.96 results
(the expansion corpus rows with ${lookup and a few extra -be checks)."""

from __future__ import annotations

import os
import re
import shutil
import tempfile

from twisted.trial import unittest
from zope.interface.verify import verifyObject

from tests.fakes import fails
from twisted_mta.expand.context import ExpansionContext
from twisted_mta.expand.errors import ExpansionError, LookupDefer, TaintError
from twisted_mta.interfaces import ILookup
from twisted_mta.lookups import (
    get_lookup,
    lookup_defer_message,
    lookup_names,
    parse_lookup_type,
    quote_for_lookup,
    search_find,
    search_find_full,
)
from twisted_mta.lookups.lsearch import parse_lsearch
from twisted_mta.taint import taint

CORPUS = "/work/shared/reference/corpora/expand"


class StubContext(ExpansionContext):
    """An ExpansionContext whose expand() knows just enough for wildlsearch
    keys: \\N...\\N is literal, and a $ not followed by a letter, digit or {
    is Exim's error."""

    async def expand(self, text: str) -> str:
        if "\\N" in text:
            return text.replace("\\N", "")
        if re.search(r"\$(?![A-Za-z0-9{])", text):
            raise ExpansionError("$ not followed by letter, digit, or {")
        return text


def corpus_rows() -> list[tuple[str, str]]:
    rows = []
    with open(os.path.join(CORPUS, "expand-corpus.tsv"), encoding="ascii") as f:
        for line in f:
            source, _, result = line.rstrip("\n").partition("\t")
            if "${lookup" in source:
                rows.append((source, result))
    return rows




_ROW = re.compile(r"^\$\{lookup\{([^}]*)\}([^{]+)\{/EXPCORPUS/([^}]*)\}(.*)\}$")


def _yesno(tail: str, value: str | None) -> str | None:
    """The {yes}{no} part of the simple corpus rows; None if too complex."""
    parts = re.fullmatch(r"(?:\{([^{}$]*(?:\$value[^{}$]*)?)\})?(?:\{([^{}$]*)\})?", tail)
    if parts is None:
        return None
    yes, no = parts.groups()
    if value is None:
        return no or ""
    return value if yes is None else yes.replace("$value", value)


class CorpusTests(unittest.TestCase):
    """Every simple ${lookup} row of the expansion corpus, through search_find."""

    def setUp(self) -> None:
        self.dir = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, self.dir)
        data = os.path.join(CORPUS, "data")
        for name in os.listdir(data):
            src = os.path.join(data, name)
            if os.path.isdir(src):
                shutil.copytree(src, os.path.join(self.dir, name))
            else:
                shutil.copy(src, self.dir)
        self.ctx = StubContext()

    async def test_corpus_rows(self) -> None:
        checked = 0
        for source, expected in corpus_rows():
            m = _ROW.match(source)
            if m is None or "${" in m.group(4):
                continue
            key, type_text, filename, tail = m.groups()
            path = os.path.join(self.dir, filename)
            expected = expected.replace("/EXPCORPUS/", self.dir + "/")
            try:
                spec = parse_lookup_type(type_text)
                value = await search_find(spec, path, key, self.ctx)
            except ExpansionError as e:
                self.assertEqual("FAIL:" + e.message, expected, source)
                checked += 1
                continue
            result = _yesno(tail, value)
            if result is None:
                continue
            self.assertEqual(result, expected, source)
            checked += 1
        self.assertGreaterEqual(checked, 26)

    def test_type_errors(self) -> None:
        for text, message in [
            ("nosuchtype", 'unknown lookup type "nosuchtype"'),
            ("lsearch}", 'unknown lookup type "lsearch}"'),
            ("partial(pfx)-lsearch", 'format error in lookup type "partial(pfx)-lsearch"'),
            ("partial(*)-lsearch", 'unknown lookup type "-lsearch"'),
            ("lsearch,ret=key*", 'unknown lookup type "lsearch,ret=key"'),
            ("partial-dnsdb", '"partial" is not permitted for lookup type "dnsdb"'),
            ("dnsdb*", 'defaults using "*" or "*@" are not permitted for lookup type "dnsdb*"'),
        ]:
            e = self.assertRaises(ExpansionError, parse_lookup_type, text)
            self.assertEqual(e.message, message)


class ParseTests(unittest.TestCase):
    def test_specs(self) -> None:
        spec = parse_lookup_type("partial3-lsearch*@,ret=key")
        self.assertEqual(
            (spec.name, spec.partial, spec.affix, spec.star, spec.star_at, spec.options),
            ("lsearch", 3, "*.", False, True, "ret=key"),
        )
        self.assertEqual(parse_lookup_type("partial-lsearch").partial, 2)
        self.assertEqual(parse_lookup_type("partial0-lsearch").partial, 0)
        self.assertEqual(parse_lookup_type("partial(*)lsearch").affix, "*")
        self.assertTrue(parse_lookup_type("lsearch*").star)
        self.assertEqual(parse_lookup_type("dsearch,ret=full").option_dict, {"ret": "full"})
        self.assertEqual(parse_lookup_type("redis,servers=a:b").option_dict, {"servers": "a:b"})
        self.assertEqual(parse_lookup_type("net24-lsearch").net, 24)
        self.assertEqual(parse_lookup_type("net-iplsearch").net, -1)
        self.assertIsNone(parse_lookup_type("lsearch").net)

    def test_providers(self) -> None:
        for name in lookup_names():
            self.assertTrue(verifyObject(ILookup, get_lookup(name)), name)
        for name in ("lsearch", "wildlsearch", "nwildlsearch", "iplsearch", "dsearch", "dnsdb", "redis"):
            self.assertIn(name, lookup_names())

    def test_parse_lsearch(self) -> None:
        entries = parse_lsearch(
            'a: one\n  two\n\n  ignored\n"q\\x41 k":  v  \n# c\nb\nc:d\n"ret":x\n'
        )
        self.assertEqual([(e.key, e.data) for e in entries],
                         [("a", "one two"), ("qA k", "v"), ("b", ""), ("c", "d"), ("ret", "x")])
        self.assertEqual(entries[1].full, 'qA k:  v')

    def test_defer_message(self) -> None:
        text = lookup_defer_message("a\nb", LookupDefer("oops"))
        self.assertEqual(text, 'lookup of "a\\nb" gave DEFER: oops')


class QuoteTests(unittest.TestCase):
    def test_quotes(self) -> None:
        # Outputs checked against exim4 -be.
        self.assertEqual(quote_for_lookup("lsearch", "abc", None), "abc")
        self.assertEqual(quote_for_lookup("dnsdb", "a b", None), "a b")
        self.assertEqual(quote_for_lookup("pgsql", "it's", None), "it''s")
        self.assertEqual(quote_for_lookup("ldap", "cn=a,b", "dn"), "cn%3Da%5C%2Cb")
        self.assertEqual(quote_for_lookup("ldap", '#a b ;<>+"=,', "dn"),
                         "%5C%23a%20b%20%5C%3B%5C%3C%5C%3E%5C+%5C%22%3D%5C%2C")
        self.assertEqual(quote_for_lookup("ldap", "x  ", "dn"), "x%5C%20%5C%20")
        self.assertEqual(quote_for_lookup("ldap", "a(b)*cd", None), "a%5C28b%5C29%5C2Acd")
        self.assertEqual(quote_for_lookup("mysql", "a'b\"cd\ne", None), "a\\'b\\\"cd\\ne")
        self.assertEqual(quote_for_lookup("redis", "a b\\c\td", None), "a\\ b\\\\c\\\td")

    def test_quote_errors(self) -> None:
        e = self.assertRaises(ExpansionError, quote_for_lookup, "nosuch", "x", None)
        self.assertEqual(e.message, 'unknown lookup type "nosuch"')
        e = self.assertRaises(ExpansionError, quote_for_lookup, "lsearch", "x", "y")
        self.assertEqual(e.message, '"y" unrecognized after "${quote_lsearch"')
        e = self.assertRaises(ExpansionError, quote_for_lookup, "mysql", "x", "dn")
        self.assertEqual(e.message, '"dn" unrecognized after "${quote_mysql"')


class FileLookupTests(unittest.TestCase):
    """Behaviour checked with exim4 -be beyond the corpus rows."""

    def setUp(self) -> None:
        self.dir = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, self.dir)
        shutil.copy(os.path.join(CORPUS, "data", "aliases"), self.dir)
        shutil.copy(os.path.join(CORPUS, "data", "partial"), self.dir)
        shutil.copy(os.path.join(CORPUS, "data", "nets"), self.dir)
        shutil.copy(os.path.join(CORPUS, "data", "wildbad"), self.dir)
        shutil.copy(os.path.join(CORPUS, "data", "wild"), self.dir)
        os.mkdir(os.path.join(self.dir, "sub"))
        self.ctx = StubContext()

    def path(self, name: str) -> str:
        return os.path.join(self.dir, name)

    async def find(self, type_text: str, key: str, name: str) -> str | None:
        return await search_find(parse_lookup_type(type_text), self.path(name), key, self.ctx)

    async def test_lsearch(self) -> None:
        self.assertEqual(await self.find("lsearch", "multi", "aliases"), "first line continued line")
        self.assertEqual(await self.find("lsearch", "spaced", "aliases"),
                         'key: the key is "spaced"; the data starts at "key"')
        self.assertEqual(await self.find("lsearch,ret=full", "quoted key", "aliases"),
                         "quoted key: quoted value")
        self.assertIsNone(await self.find("lsearch", "", "aliases"))
        self.assertEqual(await self.find("lsearch*", "", "aliases"), "default-star-value")
        self.assertEqual(await self.find("lsearch*,ret=key", "x", "aliases"), "x")

    async def test_file_errors(self) -> None:
        e = await fails(self.find("lsearch", "x", "nosuch"), ExpansionError)
        self.assertEqual(e.message, f"failed to open {self.path('nosuch')} for linear search: "
                                    "No such file or directory")
        e = await fails(self.find("lsearch", "x", "sub"), ExpansionError)
        self.assertEqual(e.message, f"{self.path('sub')} is not a regular file (lsearch lookup)")
        e = await fails(
            search_find(parse_lookup_type("lsearch"), taint(self.path("aliases")), "x", self.ctx),
            TaintError)
        self.assertEqual(e.message, f"Tainted filename for search: '{self.path('aliases')}'")

    async def test_file_change(self) -> None:
        path = self.path("changing")
        with open(path, "w") as f:
            f.write("k: one\n")
        self.assertEqual(await self.find("lsearch", "k", "changing"), "one")
        with open(path, "w") as f:
            f.write("k: second\n")
        self.ctx.lookup_cache.clear()
        self.assertEqual(await self.find("lsearch", "k", "changing"), "second")

    async def test_cache(self) -> None:
        path = self.path("cached")
        with open(path, "w") as f:
            f.write("k: one\n")
        self.assertEqual(await self.find("lsearch", "k", "cached"), "one")
        os.unlink(path)
        # Same context: the cached answer, as Exim's per-file item cache.
        self.assertEqual(await self.find("lsearch", "k", "cached"), "one")
        await fails(self.find("lsearch,cache=no_rd", "k", "cached"), ExpansionError)

    async def test_partial_variables(self) -> None:
        spec = parse_lookup_type("partial-lsearch")
        r = await search_find_full(spec, self.path("partial"), "a.b.example.org", self.ctx)
        self.assertEqual((r.wild, r.fixed, r.value, r.key),
                         ("a.b", "example.org", "star-dot-example-org", "*.example.org"))
        r = await search_find_full(spec, self.path("partial"), "example.com", self.ctx)
        self.assertEqual((r.wild, r.fixed), ("", "example.com"))
        r = await search_find_full(parse_lookup_type("partial0-lsearch"), self.path("partial"),
                                   "a.org", self.ctx)
        self.assertEqual((r.wild, r.fixed, r.value), ("a.or", "", "default-partial"))
        r = await search_find_full(parse_lookup_type("partial(*)lsearch"), self.path("partial"),
                                   "a.b.example.net", self.ctx)
        self.assertEqual((r.wild, r.fixed, r.value), ("a.b", "example.net", "star-example-net"))
        self.assertIsNone(await self.find("partial1()lsearch", "a.example.org", "partial"))
        r = await search_find_full(parse_lookup_type("lsearch*@"), self.path("aliases"),
                                   "a@example.org", self.ctx)
        self.assertEqual((r.wild, r.fixed, r.value), ("a", "", "star-at-example-org"))
        r = await search_find_full(parse_lookup_type("lsearch*"), self.path("partial"), "zz",
                                   self.ctx)
        self.assertEqual((r.wild, r.fixed, r.key), ("zz", "", "*"))

    async def test_wild_defer(self) -> None:
        e = await fails(self.find("wildlsearch", "mail1.example.org", "wildbad"),
                                     LookupDefer)
        self.assertEqual(lookup_defer_message("mail1.example.org", e),
                         'lookup of "mail1.example.org" gave DEFER: ')
        self.assertEqual(await self.find("nwildlsearch", "MAIL1.example.org", "wildbad"),
                         "regex-mail-host")

    async def test_wild_negation(self) -> None:
        with open(self.path("neg"), "w") as f:
            f.write("!*.example.com: not-example\n")
        self.assertEqual(await self.find("nwildlsearch", "a.test", "neg"), "not-example")
        self.assertIsNone(await self.find("nwildlsearch", "a.example.com", "neg"))

    async def test_iplsearch(self) -> None:
        self.assertEqual(await self.find("iplsearch", "::ffff:10.1.2.3", "nets"), "net-ten")
        self.assertEqual(await self.find("iplsearch,ret=full", "192.168.1.5", "nets"),
                         "192.168.0.0/16:   lan-192-168")
        self.assertEqual(await self.find("iplsearch", "127.0.0.1", "nets"), "loopback-one")
        self.assertIsNone(await self.find("iplsearch", "127.0.0.2", "nets"))
        for bad in ("zz", "192.168.1.0/24", "010.1.2.3"):
            e = await fails(self.find("iplsearch", bad, "nets"), LookupDefer)
            self.assertEqual(
                e.message,
                f'"{bad}" is not a valid iplsearch key (an IP address, with optional CIDR mask, '
                "is wanted): in a host list, use net-iplsearch as the search type")

    async def test_dsearch(self) -> None:
        with open(self.path("file"), "w"):
            pass
        self.assertEqual(await self.find("dsearch", "sub", "."), "sub")
        self.assertEqual(await self.find("dsearch,ret=full", "sub", "."),
                         os.path.join(self.dir, ".", "sub"))
        self.assertIsNone(await self.find("dsearch,filter=file", "sub", "."))
        self.assertEqual(await self.find("dsearch,filter=file", "file", "."), "file")
        self.assertEqual(await self.find("dsearch,filter=dir", ".", "."), ".")
        self.assertIsNone(await self.find("dsearch,filter=subdir", ".", "."))
        self.assertIsNone(await self.find("dsearch", "none", "."))
        e = await fails(self.find("dsearch", "x/y", "."), LookupDefer)
        self.assertEqual(e.message, "key for dsearch lookup contains a slash: x/y")
        e = await fails(self.find("dsearch", "x", "aliases"), ExpansionError)
        self.assertEqual(e.message,
                         f"failed to open {self.path('aliases')} for directory search: Not a directory")
        e = await fails(
            search_find(parse_lookup_type("dsearch"), "relative", "x", self.ctx), ExpansionError)
        self.assertEqual(e.message,
                         "failed to open relative for directory search: No such file or directory")
