"""Entry points: expand a string in a context."""

from __future__ import annotations

from typing import TYPE_CHECKING

from twisted_mta.expand.nodes import Evaluation
from twisted_mta.expand.parser import parse

if TYPE_CHECKING:
    from twisted.internet.defer import Deferred

    from twisted_mta.expand.context import ExpansionContext


async def expand_string(text: str, ctx: ExpansionContext, ev: Evaluation | None = None) -> str:
    """Expand *text*; raises ExpansionError (ForcedFailure for ``fail``).

    A NUL produced by an escape ends the string, as in Exim."""
    tree = parse(text)
    constant = tree.constant
    if constant is not None:
        result = constant
    else:
        result = await tree.run(ev if ev is not None else Evaluation(ctx))
    if "\0" in result:
        result = type(result)(result[: result.index("\0")])
    return result


def expand_deferred(text: str, ctx: ExpansionContext) -> Deferred:
    """:func:`expand_string` for callers at a protocol edge."""
    # Imported here: twisted.internet.defer costs more to import than the
    # whole expansion engine, and the -be command rarely needs it.
    from twisted.internet.defer import Deferred

    return Deferred.fromCoroutine(expand_string(text, ctx))


def expand_now(text: str, ctx: ExpansionContext) -> str:
    """Expand a string that needs no I/O, synchronously.

    Raises RuntimeError if the expansion would have to wait (a lookup over
    the network): such strings must go through :func:`expand_deferred`."""
    coroutine = expand_string(text, ctx)
    try:
        coroutine.send(None)
    except StopIteration as done:
        return done.value
    coroutine.close()
    raise RuntimeError(f"expansion of {text!r} needs I/O; use expand_deferred()")
