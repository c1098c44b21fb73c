"""The daemon against real peers: swaks, openssl, haproxy and Exim 4.96 as
the sending MTA; and a kill -9 in the middle of 200 messages."""

from __future__ import annotations

import os
import pwd
import re
import shutil
import signal
import smtplib
import socket
import subprocess
import tempfile
import threading
import time
import unittest

from tests.daemon import EximPyDaemon
from tests.peer_haproxy import Haproxy
from tests.peers import free_port, require_program, wait_until

SWAKS = "/usr/bin/swaks"
OPENSSL = "/usr/bin/openssl"
EXIM = "/usr/sbin/exim4"

ACCEPT_ALL = """
acl_smtp_rcpt = acl_check_rcpt
begin acl
acl_check_rcpt:
  accept
"""


def swaks(port: int, *args: str, timeout: float = 30) -> str:
    require_program(SWAKS)
    result = subprocess.run(
        [SWAKS, "--server", f"127.0.0.1:{port}", "--helo", "client.test",
         "--from", "sender@client.test", "--to", "rcpt@mta.test", *args],
        capture_output=True, text=True, timeout=timeout)
    return result.stdout + result.stderr


def _ids(log: str) -> list[str]:
    return re.findall(r"(\S+) <= ", log)


class DaemonCase(unittest.TestCase):
    def daemon(self, config: str, **kw) -> EximPyDaemon:
        daemon = EximPyDaemon(config, **kw)
        self.addCleanup(shutil.rmtree, daemon.directory, True)
        daemon.start()
        self.addCleanup(daemon.stop)
        return daemon


class ReceptionTests(DaemonCase):
    def check_plain(self, mode: str) -> None:
        daemon = self.daemon(ACCEPT_ALL, mode=mode)
        out = swaks(daemon.port, "--pipeline", "--body", "line one\nline two")
        self.assertIn("250 OK id=", out)
        log = daemon.wait_for_log("<= sender@client.test")
        self.assertRegex(log, r"<= sender@client\.test H=\(client\.test\) \[127\.0\.0\.1\] "
                              r"P=esmtp S=\d+")
        [message_id] = daemon.spool_ids()
        header = daemon.header_file(message_id)
        self.assertIn("<sender@client.test>\n", header)
        self.assertIn("\nrcpt@mta.test\n", header)
        self.assertRegex(header, r"\d{3}P Received: from \[127\.0\.0\.1\] \(helo=client\.test\)")
        self.assertIn(b"line one\nline two\n", daemon.body(message_id))

    def test_swaks_twistd(self) -> None:
        self.check_plain("twistd")

    def test_swaks_bd(self) -> None:
        self.check_plain("bd")

    def test_bdat(self) -> None:
        daemon = self.daemon(ACCEPT_ALL)
        with socket.create_connection(("127.0.0.1", daemon.port), timeout=10) as s:
            f = s.makefile("rb")
            f.readline()
            s.sendall(b"EHLO client.test\r\n")
            while not f.readline().startswith(b"250 "):
                pass
            body = b"Subject: chunked\r\n\r\nhello\r\n"
            s.sendall(b"MAIL FROM:<sender@client.test>\r\nRCPT TO:<rcpt@mta.test>\r\n"
                      + f"BDAT {len(body)} LAST\r\n".encode() + body)
            replies = [f.readline() for _ in range(4)]
        self.assertEqual(replies[2], f"250- {len(body)} byte chunk, total {len(body)}\r\n"
                         .encode())
        self.assertTrue(replies[3].startswith(b"250 OK id="))
        log = daemon.wait_for_log("<= sender@client.test")
        self.assertIn(" K S=", log)

    def test_size_limit(self) -> None:
        daemon = self.daemon("message_size_limit = 1K\n" + ACCEPT_ALL)
        out = swaks(daemon.port, "--body", "x" * 3000)
        self.assertIn("552 Message size exceeds maximum permitted", out)
        self.assertEqual(daemon.spool_ids(), [])

    def test_connection_limit(self) -> None:
        daemon = self.daemon("smtp_accept_max = 2\n" + ACCEPT_ALL)
        held = [socket.create_connection(("127.0.0.1", daemon.port), timeout=10)
                for _ in range(2)]
        try:
            for s in held:
                self.assertTrue(s.recv(200).startswith(b"220 "))
            with socket.create_connection(("127.0.0.1", daemon.port), timeout=10) as third:
                self.assertEqual(third.recv(200), b"421 Too many concurrent SMTP "
                                 b"connections; please try again later.\r\n")
        finally:
            for s in held:
                s.close()


class AuthTests(DaemonCase):
    CONFIG = ACCEPT_ALL.replace("  accept\n", "  accept authenticated = *\n  deny\n") + """
begin authenticators
plain:
  driver = plaintext
  public_name = PLAIN
  server_prompts = :
  server_condition = ${if and{{eq{$auth2}{user}}{eq{$auth3}{secret}}}}
  server_set_id = $auth2
"""

    def test_plain(self) -> None:
        daemon = self.daemon(self.CONFIG)
        out = swaks(daemon.port, "--auth", "PLAIN", "--auth-user", "user",
                    "--auth-password", "secret")
        self.assertIn("235 Authentication succeeded", out)
        self.assertIn("250 OK id=", out)
        self.assertIn("P=esmtpa A=plain:user", daemon.wait_for_log("<= sender@client.test"))

    def test_wrong_password(self) -> None:
        daemon = self.daemon(self.CONFIG)
        out = swaks(daemon.port, "--auth", "PLAIN", "--auth-user", "user",
                    "--auth-password", "wrong")
        self.assertIn("535 Incorrect authentication data", out)
        daemon.wait_for_log("plain authenticator failed for (client.test) [127.0.0.1]: "
                            "535 Incorrect authentication data (set_id=user)")


class TLSTests(DaemonCase):
    def setUp(self) -> None:
        from tests.pki import TestPKI

        self.pki = TestPKI(tempfile.mkdtemp(prefix="daemon-pki-"))
        self.addCleanup(shutil.rmtree, self.pki.directory, True)
        self.leaf = self.pki.leaf("mta.test")

    def config(self, ocsp: str | None = None) -> str:
        text = (f"tls_certificate = {self.leaf.chain_path}\n"
                f"tls_privatekey = {self.leaf.key_path}\n")
        if ocsp:
            text += f"tls_ocsp_file = {ocsp}\n"
        return text + ACCEPT_ALL

    def test_starttls_with_swaks(self) -> None:
        daemon = self.daemon(self.config())
        out = swaks(daemon.port, "--tls")
        self.assertIn("220 TLS go ahead", out)
        log = daemon.wait_for_log("<= sender@client.test")
        self.assertRegex(log, r"P=esmtps X=TLS1\.[23]:\S+:\d+ CV=no S=")

    def s_client_status(self, port: int) -> str:
        require_program(OPENSSL)
        result = subprocess.run(
            [OPENSSL, "s_client", "-starttls", "smtp", "-status", "-connect",
             f"127.0.0.1:{port}", "-servername", "mta.test"],
            input="QUIT\n", capture_output=True, text=True, timeout=30)
        return result.stdout

    def test_ocsp_staple_good(self) -> None:
        ocsp = self.pki.ocsp_response(self.leaf)
        out = self.s_client_status(self.daemon(self.config(ocsp)).port)
        self.assertIn("OCSP Response Status: successful", out)
        self.assertIn("Cert Status: good", out)

    def test_ocsp_revoked_not_stapled(self) -> None:
        ocsp = self.pki.ocsp_response(self.leaf, "revoked")
        out = self.s_client_status(self.daemon(self.config(ocsp)).port)
        self.assertIn("OCSP response: no response sent", out)


EXIM_CLIENT = """
exim_user = Debian-exim
exim_group = Debian-exim
never_users =
primary_hostname = client.test
spool_directory = {directory}/spool
log_file_path = {directory}/%slog
deliver_drop_privilege = true
keep_environment =
begin routers
to_daemon:
  driver = manualroute
  route_list = * 127.0.0.1 byname
  transport = to_daemon
  self = send
begin transports
to_daemon:
  driver = smtp
  port = {port}
  hosts_try_prdr = *
  {extra}
begin retry
*  *  F,1m,1m
"""


class EximClientTests(DaemonCase):
    """Exim 4.96 sends to the daemon."""

    def setUp(self) -> None:
        require_program(EXIM)
        if os.geteuid() != 0:
            raise unittest.SkipTest("exim4 -C needs root")
        self.exim_dir = tempfile.mkdtemp(prefix="exim-client-")
        self.addCleanup(shutil.rmtree, self.exim_dir, True)
        user = pwd.getpwnam("Debian-exim")
        os.makedirs(os.path.join(self.exim_dir, "spool"))
        for path in (self.exim_dir, os.path.join(self.exim_dir, "spool")):
            os.chown(path, user.pw_uid, user.pw_gid)
            os.chmod(path, 0o755)

    def exim_send(self, port: int, recipients: list[str], extra: str = "") -> str:
        config = os.path.join(self.exim_dir, "configure")
        with open(config, "w") as f:
            f.write(EXIM_CLIENT.format(directory=self.exim_dir, port=port, extra=extra))
        subprocess.run([EXIM, "-C", config, "-odi", "-f", "sender@client.test", *recipients],
                       input=b"Subject: from exim\n\nhello\n", capture_output=True,
                       timeout=60, env={"PATH": "/usr/sbin:/usr/bin:/bin"})
        try:
            with open(os.path.join(self.exim_dir, "mainlog")) as f:
                return f.read()
        except OSError:
            return ""

    def test_prdr(self) -> None:
        daemon = self.daemon("""
prdr_enable = true
acl_smtp_rcpt = accept_all
acl_smtp_data_prdr = per_rcpt
begin acl
accept_all:
  accept
per_rcpt:
  defer local_parts = later
  deny  local_parts = never
  accept
""")
        log = self.exim_send(daemon.port, ["good@mta.test", "later@mta.test",
                                           "never@mta.test"])
        self.assertRegex(log, r"=> good@mta\.test R=to_daemon T=to_daemon .*PRDR")
        self.assertRegex(log, r"== later@mta\.test R=to_daemon T=to_daemon defer")
        self.assertRegex(log, r"\*\* never@mta\.test R=to_daemon T=to_daemon .*550 PRDR "
                              r"R=<never@mta\.test> refusal")
        ours = daemon.wait_for_log(" <= sender@client.test")
        self.assertIn("PRDR R=<good@mta.test> acceptance", ours)
        self.assertIn("PRDR R=<later@mta.test> temporary refusal", ours)
        self.assertIn("PRDR R=<never@mta.test> refusal", ours)
        self.assertRegex(ours, r"<= sender@client\.test H=\(client\.test\) \[127\.0\.0\.1\] "
                               r"P=esmtps X=\S+ CV=no PRDR K S=")

    def ocsp_daemon(self, status: str) -> tuple[EximPyDaemon, str]:
        from tests.pki import TestPKI

        pki = TestPKI(tempfile.mkdtemp(prefix="daemon-pki-"))
        self.addCleanup(shutil.rmtree, pki.directory, True)
        for path in (pki.directory,):
            os.chmod(path, 0o755)
        leaf = pki.leaf("mta.test")
        ocsp = pki.ocsp_response(leaf, status)
        daemon = self.daemon(f"tls_certificate = {leaf.chain_path}\n"
                             f"tls_privatekey = {leaf.key_path}\n"
                             f"tls_ocsp_file = {ocsp}\n" + ACCEPT_ALL)
        shutil.copy(pki.ca_path, os.path.join(self.exim_dir, "ca.pem"))
        os.chmod(os.path.join(self.exim_dir, "ca.pem"), 0o644)
        return daemon, (f"hosts_require_ocsp = *\n  hosts_require_tls = *\n"
                        f"  tls_verify_certificates = {self.exim_dir}/ca.pem\n"
                        f"  tls_sni = mta.test\n"
                        f"  tls_verify_cert_hostnames = :")

    def test_ocsp_required_and_stapled(self) -> None:
        daemon, extra = self.ocsp_daemon("good")
        log = self.exim_send(daemon.port, ["good@mta.test"], extra)
        self.assertRegex(log, r"=> good@mta\.test R=to_daemon T=to_daemon .*CV=yes")

    def test_ocsp_required_revoked_defers(self) -> None:
        daemon, extra = self.ocsp_daemon("revoked")
        log = self.exim_send(daemon.port, ["good@mta.test"], extra)
        self.assertRegex(log, r"== good@mta\.test R=to_daemon T=to_daemon defer \(-37\)")
        self.assertEqual(daemon.spool_ids(), [])


class ProxyTests(DaemonCase):
    CONFIG = "hosts_proxy = 127.0.0.2\nproxy_protocol_timeout = 1s\n" \
             "log_selector = +proxy\n" + ACCEPT_ALL

    def check_through(self, mode: str) -> None:
        daemon = self.daemon(self.CONFIG)
        proxy = Haproxy(daemon.port, mode=mode)
        proxy.start()
        self.addCleanup(proxy.stop)
        out = swaks(proxy.port)
        self.assertIn("250 OK id=", out)
        log = daemon.wait_for_log("<= sender@client.test")
        self.assertRegex(log, r"<= sender@client\.test H=\(client\.test\) \[127\.0\.0\.1\] "
                              r"P=esmtp PRX=127\.0\.0\.2 S=")

    def test_send_proxy_v1(self) -> None:
        self.check_through("send-proxy")

    def test_send_proxy_v2(self) -> None:
        self.check_through("send-proxy-v2")

    def test_missing_header_then_503(self) -> None:
        daemon = self.daemon(self.CONFIG)
        with socket.socket() as s:
            s.bind(("127.0.0.2", 0))
            s.settimeout(10)
            s.connect(("127.0.0.1", daemon.port))
            f = s.makefile("rb")
            started = time.monotonic()
            self.assertTrue(f.readline().startswith(b"220 "))
            self.assertGreater(time.monotonic() - started, 0.5)
            s.sendall(b"EHLO client.test\r\n")
            self.assertEqual(f.readline(),
                             b"503 Command refused, required Proxy negotiation failed\r\n")
            s.sendall(b"QUIT\r\n")
            self.assertEqual(f.readline(), b"221 mta.test closing connection\r\n")


class CrashTests(DaemonCase):
    """kill -9 while 200 messages are being sent: every message that got a
    250 is in the spool afterwards, intact."""

    def test_kill9_loses_nothing_acknowledged(self) -> None:
        daemon = self.daemon(ACCEPT_ALL)
        acknowledged: dict[str, bytes] = {}
        lock = threading.Lock()
        counter = iter(range(200))

        def sender() -> None:
            try:
                client = smtplib.SMTP("127.0.0.1", daemon.port, timeout=10)
                client.ehlo("client.test")
            except (OSError, smtplib.SMTPException):
                return
            while True:
                with lock:
                    n = next(counter, None)
                if n is None:
                    break
                body = f"Subject: message {n}\r\n\r\nbody of message {n}\r\n".encode()
                try:
                    client.mail("sender@client.test")
                    client.rcpt("rcpt@mta.test")
                    code, reply = client.data(body)
                except (OSError, smtplib.SMTPException):
                    return
                if code == 250:
                    message_id = reply.decode().split("id=")[1]
                    with lock:
                        acknowledged[message_id] = f"body of message {n}\n".encode()
            client.close()

        threads = [threading.Thread(target=sender) for _ in range(5)]
        for t in threads:
            t.start()
        wait_until(lambda: len(acknowledged) >= 100, timeout=60)
        os.kill(daemon.process.pid, signal.SIGKILL)
        for t in threads:
            t.join(30)
        daemon.kill9()
        daemon.start()
        self.assertGreaterEqual(len(acknowledged), 100)
        kept = set(daemon.spool_ids())
        missing = set(acknowledged) - kept
        self.assertEqual(missing, set())
        for message_id, body in acknowledged.items():
            self.assertTrue(daemon.body(message_id).endswith(body), message_id)
            self.assertIn("\nrcpt@mta.test\n", daemon.header_file(message_id))
        self.assertFalse([n for n in daemon.spool_files() if n.startswith("hdr.")])


class ManholeTests(DaemonCase):
    """The daemon starts the manhole its configuration asks for."""

    def test_manhole_listens_on_loopback(self) -> None:
        users = os.path.join(tempfile.mkdtemp(prefix="exim-py-manhole-"), "users")
        self.addCleanup(shutil.rmtree, os.path.dirname(users), True)
        with open(users, "w") as f:
            f.write("admin:secret\n")
        os.chmod(users, 0o600)
        port = free_port()
        daemon = self.daemon(f"manhole_port = {port}\nmanhole_users = {users}\n" + ACCEPT_ALL)
        daemon.wait_for_log(f"manhole listening for SSH on [127.0.0.1]:{port}")
        with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
            self.assertTrue(s.recv(100).startswith(b"SSH-2.0-"))
