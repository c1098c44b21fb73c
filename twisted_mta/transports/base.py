"""What a transport is given: L{TransportJob}."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from twisted_mta.queue.address import DeliveryAddress


@dataclass
class TransportJob:
    """One delivery of one message to a batch of addresses by one
    transport instance.

    @ivar message: the parsed -H file (L{twisted_mta.spool.message.SpoolMessage}).
    @ivar data_path: the -D file (its first line is ``<id>-D``; the body follows).
    @ivar addresses: the addresses, all routed to this transport; each gets
        its result through C{succeed}, C{defer} or C{fail}.
    @ivar ctx: an expansion context whose variables describe the message and
        (for a batch of one) the address: $local_part, $domain,
        $address_data, $home, $original_local_part ...
    @ivar reactor, threadpool, clock: for timeouts, blocking file work and
        child processes; nothing may block the reactor thread.
    @ivar log: the L{twisted_mta.log.EximLog}, for the lines a transport
        writes itself (most are written by the delivery process).
    """

    message: Any
    data_path: str
    addresses: list[DeliveryAddress]
    ctx: Any
    reactor: Any
    threadpool: Any
    clock: Any
    log: Any = None
    config: Any = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def message_id(self) -> str:
        return self.message.id
