"""``verify = recipient`` through redirect routers' special items, as
``exim4 -bh`` (4.96) answers and logs them: ``:fail:`` and ``:defer:``
need allow_fail and allow_defer, and without them the redirect data is in
error, which the client sees only as a temporary local problem."""

from __future__ import annotations

from tests.test_dialogues import Harness, _TempDirCase, config_from_text

CONFIG = r"""
acl_smtp_rcpt = r
begin acl
r:
  require verify = recipient
  accept
begin routers
nofail:
  driver = redirect
  local_parts = nofail
  data = :fail: gone away
okfail:
  driver = redirect
  local_parts = okfail
  allow_fail
  data = :fail: gone away
nodefer:
  driver = redirect
  local_parts = nodefer
  data = :defer: later
okdefer:
  driver = redirect
  local_parts = okdefer
  allow_defer
  data = :defer: later please
bad:
  driver = redirect
  local_parts = bad
  data = ${lookup{x}lsearch{/nonexistent/file}}
local:
  driver = accept
  transport = t
begin transports
t:
  driver = appendfile
  file = /dev/null
"""


class RedirectVerifyTests(_TempDirCase):

    def rcpt(self, local_part: str) -> tuple[bytes, list[str]]:
        harness = Harness(config_from_text(CONFIG), self.tmp, peer=("192.0.2.1", 40000))
        harness.connect()
        for command in (b"EHLO x\r\n", b"MAIL FROM:<a@b.c>\r\n"):
            harness.send(command)
        harness.output()
        harness.send(f"RCPT TO:<{local_part}@test.ex>\r\n".encode())
        return harness.output(), harness.log_lines()

    def test_fail_not_allowed(self) -> None:
        reply, log = self.rcpt("nofail")
        self.assertEqual(reply, b"451 Temporary local problem - please try later\r\n")
        self.assertEqual(log, ["H=(x) [192.0.2.1] F=<a@b.c> temporarily rejected RCPT "
                               "<nofail@test.ex>: error in redirect data: \":fail: gone away\" "
                               "is not permitted"])

    def test_fail_allowed(self) -> None:
        reply, log = self.rcpt("okfail")
        self.assertEqual(reply, b"550 gone away\r\n")
        self.assertEqual(log, ["H=(x) [192.0.2.1] F=<a@b.c> rejected RCPT <okfail@test.ex>: "
                               "gone away"])

    def test_defer_not_allowed(self) -> None:
        reply, log = self.rcpt("nodefer")
        self.assertEqual(reply, b"451 Temporary local problem - please try later\r\n")
        self.assertIn('error in redirect data: ":defer: later" is not permitted', log[0])

    def test_defer_allowed(self) -> None:
        reply, log = self.rcpt("okdefer")
        self.assertEqual(reply, b"451 later please\r\n")
        self.assertTrue(log[0].endswith("temporarily rejected RCPT <okdefer@test.ex>: "
                                        "later please"), log)

    def test_lookup_failure_is_private(self) -> None:
        reply, log = self.rcpt("bad")
        self.assertEqual(reply, b"451 Temporary local problem - please try later\r\n")
        self.assertIn("failed to open /nonexistent/file for linear search", log[0])
