"""The ``ipliteral`` router: ``user@[192.0.2.1]`` goes straight to that
address (ipliteral.c): ``ignore_target_hosts`` and ``self`` apply."""

from __future__ import annotations

from typing import Any

from zope.interface import implementer

from twisted_mta.interfaces import IRouter
from twisted_mta.routers.engine import ACCEPT, DECLINE, RouterResult


@implementer(IRouter)
class IpliteralRouter:
    name = "ipliteral"

    async def route(self, instance: Any, address: Any, context: Any) -> RouterResult:
        from twisted_mta.routers.hostlookup import (
            HOST_FOUND_LOCAL,
            HostItem,
            expand_list,
            is_ignored,
            parse_ip,
            scan_for_local_hosts,
            self_action,
        )

        domain = address.domain.lower()
        if not (domain.startswith("[") and domain.endswith("]")):
            return RouterResult(DECLINE)
        literal = domain[1:-1]
        if literal[:5] in ("ipv6:", "ipv4:"):
            literal = literal[5:]
        parsed = parse_ip(literal)
        config = context.config
        if parsed is None or "%" in literal or (parsed.version == 6 and config.get(
                "disable_ipv6")):
            return RouterResult(DECLINE)
        ctx = context.ctx
        ignore = await expand_list(instance.get("ignore_target_hosts"), ctx)
        if await is_ignored(domain, literal, ignore, ctx):
            return RouterResult(DECLINE, "IP literal host explicitly ignored")
        host = HostItem(domain, literal)
        found, _, _ = await scan_for_local_hosts([host], ctx)
        if found == HOST_FOUND_LOCAL:
            action = await self_action(instance, address, host, context)
            if action is not None:
                return action
        address.hosts = [host.to_host()]
        return RouterResult(ACCEPT)
