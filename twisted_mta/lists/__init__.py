"""Exim list matching: domain, host, address and local-part lists.

L{match_list} follows Exim 4.96's ``match.c`` (``match_check_list()``,
``check_string()``, ``check_address()``) and ``verify.c`` (``check_host()``):
negation and the trailing-negation rule, named lists, file items, lookup
items, regexes, wildcards and the ``@`` specials.  See doc/lists.md.
"""

from __future__ import annotations

import dataclasses
import functools
import re
from dataclasses import dataclass
from typing import Any

from twisted_mta.expand.errors import ExpansionError, ForcedFailure
from twisted_mta.lists.hosts import (
    HostIdentity,
    address_matches,
    forward_addresses,
    in_network,
    ip_version,
    local_addresses,
    masked_key,
    parse_ip,
    parse_ip_mask,
)
from twisted_mta.taint import Tainted, is_tainted
from twisted_mta.values import list_separator, split_list, split_list_with

__all__ = ["HostIdentity", "ListDefer", "ListMatch", "ip_version", "match_list"]

KINDS = ("domain", "host", "address", "localpart", "string")
_KIND_WORD = {"domain": " domain", "host": " host", "address": " address", "localpart": " local part"}
_MAX_DEPTH = 50  # named lists referring to each other in a loop
_ASCII_LOWER = str.maketrans("ABCDEFGHIJKLMNOPQRSTUVWXYZ", "abcdefghijklmnopqrstuvwxyz")
_HOST_NAME_CHARS = re.compile(r"[A-Za-z0-9._-]+")
_IPV4_DIGITS = re.compile(r"[0-9.]*(?:/.*)?")
_ADDRESS_LOOKUP = re.compile(r"[A-Za-z0-9-]*\*?@?;")
_PARTIAL = re.compile(r"partial\d*(?:\([^)]*\)|-)")


class ListDefer(ExpansionError):
    """Matching could not be decided now.  ``message`` is Exim's
    ``search_error_message`` (the lookup's own text, or ``DNS lookup of
    "x" deferred``); ``${if match_*}`` wraps it as ``unable to complete
    match against "<list>": <message>``."""


@dataclass(frozen=True)
class ListMatch:
    """A positive match.

    @ivar item: the list item (or file line) that matched, without its
        ``!``; empty when the subject is in the list only because the last
        item was negated.
    @ivar value: what Exim 4.96 passes back for the match: ``$value`` after
        ``match_*`` and the ``$domain_data``, ``$local_part_data``,
        ``$host_data``, ``$sender_data``, ``$recipient_data`` of ACL and
        router conditions.  The item itself for most items, the data for
        lookup items, ``lp@<domain value>`` for address items, and empty for
        IP items of host lists.  Tainted only if the list text was.
    @ivar data: the lookup data when the item was a lookup, else None.
    """

    item: str
    value: str
    data: str | None = None


class _Unknown(Exception):
    """check_host()'s ERROR: a needed host name or address was not found,
    or an item cannot be used in this kind of host list."""


@dataclass(frozen=True)
class _Hit:
    value: str
    data: str | None = None


@dataclass(frozen=True)
class _Item:
    negated: bool
    text: str


def _lc(text: str) -> str:
    """C tolower() on each byte: ASCII letters only."""
    return text.lower() if text.isascii() else text.translate(_ASCII_LOWER)


@functools.lru_cache(maxsize=4096)
def _parse(text: str, sep: str | None) -> tuple[_Item, ...]:
    """Split and classify a list once; list texts repeat on every command.
    *sep* None means the default separator with ``<c`` processing; a
    single-item "list" (an address's domain part) passes the empty string."""
    raw = [text] if sep == "" else split_list(text) if sep is None else split_list_with(text, sep)
    items = []
    for item in raw:
        if item.startswith("!"):
            items.append(_Item(True, item[1:].lstrip()))
        else:
            items.append(_Item(False, item))
    return tuple(items)


@functools.lru_cache(maxsize=1024)
def _regex(pattern: str, caseless: bool) -> re.Pattern[str]:
    from twisted_mta.expand.regex import compile_regex

    compiled = compile_regex(pattern)
    return re.compile(compiled.pattern, compiled.flags | re.IGNORECASE) if caseless else compiled


def _file_lines(path: str, comment_needs_space: bool) -> list[_Item]:
    """The items of a file item: one per line, ``#`` comments removed, and
    reread on every use as Exim does."""
    try:
        with open(path, encoding="latin-1") as f:
            text = f.read()
    except OSError as e:
        raise ListDefer(f"failed to open {path} when checking a list: {e.strerror}") from None
    items = []
    for line in text.splitlines():
        pos = line.find("#")
        while pos >= 0:
            if not comment_needs_space or pos == 0 or line[pos - 1].isspace():
                line = line[:pos]
                break
            pos = line.find("#", pos + 1)
        line = line.strip()
        if not line:
            continue
        if line.startswith("!"):
            items.append(_Item(True, line[1:].lstrip()))
        else:
            items.append(_Item(False, line))
    return items


async def _lookup(type_text: str, rest: str, key: str, ctx: Any, *, use_partial: bool = True,
                  key_for_single: bool = True) -> str | None:
    """Run the lookup item ``type;rest``: a single-key lookup of *key* in
    file *rest*, or the query *rest*.  Deferrals and errors become
    ListDefer (Exim defers, or dies for a missing file or bad type)."""
    from twisted_mta.lookups.search import get_lookup, parse_lookup_type, search_find

    try:
        spec = parse_lookup_type(type_text)
        if not use_partial and spec.partial is not None:
            spec = dataclasses.replace(spec, partial=None, affix="")
        if get_lookup(spec.name).query_style:
            return await search_find(spec, None, rest, ctx)
        return await search_find(spec, rest.strip(), key, ctx)
    except ListDefer:
        raise
    except ExpansionError as e:
        raise ListDefer(e.message) from None


class _Matcher:
    """One match_list() call: the subject, its kind, and state that items
    may change (``+caseful``)."""

    def __init__(self, subject: str, kind: str, ctx: Any, caseless: bool,
                 host: HostIdentity | None) -> None:
        self.kind = kind
        self.ctx = ctx
        self.caseless = caseless
        self.orig = subject
        if kind == "address":
            # Exim lowercases the domain always, the local part when caseless.
            at = subject.rfind("@")
            self.subject = _lc(subject) if caseless or at < 0 else subject[:at] + _lc(subject[at:])
        else:
            self.subject = _lc(subject) if caseless else subject
        self.host = host
        self.client = parse_ip(subject) if kind == "host" else None

    # -- the list scanner (match_check_list) -----------------------------------

    async def scan(self, text: str, kind: str, depth: int = 0, single: bool = False,
                   tainted: bool = False) -> ListMatch | None:
        """Match the subject against an already expanded list; None for no
        match.  *kind* differs from self.kind only for the domain part of an
        address item."""
        if depth > _MAX_DEPTH:
            raise ListDefer("too many nested named lists (loop?)")
        tainted = tainted or is_tainted(text)
        yield_ok = True
        include_unknown = ignore_unknown = include_defer = ignore_defer = False
        for entry in _parse(text, "" if single else None):
            item = entry.text
            if not entry.negated:
                if item == "+caseful" and kind in ("address", "localpart") and not single:
                    self._caseful()
                    continue
                if kind == "host" and item.startswith("+"):
                    if item in ("+include_unknown", "+ignore_unknown"):
                        include_unknown = item == "+include_unknown"
                        ignore_unknown = not include_unknown
                        continue
                    if item in ("+include_defer", "+ignore_defer"):
                        include_defer = item == "+include_defer"
                        ignore_defer = not include_defer
                        continue
            yield_ok = not entry.negated
            if item.startswith("+"):
                found = await self.named(item[1:], kind, depth)
                if found is not None:
                    return found if yield_ok else None
                continue
            lines = [entry] if not item.startswith("/") else [
                _Item(entry.negated != line.negated, line.text)
                for line in _file_lines(item, kind in ("address", "localpart"))
            ]
            for line in lines:
                if item.startswith("/"):
                    yield_ok = not line.negated
                try:
                    hit = await self.check(line.text, kind)
                except ListDefer:
                    if ignore_defer:
                        continue
                    if include_defer:
                        return ListMatch(line.text, "")
                    raise
                except _Unknown:
                    if ignore_unknown:
                        continue
                    if include_unknown:
                        return ListMatch(line.text, "")
                    return None
                if hit is not None:
                    if not yield_ok:
                        return None
                    # A file line is the value, as in Exim, even for lookups.
                    value = line.text if item.startswith("/") else hit.value
                    if tainted:
                        value = Tainted(value)
                    return ListMatch(line.text, value, hit.data)
        return None if yield_ok else ListMatch("", "")

    def _caseful(self) -> None:
        self.caseless = False
        if self.kind == "localpart":
            self.subject = self.orig
        else:
            at = self.orig.rfind("@")
            if at >= 0:
                self.subject = self.orig[:at] + self.subject[at:]

    async def named(self, name: str, kind: str, depth: int) -> ListMatch | None:
        """Match a ``+name`` item: expand the named list (a forced failure
        means "not in it"), match, and cache the answer when the list has no
        ``$`` anywhere in it."""
        text = self.ctx.named_list(kind, name)
        if text is None:
            raise ListDefer(f'unknown named{_KIND_WORD[kind]} list "+{name}"')
        cache = getattr(self.ctx, "lookup_cache", None)
        key = None
        if cache is not None:
            static_key = ("list-static", kind, name)
            if static_key not in cache:
                cache[static_key] = self._static(kind, name)
        if cache is not None and cache[static_key]:
            subject = self.client_key() if kind == "host" else self.subject
            key = ("list-match", kind, name, subject, self.caseless)
            if key in cache:
                return cache[key]
        try:
            expanded = await self.ctx.expand(text)
        except ForcedFailure:
            return None
        except ExpansionError as e:
            raise ListDefer(e.message) from None
        found = await self.scan(expanded, kind, depth + 1)
        if key is not None:
            cache[key] = found
        return found

    def _static(self, kind: str, name: str, seen: frozenset[str] = frozenset()) -> bool:
        """True if the named list and those it includes contain no ``$``."""
        text = self.ctx.named_list(kind, name) or ""
        if "$" in text or name in seen:
            return False
        return all(
            self._static(kind, i.text[1:], seen | {name})
            for i in _parse(text, None)
            if i.text.startswith("+") and self.ctx.named_list(kind, i.text[1:]) is not None
        )

    def client_key(self) -> tuple[str, str | None]:
        return (self.orig, None if self.host is None else self.host.name)

    async def check(self, item: str, kind: str) -> _Hit | None:
        if kind == "domain":
            return await self.check_string(self.subject, self.orig, item, at_special=True)
        if kind == "localpart":
            return await self.check_string(self.subject, self.orig, item)
        if kind == "address":
            return await self.check_address(item)
        return await self.check_host(item)

    # -- one string item (check_string) ---------------------------------------

    async def check_string(self, subject: str, orig: str, pattern: str, *,
                           caseless: bool | None = None, at_special: bool = False,
                           use_partial: bool = True) -> _Hit | None:
        """Match *subject* (already lowercased when caseless; *orig* keeps
        its case for regexes) against a single item."""
        caseless = self.caseless if caseless is None else caseless
        if pattern.startswith("^"):
            try:
                regex = _regex(pattern, caseless)
            except ExpansionError as e:
                raise ListDefer(e.message) from None
            return _Hit(pattern) if regex.search(orig) else None
        if pattern.startswith("*"):
            tail = _lc(pattern[1:]) if caseless else pattern[1:]
            return _Hit(pattern) if subject.endswith(tail) else None
        if at_special and pattern.startswith("@"):
            if pattern == "@":
                pattern = self.ctx.config.get("primary_hostname") or ""
            elif pattern == "@[]":
                return _Hit(pattern) if self._is_local_literal(subject) else None
            elif pattern[:4].lower() == "@mx_":
                found = await self._mx_special(subject, pattern)
                if found is not None:
                    return _Hit(pattern) if found else None
        semicolon = pattern.find(";")
        if semicolon < 0:
            same = _lc(pattern) == subject if caseless else pattern == subject
            return _Hit(pattern) if same else None
        data = await _lookup(pattern[:semicolon], pattern[semicolon + 1:], subject, self.ctx,
                             use_partial=use_partial)
        return None if data is None else _Hit(data, data)

    def _is_local_literal(self, subject: str) -> bool:
        # Exim's test is "[" or "]" (it says &&, a known slip); keep it.
        if not subject or (subject[0] != "[" and subject[-1] != "]"):
            return False
        address = parse_ip(subject[1:-1])
        return address is not None and address in local_addresses(self.ctx)

    async def _mx_special(self, domain: str, pattern: str) -> bool | None:
        """``@mx_any``, ``@mx_primary``, ``@mx_secondary`` (``/ignore=list``):
        whether the domain has an MX pointing at this host.  None when the
        pattern is not one of these (it is then an ordinary string)."""
        m = re.fullmatch(r"@mx_(any|primary|secondary)(?:/ignore=(.*))?", pattern,
                         re.IGNORECASE | re.DOTALL)
        if m is None:
            return None
        mode, ignore = m.group(1).lower(), m.group(2)
        from twisted_mta.dns import DnsNotFound, DnsTempFail

        resolver = getattr(self.ctx, "resolver", None)
        try:
            if resolver is None:
                raise DnsTempFail("no resolver")
            answer = await resolver.lookup(domain, "MX")
        except DnsNotFound:
            return False
        except DnsTempFail:
            raise ListDefer(f'DNS lookup of "{domain}" deferred') from None
        records = sorted(answer.records, key=lambda r: r.preference)
        local = local_addresses(self.ctx)
        treat_as_local = self.ctx.config.get("hosts_treat_as_local")
        for record in records:
            name = record.exchange.to_text(omit_final_dot=True).lower()
            if not name or name == ".":
                continue
            is_local = bool(treat_as_local) and await match_list(
                name, treat_as_local, "domain", self.ctx) is not None
            if not is_local:
                try:
                    addresses = await forward_addresses(name, self.ctx)
                except (DnsNotFound, DnsTempFail):
                    addresses = []
                for text in addresses:
                    address = parse_ip(text)
                    if address is None or (ignore and await match_list(
                            text, ignore, "host", self.ctx) is not None):
                        continue
                    if int(address) == 0 or address in local:
                        is_local = True
                        break
            if is_local:
                primary = record.preference == records[0].preference
                return mode == "any" or (mode == "primary") == primary
        return False

    # -- one address item (check_address) -------------------------------------

    async def check_address(self, pattern: str) -> _Hit | None:
        subject = self.subject
        at = subject.rfind("@")
        if at < 0 and subject:
            return None  # Exim logs "no @ found in the subject"
        if pattern.startswith("^"):
            hit = await self.check_string(subject, subject, pattern)
            return None if hit is None else _Hit("")  # Exim passes no value back
        if _ADDRESS_LOOKUP.match(pattern):
            semicolon = pattern.index(";")
            data = await _lookup(pattern[:semicolon], pattern[semicolon + 1:], subject,
                                 self.ctx, use_partial=False)
            return None if data is None else _Hit(data, data)
        if not subject:
            return _Hit("") if not pattern else None
        local, domain = subject[:at], subject[at + 1:]
        if pattern.startswith("@@"):
            return await self._split_lookup(local, domain, pattern[2:])
        pat_at = pattern.rfind("@")
        value_lp = None
        if pat_at >= 0:
            if pat_at > 0 and pattern[pat_at - 1] == "@" and pattern[pat_at + 1:] in (
                    "", "[]", "mx_any", "mx_primary", "mx_secondary"):
                pat_at -= 1
            lp_pattern = pattern[:pat_at]
            if lp_pattern.startswith("*"):
                tail = _lc(lp_pattern[1:]) if self.caseless else lp_pattern[1:]
                if not local.endswith(tail):
                    return None
            elif (_lc(lp_pattern) if self.caseless else lp_pattern) != local:
                return None
            value_lp = lp_pattern
        domain_pattern = pattern[pat_at + 1:] if pat_at >= 0 else pattern
        sub = _Matcher(domain, "domain", self.ctx, self.caseless, None)
        found = await sub.scan(domain_pattern, "domain", single=True)
        if found is None:
            return None
        if value_lp is None and not found.value:
            return _Hit("")
        return _Hit(f"{value_lp or ''}@{found.value}", found.data)

    async def _split_lookup(self, local: str, domain: str, lookup: str) -> _Hit | None:
        """``@@lookup;file``: the domain's data is a list of local parts, whose
        last item may be ``>key`` to chain to another entry."""
        if local == "*":
            return None
        key: str | None = domain
        for _ in range(50):
            if key is None:
                return None
            hit = await self.check_string(key, key, lookup, caseless=False)
            if hit is None:
                return None
            local_list = hit.value
            last = local_list[local_list.rfind(":") + 1:].lstrip()
            key = None
            if last.startswith(">"):
                key = last[1:].strip()
                local_list = local_list[:len(local_list) - len(last)]
            for entry in _parse(local_list, None):
                found = await self.check_string(local, local, entry.text)
                if found is not None:
                    return None if entry.negated else found
        raise ListDefer(f"Loop detected in lookup of local part of {self.orig} in @@{lookup}")

    # -- one host item (check_host) ------------------------------------------------

    async def check_host(self, item: str) -> _Hit | None:
        if item == "*":
            return _Hit("")
        if self.client is None:
            return _Hit("") if not item and not self.orig else None
        if not item:
            return None
        ip_only = self.host is None or self.host.name == ""
        if item == "@":
            if ip_only:
                raise _Unknown("@ in match_ip list")
            item = self.ctx.config.get("primary_hostname") or ""
        elif item == "@[]":
            return _Hit("") if self.client in local_addresses(self.ctx) else None
        net = parse_ip_mask(item)
        if net is not None:
            return _Hit("") if in_network(self.client, *net) else None
        if _IPV4_DIGITS.fullmatch(item) and not item.startswith("/"):
            raise _Unknown("malformed IPv4 address or address mask")
        semicolon = item.find(";")
        comma = item.find(",")
        end_name = comma if 0 <= comma < semicolon else semicolon
        mask = re.match(r"net(\d*)-", item) if semicolon >= 0 else None
        if semicolon >= 0 and (ip_only or mask):
            type_text = item[:semicolon]
            sep = ":" if item[mask.end() if mask else 0:end_name] == "iplsearch" else "."
            bits = int(mask.group(1)) if mask and mask.group(1) else -1
            key = masked_key(self.client, bits, sep)
            data = await _lookup(type_text, item[semicolon + 1:], key, self.ctx)
            return None if data is None else _Hit(data, data)
        if ip_only:
            raise _Unknown("cannot match host name in match_ip list")
        if _HOST_NAME_CHARS.fullmatch(item):
            return await self._forward_match(item)
        if semicolon >= 0 and self._query_style(item[:semicolon]):
            return await self.check_string("", "", item, caseless=True, at_special=True)
        names = await self.host.names(self.ctx)
        if not names:
            raise _Unknown(f"failed to find host name for {self.orig}")
        for name in names:
            lname = _lc(name)
            hit = await self.check_string(lname, lname, item, caseless=True, at_special=True)
            if hit is not None:
                return hit
        return None

    @staticmethod
    def _query_style(type_text: str) -> bool:
        from twisted_mta.lookups.search import get_lookup, parse_lookup_type

        try:
            return bool(get_lookup(parse_lookup_type(type_text).name).query_style)
        except ExpansionError as e:
            raise ListDefer(f'{e.message} in host list item "{type_text}"') from None

    async def _forward_match(self, name: str) -> _Hit | None:
        from twisted_mta.dns import DnsNotFound, DnsTempFail

        try:
            addresses = await forward_addresses(name, self.ctx)
        except DnsTempFail:
            raise ListDefer(f'DNS lookup of "{name}" deferred') from None
        except DnsNotFound:
            raise _Unknown(f"failed to find IP address for {name}") from None
        return _Hit("") if address_matches(addresses, self.client) else None


def _inlist(subject: str, list_text: str, caseless: bool) -> ListMatch | None:
    sep, rest = list_separator(list_text)
    folded = _lc(subject) if caseless else subject
    for element in split_list_with(rest, sep):
        if (_lc(element) if caseless else element) == folded:
            value = Tainted(element) if is_tainted(list_text) else element
            return ListMatch(element, value)
    return None


async def match_list(subject: str, list_text: str, kind: str, ctx: Any, *,
                     caseless: bool | None = None,
                     host: HostIdentity | None = None) -> ListMatch | None:
    """Match *subject* against an (already expanded) list of *kind*.

    @param kind: 'domain', 'host' (the subject is an IP address, or empty for
        local input), 'address', 'localpart', or 'string' (``inlist``: plain
        equality, no negation or wildcards).
    @param caseless: default True except for 'string'.  For addresses it
        covers the local part (the domain is always caseless); for 'domain'
        Exim is always caseless.
    @param host: for 'host' lists, what is known about the host's names;
        None matches by IP only, as ``match_ip`` does.
    @return: a L{ListMatch}, or None when the subject is not in the list
        (also after a negated item matched).
    @raise ListDefer: a lookup or DNS query deferred, a named list failed to
        expand or is unknown, a file is missing, a regex is bad.
    """
    if kind not in KINDS:
        raise ValueError(f"unknown list kind {kind!r}")
    if kind == "string":
        return _inlist(subject, list_text, bool(caseless))
    matcher = _Matcher(subject, kind, ctx, True if caseless is None else caseless, host)
    return await matcher.scan(list_text, kind)

