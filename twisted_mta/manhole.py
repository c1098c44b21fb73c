"""The manhole: an interactive Python prompt inside the running daemon,
served over SSH (twisted.conch) on loopback only.

It is off unless ``manhole_port`` (or the twistd option ``--manhole``) is
set, and it refuses to start unless a password file (``manhole_users``) or
an OpenSSH ``authorized_keys`` file (``manhole_authorized_keys``) is
configured.  Each SSH session gets a fresh namespace from the daemon's
*namespace_factory* plus ``help``; see ``doc/manhole.md``.

Three ways in:

- ``ssh -p PORT user@127.0.0.1``: a terminal (pty) gets the coloured
  line-editing prompt of :mod:`twisted.conch.manhole`;
- ``ssh -p PORT user@127.0.0.1 'len(sessions)'``: the command is run as
  Python source, the values of its expression statements are printed and
  the exit status is 1 when it raised;
- ``ssh -T -p PORT user@127.0.0.1 < script.py``: without a pty, standard
  input is read line by line as at the interactive prompt, without prompts.

The reactor is passed in, never imported by the logic (it is only looked
up when the daemon gave none, at start).
"""

from __future__ import annotations

import ast
import base64
import binascii
import dataclasses
import hmac
import inspect
import ipaddress
import os
import pydoc
import socket
import sys
import traceback
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from twisted.application import service
from twisted.application.service import IService
from twisted.conch import avatar
from twisted.conch import manhole as conch_manhole
from twisted.conch.error import ValidPublicKey
from twisted.conch.insults import insults
from twisted.conch.interfaces import IConchUser, ISession
from twisted.conch.ssh import connection, factory, keys, session, transport, userauth
from twisted.cred import credentials as cred_credentials
from twisted.cred.checkers import ICredentialsChecker
from twisted.cred.error import UnauthorizedLogin
from twisted.cred.portal import IRealm, Portal
from twisted.internet import defer
from twisted.internet.defer import Deferred
from twisted.internet.error import ProcessDone, ProcessTerminated
from twisted.internet.protocol import Protocol, connectionDone
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python import components
from twisted.python.failure import Failure
from zope.interface import implementer

from twisted_mta.values import list_separator, split_list_with

__all__ = [
    "DEFAULT_ADDRESS",
    "HOST_KEY_NAME",
    "ManholeError",
    "ManholeOptionsMixin",
    "ManholeService",
    "ManholeSettings",
    "format_address",
    "hash_password",
    "manhole_service",
    "manhole_settings",
    "read_authorized_keys",
    "read_users",
]

#: Where the manhole listens when ``manhole_address`` is unset.
DEFAULT_ADDRESS = "127.0.0.1"
#: The generated host key's file name, under ``<spool_directory>/db``.
HOST_KEY_NAME = "manhole_host_key"

_BCRYPT_PREFIXES = (b"$2a$", b"$2b$", b"$2y$")
_KEY_TYPE_PREFIXES = (b"ssh-", b"ecdsa-sha2-", b"sk-")
_LOGIN_TIMEOUT = 120  # seconds to authenticate, as sshd's LoginGraceTime
_MAX_AUTH_TRIES = 6  # as sshd's MaxAuthTries

_log = Logger()


class ManholeError(ValueError):
    """A manhole setting that stops the daemon from starting; the message
    names the option (and the twistd option, when that one was used)."""


# ---------------------------------------------------------------------------
# Settings: main options, overridden by the twistd plugin's options


class ManholeOptionsMixin:
    """The twistd plugin's manhole options; mix into a
    :class:`twisted.python.usage.Options` subclass.  Each one overrides the
    main option of the same meaning (see :func:`manhole_settings`)."""

    optParameters: list[list[Any]] = [
        ["manhole", None, None,
         "Run the manhole (SSH) on this port; overrides manhole_port.", int],
        ["manhole-address", None, None,
         "Manhole listening address(es); overrides manhole_address."],
        ["manhole-passwords", None, None,
         "File of user:password lines; overrides manhole_users."],
        ["manhole-keys", None, None,
         "OpenSSH authorized_keys file; overrides manhole_authorized_keys."],
        ["manhole-host-key", None, None,
         "SSH host private key file; overrides manhole_host_key."],
    ]
    optFlags: list[list[Any]] = [
        ["manhole-allow-remote", None,
         "Let the manhole listen on non-loopback addresses (manhole_allow_remote)."],
    ]


# (main option, twistd option) for each setting
_OPTION_NAMES = {
    "port": ("manhole_port", "--manhole"),
    "address": ("manhole_address", "--manhole-address"),
    "users": ("manhole_users", "--manhole-passwords"),
    "keys": ("manhole_authorized_keys", "--manhole-keys"),
    "host_key": ("manhole_host_key", "--manhole-host-key"),
    "allow_remote": ("manhole_allow_remote", "--manhole-allow-remote"),
}


@dataclass(frozen=True)
class ManholeSettings:
    """The manhole's settings after the twistd options were applied.

    ``sources`` maps each setting (``port``, ``address``, ``users``,
    ``keys``, ``host_key``, ``allow_remote``) to the option it came from,
    for error messages."""

    port: int
    addresses: tuple[str, ...]
    users_file: str | None
    keys_file: str | None
    host_key_file: str | None
    allow_remote: bool
    spool_directory: str
    sources: Mapping[str, str] = field(default_factory=dict)

    def option(self, setting: str) -> str:
        """The name of the option *setting* came from."""
        return self.sources.get(setting, _OPTION_NAMES[setting][0])

    @property
    def methods(self) -> tuple[str, ...]:
        """The SSH authentication methods offered."""
        return tuple(name for name, path in (("password", self.users_file),
                                             ("publickey", self.keys_file)) if path)

    @property
    def default_host_key_file(self) -> str:
        """``<spool_directory>/db/manhole_host_key``."""
        return os.path.join(self.spool_directory, "db", HOST_KEY_NAME)


def manhole_settings(config: Any, options: Mapping[str, Any] | None = None) -> \
        ManholeSettings | None:
    """The manhole's settings from *config*'s main options and the twistd
    plugin's *options* (which win when given), or None when the manhole is
    off (no port).

    Raises :class:`ManholeError`, naming the option, when neither a
    password file nor a keys file is set, when an address is not an IP
    address, or when it is not a loopback address and remote listening is
    not allowed."""
    options = options or {}
    sources: dict[str, str] = {}

    def pick(setting: str, option_key: str) -> Any:
        main_name, plugin_name = _OPTION_NAMES[setting]
        value = options.get(option_key)
        if value not in (None, "", 0, False):
            sources[setting] = plugin_name
            return value
        sources[setting] = main_name
        return config.get(main_name)

    port = options.get("manhole")
    if port is not None:
        sources["port"] = "--manhole"
    else:
        sources["port"] = "manhole_port"
        port = config.get("manhole_port")
    if port is None:
        return None
    try:
        port = int(port)
    except (TypeError, ValueError):
        raise ManholeError(f'{sources["port"]}: "{port}" is not a port number') from None
    if not 0 <= port <= 65535:
        raise ManholeError(f"{sources['port']}: {port} is not a port number")
    address_text = pick("address", "manhole-address") or DEFAULT_ADDRESS
    users = pick("users", "manhole-passwords") or None
    keys_file = pick("keys", "manhole-keys") or None
    host_key = pick("host_key", "manhole-host-key") or None
    allow_remote = bool(pick("allow_remote", "manhole-allow-remote"))
    settings = ManholeSettings(
        port=port, addresses=(), users_file=users, keys_file=keys_file,
        host_key_file=host_key, allow_remote=allow_remote,
        spool_directory=config.get("spool_directory") or "./exim-py-spool",
        sources=sources)
    if not users and not keys_file:
        raise ManholeError(
            f"the manhole ({settings.option('port')}) needs a password file or a key file: "
            "set manhole_users or manhole_authorized_keys "
            "(--manhole-passwords or --manhole-keys)")
    return dataclasses.replace(settings, addresses=_addresses(address_text, settings))


def _addresses(text: str, settings: ManholeSettings) -> tuple[str, ...]:
    text = str(text).strip()
    single = text[1:-1] if text.startswith("[") and text.endswith("]") else text
    try:
        # One IPv6 address needs no "<;" list separator change.
        items = [str(ipaddress.ip_address(single))] if ":" in single else None
    except ValueError:
        items = None
    if items is None:
        sep, rest = list_separator(text)
        items = split_list_with(rest, sep)
    found: list[str] = []
    option = settings.option("address")
    for item in items:
        item = item.strip()
        if item.startswith("[") and item.endswith("]"):
            item = item[1:-1]
        try:
            address = ipaddress.ip_address(item)
        except ValueError:
            raise ManholeError(f'{option}: "{item}" is not an IP address') from None
        if not _is_loopback(address) and not settings.allow_remote:
            raise ManholeError(
                f"{option}: {item} is not a loopback address; the manhole listens on "
                "127.0.0.0/8 or ::1 unless manhole_allow_remote is set "
                "(--manhole-allow-remote)")
        if item not in found:
            found.append(item)
    if not found:
        raise ManholeError(f"{option}: no address given")
    return tuple(found)


def _is_loopback(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return address.is_loopback


def format_address(host: str, port: int) -> str:
    """``[host]:port``, as Exim writes an address and port in its logs."""
    return f"[{host}]:{port}"


# ---------------------------------------------------------------------------
# Credentials files


def read_users(path: str) -> dict[bytes, bytes]:
    """The ``user:password`` lines of a manhole_users file.

    Blank lines and lines starting with ``#`` are skipped and whitespace
    around a line is ignored; the user name ends at the first colon.  A
    password of 60 characters starting ``$2a$``, ``$2b$`` or ``$2y$`` is a
    bcrypt hash (see :func:`hash_password`); anything else is the password
    itself.  The first line for a user wins.  Raises OSError when the file
    cannot be read and :class:`ManholeError` for a malformed line."""
    with open(path, "rb") as f:
        data = f.read()
    users: dict[bytes, bytes] = {}
    for lineno, raw in enumerate(data.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith(b"#"):
            continue
        user, colon, secret = line.partition(b":")
        if not colon or not user or not secret:
            raise ManholeError(f"line {lineno} of {path}: user:password expected")
        users.setdefault(user, secret)
    return users


def _is_bcrypt(secret: bytes) -> bool:
    return len(secret) == 60 and secret.startswith(_BCRYPT_PREFIXES)


def hash_password(password: bytes | str) -> str:
    """A bcrypt hash of *password* for a manhole_users file."""
    import bcrypt

    if isinstance(password, str):
        password = password.encode("utf-8")
    return bcrypt.hashpw(password, bcrypt.gensalt()).decode("ascii")


@dataclass(frozen=True)
class AuthorizedKey:
    """One public key from an authorized_keys file."""

    key: keys.Key
    comment: str
    lineno: int

    @property
    def description(self) -> str:
        """``ssh-ed25519 SHA256:... comment`` for the log."""
        text = f"{self.key.sshType().decode('ascii')} {_fingerprint(self.key)}"
        return f"{text} {self.comment}" if self.comment else text


def read_authorized_keys(path: str) -> tuple[list[AuthorizedKey], list[str]]:
    """The keys of an OpenSSH authorized_keys file and a warning for each
    line that was ignored.

    Lines are ``type base64 [comment]``.  Lines with key options
    (``from=``, ``command=``, ``restrict`` ...) are ignored rather than
    granting more than they say.  Raises OSError when the file cannot be
    read."""
    with open(path, "rb") as f:
        data = f.read()
    found: list[AuthorizedKey] = []
    warnings: list[str] = []
    for lineno, raw in enumerate(data.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith(b"#"):
            continue
        fields = line.split(None, 2)
        if not fields[0].startswith(_KEY_TYPE_PREFIXES):
            warnings.append(f"line {lineno} of {path}: key options are not supported; "
                            "line ignored")
            continue
        try:
            blob = base64.b64decode(fields[1], validate=True) if len(fields) > 1 else b""
            key = keys.Key.fromString(blob)
        except (binascii.Error, keys.BadKeyError, ValueError, IndexError):
            warnings.append(f"line {lineno} of {path}: not a public key; line ignored")
            continue
        comment = fields[2].decode("latin-1") if len(fields) > 2 else ""
        found.append(AuthorizedKey(key, comment, lineno))
    return found, warnings


def _fingerprint(key: keys.Key) -> str:
    digest = key.fingerprint(keys.FingerprintFormats.SHA256_BASE64)
    return "SHA256:" + digest.rstrip("=")


def _mode_too_open(path: str) -> int | None:
    mode = os.stat(path).st_mode & 0o777
    return mode if mode & 0o077 else None


# ---------------------------------------------------------------------------
# Host key


def _load_host_key(settings: ManholeSettings) -> tuple[keys.Key, bool]:
    """The host key and whether it was generated just now."""
    path = settings.host_key_file
    option = settings.option("host_key")
    if path is None:
        path = settings.default_host_key_file
        option = f"manhole host key {path}"
        if not os.path.exists(path):
            return _generate_host_key(path), True
    try:
        mode = _mode_too_open(path)
        if mode is not None:
            raise ManholeError(f"{option}: {path} is open to group or others "
                               f"(mode {mode:04o}); chmod 600 it")
        key = keys.Key.fromFile(path)
    except OSError as e:
        raise ManholeError(f"{option}: cannot read {path}: {e.strerror}") from None
    except (keys.BadKeyError, keys.EncryptedKeyError, ValueError) as e:
        raise ManholeError(f"{option}: {path} is not an unencrypted SSH private key: "
                           f"{e}") from None
    if key.isPublic():
        raise ManholeError(f"{option}: {path} is a public key; the private key is needed")
    return key, False


def _generate_host_key(path: str) -> keys.Key:
    from cryptography.hazmat.primitives.asymmetric import ed25519

    key = keys.Key(ed25519.Ed25519PrivateKey.generate())
    directory = os.path.dirname(path)
    try:
        os.makedirs(directory, mode=0o750, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(key.toString("openssh"))
            f.flush()
            os.fsync(f.fileno())
    except OSError as e:
        raise ManholeError(f"manhole host key: cannot create {path}: {e.strerror} "
                           "(set manhole_host_key)") from None
    return key


# ---------------------------------------------------------------------------
# Authentication


@dataclass(frozen=True)
class _Login:
    """The avatar id: who logged in and how."""

    user: str
    method: str
    detail: str = ""


@implementer(ICredentialsChecker)
class _PasswordChecker:
    credentialInterfaces = (cred_credentials.IUsernamePassword,)

    def __init__(self, manhole: ManholeService) -> None:
        self.manhole = manhole

    def requestAvatarId(self, credentials: Any) -> Deferred[_Login]:
        path = self.manhole.settings.users_file
        assert path is not None
        try:
            users = read_users(path)
        except (OSError, ManholeError) as e:
            self.manhole.log_line(f"manhole: cannot read {self.manhole.settings.option('users')}"
                                  f" file: {_reason_text(e)}")
            return defer.fail(UnauthorizedLogin("password file unreadable"))
        user = credentials.username
        secret = users.get(user)
        login = _Login(user.decode("latin-1"), "password")
        if secret is None:
            return defer.fail(UnauthorizedLogin("unknown user"))
        if _is_bcrypt(secret):
            import bcrypt

            reactor = self.manhole.reactor
            d = deferToThreadPool(reactor, reactor.getThreadPool(), bcrypt.checkpw,
                                  credentials.password, secret)
        else:
            d = defer.succeed(hmac.compare_digest(credentials.password, secret))

        def checked(good: bool) -> _Login:
            if not good:
                raise UnauthorizedLogin("wrong password")
            return login

        def broken(reason: Failure) -> None:
            raise UnauthorizedLogin(f"bad password hash: {reason.getErrorMessage()}")

        return d.addCallbacks(checked, broken)


@implementer(ICredentialsChecker)
class _KeyChecker:
    """Keys from an authorized_keys file, read at each attempt.  Unlike
    conch's SSHPublicKeyChecker it says a key is acceptable (PK_OK) only
    when the key is in the file."""

    credentialInterfaces = (cred_credentials.ISSHPrivateKey,)

    def __init__(self, manhole: ManholeService) -> None:
        self.manhole = manhole

    def requestAvatarId(self, credentials: Any) -> Deferred[_Login]:
        path = self.manhole.settings.keys_file
        assert path is not None
        try:
            authorized, _ = read_authorized_keys(path)
        except OSError as e:
            self.manhole.log_line(f"manhole: cannot read {self.manhole.settings.option('keys')}"
                                  f" file: {_reason_text(e)}")
            return defer.fail(UnauthorizedLogin("keys file unreadable"))
        match = next((k for k in authorized if k.key.blob() == credentials.blob), None)
        if match is None:
            return defer.fail(UnauthorizedLogin("key not authorized"))
        if not credentials.signature:
            return defer.fail(ValidPublicKey())
        try:
            good = match.key.verify(credentials.signature, credentials.sigData)
        except Exception:
            good = False
        if not good:
            return defer.fail(UnauthorizedLogin("bad signature"))
        return defer.succeed(_Login(credentials.username.decode("latin-1"), "publickey",
                                    match.description))


def _reason_text(e: BaseException) -> str:
    if isinstance(e, OSError) and e.strerror:
        return f"{e.filename}: {e.strerror}" if e.filename else e.strerror
    return str(e)


class _UserAuth(userauth.SSHUserAuthServer):
    """ssh-userauth with the manhole's log lines, a short login timeout and
    the daemon's reactor as clock."""

    loginTimeout = _LOGIN_TIMEOUT
    attemptsBeforeDisconnect = _MAX_AUTH_TRIES

    def serviceStarted(self) -> None:
        self.clock = self.transport.factory.manhole.reactor
        super().serviceStarted()

    def tryAuth(self, kind: bytes, user: bytes, data: bytes) -> Deferred[Any]:
        d = super().tryAuth(kind, user, data)
        manhole = self.transport.factory.manhole
        peer = self.transport.transport.getPeer()
        where = format_address(peer.host, peer.port)
        name = user.decode("latin-1")
        method = kind.decode("latin-1")

        def succeeded(result: Any) -> Any:
            _, user_avatar, _ = result
            user_avatar.peer = where
            manhole.log_line(f"manhole login from {where} {user_avatar.auth_text}")
            return result

        def failed(reason: Failure) -> Failure:
            signed_or_password = kind == b"password" or (
                kind == b"publickey" and data[:1] not in (b"", b"\x00"))
            if reason.check(UnauthorizedLogin) and signed_or_password:
                manhole.log_line(f"manhole login failed from {where} A={method}:"
                                 f"{manhole.quote(name)}: {reason.getErrorMessage()}",
                                 ("main", "reject"))
            return reason

        return d.addCallbacks(succeeded, failed)


# ---------------------------------------------------------------------------
# Avatar, realm, sessions


class _ManholeUser(avatar.ConchUser):
    """A logged-in manhole user; its sessions are Python prompts."""

    def __init__(self, manhole: ManholeService, login: _Login) -> None:
        super().__init__()
        self.manhole = manhole
        self.login = login
        self.peer = "[unknown]"
        self.channelLookup[b"session"] = session.SSHSession

    @property
    def auth_text(self) -> str:
        """``A=method:user`` and, for a key, its type, fingerprint and comment."""
        text = f"A={self.login.method}:{self.manhole.quote(self.login.user)}"
        if self.login.detail:
            text += f" ({self.manhole.quote(self.login.detail)})"
        return text

    def logout(self) -> None:
        self.manhole.log_line(f"manhole logout from {self.peer} {self.auth_text}")


@implementer(IRealm)
class _Realm:
    def __init__(self, manhole: ManholeService) -> None:
        self.manhole = manhole

    def requestAvatar(self, avatarId: Any, mind: Any, *interfaces: Any) -> tuple[Any, ...]:
        if IConchUser in interfaces:
            user = _ManholeUser(self.manhole, avatarId)
            return IConchUser, user, user.logout
        raise NotImplementedError("the manhole offers SSH sessions only")


class _Interpreter(conch_manhole.ManholeInterpreter):
    """conch's interpreter (stdout captured, Deferreds shown when they
    fire) that keeps the daemon alive on SystemExit, reports errors apart
    from output and tracks the Deferreds it is showing."""

    def __init__(self, handler: Any, namespace: dict[str, Any],
                 filename: str = "<manhole>") -> None:
        super().__init__(handler, namespace, filename)
        self.errors = 0
        self.pending: dict[int, Deferred[None]] = {}

    def push(self, line: bytes) -> bool:
        self.buffer.append(line)
        source = b"\n".join(self.buffer).decode("utf-8", "replace")
        more = self.runsource(source, self.filename)
        if not more:
            self.resetBuffer()
        return bool(more)

    def run_source(self, source: str) -> None:
        """Run a whole program, printing the value of each expression
        statement (as the interactive prompt does)."""
        try:
            tree = ast.parse(source, self.filename, "exec")
            code = compile(ast.Interactive(body=tree.body), self.filename, "single")
        except (SyntaxError, ValueError, OverflowError):
            self.showsyntaxerror(self.filename)
            return
        self.runcode(code)

    def runcode(self, code: Any) -> None:
        with self.monkeyPatcher:
            try:
                exec(code, self.locals)
            except SystemExit as e:
                self.handler.quit(_exit_status(e, self._error))
            except BaseException:
                self.showtraceback()

    def showtraceback(self) -> None:
        etype, value, tb = sys.exc_info()
        self._error("".join(traceback.format_exception(etype, value,
                                                       tb.tb_next if tb else None)))

    def showsyntaxerror(self, filename: str | None = None, **kwargs: Any) -> None:
        etype, value, _ = sys.exc_info()
        self._error("".join(traceback.format_exception_only(etype, value)))

    def _error(self, text: str) -> None:
        self.errors += 1
        add_error = getattr(self.handler, "addError", None)
        if add_error is not None:
            add_error(text)
        else:
            self.handler.addOutput(text)

    def displayhook(self, obj: Any) -> None:
        super().displayhook(obj)
        end_line = getattr(self.handler, "end_line", None)
        if end_line is not None and obj is not None:
            end_line()
        if isinstance(obj, Deferred) and not obj.called and id(obj) not in self.pending:
            done: Deferred[None] = Deferred()
            self.pending[id(obj)] = done

            def settled(result: Any) -> Any:
                if isinstance(result, Failure):
                    self.errors += 1
                self.pending.pop(id(obj), None)
                done.callback(None)
                return result

            obj.addBoth(settled)

    def wait_pending(self) -> Deferred[Any]:
        """Fires when every Deferred shown so far has fired."""
        return defer.gatherResults(list(self.pending.values()))


def _exit_status(e: SystemExit, error: Callable[[str], None]) -> int:
    if e.code is None:
        return 0
    if isinstance(e.code, int):
        return e.code & 0xFF
    error(f"{e.code}\n")
    return 1


class _TerminalManhole(conch_manhole.ColoredManhole):
    """The prompt for a terminal (pty): conch's coloured manhole with a
    greeting, our interpreter and no screen clearing on resize."""

    def __init__(self, namespace: dict[str, Any], greeting: str, size: tuple[int, int],
                 channel: _ManholeSession) -> None:
        super().__init__(None)
        self.namespace = namespace
        self.greeting = greeting
        self.width, self.height = size
        self.channel = channel

    def connectionMade(self) -> None:
        super().connectionMade()
        self.interpreter = _Interpreter(self, self.namespace)

    def initializeScreen(self) -> None:
        self.terminal.reset()
        self.terminal.write(self.greeting.encode("utf-8"))
        self.terminal.nextLine()
        self.terminal.write(self.ps[self.pn])
        self.setInsertMode()

    def quit(self, status: int) -> None:
        self.channel.exit_status = status
        self.handle_QUIT()


class _LineManhole(Protocol):
    """The prompt without a terminal: standard input read line by line as
    at the interactive prompt (no prompts, no echo, errors to standard
    error), or with *command* (``ssh host CMD``) that program alone."""

    def __init__(self, namespace: dict[str, Any], channel: _ManholeSession,
                 command: bytes | None = None) -> None:
        self.namespace = namespace
        self.channel = channel
        self.command = command
        self.buffer = b""
        self.at_line_start = True
        self.ending = False
        self.starting: Any = None

    def connectionMade(self) -> None:
        self.interpreter = _Interpreter(self, self.namespace)
        if self.command is not None:
            # Run it once the reply to the exec request has gone out: some
            # clients (conch's) drop output that comes before it.
            reactor = self.channel.user.manhole.reactor
            self.starting = reactor.callLater(0, self._run_command)

    def _run_command(self) -> None:
        self.starting = None
        assert self.command is not None
        self.interpreter.run_source(self.command.decode("utf-8", "replace"))
        self._end()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if self.starting is not None and self.starting.active():
            self.starting.cancel()
        self.starting = None

    def dataReceived(self, data: bytes) -> None:
        if self.command is not None or self.ending:
            return
        self.buffer += data
        while b"\n" in self.buffer and not self.ending:
            line, self.buffer = self.buffer.split(b"\n", 1)
            self._push(line.rstrip(b"\r"))

    def _push(self, line: bytes) -> None:
        more = self.interpreter.push(line)
        if not more and not self.at_line_start:
            self._write("\n")

    def eof(self) -> None:
        """Standard input ended: finish the last statement, wait for the
        Deferreds being shown, then close with status 1 if anything failed."""
        if self.command is not None or self.ending:
            return
        if self.buffer:
            line, self.buffer = self.buffer, b""
            self._push(line.rstrip(b"\r"))
        if self.interpreter.buffer and not self.ending:
            self._push(b"")
        self._end()

    def _end(self) -> None:
        if self.ending:
            return
        self.ending = True

        def done(_: Any) -> None:
            self.channel.finish(1 if self.interpreter.errors else 0)

        self.interpreter.wait_pending().addBoth(done)

    def addOutput(self, data: str, isAsync: bool | None = None) -> None:
        self._write(data)
        if isAsync and not self.at_line_start:
            self._write("\n")

    def end_line(self) -> None:
        """A value was shown: end its line (the terminal prompt does this
        itself)."""
        if not self.at_line_start:
            self._write("\n")

    def addError(self, data: str) -> None:
        if data:
            self.transport.writeErr(data.encode("utf-8"))

    def _write(self, data: str) -> None:
        if data:
            self.at_line_start = data.endswith("\n")
            self.transport.write(data.encode("utf-8"))

    def quit(self, status: int) -> None:
        self.ending = True
        self.channel.finish(status)


class _ChannelTransport:
    """What a prompt writes to: the session channel, which it ends with an
    exit status rather than just closing."""

    def __init__(self, channel: _ManholeSession, process: Any) -> None:
        self.channel = channel
        self.process = process

    def write(self, data: bytes) -> None:
        if self.channel.writable:
            self.process.write(data)

    def writeSequence(self, data: Iterable[bytes]) -> None:
        self.write(b"".join(data))

    def writeErr(self, data: bytes) -> None:
        if self.channel.writable:
            self.process.errReceived(data)

    def loseConnection(self) -> None:
        self.channel.finish(self.channel.exit_status)

    def getPeer(self) -> Any:
        return self.process.getPeer()

    def getHost(self) -> Any:
        return self.process.getHost()


@implementer(ISession)
class _ManholeSession:
    """One SSH session channel: a shell (with or without a pty) or one
    command, each a Python prompt on a fresh namespace."""

    def __init__(self, user: _ManholeUser) -> None:
        self.user = user
        self.size: tuple[int, int] | None = None  # (columns, rows) once a pty is asked for
        self.process: Any = None
        self.prompt: Any = None
        self.exit_status = 0
        self.open = True
        self.finished = False

    def getPty(self, term: bytes, windowSize: tuple[int, ...], modes: Any) -> None:
        self.size = (windowSize[1] or 80, windowSize[0] or 24)

    def windowChanged(self, newWindowSize: tuple[int, ...]) -> None:
        if isinstance(self.prompt, insults.ServerProtocol) and self.prompt.terminalProtocol:
            terminal = self.prompt.terminalProtocol
            terminal.width, terminal.height = newWindowSize[1], newWindowSize[0]

    def openShell(self, proto: Any) -> None:
        namespace = self._namespace(proto)
        if namespace is None:
            return
        if self.size is not None:
            prompt: Any = insults.ServerProtocol(
                _TerminalManhole, namespace, self.user.manhole.greeting(), self.size, self)
        else:
            prompt = _LineManhole(namespace, self)
        self._connect(proto, prompt)

    def execCommand(self, proto: Any, command: bytes) -> None:
        namespace = self._namespace(proto)
        if namespace is not None:
            self._connect(proto, _LineManhole(namespace, self, command))

    def _namespace(self, proto: Any) -> dict[str, Any] | None:
        self.process = proto
        try:
            return self.user.manhole.namespace()
        except Exception:
            proto.errReceived(("manhole: cannot build the namespace:\n"
                               + traceback.format_exc()).encode("utf-8"))
            self.finish(1)
            return None

    def _connect(self, proto: Any, prompt: Any) -> None:
        self.prompt = prompt
        prompt.makeConnection(_ChannelTransport(self, proto))
        proto.makeConnection(session.wrapProtocol(prompt))

    def eofReceived(self) -> None:
        if isinstance(self.prompt, _LineManhole):
            self.prompt.eof()
        elif self.prompt is not None:
            self.finish(self.exit_status)

    @property
    def writable(self) -> bool:
        """Output is still wanted: the channel is open and not ending."""
        return self.open and not self.finished

    def finish(self, status: int) -> None:
        """Send the exit status and close the channel (once)."""
        if self.finished or not self.open or self.process is None:
            return
        self.finished = True
        reason = ProcessDone(0) if status == 0 else ProcessTerminated(exitCode=status)
        self.process.processEnded(Failure(reason))

    def closed(self) -> None:
        self.open = False


components.registerAdapter(_ManholeSession, _ManholeUser, ISession)


# ---------------------------------------------------------------------------
# The namespace's help


class _Help:
    """``help`` in the manhole: the names in this session, or pydoc text
    for an object (never pydoc's interactive help, which would read the
    daemon's standard input)."""

    def __init__(self, namespace: dict[str, Any], descriptions: Mapping[str, str],
                 greeting: str) -> None:
        self._namespace = namespace
        self._descriptions = descriptions
        self._greeting = greeting

    def text(self) -> str:
        """The greeting and one line per name in the namespace."""
        names = sorted(n for n in self._namespace
                       if not n.startswith("_") and n != "__builtins__")
        width = max((len(n) for n in names), default=0)
        lines = [self._greeting, "", "Names in this session:"]
        for name in names:
            description = self._descriptions.get(name) or _describe(self._namespace[name])
            lines.append(f"  {name.ljust(width)}  {description}")
        lines += ["", "help(obj) shows obj's documentation; _ is the last result;",
                  "a Deferred's result is shown when it fires. Ctrl-D or exit() leaves.",
                  "Code runs in the daemon's reactor thread: anything that blocks "
                  "blocks the daemon."]
        return "\n".join(lines)

    def __repr__(self) -> str:
        return self.text()

    def __call__(self, *args: Any) -> None:
        if not args:
            print(self.text())
        else:
            print(pydoc.render_doc(args[0], renderer=pydoc.plaintext))


def _describe(obj: Any) -> str:
    if obj is None:
        return "None"
    if isinstance(obj, _Help):
        return "this text; help(obj) for obj's documentation"
    if inspect.ismodule(obj):
        kind = f"module {obj.__name__}"
    elif inspect.isclass(obj):
        kind = f"class {obj.__module__}.{obj.__qualname__}"
    elif callable(obj) and hasattr(obj, "__qualname__"):
        kind = f"function {obj.__qualname__}"
    else:
        kind = type(obj).__name__
        try:
            kind += f" of {len(obj)}"
        except TypeError:
            pass
    if type(obj).__module__ == "builtins" and not (inspect.isclass(obj) or callable(obj)):
        return kind
    doc = inspect.getdoc(obj) or ""
    first = doc.strip().split("\n\n")[0].replace("\n", " ")
    if len(first) > 70:
        first = first[:67] + "..."
    return f"{kind}: {first}" if first else kind


# ---------------------------------------------------------------------------
# The service


class _ServerTransport(transport.SSHServerTransport):
    def connectionLost(self, reason: Failure = connectionDone) -> None:
        super().connectionLost(reason)
        self.factory.connection_closed(self)


class _ManholeFactory(factory.SSHFactory):
    protocol = _ServerTransport
    services = {
        b"ssh-userauth": _UserAuth,
        b"ssh-connection": connection.SSHConnection,
    }

    def __init__(self, manhole: ManholeService, portal: Portal, host_key: keys.Key) -> None:
        self.manhole = manhole
        self.portal = portal
        self.publicKeys = {host_key.sshType(): host_key.public()}
        self.privateKeys = {host_key.sshType(): host_key}
        self.primes = None
        self.connections: dict[_ServerTransport, Deferred[None]] = {}

    def buildProtocol(self, addr: Any) -> Any:
        # SSHFactory's, without its log line per connection about moduli:
        # there are no group-exchange primes, so those methods are dropped.
        t = self.protocol()
        t.factory = self
        t.supportedPublicKeys = [
            algorithm for key in self.privateKeys.values()
            for algorithm in key.supportedSignatureAlgorithms()]
        t.supportedKeyExchanges = [k for k in t.supportedKeyExchanges
                                   if b"group-exchange" not in k]
        self.connections[t] = Deferred()
        return t

    def connection_closed(self, t: _ServerTransport) -> None:
        d = self.connections.pop(t, None)
        if d is not None:
            d.callback(None)


class ManholeService(service.Service):
    """Listens for SSH on the manhole's addresses; each session is a
    Python prompt on a fresh namespace from *namespace_factory*.

    Host keys and credentials files are checked when it is built (so a bad
    setting stops the daemon before it starts); listening starts with the
    service.  ``listening`` holds the (address, port) pairs in use."""

    name = "manhole"

    def __init__(self, settings: ManholeSettings,
                 namespace_factory: Callable[[], Mapping[str, Any]],
                 reactor: Any = None, *, log: Any = None,
                 descriptions: Mapping[str, str] | None = None) -> None:
        self.settings = settings
        self.namespace_factory = namespace_factory
        self.reactor = reactor
        self._log = log
        self.descriptions = dict(descriptions or {})
        self.listening: list[tuple[str, int]] = []
        self._ports: list[Any] = []
        self._factory: _ManholeFactory | None = None
        self._notes: list[tuple[str, tuple[str, ...]]] = []
        self._check_files()
        self.host_key, generated = _load_host_key(settings)
        if generated:
            self._notes.insert(0, (f"manhole: generated host key "
                                   f"{settings.default_host_key_file} ({self._key_text()})",
                                   ("main",)))

    # -- set-up checks ---------------------------------------------------------

    def _check_files(self) -> None:
        settings = self.settings
        if settings.users_file:
            option = settings.option("users")
            try:
                read_users(settings.users_file)
                mode = _mode_too_open(settings.users_file)
            except OSError as e:
                raise ManholeError(f"{option}: cannot read {settings.users_file}: "
                                   f"{e.strerror}") from None
            except ManholeError as e:
                raise ManholeError(f"{option}: {e}") from None
            if mode is not None:
                self._notes.append((f"manhole: warning: {option} file {settings.users_file} "
                                    f"is open to group or others (mode {mode:04o})",
                                    ("main",)))
        if settings.keys_file:
            option = settings.option("keys")
            try:
                _, warnings = read_authorized_keys(settings.keys_file)
            except OSError as e:
                raise ManholeError(f"{option}: cannot read {settings.keys_file}: "
                                   f"{e.strerror}") from None
            self._notes.extend((f"manhole: {option}: {w}", ("main",)) for w in warnings)

    # -- logging ----------------------------------------------------------------

    def log_line(self, text: str, targets: tuple[str, ...] = ("main",)) -> None:
        """Write *text* to the daemon's log (``log`` may be the EximLog or
        a callable returning it); to twisted's log when there is none."""
        log = self._log
        if log is not None and not hasattr(log, "write") and callable(log):
            log = log()
        if log is None:
            _log.info("{text}", text=text)
        else:
            log.write(text, targets=targets)

    def quote(self, text: str) -> str:
        """Untrusted text made printable for a log line."""
        from twisted_mta.log import log_quote

        return log_quote(text)

    # -- sessions -----------------------------------------------------------------

    def greeting(self) -> str:
        """The first line of a terminal session."""
        return (f"exim-py manhole in pid {os.getpid()} on {socket.gethostname()}; "
                "help lists what is here; Ctrl-D leaves.")

    def namespace(self) -> dict[str, Any]:
        """A fresh namespace for one session: the factory's names, plus
        ``reactor`` and ``help`` unless the factory gave them."""
        namespace = dict(self.namespace_factory())
        namespace.setdefault("__name__", "__manhole__")
        namespace.setdefault("reactor", self.reactor)
        namespace.setdefault("help", _Help(namespace, self.descriptions, self.greeting()))
        return namespace

    # -- start and stop ---------------------------------------------------------

    def startService(self) -> None:
        if self.reactor is None:
            from twisted.internet import reactor

            self.reactor = reactor
        for text, targets in self._notes:
            self.log_line(text, targets)
        self._notes = []
        checkers: list[Any] = []
        if self.settings.users_file:
            checkers.append(_PasswordChecker(self))
        if self.settings.keys_file:
            checkers.append(_KeyChecker(self))
        self._factory = _ManholeFactory(self, Portal(_Realm(self), checkers), self.host_key)
        for address in self.settings.addresses:
            try:
                port = self.reactor.listenTCP(self.settings.port, self._factory,
                                              interface=address)
            except Exception as e:
                self.log_line(f"manhole: socket bind() to port {self.settings.port} for "
                              f"address {address} failed: {e}: manhole abandoned",
                              ("main", "panic"))
                for listening in self._ports:
                    listening.stopListening()
                self._ports = []
                self.listening = []
                raise
            self._ports.append(port)
            self.listening.append((address, port.getHost().port))
        where = " ".join(format_address(a, p) for a, p in self.listening)
        self.log_line(f"manhole listening for SSH on {where}, "
                      f"auth {' '.join(self.settings.methods)}, host key {self._key_text()}")
        super().startService()

    def _key_text(self) -> str:
        return f"{self.host_key.sshType().decode('ascii')} {_fingerprint(self.host_key)}"

    def stopService(self) -> Deferred[Any]:
        super().stopService()
        waiting: list[Deferred[Any]] = [defer.maybeDeferred(p.stopListening)
                                        for p in self._ports]
        self._ports = []
        self.listening = []
        if self._factory is not None:
            for t, closed in list(self._factory.connections.items()):
                waiting.append(closed)
                if t.transport is not None:
                    t.transport.loseConnection()
        return defer.gatherResults(waiting).addCallback(lambda _: None)


def manhole_service(config: Any, options: Mapping[str, Any] | None,
                    namespace_factory: Callable[[], Mapping[str, Any]], reactor: Any = None,
                    *, log: Any = None, descriptions: Mapping[str, str] | None = None) -> \
        IService | None:
    """The manhole service, or None when the manhole is off.

    *config* supplies the ``manhole_*`` main options and
    ``spool_directory``; *options* (the twistd plugin's options, or None)
    override them.  *namespace_factory* is called for each SSH session and
    returns the names the prompt starts with (copied, so a session cannot
    change another's).  *reactor* may be None (the global reactor is used
    at start).  *log* is the daemon's EximLog, or a callable returning it
    (the daemon builds its log when it starts); *descriptions* gives
    ``help``'s text for some names.

    Raises :class:`ManholeError`, naming the option, for a setting that
    must stop the daemon: no credentials, a non-loopback address without
    ``manhole_allow_remote``, an unreadable file or host key."""
    settings = manhole_settings(config, options)
    if settings is None:
        return None
    return ManholeService(settings, namespace_factory, reactor, log=log,
                          descriptions=descriptions)


def _main(argv: list[str]) -> int:
    """``python -m twisted_mta.manhole hash [USER]``: print a
    manhole_users line (or hash) for a password read from the terminal."""
    import getpass

    if not argv or argv[0] != "hash" or len(argv) > 2:
        sys.stderr.write("usage: python -m twisted_mta.manhole hash [USER]\n")
        return 2
    password = getpass.getpass("Password: ")
    if password != getpass.getpass("Again: "):
        sys.stderr.write("passwords differ\n")
        return 1
    hashed = hash_password(password)
    print(f"{argv[1]}:{hashed}" if len(argv) == 2 else hashed)
    return 0


if __name__ == "__main__":
    raise SystemExit(_main(sys.argv[1:]))
