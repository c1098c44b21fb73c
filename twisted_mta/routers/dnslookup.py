"""The ``dnslookup`` router (dnslookup.c): MX records (or SRV with
``check_srv``), then address records, through the asynchronous resolver.

MX hosts are sorted by preference, randomly among equals; a host's IPv6
addresses come before its IPv4 ones unless ``ipv4_prefer``.  A null MX
(RFC 7505, a single ``.`` target) fails the address.  DNSSEC: each host
records whether its records were validated (the AD bit), and
``dnssec_require_domains`` makes an insecure answer a deferral.
"""

from __future__ import annotations

from typing import Any

from zope.interface import implementer

from twisted_mta.interfaces import IRouter
from twisted_mta.routers.engine import (
    ACCEPT,
    DECLINE,
    DEFER,
    PASS,
    VERIFY_SENDER,
    RouterResult,
)


@implementer(IRouter)
class DnslookupRouter:
    name = "dnslookup"

    async def route(self, instance: Any, address: Any, context: Any) -> RouterResult:
        from twisted_mta.expand.errors import ExpansionError, ForcedFailure
        from twisted_mta.routers import hostlookup as hl
        from twisted_mta.values import split_list

        ctx = context.ctx
        config = context.config
        domain = address.domain.lower()
        whichrrs = hl.BY_MX | hl.BY_A | hl.BY_AAAA
        srv_service = None
        check_srv = instance.get("check_srv")
        if check_srv is not None:
            try:
                srv_service = await ctx.expand(str(check_srv))
                whichrrs |= hl.BY_SRV
            except ForcedFailure:
                srv_service = None
            except ExpansionError as e:
                return RouterResult(DEFER, f'{instance.name} router: failed to expand '
                                           f'"{check_srv}": {e.message}')

        # Widening is not done while verifying a sender whose headers would
        # need rewriting (they cannot be, then).
        may_widen = (context.mode != VERIFY_SENDER or not instance.get("rewrite_headers", True)
                     or address.parent is not None)
        names = [domain]
        widen = instance.get("widen_domains")
        if widen and may_widen:
            names.extend(f"{domain}.{suffix}" for suffix in split_list(str(widen)))

        ignore = await hl.expand_list(instance.get("ignore_target_hosts"), ctx)
        dnssec = hl.DnssecDomains(instance.get("dnssec_request_domains", "*"),
                                  instance.get("dnssec_require_domains"))
        mx_fail = instance.get("mx_fail_domains")
        srv_fail = instance.get("srv_fail_domains")
        address.extra.pop("local_host_removed", None)
        found: list[hl.HostItem] = []
        rc = hl.HOST_FIND_FAILED
        fqdn = domain
        removed = False
        for name in names:
            flags = whichrrs
            ipv4_only = await _condition(instance, "ipv4_only", ctx)
            if ipv4_only is None:
                return RouterResult(DEFER, f"{instance.name} router: failed to expand "
                                           "ipv4_only")
            if ipv4_only:
                flags = flags & ~hl.BY_AAAA | hl.IPV4_ONLY
            ipv4_prefer = await _condition(instance, "ipv4_prefer", ctx)
            if ipv4_prefer is None:
                return RouterResult(DEFER, f"{instance.name} router: failed to expand "
                                           "ipv4_prefer")
            if ipv4_prefer:
                flags |= hl.IPV4_FIRST
            if may_widen:
                if instance.get("qualify_single", True):
                    flags |= hl.QUALIFY_SINGLE
                if instance.get("search_parents", False):
                    flags |= hl.SEARCH_PARENTS
            host = hl.HostItem(name)
            rc, found, fqdn, removed = await hl.find_bydns(
                host, ignore, flags, ctx, srv_service=srv_service, srv_fail_domains=srv_fail,
                mx_fail_domains=mx_fail, dnssec=dnssec)
            if removed:
                address.extra["local_host_removed"] = True
            first = found[0]
            if rc in (hl.HOST_FOUND, hl.HOST_FOUND_LOCAL) and first.mx < 0 \
                    and instance.get("mx_domains") is not None:
                listed = await hl.in_domain_list(fqdn, instance.get("mx_domains"), ctx)
                if listed is None:
                    return RouterResult(DEFER, "lookup defer for mx_domains")
                if listed:
                    continue  # rejected for having no MX records: the next name
            if rc == hl.HOST_FIND_SECURITY:
                return RouterResult(DEFER, "host lookup done insecurely")
            if rc == hl.HOST_FIND_AGAIN:
                if instance.get("pass_on_timeout"):
                    return RouterResult(PASS)
                return RouterResult(DEFER, "host lookup did not complete")
            if rc != hl.HOST_FIND_FAILED:
                break
            fail_defer = instance.get("fail_defer_domains")
            if fail_defer is not None:
                listed = await hl.in_domain_list(fqdn, fail_defer, ctx)
                if listed is None:
                    return RouterResult(DEFER, "lookup defer for fail_defer_domains option")
                if listed:
                    return RouterResult(DEFER, "missing MX, or all MXs point to missing A "
                                               "records, and defer requested")
            if first.mx >= 0 and first.address is None and not host.extra.get("syntax_error"):
                if first.name == "":
                    return RouterResult(DECLINE, "an MX or SRV record indicated no SMTP "
                                                 "service", pass_message=True)
                message = "all relevant MX records point to non-existent hosts"
                if not config.get("allow_mx_to_ip") and hl.parse_ip(first.name) is not None:
                    message += " or (invalidly) to IP addresses"
                    address.user_message = (
                        f"It appears that the DNS operator for {domain}\n"
                        "has installed an invalid MX record with an IP address\n"
                        "instead of a domain name on the right hand side.")
                return RouterResult(DECLINE, message, pass_message=True)
            if host.extra.get("syntax_error"):
                return RouterResult(DECLINE, f'mail domain "{host.name}" is syntactically '
                                             "invalid")
        else:
            return RouterResult(DECLINE)

        if fqdn != domain:
            if fqdn.lower() != domain:
                return hl.reroute(address, fqdn)
        if rc == hl.HOST_FOUND_LOCAL:
            action = await hl.self_action(instance, address, found[0], context)
            if action is not None:
                return action
        elif instance.get("check_secondary_mx") and not address.extra.get(
                "local_host_removed"):
            return RouterResult(DECLINE)
        address.hosts = [h.to_host() for h in found]
        return RouterResult(ACCEPT)


async def _condition(instance: Any, option: str, ctx: Any) -> bool | None:
    """expand_check_condition(): true unless the expansion is empty, "0",
    "no" or "false"; a failed expansion is false, but a deferred lookup
    (None) defers the router."""
    from twisted_mta.expand.errors import ExpansionError, LookupDefer

    value = instance.get(option)
    if value is None or value is False:
        return False
    if value is True:
        return True
    try:
        text = await ctx.expand(str(value))
    except LookupDefer:
        return None
    except ExpansionError:
        return False
    return bool(text) and text != "0" and text.lower() not in ("no", "false")
