"""Small stand-ins shared by the in-memory tests."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.internet.task import Clock
from twisted.python.failure import Failure


class FakeConfig:
    """Just enough of twisted_mta.config.Config for the expansion engine and
    lookups: main options, named lists and ACLs."""

    def __init__(self, **options: Any) -> None:
        self.options = options
        self.named_lists: dict[str, dict] = {"domain": {}, "host": {}, "address": {}, "localpart": {}}
        self.acls: dict = {}
        self.filename = "/dev/null"

    def get(self, name: str, default: Any = None) -> Any:
        return self.options.get(name, default)


async def fails(awaitable: Any, exc_type: type[BaseException]) -> BaseException:
    """Await *awaitable*, which must raise *exc_type*; return the exception."""
    try:
        await awaitable
    except exc_type as e:
        return e
    raise AssertionError(f"{exc_type.__name__} not raised")


class ImmediateReactor(Clock):
    """A Clock that is also the reactor: callFromThread runs at once."""

    def callFromThread(self, f: Callable[..., Any], *args: Any, **kwargs: Any) -> None:
        f(*args, **kwargs)


class ImmediateThreadPool:
    """Runs "threaded" work at once, as deferToThreadPool asks it to."""

    def callInThreadWithCallback(self, on_result: Callable[[bool, Any], None] | None,
                                 f: Callable[..., Any], *args: Any, **kwargs: Any) -> None:
        try:
            result = f(*args, **kwargs)
        except BaseException:
            if on_result is not None:
                on_result(False, Failure())
            return
        if on_result is not None:
            on_result(True, result)

    def callInThread(self, f: Callable[..., Any], *args: Any, **kwargs: Any) -> None:
        self.callInThreadWithCallback(None, f, *args, **kwargs)
