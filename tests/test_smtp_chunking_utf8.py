"""CHUNKING (BDAT) and SMTPUTF8 in the smtp transport (the client side).

In memory: the dialogues of Exim 4.96's test suite, scripts 0904 (short
messages) and 0905 (long ones), with its error texts (Exim names what
failed after its data stage, ``after pipelined end of data``...), and
the chunks Exim cuts a message into.  Against fake servers on a local
port: the `` K`` on the ``=>`` line, ``hosts_try_chunking``, PRDR with
BDAT, and the SMTPUTF8 choices (the parameter, downconversion to
A-labels, the ``utf8 support required`` failure).  Against a real Exim
4.96 daemon: messages sent by BDAT (one chunk and several) arriving
intact and logged with ``K``, an SMTPUTF8 message arriving as one, and
downconversion for an Exim that does not offer SMTPUTF8.
"""

from __future__ import annotations

import glob
import os
import re
import time
from typing import Any

from twisted.internet import defer, reactor
from twisted.internet.protocol import Factory, Protocol
from twisted.trial import unittest as trial

from tests.test_delivery_peers import ID, message_lines
from tests.test_smtp_prdr_dsn import _Base
from tests.test_smtp_transport import BODY, RECEIVER_CONFIG, SENDER, _client, _take
from twisted_mta.queue.deliver import COMPLETED, INCOMPLETE
from twisted_mta.smtp.client import BDAT_BUFFER, BDATChunk, ClientSettings, bdat_chunks
from twisted_mta.spool.message import Recipient, SpoolHeader, SpoolMessage

HEAD = b"Subject: foo\r\n\r\n"


def _flat(chunks: list[BDATChunk]) -> list[tuple[int, bytes]]:
    """The chunks' sizes and bytes (the blocks here are all bytes)."""
    return [(c.size, b"".join(c.blocks)) for c in chunks]


class ChunkPlanTests(trial.TestCase):
    """How Exim's transport_write_message() cuts a message into chunks."""

    def test_small_message_is_one_last_chunk(self) -> None:
        self.assertEqual(_flat(bdat_chunks(HEAD, b"data\r\n", 6)),
                         [(len(HEAD) + 6, HEAD + b"data\r\n")])

    def test_large_message_sends_the_headers_first(self) -> None:
        # 0905: BDAT 297 (the headers), then BDAT 8380 LAST (the body).
        head = b"x" * 295 + b"\r\n"
        self.assertEqual([c.size for c in bdat_chunks(head, b"", 8380)], [297, 8380])
        # Exactly the buffer: still one chunk.
        self.assertEqual([c.size for c in bdat_chunks(head, b"", BDAT_BUFFER - 297)],
                         [BDAT_BUFFER])

    def test_long_headers_are_cut_where_the_buffer_fills(self) -> None:
        # 0905 "message with long headers": BDAT 8191, then BDAT 809 LAST.
        head = (b"X-long: " + b"1" * 8300 + b"\r\n\r\n")
        chunks = bdat_chunks(head, b"body\r\n", 6)
        self.assertEqual([c.size for c in chunks], [8191, len(head) - 8191 + 6])
        # A CRLF made of the LF that crossed the limit stays in the chunk.
        head = b"a" * 8189 + b"\r\n" + b"b" * 10 + b"\r\n"
        self.assertEqual([c.size for c in bdat_chunks(head, b"", 0)], [8191, 12])
        head = b"a" * 8188 + b"\r\n" + b"b" * 10 + b"\r\n"
        self.assertEqual([c.size for c in bdat_chunks(head, b"", 0)], [8190 + 1, 11])
        # No header data after the limit: no flush.
        self.assertEqual([c.size for c in bdat_chunks(b"a" * 8191, b"", 0)], [8191])

    def test_body_only(self) -> None:
        self.assertEqual([c.size for c in bdat_chunks(b"", b"", 20000)], [20000])


EHLO_CHUNKING = b"250-Hello there\r\n250 CHUNKING\r\n"
EHLO_PIPE_CHUNKING = b"250-Hello there\r\n250-PIPELINING\r\n250 CHUNKING\r\n"
DATA = b"Subject: foo\r\n\r\n.data\r\n"   # a leading dot: not stuffed with BDAT


class BdatDialogueTests(trial.TestCase):
    """Exim 4.96's test suite, scripts 0904 and 0905, as dialogues."""

    def _start(self, ehlo: bytes, **kw: Any) -> tuple[Any, Any, Any]:
        client, transport, clock = _client(**kw)
        d = defer.Deferred.fromCoroutine(client.greeting())
        client.protocol.dataReceived(b"220 Greetings\r\n")
        self.successResultOf(d)
        d = defer.Deferred.fromCoroutine(client.hello("myhost.test.ex"))
        _take(transport)
        client.protocol.dataReceived(ehlo)
        self.successResultOf(d)
        return client, transport, clock

    def _send(self, client: Any, chunks: list[BDATChunk], recipients: Any = ("a@test.ex",),
              **kw: Any) -> Any:
        return defer.Deferred.fromCoroutine(client.transaction(
            "sender@source.dom", list(recipients), None, chunks=chunks, **kw))

    def test_non_pipelined_short_message(self) -> None:
        client, transport, _ = self._start(EHLO_CHUNKING)
        d = self._send(client, bdat_chunks(DATA, b"", 0))
        self.assertEqual(_take(transport), b"MAIL FROM:<sender@source.dom>\r\n")
        client.protocol.dataReceived(b"250 OK\r\n")
        self.assertEqual(_take(transport), b"RCPT TO:<a@test.ex>\r\n")
        client.protocol.dataReceived(b"250 OK\r\n")
        self.assertEqual(_take(transport), f"BDAT {len(DATA)} LAST\r\n".encode() + DATA)
        client.protocol.dataReceived(b"250 OK\r\n")
        result = self.successResultOf(d)
        self.assertIsNone(result.error)
        self.assertTrue(result.chunking)
        self.assertEqual(result.data_command, f"BDAT {len(DATA)} LAST")
        self.assertEqual(result.data_reply.text, "250 OK")
        self.assertEqual(result.bytes_written, len(DATA))

    def test_non_pipelined_rejected_recipient_sends_no_bdat(self) -> None:
        client, transport, _ = self._start(EHLO_CHUNKING)
        d = self._send(client, bdat_chunks(DATA, b"", 0))
        client.protocol.dataReceived(b"250 OK\r\n")
        client.protocol.dataReceived(b"550 sorry, no\r\n")
        result = self.successResultOf(d)
        self.assertEqual(_take(transport), b"MAIL FROM:<sender@source.dom>\r\n"
                         b"RCPT TO:<a@test.ex>\r\n")
        self.assertEqual(result.rcpt_replies[0].code, 550)
        self.assertIsNone(result.error)
        self.assertIsNone(result.data_reply)

    def test_non_pipelined_bdat_rejected(self) -> None:
        client, transport, _ = self._start(EHLO_CHUNKING)
        d = self._send(client, bdat_chunks(DATA, b"", 0))
        client.protocol.dataReceived(b"250 OK\r\n250 OK\r\n")
        client.protocol.dataReceived(b"500 oops\r\n")
        result = self.successResultOf(d)
        self.assertEqual(result.error.message,
                         "SMTP error from remote mail server after end of data: 500 oops")

    def test_final_timeout(self) -> None:
        client, transport, clock = self._start(
            EHLO_CHUNKING, settings=ClientSettings(command_timeout=5, final_timeout=50))
        d = self._send(client, bdat_chunks(DATA, b"", 0))
        client.protocol.dataReceived(b"250 OK\r\n250 OK\r\n")
        clock.advance(10)
        self.assertNoResult(d)
        clock.advance(45)
        result = self.successResultOf(d)
        self.assertEqual(result.error.message,
                         f"SMTP timeout after end of data ({len(DATA)} bytes written)")

    def test_pipelined_short_message(self) -> None:
        client, transport, _ = self._start(EHLO_PIPE_CHUNKING)
        d = self._send(client, bdat_chunks(DATA, b"", 0))
        # MAIL, RCPT and BDAT go together, the data right after.
        self.assertEqual(_take(transport), b"MAIL FROM:<sender@source.dom>\r\n"
                         b"RCPT TO:<a@test.ex>\r\n" +
                         f"BDAT {len(DATA)} LAST\r\n".encode() + DATA)
        client.protocol.dataReceived(b"250 OK mail\r\n250 OK rcpt\r\n")
        self.assertNoResult(d)
        client.protocol.dataReceived(b"250 OK bdat\r\n")
        result = self.successResultOf(d)
        self.assertIsNone(result.error)
        self.assertEqual(result.data_reply.text, "250 OK bdat")

    def _pipelined_error(self, replies: bytes) -> Any:
        client, transport, _ = self._start(EHLO_PIPE_CHUNKING)
        d = self._send(client, bdat_chunks(DATA, b"", 0))
        client.protocol.dataReceived(replies)
        return self.successResultOf(d)

    def test_pipelined_mail_rejected(self) -> None:
        result = self._pipelined_error(b"550 unacceptable mail-from\r\n"
                                       b"550 rcpt ungood lacking mail-from\r\n"
                                       b"500 bdat ungood lacking mail-from\r\n")
        self.assertEqual(result.rcpt_replies, [])
        self.assertEqual(result.error.message, "SMTP error from remote mail server after "
                         "pipelined end of data: 550 unacceptable mail-from")
        result = self._pipelined_error(b"450 greylisted mail-from\r\n"
                                       b"550 rcpt ungood lacking mail-from\r\n")
        self.assertEqual(result.error.reply.code, 450)
        self.assertIn("after pipelined end of data: 450 greylisted", result.error.message)

    def test_pipelined_rcpt_rejected_then_bdat(self) -> None:
        result = self._pipelined_error(b"250 OK mail\r\n550 no such recipient\r\n"
                                       b"500 oops bdat\r\n")
        self.assertEqual(result.rcpt_replies[0].code, 550)
        # Nobody accepted: the transport ignores this error.
        self.assertEqual(result.error.reply.code, 500)

    def test_pipelined_bdat_rejected(self) -> None:
        result = self._pipelined_error(b"250 OK mail\r\n250 OK rcpt\r\n"
                                       b"400 not right now bdat\r\n")
        self.assertEqual(result.error.message, "SMTP error from remote mail server after "
                         "pipelined end of data: 400 not right now bdat")

    def _long(self, pipelining: bool = True) -> tuple[Any, Any, Any, bytes]:
        client, transport, _ = self._start(EHLO_PIPE_CHUNKING if pipelining
                                           else EHLO_CHUNKING)
        body = b"1234567890" * 838 + b"\r\n"
        d = self._send(client, bdat_chunks(DATA, [body], len(body)))
        return client, transport, d, body

    def test_pipelined_long_message(self) -> None:
        client, transport, d, body = self._long()
        self.assertEqual(_take(transport), b"MAIL FROM:<sender@source.dom>\r\n"
                         b"RCPT TO:<a@test.ex>\r\n" +
                         f"BDAT {len(DATA)}\r\n".encode() + DATA)
        client.protocol.dataReceived(b"250 OK mail\r\n250 OK rcpt\r\n")
        self.assertEqual(_take(transport), b"")
        client.protocol.dataReceived(b"250 OK nonlast bdat\r\n")
        self.assertEqual(_take(transport), f"BDAT {len(body)} LAST\r\n".encode() + body)
        client.protocol.dataReceived(b"250 OK bdat\r\n")
        result = self.successResultOf(d)
        self.assertIsNone(result.error)
        self.assertEqual(result.data_command, f"BDAT {len(body)} LAST")

    def test_pipelined_long_message_errors(self) -> None:
        client, transport, d, _ = self._long()
        client.protocol.dataReceived(b"550 unacceptable mail-from\r\n"
                                     b"550 rcpt ungood lacking mail-from\r\n"
                                     b"500 bdat (nonlast) ungood lacking mail-from\r\n")
        self.assertEqual(self.successResultOf(d).error.message,
                         "SMTP error from remote mail server after pipelined sending "
                         "data block: 550 unacceptable mail-from")
        client, transport, d, _ = self._long()
        client.protocol.dataReceived(b"250 OK mail\r\n250 OK rcpt\r\n"
                                     b"500 oops nonlast bdat\r\n")
        self.assertEqual(self.successResultOf(d).error.message,
                         "SMTP error from remote mail server after pipelined sending "
                         "data block: 500 oops nonlast bdat")
        # The last chunk: no longer pipelined.
        client, transport, d, _ = self._long()
        client.protocol.dataReceived(b"250 OK mail\r\n250 OK rcpt\r\n"
                                     b"250 OK nonlast bdat\r\n500 oops bdat\r\n")
        self.assertEqual(self.successResultOf(d).error.message,
                         "SMTP error from remote mail server after end of data: "
                         "500 oops bdat")

    def test_non_pipelined_long_message_nonlast_rejected(self) -> None:
        client, transport, d, _ = self._long(pipelining=False)
        client.protocol.dataReceived(b"250 OK\r\n250 OK\r\n")
        self.assertTrue(_take(transport).endswith(f"BDAT {len(DATA)}\r\n".encode() + DATA))
        client.protocol.dataReceived(b"500 oops bdat-nonlast\r\n")
        self.assertEqual(self.successResultOf(d).error.message,
                         "SMTP error from remote mail server after sending data block: "
                         "500 oops bdat-nonlast")

    def test_prdr_reply_to_bdat_last(self) -> None:
        client, transport, _ = self._start(b"250-x\r\n250-PIPELINING\r\n250-PRDR\r\n"
                                           b"250 CHUNKING\r\n")
        d = self._send(client, bdat_chunks(DATA, b"", 0), ["a@y", "b@y"], prdr=True)
        self.assertTrue(_take(transport).startswith(b"MAIL FROM:<sender@source.dom> PRDR\r\n"))
        client.protocol.dataReceived(b"250 OK\r\n250 OK\r\n250 OK\r\n353 go on\r\n"
                                     b"250 first\r\n550 second\r\n250 overall\r\n")
        result = self.successResultOf(d)
        self.assertTrue(result.prdr)
        self.assertEqual([r.text for r in result.prdr_replies], ["250 first", "550 second"])
        self.assertEqual(result.data_reply.text, "250 overall")

    def test_smtputf8_parameter_order(self) -> None:
        client, transport, _ = self._start(b"250-x\r\n250-SIZE\r\n250-PRDR\r\n"
                                           b"250-SMTPUTF8\r\n250 DSN\r\n")
        address = "r\u00e9@y".encode().decode("latin-1")    # as the spool holds it
        defer.Deferred.fromCoroutine(client.transaction(
            address, ["a@y", "b@y"], [b".\r\n"], size=10, prdr=True, smtputf8=True,
            mail_params=" RET=FULL"))
        self.assertEqual(_take(transport), "MAIL FROM:<r\u00e9@y> SIZE=10 PRDR SMTPUTF8 "
                         "RET=FULL\r\n".encode())


# -- through the transport: fake servers --------------------------------------------------

class _FakeServer:
    """A server offering *keywords* that takes BDAT chunks; replies come
    from *replies* by verb (a list is used up in order, then "250 OK"),
    BDAT replies after the chunk's data.  Keeps the command lines and the
    chunks' data."""

    def __init__(self, keywords: list[str], replies: dict[str, list[bytes]] | None = None
                 ) -> None:
        self.commands: list[bytes] = []
        self.data = b""
        fake = self
        replies = replies or {}

        class Server(Protocol):
            buffer = b""
            left = 0
            in_data = False

            def connectionMade(self) -> None:
                self.transport.write(b"220 fake.test ESMTP\r\n")

            def reply(self, verb: str) -> None:
                queue = replies.get(verb)
                self.transport.write(queue.pop(0) if queue else b"250 OK\r\n")

            def dataReceived(self, data: bytes) -> None:
                self.buffer += data
                while self.buffer:
                    if self.left:
                        taken = self.buffer[:self.left]
                        self.buffer = self.buffer[len(taken):]
                        self.left -= len(taken)
                        fake.data += taken
                        if not self.left:
                            self.reply("BDAT")
                        continue
                    end = self.buffer.find(b"\r\n")
                    if end < 0:
                        return
                    line, self.buffer = self.buffer[:end], self.buffer[end + 2:]
                    if self.in_data:
                        if line == b".":
                            self.in_data = False
                            self.reply("DOT")
                        else:
                            fake.data += line + b"\r\n"
                        continue
                    fake.commands.append(line)
                    verb = line.split(b" ")[0].split(b":")[0].upper().decode()
                    if verb == "EHLO":
                        self.transport.write(b"".join(
                            b"250-" + k.encode() + b"\r\n" for k in ["fake.test", *keywords])
                            + b"250 HELP\r\n")
                    elif verb == "BDAT":
                        self.left = int(line.split()[1])
                        if not self.left:
                            self.reply("BDAT")
                    elif verb == "DATA":
                        self.in_data = True
                        self.transport.write(b"354 go\r\n")
                    elif verb == "QUIT":
                        self.transport.write(b"221 bye\r\n")
                        self.transport.loseConnection()
                    else:
                        self.reply(verb)

        self.listener = reactor.listenTCP(0, Factory.forProtocol(Server),
                                          interface="127.0.0.1")
        self.port = self.listener.getHost().port


UTF8_LOCAL = "\u00fcser"                   # üser
UTF8_DOMAIN = "b\u00fccher.test"           # bücher.test
UTF8_SENDER = f"s\u00e9nder@{UTF8_DOMAIN}"   # sénder@bücher.test


def _spool_text(text: str) -> str:
    """*text* as the spool holds it: its UTF-8 bytes decoded as Latin-1."""
    return text.encode().decode("latin-1")


class _Delivering(_Base):

    async def deliver_message(self, recipients: list[str], *, sender: str = SENDER,
                              body: bytes = BODY, smtputf8: bool = False,
                              extra: str = "", firsttime: bool = True
                              ) -> tuple[str, list[str]]:
        settings = self.settings(extra=extra)
        message_id = "1xa0Ih-00035i-07"
        now = int(time.time())
        self.spool.write_message(SpoolMessage(
            id=message_id, sender=sender, received=(now, 0), received_complete=(now, 1),
            received_protocol="utf8esmtp" if smtputf8 else "esmtp",
            recipients=[Recipient(r) for r in recipients],
            headers=[SpoolHeader("Subject: chunking\n"), SpoolHeader("From: s@x.test\n")],
            deliver_firsttime=firsttime, body_linecount=body.count(b"\n"),
            smtputf8=smtputf8), body)
        from twisted_mta.queue.deliver import MessageDelivery

        result = await MessageDelivery(settings, message_id).run()
        return result.outcome, message_lines(self.stream.getvalue(), message_id)

    def start_fake(self, keywords: list[str],
                   replies: dict[str, list[bytes]] | None = None) -> _FakeServer:
        server = _FakeServer(keywords, replies)
        self.addCleanup(server.listener.stopListening)
        self.exim = server  # settings() reads .port
        return server


HOST = "R=remote T=remote_smtp H=127.0.0.1 [127.0.0.1]"
SENT = b"Subject: chunking\r\nFrom: s@x.test\r\n\r\n" + BODY.replace(b"\n", b"\r\n")


class ChunkingThroughTheTransportTests(_Delivering):

    async def test_bdat_and_the_k_flag(self) -> None:
        server = self.start_fake(["PIPELINING", "CHUNKING"],
                                 {"BDAT": [b"250- 99 byte chunk, total 99\r\n250 OK id=x\r\n"]})
        outcome, lines = await self.deliver_message(["a@y.test"])
        self.assertEqual(outcome, COMPLETED, lines)
        self.assertEqual(lines[0], f'=> a@y.test {HOST} K '
                         'C="250- 99 byte chunk, total 99\\\\n250 OK id=x"')
        self.assertTrue(server.commands[1].startswith(b"MAIL FROM:<s@x.test>"))
        self.assertEqual(server.commands[2:], [b"RCPT TO:<a@y.test>",
                                               f"BDAT {len(SENT)} LAST".encode(), b"QUIT"])
        self.assertEqual(server.data, SENT)   # no dot-stuffing, no final dot

    async def test_body_read_with_the_header_sends_the_same(self) -> None:
        """A first delivery of a small message sends the body the delivery
        read with the -H file; a later one, or a big message, reads the -D
        file in the transport: the same commands and bytes either way."""
        from twisted_mta.transports.message import CHUNK_SIZE

        bodies = [BODY, b"8-bit \xe9\n.\n", b"From x\n..\n" + b"y" * (CHUNK_SIZE + 10) + b"\n"]
        for body in bodies:
            for extra in ("", "  hosts_try_chunking ="):
                seen = []
                for firsttime in (True, False):
                    server = self.start_fake(["PIPELINING", "CHUNKING", "8BITMIME"])
                    outcome, lines = await self.deliver_message(
                        ["a@y.test"], body=body, extra=extra, firsttime=firsttime)
                    self.assertEqual(outcome, COMPLETED, lines)
                    seen.append((server.commands, server.data))
                self.assertEqual(seen[0], seen[1])
                self.assertEqual(b"BODY=8BITMIME" in seen[0][0][1], not body.isascii())

    async def test_hosts_try_chunking_unset_uses_data(self) -> None:
        server = self.start_fake(["PIPELINING", "CHUNKING"])
        outcome, lines = await self.deliver_message(["a@y.test"],
                                                    extra="  hosts_try_chunking =")
        self.assertEqual(outcome, COMPLETED, lines)
        self.assertEqual(lines[0], f'=> a@y.test {HOST} C="250 OK"')
        self.assertIn(b"DATA", server.commands)

    async def test_multi_chunk_error_after_the_headers(self) -> None:
        self.start_fake(["PIPELINING", "CHUNKING"],
                        {"BDAT": [b"451 oops nonlast bdat\r\n"]})
        outcome, lines = await self.deliver_message(["a@y.test"], body=b"x" * 9000 + b"\n")
        self.assertEqual(outcome, INCOMPLETE, lines)
        self.assertEqual(lines[-1], "== a@y.test R=remote T=remote_smtp defer (-46) "
                         "H=127.0.0.1 [127.0.0.1]: SMTP error from remote mail server after "
                         "pipelined sending data block: 451 oops nonlast bdat")

    async def test_prdr_error_names_the_bdat_command(self) -> None:
        self.start_fake(["PIPELINING", "PRDR", "CHUNKING"],
                        {"BDAT": [b"353 go on\r\n250 first ok\r\n550 second no\r\n"
                                  b"250 overall\r\n"]})
        outcome, lines = await self.deliver_message(["a@y.test", "b@y.test"])
        self.assertEqual(outcome, COMPLETED, lines)
        self.assertIn(f'=> a@y.test {HOST} PRDR K C="250 first ok\\\\n250 overall"', lines)
        self.assertIn(f"** b@y.test {HOST}: PRDR error after BDAT {len(SENT)} LAST: "
                      "550 second no", lines)


class Utf8ThroughTheTransportTests(_Delivering):

    async def _utf8(self, keywords: list[str], extra: str = "") -> tuple[Any, str, list[str]]:
        server = self.start_fake(keywords)
        outcome, lines = await self.deliver_message(
            [_spool_text(f"{UTF8_LOCAL}@{UTF8_DOMAIN}")],
            sender=_spool_text(UTF8_SENDER), smtputf8=True, extra=extra)
        return server, outcome, lines

    async def test_smtputf8_asked_for_when_offered(self) -> None:
        server, outcome, lines = await self._utf8(["SMTPUTF8", "CHUNKING"])
        self.assertEqual(outcome, COMPLETED, lines)
        mail = server.commands[1]
        self.assertTrue(mail.startswith(f"MAIL FROM:<{UTF8_SENDER}> ".encode()),
                        mail)
        self.assertTrue(mail.endswith(b" SMTPUTF8"), mail)
        self.assertEqual(server.commands[2], f"RCPT TO:<{UTF8_LOCAL}@{UTF8_DOMAIN}>".encode())

    async def test_downconverted_when_not_offered(self) -> None:
        # utf8_downconvert's default, -1: convert only when needed.
        server, outcome, lines = await self._utf8(["CHUNKING"])
        self.assertEqual(outcome, COMPLETED, lines)
        self.assertNotIn(b"SMTPUTF8", server.commands[1])
        self.assertTrue(server.commands[1].startswith(
            b"MAIL FROM:<xn--snder-bsa@xn--bcher-kva.test>"), server.commands[1])
        self.assertEqual(server.commands[2], b"RCPT TO:<xn--ser-goa@xn--bcher-kva.test>")

    async def test_downconvert_forced(self) -> None:
        server, outcome, lines = await self._utf8(["SMTPUTF8"], "  utf8_downconvert = 1")
        self.assertEqual(outcome, COMPLETED, lines)
        self.assertNotIn(b"SMTPUTF8", server.commands[1])
        self.assertEqual(server.commands[2], b"RCPT TO:<xn--ser-goa@xn--bcher-kva.test>")

    async def test_required_but_not_offered(self) -> None:
        server, outcome, lines = await self._utf8(["CHUNKING"], "  utf8_downconvert = 0")
        self.assertEqual(outcome, COMPLETED, lines)
        self.assertEqual(lines[0], "H=127.0.0.1 [127.0.0.1]: utf8 support required but "
                         "not offered for forwarding")
        self.assertEqual(lines[1], f"** {_spool_text(UTF8_LOCAL)}@"
                         f"{_spool_text(UTF8_DOMAIN)} {HOST}: utf8 support required but "
                         "not offered for forwarding")
        self.assertEqual([c[:4] for c in server.commands], [b"EHLO", b"QUIT"])
        self.assertEqual(self.bounced[0].basic_errno, -49)

    async def test_bad_utf8_downconvert_expansion(self) -> None:
        server, outcome, lines = await self._utf8(["CHUNKING"],
                                                  "  utf8_downconvert = ${bad")
        self.assertEqual(outcome, INCOMPLETE, lines)
        self.assertIn("failed to expand utf8_downconvert: ", lines[-1])
        self.assertEqual([c[:4] for c in server.commands], [b"EHLO", b"QUIT"])


# -- against Exim 4.96 ----------------------------------------------------------------------

class ToEximTests(_Delivering):

    def exim_files(self) -> tuple[str, bytes]:
        found = {}
        for suffix in ("H", "D"):
            paths = glob.glob(os.path.join(self.exim.directory, "spool", "input", "**",
                                           f"*-{suffix}"), recursive=True)
            self.assertEqual(len(paths), 1, paths)
            with open(paths[0], "rb") as f:
                found[suffix] = f.read()
        return found["H"].decode("latin-1"), found["D"].split(b"\n", 1)[1]

    async def test_one_chunk_arrives_intact(self) -> None:
        self.start_exim(RECEIVER_CONFIG)
        outcome, lines = await self.deliver_message(["a@y.test", "b@y.test"])
        self.assertEqual(outcome, COMPLETED, lines)
        total = len(SENT)
        self.assertRegex(lines[0], rf'^=> a@y\.test {re.escape(HOST)} K C="250- {total} '
                         rf'byte chunk, total {total}\\\\n250 OK id=({ID})"$')
        self.assertRegex(lines[1], rf"^-> b@y\.test {re.escape(HOST)} K ")
        exim_id = re.search(rf"id=({ID})", lines[0]).group(1)
        self.assertRegex(self.exim.mainlog(), rf"{exim_id} <= s@x\.test H=\(exim-py\.test\) "
                         rf"\[127\.0\.0\.1\] P=esmtp K S=")
        header, body = self.exim_files()
        self.assertEqual(body, BODY)          # the dot lines unchanged
        self.assertIn("a@y.test\nb@y.test\n", header)

    async def test_several_chunks_arrive_intact(self) -> None:
        self.start_exim(RECEIVER_CONFIG)
        body = b"".join(b"%05d " % i + b"x" * 70 + b"\n.\n" for i in range(400))
        outcome, lines = await self.deliver_message(["a@y.test"], body=body)
        self.assertEqual(outcome, COMPLETED, lines)
        # The last chunk is the body alone: the headers went first.
        last = len(body) + body.count(b"\n")
        head = len(b"Subject: chunking\r\nFrom: s@x.test\r\n\r\n")
        self.assertRegex(lines[0], rf'^=> a@y\.test {re.escape(HOST)} K C="250- {last} '
                         rf'byte chunk, total {last + head}\\\\n250 OK id={ID}"$')
        self.assertRegex(self.exim.mainlog(), r" <= s@x\.test .* P=esmtp K S=")
        self.assertEqual(self.exim_files()[1], body)

    async def test_smtputf8_message_arrives_as_one(self) -> None:
        self.start_exim("smtputf8_advertise_hosts = *\n" + RECEIVER_CONFIG)
        recipient = _spool_text(f"{UTF8_LOCAL}@{UTF8_DOMAIN}")
        outcome, lines = await self.deliver_message(
            [recipient], sender=_spool_text(UTF8_SENDER), smtputf8=True)
        self.assertEqual(outcome, COMPLETED, lines)
        self.assertRegex(lines[0], rf"^=> {re.escape(recipient)} {re.escape(HOST)} K C=")
        header, body = self.exim_files()
        self.assertIn("-smtputf8\n", header)
        self.assertIn(f"<{_spool_text(UTF8_SENDER)}>\n", header)
        self.assertIn(f"\n{recipient}\n", header)
        # Exim's log is UTF-8 text: the sender as it was sent.
        self.assertRegex(self.exim.mainlog(), rf"<= {UTF8_SENDER} .* "
                         r"P=utf8esmtp K S=")
        self.assertEqual(body, BODY)

    async def test_exim_without_smtputf8_gets_a_labels(self) -> None:
        self.start_exim("smtputf8_advertise_hosts =\n" + RECEIVER_CONFIG)
        outcome, lines = await self.deliver_message(
            [_spool_text(f"{UTF8_LOCAL}@{UTF8_DOMAIN}")],
            sender=_spool_text(UTF8_SENDER), smtputf8=True)
        self.assertEqual(outcome, COMPLETED, lines)
        header, _ = self.exim_files()
        self.assertNotIn("-smtputf8", header)
        self.assertIn("<xn--snder-bsa@xn--bcher-kva.test>\n", header)
        self.assertIn("\nxn--ser-goa@xn--bcher-kva.test\n", header)

    async def test_exim_without_smtputf8_and_no_downconversion(self) -> None:
        self.start_exim("smtputf8_advertise_hosts =\n" + RECEIVER_CONFIG)
        outcome, lines = await self.deliver_message(
            [_spool_text(f"{UTF8_LOCAL}@{UTF8_DOMAIN}")], smtputf8=True,
            extra="  utf8_downconvert = 0")
        self.assertEqual(outcome, COMPLETED, lines)
        self.assertTrue(lines[1].endswith(": utf8 support required but not offered for "
                                          "forwarding"), lines)
        self.assertNotIn(" <= ", self.exim.mainlog())
