"""``${run}``: execute a command without a shell, off the reactor thread."""

from __future__ import annotations

import os
import subprocess
from typing import TYPE_CHECKING

from twisted.internet import threads

from twisted_mta.expand.errors import ExpansionError, TaintError
from twisted_mta.taint import is_tainted

if TYPE_CHECKING:
    from twisted_mta.expand.context import ExpansionContext

#: Exim's default timeout for ${run}.
RUN_TIMEOUT = 3600.0


def _run_blocking(argv: list[str], timeout: float) -> tuple[int, str]:
    args = [a.encode("latin-1") for a in argv]
    try:
        proc = subprocess.run(
            args,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            timeout=timeout,
            env={},
        )
    except FileNotFoundError:
        return 127, ""
    except PermissionError:
        return 127, ""
    except subprocess.TimeoutExpired:
        raise ExpansionError(f"timed out waiting for command {argv[0]}") from None
    return proc.returncode if proc.returncode >= 0 else 128 - proc.returncode, proc.stdout.decode(
        "latin-1"
    )


async def run_command(ctx: ExpansionContext, argv: list[str], timeout: float = RUN_TIMEOUT) -> tuple[int, str]:
    """Run *argv*; returns (exit status, output).  A missing program gives
    127, as in Exim."""
    if not argv:
        return 127, ""  # nothing to run: Exim reports the exec failure code
    if is_tainted(argv[0]):
        raise TaintError(f"Tainted '{argv[0]}' (command for ${{run}} expansion) not permitted")
    # Like execv(), a name without a directory is not searched for in PATH.
    argv = [os.path.abspath(argv[0]), *argv[1:]] if not os.path.isabs(argv[0]) else argv
    if ctx.reactor is None or ctx.threadpool is None:
        return _run_blocking(argv, timeout)
    return await threads.deferToThreadPool(ctx.reactor, ctx.threadpool, _run_blocking, argv, timeout)
