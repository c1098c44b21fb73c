"""Delivering one message from the spool: Exim's deliver_message().

The message is locked (Exim's lock on the -D file, plus an in-process set,
since POSIX locks do not exclude the same process), its -H file read, every
recipient not yet done routed, and each delivery handed to its transport.
Every completed delivery is appended to the -J journal and fsynced before
anything else happens, so a crash delivers nothing twice except what was in
flight; at the end the -H file is rewritten with the done recipients (or the
message removed, ``Completed``) and the journal deleted.

The reports go out at the end, in Exim's order: the success DSN for the
addresses that asked for one, a bounce per errors address for the failed
ones, and a delay warning when the message stays with deferred addresses
and a ``delay_warning`` time has passed (:mod:`twisted_mta.dsn`).  A failed
address of a message whose sender is ``<>`` is not bounced: the message is
frozen (``Frozen (delivery error message)``) until
``ignore_bounce_errors_after``, when its failures are logged as ignored.
The new messages are delivered after this one: by
L{DeliverySettings.deliver_new}, or in place when that is None, unless
``queue_only`` is set.
"""

from __future__ import annotations

import errno
import os
from dataclasses import dataclass, field
from typing import Any

from twisted.internet import threads

from twisted_mta import events
from twisted_mta.dsn import IGNORE_ERROR, NOTIFY_ANY, ignore_error
from twisted_mta.queue.address import DEFERRED, DELIVERED, FAILED, PENDING, DeliveryAddress
from twisted_mta.queue.deliverylog import deferral_line, delivery_line, failure_line
from twisted_mta.routers.engine import ACCEPT, DELIVER, FAIL, RoutingContext, route_address
from twisted_mta.spool.message import NOTIFY_FAILURE
from twisted_mta.spool.store import DATA_START_OFFSET, MessagePaths, lock_data_file
from twisted_mta.spool.tree import tree_contains, tree_insert
from twisted_mta.transports.message import CHUNK_SIZE, spooled_body

# The outcomes of one delivery attempt.
COMPLETED, INCOMPLETE, LOCKED, FROZEN, MISSING = (
    "completed", "incomplete", "locked", "frozen", "missing")


@dataclass
class DeliverySettings:
    """What every delivery shares: configuration, spool, log, time and the
    places to run blocking work; *retry* is the retry machinery (None: no
    retry database, every defer is tried again at the next run).

    The DSNs are made by *dsn* (a L{twisted_mta.dsn.DsnSender}, made from
    these settings when first needed, unless *send_dsns* is false).  A
    *bounce* hook, ``await bounce(message, failed)``, replaces the
    bounces: it returns the failed addresses it dealt with (None: all).
    *id_allocator* gives the DSNs their ids: share the receiving side's,
    so that two messages never get the same id.  *deliver_new* is called
    with the id of each DSN spooled (the runner's deliver_now); when None
    it is delivered straight after the message it reports on."""

    config: Any
    spool: Any
    log: Any
    reactor: Any
    clock: Any
    threadpool: Any = None
    resolver: Any = None
    retry: Any = None
    bounce: Any = None
    dsn: Any = None
    send_dsns: bool = True
    id_allocator: Any = None
    deliver_new: Any = None
    #: Transport drivers by name; None for the built-in ones.
    transports: dict[str, Any] | None = None
    #: Ids being delivered in this process.
    active: set[str] = field(default_factory=set)
    #: The wait-<transport> hints (L{twisted_mta.queue.waiting.WaitingDatabase});
    #: None: no connection is handed on to waiting messages.
    waiting: Any = None


@dataclass
class DeliveryResult:
    outcome: str
    delivered: list[DeliveryAddress] = field(default_factory=list)
    failed: list[DeliveryAddress] = field(default_factory=list)
    deferred: list[DeliveryAddress] = field(default_factory=list)
    #: The DSNs spooled by this attempt.
    new_messages: list[str] = field(default_factory=list)


class MessageDelivery:
    """One delivery attempt of one message."""

    def __init__(self, settings: DeliverySettings, message_id: str, *,
                 force: bool = False, thaw: bool = False,
                 queue_running: bool = False, give_up: bool = False,
                 dont_deliver: bool = False, continued: Any = None,
                 first_pass: bool = False) -> None:
        self.settings = settings
        self.config = settings.config
        self.message_id = message_id
        self.force = force
        self.thaw = thaw
        #: Retry times are honoured only in queue runs, as in Exim.
        self.queue_running = queue_running
        #: -Mg: fail every address left (bounced unless it is a bounce).
        self.give_up = give_up
        #: -N: route, but bypass the transports.
        self.dont_deliver = dont_deliver
        #: A connection another delivery handed on (the smtp transport's
        #: ContinuedConnection), for this message's deliveries to its host.
        self.continued = continued
        #: The first pass of a two-stage queue run (-qq): remote deliveries
        #: are routed and recorded as waiting for their hosts, not made.
        self.first_pass = first_pass
        #: Connections the smtp transport left open for waiting messages.
        self._parked: list[Any] = []
        self.selector = getattr(settings.log, "selectors", frozenset())
        self._fd: int | None = None
        #: The message's files and the -D file's size, found by _open in
        #: the thread pool (the locked message does not move while it works).
        self._paths: MessagePaths | None = None
        self._data_size = 0
        #: The body of a small message on its first delivery, read by _open
        #: for the smtp transport (TransportJob.extra["spooled_body"]).
        self._body: bytes | None = None
        self._ctx: Any = None
        #: Addresses finished with successfully, in order, for success DSNs
        #: (a redirected recipient counts once it is redirected).
        self._succeeded: list[DeliveryAddress] = []
        #: Set when this attempt freezes the message: what "Frozen" adds.
        self._frozen_info: str | None = None

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
        try:
            result = await self._run_locked()
        except BaseException:
            for connection in self._parked:
                await connection.close()
            raise
        await self._hand_on()
        await self._deliver_new(result.new_messages)
        return result

    async def _hand_on(self) -> None:
        """Deliver the messages waiting for the host of each connection the
        smtp transport left open, down that connection, then close it (Exim's
        continued deliveries; twisted_mta/queue/waiting.py)."""
        parked, self._parked = self._parked, []
        for connection in parked:
            try:
                while connection.has_room:
                    message_id = await self._next_waiting(connection)
                    if message_id is None:
                        break
                    connection.sequence += 1
                    await MessageDelivery(self.settings, message_id,
                                          queue_running=self.queue_running,
                                          continued=connection).run()
            finally:
                await connection.close()

    async def _next_waiting(self, connection: Any) -> str | None:
        """The next message waiting for the connection's host, taken off
        its list: not being delivered here, still on the spool (looked at
        in the thread pool)."""
        from twisted_mta.queue.waiting import BUSY, GONE, READY

        waiting, spool = self.settings.waiting, self.settings.spool
        states: dict[str, str] = {}
        for message_id in waiting.waiting(connection.transport, connection.host.name):
            if message_id in self.settings.active:
                states[message_id] = BUSY
                continue
            there = await self._io(lambda m=message_id: os.path.exists(spool.locate(m).header))
            states[message_id] = READY if there else GONE
            if there:
                break
        return waiting.take(connection.transport, connection.host.name,
                            lambda m: states.get(m, BUSY))

    def _wants_hand_on(self, transport: str, host: Any) -> bool:
        """Whether other messages wait for *host* (the smtp transport then
        keeps its connection open for them)."""
        waiting = self.settings.waiting
        return waiting is not None and any(
            m != self.message_id for m in waiting.waiting(transport, host.name))

    async def _run_locked(self) -> DeliveryResult:
        settings = self.settings
        if self.message_id in settings.active:
            return DeliveryResult(LOCKED)
        settings.active.add(self.message_id)
        try:
            try:
                opened = await self._io(self._open)
            except FileNotFoundError:
                return DeliveryResult(MISSING)
            if opened is None:
                return DeliveryResult(LOCKED)
            return await self._deliver(*opened)
        finally:
            settings.active.discard(self.message_id)
            if self._fd is not None:
                # _finish closes the -D file in the thread pool; this is an
                # attempt that ended before (locked, frozen, an error), whose
                # file is still linked, so the close frees nothing on disk.
                os.close(self._fd)
                self._fd = None

    def _open(self) -> tuple[Any, list[str] | object | None] | None:
        """Lock the message and read its -H file and any -J journal, all in
        one trip to the thread pool: ``(message, journal)``, or None when
        another process holds the lock.  The journal is only read here, and
        applied after the frozen check as before (None: there is none;
        _JOURNAL_UNREAD: it could not be read, so _recover_journal tries
        again and raises).  FileNotFoundError: the message has gone."""
        spool = self.settings.spool
        paths = spool.locate(self.message_id)
        fd = os.open(paths.data, os.O_RDWR)
        try:
            lock_data_file(fd)
        except (BlockingIOError, PermissionError):
            os.close(fd)
            return None
        self._fd = fd
        self._paths = paths
        self._data_size = os.fstat(fd).st_size
        message = spool.read_header(self.message_id)
        if message.deliver_firsttime and \
                self._data_size <= DATA_START_OFFSET + CHUNK_SIZE:
            # A first delivery is most likely to go ahead, often over SMTP:
            # reading the body now saves the transport a trip to the pool.
            self._body = spooled_body(os.pread(fd, self._data_size, 0))
        journal: list[str] | object | None
        try:
            journal = _read_journal(paths.journal)
        except FileNotFoundError:
            journal = None
        except OSError:
            journal = _JOURNAL_UNREAD
        return message, journal

    @property
    def paths(self) -> MessagePaths:
        """The files of the message being delivered (once it is locked)."""
        assert self._paths is not None
        return self._paths

    async def _deliver(self, message: Any, journal: list[str] | object | None) -> DeliveryResult:
        self.message = message
        cancelled = None
        if message.frozen_at is not None:
            timeout = _option_int(self.config, "timeout_frozen_after", 0)
            if timeout > 0 and self._age(message) >= timeout:
                # Exim counts the message's age, not the time frozen.
                self._log("cancelled by timeout_frozen_after")
                cancelled = "delivery cancelled; message timed out"
            elif not self._thawed(message):
                return DeliveryResult(FROZEN)
        if self.give_up:
            self._log(f"cancelled by {_login()}")
            cancelled = "delivery cancelled by administrator"
        if journal is not None:
            await self._io(self._recover_journal, message, journal)
        ctx = self._ctx = self._context(message)
        result = DeliveryResult(INCOMPLETE)
        addresses = [DeliveryAddress(r.address, number=i, orcpt=r.orcpt,
                                     dsn_flags=r.dsn_flags, errors_to=r.errors_to)
                     for i, r in enumerate(message.recipients)
                     if not tree_contains(message.non_recipients, r.address)]
        if cancelled is not None:
            return await self._cancel(message, addresses, cancelled, result)
        rctx = RoutingContext(self.config, ctx, DELIVER, sender=message.sender)
        routed_deliveries: dict[int, list[DeliveryAddress]] = {}
        # Exim routes the recipients in the reverse order (its chain of
        # addresses to route is built backwards), so failures are logged and
        # reported in that order; deliveries keep the recipients' order.
        for address in reversed(addresses):
            status = await self._routing_retry(address, result)
            if status is None:
                continue
            routed = await route_address(rctx, address)
            await self._update_routing_retry(address, routed, status)
            if routed.kind == ACCEPT:
                if not any(d is address for d in routed.deliveries):
                    # Redirected: Exim counts the recipient itself as done.
                    self._succeeded.append(address)
                routed_deliveries[id(address)] = [
                    d for d in routed.deliveries
                    if not tree_contains(message.non_recipients, d.unique)]
                for problem in routed.problems:
                    await self._routing_problem(problem, result)
            elif routed.kind == FAIL:
                address.router = routed.router
                address.fail(routed.message or "Unrouteable address")
                if routed.pass_message:
                    address.extra["pass_message"] = True
                await self._fail_event(address, ctx)
                self._log(failure_line(address, sender=message.sender,
                                       selector=self.selector))
                self._failed(address, result)
            elif address.extra.get("retry_timed_out"):
                address.router = routed.router
                address.fail(f"{routed.message or 'routing deferred'}: retry timeout exceeded")
                await self._fail_event(address, ctx)
                self._log(failure_line(address, sender=message.sender,
                                       selector=self.selector))
                self._failed(address, result)
            else:
                address.router = routed.router
                # A router gives no errno: Exim's default, ERRNO_UNKNOWNERROR.
                address.defer(routed.message or "routing deferred", errno=-1)
                if routed.pass_message:
                    address.extra["pass_message"] = True
                self._log(deferral_line(address, driver_kind="router" if routed.router
                                        else "routing", selector=self.selector))
                self._deferred(address, result)
        # Duplicates (an address reached through two recipients) are
        # delivered once, as Exim removes them after routing.
        delivering: set[str] = set()
        #: Remote deliveries, batched by transport and host list.
        remote: dict[tuple[Any, ...], list[DeliveryAddress]] = {}
        for address in addresses:
            for delivery in routed_deliveries.get(id(address), []):
                local, at, domain = delivery.unique.rpartition("@")
                key = f"{local}@{domain.lower()}" if at else delivery.unique  # caseful local part
                if key in delivering:
                    continue
                delivering.add(key)
                batch_key = self._remote_batch_key(delivery)
                if batch_key is None:
                    await self._deliver_one(delivery, ctx, result)
                else:
                    remote.setdefault(batch_key, []).append(delivery)
        jobs = []
        for batch_key, batch in remote.items():
            instance = self.config.transport(batch_key[0])
            max_rcpt = max(1, _option_int_of(instance, "max_rcpt", 100))
            jobs += [batch[start:start + max_rcpt] for start in range(0, len(batch), max_rcpt)]
        await self._run_remote_jobs(jobs, ctx, result)
        return await self._finish(message, addresses, result)

    async def _run_remote_jobs(self, jobs: list[list[DeliveryAddress]], ctx: Any,
                               result: DeliveryResult) -> None:
        """Remote transactions, up to ``remote_max_parallel`` (2) at once
        as Exim's parallel delivery processes; each has its own expansion
        context."""
        parallel = max(1, _option_int(self.config, "remote_max_parallel", 2))
        if parallel == 1 or len(jobs) <= 1:
            for batch in jobs:
                await self._deliver_remote(batch, ctx, result)
            return
        from twisted.internet import defer

        limit = defer.DeferredSemaphore(parallel)
        await defer.gatherResults([
            limit.run(lambda batch=batch: defer.Deferred.fromCoroutine(
                self._deliver_remote(batch, self._context(self.message), result)))
            for batch in jobs], consumeErrors=True)

    # -- retry times -------------------------------------------------------------------

    async def _routing_retry(self, address: DeliveryAddress, result: DeliveryResult) -> Any:
        """The routing retry status, or None when the address waits for
        its retry time (it is then deferred here, unrouted)."""
        from twisted_mta.queue.retry import ERRNO_RRETRY, RoutingRetryStatus

        retry = self.settings.retry
        if retry is None:
            return RoutingRetryStatus(False)
        message = self.message
        status = await retry.routing_check(
            address.domain.lower(), address.local_part, sender=message.sender,
            received_time=message.received[0], queue_running=self.queue_running,
            force=self.force, ctx=self._ctx)
        if not status.defer:
            return status
        address.defer(status.message or "retry time not reached", errno=ERRNO_RRETRY)
        self._log(deferral_line(address, driver_kind="routing", selector=self.selector))
        self._deferred(address, result)
        return None

    async def _update_routing_retry(self, address: DeliveryAddress, routed: Any,
                                    status: Any) -> None:
        """Record a routing defer against the domain, or forget it after
        the address was routed."""
        from twisted_mta.queue.retry import RetryItem
        from twisted_mta.routers.engine import DEFER

        retry = self.settings.retry
        if retry is None or not status.domain_key:
            return
        if routed.kind == DEFER:
            items = [RetryItem(status.domain_key, basic_errno=-1,
                               message=routed.message or "routing deferred")]
        elif status.exists:
            items = [RetryItem(status.domain_key, delete=True),
                     RetryItem(status.address_key, delete=True)]
        else:
            return
        message = self.message
        if await retry.update_address(items, domain=address.domain.lower(),
                                      sender=message.sender,
                                      received_time=message.received[0],
                                      message_completing=False, ctx=self._ctx):
            address.extra["retry_timed_out"] = True

    async def _local_retry_ok(self, address: DeliveryAddress) -> tuple[bool, bool]:
        retry = self.settings.retry
        if retry is None:
            return True, False
        message = self.message
        return await retry.local_delivery_check(
            _local_retry_key(address), address.domain.lower(),
            received_time=message.received[0], queue_running=self.queue_running,
            force=self.force, sender=message.sender, ctx=self._ctx)

    async def _update_local_retry(self, address: DeliveryAddress, exists: bool) -> bool:
        """After a local delivery: record a defer (True when the address
        has now timed out) or forget an old record after success."""
        from twisted_mta.queue.retry import RetryItem

        retry = self.settings.retry
        if retry is None:
            return False
        key = _local_retry_key(address)
        if address.status == DELIVERED:
            items = [RetryItem(key, delete=True)] if exists else []
        elif address.status == DEFERRED:
            items = [RetryItem(key, basic_errno=address.basic_errno,
                               more_errno=address.more_errno, message=address.message)]
        else:
            items = []
        if not items:
            return False
        message = self.message
        return await retry.update_address(items, domain=address.domain.lower(),
                                          sender=message.sender,
                                          received_time=message.received[0],
                                          message_completing=False, ctx=self._ctx)

    async def _routing_problem(self, address: DeliveryAddress,
                               result: DeliveryResult) -> None:
        if address.status == FAILED:
            address.fail(address.message or "Unrouteable address")
            await self._fail_event(address, self._ctx)
            self._log(failure_line(address, sender=self.message.sender,
                                   selector=self.selector))
            self._failed(address, result)
        else:
            address.defer(address.message or "routing deferred", errno=address.basic_errno or -1)
            self._log(deferral_line(address, driver_kind="router", selector=self.selector))
            self._deferred(address, result)

    def _failed(self, address: DeliveryAddress, result: DeliveryResult) -> None:
        """A hard failure (post_process_one()): bounced at the end, unless
        nobody can be told (the sender is <> and there is no errors_to),
        when the address is kept and the message frozen for a human; once
        such a message is ignore_bounce_errors_after old, its failures are
        ignored instead."""
        message = self.message
        if not message.sender and self._age(message) >= _option_int(
                self.config, "ignore_bounce_errors_after", 6048000):
            address.extra[IGNORE_ERROR] = True
        if not ignore_error(address) and (
                address.special_action == "freeze"
                or (not message.sender and not address.errors_to)):
            if address.special_action == "freeze":
                self._frozen_info = ""
            elif message.sender_local and not message.local_error_message:
                self._frozen_info = " (message created with -f <>)"
            else:
                self._frozen_info = " (delivery error message)"
            result.deferred.append(address)
        else:
            result.failed.append(address)

    def _deferred(self, address: DeliveryAddress, result: DeliveryResult) -> None:
        if address.special_action == "freeze" and self._frozen_info is None:
            self._frozen_info = ""
        result.deferred.append(address)

    def _age(self, message: Any) -> float:
        return self.settings.clock.seconds() - message.received[0]

    async def _cancel(self, message: Any, addresses: list[DeliveryAddress], reason: str,
                      result: DeliveryResult) -> DeliveryResult:
        """-Mg and timeout_frozen_after: no delivery; every address left
        fails (already logged as a whole), and is bounced unless the
        message is itself a bounce, which is just discarded."""
        message.frozen_at = None
        for address in addresses:
            address.fail(reason)
            if message.sender:
                result.failed.append(address)
        return await self._finish(message, addresses, result)

    def _thawed(self, message: Any) -> bool:
        """Whether a frozen message is delivered now (Exim's rules: the
        bounce timer, a forced thaw, auto_thaw), with the log line."""
        now = self.settings.clock.seconds()
        if not message.sender and self._age(message) >= _option_int(
                self.config, "ignore_bounce_errors_after", 6048000):
            self._log("Unfrozen by errmsg timer")
        else:
            auto_thaw = _option_int(self.config, "auto_thaw", 0)
            if (not message.sender or auto_thaw <= 0
                    or now <= message.frozen_at + auto_thaw) and not self.thaw:
                self.settings.log.write("Message is frozen", ("main",), self.message_id,
                                        selector="skip_delivery")
                return False
            if self.force or self.thaw:
                self._log("Unfrozen by forced delivery")
            else:
                self._log("Unfrozen by auto-thaw")
        message.frozen_at = None
        return True

    async def _deliver_one(self, address: DeliveryAddress, ctx: Any,
                           result: DeliveryResult) -> None:
        from twisted_mta.transports.base import TransportJob

        message = self.message
        if address.discarded is not None:
            address.succeed()
            self._log(f"=> {address.discarded} <{address.top.address}> R={address.router}")
            await self._journal(address)
            self._succeeded.append(address)
            result.delivered.append(address)
            return
        instance = self.config.transport(address.transport) if address.transport else None
        if instance is None:
            what = address.transport or "no transport"
            address.defer(f"transport \"{what}\" not found" if address.transport else
                          f"No transport set by {address.router} router")
            self._log(deferral_line(address, driver_kind="router", selector=self.selector))
            self._deferred(address, result)
            return
        drivers = self.settings.transports
        driver = (drivers if drivers is not None else _transport_drivers()).get(
            instance.driver or "")
        if driver is None:
            address.defer(f"{instance.driver} transport not available in exim-py yet")
            self._log(deferral_line(address, driver_kind="transport", selector=self.selector))
            self._deferred(address, result)
            return
        retry_ok, retry_exists = (True, False)
        if getattr(driver, "local", True):
            retry_ok, retry_exists = await self._local_retry_ok(address)
        if retry_ok and getattr(driver, "local", True):
            problem = await self._io(_working_directory_problem,
                                     instance.get("current_directory") or
                                     address.home_directory)
            if problem is not None:
                # Exim's delivery process could not chdir there.
                address.defer(problem[1], errno=problem[0])
                self._log(deferral_line(address, driver_kind="transport",
                                        selector=self.selector))
                self._deferred(address, result)
                return
        if not retry_ok:
            from twisted_mta.queue.retry import ERRNO_LRETRY

            address.defer("retry time not reached", errno=ERRNO_LRETRY)
            self._log(deferral_line(address, driver_kind="transport", selector=self.selector))
            self._deferred(address, result)
            return
        self._set_address_variables(ctx, address)
        started = self.settings.clock.seconds()
        job = TransportJob(message=message,
                           data_path=self.paths.data,
                           addresses=[address], ctx=ctx, reactor=self.settings.reactor,
                           threadpool=self.settings.threadpool, clock=self.settings.clock,
                           log=self.settings.log, config=self.config)
        if self.dont_deliver or message.dont_deliver:
            # -N: the transport is bypassed and the delivery logged "*>".
            address.succeed()
        else:
            try:
                await driver.deliver(instance, job)
            except Exception as e:  # a transport bug must not lose the message
                address.defer(f"internal error in {instance.name} transport: {e}")
        address.extra["delivery_time"] = self.settings.clock.seconds() - started
        if getattr(driver, "local", True) and \
                await self._update_local_retry(address, retry_exists):
            address.fail(f"{address.message}: retry timeout exceeded",
                         errno=address.basic_errno, more_errno=address.more_errno)
        if address.status == DELIVERED:
            await self._journal(address)
            self._succeeded.append(address)
            self._log(delivery_line(address, logchar="*" if self.dont_deliver
                                    or message.dont_deliver else "=",
                                    sender=message.sender,
                                    transport=driver,
                                    log_as_local=self._log_as_local(address),
                                    selector=self.selector,
                                    queue_time=self.settings.clock.seconds()
                                    - message.received[0]))
            await self._event("msg:delivery", address, ctx)
            result.delivered.append(address)
        elif address.status == FAILED:
            await self._fail_event(address, ctx)
            self._log(failure_line(address, sender=message.sender, selector=self.selector))
            self._failed(address, result)
        else:
            if address.status == PENDING:
                address.defer("transport gave no result")
            if address.extra.get("panic"):
                self._log(address.message or "", ("main", "panic"))
            self._log(deferral_line(address, driver_kind="transport", selector=self.selector))
            self._deferred(address, result)

    def _remote_driver(self, address: DeliveryAddress) -> Any:
        """The driver of the address's transport when it is a remote one."""
        if address.discarded is not None or not address.transport:
            return None
        instance = self.config.transport(address.transport)
        if instance is None:
            return None
        drivers = self.settings.transports
        driver = (drivers if drivers is not None else _transport_drivers()).get(
            instance.driver or "")
        if driver is None or getattr(driver, "local", True):
            return None
        return driver

    def _remote_batch_key(self, address: DeliveryAddress) -> tuple[Any, ...] | None:
        """What remote deliveries must share to go in one transaction (the
        transport and the host list); None for a local delivery."""
        if self._remote_driver(address) is None:
            return None
        hosts = tuple((h.name, h.address, h.port) for h in address.hosts)
        fallback = address.extra.get("fallback_hosts")
        fallback_key = tuple((h.name, h.address, h.port) for h in fallback) \
            if isinstance(fallback, list) else fallback
        return (address.transport, hosts, fallback_key, address.errors_to)

    async def _deliver_remote(self, batch: list[DeliveryAddress], ctx: Any,
                              result: DeliveryResult) -> None:
        """One remote transport call for several addresses (Exim's
        do_remote_deliveries): ``=>`` for the first address delivered and
        ``->`` for the others; host retry items applied once."""
        from twisted_mta.transports.base import TransportJob

        message = self.message
        first = batch[0]
        instance = self.config.transport(first.transport or "")
        driver = self._remote_driver(first)
        self._set_address_variables(ctx, first)
        if len(batch) > 1:
            # Exim's deliver_set_expansions() for several addresses: no
            # local part; the domain only when they all share it.
            for name in ("local_part", "local_part_prefix", "local_part_suffix",
                         "original_local_part", "original_domain"):
                ctx.variables.pop(name, None)
            if any(a.domain.lower() != first.domain.lower() for a in batch):
                ctx.variables.pop("domain", None)
        started = self.settings.clock.seconds()
        job = TransportJob(message=message,
                           data_path=self.paths.data,
                           addresses=batch, ctx=ctx, reactor=self.settings.reactor,
                           threadpool=self.settings.threadpool, clock=self.settings.clock,
                           log=self.settings.log, config=self.config,
                           extra={"retry": self.settings.retry,
                                  "spooled_body": self._body,
                                  "force": self.force,
                                  "queue_running": self.queue_running,
                                  "first_pass": self.first_pass,
                                  "continued": self.continued,
                                  "hand_on": self._wants_hand_on
                                  if self.continued is None else None})
        if self.dont_deliver or message.dont_deliver:
            for address in batch:
                address.succeed()
        else:
            try:
                await driver.deliver(instance, job)
            except Exception as e:  # a transport bug must not lose the message
                for address in batch:
                    if address.status == PENDING:
                        address.defer(f"internal error in {instance.name} transport: {e}")
        elapsed = self.settings.clock.seconds() - started
        parked = job.extra.pop("parked", None)
        if parked is not None:
            self._parked.append(parked)
        waiting_hosts = job.extra.get("waiting_hosts")
        if waiting_hosts and self.settings.waiting is not None and \
                any(a.status != DELIVERED for a in batch):
            self.settings.waiting.add(instance.name, waiting_hosts, self.message_id)
        # Exim's smtp transport raises it itself, before the == lines.
        await self._remote_defer_event(batch, job, ctx)
        await self._update_remote_retry(batch, job)
        logchar = "*" if self.dont_deliver or message.dont_deliver else "="
        for address in batch:
            address.extra["delivery_time"] = elapsed
            if address.status == DELIVERED:
                await self._journal(address)
                self._succeeded.append(address)
                self._log(delivery_line(address, logchar=logchar, sender=message.sender,
                                        transport=driver, log_as_local=False,
                                        selector=self.selector,
                                        queue_time=self.settings.clock.seconds()
                                        - message.received[0]))
                if logchar == "=":
                    logchar = "-"
                await self._event("msg:delivery", address, ctx)
                result.delivered.append(address)
            elif address.status == FAILED:
                await self._fail_event(address, ctx)
                self._log(failure_line(address, sender=message.sender,
                                       selector=self.selector))
                self._failed(address, result)
            else:
                if address.status == PENDING:
                    address.defer("transport gave no result")
                # Exim's first pass of -qq logs no "==" for what it left.
                if not (self.first_pass and address.basic_errno == 0):
                    self._log(deferral_line(address, driver_kind="transport",
                                            selector=self.selector))
                self._deferred(address, result)

    async def _update_remote_retry(self, batch: list[DeliveryAddress], job: Any) -> None:
        """Apply the transport's retry items: the hosts' once for the job,
        the addresses' (a 4xx to RCPT) for each."""
        retry = self.settings.retry
        if retry is None:
            return
        message = self.message
        common = dict(sender=message.sender, received_time=message.received[0],
                      message_completing=False, ctx=self._ctx,
                      hosts_skipped=bool(job.extra.get("hosts_skipped")))
        host_items = job.extra.get("retry_items") or []
        hosts_timed_out = False
        if host_items:
            hosts_timed_out = await retry.update_address(
                host_items, domain=batch[0].domain.lower(), **common)
        for address in batch:
            items = address.extra.get("retry_items") or []
            if address.status == DELIVERED:
                items = [type(i)(i.key, delete=True) for i in items]
            timed_out = False
            if items:
                timed_out = await retry.update_address(items, domain=address.domain.lower(),
                                                       **common)
            if address.status == DEFERRED and (timed_out or (hosts_timed_out and not items)):
                # Every retry item of the address is past its cutoff.
                address.fail(f"{address.message}: retry timeout exceeded" if address.message
                             else "retry timeout exceeded", errno=address.basic_errno,
                             more_errno=address.more_errno, host=address.host_used)
                address.extra["retry_timedout"] = True

    # -- events -------------------------------------------------------------------------

    async def _event(self, name: str, address: DeliveryAddress, ctx: Any) -> None:
        await events.msg_event(ctx or self._ctx, self.config, name, address,
                               log=self.settings.log, message_id=self.message_id)

    async def _fail_event(self, address: DeliveryAddress, ctx: Any) -> None:
        """msg:fail:delivery (msg:fail:internal without a transport) as
        Exim's failure_log() raises it: now, unless the error is ignored or
        the recipient asked for DSNs without FAILURE, when it waits for the
        bounce processing (and is raised only if no bounce is sent)."""
        if ignore_error(address) or address.dsn_flags & (NOTIFY_ANY & ~NOTIFY_FAILURE):
            address.extra["fail_event_later"] = True
            return
        await self._event("msg:fail:delivery", address, ctx)

    async def _remote_defer_event(self, batch: list[DeliveryAddress], job: Any,
                                  ctx: Any) -> None:
        """``msg:defer`` after a remote transaction whose every address was
        deferred by a host, unless the transport raised its own defer events
        (``job.extra["defer_events"]``, see doc/events.md)."""
        if job.extra.get("defer_events") or self.dont_deliver:
            return
        first = batch[0]
        if first.host_used is None or any(a.status != DEFERRED for a in batch):
            return
        await events.deferred_event(ctx or self._ctx, self.config, "msg:defer", first,
                                    first.host_used, log=self.settings.log,
                                    message_id=self.message_id)

    def _log_as_local(self, address: DeliveryAddress) -> bool:
        router = self.config.router(address.router) if address.router else None
        return bool(router.get("log_as_local", True)) if router is not None else False

    # -- the journal and the -H file ---------------------------------------------------

    async def _journal(self, address: DeliveryAddress) -> None:
        """Record a completed delivery before anything else (-J)."""
        await self._io(_append_synced, self.paths.journal,
                       f"{address.unique}\n".encode("latin-1"))

    def _recover_journal(self, message: Any, journal: list[str] | object) -> None:
        """A journal left by a crashed delivery (its lines, as _open read
        them): its addresses are done."""
        path = self.paths.journal
        if isinstance(journal, list):
            done = journal
        else:
            try:
                done = _read_journal(path)
            except FileNotFoundError:
                return
        for address in done:
            message.non_recipients = _tree_add(message.non_recipients, address)
        self.settings.spool.write_header(message)
        os.unlink(path)

    async def _finish(self, message: Any, addresses: list[DeliveryAddress],
                      result: DeliveryResult) -> DeliveryResult:
        for address in result.failed:
            # Failures Exim raises msg:fail:delivery for when it does not
            # bounce them (error ignored, or NOTIFY without FAILURE).
            if address.extra.pop("fail_event_later", False) and (
                    ignore_error(address) or address.dsn_flags & NOTIFY_ANY
                    and not address.dsn_flags & NOTIFY_FAILURE):
                await self._event("msg:fail:delivery", address, self._ctx)
        dsn = self._dsn_sender()
        if dsn is not None and self._succeeded:
            result.new_messages.extend(
                await dsn.send_success(message, self._succeeded, self._ctx))
        handled = await self._bounce(message, result)
        # A failure that could not be reported keeps its recipient, as a
        # deferral does, and is tried (and reported) again next time.
        unreported = [a for a in result.failed if not any(a is h for h in handled)]
        for delivery in result.delivered:
            if delivery.parent is not None:
                message.non_recipients = _tree_add(message.non_recipients, delivery.unique)
        # A recipient is done unless something of it is still to do: all
        # delivered, failed and reported, or its addresses duplicates of
        # ones delivered for another recipient.
        kept_tops = {a.top.number for a in result.deferred + unreported}
        for address in addresses:
            if address.number not in kept_tops:
                message.non_recipients = _tree_add(message.non_recipients, address.address)
        remaining = [r for r in message.recipients
                     if not tree_contains(message.non_recipients, r.address)]
        if not remaining:
            await self._io(self._remove, self._take_fd())
            self._log("Completed" + (f" QT={_queue_time(self, message)}"
                                     if "queue_time_overall" in self.selector else ""))
            await events.complete_event(self._ctx, self.config, log=self.settings.log,
                                        message_id=self.message_id)
            result.outcome = COMPLETED
            return result
        if result.deferred and dsn is not None:
            # Exim's chain of deferred addresses holds the latest first.
            warning = await dsn.send_warning(message, list(reversed(result.deferred)),
                                             self._ctx)
            if warning is not None:
                result.new_messages.append(warning)
        message.deliver_firsttime = False
        if self._frozen_info is not None:
            message.frozen_at = int(self.settings.clock.seconds())
            self._log(f"Frozen{self._frozen_info}")
        await self._io(self._rewrite_header, message, self._take_fd())
        result.outcome = INCOMPLETE
        return result

    async def _bounce(self, message: Any, result: DeliveryResult) -> list[DeliveryAddress]:
        """Report the failed addresses; those dealt with."""
        if not result.failed:
            return []
        if self.settings.bounce is not None:
            handled = await self.settings.bounce(message, result.failed)
            return list(result.failed if handled is None else handled)
        dsn = self._dsn_sender()
        if dsn is None:
            return list(result.failed)
        outcome = await dsn.send_bounces(message, result.failed, self._ctx)
        result.new_messages.extend(outcome.message_ids)
        for recipient, error in outcome.failures:
            suffix = ""
            if not result.deferred:
                # Nothing else keeps the message: freeze it rather than
                # retry the report at every queue run.
                suffix = " (frozen)"
                if self._frozen_info is None:
                    self._frozen_info = ""
            self._log(f"Failed to write error message to {recipient}: {error}{suffix}")
        return outcome.handled

    def _dsn_sender(self) -> Any:
        settings = self.settings
        if settings.dsn is None and settings.send_dsns:
            from functools import partial

            from twisted_mta.dsn import DsnSender

            settings.dsn = DsnSender(settings.config, settings.spool, settings.log,
                                     settings.clock, id_allocator=settings.id_allocator,
                                     run_blocking=partial(_blocking, settings))
        return settings.dsn

    async def _deliver_new(self, message_ids: list[str]) -> None:
        """Deliver the DSNs this attempt made, as Exim's child process
        would (not with queue_only)."""
        if not message_ids or self.config.get("queue_only"):
            return
        for message_id in message_ids:
            if self.settings.deliver_new is not None:
                self.settings.deliver_new(message_id)
            else:
                await MessageDelivery(self.settings, message_id).run()

    def _take_fd(self) -> int | None:
        """The -D file's descriptor, for the last trip to the thread pool
        to close: closing an unlinked file frees its blocks, which takes
        long enough (about 0.2 ms on ext4) to keep off the reactor."""
        fd, self._fd = self._fd, None
        return fd

    def _remove(self, fd: int | None) -> None:
        """Remove the message, then close its -D file (releasing the lock)."""
        try:
            self.settings.spool.remove(self.message_id)
        finally:
            if fd is not None:
                os.close(fd)

    def _rewrite_header(self, message: Any, fd: int | None) -> None:
        """Write the -H file with the done recipients, remove the journal,
        then close the -D file (releasing the lock)."""
        try:
            self.settings.spool.write_header(message)
            try:
                os.unlink(self.paths.journal)
            except FileNotFoundError:
                pass
        finally:
            if fd is not None:
                os.close(fd)

    # -- expansion variables -----------------------------------------------------------

    def _context(self, message: Any) -> Any:
        from twisted_mta.expand.context import ExpansionContext
        from twisted_mta.smtp.message import Header, IncomingMessage

        settings = self.settings
        ctx = ExpansionContext(config=self.config, reactor=settings.reactor,
                               threadpool=settings.threadpool, resolver=settings.resolver)
        # Routing logs through it (a router's self = freeze line).
        ctx.log = settings.log
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
        variables["message_size"] = str(self._data_size + sum(len(h.text) for h in message.headers)
                                        - len(self.message_id) - 3)
        variables["recipients_count"] = str(len(message.recipients))
        return ctx

    def _set_address_variables(self, ctx: Any, address: DeliveryAddress) -> None:
        """What the transport sees: the address (tainted, as it came from
        the message) and what its router set."""
        from twisted_mta.routers.engine import ROUTER_SET_VARIABLES, local_part_of
        from twisted_mta.taint import taint

        variables = ctx.variables
        for name in ROUTER_SET_VARIABLES:
            variables.pop(name, None)
        variables.update(address.extra.get("router_variables", {}))
        variables["local_part"] = taint(address.extra.get("routed_local_part",
                                                          local_part_of(address)))
        variables["domain"] = taint(address.domain.lower())
        variables["local_part_prefix"] = address.prefix
        variables["local_part_suffix"] = address.suffix
        top = address.top
        variables["original_local_part"] = taint(local_part_of(top))
        variables["original_domain"] = taint(top.domain)
        # A local transport after manualroute sees the route's host list as
        # one host with no address (Exim: $host_port is then -1).
        if address.hosts:
            variables["host"] = address.hosts[0].name
            variables["host_address"] = address.hosts[0].address or ""
            variables["host_port"] = str(address.hosts[0].port or -1)
        else:
            for name in ("host", "host_address", "host_port"):
                variables.pop(name, None)
        for name, value in (("address_data", address.address_data),
                            ("home", address.home_directory)):
            if value is None:
                variables.pop(name, None)
            else:
                variables[name] = value


#: _open's journal when the -J file is there but could not be read.
_JOURNAL_UNREAD = object()


def _read_journal(path: str) -> list[str]:
    """The addresses of the complete lines of a -J file."""
    with open(path, encoding="latin-1") as f:
        return [line.rstrip("\n") for line in f if line.endswith("\n")]


def _append_synced(path: str, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)


async def _blocking(settings: DeliverySettings, function: Any, *args: Any) -> Any:
    if settings.threadpool is None:
        return function(*args)
    return await threads.deferToThreadPool(settings.reactor, settings.threadpool, function,
                                           *args)


def _option_int_of(instance: Any, name: str, default: int) -> int:
    try:
        return int(instance.get(name) or default) if instance is not None else default
    except (TypeError, ValueError):
        return default


def _option_int(config: Any, name: str, default: int) -> int:
    try:
        return int(config.get(name, default) or 0)
    except (TypeError, ValueError):
        return default


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


def _local_retry_key(address: DeliveryAddress) -> str:
    """``T:`` and the address: a local transport's retry key (Exim keys on
    the local part too, as retry_use_local_part does by default here)."""
    return f"T:{address.unique}"


def _login() -> str:
    """Who gave up on a message (Exim logs the real user's login)."""
    import pwd

    try:
        return pwd.getpwuid(os.getuid()).pw_name
    except KeyError:
        return f"uid {os.getuid()}"


def _working_directory_problem(path: str | None) -> tuple[int, str] | None:
    """(errno, message) when a local delivery could not work in *path*
    (the transport's current_directory, else the home directory)."""
    if not path or "$" in path:
        return None
    try:
        if os.path.isdir(path):
            return None
        os.stat(path)
        error = errno.ENOTDIR
    except OSError as e:
        error = e.errno or errno.ENOENT
    return error, f"failed to chdir to {path}"
