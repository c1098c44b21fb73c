"""``-bt`` (address testing) and ``-bv``/``-bvs`` (verification) output,
as Exim 4.96's verify_address() prints it (verify.c).

``-bt`` routes every address an address leads to and prints full
information: failures and deferrals as they happen, pipes and files with
their transport, then the addresses routed to local transports and those
routed to remote ones (each list in Exim's order, which is the reverse of
the routing order), with their parents (``<--``), router, transport and
hosts.  ``-bv`` prints one line per address: ``verified``, ``failed to
verify: ...`` or ``cannot be resolved at this time: ...``; it follows a
redirection only when it yields exactly one new address.

The exit status is 0, 1 when an address was deferred, 2 when one failed
(or had a syntax error).
"""

from __future__ import annotations

import io
from typing import Any

from twisted_mta.queue.address import DeliveryAddress
from twisted_mta.routers.engine import (
    ACCEPT,
    ADDRESS_TEST,
    DEFER,
    FAIL,
    VERIFY_RECIPIENT,
    VERIFY_SENDER,
    RoutingContext,
    route_one,
    unique_of,
)

OK_STATUS, DEFER_STATUS, FAIL_STATUS = 0, 1, 2


def _writer(out: Any) -> Any:
    if isinstance(out, io.TextIOBase):
        return out.write
    return lambda text: out.write(text.encode("latin-1"))


def split_argument(text: str) -> list[str]:
    """A command-line argument may hold several comma-separated addresses
    (parse_find_address_end() finds where each ends); the first item may
    be empty, which is a syntax error, as in Exim."""
    from twisted_mta.expand.addresses import find_address_end

    items: list[str] = []
    pos = 0
    while pos < len(text):
        end = find_address_end(text, pos)
        items.append(text[pos:end])
        if end >= len(text):
            break
        pos = end + 1
        while pos < len(text) and (text[pos] == "," or text[pos].isspace()):
            pos += 1
    return items


def _is_pfr(address: DeliveryAddress) -> bool:
    return address.pipe_command is not None or address.file_path is not None


class _Tester:
    """One -bt/-bv run: the duplicate tree lasts for the whole run, as
    Exim's tree_duplicates does."""

    def __init__(self, config: Any, ctx: Any, write: Any, verify: bool, sender: bool,
                 caller_sender: str) -> None:
        self.config = config
        self.ctx = ctx
        self.write = write
        self.verify = verify
        self.sender_mode = sender
        self.caller_sender = caller_sender
        self.duplicates: set[str] = set()

    def _mode(self) -> str:
        if not self.verify:
            return ADDRESS_TEST
        return VERIFY_SENDER if self.sender_mode else VERIFY_RECIPIENT

    def _transport(self, name: str | None) -> Any:
        if not name:
            return None
        return self.config.transport(name) if hasattr(self.config, "transport") else None

    async def test(self, text: str) -> int:
        """test_address(): parse, qualify, then verify_address()."""
        from twisted_mta.expand.addresses import AddressError, extract_address

        try:
            address, domain_at = extract_address(text)
        except AddressError as e:
            self.write(f"syntax error: {e.args[0]}\n")
            return FAIL_STATUS
        if not address:
            self.write("syntax error: empty address\n")
            return FAIL_STATUS
        if not domain_at and "@" not in address:
            option = "qualify_domain" if self.sender_mode else "qualify_recipient"
            qualify = self.config.get(option) or self.config.get("qualify_domain") \
                or self.config.get("primary_hostname") or ""
            address = f"{address}@{qualify}"
        rc = await self.verify_address(address)
        return {ACCEPT: OK_STATUS, DEFER: DEFER_STATUS}.get(rc, FAIL_STATUS)

    async def verify_address(self, address: str) -> str:
        variables = self.ctx.variables
        saved = variables.get("sender_address")
        if self.sender_mode:
            # While a sender is routed, $sender_address is <>, as for a bounce.
            variables["sender_address"] = ""
        rctx = RoutingContext(self.config, self.ctx, self._mode(),
                              sender="" if self.sender_mode else self.caller_sender)
        try:
            if self.verify:
                return await self._short(rctx, address)
            return await self._full(rctx, address)
        finally:
            if saved is None:
                variables.pop("sender_address", None)
            else:
                variables["sender_address"] = saved

    async def _short(self, rctx: RoutingContext, address: str) -> str:
        """-bv: the top address's verdict only."""
        current = DeliveryAddress(address)
        start: str | None = None
        while True:
            routed = await route_one(rctx, current, start)
            if routed.kind == FAIL:
                text = f"{address} failed to verify"
                if routed.message is not None:
                    text += f": {routed.message}"
                self.write(text + "\n")
                return FAIL
            if routed.kind == DEFER:
                self.write(f"{address} cannot be resolved at this time: "
                           f"{routed.message or 'unknown error'}\n")
                return DEFER
            children = [(c, s) for c, s in routed.children if c.discarded is None]
            if len(children) != 1 or _is_pfr(children[0][0]):
                self.write(f"{address} verified\n")
                return ACCEPT
            current, start = children[0]

    async def _full(self, rctx: RoutingContext, address: str) -> str:
        """-bt: everything the address leads to."""
        write = self.write
        pending: list[tuple[DeliveryAddress, str | None]] = [(DeliveryAddress(address), None)]
        local: list[DeliveryAddress] = []
        remote: list[DeliveryAddress] = []
        allok = True
        result = ACCEPT
        while pending:
            current, start = pending.pop(0)
            if _is_pfr(current):
                allok = False
                parent = current.parent.address if current.parent is not None else ""
                write(f"{parent} -> {current.address}")
                if current.transport is None:
                    write("\n*** Error in setting up pipe, file, or autoreply:\n"
                          f"{self._pfr_error(current)}\n")
                else:
                    write(f"\n  transport = {current.transport}\n")
                continue
            routed = await route_one(rctx, current, start)
            if routed.kind in (FAIL, DEFER):
                allok = False
                verdict = "is undeliverable" if routed.kind == FAIL else \
                    "cannot be resolved at this time"
                message = routed.message
                if message is None and routed.kind == DEFER:
                    message = "unknown error"
                text = f"{current.address} {verdict}"
                if message is not None:
                    text += f": {message}"
                write(text + self._parents(current) + "\n")
                if routed.kind == FAIL:
                    result = FAIL
                elif result == ACCEPT:
                    result = DEFER
                continue
            children = [(c, s) for c, s in routed.children if c.discarded is None]
            pending[0:0] = children
            for delivered in routed.deliveries:
                if delivered.discarded is not None:
                    continue
                transport = self._transport(delivered.transport)
                is_local = transport is not None and (transport.driver or "") != "smtp"
                (local if is_local else remote).insert(0, delivered)
        if allok and not local and not remote:
            write(f"mail to {address} is discarded\n")
            return result
        for delivered in local + remote:
            self._show(delivered)
        return result

    def _pfr_error(self, address: DeliveryAddress) -> str:
        if address.pipe_command is not None:
            option = "pipe_transport"
        elif (address.file_path or "").endswith("/"):
            option = "directory_transport"
        else:
            option = "file_transport"
        return f"{option} unset in {address.router} router"

    @staticmethod
    def _parents(address: DeliveryAddress) -> str:
        text = ""
        parent = address.parent
        while parent is not None:
            text += f"\n    <-- {parent.address}"
            parent = parent.parent
        return text

    def _show(self, address: DeliveryAddress) -> None:
        write = self.write
        text = address.address
        unique = unique_of(address)
        if unique in self.duplicates:
            text += "   [duplicate, would not be delivered]"
        else:
            self.duplicates.add(unique)
        transport = self._transport(address.transport)
        write(f"{text}{self._parents(address)}\n  router = {address.router}, transport = "
              f"{address.transport if address.transport else 'unset'}\n")
        if not address.hosts or transport is None:
            return
        if transport.driver == "smtp" and transport.get("hosts_override") and \
                transport.get("hosts"):
            return
        is_local = (transport.driver or "") != "smtp"
        write(format_hosts(address.hosts, is_local))


def format_hosts(hosts: list[Any], local_transport: bool) -> str:
    """The ``host`` lines of -bt, aligned as Exim aligns them."""
    width = max(len(h.name) for h in hosts)
    address_width = max(len(h.address) if h.address else 7 for h in hosts)
    lines = []
    for h in hosts:
        line = f"  host {h.name.ljust(width)} "
        if h.address:
            line += "[" + h.address + "]".ljust(address_width + 1 - len(h.address))
        elif local_transport:
            line += " " + "".ljust(address_width) + " "
        else:
            line += "[unknown" + "]".ljust(address_width + 1 - 7)
        if h.mx is not None and h.mx >= 0:
            line += f" MX={h.mx}"
        if h.port is not None:
            line += f" port={h.port}"
        if h.address is None and not local_transport:
            line += " ** unusable **"
        lines.append(line + "\n")
    return "".join(lines)


def _read_line(stdin: Any) -> str | None:
    """get_stdinput(): one logical line, trailing white space removed, a
    trailing backslash joining the next line (whose leading white space
    goes); None at the end of the input."""
    pieces: list[str] = []
    while True:
        raw = stdin.readline()
        if not raw:
            return "".join(pieces) if pieces else None
        if isinstance(raw, bytes):
            raw = raw.decode("latin-1")
        text = raw.rstrip()
        if pieces:
            text = text.lstrip()
        pieces.append(text)
        if not text.endswith("\\"):
            return "".join(pieces)
        pieces[-1] = text[:-1]


async def address_test(config: Any, addresses: list[str], out: Any, verify: bool, ctx: Any,
                       *, sender: bool = False, stdin: Any = None,
                       caller_sender: str | None = None) -> int:
    """Exim's ``-bt`` (*verify* false) or ``-bv`` (*verify* true; with
    *sender*, ``-bvs``) for *addresses*, or for each line of *stdin* when
    there are none (with Exim's ``> `` prompt).  Writes to *out* (a text
    or binary stream) and returns the exit status."""
    write = _writer(out)
    if caller_sender is None:
        caller_sender = str(ctx.variables.get("sender_address", "") or "")
    tester = _Tester(config, ctx, write, verify, sender, caller_sender)
    status = OK_STATUS

    def account(code: int) -> None:
        nonlocal status
        if code == FAIL_STATUS:
            status = FAIL_STATUS
        elif code == DEFER_STATUS and status == OK_STATUS:
            status = DEFER_STATUS

    if addresses:
        for argument in addresses:
            for item in split_argument(argument):
                account(await tester.test(item))
    elif stdin is not None:
        while True:
            write("> ")
            flush = getattr(out, "flush", None)
            if flush is not None:
                flush()
            line = _read_line(stdin)
            if line is None:
                write("\n")
                break
            account(await tester.test(line))
    return status


class StderrLog:
    """Where -bt and -bv show the log lines routers write (Exim prints
    them on standard error as ``LOG: MAIN`` blocks)."""

    def __init__(self, stream: Any = None) -> None:
        self.stream = stream

    def main(self, text: str) -> None:
        import sys

        stream = self.stream or sys.stderr
        stream.write(f"LOG: MAIN\n  {text}\n")
        stream.flush()


def address_test_main(config: Any, addresses: list[str], verify: bool, sender: bool,
                      stdin: Any, out: Any, envelope_sender: str | None = None) -> int:
    """The ``-bt``/``-bv``/``-bvs`` command: a reactor, a thread pool and a
    resolver for the routers' lookups, then L{address_test}.
    *envelope_sender* is ``-f``'s address (the caller's login otherwise),
    which the routers' ``senders`` conditions see."""
    from twisted.internet import defer, task
    from twisted.python.threadpool import ThreadPool

    from twisted_mta.cli import caller_login, kept_environment
    from twisted_mta.dns import Resolver
    from twisted_mta.expand.context import ExpansionContext

    status: list[int] = []

    async def run(reactor: Any) -> None:
        pool = ThreadPool(minthreads=0, maxthreads=4, name="exim-py-bt")
        pool.start()
        try:
            login = caller_login()
            qualify = config.get("qualify_domain") or config.get("primary_hostname") or ""
            address = f"{login}@{qualify}"
            if envelope_sender is not None:
                address = envelope_sender
                if address and "@" not in address:
                    address = f"{address}@{qualify}"
            local_part, _, domain = address.rpartition("@")
            variables = {"sender_address": address,
                         "sender_address_local_part": local_part,
                         "sender_address_domain": domain,
                         "sender_ident": login,
                         "__environ__": kept_environment(config)}
            ctx = ExpansionContext(config=config, reactor=reactor, variables=variables,
                                   threadpool=pool, resolver=Resolver(reactor, pool))
            ctx.log = StderrLog()
            status.append(await address_test(config, addresses, out, verify, ctx,
                                             sender=sender, stdin=stdin))
        finally:
            pool.stop()
            flush = getattr(out, "flush", None)
            if flush is not None:
                flush()

    try:
        task.react(lambda reactor: defer.Deferred.fromCoroutine(run(reactor)))
    except SystemExit:
        pass
    return status[0] if status else FAIL_STATUS
