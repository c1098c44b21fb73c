"""What every local transport does around its own work: Exim's error
numbers, the shape of a result, the return path, the size limit, the
user/group check and running blocking work off the reactor thread.

In Exim most of this is in ``deliver.c`` (the delivery process sets up the
return path, checks ``message_size_limit`` and changes uid before calling
the driver); here each driver calls :func:`start_delivery` first, so a
delivery process that does some of it already loses nothing.
"""

from __future__ import annotations

import grp
import os
import pwd
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from twisted.internet.threads import deferToThreadPool

from twisted_mta.expand.errors import ExpansionError, ForcedFailure, LookupDefer, TaintError
from twisted_mta.queue.address import DeliveryAddress
from twisted_mta.taint import is_tainted

T = TypeVar("T")

# Exim's own error numbers (macros.h): negative, so that they never clash
# with an errno.  A delivery log line shows ``defer (N)``.
ERRNO_UNKNOWNERROR = -1
ERRNO_EXISTRACE = -3
ERRNO_NOTREGULAR = -4
ERRNO_NOTDIRECTORY = -5
ERRNO_BADUGID = -6
ERRNO_BADMODE = -7
ERRNO_INODECHANGED = -8
ERRNO_LOCKFAILED = -9
ERRNO_SMTPCLOSED = -18
ERRNO_SMTPFORMAT = -19
ERRNO_NOTABSOLUTE = -21
ERRNO_EXIMQUOTA = -22
ERRNO_FILTER_FAIL = -24
ERRNO_CHHEADER_FAIL = -25
ERRNO_WRITEINCOMPLETE = -26
ERRNO_EXPANDFAIL = -27
ERRNO_GIDFAIL = -28
ERRNO_UIDFAIL = -29
ERRNO_BADTRANSPORT = -30
ERRNO_FORMATUNKNOWN = -33
ERRNO_BADCREATE = -34
ERRNO_RCPT4XX = -44
ERRNO_MAIL4XX = -45
ERRNO_DATA4XX = -46
ERRNO_TAINT = -51

# The four outcomes a driver can give (Exim's OK / DEFER / FAIL / PANIC).
# PANIC is a deferral that Exim also writes to the panic log; it is
# recorded here as ``address.extra["panic"] = True``.
OK, DEFER, FAIL, PANIC = "ok", "defer", "fail", "panic"


@dataclass
class Outcome:
    """The result of one delivery attempt, before it is put on addresses.

    Exim's local transports set the result on the first address and let
    the delivery process copy it to the rest of the batch; :meth:`apply`
    does that copy."""

    status: str = OK
    message: str | None = None
    errno: int = 0
    more_errno: int = 0
    user_message: str | None = None
    special_action: str | None = None   # "freeze" or "warn"
    retry_error: str | None = None      # "quota" for quota errors
    extra: dict[str, Any] = field(default_factory=dict)

    def apply(self, addresses: list[DeliveryAddress], confirmation: str | None = None) -> None:
        for address in addresses:
            self.apply_one(address, confirmation)

    def apply_one(self, address: DeliveryAddress, confirmation: str | None = None) -> None:
        if self.status == OK:
            address.succeed(confirmation)
            address.message = self.message
        elif self.status == FAIL:
            address.fail(self.message or "", errno=self.errno, more_errno=self.more_errno,
                         user_message=self.user_message)
        else:
            address.defer(self.message or "", errno=self.errno, more_errno=self.more_errno,
                          user_message=self.user_message)
            if self.status == PANIC:
                address.extra["panic"] = True
        if self.special_action is not None:
            address.special_action = self.special_action
        if self.retry_error is not None:
            address.extra["retry_error"] = self.retry_error
        address.extra.update(self.extra)


def defer(message: str, errno: int = 0, **kw: Any) -> Outcome:
    return Outcome(DEFER, message, errno, **kw)


def fail(message: str, errno: int = 0, **kw: Any) -> Outcome:
    return Outcome(FAIL, message, errno, **kw)


def panic(message: str, errno: int = ERRNO_UNKNOWNERROR, **kw: Any) -> Outcome:
    return Outcome(PANIC, message, errno, **kw)


async def expand(job: Any, text: str) -> str:
    """Expand *text* in the job's context as Exim's expand_string() does:
    a string with neither ``$`` nor a backslash comes back as it is (taint
    and all); any other tainted string is refused."""
    if "$" not in text and "\\" not in text:
        return text
    if is_tainted(text):
        raise TaintError(f"attempt to expand tainted string '{text}'")
    return await job.ctx.expand(text)


async def expand_or_none(job: Any, text: str) -> str | None:
    """Expand; None for a forced failure (other errors raise)."""
    try:
        return await expand(job, text)
    except ForcedFailure:
        return None


def lookup_deferred(error: ExpansionError) -> bool:
    """Exim's ``f.search_find_defer``: the failure was a lookup that could
    not complete, which makes some errors a deferral instead of a panic."""
    return isinstance(error, LookupDefer)


async def run_blocking(job: Any, f: Callable[..., T], *args: Any) -> T:
    """Run blocking file-system work in the job's thread pool."""
    return await deferToThreadPool(job.reactor, job.threadpool, f, *args)


async def guard_delivery(instance: Any, delivery: Awaitable[T]) -> T | Outcome:
    """Await a driver's own delivery; an exception from it (a bug) becomes
    a panic, so that it does not lose the message."""
    try:
        return await delivery
    except Exception as e:  # a bug here must not lose the message
        return panic(f"{instance.name} transport: internal error: {e!r}")


# -- what the delivery process would have set up -------------------------------------


@dataclass
class DeliverySetup:
    """Per-delivery values shared by the drivers."""

    return_path: str
    uid: int
    gid: int
    user_set: bool = False
    home: str | None = None


async def start_delivery(instance: Any, job: Any) -> DeliverySetup | Outcome:
    """The checks and values deliver.c sets before calling a local
    transport: the return path (``errors_to`` or the sender, then the
    transport's ``return_path``), ``$return_path``, ``message_size_limit``
    and ``user``/``group``.  Returns an Outcome for a delivery that must
    not go ahead."""
    for option in ("transport_filter", "headers_rewrite"):
        if instance.get(option):
            # Delivering without them would change what is delivered.
            return panic(f"{option} (in {instance.name} transport) is not supported by "
                         "exim-py")
    first = job.addresses[0]
    return_path = first.errors_to if first.errors_to is not None else job.message.sender
    option = instance.get("return_path")
    if option is not None:
        try:
            value = await expand_or_none(job, str(option))
        except ExpansionError as e:
            return defer(f'Failed to expand return path "{option}" in {instance.name} '
                         f"transport: {e.message}", ERRNO_EXPANDFAIL)
        if value is not None:
            return_path = value
    job.ctx.variables["return_path"] = return_path
    job.ctx.variables.setdefault("transport_name", instance.name)

    ugid = await _find_ugid(instance, job)
    if isinstance(ugid, Outcome):
        return ugid
    uid, gid, user_set = ugid

    home = None
    raw_home = instance.get("home_directory")
    if raw_home is None:
        raw_home = first.home_directory
    if raw_home is not None:
        expanded = await expand_directory(job, instance, "home directory", str(raw_home))
        if isinstance(expanded, Outcome):
            return expanded
        home = expanded
        job.ctx.variables["home"] = home

    limit = instance.get("message_size_limit")
    if limit is not None:
        outcome = await check_message_size(instance, job, str(limit))
        if outcome is not None:
            return outcome
    return DeliverySetup(return_path, uid, gid, user_set, home)


async def expand_directory(job: Any, instance: Any, what: str, raw: str) -> str | Outcome:
    """Expand the transport's *what* (``home directory``, ``current
    directory``), which must give an absolute path; deliver.c's deferrals
    otherwise."""
    try:
        path = await expand(job, raw)
    except ExpansionError as e:
        return defer(f'{what} "{raw}" failed to expand for {instance.name} transport: '
                     f"{e.message}", ERRNO_EXPANDFAIL)
    if not path.startswith("/"):
        return defer(f'{what} path "{path}" is not absolute for {instance.name} transport',
                     ERRNO_NOTABSOLUTE)
    return path


async def check_message_size(instance: Any, job: Any, limit: str) -> Outcome | None:
    """deliver.c check_message_size(): FAIL when the spooled message is
    bigger than the expanded limit, DEFER when the limit is unusable."""
    from twisted_mta.expand.operators import condition_integer
    from twisted_mta.transports.message import spool_message_size

    try:
        text = await expand(job, limit)
    except ExpansionError as e:
        return defer(f"failed to expand message_size_limit in {instance.name} transport: "
                     f"{e.message}")
    try:
        value = condition_integer(text, non_negative=True)
    except ExpansionError as e:
        return defer(f"invalid message_size_limit in {instance.name} transport: {e.message}")
    if value <= 0:
        return None
    size = await run_blocking(job, spool_message_size, job.message, job.data_path)
    if size > value:
        return fail(f"message is too big (transport limit = {value})")
    return None


async def _find_ugid(instance: Any, job: Any) -> tuple[int, int, bool] | Outcome:
    """``user`` and ``group``: exim-py does not change uid for a delivery
    (it runs as the daemon's own user), but the options are looked up as
    Exim would, an unknown user or group defers, and the ids found are the
    owner appendfile checks for and gives to the files it creates."""
    uid, gid = os.geteuid(), os.getegid()
    user_set = False
    user = _owner_option(instance, job, "user", "uid")
    if user is not None:
        if isinstance(user, str):
            found = await _look_up_owner(instance, job, "user", user, _find_user,
                                         ERRNO_UIDFAIL)
            if isinstance(found, Outcome):
                return found
            uid, gid = found
        else:
            uid = int(user)
            try:
                gid = pwd.getpwuid(uid).pw_gid
            except KeyError:
                pass
        user_set = True
    group = _owner_option(instance, job, "group", "gid")
    if group is not None:
        if isinstance(group, str):
            found_gid = await _look_up_owner(instance, job, "group", group, _find_group,
                                             ERRNO_GIDFAIL)
            if isinstance(found_gid, Outcome):
                return found_gid
            gid = found_gid
        else:
            gid = int(group)
    if user_set:
        # Exim's fixed_never_users is root on Debian; never_users adds more.
        never = "fixed_never_users" if uid == 0 else \
            "never_users" if _in_never_users(job, uid) else None
        if never is not None:
            return panic(f"User {uid} set for {instance.name} transport is on the {never} "
                         f"list", ERRNO_UIDFAIL)
    return uid, gid, user_set


def _in_never_users(job: Any, uid: int) -> bool:
    from twisted_mta.values import split_list

    text = job.config.get("never_users") if job.config is not None else None
    for item in split_list(str(text)) if text else []:
        try:
            found = int(item) if item.isdigit() else pwd.getpwnam(item).pw_uid
        except KeyError:
            continue
        if found == uid:
            return True
    return False


def _owner_option(instance: Any, job: Any, option: str, address_key: str) -> Any:
    """The transport's ``user`` or ``group``, else the one the router set
    on the address (``uid``/``gid`` in its extra)."""
    value = instance.get(option)
    return value if value is not None else job.addresses[0].extra.get(address_key)


async def _look_up_owner(instance: Any, job: Any, kind: str, text: str,
                         find: Callable[[str], T | None], errno: int) -> T | Outcome:
    """Expand a ``user`` or ``group`` string (*kind*) and find it with
    *find*; a failed expansion or an unknown name defers with *errno*."""
    try:
        name = await expand(job, text)
    except ExpansionError as e:
        return defer(f'Failed to expand {kind} string "{text}" for the {instance.name} '
                     f"transport: {e.message}", errno)
    found = find(name)
    if found is None:
        return defer(f'Failed to find {kind} "{name}" from expanded string "{text}" for '
                     f"the {instance.name} transport", errno)
    return found


def _find_user(name: str) -> tuple[int, int] | None:
    try:
        entry = pwd.getpwnam(name)
        return entry.pw_uid, entry.pw_gid
    except KeyError:
        pass
    if name.isdigit():
        uid = int(name)
        try:
            return uid, pwd.getpwuid(uid).pw_gid
        except KeyError:
            return uid, os.getegid()
    return None


def _find_group(name: str) -> int | None:
    try:
        return grp.getgrnam(name).gr_gid
    except KeyError:
        pass
    return int(name) if name.isdigit() else None


def set_variable(job: Any, name: str, value: str | None) -> None:
    """Set (or with None remove) an expansion variable for this job."""
    if value is None:
        job.ctx.variables.pop(name, None)
    else:
        job.ctx.variables[name] = value


def option_set(instance: Any, name: str) -> bool:
    """Whether *name* was set in the configuration (not just defaulted):
    some Exim defaults depend on other options."""
    return name in instance.options
