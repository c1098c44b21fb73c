"""What an SMTP session logs and how it reads its input, in memory: the
+pipelining flags, the Message-ID in the ``<=`` line, lost connections,
+smtp_connection and +smtp_incomplete_transaction lines, host_lookup,
host_reject_connection, and AUTH LOGIN answers that come one at a time.

Each expectation was checked against ``exim4 -bd`` (Exim 4.96) with the
same configuration and session; tests/test_daemon_peers.py repeats the main
ones against the real daemon.
"""

from __future__ import annotations

import base64
import socket
from typing import Any

from twisted.internet.error import ConnectionDone, ConnectionLost
from twisted.python.failure import Failure

from tests.test_dialogues import Harness, _TempDirCase, config_from_text

RCPT_ACCEPT = "acl_smtp_rcpt = rcpt\nbegin acl\nrcpt:\n  accept\n"
AUTHENTICATORS = r"""
begin authenticators

LOGIN:
  driver = plaintext
  server_set_id = $auth1
  server_prompts = <| Username: | Password:
  server_condition = ${if and {{eq{$auth1}{alice}}{eq{$auth2}{secret}}}}
"""


def say(harness: Harness, *commands: str) -> None:
    """Send each command in its own packet (no pipelining)."""
    for command in commands:
        harness.send(command.encode() + b"\r\n")


def b64(text: str) -> bytes:
    return base64.b64encode(text.encode()) + b"\r\n"


class SessionLogTests(_TempDirCase):

    def start(self, main: str = "", rest: str = RCPT_ACCEPT, **kwargs: Any) -> Harness:
        harness = Harness(config_from_text(main + rest), self.tmp, **kwargs)
        harness.connect()
        self.assertRegex(harness.output(), rb"\A220 ")
        return harness

    def send_message(self, harness: Harness, *, pipelined: bool,
                     headers: bytes = b"Subject: x\r\n") -> None:
        commands = [b"MAIL FROM:<a@b.test>\r\n", b"RCPT TO:<c@test.ex>\r\n", b"DATA\r\n"]
        if pipelined:
            harness.send(b"".join(commands))
        else:
            for command in commands:
                harness.send(command)
        harness.send(headers + b"\r\nbody\r\n.\r\n")
        self.assertRegex(harness.output(), rb"250 OK id=\S+\r\n\Z")

    def reception(self, harness: Harness) -> list[str]:
        return [line for line in harness.log_lines() if " <= " in line]

    # -- +pipelining --------------------------------------------------------

    def test_pipelining_flags(self) -> None:
        harness = self.start("log_selector = +pipelining\n")
        harness.send(b"EHLO c.test\r\n")
        harness.output()
        self.send_message(harness, pipelined=False)
        self.send_message(harness, pipelined=True)
        first, second = self.reception(harness)
        # "-": the client had not pipelined yet; once it has, it has.
        self.assertIn(" P=esmtp L- S=", first)
        self.assertIn(" P=esmtp L S=", second)

    def test_pipeconnect_offered(self) -> None:
        config = config_from_text("log_selector = +pipelining\n" + RCPT_ACCEPT,
                                  replace=("pipelining_connect_advertise_hosts =",
                                           "pipelining_connect_advertise_hosts = *"))
        harness = Harness(config, self.tmp)
        harness.connect()
        harness.output()
        harness.send(b"EHLO c.test\r\n")
        self.assertIn(b"250-PIPECONNECT\r\n", harness.output())
        self.send_message(harness, pipelined=False)
        (line,) = self.reception(harness)
        self.assertIn(" P=esmtp L.- S=", line)

    def test_no_flag_without_pipelining_advertised(self) -> None:
        harness = self.start("log_selector = +pipelining\n")
        harness.send(b"HELO c.test\r\n")
        harness.output()
        self.send_message(harness, pipelined=False)
        (line,) = self.reception(harness)
        self.assertIn(" P=smtp S=", line)

    # -- the Message-ID -------------------------------------------------------

    def test_message_id_as_an_address(self) -> None:
        harness = self.start()
        harness.send(b"EHLO c.test\r\n")
        self.send_message(harness, pipelined=False,
                          headers=b"Message-ID: <x.1 @ [192.0.2.1]>\r\n")
        harness.send(b"RSET\r\n")
        self.send_message(harness, pipelined=False, headers=b"Message-ID: not an address\r\n")
        with_id, without = self.reception(harness)
        self.assertTrue(with_id.endswith(" id=x.1@[192.0.2.1]"), with_id)
        self.assertNotIn(" id=", without)

    # -- lost connections -------------------------------------------------------

    def test_leaving_between_transactions_is_not_logged(self) -> None:
        harness = self.start()
        harness.send(b"EHLO c.test\r\n")
        self.send_message(harness, pipelined=False)
        harness.server.readConnectionLost()
        self.assertEqual([line for line in harness.log_lines() if " <= " not in line], [])

    def test_leaving_in_a_transaction(self) -> None:
        harness = self.start()
        say(harness, "EHLO c.test", "MAIL FROM:<a@b.test>")
        harness.clock.advance(3)
        harness.server.readConnectionLost()
        self.assertEqual(harness.log_lines(),
                         ["unexpected disconnection while reading SMTP command from "
                          "(c.test) [127.0.0.1] D=3s"])

    def test_reset_in_a_transaction(self) -> None:
        harness = self.start()
        say(harness, "EHLO c.test", "MAIL FROM:<a@b.test>")
        harness.server.connectionLost(Failure(ConnectionLost()))
        self.assertEqual(harness.log_lines(),
                         ["unexpected disconnection while reading SMTP command from "
                          "(c.test) [127.0.0.1] (error: Connection reset by peer) D=0s"])

    def test_lost_in_data(self) -> None:
        harness = self.start()
        say(harness, "EHLO c.test", "MAIL FROM:<a@b.test>", "RCPT TO:<c@test.ex>", "DATA",
            "Subject: x")
        harness.server.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(harness.log_lines(), ["SMTP connection from (c.test) [127.0.0.1] "
                                               "lost while reading message data"])

    # -- +smtp_connection, +smtp_incomplete_transaction ---------------------------

    def test_connection_lines(self) -> None:
        harness = Harness(config_from_text("log_selector = +smtp_connection\n" + RCPT_ACCEPT),
                          self.tmp)
        harness.server.connection_count = 3
        harness.connect()
        say(harness, "EHLO c.test", "QUIT")
        self.assertEqual(harness.log_lines(),
                         ["SMTP connection from [127.0.0.1] (TCP/IP connection count = 3)",
                          "SMTP connection from (c.test) [127.0.0.1] closed by QUIT"])

    def test_connection_lost_between_transactions(self) -> None:
        harness = self.start("log_selector = +smtp_connection\n")
        harness.send(b"EHLO c.test\r\n")
        harness.server.readConnectionLost()
        self.assertEqual(harness.log_lines(), ["SMTP connection from (c.test) [127.0.0.1] "
                                               "lost D=0s"])

    def test_hosts_connection_nolog(self) -> None:
        harness = self.start("log_selector = +smtp_connection\n"
                             "hosts_connection_nolog = 127.0.0.1\n")
        say(harness, "EHLO c.test", "QUIT")
        self.assertEqual(harness.log_lines(), [])

    def test_incomplete_transaction(self) -> None:
        harness = self.start("log_selector = +smtp_incomplete_transaction\n")
        say(harness, "EHLO c.test", "MAIL FROM:<a@b.test>", "RCPT TO:<c@test.ex>",
            "RCPT TO:<d@test.ex>", "RSET", "MAIL FROM:<e@b.test>", "QUIT")
        self.assertEqual(harness.log_lines(), [
            "H=(c.test) [127.0.0.1] incomplete transaction (RSET) from <a@b.test> "
            "for c@test.ex d@test.ex",
            "H=(c.test) [127.0.0.1] incomplete transaction (QUIT) from <e@b.test>"])

    # -- connection policy -------------------------------------------------------

    def test_host_reject_connection(self) -> None:
        harness = Harness(config_from_text("host_reject_connection = 127.0.0.1\n"
                                           + RCPT_ACCEPT), self.tmp)
        harness.connect()
        self.assertEqual(harness.output(), b"554 SMTP service not available\r\n")
        self.assertTrue(harness.transport.disconnecting)
        self.assertEqual(harness.log_lines(), ["refused connection from [127.0.0.1] "
                                               "(host_reject_connection)"])


class AuthLoginTests(_TempDirCase):
    """AUTH LOGIN's answers, whenever they arrive."""

    def start(self) -> Harness:
        config = config_from_text("auth_advertise_hosts = *\n" + RCPT_ACCEPT + AUTHENTICATORS)
        harness = Harness(config, self.tmp)
        harness.connect()
        harness.send(b"EHLO c.test\r\n")
        self.assertIn(b"250-AUTH LOGIN\r\n", harness.output())
        return harness

    def test_one_answer_per_packet(self) -> None:
        harness = self.start()
        harness.send(b"AUTH LOGIN\r\n")
        self.assertEqual(harness.output(), b"334 VXNlcm5hbWU6\r\n")
        username = b64("alice")
        harness.send(username[:3])
        self.assertEqual(harness.output(), b"")
        harness.send(username[3:])
        self.assertEqual(harness.output(), b"334 UGFzc3dvcmQ6\r\n")
        harness.send(b64("secret") + b"MAIL FROM:<a@b.test>\r\n")
        self.assertEqual(harness.output(), b"235 Authentication succeeded\r\n250 OK\r\n")

    def test_client_leaves_mid_exchange(self) -> None:
        harness = self.start()
        harness.send(b"AUTH LOGIN\r\n")
        harness.output()
        harness.server.readConnectionLost()
        self.assertTrue(harness.transport.disconnecting)
        self.assertFalse([line for line in harness.log_lines() if "internal error" in line])


class PrdrReplyTests(_TempDirCase):
    """A PRDR ACL's message is a whole reply, as smtp_user_msg() makes it."""

    def test_message_keeps_its_codes_and_lines(self) -> None:
        config = config_from_text(
            "prdr_enable\nacl_smtp_data_prdr = prdr\n" + RCPT_ACCEPT
            + "prdr:\n  deny local_parts = b\n       message = 550 5.7.1 not for b\\nreally\n"
            "  accept\n")
        harness = Harness(config, self.tmp)
        harness.connect()
        say(harness, "EHLO c.test", "MAIL FROM:<s@b.test> PRDR", "RCPT TO:<a@test.ex>",
            "RCPT TO:<b@test.ex>", "DATA")
        harness.output()
        harness.send(b"Subject: x\r\n\r\nbody\r\n.\r\n")
        replies = harness.output().decode()
        self.assertRegex(replies, r"\A353 PRDR content analysis beginning\r\n"
                                  r"250 PRDR R=<a@test.ex> acceptance\r\n"
                                  r"550-5.7.1 not for b\r\n550 5.7.1 really\r\n"
                                  r"250 id=\S+ message accepted for some recipients\r\n\Z")


class LogRejectTargetTests(_TempDirCase):
    """The log_reject_target modifier, as exim4 -bh logs it."""

    CONFIG = """acl_smtp_rcpt = r
begin acl
r:
  deny local_parts = quiet
       log_reject_target =
  deny local_parts = mainonly
       log_reject_target = main
  deny local_parts = bogus
       log_reject_target = main : bogus
  accept
"""

    def rejected(self, local_part: str) -> list[str]:
        harness = Harness(config_from_text(self.CONFIG), self.tmp)
        harness.connect()
        say(harness, "EHLO x", "MAIL FROM:<a@b.c>", f"RCPT TO:<{local_part}@test.ex>")
        self.assertTrue(harness.output().endswith(b"550 Administrative prohibition\r\n"))
        return harness.log_lines()

    def test_no_log(self) -> None:
        self.assertEqual(self.rejected("quiet"), [])

    def test_main_only(self) -> None:
        self.assertEqual(self.rejected("mainonly"),
                         ["H=(x) [127.0.0.1] F=<a@b.c> rejected RCPT <mainonly@test.ex>"])

    def test_unknown_name(self) -> None:
        self.assertEqual(self.rejected("bogus"),
                         ['unknown log name "bogus" in "log_reject_target" in RCPT ACL',
                          "H=(x) [127.0.0.1] F=<a@b.c> rejected RCPT <bogus@test.ex>"])


class UdpsendTests(_TempDirCase):
    """The udpsend modifier sends one datagram; a real UDP socket on
    loopback receives it."""

    def rcpt_with(self, modifier: str) -> tuple[bytes, list[str]]:
        config = config_from_text(f"acl_smtp_rcpt = r\nbegin acl\nr:\n  accept {modifier}\n")
        harness = Harness(config, self.tmp)
        harness.connect()
        say(harness, "EHLO x", "MAIL FROM:<a@b.c>", "RCPT TO:<u@test.ex>")
        return harness.output(), harness.log_lines()

    def test_datagram_sent(self) -> None:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as receiver:
            receiver.bind(("127.0.0.1", 0))
            receiver.settimeout(5)
            port = receiver.getsockname()[1]
            reply, _ = self.rcpt_with(f"udpsend = 127.0.0.1 : {port} : rcpt $local_part")
            self.assertTrue(reply.endswith(b"250 Accepted\r\n"), reply)
            self.assertEqual(receiver.recv(100), b" rcpt u")

    def test_bad_arguments(self) -> None:
        for value, error in (("127.0.0.1", "missing destination port"),
                             ("127.0.0.1 : x9 : hi", "bad destination port")):
            reply, log = self.rcpt_with(f"udpsend = {value}")
            self.assertTrue(reply.endswith(b"451 Temporary local problem - please try "
                                           b"later\r\n"), reply)
            self.assertIn(f'{error} in "udpsend" modifier', log[-1])


class QuitAndStarttlsAclTests(_TempDirCase):
    """As exim4 -bh logs them: an ERROR from the QUIT ACL, and a refused
    STARTTLS (whose command data is empty, hence the space)."""

    def test_quit_acl_error_and_starttls_refusal(self) -> None:
        config = config_from_text(
            "acl_smtp_quit = q\nacl_smtp_starttls = st\n" + RCPT_ACCEPT
            + "q:\n  accept condition = ${lookup{x}lsearch{/nonexistent}}\n"
              "st:\n  deny message = no tls today\n",
            replace=("tls_advertise_hosts =", "tls_advertise_hosts = *"))
        harness = Harness(config, self.tmp, tls=object())
        harness.connect()
        say(harness, "EHLO x", "STARTTLS", "QUIT")
        self.assertTrue(harness.output().endswith(
            b"550 no tls today\r\n221 myhost.test.ex closing connection\r\n"))
        self.assertEqual(harness.log_lines(), [
            "H=(x) [127.0.0.1] rejected STARTTLS : no tls today",
            'ACL for QUIT returned ERROR: failed to expand ACL string '
            '"${lookup{x}lsearch{/nonexistent}}": failed to open /nonexistent for linear '
            'search: No such file or directory'])


class DataWithoutRecipientsTests(_TempDirCase):
    """DATA when no recipient was accepted, replies as exim4 -bh gives
    them."""

    def replies(self, acl: str, *commands: str) -> bytes:
        harness = Harness(config_from_text(f"acl_smtp_rcpt = r\nbegin acl\nr:\n  {acl}\n"),
                          self.tmp)
        harness.connect()
        harness.output()
        say(harness, *commands)
        return harness.output()

    def test_all_recipients_discarded_still_takes_data(self) -> None:
        out = self.replies("discard", "HELO x", "MAIL FROM:<a@b.c>", "RCPT TO:<x@test.ex>",
                           "DATA", "Subject: x", "", "hi", ".")
        self.assertRegex(out, rb"354 Enter message[^\n]*\n250 OK id=\S+\r\n\Z")

    def test_rcpt_without_mail(self) -> None:
        out = self.replies("accept", "HELO x", "RCPT TO:<x@test.ex>", "DATA")
        self.assertTrue(out.endswith(
            b"503 sender not yet given\r\n"
            b"503-All RCPT commands were rejected with this error:\r\n"
            b"503-503 sender not yet given\r\n"
            b"503 valid RCPT command must precede DATA\r\n"), out)


class MessageLinecountTests(_TempDirCase):
    """$message_linecount as exim4 -bh gives it: the lines received (the
    header/body separator counted even when missing), not the headers the
    MTA adds."""

    def linecount(self, *data: str) -> str:
        config = config_from_text("acl_smtp_data = d\n" + RCPT_ACCEPT
                                  + "d:\n  accept logwrite = lc=$message_linecount\n")
        harness = Harness(config, self.tmp)
        harness.connect()
        say(harness, "EHLO x", "MAIL FROM:<a@b.c>", "RCPT TO:<x@test.ex>", "DATA", *data, ".")
        return next(line for line in harness.log_lines() if "lc=" in line).split("lc=")[1]

    def test_counts(self) -> None:
        self.assertEqual(self.linecount("Subject: x", "From: y@z", "", "hi", "there"), "5")
        self.assertEqual(self.linecount("Subject: x", "\tcontinued", "no-blank: x", "hi"), "5")
