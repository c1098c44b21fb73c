"""SOCKS5 client for the smtp transport's socks_proxy (twisted_mta.smtp.socks):
option parsing, proxy order, the negotiation against in-memory fakes (the
wire bytes of Exim's test 4020, kept in tests/data/socks/), the endpoint on
a MemoryReactorClock, and real tunnels through Debian's microsocks."""

from __future__ import annotations

import errno as E
import os
import re
import shutil
import tempfile

from OpenSSL import SSL
from twisted.internet import defer, protocol, ssl
from twisted.internet import error as twisted_error
from twisted.internet.interfaces import (
    IHandshakeListener,
    IOpenSSLContextFactory,
    IStreamClientEndpoint,
)
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python.failure import Failure
from twisted.trial import unittest
from zope.interface import implementer
from zope.interface.verify import verifyObject

from tests.peers import Peer, free_port, require_program
from tests.pki import TestPKI
from twisted_mta.smtp.socks import (
    MAX_PROXIES,
    SOCKS5ClientEndpoint,
    SOCKS5Negotiation,
    SOCKSError,
    SOCKSProxy,
    SOCKSSession,
    parse_socks_proxy,
    proxy_order,
)

DATA = os.path.join(os.path.dirname(__file__), "data", "socks")


def dialogue(name: str) -> list[tuple[str, bytes]]:
    """The SOCKS part of a dialogue file: (C or S, bytes) up to the banner."""
    steps = []
    with open(os.path.join(DATA, name), encoding="ascii") as f:
        for line in f:
            m = re.match(r"([CS]): (.*?)(\{noeol\})?$", line.rstrip("\n"))
            if not m:
                continue
            if not m.group(3):
                break  # the SMTP part starts
            data = re.sub(r"\\x([0-9a-f]{2})", lambda x: chr(int(x.group(1), 16)), m.group(2))
            steps.append((m.group(1), data.encode("latin-1")))
    return steps


class Log:
    def __init__(self) -> None:
        self.main_lines: list[str] = []
        self.panic_lines: list[str] = []

    def main(self, text: str) -> None:
        self.main_lines.append(text)

    def panic(self, text: str) -> None:
        self.panic_lines.append(text)


# ---------------------------------------------------------------------------
# socks_proxy


class Parsing(unittest.SynchronousTestCase):
    def test_defaults(self) -> None:
        self.assertEqual(parse_socks_proxy("192.0.2.1"), [SOCKSProxy(
            "192.0.2.1", auth=0, name="", password="", port=1080, timeout=5,
            priority=1, weight=1)])

    def test_every_option(self) -> None:
        [p] = parse_socks_proxy(
            "127.0.0.1 port=1225 auth=name name=fred pass=fubar tmo=9 pri=3 weight=7")
        self.assertEqual(p, SOCKSProxy("127.0.0.1", 2, "fred", "fubar", 1225, 9, 3, 7))

    def test_list(self) -> None:
        proxies = parse_socks_proxy("10.0.0.1 port=1 : 10.0.0.2 auth=name :10.0.0.3")
        self.assertEqual([(p.host, p.port, p.auth) for p in proxies],
                         [("10.0.0.1", 1, 0), ("10.0.0.2", 1080, 2), ("10.0.0.3", 1080, 0)])

    def test_ipv6_with_separator_change(self) -> None:
        proxies = parse_socks_proxy("<; ::1 port=1081 ; 127.0.0.1")
        self.assertEqual([p.host for p in proxies], ["::1", "127.0.0.1"])
        self.assertTrue(proxies[0].is_ipv6)
        self.assertFalse(proxies[1].is_ipv6)
        # doubled colons in the default colon list
        self.assertEqual(parse_socks_proxy("::::1 port=2")[0].host, "::1")

    def test_option_separator_change(self) -> None:
        # a "<c" at the very start changes the outer list's separator...
        self.assertEqual([p.host for p in parse_socks_proxy("<, 10.0.0.1 port=1, 10.0.0.2")],
                         ["10.0.0.1", "10.0.0.2"])
        # ...and at the start of an item, that proxy's own separator
        _, p = parse_socks_proxy("10.0.0.1 : <, 127.0.0.1,port=99,pass=a b")
        self.assertEqual((p.host, p.port, p.password), ("127.0.0.1", 99, "a b"))

    def test_doubled_space_is_literal(self) -> None:
        # string_nextinlist(): a doubled separator is data, even a space
        [p] = parse_socks_proxy("127.0.0.1  port=99")
        self.assertEqual((p.host, p.port), ("127.0.0.1 port=99", 1080))

    def test_unknown_and_bad_values_ignored(self) -> None:
        [p] = parse_socks_proxy("127.0.0.1 auth=gssapi colour=blue port=12abc tmo=x")
        self.assertEqual((p.auth, p.port, p.timeout), (0, 12, 0))
        [p] = parse_socks_proxy("127.0.0.1 auth=name auth=bogus")
        self.assertEqual(p.auth, 2)

    def test_numbers_as_c_does(self) -> None:
        [p] = parse_socks_proxy("127.0.0.1 port=66616 pri=-1 weight=+4")
        self.assertEqual(p.port, 66616 & 0xFFFF)
        self.assertEqual(p.priority, 0xFFFFFFFF)  # unsigned: -1 is the highest
        self.assertEqual(p.weight, 4)

    def test_empty(self) -> None:
        self.assertEqual(parse_socks_proxy(""), [])
        self.assertEqual(parse_socks_proxy("   "), [])

    def test_at_most_32(self) -> None:
        text = " : ".join(f"10.0.0.{i}" for i in range(40))
        self.assertEqual(len(parse_socks_proxy(text)), MAX_PROXIES)


class Order(unittest.SynchronousTestCase):
    def hosts(self, text: str, draws: list[int] | None = None) -> list[str]:
        values = iter(draws or [])

        def randbelow(n: int) -> int:
            value = next(values, 0)
            assert 0 <= value < n, (value, n)
            return value
        return [p.host for p in proxy_order(parse_socks_proxy(text), randbelow)]

    def test_list_order_within_equal_priority_when_draws_are_zero(self) -> None:
        self.assertEqual(self.hosts("10.0.0.1 : 10.0.0.2 : 10.0.0.3"),
                         ["10.0.0.1", "10.0.0.2", "10.0.0.3"])

    def test_higher_priority_first(self) -> None:
        self.assertEqual(self.hosts("10.0.0.1 : 10.0.0.2 pri=5 : 10.0.0.3 pri=0 : 10.0.0.4 pri=2"),
                         ["10.0.0.2", "10.0.0.4", "10.0.0.1", "10.0.0.3"])

    def test_weighted_choice(self) -> None:
        text = "10.0.0.1 weight=1 : 10.0.0.2 weight=3"
        # total 4: draw 0 picks the first, 1..3 the second
        self.assertEqual(self.hosts(text, [0]), ["10.0.0.1", "10.0.0.2"])
        self.assertEqual(self.hosts(text, [1]), ["10.0.0.2", "10.0.0.1"])
        self.assertEqual(self.hosts(text, [3]), ["10.0.0.2", "10.0.0.1"])

    def test_weight_zero_group_does_not_end_the_search(self) -> None:
        self.assertEqual(self.hosts("10.0.0.1 pri=2 weight=0 : 10.0.0.2"),
                         ["10.0.0.1", "10.0.0.2"])

    def test_single_proxy(self) -> None:
        self.assertEqual(self.hosts("10.0.0.9 weight=0"), ["10.0.0.9"])

    def test_default_randomness_covers_all(self) -> None:
        proxies = parse_socks_proxy("10.0.0.1 : 10.0.0.2 : 10.0.0.3 pri=0")
        order = [p.host for p in proxy_order(proxies)]
        self.assertEqual(sorted(order[:2]), ["10.0.0.1", "10.0.0.2"])
        self.assertEqual(order[2], "10.0.0.3")


# ---------------------------------------------------------------------------
# The negotiation, sans IO


def proxy(text: str = "127.0.0.1 port=1225") -> SOCKSProxy:
    return parse_socks_proxy(text)[0]


class Dialogues(unittest.SynchronousTestCase):
    """The bytes of Exim's test 4020 (re-verified on 4.96)."""

    def run_dialogue(self, name: str, p: SOCKSProxy) -> SOCKS5Negotiation:
        steps = dialogue(name)
        n = SOCKS5Negotiation(p, "127.0.0.1", 25)
        sent = n.start()
        for who, data in steps:
            if who == "C":
                self.assertEqual(sent, data)
                sent = b""
            else:
                sent += n.received(data)
        self.assertTrue(n.done)
        self.assertEqual(n.leftover, b"")
        return n

    def test_noauth(self) -> None:
        n = self.run_dialogue("socks-01-noauth.txt", proxy())
        assert n.session is not None
        self.assertEqual((n.session.proxy_external_address, n.session.proxy_external_port),
                         ("127.0.0.1", 0xBEEF))
        self.assertEqual((n.session.proxy_local_address, n.session.proxy_local_port),
                         ("127.0.0.1", 1225))

    def test_userpass(self) -> None:
        self.run_dialogue("socks-02-userpass.txt",
                          proxy("127.0.0.1 port=1225 auth=name name=fred pass=fubar"))

    def test_byte_at_a_time_with_leftover(self) -> None:
        n = SOCKS5Negotiation(proxy(), "127.0.0.1", 25)
        n.start()
        out = b""
        for b in b"\x05\x00":
            out += n.received(bytes([b]))
        self.assertEqual(out, b"\x05\x01\x00\x01\x7f\x00\x00\x01\x00\x19")
        for b in b"\x05\x00\x00\x01\x7f\x00\x00\x01\xbe\xef220 hi\r\n"[:-1]:
            n.received(bytes([b]))
        n.received(b"\n")
        self.assertTrue(n.done)
        self.assertEqual(n.leftover, b"220 hi\r\n")


class Requests(unittest.SynchronousTestCase):
    def connect_request(self, host: str, port: int) -> bytes:
        n = SOCKS5Negotiation(proxy(), host, port)
        return n.received(b"\x05\x00")

    def test_ipv4(self) -> None:
        self.assertEqual(self.connect_request("192.0.2.7", 587),
                         b"\x05\x01\x00\x01\xc0\x00\x02\x07\x02\x4b")

    def test_ipv6(self) -> None:
        self.assertEqual(self.connect_request("2001:db8::1", 25),
                         b"\x05\x01\x00\x04" + bytes.fromhex("20010db8" + "0" * 22 + "01")
                         + b"\x00\x19")

    def test_domain_name(self) -> None:
        self.assertEqual(self.connect_request("mx.example.com", 25),
                         b"\x05\x01\x00\x03\x0emx.example.com\x00\x19")

    def test_method_offered_is_the_configured_one(self) -> None:
        self.assertEqual(SOCKS5Negotiation(proxy(), "127.0.0.1", 25).start(), b"\x05\x01\x00")
        self.assertEqual(SOCKS5Negotiation(proxy("127.0.0.1 auth=name"), "127.0.0.1", 25).start(),
                         b"\x05\x01\x02")

    def test_credentials_cut_at_255(self) -> None:
        p = SOCKSProxy("127.0.0.1", auth=2, name="n" * 300, password="p" * 256)
        out = SOCKS5Negotiation(p, "127.0.0.1", 25).received(b"\x05\x02")
        self.assertEqual(out, b"\x01\xff" + b"n" * 255 + b"\xff" + b"p" * 255)

    def test_proxy_may_choose_name_auth_when_none_offered(self) -> None:
        # Exim uses the method the proxy picks, with empty credentials
        out = SOCKS5Negotiation(proxy(), "127.0.0.1", 25).received(b"\x05\x02")
        self.assertEqual(out, b"\x01\x00\x00")

    def test_ipv6_bound_address_in_reply(self) -> None:
        n = SOCKS5Negotiation(proxy(), "127.0.0.1", 25)
        n.received(b"\x05\x00")
        n.received(b"\x05\x00\x00\x04" + b"\x00" * 15 + b"\x01\x04\x00")
        assert n.session is not None
        self.assertEqual((n.session.proxy_external_address, n.session.proxy_external_port),
                         ("::1", 1024))

    def test_domain_bound_address_in_reply(self) -> None:
        n = SOCKS5Negotiation(proxy(), "127.0.0.1", 25)
        n.received(b"\x05\x00")
        n.received(b"\x05\x00\x00\x03\x04host\x00\x19rest")
        assert n.session is not None
        self.assertEqual(n.session.proxy_external_address, "host")
        self.assertEqual(n.leftover, b"rest")


class Failures(unittest.SynchronousTestCase):
    def fail_at_connect(self, reply: bytes) -> SOCKSError:
        n = SOCKS5Negotiation(proxy(), "127.0.0.1", 25)
        n.received(b"\x05\x00")
        with self.assertRaises(SOCKSError) as cm:
            n.received(reply)
        self.assertEqual(cm.exception.state, "connect")
        return cm.exception

    def test_each_reply_code(self) -> None:
        expected = {
            1: ("general SOCKS server failure", E.EIO, "Input/output error"),
            2: ("connection not allowed by ruleset", E.EACCES, "Permission denied"),
            3: ("Network unreachable", E.ENETUNREACH, "Network is unreachable"),
            4: ("Host unreachable", E.EHOSTUNREACH, "No route to host"),
            5: ("Connection refused", E.ECONNREFUSED, "Connection refused"),
            6: ("TTL expired", E.ECANCELED, "Operation canceled"),
            7: ("Command not supported", E.EOPNOTSUPP, "Operation not supported"),
            8: ("Address type not supported", E.EAFNOSUPPORT,
                "Address family not supported by protocol"),
        }
        for code, (reason, errno, text) in expected.items():
            err = self.fail_at_connect(b"\x05" + bytes([code]) + b"\x00\x01" + b"\x00" * 6)
            self.assertEqual((err.reason, err.errno, str(err)), (reason, errno, text), code)

    def test_code_past_the_table(self) -> None:
        # Exim's bounds check lets 9 index past socks_errs[]; here it is EPROTO
        for code in (9, 10, 255):
            err = self.fail_at_connect(b"\x05" + bytes([code]))
            self.assertEqual((err.errno, err.reason, str(err)),
                             (E.EPROTO, "unknown error code received", "Protocol error"))

    def test_bad_version_in_connect_reply(self) -> None:
        self.assertEqual(self.fail_at_connect(b"\x04\x00").errno, E.EPROTO)
        self.assertEqual(self.fail_at_connect(b"\x04\x05").errno, E.ECONNREFUSED)

    def test_method_reply_bad_version(self) -> None:
        n = SOCKS5Negotiation(proxy(), "127.0.0.1", 25)
        with self.assertRaises(SOCKSError) as cm:
            n.received(b"\x04\x00")
        self.assertEqual((cm.exception.errno, cm.exception.state), (E.EPROTO, "method select"))

    def test_no_acceptable_method(self) -> None:
        log = Log()
        n = SOCKS5Negotiation(proxy(), "127.0.0.1", 25, log_panic=log.panic)
        with self.assertRaises(SOCKSError) as cm:
            n.received(b"\x05\xff")
        self.assertEqual(cm.exception.errno, E.EPROTO)
        self.assertEqual(log.panic_lines, ["Unrecognised socks auth method 255"])

    def test_gssapi_chosen(self) -> None:
        # proxy_err indexes socks_errs[] with the method number: 1 gives EIO
        log = Log()
        n = SOCKS5Negotiation(proxy(), "127.0.0.1", 25, log_panic=log.panic)
        with self.assertRaises(SOCKSError) as cm:
            n.received(b"\x05\x01")
        self.assertEqual(cm.exception.errno, E.EIO)
        self.assertEqual(log.panic_lines, ["Unrecognised socks auth method 1"])

    def test_auth_refused(self) -> None:
        for reply in (b"\x01\x01", b"\x01\xff", b"\x05\x00"):
            log = Log()
            n = SOCKS5Negotiation(proxy("127.0.0.1 auth=name name=a pass=b"), "127.0.0.1", 25,
                                  log_panic=log.panic)
            self.assertEqual(n.received(b"\x05\x02"), b"\x01\x01a\x01b")
            with self.assertRaises(SOCKSError) as cm:
                n.received(reply)
            # Exim sets EPROTO, then proxy_err maps the method (2) to EACCES
            self.assertEqual((cm.exception.errno, str(cm.exception)),
                             (E.EACCES, "Permission denied"))
            self.assertEqual(log.panic_lines, ["socks auth failed"])

    def test_connection_lost(self) -> None:
        n = SOCKS5Negotiation(proxy(), "127.0.0.1", 25)
        self.assertEqual(n.connection_lost().errno, E.EPROTO)
        n = SOCKS5Negotiation(proxy("127.0.0.1 auth=name"), "127.0.0.1", 25)
        n.received(b"\x05\x02")
        self.assertEqual(n.connection_lost().errno, E.EACCES)


# ---------------------------------------------------------------------------
# The endpoint, in memory


class Recorder(protocol.Protocol):
    def __init__(self) -> None:
        self.received = b""
        self.made = False
        self.lost: Failure | None = None

    def connectionMade(self) -> None:
        self.made = True

    def dataReceived(self, data: bytes) -> None:
        self.received += data

    def connectionLost(self, reason: Failure = protocol.connectionDone) -> None:
        self.lost = reason


class RecordingFactory(protocol.Factory):
    def __init__(self) -> None:
        self.addresses: list[object] = []
        self.protocols: list[Recorder] = []

    def buildProtocol(self, addr: object) -> Recorder:
        self.addresses.append(addr)
        p = Recorder()
        self.protocols.append(p)
        return p


class EndpointInMemory(unittest.SynchronousTestCase):
    def setUp(self) -> None:
        self.reactor = MemoryReactorClock()
        self.log = Log()

    def endpoint(self, text: str, **kw: object) -> SOCKS5ClientEndpoint:
        kw.setdefault("timeout", 30)
        return SOCKS5ClientEndpoint(self.reactor, parse_socks_proxy(text), "127.0.0.1", 25,
                                    clock=self.reactor, log=self.log,
                                    randbelow=lambda n: 0, **kw)  # type: ignore[arg-type]

    def accept(self, index: int) -> tuple[protocol.Protocol, StringTransport]:
        """Complete the index-th TCP connection attempt."""
        host, port, factory, timeout, bind = self.reactor.tcpClients[index]
        p = factory.buildProtocol(None)
        t = StringTransport()
        p.makeConnection(t)
        return p, t

    def refuse(self, index: int) -> None:
        factory = self.reactor.tcpClients[index][2]
        factory.clientConnectionFailed(self.reactor.connectors[index],
                                       Failure(twisted_error.ConnectionRefusedError()))

    def test_interface(self) -> None:
        verifyObject(IStreamClientEndpoint, self.endpoint("127.0.0.1"))

    def test_success_hands_over_transport_and_leftover(self) -> None:
        ep = self.endpoint("127.0.0.1 port=1225")
        factory = RecordingFactory()
        d = ep.connect_session(factory)
        self.assertEqual(self.reactor.tcpClients[0][:2], ("127.0.0.1", 1225))
        p, t = self.accept(0)
        self.assertEqual(t.value(), b"\x05\x01\x00")
        t.clear()
        p.dataReceived(b"\x05\x00")
        self.assertEqual(t.value(), b"\x05\x01\x00\x01\x7f\x00\x00\x01\x00\x19")
        self.assertNoResult(d)
        p.dataReceived(b"\x05\x00\x00\x01\x7f\x00\x00\x01\xbe\xef220 Connected OK\r\n")
        wrapped, session = self.successResultOf(d)
        self.assertIs(wrapped, factory.protocols[0])
        self.assertIs(factory.addresses[0], session)
        self.assertIsInstance(session, SOCKSSession)
        self.assertTrue(wrapped.made)
        self.assertIs(wrapped.transport, t)
        self.assertEqual(wrapped.received, b"220 Connected OK\r\n")
        self.assertEqual(session.prx_log(), " PRX=[127.0.0.1]")
        self.assertEqual(session.prx_log(True), " PRX=[127.0.0.1]:1225")
        # later data and the end of the connection go to the caller's protocol
        p.dataReceived(b"250 ok\r\n")
        self.assertEqual(wrapped.received, b"220 Connected OK\r\n250 ok\r\n")
        p.connectionLost(Failure(twisted_error.ConnectionDone()))
        self.assertIsNotNone(wrapped.lost)
        # no timers left behind
        self.assertEqual(self.reactor.getDelayedCalls(), [])

    def test_connect_fires_with_the_protocol(self) -> None:
        d = self.endpoint("127.0.0.1").connect(RecordingFactory())
        p, t = self.accept(0)
        p.dataReceived(b"\x05\x00\x05\x00\x00\x01\x00\x00\x00\x00\x00\x00")
        self.assertIsInstance(self.successResultOf(d), Recorder)

    def test_bind_address_and_ipv6_proxy(self) -> None:
        ep = self.endpoint("<; ::1 port=1081", bind_address="::1")
        ep.connect(RecordingFactory())
        host, port, _f, _t, bind = self.reactor.tcpClients[0]
        self.assertEqual((host, port, bind), ("::1", 1081, ("::1", 0)))

    def test_refused_proxy_falls_over(self) -> None:
        ep = self.endpoint("10.0.0.1 pri=2 : 10.0.0.2")
        d = ep.connect(RecordingFactory())
        self.refuse(0)
        self.assertEqual(self.log.main_lines, ["socks_sock_connect: Connection refused"])
        self.assertEqual(self.reactor.tcpClients[1][0], "10.0.0.2")
        self.assertNoResult(d)

    def test_all_proxies_fail(self) -> None:
        d = self.endpoint("10.0.0.1 : 10.0.0.2").connect(RecordingFactory())
        self.refuse(0)
        self.refuse(1)
        err = self.failureResultOf(d, SOCKSError).value
        self.assertEqual((err.errno, str(err)), (E.EBUSY, "Device or resource busy"))
        self.assertEqual(len(self.log.main_lines), 2)

    def test_proxy_not_an_ip_literal(self) -> None:
        d = self.endpoint("proxy.example.com : 10.0.0.2").connect(RecordingFactory())
        self.assertEqual(self.log.main_lines, ["socks_sock_connect: Invalid argument"])
        self.assertEqual(self.reactor.tcpClients[0][0], "10.0.0.2")
        self.assertNoResult(d)

    def test_per_proxy_timeout(self) -> None:
        d = self.endpoint("10.0.0.1 tmo=2 pri=2 : 10.0.0.2").connect(RecordingFactory())
        self.reactor.advance(1.9)
        self.assertEqual(len(self.reactor.tcpClients), 1)
        self.reactor.advance(0.1)
        self.assertTrue(self.reactor.connectors[0].stoppedConnecting)
        self.assertEqual(self.log.main_lines, ["socks_sock_connect: Connection timed out"])
        self.assertEqual(self.reactor.tcpClients[1][0], "10.0.0.2")
        self.reactor.advance(4.9)   # the second has the default tmo=5
        self.assertEqual(len(self.reactor.tcpClients), 2)
        self.reactor.advance(0.1)
        err = self.failureResultOf(d, SOCKSError).value
        self.assertEqual(err.errno, E.EBUSY)

    def test_overall_timeout_covers_all_proxies(self) -> None:
        d = self.endpoint("10.0.0.1 pri=2 : 10.0.0.2", timeout=7).connect(RecordingFactory())
        self.reactor.advance(5)          # first proxy's tmo
        self.assertEqual(len(self.reactor.tcpClients), 2)
        self.reactor.advance(1.9)
        self.assertNoResult(d)
        self.reactor.advance(0.1)        # 7s in all
        err = self.failureResultOf(d, SOCKSError).value
        self.assertEqual((err.errno, str(err)), (E.ETIMEDOUT, "Connection timed out"))
        self.assertTrue(self.reactor.connectors[1].stoppedConnecting)
        self.assertEqual(self.reactor.getDelayedCalls(), [])

    def test_overall_timeout_during_negotiation(self) -> None:
        d = self.endpoint("10.0.0.1", timeout=3).connect(RecordingFactory())
        p, t = self.accept(0)
        p.dataReceived(b"\x05\x00")
        self.reactor.advance(3)
        self.assertEqual(self.failureResultOf(d, SOCKSError).value.errno, E.ETIMEDOUT)
        self.assertTrue(t.disconnecting)

    def test_zero_timeout_is_one_day(self) -> None:
        d = self.endpoint("10.0.0.1 tmo=0", timeout=0).connect(RecordingFactory())
        self.accept(0)
        self.reactor.advance(24 * 3600 - 1)
        self.assertNoResult(d)
        self.reactor.advance(1)
        self.assertEqual(self.failureResultOf(d, SOCKSError).value.errno, E.ETIMEDOUT)

    def test_negotiation_failure_does_not_try_the_next_proxy(self) -> None:
        # as in Exim: only a failed TCP connect moves on to the next proxy
        d = self.endpoint("10.0.0.1 pri=2 : 10.0.0.2").connect(RecordingFactory())
        p, t = self.accept(0)
        p.dataReceived(b"\x05\x00")
        p.dataReceived(b"\x05\x05")
        err = self.failureResultOf(d, SOCKSError).value
        self.assertEqual((err.errno, err.reason), (E.ECONNREFUSED, "Connection refused"))
        self.assertEqual(len(self.reactor.tcpClients), 1)
        self.assertTrue(t.disconnecting)

    def test_proxy_closes_during_negotiation(self) -> None:
        d = self.endpoint("10.0.0.1").connect(RecordingFactory())
        p, t = self.accept(0)
        p.connectionLost(Failure(twisted_error.ConnectionDone()))
        self.assertEqual(self.failureResultOf(d, SOCKSError).value.errno, E.EPROTO)

    def test_auth_failure_logs(self) -> None:
        d = self.endpoint("10.0.0.1 auth=name name=u pass=p").connect(RecordingFactory())
        p, t = self.accept(0)
        p.dataReceived(b"\x05\x02")
        p.dataReceived(b"\x01\x01")
        self.assertEqual(self.failureResultOf(d, SOCKSError).value.errno, E.EACCES)
        self.assertEqual(self.log.panic_lines, ["socks auth failed"])

    def test_cancel(self) -> None:
        d = self.endpoint("10.0.0.1").connect(RecordingFactory())
        p, t = self.accept(0)
        d.cancel()
        self.failureResultOf(d, defer.CancelledError)
        self.assertTrue(t.disconnecting)
        self.assertEqual(self.reactor.getDelayedCalls(), [])

    def test_cancel_while_connecting(self) -> None:
        d = self.endpoint("10.0.0.1").connect(RecordingFactory())
        d.cancel()
        self.failureResultOf(d, defer.CancelledError)
        self.assertTrue(self.reactor.connectors[0].stoppedConnecting)

    def test_factory_refuses(self) -> None:
        class NoFactory(protocol.Factory):
            def buildProtocol(self, addr: object) -> None:
                return None
        d = self.endpoint("10.0.0.1").connect(NoFactory())
        p, t = self.accept(0)
        p.dataReceived(b"\x05\x00\x05\x00\x00\x01\x00\x00\x00\x00\x00\x00")
        self.failureResultOf(d, twisted_error.NoProtocol)
        self.assertTrue(t.disconnecting)

    def test_tcp_connect_event_refuses_a_proxy(self) -> None:
        seen: list[tuple[str, int]] = []

        def event(p: SOCKSProxy) -> str | None:
            seen.append((p.host, p.port))
            return "no" if p.host == "10.0.0.1" else ""
        ep = self.endpoint("10.0.0.1 pri=2 : 10.0.0.2 port=99", tcp_connect_event=event)
        d = ep.connect(RecordingFactory())
        self.assertEqual(seen, [("10.0.0.1", 1080), ("10.0.0.2", 99)])
        self.assertEqual(self.log.main_lines, ["socks_sock_connect: Unknown error -58"])
        self.assertEqual([c[0] for c in self.reactor.tcpClients], ["10.0.0.2"])
        self.assertNoResult(d)

    def test_tcp_connect_event_deferred(self) -> None:
        answer: defer.Deferred[str] = defer.Deferred()
        ep = self.endpoint("10.0.0.1", tcp_connect_event=lambda p: answer)
        d = ep.connect(RecordingFactory())
        self.assertEqual(self.reactor.tcpClients, [])
        answer.callback("refused")
        self.assertEqual(self.failureResultOf(d, SOCKSError).value.errno, E.EBUSY)

    def test_tcp_connect_event_coroutine_allows(self) -> None:
        async def event(p: SOCKSProxy) -> str:
            return ""
        self.endpoint("10.0.0.1", tcp_connect_event=event).connect(RecordingFactory())
        self.assertEqual(len(self.reactor.tcpClients), 1)

    def test_no_proxies(self) -> None:
        d = SOCKS5ClientEndpoint(self.reactor, [], "127.0.0.1", 25).connect(RecordingFactory())
        self.assertEqual(self.failureResultOf(d, SOCKSError).value.errno, E.EBUSY)


# ---------------------------------------------------------------------------
# Real peers: microsocks


class Microsocks(Peer):
    program = "/usr/bin/microsocks"

    def __init__(self, user: str | None = None, password: str | None = None) -> None:
        super().__init__()
        self.port = free_port()
        self.user = user
        self.password = password

    def command(self) -> list[str]:
        args = [self.program, "-i", "127.0.0.1", "-p", str(self.port), "-b", "127.0.0.1"]
        if self.user is not None:
            args += ["-u", self.user, "-P", self.password or ""]
        return args

    def ready(self) -> bool:
        import socket
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=1):
                return True
        except OSError:
            return False


class Echo(protocol.Protocol):
    """Echoes; the line STARTTLS is answered with GO and starts TLS."""

    tls_context: object = None

    def dataReceived(self, data: bytes) -> None:
        if data == b"STARTTLS\r\n" and self.tls_context is not None:
            self.transport.write(b"GO\r\n")
            self.transport.startTLS(self.tls_context)
            return
        self.transport.write(data)


class Client(protocol.Protocol):
    def __init__(self) -> None:
        self.buffer = b""
        self.waiting: tuple[bytes, defer.Deferred[bytes]] | None = None

    def expect(self, data: bytes) -> defer.Deferred[bytes]:
        d: defer.Deferred[bytes] = defer.Deferred()
        self.waiting = (data, d)
        self._check()
        return d

    def dataReceived(self, data: bytes) -> None:
        self.buffer += data
        self._check()

    def _check(self) -> None:
        if self.waiting and self.waiting[0] in self.buffer:
            (data, d), self.waiting = self.waiting, None
            self.buffer = b""
            d.callback(data)


@implementer(IHandshakeListener)
class TLSClient(Client):
    def __init__(self) -> None:
        super().__init__()
        self.handshakes = 0

    def handshakeCompleted(self) -> None:
        self.handshakes += 1


@implementer(IOpenSSLContextFactory)
class ServerContext:
    def __init__(self, leaf) -> None:  # type: ignore[no-untyped-def]
        self.leaf = leaf

    def getContext(self) -> SSL.Context:
        ctx = SSL.Context(SSL.TLS_METHOD)
        ctx.use_certificate_chain_file(self.leaf.chain_path)
        ctx.use_privatekey_file(self.leaf.key_path)
        return ctx


class ThroughMicrosocks(unittest.TestCase):
    timeout = 30

    def setUp(self) -> None:
        require_program(Microsocks.program)
        from twisted.internet import reactor
        self.reactor = reactor
        self.echo_factory = protocol.Factory.forProtocol(Echo)
        self.listener = reactor.listenTCP(0, self.echo_factory, interface="127.0.0.1")
        self.addCleanup(self.listener.stopListening)
        self.log = Log()

    def socks(self, user: str | None = None, password: str | None = None) -> Microsocks:
        peer = Microsocks(user, password)
        peer.start()
        self.addCleanup(peer.cleanup)
        return peer

    def endpoint(self, text: str, port: int | None = None) -> SOCKS5ClientEndpoint:
        return SOCKS5ClientEndpoint(
            self.reactor, parse_socks_proxy(text), "127.0.0.1",
            port or self.listener.getHost().port, timeout=10, log=self.log)

    async def exchange(self, ep: SOCKS5ClientEndpoint) -> SOCKSSession:
        client, session = await ep.connect_session(protocol.Factory.forProtocol(Client))
        self.addCleanup(client.transport.loseConnection)
        waiting = client.expect(b"ping through the tunnel")
        client.transport.write(b"ping through the tunnel")
        await waiting
        return session

    def test_no_auth(self) -> defer.Deferred[None]:
        peer = self.socks()

        async def go() -> None:
            session = await self.exchange(self.endpoint(f"127.0.0.1 port={peer.port}"))
            self.assertEqual((session.proxy_local_address, session.proxy_local_port),
                             ("127.0.0.1", peer.port))
        return defer.Deferred.fromCoroutine(go())

    def test_user_password(self) -> defer.Deferred[None]:
        peer = self.socks("fred", "fubar")
        return defer.Deferred.fromCoroutine(self.exchange(self.endpoint(
            f"127.0.0.1 port={peer.port} auth=name name=fred pass=fubar")))

    def test_bad_password(self) -> defer.Deferred[None]:
        peer = self.socks("fred", "fubar")

        async def go() -> None:
            ep = self.endpoint(f"127.0.0.1 port={peer.port} auth=name name=fred pass=wrong")
            try:
                await ep.connect(protocol.Factory.forProtocol(Client))
            except SOCKSError as exc:
                self.assertEqual((exc.errno, str(exc)), (E.EACCES, "Permission denied"))
            else:
                self.fail("connected with a bad password")
            self.assertEqual(self.log.panic_lines, ["socks auth failed"])
        return defer.Deferred.fromCoroutine(go())

    def test_no_auth_offered_to_a_proxy_that_wants_it(self) -> defer.Deferred[None]:
        peer = self.socks("fred", "fubar")

        async def go() -> None:
            ep = self.endpoint(f"127.0.0.1 port={peer.port}")
            try:
                await ep.connect(protocol.Factory.forProtocol(Client))
            except SOCKSError as exc:
                self.assertEqual(exc.errno, E.EPROTO)
            else:
                self.fail("connected without authenticating")
            self.assertEqual(self.log.panic_lines, ["Unrecognised socks auth method 255"])
        return defer.Deferred.fromCoroutine(go())

    def test_dead_first_proxy_falls_over(self) -> defer.Deferred[None]:
        peer = self.socks()
        dead = free_port()

        async def go() -> None:
            session = await self.exchange(self.endpoint(
                f"127.0.0.1 port={dead} pri=9 : 127.0.0.1 port={peer.port}"))
            self.assertEqual(session.proxy_local_port, peer.port)
            self.assertEqual(self.log.main_lines, ["socks_sock_connect: Connection refused"])
        return defer.Deferred.fromCoroutine(go())

    def test_target_refuses(self) -> defer.Deferred[None]:
        peer = self.socks()

        async def go() -> None:
            ep = self.endpoint(f"127.0.0.1 port={peer.port}", port=free_port())
            try:
                await ep.connect(protocol.Factory.forProtocol(Client))
            except SOCKSError as exc:
                self.assertEqual((exc.state, str(exc)), ("connect", "Connection refused"))
            else:
                self.fail("connected to a closed port")
        return defer.Deferred.fromCoroutine(go())

    def test_starttls_through_the_proxy(self) -> defer.Deferred[None]:
        peer = self.socks("fred", "fubar")
        directory = tempfile.mkdtemp(prefix="exim-py-socks-pki-")
        self.addCleanup(shutil.rmtree, directory, True)
        pki = TestPKI(directory)
        leaf = pki.leaf("localhost")
        Echo.tls_context = ServerContext(leaf)
        self.addCleanup(setattr, Echo, "tls_context", None)
        with open(pki.ca_path, "rb") as f:
            trust = ssl.Certificate.loadPEM(f.read())

        async def go() -> None:
            ep = self.endpoint(f"127.0.0.1 port={peer.port} auth=name name=fred pass=fubar")
            client, _session = await ep.connect_session(protocol.Factory.forProtocol(TLSClient))
            self.addCleanup(client.transport.loseConnection)
            waiting = client.expect(b"GO\r\n")
            client.transport.write(b"STARTTLS\r\n")
            await waiting
            client.transport.startTLS(ssl.optionsForClientTLS("localhost", trustRoot=trust))
            waiting = client.expect(b"secret over TLS")
            client.transport.write(b"secret over TLS")
            await waiting
            self.assertIsNotNone(client.transport.getPeerCertificate())
            # the handshake notice reaches the caller's protocol through the wrapper
            self.assertEqual(client.handshakes, 1)
        return defer.Deferred.fromCoroutine(go())
