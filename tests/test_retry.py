"""Retry rules, the retry hints database and the hints store.

Expected -brt texts, configuration errors and retry records were taken from
Exim 4.96 (``exim4 -C conf -brt ...``, and ``exim4 -odi`` delivering to a
refused port, then ``exim_fixdb``/``exim4 -M``/``exim_dumpdb``); the live
tests at the end repeat those runs when exim4 is installed.  Schedules were
worked out by hand from retry.c's ``retry_update()``.
"""

from __future__ import annotations

import calendar
import json
import os
import pwd
import re
import shutil
import subprocess
import tempfile
import time
from typing import Any
from unittest import skipUnless

from twisted.internet import task
from twisted.trial import unittest

from tests.peers import free_port, require_program
from twisted_mta.config.errors import ConfigError
from twisted_mta.config.parser import parse_config_text
from twisted_mta.hints import HintsStore
from twisted_mta.queue.retry import (
    ECONNREFUSED,
    ERRNO_AUTHFAIL,
    ERRNO_DATA4XX,
    ERRNO_EXIMQUOTA,
    ERRNO_MAIL4XX,
    ERRNO_RCPT4XX,
    ERRNO_SMTPCLOSED,
    ERRNO_TLSFAILURE,
    ERRNO_TLSREQUIRED,
    ERRNO_UNKNOWNHOST,
    ETIMEDOUT,
    RTEF_CTOUT,
    UNUSABLE,
    UNUSABLE_EXPIRED,
    USABLE,
    HostRetryStatus,
    RetryDatabase,
    RetryItem,
    RetryRecord,
    RetryRuleError,
    RetryRules,
    all_hosts_expired_message,
    brt_output,
    clock_function,
    cutoff_retry_hosts,
    host_more_errno,
    next_retry,
    open_retry_database,
    parse_retry_error,
    parse_retry_params,
    record_text,
)

EXIM = "/usr/sbin/exim4"
DUMPDB = "/usr/sbin/exim_dumpdb"
FIXDB = "/usr/sbin/exim_fixdb"
T0 = 1796518053  # 2026-12-06 00:47:33 UTC
HOUR, DAY = 3600, 86400
A, M = ord("A"), ord("M")


def rules_from(text: str, main: str = "", filename: str = "/etc/exim/conf") -> RetryRules:
    config = parse_config_text(f"spool_directory = /tmp\n{main}begin retry\n{text}",
                               filename)
    return RetryRules(config)


def memory_db(rules_text: str, clock: Any, main: str = "", **kw: Any) -> RetryDatabase:
    return RetryDatabase(HintsStore(None), rules_from(rules_text, main), clock, **kw)


# Configurations run through exim4 -brt, with the arguments tried and what
# Exim 4.96 printed (exit code 0 unless noted).
CONF_A = """\
alice@wonderland.fict.example quota_5d  F,7d,3h
wonderland.fict.example       quota_5d
wonderland.fict.example       *         F,1h,15m; G,2d,1h,2;
lookingglass.fict.example     *         F,24h,30m;
*       rcpt_4xx   senders=:   F,1h,30m
^\\N[^@]+@xyz\\d+\\.abc\\.example$\\N  *  G,1h,10m,2.25
*.h.example   timeout_connect_MX  H,1d,5m,1.5
*.t.example   timeout_A  F,1d,5m
*.r.example   refused_A  F,1d,5m
*.q.example   quota  F,1d,5m
*.a.example   auth_failed  F,1d,5m
*.l.example   lost_connection  F,1d,5m
*.k.example   lookup  F,1d,5m
*.m.example   mail_45x  F,1d,5m
*.d.example   data_4xx  F,1d,5m
*.s.example   tls_required  F,1d,5m
*                 refused_A   F,2h,20m;
*                 *           F,2h,15m; G,16h,1h,1.5; F,5d,8h
"""
DEFAULT_A = "Retry rule: *  *  F,2h,15m; G,16h,1h,1.5; F,5d,8h; \n"
BRT_A: list[tuple[list[str], str | None, str]] = [
    (["x.y.example"], None, DEFAULT_A),
    (["wonderland.fict.example"], None,
     "Retry rule: wonderland.fict.example  *  F,1h,15m; G,2d,1h,2.0; \n"),
    (["alice@wonderland.fict.example"], None,
     "Retry rule: wonderland.fict.example  *  F,1h,15m; G,2d,1h,2.0; \n"),
    (["alice@wonderland.fict.example", "quota_6d"], None,
     "Retry rule: alice@wonderland.fict.example  quota_5d  F,1w,3h; \n"),
    (["alice@wonderland.fict.example", "quota_4d"], None,
     "Retry rule: wonderland.fict.example  *  F,1h,15m; G,2d,1h,2.0; \n"),
    (["x@wonderland.fict.example", "quota_6d"], None,
     "Retry rule: wonderland.fict.example  quota_5d  \n"),
    (["u@xyz12.abc.example"], None,
     "Retry rule: ^\\N[^@]+@xyz\\d+\\.abc\\.example$\\N  *  G,1h,10m,2.25; \n"),
    (["xyz12.abc.example"], None,
     "Retry rule: ^\\N[^@]+@xyz\\d+\\.abc\\.example$\\N  *  G,1h,10m,2.25; \n"),
    (["a.h.example", "timeout_connect_MX"], None,
     "Retry rule: *.h.example  timeout_connect_MX  H,1d,5m; \n"),
    (["a.h.example", "timeout_connect"], None, DEFAULT_A),
    (["a.t.example", "timeout_A"], None, "Retry rule: *.t.example  timeout_A  F,1d,5m; \n"),
    (["a.t.example", "timeout_connect_A"], None,
     "Retry rule: *.t.example  timeout_A  F,1d,5m; \n"),
    (["a.r.example", "refused_A"], None, "Retry rule: *.r.example  refused_A  F,1d,5m; \n"),
    (["a.r.example", "refused_MX"], None, DEFAULT_A),
    (["a.q.example", "quota"], None, "Retry rule: *.q.example  quota  F,1d,5m; \n"),
    (["a.a.example", "auth_failed"], None, "Retry rule: *.a.example  auth_failed  F,1d,5m; \n"),
    (["a.l.example", "lost_connection"], None, "Retry rule: *.l.example  *  F,1d,5m; \n"),
    (["a.k.example", "lookup"], None, "Retry rule: *.k.example  *  F,1d,5m; \n"),
    (["a.m.example", "mail_451"], None, "Retry rule: *.m.example  *  F,1d,5m; \n"),
    (["a.m.example", "mail_4xx"], None, DEFAULT_A),
    (["a.m.example", "mail_461"], None, DEFAULT_A),
    (["a.d.example", "data_4xx"], None, "Retry rule: *.d.example  *  F,1d,5m; \n"),
    (["a.s.example", "tls_required"], None, "Retry rule: *.s.example  *  F,1d,5m; \n"),
    (["localhost"], None,
     'Warning: "localhost" contains no \'@\' and no \'.\' characters. It is being \n'
     "treated as a one-component domain, not as a local part.\n\n" + DEFAULT_A),
    (["u@x.example", "rcpt_4xx"], None, DEFAULT_A),
    (["u@x.example", "rcpt_4xx"], "", "Retry rule: *  *  F,1h,30m; \n"),
    (["mx.other.example", "wonderland.fict.example"], None,
     "Retry rule: wonderland.fict.example  *  F,1h,15m; G,2d,1h,2.0; \n"),
    (["x.example", "bad_err"], None, 'unknown or malformed retry error "bad_err"\n'),
    (["x.example", "rcpt_4X"], None,
     "rcpt_4 must be followed by xx, dx, or dd, where x is literal and d is any digit\n"),
    (["x.example", "quota_"], None, "bad time value\n"),
    ([], None, "-brt needs a domain or address argument\n"),
]

CONF_B = """\
wonderland.fict.example       quota_5d
!*.neg.example   *   F,1h,10m
+local_domains  *  F,3h,10m
"""
MAIN_B = "domainlist local_domains = local.example : other.example\n"
BRT_B: list[tuple[list[str], str | None, str]] = [
    (["a.neg.example"], None, "No retry information found\n"),
    (["b.example"], None, "Retry rule: !*.neg.example  *  F,1h,10m; \n"),
    (["h.example", "local.example", "refused"], None,
     "Retry rule: !*.neg.example  *  F,1h,10m; \n"),
]

CONF_C = """\
+local_domains  *  F,3h,10m
"*@sp ace.example"  *  F,4h,10m
*  rcpt_4xx  senders=:  F,1h,30m
*  rcpt_4xx  senders=*@s.example  F,2h,30m
*  rcpt_45x  F,5h,30m
*  timeout  F,6h,30m
*  refused  F,7h,30m
*  quota_1w  F,1d,30m
*  quota_0s  F,2d,30m
*  mail_421 F,1d,1h
*  data_4xx F,1d,1h
*  timeout_connect F,1d,2h
*  timeout_connect_A F,1d,3h
"""
MAIN_C = "addresslist local_domains = *@local.example : *@other.example\n"
LOCAL_C = "Retry rule: +local_domains  *  F,3h,10m; \n"
BRT_C: list[tuple[list[str], str | None, str]] = [
    (["local.example"], None, LOCAL_C),
    (["u@local.example"], None, LOCAL_C),
    (["u@other.example", "timeout"], None, LOCAL_C),
    (["h.example", "local.example"], None, LOCAL_C),
    (["u@x.example", "rcpt_4xx"], None, "No retry information found\n"),
    (["u@x.example", "rcpt_452"], None, "Retry rule: *  *  F,5h,30m; \n"),
    (["u@x.example", "rcpt_4xx"], "", "Retry rule: *  *  F,1h,30m; \n"),
    (["u@x.example", "rcpt_4xx"], "a@s.example", "Retry rule: *  *  F,2h,30m; \n"),
    (["u@x.example"], "a@s.example", "No retry information found\n"),
    (["h.example", "x.example", "timeout_MX"], None, "Retry rule: *  timeout  F,6h,30m; \n"),
    (["h.example", "refused_MX"], None, "Retry rule: *  refused  F,7h,30m; \n"),
    (["h.example", "quota_8d"], None, "Retry rule: *  quota_1w  F,1d,30m; \n"),
    (["h.example", "quota"], None, "Retry rule: *  quota  F,2d,30m; \n"),
    (["h.example", "quota_2d"], None, "Retry rule: *  quota  F,2d,30m; \n"),
    (["h.example", "mail_4xx"], None, "Retry rule: *  *  F,1d,1h; \n"),
    (["h.example", "mail_42x"], None, "No retry information found\n"),
    (["h.example", "data_452"], None, "Retry rule: *  *  F,1d,1h; \n"),
    (["h.example", "timeout_connect_MX"], None, "Retry rule: *  timeout  F,6h,30m; \n"),
    (["u@sp ace.example"], None, "Retry rule: *@sp ace.example  *  F,4h,10m; \n"),
]

BRT_CASES = [(CONF_A, "", BRT_A), (CONF_B, MAIN_B, BRT_B), (CONF_C, MAIN_C, BRT_C)]

# Rules Exim rejects, with its message, and odd ones it accepts (None) with
# what -brt x.example then printed.
MALFORMED: list[tuple[str, str | None, str]] = [
    ("*", "missing error type in retry rule", ""),
    ("*  *", None, "Retry rule: *  *  \n"),
    ("*  *  F,2h", "comma expected", ""),
    ("*  *  F,2h,", "bad parameters for retry rule", ""),
    ("*  *  F,,15m", "bad parameters for retry rule", ""),
    ("*  *  F 2h,15m", "comma expected", ""),
    ("*  *  X,2h,15m", "unknown retry rule letter", ""),
    ("*  *  X2h", "comma expected", ""),
    ("*  *  F,2h,15m G,1d,1h,2", "semicolon expected", ""),
    ("*  *  F,2h,15m;;G,1d,1h,2", "comma expected", ""),
    ("*  *  F,2h,15m ; G,1d,1h,2 ;", None, "Retry rule: *  *  F,2h,15m; G,1d,1h,2.0; \n"),
    ("*  *  G,1d,1h,0.5", "bad parameters for retry rule", ""),
    ("*  *  G,1d,1h,1", None, "Retry rule: *  *  G,1d,1h,1.0; \n"),
    ("*  *  G,1d,1h", "comma expected", ""),
    ("*  *  G,1d,0s,2", "bad parameters for retry rule", ""),
    ("*  *  F,0s,10m", "bad parameters for retry rule", ""),
    ("*  *  F,2h,15", "bad parameters for retry rule", ""),
    ("*  *  F,2h,15m,3", "semicolon expected", ""),
    ("*  *  F,2h30,15m", "bad parameters for retry rule", ""),
    ("*  *  F , 2h , 15m", "comma expected", ""),
    ("*  *  F, 2h, 15m", None, "Retry rule: *  *  F,2h,15m; \n"),
    ("*  *  F,2h,15m;x", "comma expected", ""),
    ("*  *  f,2h,15m", None, "Retry rule: *  *  F,2h,15m; \n"),
    ("*  *  g,2h,15m,1.25", None, "Retry rule: *  *  G,2h,15m,1.25; \n"),
    ("*  *  g,2h,15m,1.05", None, "Retry rule: *  *  G,2h,15m,1.05; \n"),
    ("*  *  F,2h,15m%", "comma or semicolon expected", ""),
    ("*  *  G,1d,1h,2.x", "bad parameters for retry rule", ""),
    ("*  bogus  F,1h,1m", 'unknown or malformed retry error "bogus"', ""),
    ("*  quota_x  F,1h,1m", "bad time value", ""),
    ("*  quota_  F,1h,1m", "bad time value", ""),
    ("*  refused_B  F,1h,1m", 'A or MX expected after "refused"', ""),
    ("*  refused_  F,1h,1m", None, "No retry information found\n"),
    ("*  timeout_B  F,1h,1m", '"A", "MX", or "connect" expected after "timeout"', ""),
    ("*  timeout_dns  F,1h,1m", None, "No retry information found\n"),
    ("*  timeout_c  F,1h,1m", None, "No retry information found\n"),
    ("*  rcpt_4  F,1h,1m",
     "rcpt_4 must be followed by xx, dx, or dd, where x is literal and d is any digit", ""),
    ("*  MAIL_4xx  F,1h,1m", None, "No retry information found\n"),
    ("*  rcpt_4x5  F,1h,1m",
     "rcpt_4 must be followed by xx, dx, or dd, where x is literal and d is any digit", ""),
    ("*  auth  F,1h,1m", 'unknown or malformed retry error "auth"', ""),
    ("*  auth_f  F,1h,1m", None, "No retry information found\n"),
    ("*  lost  F,1h,1m", None, "No retry information found\n"),
    ("*  t  F,1h,1m", None, "No retry information found\n"),
    ("*  TLS_REQUIRED  F,1h,1m", None, "No retry information found\n"),
    ("*  senders  F,1h,1m", 'unknown or malformed retry error "senders"', ""),
    ("*  * senders=x F,1h,1m", None, "No retry information found\n"),
    ("*  * senders x F,1h,1m", '"=" expected after "senders" in retry rule', ""),
    ("*  * F,1h,1m,", "semicolon expected", ""),
    ("*  * H,1d,1h,1.5", None, "Retry rule: *  *  H,1d,1h; \n"),
    ("*  * F,1h,1m ; senders=x", "comma expected", ""),
]


class RuleParsingTests(unittest.TestCase):
    def test_error_names(self) -> None:
        cases = {
            "*": (0, 0),
            "quota": (ERRNO_EXIMQUOTA, 0),
            "quota_4d": (ERRNO_EXIMQUOTA, 4 * DAY),
            "QUOTA_1h30m": (ERRNO_EXIMQUOTA, 5400),
            "refused": (ECONNREFUSED, 0),
            "refused_MX": (ECONNREFUSED, M),
            "refused_A": (ECONNREFUSED, A),
            "refused_": (ECONNREFUSED, M),  # Exim takes an empty suffix as MX
            "timeout": (ETIMEDOUT, 0),
            "timeout_A": (ETIMEDOUT, A),
            "timeout_MX": (ETIMEDOUT, M),
            "timeout_connect": (ETIMEDOUT, RTEF_CTOUT),
            "timeout_connect_A": (ETIMEDOUT, RTEF_CTOUT | A),
            "timeout_connect_MX": (ETIMEDOUT, RTEF_CTOUT | M),
            "timeout_c": (ETIMEDOUT, RTEF_CTOUT),
            "timeout_connect_": (ETIMEDOUT, RTEF_CTOUT | A),
            "mail_4xx": (ERRNO_MAIL4XX, 255 << 8),
            "rcpt_45x": (ERRNO_RCPT4XX, 150 << 8),
            "rcpt_452": (ERRNO_RCPT4XX, 52 << 8),
            "data_4xx": (ERRNO_DATA4XX, 255 << 8),
            "MAIL_4xx": (ERRNO_DATA4XX, 255 << 8),  # Exim tests the first letter as written
            "auth_failed": (ERRNO_AUTHFAIL, 0),
            "auth_f": (ERRNO_AUTHFAIL, 0),
            "lost_connection": (ERRNO_SMTPCLOSED, 0),
            "l": (ERRNO_SMTPCLOSED, 0),
            "loo": (ERRNO_UNKNOWNHOST, 0),
            "lookup": (ERRNO_UNKNOWNHOST, 0),
            "tls_required": (ERRNO_TLSREQUIRED, 0),
            "t": (ERRNO_TLSREQUIRED, 0),
        }
        for word, expected in cases.items():
            self.assertEqual(parse_retry_error(word)[:2], expected, word)
        basic, more, warning = parse_retry_error("timeout_dns")
        self.assertEqual((basic, more), (ETIMEDOUT, 0))
        self.assertIn('"timeout_dns" is no longer available', warning or "")
        for word in ("auth", "bogus", "rcpt_4XX", "rcpt_4", "rcpt_4x1", "quota_1x", "*x"):
            self.assertRaises(RetryRuleError, parse_retry_error, word)

    def test_parameters(self) -> None:
        params = parse_retry_params("F,2h,15m; G,16h,1h,1.5; F,4d,6h")
        self.assertEqual([(p.letter, p.cutoff, p.interval, p.multiplier) for p in params],
                         [("F", 7200, 900, 0), ("G", 16 * HOUR, HOUR, 1500),
                          ("F", 4 * DAY, 6 * HOUR, 0)])
        self.assertEqual(parse_retry_params("h,1d,5m,1.2345")[0].multiplier, 1234)
        self.assertEqual(parse_retry_params(""), ())

    def test_malformed_rules_are_configuration_errors(self) -> None:
        for line, message, _ in MALFORMED:
            text = f"spool_directory = /tmp\nbegin retry\n{line}\n"
            if message is None:
                RetryRules(parse_config_text(text, "/x/conf"))
                continue
            with self.assertRaises(ConfigError, msg=line) as caught:
                RetryRules(parse_config_text(text, "/x/conf"))
            self.assertEqual(caught.exception.message, message, line)
            self.assertEqual(caught.exception.header(),
                             "Exim configuration error in line 3 of /x/conf:")

    def test_options(self) -> None:
        rules = rules_from("* * F,1h,1m; G,3d,1h,2\n", "retry_interval_max = 2d\n"
                           "retry_data_expire = 1d\n")
        self.assertEqual(rules.interval_max, DAY)  # Exim caps it at 24h
        self.assertEqual(rules.data_expire, DAY)
        self.assertEqual(rules.maximum_timeout, 3 * DAY)
        self.assertEqual(rules.entries[0].final_cutoff, 3 * DAY)
        self.assertEqual(rules_from("").interval_max, DAY)
        self.assertEqual(rules_from("").data_expire, 7 * DAY)
        self.assertEqual(rules_from("* timeout_dns F,1h,1m\n").warnings[0][:13],
                         '"timeout_dns"')


class MatchingTests(unittest.TestCase):
    async def test_recorded_brt_output(self) -> None:
        for conf, main, cases in BRT_CASES:
            rules = rules_from(conf, main)
            for args, sender, expected in cases:
                text, code = await brt_output(rules, args, sender)
                self.assertEqual(text, expected, (args, sender))
                self.assertEqual(code, 1 if "must be" in expected or "malformed" in expected
                                 or "bad time" in expected or "needs a" in expected else 0)

    async def test_host_name_before_domain(self) -> None:
        # The spec's example: a.b.c.example has MX hosts x.y.z and p.q.r.
        rules = rules_from("p.q.r.example    *      F,24h,30m;\n"
                           "a.b.c.example    *      F,4d,45m;\n")
        x = await rules.find("x.y.z.example:192.0.2.1", "a.b.c.example", ECONNREFUSED, A)
        p = await rules.find("p.q.r.example:192.0.2.2", "a.b.c.example", ECONNREFUSED, A)
        route = await rules.find("a.b.c.example")
        self.assertEqual([x and x.lineno, p and p.lineno, route and route.lineno], [4, 3, 4])
        self.assertIsNone(await rules.find("x.y.z.example:192.0.2.1", None, ECONNREFUSED, A))

    async def test_keys(self) -> None:
        rules = rules_from("alice@example.com * F,1h,1m\n"
                           "example.com * F,2h,1m\n"
                           "^\\N^[^@]+@mx\\d\\.example$\\N * F,3h,1m\n")

        async def line(key: str, alternate: str | None = None) -> int | None:
            entry = await rules.find(key, alternate)
            return None if entry is None else entry.lineno - 2

        self.assertEqual(await line("alice@example.com"), 1)  # retry_use_local_part
        self.assertEqual(await line("bob@example.com"), 2)
        self.assertEqual(await line("example.com"), 2)
        # A rcpt 4xx key, address then sender: matched by the address.
        self.assertEqual(await line("alice@example.com:<s@else.example>"), 1)
        # A pipe's key: matched by the address after the last colon.
        self.assertEqual(await line("|/bin/cat:alice@example.com"), 1)
        # A regex sees the host name as *@name.
        self.assertEqual(await line("mx1.example:192.0.2.1:2525"), 3)
        self.assertIsNone(await line("mx12.example:192.0.2.1"))

    async def test_senders_and_errors(self) -> None:
        rules = rules_from("*  rcpt_4xx  senders=:  F,1h,1m\n"
                           "*  rcpt_45x  senders=\"*@a.example : *@b.example\"  F,2h,1m\n"
                           "*  tls_required  F,3h,1m\n"
                           "*  quota_2d  F,4h,1m\n"
                           "*  quota  F,5h,1m\n"
                           "*  timeout_connect  F,6h,1m\n"
                           "*  timeout_A  F,7h,1m\n"
                           "*  refused_MX  F,8h,1m\n")

        async def line(basic: int, more: int = 0, sender: str | None = None) -> int | None:
            entry = await rules.find("h.example", None, basic, more, sender)
            return None if entry is None else entry.lineno - 2

        self.assertEqual(await line(ERRNO_RCPT4XX, 52 << 8, ""), 1)
        self.assertEqual(await line(ERRNO_RCPT4XX, 52 << 8, "x@b.example"), 2)
        self.assertIsNone(await line(ERRNO_RCPT4XX, 42 << 8, "x@b.example"))
        self.assertIsNone(await line(ERRNO_RCPT4XX, 52 << 8, None))
        self.assertEqual(await line(ERRNO_TLSFAILURE), 3)
        self.assertEqual(await line(ERRNO_EXIMQUOTA, 3 * DAY), 4)
        self.assertEqual(await line(ERRNO_EXIMQUOTA, DAY), 5)
        self.assertEqual(await line(28), 5)  # ENOSPC counts as a quota error
        self.assertEqual(await line(ETIMEDOUT, RTEF_CTOUT | M), 6)
        self.assertEqual(await line(ETIMEDOUT, A), 7)
        self.assertIsNone(await line(ETIMEDOUT, M))
        self.assertEqual(await line(ECONNREFUSED, M), 8)
        self.assertIsNone(await line(ECONNREFUSED, A))

    async def test_bad_pattern_is_passed_over(self) -> None:
        rules = rules_from("+nosuch * F,1h,1m\n${bogus:x} * F,2h,1m\n* * F,3h,1m\n")
        logged: list[str] = []
        entry = await rules.find("example.com", log=logged.append)
        self.assertEqual(entry and entry.lineno, 5)
        self.assertEqual(len(logged), 2)


class ScheduleTests(unittest.TestCase):
    """Schedules worked out by hand from retry_update()."""

    KEY = "T:mx.example:192.0.2.1"

    async def run_schedule(self, db: RetryDatabase, clock: task.Clock, until: int,
                           every: int | None = None, **kw: Any) -> list[tuple[int, int, bool]]:
        """Fail each time the key is due (at once, or at the first run of a
        queue runner every *every* seconds); (try, next, expired) each time."""
        tries = []
        while True:
            outcome = await db.record_failure(self.KEY, basic_errno=ECONNREFUSED,
                                              more_errno=A, host=True,
                                              domain="example.com", **kw)
            record = outcome.record
            assert record is not None
            tries.append((record.last_try - T0, record.next_try - T0, record.expired))
            if record.expired or record.next_try - T0 > until:
                return tries
            self.assertFalse(db.retry_ok(self.KEY))
            wait = record.next_try - db.now()
            if every is not None:
                wait = -(-wait // every) * every
            clock.advance(wait)
            self.assertTrue(db.retry_ok(self.KEY))

    async def test_default_rule_over_four_days(self) -> None:
        clock = task.Clock()
        clock.advance(T0)
        db = memory_db("* * F,2h,15m; G,16h,1h,1.5; F,4d,6h\n", clock)
        tries = await self.run_schedule(db, clock, until=10 * DAY)
        fixed = [t for t in range(0, 7201, 900)]
        geometric = [8100, 11700, 17100, 25200, 37350, 55575]
        six_hourly = [82912 + 21600 * k for k in range(13)]
        expected_tries = fixed + geometric + six_hourly + [363712]
        self.assertEqual([t for t, _, _ in tries], expected_tries)
        self.assertEqual([n for _, n, _ in tries], expected_tries[1:] + [363712 + 21600])
        self.assertEqual([e for _, _, e in tries], [False] * (len(tries) - 1) + [True])
        record = db.read(self.KEY)
        assert record is not None
        self.assertEqual((record.first_failed, record.basic_errno, record.more_errno,
                          record.text), (T0, ECONNREFUSED, A, "Connection refused"))
        self.assertTrue(db.is_expired(self.KEY))

    async def test_geometric_with_a_queue_runner(self) -> None:
        # Tries happen at the first queue run after the retry time; the
        # smaller of the planned and the actual gap is multiplied.
        clock = task.Clock()
        clock.advance(T0)
        db = memory_db("* * G,1d,10m,2\n", clock)
        tries = await self.run_schedule(db, clock, until=20000, every=900)
        self.assertEqual(tries, [(0, 600, False), (900, 2100, False), (2700, 5100, False),
                                 (5400, 10200, False), (10800, 20400, False)])

    async def test_randomised_rule(self) -> None:
        for pick, expected in ((lambda n: 0, [(0, 600), (600, 1500), (1500, 2700)]),
                               (lambda n: n - 1, [(0, 600), (600, 1799), (1799, 4196)])):
            spreads: list[int] = []

            def randrange(n: int, pick: Any = pick, spreads: list[int] = spreads) -> int:
                spreads.append(n)
                return pick(n)

            clock = task.Clock()
            clock.advance(T0)
            db = memory_db("* * H,1d,10m,2\n", clock, randrange=randrange)
            tries = await self.run_schedule(db, clock, until=2000)
            self.assertEqual([(t, n) for t, n, _ in tries], expected)
            self.assertEqual(spreads[0], 600)

    async def test_interval_max(self) -> None:
        clock = task.Clock()
        clock.advance(T0)
        db = memory_db("* * G,1d,30m,3\n", clock, main="retry_interval_max = 1h\n")
        tries = await self.run_schedule(db, clock, until=9000)
        self.assertEqual([(t, n) for t, n, _ in tries], [(0, 1800), (1800, 5400), (5400, 9000),
                                                         (9000, 12600)])

    async def test_stale_record_starts_again(self) -> None:
        clock = task.Clock()
        clock.advance(T0)
        db = memory_db("* * F,1h,10m; F,30d,1d\n", clock)
        await db.record_failure(self.KEY, basic_errno=ECONNREFUSED, host=True)
        clock.advance(7 * DAY)
        self.assertIsNotNone(db.read(self.KEY))
        clock.advance(1)
        self.assertIsNone(db.read(self.KEY))  # retry_data_expire (7d) passed
        self.assertIsNotNone(db.read_any(self.KEY))
        outcome = await db.record_failure(self.KEY, basic_errno=ECONNREFUSED, host=True)
        assert outcome.record is not None
        self.assertEqual(outcome.record.first_failed, db.now())
        self.assertEqual(outcome.record.next_try - db.now(), 600)

    async def test_message_age(self) -> None:
        clock = task.Clock()
        clock.advance(T0)
        db = memory_db("* * F,1h,10m\n", clock)
        received = T0 - 2 * HOUR
        # An address error: the message's age counts as the failing time.
        outcome = await db.record_failure("R:example.com", basic_errno=-1, message="try later",
                                          received_time=received)
        assert outcome.record is not None
        self.assertTrue(outcome.timed_out)
        self.assertTrue(outcome.record.expired)
        self.assertEqual(outcome.record.next_try - T0, 600)
        self.assertEqual(outcome.record.text, "try later")
        # A host error: the host itself is new, but the message has waited
        # longer than the final cutoff: time out, next try now.
        outcome = await db.record_failure(self.KEY, basic_errno=ECONNREFUSED, host=True,
                                          received_time=received)
        assert outcome.record is not None
        self.assertTrue(outcome.timed_out)
        self.assertFalse(outcome.record.expired)
        self.assertEqual(outcome.record.next_try, T0)
        # Not for a parent address.
        outcome = await db.record_failure("R:other.example", basic_errno=ECONNREFUSED,
                                          received_time=received, end_address=False)
        self.assertFalse(outcome.timed_out)

    async def test_no_rule(self) -> None:
        clock = task.Clock()
        clock.advance(T0)
        db = memory_db("example.org * F,1h,1m\nexample.net quota\n* quota F,1h,1m\n", clock)
        outcome = await db.record_failure("R:example.com", basic_errno=-1)
        self.assertTrue(outcome.timed_out)
        self.assertIsNone(outcome.record)
        self.assertIsNone(db.read_any("R:example.com"))
        # A rule without parameters: written, expired, next try now.
        outcome = await db.record_failure("T:example.net", basic_errno=ERRNO_EXIMQUOTA)
        assert outcome.record is not None
        self.assertEqual((outcome.timed_out, outcome.record.expired,
                          outcome.record.next_try), (True, True, T0))

    def test_next_retry_is_pure(self) -> None:
        rules = rules_from("* * G,1d,1h,2\n")
        before = RetryRecord(T0, T0 - 5 * HOUR, T0 - 2 * HOUR, T0 - HOUR)
        outcome = next_retry(before, rules.entries[0], T0, basic_errno=111, more_errno=A,
                             text="Connection refused", host=True)
        self.assertEqual(before.next_try, T0 - HOUR)
        assert outcome.record is not None
        # planned gap 1h, actual 2h: 1h doubled.
        self.assertEqual(outcome.record.next_try, T0 + 2 * HOUR)
        self.assertEqual(outcome.record.first_failed, T0 - 5 * HOUR)

    def test_record_text(self) -> None:
        self.assertEqual(record_text(111, "ignored"), "Connection refused")
        self.assertEqual(record_text(-44, "H=x [1.2.3.4]: 452 full\n"),
                         "H=x [1.2.3.4]: 452 full\\n")
        self.assertEqual(record_text(-1, None), "unknown error")
        self.assertEqual(len(record_text(-1, "x" * 500)), 150)

    def test_clocks(self) -> None:
        clock = task.Clock()
        clock.advance(12.7)
        self.assertEqual(clock_function(clock)(), 12)
        self.assertEqual(clock_function(lambda: 99.9)(), 99)
        self.assertGreater(clock_function(None)(), T0 - 365 * DAY)


class CheckTests(unittest.TestCase):
    RULES = "* * F,1h,10m; F,1d,1h\n"

    def setUp(self) -> None:
        self.clock = task.Clock()
        self.clock.advance(T0)
        self.db = memory_db(self.RULES, self.clock)

    def put(self, key: str, **kw: Any) -> None:
        values = dict(time_stamp=T0, first_failed=T0 - HOUR, last_try=T0 - 60,
                      next_try=T0 + 600, basic_errno=ECONNREFUSED, more_errno=A,
                      text="Connection refused")
        values.update(kw)
        self.db.write(key, RetryRecord(**values))  # type: ignore[arg-type]

    async def host(self, received: int = T0 - 60, **kw: Any) -> HostRetryStatus:
        return await self.db.check_host("example.com", "MX.example", "192.0.2.1",
                                        message_id="1xa0Pd-00062V-2o", received_time=received,
                                        **kw)

    async def test_check_host(self) -> None:
        self.assertEqual(await self.host(), HostRetryStatus(USABLE))
        self.put("T:mx.example:192.0.2.1")
        status = await self.host()
        self.assertEqual((status.status, status.last_try, status.host_key),
                         (UNUSABLE, T0 - 60, "T:mx.example:192.0.2.1"))
        # On the queue longer than the final cutoff (1d): try it anyway.
        self.assertEqual((await self.host(received=T0 - 2 * DAY)).status, USABLE)
        self.assertEqual((await self.host(force=True)).status, USABLE)
        self.put("T:mx.example:192.0.2.1", expired=True)
        self.assertEqual((await self.host(received=T0 - 2 * DAY)).status, UNUSABLE_EXPIRED)
        self.put("T:mx.example:192.0.2.1", expired=True, next_try=T0)
        status = await self.host()
        self.assertEqual((status.status, status.expired), (USABLE, True))
        # Other ports and no IP in the key.
        self.assertEqual((await self.host(port_string=":2525")).status, USABLE)
        self.put("T:mx.example:2525", next_try=T0 + 5)
        self.assertEqual((await self.host(port_string=":2525", include_ip=False)).status,
                         UNUSABLE)
        # A message-specific record.
        self.db.delete("T:mx.example:192.0.2.1")
        self.put("T:mx.example:192.0.2.1:1xa0Pd-00062V-2o", basic_errno=ERRNO_DATA4XX)
        status = await self.host()
        self.assertEqual((status.status, status.message_key),
                         (UNUSABLE, "T:mx.example:192.0.2.1:1xa0Pd-00062V-2o"))

    async def test_routing_check(self) -> None:
        check = self.db.routing_check
        kw: dict[str, Any] = dict(sender="s@example.org", received_time=T0 - 60)
        status = await check("example.com", "u", queue_running=True, **kw)
        self.assertEqual((status.defer, status.exists), (False, False))
        self.put("R:example.com", basic_errno=-32, text="lookup deferred")
        status = await check("example.com", "u", queue_running=True, **kw)
        self.assertEqual((status.defer, status.message, status.text),
                         (True, "retry time not reached", "lookup deferred"))
        status = await check("example.com", "u", queue_running=False, **kw)
        self.assertEqual((status.defer, status.exists), (False, True))
        self.assertFalse((await check("example.com", "u", queue_running=True, force=True,
                                      **kw)).defer)
        status = await check("example.com", "u", queue_running=False, continued=True, **kw)
        self.assertEqual(status.message, "reusing SMTP connection skips previous routing defer")
        self.put("R:example.com", expired=True)
        self.assertFalse((await check("example.com", "u", queue_running=True, **kw)).defer)
        # The rcpt 4xx key carries the sender.
        self.db.delete("R:example.com")
        self.put("R:u@example.com:<s@example.org>", basic_errno=ERRNO_RCPT4XX, text="452 busy")
        status = await check("example.com", "u", queue_running=True, **kw)
        self.assertEqual((status.defer, status.text), (True, "452 busy"))
        # Past the ultimate timeout for the address: route it.
        status = await check("example.com", "u", queue_running=True, sender="s@example.org",
                             received_time=T0 - 2 * DAY)
        self.assertFalse(status.defer)
        status = await check("example.com", "u", queue_running=True, sender="t@example.org",
                             received_time=T0 - 60)
        self.assertFalse(status.defer)

    async def test_local_delivery_check(self) -> None:
        check = self.db.local_delivery_check
        self.assertEqual(await check("T:u@example.com", "example.com", received_time=T0,
                                     queue_running=True), (True, False))
        self.put("T:u@example.com", basic_errno=ERRNO_EXIMQUOTA)
        self.assertEqual(await check("T:u@example.com", "example.com", received_time=T0,
                                     queue_running=True), (False, True))
        self.assertEqual(await check("T:u@example.com", "example.com", received_time=T0,
                                     queue_running=False), (True, True))
        self.assertEqual(await check("T:u@example.com", "example.com", received_time=T0 - 2 * DAY,
                                     queue_running=True), (True, True))
        self.put("T:u@example.com", expired=True)
        self.assertEqual(await check("T:u@example.com", "example.com", received_time=T0,
                                     queue_running=True), (True, True))

    async def test_update_address(self) -> None:
        db = self.db
        host = RetryItem("T:mx.example:192.0.2.1", ECONNREFUSED, A, host=True)
        self.put("R:example.com")
        timed_out = await db.update_address(
            [host, RetryItem("R:example.com", delete=True)], domain="example.com",
            sender="s@example.org", received_time=T0, message_completing=False)
        self.assertFalse(timed_out)
        self.assertIsNone(db.read_any("R:example.com"))
        record = db.read("T:mx.example:192.0.2.1")
        assert record is not None
        self.assertEqual(record.next_try, T0 + 600)
        # A day and a bit later the host has passed the final cutoff.
        self.clock.advance(DAY + 1)
        self.assertTrue(await db.update_address([host], domain="example.com", sender="",
                                                received_time=T0, message_completing=False))
        self.assertFalse(await db.update_address([host], domain="example.com", sender="",
                                                 received_time=T0, message_completing=False,
                                                 hosts_skipped=True))
        # A message-specific item is dropped when the message completes.
        message = RetryItem("T:mx.example:192.0.2.1:1xa0Pd-00062V-2o", ERRNO_DATA4XX,
                            host=True, message_specific=True)
        await db.update_address([message], domain="example.com", sender="",
                                received_time=T0, message_completing=False)
        self.assertIsNotNone(db.read_any(message.key))
        self.assertFalse(await db.update_address([message], domain="example.com", sender="",
                                                 received_time=T0, message_completing=True))
        self.assertIsNone(db.read_any(message.key))

    def test_delay_after_cutoff_helpers(self) -> None:
        statuses = [HostRetryStatus(UNUSABLE_EXPIRED, last_try=T0 - 10),
                    HostRetryStatus(UNUSABLE_EXPIRED, last_try=T0 + 10),
                    HostRetryStatus(UNUSABLE, last_try=T0 - 10)]
        self.assertEqual(cutoff_retry_hosts(statuses, T0), [0])
        self.assertEqual(all_hosts_expired_message("example.com", True),
                         "all hosts for 'example.com' have been failing for a long time "
                         "(and retry time not reached)")
        self.assertEqual(all_hosts_expired_message(None, False),
                         "all hosts have been failing for a long time and were last tried "
                         "after this message arrived")
        self.assertEqual(host_more_errno(True, 452), (52 << 8) | M)
        self.assertEqual(host_more_errno(False), A)


class DatabaseFileTests(unittest.TestCase):
    def setUp(self) -> None:
        self.spool = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, self.spool)
        self.path = os.path.join(self.spool, "db", "retry")
        self.rules = rules_from("* * F,2h,15m; G,16h,1h,1.5; F,4d,6h\n")

    def test_dump_format(self) -> None:
        # Exim 4.96's exim_dumpdb -z for a refused connection, and for an
        # expired routing record.
        db = open_retry_database(self.spool, self.rules, clock=lambda: T0)
        db.write("T:127.0.0.1:127.0.0.1:27599",
                 RetryRecord(T0, T0, T0, T0 + 900, False, 111, 65, "Connection refused"))
        db.write("R:deferme@example.com",
                 RetryRecord(T0, T0 - 5 * DAY, T0, T0 + 21600, True, -1, 0, "try later please"))
        self.assertEqual(db.dump(utc=True),
                         "  R:deferme@example.com -1 0 try later please\n"
                         "01-Dec-2026 00:47:33  06-Dec-2026 00:47:33  06-Dec-2026 06:47:33 *\n"
                         "  T:127.0.0.1:127.0.0.1:27599 111 65 Connection refused\n"
                         "06-Dec-2026 00:47:33  06-Dec-2026 00:47:33  06-Dec-2026 01:02:33 \n")
        self.assertEqual(db.dump(keys_only=True),
                         "  R:deferme@example.com\n  T:127.0.0.1:127.0.0.1:27599\n")

    async def test_persistence_across_reopen(self) -> None:
        clock = task.Clock()
        clock.advance(T0)
        db = open_retry_database(self.spool, self.rules, clock=clock)
        for key in ("T:a.example:192.0.2.1", "T:b.example:192.0.2.2", "R:c.example"):
            await db.record_failure(key, basic_errno=ECONNREFUSED, more_errno=A,
                                    host=key.startswith("T:"))
        clock.advance(900)
        await db.record_failure("T:a.example:192.0.2.1", basic_errno=ECONNREFUSED,
                                more_errno=A, host=True)
        db.delete("T:b.example:192.0.2.2")
        again = open_retry_database(self.spool, self.rules, clock=clock)
        self.assertEqual(again.dump(utc=True), db.dump(utc=True))
        self.assertEqual(sorted(again.store.keys()), ["R:c.example", "T:a.example:192.0.2.1"])
        record = again.read("T:a.example:192.0.2.1")
        assert record is not None
        self.assertEqual((record.first_failed, record.last_try, record.next_try),
                         (T0, T0 + 900, T0 + 1800))
        with open(self.path) as f:
            header = json.loads(f.readline())
        self.assertEqual(header, {"format": "exim-py hints", "db": "retry", "version": 1})

    def test_truncated_last_line_is_ignored(self) -> None:
        store = HintsStore(self.path, name="retry")
        store.put("a", {"n": 1})
        store.put("b", {"n": 2})
        with open(self.path, "a") as f:
            f.write('{"key": "c", "value": {"n"')  # the writer died here
        again = HintsStore(self.path, name="retry")
        self.assertEqual(again.keys(), ["a", "b"])
        again.put("d", {"n": 4})
        third = HintsStore(self.path, name="retry")
        self.assertEqual(third.items(), [("a", {"n": 1}), ("b", {"n": 2}), ("d", {"n": 4})])
        with open(self.path, "rb") as f:
            self.assertTrue(f.read().endswith(b'\n{"key": "d", "value": {"n": 4}}\n'))

    def test_writes_go_through_run_io(self) -> None:
        queued: list[Any] = []
        store = HintsStore(self.path, queued.append, name="retry")
        store.put("a", {"n": 1})
        store.put("b", {"n": 2})
        store.delete("a")
        self.assertEqual(len(queued), 1)  # one flush covers them all
        self.assertFalse(os.path.exists(self.path))
        self.assertEqual(store.get("b"), {"n": 2})
        self.assertIsNone(store.get("a"))
        queued.pop()()
        self.assertEqual(HintsStore(self.path).items(), [("b", {"n": 2})])
        store.put("c", {"n": 3})
        self.assertEqual(len(queued), 1)

    def test_values_are_copies(self) -> None:
        store = HintsStore(None)
        value = {"n": 1}
        store.put("a", value)
        value["n"] = 2
        got = store.get("a")
        assert got is not None
        got["n"] = 3
        self.assertEqual(store.get("a"), {"n": 1})
        self.assertRaises(TypeError, store.put, "b", {"x": object()})

    def test_compaction(self) -> None:
        store = HintsStore(self.path)
        for n in range(1100):
            store.put("k", {"n": n})
        with open(self.path) as f:
            lines = f.read().splitlines()
        self.assertLess(len(lines), 200)
        self.assertEqual(HintsStore(self.path).items(), [("k", {"n": 1099})])
        store.compact()
        with open(self.path) as f:
            self.assertEqual(len(f.read().splitlines()), 2)

    def test_two_processes_share_the_file(self) -> None:
        one = HintsStore(self.path)
        two = HintsStore(self.path)
        one.put("a", {"n": 1})
        two.put("b", {"n": 2})  # picks up "a" before appending
        self.assertEqual(two.items(), [("a", {"n": 1}), ("b", {"n": 2})])
        one.refresh()
        self.assertEqual(one.items(), [("a", {"n": 1}), ("b", {"n": 2})])
        two.compact()  # a new file under the same name
        one.delete("a")
        two.refresh()
        self.assertEqual(two.items(), [("b", {"n": 2})])
        os.unlink(self.path)  # hints may be deleted at any time
        one.refresh()
        self.assertEqual(len(one), 0)

    def test_unwritable_directory(self) -> None:
        blocker = os.path.join(self.spool, "file")
        with open(blocker, "w"):
            pass
        store = HintsStore(os.path.join(blocker, "db", "retry"))
        self.assertFalse(store.available)
        store.put("a", {"n": 1})  # still works in memory
        self.assertEqual(store.get("a"), {"n": 1})

    def test_foreign_file_is_left_alone(self) -> None:
        os.makedirs(os.path.dirname(self.path))
        with open(self.path, "wb") as f:
            f.write(b"\x00\x06\x15\x61 Berkeley DB\n")
        store = HintsStore(self.path)
        self.assertFalse(store.available)
        store.put("a", {"n": 1})
        self.assertEqual(store.get("a"), {"n": 1})
        with open(self.path, "rb") as f:
            self.assertEqual(f.read(), b"\x00\x06\x15\x61 Berkeley DB\n")

    def test_tidy(self) -> None:
        now = T0 + 40 * DAY
        db = open_retry_database(self.spool, self.rules, clock=lambda: now)
        db.write("R:old.example", RetryRecord(T0, T0, T0, T0 + 900))
        db.write("R:new.example", RetryRecord(now - DAY, T0, T0, T0 + 900))
        gone = "T:mx.example:192.0.2.1:1xa0Pd-00062V-2o"
        here = "T:mx.example:192.0.2.1:1xa0Pe-00062V-2o"
        db.write(gone, RetryRecord(now, now, now, now))
        db.write(here, RetryRecord(now, now, now, now))
        lines = db.tidy(message_exists=lambda mid: mid == "1xa0Pe-00062V-2o")
        self.assertEqual(sorted(lines), ["deleted R:old.example (too old)",
                                         f"deleted {gone} (no message)"])
        self.assertEqual(sorted(db.store.keys()), ["R:new.example", here])
        self.assertEqual(db.tidy(keep=DAY // 2), ["deleted R:new.example (too old)"])


# -- against exim4 itself --------------------------------------------------------------

def _load(path: str) -> Any:
    with open(path) as f:
        return parse_config_text(f.read(), path)


def _exim_env() -> dict[str, str]:
    return {"PATH": "/usr/sbin:/usr/bin:/bin", "TZ": "UTC"}


_ROOT_ONLY = skipUnless(
    os.environ.get("EXIMPY_REQUIRE_PEERS") == "1" or os.geteuid() == 0,
    "exim4 -C with a test configuration needs root")


@_ROOT_ONLY
class LiveBrtTests(unittest.TestCase):
    def setUp(self) -> None:
        require_program(EXIM)
        self.dir = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, self.dir, True)

    def write_conf(self, name: str, rules: str, main: str = "") -> str:
        path = os.path.join(self.dir, name)
        with open(path, "w") as f:
            f.write(f"spool_directory = {self.dir}/spool\n{main}begin retry\n{rules}")
        return path

    def exim(self, conf: str, args: list[str], sender: str | None) -> tuple[str, str, int]:
        command = [EXIM, "-C", conf]
        if sender is not None:
            command += ["-f", sender]
        done = subprocess.run(command + ["-brt", *args], capture_output=True, env=_exim_env(),
                              timeout=30)
        return (done.stdout.decode("latin-1"), done.stderr.decode("latin-1"),
                done.returncode)

    async def test_brt_matches_exim(self) -> None:
        for n, (conf, main, cases) in enumerate(BRT_CASES):
            path = self.write_conf(f"conf{n}", conf, main)
            rules = RetryRules(_load(path))
            for args, sender, _ in cases:
                out, _, code = self.exim(path, args, sender)
                self.assertEqual(await brt_output(rules, args, sender), (out, code),
                                 (n, args, sender))

    async def test_configuration_errors_match_exim(self) -> None:
        for n, (line, _, _) in enumerate(MALFORMED):
            path = self.write_conf(f"bad{n}", f"{line}\n")
            out, err, code = self.exim(path, ["x.example"], None)
            try:
                rules = RetryRules(_load(path))
            except ConfigError as e:
                self.assertEqual(code, 1, line)
                # Exim's stderr: "<date> <time> <header>\n  <message>\n".
                self.assertEqual(err.split(" ", 2)[2], f"{e.header()}\n  {e.message}\n", line)
                continue
            self.assertEqual(await brt_output(rules, ["x.example"]), (out, code), line)


@_ROOT_ONLY
class LiveDeliveryTests(unittest.TestCase):
    """exim4 -odi delivering to a refused port writes a retry record; after
    exim_fixdb moves its times back, exim4 -M computes the next one.  Our
    next_retry() must agree."""

    RULES = "*  *  F,2h,15m; G,16h,1h,1.5; F,4d,6h\n"

    def setUp(self) -> None:
        for program in (EXIM, DUMPDB, FIXDB):
            require_program(program)
        if os.geteuid() != 0:
            self.fail("exim4 delivery runs need root")
        try:
            exim_user = pwd.getpwnam("Debian-exim")
        except KeyError:
            raise unittest.SkipTest("no Debian-exim user") from None
        self.dir = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, self.dir, True)
        os.chmod(self.dir, 0o755)
        self.spool = os.path.join(self.dir, "spool")
        os.mkdir(self.spool)
        os.chown(self.spool, exim_user.pw_uid, exim_user.pw_gid)
        self.port = free_port()
        self.conf = os.path.join(self.dir, "conf")
        with open(self.conf, "w") as f:
            f.write(f"""spool_directory = {self.spool}
log_file_path = {self.spool}/log/%slog
deliver_drop_privilege = true
exim_user = Debian-exim
exim_group = Debian-exim
primary_hostname = test.example
keep_environment =
begin routers
r1:
  driver = manualroute
  route_list = * 127.0.0.1
  transport = t1
  self = send
begin transports
t1:
  driver = smtp
  port = {self.port}
  allow_localhost
  user = Debian-exim
begin retry
{self.RULES}""")
        self.key = f"T:127.0.0.1:127.0.0.1:{self.port}"
        self.rules = RetryRules(_load(self.conf))

    def run_exim(self, args: list[str], stdin: bytes = b"") -> None:
        subprocess.run([EXIM, "-C", self.conf, *args], input=stdin, env=_exim_env(),
                       capture_output=True, timeout=60, check=True)

    def dump(self) -> tuple[str, RetryRecord]:
        done = subprocess.run([DUMPDB, "-z", self.spool, "retry"], capture_output=True,
                              env=_exim_env(), timeout=30, check=True)
        text = done.stdout.decode()
        m = re.fullmatch(r"  (\S+) (-?\d+) (-?\d+) (.*)\n(.{20})  (.{20})  (.{20}) (\*?)\n", text)
        assert m is not None, text

        when = _db_time
        record = RetryRecord(when(m.group(6)), when(m.group(5)), when(m.group(6)),
                             when(m.group(7)), m.group(8) == "*", int(m.group(2)),
                             int(m.group(3)), m.group(4))
        return text, record

    def fix(self, first: int, last: int, next_: int) -> None:
        minute = _fixdb_time
        commands = f"{self.key} 2 {minute(first)}\n3 {minute(last)}\n4 {minute(next_)}\nq\n"
        subprocess.run([FIXDB, self.spool, "retry"], input=commands.encode(), env=_exim_env(),
                       capture_output=True, timeout=30, check=True)

    def message_id(self) -> str:
        for _root, _, files in os.walk(os.path.join(self.spool, "input")):
            for name in files:
                if name.endswith("-H"):
                    return name[:-2]
        raise AssertionError("no message on the spool")

    async def test_exim_schedule(self) -> None:
        self.run_exim(["-odi", "-f", "s@example.com", "u@remote.example"],
                      b"Subject: x\n\nbody\n")
        text, first = self.dump()
        self.assertIn(f"  {self.key} 111 65 Connection refused\n", text)
        expected = next_retry(None, self.rules.entries[0], first.last_try, basic_errno=111,
                              more_errno=65, text="Connection refused", host=True).record
        self.assertEqual(first, expected)
        # Our dump of the same record prints the same text.
        db = RetryDatabase(HintsStore(None), self.rules)
        db.write(self.key, first)
        self.assertEqual(db.dump(utc=True), text)
        message_id = self.message_id()
        gaps: list[tuple[int, bool]] = []
        # Three hours into the failures (G phase), then five days (expired).
        for first_ago, last_ago, next_ago in ((3 * HOUR, 2 * HOUR, 600),
                                              (5 * DAY, 7 * HOUR, 3600)):
            now = first.last_try
            self.fix(now - first_ago, now - last_ago, now - next_ago)
            _, before = self.dump()
            self.run_exim(["-M", message_id])
            _, after = self.dump()
            ours = next_retry(before, self.rules.entries[0], after.last_try, basic_errno=111,
                              more_errno=65, text="Connection refused", host=True).record
            self.assertEqual(after, ours, (first_ago, before, after))
            gaps.append((after.next_try - after.last_try, after.expired))
            first = after
        # The geometric set (about 1h50m times 1.5), then the last F set, expired.
        self.assertGreater(gaps[0][0], 2 * HOUR)
        self.assertEqual(gaps, [(gaps[0][0], False), (6 * HOUR, True)])


def _db_time(text: str) -> int:
    """A time printed by exim_dumpdb -z."""
    return calendar.timegm(time.strptime(text, "%d-%b-%Y %H:%M:%S"))


def _fixdb_time(t: int) -> str:
    """A time as exim_fixdb reads it (to the minute; TZ=UTC)."""
    return time.strftime("%y%m%d%H%M", time.gmtime(t))
