"""The ``accept`` router: accepts every address its preconditions let in."""

from __future__ import annotations

from typing import Any

from zope.interface import implementer

from twisted_mta.interfaces import IRouter
from twisted_mta.routers.engine import ACCEPT, RouterResult


@implementer(IRouter)
class AcceptRouter:
    name = "accept"

    async def route(self, instance: Any, address: Any, context: Any) -> RouterResult:
        return RouterResult(ACCEPT)
