"""The ``dnslists`` ACL condition: is the client (or a given key) on a DNS list?

Behaviour follows Exim 4.96's ``verify_check_dnsbl()`` (dnsbl.c).  The
condition's list (already expanded) is an Exim list, ``:`` by default, whose
items are::

    +include_unknown | +exclude_unknown | +defer_unknown
    [txtdomain,]domain[ [!]=ips | [!]==ips | [!]&ips | [!]=&ips ][/keylist]

Without a key the client's IP address is looked up, reversed (IPv6 by
nibbles), under *domain*; a key list (its own Exim list) gives names, looked
up as they are, or IP addresses, reversed.  The first item that matches makes
the condition true.  A records outside 127.0.0.0/8 are discarded (and
logged) unless an ``=`` address list is given.  A DNS failure counts as "not
listed" (logged) unless a ``+..._unknown`` item said otherwise.

Results are cached per query name in the dict the caller passes, for the
life of that dict (Exim: per SMTP connection) and at most the records' TTL.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import dns.exception

from twisted_mta.dns import DnsNotFound, DnsTempFail
from twisted_mta.lookups.iputil import ip_address_version
from twisted_mta.values import split_list, split_list_with

MATCH, NOMATCH, DEFER, ERROR = "match", "nomatch", "defer", "error"

# Exim caches a positive answer for at most an hour, and so anything else
# (a negative answer whose SOA we do not see, a DNS failure).
MAX_CACHE_TTL = 3600

# Exim refuses (with a panic log line) query names this long or longer.
MAX_QUERY_LENGTH = 256

_NOT, _ALL = 1, 2  # match-type bits: "!" and a doubled "="

_DOMAIN_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-._")

# ACLs where there is no client host to key on (Exim's NOTSMTP ACLs).
_NOT_SMTP = {"notsmtp": "non-SMTP", "notsmtp_start": "non-SMTP-start"}


@dataclass
class DnslistLogLine:
    """A line Exim writes to its logs while checking a DNS list.

    @ivar targets: the logs (``main``, and ``panic`` for configuration errors).
    @ivar selector: the log_selector that must be on for the line to be
        written (``dnslist_defer``, on by default), or empty: always.
    """

    text: str
    targets: tuple[str, ...] = ("main",)
    selector: str = ""


@dataclass
class DnslistOutcome:
    """The result of a ``dnslists`` condition.

    @ivar result: ``match`` (the condition is true), ``nomatch``, ``defer``
        (a DNS failure after ``+defer_unknown``) or ``error`` (see C{error}).
    @ivar domain: for a match, ``$dnslist_domain``.
    @ivar matched: for a match, ``$dnslist_matched`` (the key, not reversed).
    @ivar text: for a match, ``$dnslist_text``; None when Exim leaves the
        variable as it was (a match assumed by ``+include_unknown``).
    @ivar value: for a match, ``$dnslist_value`` (addresses joined by
        ``", "``); None as for C{text}.
    @ivar error: the log message of an ``error``.
    @ivar log: lines to write to the logs, in order.
    """

    result: str
    domain: str = ""
    matched: str = ""
    text: str | None = ""
    value: str | None = ""
    error: str = ""
    log: list[DnslistLogLine] = field(default_factory=list)


@dataclass
class _CacheEntry:
    """One cached A lookup, like Exim's ``dnsbl_cache_block``."""

    expiry: float
    status: str  # MATCH (A records found), NOMATCH (no such records), DEFER
    addresses: list[str] = field(default_factory=list)
    text: str | None = None
    text_set: bool = False


@dataclass
class _Item:
    """One parsed list item."""

    domain: str
    txt_domain: str
    iplist: str | None
    bitmask: bool
    match_type: int
    key: str | None


def parse_item(text: str) -> _Item:
    """Split a dnslists item into its domain, TXT domain, address list and
    key list, as Exim does (the key first, at the first ``/``)."""
    domain, slash, key = text.partition("/")
    bitmask = False
    match_type = 0
    iplist: str | None = None
    pos = domain.find("=")
    if pos < 0:
        bitmask = True
        pos = domain.find("&")
    if pos >= 0:
        rest = domain[pos + 1:]
        if pos > 0 and domain[pos - 1] == "!":
            match_type |= _NOT
            domain = domain[:pos - 1]
        else:
            domain = domain[:pos]
        if not bitmask and rest[:1] in ("=", "&"):
            bitmask = rest[0] == "&"
            rest = rest[1:]
            match_type |= _ALL
        iplist = rest
    txt_domain = domain
    main, comma, after = domain.partition(",")
    if comma:
        txt_domain, domain = main, after
    return _Item(domain, txt_domain, iplist, bitmask, match_type, key if slash else None)


def invert_address(address: str) -> str:
    """The reversed form of an IP address used in DNS list queries, without a
    trailing ``in-addr.arpa``: octets for IPv4 (and for ``::ffff:``-mapped
    IPv4), nibbles for IPv6."""
    if address.startswith("::ffff:") and ip_address_version(address[7:]) == 4:
        address = address[7:]
    parsed = ipaddress.ip_address(address.partition("%")[0])
    if parsed.version == 4:
        return ".".join(reversed(str(parsed).split(".")))
    return ".".join(reversed(parsed.exploded.replace(":", "")))


def _ipv4_value(text: str) -> int | None:
    """An IPv4 address as a 32-bit number like Exim's ``host_aton()`` (which
    reads up to four decimal numbers and does not range-check them); None
    for IPv6."""
    if ":" in text:
        return None
    parts = [0, 0, 0, 0]
    for i, piece in enumerate(text.split(".")[:4]):
        digits = _leading_int(piece)
        if digits is None:
            break
        parts[i] = digits
    return ((parts[0] << 24) + (parts[1] << 16) + (parts[2] << 8) + parts[3]) & 0xFFFFFFFF


def _leading_int(text: str) -> int | None:
    """The integer at the start of *text* (C's ``%d``), or None."""
    text = text.lstrip(" \t\n\v\f\r")
    end = 1 if text[:1] in ("+", "-") else 0
    while end < len(text) and text[end].isascii() and text[end].isdigit():
        end += 1
    try:
        return int(text[:end])
    except ValueError:
        return None


def _in_127(address: str) -> bool:
    value = _ipv4_value(address)
    return value is not None and (value >> 24) == 127


class _Check:
    """The state of one ``dnslists`` evaluation."""

    def __init__(self, resolver: Any, cache: dict, clock: Callable[[], float] | None) -> None:
        self.resolver = resolver
        self.cache = cache
        self.clock = clock
        self.log: list[DnslistLogLine] = []
        self.value: str | None = None
        self.text: str | None = None

    def _now(self) -> float | None:
        return None if self.clock is None else self.clock()

    async def _lookup(self, query: str) -> _CacheEntry:
        entry = self.cache.get(query)
        now = self._now()
        if entry is not None and (now is None or entry.expiry > now):
            return entry
        start = 0.0 if now is None else now
        try:
            answer = await self.resolver.lookup(query, "A", dnssec=False)
        except DnsNotFound:
            entry = _CacheEntry(start + MAX_CACHE_TTL, NOMATCH)
        except (DnsTempFail, dns.exception.DNSException):
            # An unusable name (an empty or over-long label) fails in the
            # resolver library for Exim too, and so counts as a DNS failure.
            entry = _CacheEntry(start + MAX_CACHE_TTL, DEFER)
        else:
            addresses = [r.address for r in answer.records if hasattr(r, "address")]
            if addresses:
                ttl = min(MAX_CACHE_TTL, answer.ttl)
                entry = _CacheEntry(start + ttl, MATCH, addresses)
            else:
                entry = _CacheEntry(start + MAX_CACHE_TTL, NOMATCH)
        self.cache[query] = entry
        return entry

    async def _txt(self, query: str, entry: _CacheEntry) -> str | None:
        if not entry.text_set:
            entry.text_set = True
            try:
                answer = await self.resolver.lookup(query, "TXT", dnssec=False)
            except (DnsNotFound, DnsTempFail, dns.exception.DNSException):
                answer = None
            if answer is not None:
                for record in answer.records:
                    strings = getattr(record, "strings", None)
                    if strings is not None:
                        # Only the first string of the first record, as in Exim.
                        first = strings[0] if strings else b""
                        entry.text = first.decode("latin-1").split("\0")[0]
                        break
        return entry.text

    def _address_ok(self, item: _Item, keydomain: str, address: str) -> bool:
        """Whether one returned address satisfies the item's address list
        (before the match type decides what that means)."""
        assert item.iplist is not None
        wanted = split_list_with(item.iplist, ",")
        if not item.bitmask:
            return address in wanted
        mask = 0
        value = _ipv4_value(address)
        if value is not None:
            if value >> 24 != 127:
                self.log.append(DnslistLogLine(
                    f"DNS list lookup for {keydomain} at {item.domain} returned {address};"
                    " not in 127.0/8 and discarded"))
            else:
                mask = value
        for candidate in wanted:
            bits = _ipv4_value(candidate)
            if bits is not None and bits & mask == bits:
                return True
        return False

    async def one(self, item: _Item, domain: str, keydomain: str, prepend: str,
                  defer_return: str) -> str:
        """Look up one key in one list (Exim's ``one_check_dnsbl()``);
        returns MATCH, NOMATCH or DEFER."""
        query = f"{prepend}.{domain}"
        if len(query) >= MAX_QUERY_LENGTH:
            self.log.append(DnslistLogLine(
                f"dnslist query is too long (ignored): {query}...", ("main", "panic")))
            return NOMATCH
        entry = await self._lookup(query)
        if entry.status == MATCH:
            if item.iplist is not None:
                want_all = bool(item.match_type & _ALL)
                stopped = False
                for address in entry.addresses:
                    if self._address_ok(item, keydomain, address) != want_all:
                        stopped = True
                        break
                if (item.match_type in (_NOT, _ALL)) == stopped:
                    return NOMATCH
            else:
                good = False
                for address in entry.addresses:
                    if _in_127(address):
                        good = True
                    else:
                        self.log.append(DnslistLogLine(
                            f"DNS list lookup for {keydomain} at {domain} returned {address};"
                            " not in 127.0/8 and discarded"))
                if not good:
                    return NOMATCH
            if item.txt_domain != domain:
                # The TXT record comes from the other domain, which must
                # itself have a (127/8) A record for the key.
                txt_item = _Item(item.txt_domain, item.txt_domain, None, False,
                                 item.match_type, None)
                return await self.one(txt_item, item.txt_domain, keydomain, prepend,
                                      defer_return)
            self.text = await self._txt(query, entry)
            self.value = ", ".join(entry.addresses)
            return MATCH
        if entry.status == DEFER:
            meaning = {MATCH: "assumed in list", NOMATCH: "assumed not in list"}.get(
                defer_return, "returned DEFER")
            self.log.append(DnslistLogLine(
                f"DNS list lookup defer (probably timeout) for {query}: {meaning}",
                selector="dnslist_defer"))
            return defer_return
        return NOMATCH


def _strange_domain(domain: str) -> bool:
    return any(c not in _DOMAIN_CHARS for c in domain)


async def check_dnslists(
    list_text: str,
    client_ip: str | None,
    resolver: Any,
    *,
    cache: dict | None = None,
    where: str = "rcpt",
    clock: Callable[[], float] | None = None,
) -> DnslistOutcome:
    """Evaluate a ``dnslists`` condition whose argument is *list_text*
    (already expanded) for a client at *client_ip* (None or empty: no
    host, as for local input).

    @param resolver: a L{twisted_mta.dns.Resolver} (or anything with its
        ``lookup()``).
    @param cache: the per-connection cache of lookups (None: no caching).
    @param where: the ACL being run (``rcpt``, ``notsmtp`` ...): items
        without a key are an error in the non-SMTP ACLs.
    @param clock: the time now, for expiring cache entries by their TTL
        (None: entries last as long as the cache).
    """
    check = _Check(resolver, {} if cache is None else cache, clock)
    defer_return = NOMATCH
    for raw in split_list(list_text):
        if raw.startswith("+"):
            option = raw.lower()
            if option == "+include_unknown":
                defer_return = MATCH
            elif option == "+exclude_unknown":
                defer_return = NOMATCH
            elif option == "+defer_unknown":
                defer_return = DEFER
            else:
                check.log.append(DnslistLogLine(
                    f"unknown item in dnslist (ignored): {raw}", ("main", "panic")))
            continue
        item = parse_item(raw)
        for name in (item.domain, item.txt_domain) if item.txt_domain != item.domain else (
                item.domain,):
            if _strange_domain(name):
                check.log.append(DnslistLogLine(
                    f'dnslists domain "{name}" contains strange characters - is this right?'))
        if item.key is None:
            if where in _NOT_SMTP:
                return DnslistOutcome(
                    ERROR, error="cannot test auto-keyed dnslists condition in "
                    f"{_NOT_SMTP[where]} ACL", log=check.log)
            if not client_ip:
                # No host: this item can never match, and Exim stops here.
                return DnslistOutcome(NOMATCH, log=check.log)
            rc = await check.one(item, item.domain, client_ip, invert_address(client_ip),
                                 defer_return)
            if rc == MATCH:
                return _matched(check, item, client_ip)
            if rc == DEFER:
                return DnslistOutcome(DEFER, log=check.log)
            continue
        deferred = False
        for keydomain in split_list(item.key):
            prepend = invert_address(keydomain) if ip_address_version(keydomain) else keydomain
            rc = await check.one(item, item.domain, keydomain, prepend, defer_return)
            if rc == MATCH:
                return _matched(check, item, keydomain)
            deferred = deferred or rc == DEFER
        if deferred:
            return DnslistOutcome(DEFER, log=check.log)
    return DnslistOutcome(NOMATCH, log=check.log)


def _matched(check: _Check, item: _Item, key: str) -> DnslistOutcome:
    return DnslistOutcome(MATCH, domain=item.txt_domain, matched=key, text=check.text,
                          value=check.value, log=check.log)
