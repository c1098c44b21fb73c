"""The state of one SMTP connection and what its ACLs see of it.

L{SmtpAclSession} is the L{AclSession} the ESMTP server hands to the ACL
engine: the host, the controls, the headers ACLs add or remove, delays,
verification, dnslists and ratelimit.
"""

from __future__ import annotations

import socket
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from twisted_mta.acl.engine import DEFER, ERROR, FAIL, OK, AclSession
from twisted_mta.acl.where import where_name
from twisted_mta.dns import DnsError
from twisted_mta.lists import parse_ip
from twisted_mta.lists.hosts import forward_addresses
from twisted_mta.values import parse_time, split_list, take_list_items

if TYPE_CHECKING:
    from twisted_mta.smtp.server import ESMTPServer

CONTROLS = frozenset((
    "allow_auth_unadvertised", "caseful_local_part", "caselower_local_part",
    "cutthrough_delivery", "debug", "dkim_disable_verify", "dmarc_disable_verify",
    "dscp", "enforce_sync", "no_enforce_sync", "fakedefer", "fakereject", "freeze",
    "no_delay_flush", "no_callout_flush", "no_mbox_unspool", "no_multiline_responses",
    "no_pipelining", "queue", "queue_only", "submission", "suppress_local_fixups",
    "utf8_downconvert", "wellknown",
))


@dataclass
class Recipient:
    """An accepted recipient with its DSN parameters."""

    address: str
    notify: frozenset[str] | None = None
    orcpt: str | None = None


@dataclass
class Transaction:
    """What MAIL, RCPT and the ACLs collect for one message."""

    sender: str | None = None
    sender_param: str = ""
    recipients: list[Recipient] = field(default_factory=list)
    size: int | None = None
    body_type: str | None = None
    dsn_ret: str | None = None
    dsn_envid: str | None = None
    prdr: bool = False
    smtputf8: bool = False
    auth_sender: str | None = None
    controls: dict[str, str] = field(default_factory=dict)
    add_headers: list[str] = field(default_factory=list)
    remove_headers: list[str] = field(default_factory=list)
    discarded: bool = False
    #: A recipient was discarded by the RCPT ACL: DATA is still accepted.
    rcpt_discarded: bool = False
    too_many: bool = False
    rcpt_count: int = 0
    rcpt_fail_count: int = 0
    rcpt_defer_count: int = 0
    first_rcpt_reply: str | None = None
    rcpt_replies_same: bool = True
    warnings_logged: set[str] = field(default_factory=set)
    ratelimit_state: dict = field(default_factory=dict)


class SmtpAclSession(AclSession):
    """The ACL view of an ESMTP server connection."""

    def __init__(self, server: ESMTPServer) -> None:
        super().__init__(server.ctx)
        self.server = server
        self.where = ""
        # The part the MIME ACL is looking at (twisted_mta.smtp.mime).
        self.mime_part: Any = None

    @property
    def host_checking(self) -> bool:  # type: ignore[override]
        return self.server.host_checking

    @property
    def host_identity(self) -> Any:
        return self.server.host_identity

    def trace(self, text: str) -> None:
        self.server.trace(text)

    def log(self, text: str, targets: Iterable[str] = ("main",)) -> None:
        self.server.log_write(text, tuple(targets))

    def warn_context(self) -> str:
        return self.server.host_and_ident(True)

    async def condition(self, name: str, value: str) -> tuple[str, str | None, str | None]:
        handler = getattr(self, f"_cond_{name}", None)
        if handler is None:
            return ERROR, None, f'ACL condition "{name}" is not supported'
        return await handler(value)

    async def _cond_verify(self, value: str) -> tuple[str, str | None, str | None]:
        from twisted_mta.smtp.verify import verify_condition

        return await verify_condition(self, value)

    async def _cond_decode(self, value: str) -> tuple[str, str | None, str | None]:
        from twisted_mta.smtp.mime import decode_condition

        return await decode_condition(self, value)

    async def _cond_mime_regex(self, value: str) -> tuple[str, str | None, str | None]:
        from twisted_mta.smtp.mime import mime_regex_condition

        return await mime_regex_condition(self, value)

    async def _cond_dnslists(self, value: str) -> tuple[str, str | None, str | None]:
        from twisted_mta.acl.dnslists import check_dnslists

        server = self.server
        outcome = await check_dnslists(value, server.vars.get("sender_host_address", ""),
                                       server.resolver, cache=server.dnslist_cache,
                                       where=self.where, clock=server.clock.seconds)
        for line in outcome.log:
            if not line.selector or line.selector in server.selector():
                server.log_write(line.text, tuple(line.targets))
        for name in ("domain", "matched", "text", "value"):
            found = getattr(outcome, name)
            if found is not None:
                server.vars[f"dnslist_{name}"] = found
        if outcome.result == "error":
            return ERROR, None, outcome.error
        if outcome.result == "defer":
            return DEFER, None, None
        return (OK if outcome.result == "match" else FAIL), None, None

    async def _cond_ratelimit(self, value: str) -> tuple[str, str | None, str | None]:
        from twisted_mta.acl.ratelimit import check_ratelimit

        server = self.server
        txn = server.transaction
        outcome = check_ratelimit(
            value, where=self.where,
            default_key=server.vars.get("sender_host_address", ""),
            now=server.clock.seconds(), store=server.ratelimit_store,
            per_conn_state=server.ratelimit_conn_state,
            per_mail_state=txn.ratelimit_state, per_cmd_state=server.ratelimit_cmd_state,
            message_size=txn.size, recipients_count=len(txn.recipients),
            recipient=(f"{server.vars.get('local_part', '')}@{server.vars.get('domain', '')}"
                       if self.where == "rcpt" else None))
        for name in ("sender_rate", "sender_rate_limit", "sender_rate_period"):
            found = getattr(outcome, name)
            if found is not None:
                server.vars[name] = found
        result = {"ok": OK, "fail": FAIL, "defer": DEFER}.get(outcome.result, ERROR)
        return result, None, outcome.error or None

    async def modifier(self, name: str, value: str) -> str | None:
        server = self.server
        txn = server.transaction
        if name in ("control", "queue"):
            return self._control(value if name == "control" else f"queue/{value}")
        if name == "add_header":
            txn.add_headers.append(value)
            return None
        if name == "udpsend":
            return await self._udpsend(value)
        if name == "log_reject_target":
            server.reject_targets = self._log_targets(value)
            return None
        if name == "remove_header":
            txn.remove_headers.extend(v.strip() for v in value.split(":") if v.strip())
            return None
        if name == "delay":
            seconds = parse_time(value)
            if seconds is None or seconds < 0:
                return f'delay modifier: "{value}" is not a time value'
            if server.host_checking:
                server.trace("delay skipped in -bh checking mode")
                return None
            await server.delay(seconds)
            return None
        return None

    async def _udpsend(self, value: str) -> str | None:
        """``udpsend = host : port : payload``: one datagram, sent without
        waiting (UDP sends do not block)."""
        items, payload = take_list_items(value, 2)
        if not items:
            return 'missing destination host in "udpsend" modifier'
        if len(items) < 2:
            return 'missing destination port in "udpsend" modifier'
        host, port_text = items
        if not port_text.isdigit():
            return 'bad destination port in "udpsend" modifier'
        address = host
        if parse_ip(host) is None:
            try:
                address = (await forward_addresses(host, self.server.ctx))[0]
            except (DnsError, IndexError):
                return 'DNS lookup failed in "udpsend" modifier'
        family = socket.AF_INET6 if ":" in address else socket.AF_INET
        try:
            with socket.socket(family, socket.SOCK_DGRAM) as sock:
                sock.setblocking(False)
                sent = sock.sendto(payload.encode("latin-1", "replace"),
                                   (address, int(port_text)))
        except OSError as e:
            return f'"udpsend" failed: {e.strerror or e}'
        if sent < len(payload):
            return f'"udpsend" truncated from {len(payload)} to {sent} octets'
        self.server.trace(f"udpsend [{address}]:{port_text} {payload}")
        return None

    def _log_targets(self, value: str) -> tuple[str, ...]:
        """The logs a log_reject_target list names, in Exim's order; an
        unknown name means the default pair (and a panic line)."""
        names = set()
        for item in split_list(value):
            if item in ("main", "panic", "reject"):
                names.add(item)
            else:
                names.update(("main", "reject"))
                self.server.log_write(f'unknown log name "{item}" in "log_reject_target" in '
                                      f'{where_name(self.where)} ACL', ("main", "panic"))
        return tuple(n for n in ("main", "reject", "panic") if n in names)

    def _control(self, value: str) -> str | None:
        name, _, arg = value.partition("/")
        if name not in CONTROLS:
            return f'unknown control "{value}"'
        txn = self.server.transaction
        if name == "no_pipelining":
            self.server.pipelining_allowed = False
        elif name == "enforce_sync":
            self.server.enforce_sync = True
        elif name == "no_enforce_sync":
            self.server.enforce_sync = False
        elif name == "no_multiline_responses":
            self.server.no_multiline = True
        elif name == "queue_only":
            txn.controls["queue"] = arg
        else:
            txn.controls[name] = arg
        return None
