"""What a -H file holds: the envelope and the headers of one message.

All text is ``str`` with one character per byte (Latin-1), as everywhere
in exim-py, and a value is tainted when it is a
:class:`twisted_mta.taint.Tainted`; Exim records the taint of most
variables in the file (``--name value``).  :class:`Quoted` marks a tainted
value that a lookup quoting operator produced (``--(pgsql)name value``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from twisted_mta.spool.tree import TreeNode, spool_order
from twisted_mta.taint import Tainted

# DSN flags of a recipient (Exim's rf_* bits).
DSN_LASTHOP = 0x01
NOTIFY_NEVER = 0x02
NOTIFY_SUCCESS = 0x04
NOTIFY_FAILURE = 0x08
NOTIFY_DELAY = 0x10

# MAIL ... RET= (0 when not given).
DSN_RET_FULL = 1
DSN_RET_HDRS = 2


class Quoted(Tainted):
    """A tainted value quoted for the lookup type *quoter* (``pgsql`` ...)."""

    # No __slots__: the instance needs a place for the quoter's name.

    quoter: str

    def __new__(cls, value: str, quoter: str) -> Quoted:
        self = super().__new__(cls, value)
        self.quoter = quoter
        return self


@dataclass
class Recipient:
    """One envelope recipient as Exim spools it.

    *orcpt* and *dsn_flags* come from RCPT's ORCPT= and NOTIFY= (Exim
    drops the ORCPT of a recipient whose flags are 0); *errors_to* and
    *pno* (the parent's index, -1 for none) belong to one_time children
    added during delivery.
    """

    address: str
    orcpt: str | None = None
    dsn_flags: int = 0
    errors_to: str | None = None
    pno: int = -1


@dataclass
class SpoolHeader:
    """One header line, continuation lines and final newline included,
    with its flag letter (see :mod:`twisted_mta.spool.flags`)."""

    text: str
    flag: str = " "


@dataclass(kw_only=True)
class SpoolMessage:
    """Everything Exim 4.96 writes to a message's -H file.

    Optional values are written only when set (not None, not False, not
    0); the order of the lines in the file is fixed by
    :func:`twisted_mta.spool.header.format_header_file`.  *acl_vars* maps
    full names (``acl_c0``, ``acl_m_count``) to values in the order the
    variables were first set, from which Exim's tree order is derived.
    """

    id: str
    sender: str                              # envelope sender, "" for <>
    originator_login: str = "root"
    originator_uid: int = 0
    originator_gid: int = 0
    received: tuple[int, int]                # (seconds, microseconds)
    received_complete: tuple[int, int]       # end of reception
    warning_count: int = 0

    helo_name: str | None = None
    host_address: str | None = None          # without brackets
    host_port: int = 0
    host_name: str | None = None             # written only with host_address
    host_auth: str | None = None             # authenticator driver name
    host_auth_pubname: str | None = None     # its public_name
    interface_address: str | None = None
    interface_port: int = 0
    active_hostname: str | None = None       # set only when != primary_hostname
    ident: str | None = None
    received_protocol: str | None = None
    acl_vars: dict[str, str] = field(default_factory=dict)
    debug_selector: int = 0                  # written with debuglog_name
    debuglog_name: str | None = None
    wireformat: bool = False                 # -D holds CRLF wire format
    body_linecount: int = 0                  # not written in wire format
    max_received_linelength: int = 0
    body_zerocount: int = 0
    auth_id: str | None = None
    auth_sender: str | None = None
    allow_unqualified_recipient: bool = False
    allow_unqualified_sender: bool = False
    deliver_firsttime: bool = False
    frozen_at: int | None = None             # -frozen <time>
    dont_deliver: bool = False               # -N
    host_lookup_deferred: bool = False
    host_lookup_failed: bool = False
    sender_local: bool = False               # -local
    local_error_message: bool = False        # -localerror
    local_scan_data: str | None = None
    spam_bar: str | None = None
    spam_score: str | None = None
    spam_score_int: str | None = None
    manual_thaw: bool = False
    sender_set_untrusted: bool = False
    tls_certificate_verified: bool = False
    tls_cipher: str | None = None
    tls_peercert: str | None = None          # exported PEM, kept as written
    tls_peerdn: str | None = None
    tls_sni: str | None = None
    tls_ourcert: str | None = None           # exported PEM, kept as written
    tls_ocsp: int = 0
    tls_resumption: int | None = 0           # None: a build without TLS resumption
    tls_ver: str | None = None
    smtputf8: bool = False
    utf8_downconvert: int = 0                # 1 -utf8_downcvt, -1 -utf8_optdowncvt
    dsn_envid: str | None = None
    dsn_ret: int = 0
    unknown_lines: list[str] = field(default_factory=list)  # other "-" lines
    non_recipients: TreeNode | None = None
    recipients: list[Recipient] = field(default_factory=list)
    headers: list[SpoolHeader] = field(default_factory=list)

    @property
    def received_time(self) -> float:
        """The receive time as a float (seconds since the epoch)."""
        return self.received[0] + self.received[1] / 1_000_000

    def acl_var_order(self) -> list[str]:
        """The ACL variable names in the order the -H file lists them."""
        order = []
        for kind in ("c", "m"):
            names = [n[4:] for n in self.acl_vars if n.startswith("acl_" + kind)]
            order.extend("acl_" + n for n in spool_order(names))
        return order
