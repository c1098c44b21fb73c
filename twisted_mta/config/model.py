"""The parsed configuration."""

from __future__ import annotations

import socket
from dataclasses import dataclass, field
from typing import Any

from twisted_mta.config import optiontables
from twisted_mta.config.options import Spec
from twisted_mta.config.reader import Macros

DRIVER_TABLES: dict[str, tuple[dict[str, Spec], dict[str, tuple[dict[str, Spec], dict[str, Any]]]]] = {
    "router": (optiontables.ROUTER_GENERIC, optiontables.ROUTERS),
    "transport": (optiontables.TRANSPORT_GENERIC, optiontables.TRANSPORTS),
    "authenticator": (optiontables.AUTH_GENERIC, optiontables.AUTHENTICATORS),
}


@dataclass
class NamedList:
    """A ``domainlist``/``hostlist``/``addresslist``/``localpartlist``; the
    text is kept unexpanded."""

    name: str
    kind: str
    text: str
    hide: bool = False
    cache: bool = False
    filename: str = ""
    lineno: int = 0


@dataclass
class AclItem:
    """A condition or modifier; ``endpass`` has an empty value."""

    name: str
    value: str
    negated: bool = False
    filename: str = ""
    lineno: int = 0


@dataclass
class AclStatement:
    verb: str
    items: list[AclItem] = field(default_factory=list)
    filename: str = ""
    lineno: int = 0


@dataclass
class Acl:
    name: str
    statements: list[AclStatement] = field(default_factory=list)


@dataclass
class RetryRule:
    """``pattern error [senders=list] params`` with params as raw text."""

    pattern: str
    error: str
    senders: str | None
    params: str
    lineno: int = 0


@dataclass
class RewriteRule:
    pattern: str
    replacement: str
    flags: str
    lineno: int = 0


@dataclass
class DriverInstance:
    """A router, transport or authenticator instance."""

    kind: str
    name: str
    driver: str | None = None
    options: dict[str, Any] = field(default_factory=dict)
    hidden: set[str] = field(default_factory=set)
    filename: str = ""
    lineno: int = 0

    def spec(self, option: str) -> Spec | None:
        """(type, default, flags) for *option* in this instance's driver."""
        generic, drivers = DRIVER_TABLES[self.kind]
        spec = generic.get(option)
        if spec is not None:
            _, overrides = drivers.get(self.driver or "", ({}, {}))
            if option in overrides:
                return (spec[0], overrides[option], spec[2])
            return spec
        if self.driver in drivers:
            return drivers[self.driver][0].get(option)
        return None

    def get(self, option: str, default: Any = None) -> Any:
        """The typed value of *option*, or the driver's default."""
        if option in self.options:
            return self.options[option]
        if option == "public_name" and self.kind == "authenticator":
            return self.name
        spec = self.spec(option)
        return default if spec is None or spec[1] is None else spec[1]


@dataclass
class Config:
    """A loaded configuration."""

    filename: str
    macro_table: Macros
    main: dict[str, Any] = field(default_factory=dict)
    hidden: set[str] = field(default_factory=set)
    named_lists: dict[str, dict[str, NamedList]] = field(
        default_factory=lambda: {"domain": {}, "host": {}, "address": {}, "localpart": {}})
    acls: dict[str, Acl] = field(default_factory=dict)
    routers: list[DriverInstance] = field(default_factory=list)
    transports: list[DriverInstance] = field(default_factory=list)
    authenticators: list[DriverInstance] = field(default_factory=list)
    retry_rules: list[RetryRule] = field(default_factory=list)
    rewrite_rules: list[RewriteRule] = field(default_factory=list)

    @property
    def macros(self) -> dict[str, str]:
        """All macros in definition order (built-ins, ``-D``, then the file)."""
        return self.macro_table.values

    def substitute_macros(self, line: str) -> tuple[str, bool]:
        """Macro substitution as for a configuration line (used by ``-be``)."""
        return self.macro_table.substitute(line)

    def define_macro(self, text: str) -> str:
        """Define a macro from ``NAME = value`` text (``-be`` does this for
        lines starting with an upper-case letter); return its name."""
        return self.macro_table.define(text)

    def get(self, name: str, default: Any = None) -> Any:
        """The typed value of main option *name* (its default if unset)."""
        if name in self.main:
            return self.main[name]
        if name == "primary_hostname":
            # Exim uses the node name; a DNS lookup here would slow every command.
            return socket.gethostname()
        if name == "qualify_domain":
            return self.get("primary_hostname")
        if name == "qualify_recipient":
            return self.get("qualify_domain")
        if name == "process_log_path" and self.get("spool_directory"):
            return self.get("spool_directory") + "/exim-process.info"
        spec = optiontables.MAIN.get(name)
        return default if spec is None or spec[1] is None else spec[1]

    def router(self, name: str) -> DriverInstance | None:
        return next((d for d in self.routers if d.name == name), None)

    def transport(self, name: str) -> DriverInstance | None:
        return next((d for d in self.transports if d.name == name), None)
