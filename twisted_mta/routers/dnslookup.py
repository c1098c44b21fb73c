"""The ``dnslookup``router (being written)."""

from __future__ import annotations

from typing import Any

from zope.interface import implementer

from twisted_mta.interfaces import IRouter
from twisted_mta.routers.engine import DEFER, RouterResult


@implementer(IRouter)
class DnslookupRouter:
    name = "dnslookup"

    async def route(self, instance: Any, address: Any, context: Any) -> RouterResult:
        return RouterResult(DEFER, "dnslookup router not implemented yet")
