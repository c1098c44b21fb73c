"""Transports: the drivers that deliver a message (L{base} has the job
description every driver receives)."""

from __future__ import annotations

from typing import Any


def drivers() -> dict[str, Any]:
    """The transport drivers exim-py has, by the name written after
    ``driver =``: each has C{name}, C{local} and C{async deliver(instance,
    job)} (see L{twisted_mta.interfaces.ITransport})."""
    from twisted_mta.transports.appendfile import AppendfileTransport
    from twisted_mta.transports.lmtp import LmtpTransport
    from twisted_mta.transports.pipe import PipeTransport
    from twisted_mta.transports.smtp import SmtpTransport

    found: dict[str, Any] = {}
    for driver in (AppendfileTransport(), PipeTransport(), LmtpTransport(),
                   SmtpTransport()):
        found[driver.name] = driver
    return found
