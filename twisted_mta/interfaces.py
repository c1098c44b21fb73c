"""The pluggable parts of exim-py, as zope.interface interfaces."""

from zope.interface import Attribute, Interface


class ILookup(Interface):
    """One Exim lookup type (``lsearch``, ``dnsdb``, ``redis``...)."""

    name = Attribute("The lookup type's name as written in a configuration, e.g. 'lsearch'.")
    query_style = Attribute(
        "True for query-style lookups (``${lookup dnsdb{query}}``), False for "
        "single-key ones (``${lookup{key}lsearch{file}}``)."
    )

    def find(source, key, options, context):
        """
        Look *key* up.

        @param source: the file or directory for single-key lookups, else None.
        @param key: the key, or the whole query for query-style lookups.
        @param options: dict of the ``,name=value`` options after the type.
        @param context: the L{twisted_mta.expand.context.ExpansionContext}.
        @return: an awaitable firing with the data (str) or None when not found.
            Raises L{twisted_mta.expand.errors.LookupDefer} when the answer is
            not available now, and ExpansionError for a hard error.
        """

    def quote(value, extra):
        """Return *value* quoted for use in a query (``${quote_<name>:value}``),
        or None when this lookup has no quoting operator."""
