"""Host facts that list matching needs: IP syntax and masks as Exim 4.96
(with the CVE-2023-42117 fix) reads them, the local interface addresses, a
client's host names, and the MX test behind ``@mx_any``."""

from __future__ import annotations

import functools
import ipaddress
import re
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

# C strtol() after the "/" of a mask: optional blanks and sign, then digits;
# an empty mask is accepted and means 0, as in Exim.
_MASK = re.compile(r"\s*[+-]?\d+|")


def parse_ip(text: str) -> IPAddress | None:
    """*text* as an IP address (an IPv6 ``%scope`` is ignored), or None.

    Like inet_pton(), leading zeros in IPv4 components are refused."""
    if not text.isascii():
        return None
    try:
        return ipaddress.ip_address(text.partition("%")[0] if ":" in text else text)
    except ValueError:
        return None


@functools.lru_cache(maxsize=4096)
def parse_ip_mask(text: str) -> tuple[IPAddress, int | None] | None:
    """An ``ip[/mask]`` host-list item as (address, mask or None), or None
    when it is not one (Exim's ``string_is_ip_address(s, &mask)``)."""
    addr, slash, mask_text = text.partition("/")
    if slash:
        if "%" in text or not _MASK.fullmatch(mask_text):
            return None
        mask = int(mask_text) if mask_text.strip() else 0
        if mask < 0:
            return None
    else:
        mask = None
    if ":" not in addr and "%" in addr:
        return None
    address = parse_ip(addr)
    return None if address is None else (address, mask)


def ip_version(text: str) -> int:
    """4 or 6 when *text* is an IP address without a mask, else 0 (the test
    ``match_ip`` applies to its subject)."""
    if "/" in text:
        return 0
    address = parse_ip(text)
    return 0 if address is None else address.version


def _unmapped(address: IPAddress) -> IPAddress:
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def in_network(host: IPAddress, net: IPAddress, mask: int | None) -> bool:
    """Exim's ``host_is_in_net()``: an IPv4-mapped IPv6 *host* counts as
    IPv4; families must agree; a mask longer than the address is the whole
    address."""
    host = _unmapped(host)
    if host.version != net.version:
        return False
    bits = net.max_prefixlen
    shift = bits - min(bits if mask is None else mask, bits)
    return int(host) >> shift == int(net) >> shift


def masked_key(address: IPAddress, mask: int, sep: str) -> str:
    """Exim's ``host_nmtoa()``: the address with the low bits cleared, IPv6
    written in full with *sep* between the 16-bit groups, then ``/mask``
    unless *mask* is negative."""
    bits = address.max_prefixlen
    keep = bits if mask < 0 else min(mask, bits)
    value = int(address) >> (bits - keep) << (bits - keep)
    if address.version == 4:
        text = str(ipaddress.IPv4Address(value))
    else:
        text = sep.join(f"{(value >> s) & 0xFFFF:04x}" for s in range(112, -1, -16))
    return text if mask < 0 else f"{text}/{mask}"


# -- local interfaces -----------------------------------------------------------

_os_addresses: frozenset[IPAddress] | None = None


def _read_os_addresses() -> frozenset[IPAddress]:
    """The machine's addresses from Linux's /proc; loopback elsewhere."""
    found: set[IPAddress] = set()
    try:
        with open("/proc/net/if_inet6") as f:
            for line in f:
                hexaddr = line.split()[0]
                found.add(ipaddress.IPv6Address(int(hexaddr, 16)))
    except (OSError, ValueError, IndexError):
        pass
    try:
        with open("/proc/net/fib_trie") as f:
            previous = ""
            for line in f:
                # An address line "|-- 192.0.2.2" followed by "/32 host LOCAL".
                if "/32 host LOCAL" in line:
                    address = parse_ip(previous.split()[-1]) if previous.split() else None
                    if address is not None:
                        found.add(address)
                previous = line
    except OSError:
        pass
    found.update({ipaddress.IPv4Address("127.0.0.1"), ipaddress.IPv6Address("::1")})
    return frozenset(found)


def _interface_items(text: str) -> Iterable[str]:
    from twisted_mta.values import split_list

    for item in split_list(text):
        item = item.strip()
        if item.startswith("[") and "]" in item:
            item = item[1:item.index("]")]
        elif parse_ip(item) is None and "." in item:
            # "1.2.3.4.25" / "::1.25": a port after the last dot.
            head = item.rpartition(".")[0]
            if parse_ip(head) is not None:
                item = head
        yield item


def local_addresses(ctx: Any) -> frozenset[IPAddress]:
    """The local interface addresses (Exim's ``host_find_interfaces()``).

    A context attribute ``local_addresses`` (IP strings) overrides the
    discovery, for tests and for a daemon that knows its listeners.
    Otherwise ``local_interfaces`` is read, its wildcards (``0.0.0.0``,
    ``::0``; the default) standing for every address of the machine."""
    override = getattr(ctx, "local_addresses", None)
    if override is not None:
        return frozenset(a for a in map(parse_ip, override) if a is not None)
    global _os_addresses
    config = getattr(ctx, "config", None)
    text = config.get("local_interfaces") if config is not None else None
    result: set[IPAddress] = set()
    for item in _interface_items(text or "<; ::0 ; 0.0.0.0"):
        address = parse_ip(item)
        if address is None:
            continue
        if int(address) == 0:
            if _os_addresses is None:
                _os_addresses = _read_os_addresses()
            result.update(a for a in _os_addresses if a.version == address.version)
        else:
            result.add(address)
    return frozenset(result)


# -- the client's host names ----------------------------------------------------------


@dataclass
class HostIdentity:
    """What is known about the host a host list is matched for.

    @ivar address: the host's IP address (the subject of the match).
    @ivar name: its name; None means "unknown: look it up when an item
        needs it" (incoming connections); the empty string means "match by
        IP address only" (Exim's ``match_ip``, where name items are errors).
    @ivar aliases: further verified names, tried after C{name}.
    @ivar lookup: an optional coroutine function returning the verified
        names (first the host name) or an empty sequence; the session passes
        one so that ``$sender_host_name`` is looked up once.  Without it the
        context's resolver does a PTR lookup and keeps the names whose
        forward lookup gives the address back, as Exim does.
    @ivar lookup_failed: set once a lookup found no name, so it is not
        repeated (Exim's ``host_lookup_failed``).
    """

    address: str
    name: str | None = None
    aliases: tuple[str, ...] = ()
    lookup: Callable[[], Awaitable[Sequence[str]]] | None = None
    lookup_failed: bool = field(default=False)

    async def names(self, ctx: Any) -> tuple[str, ...]:
        """The host name and aliases, looking them up the first time."""
        if self.name is not None:
            return (self.name, *self.aliases) if self.name else ()
        if self.lookup_failed:
            return ()
        if self.lookup is not None:
            found = tuple(await self.lookup())
        else:
            found = await _verified_names(self.address, ctx)
        if not found:
            self.lookup_failed = True
            return ()
        self.name, self.aliases = found[0], tuple(found[1:])
        return found


async def _verified_names(address: str, ctx: Any) -> tuple[str, ...]:
    from twisted_mta.dns import DnsError

    resolver = getattr(ctx, "resolver", None)
    client = parse_ip(address)
    if resolver is None or client is None:
        return ()
    try:
        candidates = await resolver.lookup_ptr(address)
    except DnsError:
        candidates = []
    verified = []
    for name in candidates:
        try:
            addresses = await resolver.host_addresses(name)
        except DnsError:
            continue
        if any(_same_ip(a, client) for a in addresses):
            verified.append(name.lower())
    if not verified and hasattr(resolver, "hosts_file_names"):
        # host_lookup_order's "byaddr": the hosts file, whose names need no
        # forward check (it would read the same file).
        verified = [name.lower() for name in await resolver.hosts_file_names(address)]
    return tuple(verified)


def _same_ip(text: str, address: IPAddress) -> bool:
    other = parse_ip(text)
    return other is not None and _unmapped(other) == _unmapped(address)


async def forward_addresses(name: str, ctx: Any) -> list[str]:
    """The addresses of host *name* (Exim's ``host_find_byname()``).

    ``localhost`` is answered without DNS, as the hosts file would.
    @raise DnsNotFound, DnsTempFail: from the resolver."""
    if name.lower() == "localhost":
        return ["127.0.0.1", "::1"]
    from twisted_mta.dns import DnsTempFail

    resolver = getattr(ctx, "resolver", None)
    if resolver is None:
        raise DnsTempFail(f"{name}: no resolver")
    return list(await resolver.host_addresses(name))


def address_matches(candidates: Iterable[str], client: IPAddress) -> bool:
    """True if one of the address strings *candidates* is *client*."""
    return any(_same_ip(a, client) for a in candidates)
