"""twisted_mta.dns.Resolver and the dnsdb lookup, against an in-process
twisted.names authoritative server on a free loopback port."""

from __future__ import annotations

import dns.rdata
import dns.rdataclass
import dns.rdatatype
from twisted.internet import reactor
from twisted.names import authority, server
from twisted.names import dns as tdns
from twisted.python.threadpool import ThreadPool
from twisted.trial import unittest

from tests.peers import free_port
from twisted_mta.dns import DnsNotFound, DnsTempFail, Resolver
from twisted_mta.expand.context import ExpansionContext
from twisted_mta.expand.errors import LookupDefer
from twisted_mta.lookups import parse_lookup_type, search_find
from twisted_mta.lookups.dnsdb import format_record

ZONE = "example.test"


class DictAuthority(authority.FileAuthority):
    """An authority whose records come from a dict, not a file."""

    def loadFile(self, data):
        self.soa, self.records = data


def _zone() -> DictAuthority:
    soa = tdns.Record_SOA(mname=b"ns1." + ZONE.encode(), rname=b"hostmaster." + ZONE.encode(),
                          serial=2024010101, refresh=3600, retry=600, expire=86400, minimum=300)
    r = {
        ZONE: [soa, tdns.Record_NS(b"ns1." + ZONE.encode()),
               tdns.Record_MX(10, b"mx1." + ZONE.encode()), tdns.Record_MX(20, b"mx2." + ZONE.encode()),
               tdns.Record_TXT(b"v=spf1", b" -all"), tdns.Record_A("192.0.2.1")],
        "mx1." + ZONE: [tdns.Record_A("192.0.2.10"), tdns.Record_AAAA("2001:db8::10")],
        "ns1." + ZONE: [tdns.Record_A("192.0.2.53")],
        "alias." + ZONE: [tdns.Record_CNAME(b"mx1." + ZONE.encode())],
        "_smtp._tcp." + ZONE: [tdns.Record_SRV(0, 5, 25, b"mx1." + ZONE.encode())],
        "_client._smtp.client." + ZONE: [tdns.Record_SRV(1, 2, 0, b"client." + ZONE.encode())],
        "sub.deep." + ZONE: [tdns.Record_TXT(b"deep")],
    }
    records = {name.encode(): recs for name, recs in r.items()}
    return DictAuthority(((ZONE.encode(), soa), records))


class SecureFactory(server.DNSServerFactory):
    """Sets the AD bit on every reply when `secure` is true."""

    secure = False

    def sendReply(self, protocol, message, address):
        message.authenticData = self.secure
        super().sendReply(protocol, message, address)


class DnsTestBase(unittest.TestCase):
    def setUp(self) -> None:
        self.factory = SecureFactory(authorities=[_zone(), _Arpa()])
        self.port = free_port()
        listener = reactor.listenUDP(self.port, tdns.DNSDatagramProtocol(self.factory),
                                     interface="127.0.0.1")
        self.addCleanup(listener.stopListening)
        self.pool = ThreadPool(1, 4)
        self.pool.start()
        self.addCleanup(self.pool.stop)
        self.resolver = Resolver(reactor, self.pool, [("127.0.0.1", self.port)], timeout=2.0)
        self.ctx = ExpansionContext(reactor=reactor, resolver=self.resolver)

    async def dnsdb(self, query: str) -> str | None:
        return await search_find(parse_lookup_type("dnsdb"), None, query, self.ctx)


class _Arpa(DictAuthority):
    def __init__(self) -> None:
        soa = tdns.Record_SOA(mname=b"ns1." + ZONE.encode(), rname=b"hostmaster." + ZONE.encode())
        super().__init__(((b"2.0.192.in-addr.arpa", soa),
                          {b"10.2.0.192.in-addr.arpa": [tdns.Record_PTR(b"mx1." + ZONE.encode())]}))


class ResolverTests(DnsTestBase):
    async def test_lookup(self) -> None:
        answer = await self.resolver.lookup(ZONE, "MX")
        self.assertEqual(sorted((r.preference, r.exchange.to_text()) for r in answer.records),
                         [(10, "mx1.example.test."), (20, "mx2.example.test.")])
        self.assertFalse(answer.secure)
        self.factory.secure = True
        self.assertTrue((await self.resolver.lookup(ZONE, "A")).secure)

    async def test_not_found(self) -> None:
        try:
            await self.resolver.lookup("nosuch." + ZONE, "A")
        except DnsNotFound as e:
            self.assertTrue(e.nxdomain)
        else:
            self.fail("no DnsNotFound")
        try:
            await self.resolver.lookup("ns1." + ZONE, "MX")
        except DnsNotFound as e:
            self.assertFalse(e.nxdomain)
        else:
            self.fail("no DnsNotFound")

    async def test_helpers(self) -> None:
        self.assertEqual(await self.resolver.lookup_ptr("192.0.2.10"), ["mx1.example.test"])
        self.assertEqual(await self.resolver.host_addresses("mx1." + ZONE),
                         ["2001:db8::10", "192.0.2.10"])
        self.assertEqual(await self.resolver.host_addresses("192.0.2.7"), ["192.0.2.7"])

    async def test_dead_server(self) -> None:
        resolver = Resolver(reactor, self.pool, [("127.0.0.1", free_port())], timeout=0.5)
        try:
            await resolver.lookup(ZONE, "A")
        except DnsTempFail:
            pass
        else:
            self.fail("no DnsTempFail")


class DnsdbTests(DnsTestBase):
    async def test_types(self) -> None:
        self.assertEqual(await self.dnsdb(f"a={ZONE}"), "192.0.2.1")
        self.assertEqual(await self.dnsdb(f"a+=mx1.{ZONE}"), "2001:db8::10\n192.0.2.10")
        self.assertEqual(await self.dnsdb(f"aaaa=mx1.{ZONE}"), "2001:db8::10")
        mx = await self.dnsdb(f"mx={ZONE}")
        self.assertEqual(sorted(mx.split("\n")), ["10 mx1.example.test", "20 mx2.example.test"])
        mxh = await self.dnsdb(f">: mxh={ZONE}")
        self.assertEqual(sorted(mxh.split(":")), ["mx1.example.test", "mx2.example.test"])
        self.assertEqual(await self.dnsdb(f"{ZONE}"), "v=spf1")
        self.assertEqual(await self.dnsdb(f">\n,| txt={ZONE}"), "v=spf1| -all")
        self.assertEqual(await self.dnsdb(f">\n; txt={ZONE}"), "v=spf1 -all")
        self.assertEqual(await self.dnsdb("ptr=192.0.2.10"), "mx1.example.test")
        self.assertEqual(await self.dnsdb(f"ns={ZONE}"), "ns1.example.test")
        self.assertEqual(await self.dnsdb(f"zns=sub.deep.{ZONE}"), "ns1.example.test")
        self.assertEqual(await self.dnsdb(f"cname=alias.{ZONE}"), "mx1.example.test")
        self.assertEqual(await self.dnsdb(f"a=alias.{ZONE}"), "192.0.2.10")
        self.assertEqual(await self.dnsdb(f"srv=_smtp._tcp.{ZONE}"), "0 5 25 mx1.example.test")
        self.assertEqual(await self.dnsdb(f"soa=sub.deep.{ZONE}"), "ns1.example.test")
        self.assertEqual(await self.dnsdb(f">\n,, soa={ZONE}"),
                         "ns1.example.test,hostmaster.example.test,2024010101,3600,600,86400,300")
        self.assertEqual(await self.dnsdb(f"csa=client.{ZONE}"), "Y client.example.test")

    async def test_lists_and_missing(self) -> None:
        self.assertEqual(await self.dnsdb(f">, a=nosuch.{ZONE}:{ZONE}:ns1.{ZONE}"),
                         "192.0.2.1,192.0.2.53")
        self.assertEqual(await self.dnsdb(f"a=<;{ZONE};ns1.{ZONE}"), "192.0.2.1\n192.0.2.53")
        self.assertIsNone(await self.dnsdb(f"a=nosuch.{ZONE}"))
        self.assertIsNone(await self.dnsdb(f"mx=ns1.{ZONE}"))

    async def test_syntax_errors(self) -> None:
        for query, message in [
            ("bogus=x", "unsupported DNS record type"),
            ("defer_maybe,a=x", "unsupported dnsdb defer behaviour"),
            ("dnssec_maybe,a=x", "unsupported dnsdb dnssec behaviour"),
            ("defer_strict a=x", "dnsdb modifier syntax error"),
            ("retrans_x,a=x", "unsupported dnsdb timeout value"),
        ]:
            try:
                await self.dnsdb(query)
            except LookupDefer as e:
                self.assertEqual(e.message, message, query)
            else:
                self.fail(f"{query}: no defer")

    async def test_dnssec(self) -> None:
        try:
            await self.dnsdb(f"dnssec_strict,a={ZONE}")
        except LookupDefer:
            pass
        else:
            self.fail("insecure answer accepted")
        self.assertEqual(self.ctx.variables["lookup_dnssec_authenticated"], "no")
        self.assertIsNone(await self.dnsdb(f"dnssec_strict,defer_never,a={ZONE}"))
        self.factory.secure = True
        self.assertEqual(await self.dnsdb(f"dnssec_strict,a={ZONE}"), "192.0.2.1")
        self.assertEqual(self.ctx.variables["lookup_dnssec_authenticated"], "yes")

    async def test_defer_modes(self) -> None:
        dead = Resolver(reactor, self.pool, [("127.0.0.1", free_port())], timeout=0.3)
        ctx = ExpansionContext(reactor=reactor, resolver=dead)
        spec = parse_lookup_type("dnsdb")
        for query in (f"a={ZONE}", f"defer_strict,a={ZONE}", f"retrans_1s,retry_0,a={ZONE}"):
            try:
                await search_find(spec, None, query, ctx)
            except LookupDefer:
                pass
            else:
                self.fail(f"{query}: no defer")
        self.assertIsNone(await search_find(spec, None, f"defer_never,a={ZONE}", ctx))


class FormatTests(unittest.TestCase):
    def test_tlsa(self) -> None:
        record = dns.rdata.from_text(dns.rdataclass.IN, dns.rdatatype.TLSA, "3 1 0 ABCDEF0123")
        self.assertEqual(format_record("tlsa", record, " "), "3 1 0 abcdef0123")
        self.assertEqual(format_record("tlsa", record, ":"), "3:1:0:abcdef0123")

    def test_csa_and_null_mx(self) -> None:
        srv = dns.rdata.from_text(dns.rdataclass.IN, dns.rdatatype.SRV, "1 1 1 h.example.")
        self.assertEqual(format_record("csa", srv, None), "N h.example")
        self.assertEqual(format_record("csa", srv, None, direct=False), "X h.example")
        mx = dns.rdata.from_text(dns.rdataclass.IN, dns.rdatatype.MX, "0 .")
        self.assertEqual(format_record("mx", mx, " "), "0 .")
