"""Running an ACL: statements in order, conditions, modifiers, messages.

Follows Exim 4.96's ``acl_check_internal()`` and ``acl_check_condition()``:
a statement stops at its first condition that is not true; the verb then
decides.  Everything a condition or modifier needs from the SMTP session
(the host, controls, headers, delays, verification, logging) goes through
an L{AclSession}, so the same engine serves the daemon, ``-bh``, ``-bs``
and ``${acl}`` in ``-be``.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from twisted_mta.acl.where import (
    NOT_EXPANDED_AT_TOP,
    WHERE_ORDER,
    control_error,
    item_error,
    verify_error,
    where_key,
    where_name,
)
from twisted_mta.config.model import Acl, AclItem, AclStatement
from twisted_mta.expand.errors import ExpansionError, ForcedFailure
from twisted_mta.smtp.replies import printing, split_message

# Condition results (Exim's OK, FAIL, DEFER, ERROR, FAIL_DROP, DISCARD).
OK, FAIL, DEFER, ERROR, FAIL_DROP, DISCARD = "ok", "fail", "defer", "error", "drop", "discard"

# The verdict an ACL returns, by result.
VERDICTS = {OK: "accept", FAIL: "deny", DEFER: "defer", ERROR: "error",
            FAIL_DROP: "drop", DISCARD: "discard"}
_TRACE_END = {OK: "ACCEPT", FAIL: "DENY", DEFER: "DEFER", DISCARD: "DISCARD",
              FAIL_DROP: "DROP", ERROR: "ERROR"}

MODIFIERS = frozenset((
    "message", "log_message", "logwrite", "control", "add_header", "remove_header",
    "delay", "log_reject_target", "queue", "udpsend", "continue", "set", "endpass",
))

# Which results let a statement's message/log_message through (Exim's msgcond).
_MESSAGE_RESULTS = {
    "accept": {OK, FAIL, FAIL_DROP}, "discard": {OK, FAIL, FAIL_DROP},
    "defer": {OK}, "deny": {OK}, "drop": {OK}, "require": {FAIL, FAIL_DROP}, "warn": {OK},
}
MAX_NESTING = 20
_SPACE = " \t\n\v\f\r"


class AclConfigError(Exception):
    """An ACL option names no ACL, or its inline text or file is bad."""


@dataclass
class AclOutcome:
    """What an ACL decided.

    @ivar verdict: accept, deny, defer, discard, drop or error.
    @ivar user_message: the text for the SMTP reply (None: the default).
    @ivar log_message: the text for the log (None: the user message).
    """

    verdict: str
    user_message: str | None = None
    log_message: str | None = None


class AclSession:
    """What ACL conditions and modifiers need from the session they run in.

    This base class is the session of an expansion (``${acl}`` in ``-be``):
    no host, nothing to control, nothing logged.  The SMTP session
    overrides what it provides.
    """

    where = ""
    host_checking = False

    def __init__(self, ctx: Any) -> None:
        self.ctx = ctx

    def trace(self, text: str) -> None:
        """A line of the ``-bh`` debugging trace (``>>> text``)."""

    def log(self, text: str, targets: Iterable[str] = ("main",)) -> None:
        """Write a log line (``logwrite``, ``warn``)."""

    def warn_context(self) -> str:
        """Exim's host_and_ident() for ``warn`` log lines."""
        return ""

    async def condition(self, name: str, value: str) -> tuple[str, str | None, str | None]:
        """A condition the engine does not implement itself: returns
        (result, user message, log message)."""
        return ERROR, None, f'ACL condition "{name}" is not supported here'

    async def modifier(self, name: str, value: str) -> str | None:
        """Apply a session modifier (control, add_header, remove_header,
        delay, queue, udpsend, log_reject_target); returns an error text."""
        return None


def _acl_for(session: AclSession, name: str) -> Acl | None:
    config = session.ctx.config
    return None if config is None else config.acls.get(name)


def resolve_acl(session: AclSession, text: str) -> Acl:
    """The ACL an ``acl_smtp_*`` option (already expanded) refers to: a
    defined ACL, a file (an absolute path), or inline ACL text."""
    from twisted_mta.config import ConfigError
    from twisted_mta.config.parser import parse_acl_text

    acl = _acl_for(session, text)
    if acl is not None:
        return acl
    macros = getattr(session.ctx.config, "macro_table", None)
    try:
        if text.startswith("/"):
            try:
                with open(text, "rb") as f:
                    body = f.read().decode("latin-1")
            except OSError as e:
                raise AclConfigError(f"failed to open ACL file \"{text}\": {e.strerror}") from None
            return parse_acl_text(body, text, macros, filename=text)
        # Anything else is ACL text, even one word such as "accept".
        return parse_acl_text(text.replace("\\n", "\n"), text, macros)
    except ConfigError as e:
        raise AclConfigError(str(e)) from None


class AclRun:
    """One evaluation of one ACL (nested ACLs get their own)."""

    def __init__(self, session: AclSession, acl: Acl, depth: int = 0) -> None:
        self.session = session
        self.acl = acl
        self.depth = depth
        self.label = f'ACL "{acl.name}"'

    async def expand(self, text: str) -> str:
        return await self.session.ctx.expand(text)

    async def run(self) -> tuple[str, str | None, str | None]:
        """Evaluate the statements; (result, user message, log message)."""
        trace = self.session.trace
        trace(f"using {self.label}")
        for statement in self.acl.statements:
            trace(f'processing "{statement.verb}" ({statement.filename} {statement.lineno})')
            result, user_msg, log_msg, endpass = await self._statement(statement)
            verdict = self._verb(statement.verb, result, endpass, user_msg, log_msg)
            if verdict is not None:
                return verdict, user_msg, log_msg
            if statement.verb == "warn" and result == OK and user_msg:
                await self._warn_header(user_msg)
        trace(f"end of {self.label}: implicit DENY")
        return FAIL, None, None

    def _verb(self, verb: str, cond: str, endpass: bool,
              user_msg: str | None, log_msg: str | None) -> str | None:
        trace = self.session.trace
        word = {OK: "succeeded", FAIL: "failed", DEFER: "deferred", ERROR: "error",
                DISCARD: 'yielded "discard"', FAIL_DROP: 'yielded "drop"'}[cond]
        trace(f"{verb}: condition test {word} in {self.label}")
        if cond == ERROR:
            return ERROR
        if cond == DEFER and verb != "warn":
            return DEFER
        if verb in ("accept", "discard"):
            if cond in (OK, DISCARD):
                trace(f"end of {self.label}: {verb.upper()}")
                return cond if verb == "accept" else DISCARD
            if endpass:
                trace(f"{verb}: endpass encountered - denying access")
                return cond
            return None
        if verb in ("defer", "deny", "drop"):
            if cond != OK:
                return None
            trace(f"end of {self.label}: {verb.upper()}")
            return {"defer": DEFER, "deny": FAIL, "drop": FAIL_DROP}[verb]
        if verb == "require":
            if cond == OK:
                return None
            trace(f"end of {self.label}: not OK")
            return cond
        # warn
        if cond == OK and log_msg is not None and log_msg != user_msg:
            context = self.session.warn_context()
            self.session.log(f"{context} Warning: {log_msg}".lstrip())
        elif cond == DEFER:
            context = self.session.warn_context()
            detail = f": {log_msg}" if log_msg else ""
            self.session.log(f'{context} Warning: ACL "warn" statement skipped: '
                             f"condition test deferred{detail}".lstrip())
        return None

    async def _warn_header(self, text: str) -> None:
        """A ``warn`` statement's ``message`` adds header lines (as
        ``add_header`` does), in an ACL that has a message to add them to."""
        where = where_key(self.session.where)
        if WHERE_ORDER[where] > WHERE_ORDER["notsmtp"]:
            self.session.log(f'ACL "warn" with "message" setting found in a non-message '
                             f"({where_name(where)}) ACL: cannot specify header lines here: "
                             "message ignored", ("main", "panic"))
            return
        await self.session.modifier("add_header", text)

    async def _statement(self, statement: AclStatement
                         ) -> tuple[str, str | None, str | None, bool]:
        user_text: str | None = None
        log_text: str | None = None
        endpass = False
        result = OK
        cond_user: str | None = None
        cond_log: str | None = None
        for item in statement.items:
            name = item.name
            if name == "endpass":
                endpass = True
                continue
            if name == "message":
                user_text = item.value
                self.session.trace(f"  message: {item.value}")
                continue
            if name == "log_message":
                log_text = item.value
                self.session.trace(f"  log_message: {item.value}")
                continue
            if name in MODIFIERS:
                error = await self._modifier(item)
                if error is not None:
                    result, cond_log = ERROR, error or None
                    break
                continue
            result, cond_user, cond_log = await self._condition(item)
            if item.negated and result in (OK, FAIL, FAIL_DROP):
                result = FAIL if result == OK else OK
            if result != OK:
                break
        if endpass and result == OK:
            user_text = None
        if result in _MESSAGE_RESULTS[statement.verb]:
            cond_user, cond_log = await self._messages(
                statement.verb, result, user_text, log_text, cond_user, cond_log)
        self.session.ctx.variables.pop("acl_verify_message", None)
        return result, cond_user, cond_log, endpass

    async def _messages(self, verb: str, result: str, user_text: str | None,
                        log_text: str | None, user_msg: str | None, log_msg: str | None
                        ) -> tuple[str | None, str | None]:
        old_user = user_msg
        old_log = log_msg if log_msg is not None else user_msg
        if verb == "warn" or (result == OK and verb in ("accept", "discard")):
            user_msg = log_msg = None
        variables = self.session.ctx.variables
        if user_text is not None:
            variables["acl_verify_message"] = old_user or ""
            text = await self._expand_message(user_text)
            if text:
                user_msg = text
        if log_text is not None:
            variables["acl_verify_message"] = old_log or ""
            text = await self._expand_message(log_text)
            if text:
                log_msg = text if log_msg is None else f"{text}: {log_msg}"
        if log_msg is None:
            log_msg = user_msg
        return user_msg, log_msg

    async def _expand_message(self, text: str) -> str | None:
        try:
            return await self.expand(text)
        except ForcedFailure:
            return None
        except ExpansionError as e:
            self.session.log(f'failed to expand ACL message "{text}": {e.message}',
                             ("main", "panic"))
            return None

    async def _argument(self, item: AclItem) -> str | None:
        """The expanded argument; None for a forced failure (the item is
        then ignored).  Raises _ItemError for other failures."""
        try:
            return await self.expand(item.value)
        except ForcedFailure:
            return None
        except ExpansionError as e:
            raise _ItemError(f'failed to expand ACL string "{item.value}": {e.message}') from None

    async def _set(self, item: AclItem) -> str | None:
        """``set acl_<name> = value``: only the value is expanded."""
        variable, _, raw = item.value.partition("=")
        raw = raw.strip()
        try:
            value = await self.expand(raw)
        except ForcedFailure:
            return None
        except ExpansionError as e:
            return f'failed to expand ACL string "{raw}": {e.message}'
        self._trace_check(item, True, value)
        self.session.ctx.variables[variable.strip()] = value
        return None

    def _trace_check(self, item: AclItem, modifier: bool, expanded: str | None) -> None:
        """Exim's ``check name = value`` trace line, and under it the
        expanded value when the text had something to expand."""
        lhs = f"check {'!' if item.negated and not modifier else ''}{item.name} "
        raw = item.value
        if item.name == "set":
            variable, _, raw = item.value.partition("=")
            lhs += f"{variable.strip()} "
            raw = raw.strip()
        self.session.trace(f"{lhs}= {raw}")
        if expanded is not None and ("$" in raw or "\\" in raw):
            self.session.trace(f"{' ' * len(lhs)}= {expanded}")

    async def _modifier(self, item: AclItem) -> str | None:
        if item.name == "set":
            return await self._set(item)
        try:
            value = await self._argument(item)
        except _ItemError as e:
            return str(e)
        if value is None:
            return None
        name = item.name
        where = self.session.where
        self._trace_check(item, True, value)
        error = item_error(name, True, where)
        if error is not None:
            return error
        if name == "control":
            control, error = control_error(value, where)
            if error is not None:
                return error
            if control == "error":
                # Exim's placeholder for an undecodable control: an error
                # with nothing to log.
                return ""
            if control in ("fakereject", "fakedefer"):
                value = _fake_control(control, value)
        if name == "logwrite":
            targets, text = _logwrite(value, where)
            self.session.log(text, targets)
            return None
        if name == "continue":
            return None
        return await self.session.modifier(name, value)

    async def _condition(self, item: AclItem) -> tuple[str, str | None, str | None]:
        if item.name == "set":
            return OK, None, None
        where = self.session.where
        modifier = _is_modifier(item.name)
        # Exim checks where an item may be used once its argument is
        # expanded, or before, for the items it expands while testing.
        early = item.name in NOT_EXPANDED_AT_TOP
        error = item_error(item.name, modifier, where)
        if early:
            self._trace_check(item, modifier, None)
            if error is not None:
                return ERROR, None, error
        try:
            value = await self._argument(item)
        except _ItemError as e:
            return ERROR, None, str(e)
        if value is None:
            return OK, None, None
        if not early:
            self._trace_check(item, modifier, value)
        if error is None and item.name == "verify":
            error = verify_error(value, where)
        if error is not None:
            return ERROR, None, error
        handler = _CONDITIONS.get(item.name)
        if handler is not None:
            return await handler(self, value)
        return await self.session.condition(item.name, value)

    async def nested(self, text: str) -> tuple[str, str | None, str | None]:
        """The ``acl`` condition: *text* is the name and up to 9 arguments."""
        words = text.split()
        if not words:
            return ERROR, None, "missing ACL name in acl condition"
        name, args = words[0], words[1:]
        if len(args) > 9:
            return ERROR, None, "Too many arguments for '' (max is 10)"
        if self.depth >= MAX_NESTING:
            return ERROR, None, f'ACL nested too deep: possible loop in "{name}"'
        try:
            acl = resolve_acl(self.session, name)
        except AclConfigError as e:
            return ERROR, None, str(e)
        result, user_msg, log_msg = await run_with_args(self.session, acl, args, self.depth + 1)
        if result == OK:
            return OK, user_msg, log_msg
        return result, user_msg, log_msg


class _ItemError(Exception):
    pass


async def run_with_args(session: AclSession, acl: Acl, args: list[str], depth: int = 0
                        ) -> tuple[str, str | None, str | None]:
    """Run *acl* with ``$acl_arg1..9`` and ``$acl_narg`` set from *args*,
    restoring the caller's values afterwards."""
    variables = session.ctx.variables
    names = [f"acl_arg{i}" for i in range(1, 10)] + ["acl_narg"]
    saved = {n: variables[n] for n in names if n in variables}
    for i in range(9):
        variables[f"acl_arg{i + 1}"] = args[i] if i < len(args) else ""
    variables["acl_narg"] = str(len(args))
    try:
        return await AclRun(session, acl, depth).run()
    finally:
        for n in names:
            if n in saved:
                variables[n] = saved[n]
            else:
                variables.pop(n, None)


async def run_acl(session: AclSession, option_text: str | None, default: str
                  ) -> AclOutcome:
    """Run the ACL an ``acl_smtp_*`` option names; *default* ('accept' or
    'deny') applies when the option is unset."""
    if not option_text:
        return AclOutcome(default)
    try:
        name = await session.ctx.expand(option_text)
    except ExpansionError as e:
        return AclOutcome("error", None, f'failed to expand ACL string "{option_text}": '
                                         f"{e.message}")
    if not name:
        return AclOutcome(default)
    try:
        acl = resolve_acl(session, name)
    except AclConfigError as e:
        return AclOutcome("error", None, str(e))
    result, user_msg, log_msg = await run_with_args(session, acl, [])
    where = where_key(session.where)
    if result == DISCARD and (where == "predata"
                              or WHERE_ORDER[where] > WHERE_ORDER["notsmtp"]):
        # Only a message ACL can discard (and not PREDATA, which is in the
        # middle of a command).
        session.log(f'"discard" verb not allowed in {where_name(where)} ACL', ("main", "panic"))
        result = ERROR
    # A long message for the client is split into lines here, for the top
    # level only: the log keeps it whole.
    if user_msg is not None:
        user_msg = split_message(user_msg)
    return AclOutcome(VERDICTS[result], user_msg, log_msg)


def _is_modifier(name: str) -> bool:
    from twisted_mta.config.parser import ACL_CONDITIONS

    return ACL_CONDITIONS.get(name, name in MODIFIERS)


def _fake_control(name: str, value: str) -> str:
    """``control = fakereject`` or ``fakedefer`` with its text made
    explicit (Exim's default when none is given) and split into lines as
    Exim splits it before replying."""
    from twisted_mta.smtp.receive import FAKE_RESPONSE_TEXT

    rest = value[len(name):]
    text = rest[1:] if rest.startswith("/") else FAKE_RESPONSE_TEXT
    return f"{name}/{split_message(text)}"


def _logwrite(value: str, where: str) -> tuple[tuple[str, ...], str]:
    """The logs and text of ``logwrite = value``: an optional leading
    ``:main,panic,reject:`` names the logs (each name matched as a prefix,
    as in Exim); an unknown name, or no closing colon, replaces the text
    with a complaint for the main and panic logs."""
    targets: list[str] = []
    pos = 0
    if value.startswith(":"):
        pos = 1
        while not value.startswith(":", pos):
            name = next((n for n in ("main", "panic", "reject") if value.startswith(n, pos)),
                        None)
            if name is None:
                return ("main", "panic"), printing(
                    f'unknown log name in "{value}" in "logwrite" in {where_name(where)} ACL')
            targets.append(name)
            pos += len(name)
            if value.startswith(",", pos):
                pos += 1
        pos += 1
    text = printing(value[pos:].lstrip(_SPACE))
    return tuple(n for n in ("main", "panic", "reject") if n in targets) or ("main",), text


# -- conditions the engine implements itself -------------------------------------


def _variable(run: AclRun, name: str) -> str:
    value = run.session.ctx.variables.get(name, "")
    return value() if callable(value) else value


async def _list_condition(run: AclRun, subject: str, text: str, kind: str,
                          data_variable: str | None, caseless: bool | None = None,
                          host: Any = None) -> tuple[str, str | None, str | None]:
    from twisted_mta.lists import ListDefer, match_list

    try:
        found = await match_list(subject, text, kind, run.session.ctx,
                                 caseless=caseless, host=host)
    except ListDefer as e:
        return DEFER, None, e.message
    except ExpansionError as e:
        return ERROR, None, e.message
    if found is None:
        return FAIL, None, None
    if data_variable:
        run.session.ctx.variables[data_variable] = found.value
    return OK, None, None


async def _domains(run: AclRun, value: str):
    return await _list_condition(run, _variable(run, "domain"), value, "domain", "domain_data")


async def _local_parts(run: AclRun, value: str):
    return await _list_condition(run, _variable(run, "local_part"), value, "localpart",
                                 "local_part_data")


async def _senders(run: AclRun, value: str):
    return await _list_condition(run, _variable(run, "sender_address"), value, "address",
                                 "sender_data")


async def _recipients(run: AclRun, value: str):
    return await _list_condition(run, _variable(run, "local_part") + "@"
                                 + _variable(run, "domain"), value, "address", "recipient_data")


async def _sender_domains(run: AclRun, value: str):
    sender = _variable(run, "sender_address")
    domain = sender.rpartition("@")[2] if "@" in sender else ""
    return await _list_condition(run, domain, value, "domain", None)


async def _hosts(run: AclRun, value: str):
    host = getattr(run.session, "host_identity", None)
    address = _variable(run, "sender_host_address")
    return await _list_condition(run, address, value, "host", "host_data", host=host)


async def _authenticated(run: AclRun, value: str):
    name = _variable(run, "sender_host_authenticated")
    if not name:
        return FAIL, None, None
    return await _list_condition(run, name, value, "localpart", None, caseless=True)


async def _encrypted(run: AclRun, value: str):
    cipher = _variable(run, "tls_in_cipher")
    if not cipher:
        return FAIL, None, None
    return await _list_condition(run, cipher, value, "localpart", None, caseless=True)


async def _condition_cond(run: AclRun, value: str):
    digits = value[1:] if value.startswith("-") else value
    if all("0" <= c <= "9" for c in digits):
        return (FAIL if int(digits or "0") == 0 else OK), None, None
    if value.lower() in ("no", "false"):
        return FAIL, None, None
    if value.lower() in ("yes", "true"):
        return OK, None, None
    return DEFER, None, f'invalid "condition" value "{value}"'


async def _acl_cond(run: AclRun, value: str):
    return await run.nested(value)


_CONDITIONS = {
    "acl": _acl_cond,
    "authenticated": _authenticated,
    "condition": _condition_cond,
    "domains": _domains,
    "encrypted": _encrypted,
    "hosts": _hosts,
    "local_parts": _local_parts,
    "recipients": _recipients,
    "sender_domains": _sender_domains,
    "senders": _senders,
}
