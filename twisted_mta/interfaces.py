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


class IRouter(Interface):
    """One router driver (``accept``, ``redirect``, ``manualroute``...).

    The routing engine (L{twisted_mta.routers.engine}) checks the generic
    preconditions in Exim's order before it calls the driver, and applies the
    generic options (``transport``, ``errors_to``, ``headers_add``...) after
    the driver accepts.
    """

    name = Attribute("The driver name as written after ``driver =``.")

    def route(instance, address, context):
        """
        Decide what happens to *address*.

        @param instance: the L{twisted_mta.config.model.DriverInstance}.
        @param address: the L{twisted_mta.queue.address.DeliveryAddress}; the
            driver may set its hosts, transport and generated children.
        @param context: the L{twisted_mta.routers.engine.RoutingContext}.
        @return: an awaitable firing with a
            L{twisted_mta.routers.engine.RouterResult}.
        """


class ITransport(Interface):
    """One transport driver (``appendfile``, ``pipe``, ``lmtp``, ``smtp``)."""

    name = Attribute("The driver name as written after ``driver =``.")
    local = Attribute("True for transports that deliver on this host.")

    def deliver(instance, job):
        """
        Deliver one message to a batch of addresses.

        @param instance: the L{twisted_mta.config.model.DriverInstance}.
        @param job: the L{twisted_mta.transports.base.TransportJob}: the
            message, the addresses, the expansion context, the clock, the
            thread pool and the reactor.
        @return: an awaitable firing when every address in the job has a
            result set (L{twisted_mta.queue.address.DeliveryAddress.succeed},
            C{defer} or C{fail}); it must not raise for delivery errors.
        """
