"""Routers and ``-bt``/``-bv`` (twisted_mta.routers.*).

Unit tests use a fake resolver (MX, A/AAAA, null MX, temporary failures,
DNSSEC).  Differential tests run ``exim4 -bt``/``-bv`` (4.96) on the same
configuration and compare its standard output and exit status with
L{address_test}'s; they cover what needs no DNS (accept, redirect,
manualroute with IP literals and ``byname`` to hosts-file names,
ipliteral).  Without exim4 they are skipped, unless
EXIMPY_REQUIRE_PEERS=1."""

from __future__ import annotations

import io
import os
import shutil
import subprocess
import sys
import tempfile
import unittest
from types import SimpleNamespace
from typing import Any

from twisted.internet import reactor
from twisted.names import dns as tdns
from twisted.python.threadpool import ThreadPool
from twisted.trial import unittest as trial

from tests.peers import free_port, require_program
from tests.test_delivery import run
from tests.test_dns import DictAuthority, SecureFactory
from twisted_mta.config import parse_config_text
from twisted_mta.dns import DnsAnswer, DnsNotFound, DnsTempFail, Resolver
from twisted_mta.expand.context import ExpansionContext
from twisted_mta.queue.address import DeliveryAddress
from twisted_mta.routers import hostlookup
from twisted_mta.routers.addresstest import address_test, format_hosts, split_argument
from twisted_mta.routers.engine import (
    ACCEPT,
    DEFER,
    DELIVER,
    FAIL,
    RoutingContext,
    route_address,
)
from twisted_mta.routers.hostlookup import HostItem, build_hostlist, get_port
from twisted_mta.routers.manualroute import match_route_pattern, parse_route_item

EXIM = "/usr/sbin/exim4"
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class FakeResolver:
    """DNS from a dict: (name, type) -> values; MX values are (preference,
    target).  Names in *insecure* answer without the AD bit; names (or
    (name, type) pairs) in *tempfail* time out.  ``gethostbyname`` answers
    the byname lookups from *hosts*."""

    def __init__(self, zone: dict, insecure: set | None = None, tempfail: set | None = None,
                 hosts: dict | None = None, search: list[str] | None = None) -> None:
        self.zone = {(name.lower(), rdtype): values for (name, rdtype), values in zone.items()}
        self.insecure = insecure or set()
        self.tempfail = tempfail or set()
        self.hosts = hosts or {}
        self.search_domains = search or []
        self.queries: list[tuple[str, str]] = []

    async def lookup(self, name: str, rdtype: str, dnssec: bool = True,
                     timeout: float | None = None) -> DnsAnswer:
        key = (name.lower(), rdtype)
        self.queries.append(key)
        if key in self.tempfail or key[0] in self.tempfail:
            raise DnsTempFail(f"{name}/{rdtype}: timed out")
        values = self.zone.get(key)
        if values is None:
            exists = any(n == key[0] for n, _ in self.zone)
            raise DnsNotFound(f"{name}: no {rdtype}", nxdomain=not exists)
        if rdtype == "MX":
            records = [SimpleNamespace(preference=p, exchange=t) for p, t in values]
        elif rdtype == "SRV":
            records = [SimpleNamespace(priority=p, weight=w, port=port, target=t)
                       for p, w, port, t in values]
        else:
            records = [SimpleNamespace(address=v) for v in values]
        secure = dnssec and key not in self.insecure and key[0] not in self.insecure
        return DnsAnswer(name, rdtype, records, secure, 300, name)

    async def gethostbyname(self, name: str, version: int) -> tuple[str, list[str]]:
        found = [a for a in self.hosts.get(name.lower(), []) if (":" in a) == (version == 6)]
        if not found:
            raise DnsNotFound(name, nxdomain=True)
        return name, found


ZONE = {
    ("example.com", "MX"): [(10, "mx1.example.com"), (20, "mx2.example.com")],
    ("mx1.example.com", "A"): ["192.0.2.10"],
    ("mx1.example.com", "AAAA"): ["2001:db8::10"],
    ("mx2.example.com", "A"): ["192.0.2.20"],
    ("equal.example", "MX"): [(5, "a.equal.example"), (5, "b.equal.example")],
    ("a.equal.example", "A"): ["192.0.2.41"],
    ("b.equal.example", "A"): ["192.0.2.42"],
    ("null.example", "MX"): [(0, ".")],
    ("aonly.example", "A"): ["192.0.2.30"],
    ("aonly.example", "TXT"): ["v=spf1"],
    ("dual.example", "A"): ["192.0.2.31"],
    ("dual.example", "AAAA"): ["2001:db8::31"],
    ("bad.example", "MX"): [(10, "nowhere.example")],
    ("ipmx.example", "MX"): [(10, "192.0.2.1")],
    ("loop.example", "MX"): [(10, "lo.loop.example")],
    ("lo.loop.example", "A"): ["127.0.0.1"],
    ("half.example", "MX"): [(10, "mx1.example.com"), (20, "slowhost.example")],
    ("self.example", "MX"): [(10, "me.example")],
    ("me.example", "A"): ["198.51.100.99"],
    ("secondary.example", "MX"): [(10, "mx1.example.com"), (20, "me.example"),
                                  (30, "mx2.example.com")],
    ("sec.example", "MX"): [(10, "mx1.sec.example")],
    ("mx1.sec.example", "A"): ["192.0.2.50"],
    ("halfsec.example", "MX"): [(10, "mx1.halfsec.example")],
    ("mx1.halfsec.example", "A"): ["192.0.2.51"],
    ("foo.widened.example", "MX"): [(10, "mx1.example.com")],
    ("single.search.example", "A"): ["192.0.2.60"],
    ("_smtp._tcp.srv.example", "SRV"): [(0, 0, 2525, "mx1.example.com")],
}

DNSLOOKUP = r"""
primary_hostname = test.ex
qualify_domain = test.ex
begin routers
dnslookup:
  driver = dnslookup
  domains = ! test.ex
  transport = remote_smtp
  ignore_target_hosts = 0.0.0.0 : 127.0.0.0/8
  OPTIONS
  no_more
local:
  driver = accept
  transport = local_delivery
begin transports
remote_smtp:
  driver = smtp
local_delivery:
  driver = appendfile
  file = /dev/null
"""


def make_ctx(config: Any, resolver: Any = None, local: list[str] | None = None
             ) -> ExpansionContext:
    ctx = ExpansionContext(config=config, resolver=resolver,
                           variables={"sender_address": "root@test.ex"})
    if local is not None:
        ctx.local_addresses = local
    return ctx


def bt(config_text: str, addresses: list[str], resolver: Any = None, *, verify: bool = False,
       local: list[str] | None = None) -> tuple[str, int]:
    config = parse_config_text(config_text)
    out = io.StringIO()
    status = run(address_test(config, addresses, out, verify,
                              make_ctx(config, resolver, local)))
    return out.getvalue(), status


def dnslookup_bt(addresses: list[str], options: str = "", resolver: Any = None,
                 **kwargs: Any) -> tuple[str, int]:
    resolver = resolver if resolver is not None else FakeResolver(
        ZONE, insecure={"halfsec.example", "mx1.halfsec.example"},
        tempfail={"slow.example", "slowhost.example"},
        search=["search.example"])
    return bt(DNSLOOKUP.replace("OPTIONS", options), addresses, resolver,
              local=kwargs.pop("local", ["127.0.0.1", "::1", "198.51.100.99"]), **kwargs)


class DnslookupTests(unittest.TestCase):

    def setUp(self) -> None:
        hostlookup.RANDOM.seed(7)

    def test_mx_then_addresses_sorted_ipv6_first(self) -> None:
        out, status = dnslookup_bt(["user@example.com"])
        self.assertEqual(out, "user@example.com\n"
                              "  router = dnslookup, transport = remote_smtp\n"
                              "  host mx1.example.com [2001:db8::10] MX=10\n"
                              "  host mx1.example.com [192.0.2.10]   MX=10\n"
                              "  host mx2.example.com [192.0.2.20]   MX=20\n")
        self.assertEqual(status, 0)

    def test_ipv4_prefer_and_only(self) -> None:
        out, _ = dnslookup_bt(["user@example.com"], "ipv4_prefer = yes")
        self.assertIn("  host mx1.example.com [192.0.2.10]   MX=10\n"
                      "  host mx1.example.com [2001:db8::10] MX=10\n", out)
        out, _ = dnslookup_bt(["user@example.com", "user@dual.example"], "ipv4_only = true")
        self.assertNotIn("2001:db8", out)
        self.assertIn("host dual.example [192.0.2.31]\n", out)

    def test_equal_preferences_are_randomized(self) -> None:
        seen = set()
        for seed in range(30):
            hostlookup.RANDOM.seed(seed)
            out, _ = dnslookup_bt(["x@equal.example"])
            first = out.split("\n")[2]
            seen.add(first.split()[1])
        self.assertEqual(seen, {"a.equal.example", "b.equal.example"})

    def test_address_records_only(self) -> None:
        out, _ = dnslookup_bt(["x@aonly.example"])
        self.assertEqual(out, "x@aonly.example\n"
                              "  router = dnslookup, transport = remote_smtp\n"
                              "  host aonly.example [192.0.2.30]\n")

    def test_null_mx(self) -> None:
        out, status = dnslookup_bt(["x@null.example"])
        self.assertEqual(out, "x@null.example is undeliverable: an MX or SRV record "
                              "indicated no SMTP service\n")
        self.assertEqual(status, 2)
        out, status = dnslookup_bt(["x@null.example"], verify=True)
        self.assertEqual(out, "x@null.example failed to verify: an MX or SRV record "
                              "indicated no SMTP service\n")

    def test_unknown_domain(self) -> None:
        out, status = dnslookup_bt(["x@nx.example"])
        self.assertEqual(out, "x@nx.example is undeliverable: Unrouteable address\n")
        self.assertEqual(status, 2)

    def test_mx_to_missing_hosts(self) -> None:
        out, _ = dnslookup_bt(["x@bad.example", "x@ipmx.example", "x@loop.example"])
        self.assertEqual(out.splitlines(), [
            "x@bad.example is undeliverable: all relevant MX records point to "
            "non-existent hosts",
            "x@ipmx.example is undeliverable: all relevant MX records point to "
            "non-existent hosts or (invalidly) to IP addresses",
            # 127.0.0.1 is in ignore_target_hosts
            "x@loop.example is undeliverable: all relevant MX records point to "
            "non-existent hosts"])

    def test_temporary_failure(self) -> None:
        out, status = dnslookup_bt(["x@slow.example"])
        self.assertEqual(out, "x@slow.example cannot be resolved at this time: "
                              "host lookup did not complete\n")
        self.assertEqual(status, 1)
        # pass_on_timeout hands it to the next router (no_more does not stop a pass)
        out, status = dnslookup_bt(["x@slow.example"], "pass_on_timeout")
        self.assertEqual(out, "x@slow.example\n"
                              "  router = local, transport = local_delivery\n")

    def test_unusable_secondary(self) -> None:
        out, status = dnslookup_bt(["x@half.example"])
        self.assertEqual(out, "x@half.example\n"
                              "  router = dnslookup, transport = remote_smtp\n"
                              "  host mx1.example.com  [2001:db8::10] MX=10\n"
                              "  host mx1.example.com  [192.0.2.10]   MX=10\n"
                              "  host slowhost.example [unknown]      MX=20 ** unusable **\n")
        self.assertEqual(status, 0)

    def test_mx_fail_domains(self) -> None:
        resolver = FakeResolver({("tf.example", "A"): ["192.0.2.70"]},
                                tempfail={("tf.example", "MX")})
        out, _ = dnslookup_bt(["x@tf.example"], resolver=resolver)
        self.assertIn("host lookup did not complete", out)
        out, _ = dnslookup_bt(["x@tf.example"], "mx_fail_domains = tf.example",
                              resolver=resolver)
        self.assertIn("host tf.example [192.0.2.70]", out)

    def test_fail_defer_domains(self) -> None:
        out, status = dnslookup_bt(["x@nx.example"], "fail_defer_domains = *.example")
        self.assertEqual(out, "x@nx.example cannot be resolved at this time: missing MX, or "
                              "all MXs point to missing A records, and defer requested\n")
        self.assertEqual(status, 1)

    def test_mx_domains(self) -> None:
        out, _ = dnslookup_bt(["x@aonly.example", "x@example.com"],
                              "mx_domains = *.example : example.com")
        self.assertTrue(out.startswith("x@aonly.example is undeliverable: Unrouteable "
                                       "address\n"), out)
        self.assertIn("host mx2.example.com", out)

    def test_lowest_mx_is_local(self) -> None:
        out, status = dnslookup_bt(["x@self.example"])
        self.assertEqual(out, "x@self.example cannot be resolved at this time: lowest "
                              "numbered MX record points to local host\n")
        out, _ = dnslookup_bt(["x@self.example"], "self = fail")
        self.assertEqual(out, "x@self.example is undeliverable: lowest numbered MX record "
                              "points to local host\n")
        out, _ = dnslookup_bt(["x@self.example"], "self = send")
        self.assertIn("host me.example [198.51.100.99] MX=10", out)
        out, _ = dnslookup_bt(["x@self.example"], "self = reroute:test.ex")
        self.assertEqual(out, "x@test.ex\n    <-- x@self.example\n"
                              "  router = local, transport = local_delivery\n")

    def test_local_secondary_mx_cuts_the_list(self) -> None:
        out, _ = dnslookup_bt(["x@secondary.example"])
        self.assertNotIn("me.example", out)
        self.assertNotIn("mx2.example.com", out)
        self.assertIn("mx1.example.com", out)
        # check_secondary_mx: only domains for which this host is a secondary MX
        out, _ = dnslookup_bt(["x@secondary.example", "x@example.com"], "check_secondary_mx")
        self.assertIn("x@secondary.example\n", out)
        self.assertIn("x@example.com is undeliverable: Unrouteable address", out)

    def test_widen_domains_reroutes(self) -> None:
        out, _ = dnslookup_bt(["x@foo"], "widen_domains = nothere.example : widened.example")
        self.assertEqual(out, "x@foo.widened.example\n"
                              "    <-- x@foo\n"
                              "  router = dnslookup, transport = remote_smtp\n"
                              "  host mx1.example.com [2001:db8::10] MX=10\n"
                              "  host mx1.example.com [192.0.2.10]   MX=10\n")

    def test_qualify_single(self) -> None:
        out, _ = dnslookup_bt(["x@single"])
        self.assertEqual(out.split("\n")[:2], ["x@single.search.example", "    <-- x@single"])
        out, _ = dnslookup_bt(["x@single"], "no_qualify_single")
        self.assertEqual(out, "x@single is undeliverable: Unrouteable address\n")

    def test_dnssec_status_per_host(self) -> None:
        config = parse_config_text(DNSLOOKUP.replace("OPTIONS", ""))
        resolver = FakeResolver(ZONE, insecure={"mx1.halfsec.example"})
        for domain, secure in (("sec.example", True), ("halfsec.example", False)):
            address = DeliveryAddress(f"x@{domain}")
            routed = run(route_address(RoutingContext(
                config, make_ctx(config, resolver, []), DELIVER), address))
            self.assertEqual(routed.kind, ACCEPT)
            self.assertEqual([h.dnssec for h in routed.deliveries[0].hosts], [secure])

    def test_dnssec_required(self) -> None:
        resolver = FakeResolver(ZONE, insecure={"mx1.halfsec.example", "aonly.example"})
        options = "dnssec_require_domains = *.example"
        out, status = dnslookup_bt(["x@sec.example", "x@halfsec.example", "x@aonly.example"],
                                   options, resolver=resolver)
        self.assertEqual(out.splitlines(), [
            "x@sec.example",
            "  router = dnslookup, transport = remote_smtp",
            "  host mx1.sec.example [192.0.2.50] MX=10",
            "x@halfsec.example cannot be resolved at this time: host lookup done insecurely",
            "x@aonly.example cannot be resolved at this time: host lookup done insecurely"])
        self.assertEqual(status, 1)

    def test_srv(self) -> None:
        out, _ = dnslookup_bt(["x@srv.example"], "check_srv = smtp")
        self.assertIn("  host mx1.example.com [192.0.2.10]   MX=0 port=2525\n", out)

    def test_fallback_hosts_and_same_domain_copy_routing(self) -> None:
        config = parse_config_text(DNSLOOKUP.replace(
            "OPTIONS", "same_domain_copy_routing\n  fallback_hosts = fb.example::26"))
        resolver = FakeResolver(ZONE)
        rctx = RoutingContext(config, make_ctx(config, resolver, []), DELIVER)
        first = run(route_address(rctx, DeliveryAddress("a@example.com")))
        queries = len(resolver.queries)
        second = run(route_address(rctx, DeliveryAddress("b@Example.COM")))
        self.assertEqual(len(resolver.queries), queries)
        self.assertEqual(second.deliveries[0].hosts, first.deliveries[0].hosts)
        self.assertEqual([h.name for h in first.deliveries[0].extra["fallback_hosts"]],
                         ["fb.example:26"])


MANUAL = r"""
primary_hostname = test.ex
qualify_domain = test.ex
begin routers
manual:
  driver = manualroute
  OPTIONS
  transport = remote_smtp
begin transports
remote_smtp:
  driver = smtp
local_delivery:
  driver = appendfile
  file = /dev/null
"""


def manual_bt(addresses: list[str], options: str, resolver: Any = None,
              local: list[str] | None = None, **kwargs: Any) -> tuple[str, int]:
    return bt(MANUAL.replace("OPTIONS", options), addresses, resolver,
              local=local if local is not None else ["127.0.0.1", "::1"], **kwargs)


class ManualrouteTests(unittest.TestCase):

    def setUp(self) -> None:
        hostlookup.RANDOM.seed(3)
        self.resolver = FakeResolver(
            ZONE, tempfail={"slowhost.example"}, insecure={"mx1.halfsec.example"},
            hosts={"byname.example": ["192.0.2.90", "2001:db8::90"],
                   "me.example": ["127.0.0.1"]})

    def assert_verdict(self, options: str, verdict: str, resolver: Any = None,
                       **kwargs: Any) -> None:
        """x@a.ex, routed by the manualroute router with *options*, gets
        the one-line *verdict* (such as "is undeliverable: ...")."""
        out, _ = manual_bt(["x@a.ex"], options, resolver, **kwargs)
        self.assertEqual(out, f"x@a.ex {verdict}\n")

    def test_route_list_ports_and_options(self) -> None:
        out, _ = manual_bt(["x@a.ex"], r"route_list = a.ex 192.0.2.1::2525:192.0.2.2 ; "
                                       r"b.ex 192.0.2.3")
        self.assertEqual(out, "x@a.ex\n  router = manual, transport = remote_smtp\n"
                              "  host 192.0.2.1 [192.0.2.1] port=2525\n"
                              "  host 192.0.2.2 [192.0.2.2]\n")

    def test_ipv6_list(self) -> None:
        out, _ = manual_bt(["x@a.ex"], r'route_list = a.ex "<, [2001:db8::1]:26 , '
                                       r'2001:db8::2 , 192.0.2.4:27"')
        self.assertEqual(out.splitlines()[2:], [
            "  host 2001:db8::1 [2001:db8::1] port=26",
            "  host 2001:db8::2 [2001:db8::2]",
            "  host 192.0.2.4   [192.0.2.4]   port=27"])

    def test_regex_captures_and_lookup_value(self) -> None:
        out, _ = manual_bt(["x@7.rx.ex"], r"route_list = ^(\\d+)\\.rx\\.ex\$ 192.0.2.$1::2$1")
        self.assertIn("host 192.0.2.7 [192.0.2.7] port=27", out)
        found = run(match_route_pattern("sub.tail.ex", "*.tail.ex", make_ctx(None)))
        self.assertEqual(found, (("sub.tail.ex", "sub"), "*.tail.ex"))
        self.assertIsNone(run(match_route_pattern("a.ex", "!a.ex", make_ctx(None))))
        tmp = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, tmp)
        with open(os.path.join(tmp, "routes"), "w") as f:
            f.write("k.ex: 192.0.2.77::99\n")
        out, _ = manual_bt(["x@k.ex"], f"route_list = lsearch;;{tmp}/routes $value")
        self.assertIn("host 192.0.2.77 [192.0.2.77] port=99", out)

    def test_parse_route_item(self) -> None:
        self.assertEqual(parse_route_item('  "a b"  "h1 : h2"  byname  x', True),
                         ("a b", "h1 : h2", "byname  x"))
        self.assertEqual(parse_route_item("h1:h2 randomize", False),
                         (None, "h1:h2", "randomize"))
        self.assertIsNone(parse_route_item("   ", True))

    def test_route_data_and_unknown_option(self) -> None:
        out, _ = manual_bt(["x@a.ex", "x@b.ex"],
                           "route_data = ${if eq{$domain}{a.ex}{192.0.2.5 bogus}{}}")
        self.assertEqual(out, 'x@a.ex cannot be resolved at this time: error in router: '
                              'unknown routing option or transport name "bogus"\n'
                              "x@b.ex is undeliverable: Unrouteable address\n")

    def test_transport_option_and_local_transport(self) -> None:
        out, _ = manual_bt(["x@a.ex"], "route_list = * 192.0.2.5:192.0.2.6 local")
        self.assertEqual(out, "x@a.ex\n  router = manual, transport = local_delivery\n"
                              "  host 192.0.2.5:192.0.2.6          \n")

    def test_byname_and_default_lookup(self) -> None:
        out, _ = manual_bt(["x@a.ex"], "route_list = * byname.example byname",
                           self.resolver)
        self.assertEqual(out.splitlines()[2:], ["  host byname.example [2001:db8::90]",
                                                "  host byname.example [192.0.2.90]  "])
        # Default: DNS first, then byname when DNS does not know the name.
        out, _ = manual_bt(["x@a.ex", "x@b.ex"],
                           "route_list = a.ex mx2.example.com ; b.ex byname.example",
                           self.resolver)
        self.assertIn("host mx2.example.com [192.0.2.20]", out)
        self.assertIn("host byname.example [192.0.2.90]", out)
        # bydns: no byname retry
        out, _ = manual_bt(["x@b.ex"], "route_list = b.ex byname.example bydns\n"
                                       "  host_find_failed = fail", self.resolver)
        self.assertEqual(out, 'x@b.ex is undeliverable: lookup of host "byname.example" '
                              'failed in manual router\n')

    def test_mx_hosts(self) -> None:
        out, _ = manual_bt(["x@a.ex"], "route_list = * example.com/MX::26", self.resolver)
        self.assertEqual(out.splitlines()[2:], [
            "  host mx1.example.com [2001:db8::10] MX=10 port=26",
            "  host mx1.example.com [192.0.2.10]   MX=10 port=26",
            "  host mx2.example.com [192.0.2.20]   MX=20 port=26"])

    def test_host_find_failed(self) -> None:
        route = "route_list = * nonesuch.example:192.0.2.9 byname"
        expected = {
            "freeze": ("cannot be resolved at this time", 1),
            "defer": ("cannot be resolved at this time", 1),
            "fail": ("is undeliverable", 2),
        }
        for value, (verdict, code) in expected.items():
            out, status = manual_bt(["x@a.ex"], f"{route}\n  host_find_failed = {value}",
                                    self.resolver)
            self.assertEqual(out, f'x@a.ex {verdict}: lookup of host "nonesuch.example" '
                                  f'failed in manual router\n', value)
            self.assertEqual(status, code)
        for value in ("decline", "pass"):
            self.assert_verdict(f"{route}\n  host_find_failed = {value}",
                                "is undeliverable: Unrouteable address", self.resolver)
        out, _ = manual_bt(["x@a.ex"], f"{route}\n  host_find_failed = ignore", self.resolver)
        self.assertIn("  host 192.0.2.9 [192.0.2.9]\n", out)
        self.assert_verdict("route_list = * nonesuch.example byname\n"
                            "  host_find_failed = ignore\n"
                            "  host_all_ignored = fail",
                            "is undeliverable: lookup failed for all hosts in manual router: "
                            "host_find_failed=ignore host_all_ignored=fail", self.resolver)

    def test_temporary_failure_and_dnssec(self) -> None:
        self.assert_verdict("route_list = * slowhost.example",
                            "cannot be resolved at this time: host lookup for "
                            "slowhost.example did not complete (DNS timeout?)", self.resolver)
        self.assert_verdict("route_list = * mx1.halfsec.example\n"
                            "  dnssec_require_domains = *",
                            "cannot be resolved at this time: host lookup for "
                            "mx1.halfsec.example done insecurely", self.resolver)

    def test_self_and_local_hosts(self) -> None:
        self.assert_verdict("route_list = * me.example byname",
                            "cannot be resolved at this time: remote host address is the "
                            "local host", self.resolver)
        out, _ = manual_bt(["x@a.ex"], "route_list = * 192.0.2.1:me.example:192.0.2.3 "
                                       "byname", self.resolver)
        self.assertEqual(out.splitlines()[2:], ["  host 192.0.2.1 [192.0.2.1]"])
        self.assert_verdict("route_list = * 192.0.2.1\n  self = pass",
                            "is undeliverable: remote host address is the local host",
                            local=["192.0.2.1"])
        # hosts_treat_as_local
        out, _ = bt(MANUAL.replace("OPTIONS", "route_list = * 192.0.2.1").replace(
            "qualify_domain", "hosts_treat_as_local = 192.0.2.1\nqualify_domain"),
            ["x@a.ex"], local=[])
        self.assertIn("remote host address is the local host", out)
        # ignore_target_hosts: an ignored address is not found
        out, _ = manual_bt(["x@a.ex"], "route_list = * 192.0.2.1:192.0.2.2\n"
                                       "  ignore_target_hosts = 192.0.2.2\n"
                                       "  host_find_failed = ignore")
        self.assertEqual(out.splitlines()[2:], ["  host 192.0.2.1 [192.0.2.1]"])

    def test_verify_without_hosts(self) -> None:
        out, status = manual_bt(["x@a.ex"], "route_list = a.ex", verify=True)
        self.assertEqual((out, status), ("x@a.ex verified\n", 0))
        self.assert_verdict("route_list = a.ex", "cannot be resolved at this time: error in "
                            "manual router: no host(s) specified for domain a.ex")


class HostLookupTests(unittest.TestCase):

    def test_self_freeze_log_lines(self) -> None:
        """rf_self_action()'s line for self = freeze in Exim 4.96: during a
        delivery, with the message id and no address (real exim4 -odi
        logs "1xa2sq-0006Xw-0W remote host address is the local host:
        relay.test" before the == line); while verifying at SMTP time;
        and for -bt.  self = defer logs nothing."""

        class Log:
            def __init__(self) -> None:
                self.lines: list[tuple[Any, ...]] = []

            def main(self, *args: Any) -> None:
                self.lines.append(args)

        def route(action: str, variables: dict[str, Any]) -> tuple[Any, Log]:
            ctx = ExpansionContext(variables=variables)
            ctx.log = log = Log()
            rctx = SimpleNamespace(ctx=ctx)
            address = DeliveryAddress("rcpt@relay.test")
            result = run(hostlookup.self_action({"self": action}, address,
                                                HostItem("127.0.0.1", mx=-1), rctx))
            return result, log

        result, log = route("freeze", {"message_exim_id": "1xa2sq-0006Xw-0W"})
        self.assertEqual(log.lines, [("remote host address is the local host: relay.test",
                                      "1xa2sq-0006Xw-0W")])
        self.assertEqual(result.message, "remote host address is the local host")
        _, log = route("freeze", {"sender_fullhost": "(helo) [192.0.2.1]"})
        self.assertEqual(log.lines, [("remote host address is the local host: relay.test "
                                      "(while verifying <rcpt@relay.test> from host "
                                      "(helo) [192.0.2.1])",)])
        _, log = route("freeze", {})
        self.assertEqual(log.lines, [("remote host address is the local host: relay.test "
                                      "(while routing <rcpt@relay.test>)",)])
        _, log = route("defer", {"message_exim_id": "1xa2sq-0006Xw-0W"})
        self.assertEqual(log.lines, [])
        host = HostItem("mx.relay.test", mx=10)
        self.assertEqual(hostlookup.self_log_line(hostlookup.self_message(host),
                                                  DeliveryAddress("a@relay.test"), "id", None),
                         "lowest numbered MX record points to local host: relay.test")

    def test_get_port(self) -> None:
        cases = {"host:25": ("host", 25), "[2001:db8::1]:26": ("2001:db8::1", 26),
                 "2001:db8::1": ("2001:db8::1", None), "1.2.3.4": ("1.2.3.4", None),
                 ":12": (":12", None), "a:b:3": ("a:b:3", None)}
        for text, (name, port) in cases.items():
            item = HostItem(text)
            self.assertEqual((get_port(item), item.name), (port, name), text)

    def test_build_hostlist(self) -> None:
        self.assertEqual([h.name for h in build_hostlist("a:b:+:c", False)], ["a", "b", "c"])
        hostlookup.RANDOM.seed(1)
        items = build_hostlist("a:b:c:+:d:e", True)
        self.assertEqual(sorted(h.name for h in items[:3]), ["a", "b", "c"])
        self.assertEqual(sorted(h.name for h in items[3:]), ["d", "e"])
        self.assertEqual({h.mx for h in items[:3]}, {-2})
        self.assertEqual({h.mx for h in items[3:]}, {-3})

    def test_local_interfaces(self) -> None:
        config = parse_config_text("primary_hostname = test.ex\n"
                                   "local_interfaces = <; 192.0.2.1.25 ; [2001:db8::5]:26\n"
                                   "extra_local_interfaces = 192.0.2.9\n")
        found = hostlookup.local_interface_addresses(make_ctx(config))
        self.assertEqual(sorted(map(str, found)), ["192.0.2.1", "192.0.2.9", "2001:db8::5"])
        every = hostlookup.os_interface_addresses()
        self.assertIn("127.0.0.1", {str(a) for a in every})

    def test_format_hosts(self) -> None:
        hosts = [hostlookup.Host("mx.example.com", "192.0.2.1", None, 10),
                 hostlookup.Host("b", None, 2525, 20)]
        self.assertEqual(format_hosts(hosts, False),
                         "  host mx.example.com [192.0.2.1] MX=10\n"
                         "  host b              [unknown]   MX=20 port=2525 ** unusable **\n")

    def test_split_argument(self) -> None:
        self.assertEqual(split_argument(",a@b,,c@d, "), ["", "a@b", "c@d"])
        self.assertEqual(split_argument('"x,y"@z, <a@b>'), ['"x,y"@z', "<a@b>"])

    def test_byname_hosts_file_without_thread_pool(self) -> None:
        tmp = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, tmp)
        path = os.path.join(tmp, "hosts")
        with open(path, "w") as f:
            f.write("192.0.2.7 real.example alias\n2001:db8::7 real.example\n")
        ctx = make_ctx(None, SimpleNamespace(hosts_file=path), local=[])
        # gethostbyname2() semantics: each family from the lines naming the
        # host, the official name of the line replacing an alias.
        result, items = run(hostlookup.find_byname(HostItem("real.example"), None, ctx))
        self.assertEqual(result, hostlookup.HOST_FOUND)
        self.assertEqual([(h.name, h.address) for h in items],
                         [("real.example", "2001:db8::7"), ("real.example", "192.0.2.7")])
        result, items = run(hostlookup.find_byname(HostItem("alias"), None, ctx))
        self.assertEqual([(h.name, h.address) for h in items], [("real.example", "192.0.2.7")])


class EngineTests(unittest.TestCase):

    CONFIG = r"""
primary_hostname = test.ex
qualify_domain = test.ex
begin routers
lit:
  driver = ipliteral
  transport = t
  ignore_target_hosts = 192.0.2.66
copy:
  driver = accept
  local_parts = copy
  unseen
  transport = l
quoted:
  driver = accept
  local_parts = q r
  transport = l
lower:
  driver = accept
  condition = ${if eq{$local_part@$domain}{upper@test.ex}}
  transport = l
all:
  driver = accept
  domains = test.ex
  transport = l
begin transports
t:
  driver = smtp
l:
  driver = appendfile
  file = /dev/null
"""

    def test_unseen_routes_a_copy_onwards(self) -> None:
        out, _ = bt(self.CONFIG, ["copy@test.ex"])
        # The copy, routed after the original, is shown first, as in Exim.
        self.assertEqual(out, "copy@test.ex\n    <-- copy@test.ex\n"
                              "  router = all, transport = l\n"
                              "copy@test.ex\n    <-- copy@test.ex\n"
                              "  router = copy, transport = l\n")

    def test_local_part_is_dequoted_and_lowercased(self) -> None:
        out, _ = bt(self.CONFIG, ['"q r"@test.ex', "UPPER@Test.EX"])
        self.assertEqual(out, '"q r"@test.ex\n  router = quoted, transport = l\n'
                              "UPPER@Test.EX\n  router = lower, transport = l\n")

    def test_ignored_ip_literal_message(self) -> None:
        out, _ = bt(self.CONFIG, ["x@[192.0.2.66]", "x@[IPv6:2001:DB8::1]"])
        self.assertEqual(out, "x@[192.0.2.66] is undeliverable: IP literal host explicitly "
                              "ignored\n"
                              "x@[IPv6:2001:DB8::1]\n  router = lit, transport = t\n"
                              "  host [ipv6:2001:db8::1] [2001:db8::1]\n")

    def test_delivery_routing_of_children(self) -> None:
        config = parse_config_text(self.CONFIG)
        routed = run(route_address(RoutingContext(config, make_ctx(config), DELIVER),
                                   DeliveryAddress("copy@test.ex")))
        self.assertEqual(routed.kind, ACCEPT)
        self.assertEqual([a.router for a in routed.deliveries], ["copy", "all"])
        self.assertNotIn(routed.kind, (FAIL, DEFER))


# -- differential tests against exim4 ---------------------------------------------------

DIFF_CONFIG = r"""
primary_hostname = test.ex
qualify_domain = test.ex
begin routers
literal:
  driver = ipliteral
  transport = remote_smtp
  ignore_target_hosts = 203.0.113.66
aliases:
  driver = redirect
  local_parts = lsearch;DIR/aliases
  data = ${lookup{$local_part}lsearch{DIR/aliases}}
  allow_fail
  allow_defer
  pipe_transport = pipe_t
  file_transport = file_t
nopipe:
  driver = redirect
  local_parts = nopipe
  data = |/bin/cat
filter:
  driver = redirect
  local_parts = filter
  data = #   exim FILTER\ndeliver a@test.ex
copyme:
  driver = accept
  local_parts = copyme
  unseen
  transport = local_delivery
setter:
  driver = redirect
  local_parts = setme
  set = r_who = ${uc:$local_part} ; r_n = 2
  data = ${lc:$r_who}x@test.ex
fv:
  driver = accept
  local_parts = fv
  fail_verify
  transport = local_delivery
fvs:
  driver = accept
  local_parts = fvs
  fail_verify_sender
  transport = local_delivery
setmex:
  driver = accept
  condition = ${if eq{$r_who}{SETME}}
  transport = local_delivery
syntax:
  driver = dnslookup
  domains = bad-.ex
  transport = remote_smtp
manual:
  driver = manualroute
  domains = ! test.ex
  route_list = a.ex 203.0.113.1::2525:203.0.113.2 ; \
               j.ex 203.0.113.99:203.0.113.10 ; \
               b.ex "<, [2001:db8::1]:26 , 2001:db8::2, 203.0.113.3:27, 2001:DB8:0:0:1::abc" ; \
               ^(\\d+)\\.rx\\.ex\$  203.0.113.$1::2$1 ; \
               c.ex localhost byname ; \
               d.ex nonexistent.invalid byname ; \
               e.ex 203.0.113.5 local_delivery ; \
               f.ex 203.0.113.6 bogus ; \
               g.ex ; \
               lsearch;;DIR/routes $value ; \
               h.ex 203.0.113.7:localhost:203.0.113.8 byname ; \
               i.ex 203.0.113.9 r
  host_find_failed = decline
  ignore_target_hosts = 203.0.113.99
  transport = remote_smtp
strict:
  driver = manualroute
  domains = d.ex : s.ex
  route_list = d.ex nonexistent.invalid byname ; s.ex 203.0.113.99
  transport = remote_smtp
local:
  driver = accept
  domains = test.ex
  local_parts = ! unknown
  transport = local_delivery
begin transports
remote_smtp:
  driver = smtp
local_delivery:
  driver = appendfile
  file = /dev/null
pipe_t:
  driver = pipe
file_t:
  driver = appendfile
"""

ALIASES = """\
multi: a@test.ex, b@test.ex, |/bin/cat, DIR/file, c@a.ex
one: a@test.ex
chain: one
failme: :fail: go away
deferme: :defer: not now
bh: :blackhole:
dup: a@test.ex, a@test.ex, A@test.ex, multi@test.ex
nested: failme@test.ex, one@test.ex, gone@nowhere.invalid, unknown@test.ex
inc: :include:DIR/included
escaped: \\one, \\esc@test.ex
filtered: "# Exim filter\\ndeliver a@test.ex"
"""

ADDRESSES = [
    "multi@test.ex", "one@test.ex", "chain@test.ex", "failme@test.ex", "deferme@test.ex",
    "bh@test.ex", "dup@test.ex", "nested@test.ex", "inc@test.ex", "escaped@test.ex",
    "nopipe@test.ex", "copyme@test.ex", "unknown@test.ex", "plain", '"q r"@test.ex',
    "setme@test.ex", "fv@test.ex", "fvs@test.ex", "filtered@test.ex", "filter@test.ex",
    "Mixed@Test.EX", "x@a.ex", "x@b.ex", "x@7.rx.ex", "x@c.ex", "x@d.ex", "x@e.ex",
    "x@f.ex", "x@g.ex", "x@k.ex", "x@h.ex", "x@i.ex", "x@j.ex", "x@s.ex", "x@zz.ex",
    "x@bad-.ex", "x@[203.0.113.50]", "x@[IPv6:2001:DB8::5]", "x@[203.0.113.66]", "x@[127.0.0.1]",
    "a@test.ex, b@test.ex", "bad@@x", "<y@test.ex>", "",
]


class EximDifferentialTests(unittest.TestCase):
    """exim4 -bt / -bv against address_test() on the same configuration."""

    maxDiff = None

    @classmethod
    def setUpClass(cls) -> None:
        require_program(EXIM)
        cls.tmp = tempfile.mkdtemp(prefix="exim-py-routers-")
        os.chmod(cls.tmp, 0o755)
        text = DIFF_CONFIG.replace("DIR", cls.tmp)
        cls.config_path = os.path.join(cls.tmp, "configure")
        files = {"configure": text, "aliases": ALIASES.replace("DIR", cls.tmp),
                 "included": "a@test.ex\nb@test.ex, |/bin/true\n",
                 "routes": "k.ex: 203.0.113.77::99\n"}
        for name, content in files.items():
            with open(os.path.join(cls.tmp, name), "w") as f:
                f.write(content)
        cls.config = parse_config_text(text)

    @classmethod
    def tearDownClass(cls) -> None:
        shutil.rmtree(cls.tmp, True)

    def exim(self, flag: str, addresses: list[str]) -> tuple[str, int]:
        done = subprocess.run([EXIM, "-C", self.config_path, flag, *addresses],
                              capture_output=True, timeout=60)
        if b"not allowed" in done.stderr or b"lost privilege" in done.stderr:
            self.skipTest(f"exim4 refused -C: {done.stderr.decode(errors='replace')}")
        return done.stdout.decode("latin-1"), done.returncode

    def mine(self, verify: bool, addresses: list[str]) -> tuple[str, int]:
        out = io.StringIO()
        status = run(address_test(self.config, addresses, out, verify,
                                  make_ctx(self.config)))
        return out.getvalue(), status

    def test_address_testing(self) -> None:
        for address in ADDRESSES:
            with self.subTest(address=address):
                self.assertEqual(self.mine(False, [address]), self.exim("-bt", [address]))

    def test_verification(self) -> None:
        for address in ADDRESSES:
            with self.subTest(address=address):
                self.assertEqual(self.mine(True, [address]), self.exim("-bv", [address]))

    def test_sender_verification(self) -> None:
        for address in ("fv@test.ex", "fvs@test.ex", "plain", "x@a.ex", "failme@test.ex"):
            with self.subTest(address=address):
                out = io.StringIO()
                status = run(address_test(self.config, [address], out, True,
                                          make_ctx(self.config), sender=True))
                self.assertEqual((out.getvalue(), status), self.exim("-bvs", [address]))

    def test_several_addresses_share_the_duplicate_check(self) -> None:
        addresses = ["one@test.ex", "a@test.ex", "x@a.ex", "failme@test.ex"]
        self.assertEqual(self.mine(False, addresses), self.exim("-bt", addresses))

    def test_command_through_a_reactor(self) -> None:
        """address_test_main(), as -bt runs it: getaddrinfo() in a thread
        pool for byname, then the same output as exim4."""
        addresses = ["x@c.ex", "x@h.ex", "x@a.ex", "multi@test.ex"]
        script = ("import sys\n"
                  "from twisted_mta.config import load_config\n"
                  "from twisted_mta.routers.addresstest import address_test_main\n"
                  "config = load_config(sys.argv[1])\n"
                  "sys.exit(address_test_main(config, sys.argv[2:], False, False, "
                  "sys.stdin.buffer, sys.stdout.buffer))\n")
        done = subprocess.run([sys.executable, "-c", script, self.config_path, *addresses],
                              capture_output=True, timeout=60,
                              env={**os.environ, "PYTHONPATH": ROOT})
        self.assertEqual((done.stdout.decode("latin-1"), done.returncode),
                         self.exim("-bt", addresses), done.stderr.decode())

    def test_standard_input(self) -> None:
        lines = "\n  one@test.ex  \nx@a.ex, y@b.ex\nchain@test.ex\n"
        done = subprocess.run([EXIM, "-C", self.config_path, "-bt"], input=lines.encode(),
                              capture_output=True, timeout=60)
        out = io.StringIO()
        status = run(address_test(self.config, [], out, False, make_ctx(self.config),
                                  stdin=io.StringIO(lines)))
        self.assertEqual((out.getvalue(), status),
                         (done.stdout.decode("latin-1"), done.returncode))


if __name__ == "__main__":
    unittest.main()


# -- the real resolver, against an in-process DNS server ------------------------------------

def _routing_zone() -> DictAuthority:
    zone = b"routing.test"
    soa = tdns.Record_SOA(mname=b"ns1." + zone, rname=b"hostmaster." + zone)
    records = {
        zone: [soa, tdns.Record_MX(10, b"mx1." + zone), tdns.Record_MX(20, b"mx2." + zone)],
        b"mx1." + zone: [tdns.Record_A("192.0.2.10"), tdns.Record_AAAA("2001:db8::10")],
        b"mx2." + zone: [tdns.Record_A("192.0.2.20")],
        b"null." + zone: [tdns.Record_MX(0, b"")],
        b"alias." + zone: [tdns.Record_CNAME(b"mx2." + zone)],
    }
    return DictAuthority(((zone, soa), records))


class RealResolverTests(trial.TestCase):
    """dnslookup through twisted_mta.dns.Resolver (dnspython in a thread
    pool) and a twisted.names server on a free loopback port."""

    def setUp(self) -> None:
        self.factory = SecureFactory(authorities=[_routing_zone()])
        port = free_port()
        listener = reactor.listenUDP(port, tdns.DNSDatagramProtocol(self.factory),
                                     interface="127.0.0.1")
        self.addCleanup(listener.stopListening)
        self.pool = ThreadPool(1, 4)
        self.pool.start()
        self.addCleanup(self.pool.stop)
        self.resolver = Resolver(reactor, self.pool, [("127.0.0.1", port)], timeout=2.0)
        self.config = parse_config_text(DNSLOOKUP.replace("OPTIONS", ""))
        hostlookup.RANDOM.seed(5)

    async def bt(self, addresses: list[str]) -> str:
        ctx = make_ctx(self.config, self.resolver, local=[])
        ctx.reactor, ctx.threadpool = reactor, self.pool
        out = io.StringIO()
        await address_test(self.config, addresses, out, False, ctx)
        return out.getvalue()

    async def test_mx_and_null_mx(self) -> None:
        out = await self.bt(["x@routing.test", "x@null.routing.test", "x@alias.routing.test",
                             "x@nosuch.routing.test"])
        self.assertEqual(out, "x@routing.test\n"
                              "  router = dnslookup, transport = remote_smtp\n"
                              "  host mx1.routing.test [2001:db8::10] MX=10\n"
                              "  host mx1.routing.test [192.0.2.10]   MX=10\n"
                              "  host mx2.routing.test [192.0.2.20]   MX=20\n"
                              "x@null.routing.test is undeliverable: an MX or SRV record "
                              "indicated no SMTP service\n"
                              "x@alias.routing.test\n"
                              "  router = dnslookup, transport = remote_smtp\n"
                              "  host mx2.routing.test [192.0.2.20]\n"
                              "x@nosuch.routing.test is undeliverable: Unrouteable address\n")

    async def test_dnssec_bit(self) -> None:
        for secure in (False, True):
            self.factory.secure = secure
            ctx = make_ctx(self.config, self.resolver, local=[])
            routed = await route_address(RoutingContext(self.config, ctx, DELIVER),
                                         DeliveryAddress("x@routing.test"))
            self.assertEqual({h.dnssec for h in routed.deliveries[0].hosts}, {secure})
