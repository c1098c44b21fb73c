"""Event actions: Exim's ``event_raise()`` and ``msg_event_raise()``.

An event runs an ``event_action`` expansion (the main option, or a
transport's; ``tpda_event_action`` is the transport option's old name) with
``$event_name``, ``$event_data`` and ``$event_defer_errno`` set (and their
old ``$tpda_*`` names).  The result is ignored except where Exim uses it: a
non-empty result is returned, so that the caller can change what it does
(``tcp:connect`` skips the host, ``tls:cert`` refuses the certificate,
``smtp:connect`` closes the connection); *errno_box*, when given, is then set
to ``ERRNO_EVENT`` as Exim sets ``*errnop``.  A failed expansion is logged
(``failed to expand event_action NAME in TRANSPORT: MESSAGE``, main and
panic logs) and counts as no result; a forced failure is silent.

The message events (:func:`msg_event`) are raised by the delivery
(:mod:`twisted_mta.queue.deliver`):

=====================  ==========================  ===================================
event                  action                      ``$event_data``
=====================  ==========================  ===================================
``msg:delivery``       the transport's             the address's message for smtp,
                                                   lmtp and autoreply transports (or
                                                   when a host was used), else empty
``msg:fail:delivery``  the transport's             as ``msg:delivery``
``msg:fail:internal``  main (no transport)         the failure message
``msg:complete``       main                        empty
``msg:defer``          the transport's (smtp)      see :func:`deferred_event`
``msg:host:defer``     the transport's (smtp)      see :func:`deferred_event`
=====================  ==========================  ===================================

During a message event ``$domain``, ``$local_part``, ``$host`` and
``$router_name``/``$transport_name`` are the address's; they are put back
afterwards.  The connection events (``tcp:connect``, ``tcp:close``,
``smtp:connect``, ``tls:cert``) are for the smtp transport to raise with
:func:`transport_event`; see doc/events.md.
"""

from __future__ import annotations

import os
from typing import Any

from twisted_mta.expand.errors import ExpansionError, ForcedFailure

#: Exim's ERRNO_EVENT: an event action asked for another result.
ERRNO_EVENT = -58

#: The variables an event sets, each with its old TPDA names (the
#: experimental spec's ``$tpda_event``, ``$tpda_data``, ``$tpda_defer_errno``).
_NAME_VARIABLES = ("event_name", "tpda_event_name", "tpda_event")
_DATA_VARIABLES = ("event_data", "tpda_event_data", "tpda_data")
_ERRNO_VARIABLES = ("event_defer_errno", "tpda_event_defer_errno", "tpda_defer_errno")
_EVENT_VARIABLES = _NAME_VARIABLES + _DATA_VARIABLES + _ERRNO_VARIABLES

#: The drivers whose address message is the event data (Exim's test in
#: msg_event_raise()).
_DATA_DRIVERS = frozenset({"smtp", "lmtp", "autoreply"})

#: What msg_event_raise() sets from the address, and puts back.
_ADDRESS_VARIABLES = ("domain", "local_part", "host", "host_address", "host_port",
                      "router_name", "transport_name",
                      "tpda_delivery_domain", "tpda_delivery_local_part",
                      "tpda_delivery_fqdn", "tpda_delivery_ip", "tpda_delivery_port")


def delivery_acl_session(ctx: Any, log: Any, message_id: str | None) -> Any:
    """The ACL session of an expansion run for an event during a delivery:
    ``logwrite`` (and ``warn`` with ``log_message``) write to the main log
    with the message id, as in Exim's delivery process."""
    from twisted_mta.acl.engine import AclSession

    class DeliveryAclSession(AclSession):
        def log(self, text: str, targets: Any = ("main",)) -> None:
            if log is not None:
                log.write(text, tuple(targets), message_id)

    return DeliveryAclSession(ctx)


def _main_action(config: Any) -> str | None:
    if config is None:
        return None
    return config.get("event_action") or None


def transport_action(instance: Any) -> str | None:
    """A transport's ``event_action`` (or ``tpda_event_action``)."""
    if instance is None:
        return None
    return instance.get("event_action") or instance.get("tpda_event_action") or None


async def event_raise(ctx: Any, action: str | None, name: str, data: str | None = None,
                      *, log: Any = None, message_id: str | None = None,
                      transport: str | None = None, defer_errno: int | None = None,
                      errno_box: list[int] | None = None) -> str | None:
    """Run *action* for event *name* (Exim's event_raise()); the non-empty
    result, or None.  *transport* names the transport in the error line
    (None: ``main``)."""
    from twisted_mta.expand.evaluate import expand_string

    if not action:
        return None
    variables = ctx.variables
    saved = {k: variables[k] for k in _EVENT_VARIABLES if k in variables}
    values = dict.fromkeys(_NAME_VARIABLES, name) | dict.fromkeys(_DATA_VARIABLES, data or "")
    if defer_errno is not None:
        values |= dict.fromkeys(_ERRNO_VARIABLES, str(defer_errno))
    elif "event_defer_errno" not in variables:
        values |= dict.fromkeys(_ERRNO_VARIABLES, "0")
    variables.update(values)
    had_session = hasattr(ctx, "acl_session")
    session = getattr(ctx, "acl_session", None)
    if session is None:
        ctx.acl_session = delivery_acl_session(ctx, log, message_id)
    result: str | None = None
    try:
        result = await expand_string(action, ctx)
    except ForcedFailure:
        result = None
    except ExpansionError as e:
        if log is not None:
            log.write(f"failed to expand event_action {name} in {transport or 'main'}: "
                      f"{e.message if hasattr(e, 'message') else e}",
                      ("main", "panic"), message_id)
        result = None
    finally:
        if session is None:
            if had_session:
                ctx.acl_session = None
            else:
                del ctx.acl_session
        for k in _NAME_VARIABLES + _DATA_VARIABLES:
            variables.pop(k, None)
            if k in saved:
                variables[k] = saved[k]
    if result:
        if errno_box is not None:
            errno_box[:] = [ERRNO_EVENT]
        return result
    return None


def _set(variables: dict[str, Any], name: str, value: str | None) -> None:
    if value is None:
        variables.pop(name, None)
    else:
        variables[name] = value


def _set_address(ctx: Any, address: Any, transport: str | None) -> dict[str, Any]:
    from twisted_mta.routers.engine import local_part_of
    from twisted_mta.taint import taint

    variables = ctx.variables
    saved = {k: variables[k] for k in _ADDRESS_VARIABLES if k in variables}
    local_part = taint(address.extra.get("routed_local_part", local_part_of(address)))
    domain = taint(address.domain)
    host = address.host_used
    for name, value in (("domain", domain), ("local_part", local_part),
                        ("tpda_delivery_domain", domain),
                        ("tpda_delivery_local_part", local_part),
                        ("host", host.name if host is not None else None),
                        ("tpda_delivery_fqdn", host.name if host is not None else None),
                        ("router_name", address.router),
                        ("transport_name", transport)):
        _set(variables, name, value)
    if host is not None and host.address:
        variables["host_address"] = variables["tpda_delivery_ip"] = host.address
        port = str(host.port or 25)
        variables["host_port"] = variables["tpda_delivery_port"] = port
    return saved


def _restore(ctx: Any, saved: dict[str, Any]) -> None:
    variables = ctx.variables
    for name in _ADDRESS_VARIABLES:
        variables.pop(name, None)
    variables.update(saved)


async def msg_event(ctx: Any, config: Any, name: str, address: Any, *,
                    log: Any = None, message_id: str | None = None) -> None:
    """Exim's msg_event_raise(): *name* for *address*, with the address's
    transport's action, or, for a ``msg:fail:delivery`` without a
    transport, ``msg:fail:internal`` with the main action."""
    instance = config.transport(address.transport) if address.transport else None
    if instance is None:
        if name != "msg:fail:delivery":
            return
        action, transport, data = _main_action(config), None, address.message
        name = "msg:fail:internal"
    else:
        action, transport = transport_action(instance), instance.name
        driver = instance.driver or ""
        # A delivery's message is the server's confirmation (C=).
        message = (getattr(address, "confirmation", None) or address.message) \
            if name == "msg:delivery" else address.message
        data = message if (address.host_used is not None
                           or driver in _DATA_DRIVERS) else None
    if not action:
        return
    saved = _set_address(ctx, address, transport)
    try:
        await event_raise(ctx, action, name, data, log=log, message_id=message_id,
                          transport=transport)
    finally:
        _restore(ctx, saved)


async def internal_fail_event(ctx: Any, config: Any, address: Any, *, log: Any = None,
                              message_id: str | None = None) -> None:
    """``msg:fail:internal`` with the main action for an address that
    failed before any transport (a routing failure, ``:fail:``)."""
    action = _main_action(config)
    if not action:
        return
    saved = _set_address(ctx, address, None)
    try:
        await event_raise(ctx, action, "msg:fail:internal", address.message, log=log,
                          message_id=message_id)
    finally:
        _restore(ctx, saved)


async def complete_event(ctx: Any, config: Any, *, log: Any = None,
                         message_id: str | None = None) -> None:
    """``msg:complete`` with the main action, once the message is gone;
    no address is current."""
    action = _main_action(config)
    if not action:
        return
    saved = {k: ctx.variables.pop(k) for k in _ADDRESS_VARIABLES if k in ctx.variables}
    try:
        await event_raise(ctx, action, "msg:complete", None, log=log, message_id=message_id)
    finally:
        _restore(ctx, saved)


def defer_data(message: str | None, basic_errno: int) -> str | None:
    """``$event_data`` of ``msg:defer`` and ``msg:host:defer`` (Exim's
    deferred_event_raise()): the message, with ``: strerror`` added for a
    positive errno, or the strerror alone."""
    if message:
        return f"{message}: {os.strerror(basic_errno)}" if basic_errno > 0 else message
    return os.strerror(basic_errno) if basic_errno > 0 else None


async def deferred_event(ctx: Any, config: Any, name: str, address: Any, host: Any, *,
                         log: Any = None, message_id: str | None = None,
                         defer_errno: int | None = None) -> None:
    """``msg:host:defer`` (a host deferred) or ``msg:defer`` (the last host
    deferred the message) for the first address of a transaction and
    *host*, with the transport's action: ``$host_address`` and
    ``$host_port`` (25 when unset) are the host's, ``$event_defer_errno``
    the address's basic errno (or *defer_errno*: Exim gives the RCPT
    events the address's more_errno).  For the smtp transport to call;
    also ``msg:rcpt:host:defer`` and ``msg:rcpt:defer``."""
    instance = config.transport(address.transport) if address.transport else None
    action = transport_action(instance)
    if not action:
        return
    saved = _set_address(ctx, address, instance.name)
    variables = ctx.variables
    if host is not None:
        variables["host_address"] = variables["tpda_delivery_ip"] = host.address or ""
        variables["host_port"] = variables["tpda_delivery_port"] = str(host.port or 25)
    try:
        await event_raise(ctx, action, name,
                          defer_data(address.message, address.basic_errno or 0),
                          log=log, message_id=message_id, transport=instance.name,
                          defer_errno=address.basic_errno or 0
                          if defer_errno is None else defer_errno)
    finally:
        _restore(ctx, saved)


async def transport_event(ctx: Any, instance: Any, name: str, data: str | None = None, *,
                          log: Any = None, message_id: str | None = None,
                          errno_box: list[int] | None = None) -> str | None:
    """A connection event of a transport (``tcp:connect``, ``tcp:close``,
    ``smtp:connect``, ``tls:cert``): the non-empty result of the
    transport's action, which the caller acts on, or None.  The caller sets
    ``$host``, ``$host_address``, ``$host_port`` (and for ``tls:cert``
    ``$tls_out_peercert``, with the depth as *data*) first."""
    return await event_raise(ctx, transport_action(instance), name, data, log=log,
                             message_id=message_id,
                             transport=getattr(instance, "name", None),
                             errno_box=errno_box)
