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
from twisted_mta.expand.errors import ExpansionError, ForcedFailure
from twisted_mta.lists import ListDefer, match_list

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
    """Route *address* through the routers in verify mode."""
    server = session.server
    ctx = server.ctx
    variables = ctx.variables
    local_part, _, domain = address.rpartition("@")
    saved = {n: variables.get(n) for n in ("local_part", "domain", "address_data")}
    variables["local_part"], variables["domain"] = local_part, domain
    try:
        for router in server.config.routers:
            decision = await _try_router(router, ctx, address, recipient)
            if decision is not None:
                return decision
        return VerifyResult(False, message="Unrouteable address")
    finally:
        for name, value in saved.items():
            if value is None:
                variables.pop(name, None)
            else:
                variables[name] = value


async def _expand_option(router: Any, ctx: Any, name: str) -> str | None:
    value = router.get(name)
    if value is None:
        return None
    return await ctx.expand(str(value))


async def _try_router(router: Any, ctx: Any, address: str, recipient: bool
                      ) -> VerifyResult | None:
    """None when the router declines (or is skipped)."""
    if "verify" in router.options and not router.options["verify"]:
        return None
    if not router.get("verify_recipient" if recipient else "verify_sender", True):
        return None
    try:
        for option, kind, subject in (("domains", "domain", ctx.variables["domain"]),
                                      ("local_parts", "localpart",
                                       ctx.variables["local_part"]),
                                      ("senders", "address",
                                       ctx.variables.get("sender_address", ""))):
            text = await _expand_option(router, ctx, option)
            if text is None:
                continue
            found = await match_list(subject, text, kind, ctx)
            if found is None:
                return None
            if option == "domains":
                ctx.variables["domain_data"] = found.value
            elif option == "local_parts":
                ctx.variables["local_part_data"] = found.value
        condition = router.get("condition")
        if condition is not None:
            from twisted_mta.expand.operators import parse_bool

            if not parse_bool(await ctx.expand(str(condition)), False):
                return None
        address_data = router.get("address_data")
        if address_data is not None:
            ctx.variables["address_data"] = await ctx.expand(str(address_data))
    except ForcedFailure:
        return None
    except ListDefer as e:
        return VerifyResult(False, defer=True, message=e.message, router=router.name,
                            private=True)
    except ExpansionError as e:
        return VerifyResult(False, defer=True, message=e.message, router=router.name,
                            private=True)
    return await _driver_decision(router, ctx, address)


async def _driver_decision(router: Any, ctx: Any, address: str) -> VerifyResult | None:
    driver = router.driver
    if driver == "redirect":
        try:
            data = await _expand_option(router, ctx, "data")
        except ForcedFailure:
            return None
        except ExpansionError as e:
            return VerifyResult(False, defer=True, message=e.message, router=router.name,
                                private=True)
        if data is None or not data.strip():
            return None
        text = data.strip()
        # Each special needs its permission (allow_fail, allow_defer; not
        # forbid_blackhole), else the redirect data is in error: a defer.
        for special, result, permitted in (
                (":fail:", False, router.get("allow_fail", False)),
                (":defer:", None, router.get("allow_defer", False)),
                (":blackhole:", True, not router.get("forbid_blackhole", False))):
            if not text.startswith(special):
                continue
            if not permitted:
                item = text[:find_address_end(text)].rstrip()
                return VerifyResult(False, defer=True, router=router.name, private=True,
                                    message=f'error in redirect data: "{item}" is not '
                                            f'permitted')
            reason = text[len(special):].strip() or None
            if result is None:
                return VerifyResult(False, defer=True, message=reason or "forced defer",
                                    router=router.name)
            if result is False:
                return VerifyResult(False, message=reason or "forced rejection",
                                    router=router.name)
            return VerifyResult(True, message=reason, router=router.name)
        return VerifyResult(True, router=router.name)
    if driver == "ipliteral":
        domain = ctx.variables["domain"]
        if not (domain.startswith("[") and domain.endswith("]")):
            return None
        return VerifyResult(True, router=router.name)
    if driver == "dnslookup":
        resolver = ctx.resolver
        if resolver is None:
            return VerifyResult(True, router=router.name)
        from twisted_mta.dns import DnsNotFound, DnsTempFail

        domain = ctx.variables["domain"]
        try:
            await resolver.lookup(domain, "MX")
        except DnsNotFound:
            try:
                await resolver.host_addresses(domain)
            except DnsNotFound:
                return None
            except DnsTempFail:
                return VerifyResult(False, defer=True, router=router.name)
        except DnsTempFail:
            return VerifyResult(False, defer=True, router=router.name)
        return VerifyResult(True, router=router.name)
    return VerifyResult(True, router=router.name)
