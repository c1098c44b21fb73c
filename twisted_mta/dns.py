"""DNS lookups for exim-py: dnspython in a thread pool, with DNSSEC status.

dnspython's resolver blocks, so every query runs in the thread pool passed
in (``deferToThreadPool``) and the reactor never waits.  Each query has a
lifetime (the resolver gives up after it) and the Deferred has the same
deadline plus a second, so a caller is always answered.

DNSSEC: queries carry EDNS0 with the DO bit and the AD flag, and
L{DnsAnswer.secure} reports the AD bit of the reply, that is, whether the
(validating) resolver vouched for the data.  exim-py does not validate by
itself, just as Exim relies on its resolver.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from typing import Any

import dns.exception
import dns.flags
import dns.name
import dns.nameserver
import dns.resolver
from twisted.internet.defer import Deferred
from twisted.internet.defer import TimeoutError as DeferredTimeout
from twisted.internet.threads import deferToThreadPool

from twisted_mta.lookups.iputil import ip_address_version, reverse_name


class DnsError(Exception):
    """Base class of DNS lookup failures."""


class DnsNotFound(DnsError):
    """The name does not exist (NXDOMAIN) or has no records of the type
    (NODATA: then ``nxdomain`` is False)."""

    def __init__(self, message: str, nxdomain: bool) -> None:
        super().__init__(message)
        self.nxdomain = nxdomain


class DnsTempFail(DnsError):
    """No answer now: timeout, SERVFAIL, no server reachable."""


@dataclass(frozen=True)
class DnsAnswer:
    """A successful answer.

    @ivar name: the name asked for (after CNAMEs: see C{canonical_name}).
    @ivar rdtype: the type asked for (``MX``).
    @ivar records: dnspython rdata objects of that type, in answer order.
    @ivar secure: True if the reply had the AD (authenticated data) bit.
    @ivar ttl: the smallest TTL of the answer's records.
    @ivar canonical_name: the owner name of the records, after CNAMEs.
    """

    name: str
    rdtype: str
    records: list[Any]
    secure: bool
    ttl: int
    canonical_name: str


class Resolver:
    """Asynchronous DNS lookups for the rest of exim-py.

    @param nameservers: (address, port) pairs to query; None for the system
        configuration (``/etc/resolv.conf``).
    @param timeout: seconds each lookup may take in total.
    """

    def __init__(
        self,
        reactor: Any,
        threadpool: Any,
        nameservers: list[tuple[str, int]] | None = None,
        timeout: float = 5.0,
    ) -> None:
        self.reactor = reactor
        self.threadpool = threadpool
        self.timeout = timeout
        self._nameservers = nameservers
        self.hosts_file = "/etc/hosts"

    def _make_resolver(self, dnssec: bool, timeout: float) -> dns.resolver.Resolver:
        # A fresh dnspython resolver per query: they are cheap, and this keeps
        # per-query settings (DNSSEC, timeout) away from other threads.
        if self._nameservers is None:
            resolver = dns.resolver.Resolver(configure=True)
        else:
            resolver = dns.resolver.Resolver(configure=False)
            resolver.nameservers = [
                dns.nameserver.Do53Nameserver(address, port)
                for address, port in self._nameservers
            ]
        resolver.lifetime = timeout
        resolver.timeout = timeout
        resolver.retry_servfail = False
        if dnssec:
            resolver.use_edns(0, dns.flags.DO, 1232)
            resolver.flags = dns.flags.RD | dns.flags.AD
        return resolver

    def _blocking_lookup(self, name: str, rdtype: str, dnssec: bool, timeout: float) -> DnsAnswer:
        resolver = self._make_resolver(dnssec, timeout)
        qname = dns.name.from_text(name)
        try:
            answer = resolver.resolve(qname, rdtype, search=False)
        except dns.resolver.NXDOMAIN:
            raise DnsNotFound(f"{name}: no such domain", nxdomain=True) from None
        except dns.resolver.NoAnswer:
            raise DnsNotFound(f"{name}: no {rdtype} records", nxdomain=False) from None
        except dns.resolver.NoNameservers as e:
            raise DnsTempFail(f"{name}/{rdtype}: {e}") from None
        except dns.exception.Timeout:
            raise DnsTempFail(f"{name}/{rdtype}: timed out") from None
        except dns.exception.DNSException as e:
            raise DnsTempFail(f"{name}/{rdtype}: {e}") from None
        rrset = answer.rrset
        records = list(rrset) if rrset is not None else []
        secure = bool(answer.response.flags & dns.flags.AD)
        canonical = answer.canonical_name.to_text(omit_final_dot=True)
        return DnsAnswer(name, rdtype, records, secure, rrset.ttl if rrset else 0, canonical)

    async def lookup(
        self, name: str, rdtype: str, dnssec: bool = True, timeout: float | None = None
    ) -> DnsAnswer:
        """Look up records of type *rdtype* (``"MX"``) for *name*.

        @raise DnsNotFound: NXDOMAIN or no records of that type.
        @raise DnsTempFail: timeout, SERVFAIL, no server answered.
        """
        limit = self.timeout if timeout is None else timeout
        rdtype = rdtype.upper()
        d: Deferred = deferToThreadPool(
            self.reactor, self.threadpool, self._blocking_lookup, name, rdtype, dnssec, limit
        )
        d.addTimeout(limit + 1.0, self.reactor)
        try:
            return await d
        except DeferredTimeout:
            raise DnsTempFail(f"{name}/{rdtype}: timed out") from None

    async def lookup_ptr(self, ip: str) -> list[str]:
        """The host names in the PTR records for IP address *ip*
        (without trailing dots)."""
        answer = await self.lookup(reverse_name(ip), "PTR")
        return [record.target.to_text(omit_final_dot=True) for record in answer.records]

    async def hosts_file_names(self, ip: str) -> list[str]:
        """The names the hosts file gives IP address *ip* (its first line
        for that address, as gethostbyaddr() reads it): Exim's ``byaddr``
        half of host_lookup_order.  Empty when nameservers are explicit
        (a test resolver) or the file is unreadable."""
        if self._nameservers is not None:
            return []
        return await deferToThreadPool(self.reactor, self.threadpool,
                                       hosts_file_names, ip, self.hosts_file)

    async def host_addresses(self, name: str) -> list[str]:
        """The IPv6 and then IPv4 addresses of *name* (an IP address is
        returned as it is).

        @raise DnsNotFound: neither AAAA nor A records exist.
        @raise DnsTempFail: one of the lookups failed temporarily and the
            other found nothing.
        """
        if ip_address_version(name):
            return [name]
        addresses: list[str] = []
        failure: DnsError | None = None
        for rdtype in ("AAAA", "A"):
            try:
                answer = await self.lookup(name, rdtype)
            except DnsTempFail as e:
                failure = e
                continue
            except DnsNotFound as e:
                failure = failure if isinstance(failure, DnsTempFail) else e
                continue
            addresses.extend(record.address for record in answer.records)
        if not addresses and failure is not None:
            raise failure
        return addresses



def hosts_file_names(ip: str, path: str = "/etc/hosts") -> list[str]:
    """The names on the first line of hosts file *path* for address *ip*."""
    try:
        wanted = ipaddress.ip_address(ip)
    except ValueError:
        return []
    try:
        with open(path, encoding="latin-1") as hosts:
            for line in hosts:
                fields = line.split("#", 1)[0].split()
                if len(fields) < 2:
                    continue
                try:
                    address = ipaddress.ip_address(fields[0].split("%", 1)[0])
                except ValueError:
                    continue
                if address == wanted:
                    return fields[1:]
    except OSError:
        return []
    return []
