"""The parsed form of an expansion string, and how each part evaluates.

A string parses once into a :class:`Seq` of nodes; evaluating it walks the
nodes left to right.  Evaluation is ``async`` so a lookup may wait on the
network, but a string whose nodes never wait completes without suspending.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from twisted_mta.expand.errors import ExpansionError, ForcedFailure
from twisted_mta.taint import Tainted

if TYPE_CHECKING:
    from twisted_mta.expand.context import ExpansionContext


class Evaluation:
    """The mutable state of one expansion: Exim's ``$0..$n``, ``$value``,
    ``$item`` and ``$runrc`` live here, saved and restored around the items
    that change them."""

    __slots__ = ("ctx", "numeric", "value", "item", "runrc", "acl_args")

    def __init__(self, ctx: ExpansionContext) -> None:
        self.ctx = ctx
        self.numeric: tuple[str, ...] = ()
        self.value: str | None = None
        self.item: str | None = None
        self.runrc = 0
        self.acl_args: tuple[str, ...] | None = None


class Node:
    """One part of a parsed expansion string."""

    __slots__ = ()

    async def run(self, ev: Evaluation) -> str:  # pragma: no cover - abstract
        raise NotImplementedError


class Text(Node):
    __slots__ = ("text",)

    def __init__(self, text: str) -> None:
        self.text = text

    async def run(self, ev: Evaluation) -> str:
        return self.text


class Seq(Node):
    """Concatenation of parts; the result is tainted if any part is.

    Exim handles strings as C strings: a NUL written with an escape ends
    the value wherever it is used.  ``cut_at_nul`` marks the sequences
    that contain one."""

    __slots__ = ("parts", "source", "cut_at_nul")

    def __init__(self, parts: list[Node], source: str = "") -> None:
        self.parts = parts
        self.source = source
        self.cut_at_nul = any(type(p) is Text and "\0" in p.text for p in parts)

    @property
    def constant(self) -> str | None:
        if not self.parts:
            return ""
        if len(self.parts) == 1 and type(self.parts[0]) is Text and not self.cut_at_nul:
            return self.parts[0].text  # type: ignore[attr-defined]
        return None

    async def run(self, ev: Evaluation) -> str:
        parts = self.parts
        if not parts:
            return ""
        if len(parts) == 1:
            result = await parts[0].run(ev)
        else:
            pieces = [await p.run(ev) for p in parts]
            result = "".join(pieces)
            for piece in pieces:
                if type(piece) is Tainted:
                    result = Tainted(result)
                    break
        if self.cut_at_nul and "\0" in result:
            result = type(result)(result[: result.index("\0")])
        return result


class Variable(Node):
    __slots__ = ("name", "getter")

    def __init__(self, name: str, getter: Callable[[Evaluation, str], str]) -> None:
        self.name = name
        self.getter = getter

    async def run(self, ev: Evaluation) -> str:
        override = ev.ctx.variables.get(self.name)
        if override is not None:
            return override() if callable(override) else override
        return self.getter(ev, self.name)


class Header(Node):
    """``$h_name:`` and friends; no message means no headers."""

    __slots__ = ("prefix", "name")

    def __init__(self, prefix: str, name: str) -> None:
        self.prefix = prefix
        self.name = name

    async def run(self, ev: Evaluation) -> str:
        headers = ev.ctx.variables.get("__headers__")
        if not headers:
            return ""
        return Tainted(headers.get(self.name.lower(), ""))


class Numeric(Node):
    """``$1`` / ``${1}``: a regex capture."""

    __slots__ = ("n",)

    def __init__(self, n: int) -> None:
        self.n = n

    async def run(self, ev: Evaluation) -> str:
        if self.n < len(ev.numeric):
            return ev.numeric[self.n]
        return ""


class Operator(Node):
    """``${name:arg}`` whose work is a plain function of the argument."""

    __slots__ = ("name", "arg", "fn")

    def __init__(self, name: str, arg: Seq, fn: Callable[[str], str]) -> None:
        self.name = name
        self.arg = arg
        self.fn = fn

    async def run(self, ev: Evaluation) -> str:
        value = await self.arg.run(ev)
        result = self.fn(value)
        if type(value) is Tainted and type(result) is not Tainted:
            return Tainted(result)
        return result


class ContextOperator(Node):
    """``${name:arg}`` that needs the evaluation (``expand``, ``listnamed``...)."""

    __slots__ = ("name", "arg", "fn")

    def __init__(
        self, name: str, arg: Seq, fn: Callable[[Evaluation, str], Awaitable[str]]
    ) -> None:
        self.name = name
        self.arg = arg
        self.fn = fn

    async def run(self, ev: Evaluation) -> str:
        return await self.fn(ev, await self.arg.run(ev))


class YesNo:
    """The ``{yes}{no}`` / ``{yes}fail`` tail shared by if, lookup, extract,
    run, env, readsocket and listextract."""

    __slots__ = ("yes", "no", "fail", "kind")

    def __init__(self, kind: str, yes: Seq | None, no: Seq | None, fail: bool) -> None:
        self.kind = kind
        self.yes = yes
        self.no = no
        self.fail = fail

    async def choose(self, ev: Evaluation, success: bool, default: str | None) -> str:
        """The result for *success*; *default* is used when there is no yes
        part (``true`` for if, ``$value`` for the others)."""
        if success:
            if self.yes is None:
                return default or ""
            return await self.yes.run(ev)
        if self.no is not None:
            return await self.no.run(ev)
        if self.fail:
            raise ForcedFailure(f'"{self.kind}" failed and "fail" requested')
        return ""


class Item(Node):
    """A ``${name{arg}...}`` item evaluated by a handler function."""

    __slots__ = ("name", "args", "tail", "handler", "extra")

    def __init__(
        self,
        name: str,
        args: list[Seq],
        handler: Callable[[Evaluation, Item], Awaitable[str]],
        tail: YesNo | None = None,
        extra: Any = None,
    ) -> None:
        self.name = name
        self.args = args
        self.tail = tail
        self.handler = handler
        self.extra = extra

    async def run(self, ev: Evaluation) -> str:
        return await self.handler(ev, self)

    async def arg_values(self, ev: Evaluation) -> list[str]:
        return [await a.run(ev) for a in self.args]


class Condition:
    """A parsed condition; ``negated`` applies Exim's leading ``!``."""

    __slots__ = ("name", "negated", "args", "test", "extra")

    def __init__(
        self,
        name: str,
        negated: bool,
        args: list[Any],
        test: Callable[[Evaluation, Condition], Awaitable[bool]],
        extra: Any = None,
    ) -> None:
        self.name = name
        self.negated = negated
        self.args = args
        self.test = test
        self.extra = extra

    async def evaluate(self, ev: Evaluation) -> bool:
        return (await self.test(ev, self)) != self.negated


def fail(message: str) -> ExpansionError:
    return ExpansionError(message)
