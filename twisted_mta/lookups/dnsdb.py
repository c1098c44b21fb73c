"""``dnsdb``: DNS records as lookup data (Exim's ``lookups/dnsdb.c``).

Query syntax, in this order::

    [>S[,T | ;]] [defer_X,] [dnssec_X,] [retrans_TIME,] [retry_N,] [type=]domain-list

``>S`` sets the separator between records (default newline); ``,T`` the
separator between the parts of one record (TXT strings, MX, SRV, TLSA and
SOA fields) and ``;`` joins TXT strings with nothing.  The type defaults to
TXT.  The domain list is an Exim list (``<`` changes the separator); a PTR
lookup of a single IP address needs no list quoting.  See doc/lookups.md.
"""

from __future__ import annotations

import re
from typing import Any

from twisted.logger import Logger
from zope.interface import implementer

from twisted_mta.dns import DnsAnswer, DnsNotFound, DnsTempFail
from twisted_mta.expand.errors import LookupDefer
from twisted_mta.interfaces import ILookup
from twisted_mta.lookups.iputil import ip_address_version, reverse_name
from twisted_mta.lookups.search import register_lookup
from twisted_mta.values import parse_time, split_list

log = Logger()

C_SPACE = " \t\n\v\f\r"

# dnsdb type name -> the DNS type queried.  a+ queries AAAA then A.
_TYPES = {
    "a": "A", "a+": "A+", "aaaa": "AAAA", "cname": "CNAME", "csa": "SRV",
    "mx": "MX", "mxh": "MX", "ns": "NS", "ptr": "PTR", "soa": "SOA",
    "spf": "SPF", "srv": "SRV", "tlsa": "TLSA", "txt": "TXT", "zns": "NS",
}

# Exim's default dns_csa_search_limit.
CSA_SEARCH_LIMIT = 5

class _Query:
    """A parsed dnsdb query."""

    def __init__(self, text: str) -> None:
        self.outsep = "\n"
        self.outsep2: str | None = None
        self.defer_mode = "lax"
        self.dnssec_mode = "lax"
        self.timeout: float | None = None
        self.retry: int | None = None
        self.retrans: int | None = None
        rest = text.lstrip(C_SPACE)
        if rest.startswith(">"):
            self.outsep = rest[1:2]
            rest = rest[2:]
            if rest.startswith(","):
                self.outsep2 = rest[1:2]
                rest = rest[2:]
            elif rest.startswith(";"):
                self.outsep2 = ""
                rest = rest[1:]
            rest = rest.lstrip(C_SPACE)
        rest = self._modifiers(rest)
        self.type = "txt"
        equals = rest.find("=")
        if equals >= 0:
            name = rest[:equals].rstrip(C_SPACE).lower()
            if name not in _TYPES:
                raise LookupDefer("unsupported DNS record type")
            self.type = name
            rest = rest[equals + 1:].lstrip(C_SPACE)
        if self.outsep2 is None:
            if self.type == "spf":
                self.outsep2 = ""
            elif self.type in ("srv", "mx", "tlsa"):
                self.outsep2 = " "
        if self.type == "ptr" and not rest.startswith("<") and ip_address_version(rest):
            self.domains = [rest.strip(C_SPACE)]
        else:
            self.domains = split_list(rest)
        if self.retrans is not None:
            self.timeout = float(self.retrans * ((self.retry or 0) + 1))

    def _modifiers(self, rest: str) -> str:
        while True:
            lower = rest.lower()
            if lower.startswith("defer_") or lower.startswith("dnssec_"):
                kind, _, tail = lower.partition("_")
                for mode in ("strict", "lax", "never"):
                    if tail.startswith(mode):
                        setattr(self, f"{kind}_mode", mode)
                        rest = rest[len(kind) + 1 + len(mode):]
                        break
                else:
                    raise LookupDefer(f"unsupported dnsdb {kind} behaviour")
            elif lower.startswith("retrans_"):
                end = rest.find(",", 8)
                text = rest[8:end] if end >= 0 else ""
                value = int(text) if text.isdigit() else parse_time(text)
                if not value:
                    raise LookupDefer("unsupported dnsdb timeout value")
                self.retrans = value
                rest = rest[end:]
            elif lower.startswith("retry_"):
                m = re.match(r"[+-]?\d+", rest[6:])
                count = int(m.group(0)) if m else 0
                if count < 0:
                    raise LookupDefer("unsupported dnsdb retry count")
                self.retry = count
                rest = rest[6 + (m.end() if m else 0):]
            else:
                return rest
            rest = rest.lstrip(C_SPACE)
            if not rest.startswith(","):
                raise LookupDefer("dnsdb modifier syntax error")
            rest = rest[1:].lstrip(C_SPACE)


def _name_text(name: Any) -> str:
    text = name.to_text(omit_final_dot=True)
    return "." if text in ("", "@") else text


def format_record(dnsdb_type: str, record: Any, outsep2: str | None, direct: bool = True) -> str | None:
    """One record as dnsdb prints it, or None if it is skipped (CSA).

    @param direct: for CSA, whether the record is the one asked for rather
        than a parent domain's assertion."""
    sep = outsep2 or ""
    if dnsdb_type in ("txt", "spf"):
        strings = [s.decode("latin-1") for s in record.strings]
        if outsep2 is None:
            return strings[0] if strings else ""
        return outsep2.join(strings)
    if dnsdb_type == "tlsa":
        return f"{record.usage}{sep}{record.selector}{sep}{record.mtype}{sep}{record.cert.hex()}"
    if dnsdb_type == "mx":
        return f"{record.preference}{sep}{_name_text(record.exchange)}"
    if dnsdb_type == "mxh":
        return _name_text(record.exchange)
    if dnsdb_type == "srv":
        return f"{record.priority}{sep}{record.weight}{sep}{record.port}{sep}{_name_text(record.target)}"
    if dnsdb_type == "csa":
        if record.priority != 1:
            return None
        if not direct:
            flag = "X" if record.port & 1 else "?"
        elif record.weight < 2:
            flag = "N"
        elif record.weight == 2:
            flag = "Y"
        elif record.weight == 3:
            flag = "?"
        else:
            return None
        return f"{flag} {_name_text(record.target)}"
    if dnsdb_type == "soa":
        text = _name_text(record.mname)
        if outsep2 is not None:
            text += (
                f"{sep}{_name_text(record.rname)}{sep}{record.serial}{sep}{record.refresh}"
                f"{sep}{record.retry}{sep}{record.expire}{sep}{record.minimum}"
            )
        return text
    # cname, ns, zns, ptr
    return _name_text(record.target)


@implementer(ILookup)
class DnsdbLookup:
    """The ``dnsdb`` lookup type (an L{ILookup})."""

    name = "dnsdb"
    query_style = True
    cacheable = True

    async def find(self, source: str | None, key: str, options: dict[str, str], context: Any) -> str | None:
        query = _Query(key)
        resolver = getattr(context, "resolver", None)
        if resolver is None:
            raise LookupDefer("no DNS resolver available")
        dnssec = query.dnssec_mode != "never"
        variables = getattr(context, "variables", None)
        parts: list[str] = []
        deferred = False
        for domain in query.domains:
            if query.type in ("ptr", "csa") and ip_address_version(domain):
                domain = reverse_name(domain)
            subtypes = ("AAAA", "A") if query.type == "a+" else (_TYPES[query.type],)
            for rdtype in subtypes:
                try:
                    answer, found = await self._special(resolver, query, domain, rdtype, dnssec)
                except DnsNotFound:
                    continue
                except DnsTempFail as e:
                    log.info("dnsdb lookup of {domain} deferred: {error}", domain=domain, error=e)
                    answer = None
                if variables is not None:
                    variables["lookup_dnssec_authenticated"] = (
                        "" if not dnssec else "yes" if answer is not None and answer.secure else "no"
                    )
                if answer is None or (query.dnssec_mode == "strict" and not answer.secure):
                    if query.defer_mode == "strict":
                        raise LookupDefer("")
                    deferred = deferred or query.defer_mode == "lax"
                    continue
                for record in answer.records:
                    if rdtype in ("A", "AAAA"):
                        parts.append(record.address)
                        continue
                    text = format_record(query.type, record, query.outsep2, found == domain)
                    if text is not None:
                        parts.append(text)
        if parts:
            return query.outsep.join(parts)
        if deferred:
            raise LookupDefer("")
        return None

    async def _special(
        self, resolver: Any, query: _Query, domain: str, rdtype: str, dnssec: bool
    ) -> tuple[DnsAnswer, str]:
        """Exim's dns_special_lookup(): walk up the tree for zns and soa,
        and search parent domains for a CSA assertion."""
        if query.type == "csa":
            return await self._csa(resolver, query, domain, dnssec)
        if query.type not in ("zns", "soa"):
            return await resolver.lookup(domain, rdtype, dnssec, query.timeout), domain
        name = domain
        while True:
            try:
                return await resolver.lookup(name, rdtype, dnssec, query.timeout), domain
            except DnsNotFound:
                dot = name.find(".")
                if dot < 0:
                    raise
                name = name[dot + 1:]
                if not name:
                    raise

    async def _csa(self, resolver: Any, query: _Query, domain: str, dnssec: bool) -> tuple[DnsAnswer, str]:
        try:
            return await resolver.lookup(f"_client._smtp.{domain}", "SRV", dnssec, query.timeout), domain
        except DnsNotFound as e:
            if e.nxdomain:
                raise
            not_found = e
        suffix = domain.rfind(".")
        if suffix < 0:
            raise not_found
        limit = CSA_SEARCH_LIMIT
        ipv6 = False
        lower = domain.lower()
        if lower.endswith(".in-addr.arpa") and suffix - 8 > 0:
            suffix -= 8
            limit = 3
        elif lower.endswith(".ip6.arpa") and suffix - 4 > 0:
            suffix -= 4
            ipv6 = True
            limit = 3
        for _ in range(limit):
            if ipv6:
                suffix -= 8
                if suffix <= 0:
                    raise not_found
            else:
                suffix -= 1
                while suffix > 0 and domain[suffix] != ".":
                    suffix -= 1
                if suffix <= 0:
                    raise not_found
            parent = domain[suffix + 1:]
            try:
                answer = await resolver.lookup(f"_client._smtp.{parent}", "SRV", dnssec, query.timeout)
            except DnsNotFound:
                continue
            if any(r.priority == 1 and r.port & 1 for r in answer.records):
                return answer, parent
        raise not_found

    def quote(self, value: str, extra: str | None) -> None:
        return None


register_lookup(DnsdbLookup())
