"""Quoting for SQL and LDAP lookups (``${quote_mysql:}``, ``${quote_pgsql:}``,
``${quote_ldap:}``, ``${quote_ldap_dn:}``).

exim-py has no MySQL, PostgreSQL or LDAP client: these lookup types exist so
that their quoting operators give Exim's results, and a lookup of one of
them defers with a message saying it is not supported.
"""

from __future__ import annotations

from typing import Any

from zope.interface import implementer

from twisted_mta.expand.errors import LookupDefer
from twisted_mta.interfaces import ILookup
from twisted_mta.lookups.search import register_lookup

_SQL_ESCAPES = {"\n": "n", "\t": "t", "\r": "r", "\b": "b"}


def quote_mysql(value: str) -> str:
    """Backslash newline, tab, CR, backspace, quotes and backslash."""
    out = []
    for c in value:
        if c in "\n\t\r\b'\"\\":
            out.append("\\" + _SQL_ESCAPES.get(c, c))
        else:
            out.append(c)
    return "".join(out)


def quote_pgsql(value: str) -> str:
    """As for MySQL, except that a single quote is doubled."""
    return "".join("''" if c == "'" else quote_mysql(c) for c in value)


_ALWAYS_LITERAL = "!$'-._"
_URL_NONQUOTE = _ALWAYS_LITERAL + "()*+"
_LDAP_QUOTE = "*()\\"
_LDAP_DN_QUOTE = ',+"\\<>;'


def _is_alnum(c: str) -> bool:
    return c.isascii() and c.isalnum()


def quote_ldap(value: str) -> str:
    """Quote for an LDAP filter inside a URL (RFC 2254 then URL escaping)."""
    out = []
    for c in value:
        if _is_alnum(c):
            out.append(c)
        elif c in _LDAP_QUOTE:
            out.append(f"%5C{ord(c):02X}")
        elif c not in _URL_NONQUOTE:
            out.append(f"%{ord(c):02X}")
        else:
            out.append(c)
    return "".join(out)


def quote_ldap_dn(value: str) -> str:
    """Quote for an LDAP DN inside a URL (RFC 2253 then URL escaping):
    leading blanks and ``#`` and trailing blanks are backslashed too."""
    end = len(value.rstrip(" "))
    out = []
    pos = 0
    while pos < end and value[pos] in " #":
        out.append(f"%5C%{ord(value[pos]):02X}")
        pos += 1
    for c in value[pos:end]:
        if _is_alnum(c):
            out.append(c)
            continue
        if c in _LDAP_DN_QUOTE:
            out.append("%5C")
        out.append(c if c in _URL_NONQUOTE else f"%{ord(c):02X}")
    out.append("%5C%20" * (len(value) - end))
    return "".join(out)


@implementer(ILookup)
class UnsupportedQuery:
    """A query-style lookup type known only for its quoting (an L{ILookup})."""

    query_style = True
    cacheable = True

    def __init__(self, name: str, quoter: Any, options: tuple[str | None, ...] = (None,)) -> None:
        self.name = name
        self._quoter = quoter
        self._options = options

    async def find(self, source: str | None, key: str, options: dict[str, str], context: Any) -> str | None:
        raise LookupDefer(f"{self.name} lookups are not supported by exim-py")

    def quote(self, value: str, extra: str | None) -> str | None:
        if extra not in self._options:
            return None
        if extra == "dn":
            return quote_ldap_dn(value)
        return self._quoter(value)


register_lookup(UnsupportedQuery("mysql", quote_mysql))
register_lookup(UnsupportedQuery("pgsql", quote_pgsql))
for _name in ("ldap", "ldapdn", "ldapm"):
    register_lookup(UnsupportedQuery(_name, quote_ldap, (None, "dn")))
