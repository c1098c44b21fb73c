"""Finding the hosts a router sends to, as Exim 4.96's host.c and the
router helpers rf_lookup_hostlist.c and rf_self_action.c do it.

* L{build_hostlist}: a textual host list becomes host items, optionally
  randomized in ``+``-separated groups;
* L{find_byname}: addresses from the system's host-name lookup (the hosts
  file, then DNS, through ``getaddrinfo()`` in a thread pool);
* L{find_bydns}: MX (or SRV) records and then AAAA/A records through the
  asynchronous L{twisted_mta.dns.Resolver}, with DNSSEC status per host;
* L{scan_for_local_hosts}: the local-host test, using the addresses of this
  machine's interfaces (L{local_interface_addresses});
* L{lookup_hostlist} and L{self_action}: what manualroute (and ipliteral
  and dnslookup) do with the hosts found.

Nothing here blocks the reactor: DNS goes through the resolver, and name
lookups by ``getaddrinfo()`` run in the resolver's (or the expansion
context's) thread pool.  Without any thread pool, ``byname`` reads the
hosts file itself.
"""

from __future__ import annotations

import array
import fcntl
import ipaddress
import random
import socket
import struct
from dataclasses import dataclass, field
from typing import Any

from twisted_mta.queue.address import DeliveryAddress, Host

# host_find_* yields (host.c)
HOST_FIND_FAILED, HOST_FIND_AGAIN, HOST_FOUND, HOST_FOUND_LOCAL, HOST_IGNORED, \
    HOST_FIND_SECURITY = ("failed", "again", "found", "found_local", "ignored", "security")

# whichrrs flags for find_bydns
BY_SRV, BY_MX, BY_A, BY_AAAA = 1, 2, 4, 8
QUALIFY_SINGLE, SEARCH_PARENTS, IPV4_FIRST, IPV4_ONLY = 16, 32, 64, 128

# manualroute lookup types (the LK_* bits)
LK_DEFAULT, LK_BYNAME, LK_BYDNS, LK_IPV4_ONLY, LK_IPV4_PREFER = 1, 2, 4, 8, 16

MX_NONE = -1
_DNS_SUCCEED, _DNS_NOMATCH, _DNS_NODATA, _DNS_AGAIN, _DNS_FAIL = (
    "succeed", "nomatch", "nodata", "again", "fail")

#: The random source for MX and ``randomize`` ordering; tests may seed it.
RANDOM = random.Random()

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


@dataclass
class HostItem:
    """Exim's ``host_item`` while hosts are being found: more than the
    L{Host} a transport receives (the sort key, and why a host is
    unusable)."""

    name: str
    address: str | None = None
    port: int | None = None
    mx: int = MX_NONE
    sort_key: int = 0
    dnssec: str = "unknown"          # "yes", "no" or "unknown"
    unusable: str | None = None      # "deferred", "insecure", "ignored", "failed"
    extra: dict[str, Any] = field(default_factory=dict)

    def copy(self, **changes: Any) -> HostItem:
        item = HostItem(self.name, self.address, self.port, self.mx, self.sort_key,
                        self.dnssec, self.unusable)
        for key, value in changes.items():
            setattr(item, key, value)
        return item

    def to_host(self) -> Host:
        """The transport's view.  A host whose addresses could not be found
        keeps its place in the list with address None (Exim's ``**
        unusable **``)."""
        return Host(self.name, self.address, self.port, self.mx, self.dnssec == "yes")


def parse_ip(text: str) -> IPAddress | None:
    if not text or not text.isascii():
        return None
    try:
        return ipaddress.ip_address(text.partition("%")[0] if ":" in text else text)
    except ValueError:
        return None


def ip_text(address: IPAddress) -> str:
    """An address as inet_ntop() writes it."""
    family = socket.AF_INET6 if address.version == 6 else socket.AF_INET
    return socket.inet_ntop(family, address.packed)


# -- host lists ----------------------------------------------------------------------


def build_hostlist(text: str, randomize: bool) -> list[HostItem]:
    """host_build_hostlist(): one item per list element, in order or (with
    *randomize*) shuffled within groups delimited by ``+`` items.  A
    randomized group gets a fake negative MX (-2, -3, ...)."""
    from twisted_mta.values import split_list

    fake_mx = MX_NONE - (1 if randomize else 0)
    items: list[HostItem] = []
    for name in split_list(text):
        if name == "+":
            if randomize:
                fake_mx -= 1
            continue
        key = -fake_mx * 1000 + RANDOM.randrange(1000) if randomize else 0
        item = HostItem(name, mx=fake_mx, sort_key=key)
        # Stable insertion after items with an equal key, as Exim's chain.
        index = len(items)
        while index > 0 and items[index - 1].sort_key > key:
            index -= 1
        items.insert(index, item)
    return items


def get_port(item: HostItem) -> int | None:
    """host_item_get_port(): a trailing ``:port`` after a name without other
    colons, or after ``[address]``, is removed from the name and returned."""
    name = item.name
    digits = "0123456789"
    if len(name) < 3 or name[-1] not in digits:
        return None
    p = len(name) - 2
    while p > 1 and name[p] in digits:
        p -= 1
    if name[p] != ":":
        return None
    port = int(name[p + 1:])
    if name[p - 1] == "]" and name[0] == "[":
        item.name = name[1:p - 1]
    elif name.find(":") == p:
        item.name = name[:p]
    else:
        return None
    return port


# -- local interfaces ----------------------------------------------------------------

_os_interfaces: frozenset[IPAddress] | None = None
_interface_cache: dict[tuple[str, str], frozenset[IPAddress]] = {}


def _ipv4_interfaces() -> set[IPAddress]:
    """The IPv4 addresses of the interfaces that are up (SIOCGIFCONF, as
    Exim's os_find_running_interfaces())."""
    found: set[IPAddress] = set()
    ifreq = 40 if struct.calcsize("P") == 8 else 32
    size = ifreq * 256
    buffer = array.array("B", bytes(size))
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        request = struct.pack("iP", size, buffer.buffer_info()[0])
        length = struct.unpack("iP", fcntl.ioctl(s.fileno(), 0x8912, request))[0]
    data = buffer.tobytes()[:length]
    for offset in range(0, length - ifreq + 1, ifreq):
        family = struct.unpack_from("H", data, offset + 16)[0]
        if family == socket.AF_INET:
            found.add(ipaddress.IPv4Address(data[offset + 20:offset + 24]))
    return found


def _ipv6_interfaces() -> set[IPAddress]:
    found: set[IPAddress] = set()
    try:
        with open("/proc/net/if_inet6") as f:
            for line in f:
                fields = line.split()
                if fields:
                    found.add(ipaddress.IPv6Address(int(fields[0], 16)))
    except (OSError, ValueError):
        pass
    return found


def _fib_trie_ipv4() -> set[IPAddress]:
    found: set[IPAddress] = set()
    try:
        with open("/proc/net/fib_trie") as f:
            previous = ""
            for line in f:
                if "/32 host LOCAL" in line and previous.split():
                    address = parse_ip(previous.split()[-1])
                    if address is not None:
                        found.add(address)
                previous = line
    except OSError:
        pass
    return found


def os_interface_addresses() -> frozenset[IPAddress]:
    """Every address of this machine's running interfaces (found once)."""
    global _os_interfaces
    if _os_interfaces is None:
        try:
            v4 = _ipv4_interfaces()
        except OSError:
            v4 = _fib_trie_ipv4()
        _os_interfaces = frozenset(v4 | _ipv6_interfaces())
    return _os_interfaces


def _interface_list(text: str) -> list[IPAddress]:
    """host_build_ifacelist(): IP addresses with optional ports (``ip.port``
    or ``[ip]:port``), which are dropped; items that are not addresses are
    left out (Exim refuses them when it reads the configuration)."""
    from twisted_mta.values import split_list

    found: list[IPAddress] = []
    for item in split_list(text):
        if item.startswith("["):
            close = item.find("]")
            if close > 0:
                item = item[1:close]
        elif parse_ip(item) is None:
            head, dot, tail = item.rpartition(".")
            if dot and tail.isdigit() and parse_ip(head) is not None:
                item = head
        address = parse_ip(item)
        if address is not None:
            found.append(address)
    return found


def local_interface_addresses(ctx: Any) -> frozenset[IPAddress]:
    """host_find_interfaces(): ``local_interfaces`` (default every address)
    and ``extra_local_interfaces``, a wildcard (``0.0.0.0``, ``::0``)
    standing for every address of that family on this machine.

    A context attribute ``local_addresses`` (IP strings) replaces all this,
    for tests and for a daemon that knows its listeners."""
    override = getattr(ctx, "local_addresses", None)
    if override is not None:
        return frozenset(a for a in map(parse_ip, override) if a is not None)
    config = getattr(ctx, "config", None)
    get = config.get if config is not None else (lambda name, default=None: default)
    main = get("local_interfaces")
    extra = get("extra_local_interfaces") or ""
    key = (main if main is not None else "<; ::0 ; 0.0.0.0", extra)
    cached = _interface_cache.get(key)
    if cached is not None:
        return cached
    result: set[IPAddress] = set()
    for address in _interface_list(key[0]) + _interface_list(key[1]):
        if int(address) == 0:
            result.update(a for a in os_interface_addresses() if a.version == address.version)
        else:
            result.add(address)
    found = frozenset(result)
    _interface_cache[key] = found
    return found


# -- list matching helpers ------------------------------------------------------------


async def in_domain_list(name: str, list_text: str | None, ctx: Any) -> bool | None:
    """match_isinlist(name, list, MCL_DOMAIN): True, False, or None when
    the list could not be checked (a lookup deferred)."""
    if not list_text:
        return False
    from twisted_mta.expand.errors import ExpansionError, ForcedFailure
    from twisted_mta.lists import ListDefer, match_list

    try:
        text = await ctx.expand(str(list_text))
    except ForcedFailure:
        return False
    except ExpansionError:
        return None
    try:
        return await match_list(name, text, "domain", ctx) is not None
    except ListDefer:
        return None


async def is_ignored(name: str, address: str, ignore: str | None, ctx: Any) -> bool:
    """verify_check_this_host(ignore_target_hosts, name, address) == OK:
    *ignore* is the already expanded list."""
    if not ignore:
        return False
    from twisted_mta.lists import HostIdentity, ListDefer, match_list

    try:
        found = await match_list(address, ignore, "host", ctx,
                                 host=HostIdentity(address, name=name))
    except ListDefer:
        return False
    return found is not None


async def expand_list(text: Any, ctx: Any) -> str | None:
    """A list option expanded as match_check_list() expands it; None when
    unset or the expansion failed (Exim then finds nothing in it)."""
    if text is None:
        return None
    from twisted_mta.expand.errors import ExpansionError

    try:
        return await ctx.expand(str(text))
    except ExpansionError:
        return None


# -- the local-host scan ----------------------------------------------------------------


async def scan_for_local_hosts(items: list[HostItem], ctx: Any, following_mx: int | None = None
                               ) -> tuple[str, list[HostItem], bool]:
    """host_scan_for_local_hosts(): returns (yield, items, removed).

    A host is local when its address is one of this machine's, is
    0.0.0.0, or its name is in ``hosts_treat_as_local``.  If the first
    local host has the lowest MX of the list, the yield is
    HOST_FOUND_LOCAL; otherwise it and every host from its MX value on are
    removed.  *following_mx* is the MX of the item after this sub-list in
    a longer chain (manualroute looks hosts up one at a time)."""
    local = local_interface_addresses(ctx)
    config = getattr(ctx, "config", None)
    treat_as_local = config.get("hosts_treat_as_local") if config is not None else None
    result = HOST_FIND_FAILED
    prev: int | None = None
    for index, item in enumerate(items):
        is_local = False
        if treat_as_local:
            variables = ctx.variables
            saved = variables.get("domain")
            variables["domain"] = item.name
            try:
                is_local = bool(await in_domain_list(item.name.lower(), treat_as_local, ctx))
            finally:
                if saved is None:
                    variables.pop("domain", None)
                else:
                    variables["domain"] = saved
        if not is_local and item.address is not None:
            address = parse_ip(item.address)
            if item.address == "0.0.0.0" or (address is not None and address in local):
                is_local = True
            else:
                result = HOST_FOUND
        if is_local:
            if prev is None:
                return HOST_FOUND_LOCAL, items, False
            return result, items[:prev + 1], True
        next_mx = items[index + 1].mx if index + 1 < len(items) else following_mx
        if next_mx is None or next_mx != item.mx:
            prev = index
    return result, items, False


def remove_duplicates(items: list[HostItem]) -> list[HostItem]:
    """host_remove_duplicates(): later items with an address already seen
    go."""
    seen: set[str] = set()
    kept: list[HostItem] = []
    for item in items:
        if item.address is not None:
            if item.address in seen:
                continue
            seen.add(item.address)
        kept.append(item)
    return kept


# -- lookups by name ---------------------------------------------------------------------


class _NotFound(Exception):
    pass


class _TryAgain(Exception):
    pass


def _hosts_file(name: str, version: int, path: str = "/etc/hosts") -> tuple[str, list[str]]:
    """The hosts-file half of gethostbyname2(): the official name of the
    first line naming *name*, and the addresses of every such line of the
    family, in file order."""
    wanted = name.lower().rstrip(".")
    official = ""
    found: list[str] = []
    try:
        with open(path, encoding="latin-1") as hosts:
            for line in hosts:
                fields = line.split("#", 1)[0].split()
                if len(fields) < 2 or wanted not in (f.lower() for f in fields[1:]):
                    continue
                address = parse_ip(fields[0])
                if address is None or address.version != version:
                    continue
                official = official or fields[1]
                text = ip_text(address)
                if text not in found:
                    found.append(text)
    except OSError:
        pass
    if not found:
        raise _NotFound(name)
    return official, found


def _getaddrinfo(name: str, version: int) -> tuple[str, list[str]]:
    family = socket.AF_INET6 if version == 6 else socket.AF_INET
    try:
        infos = socket.getaddrinfo(name, None, family, socket.SOCK_STREAM, 0,
                                   socket.AI_CANONNAME)
    except socket.gaierror as e:
        if e.errno in (socket.EAI_AGAIN, socket.EAI_FAIL):
            raise _TryAgain(name) from None
        raise _NotFound(name) from None
    except UnicodeError:
        raise _NotFound(name) from None
    canonical = ""
    addresses: list[str] = []
    for _family, _type, _proto, canonname, sockaddr in infos:
        canonical = canonical or canonname or ""
        address = parse_ip(sockaddr[0])
        if address is None or address.version != version:
            continue
        text = ip_text(address)
        if text not in addresses:
            addresses.append(text)
    if not addresses:
        raise _NotFound(name)
    return canonical, addresses


async def _gethostbyname(name: str, version: int, ctx: Any) -> tuple[str, list[str]]:
    """One pass of host_find_byname(): (official name, addresses) of one
    family.  A resolver may provide its own ``gethostbyname(name, version)``
    coroutine (test fakes do); otherwise getaddrinfo() runs in a thread
    pool, or the hosts file is read when there is none."""
    address = parse_ip(name)
    if address is not None:
        if address.version != version:
            raise _NotFound(name)
        return name, [ip_text(address)]
    resolver = getattr(ctx, "resolver", None)
    own = getattr(resolver, "gethostbyname", None)
    if own is not None:
        from twisted_mta.dns import DnsNotFound, DnsTempFail

        try:
            return await own(name, version)
        except DnsNotFound:
            raise _NotFound(name) from None
        except DnsTempFail:
            raise _TryAgain(name) from None
    reactor = getattr(resolver, "reactor", None) or getattr(ctx, "reactor", None)
    pool = getattr(resolver, "threadpool", None) or getattr(ctx, "threadpool", None)
    if pool is not None and reactor is not None:
        from twisted.internet.threads import deferToThreadPool

        return await deferToThreadPool(reactor, pool, _getaddrinfo, name, version)
    path = getattr(resolver, "hosts_file", None) or "/etc/hosts"
    return _hosts_file(name, version, path)


async def _ipv4_only_domain(name: str, ctx: Any) -> bool:
    config = getattr(ctx, "config", None)
    if config is None:
        return False
    if config.get("disable_ipv6"):
        return True
    return bool(await in_domain_list(name, config.get("dns_ipv4_lookup"), ctx))


async def _again_means_nonexist(name: str, ctx: Any) -> bool:
    config = getattr(ctx, "config", None)
    if config is None:
        return False
    variables = ctx.variables
    saved = variables.get("domain")
    variables["domain"] = name
    try:
        return bool(await in_domain_list(name, config.get("dns_again_means_nonexist"), ctx))
    finally:
        if saved is None:
            variables.pop("domain", None)
        else:
            variables["domain"] = saved


async def find_byname(host: HostItem, ignore: str | None, ctx: Any,
                      local_check: bool = True, following_mx: int | None = None
                      ) -> tuple[str, list[HostItem]]:
    """host_find_byname(): the IPv6 then IPv4 addresses of *host*; the
    host may be renamed to its official name.  Returns (yield, items)."""
    versions = (4,) if await _ipv4_only_domain(host.name, ctx) else (6, 4)
    temp_error = False
    items: list[HostItem] = []
    for version in versions:
        try:
            official, addresses = await _gethostbyname(host.name, version, ctx)
        except _TryAgain:
            temp_error = True
            continue
        except _NotFound:
            continue
        if official and official != host.name:
            host.name = official
        for address in addresses:
            if await is_ignored(host.name, address, ignore, ctx):
                continue
            items.append(host.copy(address=address, port=None, dnssec="unknown",
                                   unusable=None))
    if not items:
        if temp_error and not await _again_means_nonexist(host.name, ctx):
            return HOST_FIND_AGAIN, [host]
        return HOST_FIND_FAILED, [host]
    for item in items:
        item.name = host.name
    items = remove_duplicates(items)
    if not local_check:
        return HOST_FOUND, items
    result, items, _ = await scan_for_local_hosts(items, ctx, following_mx)
    return result, items


# -- lookups in the DNS --------------------------------------------------------------------

_search_domains: list[str] | None = None


def _resolv_conf_search() -> list[str]:
    global _search_domains
    if _search_domains is None:
        domains: list[str] = []
        try:
            with open("/etc/resolv.conf") as f:
                for line in f:
                    fields = line.split()
                    if fields and fields[0] in ("domain", "search"):
                        domains = [d.rstrip(".") for d in fields[1:] if d != "."]
        except OSError:
            pass
        _search_domains = domains
    return _search_domains


def _candidates(name: str, resolver: Any, qualify_single: bool, search_parents: bool
                ) -> list[str]:
    """The names the C resolver would try (RES_DEFNAMES for qualify_single,
    RES_DNSRCH for search_parents)."""
    if name.endswith(".") or not (qualify_single or search_parents):
        return [name.rstrip(".") or name]
    domains = getattr(resolver, "search_domains", None)
    if domains is None:
        domains = _resolv_conf_search() if getattr(resolver, "_nameservers", None) is None \
            else []
    dots = name.count(".")
    names: list[str] = []
    if dots:
        names.append(name)
        if search_parents:
            names.extend(f"{name}.{d}" for d in domains)
    else:
        if qualify_single and domains:
            names.extend(f"{name}.{d}" for d in (domains if search_parents else domains[:1]))
        names.append(name)
    return names


@dataclass
class _Answer:
    records: list[Any]
    secure: bool
    #: The name that found the records (after qualification) and the
    #: owner of the records after any CNAMEs.
    name: str
    canonical: str


async def _dns_lookup(name: str, rdtype: str, ctx: Any, dnssec: bool,
                      qualify_single: bool = False, search_parents: bool = False
                      ) -> tuple[str, _Answer | None]:
    """dns_lookup(): (rc, answer).  A resolver must offer
    ``lookup(name, rdtype, dnssec=...)`` as L{twisted_mta.dns.Resolver}
    does."""
    from twisted_mta.dns import DnsNotFound, DnsTempFail

    resolver = getattr(ctx, "resolver", None)
    if resolver is None or not name:
        return (_DNS_AGAIN if resolver is None else _DNS_NOMATCH), None
    rc = _DNS_NOMATCH
    for candidate in _candidates(name, resolver, qualify_single, search_parents):
        try:
            answer = await resolver.lookup(candidate, rdtype, dnssec=dnssec)
        except DnsNotFound as e:
            if not e.nxdomain:
                rc = _DNS_NODATA
            continue
        except DnsTempFail:
            if await _again_means_nonexist(candidate, ctx):
                continue
            return _DNS_AGAIN, None
        records = list(getattr(answer, "records", None) or [])
        if not records:
            rc = _DNS_NODATA
            continue
        canonical = getattr(answer, "canonical_name", None) or candidate
        return _DNS_SUCCEED, _Answer(records, bool(getattr(answer, "secure", False)),
                                     candidate, str(canonical).rstrip("."))
    return rc, None


def _target(value: Any) -> str:
    """An MX exchange or SRV target as text; the root (a null MX) is ""."""
    if hasattr(value, "to_text"):
        text = value.to_text(omit_final_dot=True)
        if getattr(value, "labels", None) == (b"",) or text in ("@", "."):
            return ""
        return text
    text = str(value)
    return "" if text in (".", "") else text.rstrip(".")


def _record_address(record: Any) -> str | None:
    text = getattr(record, "address", None)
    if text is None:
        text = str(record)
    address = parse_ip(str(text))
    return None if address is None else ip_text(address)


async def _set_address_from_dns(host: HostItem, ignore: str | None, ctx: Any,
                                allow_ip: bool, dnssec_request: bool, dnssec_require: bool,
                                whichrrs: int) -> tuple[str, list[HostItem]]:
    """set_address_from_dns(): fill in *host*'s addresses from AAAA and A
    records; extra addresses become extra items (randomly ordered within
    a family, the preferred family first).  Returns (yield, items)."""
    if not host.name:
        return HOST_FIND_FAILED, [host]
    if allow_ip and parse_ip(host.name) is not None:
        if await is_ignored(host.name, host.name, ignore, ctx):
            return HOST_IGNORED, [host]
        host.address = host.name
        return HOST_FOUND, [host]
    want_aaaa = bool(whichrrs & BY_AAAA) and not await _ipv4_only_domain(host.name, ctx)
    passes = ["AAAA", "A"] if want_aaaa else ["A"]
    v6_again = False
    dnssec_fail = False
    groups: dict[str, list[str]] = {"AAAA": [], "A": []}
    renamed: str | None = None
    for rdtype in passes:
        rc, answer = await _dns_lookup(host.name, rdtype, ctx, dnssec_request)
        if rc != _DNS_SUCCEED:
            if rdtype == "A":
                if groups["AAAA"]:
                    break
                if rc in (_DNS_AGAIN, _DNS_FAIL) or v6_again:
                    return HOST_FIND_AGAIN, [host]
                return HOST_FIND_FAILED, [host]
            if rc not in (_DNS_NOMATCH, _DNS_NODATA):
                v6_again = True
            continue
        assert answer is not None
        if dnssec_request:
            if answer.secure:
                if host.dnssec == "unknown":
                    host.dnssec = "yes"
            else:
                if dnssec_require:
                    dnssec_fail = True
                    continue
                if host.dnssec == "yes":
                    host.dnssec = "no"
        for record in answer.records:
            address = _record_address(record)
            if address is None:
                continue
            if await is_ignored(host.name, address, ignore, ctx):
                continue
            if address not in groups[rdtype] and address not in groups["AAAA"]:
                groups[rdtype].append(address)
        if renamed is None and answer.canonical.lower() != host.name.lower():
            renamed = answer.canonical
    if renamed:
        host.name = renamed
    ordered: list[str] = []
    families = ["A", "AAAA"] if whichrrs & IPV4_FIRST else ["AAAA", "A"]
    for family in families:
        group = list(groups[family])
        RANDOM.shuffle(group)
        ordered.extend(group)
    if not ordered:
        return (HOST_FIND_SECURITY if dnssec_fail else HOST_IGNORED), [host]
    items = [host.copy(address=address) for address in ordered]
    return HOST_FOUND, items


#: Exim's default check_dns_names_pattern: names that cannot be in the DNS
#: are not looked up (dns_basic_lookup()).
DNS_NAMES_PATTERN = r"(?i)^(?>(?(1)\.|())[^\W](?>[a-z0-9/_-]*[^\W])?)+(\.?)$"


def dns_name_ok(name: str, ctx: Any) -> bool:
    """Whether *name* passes check_dns_names_pattern (an empty pattern
    checks nothing)."""
    from twisted_mta.expand.errors import ExpansionError
    from twisted_mta.expand.regex import compile_regex

    config = getattr(ctx, "config", None)
    pattern = config.get("check_dns_names_pattern", DNS_NAMES_PATTERN) \
        if config is not None else DNS_NAMES_PATTERN
    if not pattern:
        return True
    try:
        return compile_regex(pattern).search(name) is not None
    except ExpansionError:
        return True


@dataclass
class DnssecDomains:
    """The router's dnssec_request_domains and dnssec_require_domains."""

    request: str | None = "*"
    require: str | None = None


async def find_bydns(host: HostItem, ignore: str | None, whichrrs: int, ctx: Any, *,
                     srv_service: str | None = None, srv_fail_domains: str | None = None,
                     mx_fail_domains: str | None = None,
                     dnssec: DnssecDomains | None = None,
                     following_mx: int | None = None
                     ) -> tuple[str, list[HostItem], str, bool]:
    """host_find_bydns(): SRV (if asked), then MX, then address records.

    Returns (yield, items, fully qualified name, local hosts removed).  A
    host whose addresses could not be found stays in the list with address
    None and ``unusable`` set."""
    host.extra.pop("syntax_error", None)
    if not dns_name_ok(host.name, ctx):
        # Exim's host_find_failed_syntax: the name cannot be in the DNS.
        host.extra["syntax_error"] = True
        return HOST_FIND_FAILED, [host], host.name, False
    require = bool(dnssec) and bool(await in_domain_list(host.name, dnssec.require, ctx))
    request = require or (bool(dnssec) and bool(await in_domain_list(
        host.name, dnssec.request, ctx)))
    fqdn = host.name
    qualify = bool(whichrrs & QUALIFY_SINGLE)
    parents = bool(whichrrs & SEARCH_PARENTS)
    rc = _DNS_FAIL
    answer: _Answer | None = None
    ind_type = ""
    if whichrrs & BY_SRV and srv_service:
        ind_type = "SRV"
        prefix = f"_{srv_service}._tcp."
        rc, answer = await _dns_lookup(prefix + host.name, "SRV", ctx, request, qualify, parents)
        if answer is not None and answer.name.startswith(prefix):
            fqdn = answer.name[len(prefix):]
        if rc == _DNS_SUCCEED and require and answer is not None and not answer.secure:
            rc = _DNS_FAIL
        if rc in (_DNS_FAIL, _DNS_AGAIN):
            if not await in_domain_list(host.name, srv_fail_domains, ctx):
                return HOST_FIND_AGAIN, [host], fqdn, False
    ind_dnssec = "unknown"
    if rc != _DNS_SUCCEED and whichrrs & BY_MX:
        ind_type = "MX"
        rc, answer = await _dns_lookup(host.name, "MX", ctx, request, qualify, parents)
        if answer is not None:
            fqdn = answer.name
            if request:
                ind_dnssec = "yes" if answer.secure else "no"
        if rc == _DNS_NOMATCH:
            return HOST_FIND_FAILED, [host], fqdn, False
        if rc == _DNS_SUCCEED and require and answer is not None and not answer.secure:
            if not await in_domain_list(host.name, mx_fail_domains, ctx):
                return HOST_FIND_SECURITY, [host], fqdn, False
            rc = _DNS_FAIL
        if rc in (_DNS_FAIL, _DNS_AGAIN):
            if not await in_domain_list(host.name, mx_fail_domains, ctx):
                return HOST_FIND_AGAIN, [host], fqdn, False
    elif rc == _DNS_SUCCEED and answer is not None and request:
        ind_dnssec = "yes" if answer.secure else "no"

    if rc != _DNS_SUCCEED:
        if not whichrrs & (BY_A | BY_AAAA):
            return HOST_FIND_FAILED, [host], fqdn, False
        host.mx = MX_NONE
        host.port = None
        host.dnssec = "unknown"
        # The address lookup may qualify the name itself.
        names = _candidates(host.name, getattr(ctx, "resolver", None), qualify, parents)
        result, items = HOST_FIND_FAILED, [host]
        for candidate in names:
            trial = host.copy(name=candidate)
            result, items = await _set_address_from_dns(
                trial, ignore, ctx, False, request, require, whichrrs)
            if result != HOST_FIND_FAILED:
                if candidate != host.name:
                    fqdn = candidate
                break
        if result == HOST_FOUND:
            result, items, removed = await scan_for_local_hosts(items, ctx, following_mx)
            return result, items, fqdn, removed
        if result == HOST_IGNORED:
            result = HOST_FIND_FAILED
        host.address = None
        return result, [host], fqdn, False

    assert answer is not None
    # MX or SRV records: order them, dropping repeated names.
    chain: list[HostItem] = []
    for record in answer.records:
        if ind_type == "MX":
            precedence = int(record.preference)
            weight = RANDOM.randrange(500)
            port = None
            target = _target(record.exchange)
        else:
            precedence = int(record.priority)
            weight = int(record.weight)
            port = int(record.port)
            target = _target(record.target)
        duplicate = next((i for i, h in enumerate(chain) if h.name.lower() == target.lower()),
                         None)
        if duplicate is not None:
            if precedence >= chain[duplicate].mx:
                continue
            if duplicate == 0:
                chain[0].mx = precedence
                chain[0].sort_key = precedence * 1000 + weight
                continue
            del chain[duplicate]
        item = HostItem(target, None, port, precedence, precedence * 1000 + weight,
                        ind_dnssec)
        index = len(chain)
        while index > 0 and chain[index - 1].sort_key > item.sort_key:
            index -= 1
        chain.insert(index, item)
    if not chain:
        return HOST_FIND_FAILED, [host], fqdn, False
    if ind_type == "SRV":
        if len(chain) == 1 and chain[0].name == "":
            return HOST_FIND_FAILED, chain, fqdn, False
        chain = _srv_order(chain)

    result = HOST_FIND_FAILED
    filled: list[HostItem] = []
    wanted = BY_A if whichrrs & IPV4_ONLY else BY_A | BY_AAAA
    wanted |= whichrrs & IPV4_FIRST
    allow_ip = bool(getattr(ctx, "config", None) and ctx.config.get("allow_mx_to_ip"))
    for item in chain:
        found, items = await _set_address_from_dns(item, ignore, ctx, allow_ip, request,
                                                   require, wanted)
        if found == HOST_FOUND:
            filled.extend(items)
            continue
        item.address = None
        item.unusable = {HOST_FIND_AGAIN: "deferred", HOST_FIND_SECURITY: "insecure",
                         HOST_IGNORED: "ignored"}.get(found, "failed")
        if found in (HOST_FIND_AGAIN, HOST_FIND_SECURITY):
            result = found
        filled.append(item)

    if ignore:
        kept = [h for h in filled if h.unusable != "ignored"]
        filled = kept or filled[-1:]
        if filled[0].unusable == "ignored":
            filled[0].address = None

    _prefer_family_within_mx(filled, bool(whichrrs & IPV4_FIRST))
    filled = remove_duplicates(filled)
    scanned, filled, removed = await scan_for_local_hosts(filled, ctx, following_mx)
    if scanned != HOST_FIND_FAILED:
        result = scanned
    return result, filled, fqdn, removed


def _prefer_family_within_mx(items: list[HostItem], ipv4_first: bool) -> None:
    """Exim's single pass that moves IPv6 (or, with ipv4_prefer, IPv4)
    addresses ahead within one MX value."""
    for i in range(len(items) - 1):
        h, following = items[i], items[i + 1]
        if h.mx != following.mx or h.address is None:
            continue
        h6 = ":" in h.address
        n6 = following.address is not None and ":" in following.address
        n4 = following.address is not None and ":" not in following.address
        if ipv4_first:
            if not h6 or n6:
                continue
        elif h6 or n4:
            continue
        items[i], items[i + 1] = following, h


def _srv_order(chain: list[HostItem]) -> list[HostItem]:
    """RFC 2782 weighted ordering within each priority."""
    ordered: list[HostItem] = []
    index = 0
    while index < len(chain):
        end = index
        while end + 1 < len(chain) and chain[end + 1].mx == chain[index].mx:
            end += 1
        group = chain[index:end + 1]
        while group:
            total = sum(h.sort_key % 1000 for h in group)
            pick = RANDOM.randrange(total + 1)
            running = 0
            chosen = group[-1]
            for h in group:
                running += h.sort_key % 1000
                if running >= pick:
                    chosen = h
                    break
            group.remove(chosen)
            chosen.sort_key = chosen.mx * 1000 + RANDOM.randrange(500)
            ordered.append(chosen)
        index = end + 1
    return ordered


# -- the "self" option ----------------------------------------------------------------------


def parse_self(value: Any) -> tuple[str, str | None, bool]:
    """(action, new domain, rewrite) from ``self = freeze | defer | fail |
    pass | send | reroute:[rewrite:]domain``."""
    text = str(value or "freeze").strip()
    if text.lower().startswith("reroute:"):
        rest = text[8:].strip()
        rewrite = rest.lower().startswith("rewrite:")
        if rewrite:
            rest = rest[8:].strip()
        return "reroute", rest, rewrite
    return text.lower(), None, False


def self_message(host: HostItem | Host) -> str:
    if host.mx is not None and host.mx >= 0:
        return "lowest numbered MX record points to local host"
    return "remote host address is the local host"


async def self_action(router: Any, address: DeliveryAddress, host: HostItem,
                      rctx: Any) -> Any:
    """rf_self_action(): what the ``self`` option says to do when the first
    host is this machine.  Returns None for ``send`` (carry on), else the
    RouterResult."""
    from twisted_mta.routers.engine import DEFER, FAIL, PASS, RouterResult

    action, domain, _rewrite = parse_self(router.get("self"))
    message = self_message(host)
    if action == "send":
        return None
    if action == "reroute" and domain:
        return reroute(address, domain)
    if action == "pass":
        address.extra["self_hostname"] = host.name
        return RouterResult(PASS, message)
    if action == "fail":
        return RouterResult(FAIL, message, pass_message=True)
    if action == "defer":
        return RouterResult(DEFER, message)
    _log_self(rctx, address, message)
    address.special_action = "freeze"
    return RouterResult(DEFER, message)


def reroute(address: DeliveryAddress, domain: str) -> Any:
    """rf_change_domain(): a child with the new domain, routed again from
    the first router."""
    from twisted_mta.routers.engine import REROUTE, RouterResult

    child = address.child(f"{address.local_part}@{domain}",
                          address_data=address.address_data)
    return RouterResult(REROUTE, children=[child])


def self_log_line(message: str, address: DeliveryAddress, message_id: str | None,
                  fullhost: str | None) -> str:
    """The main-log line rf_self_action() writes for ``self = freeze``
    (Exim 4.96).  During a delivery (a message id) the address is left out,
    as the delivery's own line names it; at SMTP time (no message id yet)
    the line names the address being verified and the client, otherwise
    (-bt, -bv) the address being routed."""
    line = f"{message}: {address.domain}"
    if message_id:
        return line
    if fullhost:
        return f"{line} (while verifying <{address.address}> from host {fullhost})"
    return f"{line} (while routing <{address.address}>)"


def _log_self(rctx: Any, address: DeliveryAddress, message: str) -> None:
    """Write self_log_line() to the context's log (``ctx.log``: a
    twisted_mta.log.Log, or -bt's StderrLog), which Exim's log_write()
    starts with the message id when there is one."""
    log = getattr(rctx.ctx, "log", None)
    if log is None:
        return
    message_id = _text_variable(rctx.ctx, "message_exim_id")
    text = self_log_line(message, address, message_id,
                         _text_variable(rctx.ctx, "sender_fullhost"))
    try:
        if message_id:
            log.main(text, message_id)
        else:
            log.main(text)
    except Exception:  # logging must never break routing
        pass


def _text_variable(ctx: Any, name: str) -> str | None:
    """An expansion variable's value (variables may be callables), None
    when unset or empty."""
    value = ctx.variables.get(name)
    if callable(value):
        value = value()
    return str(value) if value else None


# -- manualroute's host list (rf_lookup_hostlist) ---------------------------------------------


@dataclass
class HostListResult:
    """What L{lookup_hostlist} decided: *result* is None when the hosts
    were found (then in *hosts*), else the RouterResult to return."""

    result: Any
    hosts: list[HostItem]
    local_removed: bool = False


async def lookup_hostlist(router: Any, address: DeliveryAddress, rctx: Any,
                          hosts: list[HostItem], ignore: str | None, lookup_type: int,
                          host_find_failed: str) -> HostListResult:
    """rf_lookup_hostlist(): find the addresses of each configured host
    (``name/MX`` means the hosts of name's MX records), apply
    host_find_failed, and treat local hosts: a local host after others
    ends the list, a local first host is the ``self`` option's business."""
    from twisted_mta.routers.engine import DECLINE, DEFER, FAIL, PASS, RouterResult

    ctx = rctx.ctx
    dnssec = DnssecDomains(router.get("dnssec_request_domains", "*"),
                           router.get("dnssec_require_domains"))
    final: list[HostItem] = []
    self_send = False
    local_removed = False
    for index, host in enumerate(hosts):
        following_mx = hosts[index + 1].mx if index + 1 < len(hosts) else None
        port = get_port(host)
        mx = host.mx
        sort_key = host.sort_key
        if len(host.name) > 3 and host.name[-3:].lower() == "/mx":
            whichrrs = BY_MX
            if lookup_type & LK_IPV4_ONLY:
                whichrrs |= IPV4_ONLY
            elif lookup_type & LK_IPV4_PREFER:
                whichrrs |= IPV4_FIRST
            mx = MX_NONE
            host.name = host.name[:-3]
            rc, found, _fqdn, _removed = await find_bydns(
                host, ignore, whichrrs, ctx, dnssec=dnssec, following_mx=following_mx)
        elif lookup_type & LK_BYNAME or parse_ip(host.name) is not None:
            rc, found = await find_byname(host, ignore, ctx, following_mx=following_mx)
        else:
            if lookup_type & LK_IPV4_ONLY:
                whichrrs = BY_A
            elif lookup_type & LK_IPV4_PREFER:
                whichrrs = BY_A | BY_AAAA | IPV4_FIRST
            else:
                whichrrs = BY_A | BY_AAAA
            rc, found, _fqdn, removed = await find_bydns(
                host, ignore, whichrrs, ctx, dnssec=dnssec, following_mx=following_mx)
            if rc == HOST_FOUND and removed:
                local_removed = True
            if rc == HOST_FIND_FAILED and lookup_type & LK_DEFAULT:
                host.extra.pop("syntax_error", None)
                rc, found = await find_byname(host, ignore, ctx, following_mx=following_mx)

        if rc == HOST_FIND_SECURITY:
            return HostListResult(RouterResult(
                DEFER, f"host lookup for {host.name} done insecurely"), final)
        if rc == HOST_FIND_AGAIN:
            if router.get("pass_on_timeout"):
                return HostListResult(RouterResult(PASS), final)
            return HostListResult(RouterResult(
                DEFER, f"host lookup for {host.name} did not complete (DNS timeout?)"), final)
        if rc == HOST_FIND_FAILED:
            if host_find_failed == "ignore":
                continue
            if host_find_failed == "pass":
                return HostListResult(RouterResult(PASS), final)
            if host_find_failed == "decline":
                return HostListResult(RouterResult(DECLINE), final)
            message = f'lookup of host "{host.name}" failed in {router.name} router'
            if host.extra.get("syntax_error"):
                message += ": syntax error in name"
            if host_find_failed == "defer":
                return HostListResult(RouterResult(DEFER, message), final)
            if host_find_failed == "fail":
                return HostListResult(RouterResult(FAIL, message), final)
            address.special_action = "freeze"
            return HostListResult(RouterResult(DEFER, message), final)

        for item in found:
            if port is not None:
                item.port = port
            if mx != MX_NONE:
                item.mx = mx
                item.sort_key = sort_key
        if rc == HOST_FOUND_LOCAL and not self_send:
            if final:
                local_removed = True
                break
            action = await self_action(router, address, found[0], rctx)
            if action is not None:
                return HostListResult(action, [])
            self_send = True
        final.extend(found)
    return HostListResult(None, final, local_removed)


def transport_is_local(config: Any, name: str | None) -> bool:
    """Whether transport *name* delivers on this host (every driver but
    smtp)."""
    if not name or config is None:
        return False
    instance = config.transport(name) if hasattr(config, "transport") else None
    if instance is None:
        return False
    return (instance.driver or "") != "smtp"
