"""Exim's lookup machinery (``search.c``): type names, defaults, caching.

A lookup type as written in a configuration (``partial2-lsearch*@,ret=key``)
is parsed by L{parse_lookup_type} into a L{LookupSpec}; L{search_find} then
runs the lookup with partial matching, ``*``/``*@`` defaults, ``ret=key`` and
the per-context cache, calling one L{ILookup} provider from the registry.

Errors use Exim's texts.  A lookup that cannot answer now raises
L{LookupDefer} carrying Exim's *inner* message (``search_error_message``);
the expansion of ``${lookup}`` wraps it with L{lookup_defer_message}, while
list matching uses it as it is, as Exim does.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any

from twisted_mta.expand.errors import ExpansionError, TaintError
from twisted_mta.interfaces import ILookup
from twisted_mta.taint import is_tainted
from twisted_mta.values import split_list_with

# C's ispunct() in the "C" locale: the affix of partial(...) may only use these.
_PUNCT = frozenset("!\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~")

# Modules whose import registers the built-in lookup types.
# Built-in lookup types and the module that registers each.  Modules load on
# first use: redis and dnsdb pull in heavy libraries that most commands never
# need.
_BUILTIN_MODULES = {
    "lsearch": "twisted_mta.lookups.lsearch",
    "wildlsearch": "twisted_mta.lookups.lsearch",
    "nwildlsearch": "twisted_mta.lookups.lsearch",
    "iplsearch": "twisted_mta.lookups.lsearch",
    "dsearch": "twisted_mta.lookups.dsearch",
    "dnsdb": "twisted_mta.lookups.dnsdb",
    "redis": "twisted_mta.lookups.redis",
    "mysql": "twisted_mta.lookups.quoting",
    "pgsql": "twisted_mta.lookups.quoting",
    "ldap": "twisted_mta.lookups.quoting",
    "ldapdn": "twisted_mta.lookups.quoting",
    "ldapm": "twisted_mta.lookups.quoting",
}

_registry: dict[str, Any] = {}


@dataclass(frozen=True)
class LookupSpec:
    """A parsed lookup type.

    @ivar name: the lookup type (``lsearch``).
    @ivar partial: minimum number of non-wild components for partial
        matching, or None when there is no ``partial`` prefix.
    @ivar affix: the partial-matching affix (``*.`` by default).
    @ivar star: a ``*`` suffix: fall back to the key ``*``.
    @ivar star_at: a ``*@`` suffix: try ``*@domain`` and then ``*``.
    @ivar options: the text after the first comma (``ret=key,...``), or None.
    @ivar net: for host lists, the ``netN-`` prefix: None when absent, -1 for
        ``net-`` without a number, else the mask length.
    """

    name: str
    partial: int | None = None
    affix: str = ""
    star: bool = False
    star_at: bool = False
    options: str | None = None
    net: int | None = None

    @property
    def option_dict(self) -> dict[str, str]:
        """The options as a dict (``ret=full`` -> ``{'ret': 'full'}``; an
        option without ``=`` maps to the empty string)."""
        return parse_options(self.options)


@dataclass(frozen=True)
class LookupResult:
    """A successful lookup, with what list matching and ``$1``/``$2`` need.

    @ivar value: the data found (or the key, with ``ret=key``).
    @ivar key: the key that matched in the file (``*.example.com``, ``*``...).
    @ivar wild: the wild part of the subject (``$1`` after a partial match),
        or None when the lookup was not a partial or default one.
    @ivar fixed: the fixed part (``$2``), or None likewise.
    """

    value: str
    key: str
    wild: str | None = None
    fixed: str | None = None


def parse_options(options: str | None) -> dict[str, str]:
    """Split ``a=b,c`` (an Exim comma list) into ``{'a': 'b', 'c': ''}``."""
    result: dict[str, str] = {}
    if options:
        for item in split_list_with(options, ","):
            name, _, value = item.partition("=")
            result[name] = value
    return result


def register_lookup(provider: Any) -> None:
    """Add an L{ILookup} provider to the registry under its ``name``."""
    if not ILookup.providedBy(provider):
        raise TypeError(f"{provider!r} does not provide ILookup")
    _registry[provider.name] = provider


def _load_builtins() -> None:
    for module in set(_BUILTIN_MODULES.values()):
        importlib.import_module(module)


def get_lookup(name: str) -> Any:
    """The L{ILookup} provider for *name*; ExpansionError if there is none."""
    provider = _registry.get(name)
    if provider is None and name in _BUILTIN_MODULES:
        importlib.import_module(_BUILTIN_MODULES[name])
        provider = _registry.get(name)
    if provider is None:
        raise ExpansionError(f'unknown lookup type "{name}"')
    return provider


def lookup_names() -> list[str]:
    """The names of all registered lookup types, sorted."""
    _load_builtins()
    return sorted(_registry)


def parse_lookup_type(text: str) -> LookupSpec:
    """Parse a lookup type as written after ``${lookup{key}`` or before the
    ``;`` of a list item, following Exim's ``search_findtype_partial()``."""
    net = None
    rest = text
    if rest.startswith("net"):
        pos = 3
        while pos < len(rest) and rest[pos].isdigit():
            pos += 1
        if pos < len(rest) and rest[pos] == "-":
            net = int(rest[3:pos]) if pos > 3 else -1
            rest = rest[pos + 1:]
    partial = None
    affix = ""
    if rest.startswith("partial"):
        pos = 7
        start = pos
        while pos < len(rest) and rest[pos].isdigit():
            pos += 1
        partial = int(rest[start:pos]) if pos > start else 2
        if pos < len(rest) and rest[pos] == "(":
            pos += 1
            start = pos
            while pos < len(rest) and rest[pos] in _PUNCT and rest[pos] != ")":
                pos += 1
            if pos >= len(rest) or rest[pos] != ")":
                raise ExpansionError(f'format error in lookup type "{text}"')
            affix = rest[start:pos]
            pos += 1
        elif pos < len(rest) and rest[pos] == "-":
            affix = "*."
            pos += 1
        else:
            raise ExpansionError(f'format error in lookup type "{text}"')
        rest = rest[pos:]
    # Exim looks for '*' anywhere, then for ',' only after it.
    name_len = len(rest)
    star = star_at = False
    search_from = 0
    star_pos = rest.find("*")
    if star_pos >= 0:
        name_len = star_pos
        search_from = star_pos
        if rest[star_pos + 1:star_pos + 2] == "@":
            star_at = True
        else:
            star = True
    options = None
    comma = rest.find(",", search_from)
    if comma >= 0:
        name_len = min(name_len, comma)
        options = rest[comma + 1:]
    name = rest[:name_len]
    provider = get_lookup(name)
    if provider.query_style:
        if partial is not None:
            raise ExpansionError(f'"partial" is not permitted for lookup type "{rest}"')
        if star or star_at:
            raise ExpansionError(
                f'defaults using "*" or "*@" are not permitted for lookup type "{rest}"'
            )
    return LookupSpec(name, partial, affix, star, star_at, options, net)


def printing(text: str) -> str:
    """Exim's ``string_printing2(s, SP_TAB)``: escape non-printing bytes."""
    out = []
    for c in text:
        o = ord(c)
        if c == "\\":
            out.append("\\\\")
        elif 32 <= o < 127 or c == "\t":
            out.append(c)
        elif c == "\n":
            out.append("\\n")
        elif c == "\r":
            out.append("\\r")
        elif c == "\b":
            out.append("\\b")
        elif c == "\f":
            out.append("\\f")
        elif c == "\v":
            out.append("\\v")
        elif c == "\x1b":
            out.append("\\e")
        else:
            out.append(f"\\{o:03o}")
    return "".join(out)


def lookup_defer_message(key: str, error: ExpansionError) -> str:
    """The message ``${lookup}`` fails with when the lookup of *key* deferred:
    ``lookup of "KEY" gave DEFER: MESSAGE``."""
    return f'lookup of "{printing(key)}" gave DEFER: {error.message}'


class _Search:
    """One search_find() call: the provider, its options and the cache."""

    def __init__(self, spec: LookupSpec, source: str | None, ctx: Any) -> None:
        self.spec = spec
        self.source = source
        self.ctx = ctx
        self.provider = get_lookup(spec.name)
        self.ret_key = False
        self.cache_rd = True
        kept = []
        if spec.options:
            for item in split_list_with(spec.options, ","):
                if item == "ret=key":
                    self.ret_key = True
                elif item == "cache=no_rd":
                    self.cache_rd = False
                else:
                    kept.append(item.replace(",", ",,"))
        self.options_text = ",".join(kept) or None
        self.options = parse_options(self.options_text)

    async def find(self, key: str) -> str | None:
        if key == "":
            return None
        cache = getattr(self.ctx, "lookup_cache", None)
        cache_key = (self.spec.name, self.source, key, self.options_text)
        if cache is not None and self.cache_rd and cache_key in cache:
            return cache[cache_key]
        data = await self.provider.find(self.source, key, self.options, self.ctx)
        if cache is not None and getattr(self.provider, "cacheable", True):
            cache[cache_key] = data
        return data


async def search_find_full(
    spec: LookupSpec, source: str | None, key: str, ctx: Any
) -> LookupResult | None:
    """Run a lookup with Exim's partial matching and defaults.

    @param source: the file or directory for single-key lookups; None for
        query-style ones, whose query is *key*.
    @return: a L{LookupResult}, or None when nothing was found.
    @raise LookupDefer: the lookup could not be done now.
    @raise ExpansionError: a hard error (file missing, tainted file name...).
    """
    search = _Search(spec, source, ctx)
    if not search.provider.query_style:
        if source is None:
            raise ValueError(f"a {spec.name} lookup needs a file or directory name")
        if is_tainted(source):
            raise TaintError(f"Tainted filename for search: '{source}'")
    result = await _partial_search(search, key)
    if result is not None and search.ret_key:
        result = LookupResult(str(key), result.key, result.wild, result.fixed)
    return result


async def search_find(spec: LookupSpec, source: str | None, key: str, ctx: Any) -> str | None:
    """Like L{search_find_full} but return only the data (or None)."""
    result = await search_find_full(spec, source, key, ctx)
    return None if result is None else result.value


async def _partial_search(search: _Search, key: str) -> LookupResult | None:
    spec = search.spec
    data = await search.find(key)
    if data is not None:
        if spec.partial is not None:
            return LookupResult(data, key, "", key)
        return LookupResult(data, key)
    if spec.partial is not None:
        affix = spec.affix
        if affix:
            data = await search.find(affix + key)
            if data is not None:
                return LookupResult(data, affix + key, "", key)
        # Chop leading components while enough dots remain; Exim counts dots,
        # so "partial2" keeps two components.  At the very end it tries the
        # affix alone (without a trailing dot), then gives up.
        dots = key.count(".")
        pos = 0
        while dots >= spec.partial:
            dots -= 1
            dot = key.find(".", pos)
            if dot < 0:
                if not affix:
                    break
                attempt = affix[:-1] if len(affix) > 1 and affix.endswith(".") else affix
                fixed_len = 0
            else:
                pos = dot + 1
                attempt = affix + key[pos:]
                fixed_len = len(key) - pos
            data = await search.find(attempt)
            if data is not None:
                # Exim's arithmetic: after the bare affix, $1 loses a character.
                wild_len = len(key) - fixed_len - 1
                return LookupResult(data, attempt, key[:wild_len], key[wild_len + 1:])
            if dot < 0:
                break
    if spec.star_at:
        at = key.rfind("@")
        if at > 0:
            attempt = "*" + key[at:]
            data = await search.find(attempt)
            if data is not None:
                return LookupResult(data, attempt, key[:at], "")
    if spec.star or spec.star_at:
        data = await search.find("*")
        if data is not None:
            return LookupResult(data, "*", key, "")
    return None


def quote_for_lookup(name: str, value: str, extra: str | None) -> str:
    """``${quote_<name>_<extra>:value}``: quote *value* for lookup type *name*.

    A lookup type without a quoting function leaves the value alone, unless
    an option is given, as Exim does."""
    provider = get_lookup(name)
    quoted = provider.quote(value, extra)
    if quoted is None:
        if extra is None:
            return value
        raise ExpansionError(f'"{extra}" unrecognized after "${{quote_{name}"')
    return quoted

