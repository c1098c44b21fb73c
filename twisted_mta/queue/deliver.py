"""Delivering one message from the spool: Exim's deliver_message().

The message is locked (Exim's lock on the -D file, plus an in-process set,
since POSIX locks do not exclude the same process), its -H file read, every
recipient not yet done routed, and each delivery handed to its transport.
Every completed delivery is appended to the -J journal and fsynced before
anything else happens, so a crash delivers nothing twice except what was in
flight; at the end the -H file is rewritten with the done recipients (or the
message removed, ``Completed``) and the journal deleted.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

from twisted.internet import threads

from twisted_mta.queue.address import DELIVERED, FAILED, PENDING, DeliveryAddress
from twisted_mta.queue.deliverylog import deferral_line, delivery_line, failure_line
from twisted_mta.routers.engine import ACCEPT, DELIVER, FAIL, RoutingContext, route_address
from twisted_mta.spool.store import lock_data_file
from twisted_mta.spool.tree import tree_contains, tree_insert

# The outcomes of one delivery attempt.
COMPLETED, INCOMPLETE, LOCKED, FROZEN, MISSING = (
    "completed", "incomplete", "locked", "frozen", "missing")


@dataclass
class DeliverySettings:
    """What every delivery shares: configuration, spool, log, time and the
    places to run blocking work; *retry* is the retry machinery (None: no
    retry database, every defer is tried again at the next run) and
    *bounce* makes and spools the DSN for failed addresses."""

    config: Any
    spool: Any
    log: Any
    reactor: Any
    clock: Any
    threadpool: Any = None
    resolver: Any = None
    retry: Any = None
    bounce: Any = None
    #: Transport drivers by name; None for the built-in ones.
    transports: dict[str, Any] | None = None
    #: Ids being delivered in this process.
    active: set[str] = field(default_factory=set)


@dataclass
class DeliveryResult:
    outcome: str
    delivered: list[DeliveryAddress] = field(default_factory=list)
    failed: list[DeliveryAddress] = field(default_factory=list)
    deferred: list[DeliveryAddress] = field(default_factory=list)


class MessageDelivery:
    """One delivery attempt of one message."""

    def __init__(self, settings: DeliverySettings, message_id: str, *,
                 force: bool = False, thaw: bool = False) -> None:
        self.settings = settings
        self.config = settings.config
        self.message_id = message_id
        self.force = force
        self.thaw = thaw
        self.selector = getattr(settings.log, "selectors", frozenset())
        self._fd: int | None = None

    # -- blocking work, off the reactor thread -------------------------------------

    async def _io(self, function: Any, *args: Any) -> Any:
        pool = self.settings.threadpool
        if pool is None:
            return function(*args)
        return await threads.deferToThreadPool(self.settings.reactor, pool, function, *args)

    def _log(self, text: str, targets: tuple[str, ...] = ("main",)) -> None:
        self.settings.log.write(text, targets, self.message_id)

    # -- the attempt ------------------------------------------------------------------

    async def run(self) -> DeliveryResult:
        settings = self.settings
        if self.message_id in settings.active:
            return DeliveryResult(LOCKED)
        settings.active.add(self.message_id)
        try:
            try:
                locked = await self._io(self._lock)
            except FileNotFoundError:
                return DeliveryResult(MISSING)
            if not locked:
                return DeliveryResult(LOCKED)
            return await self._deliver()
        finally:
            settings.active.discard(self.message_id)
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None

    def _lock(self) -> bool:
        fd = os.open(self.settings.spool.locate(self.message_id).data, os.O_RDWR)
        try:
            lock_data_file(fd)
        except (BlockingIOError, PermissionError):
            os.close(fd)
            return False
        self._fd = fd
        return True

    async def _deliver(self) -> DeliveryResult:
        spool = self.settings.spool
        try:
            message = await self._io(spool.read_header, self.message_id)
        except FileNotFoundError:
            return DeliveryResult(MISSING)
        self.message = message
        if message.frozen_at is not None:
            if not self.thaw:
                return DeliveryResult(FROZEN)
            message.frozen_at = None
            self._log("Unfrozen by forced delivery")
        await self._io(self._recover_journal, message)
        ctx = self._context(message)
        result = DeliveryResult(INCOMPLETE)
        addresses = [DeliveryAddress(r.address, number=i, orcpt=r.orcpt,
                                     dsn_flags=r.dsn_flags, errors_to=r.errors_to)
                     for i, r in enumerate(message.recipients)
                     if not tree_contains(message.non_recipients, r.address)]
        rctx = RoutingContext(self.config, ctx, DELIVER, sender=message.sender)
        deliveries: list[DeliveryAddress] = []
        for address in addresses:
            routed = await route_address(rctx, address)
            if routed.kind == ACCEPT:
                for delivery in routed.deliveries:
                    if not tree_contains(message.non_recipients, delivery.unique):
                        deliveries.append(delivery)
                for problem in routed.problems:
                    self._routing_problem(problem, result)
            elif routed.kind == FAIL:
                address.router = routed.router
                address.fail(routed.message or "Unrouteable address")
                self._log(failure_line(address, sender=message.sender,
                                       selector=self.selector))
                result.failed.append(address)
            else:
                address.router = routed.router
                address.defer(routed.message or "routing deferred")
                self._log(deferral_line(address, driver_kind="router" if routed.router
                                        else "routing", selector=self.selector))
                result.deferred.append(address)
        for delivery in deliveries:
            await self._deliver_one(delivery, ctx, result)
        return await self._finish(message, addresses, result)

    def _routing_problem(self, address: DeliveryAddress, result: DeliveryResult) -> None:
        if address.status == FAILED:
            address.fail(address.message or "Unrouteable address")
            self._log(failure_line(address, sender=self.message.sender,
                                   selector=self.selector))
            result.failed.append(address)
        else:
            address.defer(address.message or "routing deferred")
            self._log(deferral_line(address, driver_kind="router", selector=self.selector))
            result.deferred.append(address)

    async def _deliver_one(self, address: DeliveryAddress, ctx: Any,
                           result: DeliveryResult) -> None:
        from twisted_mta.transports.base import TransportJob

        message = self.message
        if address.discarded is not None:
            address.succeed()
            self._log(f"=> {address.discarded} <{address.top.address}> R={address.router}")
            await self._journal(address)
            result.delivered.append(address)
            return
        instance = self.config.transport(address.transport) if address.transport else None
        if instance is None:
            what = address.transport or "no transport"
            address.defer(f"transport \"{what}\" not found" if address.transport else
                          f"No transport set by {address.router} router")
            self._log(deferral_line(address, driver_kind="router", selector=self.selector))
            result.deferred.append(address)
            return
        drivers = self.settings.transports
        driver = (drivers if drivers is not None else _transport_drivers()).get(
            instance.driver or "")
        if driver is None:
            address.defer(f"{instance.driver} transport not available in exim-py yet")
            self._log(deferral_line(address, driver_kind="transport", selector=self.selector))
            result.deferred.append(address)
            return
        self._set_address_variables(ctx, address)
        started = self.settings.clock.seconds()
        job = TransportJob(message=message,
                           data_path=self.settings.spool.locate(self.message_id).data,
                           addresses=[address], ctx=ctx, reactor=self.settings.reactor,
                           threadpool=self.settings.threadpool, clock=self.settings.clock,
                           log=self.settings.log, config=self.config)
        try:
            await driver.deliver(instance, job)
        except Exception as e:  # a transport bug must not lose the message
            address.defer(f"internal error in {instance.name} transport: {e}")
        address.extra["delivery_time"] = self.settings.clock.seconds() - started
        if address.status == DELIVERED:
            await self._journal(address)
            self._log(delivery_line(address, logchar="=", sender=message.sender,
                                    transport=driver,
                                    log_as_local=self._log_as_local(address),
                                    selector=self.selector,
                                    queue_time=self.settings.clock.seconds()
                                    - message.received[0]))
            result.delivered.append(address)
        elif address.status == FAILED:
            self._log(failure_line(address, sender=message.sender, selector=self.selector))
            result.failed.append(address)
        else:
            if address.status == PENDING:
                address.defer("transport gave no result")
            self._log(deferral_line(address, driver_kind="transport", selector=self.selector))
            result.deferred.append(address)

    def _log_as_local(self, address: DeliveryAddress) -> bool:
        router = self.config.router(address.router) if address.router else None
        return bool(router.get("log_as_local", True)) if router is not None else False

    # -- the journal and the -H file ---------------------------------------------------

    async def _journal(self, address: DeliveryAddress) -> None:
        """Record a completed delivery before anything else (-J)."""
        path = self.settings.spool.locate(self.message_id).journal
        await self._io(_append_synced, path, f"{address.unique}\n".encode("latin-1"))

    def _recover_journal(self, message: Any) -> None:
        """A journal left by a crashed delivery: its addresses are done."""
        path = self.settings.spool.locate(self.message_id).journal
        try:
            with open(path, encoding="latin-1") as f:
                done = [line.rstrip("\n") for line in f if line.endswith("\n")]
        except FileNotFoundError:
            return
        for address in done:
            message.non_recipients = _tree_add(message.non_recipients, address)
        self.settings.spool.write_header(message)
        os.unlink(path)

    async def _finish(self, message: Any, addresses: list[DeliveryAddress],
                      result: DeliveryResult) -> DeliveryResult:
        done = {a.unique for a in result.delivered}
        failed_tops = {a.top.number for a in result.failed}
        for delivery in result.delivered:
            if delivery.parent is not None:
                message.non_recipients = _tree_add(message.non_recipients, delivery.unique)
        deferred_tops = {a.top.number for a in result.deferred}
        for address in addresses:
            if address.number in deferred_tops:
                continue
            if address.number in failed_tops or address.unique in done or \
                    any(d.top is address for d in result.delivered):
                message.non_recipients = _tree_add(message.non_recipients, address.address)
        if result.failed and self.settings.bounce is not None:
            await self.settings.bounce(message, result.failed)
        remaining = [r for r in message.recipients
                     if not tree_contains(message.non_recipients, r.address)]
        if not remaining:
            await self._io(self.settings.spool.remove, self.message_id)
            self._log("Completed" + (f" QT={_queue_time(self, message)}"
                                     if "queue_time_overall" in self.selector else ""))
            result.outcome = COMPLETED
            return result
        message.deliver_firsttime = False
        await self._io(self._rewrite_header, message)
        result.outcome = INCOMPLETE
        return result

    def _rewrite_header(self, message: Any) -> None:
        self.settings.spool.write_header(message)
        try:
            os.unlink(self.settings.spool.locate(self.message_id).journal)
        except FileNotFoundError:
            pass

    # -- expansion variables -----------------------------------------------------------

    def _context(self, message: Any) -> Any:
        from twisted_mta.expand.context import ExpansionContext
        from twisted_mta.smtp.message import Header, IncomingMessage

        settings = self.settings
        ctx = ExpansionContext(config=self.config, reactor=settings.reactor,
                               threadpool=settings.threadpool, resolver=settings.resolver)
        variables = ctx.variables
        incoming = IncomingMessage(headers=[Header(h.text, h.flag) for h in message.headers])
        variables["__headers__"] = incoming.decoded_header_values()
        variables["__headers_list__"] = incoming.headers
        variables["message_exim_id"] = variables["message_id"] = self.message_id
        variables["sender_address"] = message.sender
        variables["return_path"] = message.sender
        local, _, domain = message.sender.rpartition("@")
        variables["sender_address_local_part"] = local
        variables["sender_address_domain"] = domain
        variables["received_protocol"] = message.received_protocol or ""
        variables["received_time"] = str(message.received[0])
        variables["message_age"] = str(int(settings.clock.seconds() - message.received[0]))
        for name, value in (("sender_host_address", message.host_address),
                            ("sender_host_name", message.host_name),
                            ("sender_helo_name", message.helo_name),
                            ("authenticated_id", message.auth_id),
                            ("authenticated_sender", message.auth_sender),
                            ("dsn_envid", message.dsn_envid)):
            if value:
                variables[name] = value
        variables.update(message.acl_vars)
        try:
            size = os.path.getsize(settings.spool.locate(self.message_id).data)
        except OSError:
            size = 0
        variables["message_size"] = str(size + sum(len(h.text) for h in message.headers)
                                        - len(self.message_id) - 3)
        variables["recipients_count"] = str(len(message.recipients))
        return ctx

    def _set_address_variables(self, ctx: Any, address: DeliveryAddress) -> None:
        variables = ctx.variables
        variables["local_part"] = address.extra.get("routed_local_part", address.local_part)
        variables["domain"] = address.domain
        variables["local_part_prefix"] = address.prefix
        variables["local_part_suffix"] = address.suffix
        top = address.top
        variables["original_local_part"] = top.local_part
        variables["original_domain"] = top.domain
        for name, value in (("address_data", address.address_data),
                            ("home", address.home_directory)):
            if value is None:
                variables.pop(name, None)
            else:
                variables[name] = value


def _append_synced(path: str, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)


def _queue_time(delivery: MessageDelivery, message: Any) -> str:
    from twisted_mta.values import format_time

    return format_time(int(delivery.settings.clock.seconds() - message.received[0]))


def _transport_drivers() -> dict[str, Any]:
    try:
        from twisted_mta.transports import drivers
    except ImportError:
        return {}
    return drivers()


def _tree_add(root: Any, name: str) -> Any:
    return tree_insert(root, name)[0]
