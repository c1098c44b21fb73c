"""The experimental spec's event example, with a lookup we have: the old
``tpda_event_action`` runs a lookup for each ``msg:delivery`` (the spec
uses pgsql; here Redis), with the spec's ``$tpda_event``, writing each
delivery into a real redis-server while exim-py delivers to a real Exim
4.96."""

from __future__ import annotations

import shutil
import tempfile
from typing import Any

from twisted.python.threadpool import ThreadPool
from twisted.trial import unittest as trial

from tests import test_smtp_transport as peer
from tests.peers import RedisServer
from tests.test_delivery_peers import Exim4Daemon
from twisted_mta.lookups.search import get_lookup
from twisted_mta.queue.deliver import COMPLETED
from twisted_mta.spool.store import Spool

ACTION = (r"  tpda_event_action = ${if eq {msg:delivery}{$tpda_event} "
          r"{${lookup redis{SET ${quote_redis:delivery:$local_part@$domain} "
          r"${quote_redis:$host_address $message_exim_id $tpda_data}}}}{}}" "\n")


class SpecExampleTests(trial.TestCase):

    deliver = peer.DeliveryToEximTests.deliver

    def setUp(self) -> None:
        peer._require_exim()
        self.exim = Exim4Daemon(peer.RECEIVER_CONFIG)
        self.addCleanup(self.exim.cleanup)
        self.exim.start()
        self.redis = RedisServer()
        self.redis.start()
        self.addCleanup(self.redis.cleanup)
        # The lookup keeps its connection for the next use: close it.
        self.addCleanup(get_lookup("redis").close_connections)
        self.pool = ThreadPool(1, 4)
        self.pool.start()
        self.addCleanup(self.pool.stop)
        self.tmp = tempfile.mkdtemp(prefix="exim-py-spec-event-")
        self.addCleanup(shutil.rmtree, self.tmp, True)
        self.spool = Spool(self.tmp)
        self.bounced: list[Any] = []

    async def test_each_delivery_written_to_redis(self) -> None:
        text = f"redis_servers = {self.redis.server_spec()}\n" + peer.SENDER_CONFIG.replace(
            "@HOSTS@", "127.0.0.1").replace("@PORT@", str(self.exim.port)).replace(
            "@EXTRA@", ACTION)
        self.settings_used = peer.delivery_settings(self, text)
        outcome, lines = await self.deliver(self.settings_used, ["a@y.test", "b@y.test"])
        self.assertEqual(outcome, COMPLETED, lines)
        for recipient in ("a@y.test", "b@y.test"):
            value = self.redis.command_reply("GET", f"delivery:{recipient}").decode()
            self.assertRegex(value, r"^\$\d+\r\n127\.0\.0\.1 1xa0Ih-00035i-01 250[- ].* OK id=")
        self.assertEqual(len(self.exim.mainlog().split(" <= ")), 2)
