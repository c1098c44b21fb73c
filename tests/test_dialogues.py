"""Exim's reference SMTP dialogues replayed against L{ESMTPServer}.

The dialogues in ``tests/data/dialogues/corpus/`` are copied unchanged from
the shared reference corpus (Exim's test suite, re-verified on Exim 4.96);
their format is described in that corpus's README.  Each runs in memory: a
L{StringTransport} for the wire, a L{Clock} for time, a real L{Spool} in a
temporary directory and a thread pool that runs spool writes at once.

The focused tests at the end cover the faults of stock
C{twisted.mail.smtp.ESMTP} the server must not inherit: dropped ESMTP
parameters, reordered pipelined replies, an early answer to a pipelined
QUIT, plaintext kept across STARTTLS, the Received header, and SMTP
smuggling with bare line feeds.
"""

from __future__ import annotations

import io
import os
import re
import shutil
import tempfile
import unittest
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from twisted.internet.testing import StringTransport

from tests.fakes import ImmediateReactor, ImmediateThreadPool
from twisted_mta.config import parse_config_text
from twisted_mta.log import EximLog, SyncLogWriter
from twisted_mta.smtp.server import ConnectionSettings, ESMTPServer
from twisted_mta.spool.ids import MessageIdAllocator
from twisted_mta.spool.store import Spool

DATA = os.path.join(os.path.dirname(__file__), "data", "dialogues")
CORPUS = os.path.join(DATA, "corpus")

# Both message-id layouts the corpus README allows (4.96 and 4.97+).
ID_PATTERN = r"[0-9A-Za-z]{6}-[0-9A-Za-z]{6,11}-[0-9A-Za-z]{2,4}"
START_TIME = 1_700_000_000.0
PID = 4242
CLIENT = ("127.0.0.1", 40123)
LOCAL = ("127.0.0.1", 25)
_STAMP = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d ")
_ANNOTATION = re.compile(r"^(.*?\S)\s{2,}\((.*)\)\s*$")
# Delivery lines need a delivery process, which these tests do not run.
_DELIVERY = re.compile(r"^(\{ID\} )?(=>|->|\*\*|==) ")


# -- the dialogue format --------------------------------------------------------


@dataclass
class Step:
    """One line of a dialogue: C (client sends), S (a server reply line),
    MORE (``S: ...``: the rest of a multi-line reply) or W (a wait)."""

    kind: str
    text: str = ""
    raw: bytes = b""
    prefix: bool = False
    seconds: float = 0.0
    lineno: int = 0


@dataclass
class ExpectLog:
    """An ``expect-log`` header line: the text, how often it must appear,
    whether reception must not be logged, and the sessions it applies to
    (empty: the whole file)."""

    text: str
    count: int | None = None
    no_reception: bool = False
    sessions: tuple[str, ...] = ()


@dataclass
class Session:
    """The steps of one connection, with the ``# ---`` label before it."""

    label: str
    steps: list[Step] = field(default_factory=list)


@dataclass
class Dialogue:
    """A parsed dialogue file."""

    name: str
    sessions: list[Session]
    expect_log: list[ExpectLog]


def unescape(text: str) -> bytes:
    """The bytes a dialogue line stands for: ``\\xNN`` escapes decoded,
    everything else one byte per character."""
    return re.sub(r"\\x([0-9A-Fa-f]{2})", lambda m: chr(int(m.group(1), 16)),
                  text).encode("latin-1")


def _expect_log(label: str, text: str) -> ExpectLog:
    count = None
    no_reception = False
    match = _ANNOTATION.match(text)
    if match:
        text, note = match.group(1), match.group(2)
        if "twice" in note:
            count = 2
        no_reception = "no <= line" in note
    sessions = tuple(label.split("/")) if label else ()
    return ExpectLog(text.strip(), count, no_reception, sessions)


def parse_dialogue(path: str) -> Dialogue:
    """Read a dialogue file.  A new session starts with the first client
    step after a ``221`` reply (the file goes on with a new connection)."""
    sessions: list[Session] = []
    expects: list[ExpectLog] = []
    label = ""
    current: Session | None = None
    closed = False
    with open(path, encoding="latin-1") as f:
        lines = f.read().split("\n")
    for lineno, line in enumerate(lines, 1):
        line = line.rstrip("\r")
        if line.startswith("#"):
            body = line[1:].strip()
            match = re.match(r"expect-log(?: \(([^)]*)\))?:\s?(.*)$", body)
            if match:
                expects.append(_expect_log(match.group(1) or "", match.group(2)))
            elif body.startswith("---"):
                label = body[3:].strip()
            continue
        if not line.strip():
            continue
        kind, _, rest = line.partition(":")
        rest = rest[1:] if rest.startswith(" ") else rest
        if kind == "W":
            step = Step("W", seconds=float(rest), lineno=lineno)
        elif kind == "S" and rest == "...":
            step = Step("MORE", lineno=lineno)
        elif kind in ("C", "S"):
            eol = True
            if rest.endswith("{noeol}"):
                rest, eol = rest[:-len("{noeol}")], False
            prefix = rest.endswith(" *")
            if prefix:
                rest = rest[:-1]
            raw = unescape(rest) + (b"\r\n" if eol else b"")
            step = Step(kind, text=rest, raw=raw, prefix=prefix, lineno=lineno)
        else:
            raise ValueError(f"{path}:{lineno}: unknown line {line!r}")
        if current is None or (closed and kind in ("C", "W")):
            current = Session(label)
            sessions.append(current)
            closed = False
        current.steps.append(step)
        if kind == "S" and rest.startswith("221 "):
            closed = True
    return Dialogue(os.path.basename(path), sessions, expects)


def reply_pattern(expected: str, prefix: bool) -> re.Pattern[str]:
    """A regex for an ``S:`` line: ``{ID}`` is any message id, a prefix
    match allows any tail."""
    parts = [re.escape(part) for part in expected.split("{ID}")]
    return re.compile(ID_PATTERN.join(parts) + ("" if prefix else r"\Z"), re.S)


def log_pattern(expected: str, placeholders: dict[str, str]) -> re.Pattern[str]:
    """A regex for an expect-log line: ``{ID}``, ``{size}`` and the named
    placeholders (``<proxy ip>`` ...) replaced."""
    pattern = re.escape(expected)
    for name, value in placeholders.items():
        pattern = pattern.replace(re.escape(name), re.escape(value))
    pattern = pattern.replace(re.escape("{ID}"), ID_PATTERN)
    pattern = pattern.replace(re.escape("{size}"), r"\d+")
    return re.compile(pattern + r"\Z")


# -- the harness ----------------------------------------------------------------------


class ManualThreadPool(ImmediateThreadPool):
    """Holds "threaded" work until run_pending(), so a test can look at the
    wire while the spool write is still in progress."""

    def __init__(self) -> None:
        self.pending: list[tuple[Any, ...]] = []

    def callInThreadWithCallback(self, on_result: Callable[[bool, Any], None] | None,
                                 f: Callable[..., Any], *args: Any, **kwargs: Any) -> None:
        self.pending.append((on_result, f, args, kwargs))

    def run_pending(self) -> None:
        """Run everything queued so far (and what that queues)."""
        while self.pending:
            on_result, f, args, kwargs = self.pending.pop(0)
            ImmediateThreadPool.callInThreadWithCallback(self, on_result, f, *args, **kwargs)


class TLSRecordingTransport(StringTransport):
    """A StringTransport that records startTLS() instead of doing TLS."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.tls_started: list[Any] = []

    def startTLS(self, context_factory: Any) -> None:
        self.tls_started.append(context_factory)


def load_config(*names: str, extra: str = "") -> Any:
    """std_prefix.conf, then the named files from tests/data/dialogues,
    then *extra* (main options; it goes before any ``begin``)."""
    texts = []
    for name in ("std_prefix.conf", *names):
        with open(os.path.join(DATA, name), encoding="utf-8") as f:
            texts.append(f.read())
    text = "\n".join(texts)
    if extra:
        head, begin, tail = text.partition("\nbegin ")
        text = head + "\n" + extra + "\n" + begin + tail
    return parse_config_text(text)


def config_from_text(text: str, replace: tuple[str, str] | None = None) -> Any:
    """std_prefix.conf followed by *text*; *replace* is an (old, new) pair
    for a line of std_prefix.conf, as an option may not be set twice."""
    with open(os.path.join(DATA, "std_prefix.conf"), encoding="utf-8") as f:
        prefix = f.read()
    if replace is not None:
        old, new = replace
        lines = prefix.split("\n")
        assert old in lines, old
        prefix = "\n".join(new if line == old else line for line in lines)
    return parse_config_text(prefix + "\n" + text)


class Harness:
    """One server, its transport, clock, log stream and spool."""

    def __init__(self, config: Any, spool_dir: str, *, clock: ImmediateReactor | None = None,
                 threadpool: Any = None, tls: Any = None,
                 ids: MessageIdAllocator | None = None,
                 peer: tuple[str, int] = CLIENT, local: tuple[str, int] = LOCAL) -> None:
        self.clock = clock or ImmediateReactor()
        if clock is None:
            self.clock.advance(START_TIME)
        self.log_stream = io.StringIO()
        log = EximLog.from_config(config, self.clock, PID, SyncLogWriter(),
                                  testing_stream=self.log_stream)
        self.spool = Spool(spool_dir)
        self.threadpool = threadpool or ImmediateThreadPool()
        self.settings = ConnectionSettings(
            config, reactor=self.clock, clock=self.clock, log=log, spool=self.spool,
            id_allocator=ids or MessageIdAllocator(self.clock.seconds, PID),
            resolver=None, threadpool=self.threadpool, tls=tls, host_checking=False)
        self.server = ESMTPServer(self.settings, peer=peer, local=local)
        self.transport = TLSRecordingTransport()
        self._read = 0

    def connect(self) -> None:
        """Open the connection (the server may send its banner)."""
        self.server.makeConnection(self.transport)

    def send(self, data: bytes) -> None:
        """The client writes *data* in one packet."""
        self.server.dataReceived(data)

    def output(self) -> bytes:
        """Everything the server wrote since the last call."""
        value = self.transport.value()
        new, self._read = value[self._read:], len(value)
        return new

    def log_lines(self) -> list[str]:
        """The log lines written so far, without their time stamps."""
        return [_STAMP.sub("", line) for line in self.log_stream.getvalue().splitlines()]

    def header_file(self, message_id: str) -> str:
        """The message's -H file."""
        with open(self.spool.header_path(message_id), encoding="latin-1") as f:
            return f.read()

    def data_file(self, message_id: str) -> bytes:
        """The message's -D file."""
        with open(self.spool.data_path(message_id), "rb") as f:
            return f.read()


@dataclass
class DialogueResult:
    """What replaying a dialogue found: mismatches and each session's log."""

    mismatches: list[str]
    logs: list[list[str]]


class DialogueRunner:
    """Replays a dialogue against fresh servers, one per session.

    Consecutive ``C:`` lines go out in one write (one packet); every ``S:``
    line must then be the next reply line the server sent, and no reply
    line may be left over when the client sends again or the session ends.
    """

    def __init__(self, config: Any, spool_dir: str, peer: tuple[str, int] = CLIENT) -> None:
        self.config = config
        self.spool_dir = spool_dir
        self.peer = peer
        self.clock = ImmediateReactor()
        self.clock.advance(START_TIME)
        self.ids = MessageIdAllocator(self.clock.seconds, PID)

    def run(self, dialogue: Dialogue) -> DialogueResult:
        """Replay every session; return the mismatches, reply for reply."""
        mismatches: list[str] = []
        logs: list[list[str]] = []
        for number, session in enumerate(dialogue.sessions, 1):
            where = f"{dialogue.name} session {number}" + (
                f" ({session.label})" if session.label else "")
            harness = Harness(self.config, self.spool_dir, clock=self.clock, ids=self.ids,
                              peer=self.peer)
            mismatches.extend(self._run_session(harness, session, where))
            logs.append(harness.log_lines())
        placeholders = {"<proxy ip>": self.peer[0], "<proxy's source port>": str(self.peer[1]),
                        "<peer port>": str(self.peer[1])}
        for expect in dialogue.expect_log:
            mismatches.extend(self._check_log(expect, dialogue, logs, placeholders))
        return DialogueResult(mismatches, logs)

    def _run_session(self, harness: Harness, session: Session, where: str) -> list[str]:
        mismatches: list[str] = []
        lines: list[str] = []
        partial = b""

        def collect() -> None:
            nonlocal partial
            data = partial + harness.output()
            *complete, partial = data.split(b"\r\n")
            lines.extend(line.decode("latin-1") for line in complete)

        def leftover(before: str) -> None:
            collect()
            while lines:
                mismatches.append(f"{where}: unexpected reply line {lines.pop(0)!r} {before}")

        harness.connect()
        steps = session.steps
        i = 0
        while i < len(steps):
            step = steps[i]
            if step.kind == "C":
                leftover(f"before C: at line {step.lineno}")
                packet = b""
                while i < len(steps) and steps[i].kind == "C":
                    packet += steps[i].raw
                    i += 1
                harness.send(packet)
                continue
            i += 1
            if step.kind == "W":
                leftover(f"before W: at line {step.lineno}")
                harness.clock.advance(step.seconds)
            elif step.kind == "S":
                collect()
                got = lines.pop(0) if lines else None
                if got is None or not reply_pattern(step.text, step.prefix).match(got):
                    mismatches.append(f"{where}: line {step.lineno}: expected "
                                      f"{step.text + ('*' if step.prefix else '')!r}, "
                                      f"got {got!r}")
            else:  # MORE: the rest of a multi-line reply, up to its final line
                collect()
                while lines and lines[0][3:4] == "-":
                    lines.pop(0)
                if lines:
                    lines.pop(0)
                else:
                    mismatches.append(f"{where}: line {step.lineno}: expected the rest of a "
                                      f"multi-line reply, got nothing")
        collect()
        if partial:
            mismatches.append(f"{where}: unterminated reply {partial!r}")
        leftover("at the end")
        return mismatches

    @staticmethod
    def _check_log(expect: ExpectLog, dialogue: Dialogue, logs: list[list[str]],
                   placeholders: dict[str, str]) -> list[str]:
        if _DELIVERY.match(expect.text):
            return []
        pattern = log_pattern(expect.text, placeholders)
        if expect.sessions:
            checks = [(f"session {n} ({s.label})", log)
                      for n, (s, log) in enumerate(zip(dialogue.sessions, logs, strict=True), 1)
                      if any(word in s.label for word in expect.sessions)]
        else:
            checks = [("the dialogue", [line for log in logs for line in log])]
        problems = []
        for what, log in checks:
            found = sum(1 for line in log if pattern.match(line))
            wanted = expect.count
            if (found == 0 if wanted is None else found != wanted):
                problems.append(f"{dialogue.name}: log of {what}: expected "
                                f"{wanted or 'a'} line(s) {expect.text!r}, found {found}; "
                                f"log was {log!r}")
            if expect.no_reception and any(" <= " in f" {line}" for line in log):
                problems.append(f"{dialogue.name}: log of {what}: expected no <= line; "
                                f"log was {log!r}")
        return problems


# -- the dialogues --------------------------------------------------------------------


class _TempDirCase(unittest.TestCase):
    def setUp(self) -> None:
        self.tmp = tempfile.mkdtemp(prefix="exim-py-dialogues-")
        self.addCleanup(shutil.rmtree, self.tmp, True)


class DialogueTests(_TempDirCase):
    """Every corpus dialogue in which exim-py is the server."""

    def replay(self, filename: str, *config_files: str, extra: str = "",
               peer: tuple[str, int] = CLIENT, session: int | None = None) -> DialogueResult:
        """Replay the dialogue (only its *session*th session, counting from
        1, when given) and fail with every mismatch."""
        dialogue = parse_dialogue(os.path.join(CORPUS, filename))
        if session is not None:
            dialogue = Dialogue(dialogue.name, [dialogue.sessions[session - 1]],
                                dialogue.expect_log)
        runner = DialogueRunner(load_config(*config_files, extra=extra), self.tmp, peer)
        result = runner.run(dialogue)
        self.assertEqual(result.mismatches, [], "\n".join(result.mismatches))
        return result

    def test_prdr_01_mixed_per_recipient(self) -> None:
        self.replay("prdr-01-mixed-per-recipient.txt", "prdr.conf")

    def test_prdr_03_single_recipient_no_353(self) -> None:
        self.replay("prdr-03-single-recipient-no-353.txt", "prdr.conf")

    def test_prdr_03_with_single_word_rcpt_acl(self) -> None:
        # Exim's test 5500 really says "acl_smtp_rcpt = accept": an ACL
        # given as a single verb, not a named one.
        dialogue = parse_dialogue(os.path.join(CORPUS, "prdr-03-single-recipient-no-353.txt"))
        with open(os.path.join(DATA, "prdr.conf"), encoding="utf-8") as f:
            text = f.read().replace("acl_smtp_rcpt = rcpt_acl", "acl_smtp_rcpt = accept")
        result = DialogueRunner(config_from_text(text), self.tmp).run(dialogue)
        self.assertEqual(result.mismatches, [], "\n".join(result.mismatches))

    def test_prdr_05_all_refused_550(self) -> None:
        self.replay("prdr-05-all-refused-550.txt", "prdr.conf")

    def test_prdr_07_not_requested_and_helo(self) -> None:
        self.replay("prdr-07-not-requested-and-helo.txt", "prdr.conf")

    def test_dsn_01_not_advertised_by_default(self) -> None:
        self.replay("dsn-01-not-advertised-by-default.txt", "dsn-01.conf")

    def test_dsn_03_parameter_errors(self) -> None:
        self.replay("dsn-03-parameter-errors.txt", "dsn-03.conf")

    def test_proxy_01_v1_accepted(self) -> None:
        self.replay("proxy-01-v1-accepted.txt", "proxy.conf")

    def test_proxy_03_timeout_then_503(self) -> None:
        result = self.replay("proxy-03-timeout-then-503.txt", "proxy.conf")
        # "no log line is written for the failed negotiation"
        self.assertEqual(result.logs, [[]])

    def test_proxy_03_banner_withheld_until_timeout(self) -> None:
        # The default proxy_protocol_timeout is 3s: nothing before it, the
        # banner as soon as it expires.
        harness = Harness(load_config("proxy.conf"), self.tmp)
        harness.connect()
        harness.clock.advance(2.9)
        self.assertEqual(harness.output(), b"")
        harness.clock.advance(0.2)
        self.assertRegex(harness.output(), rb"\A220 myhost\.test\.ex ESMTP [^\r\n]*\r\n\Z")

    # proxy-05 holds five connections; each is its own test so that a
    # difference in one does not hide the others.
    PROXY_05 = "proxy-05-v1-unknown-v2-local-tcp6.txt"

    # "PROXY UNKNOWN": the TCP peer stays the client and, as in Exim 4.96,
    # $proxy_local_address and $proxy_local_port stay unset.
    def test_proxy_05_a_v1_unknown(self) -> None:
        self.replay(self.PROXY_05, "proxy-05.conf", session=1)

    # The same for the v2 LOCAL command.
    def test_proxy_05_b_v2_local(self) -> None:
        self.replay(self.PROXY_05, "proxy-05.conf", session=2)

    def test_proxy_05_c_v1_tcp6(self) -> None:
        self.replay(self.PROXY_05, "proxy-05.conf", session=3)

    # A PROXY header and EHLO in one packet: the EHLO is not input sent
    # before the greeting; the banner comes, then the EHLO's reply.
    def test_proxy_05_d_header_and_command_in_one_packet(self) -> None:
        self.replay(self.PROXY_05, "proxy-05.conf", session=4)

    def test_proxy_05_e_tcp4_keyword_with_ipv6_addresses(self) -> None:
        self.replay(self.PROXY_05, "proxy-05.conf", session=5)


class DialogueFormatTests(unittest.TestCase):
    """The parser reads the corpus as its README describes."""

    def test_sessions_and_noeol(self) -> None:
        dialogue = parse_dialogue(os.path.join(CORPUS, "proxy-05-v1-unknown-v2-local-tcp6.txt"))
        self.assertEqual(len(dialogue.sessions), 5)
        self.assertEqual(dialogue.sessions[1].label, "b) v2 LOCAL (ver/cmd 0x20, fam 0x00, len 0)")
        self.assertEqual(dialogue.sessions[1].steps[0].raw,
                         b"\r\n\r\n\x00\r\nQUIT\n\x20\x00\x00\x00")
        self.assertEqual(dialogue.expect_log[0].sessions, ("UNKNOWN", "LOCAL"))

    def test_trailing_space_and_annotations(self) -> None:
        dialogue = parse_dialogue(os.path.join(CORPUS, "prdr-07-not-requested-and-helo.txt"))
        texts = [s.text for s in dialogue.sessions[0].steps if s.kind == "S"]
        self.assertIn("501 <a@b.c> PRDR: malformed address: PRDR may not follow <a@b.c> ",
                      texts)
        dialogue = parse_dialogue(os.path.join(CORPUS, "prdr-05-all-refused-550.txt"))
        self.assertEqual(dialogue.expect_log,
                         [ExpectLog("{ID} PRDR R=<userz@test.ex> refusal", 2, True)])

    def test_prefix_and_id(self) -> None:
        self.assertTrue(reply_pattern("220 myhost.test.ex ESMTP ", True)
                        .match("220 myhost.test.ex ESMTP Exim 4.96 Mon, 1 Jan 2024"))
        self.assertTrue(reply_pattern("250 OK id={ID}", False).match("250 OK id=1xV8N1-0003LN-10"))
        self.assertFalse(reply_pattern("250 OK id={ID}", False)
                         .match("250 OK id=1xV8N1-0003LN-10 "))


# -- focused tests: faults of stock twisted.mail ESMTP -------------------------------------


class FocusedTests(_TempDirCase):
    """Behaviour stock twisted.mail.smtp.ESMTP gets wrong."""

    RCPT_ACCEPT = "acl_smtp_rcpt = rcpt\nbegin acl\nrcpt:\n  accept\n"

    def start(self, config_text: str, **kwargs: Any) -> Harness:
        harness = Harness(config_from_text(config_text), self.tmp, **kwargs)
        harness.connect()
        self.assertRegex(harness.output(), rb"\A220 ")
        return harness

    def ehlo(self, harness: Harness) -> bytes:
        harness.send(b"EHLO client.test\r\n")
        reply = harness.output()
        self.assertTrue(reply.endswith(b"250 HELP\r\n"), reply)
        return reply

    def message_id(self, reply: bytes) -> str:
        match = re.search(rb"250 OK id=(" + ID_PATTERN.encode() + rb")\r\n", reply)
        self.assertIsNotNone(match, reply)
        return match.group(1).decode()

    def test_esmtp_parameters_reach_the_spool(self) -> None:
        # Stock ESMTP ignores everything after the address; Exim keeps RET,
        # ENVID, NOTIFY and ORCPT in -H (dsn_ret 2 = HDRS; NOTIFY flags
        # SUCCESS 0x04 + FAILURE 0x08 = 12).
        harness = self.start("dsn_advertise_hosts = *\n" + self.RCPT_ACCEPT)
        self.assertIn(b"250-DSN\r\n", self.ehlo(harness))
        harness.send(b"MAIL FROM:<a@b.c> SIZE=100 BODY=8BITMIME RET=HDRS ENVID=abc123\r\n")
        self.assertEqual(harness.output(), b"250 OK\r\n")
        harness.send(b"RCPT TO:<p@test.ex> NOTIFY=SUCCESS,FAILURE ORCPT=rfc822;p@test.ex\r\n")
        self.assertEqual(harness.output(), b"250 Accepted\r\n")
        harness.send(b"DATA\r\n")
        self.assertTrue(harness.output().startswith(b"354 "))
        harness.send(b"Subject: dsn\r\n\r\nbody\r\n.\r\n")
        header = harness.header_file(self.message_id(harness.output()))
        lines = header.split("\n")
        self.assertIn("-dsn_ret 2", lines)
        self.assertIn("-dsn_envid abc123", lines)
        self.assertIn("p@test.ex rfc822;p@test.ex 16,12  0,-1#3", lines)

    def test_pipelined_replies_stay_in_order_with_async_acl(self) -> None:
        # Stock ESMTP answers a command whose validator returns a Deferred
        # after the commands behind it, and DATA then gets a 503.
        harness = self.start("acl_smtp_rcpt = rcpt\nbegin acl\nrcpt:\n"
                             "  accept delay = 1s\n")
        self.ehlo(harness)
        harness.send(b"MAIL FROM:<a@b.c>\r\nRCPT TO:<x@test.ex>\r\n"
                     b"RCPT TO:<y@test.ex>\r\nDATA\r\n")
        replies = harness.output()
        self.assertEqual(replies, b"250 OK\r\n")
        harness.clock.advance(1)
        replies += harness.output()
        self.assertEqual(replies, b"250 OK\r\n250 Accepted\r\n")
        harness.clock.advance(1)
        replies += harness.output()
        self.assertEqual(replies, b"250 OK\r\n250 Accepted\r\n250 Accepted\r\n"
                                  b'354 Enter message, ending with "." on a line by itself\r\n')

    def test_pipelined_quit_answered_after_the_message(self) -> None:
        # Stock ESMTP sends 221 while the message is still being stored.
        pool = ManualThreadPool()
        harness = self.start(self.RCPT_ACCEPT, threadpool=pool)
        self.ehlo(harness)
        harness.send(b"MAIL FROM:<a@b.c>\r\nRCPT TO:<x@test.ex>\r\nDATA\r\n")
        self.assertTrue(harness.output().endswith(b"354 Enter message, ending with \".\" "
                                                  b"on a line by itself\r\n"))
        harness.send(b"Subject: q\r\n\r\nbody\r\n.\r\nQUIT\r\n")
        self.assertEqual(harness.output(), b"")
        self.assertEqual(len(pool.pending), 1)
        pool.run_pending()
        replies = harness.output()
        self.assertRegex(replies, rb"\A250 OK id=" + ID_PATTERN.encode()
                         + rb"\r\n221 myhost\.test\.ex closing connection\r\n\Z")

    def _tls_harness(self, extra: str) -> Harness:
        from twisted_mta.smtp.tlsserver import SessionTLS

        # std_prefix.conf switches STARTTLS advertising off; put it back.
        config = config_from_text(extra + self.RCPT_ACCEPT,
                                  replace=("tls_advertise_hosts =", "tls_advertise_hosts = *"))
        harness = Harness(config, self.tmp, tls=SessionTLS(config))
        harness.connect()
        harness.output()
        self.assertIn(b"250-STARTTLS\r\n", self.ehlo(harness))
        return harness

    def test_starttls_discards_pipelined_plaintext(self) -> None:
        # With synchronisation checks off, STARTTLS+RSET arrives in one
        # packet: the RSET came in plaintext and must never be run, before
        # or after the handshake (CVE-2011-0411).
        harness = self._tls_harness("smtp_enforce_sync = false\n")
        harness.send(b"STARTTLS\r\nRSET\r\n")
        self.assertEqual(harness.output(), b"220 TLS go ahead\r\n")
        self.assertEqual(len(harness.transport.tls_started), 1)
        self.assertEqual(harness.server._buffer, b"")

    def test_starttls_pipelined_is_a_sync_error_by_default(self) -> None:
        # STARTTLS is a synchronising command: with smtp_enforce_sync (the
        # default) pipelined input after it drops the connection.
        harness = self._tls_harness("")
        harness.send(b"STARTTLS\r\nRSET\r\n")
        self.assertEqual(harness.output(), b"554 SMTP synchronization error\r\n")
        self.assertEqual(harness.transport.tls_started, [])

    def test_received_header_is_built(self) -> None:
        # Stock ESMTP's receivedHeader() fails on Python 3; ours must head
        # the -H header section.
        harness = self.start(self.RCPT_ACCEPT)
        self.ehlo(harness)
        harness.send(b"MAIL FROM:<a@b.c>\r\nRCPT TO:<x@test.ex>\r\nDATA\r\n")
        harness.output()
        harness.send(b"Subject: r\r\n\r\nbody\r\n.\r\n")
        header = harness.header_file(self.message_id(harness.output()))
        # Header lines are "NNNF text": length, flag letter, space.
        headers = [line for line in header.split("\n") if re.match(r"\d{3}[ A-Z*] ", line)]
        self.assertTrue(headers, header)
        self.assertTrue(headers[0][5:].startswith("Received: from "), headers[0])
        self.assertEqual(headers[0][3], "P")
        # The default received_header_text: $sender_rcvhost, no host name.
        self.assertEqual(headers[0][5:], "Received: from [127.0.0.1] (helo=client.test)")

    def test_bare_lf_dots_do_not_end_the_message(self) -> None:
        # SMTP smuggling: only CRLF.CRLF ends the data; a dot line next to a
        # bare LF is message text, so the "second message" stays in the body.
        harness = self.start(self.RCPT_ACCEPT)
        self.ehlo(harness)
        harness.send(b"MAIL FROM:<a@b.c>\r\nRCPT TO:<x@test.ex>\r\nDATA\r\n")
        harness.output()
        harness.send(b"Subject: s\r\n\r\nline1\n.\nMAIL FROM:<evil1@x>\r\n"
                     b"line2\r\n.\nMAIL FROM:<evil2@x>\r\n"
                     b"line3\n.\r\nMAIL FROM:<evil3@x>\r\n")
        self.assertEqual(harness.output(), b"")
        harness.send(b"last\r\n.\r\n")
        reply = harness.output()
        body = harness.data_file(self.message_id(reply))
        self.assertEqual(reply.count(b"\r\n"), 1, reply)
        for smuggled in (b"MAIL FROM:<evil1@x>", b"MAIL FROM:<evil2@x>",
                         b"MAIL FROM:<evil3@x>", b"last"):
            self.assertIn(smuggled, body)
