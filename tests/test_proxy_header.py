"""The PROXY header reader (twisted_mta.smtp.proxy).

Expectations marked [exim] were checked against Exim 4.96 (Debian
4.96-15+deb12u11) with ``exim4 -bh`` and ``hosts_proxy = *``: whether EHLO
then got 250 or 503, and how many 503s the bytes after a refused header
produced.  ``AgainstExim`` replays a sample of them live when exim4 is
installed; ``HaproxyTests`` reads what a real haproxy 2.6 sends."""

from __future__ import annotations

import datetime
import os
import re
import socket
import ssl
import subprocess
import tempfile
import time

from twisted.trial import unittest

from tests.peer_haproxy import Haproxy
from tests.peers import require_program
from twisted_mta.smtp.proxy import (
    V2_SIGNATURE,
    ProxyHeaderReader,
    ProxyResult,
    crc32c,
    decode_ssl_tlv,
    is_ip_address,
)

V1 = b"PROXY TCP4 127.0.0.2 127.42.42.42 64000 25\r\n"
# Exim's test 4030: v2 PROXY over TCP/IPv4, 127.0.0.2:49813 -> 127.42.42.42:1025.
V2_4030 = V2_SIGNATURE + bytes.fromhex("2111000c7f0000027f2a2a2ac2950401")
V2_LOCAL = V2_SIGNATURE + b"\x20\x00\x00\x00"


def v2(command: int = 0x1, family: int = 0x11, body: bytes = b"", version: int = 2,
       length: int | None = None) -> bytes:
    """A v2 header with the given fields; *length* defaults to the body's."""
    size = len(body) if length is None else length
    return V2_SIGNATURE + bytes([version << 4 | command, family]) + size.to_bytes(2, "big") + body


def ipv4_block(source: str = "192.0.2.1", sport: int = 40000, dest: str = "198.51.100.9",
               dport: int = 25) -> bytes:
    return (socket.inet_aton(source) + socket.inet_aton(dest)
            + sport.to_bytes(2, "big") + dport.to_bytes(2, "big"))


def tlv(kind: int, value: bytes) -> bytes:
    return bytes([kind]) + len(value).to_bytes(2, "big") + value


def read(data: bytes) -> ProxyResult:
    """Feed *data* in one piece; the result must be complete."""
    result = ProxyHeaderReader().feed(data)
    assert result is not None, data
    return result


def read_bytewise(data: bytes) -> ProxyResult:
    """Feed *data* a byte at a time; only the last byte may complete it."""
    reader = ProxyHeaderReader()
    for i in range(len(data) - 1):
        assert reader.feed(data[i:i + 1]) is None, (data, i)
    result = reader.feed(data[-1:])
    assert result is not None, data
    return result


def addresses(result: ProxyResult) -> tuple:
    return (result.source_address, result.source_port, result.dest_address, result.dest_port)


class V1Accepted(unittest.SynchronousTestCase):
    def test_dialogue_proxy_01(self) -> None:
        result = read(V1)
        self.assertTrue(result.ok)
        self.assertEqual((result.version, result.command), (1, "PROXY"))
        self.assertEqual(addresses(result), ("127.0.0.2", 64000, "127.42.42.42", 25))
        self.assertEqual((result.leftover, result.error, result.tlvs), (b"", None, {}))

    def test_tcp6(self) -> None:
        result = read(b"PROXY TCP6 2001:db8::1 2001:db8::2 40000 25\r\n")
        self.assertEqual(addresses(result), ("2001:db8::1", 40000, "2001:db8::2", 25))

    def test_family_keyword_not_checked(self) -> None:
        # [exim] dialogue proxy-05 e), and the converse.
        result = read(b"PROXY TCP4 2001:db8::1 198.51.100.9 40000 25\r\n")
        self.assertEqual(addresses(result), ("2001:db8::1", 40000, "198.51.100.9", 25))
        result = read(b"PROXY TCP6 192.0.2.1 ::ffff:192.0.2.2 40000 25\r\n")
        self.assertEqual(addresses(result), ("192.0.2.1", 40000, "::ffff:192.0.2.2", 25))

    def test_unknown_keeps_peer(self) -> None:
        result = read(b"PROXY UNKNOWN\r\n")
        self.assertTrue(result.ok)
        self.assertEqual((result.version, result.command), (1, "UNKNOWN"))
        self.assertEqual(addresses(result), (None, None, None, None))
        # [exim] only a prefix is compared, and the rest of the line ignored.
        self.assertEqual(read(b"PROXY UNKNOWNjunk here\r\n").command, "UNKNOWN")
        self.assertTrue(read(b"PROXY UNKNOWN TCP4 1.2.3.4 5.6.7.8 1 2\r\n").ok)

    def test_any_c_space_after_keywords(self) -> None:
        # [exim] isspace(), so a TAB (or LF) passes where a space is expected.
        self.assertTrue(read(b"PROXY\tTCP4 192.0.2.1 192.0.2.2 1 2\r\n").ok)
        self.assertTrue(read(b"PROXY TCP4\t192.0.2.1 192.0.2.2 1 2\r\n").ok)
        self.assertTrue(read(b"PROXY\nUNKNOWN\r\n").ok)

    def test_ports_as_strtol_into_int(self) -> None:
        # [exim] no upper limit and a sign is allowed: only 0 is refused.
        result = read(b"PROXY TCP4 192.0.2.1 192.0.2.2 70000 25\r\n")
        self.assertEqual((result.ok, result.source_port), (True, 70000))
        result = read(b"PROXY TCP4 192.0.2.1 192.0.2.2 -5 +25\r\n")
        self.assertEqual((result.source_port, result.dest_port), (-5, 25))
        # The long is stored in an int: 2**32 + 7 becomes 7.
        self.assertEqual(read(b"PROXY TCP4 192.0.2.1 192.0.2.2 4294967303 25\r\n").source_port, 7)

    def test_scope_id_kept_as_written(self) -> None:
        result = read(b"PROXY TCP6 ::1 fe80::1%eth0 1 2\r\n")
        self.assertEqual(result.dest_address, "fe80::1%eth0")

    def test_232_byte_line(self) -> None:
        # [exim] the whole line with its CRLF may fill the 232-byte buffer;
        # a scope id is the one way to make a valid line that long.
        line = b"PROXY TCP6 ::1 fe80::1%" + b"x" * 203 + b" 1 2\r\n"
        self.assertEqual(len(line), 232)
        self.assertTrue(read(line).ok)
        self.assertTrue(read_bytewise(line).ok)

    def test_pipelined_command_is_leftover(self) -> None:
        # Dialogue proxy-05 d): header and EHLO in one packet.
        result = read(b"PROXY TCP4 192.0.2.7 198.51.100.9 40000 25\r\nEHLO x\r\n")
        self.assertEqual((result.ok, result.source_address), (True, "192.0.2.7"))
        self.assertEqual(result.leftover, b"EHLO x\r\n")
        self.assertEqual(read(b"PROXY UNKNOWN\r\nEHLO x\r\n").leftover, b"EHLO x\r\n")


class V1Refused(unittest.SynchronousTestCase):
    # Each [exim]: the header fails and the EHLO after it gets a 503.
    CASES = [
        (b"PROXY  TCP4 192.0.2.1 192.0.2.2 1 2\r\n", "invalid protocol"),
        (b"PROXY TCP4  192.0.2.1 192.0.2.2 1 2\r\n", "not an IP address"),
        (b"PROXY TCP4 192.0.2.1  192.0.2.2 1 2\r\n", "not an IP address"),
        (b"PROXY TCP4 192.0.2.1 192.0.2.2  1 2\r\n", "not a non-zero integer"),
        (b"PROXY TCP4 192.0.2.1 192.0.2.2 1\r\n", "missing source port"),
        (b"PROXY TCP4 192.0.2.1 192.0.2.2\r\n", "missing destination address"),
        (b"PROXY TCP4 192.0.2.1\r\n", "missing source address"),
        (b"PROXY TCP4 192.0.2.1 192.0.2.2 0 25\r\n", "source port"),
        (b"PROXY TCP4 192.0.2.1 192.0.2.2 25 0\r\n", "destination port"),
        (b"PROXY TCP4 192.0.2.1 192.0.2.2 25 00\r\n", "destination port"),
        (b"PROXY TCP4 192.0.2.1 192.0.2.2 4294967296 25\r\n", "source port"),
        (b"PROXY TCP4 192.0.2.1 192.0.2.2 25 25 \r\n", "destination port"),
        (b"PROXY TCP4 192.0.2.1 192.0.2.2 25x 25\r\n", "source port"),
        (b"PROXY TCP4 192.0.2.1 192.0.2.2 25 \r\n", "destination port"),
        (b"PROXY TCP5 192.0.2.1 192.0.2.2 1 2\r\n", "invalid protocol"),
        (b"PROXY tcp4 192.0.2.1 192.0.2.2 1 2\r\n", "invalid protocol"),
        (b"PROXY TCP4x192.0.2.1 192.0.2.2 1 2\r\n", "missing space after TCP4"),
        (b"PROXYTCP4 192.0.2.1 192.0.2.2 1 2\r\n", "missing space after PROXY"),
        (b"PROXY TCP4 001.0.2.1 192.0.2.2 1 2\r\n", "source"),
        (b"PROXY TCP4 192.0.2.1/32 192.0.2.2 1 2\r\n", "source"),
        (b"PROXY TCP4 192.0.2.1 host.example 1 2\r\n", "destination"),
        (b"PROXY TCP4 192.0.2.1 192.0.2.2 1 2\rX", "CRLF"),
        (b"PROXY TCP4 192.0.2.1\x00 192.0.2.2 1 2\r\n", "NUL"),
        (b"PROXY UNKNOW\r\n", "invalid protocol"),
    ]

    def test_cases(self) -> None:
        for line, error in self.CASES:
            result = read(line + b"EHLO x\r\n")
            self.assertFalse(result.ok, line)
            self.assertEqual(result.version, 1, line)
            self.assertIn(error, result.error, line)
            self.assertEqual(result.leftover, b"EHLO x\r\n", line)
            self.assertEqual(addresses(result), (None, None, None, None), line)

    def test_short_line_fails_at_once(self) -> None:
        # [exim] fewer than 8 bytes before the line end: not even v1.
        result = read(b"PROXY\r\n")
        self.assertEqual((result.ok, result.version, result.leftover), (False, None, b""))
        self.assertIn("not a PROXY header", result.error)

    def test_first_read_past_the_line_end(self) -> None:
        # [exim] a short line sent with more input: Exim's first read took
        # 14 bytes, which the failed header swallows.
        result = read(b"PROXY TCP4\r\nEHLO x\r\n")
        self.assertEqual((result.ok, result.leftover), (False, b"LO x\r\n"))

    def test_overlong_line(self) -> None:
        # [exim] 233 bytes: Exim stops at 232 and the rest is SMTP input.
        line = b"PROXY TCP6 ::1 fe80::1%" + b"x" * 204 + b" 1 2\r\n"
        result = read(line + b"QUIT\r\n")
        self.assertFalse(result.ok)
        self.assertIn("too long", result.error)
        self.assertEqual(result.leftover, line[232:] + b"QUIT\r\n")

    def test_overlong_without_cr(self) -> None:
        reader = ProxyHeaderReader()
        self.assertIsNone(reader.feed(b"PROXY TCP4 " + b"1" * 220))
        result = reader.feed(b"1" * 20)
        self.assertEqual((result.ok, len(result.leftover)), (False, 19))

    def test_lf_only_waits(self) -> None:
        # [exim] a bare LF is not a line end: Exim waits for the timeout.
        reader = ProxyHeaderReader()
        self.assertIsNone(reader.feed(b"PROXY TCP4 192.0.2.1 192.0.2.2 1 2\n"))
        result = reader.timed_out()
        self.assertEqual((result.ok, result.leftover), (False, b""))
        self.assertIn("timeout", result.error)

    def test_lf_only_then_more_input(self) -> None:
        # The next CRLF ends the "line", whose last field is then bad.
        reader = ProxyHeaderReader()
        self.assertIsNone(reader.feed(b"PROXY TCP4 192.0.2.1 192.0.2.2 1 2\n"))
        result = reader.feed(b"EHLO x\r\nNOOP\r\n")
        self.assertEqual((result.ok, result.leftover), (False, b"NOOP\r\n"))


class NotAHeader(unittest.SynchronousTestCase):
    def test_garbage_swallowed_to_line_end(self) -> None:
        # [exim] the line is taken as the (failed) header.
        result = read(b"EHLO y\r\n")
        self.assertEqual((result.ok, result.version, result.leftover), (False, None, b""))

    def test_first_read_takes_14_bytes(self) -> None:
        # [exim] in one segment, Exim's first read takes 14 bytes, past the
        # line end: here "QUIT\r\n" vanishes with the failed header...
        self.assertEqual(read(b"EHLO y\r\nQUIT\r\n").leftover, b"")
        self.assertEqual(read(b"HELO a\r\nNOOP\r\nNOOP\r\n").leftover, b"NOOP\r\n")
        # ...but a line sent on its own is all the first read gets.
        reader = ProxyHeaderReader()
        self.assertEqual(reader.feed(b"EHLO y\r\n").leftover, b"")

    def test_long_garbage(self) -> None:
        # [exim] 232 bytes are swallowed, the rest is SMTP (one more 503).
        result = read(b"GARBAGE" + b"y" * 300 + b"\r\n")
        self.assertEqual((result.ok, result.leftover), (False, b"y" * 75 + b"\r\n"))

    def test_v2_signature_mismatch(self) -> None:
        result = read(b"\r\n\r\nEHLO x\r\nNOOP\r\n")
        self.assertEqual((result.ok, result.leftover), (False, b"OP\r\n"))

    def test_tls_client_hello(self) -> None:
        # A client speaking TLS where a header was due: no CR in sight, so
        # the 232-byte buffer fills and fails.
        hello = b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + bytes(300)
        self.assertEqual(read(hello).leftover, hello[232:])


class V2Accepted(unittest.SynchronousTestCase):
    def test_exim_4030(self) -> None:
        result = read(V2_4030)
        self.assertTrue(result.ok)
        self.assertEqual((result.version, result.command), (2, "PROXY"))
        self.assertEqual(addresses(result), ("127.0.0.2", 49813, "127.42.42.42", 1025))
        self.assertEqual((result.leftover, result.tlvs), (b"", {}))

    def test_ipv6(self) -> None:
        body = (socket.inet_pton(socket.AF_INET6, "2001:db8::1")
                + socket.inet_pton(socket.AF_INET6, "::ffff:192.0.2.1") + b"\x9c\x40\x00\x19")
        result = read(v2(family=0x21, body=body))
        # Formatted by inet_ntop, as Exim does.
        self.assertEqual(addresses(result), ("2001:db8::1", 40000, "::ffff:192.0.2.1", 25))

    def test_local_keeps_peer(self) -> None:
        # [exim] dialogue proxy-05 b), any family.
        for header in (V2_LOCAL, v2(command=0x0, body=ipv4_block()),
                       v2(command=0x0, family=0x31, body=bytes(216))):
            result = read(header + b"EHLO c\r\n")
            self.assertTrue(result.ok)
            self.assertEqual((result.version, result.command), (2, "LOCAL"))
            self.assertEqual(addresses(result), (None, None, None, None))
            self.assertEqual(result.leftover, b"EHLO c\r\n")

    def test_zero_ports(self) -> None:
        # [exim] v2 ports are not checked.
        result = read(v2(body=ipv4_block(sport=0, dport=0)))
        self.assertEqual((result.ok, result.source_port, result.dest_port), (True, 0, 0))

    def test_232_bytes(self) -> None:
        # [exim] 16 + 216 fits.
        header = v2(body=ipv4_block() + tlv(0x04, bytes(201)))
        self.assertEqual(len(header), 232)
        self.assertTrue(read(header).ok)

    def test_pipelined_command_is_leftover(self) -> None:
        self.assertEqual(read(V2_4030 + b"EHLO x\r\n").leftover, b"EHLO x\r\n")


class V2Refused(unittest.SynchronousTestCase):
    def test_bad_version_leaves_rest_for_smtp(self) -> None:
        # [exim] only 16 bytes are read; the addresses then reach the SMTP
        # reader, which refuses their NUL (501).
        header = v2(version=1, body=ipv4_block("127.0.0.2"))
        result = read(header + b"QUIT\r\n")
        self.assertEqual((result.ok, result.version), (False, None))
        self.assertIn("version", result.error)
        self.assertEqual(result.leftover, header[16:] + b"QUIT\r\n")
        self.assertIn(b"\x00", result.leftover)

    def test_too_long(self) -> None:
        # [exim] over 232 bytes: 16 are read, the rest is SMTP input.
        header = v2(body=ipv4_block() + tlv(0x04, bytes(202)))
        self.assertEqual(len(header), 233)
        result = read(header)
        self.assertEqual((result.ok, result.leftover), (False, header[16:]))
        # Known from the length alone: no need to wait for the body.
        self.assertEqual(read(v2(length=0xFFFF)).ok, False)

    def test_families_and_commands(self) -> None:
        # [exim] UDP (0x12, 0x22), UNIX (0x31) and UNSPEC fail under PROXY;
        # commands other than LOCAL and PROXY fail.
        cases = [
            (v2(family=0x12, body=ipv4_block()), "family 0x12"),
            (v2(family=0x22, body=bytes(36)), "family 0x22"),
            (v2(family=0x31, body=bytes(216)), "family 0x31"),
            (v2(family=0x00), "family 0x00"),
            (v2(command=0x2, body=ipv4_block()), "command 0x2"),
            (v2(command=0xF, body=ipv4_block()), "command 0xf"),
        ]
        for header, error in cases:
            result = read(header + b"EHLO x\r\n")
            self.assertFalse(result.ok, header)
            self.assertEqual(result.version, 2)
            self.assertIn(error, result.error)
            self.assertEqual(result.leftover, b"EHLO x\r\n")

    def test_short_address_block(self) -> None:
        # Beyond Exim, which would read stale memory here.
        result = read(v2(body=ipv4_block()[:8]) + b"EHLO x\r\n")
        self.assertEqual((result.ok, result.leftover), (False, b"EHLO x\r\n"))
        self.assertIn("too short", result.error)
        self.assertFalse(read(v2(family=0x21, body=bytes(35))).ok)


class Segmentation(unittest.SynchronousTestCase):
    """Exim needs its first read() to return 14 bytes; here any split works."""

    HEADERS = [
        V1,
        b"PROXY UNKNOWN\r\n",
        b"PROXY TCP6 2001:db8::1 2001:db8::2 40000 25\r\n",
        V2_4030,
        V2_LOCAL,
        v2(body=ipv4_block() + tlv(0x02, b"mx.example") + tlv(0x05, b"id-1")),
    ]

    def test_bytewise(self) -> None:
        for header in self.HEADERS:
            self.assertEqual(read_bytewise(header), read(header), header)

    def test_every_two_way_split(self) -> None:
        for header in self.HEADERS:
            data = header + b"EHLO x\r\n"
            for cut in range(1, len(data)):
                reader = ProxyHeaderReader()
                result = reader.feed(data[:cut])
                if result is None:
                    result = reader.feed(data[cut:])
                else:
                    # Complete in the first piece: the second is SMTP input.
                    result.leftover += data[cut:]
                self.assertEqual(result, read(data), (data, cut))

    def test_refusals_bytewise(self) -> None:
        for header in (b"PROXY  TCP4 192.0.2.1 192.0.2.2 1 2\r\n",
                       b"PROXY TCP4 192.0.2.1 192.0.2.2 0 25\r\n",
                       v2(family=0x12, body=ipv4_block())):
            self.assertEqual(read_bytewise(header), read(header), header)


class ReaderState(unittest.SynchronousTestCase):
    def test_timeout_with_nothing(self) -> None:
        result = ProxyHeaderReader().timed_out()
        self.assertEqual((result.ok, result.version, result.leftover), (False, None, b""))

    def test_timeout_mid_header(self) -> None:
        # Exim had read these bytes: nothing is left for SMTP.
        for partial in (V2_4030[:20], V2_4030[:10], b"PROXY TCP4 1.2", b"PRO"):
            reader = ProxyHeaderReader()
            self.assertIsNone(reader.feed(partial))
            self.assertEqual(reader.timed_out().leftover, b"")

    def test_empty_feed_waits(self) -> None:
        self.assertIsNone(ProxyHeaderReader().feed(b""))

    def test_one_result_only(self) -> None:
        reader = ProxyHeaderReader()
        result = reader.feed(V1)
        self.assertIs(reader.result, result)
        self.assertRaises(RuntimeError, reader.feed, b"EHLO x\r\n")
        self.assertRaises(RuntimeError, reader.timed_out)


class Tlvs(unittest.SynchronousTestCase):
    SSL = tlv(0x20, b"\x07\x00\x00\x00\x00" + tlv(0x21, b"TLSv1.3") + tlv(0x22, b"client.example")
              + tlv(0x23, b"TLS_AES_256_GCM_SHA384") + tlv(0x24, b"RSA-SHA256")
              + tlv(0x25, b"RSA2048"))

    def test_decoded(self) -> None:
        tlvs = tlv(0x02, b"mx.example") + tlv(0x05, b"\x01id") + tlv(0x04, b"") + self.SSL
        result = read(v2(body=ipv4_block() + tlvs) + b"EHLO x\r\n")
        self.assertTrue(result.ok)
        self.assertEqual((result.authority, result.unique_id), ("mx.example", "\x01id"))
        self.assertEqual(result.ssl, {
            "version": "TLSv1.3", "cn": "client.example", "cipher": "TLS_AES_256_GCM_SHA384",
            "sig_alg": "RSA-SHA256", "key_alg": "RSA2048", "verified": "yes",
        })
        self.assertEqual(sorted(result.tlvs), [0x02, 0x04, 0x05, 0x20])
        self.assertEqual(result.leftover, b"EHLO x\r\n")

    def test_after_ipv6_and_local_addresses(self) -> None:
        result = read(v2(family=0x21, body=bytes(36) + tlv(0x02, b"a.example")))
        self.assertEqual(result.authority, "a.example")
        result = read(v2(command=0x0, family=0x00, body=tlv(0x05, b"u")))
        self.assertEqual((result.command, result.unique_id), ("LOCAL", "u"))

    def test_crc32c(self) -> None:
        self.assertEqual(crc32c(b"123456789"), 0xE3069283)
        body = ipv4_block() + tlv(0x02, b"mx.example") + tlv(0x03, bytes(4))
        header = v2(body=body)
        good = header[:-4] + crc32c(header).to_bytes(4, "big")
        self.assertEqual(read(good).authority, "mx.example")
        # A wrong checksum: the TLVs are ignored, the header still accepted
        # (Exim ignores TLVs altogether).
        bad = header[:-4] + (crc32c(header) ^ 1).to_bytes(4, "big")
        result = read(bad)
        self.assertEqual((result.ok, result.tlvs, result.authority), (True, {}, None))

    def test_malformed_ignored(self) -> None:
        for tail in (b"\x02", b"\x02\x00", b"\x02\x00\x05abc", tlv(0x02, b"ok") + b"\x05\xff"):
            result = read(v2(body=ipv4_block() + tail))
            self.assertTrue(result.ok, tail)
            self.assertEqual((result.tlvs, result.authority), ({}, None), tail)

    def test_malformed_ssl(self) -> None:
        result = read(v2(body=ipv4_block() + tlv(0x02, b"a") + tlv(0x20, b"\x01\x00")))
        self.assertEqual((result.authority, result.ssl), ("a", None))
        self.assertIsNone(decode_ssl_tlv(b"\x01\x00\x00\x00\x00\x21\x00\x09TLS"))

    def test_verified(self) -> None:
        # Only a certificate that was presented (CERT_CONN or CERT_SESS)
        # and verified (0) counts: haproxy sends 0 without a certificate.
        self.assertEqual(decode_ssl_tlv(b"\x05\x00\x00\x00\x00"), {"verified": "yes"})
        self.assertEqual(decode_ssl_tlv(b"\x01\x00\x00\x00\x00"), {"verified": "no"})
        self.assertEqual(decode_ssl_tlv(b"\x07\x00\x00\x00\x15"), {"verified": "no"})

    def test_undecodable_text(self) -> None:
        result = read(v2(body=ipv4_block() + tlv(0x02, b"\xff.example")))
        self.assertEqual(result.authority, "\\xff.example")


class IpAddresses(unittest.SynchronousTestCase):
    # [exim] ${if isip{...}} in exim4 -be, which uses the same function.
    VALID = ["1.2.3.4", "::1", "fe80::1%eth0", "fe80::1%", "fe80::1%a%b~",
             "1:2:3:4:5:6:7:8", "::ffff:1.2.3.4"]
    INVALID = ["", "1.2.3", "1.2.3.4.", "001.2.3.4", "1.2.3.04", "0x1.2.3.4", "+1.2.3.4",
               "256.1.1.1", "1.2.3.4/32", "::1/64", "1.2.3.4%x", "::123456789", "12345::",
               ":::", "1:2:3:4:5:6:7:8:9", "::ffff:001.2.3.4", "fe80::1%\xe9", "host.example"]

    def test_valid(self) -> None:
        for text in self.VALID:
            self.assertTrue(is_ip_address(text), text)

    def test_invalid(self) -> None:
        for text in self.INVALID:
            self.assertFalse(is_ip_address(text), text)


# --- real haproxy -----------------------------------------------------------

class Backend:
    """A listening socket on 127.0.0.1 that records what one connection
    sends."""

    def __init__(self) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]

    def receive(self, until: bytes, timeout: float = 10.0) -> tuple[tuple[str, int], bytes]:
        """Accept a connection and read until the data ends with *until*
        or the connection closes; return the peer and the data."""
        self.listener.settimeout(timeout)
        connection, peer = self.listener.accept()
        data = b""
        with connection:
            connection.settimeout(timeout)
            while not data.endswith(until):
                chunk = connection.recv(65536)
                if not chunk:
                    break
                data += chunk
        return peer, data

    def close(self) -> None:
        self.listener.close()


def make_pki(directory: str) -> dict[str, str]:
    """A CA, a server certificate for mail.example.test and a client
    certificate for client.example.test, as PEM files in *directory*."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.UTC)

    def name(cn: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])

    def certificate(cn: str, key, issuer: str, issuer_key, ca: bool = False) -> x509.Certificate:
        builder = (x509.CertificateBuilder().subject_name(name(cn)).issuer_name(name(issuer))
                   .public_key(key.public_key()).serial_number(x509.random_serial_number())
                   .not_valid_before(now - datetime.timedelta(days=1))
                   .not_valid_after(now + datetime.timedelta(days=2))
                   .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
        if not ca:
            builder = builder.add_extension(x509.SubjectAlternativeName([x509.DNSName(cn)]),
                                            critical=False)
        return builder.sign(issuer_key, hashes.SHA256())

    def pem(cert: x509.Certificate, key=None) -> bytes:
        text = cert.public_bytes(serialization.Encoding.PEM)
        if key is not None:
            text += key.private_bytes(serialization.Encoding.PEM,
                                      serialization.PrivateFormat.PKCS8,
                                      serialization.NoEncryption())
        return text

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = certificate("Test CA", ca_key, "Test CA", ca_key, ca=True)
    files = {}
    for role, cn in (("server", "mail.example.test"), ("client", "client.example.test")):
        key = ec.generate_private_key(ec.SECP256R1())
        files[role] = os.path.join(directory, f"{role}.pem")
        with open(files[role], "wb") as handle:
            handle.write(pem(certificate(cn, key, "Test CA", ca_key), key))
    files["ca"] = os.path.join(directory, "ca.pem")
    with open(files["ca"], "wb") as handle:
        handle.write(pem(ca))
    return files


class HaproxyTests(unittest.SynchronousTestCase):
    """What haproxy 2.6 sends its servers, read back by ProxyHeaderReader."""

    def setUp(self) -> None:
        require_program(Haproxy.program)
        self.backend = Backend()
        self.addCleanup(self.backend.close)

    def haproxy(self, **options) -> Haproxy:
        proxy = Haproxy(self.backend.port, **options)
        self.addCleanup(proxy.cleanup)
        return proxy.start()

    def relay(self, data: bytes, **options) -> tuple[ProxyResult, tuple[str, int], int]:
        """Send *data* through a new haproxy; return what the backend
        read, the client's address and haproxy's port."""
        proxy = self.haproxy(**options)
        with socket.create_connection(("127.0.0.1", proxy.port), timeout=10) as client:
            client.sendall(data)
            peer, received = self.backend.receive(until=b"EHLO x\r\n")
            address = client.getsockname()
        # The proxied connection comes from the configured source address.
        self.assertEqual(peer[0], "127.0.0.2")
        result = ProxyHeaderReader().feed(received)
        self.assertIsNotNone(result, received)
        return result, address, proxy.port

    def test_send_proxy_v1(self) -> None:
        result, client, port = self.relay(b"EHLO x\r\n", mode="send-proxy")
        self.assertEqual((result.ok, result.version, result.command), (True, 1, "PROXY"))
        self.assertEqual(addresses(result), (client[0], client[1], "127.0.0.1", port))
        self.assertEqual(result.leftover, b"EHLO x\r\n")

    def test_send_proxy_v2_with_tlvs(self) -> None:
        result, client, port = self.relay(
            b"EHLO x\r\n", mode="send-proxy-v2",
            server_options="proxy-v2-options unique-id,authority,crc32c",
            frontend_lines=[r"unique-id-format %{+X}o\ %ci:%cp_%fi:%fp"])
        self.assertEqual((result.ok, result.version, result.command), (True, 2, "PROXY"))
        self.assertEqual(addresses(result), (client[0], client[1], "127.0.0.1", port))
        self.assertEqual(result.unique_id, f"7F000001:{client[1]:04X}_7F000001:{port:04X}")
        # haproxy sends no authority without SNI; the CRC32C TLV was checked.
        self.assertIsNone(result.authority)
        self.assertIn(0x03, result.tlvs)
        self.assertEqual(result.leftover, b"EHLO x\r\n")

    def test_relayed_header_v1(self) -> None:
        # A header sent to an accept-proxy frontend is passed on: a way to
        # make haproxy announce arbitrary addresses.
        header = b"PROXY TCP6 2001:db8::1 2001:db8::2 40000 25\r\n"
        result, _, _ = self.relay(header + b"EHLO x\r\n", bind_options="accept-proxy")
        self.assertEqual(addresses(result), ("2001:db8::1", 40000, "2001:db8::2", 25))
        self.assertEqual(result.leftover, b"EHLO x\r\n")

    def test_relayed_header_v2_ipv6_and_authority(self) -> None:
        body = (socket.inet_pton(socket.AF_INET6, "2001:db8::7")
                + socket.inet_pton(socket.AF_INET6, "2001:db8::25") + b"\x9c\x40\x00\x19"
                + tlv(0x02, b"mx.example.test"))
        result, _, _ = self.relay(v2(family=0x21, body=body) + b"EHLO x\r\n",
                                  bind_options="accept-proxy", mode="send-proxy-v2",
                                  server_options="proxy-v2-options authority")
        self.assertEqual((result.ok, result.version), (True, 2))
        self.assertEqual(addresses(result), ("2001:db8::7", 40000, "2001:db8::25", 25))
        self.assertEqual(result.authority, "mx.example.test")
        self.assertEqual(result.leftover, b"EHLO x\r\n")

    def test_ssl_tlvs(self) -> None:
        directory = tempfile.mkdtemp(prefix="proxy-pki-")
        self.addCleanup(lambda: subprocess.run(["rm", "-rf", directory], check=False))
        files = make_pki(directory)
        proxy = self.haproxy(
            mode="send-proxy-v2",
            bind_options=f"ssl crt {files['server']} ca-file {files['ca']} verify optional",
            server_options="proxy-v2-options ssl,cert-cn,ssl-cipher,cert-sig,cert-key,authority")
        for with_certificate in (True, False):
            context = ssl.create_default_context(cafile=files["ca"])
            if with_certificate:
                context.load_cert_chain(files["client"])
            raw = socket.create_connection(("127.0.0.1", proxy.port), timeout=10)
            with context.wrap_socket(raw, server_hostname="mail.example.test") as client:
                client.sendall(b"EHLO x\r\n")
                cipher = client.cipher()
                _, received = self.backend.receive(until=b"EHLO x\r\n")
            result = ProxyHeaderReader().feed(received)
            self.assertTrue(result.ok)
            self.assertEqual(result.authority, "mail.example.test")
            self.assertEqual(result.ssl["version"], cipher[1])
            self.assertEqual(result.ssl["cipher"], cipher[0])
            self.assertEqual(result.leftover, b"EHLO x\r\n")
            # cert-sig and cert-key describe haproxy's own certificate.
            self.assertEqual(result.ssl["key_alg"], "EC256")
            self.assertEqual(result.ssl["sig_alg"], "ecdsa-with-SHA256")
            if with_certificate:
                self.assertEqual(result.ssl["cn"], "client.example.test")
                self.assertEqual(result.ssl["verified"], "yes")
            else:
                self.assertNotIn("cn", result.ssl)
                self.assertEqual(result.ssl["verified"], "no")

    def test_fixture(self) -> None:
        proxy = self.haproxy(mode="send-proxy-v2")
        with open(proxy.pidfile) as handle:
            self.assertEqual(int(handle.read().split()[0]), proxy.process.pid)
        self.assertIn(f"bind 127.0.0.1:{proxy.port} ", proxy.config())
        pid = proxy.process.pid
        proxy.stop()
        proxy.stop()
        self.assertRaises(ProcessLookupError, os.kill, pid, 0)
        self.assertRaises(ValueError, Haproxy, 25, backend_host="192.0.2.1")
        self.assertRaises(ValueError, Haproxy, 25, mode="send-proxy-v3")


# --- live comparison with Exim ------------------------------------------------

EXIM = "/usr/sbin/exim4"
EXIM_CONFIG = """\
primary_hostname = myhost.test.ex
spool_directory = {directory}/spool
log_file_path = {directory}/%slog
hosts_proxy = *
proxy_protocol_timeout = 1s
"""
TAIL = b"EHLO x\r\nQUIT\r\n"


class AgainstExim(unittest.SynchronousTestCase):
    """Replies of ``exim4 -bh`` to a header and then EHLO and QUIT, against
    those that the reader's result implies."""

    CASES = [
        V1, b"PROXY UNKNOWN\r\n", b"PROXY TCP4 2001:db8::1 198.51.100.9 40000 25\r\n",
        b"PROXY TCP4 192.0.2.1 192.0.2.2 70000 -25\r\n",
        b"PROXY  TCP4 192.0.2.1 192.0.2.2 1 2\r\n",
        b"PROXY TCP4 192.0.2.1 192.0.2.2 0 25\r\n",
        b"PROXY TCP4 192.0.2.1 192.0.2.2 4294967296 25\r\n",
        b"HELO a\r\nNOOP\r\nNOOP\r\n", b"GARBAGE" + b"y" * 300 + b"\r\n",
        V2_4030, V2_LOCAL, v2(version=1, body=ipv4_block("127.0.0.2")),
        v2(family=0x12, body=ipv4_block()), v2(body=ipv4_block() + tlv(0x04, bytes(202))),
        b"PROXY TCP4 192.0.2.1 192.0.2.2 1 2\n",
    ]

    def setUp(self) -> None:
        require_program(EXIM)
        self.directory = tempfile.mkdtemp(prefix="proxy-exim-")
        self.addCleanup(lambda: subprocess.run(["rm", "-rf", self.directory], check=False))
        os.mkdir(os.path.join(self.directory, "spool"))
        self.config = os.path.join(self.directory, "configure")
        with open(self.config, "w") as handle:
            handle.write(EXIM_CONFIG.format(directory=self.directory))

    def exim_replies(self, header: bytes, wait: bool) -> list[str]:
        process = subprocess.Popen([EXIM, "-C", self.config, "-bh", "127.0.0.1"],
                                   stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                   stderr=subprocess.STDOUT)
        try:
            process.stdin.write(header)
            process.stdin.flush()
            # Past proxy_protocol_timeout when the header never ends.
            time.sleep(1.5 if wait else 0.2)
            process.stdin.write(TAIL)
            process.stdin.close()
        except BrokenPipeError:
            pass
        output = process.stdout.read().decode("latin-1")
        process.wait()
        replies, first = [], None
        for line in output.splitlines():
            if re.match(r"\d{3}[ -]", line):
                first = first or line
                if line[3] == " ":
                    hello = re.search(r"Hello x \[(.*)\]", first)
                    replies.append(f"250 [{hello.group(1)}]" if hello else first[:3])
                    first = None
        return replies

    @staticmethod
    def expected_replies(result: ProxyResult, smtp: bytes) -> list[str]:
        if result.ok:
            return ["220", f"250 [{result.source_address or '127.0.0.1'}]", "221"]
        replies = ["220"]
        for line in smtp.split(b"\n")[:-1]:
            if b"\0" in line:
                replies.append("501")
            elif line.rstrip(b"\r") == b"QUIT":
                replies.append("221")
                break
            else:
                replies.append("503")
        return replies

    def test_cases(self) -> None:
        for header in self.CASES:
            reader = ProxyHeaderReader()
            result = reader.feed(header)
            wait = result is None
            if wait:
                result = reader.timed_out()
            expected = self.expected_replies(result, result.leftover + TAIL)
            self.assertEqual(self.exim_replies(header, wait), expected, header)
