"""IP address helpers with Exim's rules (``string_is_ip_address()``,
``host_is_in_net()``), used by iplsearch and dnsdb."""

from __future__ import annotations

import ipaddress


def _split_mask(text: str) -> tuple[str, int | None]:
    slash = text.rfind("/")
    if slash > 0 and text[slash + 1:].isdigit() and text[slash + 1:].isascii():
        return text[:slash], int(text[slash + 1:])
    return text, None


def _parse(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    if not text.isascii():
        return None
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.scope_id is not None:
        address = ipaddress.IPv6Address(text.partition("%")[0])
    return address


def ip_address_version(text: str, allow_mask: bool = False) -> int:
    """4 or 6 if *text* is an IP address (with an optional ``/mask`` when
    *allow_mask*), else 0."""
    if allow_mask:
        text = _split_mask(text)[0]
    address = _parse(text)
    return 0 if address is None else address.version


def ip_in_network(host: str, net: str) -> bool:
    """True if IP address *host* is in *net* (an address with an optional
    mask; no mask means the whole address).  An IPv4-mapped IPv6 *host* is
    treated as IPv4; a malformed *net* never matches."""
    net_text, mask = _split_mask(net)
    network = _parse(net_text)
    address = _parse(host)
    if network is None or address is None:
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    if address.version != network.version:
        return False
    bits = network.max_prefixlen
    mask_bits = bits if mask is None else min(mask, bits)
    shift = bits - mask_bits
    return (int(address) >> shift) == (int(network) >> shift)


def reverse_name(ip: str) -> str:
    """The in-addr.arpa or ip6.arpa name for an IP address."""
    address = _parse(ip)
    if address is None:
        raise ValueError(f"not an IP address: {ip}")
    return address.reverse_pointer
