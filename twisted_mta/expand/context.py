"""The environment an expansion runs in: configuration, variables, services."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any


class ExpansionContext:
    """
    Everything an expansion may consult.

    @ivar config: the L{twisted_mta.config.Config} in force, or None.
    @ivar reactor: the reactor (time, processes, TCP), passed in, never imported.
    @ivar variables: extra or overriding variables, name -> str or a
        zero-argument callable returning str (evaluated when used).
    @ivar lookup_cache: per-message cache shared by lookups.
    @ivar threadpool: a bounded thread pool for libraries that block.
    @ivar resolver: a L{twisted_mta.dns.Resolver} (or None until needed).
    """

    def __init__(
        self,
        config: Any = None,
        reactor: Any = None,
        variables: dict[str, str | Callable[[], str]] | None = None,
        threadpool: Any = None,
        resolver: Any = None,
    ) -> None:
        self.config = config
        self.reactor = reactor
        self.variables = dict(variables or {})
        self.lookup_cache: dict = {}
        self.threadpool = threadpool
        self.resolver = resolver

    def main_option(self, name: str, default: Any = None) -> Any:
        """The value of a main configuration option, or *default*."""
        if self.config is None:
            return default
        return self.config.get(name, default)

    def named_list(self, kind: str, name: str) -> str | None:
        """The unexpanded text of named list *name* of *kind* ('domain',
        'host', 'address', 'localpart'), or None."""
        if self.config is None:
            return None
        named = self.config.named_lists.get(kind, {}).get(name)
        return None if named is None else named.text

    async def expand(self, text: str) -> str:
        """Expand *text* in this context; raises ExpansionError subclasses."""
        from twisted_mta.expand.evaluate import expand_string

        return await expand_string(text, self)
