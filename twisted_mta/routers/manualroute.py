"""The ``manualroute`` router (manualroute.c): hosts from ``route_list`` or
``route_data``.

A ``route_list`` is a ``;`` list of rules ``domain-pattern hosts
[options]``; the first rule whose pattern (a one-item domain list:
regex, ``*tail``, lookup, named list...) matches the domain is used, and
its regex captures (``$0``, ``$1``...) and lookup data (``$value``) are
available while the host list is expanded.  ``route_data`` expands to
``hosts [options]`` instead.  The options are words: ``randomize``,
``no_randomize``, ``byname``, ``bydns``, ``ipv4_prefer``, ``ipv4_only``
or a transport name; like Exim, a word may be abbreviated (``r`` is
``randomize``).
"""

from __future__ import annotations

from typing import Any

from zope.interface import implementer

from twisted_mta.interfaces import IRouter
from twisted_mta.routers.engine import (
    ACCEPT,
    ADDRESS_TEST,
    DECLINE,
    DEFER,
    DELIVER,
    FAIL,
    PASS,
    RouterResult,
)

_HFF = ("ignore", "decline", "defer", "fail", "freeze", "pass")


def parse_route_item(text: str, with_domain: bool) -> tuple[str | None, str, str] | None:
    """(domain pattern, host list, options) of a route_list item (or of
    route_data, without the pattern); None for a blank item."""
    from twisted_mta.values import interpret_escape

    pos = 0

    def skip_space() -> None:
        nonlocal pos
        while pos < len(text) and text[pos].isspace():
            pos += 1

    def dequote() -> str:
        nonlocal pos
        if pos < len(text) and text[pos] == '"':
            pos += 1
            out: list[str] = []
            while pos < len(text) and text[pos] != '"':
                if text[pos] == "\\":
                    char, pos = interpret_escape(text, pos)
                    out.append(char)
                    continue
                out.append(text[pos])
                pos += 1
            if pos < len(text):
                pos += 1
            return "".join(out)
        start = pos
        while pos < len(text) and not text[pos].isspace():
            pos += 1
        return text[start:pos]

    skip_space()
    domain = None
    if with_domain:
        if pos >= len(text):
            return None
        domain = dequote()
        skip_space()
    hosts = dequote()
    skip_space()
    return domain, hosts, text[pos:]


async def match_route_pattern(domain: str, pattern: str, ctx: Any
                              ) -> tuple[tuple[str, ...], str | None] | None:
    """Match *domain* against a one-item domain list, as
    match_isinlist(..., UCHAR_MAX+1, MCL_DOMAIN) does: None for no match,
    else ($0, $1... captures, the lookup value).

    @raise ListDefer: a lookup could not be completed."""
    from twisted_mta.expand.regex import compile_regex
    from twisted_mta.lists import ListDefer, match_list

    negated = pattern.startswith("!")
    item = pattern[1:].lstrip() if negated else pattern
    subject = domain.lower()
    if item.startswith("^"):
        import re

        try:
            compiled = compile_regex(item)
        except Exception as e:
            raise ListDefer(getattr(e, "message", str(e))) from None
        regex = re.compile(compiled.pattern, compiled.flags | re.IGNORECASE)
        m = regex.search(domain)
        if negated:
            return None if m else ((), None)
        if m is None:
            return None
        return tuple(g or "" for g in (m.group(0), *m.groups())), item
    if item.startswith("*") and ";" not in item:
        tail = item[1:].lower()
        hit = len(tail) <= len(subject) and subject.endswith(tail)
        if negated:
            return None if hit else ((), None)
        if not hit:
            return None
        return (subject, subject[:len(subject) - len(tail)]), item
    # Anything else (a plain name, @, @[], @mx_*, a lookup, +named list)
    # goes to the list matcher as a list of that one item.
    found = await match_list(subject, "<\x01" + pattern, "domain", ctx)
    if found is None:
        return None
    if negated:
        return (), None
    value = found.data if found.data is not None else found.value
    return (subject,), value


@implementer(IRouter)
class ManualrouteRouter:
    name = "manualroute"

    async def route(self, instance: Any, address: Any, context: Any) -> RouterResult:
        from twisted_mta.expand.errors import ExpansionError, ForcedFailure
        from twisted_mta.expand.evaluate import expand_string
        from twisted_mta.expand.nodes import Evaluation
        from twisted_mta.lists import ListDefer
        from twisted_mta.routers import hostlookup as hl
        from twisted_mta.values import split_list

        ctx = context.ctx
        config = context.config
        randomize = bool(instance.get("hosts_randomize"))
        route_list = instance.get("route_list")
        captures: tuple[str, ...] = ()
        lookup_value: str | None = None
        if route_list is not None:
            chosen = None
            for text in split_list(str(route_list), ";"):
                parsed = parse_route_item(text, True)
                if parsed is None:
                    continue
                pattern, hostlist, options = parsed
                try:
                    expanded = await ctx.expand(pattern or "")
                except ForcedFailure:
                    continue
                except ExpansionError:
                    return RouterResult(DEFER, "lookup defer in route_list")
                try:
                    found = await match_route_pattern(address.domain, expanded, ctx)
                except ListDefer:
                    return RouterResult(DEFER, "lookup defer in route_list")
                if found is not None:
                    captures, lookup_value = found
                    chosen = (hostlist, options)
                    break
            if chosen is None:
                return RouterResult(DECLINE)
            hostlist, options = chosen
        else:
            data = instance.get("route_data")
            if data is None:
                return RouterResult(DEFER, f"{instance.name} router: route_list or "
                                           "route_data (but not both) must be specified")
            try:
                text = await ctx.expand(str(data))
            except ForcedFailure:
                return RouterResult(DECLINE)
            except ExpansionError as e:
                return RouterResult(DEFER, f'failed to expand "{data}": {e.message}')
            parsed = parse_route_item(text, False)
            assert parsed is not None
            _, hostlist, options = parsed
            if not hostlist:
                return RouterResult(DECLINE)

        ev = Evaluation(ctx)
        ev.numeric = captures
        ev.value = lookup_value
        try:
            hostlist = await expand_string(hostlist, ctx, ev)
        except ForcedFailure:
            return RouterResult(DECLINE)
        except ExpansionError as e:
            return RouterResult(DEFER, f'{instance.name} router: failed to expand '
                                       f'"{hostlist}": {e.message}')

        lookup_type = hl.LK_DEFAULT
        transport: str | None = None
        pos = 0
        while pos < len(options):
            start = pos
            while pos < len(options) and not options[pos].isspace():
                pos += 1
            word = options[start:pos]
            while pos < len(options) and options[pos].isspace():
                pos += 1
            if "randomize".startswith(word):
                randomize = True
            elif "no_randomize".startswith(word):
                randomize = False
            elif "byname".startswith(word):
                lookup_type = lookup_type & ~(hl.LK_DEFAULT | hl.LK_BYDNS) | hl.LK_BYNAME
            elif "bydns".startswith(word):
                # Exim 4.96 writes "& LK_BYDNS" here, which also clears the
                # ipv4 bits; the lookup is then by DNS without a byname retry.
                lookup_type = lookup_type & ~(hl.LK_DEFAULT | hl.LK_BYNAME) & hl.LK_BYDNS
            elif "ipv4_prefer".startswith(word):
                lookup_type |= hl.LK_IPV4_PREFER
            elif "ipv4_only".startswith(word):
                lookup_type |= hl.LK_IPV4_ONLY
            else:
                transport = next((t.name for t in config.transports
                                  if t.name.startswith(word)), None)
                if transport is None:
                    # Exim quotes the rest of the options from this word on.
                    message = f'unknown routing option or transport name "{options[start:]}"'
                    _log(context, f"Error in {instance.name} router: {message}")
                    return RouterResult(DEFER, f"error in router: {message}")

        individual = transport is not None
        if not individual:
            name = instance.get("transport")
            if name is not None:
                try:
                    transport = await ctx.expand(str(name)) if "$" in str(name) else str(name)
                except ExpansionError as e:
                    return RouterResult(DEFER, f'failed to expand transport "{name}" in '
                                               f'{instance.name} router: {e.message}')
                if config.transport(transport) is None:
                    return RouterResult(DEFER, f'transport "{transport}" not found in '
                                               f'{instance.name} router')

        verifying = context.mode not in (DELIVER, ADDRESS_TEST)
        if transport is not None and hl.transport_is_local(config, transport):
            address.transport = transport
            address.hosts = [hl.Host(hostlist)] if hostlist else []
            return RouterResult(ACCEPT)

        if not hostlist:
            if verifying:
                address.transport = transport
                return RouterResult(ACCEPT)
            message = f"error in {instance.name} router: no host(s) specified for domain " \
                      f"{address.domain.lower()}"
            _log(context, message)
            return RouterResult(DEFER, message)

        hff = str(instance.get("host_find_failed", "freeze")).strip()
        if hff not in _HFF:
            return RouterResult(DEFER, f"{instance.name} router: unrecognized setting for "
                                       "host_find_failed option")
        ignore = await hl.expand_list(instance.get("ignore_target_hosts"), ctx)
        address.extra.pop("local_host_removed", None)
        hosts = hl.build_hostlist(hostlist, randomize)
        found = await hl.lookup_hostlist(instance, address, context, hosts, ignore,
                                         lookup_type, hff)
        if found.result is not None:
            return found.result
        if found.local_removed:
            address.extra["local_host_removed"] = True
        if not found.hosts:
            hai = str(instance.get("host_all_ignored", "defer")).strip()
            if hai == "decline":
                return RouterResult(DECLINE)
            if hai == "pass":
                return RouterResult(PASS)
            message = (f"lookup failed for all hosts in {instance.name} router: "
                       f"host_find_failed=ignore host_all_ignored={hai}")
            if hai == "fail":
                return RouterResult(FAIL, message)
            if hai == "freeze":
                address.special_action = "freeze"
            return RouterResult(DEFER, message)
        if transport is None and not verifying:
            _log(context, f"Error in {instance.name} router: no transport defined")
            return RouterResult(DEFER, "error in router: transport missing")
        address.hosts = [h.to_host() for h in found.hosts]
        address.transport = transport
        return RouterResult(ACCEPT)


def _log(context: Any, text: str) -> None:
    """A main-log line, when the context can write one."""
    log = getattr(context, "log", None) or getattr(context.ctx, "log", None)
    if log is not None and hasattr(log, "main"):
        try:
            log.main(text)
        except Exception:  # logging must never break routing
            pass
