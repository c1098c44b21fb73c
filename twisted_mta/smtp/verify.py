"""The ``verify`` ACL condition: recipient, sender, helo, header_syntax,
not_blind, reverse_host_lookup.

Address verification runs the routers in verify mode: their generic
preconditions in Exim's order and the drivers' decisions (accept,
redirect with ``data``, manualroute, ipliteral, dnslookup).  Callouts are
not made.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from twisted_mta.acl.engine import DEFER, ERROR, FAIL, OK
from twisted_mta.expand.addresses import AddressError, extract_address, find_address_end

_ADDRESS_HEADERS = ("sender", "reply-to", "from", "to", "cc", "bcc", "resent-sender",
                    "resent-reply-to", "resent-from", "resent-to", "resent-cc", "resent-bcc")


@dataclass
class VerifyResult:
    ok: bool
    defer: bool = False
    message: str | None = None
    router: str | None = None
    #: The message is for the log only; the client gets Exim's default.
    private: bool = False


async def verify_condition(session: Any, value: str) -> tuple[str, str | None, str | None]:
    """Evaluate ``verify = value`` for the ACL engine."""
    what, _, options = value.partition("/")
    what = what.strip().lower()
    server = session.server
    if what == "recipient" or what.startswith("recipient"):
        address = f"{server.vars.get('local_part', '')}@{server.vars.get('domain', '')}"
        result = await verify_address(session, address, recipient=True)
        if result.ok:
            return OK, None, None
        if result.defer:
            return DEFER, None if result.private else result.message, result.message
        return FAIL, result.message or "Unrouteable address", result.message or \
            "Unrouteable address"
    if what.startswith("sender"):
        _, equals, given = what.partition("=")
        sender = given if equals else server.vars.get("sender_address", "")
        if not sender:
            return OK, None, None
        result = await verify_address(session, sender, recipient=False)
        if result.ok:
            return OK, None, None
        reason = result.message or "Unrouteable address"
        server.log_write(f"{server.host_and_ident(True)} sender verify "
                         f"{'defer' if result.defer else 'fail'} for <{sender}>: {reason}",
                         ("main", "reject"))
        if result.defer:
            return DEFER, "Could not complete sender verify", "Could not complete sender verify"
        return FAIL, "Sender verify failed", "Sender verify failed"
    if what == "helo":
        return (OK if await verify_helo(server) else FAIL), None, None
    if what == "header_syntax":
        problem = header_syntax_problem(server.vars.get("__headers_list__") or [])
        if problem is None:
            return OK, None, None
        return FAIL, None, problem
    if what == "not_blind":
        return (OK if not_blind(server) else FAIL), None, \
            "no recipients in the message headers"
    if what == "reverse_host_lookup":
        identity = server.host_identity
        if identity is None:
            return OK, None, None
        names = await identity.names(server.ctx)
        if names:
            server.vars["sender_host_name"] = names[0]
            return OK, None, None
        return FAIL, None, f"no host name found for IP address {server.sender_host_address}"
    if what == "certificate":
        verified = server.vars.get("tls_in_certificate_verified") == "1"
        return (OK if verified else FAIL), None, "certificate not verified"
    return ERROR, None, f'unknown verify condition "{value}"'


async def verify_helo(server: Any) -> bool:
    """The HELO name is the client's IP literal, or resolves to its address."""
    helo = server.helo or ""
    address = server.sender_host_address
    if not helo or not address:
        return False
    if helo.startswith("["):
        inner = helo[1:-1]
        inner = inner[5:] if inner[:5].lower() in ("ipv6:", "ipv4:") else inner
        return inner == address
    resolver = server.resolver
    if resolver is None:
        return False
    try:
        return address in await resolver.host_addresses(helo)
    except Exception:
        return False


def header_syntax_problem(headers: list[Any]) -> str | None:
    """Exim's verify=header_syntax: every address in the address headers
    must parse; the first failure's text, or None."""
    for header in headers:
        name = header.name
        if header.flag == "*" or name.lower() not in _ADDRESS_HEADERS:
            continue
        value = header.value.replace("\n", " ")
        pos = 0
        while pos < len(value):
            end = find_address_end(value, pos)
            item = value[pos:end].strip()
            pos = end + 1
            if not item:
                continue
            if item.endswith(";") and ":" in item:
                item = item.split(":", 1)[1].rstrip(";").strip()
                if not item:
                    continue
            try:
                extract_address(item)
            except AddressError as e:
                return (f"{e.args[0]}: failing address in \"{name}:\" header is: "
                        f"{item}")
    return None


def not_blind(server: Any) -> bool:
    recipients = {r.address.lower() for r in server.transaction.recipients}
    seen: set[str] = set()
    for header in server.vars.get("__headers_list__") or []:
        if header.flag != "*" and header.name.lower() in ("to", "cc", "bcc"):
            for part in header.value.split(","):
                try:
                    address, _ = extract_address(part.strip())
                except AddressError:
                    continue
                seen.add(address.lower())
    return recipients <= seen


async def verify_address(session: Any, address: str, *, recipient: bool) -> VerifyResult:
    """Route *address* through the routers in verify mode (the routing
    engine, as delivery uses it, with the verify preconditions)."""
    from twisted_mta.queue.address import DeliveryAddress
    from twisted_mta.routers.engine import (
        ACCEPT,
        FAIL,
        VERIFY_RECIPIENT,
        VERIFY_SENDER,
        RoutingContext,
        route_address,
    )
    from twisted_mta.taint import taint

    server = session.server
    rctx = RoutingContext(server.config, server.ctx,
                          VERIFY_RECIPIENT if recipient else VERIFY_SENDER,
                          sender=server.vars.get("sender_address", ""))
    routed = await route_address(rctx, DeliveryAddress(taint(address)))
    if routed.kind == ACCEPT:
        if routed.problems and not routed.deliveries:
            problem = routed.problems[0]
            return VerifyResult(False, defer=problem.status != "failed",
                                message=problem.message, router=routed.router)
        return VerifyResult(True, router=routed.router)
    if routed.kind == FAIL:
        return VerifyResult(False, message=routed.message, router=routed.router)
    return VerifyResult(False, defer=True, message=routed.message, router=routed.router,
                        private=not routed.pass_message)
