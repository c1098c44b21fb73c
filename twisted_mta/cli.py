"""The ``exim-py`` operator command: Exim's command-line modes."""

from __future__ import annotations

import os
import pwd
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import BinaryIO

from twisted_mta import EXIM_COMPAT_VERSION, __version__
from twisted_mta.config import ConfigError
from twisted_mta.expand.errors import ExpansionError
from twisted_mta.expand.evaluate import expand_string

#: The configuration used when no ``-C`` is given.
DEFAULT_CONFIG = os.path.join(os.path.dirname(__file__), "etc", "exim-py.conf")

#: Exim refuses longer command-line strings in -be (EXIM_EMAILADDR_MAX).
ARGUMENT_LIMIT = 256


class UsageError(Exception):
    pass


@dataclass
class Invocation:
    """The parsed command line."""

    mode: str | None = None
    config_file: str | None = None
    defines: dict[str, str] = field(default_factory=dict)
    arguments: list[str] = field(default_factory=list)
    host: str = ""
    ports: str | None = None
    pid_file: str | None = None
    #: -q30m: the daemon's queue-run interval (seconds); -qf / -qff.
    queue_interval: int | None = None
    queue_force: bool = False
    queue_thaw: bool = False
    #: -qq: a two-stage queue run (routing first, then deliveries).
    queue_two_stage: bool = False
    #: -odb (default), -odi, -odq, -odf: what happens after -bm.
    delivery_mode: str = "b"
    extract_recipients: bool = False
    dot_ends: bool = True
    #: -N: deliveries are routed but no transport is run ("*>" lines).
    dont_deliver: bool = False
    sender: str | None = None


def parse_arguments(argv: Sequence[str]) -> Invocation:
    """Exim-style options: modes are ``-bX`` flags, values may be attached
    (``-Cfile``, ``-DNAME=value``) or follow as the next argument."""
    inv = Invocation()
    args = list(argv)
    i = 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("-") or arg == "-" or inv.mode in ("be", "bP") and inv.arguments:
            inv.arguments.extend(args[i:])
            break
        if arg == "--":
            inv.arguments.extend(args[i + 1:])
            break
        if arg.startswith("-C"):
            inv.config_file, i = _attached_or_next(arg, 2, args, i)
        elif arg.startswith("-D"):
            text, i = _attached_or_next(arg, 2, args, i)
            name, _, value = text.partition("=")
            inv.defines[name.strip()] = value.strip()
        elif arg in ("-be", "-bV", "-bP", "-bs", "-bd", "-bdf", "-brt", "-bt", "-bv", "-bvs"):
            inv.mode = arg[1:]
        elif arg in ("-bh", "-bhc"):
            inv.mode = "bh"
            inv.host, i = _attached_or_next("-bh", 3, args, i)
        elif arg.startswith("-oX"):
            inv.ports, i = _attached_or_next(arg, 3, args, i)
        elif arg.startswith("-oP"):
            inv.pid_file, i = _attached_or_next(arg, 3, args, i)
        elif arg == "--version":
            inv.mode = "bV"
        elif arg.startswith("-q") and _queue_run_option(inv, arg):
            pass
        elif arg in ("-M", "-Mg"):
            inv.mode = arg[1:]
            inv.arguments.extend(args[i + 1:])
            break
        elif arg in ("-odb", "-odi", "-odq", "-odf"):
            inv.delivery_mode = arg[3]
        elif arg == "-bm":
            inv.mode = "bm"
        elif arg == "-t":
            inv.extract_recipients = True
        elif arg == "-N":
            inv.dont_deliver = True
        elif arg in ("-i", "-oi"):
            inv.dot_ends = False
        elif arg.startswith("-f"):
            inv.sender, i = _attached_or_next(arg, 2, args, i)
            inv.sender = "" if inv.sender in ("<>", "") else inv.sender
        elif arg.startswith("-F"):
            _, i = _attached_or_next(arg, 2, args, i)
        elif arg in ("-oem", "-oee", "-oep", "-oeq", "-oew", "-v", "-m", "-om"):
            pass  # sendmail compatibility options that change nothing here
        elif arg.startswith(("-bp", "-M")) and (queue := _queue_option(arg, args[i + 1:])):
            inv.mode, ids, used = queue
            inv.arguments.extend(ids)
            i += used
        else:
            raise UsageError(f"exim-py: unknown or unsupported option {arg}")
        i += 1
    if inv.mode is None and (inv.arguments or inv.extract_recipients):
        inv.mode = "bm"  # sendmail's default: addresses read a message
    return inv


def _queue_run_option(inv: Invocation, arg: str) -> bool:
    """``-q``, ``-qf``, ``-qff``, each also as ``-qq...`` (two-stage), and
    ``-q<time>`` (with ``-bd``)."""
    import re

    from twisted_mta.values import parse_time

    match = re.fullmatch(r"-q(q?)(f{0,2})(.*)", arg)
    if match is None:
        return False
    two_stage, flags, interval = match.groups()
    inv.queue_two_stage = bool(two_stage)
    inv.queue_force = bool(flags)
    inv.queue_thaw = flags == "ff"
    if interval:
        seconds = parse_time(interval)
        if seconds is None or seconds <= 0:
            raise UsageError(f"exim-py: bad time value {interval} after -q")
        inv.queue_interval = seconds
    elif inv.mode is None:
        inv.mode = "q"
    return True


def _queue_option(arg: str, following: list[str]) -> tuple[str, list[str], int] | None:
    """``-bp...`` and ``-M...`` (see twisted_mta.queue.operations)."""
    from twisted_mta.queue.operations import QueueUsageError, parse_queue_option

    try:
        return parse_queue_option(arg, following)
    except QueueUsageError as e:
        raise UsageError(str(e)) from None


def _attached_or_next(arg: str, prefix: int, args: list[str], i: int) -> tuple[str, int]:
    if len(arg) > prefix:
        return arg[prefix:], i
    if i + 1 >= len(args):
        raise UsageError(f"exim-py: string expected after {arg}")
    return args[i + 1], i + 1


def load(inv: Invocation):
    """Load the configuration, printing Exim's error text on failure."""
    from twisted_mta.config import load_config

    path = inv.config_file or DEFAULT_CONFIG
    try:
        return load_config(path, defines=inv.defines or None)
    except ConfigError as e:
        sys.stderr.write(e.format(datetime.now()) + "\n")
        sys.stderr.flush()
        raise SystemExit(1) from None


def version_text(config_path: str | None) -> str:
    lines = [
        f"Exim version {EXIM_COMPAT_VERSION} (exim-py {__version__})",
        # What works today; features join these lists as they land.
        "Support for: crypteq IPv6 OpenSSL DNSSEC OCSP PRDR PROXY",
        "Lookups (built-in): lsearch wildlsearch nwildlsearch iplsearch dnsdb dsearch redis",
        "Routers: accept dnslookup ipliteral manualroute redirect",
        "Transports: appendfile/maildir/mailstore lmtp pipe",
    ]
    if config_path:
        lines.append(f"Configuration file is {config_path}")
    return "\n".join(lines) + "\n"


def caller_login() -> str:
    try:
        return pwd.getpwuid(os.getuid()).pw_name
    except KeyError:
        return str(os.getuid())


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``exim-py`` console script."""
    argv = list(sys.argv[1:] if argv is None else argv)
    # Work in bytes-as-Latin-1 like the rest of the program.
    argv = [os.fsencode(a).decode("latin-1") for a in argv]
    try:
        inv = parse_arguments(argv)
    except UsageError as e:
        sys.stderr.write(f"{e}\n")
        return 1
    if inv.mode is None:
        sys.stderr.write("exim-py: no mode given (try -be, -bh, -bd, -bV or -bP)\n")
        return 1
    config = load(inv)
    out = sys.stdout.buffer
    if inv.mode == "bV":
        out.write(version_text(config.filename).encode("latin-1"))
        out.flush()
        return 0
    if inv.mode == "bP":
        return print_options(config, inv.arguments, out)
    if inv.mode == "bh":
        from twisted_mta.hostcheck import host_check

        return host_check(config, inv.host, sys.stdin.buffer, out, sys.stderr.buffer)
    if inv.mode == "bs":
        from twisted_mta.hostcheck import local_session

        return local_session(config, sys.stdin.buffer, out, sys.stderr.buffer)
    if inv.mode in ("bt", "bv", "bvs"):
        from twisted_mta.routers.addresstest import address_test_main

        return address_test_main(config, inv.arguments, inv.mode != "bt", inv.mode == "bvs",
                                 sys.stdin.buffer, out, envelope_sender=inv.sender)
    if inv.mode == "brt":
        return retry_test(config, inv)
    if inv.mode == "q":
        from twisted_mta.queue.command import queue_run

        return queue_run(config, force=inv.queue_force, thaw=inv.queue_thaw,
                         dont_deliver=inv.dont_deliver, two_stage=inv.queue_two_stage)
    if inv.mode in ("M", "Mg"):
        from twisted_mta.queue.command import deliver_messages

        return deliver_messages(config, inv.arguments, out, give_up=inv.mode == "Mg",
                                dont_deliver=inv.dont_deliver)
    if inv.mode == "bm":
        return submit_message(config, inv)
    if inv.mode.startswith(("bp", "M")):
        from twisted_mta.queue.operations import main_queue_command

        return main_queue_command(config, inv.mode, inv.arguments)
    if inv.mode in ("bd", "bdf"):
        from twisted_mta.service import run_daemon

        return run_daemon(config, ports=inv.ports, pid_file=inv.pid_file,
                          queue_interval=inv.queue_interval)
    return expansion_test(config, inv.arguments, sys.stdin.buffer, out)


def retry_test(config, inv: Invocation) -> int:
    """``-brt host|domain|address [domain] [error]``: the matching rule."""
    from twisted_mta.expand.context import ExpansionContext
    from twisted_mta.queue.retry import RetryRules, brt_output

    found: list[tuple[str, int]] = []

    async def test() -> None:
        found.append(await brt_output(RetryRules(config), inv.arguments, sender=inv.sender,
                                      ctx=ExpansionContext(config=config)))

    run_coroutine(test())
    text, status = found[0]
    sys.stdout.write(text)
    sys.stdout.flush()
    return status


def submit_message(config, inv: Invocation) -> int:
    """``-bm`` (and sendmail's default mode): read a message from standard
    input, spool it, then deliver it as ``-od`` says."""
    import time

    from twisted_mta.log import EximLog, SyncLogWriter
    from twisted_mta.spool.ids import MessageIdAllocator
    from twisted_mta.spool.store import Spool
    from twisted_mta.submit import Caller, Submission, SubmissionError, submit

    class _WallClock:
        seconds = staticmethod(time.time)

    spool = Spool(config.get("spool_directory") or "./exim-py-spool",
                  split=bool(config.get("split_spool_directory")))
    log = EximLog.from_config(config, _WallClock(), os.getpid(), SyncLogWriter())
    submission = Submission(sys.stdin.buffer.read(), recipients=list(inv.arguments),
                            sender=inv.sender, extract_recipients=inv.extract_recipients,
                            dot_ends=inv.dot_ends, dont_deliver=inv.dont_deliver)
    spooled: list[str] = []

    async def spool_it() -> None:
        spooled.append(await submit(submission, config=config, spool=spool, log=log,
                                    id_allocator=MessageIdAllocator(time.time, os.getpid()),
                                    clock=_WallClock(), caller=Caller.current(config)))

    try:
        run_coroutine(spool_it())
    except SubmissionError as e:
        sys.stderr.write(f"exim-py: {e}\n")
        return 1
    message_id = spooled[0]
    if inv.delivery_mode == "q" or config.get("queue_only"):
        return 0
    if inv.delivery_mode in ("i", "f"):
        from twisted_mta.queue.command import deliver_messages

        return deliver_messages(config, [message_id], sys.stdout.buffer)
    from twisted_mta.queue.command import deliver_in_background

    deliver_in_background(config.filename, inv.defines, message_id)
    return 0


def print_options(config, names: list[str], out: BinaryIO) -> int:
    from twisted_mta.config import format_all_options, format_option

    if not names:
        out.write(format_all_options(config).encode("latin-1"))
        return 0
    status = 0
    i = 0
    while i < len(names):
        name = names[i]
        if name in ("router", "transport", "authenticator", "macro") and i + 1 < len(names):
            name = f"{name} {names[i + 1]}"
            i += 1
        text, ok = format_option(config, name)
        out.write(text.encode("latin-1"))
        if not ok:
            status = 1
        i += 1
    out.flush()
    return status


def expansion_test(config, strings: list[str], stdin: BinaryIO, out: BinaryIO) -> int:
    """``-be``: expand each argument, or each line of standard input."""
    ctx = _be_context(config)
    ctx.threadpool.start()
    try:
        run_coroutine(_expansion_session(ctx, config, strings, stdin, out))
    finally:
        ctx.threadpool.stop()
    return 0


def run_coroutine(coro) -> None:
    """Run *coro* to the end.

    It runs synchronously for as long as it does not wait; only if it awaits
    a Deferred (a network lookup, ``${run}``...) is the reactor started to
    drive the rest.  Most ``-be`` sessions never wait, and importing the
    reactor would double the command's start-up time.  Exceptions from the
    coroutine propagate."""
    failure: list[BaseException] = []

    def step(error: BaseException | None = None):
        """Resume the coroutine (raising *error* at its await); return the
        Deferred it now waits on, or None when it has finished."""
        try:
            return coro.send(None) if error is None else coro.throw(error)
        except StopIteration:
            return None
        except BaseException as e:  # re-raised below, outside the reactor
            failure.append(e)
            return None

    waiting = step()
    if waiting is not None:
        from twisted.internet import reactor
        from twisted.python.failure import Failure

        def resume(result):
            # Called while the awaited Deferred runs its callbacks, so the
            # coroutine's await still sees a plain result there; a failure is
            # thrown in, as Twisted's own coroutine driver does, and consumed.
            error = result.value if isinstance(result, Failure) else None
            following = step(error)
            if following is None:
                reactor.stop()
            else:
                following.addBoth(resume)
            return None if error is not None else result

        waiting.addBoth(resume)
        reactor.run()
    if failure:
        raise failure[0]


class LazyReactor:
    """Twisted's global reactor, imported when first used."""

    def __getattr__(self, name: str):
        from twisted.internet import reactor

        return getattr(reactor, name)


def _be_context(config):
    from twisted.python.threadpool import ThreadPool

    from twisted_mta.expand.context import ExpansionContext

    pool = ThreadPool(minthreads=0, maxthreads=4, name="exim-py-be")
    login = caller_login()
    qualify = config.get("qualify_domain") or ""
    variables = {
        "sender_address": f"{login}@{qualify}",
        "sender_address_local_part": login,
        "sender_address_domain": qualify,
        "authenticated_id": login,
        "authenticated_sender": f"{login}@{qualify}",
        "sender_ident": login,
        "recipients": "",
    }
    variables["__environ__"] = kept_environment(config)
    return ExpansionContext(
        config=config, reactor=LazyReactor(), variables=variables, threadpool=pool
    )


def kept_environment(config) -> dict[str, str]:
    """The environment Exim leaves: only ``keep_environment`` names, plus
    ``add_environment`` settings."""
    from twisted_mta.values import split_list

    kept: dict[str, str] = {}
    for name in split_list(config.get("keep_environment") or ""):
        value = os.environ.get(name)
        if value is not None:
            kept[name] = os.fsencode(value).decode("latin-1")
    for setting in split_list(config.get("add_environment") or ""):
        name, _, value = setting.partition("=")
        kept[name] = value
    return kept


async def _expansion_session(ctx, config, strings, stdin, out) -> None:
    write = out.write
    if strings:
        for text in strings:
            if len(text) > ARGUMENT_LIMIT:
                sys.stderr.write(
                    f"exim: length limit exceeded ({len(text)} > {ARGUMENT_LIMIT}) for: {text}\n"
                )
                raise SystemExit(1)
            write(await expansion_test_line(ctx, config, text))
    else:
        while True:
            write(b"> ")
            out.flush()
            line = read_input_line(stdin)
            if line is None:
                write(b"\n")
                break
            write(await expansion_test_line(ctx, config, line))
    out.flush()


def read_input_line(stdin: BinaryIO) -> str | None:
    """One logical line: trailing blanks stripped, a trailing backslash
    continues it onto the next line (whose leading blanks go)."""
    pieces: list[str] = []
    while True:
        raw = stdin.readline()
        if not raw:
            return "".join(pieces) if pieces else None
        text = raw.decode("latin-1").rstrip(" \t\n\r\f\v")
        if pieces:
            text = text.lstrip(" \t\n\r\f\v")
        pieces.append(text)
        if not text.endswith("\\"):
            return "".join(pieces)
        pieces[-1] = text[:-1]


async def expansion_test_line(ctx, config, line: str) -> bytes:
    """What ``-be`` prints for one string."""
    text, _ = config.substitute_macros(line)
    if text[:1].isupper() and text[:1].isascii():
        try:
            name = config.define_macro(text)
        except ConfigError as e:
            return f"{e.message}\n".encode("latin-1")
        return f"Defined macro '{name}'\n".encode("latin-1")
    try:
        result = await expand_string(text, ctx)
    except ExpansionError as e:
        return f"Failed: {e.message}\n".encode("latin-1")
    except Exception as e:  # a bug must not end the session: report it and go on
        import traceback

        traceback.print_exc()
        return f"Failed: internal error: {type(e).__name__}: {e}\n".encode("latin-1")
    return result.encode("latin-1") + b"\n"


if __name__ == "__main__":
    raise SystemExit(main())
