"""Routing an address through the routers, as Exim's route.c does.

L{route_address} runs the routers in order: each one's generic
preconditions (in Exim's order, section 4.2 of the reference), then its
driver, then the generic options that apply once a router has accepted.
The same engine serves delivery, ``verify = recipient|sender`` in ACLs and
``-bt``/``-bv``; the mode says which preconditions apply.
"""

from __future__ import annotations

import os
import pwd
from dataclasses import dataclass, field
from typing import Any

from twisted_mta.expand.errors import ExpansionError, ForcedFailure
from twisted_mta.lists import ListDefer, match_list
from twisted_mta.queue.address import DeliveryAddress
from twisted_mta.taint import taint

# What a router (or the whole routing) decided.
ACCEPT, PASS, DECLINE, FAIL, DEFER = "accept", "pass", "decline", "fail", "defer"
#: A driver changed the domain (self = reroute:, dnslookup widening): its
#: single child is routed again from the first router (Exim's REROUTED).
REROUTE = "reroute"

# Modes: a real delivery, an ACL's verify, -bt (address_test), EXPN.
DELIVER, VERIFY_RECIPIENT, VERIFY_SENDER, ADDRESS_TEST, EXPN = (
    "deliver", "verify_recipient", "verify_sender", "address_test", "expn")

_ROUTING_VARIABLES = ("local_part", "domain", "local_part_prefix", "local_part_suffix",
                      "local_part_prefix_v", "local_part_suffix_v", "local_part_data",
                      "domain_data", "address_data", "home", "local_user_uid",
                      "local_user_gid", "original_local_part", "original_domain",
                      "parent_local_part", "parent_domain", "router_name")


@dataclass
class RouterResult:
    """A driver's decision. *children* are generated addresses (redirect);
    *message* is the reason for a fail or defer."""

    kind: str
    message: str | None = None
    children: list[DeliveryAddress] = field(default_factory=list)
    #: Shown to the SMTP client when verifying (Exim's af_pass_message).
    pass_message: bool = False


@dataclass
class Routed:
    """The outcome of routing one address: the router that decided (None
    when none did), and the addresses to deliver (the address itself, or the
    children a redirect generated, routed in their turn)."""

    kind: str
    address: DeliveryAddress
    router: str | None = None
    message: str | None = None
    pass_message: bool = False
    deliveries: list[DeliveryAddress] = field(default_factory=list)
    #: The addresses that failed or were deferred among the children.
    problems: list[DeliveryAddress] = field(default_factory=list)
    #: From L{route_one} only: the generated addresses, not yet routed,
    #: each with the router it starts at (None: the first).
    children: list[tuple[DeliveryAddress, str | None]] = field(default_factory=list)
    #: The router rerouted the address (its one child has the new domain).
    rerouted: bool = False


@dataclass
class RoutingContext:
    """What routing needs: the configuration, an expansion context whose
    variables describe the message, the mode, and the sender."""

    config: Any
    ctx: Any
    mode: str = DELIVER
    sender: str = ""
    #: Addresses already routed in this delivery (their ``unique``), for
    #: the duplicate check.
    seen: set[str] = field(default_factory=set)
    #: same_domain_copy_routing: the routing of top-level addresses by
    #: domain, for the others with that domain.
    domain_routing: dict[str, DeliveryAddress] = field(default_factory=dict)

    @property
    def verifying(self) -> bool:
        return self.mode in (VERIFY_RECIPIENT, VERIFY_SENDER)


class _Skip(Exception):
    """A precondition is not met: try the next router."""


class _Defer(Exception):
    """A precondition could not be tested: the address is deferred."""


def _drivers() -> dict[str, Any]:
    from twisted_mta.routers import drivers

    return drivers()


async def route_address(rctx: RoutingContext, address: DeliveryAddress,
                        start: str | None = None, depth: int = 0) -> Routed:
    """Route *address* from the first router (or router *start*), and
    route any children it generates in their turn."""
    copied = _copy_domain_routing(rctx, address, start)
    if copied is not None:
        return copied
    routed = await route_one(rctx, address, start)
    _remember_domain_routing(rctx, address, routed, start)
    if not routed.children:
        return routed
    return await _route_children(rctx, routed, depth)


async def route_one(rctx: RoutingContext, address: DeliveryAddress,
                    start: str | None = None) -> Routed:
    """Run the routers for *address* alone: the generated addresses are
    returned in C{children}, unrouted (Exim's addr_new), so that -bt and
    -bv can walk them in Exim's order."""
    config = rctx.config
    routers = list(config.routers)
    index = 0
    if start is not None:
        index = next((i for i, r in enumerate(routers) if r.name == start), 0)
    saved = {n: rctx.ctx.variables.get(n) for n in _ROUTING_VARIABLES}
    saved.update({n: v for n, v in rctx.ctx.variables.items() if n.startswith("r_")})
    # A declining or passing router's message stays with the address
    # (Exim's addr->message), e.g. "IP literal host explicitly ignored".
    message: str | None = None
    pass_message = False
    try:
        while index < len(routers):
            router = routers[index]
            index += 1
            if _routed_by_ancestor(router, address):
                continue
            _set_address_variables(rctx, address)
            try:
                await _check_preconditions(rctx, router, address)
            except _Skip:
                continue
            except _Defer as e:
                return Routed(DEFER, address, router.name, str(e))
            driver = _drivers().get(router.driver or "")
            if driver is None:
                return Routed(DEFER, address, router.name,
                              f'unknown router driver "{router.driver}"')
            try:
                result = await driver.route(router, address, rctx)
            except ExpansionError as e:
                result = RouterResult(DEFER, e.message)
            if result.kind in (ACCEPT, PASS) and await _fail_verify(rctx, router):
                return Routed(FAIL, address, router.name,
                              f"{router.name} router forced verify failure")
            if result.kind in (PASS, DECLINE) and result.message is not None:
                message, pass_message = result.message, result.pass_message
            if result.kind == PASS:
                target = router.get("pass_router")
                if target:
                    index = next((i for i, r in enumerate(routers) if r.name == target), index)
                continue
            if result.kind == DECLINE:
                if not await _expanded_flag(rctx, router, "more", True, defer_on_error=False):
                    break
                continue
            if result.kind in (FAIL, DEFER):
                return Routed(result.kind, address, router.name, result.message,
                              result.pass_message)
            if result.kind == REROUTE:
                return Routed(ACCEPT, address, router.name, rerouted=True,
                              children=[(child, None) for child in result.children])
            address.router = router.name
            _keep_router_variables(rctx, address, router)
            try:
                await _apply_generic_options(rctx, router, address)
            except _Defer as e:
                return Routed(DEFER, address, router.name, str(e))
            routed = Routed(ACCEPT, address, router.name)
            for child in result.children:
                # Made before the router's errors_to was known.
                child.errors_to = address.errors_to
                if child.pipe_command is not None or child.file_path is not None \
                        or child.discarded is not None:
                    child.router = router.name  # pipes and files are not routed again
                    # ...and run as the user the redirecting router found.
                    for key in ("uid", "gid", "router_variables"):
                        if key in address.extra:
                            child.extra[key] = address.extra[key]
            if result.children:
                start_children = router.get("redirect_router")
                routed.children = [(child, start_children) for child in result.children]
            else:
                routed.deliveries = [address]
            try:
                unseen = await _expanded_flag(rctx, router, "unseen", False,
                                              defer_on_error=True)
            except _Defer as e:
                return Routed(DEFER, address, router.name, str(e))
            if unseen and index < len(routers):
                routed.children.insert(0, (_unseen_clone(address, router), routers[index].name))
            return routed
        if message is None and routers:
            message = await _cannot_route_message(rctx, routers[min(index, len(routers)) - 1])
            pass_message = True
        return Routed(FAIL, address, None, message or "Unrouteable address", pass_message)
    finally:
        for name in [n for n in rctx.ctx.variables if n.startswith("r_")]:
            if name not in saved:
                del rctx.ctx.variables[name]
        for name, value in saved.items():
            if value is None:
                rctx.ctx.variables.pop(name, None)
            else:
                rctx.ctx.variables[name] = value


async def _fail_verify(rctx: RoutingContext, router: Any) -> bool:
    """fail_verify_sender / fail_verify_recipient (fail_verify sets both):
    success while verifying becomes failure."""
    both = bool(router.options.get("fail_verify"))
    if rctx.mode == VERIFY_SENDER:
        return both or bool(router.get("fail_verify_sender"))
    if rctx.mode == VERIFY_RECIPIENT:
        return both or bool(router.get("fail_verify_recipient"))
    return False


def _unseen_clone(address: DeliveryAddress, router: Any) -> DeliveryAddress:
    """route_unseen(): the routed address gets an invented parent (a copy
    of itself) and a sibling clone that goes on to the next router; the
    original's unique gets ``/router`` so the two are not duplicates."""
    import dataclasses

    grandparent = address.parent
    parent = dataclasses.replace(address, extra=dict(address.extra))
    parent.errors_to = grandparent.errors_to if grandparent is not None else None
    address.parent = parent
    address.extra["unique"] = f"{unique_of(address)}/{router.name}"
    clone = parent.child(address.address, address_data=address.address_data)
    clone.errors_to = parent.errors_to
    return clone


def unique_of(address: DeliveryAddress) -> str:
    """The address's ``unique`` (changed for an address routed unseen)."""
    return address.extra.get("unique") or address.unique


async def _expanded_flag(rctx: RoutingContext, router: Any, option: str, default: bool, *,
                         defer_on_error: bool) -> bool:
    """A boolean router option that may be an expansion (``unseen``,
    ``more``): a forced failure gives *default*; another expansion error
    defers the address when *defer_on_error* (raising _Defer), else also
    gives *default*."""
    value = router.get(option, default)
    if isinstance(value, str):
        from twisted_mta.expand.operators import parse_bool

        try:
            return parse_bool(await rctx.ctx.expand(value), default)
        except ForcedFailure:
            return default
        except ExpansionError as e:
            if defer_on_error:
                raise _Defer(f'failed to expand "{value}" ({option}): {e.message}') from None
            return default
    return bool(value)


def _copy_domain_routing(rctx: RoutingContext, address: DeliveryAddress,
                         start: str | None) -> Routed | None:
    """same_domain_copy_routing: a later top-level address with the domain
    of one a router with that option routed remotely takes its routing."""
    if rctx.mode != DELIVER or start is not None or address.parent is not None:
        return None
    model = rctx.domain_routing.get(address.domain.lower())
    if model is None:
        return None
    address.router = model.router
    address.transport = model.transport
    address.hosts = list(model.hosts)
    address.errors_to = model.errors_to
    if "fallback_hosts" in model.extra:
        address.extra["fallback_hosts"] = list(model.extra["fallback_hosts"])
    return Routed(ACCEPT, address, model.router, deliveries=[address])


def _remember_domain_routing(rctx: RoutingContext, address: DeliveryAddress, routed: Routed,
                             start: str | None) -> None:
    if rctx.mode != DELIVER or start is not None or address.parent is not None \
            or routed.kind != ACCEPT or routed.children or routed.router is None:
        return
    router = rctx.config.router(routed.router) if hasattr(rctx.config, "router") else None
    if router is None or not router.get("same_domain_copy_routing"):
        return
    if address.headers_add or address.headers_remove or not _is_remote(rctx, address.transport):
        return
    rctx.domain_routing.setdefault(address.domain.lower(), address)


def _is_remote(rctx: RoutingContext, transport: str | None) -> bool:
    config = rctx.config
    instance = config.transport(transport) if transport and hasattr(config, "transport") \
        else None
    return instance is not None and instance.driver == "smtp"


async def _route_children(rctx: RoutingContext, parent_routed: Routed, depth: int) -> Routed:
    parent = parent_routed.address
    routed = Routed(ACCEPT, parent, parent_routed.router,
                    deliveries=list(parent_routed.deliveries))
    if depth > 20:
        return Routed(DEFER, parent, parent_routed.router, "too many levels of redirection")
    for child, start in parent_routed.children:
        if child.pipe_command is not None or child.file_path is not None \
                or child.discarded is not None:
            child.router = parent_routed.router
            if child.unique not in rctx.seen:
                rctx.seen.add(child.unique)
                routed.deliveries.append(child)
            continue
        if child.unique in rctx.seen:
            continue
        rctx.seen.add(child.unique)
        sub = await route_address(rctx, child, start, depth + 1)
        routed.deliveries.extend(sub.deliveries)
        routed.problems.extend(sub.problems)
        if sub.kind in (FAIL, DEFER):
            child.status = "failed" if sub.kind == FAIL else "deferred"
            child.message = sub.message
            child.router = sub.router
            child.extra["pass_message"] = sub.pass_message
            routed.problems.append(child)
    return routed


def _routed_by_ancestor(router: Any, address: DeliveryAddress) -> bool:
    """Loop protection: skip a router that routed an ancestor with the same
    address (any ancestor, with ``no_repeat_use``)."""
    parent = address.parent
    while parent is not None:
        if parent.router == router.name:
            if not router.get("repeat_use", True):
                return True
            if parent.address.lower() == address.address.lower():
                return True
        parent = parent.parent
    return False


def local_part_of(address: DeliveryAddress) -> str:
    """The local part as routers see it (deliver_split_address()): double
    quotes removed and backslash escapes undone, case kept."""
    text = address.local_part
    if '"' not in text and "\\" not in text:
        return text
    out: list[str] = []
    i = 0
    while i < len(text):
        c = text[i]
        if c == '"':
            i += 1
            continue
        if c == "\\" and i + 1 < len(text):
            i += 1
            c = text[i]
        out.append(c)
        i += 1
    return "".join(out)


#: What a router sets that its transport sees too.
ROUTER_SET_VARIABLES = ("local_part_data", "domain_data", "home", "local_user_uid",
                        "local_user_gid", "local_part_prefix", "local_part_suffix",
                        "local_part_prefix_v", "local_part_suffix_v")


def _keep_router_variables(rctx: RoutingContext, address: DeliveryAddress,
                           router: Any = None) -> None:
    """What the transport needs from the router: its variables, and the
    user and group to deliver as (``check_local_user``, ``user``, ``group``)."""
    variables = rctx.ctx.variables
    address.extra["router_variables"] = {
        name: variables[name] for name in ROUTER_SET_VARIABLES if name in variables}
    if "local_user_uid" in variables:
        address.extra["uid"] = int(variables["local_user_uid"])
        address.extra["gid"] = int(variables["local_user_gid"])
    if router is not None:
        for option, key in (("user", "uid"), ("group", "gid")):
            value = router.get(option)
            if value is not None:
                address.extra[key] = value


def _set_address_variables(rctx: RoutingContext, address: DeliveryAddress) -> None:
    variables = rctx.ctx.variables
    # Addresses come from the message, so they are tainted; a router's
    # $local_part_data and $domain_data (from a list or lookup) are not.
    variables["local_part"] = taint(local_part_of(address))
    # Domains are caseless: Exim keeps them lowercased.
    variables["domain"] = taint(address.domain.lower())
    variables["router_name"] = ""
    top = address.top
    variables["original_local_part"] = taint(local_part_of(top))
    variables["original_domain"] = taint(top.domain)
    if address.parent is not None:
        variables["parent_local_part"] = taint(local_part_of(address.parent))
        variables["parent_domain"] = taint(address.parent.domain)
    for name in ("local_part_prefix", "local_part_suffix", "local_part_prefix_v",
                 "local_part_suffix_v", "local_part_data", "domain_data", "home",
                 "local_user_uid", "local_user_gid"):
        variables.pop(name, None)
    if address.address_data is not None:
        variables["address_data"] = address.address_data
    else:
        variables.pop("address_data", None)
    for name in [n for n in variables if n.startswith("r_")]:
        del variables[name]
    chain = []
    ancestor: DeliveryAddress | None = address
    while ancestor is not None:
        chain.append(ancestor)
        ancestor = ancestor.parent
    for ancestor in reversed(chain):
        for name, value in ancestor.router_variables.items():
            variables["r_" + name] = value


async def _expand(rctx: RoutingContext, router: Any, option: str) -> str | None:
    value = router.get(option)
    if value is None:
        return None
    try:
        return await rctx.ctx.expand(str(value))
    except ForcedFailure:
        raise _Skip() from None
    except ExpansionError as e:
        raise _Defer(f'failed to expand "{value}" ({option}): {e.message}') from None


async def _match(rctx: RoutingContext, router: Any, option: str, subject: str,
                 kind: str) -> Any:
    text = await _expand(rctx, router, option)
    if text is None:
        return True
    try:
        return await match_list(subject, text, kind, rctx.ctx)
    except ListDefer as e:
        raise _Defer(e.message) from None


async def _check_preconditions(rctx: RoutingContext, router: Any,
                               address: DeliveryAddress) -> None:
    """Exim's check_router_conditions(), in its order; raises _Skip or _Defer."""
    variables = rctx.ctx.variables
    variables["router_name"] = router.name
    _strip_affixes(router, address, variables)
    mode = rctx.mode
    if mode == VERIFY_RECIPIENT and not (router.get("verify_recipient", True)
                                         and router.options.get("verify", True)):
        raise _Skip()
    if mode == VERIFY_SENDER and not (router.get("verify_sender", True)
                                      and router.options.get("verify", True)):
        raise _Skip()
    if mode == ADDRESS_TEST and not router.get("address_test", True):
        raise _Skip()
    if router.get("verify_only") and not rctx.verifying:
        raise _Skip()
    if mode == EXPN and not router.get("expn", True):
        raise _Skip()
    found = await _match(rctx, router, "domains", address.domain, "domain")
    if found is None:
        raise _Skip()
    if found is not True:
        variables["domain_data"] = found.value
    local_part = variables["local_part"]
    found = await _match(rctx, router, "local_parts", local_part, "localpart")
    if found is None:
        raise _Skip()
    if found is not True:
        variables["local_part_data"] = found.value
    if router.get("check_local_user"):
        try:
            entry = pwd.getpwnam(local_part)
        except KeyError:
            raise _Skip() from None
        variables["local_part_data"] = entry.pw_name
        variables["home"] = entry.pw_dir
        variables["local_user_uid"] = str(entry.pw_uid)
        variables["local_user_gid"] = str(entry.pw_gid)
        address.home_directory = entry.pw_dir
    home = await _expand(rctx, router, "router_home_directory")
    if home is not None:
        variables["home"] = home
        address.home_directory = home
    found = await _match(rctx, router, "senders", rctx.sender, "address")
    if found is None:
        raise _Skip()
    await _check_require_files(rctx, router)
    condition = router.get("condition")
    if condition is not None:
        from twisted_mta.expand.operators import parse_bool

        value = await _expand(rctx, router, "condition")
        if not parse_bool(value or "", False):
            raise _Skip()
    await _set_router_variables(rctx, router, address)
    address_data = router.get("address_data")
    if address_data is not None:
        address.address_data = await _expand(rctx, router, "address_data")
        variables["address_data"] = address.address_data or ""


async def _set_router_variables(rctx: RoutingContext, router: Any,
                                address: DeliveryAddress) -> None:
    """The ``set`` option (route.c set_router_vars()): ``r_name = value``
    items separated by ``;``, each expanded in turn and visible as
    ``$r_name`` to what follows, for this address and its children.  A
    forced failure passes the address on, as a decline does."""
    text = router.get("set")
    if not text:
        return
    from twisted_mta.values import split_list

    variables = rctx.ctx.variables
    for item in split_list(str(text), ";"):
        name, _, value = item.partition("=")
        name = name.strip()
        if not name.startswith("r_") or len(name) < 3:
            raise _Defer(f"bad router variable name '{name}' in router '{router.name}'")
        try:
            expanded = await rctx.ctx.expand(value.lstrip())
        except ForcedFailure:
            raise _Skip() from None
        except ExpansionError as e:
            raise _Defer(f'expansion of "{item}" failed in {router.name} router: '
                         f"{e.message}") from None
        address.router_variables[name[2:]] = expanded
        variables[name] = expanded


def _strip_affixes(router: Any, address: DeliveryAddress, variables: dict) -> None:
    """local_part_prefix / local_part_suffix: a missing mandatory affix
    skips the router; a present one is removed for the remaining tests."""
    from twisted_mta.values import split_list

    local_part = local_part_of(address)
    if not router.get("caseful_local_part"):
        # Exim's lc_local_part, unless the router asks for the original.
        local_part = local_part.lower()
    for option, is_prefix in (("local_part_prefix", True), ("local_part_suffix", False)):
        text = router.get(option)
        if text is None:
            continue
        found = None
        for item in split_list(str(text)):
            found = (_find_prefix if is_prefix else _find_suffix)(local_part, item)
            if found is not None:
                break
        if found is None:
            if not router.get(f"{option}_optional"):
                raise _Skip()
            continue
        local_part = local_part[len(found):] if is_prefix else local_part[:-len(found)]
        variables[option] = found
        if is_prefix:
            address.prefix = found
        else:
            address.suffix = found
    variables["local_part"] = local_part
    address.extra["routed_local_part"] = local_part


def _find_prefix(local_part: str, item: str) -> str | None:
    """The prefix *item* finds at the start of *local_part*, caselessly; a
    leading wildcard (``*-``) reaches to the last ``-``, as Exim's
    route_check_prefix()."""
    lower = local_part.lower()
    if item.startswith("*"):
        fixed = item[1:].lower()
        pos = lower.rfind(fixed)
        return local_part[:pos + len(fixed)] or None if pos >= 0 else None
    return local_part[:len(item)] or None if lower.startswith(item.lower()) else None


def _find_suffix(local_part: str, item: str) -> str | None:
    """The suffix *item* finds at the end; a trailing wildcard (``-*``)
    reaches back to the first ``-`` (route_check_suffix())."""
    lower = local_part.lower()
    if item.endswith("*"):
        fixed = item[:-1].lower()
        pos = lower.find(fixed)
        return local_part[pos:] or None if pos >= 0 else None
    if len(local_part) > len(item) and lower.endswith(item.lower()):
        return local_part[len(local_part) - len(item):] or None
    return None


async def _check_require_files(rctx: RoutingContext, router: Any) -> None:
    text = await _expand(rctx, router, "require_files")
    if text is None:
        return
    from twisted_mta.values import split_list

    for item in split_list(text):
        negated = item.startswith("!")
        path = item[1:] if negated else item
        if not path.startswith("/"):
            continue  # a user or group for the checks that follow
        if os.path.exists(path) == negated:
            raise _Skip()


async def _cannot_route_message(rctx: RoutingContext, router: Any) -> str | None:
    text = router.get("cannot_route_message")
    if text is None:
        return None
    try:
        return await rctx.ctx.expand(str(text))
    except ExpansionError:
        return None


async def _apply_generic_options(rctx: RoutingContext, router: Any,
                                 address: DeliveryAddress) -> None:
    """After the driver accepted: errors_to, headers_add/remove, the
    transport (a driver's own choice stands), dsn_lasthop."""
    errors_to = router.get("errors_to")
    if errors_to is not None:
        try:
            value = await rctx.ctx.expand(str(errors_to))
        except ForcedFailure:
            value = None
        except ExpansionError:
            value = None
        if value is not None:
            address.errors_to = value
    for option, target in (("headers_add", address.headers_add),
                           ("headers_remove", address.headers_remove)):
        value = router.get(option)
        if value is not None:
            target.append(str(value))
    if address.transport is None and address.pipe_command is None \
            and address.file_path is None:
        name = await _expand(rctx, router, "transport")
        if name:
            address.transport = name
    if router.get("dsn_lasthop"):
        address.dsn_lasthop = True
    fallback = router.get("fallback_hosts")
    if fallback and _is_remote(rctx, address.transport):
        # Not expanded, as in Exim; the transport finds their addresses
        # (a name may end in ::port).
        from twisted_mta.queue.address import Host
        from twisted_mta.values import split_list

        address.extra["fallback_hosts"] = [Host(name) for name in split_list(str(fallback))]
