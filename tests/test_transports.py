"""Tests for twisted_mta.transports: the message writer, appendfile, pipe
and lmtp.

Where exim4 (4.96) is installed and we are root, the same message is put
on exim4's spool (``-odq``) and then delivered twice: by exim4 (``-M``)
into one directory, and by our transport, from exim4's own -H and -D
files and the same configuration, into another.  The files must be the
same byte for byte, except for the times in the ``From`` line and the
``Delivery-date:`` header, and the names Maildir files get.  Without
exim4 those tests are skipped, unless EXIMPY_REQUIRE_PEERS=1, when they
fail.

The other tests build a -H and -D file by hand, and run real commands
(``/bin/sh -c "exit 75"``...) and a small LMTP server in the test.
"""

from __future__ import annotations

import glob
import os
import re
import shutil
import signal
import stat
import subprocess
import tempfile
import time
import unittest
from typing import Any

from twisted.internet import defer, reactor, task
from twisted.python.failure import Failure
from twisted.trial import unittest as trial

from tests.fakes import ImmediateReactor, ImmediateThreadPool
from tests.peers import require_program
from twisted_mta.config import parse_config_text
from twisted_mta.expand.context import ExpansionContext
from twisted_mta.queue.address import DEFERRED, DELIVERED, FAILED, DeliveryAddress
from twisted_mta.spool.header import parse_header_file
from twisted_mta.spool.message import SpoolHeader, SpoolMessage
from twisted_mta.taint import Tainted
from twisted_mta.transports import drivers
from twisted_mta.transports.base import TransportJob
from twisted_mta.transports.message import (
    CHUNK_SIZE,
    MessageStream,
    WriteOptions,
    _LineFilter,
    message_size,
    next_chunk,
    read_spooled_body,
    spool_message_size,
    spooled_body,
)
from twisted_mta.transports.process import split_command

EXIM = "/usr/sbin/exim4"
MESSAGE_ID = "1xa0Us-0008Uf-1Q"

HEAD = """\
primary_hostname = test.host
qualify_domain = test.ex
spool_directory = SPOOL
log_file_path = SPOOL/log/%slog
deliver_drop_privilege = true
keep_environment =
spool_wireformat = true
acl_smtp_rcpt = accept
"""


# -- helpers -------------------------------------------------------------------


def config_for(transports: str, routers: dict[str, str] | None = None,
               head: str = HEAD, first_routers: str = "") -> str:
    """A configuration with one accept router per transport, routing the
    local part that is the transport's name to it."""
    names = re.findall(r"^(\w+):\s*$", transports, re.M)
    out = [head, "begin routers\n", first_routers]
    for name in names:
        out.append(f"r_{name}:\n  driver = accept\n  local_parts = {name}\n"
                   f"  transport = {name}\n{(routers or {}).get(name, '')}")
    out.append("begin transports\n")
    out.append(transports)
    return "".join(out)


def message_on_disk(directory: str, body: bytes, headers: list[SpoolHeader] | None = None,
                    sender: str = "snd@test.ex", **kw: Any) -> tuple[SpoolMessage, str]:
    """A SpoolMessage and its -D file, made by hand."""
    if headers is None:
        headers = [SpoolHeader("Subject: hi\n"), SpoolHeader("From: snd@test.ex\n", "F")]
    msg = SpoolMessage(id=MESSAGE_ID, sender=sender, received=(1_700_000_000, 0),
                       received_complete=(1_700_000_000, 5), headers=headers, **kw)
    path = os.path.join(directory, f"{MESSAGE_ID}-D")
    with open(path, "wb") as f:
        f.write(f"{MESSAGE_ID}-D\n".encode() + body)
    return msg, path


def make_job(config: Any, message: SpoolMessage, data_path: str, addresses: list[DeliveryAddress],
             *, the_reactor: Any = None, threadpool: Any = None,
             clock: Any = None) -> TransportJob:
    the_reactor = the_reactor if the_reactor is not None else reactor
    first = addresses[0]
    variables = {
        "local_part": Tainted(first.local_part), "domain": Tainted(first.domain),
        "local_part_prefix": first.prefix, "local_part_suffix": first.suffix,
        "sender_address": message.sender, "message_id": message.id,
    }
    ctx = ExpansionContext(config=config, reactor=the_reactor, variables=variables,
                           threadpool=threadpool)
    return TransportJob(message=message, data_path=data_path, addresses=addresses, ctx=ctx,
                        reactor=the_reactor,
                        threadpool=threadpool if threadpool is not None
                        else the_reactor.getThreadPool(),
                        clock=clock if clock is not None else the_reactor, config=config)


def address_for(config: Any, rcpt: str) -> DeliveryAddress:
    """The address as the test configuration's router would leave it."""
    local = rcpt.split("@")[0]
    router = config.router(f"r_{local}")
    address = DeliveryAddress(Tainted(rcpt), number=0, router=router.name if router else None,
                              transport=local)
    if router is not None:
        for option, target in (("headers_add", address.headers_add),
                               ("headers_remove", address.headers_remove)):
            if router.get(option) is not None:
                target.append(str(router.get(option)))
    return address


async def deliver(config: Any, transport: str, message: SpoolMessage, data_path: str,
                  addresses: list[DeliveryAddress], **kw: Any) -> list[DeliveryAddress]:
    instance = config.transport(transport)
    job = make_job(config, message, data_path, addresses, **kw)
    await drivers()[instance.driver].deliver(instance, job)
    return addresses


_FROM_LINE = re.compile(rb"^From (\S*) \w{3} \w{3} [ \d]\d \d\d:\d\d:\d\d \d{4}(\r?)$", re.M)
_DELIVERY_DATE = re.compile(rb"^Delivery-date: .*?(\r?)$", re.M)


def normalise(data: bytes) -> bytes:
    """Blank out the delivery times."""
    data = _FROM_LINE.sub(rb"From \1 DATE\2", data)
    return _DELIVERY_DATE.sub(rb"Delivery-date: DATE\1", data)


def run_sync(d: defer.Deferred, clock: task.Clock | None = None, limit: int = 1000) -> Any:
    """The result of a Deferred that needs only a Clock to finish."""
    results: list[Any] = []
    d.addBoth(results.append)
    for _ in range(limit):
        if results:
            break
        if clock is None:
            raise AssertionError("Deferred did not fire")
        clock.advance(1)
    if not results:
        raise AssertionError("Deferred did not fire")
    if isinstance(results[0], Failure):
        results[0].raiseException()
    return results[0]


class EximPeer:
    """A temporary directory with exim4's spool, the configuration and two
    output directories: exim's (``OUT`` for exim4) and ours."""

    def __init__(self, transports: str, routers: dict[str, str] | None = None,
                 first_routers: str = "") -> None:
        if os.geteuid() != 0 and os.environ.get("EXIMPY_REQUIRE_PEERS") != "1":
            raise unittest.SkipTest("running exim4 with -C needs root")
        require_program(EXIM)
        self.directory = tempfile.mkdtemp(prefix="transports-")
        os.chmod(self.directory, 0o777)
        self.spool = os.path.join(self.directory, "spool")
        self.exim_out = os.path.join(self.directory, "exim")
        self.our_out = os.path.join(self.directory, "ours")
        self.our_spool = os.path.join(self.directory, "ourspool")
        for d in (self.spool, self.exim_out, self.our_out, self.our_spool):
            os.mkdir(d)
            os.chmod(d, 0o777)
        self.text = config_for(transports, routers, first_routers=first_routers)
        self.conf = os.path.join(self.directory, "exim.conf")
        with open(self.conf, "w") as f:
            f.write(self.text)
        self.config = parse_config_text(self.text, self.conf,
                                        defines={"SPOOL": self.spool, "OUT": self.our_out})

    def cleanup(self) -> None:
        shutil.rmtree(self.directory, ignore_errors=True)

    def exim(self, *args: str, stdin: bytes = b"") -> subprocess.CompletedProcess:
        command = [EXIM, "-C", self.conf, f"-DSPOOL={self.spool}", f"-DOUT={self.exim_out}",
                   *args]
        return subprocess.run(command, input=stdin, capture_output=True, timeout=60,
                              check=False)

    def queue(self, body: bytes, rcpt: str, sender: str = "snd@test.ex") -> str:
        """Put a message on exim4's spool; its id."""
        before = set(self._ids())
        result = self.exim("-odq", "-i", "-f", sender, rcpt, stdin=body)
        assert result.returncode == 0, result.stderr
        new = set(self._ids()) - before
        assert len(new) == 1, new
        return new.pop()

    def queue_chunked(self, body: bytes, rcpt: str, sender: str = "snd@test.ex") -> str:
        """Put a message on exim4's spool by SMTP with BDAT, so that its
        -D file is in wire format (CRLF lines); its id."""
        before = set(self._ids())
        dialogue = (f"EHLO client.test\r\nMAIL FROM:<{sender}>\r\nRCPT TO:<{rcpt}>\r\n"
                    f"BDAT {len(body)} LAST\r\n").encode() + body + b"QUIT\r\n"
        result = self.exim("-odq", "-bs", stdin=dialogue)
        assert b"250 OK id=" in result.stdout, result.stdout
        (new,) = set(self._ids()) - before
        return new

    def _ids(self) -> list[str]:
        return [os.path.basename(p)[:-2]
                for p in glob.glob(os.path.join(self.spool, "input", "*-H"))]

    def our_copy(self, message_id: str) -> tuple[SpoolMessage, str]:
        """exim4's -H file parsed, and a copy of its -D file."""
        with open(os.path.join(self.spool, "input", f"{message_id}-H"), "rb") as f:
            message = parse_header_file(f.read(), expected_id=message_id)
        data = os.path.join(self.our_spool, f"{message_id}-D")
        shutil.copyfile(os.path.join(self.spool, "input", f"{message_id}-D"), data)
        return message, data

    def exim_deliver(self, message_id: str) -> None:
        result = self.exim("-M", message_id)
        assert result.returncode in (0, 1), result.stderr

    def mainlog(self) -> str:
        try:
            with open(os.path.join(self.spool, "log", "mainlog"), encoding="latin-1") as f:
                return f.read()
        except FileNotFoundError:
            return ""

    def log_for(self, message_id: str, marker: str) -> str:
        """The text of exim4's log line for *message_id* starting *marker*
        (``==``, ``**``, ``=>``), from the transport's part on."""
        for line in self.mainlog().splitlines():
            if f" {message_id} {marker} " in line:
                return line.split(f" {message_id} ", 1)[1]
        raise AssertionError(f"no {marker} line for {message_id}:\n{self.mainlog()}")

    async def both(self, transport: str, body: bytes, times: int = 1,
                   **address_kw: Any) -> list[DeliveryAddress]:
        """Deliver the same message(s) with exim4 and with our transport."""
        addresses: list[DeliveryAddress] = []
        for _ in range(times):
            message_id = self.queue(body, f"{transport}@test.ex")
            message, data = self.our_copy(message_id)
            self.exim_deliver(message_id)
            address = address_for(self.config, f"{transport}@test.ex")
            for key, value in address_kw.items():
                setattr(address, key, value)
            await deliver(self.config, transport, message, data, [address])
            addresses.append(address)
            self.last_id = message_id
        return addresses

    def read_both(self, relative: str) -> tuple[bytes, bytes]:
        with open(os.path.join(self.exim_out, relative), "rb") as f:
            theirs = f.read()
        with open(os.path.join(self.our_out, relative), "rb") as f:
            ours = f.read()
        return normalise(theirs), normalise(ours)


BODY = (b"Subject: hi\nX-Foo: bar\nX-Bar: baz\nTo: someone@test.ex\n\n"
        b"body\nFrom x\nFrom\nbo\n.dot\n.\n>From y\n\nFrom z\n")


# -- the message writer ----------------------------------------------------------


class LineFilterTests(unittest.TestCase):
    """check_string/escape_string and line endings, however the data is
    split into chunks."""

    def run_filter(self, data: bytes, sizes: list[int], **kw: Any) -> bytes:
        f = _LineFilter(kw.pop("check", b"From "), kw.pop("escape", b">From "), **kw)
        out, pos = [], 0
        for size in sizes:
            out.append(f.feed(data[pos:pos + size]))
            pos += size
        out.append(f.feed(data[pos:]))
        out.append(f.flush())
        return b"".join(out)

    def test_escaping_independent_of_chunks(self) -> None:
        data = b"From a\nxFrom b\nFrom c\nFro\nFrom\nFrom  d\n"
        expected = b">From a\nxFrom b\n>From c\nFro\nFrom\n>From  d\n"
        for split in range(len(data)):
            for second in (1, 2, 5):
                got = self.run_filter(data, [split, second], crlf=False, strip_cr=False,
                                      line_start=True)
                self.assertEqual(got, expected, (split, second))

    def test_not_at_start_when_mid_line(self) -> None:
        got = self.run_filter(b"From a\nFrom b\n", [], crlf=False, strip_cr=False,
                              line_start=False)
        self.assertEqual(got, b"From a\n>From b\n")

    def test_crlf_and_dots(self) -> None:
        got = self.run_filter(b".a\nb\n..\n", [1], check=b".", escape=b"..", crlf=True,
                              strip_cr=False, line_start=True)
        self.assertEqual(got, b"..a\r\nb\r\n...\r\n")

    def test_wire_format_loses_cr(self) -> None:
        data = b"a\r\nFrom b\r\nc\r\r\n"
        for split in range(len(data)):
            got = self.run_filter(data, [split], crlf=False, strip_cr=True, line_start=True)
            self.assertEqual(got, b"a\n>From b\nc\r\n", split)


class MessageStreamTests(trial.TestCase):
    def setUp(self) -> None:
        self.directory = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, self.directory, True)
        self.config = parse_config_text(config_for("t:\n  driver = appendfile\n"
                                                   "  file = /dev/null\n"))

    def job(self, body: bytes, headers: list[SpoolHeader] | None = None,
            **kw: Any) -> TransportJob:
        message, data = message_on_disk(self.directory, body, headers, **kw)
        address = DeliveryAddress("t@test.ex", number=0)
        return make_job(self.config, message, data, [address],
                        the_reactor=ImmediateReactor(), threadpool=ImmediateThreadPool())

    def test_deleted_headers_and_size(self) -> None:
        from twisted_mta.transports.message import build_headers

        headers = [SpoolHeader("Bcc: x@y\n", "*"), SpoolHeader("Subject: s\n"),
                   SpoolHeader("X-Long: a\n\tb\n")]
        job = self.job(b"line\n", headers)
        instance = self.config.transport("t")
        text = run_sync(defer.Deferred.fromCoroutine(
            build_headers(job, instance, WriteOptions(add_return_path=True), "r@p")))
        self.assertEqual(text, "Return-path: <r@p>\nSubject: s\nX-Long: a\n\tb\n\n")
        # body + blank line + the headers not deleted
        self.assertEqual(spool_message_size(job.message, job.data_path), 5 + 1 + 11 + 13)

    def test_stream_with_limits(self) -> None:
        job = self.job(b"0123456789\n" * 10)
        options = WriteOptions(use_crlf=True, end_dot=True, size_limit=22)
        stream = MessageStream("H: v\n\n", job.data_path, options, before=b"B\n",
                               after=b"A\n")
        data = b"".join(stream)
        self.assertEqual(data, b"B\nH: v\r\n\r\n0123456789\r\n0123456789\r\n.\r\nA\n")
        self.assertEqual(stream.count, len(data))

    def test_headers_only(self) -> None:
        job = self.job(b"body\n")
        stream = MessageStream("H: v\n\n", job.data_path, WriteOptions(no_body=True))
        self.assertEqual(b"".join(stream), b"H: v\n\n")

    def test_big_body_streams_in_chunks(self) -> None:
        body = (b"From here\n" + b"x" * 1000 + b"\n") * 700
        job = self.job(body)
        stream = MessageStream(None, job.data_path, WriteOptions(check_string="From ",
                                                                 escape_string=">From "))
        chunks = list(stream)
        self.assertGreater(len(chunks), 2)
        # Each chunk is bounded: at most a read's worth over CHUNK_SIZE.
        self.assertLess(max(len(c) for c in chunks), 2 * CHUNK_SIZE + 1000)
        self.assertEqual(b"".join(chunks), body.replace(b"From here", b">From here"))
        self.assertEqual(stream.count, len(b"".join(chunks)))

    def test_small_message_is_one_trip_to_the_pool(self) -> None:
        """Headers, body and final dot of a small message come in one
        chunk, and next_chunk knows the end without another trip."""
        job = self.job(b"line\n.dot\n" * 50)
        trips: list[Any] = []
        pool = job.threadpool

        class CountingPool:
            def callInThreadWithCallback(self, *args: Any) -> None:
                trips.append(args[1])
                pool.callInThreadWithCallback(*args)

        job.threadpool = CountingPool()
        options = WriteOptions(use_crlf=True, end_dot=True, check_string=".",
                               escape_string="..")
        stream = MessageStream("H: v\n\n", job.data_path, options)
        chunks = iter(stream)
        got = []
        while (chunk := run_sync(defer.Deferred.fromCoroutine(next_chunk(job, chunks)))):
            got.append(chunk)
        self.assertEqual(got, [b"H: v\r\n\r\n" + b"line\r\n..dot\r\n" * 50 + b".\r\n"])
        self.assertEqual(len(trips), 1)
        self.assertEqual(stream.count, len(got[0]))
        self.assertEqual(stream.newlines, 2 + 100)

    def test_body_given_gives_the_same_bytes(self) -> None:
        """A stream given the body already read writes what it would have
        read from the file (limits, wire format, check strings, a body
        over a chunk), and reads nothing."""
        bodies = [b"", b"a\r\nFrom b\r\n.\r\n", b"line\n.dot\nFrom x\n" * 40,
                  (b"From here\n" + b"x" * 1000 + b"\n") * 300]
        options = [WriteOptions(use_crlf=True, end_dot=True, check_string=".",
                                escape_string=".."),
                   WriteOptions(check_string="From ", escape_string=">From ",
                                size_limit=25),
                   WriteOptions(no_body=True)]
        for body in bodies:
            job = self.job(body)
            for wireformat in (False, True):
                for option in options:
                    read = MessageStream("H: v\n\n", job.data_path, option,
                                         wireformat=wireformat)
                    given = MessageStream("H: v\n\n", "/nonexistent", option,
                                          wireformat=wireformat, body=body)
                    self.assertEqual(b"".join(given), b"".join(read))
                    self.assertEqual((given.count, given.newlines),
                                     (read.count, read.newlines))

    def test_read_spooled_body(self) -> None:
        job = self.job(b"line\n" * 10)
        size = spool_message_size(job.message, job.data_path)
        self.assertEqual(read_spooled_body(job.message, job.data_path, 50),
                         (size, b"line\n" * 10))
        # Too big to keep: the size alone.
        self.assertEqual(read_spooled_body(job.message, job.data_path, 49), (size, None))
        self.assertEqual(message_size(job.message, 50), size)
        with open(job.data_path, "wb") as f:
            f.write(b"not the id line\nline\n")
        self.assertEqual(read_spooled_body(job.message, job.data_path, 50)[1], None)

    def test_spooled_body(self) -> None:
        self.assertEqual(spooled_body(f"{MESSAGE_ID}-D\nbody\n".encode()), b"body\n")
        self.assertEqual(spooled_body(f"{MESSAGE_ID}-D\n".encode()), b"")
        # Not the first line a stream accepts: the stream reads and raises.
        self.assertIsNone(spooled_body(b"x\nbody\n"))
        self.assertIsNone(spooled_body(b"x" * 300 + b"-D\nbody\n"))

    def test_error_after_gathered_pieces(self) -> None:
        """The pieces produced before a failure are still returned, the
        failure coming with the next chunk, as when every piece was a chunk."""
        job = self.job(b"body\n")
        os.unlink(job.data_path)
        chunks = iter(MessageStream("H: v\n\n", job.data_path, WriteOptions(),
                                    before=b"B\n"))
        self.assertEqual(next(chunks), b"B\nH: v\n\n")
        self.assertRaises(FileNotFoundError, next, chunks)
        self.assertRaises(StopIteration, next, chunks)


class SplitCommandTests(unittest.TestCase):
    def test_quotes(self) -> None:
        self.assertEqual(split_command('  /bin/sh -c "exit 75"  '), ["/bin/sh", "-c", "exit 75"])
        self.assertEqual(split_command("a 'b c' \"d\\\"e\\n\" f\"g"),
                         ["a", "b c", 'd"e\n', 'f"g'])


# -- appendfile against exim4 ------------------------------------------------------

APPENDFILE = """\
mbox:
  driver = appendfile
  file = OUT/mbox
  envelope_to_add
  return_path_add
  delivery_date_add
  headers_add = X-Added: $local_part\\nX-Second: two
crlf:
  driver = appendfile
  file = OUT/crlf
  use_crlf
bsmtp:
  driver = appendfile
  file = OUT/bsmtp
  use_bsmtp
  message_prefix = PREFIX\\n
bodyonly:
  driver = appendfile
  file = OUT/bodyonly
  body_only
  message_suffix =
headersonly:
  driver = appendfile
  file = OUT/headersonly
  headers_only
  headers_remove = subject : x-*
  headers_add = X-T: ${local_part}\\nX-U: two
  check_string = bo
  escape_string = XX
escaped:
  driver = appendfile
  file = OUT/escaped
  check_string = bo
  escape_string = XX
  message_prefix = >>> $return_path\\n
  message_suffix = <<<\\n
md:
  driver = appendfile
  directory = OUT/Maildir
  maildir_format
  maildir_tag = ,S=$message_size
  maildir_use_size_file
  quota = 10M
  quota_warn_threshold = 50%
  envelope_to_add
  delivery_date_add
mdq:
  driver = appendfile
  directory = OUT/Maildir2
  maildir_format
  maildir_use_size_file
  quota = 100
mq:
  driver = appendfile
  file = OUT/mboxq
  quota = 100
taint:
  driver = appendfile
  file = OUT/$local_part
notabs:
  driver = appendfile
  file = relative/path
fme:
  driver = appendfile
  file = OUT/nonexist
  file_must_exist
smail:
  driver = appendfile
  directory = OUT/smaildir
  return_path_add
batch:
  driver = appendfile
  file = OUT/batch
  batch_max = 10
  envelope_to_add
  use_bsmtp
mstore:
  driver = appendfile
  directory = OUT/mailstore
  mailstore_format
  mailstore_prefix = PREFIX $local_part
  mailstore_suffix = SUFFIX\n
  envelope_to_add
"""

ROUTER_HEADERS = {name: "  headers_add = X-Router: $local_part\n  headers_remove = to\n"
                  for name in ("mbox", "crlf", "md", "headersonly", "bsmtp")}


class AppendfileAgainstEximTests(trial.TestCase):
    """Files written by exim4 and by our appendfile from the same spool
    files and configuration."""

    def setUp(self) -> None:
        self.peer = EximPeer(APPENDFILE, ROUTER_HEADERS, first_routers=(
            "r_batch_all:\n  driver = accept\n  domains = batch.test\n  transport = batch\n"))
        self.addCleanup(self.peer.cleanup)

    @defer.inlineCallbacks
    def test_batch(self) -> Any:
        rcpts = ["one@batch.test", "two@batch.test", "three@batch.test"]
        before = set(self.peer._ids())
        result = self.peer.exim("-odq", "-i", "-f", "snd@test.ex", *rcpts, stdin=BODY)
        self.assertEqual(result.returncode, 0, result.stderr)
        (message_id,) = set(self.peer._ids()) - before
        message, data = self.peer.our_copy(message_id)
        self.peer.exim_deliver(message_id)
        addresses = [DeliveryAddress(r, number=i, router="r_batch_all", transport="batch")
                     for i, r in enumerate(rcpts)]
        yield deliver(self.peer.config, "batch", message, data, addresses)
        self.assertEqual([a.status for a in addresses], [DELIVERED] * 3)
        theirs, ours = self.peer.read_both("batch")
        self.assertIn(b"Envelope-to: one@batch.test,\n two@batch.test,\n three", ours)
        self.assertEqual(ours, theirs)

    async def check_file(self, transport: str, relative: str, times: int = 1) -> None:
        addresses = await self.peer.both(transport, BODY, times)
        for address in addresses:
            self.assertEqual(address.status, DELIVERED, address.message)
        theirs, ours = self.peer.read_both(relative)
        self.assertEqual(ours, theirs)

    @defer.inlineCallbacks
    def test_mbox(self) -> Any:
        yield defer.ensureDeferred(self.check_file("mbox", "mbox", times=2))
        mode = stat.S_IMODE(os.stat(os.path.join(self.peer.our_out, "mbox")).st_mode)
        self.assertEqual(mode, 0o600)
        self.assertFalse(os.path.exists(os.path.join(self.peer.our_out, "mbox.lock")))

    @defer.inlineCallbacks
    def test_wire_format_spool(self) -> Any:
        body = BODY.replace(b"\n", b"\r\n") + b"no newline at the end"
        for transport in ("crlf", "mbox"):
            message_id = self.peer.queue_chunked(body, f"{transport}@test.ex")
            message, data = self.peer.our_copy(message_id)
            self.assertTrue(message.wireformat)
            self.peer.exim_deliver(message_id)
            address = address_for(self.peer.config, f"{transport}@test.ex")
            yield deliver(self.peer.config, transport, message, data, [address])
            self.assertEqual(address.status, DELIVERED, address.message)
            theirs, ours = self.peer.read_both(transport)
            self.assertEqual(ours, theirs)

    @defer.inlineCallbacks
    def test_crlf(self) -> Any:
        yield defer.ensureDeferred(self.check_file("crlf", "crlf"))

    @defer.inlineCallbacks
    def test_bsmtp(self) -> Any:
        yield defer.ensureDeferred(self.check_file("bsmtp", "bsmtp"))

    @defer.inlineCallbacks
    def test_body_only(self) -> Any:
        yield defer.ensureDeferred(self.check_file("bodyonly", "bodyonly"))

    @defer.inlineCallbacks
    def test_headers_only(self) -> Any:
        yield defer.ensureDeferred(self.check_file("headersonly", "headersonly"))

    @defer.inlineCallbacks
    def test_own_check_string_prefix_and_suffix(self) -> Any:
        yield defer.ensureDeferred(self.check_file("escaped", "escaped"))

    @defer.inlineCallbacks
    def test_maildir(self) -> Any:
        addresses = yield defer.ensureDeferred(self.peer.both("md", BODY, times=2))
        for address in addresses:
            self.assertEqual(address.status, DELIVERED, address.message)
        name = re.compile(r"^(\d+)\.M(\d+)P(\d+)\.test\.host(,S=\d+)$")
        files = {}
        for side in (self.peer.exim_out, self.peer.our_out):
            names = sorted(os.listdir(os.path.join(side, "Maildir", "new")))
            self.assertEqual(len(names), 2)
            tags = []
            for n in names:
                m = name.match(n)
                self.assertIsNotNone(m, n)
                tags.append(m.group(4))
                with open(os.path.join(side, "Maildir", "new", n), "rb") as f:
                    files.setdefault(side, []).append(normalise(f.read()))
            files.setdefault(side + "tags", tags)
            self.assertEqual(os.listdir(os.path.join(side, "Maildir", "tmp")), [])
            self.assertTrue(os.path.isdir(os.path.join(side, "Maildir", "cur")))
        self.assertEqual(sorted(files[self.peer.our_out]), sorted(files[self.peer.exim_out]))
        self.assertEqual(files[self.peer.our_out + "tags"], files[self.peer.exim_out + "tags"])
        theirs, ours = self.peer.read_both("Maildir/maildirsize")
        self.assertEqual(ours, theirs)

    @defer.inlineCallbacks
    def test_maildir_quota(self) -> Any:
        addresses = yield defer.ensureDeferred(self.peer.both("mdq", BODY))
        address = addresses[0]
        self.assertEqual(address.status, DEFERRED)
        self.assertEqual(address.basic_errno, -22)
        self.assertEqual(address.extra["retry_error"], "quota")
        line = self.peer.log_for(self.peer.last_id, "==")
        theirs = re.sub(r"tmp/\S+\)", "tmp/NAME)", line.split(": ", 1)[1])
        self.assertEqual(re.sub(r"tmp/\S+\)", "tmp/NAME)", address.message), theirs)
        self.assertIn("defer (-22)", line)
        theirs, ours = self.peer.read_both("Maildir2/maildirsize")
        self.assertEqual(ours, theirs)
        self.assertEqual(os.listdir(os.path.join(self.peer.our_out, "Maildir2", "tmp")), [])

    async def check_error(self, transport: str, marker: str = "==") -> DeliveryAddress:
        addresses = await self.peer.both(transport, BODY)
        address = addresses[0]
        line = self.peer.log_for(self.peer.last_id, marker)
        errno_part = re.search(r" defer \((-?\d+)\)", line)
        if errno_part is not None:
            self.assertEqual(address.basic_errno, int(errno_part.group(1)), line)
        message = line.split(f"T={transport} ", 1)[1]
        message = re.sub(r"^defer \(-?\d+\): ", "", message)
        message = message.replace(self.peer.exim_out, self.peer.our_out)
        if address.basic_errno > 0:
            message = message.split(": ", 1)[1]
        self.assertEqual(address.message, message)
        self.assertEqual(address.status, DEFERRED if marker == "==" else FAILED)
        return address

    @defer.inlineCallbacks
    def test_mbox_quota(self) -> Any:
        address = yield defer.ensureDeferred(self.check_error("mq"))
        self.assertEqual(address.extra["retry_error"], "quota")
        self.assertEqual(address.user_message, "mailbox is full")
        theirs, ours = self.peer.read_both("mboxq")
        self.assertEqual((ours, theirs), (b"", b""))

    @defer.inlineCallbacks
    def test_tainted_file_name(self) -> Any:
        address = yield defer.ensureDeferred(self.check_error("taint"))
        self.assertTrue(address.extra.get("panic"))

    @defer.inlineCallbacks
    def test_not_absolute(self) -> Any:
        yield defer.ensureDeferred(self.check_error("notabs"))

    @defer.inlineCallbacks
    def test_file_must_exist(self) -> Any:
        yield defer.ensureDeferred(self.check_error("fme"))

    @defer.inlineCallbacks
    def test_plain_directory(self) -> Any:
        addresses = yield defer.ensureDeferred(self.peer.both("smail", BODY))
        self.assertEqual(addresses[0].status, DELIVERED, addresses[0].message)
        contents = []
        for side in (self.peer.exim_out, self.peer.our_out):
            names = os.listdir(os.path.join(side, "smaildir"))
            self.assertEqual(len(names), 1)
            # q${base62:$tod_epoch}-$inode
            self.assertRegex(names[0], r"^q[0-9A-Za-z]{6}-\d+$")
            inode = os.stat(os.path.join(side, "smaildir", names[0])).st_ino
            self.assertEqual(names[0].split("-")[1], str(inode))
            with open(os.path.join(side, "smaildir", names[0]), "rb") as f:
                contents.append(f.read())
        self.assertEqual(contents[1], contents[0])


    @defer.inlineCallbacks
    def test_mailstore(self) -> Any:
        addresses = yield defer.ensureDeferred(self.peer.both("mstore", BODY))
        self.assertEqual(addresses[0].status, DELIVERED, addresses[0].message)
        found = []
        for side in (self.peer.exim_out, self.peer.our_out):
            names = sorted(os.listdir(os.path.join(side, "mailstore")))
            self.assertEqual([n[-4:] for n in names], [".env", ".msg"])
            self.assertRegex(names[0], rf"^{self.peer.last_id}-[0-9A-Za-z]{{6}}\.env$")
            contents = []
            for name in names:
                with open(os.path.join(side, "mailstore", name), "rb") as f:
                    contents.append(normalise(f.read()))
            found.append(contents)
        self.assertEqual(found[1], found[0])

# -- pipe against exim4 ------------------------------------------------------------

PIPES = """\
p75:
  driver = pipe
  command = /bin/sh -c "exit 75"
p1:
  driver = pipe
  command = /bin/sh -c 'exit 1'
p127:
  driver = pipe
  command = /nonexistent/cmd arg1
p130:
  driver = pipe
  command = /bin/sh -c "exit 130"
prel:
  driver = pipe
  command = sh -c "exit 64"
psig:
  driver = pipe
  command = /bin/sh -c "kill -KILL \\\\$\\\\$"
psigterm:
  driver = pipe
  command = /bin/sh -c "kill -TERM \\\\$\\\\$; exit 0"
pfreezesig:
  driver = pipe
  command = /bin/sh -c "kill -KILL \\\\$\\\\$"
  freeze_signal
pbig:
  driver = pipe
  command = /bin/sh -c "yes 0123456789012345678901234567890123456789"
  return_output
  max_output = 100
pret:
  driver = pipe
  command = /bin/sh -c "echo some output; echo more"
  return_output
pout:
  driver = pipe
  command = /bin/sh -c "echo hello world; echo line2; exit 1"
  log_fail_output
ptime:
  driver = pipe
  command = /bin/sleep 10
  timeout = 1s
ptimedefer:
  driver = pipe
  command = /bin/sleep 10
  timeout = 1s
  timeout_defer
pfx:
  driver = pipe
  command = /bin/sh -c "exit 127"
  freeze_exec_fail
pign:
  driver = pipe
  command = /bin/sh -c "exit 3"
  ignore_status
pallow:
  driver = pipe
  command = /bin/sh -c "exit 0"
  allow_commands = /bin/true
prestr:
  driver = pipe
  command = /bin/sh -c "exit 0"
  restrict_to_path
pnf:
  driver = pipe
  command = nosuchcmd
ptaintarg:
  driver = pipe
  command = /bin/echo $local_part
pbadexp:
  driver = pipe
  command = /bin/sh -c "kill -TERM \\\\$\\$"
pshell:
  driver = pipe
  command = echo $pipe_addresses >OUT/shell
  use_shell
pshelltaint:
  driver = pipe
  command = echo $local_part $pipe_addresses >OUT/shell
  use_shell
ptemp:
  driver = pipe
  command = /bin/sh -c "exit 9"
  temp_errors = 8 : 9
penv:
  driver = pipe
  command = /bin/sh -c "env | sort > OUT/env; pwd >> OUT/env; umask >> OUT/env"
  environment = EXTRA=yes : OTHER=$domain
pcat:
  driver = pipe
  command = /bin/sh -c "cat > OUT/pcat"
  envelope_to_add
  return_path_add
  headers_add = X-Pipe: yes
pbsmtp:
  driver = pipe
  command = /bin/sh -c "cat > OUT/pbsmtp"
  use_bsmtp
  use_crlf
"""


class PipeAgainstEximTests(trial.TestCase):
    """The results, messages and bytes of pipe deliveries by exim4 and by
    our pipe transport."""

    timeout = 120

    def setUp(self) -> None:
        self.peer = EximPeer(PIPES)
        self.addCleanup(self.peer.cleanup)

    async def compare(self, transport: str, marker: str) -> DeliveryAddress:
        addresses = await self.peer.both(transport, BODY)
        address = addresses[0]
        status = {"==": DEFERRED, "**": FAILED, "=>": DELIVERED}[marker]
        line = self.peer.log_for(self.peer.last_id, marker)
        self.assertEqual(address.status, status, (address.message, line))
        if marker != "=>":
            message = line.split(f"T={transport}", 1)[1]
            message = re.sub(r"^ defer \(-?\d+\)", "", message)[2:]
            message = message.replace(self.peer.exim_out, self.peer.our_out)
            self.assertEqual(address.message, message)
        return address

    def test_temporary_status(self) -> defer.Deferred:
        return defer.ensureDeferred(self.compare("p75", "=="))

    def test_permanent_status(self) -> defer.Deferred:
        return defer.ensureDeferred(self.compare("p1", "**"))

    @defer.inlineCallbacks
    def test_exec_failure(self) -> Any:
        address = yield defer.ensureDeferred(self.compare("p127", "**"))
        self.assertEqual(address.user_message, "local delivery failed")

    def test_status_over_128(self) -> defer.Deferred:
        return defer.ensureDeferred(self.compare("p130", "**"))

    def test_command_on_path(self) -> defer.Deferred:
        return defer.ensureDeferred(self.compare("prel", "**"))

    def test_signal(self) -> defer.Deferred:
        return defer.ensureDeferred(self.compare("psig", "**"))

    def test_term_is_ignored(self) -> defer.Deferred:
        return defer.ensureDeferred(self.compare("psigterm", "=>"))

    @defer.inlineCallbacks
    def test_freeze_signal(self) -> Any:
        address = yield defer.ensureDeferred(self.compare("pfreezesig", "=="))
        self.assertEqual(address.special_action, "freeze")

    @defer.inlineCallbacks
    def test_too_much_output(self) -> Any:
        address = yield defer.ensureDeferred(self.compare("pbig", "**"))
        self.assertTrue(address.extra["transport_output"].endswith(
            b"\n\n*** Too much output - remainder discarded ***\n"))
        self.assertTrue(address.extra["return_output"])

    @defer.inlineCallbacks
    def test_return_output(self) -> Any:
        address = yield defer.ensureDeferred(self.compare("pret", "**"))
        self.assertEqual(address.extra["transport_output"], b"some output\nmore\n")

    @defer.inlineCallbacks
    def test_log_fail_output(self) -> Any:
        address = yield defer.ensureDeferred(self.compare("pout", "**"))
        line = [ln for ln in self.peer.mainlog().splitlines()
                if f"{self.peer.last_id} <pout@test.ex>" in ln][0]
        self.assertEqual(address.extra["transport_output_log"], line.split(" ", 3)[3])

    def test_timeout(self) -> defer.Deferred:
        return defer.ensureDeferred(self.compare("ptime", "**"))

    def test_timeout_defer(self) -> defer.Deferred:
        return defer.ensureDeferred(self.compare("ptimedefer", "=="))

    @defer.inlineCallbacks
    def test_freeze_exec_fail(self) -> Any:
        address = yield defer.ensureDeferred(self.compare("pfx", "=="))
        self.assertEqual(address.special_action, "freeze")

    def test_ignore_status(self) -> defer.Deferred:
        return defer.ensureDeferred(self.compare("pign", "=>"))

    def test_allow_commands(self) -> defer.Deferred:
        return defer.ensureDeferred(self.compare("pallow", "**"))

    def test_restrict_to_path(self) -> defer.Deferred:
        return defer.ensureDeferred(self.compare("prestr", "**"))

    def test_not_found(self) -> defer.Deferred:
        return defer.ensureDeferred(self.compare("pnf", "**"))

    def test_tainted_argument(self) -> defer.Deferred:
        return defer.ensureDeferred(self.compare("ptaintarg", "**"))

    def test_bad_expansion(self) -> defer.Deferred:
        return defer.ensureDeferred(self.compare("pbadexp", "=="))

    @defer.inlineCallbacks
    def test_shell_with_addresses(self) -> Any:
        yield defer.ensureDeferred(self.compare("pshell", "=>"))
        theirs, ours = self.peer.read_both("shell")
        self.assertEqual(ours, theirs)

    def test_temp_errors(self) -> defer.Deferred:
        return defer.ensureDeferred(self.compare("ptemp", "=="))

    @defer.inlineCallbacks
    def test_environment(self) -> Any:
        yield defer.ensureDeferred(self.compare("penv", "=>"))
        theirs, ours = self.peer.read_both("env")
        theirs = re.sub(rb"MESSAGE_ID=\S+", b"MESSAGE_ID=X", theirs)
        ours = re.sub(rb"MESSAGE_ID=\S+", b"MESSAGE_ID=X", ours)
        self.assertEqual(ours, theirs)

    @defer.inlineCallbacks
    def test_message_bytes(self) -> Any:
        yield defer.ensureDeferred(self.compare("pcat", "=>"))
        theirs, ours = self.peer.read_both("pcat")
        self.assertEqual(ours, theirs)

    @defer.inlineCallbacks
    def test_batched_smtp_bytes(self) -> Any:
        yield defer.ensureDeferred(self.compare("pbsmtp", "=>"))
        theirs, ours = self.peer.read_both("pbsmtp")
        self.assertEqual(ours, theirs)

    def test_shell_with_tainted_string(self) -> defer.Deferred:
        return defer.ensureDeferred(self.compare("pshelltaint", "=="))


# -- lmtp --------------------------------------------------------------------------

LMTP_SERVER = r'''
"""A small LMTP server for the tests: on stdin/stdout, or on a Unix
socket (one connection at a time).  It records what the client sends.
Local parts decide the replies: rcpt5* and rcpt4* are refused at RCPT,
data5* and data4* after the data; "hang" stops answering after DATA."""
import os, socket, sys

record, sock_path = sys.argv[1], (sys.argv[2] if len(sys.argv) > 2 else None)


def serve(rfile, wfile):
    log = open(record, "ab")
    def send(text):
        wfile.write(text.encode() + b"\r\n")
        wfile.flush()
    send("220 test LMTP ready")
    rcpts = []
    while True:
        line = rfile.readline()
        if not line:
            return
        log.write(line)
        log.flush()
        cmd = line.decode("latin-1").rstrip("\r\n")
        verb = cmd.split(" ")[0].upper()
        if verb == "LHLO":
            send("250-test.lmtp\r\n250-PIPELINING\r\n250 IGNOREQUOTA")
        elif verb == "MAIL":
            rcpts = []
            send("250 2.1.0 sender ok")
        elif verb == "RCPT":
            addr = cmd[cmd.index("<") + 1:cmd.index(">")]
            if addr.startswith("rcpt5"):
                send("550 5.1.1 no such user")
            elif addr.startswith("rcpt4"):
                send("451-4.3.0 try\r\n451 4.3.0 later")
            else:
                rcpts.append(addr)
                send("250 2.1.5 ok")
        elif verb == "DATA":
            send("354 go ahead")
            while True:
                data = rfile.readline()
                if not data:
                    return
                log.write(data)
                log.flush()
                if data == b".\r\n":
                    break
            if any(a.startswith("hang") for a in rcpts):
                rfile.readline()
                return
            for addr in rcpts:
                if addr.startswith("data5"):
                    send(f"552 5.2.2 <{addr}> mailbox full")
                elif addr.startswith("data4"):
                    send(f"452 4.2.2 <{addr}> over quota")
                else:
                    send(f"250 2.0.0 <{addr}> delivered")
        elif verb == "QUIT":
            send("221 bye")
            return
        else:
            send("500 what?")


if sock_path is None:
    serve(sys.stdin.buffer, sys.stdout.buffer)
else:
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(sock_path)
    os.chmod(sock_path, 0o777)
    listener.listen(5)
    while True:
        conn, _ = listener.accept()
        with conn:
            f = conn.makefile("rwb")
            serve(f, f)
            try:
                f.close()
            except OSError:
                pass
'''

LMTPS = """\
lmtpcmd:
  driver = lmtp
  command = /usr/bin/python3 SERVER OUT/record
  batch_max = 10
  return_path_add
  timeout = 2s
lmtpsock:
  driver = lmtp
  socket = OUT/socket
  batch_max = 10
  ignore_quota
  timeout = 2s
lmtpnone:
  driver = lmtp
  socket = OUT/nosuchsocket
"""


def lmtp_routers(transport: str) -> str:
    return (f"r_batch_{transport}:\n  driver = accept\n  local_parts = ^(rcpt|data|ok|hang)\n"
            f"  domains = {transport}.test\n  transport = {transport}\n")


class LmtpTests(trial.TestCase):
    """LMTP to a command and to a socket: the dialogue exim4 has with the
    same server, and the per-recipient results."""

    timeout = 120

    def setUp(self) -> None:
        self.peer = EximPeer(LMTPS, first_routers=lmtp_routers("lmtpcmd")
                             + lmtp_routers("lmtpsock"))
        self.addCleanup(self.peer.cleanup)
        self.script = os.path.join(self.peer.directory, "lmtpserver.py")
        with open(self.script, "w") as f:
            f.write(LMTP_SERVER)
        os.chmod(self.script, 0o755)
        self.peer.text = self.peer.text.replace("SERVER", self.script)
        with open(self.peer.conf, "w") as f:
            f.write(self.peer.text)
        self.peer.config = parse_config_text(
            self.peer.text, self.peer.conf,
            defines={"SPOOL": self.peer.spool, "OUT": self.peer.our_out})
        self.servers: list[subprocess.Popen] = []

    def tearDown(self) -> None:
        for server in self.servers:
            os.kill(server.pid, signal.SIGTERM)
            server.wait()

    def start_socket_server(self, out: str) -> None:
        path = os.path.join(out, "socket")
        server = subprocess.Popen(["/usr/bin/python3", self.script, os.path.join(out, "record"),
                                   path])
        self.servers.append(server)
        deadline = time.monotonic() + 10
        while not os.path.exists(path):
            if time.monotonic() > deadline:
                raise AssertionError("LMTP server did not start")
            time.sleep(0.02)

    async def batch(self, transport: str, rcpts: list[str]) -> list[DeliveryAddress]:
        """The same message to *rcpts* in one batch, by exim4 and by us."""
        peer = self.peer
        before = set(peer._ids())
        result = peer.exim("-odq", "-i", "-f", "snd@test.ex", *rcpts, stdin=BODY)
        self.assertEqual(result.returncode, 0, result.stderr)
        (message_id,) = set(peer._ids()) - before
        message, data = peer.our_copy(message_id)
        peer.exim_deliver(message_id)
        peer.last_id = message_id
        addresses = [DeliveryAddress(r, number=i, router=f"r_batch_{transport}",
                                     transport=transport) for i, r in enumerate(rcpts)]
        await deliver(peer.config, transport, message, data, addresses)
        return addresses

    def exim_result(self, rcpt: str) -> tuple[str, str]:
        """(marker, message) of exim4's log line for *rcpt*."""
        for line in self.peer.mainlog().splitlines():
            if f" {self.peer.last_id} " not in line:
                continue
            text = line.split(f" {self.peer.last_id} ", 1)[1]
            marker, rest = text[:2], text[3:]
            if marker in ("=>", "->", "**", "==") and (rest.startswith(rcpt + " ")
                                                       or f"<{rcpt}>" in rest):
                message = rest.split(": ", 1)[1] if ": " in rest else ""
                message = re.sub(r"^defer \(-?\d+\): ", "", message)
                return marker, message
        raise AssertionError(f"no line for {rcpt}:\n{self.peer.mainlog()}")

    async def check_batch(self, transport: str, rcpts: list[str]) -> list[DeliveryAddress]:
        addresses = await self.batch(transport, rcpts)
        status = {"=>": DELIVERED, "->": DELIVERED, "**": FAILED, "==": DEFERRED}
        for address in addresses:
            marker, message = self.exim_result(address.address)
            self.assertEqual(address.status, status[marker], (address.address, address.message))
            if marker in ("**", "=="):
                self.assertEqual(address.message, message)
        theirs, ours = self.peer.read_both("record")
        theirs = theirs.replace(self.peer.exim_out.encode(), self.peer.our_out.encode())
        self.assertEqual(ours, theirs)
        return addresses

    @defer.inlineCallbacks
    def test_command(self) -> Any:
        rcpts = ["ok1@lmtpcmd.test", "rcpt5@lmtpcmd.test", "rcpt4@lmtpcmd.test",
                 "data5@lmtpcmd.test", "data4@lmtpcmd.test", "ok2@lmtpcmd.test"]
        addresses = yield defer.ensureDeferred(self.check_batch("lmtpcmd", rcpts))
        ok = addresses[0]
        self.assertEqual(ok.confirmation, "250 2.0.0 <ok1@lmtpcmd.test> delivered")
        self.assertTrue(ok.extra["lmtp"])
        self.assertEqual(addresses[2].basic_errno, -44)
        self.assertEqual(addresses[2].more_errno, 51 << 8)
        self.assertEqual(addresses[4].basic_errno, -46)

    @defer.inlineCallbacks
    def test_socket(self) -> Any:
        self.start_socket_server(self.peer.exim_out)
        self.start_socket_server(self.peer.our_out)
        rcpts = ["ok1@lmtpsock.test", "rcpt5@lmtpsock.test", "data4@lmtpsock.test"]
        yield defer.ensureDeferred(self.check_batch("lmtpsock", rcpts))

    @defer.inlineCallbacks
    def test_timeout(self) -> Any:
        self.start_socket_server(self.peer.exim_out)
        self.start_socket_server(self.peer.our_out)
        rcpts = ["ok1@lmtpsock.test", "hang@lmtpsock.test"]
        addresses = yield defer.ensureDeferred(self.check_batch("lmtpsock", rcpts))
        self.assertRegex(addresses[0].message,
                         r"^LMTP timeout after end of data \(\d+ bytes written\)$")

    @defer.inlineCallbacks
    def test_no_socket(self) -> Any:
        addresses = yield defer.ensureDeferred(self.peer.both("lmtpnone", BODY))
        line = self.peer.log_for(self.peer.last_id, "==")
        self.assertEqual(addresses[0].status, DEFERRED)
        self.assertEqual(addresses[0].message, line.split(": ", 1)[1].replace(
            self.peer.exim_out, self.peer.our_out))


# -- without exim4 -----------------------------------------------------------------


class _Local:
    """A configuration and a hand-made message in a temporary directory."""

    def __init__(self, transports: str, body: bytes = b"line 1\nFrom me\n") -> None:
        self.directory = tempfile.mkdtemp(prefix="transports-")
        self.out = os.path.join(self.directory, "out")
        os.mkdir(self.out)
        self.text = config_for(transports)
        self.config = parse_config_text(self.text, defines={"SPOOL": self.directory,
                                                            "OUT": self.out})
        self.message, self.data = message_on_disk(self.directory, body)

    def address(self, transport: str, **kw: Any) -> DeliveryAddress:
        address = DeliveryAddress(Tainted(f"{transport}@test.ex"), number=0,
                                  router=f"r_{transport}", transport=transport)
        for key, value in kw.items():
            setattr(address, key, value)
        return address

    async def deliver(self, transport: str, *addresses: DeliveryAddress,
                      **kw: Any) -> DeliveryAddress:
        addresses = addresses or (self.address(transport),)
        await deliver(self.config, transport, self.message, self.data, list(addresses), **kw)
        return addresses[0]

    def on_clock(self, transport: str, clock: task.Clock,
                 address: DeliveryAddress | None = None) -> DeliveryAddress:
        """Deliver with everything on a Clock (for the waits between tries)."""
        address = address or self.address(transport)
        d = defer.Deferred.fromCoroutine(deliver(
            self.config, transport, self.message, self.data, [address],
            the_reactor=clock, threadpool=ImmediateThreadPool(), clock=clock))
        run_sync(d, clock)
        return address

    def read(self, name: str) -> bytes:
        with open(os.path.join(self.out, name), "rb") as f:
            return f.read()


LOCAL_APPENDFILE = """\
mbox:
  driver = appendfile
  file = OUT/mbox
  lock_retries = 3
  lock_interval = 5s
flockbox:
  driver = appendfile
  file = OUT/flockbox
  use_flock_lock
  no_use_lockfile
  lock_retries = 2
  lock_interval = 1s
stale:
  driver = appendfile
  file = OUT/stale
  lockfile_timeout = 10s
narrow:
  driver = appendfile
  file = OUT/narrow
link:
  driver = appendfile
  file = OUT/link
linkok:
  driver = appendfile
  file = OUT/linkok
  allow_symlink
  check_owner = false
owner:
  driver = appendfile
  file = OUT/owner
dir:
  driver = appendfile
  directory = OUT/Maildir
  maildir_format
warn:
  driver = appendfile
  file = OUT/warn
  quota = 1000
  quota_warn_threshold = 5%
home:
  driver = appendfile
  file = OUT/elsewhere/box
  create_file = inhome
  home_directory = OUT/home
addressfile:
  driver = appendfile
big:
  driver = appendfile
  file = OUT/big
  message_size_limit = 10
"""


class AppendfileTests(trial.TestCase):
    """Locking, ownership and the other checks, on a hand-made message."""

    timeout = 60

    def setUp(self) -> None:
        self.local = _Local(LOCAL_APPENDFILE)
        self.addCleanup(shutil.rmtree, self.local.directory, True)

    def test_lock_file_held(self) -> None:
        lock = os.path.join(self.local.out, "mbox.lock")
        open(lock, "w").close()
        clock = ImmediateReactor()
        address = self.local.on_clock("mbox", clock)
        self.assertEqual(address.status, DEFERRED)
        self.assertEqual(address.message,
                         f"failed to lock mailbox {self.local.out}/mbox (lock file)")
        self.assertEqual(address.basic_errno, -9)
        self.assertEqual(clock.seconds(), 10)       # two waits of lock_interval
        self.assertTrue(os.path.exists(lock))
        self.assertEqual([n for n in os.listdir(self.local.out) if "mbox" in n], ["mbox.lock"])

    def test_stale_lock_file_removed(self) -> None:
        lock = os.path.join(self.local.out, "stale.lock")
        open(lock, "w").close()
        os.utime(lock, (time.time() - 100, time.time() - 100))
        # lockfile_timeout looks at the ctime, which utime() cannot set back:
        # so the lock is only seen as stale by a clock 100s on.
        real = time.time
        try:
            time.time = lambda: real() + 100    # type: ignore[assignment]
            address = self.local.on_clock("stale", ImmediateReactor())
        finally:
            time.time = real                    # type: ignore[assignment]
        self.assertEqual(address.status, DELIVERED, address.message)
        self.assertFalse(os.path.exists(lock))

    def test_flock_held(self) -> None:
        import fcntl

        path = os.path.join(self.local.out, "flockbox")
        with open(path, "w") as holder:
            os.chmod(path, 0o600)
            fcntl.flock(holder.fileno(), fcntl.LOCK_EX)
            clock = ImmediateReactor()
            address = self.local.on_clock("flockbox", clock)
        self.assertEqual(address.status, DEFERRED)
        self.assertEqual(address.message, f"failed to lock mailbox {path} (fcntl/flock)")

    @defer.inlineCallbacks
    def test_concurrent_deliveries(self) -> Any:
        deliveries = [defer.ensureDeferred(self.local.deliver("mbox")) for _ in range(8)]
        results = yield defer.gatherResults(deliveries)
        for address in results:
            self.assertEqual(address.status, DELIVERED, address.message)
        data = self.local.read("mbox")
        self.assertEqual(data.count(b"\nline 1\n>From me\n\n"), 8)
        self.assertEqual(len(re.findall(rb"^From snd@test.ex ", data, re.M)), 8)

    @defer.inlineCallbacks
    def test_mode_reduced_or_refused(self) -> Any:
        path = os.path.join(self.local.out, "narrow")
        open(path, "w").close()
        os.chmod(path, 0o644)
        address = yield defer.ensureDeferred(self.local.deliver("narrow"))
        self.assertEqual(address.status, DELIVERED, address.message)
        self.assertEqual(stat.S_IMODE(os.stat(path).st_mode), 0o600)
        os.chmod(path, 0o400)
        address = yield defer.ensureDeferred(self.local.deliver("narrow"))
        self.assertEqual(address.message,
                         f"mailbox {path} has the wrong mode 400 (600 expected)")
        self.assertEqual(address.basic_errno, -7)

    @defer.inlineCallbacks
    def test_symlinks(self) -> Any:
        target = os.path.join(self.local.out, "target")
        open(target, "w").close()
        os.chmod(target, 0o600)
        os.symlink(target, os.path.join(self.local.out, "link"))
        os.symlink(target, os.path.join(self.local.out, "linkok"))
        address = yield defer.ensureDeferred(self.local.deliver("link"))
        self.assertEqual(address.message,
                         f"mailbox {self.local.out}/link is not a regular file")
        address = yield defer.ensureDeferred(self.local.deliver("linkok"))
        self.assertEqual(address.status, DELIVERED, address.message)
        self.assertIn(b"line 1", self.local.read("target"))

    @defer.inlineCallbacks
    def test_wrong_owner(self) -> Any:
        if os.geteuid() != 0:
            raise unittest.SkipTest("needs root to give a file away")
        path = os.path.join(self.local.out, "owner")
        open(path, "w").close()
        os.chmod(path, 0o600)
        os.chown(path, 65534, 65534)
        address = yield defer.ensureDeferred(self.local.deliver("owner"))
        self.assertEqual(address.message, f"mailbox {path} has wrong uid (65534 != 0)")
        self.assertEqual(address.basic_errno, -6)

    @defer.inlineCallbacks
    def test_maildir_names_are_unique(self) -> Any:
        deliveries = [defer.ensureDeferred(self.local.deliver("dir")) for _ in range(20)]
        results = yield defer.gatherResults(deliveries)
        self.assertTrue(all(a.status == DELIVERED for a in results))
        names = os.listdir(os.path.join(self.local.out, "Maildir", "new"))
        self.assertEqual(len(set(names)), 20)
        for name in names:
            self.assertRegex(name, rf"^\d+\.M\d+P{os.getpid()}\.test\.host$")

    @defer.inlineCallbacks
    def test_quota_warning(self) -> Any:
        address = yield defer.ensureDeferred(self.local.deliver("warn"))
        self.assertEqual(address.status, DELIVERED)
        self.assertEqual(address.special_action, "warn")
        self.assertIn("Subject: Your mailbox", address.extra["quota_warn_message"])
        address = yield defer.ensureDeferred(self.local.deliver("warn"))
        self.assertIsNone(address.special_action)

    @defer.inlineCallbacks
    def test_create_file_inhome(self) -> Any:
        os.mkdir(os.path.join(self.local.out, "elsewhere"))
        address = yield defer.ensureDeferred(self.local.deliver("home"))
        self.assertEqual(address.status, DEFERRED)
        self.assertEqual(address.message,
                         f"mailbox {self.local.out}/elsewhere/box does not exist, but creation "
                         "outside the home directory is not permitted")

    @defer.inlineCallbacks
    def test_redirected_file(self) -> Any:
        parent = DeliveryAddress("user@test.ex", number=0)
        path = os.path.join(self.local.out, "fromforward")
        child = parent.child(path, file_path=path)
        child.transport = "addressfile"
        address = yield defer.ensureDeferred(self.local.deliver("addressfile", child))
        self.assertEqual(address.status, DELIVERED, address.message)
        self.assertTrue(self.local.read("fromforward").startswith(b"From snd@test.ex "))

    @defer.inlineCallbacks
    def test_redirected_tainted_file(self) -> Any:
        parent = DeliveryAddress("user@test.ex", number=0)
        path = Tainted(os.path.join(self.local.out, "fromforward"))
        child = parent.child(path, file_path=path)
        address = yield defer.ensureDeferred(self.local.deliver("addressfile", child))
        self.assertEqual(address.status, DEFERRED)
        self.assertEqual(address.message, f"Tainted '{path}' (file or directory name for "
                         "addressfile transport) not permitted")

    @defer.inlineCallbacks
    def test_message_size_limit(self) -> Any:
        address = yield defer.ensureDeferred(self.local.deliver("big"))
        self.assertEqual(address.status, FAILED)
        self.assertEqual(address.message, "message is too big (transport limit = 10)")


LOCAL_PIPES = """\
p75:
  driver = pipe
  command = /bin/sh -c "exit 75"
p1:
  driver = pipe
  command = /bin/sh -c "exit 1"
slow:
  driver = pipe
  command = /bin/sh -c "/bin/sleep 31.25 & /bin/sleep 31.25"
  timeout = 1s
output:
  driver = pipe
  command = /bin/sh -c "echo line one; echo line two >&2; exit 2"
  log_output
  return_fail_output
cat:
  driver = pipe
  command = /bin/sh -c "cat > OUT/cat"
  message_prefix =
  message_suffix =
args:
  driver = pipe
  command = /bin/sh -c 'printf "%s|" "\\$@" > OUT/args' sh $pipe_addresses "two words"
reader:
  driver = pipe
  path = /usr/bin:/bin
"""


class PipeTests(trial.TestCase):
    """Real commands, without a shell unless asked for."""

    timeout = 60

    def setUp(self) -> None:
        self.local = _Local(LOCAL_PIPES)
        self.addCleanup(shutil.rmtree, self.local.directory, True)

    @defer.inlineCallbacks
    def test_temporary_failure(self) -> Any:
        address = yield defer.ensureDeferred(self.local.deliver("p75"))
        self.assertEqual(address.status, DEFERRED)
        self.assertEqual(address.message, "Child process of p75 transport returned 75 (could "
                         "mean temporary error) from command: /bin/sh")
        self.assertEqual(address.user_message, "local delivery failed")

    @defer.inlineCallbacks
    def test_permanent_failure(self) -> Any:
        address = yield defer.ensureDeferred(self.local.deliver("p1"))
        self.assertEqual(address.status, FAILED)
        self.assertEqual(address.message,
                         "Child process of p1 transport returned 1 from command: /bin/sh")

    @defer.inlineCallbacks
    def test_timeout_kills_the_group(self) -> Any:
        started = time.monotonic()
        address = yield defer.ensureDeferred(self.local.deliver("slow"))
        self.assertLess(time.monotonic() - started, 10)
        self.assertEqual(address.status, FAILED)
        self.assertEqual(address.message, "pipe delivery process timed out")
        # The background sleep went with the rest of the process group.
        yield task.deferLater(reactor, 0.2, lambda: None)
        found = subprocess.run(["pgrep", "-f", "sleep 31.25"], capture_output=True)
        self.assertEqual(found.stdout, b"")

    @defer.inlineCallbacks
    def test_output(self) -> Any:
        address = yield defer.ensureDeferred(self.local.deliver("output"))
        self.assertEqual(address.status, FAILED)
        self.assertEqual(sorted(address.extra["transport_output"].splitlines()),
                         [b"line one", b"line two"])
        self.assertTrue(address.extra["return_output"])
        self.assertRegex(address.extra["transport_output_log"],
                         r"^<output@test.ex>: output transport output: line (one|two)$")

    @defer.inlineCallbacks
    def test_big_message_streams(self) -> Any:
        body = b"".join(b"From line %d " % i + b"x" * 200 + b"\n" for i in range(40000))
        self.local.message, self.local.data = message_on_disk(self.local.directory, body)
        address = yield defer.ensureDeferred(self.local.deliver("cat"))
        self.assertEqual(address.status, DELIVERED, address.message)
        data = self.local.read("cat")
        self.assertEqual(data, b"Subject: hi\nFrom: snd@test.ex\n\n" + body)

    @defer.inlineCallbacks
    def test_pipe_addresses(self) -> Any:
        addresses = [self.local.address("args"), self.local.address("args")]
        addresses[1].address = "second@test.ex"
        yield defer.ensureDeferred(self.local.deliver("args", *addresses))
        self.assertEqual(addresses[0].status, DELIVERED, addresses[0].message)
        self.assertEqual(addresses[1].status, DELIVERED)
        self.assertEqual(self.local.read("args"), b"args@test.ex|second@test.ex|two words|")

    @defer.inlineCallbacks
    def test_redirected_command(self) -> Any:
        parent = DeliveryAddress("user@test.ex", number=0)
        out = os.path.join(self.local.out, "redirected")
        child = parent.child(f"|cat > {out}", pipe_command=f"cat > {out}")
        address = yield defer.ensureDeferred(self.local.deliver("reader", child))
        # Not a shell: "cat" gets ">" and the path as file names to read.
        self.assertEqual(address.status, FAILED)
        self.assertEqual(address.message,
                         "Child process of reader transport returned 1 from command: /usr/bin/cat")
        self.assertFalse(os.path.exists(out))


class LmtpCommandTests(trial.TestCase):
    """LMTP to the test server run as a command, without exim4."""

    timeout = 60

    def setUp(self) -> None:
        self.local = _Local("lmtp:\n  driver = lmtp\n  command = /usr/bin/python3 SCRIPT "
                            "OUT/record\n  batch_max = 5\n")
        self.addCleanup(shutil.rmtree, self.local.directory, True)
        script = os.path.join(self.local.directory, "lmtpserver.py")
        with open(script, "w") as f:
            f.write(LMTP_SERVER)
        self.local.config.transport("lmtp").options["command"] = \
            f"/usr/bin/python3 {script} {self.local.out}/record"

    @defer.inlineCallbacks
    def test_dialogue(self) -> Any:
        rcpts = ["ok@test.ex", "rcpt5@test.ex", "data4@test.ex"]
        addresses = [DeliveryAddress(r, number=i, transport="lmtp") for i, r in enumerate(rcpts)]
        yield defer.ensureDeferred(self.local.deliver("lmtp", *addresses))
        self.assertEqual([a.status for a in addresses], [DELIVERED, FAILED, DEFERRED])
        self.assertEqual(addresses[1].message,
                         "LMTP error after RCPT TO:<rcpt5@test.ex>: 550 5.1.1 no such user")
        self.assertEqual(addresses[2].message,
                         "LMTP error after end of data: 452 4.2.2 <data4@test.ex> over quota")
        self.assertEqual(self.local.read("record"),
                         b"LHLO test.host\r\nMAIL FROM:<snd@test.ex>\r\n"
                         b"RCPT TO:<ok@test.ex>\r\nRCPT TO:<rcpt5@test.ex>\r\n"
                         b"RCPT TO:<data4@test.ex>\r\nDATA\r\n"
                         b"Subject: hi\r\nFrom: snd@test.ex\r\n\r\nline 1\r\nFrom me\r\n"
                         b".\r\nQUIT\r\n")
