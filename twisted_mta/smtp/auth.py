"""The server side of SMTP AUTH: the ``plaintext`` authenticator driver
(PLAIN, LOGIN and similar mechanisms) and the replies of the AUTH command.

The SMTP server owns the command loop; this module decides what each AUTH
step answers, logs and leaves behind.  Behaviour follows Exim 4.96 as built
by Debian (with AUTH_TLS: once a client has authenticated, later EHLOs stop
advertising AUTH).

Strings are handled as elsewhere in the expansion code: ``str`` with one
character per byte (Latin-1), data from the client marked L{Tainted}.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from twisted_mta.config.model import DriverInstance
from twisted_mta.expand.errors import ExpansionError, ForcedFailure, LookupDefer
from twisted_mta.expand.evaluate import expand_string
from twisted_mta.expand.nodes import Evaluation
from twisted_mta.taint import Tainted, join_taint
from twisted_mta.values import split_list

AUTH_VARS = 4
"""How many ``$auth<n>`` variables Exim has."""
EXPAND_MAXN = 20
"""The highest numeric variable (``$20``) an authenticator can fill."""
BIG_BUFFER_SIZE = 16384
"""Exim reads an answer to a 334 challenge into a buffer of this size."""

# Replies of the AUTH command itself (checked in this order by the server).
NOT_ADVERTISED = (503, "AUTH command used when not advertised")
ALREADY_AUTHENTICATED = (503, "already authenticated")
IN_TRANSACTION = (503, "not permitted in mail transaction")
BAD_MECHANISM_NAME = (501, "invalid character in authentication mechanism name")
INVALID_MAIL_AUTH = (501, "invalid data for AUTH")

# Replies to an authentication attempt.
SUCCEEDED = (235, "Authentication succeeded")
INCORRECT = (535, "Incorrect authentication data")
INVALID_BASE64 = (501, "Invalid base64 data")
CANCELLED = (501, "Authentication cancelled")
DEFER_TEXT = "Unable to authenticate at present"

_SPACE = " \t\n\v\f\r"
_UPPER = str.maketrans("abcdefghijklmnopqrstuvwxyz", "ABCDEFGHIJKLMNOPQRSTUVWXYZ")
_LOWER = str.maketrans("ABCDEFGHIJKLMNOPQRSTUVWXYZ", "abcdefghijklmnopqrstuvwxyz")
_B64 = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
_B64_VALUE = {c: i for i, c in enumerate(_B64)}
_MECHANISM_CHARS = frozenset(
    "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_")

Ask = Callable[[str], Awaitable[str]]
"""Sends ``334 <base64 of the text>`` and returns the client's next line."""
LogWriter = Callable[[str], None]


def unsupported_mechanism(name: str) -> tuple[int, str]:
    """The reply to AUTH naming a mechanism that is not on offer."""
    return 504, f"{name} authentication mechanism not supported"


def auth_command_refusal(*, advertised: bool, authenticated: bool, in_transaction: bool,
                         allow_unadvertised: bool = False) -> tuple[int, str] | None:
    """The 503 reply refusing an AUTH command before its argument is looked
    at, or None.  *advertised* is whether the last EHLO listed AUTH (never
    after HELO, or before any greeting).  The server counts these as
    protocol errors; the ``acl_smtp_auth`` ACL runs only after they pass.
    Every AUTH command, refused or not, first sets
    ``$authentication_failed`` to 1."""
    if not advertised and not allow_unadvertised:
        return NOT_ADVERTISED
    if authenticated:
        return ALREADY_AUTHENTICATED
    if in_transaction:
        return IN_TRANSACTION
    return None


def parse_auth_argument(argument: str) -> tuple[str, str] | None:
    """Split the AUTH argument into (mechanism, initial response); None when
    the mechanism name has a character other than a letter, digit, ``-``
    or ``_`` (answer L{BAD_MECHANISM_NAME})."""
    text = argument.lstrip(_SPACE)
    end = 0
    while end < len(text) and text[end] not in _SPACE:
        if text[end] not in _MECHANISM_CHARS:
            return None
        end += 1
    return text[:end], text[end:].lstrip(_SPACE)


def b64decode(text: str) -> str | None:
    """Exim's base64 decoder: white space anywhere is skipped, padding is
    required, anything after the padding is an error; None if malformed."""
    chars = [c for c in text if c not in _SPACE]
    out = bytearray()
    i = 0
    while i < len(chars):
        quad = chars[i:i + 4]
        if len(quad) < 4 or quad[0] not in _B64_VALUE or quad[1] not in _B64_VALUE:
            return None
        a, b = _B64_VALUE[quad[0]], _B64_VALUE[quad[1]]
        out.append((a << 2 | b >> 4) & 0xFF)
        if quad[2] == "=":
            # Two pad characters, then nothing at all.
            if quad[3] != "=" or i + 4 != len(chars):
                return None
            break
        if quad[2] not in _B64_VALUE:
            return None
        c = _B64_VALUE[quad[2]]
        out.append((b << 4 | c >> 2) & 0xFF)
        if quad[3] == "=":
            if i + 4 != len(chars):
                return None
            break
        if quad[3] not in _B64_VALUE:
            return None
        out.append((c << 6 | _B64_VALUE[quad[3]]) & 0xFF)
        i += 4
    return out.decode("latin-1")


def b64encode(text: str) -> str:
    """Base64 of a one-byte-per-character string (for a 334 challenge)."""
    import base64

    return base64.b64encode(text.encode("latin-1", "replace")).decode("ascii")


def xtext_decode(text: str) -> str | None:
    """Decode the xtext value of ``MAIL ... AUTH=``; None if malformed
    (answer L{INVALID_MAIL_AUTH}).  The value is the client's: tainted."""
    from twisted_mta.smtp.params import xtext_decode as decode

    decoded = decode(text)
    return None if decoded is None else Tainted(decoded)


def string_printing(text: str, topbitchars: bool = False) -> str:
    """Escape what Exim does not print in an id (``string_printing()``):
    controls other than tab, DEL, and top-bit bytes unless
    ``print_topbitchars`` is set.  Backslashes are left alone."""
    out = []
    for c in text:
        o = ord(c)
        if 32 <= o <= 126 or c == "\t" or (o > 127 and topbitchars):
            out.append(c)
        elif c in "\n\r\b\v\f":
            out.append("\\" + "nrbvf"["\n\r\b\v\f".index(c)])
        else:
            out.append(f"\\{o & 0xFF:03o}")
    return "".join(out)


def _variable(ctx: Any, name: str) -> str:
    value = ctx.variables.get(name) if ctx is not None else None
    if callable(value):
        value = value()
    return value or ""


def host_and_ident(ctx: Any) -> str:
    """The client as the failure log line names it, from ``$sender_fullhost``
    and ``$sender_ident`` (Exim's ``host_and_ident(FALSE)``)."""
    fullhost = _variable(ctx, "sender_fullhost")
    ident = _variable(ctx, "sender_ident")
    if not fullhost:
        return ident or "unknown"
    return f"{fullhost} U={ident}" if ident else fullhost


async def expand_check_condition(text: str, ctx: Any, name: str,
                                 log: LogWriter | None = None) -> bool:
    """A yes/no option of an authenticator such as
    ``server_advertise_condition``: false when empty, ``0``, ``no`` or
    ``false``; an expansion failure is false and, unless forced or a lookup
    deferral, is logged (to the main and panic logs in Exim)."""
    try:
        value = await ctx.expand(text)
    except ExpansionError as error:
        if log is not None and not isinstance(error, (ForcedFailure, LookupDefer)):
            log(f'failed to expand condition "{text}" for {name} authenticator: '
                f"{error.message}")
        return False
    return bool(value) and value != "0" and value.translate(_LOWER) not in ("no", "false")


@dataclass
class AuthOutcome:
    """What one AUTH attempt answered and what the session must remember.

    @ivar result: ``ok``, ``fail``, ``defer``, ``cancelled`` or ``bad64``.
        ``defer`` with no log line is the case where the condition passed
        but ``server_set_id`` failed to expand: Exim then answers 435
        without logging and the client stays unauthenticated.
    @ivar reply: the SMTP reply to send.
    @ivar authenticated_id: on ``ok``, the new ``$authenticated_id`` (None:
        leave it as it was, which is what Exim does without server_set_id).
    @ivar auth_vars: ``$auth1``.. as the driver left them (Exim clears them
        again once the command is over).
    @ivar numeric: ``$1``.. likewise.
    @ivar set_id: the expanded, printable ``server_set_id`` (None if unset
        or its expansion failed).
    @ivar fail_id: the new ``$authenticated_fail_id``, or None to leave it.
        Exim 4.96 stores the log fragment (`` (set_id=X)``), not the id.
    @ivar log: the main (and reject) log line, None when Exim writes none.
    @ivar defer_user_msg: the ``: text`` Exim appends to 435 replies.  Exim
        keeps it for the rest of the connection, so the session passes it
        back into the next attempt.
    """

    result: str
    reply: tuple[int, str]
    authenticator: str
    public_name: str
    authenticated_id: str | None = None
    auth_vars: list[str] = field(default_factory=list)
    numeric: list[str] = field(default_factory=list)
    set_id: str | None = None
    fail_id: str | None = None
    log: str | None = None
    defer_user_msg: str = ""

    def variable_updates(self) -> dict[str, str | None]:
        """The session variables to set afterwards (None: unset).
        ``$received_protocol`` is the server's business: it becomes
        ``esmtpa`` (``esmtpsa`` under TLS) on success."""
        if self.result == "ok":
            updates: dict[str, str | None] = {
                "sender_host_authenticated": self.authenticator,
                "authentication_failed": "0",
                "authenticated_fail_id": None,
            }
            if self.authenticated_id is not None:
                updates["authenticated_id"] = self.authenticated_id
            return updates
        updates = {"authentication_failed": "1"}
        if self.fail_id is not None:
            updates["authenticated_fail_id"] = self.fail_id
        return updates


class ServerAuthenticator(Protocol):
    """An authenticator configured to act as a server."""

    name: str
    public_name: str
    instance: DriverInstance

    async def authenticate(self, initial_response: str | None, ask: Ask, ctx: Any, *,
                           host_ident: str | None = None,
                           defer_user_msg: str = "") -> AuthOutcome:
        """Run one AUTH exchange."""
        ...


class _Exchange:
    """The data of one AUTH exchange: Exim's numeric variables (``$auth<n>``
    are their first four) and the texts for a temporary failure."""

    def __init__(self) -> None:
        self.numeric: list[str] = [""]   # $0 stays empty
        self.defer_msg = "reason not recorded"
        self.user_msg: str | None = None

    def add(self, data: str, from_prompt: bool) -> None:
        """Split decoded data at NULs into the next numeric variables."""
        if not data and not from_prompt:
            return
        parts = data.split("\0")
        if len(parts) > 1 and parts[-1] == "":
            parts.pop()  # a trailing NUL does not start another item
        room = EXPAND_MAXN + 1 - len(self.numeric)
        self.numeric.extend(Tainted(p) for p in parts[:max(room, 0)])

    @property
    def auth_vars(self) -> list[str]:
        return self.numeric[1:AUTH_VARS + 1]


class PlaintextAuthenticator:
    """A ``driver = plaintext`` instance with ``server_condition`` set."""

    def __init__(self, instance: DriverInstance) -> None:
        self.instance = instance
        self.name = instance.name
        self.public_name: str = instance.get("public_name") or instance.name

    async def _expand(self, text: str, ctx: Any, numeric: list[str]) -> str:
        ev = Evaluation(ctx)
        ev.numeric = tuple(numeric)
        return await expand_string(text, ctx, ev)

    async def _prompt(self, prompt: str, ask: Ask, state: _Exchange) -> str | None:
        """One 334 challenge; the failed result's name or None."""
        line = await ask(prompt)
        if line.endswith("\n"):
            line = line[:-1]
        if len(line) > BIG_BUFFER_SIZE - 1:
            # Exim stops reading at its buffer's end: the rest of the line
            # is then read as the next command.
            return "bad64"
        if line.endswith("\r"):
            line = line[:-1]
        line = line.split("\0", 1)[0]
        if line == "*":
            return "cancelled"
        data = b64decode(line)
        if data is None:
            return "bad64"
        state.add(data, from_prompt=True)
        return None

    async def _condition(self, ctx: Any, state: _Exchange) -> str:
        """``server_condition``: ok, fail or defer."""
        try:
            value = await self._expand(self.instance.get("server_condition"), ctx,
                                       state.numeric)
        except ForcedFailure:
            return "fail"
        except ExpansionError as error:
            state.defer_msg = error.message
            return "defer"
        folded = value.translate(_LOWER)
        if value in ("", "0") or folded in ("no", "false"):
            return "fail"
        if value == "1" or folded in ("yes", "true"):
            return "ok"
        state.defer_msg = value
        state.user_msg = f": {value}"
        return "defer"

    async def _collect(self, data: str, ask: Ask, ctx: Any, state: _Exchange) -> str | None:
        """Gather the client's data: the initial response, then answers to
        the prompts it did not cover.  None when all went well."""
        prompts_option = self.instance.get("server_prompts")
        prompts: list[str] = []
        if prompts_option is not None:
            try:
                prompts = split_list(await self._expand(prompts_option, ctx, state.numeric))
            except ExpansionError as error:
                state.defer_msg = error.message
                return "defer"
        if data == "=":
            state.numeric.append(Tainted(""))
        elif data:
            decoded = b64decode(data)
            if decoded is None:
                return "bad64"
            state.add(decoded, from_prompt=False)
        # Prompts whose answers came with the command are skipped.
        for number, prompt in enumerate(prompts, start=1):
            if len(state.numeric) - 1 >= EXPAND_MAXN:
                break
            if number > len(state.numeric) - 1:
                failed = await self._prompt(prompt, ask, state)
                if failed is not None:
                    return failed
        return None

    async def authenticate(self, initial_response: str | None, ask: Ask, ctx: Any, *,
                           host_ident: str | None = None,
                           defer_user_msg: str = "") -> AuthOutcome:
        """Run one AUTH exchange for this mechanism.

        @param initial_response: the text after the mechanism name (``=``
            means one empty item); None or empty for none.
        @param ask: sends a 334 challenge and returns the client's answer
            line, with its CR if it had one.
        @param ctx: the session's expansion context.  ``$auth1``..
            ``$auth4`` are set in its variables while the driver runs and
            restored afterwards.
        @param host_ident: the client as logged; default from the context.
        @param defer_user_msg: the value the last outcome returned.
        """
        state = _Exchange()
        saved = {f"auth{i}": ctx.variables.get(f"auth{i}") for i in range(1, AUTH_VARS + 1)}

        def publish() -> None:
            values = state.auth_vars
            for i in range(AUTH_VARS):
                ctx.variables[f"auth{i + 1}"] = values[i] if i < len(values) else ""

        publish()
        try:
            rc = await self._collect(initial_response or "", ask, ctx, state)
            publish()
            if rc is None:
                rc = await self._condition(ctx, state)
            set_id = await self._set_id(ctx, state)
        finally:
            for name, value in saved.items():
                if value is None:
                    ctx.variables.pop(name, None)
                else:
                    ctx.variables[name] = value
        if state.user_msg is not None:
            defer_user_msg = state.user_msg
        topbit = bool(ctx.main_option("print_topbitchars", False))
        printable = None if set_id is None else join_taint(string_printing(set_id, topbit),
                                                           set_id)
        outcome = AuthOutcome(result=rc, reply=SUCCEEDED, authenticator=self.name,
                              public_name=self.public_name, auth_vars=state.auth_vars,
                              numeric=state.numeric[1:], set_id=printable,
                              defer_user_msg=defer_user_msg)
        if rc == "ok":
            if self.instance.get("server_set_id") is None or printable is not None:
                outcome.authenticated_id = printable
                return outcome
            # Authenticated, but no id: a temporary error that Exim does not log.
            outcome.result = "defer"
            outcome.reply = (435, DEFER_TEXT + defer_user_msg)
            return outcome
        fragment = f" (set_id={printable})" if printable else ""
        if rc == "defer":
            outcome.reply = (435, DEFER_TEXT + defer_user_msg)
            logged = f"435 {DEFER_TEXT}{fragment}: {state.defer_msg}"
            outcome.fail_id = fragment
        elif rc == "fail":
            outcome.reply = INCORRECT
            logged = f"535 {INCORRECT[1]}{fragment}"
            outcome.fail_id = fragment
        else:
            outcome.reply = INVALID_BASE64 if rc == "bad64" else CANCELLED
            logged = f"{outcome.reply[0]} {outcome.reply[1]}"
        host = host_ident if host_ident is not None else host_and_ident(ctx)
        outcome.log = f"{self.name} authenticator failed for {host}: {logged}"
        return outcome

    async def _set_id(self, ctx: Any, state: _Exchange) -> str | None:
        """``server_set_id``, expanded whatever the result (a failed
        attempt's id is logged); None if unset or the expansion failed."""
        text = self.instance.get("server_set_id")
        if text is None:
            return None
        try:
            return await self._expand(text, ctx, state.numeric)
        except ExpansionError:
            return None


def server_authenticators(config: Any) -> list[PlaintextAuthenticator]:
    """The configured authenticators that can act as servers, in order:
    ``plaintext`` instances with ``server_condition`` set.  Other drivers
    are not implemented and are left out."""
    return [PlaintextAuthenticator(d) for d in config.authenticators
            if d.driver == "plaintext" and d.get("server_condition") is not None]


async def advertised_mechanisms(authenticators: Iterable[ServerAuthenticator], ctx: Any, *,
                                authenticated: bool = False,
                                log: LogWriter | None = None) -> list[str]:
    """The mechanism names for the EHLO ``AUTH`` line, upper-cased, in
    configuration order: those whose ``server_advertise_condition`` is
    unset or true.  Call it only when the client is in
    ``auth_advertise_hosts``; *authenticated* clients are offered nothing.
    An empty result means no AUTH line, and AUTH is then "not advertised"."""
    if authenticated:
        return []
    names = []
    for auth in authenticators:
        condition = auth.instance.get("server_advertise_condition")
        if condition is None or await expand_check_condition(condition, ctx, auth.name, log):
            names.append(auth.public_name.translate(_UPPER))
    return names


def ehlo_auth_keyword(mechanisms: Sequence[str]) -> str | None:
    """The EHLO keyword line, ``AUTH PLAIN LOGIN``, or None for none."""
    return "AUTH " + " ".join(mechanisms) if mechanisms else None


def find_authenticator(authenticators: Iterable[ServerAuthenticator], mechanism: str,
                       advertised: Sequence[str] | None) -> ServerAuthenticator | None:
    """The server authenticator for *mechanism* (caseless), provided it was
    in *advertised* (None: any, as under ``control = allow_auth_unadvertised``).
    None means answer L{unsupported_mechanism}."""
    wanted = mechanism.translate(_UPPER)
    offered = None if advertised is None else {m.translate(_UPPER) for m in advertised}
    for auth in authenticators:
        name = auth.public_name.translate(_UPPER)
        if name == wanted and (offered is None or name in offered):
            return auth
    return None


async def mail_auth_condition_passes(authenticated_by: ServerAuthenticator | None, ctx: Any,
                                     log: LogWriter | None = None) -> bool:
    """For ``MAIL ... AUTH=`` once the client is entitled to it: the
    ``server_mail_auth_condition`` of the authenticator that authenticated
    the client (true when there is none).  ``$authenticated_sender`` must
    already hold the decoded value."""
    if authenticated_by is None:
        return True
    condition = authenticated_by.instance.get("server_mail_auth_condition")
    if condition is None:
        return True
    return await expand_check_condition(condition, ctx, authenticated_by.name, log)


def mail_auth_ignored_log(value: str, host_ident: str, reason: str) -> str:
    """The log line when ``AUTH=`` on MAIL is ignored.  *host_ident* is the
    flagged form (``H=(helo) [ip]``); *reason* is ``client not
    authenticated``, ``rejected by ACL`` or L{mail_auth_condition_reason}."""
    return f"ignoring AUTH={value} from {host_ident} ({reason})"


def mail_auth_condition_reason(authenticated_id: str | None) -> str:
    """The reason logged when ``server_mail_auth_condition`` said no."""
    reason = "server_mail_auth_condition failed"
    if authenticated_id is not None:
        reason += f': authenticated ID="{authenticated_id}"'
    return reason
