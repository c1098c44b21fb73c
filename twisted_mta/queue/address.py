"""One address being delivered: Exim's ``address_item``.

A top-level address is an envelope recipient from the -H file; routers may
give it children (a redirect's addresses, pipes and files), each keeping a
link to its parent so that DSNs report the recipient as it was submitted.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

PENDING, DELIVERED, DEFERRED, FAILED = "pending", "delivered", "deferred", "failed"


@dataclass
class Host:
    """A host a remote transport may connect to (``host_item``)."""

    name: str
    address: str | None = None
    port: int | None = None
    mx: int = -1
    dnssec: bool = False


@dataclass
class DeliveryAddress:
    """An address on its way through routing and a transport.

    *number* is the recipient's index in the -H file (the top-level
    ancestor's for a child); *dsn_flags* and *orcpt* are the RCPT's DSN
    parameters, inherited by children."""

    address: str
    number: int = -1
    parent: DeliveryAddress | None = None
    orcpt: str | None = None
    dsn_flags: int = 0
    errors_to: str | None = None
    address_data: str | None = None
    router_variables: dict[str, str] = field(default_factory=dict)
    prefix: str = ""
    suffix: str = ""
    router: str | None = None
    transport: str | None = None
    hosts: list[Host] = field(default_factory=list)
    #: For a redirect's ``|command``, ``/file`` or ``/dir/`` item.
    pipe_command: str | None = None
    file_path: str | None = None
    headers_add: list[str] = field(default_factory=list)
    headers_remove: list[str] = field(default_factory=list)
    home_directory: str | None = None
    dsn_lasthop: bool = False
    #: Set for an address that is routed and delivered no further
    #: (``:blackhole:``).
    discarded: str | None = None
    # The result.
    status: str = PENDING
    message: str | None = None
    user_message: str | None = None
    basic_errno: int = 0
    more_errno: int = 0
    host_used: Host | None = None
    #: The text for a success log line's ``C=`` (the remote's reply).
    confirmation: str | None = None
    retry_keys: list[str] = field(default_factory=list)
    special_action: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def local_part(self) -> str:
        at = self.address.rfind("@")
        return self.address[:at] if at >= 0 else self.address

    @property
    def domain(self) -> str:
        at = self.address.rfind("@")
        return self.address[at + 1:] if at >= 0 else ""

    @property
    def top(self) -> DeliveryAddress:
        """The envelope recipient this address descends from."""
        address = self
        while address.parent is not None:
            address = address.parent
        return address

    @property
    def unique(self) -> str:
        """What makes two deliveries the same (Exim's ``unique``): pipes and
        files are kept apart from addresses, and each carries its parent."""
        if self.pipe_command is not None:
            return f"|{self.pipe_command}:{self.parent.address if self.parent else ''}"
        if self.file_path is not None:
            return f"{self.file_path}:{self.parent.address if self.parent else ''}"
        return self.address

    def child(self, address: str, **kwargs: Any) -> DeliveryAddress:
        """A generated address that inherits the DSN data and errors_to."""
        kwargs.setdefault("errors_to", self.errors_to)
        return DeliveryAddress(address, number=self.number, parent=self, orcpt=self.orcpt,
                               dsn_flags=self.dsn_flags, **kwargs)

    def succeed(self, confirmation: str | None = None, host: Host | None = None) -> None:
        self.status = DELIVERED
        self.confirmation = confirmation
        self.host_used = host

    def defer(self, message: str, *, errno: int = 0, more_errno: int = 0,
              user_message: str | None = None, host: Host | None = None) -> None:
        self.status = DEFERRED
        self.message, self.user_message = message, user_message
        self.basic_errno, self.more_errno = errno, more_errno
        self.host_used = host

    def fail(self, message: str, *, errno: int = 0, more_errno: int = 0,
             user_message: str | None = None, host: Host | None = None) -> None:
        self.status = FAILED
        self.message, self.user_message = message, user_message
        self.basic_errno, self.more_errno = errno, more_errno
        self.host_used = host
