"""Event actions (twisted_mta.events): the message events a delivery raises,
recorded with an ACL's ``logwrite`` run by ``${acl}`` from ``event_action``,
and one comparison with real Exim 4.96's log for the same configuration."""

from __future__ import annotations

import io
import os
import re
import shutil
import tempfile
import unittest
from typing import Any

from twisted.internet.task import Clock

from tests.test_delivery import MESSAGE_ID, NOW, run
from twisted_mta import events
from twisted_mta.config import parse_config_text
from twisted_mta.expand.context import ExpansionContext
from twisted_mta.log import EximLog, SyncLogWriter
from twisted_mta.queue.address import Host
from twisted_mta.queue.deliver import COMPLETED, INCOMPLETE, DeliverySettings, MessageDelivery
from twisted_mta.spool.message import NOTIFY_NEVER, Recipient, SpoolHeader, SpoolMessage
from twisted_mta.spool.store import Spool

RECORD = "EV $event_name|$event_data|$domain|$local_part|$host|$event_defer_errno"

CONFIG = r"""
primary_hostname = myhost.test.ex
qualify_domain = test.ex
event_action = ${acl{ev}}
begin acl
ev:
  warn logwrite = EV $event_name|$event_data|$domain|$local_part|$host|$event_defer_errno
  accept
begin routers
fails:
  driver = redirect
  allow_fail
  local_parts = gone
  data = :fail: no longer here
remote:
  driver = manualroute
  domains = remote.example
  route_list = * 192.0.2.1
  transport = out
local:
  driver = accept
  domains = test.ex
  transport = record
begin transports
record:
  driver = pipe
  event_action = ${acl{ev}}
out:
  driver = smtp
  event_action = ${acl{ev}}
"""


class LocalTransport:
    """Local parts "later*" defer, "bad*" fail, the others are delivered."""

    local = True

    async def deliver(self, instance: Any, job: Any) -> None:
        for address in job.addresses:
            if address.local_part.startswith("later"):
                address.defer("try again", errno=0)
            elif address.local_part.startswith("bad"):
                address.fail("Child process of record transport returned 1")
            else:
                address.succeed()


class RemoteTransport:
    """An smtp stand-in: "later*" is deferred by the host with ECONNREFUSED,
    the others accepted with a confirmation."""

    local = False

    async def deliver(self, instance: Any, job: Any) -> None:
        host = Host("mx.remote.example", "192.0.2.1", 2525)
        for address in job.addresses:
            if address.local_part.startswith("later"):
                address.defer("Connection refused", errno=111, host=host)
            else:
                address.succeed('250 OK id=xyz', host=host)


class _EventCase(unittest.TestCase):
    config_text = CONFIG

    def setUp(self) -> None:
        self.tmp = tempfile.mkdtemp(prefix="exim-py-events-")
        self.addCleanup(shutil.rmtree, self.tmp, True)
        self.spool = Spool(self.tmp)
        self.clock = Clock()
        self.clock.advance(NOW + 60)
        self.config = parse_config_text(self.config_text)
        self.log_stream = io.StringIO()
        self.log = EximLog.from_config(self.config, self.clock, 4242, SyncLogWriter(),
                                       testing_stream=self.log_stream)
        self.settings = DeliverySettings(
            self.config, self.spool, self.log, self.clock, self.clock, send_dsns=False,
            transports={"pipe": LocalTransport(), "smtp": RemoteTransport()})

    def spool_message(self, *recipients: str | Recipient) -> None:
        message = SpoolMessage(
            id=MESSAGE_ID, sender="sender@example.com", received=(NOW, 0),
            received_complete=(NOW, 100), received_protocol="esmtp",
            recipients=[r if isinstance(r, Recipient) else Recipient(r) for r in recipients],
            headers=[SpoolHeader("Subject: test\n")], deliver_firsttime=True,
            body_linecount=1)
        self.spool.write_message(message, b"body\n")

    def deliver(self) -> Any:
        return run(MessageDelivery(self.settings, MESSAGE_ID).run())

    def lines(self) -> list[str]:
        """The log lines without time stamp and message id: the events and
        the delivery lines around them."""
        return [line[20:].split(" ", 1)[1] for line in self.log_stream.getvalue().splitlines()
                if line[20:].startswith(MESSAGE_ID)]

    def events(self) -> list[str]:
        return [line[3:] for line in self.lines() if line.startswith("EV ")]


class MessageEventTests(_EventCase):

    def test_delivery_then_complete(self) -> None:
        self.spool_message("alice@test.ex", "bob@test.ex")
        self.assertEqual(self.deliver().outcome, COMPLETED)
        self.assertEqual(self.lines(), [
            "=> alice <alice@test.ex> R=local T=record",
            "EV msg:delivery||test.ex|alice||0",
            "=> bob <bob@test.ex> R=local T=record",
            "EV msg:delivery||test.ex|bob||0",
            "Completed",
            # No address is current at the end.
            "EV msg:complete|||||0",
        ])

    def test_local_defer_raises_nothing(self) -> None:
        # Exim raises msg:defer from the smtp transport only.
        self.spool_message("later@test.ex", "alice@test.ex")
        self.assertEqual(self.deliver().outcome, INCOMPLETE)
        self.assertEqual(self.events(), ["msg:delivery||test.ex|alice||0"])

    def test_failures(self) -> None:
        self.spool_message("bad@test.ex", "gone@test.ex")
        self.assertEqual(self.deliver().outcome, COMPLETED)
        self.assertEqual(self.lines(), [
            # Routed in reverse order; the event comes before the ** line.
            "EV msg:fail:internal|no longer here|test.ex|gone||0",
            "** gone@test.ex R=fails: no longer here",
            # A pipe's message is not the event's data.
            "EV msg:fail:delivery||test.ex|bad||0",
            "** bad@test.ex R=local T=record: Child process of record transport returned 1",
            "Completed",
            "EV msg:complete|||||0",
        ])

    def test_notify_never_failure_raised_at_bounce_time(self) -> None:
        self.spool_message(Recipient("bad@test.ex", dsn_flags=NOTIFY_NEVER))
        self.deliver()
        lines = self.lines()
        self.assertIn("EV msg:fail:delivery||test.ex|bad||0", lines)
        self.assertLess(lines.index("** bad@test.ex R=local T=record: Child process of "
                                    "record transport returned 1"),
                        lines.index("EV msg:fail:delivery||test.ex|bad||0"))

    def test_remote_delivery_and_defer(self) -> None:
        self.spool_message("later@remote.example")
        self.deliver()
        # Raised (by the transport in Exim) before the == line.
        self.assertEqual(self.lines(), [
            "EV msg:defer|Connection refused: Connection refused|remote.example|later|"
            "mx.remote.example|111",
            "== later@remote.example R=remote T=out defer (111): Connection refused "
            "H=mx.remote.example [192.0.2.1]: Connection refused"])
        self.spool.remove(MESSAGE_ID)
        self.spool_message("ok@remote.example")
        self.log_stream.truncate(0)
        self.log_stream.seek(0)
        self.deliver()
        self.assertEqual(self.events(), [
            "msg:delivery|250 OK id=xyz|remote.example|ok|mx.remote.example|0",
            "msg:complete|||||0"])

    def test_transport_without_action(self) -> None:
        self.config = parse_config_text(CONFIG.replace("  event_action = ${acl{ev}}\n", ""))
        self.settings.config = self.config
        self.spool_message("alice@test.ex")
        self.deliver()
        # Only the main action's msg:complete is left.
        self.assertEqual(self.events(), ["msg:complete|||||0"])


class OldNameTests(_EventCase):
    config_text = CONFIG.replace(
        "  event_action = ${acl{ev}}\n",
        "  tpda_event_action = ${acl{ev}}\n").replace(
        "warn logwrite = EV $event_name", "warn logwrite = EV $tpda_event_name")

    def test_tpda_names(self) -> None:
        self.spool_message("alice@test.ex")
        self.deliver()
        self.assertEqual(self.events(), ["msg:delivery||test.ex|alice||0",
                                         "msg:complete|||||0"])


class ExpansionFailureTests(_EventCase):
    config_text = CONFIG.replace("event_action = ${acl{ev}}\nbegin acl",
                                 "event_action = ${acl{nosuch}}\nbegin acl")

    def test_failure_logged(self) -> None:
        self.spool_message("alice@test.ex")
        self.assertEqual(self.deliver().outcome, COMPLETED)
        self.assertIn('failed to expand event_action msg:complete in main: '
                      'ERROR from acl "nosuch"', self.lines())


class RaiseApiTests(unittest.TestCase):
    """The API the smtp transport calls for its connection events."""

    def setUp(self) -> None:
        self.config = parse_config_text(
            "begin transports\nout:\n  driver = smtp\n"
            "  event_action = ${if eq{$event_name}{tcp:connect}{refuse $host_address}{}}\n")
        self.ctx = ExpansionContext(config=self.config, variables={"host_address": "192.0.2.9"})

    def test_result_and_errno(self) -> None:
        instance = self.config.transport("out")
        box: list[int] = []
        result = run(events.transport_event(self.ctx, instance, "tcp:connect",
                                            errno_box=box))
        self.assertEqual(result, "refuse 192.0.2.9")
        self.assertEqual(box, [events.ERRNO_EVENT])
        self.assertIsNone(run(events.transport_event(self.ctx, instance, "tcp:close")))
        # The event variables do not outlive the event.
        self.assertNotIn("event_name", self.ctx.variables)

    def test_defer_data(self) -> None:
        self.assertEqual(events.defer_data("msg", 111), "msg: Connection refused")
        self.assertEqual(events.defer_data("msg", -53), "msg")
        self.assertEqual(events.defer_data(None, 111), "Connection refused")
        self.assertIsNone(events.defer_data(None, 0))


# -- against Exim 4.96 ----------------------------------------------------------------

EXIM = "/usr/sbin/exim4"

COMPARE_CONFIG = r"""
spool_directory = @TMP@/spool
log_file_path = @TMP@/log/%slog
deliver_drop_privilege = true
primary_hostname = test.example
qualify_domain = test.example
keep_environment =
event_action = ${acl{ev}}
begin acl
ev:
  warn logwrite = EV $event_name|$event_data|$domain|$local_part|$host|$event_defer_errno
  accept
begin routers
fail:
  driver = redirect
  domains = fail.example
  data = :fail: gone away
  allow_fail
ok:
  driver = accept
  domains = ok.example
  transport = t_ok
later:
  driver = accept
  domains = later.example
  transport = t_defer
bad:
  driver = accept
  domains = bad.example
  transport = t_bad
begin transports
t_ok:
  driver = pipe
  command = /bin/true
  event_action = ${acl{ev}}
t_defer:
  driver = pipe
  command = /bin/sh -c 'exit 75'
  temp_errors = 75
  event_action = ${acl{ev}}
t_bad:
  driver = pipe
  command = /bin/sh -c 'exit 1'
  event_action = ${acl{ev}}
begin retry
* * F,1h,10m
"""


class Exim4ComparisonTests(unittest.TestCase):
    """The same configuration and message through exim4 -odi and exim-py
    -odi: the same events, data and order among the delivery lines."""

    def run_one(self, kind: str, recipients: list[str]) -> list[str]:
        import subprocess

        from tests.daemon import EximPyDaemon, exim_py_environment

        directory = tempfile.mkdtemp(prefix=f"events-{kind}-")
        self.addCleanup(shutil.rmtree, directory, True)
        os.chmod(directory, 0o777)
        config = os.path.join(directory, "configure")
        with open(config, "w") as f:
            f.write(COMPARE_CONFIG.replace("@TMP@", directory))
        if kind == "exim4":
            command, env = [EXIM], {"PATH": "/usr/sbin:/usr/bin:/bin"}
        else:
            command, env = [EximPyDaemon.cli], exim_py_environment()
        subprocess.run([*command, "-C", config, "-odi", "-f", "s@x", *recipients],
                       input=b"Subject: t\n\nbody\n", capture_output=True, timeout=60,
                       env=env, cwd=directory)
        with open(os.path.join(directory, "log", "mainlog")) as f:
            text = f.read()
        lines = []
        ids: dict[str, str] = {}
        for line in text.splitlines():
            match = re.match(r"\S+ \S+ (\w{6}-\w{6}-\w{2}) (.*)", line)
            if match is None or match.group(2).startswith("<="):
                continue
            label = ids.setdefault(match.group(1), f"M{len(ids)}")
            lines.append(f"{label} {match.group(2)}")
        return lines

    def test_same_events_as_exim4(self) -> None:
        if not os.access(EXIM, os.X_OK) or os.geteuid() != 0:
            if os.environ.get("EXIMPY_REQUIRE_PEERS") == "1":
                raise AssertionError(f"{EXIM} (run as root) is needed "
                                     "(EXIMPY_REQUIRE_PEERS=1)")
            self.skipTest(f"{EXIM} run as root is needed")
        for recipients in (["a@ok.example"],
                           ["a@ok.example", "b@later.example", "c@bad.example",
                            "d@fail.example", "e@ok.example"]):
            with self.subTest(recipients=recipients):
                expected = self.run_one("exim4", recipients)
                self.assertTrue(any(" EV " in f" {line}" for line in expected), expected)
                self.assertEqual(self.run_one("exim-py", recipients), expected)
