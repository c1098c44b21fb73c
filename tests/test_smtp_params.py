"""Tests for twisted_mta.smtp.params: the MAIL and RCPT arguments.

Every reply in the tables below was observed from Exim 4.96 (Debian
exim4-daemon-heavy) with ``exim4 -C CONF -bh 192.0.2.1`` and CRLF lines; the
configurations are in ``_MODES``.  A small model of the server runs the
tables through the module, and ``LiveExim`` replays the same tables against
/usr/sbin/exim4 when it can (root only), so the record stays honest.
"""

from __future__ import annotations

import os
import subprocess
import tempfile
from dataclasses import dataclass, field
from typing import Any

from twisted.trial import unittest

from tests.peers import require_program
from twisted_mta.smtp.params import (
    MailParams,
    RcptParams,
    SmtpError,
    parse_envelope_address,
    parse_mail_argument,
    parse_rcpt_argument,
    xtext_decode,
    xtext_encode,
)

EXIM = "/usr/sbin/exim4"
MALFORMED_FOO = "501 <a@b.c> FOO=BAR: malformed address: FOO=BAR may not follow <a@b.c> "
TOO_BIG = "552 Message size exceeds maximum permitted"
U_DOMAIN = "b\xc3\xbc"  # "bü" in UTF-8, one character per byte


@dataclass
class _Mode:
    """One Exim configuration and the flags the server derives from it."""

    config: str
    greet: str = "EHLO client.example.net"
    esmtp: bool = True
    dsn: bool = True
    prdr: bool = False
    smtputf8: bool = True
    size_limit: int = 10 * 1024 * 1024
    accept_8bitmime: bool = True
    unqualified: bool = False
    qualify_recipient: str = "example.com"


_MODES = {
    "dsn": _Mode("dsn_advertise_hosts = *\nprdr_enable = true\nmessage_size_limit = 10M",
                 prdr=True),
    "nodsn": _Mode("message_size_limit = 10M", dsn=False),
    "no8bit": _Mode("dsn_advertise_hosts = *\naccept_8bitmime = false",
                    smtputf8=False, size_limit=50 * 1024 * 1024, accept_8bitmime=False),
    "nolimit": _Mode("dsn_advertise_hosts = *\nmessage_size_limit = 0", size_limit=0),
    "helo": _Mode("dsn_advertise_hosts = *\nprdr_enable = true\nmessage_size_limit = 10M",
                  greet="HELO client.example.net", esmtp=False, dsn=False, prdr=True,
                  smtputf8=False),
    "unqual": _Mode("dsn_advertise_hosts = *\nmessage_size_limit = 10M\n"
                    "sender_unqualified_hosts = *\nrecipient_unqualified_hosts = *\n"
                    "qualify_recipient = rcpt.example.org",
                    unqualified=True, qualify_recipient="rcpt.example.org"),
}

# (mode, MAIL command, reply); each runs in a fresh transaction (RSET between).
MAIL_ROWS = [
    # Unknown keywords end parameter parsing; they and all before are the address.
    ("dsn", "MAIL FROM:<a@b.c> FOO=BAR", MALFORMED_FOO),
    ("dsn", "MAIL FROM:<a@b.c>  FOO=BAR",
     "501 <a@b.c>  FOO=BAR: malformed address: FOO=BAR may not follow <a@b.c>  "),
    ("dsn", "MAIL FROM:<a@b.c>\tFOO=BAR", MALFORMED_FOO),  # the tab comes back as a space
    ("dsn", "MAIL FROM:<a@b.c> FOO",
     "501 <a@b.c> FOO: malformed address: FOO may not follow <a@b.c> "),
    ("dsn", "MAIL FROM:<a@b.c> FOO=BAR SIZE=10", MALFORMED_FOO),
    ("dsn", "MAIL FROM:<a@b.c> FOO=BAR SIZE=abc", MALFORMED_FOO),
    ("dsn", "MAIL FROM:<a@b.c> FOO=BAR  SIZE=abc",
     "501 <a@b.c> FOO=BAR : malformed address: FOO=BAR  may not follow <a@b.c> "),
    ("dsn", "MAIL FROM:<a@b.c> X-FOO=BAR",
     "501 <a@b.c> X-FOO=BAR: malformed address: X-FOO=BAR may not follow <a@b.c> "),
    ("dsn", "MAIL FROM:<a@b.c> FOO1=BAR",
     "501 <a@b.c> FOO1=BAR: malformed address: FOO1=BAR may not follow <a@b.c> "),
    ("dsn", "MAIL FROM:<a@b.c> =BAR",
     "501 <a@b.c> =BAR: malformed address: =BAR may not follow <a@b.c> "),
    ("dsn", "MAIL FROM:<a@b.c>=BAR",
     "501 <a@b.c>=BAR: malformed address: =BAR may not follow <a@b.c>"),
    ("dsn", 'MAIL FROM:<a@b.c> FOO="x y"',
     '501 <a@b.c> FOO="x y": malformed address: FOO="x y" may not follow <a@b.c> '),
    ("dsn", 'MAIL FROM:<a@b.c> FOO="x',
     '501 <a@b.c> FOO="x: malformed address: FOO="x may not follow <a@b.c> '),
    # SIZE: unparsable values silently end parsing; strtoul() and the INT_MAX clamp.
    ("dsn", "MAIL FROM:<a@b.c> BODY=8BITMIME SIZE=abc",
     "501 <a@b.c> BODY=8BITMIME: malformed address: BODY=8BITMIME may not follow <a@b.c> "),
    ("dsn", "MAIL FROM:<a@b.c> SIZE=abc BODY=8BITMIME", "250 OK"),
    ("dsn", "MAIL FROM:<a@b.c> SIZE", "250 OK"),
    ("dsn", "MAIL FROM:<a@b.c> SIZE=", "250 OK"),
    ("dsn", "MAIL FROM:<a@b.c> SIZE=+", "250 OK"),
    ("dsn", "MAIL FROM:<a@b.c> FOO=X SIZE=",
     "501 <a@b.c> FOO=X: malformed address: FOO=X may not follow <a@b.c> "),
    ("dsn", "MAIL FROM:<a@b.c> SIZE=-5", TOO_BIG),
    ("dsn", "MAIL FROM:<a@b.c> SIZE=-0", "250 OK"),
    ("dsn", "MAIL FROM:<a@b.c> SIZE=+5", "250 OK"),
    ("dsn", "MAIL FROM:<a@b.c> SIZE=010", "250 OK"),
    ("dsn", "MAIL FROM:<a@b.c> SIZE=10485760", "250 OK"),
    ("dsn", "MAIL FROM:<a@b.c> SIZE=10485761", TOO_BIG),
    ("dsn", "MAIL FROM:<a@b.c> size=20000000", TOO_BIG),
    ("dsn", "MAIL FROM:<a@b.c> SIZE=2147483648", TOO_BIG),
    ("dsn", "MAIL FROM:<a@b.c> SIZE=99999999999999999999999", TOO_BIG),
    ("dsn", "MAIL FROM:<a@b.c> SIZE=18446744073709551615", TOO_BIG),
    ("dsn", "MAIL FROM:<a@b.c> SIZE=-18446744073709551615", "250 OK"),  # 2**64 - n = 1
    ("dsn", "MAIL FROM:<a@b.c> SIZE=-18446744073709551616", TOO_BIG),  # ERANGE
    ("dsn", "MAIL FROM:<a@b.c>\x0bSIZE=1", "250 OK"),
    ("nolimit", "MAIL FROM:<a@b.c> SIZE=20000000", "250 OK"),
    ("nodsn", "MAIL FROM:<a@b.c> SIZE=20000000", TOO_BIG),
    # The address is checked before the size, the domain after it.
    ("dsn", "MAIL FROM:<> SIZE=20000000", TOO_BIG),
    ("dsn", "MAIL FROM:<bad SIZE=20000000", '501 <bad: "@" or "." expected after "bad"'),
    ("dsn", "MAIL FROM:<bad> SIZE=20000000", TOO_BIG),
    # BODY
    ("dsn", "MAIL FROM:<a@b.c> BODY=9BIT", "501 invalid data for BODY"),
    ("dsn", "MAIL FROM:<a@b.c> BODY=7bit", "250 OK"),
    ("dsn", "MAIL FROM:<a@b.c> body=8bitmime", "250 OK"),
    ("dsn", "MAIL FROM:<a@b.c> BODY", "501 invalid data for BODY"),
    ("dsn", "MAIL FROM:<a@b.c> BODY=", "250 OK"),
    ("no8bit", "MAIL FROM:<a@b.c> BODY=8BITMIME", "250 OK"),
    ("no8bit", "MAIL FROM:<a@b.c> BODY=9BIT", "250 OK"),
    ("no8bit", "MAIL FROM:<a@b.c> FOO=X BODY=8BITMIME",
     "501 <a@b.c> FOO=X: malformed address: FOO=X may not follow <a@b.c> "),
    ("no8bit", "MAIL FROM:<a@b.c> FOO=X RET=FOO", "501 Value for RET is invalid"),
    ("no8bit", "MAIL FROM:<a@b.c> SIZE=20000000", "250 OK"),
    # RET and ENVID
    ("dsn", "MAIL FROM:<a@b.c> RET=FOO", "501 Value for RET is invalid"),
    ("dsn", "MAIL FROM:<a@b.c> RET=hdrs", "250 OK"),
    ("dsn", "MAIL FROM:<a@b.c> RET=HDRS RET=FULL", "501 RET can be specified once only"),
    ("dsn", "MAIL FROM:<a@b.c> RET=", "250 OK"),
    ("dsn", "MAIL FROM:<a@b.c> FOO=X RET=",
     "501 <a@b.c> FOO=X: malformed address: FOO=X may not follow <a@b.c> "),
    ("dsn", "MAIL FROM:<a@b.c> FOO=X RET=FOO", "501 Value for RET is invalid"),
    ("dsn", "MAIL FROM:<a@b.c> RET", "501 Value for RET is invalid"),
    ("dsn", "MAIL FROM:<a@b.c> ENVID=x ENVID=y", "501 ENVID can be specified once only"),
    ("dsn", "MAIL FROM:<a@b.c> ENVID=", "250 OK"),
    ("dsn", "MAIL FROM:<a@b.c> ENVID", "250 OK"),
    ("dsn", 'MAIL FROM:<a@b.c> ENVID="x y"', "250 OK"),
    ("dsn", 'MAIL FROM:<"a b"@c.d> ENVID="x y"', "250 OK"),
    ("dsn", 'MAIL FROM:<a@b.c> ENVID=x"',
     '501 <a@b.c> ENVID=x": malformed address: ENVID=x" may not follow <a@b.c> '),
    ("dsn", "MAIL FROM:<a@b.c> ENVID=a+2Bb=c",
     "501 <a@b.c> ENVID=a+2Bb=c: malformed address: ENVID=a+2Bb=c may not follow <a@b.c> "),
    ("nodsn", "MAIL FROM:<a@b.c> RET=FOO", "250 OK"),
    ("nodsn", "MAIL FROM:<a@b.c> RET=HDRS RET=FULL", "250 OK"),
    ("nodsn", "MAIL FROM:<a@b.c> ENVID=x ENVID=y", "250 OK"),
    ("nodsn", "MAIL FROM:<a@b.c> FOO=X RET=FOO",
     "501 <a@b.c> FOO=X: malformed address: FOO=X may not follow <a@b.c> "),
    # PRDR and SMTPUTF8
    ("dsn", "MAIL FROM:<a@b.c> PRDR", "250 OK, PRDR Requested"),
    ("dsn", "MAIL FROM:<a@b.c> prdr=x", "250 OK, PRDR Requested"),
    ("dsn", "MAIL FROM:<a@b.c> PRDR PRDR", "250 OK, PRDR Requested"),
    ("nodsn", "MAIL FROM:<a@b.c> PRDR", "250 OK"),
    ("nodsn", "MAIL FROM:<a@b.c> FOO=X PRDR",
     "501 <a@b.c> FOO=X: malformed address: FOO=X may not follow <a@b.c> "),
    ("dsn", "MAIL FROM:<a@b.c> SMTPUTF8", "250 OK"),
    ("dsn", "MAIL FROM:<a@b.c> SMTPUTF8=x",
     "501 <a@b.c> SMTPUTF8=x: malformed address: SMTPUTF8=x may not follow <a@b.c> "),
    ("no8bit", "MAIL FROM:<a@b.c> SMTPUTF8", "501 SMTPUTF8 used when not advertised"),
    # AUTH= is read whether or not AUTH was advertised (it is not, here).
    ("dsn", "MAIL FROM:<a@b.c> AUTH=<>", "250 OK"),
    ("dsn", "MAIL FROM:<a@b.c> AUTH=<> SIZE=1", "250 OK"),
    ("dsn", "MAIL FROM:<a@b.c> AUTH=a+40b", "250 OK"),
    ("dsn", "MAIL FROM:<a@b.c> AUTH=x+4", "501 invalid data for AUTH"),
    ("dsn", "MAIL FROM:<a@b.c> AUTH=x+zz", "501 invalid data for AUTH"),
    ("dsn", "MAIL FROM:<a@b.c> AUTH=a+2", "501 invalid data for AUTH"),
    ("dsn", "MAIL FROM:<a@b.c> AUTH=a+2g", "501 invalid data for AUTH"),
    ("dsn", "MAIL FROM:<a@b.c> AUTH=\x7f", "250 OK"),
    ("dsn", "MAIL FROM:<a@b.c> AUTH=\x80", "501 invalid data for AUTH"),
    ("dsn", "MAIL FROM:<a@b.c> AUTH=", "250 OK"),
    ("dsn", "MAIL FROM:<a@b.c> AUTH", "250 OK"),
    # After HELO nothing is a parameter.
    ("helo", "MAIL FROM:<a@b.c> PRDR",
     "501 <a@b.c> PRDR: malformed address: PRDR may not follow <a@b.c> "),
    ("helo", "MAIL FROM:<a@b.c> SIZE=10",
     "501 <a@b.c> SIZE=10: malformed address: SIZE=10 may not follow <a@b.c> "),
    ("helo", "MAIL FROM:<a@b.c> FOO=X RET=",
     "501 <a@b.c> FOO=X RET=: malformed address: FOO=X RET= may not follow <a@b.c> "),
    ("helo", "MAIL FROM:<a@b.c> SMTPUTF8",
     "501 <a@b.c> SMTPUTF8: malformed address: SMTPUTF8 may not follow <a@b.c> "),
    ("helo", "MAIL FROM:<a@b.c>", "250 OK"),
    # The operand itself.
    ("dsn", "MAIL FROM:", "501 MAIL must have an address operand"),
    ("dsn", "MAIL FROM: ", "501 MAIL must have an address operand"),
    ("dsn", "MAIL FROM:<>", "250 OK"),
    ("dsn", "MAIL FROM:< >", "250 OK"),
    ("dsn", "MAIL FROM:<(c)>", "250 OK"),
    ("dsn", "MAIL FROM:x <>", "250 OK"),
    ("dsn", "MAIL FROM:<> x", "501 <> x: malformed address: x may not follow <> "),
    ("dsn", "MAIL FROM:<>x", "501 <>x: malformed address: x may not follow <>"),
    ("dsn", "MAIL FROM: <a@b.c>", "250 OK"),
    ("dsn", "mail from:<a@b.c>", "250 OK"),
    ("dsn", "MAIL FROM:<a@b.c> SIZE=5 ", "250 OK"),
    ("dsn", "MAIL FROM:SIZE=10", "501 SIZE=10: sender address must contain a domain"),
    ("dsn", "MAIL FROM:<bad>", "501 <bad>: sender address must contain a domain"),
    ("dsn", "MAIL FROM:bad", "501 bad: sender address must contain a domain"),
    ("dsn", "MAIL FROM:<postmaster>", "501 <postmaster>: sender address must contain a domain"),
    ("dsn", 'MAIL FROM:<"postmaster">',
     '501 <"postmaster">: sender address must contain a domain'),
    ("dsn", 'MAIL FROM:<"a b"@c.d> SIZE=5', "250 OK"),
    ("dsn", 'MAIL FROM:"a b"@c.d', "250 OK"),
    ("dsn", 'MAIL FROM:<"a b SIZE=5', '501 <"a b: unmatched doublequote in local part'),
    ("dsn", "MAIL FROM:<@x:a@b.c>", "250 OK"),
    ("dsn", "MAIL FROM:<@x,@y:a@b.c> SIZE=5", "250 OK"),
    ("dsn", "MAIL FROM:@x:a@b.c", "250 OK"),
    ("dsn", "MAIL FROM:<@x:>", "501 <@x:>: missing or malformed local part"),
    ("dsn", "MAIL FROM:<<a@b.c>>", "501 <<a@b.c>>: missing or malformed local part"),
    # (in a session where no MAIL has had SMTPUTF8 yet)
    ("nodsn", f"MAIL FROM:<a@{U_DOMAIN}.c>",
     f"501 <a@{U_DOMAIN}.c>: malformed address: \xc3\xbc.c> may not follow <a@b"),
    ("dsn", f"MAIL FROM:<a@{U_DOMAIN}.c> SMTPUTF8", "250 OK"),
    ("dsn", f"MAIL FROM:<{U_DOMAIN}@b.c>", "250 OK"),
    ("dsn", "MAIL FROM:<a@b\xc3x.c> SMTPUTF8", "501 <a@b\xc3x.c>: invalid UTF-8 byte sequence"),
    ("dsn", "MAIL FROM:<a@b\xff.c> SMTPUTF8", "501 <a@b\xff.c>: invalid UTF-8 byte sequence"),
    ("dsn", f"MAIL FROM:<a@{U_DOMAIN}.c> SMTPUTF8 SIZE=99999999", TOO_BIG),
    ("unqual", "MAIL FROM:<lp>", "250 OK"),
]

_LONG_252 = "x" * 252
_LONG_253 = "x" * 253

# (mode, RCPT command, reply); all follow one MAIL FROM:<s@example.net>.
RCPT_ROWS = [
    ("dsn", "RCPT TO:<p@test.ex> NOTIFY=foo", "501 Invalid value for NOTIFY parameter"),
    ("dsn", "RCPT TO:<p@test.ex> NOTIFY=NEVER,SUCCESS", "501 Invalid value for NOTIFY parameter"),
    ("dsn", "RCPT TO:<p@test.ex> NOTIFY=SUCCESS NOTIFY=DELAY",
     "501 NOTIFY can be specified once only"),
    ("dsn", "RCPT TO:<p@test.ex> NOTIFY= NOTIFY=DELAY", "501 NOTIFY can be specified once only"),
    ("dsn", "RCPT TO:<p@test.ex> NOTIFY=DELAY NOTIFY=", "250 Accepted"),
    ("dsn", "RCPT TO:<p@test.ex> NOTIFY= NOTIFY=", "250 Accepted"),
    ("dsn", "RCPT TO:<p@test.ex> NOTIFY=", "250 Accepted"),
    ("dsn", "RCPT TO:<p@test.ex> NOTIFY=never", "250 Accepted"),
    ("dsn", "RCPT TO:<p@test.ex> NOTIFY=SUCCESS,", "250 Accepted"),
    ("dsn", "RCPT TO:<p@test.ex> NOTIFY=,SUCCESS", "501 Invalid value for NOTIFY parameter"),
    ("dsn", "RCPT TO:<p@test.ex> NOTIFY=SUCCESS,,DELAY", "501 Invalid value for NOTIFY parameter"),
    ("dsn", "RCPT TO:<s@test.ex> NOTIFY=SUCCESS,SUCCESS", "250 Accepted"),
    ("dsn", "RCPT TO:<p@test.ex> NOTIFY", "501 Invalid value for NOTIFY parameter"),
    ("dsn", "RCPT TO:<p@test.ex> notify=success,FAILURE,delay ORCPT=rfc822;p@test.ex",
     "250 Accepted"),
    ("dsn", "RCPT TO:<p@test.ex> ORCPT=rfc822;a@b ORCPT=rfc822;c@d",
     "501 ORCPT can be specified once only"),
    ("dsn", "RCPT TO:<p@test.ex> ORCPT= ORCPT=x", "501 ORCPT can be specified once only"),
    ("dsn", "RCPT TO:<r@test.ex> ORCPT=garbage", "250 Accepted"),
    ("dsn", "RCPT TO:<p@test.ex> ORCPT", "250 Accepted"),
    ("dsn", "RCPT TO:<p@test.ex> ORCPT=rfc822;a=b",
     "501 <p@test.ex> ORCPT=rfc822;a=b: malformed address: ORCPT=rfc822;a=b may not follow "
     "<p@test.ex> "),
    ("dsn", "RCPT TO:<p@test.ex> XYZ=1",
     "501 <p@test.ex> XYZ=1: malformed address: XYZ=1 may not follow <p@test.ex> "),
    ("dsn", "RCPT TO:<s@test.ex> SIZE=10",
     "501 <s@test.ex> SIZE=10: malformed address: SIZE=10 may not follow <s@test.ex> "),
    # A word without "=" gets one in place of its separator (RCPT only).
    ("dsn", "RCPT TO:<p@test.ex> XYZ",
     "501 <p@test.ex>=XYZ: malformed address: =XYZ may not follow <p@test.ex>"),
    ("dsn", "RCPT TO:<p@test.ex>  XYZ",
     "501 <p@test.ex> =XYZ: malformed address: =XYZ may not follow <p@test.ex> "),
    ("dsn", "RCPT TO:<p@test.ex>\tXYZ",
     "501 <p@test.ex>=XYZ: malformed address: =XYZ may not follow <p@test.ex>"),
    ("dsn", "RCPT TO:<p@test.ex> XYZ NOTIFY=SUCCESS",
     "501 <p@test.ex>=XYZ: malformed address: =XYZ may not follow <p@test.ex>"),
    ("dsn", "RCPT TO:<a@b.c> NOTIFY=SUCCESS ORCPT=x XYZ",
     "501 <a@b.c> NOTIFY=SUCCESS ORCPT=x=XYZ: malformed address: NOTIFY=SUCCESS ORCPT=x=XYZ "
     "may not follow <a@b.c> "),
    ("dsn", "RCPT TO:<a@b.c> (comment)",
     "501 <a@b.c>=(comment): malformed address: =(comment) may not follow <a@b.c>"),
    ("dsn", "RCPT TO:<a@b.c> x", "501 <a@b.c>=x: malformed address: =x may not follow <a@b.c>"),
    ("dsn", "RCPT TO:< >", "501 <=>: recipient address must contain a domain"),
    ("dsn", "RCPT TO:<@x a@b.c>", "501 <@x=a@b.c>: no local part"),
    ("dsn", "RCPT TO:Name <a@b.c>", "250 Accepted"),
    # Without DSN, NOTIFY and ORCPT are part of the address.
    ("nodsn", "RCPT TO:<p@test.ex> NOTIFY=foo",
     "501 <p@test.ex> NOTIFY=foo: malformed address: NOTIFY=foo may not follow <p@test.ex> "),
    ("nodsn", "RCPT TO:<p@test.ex> NOTIFY=",
     "501 <p@test.ex> NOTIFY=: malformed address: NOTIFY= may not follow <p@test.ex> "),
    ("nodsn", "RCPT TO:<p@test.ex> NOTIFY",
     "501 <p@test.ex>=NOTIFY: malformed address: =NOTIFY may not follow <p@test.ex>"),
    ("nodsn", "RCPT TO:<p@test.ex> ORCPT=rfc822;a@b ORCPT=rfc822;c@d",
     "501 <p@test.ex> ORCPT=rfc822;a@b ORCPT=rfc822;c@d: malformed address: "
     "ORCPT=rfc822;a@b ORCPT=rfc822;c@ may not follow <p@test.ex> "),
    ("nodsn", "RCPT TO:<p@test.ex> notify=success,FAILURE,delay ORCPT=rfc822;p@test.ex",
     "501 <p@test.ex> notify=success,FAILURE,delay ORCPT=rfc822;p@test.ex: malformed address: "
     "notify=success,FAILURE,delay ORC may not follow <p@test.ex> "),
    ("nodsn", "RCPT TO:<p@test.ex> XYZ NOTIFY=SUCCESS",
     "501 <p@test.ex> XYZ NOTIFY=SUCCESS: malformed address: XYZ NOTIFY=SUCCESS may not "
     "follow <p@test.ex> "),
    ("nodsn", "RCPT TO:<postmaster> NOTIFY=SUCCESS",
     "501 <postmaster> NOTIFY=SUCCESS: malformed address: NOTIFY=SUCCESS may not follow "
     "<postmaster> "),
    ("helo", "RCPT TO:<a@b.c> XYZ",
     "501 <a@b.c> XYZ: malformed address: XYZ may not follow <a@b.c> "),
    ("helo", "RCPT TO:<a@b.c> NOTIFY=SUCCESS",
     "501 <a@b.c> NOTIFY=SUCCESS: malformed address: NOTIFY=SUCCESS may not follow <a@b.c> "),
    ("helo", "RCPT TO:Name <a@b.c>", "250 Accepted"),
    # The operand.
    ("dsn", "RCPT TO:", "501 RCPT must have an address operand"),
    ("dsn", "RCPT TO:<>", "501 <>: missing or malformed local part"),
    ("dsn", "RCPT TO:postmaster", "250 Accepted"),
    ("dsn", "RCPT TO:<postmaster>", "250 Accepted"),
    ("dsn", "RCPT TO:<PostMaster>", "250 Accepted"),
    ("dsn", "RCPT TO:<postmaster> NOTIFY=SUCCESS", "250 Accepted"),
    ("dsn", 'RCPT TO:<"postmaster">', '501 <"postmaster">: recipient address must contain a domain'),
    ("dsn", "RCPT TO:<postmaster@>", "501 <postmaster@>: domain missing or malformed"),
    ("dsn", "RCPT TO:<lp> NOTIFY=SUCCESS", "501 <lp>: recipient address must contain a domain"),
    ("dsn", "RCPT TO:<lp>", "501 <lp>: recipient address must contain a domain"),
    ("dsn", "RCPT TO:<@x,@y:a@b.c>", "250 Accepted"),
    ("dsn", "RCPT TO:<@x:a@b.c>", "250 Accepted"),
    ("dsn", "RCPT TO:@x:a@b.c", "250 Accepted"),
    ("dsn", "RCPT TO:<@x,@y:a>", "501 <@x,@y:a>: domain missing in source-routed address"),
    ("dsn", "RCPT TO:<@x,a@b.c>", "501 <@x,a@b.c>: colon expected after route list"),
    ("dsn", 'RCPT TO:<"a b"@c.d>', "250 Accepted"),
    ("dsn", "RCPT TO:<a@[1.2.3.4]>", "501 <a@[1.2.3.4]>: domain literals not allowed"),
    ("dsn", "RCPT TO:a@[1.2.3.4]", "250 Accepted"),
    ("dsn", "RCPT TO:<a@b.c", "501 <a@b.c: '>' missing at end of address"),
    ("dsn", "RCPT TO:<a@b.c>>", "501 <a@b.c>>: malformed address: > may not follow <a@b.c>"),
    ("dsn", "RCPT TO:<a@b..c>", "501 <a@b..c>: domain missing or malformed"),
    ("dsn", "RCPT TO:<a@b.c.>", "501 <a@b.c.>: domain missing or malformed"),
    ("dsn", "RCPT TO:<a.@b.c>", "250 Accepted"),
    ("dsn", "RCPT TO:<a@-b.c>", "501 <a@-b.c>: domain missing or malformed"),
    ("dsn", "RCPT TO: <a@b.c>", "250 Accepted"),
    ("dsn", "rcpt to:<a@b.c>", "250 Accepted"),
    ("dsn", f"RCPT TO:<r@{U_DOMAIN}.c>",
     f"501 <r@{U_DOMAIN}.c>: malformed address: \xc3\xbc.c> may not follow <r@b"),
    # At most 256 characters between the angle brackets.
    ("dsn", f"RCPT TO:<{_LONG_252}@b.c>", "250 Accepted"),
    ("dsn", f"RCPT TO:<{_LONG_253}@b.c>",
     f"501 <{_LONG_253}@b.c>: address is ridiculously long: {'x' * 64}..."),
    ("dsn", "RCPT TO: " + "x" * 256, "501 " + "x" * 256 + ": recipient address must contain a domain"),
    ("dsn", "RCPT TO: " + "x" * 257,
     "501 " + "x" * 257 + f": address is ridiculously long: {'x' * 64}..."),
    ("dsn", f"RCPT TO:Phrase <{_LONG_252}@b.c>", "250 Accepted"),
    ("dsn", f"RCPT TO:Phrase <{_LONG_253}@b.c>",
     f"501 Phrase=<{_LONG_253}@b.c>: address is ridiculously long: {'x' * 64}..."),
    ("unqual", "RCPT TO:<lp2>", "250 Accepted"),
    ("unqual", 'RCPT TO:<"postmaster">', "250 Accepted"),
    ("unqual", "RCPT TO:x", "250 Accepted"),
]

# Whole sessions, for state that outlives one command: SMTPUTF8 allows UTF-8
# domains for the rest of the session, even when its MAIL was refused.
SESSIONS = [
    ("dsn", [("MAIL FROM:<a@b.c> SMTPUTF8", "250 OK"),
             (f"RCPT TO:<r@{U_DOMAIN}.c>", "250 Accepted"),
             ("RSET", "250 Reset OK"),
             (f"MAIL FROM:<a@{U_DOMAIN}.c>", "250 OK"),
             ("RCPT TO:<r@\xc3\xbc>", "250 Accepted"),
             ("RCPT TO:<r@-\xc3\xbc>", "501 <r@-\xc3\xbc>: domain missing or malformed"),
             ("RCPT TO:<r@\xf8\x80\x80\x80\x80x>", "250 Accepted"),
             ("RCPT TO:<r@\xfc\x80\x80\x80\x80\x80x>", "250 Accepted"),
             ("RCPT TO:<r@\xfe\x80\x80\x80\x80\x80\x80x>",
              "501 <r@\xfe\x80\x80\x80\x80\x80\x80x>: invalid UTF-8 byte sequence"),
             ("RCPT TO:<r@\xc3>", "501 <r@\xc3>: invalid UTF-8 byte sequence")]),
    ("dsn", [("MAIL FROM:<a@b.c> BODY=9BIT SMTPUTF8", "501 invalid data for BODY"),
             (f"MAIL FROM:<a@{U_DOMAIN}.c>", "250 OK")]),
    ("dsn", [("MAIL FROM:<a@b.c> FOO=X SMTPUTF8",
              "501 <a@b.c> FOO=X: malformed address: FOO=X may not follow <a@b.c> "),
             (f"MAIL FROM:<a@{U_DOMAIN}.c>", "250 OK")]),
    ("dsn", [("MAIL FROM:<a@b.c> SMTPUTF8 SIZE=99999999", TOO_BIG),
             (f"MAIL FROM:<a@{U_DOMAIN}.c>", "250 OK")]),
    ("dsn", [("MAIL FROM:<a@b.c> SMTPUTF8 BODY=9BIT", "501 invalid data for BODY"),
             (f"MAIL FROM:<a@{U_DOMAIN}.c>",
              f"501 <a@{U_DOMAIN}.c>: malformed address: \xc3\xbc.c> may not follow <a@b")]),
]

# (mode, commands before, command, counts towards smtp_max_synprot_errors);
# observed with smtp_max_synprot_errors = 0, where a counted error is answered
# "<code>-<text>" / "<code> Too many syntax or protocol errors" and the call ends.
SYNTAX_ROWS = [
    ("dsn", [], "MAIL FROM:", True),
    ("dsn", [], "MAIL FROM:<a@b.c> BODY=9BIT", True),
    ("dsn", [], "MAIL FROM:<a@b.c> RET=X", True),
    ("dsn", [], "MAIL FROM:<a@b.c> RET=FULL RET=HDRS", True),
    ("dsn", [], "MAIL FROM:<a@b.c> ENVID=a ENVID=b", True),
    ("dsn", [], "MAIL FROM:<a@b.c> AUTH=a+zz", True),
    ("no8bit", [], "MAIL FROM:<a@b.c> SMTPUTF8", True),
    ("dsn", [], "MAIL FROM:<a@b.c> FOO=BAR", True),
    ("dsn", [], "MAIL FROM:<a@b.c> SIZE=99999999", False),
    ("dsn", [], "MAIL FROM:<lp>", False),
    ("dsn", ["MAIL FROM:<a@b.c>"], "RCPT TO:", True),
    ("dsn", ["MAIL FROM:<a@b.c>"], "RCPT TO:<p@q.r> NOTIFY=X", True),
    ("dsn", ["MAIL FROM:<a@b.c>"], "RCPT TO:<p@q.r> NOTIFY=DELAY NOTIFY=FAILURE", True),
    ("dsn", ["MAIL FROM:<a@b.c>"], "RCPT TO:<p@q.r> ORCPT=a ORCPT=b", True),
    ("dsn", ["MAIL FROM:<a@b.c>"], "RCPT TO:<p@q.r> XX=1", True),
    ("dsn", ["MAIL FROM:<a@b.c>"], "RCPT TO:<lp>", False),
]


def _mail_steps(rows: list[tuple[str, str, str]]) -> list[tuple[str, str]]:
    steps: list[tuple[str, str]] = []
    for _mode, command, reply in rows:
        steps += [(command, reply), ("RSET", "250 Reset OK")]
    return steps


def _rcpt_steps(rows: list[tuple[str, str, str]]) -> list[tuple[str, str]]:
    return [("MAIL FROM:<s@example.net>", "250 OK")] + [(c, r) for _m, c, r in rows]


def _by_mode(rows: list[Any]) -> dict[str, list[Any]]:
    grouped: dict[str, list[Any]] = {}
    for row in rows:
        grouped.setdefault(row[0], []).append(row)
    return grouped


def _all_sessions() -> list[tuple[str, list[tuple[str, str]]]]:
    """Every table as (mode, [(command, reply), ...]) sessions."""
    sessions = [(m, _mail_steps(rows)) for m, rows in _by_mode(MAIL_ROWS).items()]
    sessions += [(m, _rcpt_steps(rows)) for m, rows in _by_mode(RCPT_ROWS).items()]
    return sessions + SESSIONS


@dataclass
class _Server:
    """Just enough of the ESMTP server to turn the module's answers into
    Exim's replies: the verb prefixes, RSET, and the sticky SMTPUTF8 flag."""

    mode: _Mode
    utf8: bool = False
    last_error: SmtpError | None = field(default=None)

    def reply(self, line: str) -> str:
        self.last_error = None
        try:
            return self._dispatch(line)
        except SmtpError as e:
            self.last_error = e
            return f"{e.code} {e.text}"

    def _dispatch(self, line: str) -> str:
        if line.lower().startswith("mail from:"):
            return self._mail(line[10:])
        if line.lower().startswith("rcpt to:"):
            return self._rcpt(line[8:])
        if line == "RSET":
            return "250 Reset OK"
        raise AssertionError(f"unexpected command {line!r}")

    def _mail(self, arg: str) -> str:
        m = self.mode
        try:
            text, params = parse_mail_argument(
                arg, esmtp=m.esmtp, dsn_advertised=m.dsn, prdr_enabled=m.prdr,
                smtputf8_advertised=m.smtputf8, auth_advertised=False, size_limit=m.size_limit,
                accept_8bitmime=m.accept_8bitmime, utf8_domains=self.utf8)
        except SmtpError as e:
            self.utf8 |= bool(e.params and e.params.smtputf8)
            raise
        self.utf8 |= params.smtputf8
        parse_envelope_address(text, is_sender=True, qualify_domain="example.com",
                               allow_unqualified=m.unqualified, utf8_domains=self.utf8)
        return "250 OK, PRDR Requested" if params.prdr else "250 OK"

    def _rcpt(self, arg: str) -> str:
        m = self.mode
        text, _params = parse_rcpt_argument(arg, esmtp=m.esmtp, dsn_advertised=m.dsn)
        parse_envelope_address(text, is_sender=False, qualify_domain=m.qualify_recipient,
                               allow_unqualified=m.unqualified, utf8_domains=self.utf8)
        return "250 Accepted"


def _mismatches(mode: str, steps: list[tuple[str, str]], replies: list[str]) -> list[str]:
    return [f"[{mode}] {command!r}: expected {want!r}, got {got!r}"
            for (command, want), got in zip(steps, replies, strict=True) if got != want]


class RecordedReplies(unittest.TestCase):
    """The module reproduces every reply recorded from Exim."""

    def test_tables(self) -> None:
        problems: list[str] = []
        for mode, steps in _all_sessions():
            server = _Server(_MODES[mode])
            problems += _mismatches(mode, steps, [server.reply(c) for c, _r in steps])
        self.assertEqual(problems, [])

    def test_syntax_error_counting(self) -> None:
        problems = []
        for mode, before, command, counts in SYNTAX_ROWS:
            server = _Server(_MODES[mode])
            for line in before:
                server.reply(line)
            server.reply(command)
            error = server.last_error
            if error is None or error.syntax != counts:
                problems.append(f"{command!r}: {error!r} syntax={counts} expected")
        self.assertEqual(problems, [])

    def test_empty_mail_is_a_protocol_error(self) -> None:
        with self.assertRaises(SmtpError) as cm:
            _mail(" ")
        self.assertTrue(cm.exception.protocol)
        self.assertTrue(cm.exception.syntax)


def _mail(arg: str, **flags: Any) -> tuple[str, MailParams]:
    options: dict[str, Any] = dict(
        esmtp=True, dsn_advertised=True, prdr_enabled=True, smtputf8_advertised=True,
        auth_advertised=False, size_limit=10 * 1024 * 1024)
    options.update(flags)
    return parse_mail_argument(arg, **options)


def _rcpt(arg: str, dsn: bool = True) -> tuple[str, RcptParams]:
    return parse_rcpt_argument(arg, esmtp=True, dsn_advertised=dsn)


class MailValues(unittest.TestCase):
    """What the parameters are worth.  The RET/ENVID values were read back
    from the spool (-dsn_ret, -dsn_envid) of messages sent with exim4 -bs,
    the AUTH ones from $authenticated_sender with acl_smtp_mailauth = accept."""

    def test_all_parameters(self) -> None:
        text, params = _mail('<> SIZE=5 BODY=8bitmime PRDR SMTPUTF8 RET=full ENVID="x y" '
                             "AUTH=a+40b")
        self.assertEqual(text, "<>")
        self.assertEqual(params, MailParams(size=5, body="8BITMIME", ret="FULL",
                                            envid='"x y"', prdr=True, smtputf8=True,
                                            auth="a@b"))

    def test_envid_without_equals_is_its_own_value(self) -> None:
        self.assertEqual(_mail("<a@b.c> ENVID")[1].envid, "ENVID")

    def test_size_clamped(self) -> None:
        self.assertEqual(_mail("<a@b.c> SIZE=99999999999", size_limit=0)[1].size, 2**31 - 1)
        self.assertEqual(_mail("<a@b.c> SIZE=-18446744073709551615")[1].size, 1)
        self.assertEqual(_mail("<a@b.c> SIZE=abc")[1].size, None)

    def test_ignored_parameters_leave_nothing(self) -> None:
        text, params = _mail("<a@b.c> RET=HDRS ENVID=x PRDR", dsn_advertised=False,
                             prdr_enabled=False)
        self.assertEqual((text, params), ("<a@b.c>", MailParams()))

    def test_auth_occurrences(self) -> None:
        # The leftmost AUTH= is read last and wins; "<>" never replaces a value.
        self.assertEqual(_mail("<a@b.c> AUTH=c@d AUTH=a@b")[1].auth, "c@d")
        self.assertEqual(_mail("<a@b.c> AUTH=<> AUTH=a@b")[1].auth, "a@b")
        self.assertEqual(_mail("<a@b.c> AUTH=a@b AUTH=<>")[1].auth, "a@b")
        self.assertEqual(_mail("<a@b.c> AUTH=<>")[1].auth, "<>")
        self.assertEqual(_mail("<a@b.c> AUTH=x+00y")[1].auth, "x")
        self.assertEqual(_mail("<a@b.c> AUTH=a+2bb")[1].auth, "a+b")
        self.assertEqual(_mail("<a@b.c> AUTH=x+3D")[1].auth, "x=")

    def test_address_text_keeps_what_exim_keeps(self) -> None:
        self.assertEqual(_mail("  <a@b.c>\tSIZE=5  ")[0], "<a@b.c>")
        # A failed SIZE= ends parsing before the next trim of trailing blanks.
        self.assertEqual(_mail_text_on_error("<a@b.c> FOO=BAR  SIZE=abc"), "<a@b.c> FOO=BAR ")
        self.assertEqual(_mail_text_on_error("<a@b.c>\tFOO=BAR"), "<a@b.c> FOO=BAR")

    def test_error_carries_params_read_so_far(self) -> None:
        with self.assertRaises(SmtpError) as cm:
            _mail("<a@b.c> BODY=9BIT SMTPUTF8")
        self.assertTrue(cm.exception.params is not None and cm.exception.params.smtputf8)


def _mail_text_on_error(arg: str) -> str:
    """The operand text quoted in a malformed-address reply."""
    try:
        _mail(arg)
    except SmtpError as e:
        return e.text.split(": malformed address", 1)[0]
    raise AssertionError("no error")


class RcptValues(unittest.TestCase):
    """NOTIFY and ORCPT values (NEVER and the flags seen in the spool)."""

    def test_notify(self) -> None:
        self.assertEqual(_rcpt("<a@b.c> NOTIFY=success,delay,")[1].notify,
                         frozenset({"SUCCESS", "DELAY"}))
        self.assertEqual(_rcpt("<a@b.c> NOTIFY=Never")[1].notify, frozenset({"NEVER"}))
        self.assertEqual(_rcpt("<a@b.c> NOTIFY=")[1].notify, None)
        self.assertEqual(_rcpt("<a@b.c> NOTIFY=FAILURE NOTIFY=")[1].notify,
                         frozenset({"FAILURE"}))

    def test_orcpt_verbatim(self) -> None:
        self.assertEqual(_rcpt("<a@b.c> ORCPT=rfc822;A+2Bb@c")[1],
                         RcptParams(orcpt="rfc822;A+2Bb@c"))
        self.assertEqual(_rcpt("<a@b.c> ORCPT")[1].orcpt, "ORCPT")
        self.assertEqual(_rcpt("<a@b.c> ORCPT=")[1].orcpt, "")

    def test_without_dsn_nothing_is_taken(self) -> None:
        self.assertEqual(_rcpt("<a@b.c> NOTIFY=NEVER", dsn=False),
                         ("<a@b.c> NOTIFY=NEVER", RcptParams()))


def _address(text: str, sender: bool, unqualified: bool = False, utf8: bool = False) -> str:
    return parse_envelope_address(text, is_sender=sender, qualify_domain="q.example",
                                  allow_unqualified=unqualified, utf8_domains=utf8)


class EnvelopeAddresses(unittest.TestCase):
    """The address kept; qualification as seen in $sender_address and
    $local_part@$domain with sender/recipient_unqualified_hosts = *."""

    def test_forms(self) -> None:
        self.assertEqual(_address("<>", True), "")
        self.assertEqual(_address("< >", True), "")
        self.assertEqual(_address("<@x,@y:a@b.c>", False), "a@b.c")
        self.assertEqual(_address("@x:a@b.c", False), "a@b.c")
        self.assertEqual(_address('<"a b"@c.d>', False), '"a b"@c.d')
        self.assertEqual(_address("Name=<a@b.c>", False), "a@b.c")
        self.assertEqual(_address("a@[1.2.3.4]", False), "a@[1.2.3.4]")
        self.assertEqual(_address(f"<a@{U_DOMAIN}.c>", True, utf8=True), f"a@{U_DOMAIN}.c")

    def test_qualification(self) -> None:
        self.assertEqual(_address("<lp>", True, unqualified=True), "lp@q.example")
        self.assertEqual(_address("<lp2>", False, unqualified=True), "lp2@q.example")
        self.assertEqual(_address("<PostMaster>", False), "PostMaster@q.example")
        self.assertEqual(_address('<"postmaster">', False, unqualified=True),
                         '"postmaster"@q.example')
        self.assertEqual(_address("<>", True, unqualified=True), "")

    def test_refusals_are_not_syntax_errors(self) -> None:
        for text, sender, reply in [
            ("<lp>", True, "<lp>: sender address must contain a domain"),
            ("<postmaster>", True, "<postmaster>: sender address must contain a domain"),
            ("<lp>", False, "<lp>: recipient address must contain a domain"),
        ]:
            with self.assertRaises(SmtpError) as cm:
                _address(text, sender)
            self.assertEqual((cm.exception.code, cm.exception.text, cm.exception.syntax),
                             (501, reply, False))

    def test_bad_syntax(self) -> None:
        with self.assertRaises(SmtpError) as cm:
            _address("<bad", True)
        self.assertEqual(str(cm.exception), '501 <bad: "@" or "." expected after "bad"')
        self.assertTrue(cm.exception.syntax)


class Xtext(unittest.TestCase):
    """auth_xtextdecode() and auth_xtextencode()."""

    def test_decode(self) -> None:
        self.assertEqual(xtext_decode("a+40b+2Bc+2bd"), "a@b+c+d")
        self.assertEqual(xtext_decode("\x7f"), "\x7f")
        self.assertEqual(xtext_decode(""), "")
        for bad in ("a+4", "a+zz", "a+", "a=b", "a b", "\x80", "\x1f"):
            self.assertIsNone(xtext_decode(bad), bad)

    def test_encode(self) -> None:
        self.assertEqual(xtext_encode("a+b=c d\x7f\xe9"), "a+2bb+3dc+20d\x7f+e9")
        self.assertEqual(xtext_decode(xtext_encode("x+y=\x00\xff")), "x+y=\x00\xff")


_CONFIG = """primary_hostname = mx.example.com
qualify_domain = example.com
spool_directory = {directory}/spool
log_file_path = {directory}/log/%slog
exim_user = root
exim_group = root
never_users =
smtp_banner = $smtp_active_hostname ESMTP Exim-test
tls_advertise_hosts =
pipelining_connect_advertise_hosts =
smtp_accept_max_nonmail_hosts = :
smtp_max_synprot_errors = {synprot}
{extra}
acl_smtp_rcpt = accept_all
begin acl
accept_all:
  accept
begin routers
accept_all:
  driver = accept
  transport = null_delivery
begin transports
null_delivery:
  driver = appendfile
  file = /dev/null
"""


def _exim_replies(mode: str, commands: list[str], synprot: int = 1000) -> list[list[str]]:
    """The replies (each a list of lines) of real Exim to *commands*, which
    follow the mode's HELO or EHLO, in one -bh session."""
    lines = [_MODES[mode].greet, *commands, "QUIT"]
    with tempfile.TemporaryDirectory(prefix="exim-params-") as directory:
        for sub in ("spool", "log"):
            os.mkdir(os.path.join(directory, sub))
        config = os.path.join(directory, "exim.conf")
        with open(config, "w") as f:
            f.write(_CONFIG.format(directory=directory, synprot=synprot,
                                   extra=_MODES[mode].config))
        result = subprocess.run(
            [EXIM, "-C", config, "-bh", "192.0.2.1"], capture_output=True, timeout=60,
            input=b"".join(line.encode("latin-1") + b"\r\n" for line in lines))
    replies: list[list[str]] = []
    current: list[str] = []
    for raw in result.stdout.split(b"\r\n"):
        line = raw.decode("latin-1").rpartition("\n")[2]
        if line[:3].isdigit():
            current.append(line)
            if line[3:4] != "-":
                replies.append(current)
                current = []
    return replies[2:]  # the banner and the HELO/EHLO reply


class LiveExim(unittest.TestCase):
    """Replays the tables against real Exim (root and exim4 needed)."""

    def setUp(self) -> None:
        require_program(EXIM)
        if os.geteuid() != 0:
            raise unittest.SkipTest("exim4 -bh with a test configuration needs root")

    def test_tables_against_exim(self) -> None:
        problems: list[str] = []
        for mode, steps in _all_sessions():
            replies = _exim_replies(mode, [c for c, _r in steps])[: len(steps)]
            self.assertEqual(len(replies), len(steps), mode)
            problems += _mismatches(mode, steps, [r[-1] for r in replies])
        self.assertEqual(problems, [])

    def test_syntax_counting_against_exim(self) -> None:
        problems = []
        for mode, before, command, counts in SYNTAX_ROWS:
            reply = _exim_replies(mode, [*before, command], synprot=0)[len(before)]
            counted = reply[-1].endswith(" Too many syntax or protocol errors")
            if counted != counts:
                problems.append(f"{command!r}: {reply!r}")
        self.assertEqual(problems, [])
