"""Routers: the engine that runs them (L{engine}) and the drivers."""

from __future__ import annotations

from typing import Any


def drivers() -> dict[str, Any]:
    """The router drivers by name (IRouter providers)."""
    from twisted_mta.routers.accept import AcceptRouter
    from twisted_mta.routers.dnslookup import DnslookupRouter
    from twisted_mta.routers.ipliteral import IpliteralRouter
    from twisted_mta.routers.manualroute import ManualrouteRouter
    from twisted_mta.routers.redirect import RedirectRouter

    return {driver.name: driver for driver in (
        AcceptRouter(), DnslookupRouter(), IpliteralRouter(), ManualrouteRouter(),
        RedirectRouter())}
