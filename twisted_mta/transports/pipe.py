"""The ``pipe`` transport: Exim's ``transports/pipe.c``, with the output
handling of ``deliver.c``.

The command is split into arguments first and each argument is then
expanded on its own (``$pipe_addresses`` becomes one argument per
address), so no shell sees the data unless ``use_shell`` is set.  A
command that is not an absolute path is looked for in ``path``.  The child
gets only Exim's environment variables (``LOCAL_PART``, ``DOMAIN``,
``SENDER``, ``RECIPIENT``...) and ``environment``, runs as the leader of a
new process group with ``umask``, and is sent the message on its standard
input (``message_prefix``, the message, ``message_suffix``, or a batched
SMTP transaction with ``use_bsmtp``).

Results, as Exim gives them: exit 0 delivers; a status listed in
``temp_errors`` defers; any other status fails with ``Child process of T
transport returned N (could mean ...) from command: /path`` (Exim 4.96
shows only the first argument); a signal fails (``freeze_signal``:
freezes); exit 127 with ``freeze_exec_fail`` freezes; ``ignore_status``
delivers whatever the status.  ``timeout`` kills the process group and
fails (``timeout_defer``: defers).  More than ``max_output`` bytes of
output kill the process group.

Output (standard output and error together) is read as it comes.  When
one of ``return_output``, ``return_fail_output``, ``log_output``,
``log_fail_output`` or ``log_defer_output`` is set it is kept in
``address.extra["transport_output"]`` (bytes); the line Exim writes to the
main log for the log options is in ``address.extra["transport_output_log"]``
(``<address>: T transport output: first line``) for the delivery process to
log; ``address.extra["return_output"]`` is True when the output is to be
included in a bounce (with ``return_output`` any output makes the delivery
fail with ``return message generated``).
"""

from __future__ import annotations

import errno
import os
from typing import Any

from twisted.internet import defer as tdefer
from zope.interface import implementer

from twisted_mta.expand.errors import ExpansionError
from twisted_mta.interfaces import ITransport
from twisted_mta.log import log_quote
from twisted_mta.taint import is_tainted
from twisted_mta.transports import common as C
from twisted_mta.transports.appendfile import rcpt_address
from twisted_mta.transports.common import Outcome, defer, expand, panic, set_variable
from twisted_mta.transports.message import (
    HeaderChangeError,
    MessageStream,
    WriteOptions,
    build_headers,
)
from twisted_mta.transports.process import (
    EX_EXECFAILED,
    ChildProtocol,
    kill_group,
    pump,
    set_up_command,
    spawn,
    wait_for,
)
from twisted_mta.values import split_list

DEFAULT_PREFIX = "From ${if def:return_path{$return_path}{MAILER-DAEMON}} ${tod_bsdinbox}\n"
TOO_MUCH = b"\n\n*** Too much output - remainder discarded ***\n"

# sysexits.h, as os_strexit() explains them.
_EXIT_TEXT = {
    64: "(could mean usage or syntax error)",
    65: "(could mean error in input data)",
    66: "(could mean input data missing)",
    67: "(could mean user nonexistent)",
    68: "(could mean host nonexistent)",
    69: "(could mean service or program unavailable)",
    70: "(could mean internal software error)",
    71: "(could mean internal operating system error)",
    72: "(could mean system file missing)",
    73: "(could mean can't create output file)",
    74: "(could mean input/output error)",
    75: "(could mean temporary error)",
    76: "(could mean protocol error)",
    77: "(could mean permission denied)",
    78: "(could mean configuration error)",
    127: "(could mean unable to exec or command does not exist)",
}


def exit_explanation(code: int) -> str:
    """What Exim adds after ``returned N``: a sysexits meaning, or for a
    status over 128 the signal a shell would have reported."""
    if code > 128:
        return f"(could mean shell command ended by signal {code - 128} " \
            f"({signal_name(code - 128)}))"
    return _EXIT_TEXT.get(code, "")


def signal_name(number: int) -> str:
    """strsignal(), which Exim uses on Linux."""
    import signal

    try:
        name = signal.strsignal(number)
    except ValueError:
        name = None
    return name or f"Unknown signal {number}"


class _PipeProtocol(ChildProtocol):
    """Collects the command's output up to ``max_output``."""

    def __init__(self, max_output: int, keep: bool) -> None:
        super().__init__()
        self.max_output = max_output
        self.keep = keep
        self.output = bytearray()
        self.count = 0
        self.too_much = False

    def output_received(self, data: bytes) -> None:
        if self.too_much:
            return
        if self.keep:
            self.output += data
        self.count += len(data)
        if self.count > self.max_output:
            self.too_much = True
            if self.keep:
                self.output += TOO_MUCH
            kill_group(self.transport)


@implementer(ITransport)
class PipeTransport:
    """``driver = pipe``."""

    name = "pipe"
    local = True

    async def deliver(self, instance: Any, job: Any) -> None:
        result = await C.guard_delivery(instance, self._deliver(instance, job))
        outcome, output = (result, b"") if isinstance(result, Outcome) else result
        if outcome.status != C.OK:
            outcome.user_message = "local delivery failed"
        self._handle_output(instance, job, outcome, output)
        outcome.apply(job.addresses)

    def _handle_output(self, instance: Any, job: Any, outcome: Outcome, output: bytes) -> None:
        """deliver.c's treatment of a transport's output file."""
        if not output:
            return
        outcome.extra["transport_output"] = bytes(output)
        status = outcome.status
        failed = status == C.FAIL
        deferred = status in (C.DEFER, C.PANIC)
        if instance.get("log_output") or (failed and instance.get("log_fail_output")) or \
                (deferred and instance.get("log_defer_output")):
            first = bytes(output).split(b"\n", 1)[0].decode("latin-1").rstrip(" \t\n\r\v\f")
            address = job.addresses[0].address
            outcome.extra["transport_output_log"] = \
                f"<{address}>: {instance.name} transport output: {log_quote(first)}"
        first_address = job.addresses[0]
        if job.message.sender or first_address.errors_to:
            if instance.get("return_output"):
                outcome.status = C.FAIL
                if outcome.errno == 0 and not outcome.message:
                    outcome.message = "return message generated"
                outcome.extra["return_output"] = True
            elif instance.get("return_fail_output") and outcome.status == C.FAIL:
                outcome.extra["return_output"] = True

    async def _deliver(self, instance: Any, job: Any) -> tuple[Outcome, bytes]:
        name = instance.name
        problem = _config_problem(instance)
        if problem is not None:
            return panic(problem), b""
        setup = await C.start_delivery(instance, job)
        if isinstance(setup, Outcome):
            return setup, b""
        first = job.addresses[0]

        force_pipe = None
        if first.pipe_command is not None:
            set_variable(job, "address_pipe", first.address)
            if instance.get("force_command"):
                cmd = instance.get("command")
                expand_arguments, expand_fail = True, C.PANIC
                force_pipe = first.address[1:] if first.address.startswith("|") \
                    else first.pipe_command
            else:
                cmd = first.pipe_command.lstrip(" \t\n\r\v\f")
                expand_arguments = bool(first.extra.get("expand_pipe"))
                expand_fail = C.FAIL
        else:
            cmd = instance.get("command")
            expand_arguments, expand_fail = True, C.PANIC
        if not cmd:
            return defer(f"no command specified for {name} transport"), b""
        if is_tainted(cmd):
            return panic(f"Tainted '{cmd}' (command for {name} transport) not permitted"), b""

        if instance.get("use_shell"):
            argv = await _shell_command(job, cmd, expand_arguments, expand_fail, name)
        else:
            argv = await _direct_command(job, instance, cmd, expand_arguments, expand_fail,
                                         force_pipe)
        if isinstance(argv, Outcome):
            return argv, b""

        env = await _environment(job, instance, setup)
        if isinstance(env, Outcome):
            return env, b""
        cwd = await _working_directory(job, instance, setup)
        if isinstance(cwd, Outcome):
            return cwd, b""
        if job.message.dont_deliver:
            return Outcome(C.OK), b""

        stream = await _message_stream(job, instance, setup.return_path)
        if isinstance(stream, Outcome):
            return stream, b""
        return await self._run(job, instance, cmd, argv, env, cwd, stream)

    async def _run(self, job: Any, instance: Any, cmd: str, argv: list[str],
                   env: dict[str, str], cwd: str, stream: MessageStream) -> tuple[Outcome, bytes]:
        name = instance.name
        keep = any(instance.get(o) for o in ("return_output", "return_fail_output",
                                              "log_output", "log_fail_output",
                                              "log_defer_output"))
        protocol = _PipeProtocol(int(instance.get("max_output")), keep)
        try:
            transport = spawn(job.reactor, protocol, argv[0], argv, env, cwd,
                              int(instance.get("umask")))
        except OSError as e:
            return defer(f"Failed to create child process for {name} transport: "
                         f"{os.strerror(e.errno or 0)}", e.errno or 0), b""
        timeout = int(instance.get("timeout"))
        outcome = Outcome(C.OK)
        chunks = iter(stream)
        writing = tdefer.Deferred.fromCoroutine(
            pump(job, chunks, transport.write, protocol.pressure,
                 lambda: protocol.stdin_closed))
        wait = timeout
        try:
            finished, _ = await wait_for(writing, timeout, job.clock)
        except OSError as e:
            finished = True
            outcome = panic(f"Error {e.errno or 0}", e.errno or 0)
        if not finished:
            outcome = Outcome(C.DEFER if instance.get("timeout_defer") else C.FAIL,
                              "timeout while writing to pipe")
            wait = 1
        try:
            transport.closeStdin()
        except Exception:
            pass

        exited, status = await wait_for(protocol.when_exited(), wait, job.clock)
        tmsg = f" (preceded by {outcome.message})" if outcome.message else ""
        if not exited:
            kill_group(transport)
            result = Outcome(C.DEFER if instance.get("timeout_defer") else C.FAIL,
                             f"pipe delivery process timed out{tmsg}")
        elif outcome.status == C.PANIC:
            result = outcome
        else:
            result = _judge(instance, cmd, argv, status, outcome, tmsg)
        # Exim waits for its output reader, which sees the end of the output.
        ended, _ = await wait_for(protocol.when_ended(), max(timeout, 1), job.clock)
        if not ended:
            kill_group(transport)
            try:
                transport.loseConnection()
            except Exception:
                pass
        return result, bytes(protocol.output)


def _judge(instance: Any, cmd: str, argv: list[str], rc: int, outcome: Outcome,
           tmsg: str) -> Outcome:
    """The result of a finished child with status *rc* (minus the signal
    number when killed by a signal)."""
    name = instance.name
    if rc == 0:
        return outcome
    if rc < 0:
        text = (f'Child process of {name} transport (running command "{cmd}") was terminated '
                f"by signal {-rc} ({signal_name(-rc)}){tmsg}")
        if instance.get("freeze_signal"):
            return Outcome(C.DEFER, text, special_action="freeze")
        if not instance.get("ignore_status"):
            return Outcome(C.FAIL, text)
        return outcome
    if instance.get("freeze_exec_fail") and rc == EX_EXECFAILED:
        return Outcome(C.DEFER, f'pipe process failed to exec "{cmd}"{tmsg}',
                       special_action="freeze")
    if instance.get("ignore_status"):
        return outcome
    temp = str(instance.get("temp_errors") or "")
    if temp.startswith("*"):
        status = C.DEFER
    else:
        status = C.FAIL
        for item in split_list(temp):
            if item.strip().isdigit() and int(item) == rc:
                status = C.DEFER
                break
    text = f"Child process of {name} transport returned {rc}"
    explanation = exit_explanation(rc)
    if explanation:
        text += " " + explanation
    # Exim 4.96 means to list the whole command but shows only its first word.
    first = f'"{argv[0]}"' if (" " in argv[0] or "\t" in argv[0]) else argv[0]
    text += f" from command: {first}{tmsg}"
    return Outcome(status, text)


def _config_problem(instance: Any) -> str | None:
    """The checks pipe_transport_init() makes when Exim starts."""
    name = instance.name
    temp = instance.get("temp_errors")
    if temp is not None and temp != "*" and temp.strip("0123456789: "):
        return (f"temp_errors must be a list of numbers or an asterisk for the {name} "
                "transport")
    if instance.get("return_output") and instance.get("return_fail_output"):
        return f"both return_output and return_fail_output set for {name} transport"
    if instance.get("log_output") and instance.get("log_fail_output"):
        return f"both log_output and log_fail_output set for the {name} transport"
    if instance.get("restrict_to_path") and instance.get("use_shell"):
        return f"both restrict_to_path and use_shell set for {name} transport"
    if instance.get("allow_commands") and instance.get("use_shell"):
        return f"both allow_commands and use_shell set for {name} transport"
    if instance.get("pipe_as_creator") and (instance.get("user") is not None
                                           or instance.get("group") is not None):
        return (f"both pipe_as_creator and an explicit uid/gid are set for the {name} "
                "transport")
    if instance.get("body_only") and instance.get("headers_only"):
        return f"{name} transport: body_only and headers_only are mutually exclusive"
    return None


async def _direct_command(job: Any, instance: Any, cmd: str, expand_arguments: bool,
                          expand_fail: str, force_pipe: str | None) -> list[str] | Outcome:
    """set_up_direct_command(): the arguments, allow_commands,
    restrict_to_path and the search of ``path``."""
    name = instance.name
    argv = await set_up_command(job, cmd, expand_arguments=expand_arguments,
                                expand_fail=expand_fail, etext=f"{name[:50]} transport",
                                force_pipe=force_pipe)
    if isinstance(argv, Outcome):
        return argv
    if not argv:
        return defer(f"no command specified for {name} transport")
    permitted = False
    allow = instance.get("allow_commands")
    if allow is not None:
        try:
            allowed = await expand(job, str(allow))
        except ExpansionError as e:
            return defer(f'failed to expand string "{allow}" for {name} transport: {e.message}')
        permitted = argv[0] in split_list(allowed)
    if not permitted:
        if instance.get("restrict_to_path"):
            if "/" in argv[0]:
                return Outcome(C.FAIL, f'"/" found in "{cmd}" (command for {name} transport) - '
                               "failed for security reasons")
        elif allow is not None:
            return Outcome(C.FAIL, f'"{argv[0]}" command not permitted by {name} transport')
    if not argv[0].startswith("/"):
        try:
            search = await expand(job, str(instance.get("path") or ""))
        except ExpansionError:
            search = ""
        found = await C.run_blocking(job, _search_path, split_list(search), argv[0])
        if found is None:
            return Outcome(C.FAIL, f'"{argv[0]}" command not found for {name} transport')
        argv[0] = found
    return argv


async def _shell_command(job: Any, cmd: str, expand_arguments: bool, expand_fail: str,
                         name: str) -> list[str] | Outcome:
    """set_up_shell_command(): ``/bin/sh -c <expanded command>``, with
    ``$pipe_addresses`` replaced by the addresses before expansion."""
    if not expand_arguments:
        return ["/bin/sh", "-c", cmd]
    text = cmd
    for token in ("${pipe_addresses}", "$pipe_addresses"):
        at = text.find(token)
        if at >= 0:
            addresses = " ".join(a.address for a in job.addresses)
            joined = text[:at] + addresses + text[at + len(token):]
            if any(is_tainted(a.address) for a in job.addresses):
                from twisted_mta.taint import Tainted

                joined = Tainted(joined)
            text = joined
            break
    try:
        expanded = await expand(job, text)
    except ExpansionError as e:
        status = C.DEFER if C.lookup_deferred(e) else expand_fail
        return Outcome(status, f'Expansion of command "{text}" in {name} transport failed: '
                       f"{e.message}")
    return ["/bin/sh", "-c", expanded]


async def _environment(job: Any, instance: Any, setup: C.DeliverySetup) -> dict[str, str] | Outcome:
    """The child's whole environment, as Exim builds it."""
    variables = job.ctx.variables
    first = job.addresses[0]
    local_part = str(variables.get("local_part", first.local_part))
    prefix = str(variables.get("local_part_prefix", first.prefix) or "")
    suffix = str(variables.get("local_part_suffix", first.suffix) or "")
    domain = str(variables.get("domain", first.domain))
    try:
        path = await expand(job, str(instance.get("path") or ""))
    except ExpansionError:
        path = ""
    env = {
        "LOCAL_PART": local_part,
        "LOGNAME": local_part,
        "USER": local_part,
        "LOCAL_PART_PREFIX": prefix,
        "LOCAL_PART_SUFFIX": suffix,
        "DOMAIN": domain,
        "HOME": setup.home or "",
        "MESSAGE_ID": job.message.id,
        "PATH": path,
        "RECIPIENT": f"{prefix}{local_part}{suffix}@{domain}",
        "QUALIFY_DOMAIN": await job.ctx.expand("$qualify_domain"),
        "SENDER": job.message.sender,
        "SHELL": "/bin/sh",
    }
    if first.hosts:
        env["HOST"] = first.hosts[0].name
    zone = job.ctx.main_option("timezone")
    if zone:
        env["TZ"] = "UTC" if str(zone).lower() == "utc" else str(zone)
    extra = instance.get("environment")
    if extra is not None:
        try:
            text = await expand(job, str(extra))
        except ExpansionError as e:
            return defer(f'failed to expand string "{extra}" for {instance.name} transport: '
                         f"{e.message}")
        items = split_list(text)
        if len(env) + len(items) > 48:
            return defer(f"too many environment settings for {instance.name} transport",
                         errno.E2BIG)
        for item in items:
            key, _, value = item.partition("=")
            env[key] = value
    return env


async def _working_directory(job: Any, instance: Any, setup: C.DeliverySetup) -> str | Outcome:
    """``current_directory`` (transport, then address), else the home
    directory, else ``/``: where deliver.c changes directory to."""
    raw = instance.get("current_directory")
    if raw is None:
        raw = job.addresses[0].extra.get("current_directory")
    if raw is not None:
        expanded = await C.expand_directory(job, instance, "current directory", str(raw))
        if isinstance(expanded, Outcome):
            return expanded
        directory = expanded
    else:
        directory = setup.home or "/"
    if not await C.run_blocking(job, os.path.isdir, directory):
        return defer(f"failed to chdir to {directory}", errno.ENOENT)
    return directory


def _search_path(directories: list[str], command: str) -> str | None:
    """The first ``directory/command`` that exists."""
    for directory in directories:
        candidate = f"{directory[:256]}/{command[:256]}"
        if os.path.exists(candidate):
            return candidate
    return None


async def _message_stream(job: Any, instance: Any, return_path: str) -> MessageStream | Outcome:
    """What is written to the command: prefix, (batched SMTP envelope),
    the message, suffix (and the final dot)."""
    name = instance.name
    bsmtp = bool(instance.get("use_bsmtp"))
    crlf = bool(instance.get("use_crlf"))
    eol = "\r\n" if crlf else "\n"
    options = instance.options
    prefix_opt = options.get("message_prefix", None if bsmtp else DEFAULT_PREFIX)
    suffix_opt = options.get("message_suffix", None if bsmtp else "\n")
    if bsmtp:
        check, escape = ".", ".."
    else:
        check, escape = instance.options.get("check_string"), instance.options.get("escape_string")
    before = after = ""
    for which, raw in (("prefix", prefix_opt), ("suffix", suffix_opt)):
        if raw is None:
            continue
        try:
            value = await expand(job, str(raw))
        except ExpansionError as e:
            status = C.DEFER if C.lookup_deferred(e) else C.PANIC
            return Outcome(status, f'Expansion of "{raw}" ({which} for {name} transport) '
                           f"failed: {e.message}")
        if which == "prefix":
            before = value
        else:
            after = value
    if bsmtp:
        before += f"MAIL FROM:<{return_path}>{eol}"
        include = bool(instance.get("rcpt_include_affixes"))
        for address in job.addresses:
            before += f"RCPT TO:<{rcpt_address(address, include)}>{eol}"
        before += f"DATA{eol}"
        after += f".{eol}"
    write_options = WriteOptions.from_instance(
        instance, use_crlf=crlf, escape_headers=bsmtp,
        check_string=check if escape is not None else None, escape_string=escape)
    try:
        headers = await build_headers(job, instance, write_options, return_path)
    except HeaderChangeError as e:
        if e.routing is not None:
            return defer(e.routing)
        return panic(f"Failed to expand headers_add or headers_remove: {e.message}",
                     C.ERRNO_CHHEADER_FAIL)
    return MessageStream(headers, job.data_path, write_options,
                         wireformat=bool(job.message.wireformat),
                         before=before.encode("latin-1"), after=after.encode("latin-1"))
