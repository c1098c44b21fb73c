"""Tests for twisted_mta.spool: message ids, -H files, the spool directory
and crash recovery.

The -H files under tests/data/spool/ were written by exim4 4.96 (Debian)
from the sessions in ``SESSIONS`` below with tests/data/spool/exim.conf;
``tests/data/spool/generate.py`` writes them again.  Each is compared byte
for byte with what :func:`format_header_file` writes for a SpoolMessage
built by hand from what the session sent; only the id, the times, the
ports, the TLS certificates and cipher are taken from the file.  When
exim4 is installed and we are root, ``LiveEximTests`` does the same
against files exim4 writes during the test run.
"""

from __future__ import annotations

import base64
import dataclasses
import glob
import multiprocessing
import os
import re
import shutil
import socket
import ssl
import subprocess
import tempfile
import time
import unittest
from pathlib import Path

from tests.peers import free_port, require_program, wait_until
from twisted_mta.spool import recovery
from twisted_mta.spool.flags import classify_headers, header_flag, header_type
from twisted_mta.spool.header import (
    SpoolFormatError,
    format_header_file,
    parse_header_file,
    printing,
    unprinting,
)
from twisted_mta.spool.ids import (
    MessageIdAllocator,
    base62,
    base62_value,
    id_time,
    is_message_id,
    make_message_id,
    split_time,
)
from twisted_mta.spool.message import (
    NOTIFY_DELAY,
    NOTIFY_FAILURE,
    NOTIFY_NEVER,
    NOTIFY_SUCCESS,
    Quoted,
    Recipient,
    SpoolHeader,
    SpoolMessage,
)
from twisted_mta.spool.store import DATA_START_OFFSET, Spool, lock_data_file
from twisted_mta.spool.tree import (
    TreeNode,
    fix_balances,
    spool_order,
    tree_build,
    tree_contains,
    tree_insert,
    tree_names,
)
from twisted_mta.taint import Tainted, is_tainted

DATA = Path(__file__).parent / "data" / "spool"
EXIM = "/usr/sbin/exim4"
T = Tainted


# ------------------------------------------------------------------ ids

class IdTests(unittest.TestCase):
    def test_base62(self) -> None:
        self.assertEqual(base62(0), "000000")
        self.assertEqual(base62(61, 2), "0z")
        self.assertEqual(base62(62, 2), "10")
        self.assertEqual(base62(24, 2), "0O")
        # Digits that do not fit are dropped, as string_base62() does.
        self.assertEqual(base62(62 ** 2 + 5, 2), "05")
        self.assertEqual(base62_value("1xV8ZJ"), 1795357765)
        for n in (0, 1, 61, 62, 3843, 1796124644, 62 ** 6 - 1):
            self.assertEqual(base62_value(base62(n)), n)

    def test_id_from_reference(self) -> None:
        # exim-core.md 7.1: -received_time_usec .122048 gave ...-0O.
        self.assertEqual(make_message_id(base62_value("1xV8ZJ"), base62_value("0001Pq"),
                                         122048 // 5000), "1xV8ZJ-0001Pq-0O")
        # The reference -H file of 1xV8Zd-0001YW-2l says "1795357785 0".
        self.assertEqual(id_time("1xV8Zd-0001YW-2l"), 1795357785)
        self.assertTrue(is_message_id("1xV8ZJ-0001Pq-0O"))
        for bad in ("1xV8ZJ-0001Pq-0", "1xV8ZJ_0001Pq-0O", "../../etc/pw-0O", "1xV8ZJ-0001Pq-0O\n"):
            self.assertFalse(is_message_id(bad), bad)

    def test_allocator_matches_exim(self) -> None:
        # Ids exim4 gave, recomputed from the -H file's receive time and pid.
        # (Exim reads the clock for the id just before the receive time, so
        # a regenerated file could, rarely, have its id one tick earlier.)
        for case in ("plain", "dsn", "lhn"):
            for path in _case_files(case, "-H"):
                st = stamp(path.read_bytes())
                lhn = 3 if case == "lhn" else None
                alloc = MessageIdAllocator(lambda st=st: st.received[0] + st.received[1] / 1e6,
                                           base62_value(st.id[7:13]), lhn)
                self.assertEqual(alloc.allocate()[0], st.id)

    def test_localhost_number(self) -> None:
        alloc = MessageIdAllocator(lambda: 1796124655.792632, 0, localhost_number=3)
        message_id, _ = alloc.allocate()
        self.assertEqual(message_id[-2:], base62(3 * 200 + 158, 2))
        alloc16 = MessageIdAllocator(lambda: 1796124655.999999, 7, localhost_number=16)
        self.assertEqual(base62_value(alloc16.allocate()[0][-2:]), 16 * 200 + 199)
        with self.assertRaises(ValueError):
            MessageIdAllocator(lambda: 0.0, 1, localhost_number=17)

    def test_many_ids_in_one_tick(self) -> None:
        now = [1796124644.001]
        alloc = MessageIdAllocator(lambda: now[0], 4242)
        results = [alloc.allocate() for _ in range(1000)]
        ids = [i for i, _ in results]
        self.assertEqual(len(set(ids)), 1000)
        # Queue order (time, then sub-second) is the allocation order.
        self.assertEqual(sorted(ids, key=lambda i: (i[:6], i[14:])), ids)
        for message_id, received in results:
            sec, usec = split_time(received)
            # The received time is in the id's tick, as if Exim had waited.
            self.assertEqual(make_message_id(sec, 4242, usec // 5000), message_id)
            self.assertGreaterEqual(received, now[0])
        # 1000 ticks of 5 ms: the last id is 5 s ahead of the stalled clock.
        self.assertEqual(id_time(ids[-1]), 1796124648)
        # Once the clock passes the last tick, ids follow the clock again.
        now[0] = 1796124650.5
        message_id, received = alloc.allocate()
        self.assertEqual(received, now[0])
        self.assertEqual(message_id, make_message_id(1796124650, 4242, 100))

    def test_clock_going_back(self) -> None:
        times = iter([100.0, 100.3, 99.0, 99.0, 100.3])
        alloc = MessageIdAllocator(lambda: next(times), 1)
        ids = [alloc.allocate()[0] for _ in range(5)]
        self.assertEqual(len(set(ids)), 5)
        self.assertEqual(sorted(ids), ids)


# ------------------------------------------------------------------ trees

class TreeTests(unittest.TestCase):
    def test_exim_orders(self) -> None:
        # ACL variable orders seen in exim4's -H files.
        self.assertEqual(spool_order(["_count", "_rcpts", "_multi"]),
                         ["_multi", "_count", "_rcpts"])
        self.assertEqual(spool_order(["_d", "_b", "_e", "_a", "_c", "_q"]),
                         ["_d", "_b", "_a", "_c", "_e", "_q"])
        # Re-reading inserts in file order: exim4 -Mf turned the first into
        # the second (checked with a real queue file).
        first = spool_order(["_a", "_b", "_c", "_e", "_f", "_d", "_g"])
        self.assertEqual(first, ["_c", "_b", "_a", "_e", "_d", "_f", "_g"])
        self.assertEqual(spool_order(first), ["_d", "_b", "_a", "_c", "_f", "_e", "_g"])

    def test_balanced_and_sorted(self) -> None:
        import random

        rng = random.Random(5)

        def height(n: TreeNode | None) -> int:
            return 0 if n is None else 1 + max(height(n.left), height(n.right))

        def check(n: TreeNode | None) -> None:
            if n is not None:
                self.assertLessEqual(abs(height(n.left) - height(n.right)), 1)
                check(n.left)
                check(n.right)

        def inorder(n: TreeNode | None) -> list[str]:
            return [] if n is None else inorder(n.left) + [n.name] + inorder(n.right)

        for _ in range(300):
            names = [f"a{rng.randrange(500)}@x" for _ in range(rng.randrange(1, 60))]
            root = tree_build(names)
            check(root)
            self.assertEqual(inorder(root), sorted(set(names), key=lambda s: s.encode()))
            self.assertTrue(all(tree_contains(root, n) for n in names))
            self.assertFalse(tree_contains(root, "zz"))
            # Balances recomputed from depths let insertion carry on.
            copy = tree_build(tree_names(root))
            fix_balances(copy)
            copy, added = tree_insert(copy, "b@x")
            self.assertTrue(added)
            check(copy)
        self.assertEqual(tree_insert(tree_build(["x"]), "x")[1], False)


# ------------------------------------------------------------------ header flags

class FlagTests(unittest.TestCase):
    def test_single_headers(self) -> None:
        cases = {
            "From: a\n": "F", "from : a\n": "F", "To: a\n": "T", "TO:\n": "T", "Cc: a\n": "C",
            "Bcc: a\n": "B", "Message-Id: <x>\n": "I", "Message-ID: <x>\n": "I",
            "Received: x\n": "P", "Reply-To: a\n": "R", "Sender: a\n": "S",
            "Subject: s\n": " ", "Date: d\n": " ", "X-To: a\n": " ", "Ccx: a\n": " ",
            "Received-SPF: pass\n": " ", "Tox: a\n": " ", "Resent-From: a\n": "F",
            "Resent-To: a\n": "T", "Resent-Message-Id: <x>\n": "I", "Resent-Received: x\n": " ",
            "Resent-Reply-To: a\n": " ", "To\t: a\n": "T", "Return-Path: <a>\n": " ",
        }
        for text, flag in cases.items():
            self.assertEqual(header_flag(text), flag, text)
        self.assertEqual(header_type("Return-Path: <a>\n"), "return-path")
        self.assertEqual(header_type("subject:x\n"), "subject")

    def test_message_like_exim(self) -> None:
        # The headers of the "tcp" case and the flags exim4 gave them.
        got = parse_header_file(_case_files("tcp", "-H")[0].read_bytes())
        texts = [h.text for h in got.headers[1:]]  # after Exim's own Received:
        self.assertEqual(classify_headers(texts), [h.flag for h in got.headers[1:]])
        self.assertEqual(classify_headers(["Message-Id: <a>\n", "Message-Id: <b>\n"]), ["I", " "])
        self.assertEqual(classify_headers(["Sender: a\n"], sender_is_old=True), ["*"])
        self.assertEqual(classify_headers(["Envelope-To: a\n"], envelope_to_remove=False), [" "])


# ------------------------------------------------------------------ exim4's files

@dataclasses.dataclass
class Stamp:
    """What differs between two runs of the same session."""

    id: str
    received: tuple[int, int]
    complete: tuple[int, int]
    date: str
    host_port: int = 0
    interface_port: int = 0
    frozen: int | None = None
    cipher: str = ""
    suite: str = ""
    peercert: str = ""
    ourcert: str = ""


def stamp(data: bytes) -> Stamp:
    """The run-dependent values of a -H file, found by pattern matching
    (not by the parser under test)."""
    text = data.decode("latin-1")

    def find(pattern: str, default: str = "") -> str:
        m = re.search(pattern, text, re.M)
        return m.group(1) if m else default

    lines = text.split("\n")
    complete = find(r"^-received_time_complete (\d+\.\d+)$").split(".")
    return Stamp(
        id=lines[0][:16],
        received=(int(lines[3].split()[0]), int(find(r"^-received_time_usec \.(\d+)$"))),
        complete=(int(complete[0]), int(complete[1])),
        date=find(r"\n\t(\w{3}, \d\d \w{3} \d{4} \d\d:\d\d:\d\d [+-]\d{4})\n"),
        host_port=int(find(r"^-+host_address \[[^]]*\]:(\d+)$", "0")),
        interface_port=int(find(r"^-+interface_address \[[^]]*\]:(\d+)$", "0")),
        frozen=int(find(r"^-frozen (\d+)$", "0")) or None,
        cipher=find(r"^-tls_cipher (.*)$"),
        suite=find(r" tls (\S+)\n"),
        peercert=find(r"^--tls_peercert (.*)$"),
        ourcert=find(r"^-tls_ourcert (.*)$"),
    )


def received(head: str, st: Stamp, sender: str | None = "alice@example.org",
             rcpt: str | None = None) -> SpoolHeader:
    """Exim's own Received: header for *st*'s message."""
    text = f"Received: {head}\n"
    if sender:
        text += f"\t(envelope-from <{sender}>)\n"
    text += f"\tid {st.id}" + (f"\n\tfor {rcpt};" if rcpt else ";") + f"\n\t{st.date}\n"
    return SpoolHeader(text, "P")


def H(text: str, flag: str = " ") -> SpoolHeader:  # noqa: N802 - reads like the file
    return SpoolHeader(text + "\n", flag)


def exim_ids(st: Stamp) -> list[SpoolHeader]:
    return [H(f"Message-Id: <E{st.id}@mx.example.com>", "I"), H(f"Date: {st.date}")]


MSG_HEADERS = [H("From: alice@example.org", "F"), H("To: bob@example.com", "T"), H("Subject: hi")]
HELO_VARS = {"acl_c_helo": T("client.test"), "acl_c0": "conn-var"}
MULTI = "line1\nline2\n"
BS_ESMTP = "from root (helo=client.test)\n\tby mx.example.com with local-esmtp (Exim 4.96)"


def message(st: Stamp, **kw: object) -> SpoolMessage:
    """A SpoolMessage with the fields every case shares."""
    base: dict[str, object] = dict(
        id=st.id, sender="alice@example.org", received=st.received,
        received_complete=st.complete, deliver_firsttime=True, tls_resumption=0,
        body_linecount=1, recipients=[Recipient("bob@example.com")],
    )
    base.update(kw)
    return SpoolMessage(**base)  # type: ignore[arg-type]


def local_message(st: Stamp, **kw: object) -> SpoolMessage:
    defaults: dict[str, object] = dict(
        ident="root", received_protocol="local", allow_unqualified_recipient=True,
        allow_unqualified_sender=True)
    defaults.update(kw)
    return message(st, **defaults)


def expect_plain(st: Stamp) -> SpoolMessage:
    return local_message(st, max_received_linelength=23, headers=[
        received("from root by mx.example.com with local (Exim 4.96)", st,
                 rcpt="bob@example.com"),
        H("From: alice@example.org", "F"), H("To: bob@example.com", "T"),
        H("Subject: plain"), *exim_ids(st)])


def expect_dsn(st: Stamp) -> SpoolMessage:
    return local_message(
        st, helo_name=T("client.test"), received_protocol="local-esmtp",
        acl_vars={**HELO_VARS, "acl_m_count": "4", "acl_m_rcpts": T("bob,carol,dave,erin"),
                  "acl_m_multi": MULTI},
        max_received_linelength=23, dsn_envid="env123", dsn_ret=2,
        recipients=[
            Recipient("bob@example.com", "rfc822;bob@example.com",
                      NOTIFY_SUCCESS | NOTIFY_FAILURE),
            Recipient("carol@example.com"),
            Recipient("dave@example.com", None, NOTIFY_NEVER),
            Recipient("erin@example.com", "rfc822;Erin+2B@example.com", NOTIFY_DELAY)],
        headers=[received(BS_ESMTP, st), *MSG_HEADERS, *exim_ids(st)])


def expect_orcpt(st: Stamp) -> SpoolMessage:
    # An ORCPT without NOTIFY is not kept; RET=FULL is 1; duplicates stay.
    return local_message(
        st, helo_name=T("client.test"), received_protocol="local-esmtp",
        acl_vars={**HELO_VARS, "acl_m_count": "3", "acl_m_rcpts": T("bob,carol,bob"),
                  "acl_m_multi": MULTI},
        max_received_linelength=23, dsn_ret=1,
        recipients=[Recipient("bob@example.com"),
                    Recipient("Carol@Example.com", None, NOTIFY_DELAY),
                    Recipient("bob@example.com")],
        headers=[received(BS_ESMTP, st), *MSG_HEADERS, *exim_ids(st)])


def expect_auth(st: Stamp) -> SpoolMessage:
    # host_auth is the authenticator's driver name, host_auth_pubname its
    # public_name; AUTH= on MAIL is kept as given.
    head = BS_ESMTP.replace("local-esmtp", "local-esmtpa")
    return local_message(
        st, helo_name=T("client.test"), received_protocol="local-esmtpa",
        host_auth="plain", host_auth_pubname="PLAIN", auth_id=T("user1"),
        auth_sender=T("<alice@example.org>"), max_received_linelength=23,
        acl_vars={**HELO_VARS, "acl_m_count": "2", "acl_m_rcpts": T("bob,carol"),
                  "acl_m_multi": MULTI},
        recipients=[Recipient("bob@example.com"), Recipient("carol@example.com")],
        headers=[received(head, st), *MSG_HEADERS, *exim_ids(st)])


def expect_auth_second(st: Stamp) -> SpoolMessage:
    head = BS_ESMTP.replace("local-esmtp", "local-esmtpa")
    return local_message(
        st, sender="", helo_name=T("client.test"), received_protocol="local-esmtpa",
        host_auth="plain", host_auth_pubname="PLAIN", auth_id=T("user1"),
        max_received_linelength=15,
        acl_vars={**HELO_VARS, "acl_m_count": "1", "acl_m_rcpts": T("bob"),
                  "acl_m_multi": MULTI},
        headers=[received(head, st, sender=None, rcpt="bob@example.com"),
                 H("Subject: second"), *exim_ids(st)])


def expect_hostvars(st: Stamp) -> SpoolMessage:
    # -oMa and friends: values from the command line are tainted.
    return message(
        st, helo_name=T("client.test"), host_address=T("192.0.2.1"), host_port=4321,
        host_name=T("host.example"), host_auth=T("plain"), interface_address=T("192.0.2.2"),
        interface_port=25, active_hostname="other.example", ident=T("identuser"),
        received_protocol="smtp", max_received_linelength=23, auth_id=T("authid"),
        dont_deliver=True,
        acl_vars={**HELO_VARS, "acl_m_count": "1", "acl_m_rcpts": T("bob"), "acl_m_multi": MULTI},
        headers=[received("from host.example\n\t([192.0.2.1] helo=client.test ident=identuser)"
                          "\n\tby mx.example.com with smtp (Exim 4.96)", st,
                          rcpt="bob@example.com"), *MSG_HEADERS])


def expect_utf8(st: Stamp) -> SpoolMessage:
    sender = "al\xc3\xafce@example.org"
    rcpt = "b\xc3\xb6b@example.com"
    return local_message(
        st, sender=sender, helo_name=T("client.test"), received_protocol="utf8local-esmtp",
        smtputf8=True, max_received_linelength=24,
        acl_vars={**HELO_VARS, "acl_m_count": "1", "acl_m_rcpts": T("b\xc3\xb6b"),
                  "acl_m_multi": MULTI},
        recipients=[Recipient(rcpt)],
        headers=[received(BS_ESMTP.replace("local-esmtp", "utf8local-esmtp"), st,
                          sender=sender, rcpt=rcpt),
                 H(f"From: {sender}", "F"), H("Subject: caf\xc3\xa9"), *exim_ids(st)])


TCP_HEAD = "from [127.0.0.1] (helo=client.test)\n\tby mx.example.com with esmtp (Exim 4.96)"


def tcp_message(st: Stamp, **kw: object) -> SpoolMessage:
    defaults: dict[str, object] = dict(
        helo_name=T("client.test"), host_address="127.0.0.1", host_port=st.host_port,
        interface_address="127.0.0.1", interface_port=st.interface_port,
        received_protocol="esmtp",
        acl_vars={**HELO_VARS, "acl_m_count": "1", "acl_m_rcpts": T("bob"), "acl_m_multi": MULTI})
    defaults.update(kw)
    return message(st, **defaults)


def expect_tcp(st: Stamp) -> SpoolMessage:
    # A Resent- header exists, so neither Message-ID gets I and Exim adds
    # none; the removed headers stay, flagged *; byte counts are bytes.
    return tcp_message(
        st, body_linecount=3, max_received_linelength=61, body_zerocount=1,
        host_lookup_failed=True,
        headers=[received(TCP_HEAD, st, rcpt="bob@example.com"), H("Subject: tcp"),
                 H("Received: from elsewhere by x; Tue, 1 Dec 2026 00:00:00 +0000", "P"),
                 H("Message-ID: <a@b>"), H("Message-ID: <c@d>"),
                 H("Reply-To: r@example.org", "R"), H("Sender: s@example.org", "S"),
                 H("Cc: c@example.org", "C"), H("Return-Path: <rp@example.org>", "*"),
                 H("Envelope-To: e@example.org", "*"), H("Delivery-Date: today", "*"),
                 H("X-Latin: caf\xe9"), H("Resent-From: rf@example.org", "F"),
                 H("To : spaced@example.com", "T")])


def expect_wire(st: Stamp) -> SpoolMessage:
    # No -body_linecount in wire format.
    return tcp_message(st, wireformat=True, body_linecount=0, max_received_linelength=13,
                       headers=[received(TCP_HEAD, st, rcpt="bob@example.com"),
                                H("Subject: wire")])


def expect_tls(st: Stamp) -> SpoolMessage:
    head = ("from [127.0.0.1] (helo=client.test)\n\tby mx.example.com with esmtps"
            f"  (TLS1.3) tls {st.suite}\n\t(Exim 4.96)")
    return tcp_message(
        st, received_protocol="esmtps", max_received_linelength=12,
        tls_certificate_verified=True, tls_cipher=st.cipher, tls_peercert=T(st.peercert),
        tls_peerdn=T("C=GB,O=Test\\, Org,CN=client\\\\one"), tls_sni=T("sni.example"),
        tls_ourcert=st.ourcert, tls_resumption=1, tls_ver="TLS1.3",
        headers=[received(head, st, rcpt="bob@example.com"), H("Subject: tls")])


def expect_bcc(st: Stamp) -> SpoolMessage:
    return local_message(
        st, max_received_linelength=23, frozen_at=st.frozen,
        recipients=[Recipient("bob@example.com"), Recipient("hidden@example.com")],
        headers=[received("from root by mx.example.com with local (Exim 4.96)", st),
                 H("From: alice@example.org", "F"), H("To: bob@example.com", "T"),
                 H("Bcc: hidden@example.com", "*"), H("Subject: freeze me"), *exim_ids(st)])


def expect_short(st: Stamp) -> SpoolMessage:
    # "Subject: x" submitted with -f: Exim adds From: after Message-Id:.
    return local_message(st, max_received_linelength=10, headers=[
        received("from root by mx.example.com with local (Exim 4.96)", st,
                 rcpt="bob@example.com"),
        H("Subject: x"), H(f"Message-Id: <E{st.id}@mx.example.com>", "I"),
        H("From: alice@example.org", "F"), H(f"Date: {st.date}")])


def expect_reorder(st: Stamp) -> SpoolMessage:
    return local_message(
        st, helo_name=T("client.test"), received_protocol="local-smtp",
        max_received_linelength=23,
        acl_vars={**HELO_VARS, "acl_m_a": "a", "acl_m_d": "d", "acl_m_e": "e",
                  "acl_m_count": "1", "acl_m_rcpts": T("bob"), "acl_m_multi": MULTI},
        headers=[received(BS_ESMTP.replace("esmtp", "smtp"), st, rcpt="bob@example.com"),
                 *MSG_HEADERS, *exim_ids(st)])


EXPECT = {
    "plain": [expect_plain], "dsn": [expect_dsn], "orcpt": [expect_orcpt],
    "auth": [expect_auth, expect_auth_second], "hostvars": [expect_hostvars],
    "utf8": [expect_utf8], "tcp": [expect_tcp], "wire": [expect_wire], "tls": [expect_tls],
    "bcc": [expect_bcc], "lhn": [expect_short], "split": [expect_short],
    "reorder": [expect_reorder],
}

# ------------------------------------------------------------------ running exim4

MSG = ["From: alice@example.org", "To: bob@example.com", "Subject: hi", "", "body line", "."]
AUTH_TOKEN = base64.b64encode(b"\0user1\0secret").decode()
TCP_DATA = [
    "Subject: tcp", "Received: from elsewhere by x; Tue, 1 Dec 2026 00:00:00 +0000",
    "Message-ID: <a@b>", "Message-ID: <c@d>", "Reply-To: r@example.org",
    "Sender: s@example.org", "Cc: c@example.org", "Return-Path: <rp@example.org>",
    "Envelope-To: e@example.org", "Delivery-Date: today", "X-Latin: caf\xe9",
    "Resent-From: rf@example.org", "To : spaced@example.com", "", "body", "x\0y", "", "."]

# name: (how, what, extra arguments, macros)
SESSIONS: dict[str, tuple[str, object, list[str], list[str]]] = {
    "plain": ("local", b"From: alice@example.org\nTo: bob@example.com\nSubject: plain\n\n"
              b"hello\n", ["-f", "alice@example.org", "bob@example.com"], []),
    "dsn": ("bs", ["EHLO client.test", "MAIL FROM:<alice@example.org> RET=HDRS ENVID=env123",
                   "RCPT TO:<bob@example.com> NOTIFY=SUCCESS,FAILURE ORCPT=rfc822;bob@example.com",
                   "RCPT TO:<carol@example.com>", "RCPT TO:<dave@example.com> NOTIFY=NEVER",
                   "RCPT TO:<erin@example.com> NOTIFY=DELAY ORCPT=rfc822;Erin+2B@example.com",
                   "DATA", *MSG, "QUIT"], [], []),
    "orcpt": ("bs", ["EHLO client.test", "MAIL FROM:<alice@example.org> RET=FULL",
                     "RCPT TO:<bob@example.com> ORCPT=rfc822;bob@example.com",
                     "RCPT TO:<Carol@Example.com> NOTIFY=DELAY", "RCPT TO:<bob@example.com>",
                     "DATA", *MSG, "QUIT"], [], []),
    "auth": ("bs", ["EHLO client.test", f"AUTH PLAIN {AUTH_TOKEN}",
                    "MAIL FROM:<alice@example.org> AUTH=<alice@example.org>",
                    "RCPT TO:<bob@example.com>", "RCPT TO:<carol@example.com>", "DATA", *MSG,
                    "MAIL FROM:<>", "RCPT TO:<bob@example.com>", "DATA",
                    "Subject: second", "", "x", ".", "QUIT"], [], []),
    "hostvars": ("bs", ["HELO client.test", "MAIL FROM:<alice@example.org>",
                        "RCPT TO:<bob@example.com>", "DATA", *MSG, "QUIT"],
                 ["-oMa", "192.0.2.1.4321", "-oMi", "192.0.2.2.25", "-oMs", "host.example",
                  "-oMt", "identuser", "-oMaa", "plain", "-oMai", "authid", "-N"],
                 ["ACTIVE=other.example"]),
    "utf8": ("bs", ["EHLO client.test", "MAIL FROM:<al\xc3\xafce@example.org> SMTPUTF8",
                    "RCPT TO:<b\xc3\xb6b@example.com>", "DATA", "From: al\xc3\xafce@example.org",
                    "Subject: caf\xc3\xa9", "", "b\xc3\xb6dy", ".", "QUIT"], [], []),
    "tcp": ("daemon", ["EHLO client.test", "MAIL FROM:<alice@example.org>",
                       "RCPT TO:<bob@example.com>", "DATA", TCP_DATA, "QUIT"], [], ["HOSTLOOKUP"]),
    "wire": ("daemon", ["EHLO client.test", "MAIL FROM:<alice@example.org>",
                        "RCPT TO:<bob@example.com>",
                        b"BDAT 37 LAST\r\nSubject: wire\r\n\r\nline one\r\nline two\r\n", "QUIT"],
             [], ["WIRE"]),
    "tls": ("tls", ["EHLO client.test", "MAIL FROM:<alice@example.org>",
                    "RCPT TO:<bob@example.com>", "DATA", ["Subject: tls", "", "body", "."],
                    "QUIT"], [], []),
    "bcc": ("local", b"From: alice@example.org\nTo: bob@example.com\nBcc: hidden@example.com\n"
            b"Subject: freeze me\n\nhello\n", ["-t", "-f", "alice@example.org"], []),
    "lhn": ("local", b"Subject: x\n\ny\n", ["-f", "alice@example.org", "bob@example.com"],
            ["LHN=3"]),
    "split": ("local", b"Subject: x\n\ny\n", ["-f", "alice@example.org", "bob@example.com"],
              ["SPLIT"]),
    "reorder": ("bs", ["HELO client.test", "MAIL FROM:<alice@example.org>",
                       "RCPT TO:<bob@example.com>", "DATA", *MSG, "QUIT"], [], ["REORDER"]),
}
#: Cases whose -H file is also rewritten by ``exim4 -Mf`` (freeze).
REWRITTEN = ("tls", "reorder")


def _exim(spool: str, macros: list[str], args: list[str], stdin: bytes = b"",
          extra: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    command = [EXIM, "-C", str(DATA / "exim.conf"), f"-DSPOOL={spool}",
               *[f"-D{m}" for m in macros], *extra, *args]
    return subprocess.run(command, input=stdin, capture_output=True, timeout=60, check=False)


class _Smtp:
    """A minimal SMTP client for talking to exim4's daemon."""

    def __init__(self, port: int) -> None:
        self.sock: socket.socket = socket.create_connection(("127.0.0.1", port), timeout=20)
        self.buffer = b""
        self.reply()

    def reply(self) -> bytes:
        lines = []
        while True:
            while b"\r\n" not in self.buffer:
                chunk = self.sock.recv(65536)
                if not chunk:
                    raise AssertionError(f"connection closed after {lines!r}")
                self.buffer += chunk
            line, self.buffer = self.buffer.split(b"\r\n", 1)
            lines.append(line)
            if line[3:4] != b"-":
                return b"\n".join(lines)

    def send(self, item: object) -> bytes:
        if isinstance(item, bytes):
            data = item
        elif isinstance(item, list):
            data = "".join(f"{line}\r\n" for line in item).encode("latin-1")
        else:
            data = f"{item}\r\n".encode("latin-1")
        self.sock.sendall(data)
        return self.reply()

    def starttls(self, certs: str) -> None:
        self.send("EHLO client.test")
        self.send("STARTTLS")
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        ctx.load_cert_chain(os.path.join(certs, "client.crt"), os.path.join(certs, "client.key"))
        self.sock = ctx.wrap_socket(self.sock, server_hostname="sni.example")


def _make_certs(directory: str) -> None:
    for name, subject in (("server", "/CN=mx.example.com"),
                          ("client", "/C=GB/O=Test, Org/CN=client\\\\one")):
        subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes",
                        "-keyout", os.path.join(directory, f"{name}.key"),
                        "-out", os.path.join(directory, f"{name}.crt"), "-days", "3650",
                        "-subj", subject], check=True, capture_output=True)


def _daemon_session(spool: str, macros: list[str], commands: list[object],
                    certs: str | None = None) -> None:
    port = free_port()
    if certs is not None:
        macros = [*macros, "USE_TLS", f"SERVER_CERT={certs}/server.crt",
                  f"SERVER_KEY={certs}/server.key", f"CLIENT_CA={certs}/client.crt"]
    command = [EXIM, "-C", str(DATA / "exim.conf"), f"-DSPOOL={spool}",
               *[f"-D{m}" for m in macros], "-bdf", "-oX", f"127.0.0.1.{port}"]
    daemon = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        def listening() -> bool:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                return True
            except OSError:
                return False
        wait_until(listening)
        time.sleep(0.2)  # let the probe connection's child exit
        client = _Smtp(port)
        if certs is not None:
            client.starttls(certs)
        for item in commands:
            client.send(item)
        client.sock.close()
        wait_until(lambda: glob.glob(f"{spool}/input/*-H"), timeout=10)
    finally:
        daemon.terminate()
        daemon.wait(timeout=10)


def run_session(name: str, spool: str) -> None:
    """Have exim4 receive session *name* into the spool directory *spool*."""
    how, what, args, macros = SESSIONS[name]
    if how == "local":
        assert isinstance(what, bytes)
        result = _exim(spool, macros, ["-odq", *args], what)
    elif how == "bs":
        assert isinstance(what, list)
        data = "".join(f"{line}\r\n" for line in what).encode("latin-1")
        result = _exim(spool, macros, ["-bs"], data, tuple(args))
    else:
        assert isinstance(what, list)
        if how == "tls":
            certs = tempfile.mkdtemp(prefix="spool-certs-")
            try:
                _make_certs(certs)
                _daemon_session(spool, macros, what, certs)
            finally:
                shutil.rmtree(certs, ignore_errors=True)
        else:
            _daemon_session(spool, macros, what)
        return
    if result.returncode != 0:
        raise AssertionError(f"exim4 failed for {name}: {result.stdout!r} {result.stderr!r}")


def freeze(spool: str, message_id: str) -> None:
    """Have exim4 rewrite a -H file (exim -Mf)."""
    _exim(spool, [], ["-Mf", message_id])


def generate(name: str, target: Path) -> None:
    """Write case *name*'s files (and rewritten -H, if any) into *target*."""
    spool = tempfile.mkdtemp(prefix=f"spool-{name}-")
    try:
        run_session(name, spool)
        if target.exists():
            shutil.rmtree(target)
        target.mkdir(parents=True)
        headers = sorted(glob.glob(f"{spool}/input/**/*-H", recursive=True))
        for path in headers + sorted(glob.glob(f"{spool}/input/**/*-D", recursive=True)):
            relative = os.path.relpath(path, f"{spool}/input")
            (target / relative).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(path, target / relative)
        if name in REWRITTEN:
            message_id = os.path.basename(headers[0])[:16]
            freeze(spool, message_id)
            shutil.copyfile(headers[0], target / "rewritten-H")
    finally:
        shutil.rmtree(spool, ignore_errors=True)


def _case_files(name: str, suffix: str, root: Path = DATA) -> list[Path]:
    return sorted((root / name).glob(f"**/??????-??????-??{suffix}"),
                  key=lambda p: (p.name[:6], p.name[14:]))


# ------------------------------------------------------------------ header files

_MARKED_FIELDS = [f.name for f in dataclasses.fields(SpoolMessage)
                  if f.name not in ("id", "sender", "originator_login", "recipients", "headers",
                                    "non_recipients", "unknown_lines", "acl_vars")]


class HeaderFileCase(unittest.TestCase):
    """Checks shared by the stored and the live comparisons (no tests)."""

    def check_case(self, name: str, root: Path) -> None:
        files = _case_files(name, "-H", root)
        self.assertEqual(len(files), len(EXPECT[name]), files)
        for path, expect in zip(files, EXPECT[name], strict=True):
            data = path.read_bytes()
            expected = expect(stamp(data))
            with self.subTest(case=name, file=path.name):
                self.assertEqual(format_header_file(expected).decode("latin-1"),
                                 data.decode("latin-1"))
                parsed = parse_header_file(data, expected_id=path.name[:16])
                if expected.tls_peerdn is not None:
                    # Written escaped, read back unescaped: backslashes go.
                    expected.tls_peerdn = T(unprinting(printing(expected.tls_peerdn)))
                self.assertEqual(parsed, expected)
                self.check_taint(parsed, expected)

    def check_taint(self, parsed: SpoolMessage, expected: SpoolMessage) -> None:
        for field in _MARKED_FIELDS:
            value = getattr(expected, field)
            if isinstance(value, str):
                self.assertEqual(is_tainted(getattr(parsed, field)), is_tainted(value),
                                 field)
        for key, value in expected.acl_vars.items():
            self.assertEqual(is_tainted(parsed.acl_vars[key]), is_tainted(value), key)
        self.assertTrue(is_tainted(parsed.sender))
        self.assertTrue(all(is_tainted(r.address) for r in parsed.recipients))


class StoredExim4FilesTests(HeaderFileCase):
    """Against the files exim4 wrote, kept in tests/data/spool/."""

    def test_cases(self) -> None:
        for name in EXPECT:
            self.check_case(name, DATA)

    def test_round_trip(self) -> None:
        # Not for the two cases where exim4 itself does not write back what
        # it read (test_rewrites_like_exim).
        for path in sorted(DATA.glob("**/*-H")):
            if path.parent.name in REWRITTEN:
                continue
            data = path.read_bytes()
            with self.subTest(file=str(path.relative_to(DATA))):
                msg = parse_header_file(data)
                self.assertEqual(format_header_file(msg), data)
                self.assertEqual(parse_header_file(format_header_file(msg)), msg)

    def test_rewrites_like_exim(self) -> None:
        # exim4 -Mf read the file and wrote it back with -frozen; the ACL
        # variables came back re-ordered and the DN lost its backslashes.
        for name in REWRITTEN:
            original = _case_files(name, "-H")[0].read_bytes()
            rewritten = (DATA / name / "rewritten-H").read_bytes()
            msg = parse_header_file(original)
            msg.frozen_at = stamp(rewritten).frozen
            with self.subTest(case=name):
                self.assertEqual(format_header_file(msg).decode("latin-1"),
                                 rewritten.decode("latin-1"))
        reorder = parse_header_file((DATA / "reorder" / "rewritten-H").read_bytes())
        self.assertEqual([n for n in reorder.acl_vars if n.startswith("acl_m")],
                         ["acl_m_e", "acl_m_count", "acl_m_a", "acl_m_d", "acl_m_multi",
                          "acl_m_rcpts"])
        tls = (DATA / "tls" / "rewritten-H").read_bytes()
        self.assertIn(b"\n--tls_peerdn C=GB,O=Test, Org,CN=client\\one\n", tls)
        # ... and the next reading loses the other one ("\o" is "o").
        self.assertEqual(parse_header_file(tls).tls_peerdn, "C=GB,O=Test, Org,CN=clientone")

    def test_data_files(self) -> None:
        for path in sorted(DATA.glob("**/*-D")):
            data = path.read_bytes()
            self.assertEqual(data[:DATA_START_OFFSET], f"{path.name[:16]}-D\n".encode())
        wire = _case_files("wire", "-D")[0].read_bytes()[DATA_START_OFFSET:]
        self.assertEqual(wire, b"line one\r\nline two\r\n")  # headers live in -H only
        tcp = _case_files("tcp", "-D")[0].read_bytes()[DATA_START_OFFSET:]
        self.assertEqual(tcp, b"body\nx\0y\n\n")
        split = _case_files("split", "-H")[0]
        self.assertEqual(split.parent.name, split.name[5])

    def test_ids_agree_with_times(self) -> None:
        # auth: two messages in one session got consecutive ticks.
        first, second = (stamp(p.read_bytes()) for p in _case_files("auth", "-H"))
        self.assertEqual(base62_value(second.id[14:]), base62_value(first.id[14:]) + 1)


@unittest.skipUnless(os.environ.get("EXIMPY_REQUIRE_PEERS") == "1" or os.geteuid() == 0,
                     "exim4 runs need root (exim_user = root in the test configuration)")
class LiveEximTests(HeaderFileCase):
    """Run exim4 now and compare with what we would write."""

    def setUp(self) -> None:
        require_program(EXIM)
        if os.geteuid() != 0:
            self.fail("exim4 runs need root")
        self.root = Path(tempfile.mkdtemp(prefix="spool-live-"))
        self.addCleanup(shutil.rmtree, self.root, True)

    def test_local_and_bs_sessions(self) -> None:
        for name in ("plain", "dsn", "orcpt", "auth", "hostvars", "bcc", "lhn", "split",
                     "reorder"):
            generate(name, self.root / name)
            self.check_case(name, self.root)
        original = _case_files("reorder", "-H", self.root)[0].read_bytes()
        rewritten = (self.root / "reorder" / "rewritten-H").read_bytes()
        msg = parse_header_file(original)
        msg.frozen_at = stamp(rewritten).frozen
        self.assertEqual(format_header_file(msg), rewritten)

    def test_daemon_session(self) -> None:
        generate("tcp", self.root / "tcp")
        self.check_case("tcp", self.root)

    def test_exim4_reads_what_we_write(self) -> None:
        for split in (False, True):
            directory = str(self.root / f"ours-{split}")
            spool = Spool(directory, split=split)
            msg = expect_dsn(stamp(_case_files("dsn", "-H")[0].read_bytes()))
            spool.write_message(msg, b"body line\n")
            macros = ["SPLIT"] if split else []
            listing = _exim(directory, macros, ["-bp"]).stdout.decode()
            self.assertIn(f"{msg.id} <alice@example.org>", listing)
            self.assertIn("          erin@example.com\n", listing)
            shown = _exim(directory, macros, ["-Mvh", msg.id]).stdout
            self.assertEqual(shown, format_header_file(msg))
            # exim4 rewrites our file exactly as we would.
            _exim(directory, macros, ["-Mf", msg.id])
            again = spool.read_header(msg.id)
            self.assertIsNotNone(again.frozen_at)
            msg.frozen_at = again.frozen_at
            with open(spool.header_path(msg.id), "rb") as f:
                self.assertEqual(f.read(), format_header_file(msg))


class HeaderUnitTests(unittest.TestCase):
    def minimal(self, **kw: object) -> SpoolMessage:
        base: dict[str, object] = dict(id="1xYM4K-0005lt-35", sender="a@b.c",
                                       received=(1796124644, 958350),
                                       received_complete=(1796124644, 959548))
        base.update(kw)
        return SpoolMessage(**base)  # type: ignore[arg-type]

    def test_minimal_file(self) -> None:
        data = format_header_file(self.minimal(headers=[H("Subject: x")]))
        self.assertEqual(data, (
            b"1xYM4K-0005lt-35-H\nroot 0 0\n<a@b.c>\n1796124644 0\n"
            b"-received_time_usec .958350\n-received_time_complete 1796124644.959548\n"
            b"-body_linecount 0\n-max_received_linelength 0\n-tls_resumption A\n"
            b"XX\n0\n\n011  Subject: x\n"))

    def test_taint_marks(self) -> None:
        msg = self.minimal(helo_name=T("h"), host_address=T("::1"), host_port=25,
                           host_name="n", interface_address="10.0.0.1", interface_port=587,
                           auth_sender=T("a\nb"), dsn_envid=T("e"),
                           acl_vars={"acl_m_q": Quoted("x''y", "pgsql"), "acl_c1": T("")})
        text = format_header_file(msg).decode()
        for line in ("--helo_name h\n", "--host_address [::1]:25\n", "-host_name n\n",
                     "-interface_address [10.0.0.1]:587\n", "--auth_sender a b\n",
                     "-dsn_envid e\n", "--(pgsql)aclm _q 4\nx''y\n", "--aclc 1 0\n\n"):
            self.assertIn(line, text)
        back = parse_header_file(text.encode())
        self.assertIsInstance(back.acl_vars["acl_m_q"], Quoted)
        self.assertEqual(back.acl_vars["acl_m_q"].quoter, "pgsql")  # type: ignore[attr-defined]
        self.assertTrue(is_tainted(back.host_address))
        self.assertFalse(is_tainted(back.interface_address))
        self.assertFalse(is_tainted(back.dsn_envid))  # written without a mark
        self.assertEqual(back.host_port, 25)

    def test_every_field_round_trips(self) -> None:
        tree = tree_build(["x@y", "a@b", "q@r", "c@d"])
        msg = self.minimal(
            originator_login="some user", originator_uid=1000, originator_gid=-2,
            warning_count=2, helo_name=T("h"), host_address="192.0.2.1", host_port=1,
            host_name=T("host"), host_auth="plaintext", host_auth_pubname="PLAIN",
            interface_address="192.0.2.2", interface_port=25, active_hostname="act",
            ident=T("id"), received_protocol="esmtpsa",
            acl_vars={"acl_m9": "nine", "acl_c_x": T("multi\nline\n"), "acl_m_a": ""},
            debug_selector=0x1f, debuglog_name="dbg", wireformat=True,
            max_received_linelength=998, body_zerocount=3, auth_id=T("u"),
            auth_sender=T("s@x"), allow_unqualified_recipient=True,
            allow_unqualified_sender=True, deliver_firsttime=True, frozen_at=1796000000,
            dont_deliver=True, host_lookup_deferred=True, host_lookup_failed=True,
            sender_local=True, local_error_message=True, local_scan_data="ls",
            spam_bar="++", spam_score="2.5", spam_score_int="25", manual_thaw=True,
            sender_set_untrusted=True, tls_certificate_verified=True, tls_cipher="c",
            tls_peercert=T("-----BEGIN...\\n"), tls_peerdn=T("CN=a\tb\x01"),
            tls_sni=T("s"), tls_ourcert="-----BEGIN...\\n", tls_ocsp=3, tls_resumption=5,
            tls_ver="TLS1.2", smtputf8=True, utf8_downconvert=-1, dsn_envid="env",
            dsn_ret=1, unknown_lines=["-future_thing 1", "--other"], non_recipients=tree,
            recipients=[Recipient("a b@c", "rfc822;a b@c", 4, "err@x", 0),
                        Recipient("z@z", None, 0, None, 3), Recipient("p@q", None, 0, "e@f")],
            headers=[H("Received: x\n\ty", "P"), H("Old: x", "*"),
                     SpoolHeader("X: " + "y" * 1200 + "\n")])
        data = format_header_file(msg)
        text = data.decode("latin-1")
        self.assertIn("-tls_peerdn CN=a\\tb\\001\n", text)
        self.assertIn("-tls_resumption F\n", text)
        self.assertIn("-utf8_optdowncvt\n", text)
        self.assertIn("a b@c rfc822;a b@c 12,4 err@x 5,0#3\n", text)
        self.assertIn("z@z  0,0  0,3#3\n", text)
        self.assertIn("1204  X: ", text)
        self.assertIn("YY q@r\nNY a@b\nNN c@d\nNN x@y\n3\n", text)
        back = parse_header_file(data)
        self.assertEqual(back, dataclasses.replace(msg, non_recipients=back.non_recipients))
        self.assertEqual(tree_names(back.non_recipients), tree_names(tree))
        self.assertEqual(format_header_file(back), data)

    def test_recipient_formats(self) -> None:
        def read(line: str) -> Recipient:
            body = f"{'1xYM4K-0005lt-35'}-H\nu 0 0\n<>\n1 0\nXX\n1\n{line}\n\n"
            return parse_header_file(body.encode()).recipients[0]

        self.assertEqual(read("a@b"), Recipient("a@b"))
        self.assertEqual(read("a@b 3"), Recipient("a@b", pno=3))          # early Exim 4
        self.assertEqual(read("a@b 0,7,0"), Recipient("a@b", pno=7))      # Exim 3
        self.assertEqual(read("a@b o 1,2 e 1,-1#3"), Recipient("a@b", "o", 2, "e", -1))
        # A "#1" line loses the last character of its address, as in Exim.
        self.assertEqual(read("a@bc e@f 3,2#1"), Recipient("a@b", None, 0, "e@f", 2))

    def test_format_errors(self) -> None:
        good = format_header_file(self.minimal(headers=[H("Subject: x")]))
        bad = {
            b"x" + good: False,
            good.replace(b"<a@b.c>", b"a@b.c"): False,
            good.replace(b"root 0 0", b"root 0"): False,
            good.replace(b"1796124644 0\n", b"soon\n"): False,
            good.replace(b"XX\n0\n", b"XX\n"): False,
            good.replace(b"0\n\n011", b"0\n011"): True,
            good.replace(b"011  Subject", b"011  Sub\0ect"): True,
            good.replace(b"011 ", b"099 "): True,
            good[:40]: False,
        }
        for data, in_headers in bad.items():
            with self.subTest(data=data):
                with self.assertRaises(SpoolFormatError) as cm:
                    parse_header_file(data)
                self.assertEqual(cm.exception.in_headers, in_headers)
        with self.assertRaises(SpoolFormatError):
            parse_header_file(good, expected_id="1xYM4K-0005lt-36")
        with self.assertRaises(ValueError):
            format_header_file(self.minimal(acl_vars={"foo": "x"}))
        with self.assertRaises(ValueError):
            format_header_file(self.minimal(sender="\u20ac@x"))

    def test_printing(self) -> None:
        self.assertEqual(printing("a\\b\n\x7f\xe9"), "a\\b\\n\\177\\351")
        # Backslashes are not escaped, so a "\\b" comes back as a backspace.
        self.assertEqual(unprinting("a\\b\\n\\177\\351"), "a\b\n\x7f\xe9")


# ------------------------------------------------------------------ the spool directory

def spool_message(message_id: str, **kw: object) -> SpoolMessage:
    base: dict[str, object] = dict(
        id=message_id, sender="a@example.org", received=(1796124644, 5000),
        received_complete=(1796124644, 6000), received_protocol="esmtp",
        deliver_firsttime=True, recipients=[Recipient("b@example.com")],
        headers=[H("Subject: x")], body_linecount=1)
    base.update(kw)
    return SpoolMessage(**base)  # type: ignore[arg-type]


class StoreTests(unittest.TestCase):
    def setUp(self) -> None:
        self.dir = tempfile.mkdtemp(prefix="spool-store-")
        self.addCleanup(shutil.rmtree, self.dir, True)

    def test_layout_and_content(self) -> None:
        spool = Spool(self.dir)
        for name in ("input", "msglog", "db"):
            self.assertTrue(os.path.isdir(os.path.join(self.dir, name)))
        msg = spool_message("1xYM4K-0005lt-35")
        spool.write_message(msg, b"hello\n")
        paths = spool.paths(msg.id)
        self.assertEqual(paths.header, os.path.join(self.dir, "input", "1xYM4K-0005lt-35-H"))
        with open(paths.data, "rb") as f:
            self.assertEqual(f.read(), b"1xYM4K-0005lt-35-D\nhello\n")
        with open(paths.header, "rb") as f:
            self.assertEqual(f.read(), format_header_file(msg))
        self.assertEqual(os.stat(paths.data).st_mode & 0o777, 0o640)
        self.assertEqual(os.stat(paths.header).st_mode & 0o777, 0o640)
        self.assertFalse(os.path.exists(paths.temp_header))
        self.assertEqual(spool.read_header(msg.id), msg)
        self.assertEqual(spool.read_body(msg.id), b"hello\n")
        self.assertEqual(spool.list_ids(), [msg.id])
        spool.append_msglog(msg.id, "2026-12-01 11:30:44 Received from a@example.org\n")
        self.assertTrue(os.path.exists(paths.msglog))
        with self.assertRaises(FileExistsError):
            spool.write_message(msg, b"again\n")
        self.assertTrue(spool.remove(msg.id))
        self.assertEqual(os.listdir(os.path.join(self.dir, "input")), [])
        self.assertFalse(os.path.exists(paths.msglog))
        self.assertFalse(spool.remove(msg.id))
        with self.assertRaises(FileNotFoundError):
            spool.read_header(msg.id)

    def test_rejects_bad_ids(self) -> None:
        with self.assertRaises(ValueError):
            Spool(self.dir).paths("../../../etc/passwd")

    def test_split(self) -> None:
        spool = Spool(self.dir, split=True)
        msg = spool_message("1xYM4V-0005qW-2d")
        spool.write_message(msg, b"y\n")
        self.assertEqual(spool.data_path(msg.id),
                         os.path.join(self.dir, "input", "V", "1xYM4V-0005qW-2d-D"))
        self.assertEqual(spool.paths(msg.id).msglog,
                         os.path.join(self.dir, "msglog", "V", "1xYM4V-0005qW-2d"))
        self.assertTrue(os.path.exists(os.path.join(self.dir, "input", "V", msg.id + "-H")))
        # Like Exim, an unsplit spool still finds split messages and back.
        unsplit = Spool(self.dir)
        self.assertEqual(unsplit.read_header(msg.id), msg)
        other = spool_message("1xYM4V-0005qX-2e")
        unsplit.write_message(other, b"z\n")
        self.assertEqual(spool.list_ids(), [msg.id, other.id])
        self.assertEqual(spool.read_body(other.id), b"z\n")
        self.assertTrue(spool.remove(other.id))
        self.assertEqual(spool.list_ids(), [msg.id])

    def test_exim4_reads_our_split_spool(self) -> None:
        # The committed split case sits in input/<c>/ exactly as exim4 put it.
        path = _case_files("split", "-H")[0]
        spool = Spool(self.dir, split=True)
        self.assertEqual(os.path.relpath(spool.paths(path.name[:16]).header,
                                         os.path.join(self.dir, "input")),
                         os.path.relpath(path, DATA / "split"))

    def test_queue_order(self) -> None:
        spool = Spool(self.dir)
        # Same second: sub-second part decides, pid is ignored.
        ids = ["1xYM4K-zzzzzz-01", "1xYM4K-000001-02", "1xYM4J-00000a-zz", "1xYM4K-00000b-01"]
        for i in ids:
            spool.write_message(spool_message(i), b"")
        self.assertEqual(spool.list_ids(), ["1xYM4J-00000a-zz", "1xYM4K-00000b-01",
                                            "1xYM4K-zzzzzz-01", "1xYM4K-000001-02"])

    def test_durability_order(self) -> None:
        spool = Spool(self.dir)
        msg = spool_message("1xYM4K-0005lt-35")
        paths = spool.paths(msg.id)
        events: list[tuple[str, ...]] = []
        real = {name: getattr(os, name) for name in ("open", "fsync", "rename", "close")}
        fds: dict[int, str] = {}

        def fake_open(path: str, flags: int, mode: int = 0o777) -> int:
            fd = real["open"](path, flags, mode)
            fds[fd] = os.path.basename(os.path.normpath(path))
            events.append(("open", fds[fd]))
            return fd

        def fake_fsync(fd: int) -> None:
            events.append(("fsync", fds.get(fd, "?")))
            real["fsync"](fd)

        def fake_rename(a: str, b: str) -> None:
            events.append(("rename", os.path.basename(a), os.path.basename(b)))
            real["rename"](a, b)

        from unittest import mock
        with mock.patch("os.open", fake_open), mock.patch("os.fsync", fake_fsync), \
                mock.patch("os.rename", fake_rename):
            spool.write_message(msg, b"body\n")
        self.assertEqual(events, [
            ("open", msg.id + "-D"), ("fsync", msg.id + "-D"),
            ("open", "hdr." + msg.id), ("fsync", "hdr." + msg.id),
            ("rename", "hdr." + msg.id, msg.id + "-H"),
            ("open", "input"), ("fsync", "input"),
        ])
        self.assertTrue(os.path.exists(paths.header))

    def test_failure_leaves_nothing(self) -> None:
        spool = Spool(self.dir)
        msg = spool_message("1xYM4K-0005lt-35")
        from unittest import mock
        with mock.patch("os.rename", side_effect=OSError(28, "No space left on device")):
            with self.assertRaises(OSError):
                spool.write_message(msg, b"body\n")
        self.assertEqual(os.listdir(os.path.join(self.dir, "input")), [])
        self.assertEqual(spool.writing(), frozenset())

    def test_data_file_locked_while_writing(self) -> None:
        spool = Spool(self.dir)
        msg = spool_message("1xYM4K-0005lt-35")
        seen = []
        from unittest import mock
        real_rename = os.rename

        def rename(a: str, b: str) -> None:
            # Another process must find the -D locked and the id in use.
            seen.append(_lock_held_elsewhere(spool.paths(msg.id).data))
            seen.append(msg.id in spool.writing())
            real_rename(a, b)

        with mock.patch("os.rename", rename):
            spool.write_message(msg, b"x\n")
        self.assertEqual(seen, [True, True])
        self.assertFalse(_lock_held_elsewhere(spool.paths(msg.id).data))


def _try_lock(path: str, result: multiprocessing.Queue) -> None:
    fd = os.open(path, os.O_RDWR)
    try:
        lock_data_file(fd)
        result.put(False)
    except OSError:
        result.put(True)
    finally:
        os.close(fd)


def _lock_held_elsewhere(path: str) -> bool:
    """Ask a child process whether it can take Exim's lock on *path*."""
    ctx = multiprocessing.get_context("fork")
    result: multiprocessing.Queue = ctx.Queue()
    child = ctx.Process(target=_try_lock, args=(path, result))
    child.start()
    child.join(30)
    return bool(result.get(timeout=5))


def _hold_lock(path: str, ready: multiprocessing.Event, done: multiprocessing.Event) -> None:
    fd = os.open(path, os.O_RDWR)
    lock_data_file(fd)
    ready.set()
    done.wait(30)
    os.close(fd)


# ------------------------------------------------------------------ recovery

class RecoveryTests(unittest.TestCase):
    def setUp(self) -> None:
        self.dir = tempfile.mkdtemp(prefix="spool-recover-")
        self.addCleanup(shutil.rmtree, self.dir, True)

    def crash_leftovers(self, spool: Spool) -> dict[str, str]:
        """A complete message plus what crashes at each step leave."""
        complete = spool_message("1xYM4K-0005lt-35")
        spool.write_message(complete, b"kept\n")
        # Crash after -D was written, before the -H was renamed into place.
        half = spool_message("1xYM4K-0005lt-36")
        paths = spool.paths(half.id)
        with open(paths.data, "wb") as f:
            f.write(b"1xYM4K-0005lt-36-D\npartial")
        with open(paths.temp_header, "wb") as f:
            f.write(format_header_file(half)[:30])
        # Crash during a rewrite of a complete message's header.
        with open(spool.paths(complete.id).temp_header, "wb") as f:
            f.write(b"1xYM4K-0005lt-35-H\nroot")
        # Crash before the -H was even started.
        lone = spool.paths("1xYM4K-0005lt-37")
        with open(lone.data, "wb") as f:
            f.write(b"1xYM4K-0005lt-37-D\n")
        # Crash during a removal (-H, -D gone, journal and msglog left).
        gone = spool.paths("1xYM4K-0005lt-38")
        for p in (gone.journal, gone.msglog):
            with open(p, "wb") as f:
                f.write(b"x\n")
        return {"complete": complete.id, "half": half.id}

    def test_crash_debris_removed(self) -> None:
        spool = Spool(self.dir)
        ids = self.crash_leftovers(spool)
        # Something that is not ours stays.
        other = os.path.join(self.dir, "input", "README")
        with open(other, "w") as f:
            f.write("x")
        report = recovery.recover(spool)
        self.assertEqual(report.kept, [ids["complete"]])
        inp = os.path.join(self.dir, "input")
        self.assertEqual(sorted(os.path.relpath(p, self.dir) for p in report.removed), sorted([
            "input/hdr.1xYM4K-0005lt-35", "input/hdr.1xYM4K-0005lt-36",
            "input/1xYM4K-0005lt-36-D", "input/1xYM4K-0005lt-37-D",
            "input/1xYM4K-0005lt-38-J", "msglog/1xYM4K-0005lt-38"]))
        self.assertEqual(sorted(os.listdir(inp)),
                         ["1xYM4K-0005lt-35-D", "1xYM4K-0005lt-35-H", "README"])
        self.assertEqual(report.busy, [])
        self.assertEqual(spool.read_body(ids["complete"]), b"kept\n")
        # Recovery is idempotent.
        again = recovery.recover(spool)
        self.assertEqual((again.kept, again.removed), ([ids["complete"]], []))

    def test_header_without_data_is_kept(self) -> None:
        spool = Spool(self.dir, split=True)
        msg = spool_message("1xYM4V-0005qW-2d")
        spool.write_message(msg, b"x\n")
        os.unlink(spool.paths(msg.id).data)
        report = recovery.recover(spool)
        self.assertEqual((report.kept, report.missing_data, report.removed),
                         ([msg.id], [msg.id], []))

    def test_split_debris(self) -> None:
        spool = Spool(self.dir, split=True)
        lone = spool.paths("1xYM4V-0005qW-2d")
        os.makedirs(os.path.dirname(lone.data))
        with open(lone.data, "wb") as f:
            f.write(b"1xYM4V-0005qW-2d-D\n")
        self.assertEqual(recovery.recover(spool).removed, [lone.data])

    def test_files_in_use_are_left(self) -> None:
        spool = Spool(self.dir)
        lone = spool.paths("1xYM4K-0005lt-37")
        with open(lone.data, "wb") as f:
            f.write(b"1xYM4K-0005lt-37-D\nstill arriving")
        ctx = multiprocessing.get_context("fork")
        ready, done = ctx.Event(), ctx.Event()
        holder = ctx.Process(target=_hold_lock, args=(lone.data, ready, done))
        holder.start()
        try:
            self.assertTrue(ready.wait(30))
            report = recovery.recover(spool)
            self.assertEqual((report.busy, report.removed), ([lone.data], []))
        finally:
            done.set()
            holder.join(30)
        # Young files are left when min_age asks for it.
        report = recovery.recover(spool, min_age=60)
        self.assertEqual(report.busy, [lone.data])
        report = recovery.recover(spool, min_age=60, now=time.time() + 120)
        self.assertEqual(report.removed, [lone.data])


if __name__ == "__main__":
    unittest.main()
