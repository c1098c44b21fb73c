"""``redis``: Redis queries as lookups (Exim's ``lookups/redis.c``).

Servers come from the ``redis_servers`` main option, a colon list of
``host[:port]/db/password`` (write ``::`` for a colon inside a list) or
``(socket-path)/db/password``; an empty db or password means none.  A query
may name servers with the lookup option ``,servers=`` or the old
``servers=...;`` prefix.  Servers are tried in order while they fail with a
connection problem, a timeout or a ``MOVED`` reply.

The query is split on white space into the command's arguments, a
backslash protecting the next character (``${quote_redis:}`` adds them).
``AUTH`` and ``SELECT`` are sent before every query when a password or a
database is configured, as Exim does.

Replies: a status or string is the data; an integer is ``true`` or
``false`` (an Exim quirk kept here); an array is its elements (one level of
nesting) joined by newlines, integers in decimal; nil is found with an empty
value; an error defers.

Every call is bounded by a timeout (txredisapi never gives up on a silent
server).  Connections are cached per server (host, port or socket, db) and
dropped after any connection error or timeout, so a restarted server is
reconnected on the next query.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import txredisapi
from twisted.internet.defer import Deferred
from twisted.internet.defer import TimeoutError as DeferredTimeout
from twisted.internet.endpoints import HostnameEndpoint, UNIXClientEndpoint
from zope.interface import implementer

from twisted_mta.expand.errors import LookupDefer
from twisted_mta.interfaces import ILookup
from twisted_mta.lookups.search import register_lookup
from twisted_mta.taint import is_tainted, join_taint
from twisted_mta.values import split_list

C_SPACE = " \t\n\v\f\r"
DEFAULT_TIMEOUT = 5.0
MAX_ARGS = 32


def quote_redis(value: str) -> str:
    """Backslash white space and backslashes, for the argument splitter."""
    return "".join("\\" + c if c in C_SPACE or c == "\\" else c for c in value)


def split_command(query: str) -> list[str]:
    """Split a query into arguments on white space; a backslash protects the
    next character.  At most 32 arguments, as in Exim."""
    args: list[str] = []
    pos = 0
    n = len(query)
    while pos < n and query[pos] in C_SPACE:
        pos += 1
    while pos < n and len(args) < MAX_ARGS:
        chars = []
        while pos < n and query[pos] not in C_SPACE:
            if query[pos] == "\\":
                pos += 1
                if pos >= n:
                    break
            chars.append(query[pos])
            pos += 1
        args.append("".join(chars))
        while pos < n and query[pos] in C_SPACE:
            pos += 1
    return args


@dataclass(frozen=True)
class RedisServer:
    """One entry of a server list.

    @ivar host: host name or address ("" with a socket).
    @ivar port: TCP port.
    @ivar socket: Unix socket path, or None.
    @ivar db: database number text, or None.
    @ivar password: password, or None.
    @ivar ident: the entry without its password (the connection cache key).
    """

    host: str
    port: int
    socket: str | None
    db: str | None
    password: str | None
    ident: str


def parse_server(text: str) -> RedisServer:
    """Parse ``host[:port]/db/password`` or ``(socket)/db/password``."""
    parts = text.rsplit("/", 2)
    if len(parts) < 3:
        incomplete = text if len(parts) < 2 else parts[0]
        raise LookupDefer(f"incomplete Redis server data: {incomplete}")
    hostpart, db, password = parts
    ident = f"{hostpart}/{db}"
    socket = None
    if "(" in hostpart:
        hostpart, _, socket = hostpart.partition("(")
        socket = socket.partition(")")[0]
    host, colon, port_text = hostpart.partition(":")
    if "/" in host:
        raise LookupDefer(f"unexpected slash in Redis server hostname: {host}")
    digits = ""
    for c in port_text.lstrip(C_SPACE):
        if not c.isdigit():
            break
        digits += c
    port = int(digits) if colon and digits else (0 if colon else 6379)
    return RedisServer(host, port, socket, db or None, password or None, ident)


class _ServerFailed(Exception):
    """This server could not answer; try the next one."""


def _txredis_connect(reactor: Any, server: RedisServer, timeout: float) -> Deferred:
    """Start a txredisapi connection; the Deferred fires with a handler that
    has ``execute_command`` and ``disconnect``."""
    factory = txredisapi.RedisFactory(
        server.ident, None, 1, isLazy=False, charset=None, convertNumbers=False
    )
    # No reconnection: a connection that breaks is dropped from our cache and
    # a fresh one is made for the next query.
    factory.reconnect = False
    if server.socket is not None:
        endpoint = UNIXClientEndpoint(reactor, server.socket, timeout=timeout)
    else:
        endpoint = HostnameEndpoint(reactor, server.host, server.port, timeout=timeout)
    factory.startConnecting(endpoint)
    deferred = factory.deferred

    def failed(failure: Any) -> Any:
        factory.disconnect()
        return failure

    return deferred.addErrback(failed)


def _scalar_text(reply: Any) -> str | None:
    if isinstance(reply, int):
        return str(reply)
    if isinstance(reply, bytes):
        return reply.decode("latin-1")
    if isinstance(reply, str):
        return reply
    return None


def reply_text(reply: Any) -> str | None:
    """Map a Redis reply to lookup data as Exim does (None: not found).
    Nil is handled by the caller; other unsupported elements are skipped,
    though their separators remain."""
    if isinstance(reply, int):
        return "true" if reply != 0 else "false"
    if not isinstance(reply, list):
        return _scalar_text(reply)
    result: str | None = None
    for entry in reply:
        # Exim adds the separator before every element, and again before each
        # element of a nested array.
        if result is not None:
            result += "\n"
        for sub in entry if isinstance(entry, list) else [entry]:
            if isinstance(entry, list) and result is not None:
                result += "\n"
            text = None if isinstance(sub, list) else _scalar_text(sub)
            if text is not None:
                result = (result or "") + text
    return result


@implementer(ILookup)
class RedisLookup:
    """The ``redis`` lookup type (an L{ILookup}).

    @param timeout: seconds allowed for connecting and for each command.
    @param connect: ``(reactor, server, timeout) -> Deferred`` firing with a
        connection handler; replaceable for tests.
    """

    name = "redis"
    query_style = True
    # Queries may change data (SET, INCR...), so results are not cached.
    cacheable = False

    def __init__(
        self,
        timeout: float = DEFAULT_TIMEOUT,
        connect: Callable[[Any, RedisServer, float], Deferred] = _txredis_connect,
    ) -> None:
        self.timeout = timeout
        self._connect = connect
        self._connections: dict[str, Any] = {}

    def quote(self, value: str, extra: str | None) -> str | None:
        return quote_redis(value) if extra is None else None

    async def close_connections(self) -> None:
        """Close every cached connection."""
        connections, self._connections = self._connections, {}
        for handler in connections.values():
            await handler.disconnect()

    async def find(self, source: str | None, key: str, options: dict[str, str], context: Any) -> str | None:
        main_list = None
        config = getattr(context, "config", None)
        if config is not None:
            main_list = config.get("redis_servers")
        query = key
        if key.startswith("servers"):
            servers, query = self._query_servers(key, main_list)
        else:
            servers = self._option_servers(options.get("servers"), main_list)
        error = ""
        for text in servers:
            if is_tainted(text):
                raise LookupDefer(f'Redis server "{text}" is tainted')
            server = parse_server(text)
            try:
                return await self._query(context.reactor, server, query)
            except _ServerFailed as e:
                error = str(e)
        raise LookupDefer(error)

    @staticmethod
    def _resolve(name: str, main_list: str | None) -> str:
        """A server named without ``/`` refers to an entry of redis_servers."""
        if "/" in name:
            return name
        for entry in split_list(main_list or ""):
            if entry.startswith(name) and entry[len(name):len(name) + 1] == "/":
                return entry
        raise LookupDefer(f'Redis server "{name}" not found in redis_servers')

    def _query_servers(self, key: str, main_list: str | None) -> tuple[list[str], str]:
        rest = key[7:].lstrip(C_SPACE)
        if not rest.startswith("="):
            raise LookupDefer('missing = after "servers" in Redis lookup')
        rest = rest[1:].lstrip(C_SPACE)
        semicolon = rest.find(";")
        if semicolon < 0:
            raise LookupDefer('missing ; after "servers=" in Redis lookup')
        if semicolon == 0:
            raise LookupDefer(f'"servers=" defines no servers in "{key}"')
        names = split_list(rest[:semicolon])
        servers = [join_taint(self._resolve(name, main_list), key) for name in names]
        return servers, rest[semicolon + 1:]

    def _option_servers(self, option: str | None, main_list: str | None) -> list[str]:
        server_list = option if option is not None else main_list
        if server_list is None:
            raise LookupDefer("no Redis servers defined (redis_servers option)")
        return [
            join_taint(self._resolve(name, main_list), server_list)
            for name in split_list(server_list)
        ]

    async def _call(
        self, reactor: Any, server: RedisServer, deferred: Deferred, what: str = "REDIS: query failed"
    ) -> Any:
        """Wait for *deferred* with the timeout; a connection problem or a
        timeout drops the cached connection and raises _ServerFailed."""
        deferred.addTimeout(self.timeout, reactor)
        try:
            return await deferred
        except (DeferredTimeout, txredisapi.ConnectionError, ConnectionError, ValueError) as e:
            self._drop(server)
            reason = "timed out" if isinstance(e, DeferredTimeout) else str(e) or type(e).__name__
            raise _ServerFailed(f"{what}: {reason}") from None

    def _drop(self, server: RedisServer) -> None:
        handler = self._connections.pop(server.ident, None)
        if handler is not None:
            handler.disconnect()

    async def _query(self, reactor: Any, server: RedisServer, query: str) -> str | None:
        handler = self._connections.get(server.ident)
        if handler is None:
            handler = await self._call(
                reactor, server, self._connect(reactor, server, self.timeout), "REDIS connection failed"
            )
            self._connections[server.ident] = handler
        # Exim ignores the replies to AUTH and SELECT: a wrong password shows
        # up as the error of the query itself.
        if server.password is not None:
            await self._command(reactor, server, handler, ["AUTH", server.password], ignore_errors=True)
        if server.db is not None:
            await self._command(reactor, server, handler, ["SELECT", server.db], ignore_errors=True)
        reply = await self._command(reactor, server, handler, split_command(query))
        if reply is None:
            return ""
        return reply_text(reply)

    async def _command(
        self, reactor: Any, server: RedisServer, handler: Any, args: list[str], ignore_errors: bool = False
    ) -> Any:
        encoded = [arg.encode("latin-1") for arg in args]
        try:
            return await self._call(reactor, server, handler.execute_command(*encoded))
        except txredisapi.ResponseError as e:
            if ignore_errors:
                return None
            text = str(e)
            if text.startswith("MOVED"):
                raise _ServerFailed(f"REDIS: lookup result failed: {text}") from None
            raise LookupDefer(f"REDIS: lookup result failed: {text}") from None


register_lookup(RedisLookup())
