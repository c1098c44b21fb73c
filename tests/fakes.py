"""Small stand-ins shared by the in-memory tests."""

from __future__ import annotations

from typing import Any


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
