"""Tests for twisted_mta.smtp.auth: the plaintext server authenticator and
the replies around the AUTH command.

The session table holds replies and log lines recorded from
``exim4 -C CONF -bh 192.0.2.1`` (4.96, Debian heavy build).  Each case is
replayed through a small model of the SMTP command loop built on the
module's API, and, when this machine has exim4 and we are root, through
the real Exim as well, so the table cannot drift from it."""

from __future__ import annotations

import base64
import os
import subprocess
from collections.abc import Coroutine
from dataclasses import dataclass
from typing import Any

import pytest
from twisted.internet.defer import Deferred

from twisted_mta.config import parse_config_text
from twisted_mta.expand.context import ExpansionContext
from twisted_mta.smtp import auth
from twisted_mta.taint import is_tainted

EXIM = "/usr/sbin/exim4"
IP = "192.0.2.1"
VARS_LOG = ("vars id=<$authenticated_id> fail=<$authenticated_fail_id> "
            "by=<$sender_host_authenticated> failed=<$authentication_failed> "
            "a1=<$auth1> one=<$1>")
MAIN = f"""\
primary_hostname = mx.example.com
qualify_domain = example.com
spool_directory = @DIR@/spool
log_file_path = @DIR@/log/%slog
exim_user = root
exim_group = root
never_users =
smtp_banner = $smtp_active_hostname ESMTP Exim-test
tls_advertise_hosts =
pipelining_connect_advertise_hosts =
acl_smtp_rcpt = acl_check_rcpt
@MAIN@

begin acl

acl_check_rcpt:
  warn logwrite = {VARS_LOG}
  accept

begin routers

accept_all:
  driver = accept
  transport = null_delivery

begin transports

null_delivery:
  driver = appendfile
  file = /dev/null

begin authenticators
"""


def b64(text: str) -> str:
    return base64.b64encode(text.encode("latin-1")).decode()


def sync(coro: Coroutine[Any, Any, Any]) -> Any:
    """Run a coroutine that needs no reactor (no network) to completion."""
    results: list[Any] = []
    Deferred.fromCoroutine(coro).addBoth(results.append)
    assert results, "the coroutine waited for I/O"
    if isinstance(results[0], Exception) or hasattr(results[0], "raiseException"):
        results[0].raiseException()
    return results[0]


PLAIN_LOGIN = r"""
PLAIN:
  driver = plaintext
  server_set_id = $auth2
  server_prompts = :
  server_condition = ${if and {{eq{$auth2}{alice}}{eq{$auth3}{secret}}}}

LOGIN:
  driver = plaintext
  server_set_id = $auth1
  server_prompts = <| Username: | Password:
  server_condition = ${if and {{eq{$auth1}{alice}}{eq{$auth2}{secret}}}}
"""

# Shows which data ended up where ($auth4 is left out: see test_auth4).
SHOW = r"""
PLAIN:
  driver = plaintext
  server_set_id = <$auth1|$auth2|$auth3|$1|$2|$3|$4|$5|$0>
  server_condition = no
"""


def plain(condition: str, set_id: str = "$auth2", prompts: str = ":") -> str:
    return (f"\nPLAIN:\n  driver = plaintext\n  server_set_id = {set_id}\n"
            f"  server_prompts = {prompts}\n  server_condition = {condition}\n")


ADVERTISING = r"""
one:
  driver = plaintext
  public_name = x-Foo
  server_condition = yes
  server_advertise_condition = ${if eq{$sender_helo_name}{a}{yes}{no}}
two:
  driver = plaintext
  public_name = plain
  server_condition = yes
  server_advertise_condition = ${if eq{$sender_helo_name}{b}{yes}{${lookup{x}lsearch{/nonexistent}}}}
three:
  driver = plaintext
  public_name = login
  client_send = x
four:
  driver = plaintext
  public_name = other
  server_condition = no
five:
  driver = plaintext
  public_name = l
  server_condition = no
  server_advertise_condition = ${if eq{$sender_helo_name}{c}{yes}fail}
seven:
  driver = plaintext
  server_condition = no
  server_advertise_condition = 00
"""

ALICE = "AUTH PLAIN " + b64("\0alice\0secret")
WRONG = "AUTH PLAIN " + b64("\0alice\0wrong")
BOB = "AUTH PLAIN " + b64("\0bob\0secret")
LOOKUP_FAIL = "failed to open /nonexistent for linear search: No such file or directory"
BADCOND = ('failed to expand condition "${if eq{$sender_helo_name}{b}{yes}'
           '{${lookup{x}lsearch{/nonexistent}}}}" for two authenticator: ' + LOOKUP_FAIL)


def failed(text: str, helo: str = "x", name: str = "PLAIN") -> str:
    return f"{name} authenticator failed for ({helo}) [{IP}]: {text}"


def vars_line(id: str = "", fail: str = "", by: str = "", failed: str = "0") -> str:
    return f"vars id=<{id}> fail=<{fail}> by=<{by}> failed=<{failed}> a1=<> one=<>"


@dataclass
class Case:
    """One -bh session: the authenticators, the client's lines (QUIT is
    added), the replies as L{normalise} writes them, and the log lines."""

    name: str
    authenticators: str
    lines: list[str]
    replies: list[str]
    logs: list[str]
    main: str = ""


CASES = [
    Case("plain-ok-then-again", PLAIN_LOGIN,
         ["EHLO x", ALICE, ALICE, "EHLO y", ALICE, "MAIL FROM:<a@b>", "RCPT TO:<r@example.com>"],
         ["EHLO [AUTH PLAIN LOGIN]", "235 Authentication succeeded",
          "503 already authenticated",
          # AUTH_TLS: an authenticated client is not offered AUTH again.
          "EHLO []", "503 AUTH command used when not advertised",
          "250 OK", "250 Accepted"],
         [vars_line(id="alice", by="PLAIN", failed="1")]),
    Case("before-ehlo-and-after-helo", PLAIN_LOGIN,
         [ALICE, "HELO x", ALICE, "EHLO x", WRONG, "MAIL FROM:<a@b>", "RCPT TO:<r@example.com>"],
         ["503 AUTH command used when not advertised", "HELO",
          "503 AUTH command used when not advertised", "EHLO [AUTH PLAIN LOGIN]",
          "535 Incorrect authentication data", "250 OK", "250 Accepted"],
         [failed("535 Incorrect authentication data (set_id=alice)"),
          # Exim 4.96 stores the log fragment as $authenticated_fail_id.
          vars_line(fail=" (set_id=alice)", failed="1")]),
    Case("mechanism-names", PLAIN_LOGIN,
         ["EHLO x", "AUTH", "AUTH CRAM-MD5", "AUTH  plain   " + b64("\0alice\0secret")],
         ["EHLO [AUTH PLAIN LOGIN]", "504  authentication mechanism not supported",
          "504 CRAM-MD5 authentication mechanism not supported",
          "235 Authentication succeeded"],
         []),
    Case("bad-mechanism-character", PLAIN_LOGIN,
         ["EHLO x", "AUTH PL@IN " + b64("\0alice\0secret"), ALICE],
         ["EHLO [AUTH PLAIN LOGIN]", "501 invalid character in authentication mechanism name",
          "235 Authentication succeeded"],
         []),
    Case("in-transaction", PLAIN_LOGIN,
         ["EHLO x", "MAIL FROM:<a@b>", ALICE, "RCPT TO:<r@example.com>"],
         ["EHLO [AUTH PLAIN LOGIN]", "250 OK", "503 not permitted in mail transaction",
          "250 Accepted"],
         [vars_line(failed="1")]),
    Case("plain-prompted", PLAIN_LOGIN,
         ["EHLO x", "AUTH PLAIN", "", "AUTH PLAIN", "=", "AUTH PLAIN", "*", "AUTH PLAIN", " *",
          "AUTH PLAIN", "  " + b64("\0alice\0secret") + " "],
         ["EHLO [AUTH PLAIN LOGIN]",
          "334 ", "535 Incorrect authentication data",
          "334 ", "501 Invalid base64 data",
          "334 ", "501 Authentication cancelled",
          "334 ", "501 Invalid base64 data",
          "334 ", "235 Authentication succeeded"],
         [failed("535 Incorrect authentication data"),
          failed("501 Invalid base64 data"),
          failed("501 Authentication cancelled"),
          failed("501 Invalid base64 data")]),
    Case("login", PLAIN_LOGIN,
         ["EHLO x", "AUTH LOGIN", b64("alice"), b64("secret"),
          "MAIL FROM:<a@b>", "RCPT TO:<r@example.com>"],
         ["EHLO [AUTH PLAIN LOGIN]", "334 VXNlcm5hbWU6", "334 UGFzc3dvcmQ6",
          "235 Authentication succeeded", "250 OK", "250 Accepted"],
         [vars_line(id="alice", by="LOGIN")]),
    Case("login-failures", PLAIN_LOGIN,
         ["EHLO x", "AUTH LOGIN " + b64("alice"), b64("wrong"), "AUTH LOGIN", b64("alice"), "*",
          "AUTH LOGIN =", "", "AUTH login", "", "", "MAIL FROM:<a@b>", "RCPT TO:<r@example.com>"],
         ["EHLO [AUTH PLAIN LOGIN]",
          "334 UGFzc3dvcmQ6", "535 Incorrect authentication data",
          "334 VXNlcm5hbWU6", "334 UGFzc3dvcmQ6", "501 Authentication cancelled",
          "334 UGFzc3dvcmQ6", "535 Incorrect authentication data",
          "334 VXNlcm5hbWU6", "334 UGFzc3dvcmQ6", "535 Incorrect authentication data",
          "250 OK", "250 Accepted"],
         [failed("535 Incorrect authentication data (set_id=alice)", name="LOGIN"),
          failed("501 Authentication cancelled", name="LOGIN"),
          failed("535 Incorrect authentication data", name="LOGIN"),
          failed("535 Incorrect authentication data", name="LOGIN"),
          vars_line(failed="1")]),
    Case("data-splitting-and-base64", SHOW,
         ["EHLO x", "AUTH PLAIN", "AUTH PLAIN =", "AUTH PLAIN " + b64("a\0b\0c\0d\0e\0"),
          "AUTH PLAIN " + b64("\0"), "AUTH PLAIN YWJj ZGVm", "AUTH PLAIN YQ", "AUTH PLAIN YR==",
          "AUTH PLAIN YQ==YQ==", "AUTH PLAIN YQ=", "AUTH PLAIN Y Q = ="],
         ["EHLO [AUTH PLAIN]"] + ["535 Incorrect authentication data"] * 5
         + ["501 Invalid base64 data", "535 Incorrect authentication data"]
         + ["501 Invalid base64 data"] * 2 + ["535 Incorrect authentication data"],
         [failed("535 Incorrect authentication data (set_id=<||||||||>)"),
          failed("535 Incorrect authentication data (set_id=<||||||||>)"),
          failed("535 Incorrect authentication data (set_id=<a|b|c|a|b|c|d|e|>)"),
          failed("535 Incorrect authentication data (set_id=<||||||||>)"),
          failed("535 Incorrect authentication data (set_id=<abcdef|||abcdef|||||>)"),
          failed("501 Invalid base64 data"),
          failed("535 Incorrect authentication data (set_id=<a|||a|||||>)"),
          failed("501 Invalid base64 data"),
          failed("501 Invalid base64 data"),
          failed("535 Incorrect authentication data (set_id=<a|||a|||||>)")]),
    Case("prompts-skipped-when-answered",
         SHOW.replace("server_condition", "server_prompts = one : two : three\n  server_condition"),
         ["EHLO x", "AUTH PLAIN", b64("a\0b"), b64("c"), "AUTH PLAIN " + b64("a"), b64("b"),
          b64("c"), "AUTH PLAIN " + b64("a\0b\0c\0d")],
         ["EHLO [AUTH PLAIN]", "334 b25l", "334 dGhyZWU=", "535 Incorrect authentication data",
          "334 dHdv", "334 dGhyZWU=", "535 Incorrect authentication data",
          "535 Incorrect authentication data"],
         [failed("535 Incorrect authentication data (set_id=<a|b|c|a|b|c|||>)")] * 2
         + [failed("535 Incorrect authentication data (set_id=<a|b|c|a|b|c|d||>)")]),
    Case("prompts-expanded", SHOW.replace(
        "server_condition", "server_prompts = <$auth1>:<$1>\n  server_condition"),
         ["EHLO x", "AUTH PLAIN", b64("a")],
         ["EHLO [AUTH PLAIN]", "334 Ojw=", "535 Incorrect authentication data"],
         [failed("535 Incorrect authentication data (set_id=<a|||a|||||>)")]),
    Case("prompts-forced-failure", plain("yes", prompts="${if eq{1}{2}{A:B}fail}"),
         ["EHLO x", "AUTH PLAIN"],
         ["EHLO [AUTH PLAIN]", "435 Unable to authenticate at present"],
         [failed('435 Unable to authenticate at present: "if" failed and "fail" requested')]),
    Case("prompts-lookup-failure", plain("yes", prompts="${lookup{x}lsearch{/nonexistent}}"),
         ["EHLO x", "AUTH PLAIN"],
         ["EHLO [AUTH PLAIN]", "435 Unable to authenticate at present"],
         [failed("435 Unable to authenticate at present: " + LOOKUP_FAIL)]),
    Case("condition-true-values", plain("${if eq{$auth3}{a}{1}{${if eq{$auth3}{b}{TRUE}{YeS}}}}"),
         ["EHLO x", "AUTH PLAIN " + b64("\0u\0a"), "EHLO x", "AUTH PLAIN " + b64("\0u\0a"),
          "EHLO x", "AUTH PLAIN " + b64("\0u\0b"), "EHLO x", "AUTH PLAIN " + b64("\0u\0c")],
         ["EHLO [AUTH PLAIN]", "235 Authentication succeeded", "EHLO []",
          "503 AUTH command used when not advertised", "EHLO []",
          "503 AUTH command used when not advertised", "EHLO []",
          "503 AUTH command used when not advertised"],
         []),
    Case("condition-false-values",
         plain("${if eq{$auth3}{a}{0}{${if eq{$auth3}{b}{FALSE}{${if eq{$auth3}{c}{nO}{}}}}}}"),
         ["EHLO x"] + ["AUTH PLAIN " + b64(f"\0u\0{p}") for p in "abcd"],
         ["EHLO [AUTH PLAIN]"] + ["535 Incorrect authentication data"] * 4,
         [failed("535 Incorrect authentication data (set_id=u)")] * 4),
    Case("condition-forced-failure", plain("${if eq{$auth2}{alice}{$auth2}fail}"),
         ["EHLO x", ALICE, BOB],
         ["EHLO [AUTH PLAIN]", "435 Unable to authenticate at present: alice",
          "535 Incorrect authentication data"],
         [failed("435 Unable to authenticate at present (set_id=alice): alice"),
          failed("535 Incorrect authentication data (set_id=bob)")]),
    Case("condition-other-values", plain("${if eq{$auth3}{a}{ yes}{00}}"),
         ["EHLO x", "AUTH PLAIN " + b64("\0u\0a"), "AUTH PLAIN " + b64("\0u\0b"),
          "MAIL FROM:<a@b>", "RCPT TO:<r@example.com>"],
         ["EHLO [AUTH PLAIN]", "435 Unable to authenticate at present:  yes",
          "435 Unable to authenticate at present: 00", "250 OK", "250 Accepted"],
         [failed("435 Unable to authenticate at present (set_id=u):  yes"),
          failed("435 Unable to authenticate at present (set_id=u): 00"),
          vars_line(fail=" (set_id=u)", failed="1")]),
    Case("defer-text-sticks", plain(
        "${if eq{$auth2}{alice}{maybe}{${lookup{x}lsearch{/nonexistent}}}}"),
         ["EHLO x", BOB, ALICE, BOB, "RSET", "EHLO y", BOB],
         ["EHLO [AUTH PLAIN]", "435 Unable to authenticate at present",
          "435 Unable to authenticate at present: maybe",
          "435 Unable to authenticate at present: maybe", "250 Reset OK", "EHLO [AUTH PLAIN]",
          "435 Unable to authenticate at present: maybe"],
         [failed("435 Unable to authenticate at present (set_id=bob): " + LOOKUP_FAIL),
          failed("435 Unable to authenticate at present (set_id=alice): maybe"),
          failed("435 Unable to authenticate at present (set_id=bob): " + LOOKUP_FAIL),
          failed("435 Unable to authenticate at present (set_id=bob): " + LOOKUP_FAIL,
                 helo="y")]),
    Case("set-id-fails-after-success", plain("yes", set_id="${lookup{x}lsearch{/nonexistent}}"),
         ["EHLO x", ALICE, "MAIL FROM:<a@b>", "RCPT TO:<r@example.com>"],
         ["EHLO [AUTH PLAIN]", "435 Unable to authenticate at present", "250 OK",
          "250 Accepted"],
         [vars_line(failed="1")]),
    Case("set-id-forced-failure", plain("no", set_id="${if eq{$auth2}{alice}{$auth2}fail}"),
         ["EHLO x", BOB, "MAIL FROM:<a@b>", "RCPT TO:<r@example.com>"],
         ["EHLO [AUTH PLAIN]", "535 Incorrect authentication data", "250 OK", "250 Accepted"],
         [failed("535 Incorrect authentication data"), vars_line(failed="1")]),
    Case("set-id-empty", plain("yes", set_id='""'),
         ["EHLO x", ALICE, "MAIL FROM:<a@b>", "RCPT TO:<r@example.com>"],
         ["EHLO [AUTH PLAIN]", "235 Authentication succeeded", "250 OK", "250 Accepted"],
         [vars_line(by="PLAIN")]),
    Case("set-id-printing", plain("${if eq{$auth3}{ok}}", set_id=r'"a\tb\x01\xe9\x7f\\\\c"'),
         ["EHLO x", WRONG, "AUTH PLAIN " + b64("\0u\0ok"), "MAIL FROM:<a@b>",
          "RCPT TO:<r@example.com>"],
         ["EHLO [AUTH PLAIN]", "535 Incorrect authentication data",
          "235 Authentication succeeded", "250 OK", "250 Accepted"],
         [failed("535 Incorrect authentication data (set_id=a\tb\\001\\351\\177\\c)"),
          # Success clears $authenticated_fail_id.
          vars_line(id="a\tb\\001\\351\\177\\c", by="PLAIN")]),
    Case("advertise-conditions", ADVERTISING,
         ["EHLO a", "AUTH X-FOO =", "AUTH PLAIN ="],
         ["EHLO [AUTH X-FOO OTHER SEVEN]", "235 Authentication succeeded",
          "503 already authenticated"],
         [BADCOND]),
    Case("advertise-conditions-2", ADVERTISING,
         ["EHLO b", "AUTH LOGIN =", "AUTH plain ="],
         ["EHLO [AUTH PLAIN OTHER SEVEN]",
          "504 LOGIN authentication mechanism not supported", "235 Authentication succeeded"],
         []),
    Case("advertise-conditions-3", ADVERTISING,
         ["EHLO a", "EHLO c", "AUTH x-foo", "AUTH L =", "HELO a", "AUTH x-foo"],
         ["EHLO [AUTH X-FOO OTHER SEVEN]", "EHLO [AUTH OTHER L SEVEN]",
          "504 x-foo authentication mechanism not supported",
          "535 Incorrect authentication data", "HELO",
          "503 AUTH command used when not advertised"],
         [BADCOND, BADCOND, failed("535 Incorrect authentication data", helo="c", name="five")]),
    Case("not-advertised-to-host", PLAIN_LOGIN, ["EHLO x", ALICE],
         ["EHLO []", "503 AUTH command used when not advertised"], [],
         main="auth_advertise_hosts = 192.0.2.8/30"),
    Case("advertised-to-host", PLAIN_LOGIN, ["EHLO x", ALICE],
         ["EHLO [AUTH PLAIN LOGIN]", "235 Authentication succeeded"], [],
         main="auth_advertise_hosts = 192.0.2.0/31"),
    Case("mail-auth-condition", plain(
        "yes", set_id="$auth2") + "  server_mail_auth_condition = "
        "${if eq{$authenticated_sender}{ok@b}{yes}{no}}\n",
         ["EHLO x", "MAIL FROM:<a@b> AUTH=ok@b", "RSET", ALICE, "MAIL FROM:<a@b> AUTH=ok@b",
          "RSET", "MAIL FROM:<a@b> AUTH=bad+40b", "RSET", "MAIL FROM:<a@b> AUTH=<>"],
         ["EHLO [AUTH PLAIN]", "250 OK", "250 Reset OK", "235 Authentication succeeded",
          "250 OK", "250 Reset OK", "250 OK", "250 Reset OK", "250 OK"],
         [f"ignoring AUTH=ok@b from H=(x) [{IP}] (client not authenticated)",
          f'ignoring AUTH=bad+40b from H=(x) [{IP}] (server_mail_auth_condition failed: '
          'authenticated ID="alice")']),
]


def configuration(case: Case, directory: str) -> str:
    return MAIN.replace("@DIR@", directory).replace("@MAIN@", case.main) + case.authenticators


def normalise(stdout: str) -> list[str]:
    """Exim's replies, with the banner and QUIT's reply dropped and each
    greeting reduced to ``HELO`` or ``EHLO [<its AUTH keyword>]``."""
    out: list[str] = []
    ehlo: list[str] | None = None
    for line in stdout.split("\r\n"):
        if not line[:3].isdigit() or line.startswith(("220 ", "221 ")):
            continue
        if ehlo is not None:
            if line[4:].startswith("AUTH "):
                ehlo.append(line[4:])
            if line[3] == " ":
                out.append(f"EHLO [{' '.join(ehlo)}]")
                ehlo = None
        elif line.startswith("250-mx.example.com Hello"):
            ehlo = []
        elif line.startswith("250 mx.example.com Hello"):
            out.append("HELO")
        else:
            out.append(line)
    return out


def exim_logs(stderr: str) -> list[str]:
    keep = ("authenticator failed for", "failed to expand condition", "vars ", "ignoring AUTH")
    return [line[5:] for line in stderr.splitlines()
            if line.startswith("LOG: ") and any(k in line for k in keep)]


class Session:
    """The AUTH-related part of Exim's command loop, built on the module
    the way the ESMTP server is expected to use it."""

    def __init__(self, case: Case) -> None:
        config = parse_config_text(configuration(case, "/nonexistent"))
        self.ctx = ExpansionContext(config=config, variables={
            "sender_host_address": IP, "sender_fullhost": f"[{IP}]",
            "authentication_failed": "0"})
        self.auths = auth.server_authenticators(config)
        self.advertised: list[str] = []
        self.authenticated_by: auth.ServerAuthenticator | None = None
        self.in_mail = False
        self.defer_user_msg = ""
        self.replies: list[str] = []
        self.logs: list[str] = []
        self.pending: list[str] = []

    def reply(self, code: int, text: str) -> None:
        self.replies.append(f"{code} {text}")

    async def run(self, lines: list[str]) -> None:
        self.pending = list(lines)
        while self.pending:
            line = self.pending.pop(0)
            verb, _, arg = line.partition(" ")
            await getattr(self, "cmd_" + verb.lower())(arg)

    async def greet(self, helo: str) -> None:
        self.ctx.variables["sender_helo_name"] = helo
        self.ctx.variables["sender_fullhost"] = f"({helo}) [{IP}]"
        self.in_mail = False

    async def cmd_helo(self, arg: str) -> None:
        await self.greet(arg)
        self.advertised = []
        self.replies.append("HELO")

    async def cmd_ehlo(self, arg: str) -> None:
        await self.greet(arg)
        self.advertised = []
        hosts = self.ctx.main_option("auth_advertise_hosts")
        if self.auths and await self.host_in(hosts):
            self.advertised = await auth.advertised_mechanisms(
                self.auths, self.ctx, authenticated=self.authenticated_by is not None,
                log=self.logs.append)
        self.replies.append(f"EHLO [{auth.ehlo_auth_keyword(self.advertised) or ''}]")

    async def host_in(self, hosts: str) -> bool:
        from twisted_mta.lists import match_list

        return await match_list(IP, hosts, "host", self.ctx) is not None

    async def cmd_auth(self, arg: str) -> None:
        self.ctx.variables["authentication_failed"] = "1"
        refusal = auth.auth_command_refusal(
            advertised=bool(self.advertised), authenticated=self.authenticated_by is not None,
            in_transaction=self.in_mail)
        if refusal:
            return self.reply(*refusal)
        parsed = auth.parse_auth_argument(arg)
        if parsed is None:
            return self.reply(*auth.BAD_MECHANISM_NAME)
        mechanism, data = parsed
        found = auth.find_authenticator(self.auths, mechanism, self.advertised)
        if found is None:
            return self.reply(*auth.unsupported_mechanism(mechanism))

        async def ask(prompt: str) -> str:
            self.replies.append("334 " + auth.b64encode(prompt))
            return self.pending.pop(0) + "\r"

        outcome = await found.authenticate(data, ask, self.ctx,
                                           defer_user_msg=self.defer_user_msg)
        self.defer_user_msg = outcome.defer_user_msg
        self.reply(*outcome.reply)
        if outcome.log:
            self.logs.append(outcome.log)
        for name, value in outcome.variable_updates().items():
            if value is None:
                self.ctx.variables.pop(name, None)
            else:
                self.ctx.variables[name] = value
        if outcome.result == "ok":
            self.authenticated_by = found

    async def cmd_mail(self, arg: str) -> None:
        _, _, value = arg.partition(" AUTH=")
        self.ctx.variables.pop("authenticated_sender", None)
        if value and value != "<>":
            sender = auth.xtext_decode(value)
            assert sender is not None
            self.ctx.variables["authenticated_sender"] = sender
            reason = None
            if self.authenticated_by is None:
                reason = "client not authenticated"
            elif not await auth.mail_auth_condition_passes(self.authenticated_by, self.ctx,
                                                           self.logs.append):
                reason = auth.mail_auth_condition_reason(
                    self.ctx.variables.get("authenticated_id"))
            if reason:
                self.ctx.variables.pop("authenticated_sender")
                host = "H=" + self.ctx.variables["sender_fullhost"]
                self.logs.append(auth.mail_auth_ignored_log(value, host, reason))
        self.in_mail = True
        self.reply(250, "OK")

    async def cmd_rcpt(self, arg: str) -> None:
        self.logs.append(await self.ctx.expand(VARS_LOG))
        self.reply(250, "Accepted")

    async def cmd_rset(self, arg: str) -> None:
        self.in_mail = False
        self.reply(250, "Reset OK")


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_session(case: Case) -> None:
    session = Session(case)
    sync(session.run(case.lines))
    assert session.replies == case.replies
    assert session.logs == case.logs


def _have_exim() -> bool:
    return os.path.exists(EXIM) and os.geteuid() == 0


@pytest.mark.skipif(not _have_exim(), reason="needs exim4 and root")
@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_session_against_exim(case: Case, tmp_path: Any) -> None:
    """The table is what exim4 -bh really says."""
    for sub in ("spool", "log"):
        (tmp_path / sub).mkdir()
    conf = tmp_path / "exim.conf"
    conf.write_text(configuration(case, str(tmp_path)), encoding="latin-1")
    data = "".join(line + "\r\n" for line in case.lines + ["QUIT"]).encode("latin-1")
    proc = subprocess.run([EXIM, "-C", str(conf), "-bh", IP], input=data,
                          capture_output=True, timeout=60, check=False)
    assert normalise(proc.stdout.decode("latin-1")) == case.replies
    assert exim_logs(proc.stderr.decode("latin-1")) == case.logs


# ---- the authenticator on its own, with a scripted client ----

def _authenticator(text: str, index: int = 0) -> tuple[auth.PlaintextAuthenticator, Any]:
    config = parse_config_text("begin authenticators\n" + text)
    return auth.server_authenticators(config)[index], config


class Client:
    """Answers challenges from a script and remembers them."""

    def __init__(self, *answers: str) -> None:
        self.answers = list(answers)
        self.prompts: list[str] = []

    async def __call__(self, prompt: str) -> str:
        self.prompts.append(prompt)
        return self.answers.pop(0)


def authenticate(text: str, initial: str | None, *answers: str,
                 **kwargs: Any) -> tuple[auth.AuthOutcome, Client, ExpansionContext]:
    authenticator, config = _authenticator(text)
    ctx = ExpansionContext(config=config, variables={"sender_fullhost": "(h) [10.0.0.1]",
                                                     "auth1": "outer"})
    client = Client(*answers)
    outcome = sync(authenticator.authenticate(initial, client, ctx, **kwargs))
    return outcome, client, ctx


LOGIN_ONLY = r"""
LOGIN:
  driver = plaintext
  server_set_id = $auth1
  server_prompts = User:: : Pass::
  server_condition = ${if and {{eq{$auth1}{alice}}{eq{$auth2}{secret}}}}
"""


def test_login_exchange() -> None:
    outcome, client, ctx = authenticate(LOGIN_ONLY, None, b64("alice") + "\r\n", b64("secret"))
    assert client.prompts == ["User:", "Pass:"]  # a doubled colon is a literal one
    assert outcome.result == "ok"
    assert outcome.reply == (235, "Authentication succeeded")
    assert outcome.authenticated_id == "alice"
    assert outcome.auth_vars == ["alice", "secret"]
    assert outcome.log is None
    assert outcome.variable_updates() == {
        "sender_host_authenticated": "LOGIN", "authentication_failed": "0",
        "authenticated_fail_id": None, "authenticated_id": "alice"}
    # The session's own $auth1 is back; the new ones were only for the exchange.
    assert ctx.variables["auth1"] == "outer" and "auth2" not in ctx.variables


def test_plain_initial_response_is_tainted_data() -> None:
    outcome, client, _ = authenticate(PLAIN_LOGIN, b64("\0alice\0secret"))
    assert client.prompts == []
    assert outcome.result == "ok" and outcome.public_name == "PLAIN"
    assert outcome.numeric == ["", "alice", "secret"]
    assert all(is_tainted(v) for v in outcome.auth_vars)
    assert is_tainted(outcome.authenticated_id)


def test_failure_outcome() -> None:
    outcome, _, _ = authenticate(PLAIN_LOGIN, b64("\0alice\0bad"), host_ident="H")
    assert outcome.result == "fail"
    assert outcome.reply == (535, "Incorrect authentication data")
    assert outcome.set_id == "alice"
    assert outcome.fail_id == " (set_id=alice)"
    assert outcome.log == "PLAIN authenticator failed for H: 535 Incorrect authentication data " \
                          "(set_id=alice)"
    assert outcome.variable_updates() == {"authentication_failed": "1",
                                          "authenticated_fail_id": " (set_id=alice)"}


def test_log_host_from_context() -> None:
    outcome, _, _ = authenticate(PLAIN_LOGIN, "!")
    assert outcome.result == "bad64"
    assert outcome.log == "PLAIN authenticator failed for (h) [10.0.0.1]: 501 Invalid base64 data"
    assert outcome.fail_id is None


def test_cancel_and_line_endings() -> None:
    outcome, client, _ = authenticate(PLAIN_LOGIN, None, "*\r\n")
    assert client.prompts == [""]
    assert outcome.result == "cancelled" and outcome.reply == (501, "Authentication cancelled")
    outcome, _, _ = authenticate(PLAIN_LOGIN, None, "*\r\r\n")
    assert outcome.result == "bad64"  # only one CR is taken off


def test_overlong_answer() -> None:
    quads = "QUFB" * 4095
    outcome, _, _ = authenticate(SHOW.replace("server_condition", "server_prompts = :\n"
                                              "  server_condition"), None, quads + "  \r\n")
    assert outcome.result == "fail"
    outcome, _, _ = authenticate(SHOW.replace("server_condition", "server_prompts = :\n"
                                              "  server_condition"), None, quads + "   \r\n")
    assert outcome.result == "bad64"


def test_defer_user_message_carried_in() -> None:
    outcome, _, _ = authenticate(plain("${lookup{x}lsearch{/nonexistent}}"), "=",
                                 defer_user_msg=": earlier")
    assert outcome.reply == (435, "Unable to authenticate at present: earlier")
    assert outcome.defer_user_msg == ": earlier"
    outcome, _, _ = authenticate(plain("later"), "=", defer_user_msg=": earlier")
    assert outcome.reply == (435, "Unable to authenticate at present: later")
    assert outcome.defer_user_msg == ": later"


def test_at_most_twenty_items() -> None:
    outcome, _, _ = authenticate(SHOW, b64("\0".join(str(i) for i in range(1, 26))))
    assert outcome.numeric == [str(i) for i in range(1, 21)]
    assert outcome.auth_vars == ["1", "2", "3", "4"]


def test_auth4() -> None:
    outcome, _, _ = authenticate(plain("yes", set_id="$auth4"), b64("a\0b\0c\0d"))
    assert outcome.authenticated_id == "d"


def test_server_authenticators() -> None:
    config = parse_config_text("begin authenticators\n" + ADVERTISING + r"""
eight:
  driver = plaintext
  server_condition =
nine:
  driver = cram_md5
  server_secret = x
""")
    names = [a.name for a in auth.server_authenticators(config)]
    assert names == ["one", "two", "four", "five", "seven", "eight"]


def test_advertised_when_authenticated() -> None:
    authenticator, config = _authenticator(PLAIN_LOGIN)
    ctx = ExpansionContext(config=config)
    assert sync(auth.advertised_mechanisms([authenticator], ctx)) == ["PLAIN"]
    assert sync(auth.advertised_mechanisms([authenticator], ctx, authenticated=True)) == []
    assert auth.ehlo_auth_keyword([]) is None


def test_find_authenticator() -> None:
    config = parse_config_text("begin authenticators\n" + PLAIN_LOGIN)
    auths = auth.server_authenticators(config)
    assert auth.find_authenticator(auths, "login", ["PLAIN", "LOGIN"]) is auths[1]
    assert auth.find_authenticator(auths, "login", ["PLAIN"]) is None
    assert auth.find_authenticator(auths, "LoGiN", None) is auths[1]  # allow_auth_unadvertised


@pytest.mark.parametrize("kwargs, expected", [
    ({"advertised": False, "authenticated": True, "in_transaction": True},
     (503, "AUTH command used when not advertised")),
    ({"advertised": False, "authenticated": True, "in_transaction": True,
      "allow_unadvertised": True}, (503, "already authenticated")),
    ({"advertised": True, "authenticated": False, "in_transaction": True},
     (503, "not permitted in mail transaction")),
    ({"advertised": True, "authenticated": False, "in_transaction": False}, None),
])
def test_refusals(kwargs: dict[str, bool], expected: tuple[int, str] | None) -> None:
    assert auth.auth_command_refusal(**kwargs) == expected


@pytest.mark.parametrize("argument, expected", [
    ("PLAIN", ("PLAIN", "")),
    ("  x-y_z9   data  more", ("x-y_z9", "data  more")),
    ("", ("", "")),
    ("PL@IN", None),
    ("PLAIN\tAAA", ("PLAIN", "AAA")),
    ("PLAIN\xe9", None),
])
def test_parse_auth_argument(argument: str, expected: tuple[str, str] | None) -> None:
    assert auth.parse_auth_argument(argument) == expected


@pytest.mark.parametrize("text, expected", [
    ("", ""), ("YQ==", "a"), ("YWI=", "ab"), ("YWJj", "abc"), ("YR==", "a"),
    (" Y\tW\nJ j ", "abc"), ("AGFsaWNlAHNlY3JldA==", "\0alice\0secret"), ("/w==", "\xff"),
    ("YQ", None), ("YWJ", None), ("Y", None), ("YQ=", None), ("YQ==YQ==", None),
    ("YQ== x", None), ("YW=j", None), ("=", None), ("YQ-=", None), ("Y\xe9==", None),
])
def test_b64decode(text: str, expected: str | None) -> None:
    assert auth.b64decode(text) == expected


@pytest.mark.parametrize("text, expected", [
    ("a@b", "a@b"), ("a+2Bb+3dc", "a+b=c"), ("x=y", None), ("a b", None), ("a+4", None),
    ("a+4g", None), ("\x7f", "\x7f"), ("\xe9", None),
])
def test_xtext_decode(text: str, expected: str | None) -> None:
    assert auth.xtext_decode(text) == expected


def test_string_printing() -> None:
    assert auth.string_printing("a\tb\n\x01\x7f\xe9\\") == "a\tb\\n\\001\\177\\351\\"
    assert auth.string_printing("\xe9", topbitchars=True) == "\xe9"


def test_mail_auth_helpers() -> None:
    assert auth.mail_auth_condition_reason(None) == "server_mail_auth_condition failed"
    assert sync(auth.mail_auth_condition_passes(None, ExpansionContext())) is True
