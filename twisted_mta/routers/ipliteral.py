"""The ``ipliteral`` router: ``user@[192.0.2.1]`` goes straight to that
address."""

from __future__ import annotations

from typing import Any

from zope.interface import implementer

from twisted_mta.interfaces import IRouter
from twisted_mta.lists import parse_ip
from twisted_mta.queue.address import Host
from twisted_mta.routers.engine import ACCEPT, DECLINE, RouterResult


@implementer(IRouter)
class IpliteralRouter:
    name = "ipliteral"

    async def route(self, instance: Any, address: Any, context: Any) -> RouterResult:
        domain = address.domain
        if not (domain.startswith("[") and domain.endswith("]")):
            return RouterResult(DECLINE)
        literal = domain[1:-1]
        if literal.lower().startswith("ipv6:"):
            literal = literal[5:]
        if parse_ip(literal) is None:
            return RouterResult(DECLINE)
        address.hosts = [Host(domain, literal)]
        return RouterResult(ACCEPT)
