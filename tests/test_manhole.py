"""The manhole: a real SSH client (conch's, and OpenSSH's ``ssh`` when
installed) against the real server on a free loopback port."""

from __future__ import annotations

import os
import re
import stat
from typing import Any

from cryptography.hazmat.primitives.asymmetric import ed25519
from twisted.conch.client.knownhosts import KnownHostsFile
from twisted.conch.endpoints import AuthenticationFailed, SSHCommandClientEndpoint
from twisted.conch.ssh import keys
from twisted.internet import defer, protocol, reactor, task
from twisted.internet.error import CannotListenError, ConnectionDone, ProcessTerminated
from twisted.python import usage
from twisted.python.filepath import FilePath
from twisted.trial import unittest

from tests.peers import require_program
from twisted_mta.config import parse_config_text
from twisted_mta.log import DEFAULT_LOG_SELECTOR, EximLog, SyncLogWriter
from twisted_mta.manhole import (
    HOST_KEY_NAME,
    ManholeError,
    ManholeOptionsMixin,
    ManholeService,
    _UserAuth,
    hash_password,
    manhole_service,
    manhole_settings,
    read_authorized_keys,
    read_users,
)

SSH = "/usr/bin/ssh"


class RecordingLog:
    """Stands in for EximLog: keeps (text, targets)."""

    def __init__(self) -> None:
        self.lines: list[tuple[str, tuple[str, ...]]] = []

    def write(self, text: str, targets: Any = ("main",), **kw: Any) -> None:
        self.lines.append((text, tuple(targets)))

    def texts(self) -> list[str]:
        return [text for text, _ in self.lines]

    def matching(self, pattern: str) -> list[tuple[str, tuple[str, ...]]]:
        return [(t, g) for t, g in self.lines if re.search(pattern, t)]


class NoUI:
    """Refuses any prompt (the known-hosts file must already hold the key)."""

    def prompt(self, text: bytes) -> defer.Deferred[bool]:
        return defer.succeed(False)

    def warn(self, text: bytes) -> None:
        pass


class Collect(protocol.Protocol):
    """Gathers a command's output; ``finished`` fires with (output, reason)."""

    def __init__(self) -> None:
        self.data = b""
        self.finished: defer.Deferred[tuple[bytes, Any]] = defer.Deferred()

    def dataReceived(self, data: bytes) -> None:
        self.data += data

    def connectionLost(self, reason: Any = None) -> None:
        self.finished.callback((self.data, reason.value if reason else None))


class OpenSSHRun(protocol.ProcessProtocol):
    """Runs ``ssh`` with some standard input; ``done`` fires with
    (stdout, stderr, exit code)."""

    def __init__(self, stdin: bytes) -> None:
        self.stdin = stdin
        self.out = b""
        self.err = b""
        self.done: defer.Deferred[tuple[bytes, bytes, int]] = defer.Deferred()

    def connectionMade(self) -> None:
        self.transport.write(self.stdin)
        self.transport.closeStdin()

    def outReceived(self, data: bytes) -> None:
        self.out += data

    def errReceived(self, data: bytes) -> None:
        self.err += data

    def processEnded(self, reason: Any) -> None:
        self.done.callback((self.out, self.err, reason.value.exitCode))


def write_file(path: str, text: str, mode: int = 0o600) -> str:
    with open(path, "w") as f:
        f.write(text)
    os.chmod(path, mode)
    return path


class ManholeTestCase(unittest.TestCase):
    timeout = 60

    def setUp(self) -> None:
        self.dir = os.path.abspath(self.mktemp())
        os.makedirs(self.dir)
        self.spool = os.path.join(self.dir, "spool")
        self.users = write_file(os.path.join(self.dir, "users"),
                                "# manhole users\nadmin:secret\nops:pa:ss\n")
        self.client_key = keys.Key(ed25519.Ed25519PrivateKey.generate())
        self.other_key = keys.Key(ed25519.Ed25519PrivateKey.generate())
        public = self.client_key.public().toString("openssh").decode()
        self.authorized = write_file(os.path.join(self.dir, "authorized_keys"),
                                     f"{public} tester@example\n")
        self.log = RecordingLog()
        self.made: list[dict[str, Any]] = []

    def config(self, text: str = "", credentials: bool = True) -> Any:
        lines = [f"spool_directory = {self.spool}", "primary_hostname = manhole.example"]
        if credentials:
            lines += [f"manhole_users = {self.users}",
                      f"manhole_authorized_keys = {self.authorized}"]
        return parse_config_text("\n".join(lines) + "\n" + text, "/etc/x.conf")

    def namespace(self) -> dict[str, Any]:
        namespace = {"config": self._config, "sessions": ["s1", "s2"],
                     "later": self.later}
        self.made.append(namespace)
        return namespace

    def later(self, value: Any) -> defer.Deferred[Any]:
        d: defer.Deferred[Any] = defer.Deferred()
        reactor.callLater(0.05, d.callback, value)
        return d

    def start(self, text: str = "manhole_port = 0\n", options: Any = None,
              log: Any = None, credentials: bool = True) -> ManholeService:
        self._config = self.config(text, credentials)
        svc = manhole_service(self._config, options, self.namespace, reactor,
                              log=log if log is not None else self.log)
        self.assertIsInstance(svc, ManholeService)
        svc.startService()
        self.addCleanup(svc.stopService)
        self.svc = svc
        self.port = svc.listening[0][1]
        self.known_hosts = KnownHostsFile(FilePath(os.path.join(self.dir, "known_hosts")))
        self.known_hosts.addHostKey(b"127.0.0.1", svc.host_key.public())
        return svc

    @defer.inlineCallbacks
    def exec(self, command: bytes, user: bytes = b"admin", password: bytes | None = None,
            key: keys.Key | None = None) -> Any:
        endpoint = SSHCommandClientEndpoint.newConnection(
            reactor, command, user, b"127.0.0.1", self.port,
            keys=[key] if key is not None else None, password=password,
            knownHosts=self.known_hosts, ui=NoUI())
        connected = yield endpoint.connect(protocol.Factory.forProtocol(Collect))
        output, reason = yield connected.finished
        yield self.server_sessions_closed()
        if isinstance(reason, ProcessTerminated):
            status = reason.exitCode
        else:
            self.assertIsInstance(reason, ConnectionDone)
            status = 0
        return output, status

    def server_sessions_closed(self) -> defer.Deferred[Any]:
        factory = self.svc._factory
        return defer.gatherResults(list(factory.connections.values()))

    @defer.inlineCallbacks
    def refused(self, **kw: Any) -> Any:
        failure = yield self.assertFailure(self.exec(b"1+1", **kw), AuthenticationFailed)
        yield self.server_sessions_closed()
        return failure


class PasswordLoginTests(ManholeTestCase):
    @defer.inlineCallbacks
    def test_password_login_evaluates(self) -> Any:
        self.start()
        output, status = yield self.exec(b"1+1", password=b"secret")
        self.assertEqual((output, status), (b"2\n", 0))
        output, status = yield self.exec(
            b"config.get('primary_hostname'); len(sessions)", password=b"secret")
        self.assertEqual((output, status), (b"'manhole.example'\n2\n", 0))
        logins = self.log.matching(r"^manhole login from ")
        self.assertEqual(len(logins), 2)
        self.assertRegex(logins[0][0],
                         r"^manhole login from \[127\.0\.0\.1\]:\d+ A=password:admin$")
        self.assertEqual(logins[0][1], ("main",))
        self.assertRegex(self.log.texts()[-1],
                         r"^manhole logout from \[127\.0\.0\.1\]:\d+ A=password:admin$")

    @defer.inlineCallbacks
    def test_password_with_colon(self) -> Any:
        self.start()
        output, _ = yield self.exec(b"'ok'", user=b"ops", password=b"pa:ss")
        self.assertEqual(output, b"'ok'\n")

    @defer.inlineCallbacks
    def test_wrong_password_refused(self) -> Any:
        self.start()
        # conch's client tries its one password again and again, each try
        # answered after a delay, until the server hangs up.
        self.patch(_UserAuth, "passwordDelay", 0.01)
        yield self.refused(password=b"wrong")
        failed = self.log.matching(r"^manhole login failed")
        self.assertEqual(len(failed), _UserAuth.attemptsBeforeDisconnect + 1)
        for text, targets in failed:
            self.assertRegex(text, r"^manhole login failed from \[127\.0\.0\.1\]:\d+ "
                                   r"A=password:admin: wrong password$")
            self.assertEqual(targets, ("main", "reject"))
        self.assertEqual(self.log.matching(r"^manhole login from"), [])
        self.assertEqual(self.made, [])

    @defer.inlineCallbacks
    def test_unknown_user_refused(self) -> Any:
        self.start()
        self.patch(_UserAuth, "passwordDelay", 0.01)
        yield self.refused(user=b"nobody", password=b"secret")
        self.assertRegex(self.log.matching(r"^manhole login failed")[0][0],
                         r"A=password:nobody: unknown user$")

    @defer.inlineCallbacks
    def test_bcrypt_hash(self) -> Any:
        import bcrypt

        hashed = bcrypt.hashpw(b"hashed pw", bcrypt.gensalt(rounds=4)).decode()
        write_file(self.users, f"admin:{hashed}\n")
        self.start()
        output, _ = yield self.exec(b"6*7", password=b"hashed pw")
        self.assertEqual(output, b"42\n")
        self.patch(_UserAuth, "passwordDelay", 0.01)
        yield self.refused(password=hashed.encode())

    @defer.inlineCallbacks
    def test_users_file_reread_at_login(self) -> Any:
        self.start()
        write_file(self.users, "admin:changed\n")
        output, _ = yield self.exec(b"1", password=b"changed")
        self.assertEqual(output, b"1\n")


class KeyLoginTests(ManholeTestCase):
    @defer.inlineCallbacks
    def test_key_login(self) -> Any:
        self.start()
        output, status = yield self.exec(b"sessions[0]", user=b"anyone", key=self.client_key)
        self.assertEqual((output, status), (b"'s1'\n", 0))
        login = self.log.matching(r"^manhole login from")[0][0]
        fingerprint = self.client_key.fingerprint(
            keys.FingerprintFormats.SHA256_BASE64).rstrip("=")
        self.assertRegex(login, r"^manhole login from \[127\.0\.0\.1\]:\d+ "
                                r"A=publickey:anyone \(ssh-ed25519 SHA256:(.*) tester@example\)$")
        self.assertIn(f"SHA256:{fingerprint} ", login)

    @defer.inlineCallbacks
    def test_other_key_refused(self) -> Any:
        self.start()
        yield self.refused(key=self.other_key)
        # The client asks whether the key would do before signing with it,
        # so an unknown key is turned away without a signed attempt.
        self.assertEqual(self.log.matching(r"^manhole login"), [])

    @defer.inlineCallbacks
    def test_keys_only(self) -> Any:
        """Without manhole_users, passwords are not even offered."""
        self.start(f"manhole_port = 0\nmanhole_authorized_keys = {self.authorized}\n",
                   credentials=False)
        yield self.refused(password=b"secret")
        self.assertEqual(len(self.log.matching(r"^manhole listening .*, auth publickey, host key ")), 1)

    def test_authorized_keys_with_options_ignored(self) -> None:
        public = self.client_key.public().toString("openssh").decode()
        write_file(self.authorized, f'from="10.0.0.1" {public} restricted\n'
                                    "ssh-ed25519 not-base64!\n"
                                    f"# comment\n\n{public}\n")
        found, warnings = read_authorized_keys(self.authorized)
        self.assertEqual([k.lineno for k in found], [5])
        self.assertEqual(len(warnings), 2)
        self.assertIn("line 1 of", warnings[0])
        self.assertIn("key options are not supported", warnings[0])
        self.assertIn("line 2 of", warnings[1])
        self.start()
        self.assertEqual(len(self.log.matching(r"^manhole: manhole_authorized_keys: line")), 2)


class SessionTests(ManholeTestCase):
    @defer.inlineCallbacks
    def test_error_sets_exit_status(self) -> Any:
        self.start()
        output, status = yield self.exec(b"print('before'); 1/0", password=b"secret")
        self.assertEqual((output, status), (b"before\n", 1))
        output, status = yield self.exec(b"if", password=b"secret")
        self.assertEqual((output, status), (b"", 1))

    @defer.inlineCallbacks
    def test_exit_ends_only_the_session(self) -> Any:
        self.start()
        output, status = yield self.exec(b"print('x'); raise SystemExit(3)", password=b"secret")
        self.assertEqual((output, status), (b"x\n", 3))
        output, status = yield self.exec(b"exit()", password=b"secret")
        self.assertEqual(status, 0)
        self.assertTrue(self.svc.running)
        output, _ = yield self.exec(b"2+2", password=b"secret")
        self.assertEqual(output, b"4\n")

    @defer.inlineCallbacks
    def test_deferred_result_is_waited_for(self) -> Any:
        self.start()
        output, status = yield self.exec(b"later(5)", password=b"secret")
        self.assertEqual(output, b"<Deferred #0>\nDeferred #0 called back: 5\n")
        self.assertEqual(status, 0)

    @defer.inlineCallbacks
    def test_fresh_namespace_per_session(self) -> Any:
        self.start()
        output, _ = yield self.exec(b"sessions.append('s3'); x = 1; x", password=b"secret")
        self.assertEqual(output, b"1\n")
        output, status = yield self.exec(b"x", password=b"secret")
        self.assertEqual(status, 1)
        output, _ = yield self.exec(b"len(sessions), __name__", password=b"secret")
        self.assertEqual(output, b"(2, '__manhole__')\n")
        self.assertEqual(len(self.made), 3)

    @defer.inlineCallbacks
    def test_help(self) -> Any:
        self.start()
        output, _ = yield self.exec(b"help", password=b"secret")
        text = output.decode()
        self.assertIn("exim-py manhole in pid", text)
        for name in ("config", "sessions", "later", "reactor", "help"):
            self.assertRegex(text, rf"\n  {name} +\S")
        self.assertIn("Config: A loaded configuration.", text)
        output, _ = yield self.exec(b"help(len)", password=b"secret")
        self.assertIn(b"Return the number of items", output)

    @defer.inlineCallbacks
    def test_stop_drops_sessions(self) -> Any:
        self.start()
        # A command that never finishes: a Deferred nobody fires.
        endpoint = SSHCommandClientEndpoint.newConnection(
            reactor, b"from twisted.internet.defer import Deferred; Deferred()", b"admin",
            b"127.0.0.1", self.port, password=b"secret", knownHosts=self.known_hosts, ui=NoUI())
        connected = yield endpoint.connect(protocol.Factory.forProtocol(Collect))
        while not connected.data:
            yield task.deferLater(reactor, 0.01, lambda: None)
        self.assertEqual(connected.data, b"<Deferred #0>\n")
        yield self.svc.stopService()
        self.assertEqual(self.svc.listening, [])
        # conch's client does not tell its channels when the connection
        # drops, so watch its TCP connection instead.
        client_tcp = connected.transport.conn.transport.transport
        for _ in range(500):
            if client_tcp.disconnected:
                break
            yield task.deferLater(reactor, 0.01, lambda: None)
        self.assertTrue(client_tcp.disconnected)


class SettingsTests(ManholeTestCase):
    def test_off_by_default(self) -> None:
        self.assertIsNone(manhole_service(self.config(), None, dict, reactor))
        self.assertIsNone(manhole_settings(self.config(), {}))

    def test_no_credentials_refused(self) -> None:
        config = self.config("manhole_port = 2222\n", credentials=False)
        e = self.assertRaises(ManholeError, manhole_service, config, None, dict, reactor)
        self.assertIn("manhole_users", str(e))
        self.assertIn("manhole_authorized_keys", str(e))
        self.assertIn("manhole_port", str(e))

    def test_non_loopback_refused(self) -> None:
        for address in ("192.0.2.1", "0.0.0.0", "<; ::", "<; 127.0.0.1 ; 10.1.2.3"):
            config = self.config(f"manhole_port = 2222\nmanhole_address = {address}\n")
            e = self.assertRaises(ManholeError, manhole_service, config, None, dict, reactor)
            self.assertIn("manhole_address", str(e))
            self.assertIn("manhole_allow_remote", str(e))
        e = self.assertRaises(ManholeError, manhole_settings, self.config(
            "manhole_port = 2222\n"), {"manhole-address": "192.0.2.1"})
        self.assertIn("--manhole-address: 192.0.2.1 is not a loopback address", str(e))
        e = self.assertRaises(ManholeError, manhole_settings, self.config(
            "manhole_port = 2222\nmanhole_address = localhost\n"))
        self.assertIn('manhole_address: "localhost" is not an IP address', str(e))

    def test_loopback_addresses(self) -> None:
        settings = manhole_settings(self.config(
            "manhole_port = 2222\nmanhole_address = <; 127.0.0.2 ; [::1] ; ::ffff:127.0.0.1\n"))
        self.assertEqual(settings.addresses, ("127.0.0.2", "::1", "::ffff:127.0.0.1"))
        self.assertEqual(manhole_settings(self.config("manhole_port = 2222\n")).addresses,
                         ("127.0.0.1",))
        for text in ("::1", "[::1]", "0:0:0::1"):
            settings = manhole_settings(self.config(
                f"manhole_port = 2222\nmanhole_address = {text}\n"))
            self.assertEqual(settings.addresses, ("::1",))

    def test_allow_remote(self) -> None:
        settings = manhole_settings(self.config(
            "manhole_port = 2222\nmanhole_address = 192.0.2.1\nmanhole_allow_remote\n"))
        self.assertEqual(settings.addresses, ("192.0.2.1",))
        settings = manhole_settings(self.config(
            "manhole_port = 2222\nmanhole_address = 0.0.0.0\n"),
            {"manhole-allow-remote": 1})
        self.assertEqual(settings.addresses, ("0.0.0.0",))

    def test_unreadable_files_refused(self) -> None:
        missing = os.path.join(self.dir, "missing")
        config = self.config(f"manhole_port = 0\nmanhole_users = {missing}\n", credentials=False)
        e = self.assertRaises(ManholeError, manhole_service, config, None, dict, reactor)
        self.assertIn(f"manhole_users: cannot read {missing}", str(e))
        write_file(self.users, "admin secret\n")
        e = self.assertRaises(ManholeError, manhole_service, self.config("manhole_port = 0\n"),
                              None, dict, reactor)
        self.assertIn("manhole_users: line 1 of", str(e))

    def test_read_users(self) -> None:
        hashed = hash_password("pw")
        write_file(self.users, f"  # c\n\na:b:c\n b : x \nh:{hashed}\na:second\n")
        self.assertEqual(read_users(self.users),
                         {b"a": b"b:c", b"b ": b" x", b"h": hashed.encode()})

    def test_plugin_options_override(self) -> None:
        from tests.test_plugin import find_plugin

        plugin = find_plugin()
        path = write_file(os.path.join(self.dir, "exim.conf"),
                          f"spool_directory = {self.spool}\nmanhole_port = 2222\n"
                          f"manhole_users = {self.users}\n")
        options = plugin.options()
        options.parseOptions(["-C", path, "--manhole", "2525", "--manhole-keys",
                              self.authorized, "--manhole-address", "::1"])
        config = parse_config_text(open(path).read(), path)
        settings = manhole_settings(config, options)
        self.assertEqual(settings.port, 2525)
        self.assertEqual(settings.addresses, ("::1",))
        self.assertEqual(settings.users_file, self.users)
        self.assertEqual(settings.keys_file, self.authorized)
        self.assertEqual(settings.option("port"), "--manhole")
        self.assertEqual(settings.option("users"), "manhole_users")
        self.assertEqual(settings.methods, ("password", "publickey"))
        self.assertRaises(usage.UsageError, plugin.options().parseOptions,
                          ["--manhole", "nope"])
        # Without --manhole the config's port (or its absence) decides.
        options = plugin.options()
        options.parseOptions(["-C", path])
        self.assertEqual(manhole_settings(config, options).port, 2222)

    def test_options_mixin(self) -> None:
        class Options(ManholeOptionsMixin, usage.Options):
            pass

        options = Options()
        options.parseOptions(["--manhole", "0", "--manhole-passwords", self.users,
                              "--manhole-allow-remote", "--manhole-address", "192.0.2.7"])
        settings = manhole_settings(self.config(credentials=False), options)
        self.assertEqual((settings.port, settings.users_file, settings.allow_remote),
                         (0, self.users, True))
        self.assertEqual(settings.option("allow_remote"), "--manhole-allow-remote")


class HostKeyTests(ManholeTestCase):
    def test_created_once_with_mode_0600_and_reused(self) -> None:
        config = self.config("manhole_port = 0\n")
        first = manhole_service(config, None, dict, reactor, log=self.log)
        path = os.path.join(self.spool, "db", HOST_KEY_NAME)
        self.assertEqual(stat.S_IMODE(os.stat(path).st_mode), 0o600)
        self.assertEqual(first.host_key.sshType(), b"ssh-ed25519")
        self.assertEqual(keys.Key.fromFile(path), first.host_key)
        second = manhole_service(config, None, dict, reactor, log=self.log)
        self.assertEqual(second.host_key, first.host_key)
        first.startService()
        self.addCleanup(first.stopService)
        generated = self.log.matching(r"^manhole: generated host key ")
        self.assertEqual(len(generated), 1)
        self.assertIn(path, generated[0][0])
        second.startService()
        self.addCleanup(second.stopService)
        self.assertEqual(len(self.log.matching(r"^manhole: generated host key ")), 1)

    def test_open_key_file_refused(self) -> None:
        config = self.config("manhole_port = 0\n")
        manhole_service(config, None, dict, reactor)
        path = os.path.join(self.spool, "db", HOST_KEY_NAME)
        os.chmod(path, 0o644)
        e = self.assertRaises(ManholeError, manhole_service, config, None, dict, reactor)
        self.assertIn("mode 0644", str(e))

    def test_configured_host_key(self) -> None:
        key = keys.Key(ed25519.Ed25519PrivateKey.generate())
        path = os.path.join(self.dir, "host_key")
        with open(path, "wb") as f:
            f.write(key.toString("openssh"))
        os.chmod(path, 0o600)
        svc = manhole_service(self.config(f"manhole_port = 0\nmanhole_host_key = {path}\n"),
                              None, dict, reactor)
        self.assertEqual(svc.host_key, key)
        self.assertFalse(os.path.exists(os.path.join(self.spool, "db", HOST_KEY_NAME)))
        write_file(path, "not a key\n")
        e = self.assertRaises(ManholeError, manhole_service, self.config(
            f"manhole_port = 0\nmanhole_host_key = {path}\n"), None, dict, reactor)
        self.assertIn("manhole_host_key:", str(e))
        public = os.path.join(self.dir, "host_key.pub")
        with open(public, "wb") as f:
            f.write(key.public().toString("openssh"))
        os.chmod(public, 0o600)
        e = self.assertRaises(ManholeError, manhole_service, self.config(
            f"manhole_port = 0\nmanhole_host_key = {public}\n"), None, dict, reactor)
        self.assertIn("is a public key", str(e))


class LogTests(ManholeTestCase):
    def test_start_line_in_the_main_log(self) -> None:
        log_path = os.path.join(self.dir, "log", "%slog")
        log = EximLog(log_path, self.spool, DEFAULT_LOG_SELECTOR, reactor, 4242,
                      SyncLogWriter())
        self.addCleanup(log.close)
        svc = self.start(log=log)
        with open(os.path.join(self.dir, "log", "mainlog")) as f:
            lines = f.read().splitlines()
        fingerprint = svc.host_key.fingerprint(keys.FingerprintFormats.SHA256_BASE64)
        self.assertRegex(lines[0], r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d manhole: generated "
                                   r"host key \S+/db/manhole_host_key \(ssh-ed25519 ")
        self.assertEqual(
            lines[1][20:],
            f"manhole listening for SSH on [127.0.0.1]:{self.port}, auth password publickey, "
            f"host key ssh-ed25519 SHA256:{fingerprint.rstrip('=')}")

    def test_log_may_be_a_callable(self) -> None:
        self.start(log=lambda: self.log)
        self.assertRegex(self.log.texts()[-1], r"^manhole listening for SSH on ")

    def test_bind_failure(self) -> None:
        self.start()
        config = self.config(f"manhole_port = {self.port}\n")
        other = manhole_service(config, None, dict, reactor, log=self.log)
        self.assertRaises(CannotListenError, other.startService)
        text, targets = self.log.lines[-1]
        self.assertRegex(text, rf"^manhole: socket bind\(\) to port {self.port} for address "
                               r"127\.0\.0\.1 failed: .*: manhole abandoned$")
        self.assertEqual(targets, ("main", "panic"))


class OpenSSHTests(ManholeTestCase):
    """OpenSSH's ssh client: a command, a script on standard input, and a
    terminal session."""

    def setUp(self) -> None:
        super().setUp()
        self.ssh = require_program(SSH)
        self.key_path = os.path.join(self.dir, "id_ed25519")
        with open(self.key_path, "wb") as f:
            f.write(self.client_key.toString("openssh"))
        os.chmod(self.key_path, 0o600)

    def ssh_run(self, *options: str, command: str | None = None,
                stdin: bytes = b"") -> defer.Deferred[Any]:
        known = os.path.join(self.dir, "ssh_known_hosts")
        with open(known, "wb") as f:
            f.write(b"[127.0.0.1]:%d " % self.port + self.svc.host_key.public().toString(
                "openssh") + b"\n")
        argv = [self.ssh, "-F", "/dev/null", "-p", str(self.port), "-i", self.key_path,
                "-o", "IdentitiesOnly=yes", "-o", "IdentityAgent=none",
                "-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=yes",
                "-o", f"UserKnownHostsFile={known}", "-o", "LogLevel=ERROR",
                *options, "admin@127.0.0.1", *([command] if command is not None else [])]
        run = OpenSSHRun(stdin)
        reactor.spawnProcess(run, self.ssh, argv,
                             env={"PATH": "/usr/bin:/bin", "HOME": self.dir})
        return run.done

    @defer.inlineCallbacks
    def test_command(self) -> Any:
        self.start()
        out, err, status = yield self.ssh_run(command="len(sessions) + 40")
        self.assertEqual((out, status), (b"42\n", 0), err)
        out, err, status = yield self.ssh_run(command="1/0")
        self.assertEqual(status, 1)
        self.assertIn(b"ZeroDivisionError: division by zero", err)
        yield self.server_sessions_closed()

    @defer.inlineCallbacks
    def test_script_on_standard_input(self) -> Any:
        self.start()
        script = (b"x = 6\nx * 7\nfor i in range(2):\n    print(i)\n\n"
                  b"undefined_name\nlater('fired')\nif x:\n    'last'\n")
        out, err, status = yield self.ssh_run("-T", stdin=script)
        self.assertEqual(out, b"42\n0\n1\n<Deferred #0>\n'last'\n"
                              b"Deferred #0 called back: 'fired'\n")
        self.assertIn(b"NameError: name 'undefined_name' is not defined", err)
        self.assertEqual(status, 1)
        yield self.server_sessions_closed()

    @defer.inlineCallbacks
    def test_terminal(self) -> Any:
        self.start()
        out, err, status = yield self.ssh_run("-tt", stdin=b"6 * 7\r\x04")
        self.assertIn(b"exim-py manhole in pid", out)
        self.assertIn(b"42", out)
        self.assertEqual(status, 0, err)
        yield self.server_sessions_closed()
