"""The DSNs exim-py sends (twisted_mta.dsn and its use in
twisted_mta.queue.deliver): each report is built for the situation a
verbatim Exim 4.96 sample (tests/data/dsn/) came from, spooled as exim-py
spools it, and compared with the sample line by line after message ids,
dates and the MIME boundary are normalised.  Also NOTIFY and RET, the
freezing of a failed bounce, the delay warning schedule, and a real Exim
accepting a bounce exim-py made."""

from __future__ import annotations

import io
import os
import random
import re
import shutil
import subprocess
import tempfile
import unittest
from dataclasses import dataclass
from typing import Any

from twisted.internet.task import Clock

from tests.peers import require_program
from tests.test_delivery import run
from twisted_mta.config import parse_config_text
from twisted_mta.dsn import (
    DSN_AWARE,
    HELO_RESPONSE,
    PASS_MESSAGE,
    RETURN_OUTPUT,
    SMTP_GREETING,
    DsnOptions,
    DsnSender,
    Template,
    bounce_dsn,
    delay_text,
    references_header,
    returned_message,
    split_template,
    success_dsn,
    warnings_due,
    wrap_header,
)
from twisted_mta.log import EximLog, SyncLogWriter
from twisted_mta.queue.address import DeliveryAddress, Host
from twisted_mta.queue.deliver import (
    COMPLETED,
    FROZEN,
    INCOMPLETE,
    DeliverySettings,
    MessageDelivery,
)
from twisted_mta.spool.flags import header_flag
from twisted_mta.spool.ids import MessageIdAllocator
from twisted_mta.spool.message import (
    DSN_LASTHOP,
    DSN_RET_FULL,
    DSN_RET_HDRS,
    NOTIFY_DELAY,
    NOTIFY_FAILURE,
    NOTIFY_NEVER,
    NOTIFY_SUCCESS,
    Recipient,
    SpoolHeader,
    SpoolMessage,
)
from twisted_mta.spool.store import Spool
from twisted_mta.submit import Caller

DATA = os.path.join(os.path.dirname(__file__), "data", "dsn")
EXIM = "/usr/sbin/exim4"
ID = re.compile(r"1[0-9A-Za-z]{5}-[0-9A-Za-z]{6}-[0-9A-Za-z]{2}")
DATE = re.compile(r"\w\w\w, \d\d? \w\w\w \d{4} \d\d:\d\d:\d\d [+-]\d{4}")
BOUNDARY = re.compile(r"\d+-eximdsn-\d+")
EXIM_USER = Caller("Debian-exim", 102, 105, "", trusted=True)

BASE_CONFIG = """\
primary_hostname = myhost.test.ex
qualify_domain = test.ex
log_selector = +received_recipients +subject
"""

# The routers of exim-observed.conf, with a recording transport for the
# appendfile and pipe ones.
ROUTERS = r"""
begin routers
fail_it:
  driver = redirect
  local_parts = gone : gone2
  allow_fail
  data = :fail: no longer here
slow:
  driver = redirect
  local_parts = slow
  allow_defer
  data = :defer: mailbox is busy
hidden:
  driver = redirect
  local_parts = hidden
  hide_child_in_errmsg
  data = gone@test.ex
team:
  driver = redirect
  local_parts = team
  data = alice@test.ex, bob@test.ex
local:
  driver = accept
  domains = test.ex
  transport = record
begin transports
record:
  driver = pipe
"""


def normalise(text: str, keep: str = "") -> str:
    """Ids (but *keep*, the original's), dates and boundaries replaced."""
    text = BOUNDARY.sub("BOUNDARY", text)
    text = DATE.sub("DATE", text)
    return ID.sub(lambda m: m.group(0) if m.group(0) == keep else "ID", text)


def envelope(text: str) -> str:
    """The start of a -H file with ids, times and counts replaced."""
    text = re.sub(r"^\d{10} ", "TIME ", normalise(text), flags=re.M)
    return re.sub(r"^(-received_time\S*|-body_linecount|-max_received_linelength) \S+",
                  r"\1 N", text, flags=re.M)


def read_sample(name: str) -> str:
    """A sample without its leading ``#`` comment lines."""
    with open(os.path.join(DATA, name), encoding="latin-1") as f:
        lines = f.read().splitlines(keepends=True)
    while lines and lines[0].startswith("#"):
        lines.pop(0)
    return "".join(lines)


def fragment_lines(name: str) -> list[str]:
    """The non-comment lines of a fragment sample."""
    with open(os.path.join(DATA, name), encoding="latin-1") as f:
        return [line for line in f.read().splitlines() if not line.startswith("#")]


@dataclass
class Sample:
    """A DSN sample and what it says about the message it reports on."""

    text: str
    boundary: str
    sender: str
    headers: list[SpoolHeader]
    body: bytes
    original_id: str


def parse_sample(name: str) -> Sample:
    text = read_sample(name)
    boundary = re.search(r"boundary=(\S+)", text).group(1)
    match = re.search(r"Content-type: (message/rfc822|text/rfc822-headers)\n\n", text)
    returned = text[match.end():text.index(f"\n--{boundary}--")]
    head, _, body = returned.partition("\n\n")
    lines: list[str] = []
    for line in (head + "\n").splitlines(keepends=True):
        if line[0] in " \t":
            lines[-1] += line
        else:
            lines.append(line)
    sender = re.match(r"Return-path: <(.*)>", lines[0]).group(1)
    references = re.search(r"References:.*<E(1[-0-9A-Za-z]{15})@", text).group(1)
    # The header a bounce adds is not the original's.
    headers = [SpoolHeader(h, header_flag(h)) for h in lines[1:]
               if not h.startswith("X-Exim-DSN-Information:")]
    return Sample(text, boundary, sender, headers, body.encode("latin-1"), references)


class FixedRandom(random.Random):
    """Gives the samples' boundary numbers, in turn (the last repeats)."""

    def __init__(self, *values: int) -> None:
        super().__init__(0)
        self.values = list(values)

    def randrange(self, *args: Any, **kwargs: Any) -> int:
        return self.values.pop(0) if len(self.values) > 1 else self.values[0]


class Harness:
    """A spool, a log and a DSN sender, at a given time."""

    def __init__(self, case: unittest.TestCase, now: float, extra_config: str = "",
                 routers: str = ROUTERS, rng: random.Random | None = None) -> None:
        self.tmp = tempfile.mkdtemp(prefix="exim-py-dsn-")
        case.addCleanup(shutil.rmtree, self.tmp, True)
        self.config = parse_config_text(BASE_CONFIG + extra_config + routers)
        self.clock = Clock()
        self.clock.advance(now)
        self.stream = io.StringIO()
        self.log = EximLog.from_config(self.config, self.clock, 4242, SyncLogWriter(),
                                       testing_stream=self.stream)
        self.spool = Spool(self.tmp)
        self.sender = DsnSender(self.config, self.spool, self.log, self.clock,
                                id_allocator=MessageIdAllocator(self.clock.seconds, 4242),
                                caller=EXIM_USER, rng=rng or random.Random(1))

    def original(self, message_id: str, sender: str, headers: list[SpoolHeader],
                 body: bytes = b"body\n", *, received: float | None = None,
                 recipients: list[Recipient] | None = None, **kw: Any) -> SpoolMessage:
        when = int(self.clock.seconds() if received is None else received)
        message = SpoolMessage(id=message_id, sender=sender, received=(when, 0),
                               received_complete=(when, 0), headers=headers,
                               recipients=recipients or [], body_linecount=body.count(b"\n"),
                               **kw)
        self.spool.write_message(message, body)
        return message

    def text(self, message_id: str) -> str:
        """A spooled message as it would be delivered (no Return-path)."""
        message = self.spool.read_header(message_id)
        return ("".join(h.text for h in message.headers if h.flag != "*") + "\n"
                + self.spool.read_body(message_id).decode("latin-1"))

    def log_lines(self) -> list[str]:
        return [line[20:] for line in self.stream.getvalue().splitlines()]


def sample_harness(case: unittest.TestCase, sample: Sample, *more: Sample,
                   **kw: Any) -> Harness:
    """A harness at the time of *sample*, whose reports get the boundaries
    of *sample* and then of *more*."""
    numbers = [int(s.boundary.partition("-eximdsn-")[2]) for s in (sample, *more)]
    return Harness(case, int(sample.boundary.partition("-")[0]),
                   rng=FixedRandom(*numbers), **kw)


def failed(address: str, message: str, *, host: Host | None = None, passable: bool = True,
           **kw: Any) -> DeliveryAddress:
    a = DeliveryAddress(address, **kw)
    a.fail(message, host=host)
    if passable:
        a.extra[PASS_MESSAGE] = True
    return a


class CorpusTests(unittest.TestCase):
    """The reports made for the situations of the Exim 4.96 samples."""

    def assert_same(self, ours: str, sample: Sample, skip_received: bool = False) -> None:
        if skip_received:
            ours = ours.split("\n", 1)[1]
            while ours[0] in " \t":
                ours = ours.split("\n", 1)[1]
        self.assertEqual(normalise(ours, sample.original_id).splitlines(),
                         normalise(sample.text, sample.original_id).splitlines())

    def test_success_local(self) -> None:
        sample = parse_sample("dsn-success-local.eml")
        h = sample_harness(self, sample)
        original = h.original(sample.original_id, sample.sender, sample.headers,
                              dsn_envid="QQ+2B1", dsn_ret=DSN_RET_HDRS)
        good = DeliveryAddress("good@test.ex", orcpt="rfc822;good+2Bx@test.ex",
                               dsn_flags=NOTIFY_SUCCESS)
        good.succeed()
        [new] = run(h.sender.send_success(original, [good]))
        self.assert_same(h.text(new), sample)
        # The note's log line, size included.
        self.assertEqual(h.log_lines(), [
            f"{new} <= <> R={sample.original_id} U=Debian-exim P=local S=1531 "
            'T="Delivery Status Notification" for sender@test.ex'])
        # The -H file has the lines Exim's has for a DSN (-localerror, no
        # -local, no authenticated sender).
        with open(h.spool.locate(new).header, encoding="latin-1") as f:
            ours = f.read().split("\n\n")[0]
        exims = "".join(line + "\n" for line in fragment_lines("exim-dsn-spool-H.txt"))
        self.assertEqual(envelope(ours).splitlines(), envelope(exims).splitlines())

    def test_success_via_smtp_to_non_dsn_host(self) -> None:
        lines = fragment_lines("dsn-success-nondsn-nexthop.eml")
        message = SpoolMessage(id="1xV8Oi-0004FL-2O", sender="sender@test.ex",
                               received=(0, 0), received_complete=(0, 0), dsn_envid="e2")
        options = DsnOptions("Mail Delivery System <Mailer-Daemon@test.ex>",
                             "myhost.test.ex", "myhost.test.ex")
        nd1 = DeliveryAddress("nd1@remote.ex", dsn_flags=NOTIFY_SUCCESS)
        nd1.succeed("250 queued as X", Host("127.0.0.1", "127.0.0.1"))
        nd1.extra[DSN_AWARE] = False
        text = success_dsn(message, [nd1], options, "B")
        status = text.split("Content-type: message/delivery-status\n\n")[1].split("--B")[0]
        self.assertEqual(status.splitlines(), lines + [""])
        self.assertIn("<nd1@remote.ex> (relayed to non-DSN-aware mailer)\n", text)
        # dsn_lasthop, without a host.
        last = DeliveryAddress("l@test.ex", dsn_flags=NOTIFY_SUCCESS | DSN_LASTHOP)
        last.succeed()
        text = success_dsn(message, [last], options, "B")
        self.assertIn("<l@test.ex> (relayed via non DSN router)\n", text)
        self.assertIn("Diagnostic-Code: X-Exim; relayed via non DSN router\n", text)

    def test_no_success_dsn_when_the_next_hop_takes_dsn(self) -> None:
        h = Harness(self, 1_790_000_000)
        original = h.original("1xV8Oi-0004FL-2O", "s@test.ex", [SpoolHeader("Subject: x\n")])
        passed_on = DeliveryAddress("a@remote.ex", dsn_flags=NOTIFY_SUCCESS)
        passed_on.succeed(host=Host("mx", "192.0.2.1"))
        passed_on.extra[DSN_AWARE] = True
        no_notify = DeliveryAddress("b@test.ex", dsn_flags=NOTIFY_FAILURE)
        no_notify.succeed()
        self.assertEqual(run(h.sender.send_success(original, [passed_on, no_notify])), [])
        passed_on.dsn_lasthop = True  # the router says: report here
        self.assertEqual(len(run(h.sender.send_success(original, [passed_on]))), 1)

    def test_failure_bounce(self) -> None:
        sample = parse_sample("dsn-failure-bounce.eml")
        h = sample_harness(self, sample)
        original = h.original(sample.original_id, sample.sender, sample.headers, sample.body,
                              dsn_envid="abc+2Bd", dsn_ret=DSN_RET_FULL)
        host = Host("127.0.0.1", "127.0.0.1")
        r3 = failed("r3@remote.ex", "PRDR error after DATA: 550 third no", host=host)
        r2 = failed("r2@remote.ex", "PRDR error after DATA: 450 second later: retry timeout "
                    "exceeded", host=host)
        outcome = run(h.sender.send_bounces(original, [r3, r2]))
        self.assertEqual(outcome.handled, [r2, r3])
        [new] = outcome.message_ids
        # The sample was kept without its Received: header.
        self.assert_same(h.text(new), sample, skip_received=True)

    def test_dsn_extra_info(self) -> None:
        lines = fragment_lines("dsn-failure-with-dsn-info.eml")
        message = SpoolMessage(id="1xV8Oi-0004FL-2O", sender="CALLER@myhost.test.ex",
                               received=(0, 0), received_complete=(0, 0))
        options = DsnOptions("M", "myhost.test.ex", "myhost.test.ex", extra_info=True)
        user = failed("userx@domain1", "SMTP error from remote mail server after HELO "
                      "the.local.host.name: 550 Go away",
                      host=Host("localhost4.test.ex", "127.0.0.1", port=10001))
        user.extra[SMTP_GREETING] = "220 Connected OK"
        user.extra[HELO_RESPONSE] = "550 Go away\\n550 more lines are dropped"
        text = bounce_dsn(message, [user], message.sender, options, "B", "", with_body=False)
        self.assertIn("\n".join(lines) + "\n\n", text)
        # Port 25 is not shown; a greeting refused has no helo-response.
        del user.extra[HELO_RESPONSE]
        user.extra[SMTP_GREETING] = "550 Go away"
        user.host_used = Host("localhost4.test.ex", "127.0.0.1", port=25)
        text = bounce_dsn(message, [user], message.sender, options, "B", "", with_body=False)
        self.assertIn("Remote-MTA: X-ip; [127.0.0.1]\n"
                      "X-Remote-MTA-smtp-greeting: X-str; 550 Go away\n"
                      "X-Exim-Diagnostic: X-str;", text)
        self.assertNotIn("helo-response", text)
        # Without a host, a passable error still gets X-Exim-Diagnostic.
        local = failed("u@test.ex", "no such user")
        text = bounce_dsn(message, [local], message.sender, options, "B", "", with_body=False)
        self.assertIn("Status: 5.0.0\nX-Exim-Diagnostic: X-str; no such user\n\n", text)
        # And the option is off by default.
        options.extra_info = False
        text = bounce_dsn(message, [user], message.sender, options, "B", "", with_body=False)
        self.assertNotIn("X-ip", text)

    def test_delay_warning(self) -> None:
        sample = parse_sample("dsn-delay-warning.eml")
        h = sample_harness(self, sample, extra_config="delay_warning = 2s : 24h\n")
        original = h.original(sample.original_id, sample.sender, sample.headers,
                              received=h.clock.seconds() - 4, dsn_envid="d1")
        late = DeliveryAddress("late@remote.ex", orcpt="rfc822;late@remote.ex",
                               dsn_flags=NOTIFY_DELAY | NOTIFY_FAILURE)
        late.defer("Connection refused", errno=111)
        new = run(h.sender.send_warning(original, [late]))
        self.assert_same(h.text(new), sample)
        self.assertEqual(original.warning_count, 1)
        self.assertIsNone(run(h.sender.send_warning(original, [late])))


class ObservedTests(unittest.TestCase):
    """Reports compared with what Exim 4.96 sent on this machine for the
    sessions noted in each sample (exim-observed.conf)."""

    def assert_same(self, ours: str, name: str, original_id: str) -> None:
        self.assertEqual(normalise(ours, original_id).splitlines(),
                         normalise(read_sample(name), original_id).splitlines())

    def delivery(self, h: Harness) -> DeliverySettings:
        from tests.test_delivery import RecordingTransport

        self.transport = RecordingTransport()
        return DeliverySettings(h.config, h.spool, h.log, h.clock, h.clock,
                                transports={"pipe": self.transport},
                                dsn=h.sender)

    def test_redirect_success_and_notify_of_the_first_failure(self) -> None:
        sample = parse_sample("exim-redirect-bounce.eml")
        h = sample_harness(self, parse_sample("exim-redirect-success.eml"), sample)
        recipients = [Recipient("team@test.ex", "rfc822;team+2Bx@test.ex", NOTIFY_SUCCESS),
                      Recipient("gone@test.ex", None, NOTIFY_SUCCESS),
                      Recipient("gone2@test.ex", None, NOTIFY_FAILURE)]
        h.original(sample.original_id, sample.sender, sample.headers, dsn_envid="QQ+2B1",
                   dsn_ret=DSN_RET_HDRS, recipients=recipients)
        settings = self.delivery(h)
        settings.deliver_new = lambda message_id: None
        result = run(MessageDelivery(settings, sample.original_id).run())
        self.assertEqual(result.outcome, COMPLETED)
        success, bounce = result.new_messages
        self.assert_same(h.text(success), "exim-redirect-success.eml", sample.original_id)
        self.assert_same(h.text(bounce), "exim-redirect-bounce.eml", sample.original_id)
        # The log as in exim-redirect.log, less the reception and the
        # deliveries of the reports; sizes included.
        exims = [normalise(line[20:], sample.original_id).replace("T=mbox", "T=record")
                 for line in fragment_lines("exim-redirect.log")[1:]]
        exims = [line for line in exims if line.startswith(sample.original_id) or " <= " in line]
        self.assertEqual([normalise(line, sample.original_id) for line in h.log_lines()], exims)

    def test_generated_addresses(self) -> None:
        sample = parse_sample("exim-generated-bounce.eml")
        h = sample_harness(self, sample)
        original = h.original(sample.original_id, sample.sender, sample.headers,
                              dsn_envid="e2", dsn_ret=DSN_RET_FULL)
        piped = DeliveryAddress("piped@test.ex", number=0, orcpt="rfc822;p@test.ex",
                                dsn_flags=NOTIFY_SUCCESS | NOTIFY_FAILURE, router="piped")
        hidden = DeliveryAddress("hidden@test.ex", number=1, router="hidden")
        nobody = failed("nobody@other.ex", "Unrouteable address", number=3,
                        orcpt="rfc822;nobody@other.ex", dsn_flags=NOTIFY_FAILURE)
        pipe = piped.child("|/bin/false", pipe_command="/bin/false", router="piped",
                           transport="pipe_t")
        pipe.fail("Child process of pipe_t transport returned 1 from command: /bin/false",
                  user_message="local delivery failed")
        gone = hidden.child("gone@test.ex", router="fail_it")
        gone.fail("no longer here")
        gone.extra[PASS_MESSAGE] = True
        # The order they failed in: see exim-generated.log.
        outcome = run(h.sender.send_bounces(original, [nobody, gone, pipe]))
        self.assert_same(h.text(outcome.message_ids[0]), "exim-generated-bounce.eml",
                         sample.original_id)
        # The redirected recipient got its success DSN (children never do).
        self.assertEqual(run(h.sender.send_success(original, [pipe])), [])
        [success] = run(h.sender.send_success(original, [piped]))
        self.assert_same(h.text(success), "exim-generated-success.eml", sample.original_id)

    def test_errors_to(self) -> None:
        sample = parse_sample("exim-generated-errors-to.eml")
        h = sample_harness(self, sample)
        original = h.original(sample.original_id, sample.sender, sample.headers,
                              dsn_envid="e2", dsn_ret=DSN_RET_FULL)
        listed = DeliveryAddress("list@test.ex", router="list", errors_to="owner@test.ex")
        gone = listed.child("gone@test.ex", router="fail_it")
        gone.fail("no longer here")
        gone.extra[PASS_MESSAGE] = True
        outcome = run(h.sender.send_bounces(original, [gone]))
        self.assert_same(h.text(outcome.message_ids[0]), "exim-generated-errors-to.eml",
                         sample.original_id)
        self.assertIn('T="Mail delivery failed" for owner@test.ex', h.log_lines()[0])

    def test_delay_warning_with_reason(self) -> None:
        sample = parse_sample("exim-delay-warning.eml")
        h = sample_harness(self, sample, extra_config="delay_warning = 2s : 24h\n")
        recipients = [Recipient("slow@test.ex", "rfc822;slow@test.ex",
                                NOTIFY_DELAY | NOTIFY_FAILURE), Recipient("alice@test.ex")]
        h.original(sample.original_id, sample.sender, sample.headers,
                   received=h.clock.seconds() - 3, dsn_envid="d1", recipients=recipients)
        settings = self.delivery(h)
        settings.deliver_new = lambda message_id: None
        result = run(MessageDelivery(settings, sample.original_id).run())
        self.assertEqual(result.outcome, INCOMPLETE)
        [warning] = result.new_messages
        self.assert_same(h.text(warning), "exim-delay-warning.eml", sample.original_id)
        exims = [normalise(line[20:], sample.original_id).replace("T=mbox", "T=record")
                 for line in fragment_lines("exim-delay.log")[1:]]
        exims = [line for line in exims if line.startswith(sample.original_id) or " <= " in line]
        self.assertEqual([normalise(line, sample.original_id) for line in h.log_lines()], exims)
        # Line 4 of the -H file: "<received time> 1".
        with open(h.spool.locate(sample.original_id).header) as f:
            self.assertEqual(f.read().splitlines()[3], f"{int(h.clock.seconds()) - 3} 1")

    def test_returned_body_limits(self) -> None:
        for name, config, ret, body in (
                ("exim-sizelimit-bounce.eml", "bounce_return_size_limit = 1\n", 0,
                 b"x" * 70 + b"\n"),
                ("exim-nobody-full-bounce.eml", "bounce_return_body = false\n", DSN_RET_FULL,
                 b"short\n"),
                ("exim-nobody-bounce.eml", "bounce_return_body = false\n", 0, b"short\n")):
            with self.subTest(name):
                sample = parse_sample(name)
                h = sample_harness(self, sample, extra_config=config)
                original = h.original(sample.original_id, sample.sender, sample.headers,
                                      body * (130 if len(body) > 10 else 1), dsn_ret=ret)
                gone = failed("gone@test.ex", "no longer here")
                outcome = run(h.sender.send_bounces(original, [gone]))
                self.assert_same(h.text(outcome.message_ids[0]), name, sample.original_id)


class BehaviourTests(unittest.TestCase):

    def setUp(self) -> None:
        self.now = 1_790_000_000
        self.h = Harness(self, self.now)
        self.message = self.h.original("1xa0Ih-00035i-29", "sender@test.ex",
                                       [SpoolHeader("Subject: s\n"),
                                        SpoolHeader("Message-Id: <m@x>\n", "I")])

    def bounce_text(self, message_id: str) -> str:
        return self.h.text(message_id)

    def test_notify_never_and_without_failure(self) -> None:
        never = failed("a@test.ex", "x", dsn_flags=NOTIFY_NEVER)
        success_only = failed("b@test.ex", "x", dsn_flags=NOTIFY_SUCCESS)
        outcome = run(self.h.sender.send_bounces(self.message, [never, success_only]))
        self.assertEqual(outcome.message_ids, [])
        self.assertEqual(outcome.handled, [success_only, never])
        self.assertEqual(self.h.log_lines(), [
            "1xa0Ih-00035i-29 b@test.ex: error ignored: RFC 3461 DSN, failure notify not "
            "requested",
            "1xa0Ih-00035i-29 a@test.ex: error ignored: RFC 3461 DSN, failure notify not "
            "requested"])

    def test_redirect_children_do_not_inherit_notify(self) -> None:
        parent = DeliveryAddress("list@test.ex", dsn_flags=NOTIFY_NEVER,
                                 orcpt="rfc822;list@test.ex", router="team")
        child = parent.child("gone@test.ex")
        child.fail("no longer here")
        outcome = run(self.h.sender.send_bounces(self.message, [child]))
        text = self.bounce_text(outcome.message_ids[0])
        self.assertIn("Final-Recipient: rfc822;list@test.ex\n", text)
        self.assertNotIn("Original-Recipient", text)

    def test_ret_and_return_options(self) -> None:
        gone = failed("gone@test.ex", "no longer here")
        for ret, body_option, expect, info in (
                (0, True, "message/rfc822", False),
                (DSN_RET_FULL, True, "message/rfc822", False),
                (DSN_RET_HDRS, True, "text/rfc822-headers", False),
                (DSN_RET_HDRS, False, "text/rfc822-headers", False),
                (DSN_RET_FULL, False, "text/rfc822-headers", True),
                (0, False, "text/rfc822-headers", False)):
            with self.subTest(ret=ret, bounce_return_body=body_option):
                h = Harness(self, self.now,
                            f"bounce_return_body = {'true' if body_option else 'false'}\n")
                original = h.original("1xa0Ih-00035i-29", "s@test.ex",
                                      [SpoolHeader("Subject: s\n")], b"the body\n",
                                      dsn_ret=ret)
                text = h.text(run(h.sender.send_bounces(original, [gone])).message_ids[0])
                self.assertIn(f"Content-type: {expect}\n\nReturn-path: <s@test.ex>\n", text)
                self.assertEqual("X-Exim-DSN-Information" in text, info)
                self.assertEqual("the body" in text, expect == "message/rfc822")

    def test_long_lines_are_not_returned(self) -> None:
        h = Harness(self, self.now, "bounce_return_linesize_limit = 20\n")
        original = h.original("1xa0Ih-00035i-29", "s@test.ex", [SpoolHeader("Subject: s\n")],
                              max_received_linelength=21)
        gone = failed("gone@test.ex", "no longer here")
        text = h.text(run(h.sender.send_bounces(original, [gone])).message_ids[0])
        self.assertIn("X-Exim-DSN-Information: Due to administrative limits only headers are "
                      "returned\n\n\n--", text)

    def test_texts_of_addresses(self) -> None:
        message = self.message
        options = DsnOptions("M", "myhost.test.ex", "myhost.test.ex")
        remote = failed("u@remote.ex", "SMTP error from remote mail server after RCPT "
                        "TO:<u@remote.ex>: 550 5.1.1 no such user\\nsecond line",
                        host=Host("mx.remote.ex", "192.0.2.1"))
        hidden = failed("x@test.ex", "not shown", passable=False)
        text = bounce_dsn(message, [remote, hidden], "sender@test.ex", options, "B",
                          "R\n", with_body=True)
        self.assertIn("  u@remote.ex\n    host mx.remote.ex [192.0.2.1]\n"
                      "    SMTP error from remote mail server after RCPT TO:<u@remote.ex>:\n"
                      "    550 5.1.1 no such user\n    second line\n  x@test.ex\n\n", text)
        self.assertIn("Diagnostic-Code: smtp; 550 5.1.1 no such user\n second line\n", text)
        # Output a transport caught is quoted (return_output).
        hidden.extra[RETURN_OUTPUT] = "some output\n"
        text = bounce_dsn(message, [remote, hidden], "sender@test.ex", options, "B",
                          "R\n", with_body=True)
        self.assertIn("The following text was generated during the delivery attempt:\n\n"
                      "------ x@test.ex ------\n\nsome output\n\n--B\n", text)
        # The address with output comes first in the report part.
        self.assertLess(text.index("rfc822;x@test.ex"), text.index("rfc822;u@remote.ex"))

    def test_long_diagnostic_is_cut(self) -> None:
        remote = failed("u@remote.ex", "SMTP error: 550 " + "x" * 2000,
                        host=Host("mx", "192.0.2.1"))
        options = DsnOptions("M", "h", "h")
        text = bounce_dsn(self.message, [remote], "sender@test.ex", options, "B", "R\n",
                          with_body=True)
        line = next(li for li in text.splitlines() if li.startswith("Diagnostic-Code"))
        self.assertTrue(line.endswith("x[truncated]"))
        self.assertEqual(len(line), 951 + len("[truncated]"))

    def test_bounce_message_file_and_errors_copy(self) -> None:
        path = os.path.join(self.h.tmp, "bounce.txt")
        with open(path, "w") as f:
            f.write("Subject: Undeliverable for $bounce_recipient\n****\n"
                    "Sorry.\n****\n****\nignored\n")
        h = Harness(self, self.now, f"bounce_message_file = {path}\n"
                    "errors_copy = *@test.ex postmaster@$domain\n"
                    "errors_reply_to = help@test.ex\n")
        original = h.original("1xa0Ih-00035i-29", "s@test.ex", [SpoolHeader("Subject: s\n")])
        gone = failed("gone@test.ex", "no longer here")
        new = run(h.sender.send_bounces(original, [gone])).message_ids[0]
        text = h.text(new)
        self.assertIn("Reply-To: help@test.ex\nAuto-Submitted: auto-replied\n", text)
        self.assertIn("Subject: Undeliverable for s@test.ex\n", text)
        self.assertIn("charset=us-ascii\n\nSorry.\n\n  gone@test.ex\n    no longer here\n\n--",
                      text)
        # Bcc: is taken out and its address becomes a recipient, as with -t.
        self.assertNotIn("Bcc:", text)
        self.assertEqual([r.address for r in h.spool.read_header(new).recipients],
                         ["s@test.ex", "postmaster@test.ex"])

    def test_warn_message_file(self) -> None:
        path = os.path.join(self.h.tmp, "warn.txt")
        with open(path, "w") as f:
            f.write("Subject: late ($warn_message_delay)\n****\nTo $warn_message_recipients:\n"
                    "****\nBye.\n")
        h = Harness(self, self.now, f"warn_message_file = {path}\ndelay_warning = 1h\n")
        original = h.original("1xa0Ih-00035i-29", "s@test.ex", [SpoolHeader("Subject: s\n")],
                              received=self.now - 3700)
        late = DeliveryAddress("late@test.ex")
        late.defer("x")
        text = h.text(run(h.sender.send_warning(original, [late])))
        # The threshold passed, not the time on the queue.
        self.assertIn("Subject: late (60 minutes)\n", text)
        self.assertIn("charset=us-ascii\n\nTo s@test.ex:\n\n  late@test.ex\n\nBye.\n\n--", text)

    def test_references(self) -> None:
        ids = " ".join(f"<r{i}@x>" for i in range(15))
        headers = [SpoolHeader(f"References: {ids}\n"), SpoolHeader("Message-ID: <m@x>\n", "I")]
        kept = " ".join(f"<r{i}@x>" for i in [0] + list(range(4, 15)))
        self.assertEqual(references_header(headers), f"References: {kept} <m@x>\n")
        self.assertEqual(references_header([SpoolHeader("In-Reply-To: (c) <a@b>\n")]),
                         "References: <a@b>\n")
        self.assertEqual(references_header([SpoolHeader("Subject: x\n")]), "")

    def test_wrap_header(self) -> None:
        self.assertEqual(wrap_header("X-Exim-Diagnostic: X-str; SMTP error from remote mail "
                                     "server after HELO the.local.host.name: 550 Go away"),
                         "X-Exim-Diagnostic: X-str; SMTP error from remote mail server after "
                         "HELO\n the.local.host.name: 550 Go away")
        self.assertEqual(wrap_header("H: a\\nb\nc"), "H: a\n b\n c")
        self.assertEqual(wrap_header("H: " + "y" * 100), "H: " + "y" * 76 + "\n " + "y" * 24)
        self.assertEqual(len(wrap_header("H: " + "y " * 1000)), 1023)

    def test_templates(self) -> None:
        self.assertEqual(split_template("a\n****\n****\nb\nc\n"), ["a\n", None, "b\nc\n"])
        template = Template(["x"], present=True)
        self.assertEqual((template.next(), template.next()), ("x", None))

    def test_warning_schedule(self) -> None:
        # The last interval repeats: 1h, 3h, then every 2h.
        self.assertEqual([warnings_due((3600, 10800), t) for t in
                          (0, 3599, 3600, 10799, 10800, 18000, 25200)],
                         [(0, 0), (0, 0), (1, 3600), (1, 3600), (2, 10800), (3, 18000),
                          (4, 25200)])
        self.assertEqual(warnings_due((86400,), 3 * 86400 + 5), (3, 3 * 86400))
        self.assertEqual((delay_text(7199, 3600), delay_text(7200, 7200)),
                         ("60 minutes", "2 hours"))

    def test_returned_message(self) -> None:
        message = SpoolMessage(id="1xa0Ih-00035i-29", sender="s@x", received=(0, 0),
                               received_complete=(0, 0), wireformat=True,
                               headers=[SpoolHeader("A: 1\n"), SpoolHeader("B: 2\n", "*")])
        self.assertEqual(returned_message(message, b"l1\r\nl2\r\n", "X: y"),
                         "Return-path: <s@x>\nA: 1\nX: y\n\nl1\nl2\n")


class DeliveryTests(unittest.TestCase):
    """The reports as deliveries make them (twisted_mta.queue.deliver)."""

    MESSAGE_ID = "1xa0Ih-00035i-29"
    NOW = 1_790_000_000

    def setUp(self) -> None:
        from tests.test_delivery import RecordingTransport

        self.h = Harness(self, self.NOW + 60, "ignore_bounce_errors_after = 1d\n"
                         "delay_warning = 1h : 3h\n")
        self.transport = RecordingTransport()
        self.settings = DeliverySettings(self.h.config, self.h.spool, self.h.log, self.h.clock,
                                         self.h.clock, transports={"pipe": self.transport},
                                         dsn=self.h.sender)

    def spool(self, sender: str, *recipients: Recipient, headers: list[str] = ()) -> None:
        self.h.original(self.MESSAGE_ID, sender,
                        [SpoolHeader("Subject: test\n"), *(SpoolHeader(t) for t in headers)],
                        received=self.NOW, recipients=list(recipients))

    def deliver(self, **kw: Any) -> Any:
        return run(MessageDelivery(self.settings, self.MESSAGE_ID, **kw).run())

    def lines(self) -> list[str]:
        return [normalise(line, self.MESSAGE_ID) for line in self.h.log_lines()]

    def test_bounce_is_spooled_and_delivered(self) -> None:
        self.spool("sender@test.ex", Recipient("gone@test.ex"), Recipient("alice@test.ex"))
        result = self.deliver()
        self.assertEqual(result.outcome, COMPLETED)
        self.assertEqual(self.transport.delivered, ["alice@test.ex", "sender@test.ex"])
        self.assertEqual([re.sub(r"S=\d+", "S=N", line) for line in self.lines()], [
            f"{self.MESSAGE_ID} ** gone@test.ex R=fail_it: no longer here",
            f"{self.MESSAGE_ID} => alice <alice@test.ex> R=local T=record",
            f"ID <= <> R={self.MESSAGE_ID} U=Debian-exim P=local S=N "
            'T="Mail delivery failed: returning message to sender" for sender@test.ex',
            f"{self.MESSAGE_ID} Completed",
            "ID => sender <sender@test.ex> R=local T=record",
            "ID Completed"])
        self.assertEqual(self.h.spool.list_ids(), [])

    def test_queue_only_leaves_the_bounce_queued(self) -> None:
        self.settings.config.main["queue_only"] = True
        self.spool("sender@test.ex", Recipient("gone@test.ex"))
        result = self.deliver()
        self.assertEqual(self.h.spool.list_ids(), result.new_messages)

    def test_success_dsn_for_redirect_and_delivery(self) -> None:
        self.spool("sender@test.ex", Recipient("team@test.ex", None, NOTIFY_SUCCESS),
                   Recipient("carol@test.ex", "rfc822;carol@test.ex", NOTIFY_SUCCESS))
        self.settings.deliver_new = lambda message_id: None
        [new] = self.deliver().new_messages
        text = self.h.text(new)
        self.assertIn("<team@test.ex> (relayed via non \"Remote SMTP\" router)\n\n"
                      "<carol@test.ex> (relayed via non \"Remote SMTP\" router)\n\n", text)
        self.assertNotIn("alice", text.split("text/rfc822-headers")[0])

    def test_failed_bounce_is_frozen(self) -> None:
        # exim-bounce-of-bounce.log, step by step.
        self.spool("", Recipient("gone@test.ex"), Recipient("alice@test.ex"))
        self.assertEqual(self.deliver().outcome, INCOMPLETE)
        self.assertEqual(self.deliver().outcome, FROZEN)
        self.assertEqual(self.deliver(force=True, thaw=True).outcome, INCOMPLETE)
        self.assertEqual(self.deliver(force=True).outcome, FROZEN)
        self.h.clock.advance(86400)
        self.assertEqual(self.deliver().outcome, COMPLETED)
        m = self.MESSAGE_ID
        self.assertEqual(self.lines(), [
            f"{m} ** gone@test.ex R=fail_it: no longer here",
            f"{m} => alice <alice@test.ex> R=local T=record",
            f"{m} Frozen (delivery error message)",
            f"{m} Message is frozen",
            f"{m} Unfrozen by forced delivery",
            f"{m} ** gone@test.ex R=fail_it: no longer here",
            f"{m} Frozen (delivery error message)",
            f"{m} Message is frozen",
            f"{m} Unfrozen by errmsg timer",
            f"{m} ** gone@test.ex R=fail_it: no longer here",
            f"{m} gone@test.ex: error ignored",
            f"{m} Completed"])

    def test_bounce_with_errors_to_is_not_frozen(self) -> None:
        self.spool("", Recipient("gone@test.ex", errors_to="owner@test.ex"))
        result = self.deliver()
        self.assertEqual(result.outcome, COMPLETED)
        self.assertEqual(len(result.new_messages), 1)

    def test_delay_warnings_follow_the_schedule(self) -> None:
        self.spool("sender@test.ex", Recipient("slow@test.ex"))
        self.settings.deliver_new = lambda message_id: None
        sent: list[tuple[int, str]] = []
        for minutes in (30, 61, 120, 181, 240, 301, 420):
            self.h.clock.advance(self.NOW + minutes * 60 - self.h.clock.seconds())
            for new in self.deliver().new_messages:
                subject = next(h.text for h in self.h.spool.read_header(new).headers
                               if h.text.startswith("Subject:"))
                sent.append((minutes, subject.split("delayed ")[1].strip()))
        self.assertEqual(sent, [(61, "60 minutes"), (181, "3 hours"), (301, "5 hours"),
                                (420, "7 hours")])
        self.assertEqual(self.h.spool.read_header(self.MESSAGE_ID).warning_count, 4)

    def test_no_delay_warning(self) -> None:
        for name, recipient, headers in (
                ("NOTIFY=FAILURE", Recipient("slow@test.ex", None, NOTIFY_FAILURE), ()),
                ("NOTIFY=NEVER", Recipient("slow@test.ex", None, NOTIFY_NEVER), ()),
                ("Precedence: bulk", Recipient("slow@test.ex"), ["Precedence: bulk\n"]),
                ("List-Id:", Recipient("slow@test.ex"), ["List-Id: <l.x>\n"]),
                ("Auto-Submitted:", Recipient("slow@test.ex"),
                 ["Auto-Submitted: auto-replied\n"])):
            with self.subTest(name):
                self.h.spool.remove(self.MESSAGE_ID)
                self.h.clock.advance(self.NOW + 7200 - self.h.clock.seconds())
                self.spool("sender@test.ex", recipient, headers=list(headers))
                self.assertEqual(self.deliver().new_messages, [])
        # With NOTIFY=DELAY it is sent.
        self.h.spool.remove(self.MESSAGE_ID)
        self.spool("sender@test.ex", Recipient("slow@test.ex", None, NOTIFY_DELAY))
        self.settings.deliver_new = lambda message_id: None
        self.assertEqual(len(self.deliver().new_messages), 1)

    def test_retry_time_not_reached_sends_no_warning(self) -> None:
        self.spool("sender@test.ex", Recipient("x@test.ex"))
        self.h.clock.advance(7200)
        message = self.h.spool.read_header(self.MESSAGE_ID)
        waiting = DeliveryAddress("x@test.ex")
        waiting.defer("retry time not reached for any host", errno=-54)
        self.assertIsNone(run(self.h.sender.send_warning(message, [waiting])))
        waiting.basic_errno = -52  # routing retry: still a real reason
        self.assertIsNotNone(run(self.h.sender.send_warning(message, [waiting])))


EXIM_CONFIG = """\
primary_hostname = exim.test.ex
qualify_domain = test.ex
spool_directory = {spool}
log_file_path = {spool}/%slog
queue_only
acl_smtp_rcpt = accept
acl_smtp_data = accept
"""


class RealEximTests(unittest.TestCase):
    """A bounce exim-py made, handed to Exim 4.96 as an SMTP client would."""

    def test_exim_accepts_our_bounce(self) -> None:
        require_program(EXIM)
        if os.getuid() != 0:
            raise unittest.SkipTest("exim4 -C needs root")
        sample = parse_sample("dsn-failure-bounce.eml")
        h = sample_harness(self, sample)
        original = h.original(sample.original_id, sample.sender, sample.headers, sample.body,
                              dsn_ret=DSN_RET_FULL)
        gone = failed("r3@remote.ex", "SMTP error from remote mail server after RCPT "
                      "TO:<r3@remote.ex>: 550 no", host=Host("mx.remote.ex", "192.0.2.1"))
        [new] = run(h.sender.send_bounces(original, [gone])).message_ids
        data = h.text(new).encode("latin-1")

        tmp = tempfile.mkdtemp(prefix="exim-py-dsn-peer-")
        self.addCleanup(shutil.rmtree, tmp, True)
        spool = os.path.join(tmp, "spool")
        os.makedirs(spool, mode=0o777)
        os.chmod(tmp, 0o755)
        os.chmod(spool, 0o777)
        conf = os.path.join(tmp, "exim.conf")
        with open(conf, "w") as f:
            f.write(EXIM_CONFIG.format(spool=spool))
        os.chmod(conf, 0o644)
        lines = data.replace(b"\n", b"\r\n").split(b"\r\n")
        stuffed = b"\r\n".join(b"." + li if li.startswith(b".") else li for li in lines)
        session = (b"EHLO client.test.ex\r\nMAIL FROM:<>\r\nRCPT TO:<sender@test.ex>\r\n"
                   b"DATA\r\n" + stuffed.rstrip(b"\r\n") + b"\r\n.\r\nQUIT\r\n")
        done = subprocess.run([EXIM, "-C", conf, "-bs"], input=session, capture_output=True,
                              timeout=60, check=False)
        replies = done.stdout.decode("latin-1").splitlines()
        self.assertTrue(any(r.startswith("250 OK id=") for r in replies), replies)
        with open(os.path.join(spool, "mainlog")) as f:
            log = f.read()
        self.assertRegex(log, rf"{ID.pattern} <= <> U=\S+ P=local-esmtp S=\d+ "
                              rf"id=E{new}@myhost.test.ex\n")
        # Exim reads back the headers we wrote.
        [header] = [n for n in os.listdir(os.path.join(spool, "input")) if n.endswith("-H")]
        with open(os.path.join(spool, "input", header), encoding="latin-1") as f:
            spooled = f.read()
        self.assertIn("X-Failed-Recipients: r3@remote.ex\n", spooled)
        self.assertIn("Auto-Submitted: auto-replied\n", spooled)


if __name__ == "__main__":
    unittest.main()
