"""Exim lookups: ``${lookup}``, lookup items in lists, ``${quote_<type>:}``.

See L{twisted_mta.lookups.search} for the entry points and doc/lookups.md
for the supported types."""

from twisted_mta.lookups.search import (
    LookupResult,
    LookupSpec,
    get_lookup,
    lookup_defer_message,
    lookup_names,
    parse_lookup_type,
    quote_for_lookup,
    register_lookup,
    search_find,
    search_find_full,
)

__all__ = [
    "LookupResult",
    "LookupSpec",
    "get_lookup",
    "lookup_defer_message",
    "lookup_names",
    "parse_lookup_type",
    "quote_for_lookup",
    "register_lookup",
    "search_find",
    "search_find_full",
]
