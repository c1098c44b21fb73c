"""The redis lookup, against a real redis-server (tests/peers.py) and, for
timeouts, against a silent fake driven by a task.Clock."""

from __future__ import annotations

from twisted.internet import defer, reactor, task
from twisted.trial import unittest

from tests.fakes import FakeConfig, fails
from tests.peers import RedisServer, free_port
from twisted_mta.expand.context import ExpansionContext
from twisted_mta.expand.errors import LookupDefer
from twisted_mta.lookups import parse_lookup_type, quote_for_lookup, search_find
from twisted_mta.lookups.redis import RedisLookup, parse_server, reply_text, split_command
from twisted_mta.taint import taint


class UnitTests(unittest.TestCase):
    def test_split_and_quote(self) -> None:
        query = "SET k " + quote_for_lookup("redis", "a b\\c", None)
        self.assertEqual(split_command(query), ["SET", "k", "a b\\c"])
        self.assertEqual(split_command("  GET   x  "), ["GET", "x"])
        self.assertEqual(len(split_command(" ".join(["a"] * 40))), 32)

    def test_parse_server(self) -> None:
        s = parse_server("127.0.0.1:6380/2/pw")
        self.assertEqual((s.host, s.port, s.socket, s.db, s.password, s.ident),
                         ("127.0.0.1", 6380, None, "2", "pw", "127.0.0.1:6380/2"))
        s = parse_server("(/run/redis.sock)//")
        self.assertEqual((s.socket, s.db, s.password), ("/run/redis.sock", None, None))
        self.assertEqual(parse_server("localhost//").port, 6379)
        e = self.assertRaises(LookupDefer, parse_server, "localhost/0")
        self.assertEqual(e.message, "incomplete Redis server data: localhost")

    def test_replies(self) -> None:
        self.assertEqual(reply_text(b"v"), "v")
        self.assertEqual(reply_text("OK"), "OK")
        self.assertEqual(reply_text(5), "true")
        self.assertEqual(reply_text(0), "false")
        self.assertEqual(reply_text([b"a", 3, b"b"]), "a\n3\nb")
        self.assertEqual(reply_text([b"a", [b"b", b"c"]]), "a\n\nb\nc")
        self.assertIsNone(reply_text([]))


class SilentConnection:
    """A connection whose commands never answer (a hung server)."""

    def __init__(self) -> None:
        self.disconnected = False

    def execute_command(self, *args: bytes) -> defer.Deferred:
        return defer.Deferred()

    def disconnect(self) -> defer.Deferred:
        self.disconnected = True
        return defer.succeed(None)


class ClockTests(unittest.TestCase):
    def test_timeout_defers(self) -> None:
        clock = task.Clock()
        connections = []

        def connect(reactor, server, timeout):
            connections.append(SilentConnection())
            return defer.succeed(connections[-1])

        lookup = RedisLookup(timeout=5.0, connect=connect)
        ctx = ExpansionContext(config=FakeConfig(redis_servers="a//:b//"), reactor=clock)
        d = defer.ensureDeferred(lookup.find(None, "GET x", {}, ctx))
        clock.advance(4.9)
        self.assertNoResult(d)
        clock.advance(0.2)       # first server times out, the second is tried
        self.assertNoResult(d)
        clock.advance(5)
        failure = self.failureResultOf(d, LookupDefer)
        self.assertEqual(failure.value.message, "REDIS: query failed: timed out")
        self.assertEqual([c.disconnected for c in connections], [True, True])

    def test_errors(self) -> None:
        lookup = RedisLookup()
        ctx = ExpansionContext(config=FakeConfig(), reactor=task.Clock())
        for query, options, message in [
            ("GET x", {}, "no Redis servers defined (redis_servers option)"),
            ("GET x", {"servers": "nosuch"}, 'Redis server "nosuch" not found in redis_servers'),
            ("servers GET x", {}, 'missing = after "servers" in Redis lookup'),
            ("servers=a//", {}, 'missing ; after "servers=" in Redis lookup'),
            ("servers=;GET x", {}, '"servers=" defines no servers in "servers=;GET x"'),
            ("GET x", {"servers": taint("h//")}, 'Redis server "h//" is tainted'),
        ]:
            d = defer.ensureDeferred(lookup.find(None, query, options, ctx))
            self.assertEqual(self.failureResultOf(d, LookupDefer).value.message, message)


class RealRedisTests(unittest.TestCase):
    """Against redis-server on a free loopback port."""

    timeout = 60

    def setUp(self) -> None:
        self.server = RedisServer(password="s3cret")
        self.server.start()
        self.addCleanup(self.server.cleanup)
        self.lookup = RedisLookup(timeout=2.0)
        self.addCleanup(self.lookup.close_connections)
        self.ctx = self.context(self.server.server_spec())

    def context(self, servers: str) -> ExpansionContext:
        return ExpansionContext(config=FakeConfig(redis_servers=servers), reactor=reactor)

    async def query(self, text: str, ctx: ExpansionContext | None = None,
                    options: dict[str, str] | None = None) -> str | None:
        return await self.lookup.find(None, text, options or {}, ctx or self.ctx)

    async def test_set_get_quoted(self) -> None:
        value = quote_for_lookup("redis", "objvalue plus\\x", None)
        self.assertEqual(await self.query(f"SET keyname {value}"), "OK")
        self.assertEqual(await self.query("GET keyname"), "objvalue plus\\x")
        self.assertEqual(self.server.command_reply("GET", "keyname"), b"$15\r\nobjvalue plus\\x\r\n")

    async def test_types(self) -> None:
        self.server.command_reply("SADD", "relay_from_ips", "10.0.0.1")
        self.server.command_reply("SADD", "relay_from_ips", "192.168.0.0/16")
        members = await self.query("SMEMBERS relay_from_ips")
        self.assertEqual(sorted(members.split("\n")), ["10.0.0.1", "192.168.0.0/16"])
        self.server.command_reply("HSET", "h", "f", "hv")
        self.assertEqual(await self.query("HGET h f"), "hv")
        self.assertEqual(await self.query("EXISTS h"), "true")
        self.assertEqual(await self.query("EXISTS nosuch"), "false")
        self.assertEqual(await self.query("GET nosuch"), "")
        self.server.command_reply("RPUSH", "l", "1")
        self.server.command_reply("RPUSH", "l", "two")
        self.assertEqual(await self.query("LRANGE l 0 -1"), "1\ntwo")
        self.assertIsNone(await self.query("LRANGE empty 0 -1"))
        e = await fails(self.query("NOSUCHCOMMAND"), LookupDefer)
        self.assertIn("REDIS: lookup result failed: ERR unknown command", e.message)

    async def test_through_search_find(self) -> None:
        self.server.command_reply("SET", "k", "v")
        spec = parse_lookup_type("redis")
        self.assertEqual(await search_find(spec, None, "GET k", self.ctx), "v")
        # Results are not cached: a write is seen at once.
        self.server.command_reply("SET", "k", "w")
        self.assertEqual(await search_find(spec, None, "GET k", self.ctx), "w")

    async def test_bad_password(self) -> None:
        ctx = self.context(self.server.server_spec(password="wrong"))
        e = await fails(self.query("GET k", ctx), LookupDefer)
        self.assertEqual(e.message, "REDIS: lookup result failed: NOAUTH Authentication required.")

    async def test_db_select(self) -> None:
        self.server.command_reply("SET", "dbkey", "in-db-3", db=3)
        self.assertEqual(await self.query("GET dbkey"), "")
        ctx = self.context(self.server.server_spec(db="3"))
        self.assertEqual(await self.query("GET dbkey", ctx), "in-db-3")

    async def test_servers_option(self) -> None:
        self.server.command_reply("SET", "k", "v")
        dead = f"127.0.0.1::{free_port()}//"
        ctx = self.context(f"{dead} : {self.server.server_spec()}")
        self.assertEqual(await self.query("GET k", ctx), "v")
        # ,servers= naming the main list's entry by host name only.
        self.assertEqual(await self.query("GET k", ctx, {"servers": f"127.0.0.1::{self.server.port}"}), "v")
        self.assertEqual(await self.query(f"servers={self.server.server_spec()};GET k", ctx), "v")

    async def test_all_down(self) -> None:
        ctx = self.context(f"127.0.0.1::{free_port()}// : 127.0.0.1::{free_port()}//")
        e = await fails(self.query("GET k", ctx), LookupDefer)
        self.assertTrue(e.message.startswith("REDIS connection failed"), e.message)

    async def test_server_restart(self) -> None:
        self.server.command_reply("SET", "k", "v")
        self.assertEqual(await self.query("GET k"), "v")
        self.server.stop()
        e = await fails(self.query("GET k"), LookupDefer)
        self.assertTrue(e.message.startswith("REDIS"), e.message)
        self.server.start()
        self.server.command_reply("SET", "k", "again")
        self.assertEqual(await self.query("GET k"), "again")
