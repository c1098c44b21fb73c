"""Access control lists: verbs, conditions and modifiers, evaluated in order.

The engine is in L{twisted_mta.acl.engine}; this module serves
``${acl{name}{args}}`` and the ``acl`` expansion condition.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from twisted_mta.acl.engine import VERDICTS, AclOutcome, AclSession, run_acl, run_with_args
from twisted_mta.expand.errors import ExpansionError, ForcedFailure

if TYPE_CHECKING:
    from twisted_mta.expand.nodes import Evaluation

__all__ = ["AclOutcome", "AclSession", "acl_failure", "run_acl", "run_acl_for_expansion"]

_RC_NAMES = {"defer": "DEFER", "drop": "FAIL_DROP", "discard": "DISCARD", "error": "ERROR"}


def acl_failure(verdict: str, name: str) -> ExpansionError:
    """The expansion failure for an ACL that neither accepted nor denied:
    a defer is a forced failure, the rest are errors."""
    text = f'{_RC_NAMES.get(verdict, verdict.upper())} from acl "{name}"'
    return ForcedFailure(text) if verdict == "defer" else ExpansionError(text)


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
    acl = None if config is None else config.acls.get(name)
    if acl is None:
        return "error", None
    session = getattr(ev.ctx, "acl_session", None) or AclSession(ev.ctx)
    result, user_message, _ = await run_with_args(session, acl, args[:9])
    return VERDICTS[result], user_message
