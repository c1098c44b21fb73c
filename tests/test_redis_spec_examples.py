"""The experimental spec's Redis examples, end to end: a real redis-server,
a configuration using them, and ``exim-py -be``."""

from __future__ import annotations

import os
import subprocess

from twisted.trial import unittest

from tests.corpus import exim_py_command
from tests.peers import RedisServer

CONFIG = """\
primary_hostname = mail.example.com
redis_servers = {servers}
SPAMMER_SET = SET SPAMMER some_value
hostlist relay_from_ips = <\\n ${{lookup redis{{SMEMBERS relay_from_ips}}}}
domainlist virtual_domains = ${{lookup redis {{HGET $domain domain}}}}
"""


class SpecExampleTests(unittest.TestCase):
    def setUp(self) -> None:
        self.redis = RedisServer(password="pw")
        self.redis.start()
        self.addCleanup(self.redis.stop)
        self.redis.command_reply("SADD", "relay_from_ips", "192.168.0.0/24", "10.0.0.0/8", db=3)
        self.redis.command_reply("HSET", "virtual.example", "domain", "virtual.example", db=3)
        self.dir = os.path.abspath(self.mktemp())
        os.makedirs(self.dir)

    def be(self, servers: str, *strings: str) -> list[str]:
        config = os.path.join(self.dir, "exim.conf")
        with open(config, "w") as f:
            f.write(CONFIG.format(servers=servers))
        proc = subprocess.run(
            exim_py_command() + ["-C", config, "-be", *strings],
            capture_output=True, timeout=60,
        )
        self.assertEqual(proc.returncode, 0, proc.stderr)
        return proc.stdout.decode("latin-1").splitlines()

    def test_host_list_from_smembers(self) -> None:
        spec = self.redis.server_spec(db="3")
        self.assertEqual(
            self.be(
                spec,
                "${if match_ip{192.168.0.7}{+relay_from_ips}{relay}{no}}",
                "${if match_ip{172.16.0.1}{+relay_from_ips}{relay}{no}}",
                # As in Exim, an IP item leaves $value empty.
                "${if match_ip{10.9.8.7}{+relay_from_ips}{[$value]}{no}}",
            ),
            ["relay", "no", "[]"],
        )

    def test_set_and_get(self) -> None:
        spec = self.redis.server_spec(db="3")
        self.assertEqual(
            self.be(
                spec,
                "${if eq{${lookup redis{SPAMMER_SET}}}{OK}{stored}{failed}}",
                "${lookup redis{GET SPAMMER}}",
                "${lookup redis{SET spaced ${quote_redis:a b}}}",
                "${lookup redis{GET spaced}}",
            ),
            ["stored", "some_value", "OK", "a b"],
        )

    def test_wrong_password_defers(self) -> None:
        spec = self.redis.server_spec(db="3", password="wrong")
        [line] = self.be(spec, "${lookup redis{GET SPAMMER}{found}{missing}}")
        self.assertTrue(line.startswith('Failed: lookup of "GET SPAMMER" gave DEFER: '), line)

    def test_dead_server_is_skipped(self) -> None:
        dead = RedisServer()  # a free port with nothing listening
        spec = f"127.0.0.1::{dead.port}// : " + self.redis.server_spec(db="3")
        self.assertEqual(self.be(spec, "${lookup redis{SCARD relay_from_ips}}"), ["true"])
