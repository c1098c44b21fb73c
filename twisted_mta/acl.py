"""Access control lists: verbs, conditions and modifiers, evaluated in order.

This module currently serves ``${acl{name}{args}}`` and the ``acl``
expansion condition: the verbs, ``endpass``, the ``condition`` and ``acl``
conditions and the ``message``, ``log_message``, ``set``, ``logwrite`` and
``control`` modifiers.  Conditions that need an SMTP session fail with a
clear "not yet supported" error naming the condition.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from twisted_mta.expand.errors import ExpansionError, ForcedFailure

if TYPE_CHECKING:
    from twisted_mta.expand.nodes import Evaluation

_MODIFIERS = frozenset(
    ("message", "log_message", "logwrite", "control", "add_header", "remove_header",
     "delay", "log_reject_target", "queue", "udpsend", "continue")
)
_RC_NAMES = {"defer": "DEFER", "drop": "FAIL_DROP", "discard": "DISCARD", "error": "ERROR"}


def acl_failure(verdict: str, name: str) -> ExpansionError:
    """The expansion failure for an ACL that neither accepted nor denied:
    a defer is a forced failure, the rest are errors."""
    text = f'{_RC_NAMES.get(verdict, verdict.upper())} from acl "{name}"'
    return ForcedFailure(text) if verdict == "defer" else ExpansionError(text)


class AclResult:
    __slots__ = ("verdict", "message")

    def __init__(self, verdict: str, message: str | None) -> None:
        self.verdict = verdict
        self.message = message


async def run_acl_for_expansion(
    ev: Evaluation, name: str, args: list[str]
) -> tuple[str, str | None]:
    """Run ACL *name* with ``$acl_arg1..9`` set from *args*.

    Returns (verdict, message): verdict is accept, deny, defer, discard, drop
    or error."""
    if not name:
        # An empty ACL denies, as in Exim.
        return "deny", None
    config = ev.ctx.config
    acl = None if config is None else getattr(config, "acls", {}).get(name)
    if acl is None:
        return "error", None
    saved = ev.acl_args
    ev.acl_args = tuple(args[:9])
    try:
        result = await _run_statements(ev, acl.statements)
    finally:
        ev.acl_args = saved
    return result.verdict, result.message


async def _run_statements(ev: Evaluation, statements: list[Any]) -> AclResult:
    for statement in statements:
        verb = statement.verb
        message: str | None = None
        passed = True
        endpass = False
        for entry in statement.items:
            name = entry.name
            if name == "endpass":
                endpass = True
                continue
            if name == "set":
                variable, _, value_text = entry.value.partition("=")
                ev.ctx.variables[variable.strip()] = await _expand(ev, value_text.strip())
                continue
            if name == "message":
                message = entry.value
                continue
            if name in _MODIFIERS:
                continue
            ok = await _condition(ev, entry)
            if entry.negated:
                ok = not ok
            if not ok:
                passed = False
                break
        text = await _expand_message(ev, message)
        if verb == "require":
            if not passed:
                return AclResult("deny", text)
            continue
        if verb == "warn":
            continue
        if passed:
            return AclResult(verb, text)
        if endpass and verb == "accept":
            return AclResult("deny", text)
    return AclResult("deny", None)


async def _expand_message(ev: Evaluation, message: str | None) -> str | None:
    if message is None:
        return None
    return await _expand(ev, message)


async def _expand(ev: Evaluation, text: str) -> str:
    """Expand inside the calling expansion, so $acl_arg1.. are visible."""
    from twisted_mta.expand.evaluate import expand_string

    return await expand_string(text, ev.ctx, ev)


async def _condition(ev: Evaluation, entry: Any) -> bool:
    name = entry.name
    if name == "condition":
        try:
            value = await _expand(ev, entry.value)
        except ForcedFailure:
            return True
        from twisted_mta.expand.operators import parse_bool

        return parse_bool(value, False)
    if name == "acl":
        words = (await _expand(ev, entry.value)).split()
        if not words:
            raise ExpansionError("missing ACL name in acl condition")
        sub_name = words[0]
        verdict, _ = await run_acl_for_expansion(ev, sub_name, words[1:])
        if verdict == "accept":
            return True
        if verdict == "deny":
            return False
        raise acl_failure(verdict, sub_name)
    raise ExpansionError(f'ACL condition "{name}" is not yet supported')
