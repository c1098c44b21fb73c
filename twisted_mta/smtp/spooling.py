"""From an SMTP transaction to the spool record Exim writes for it."""

from __future__ import annotations

import functools
import os
import pwd
from typing import TYPE_CHECKING

from twisted_mta.spool.ids import split_time
from twisted_mta.spool.message import (
    DSN_RET_FULL,
    DSN_RET_HDRS,
    NOTIFY_DELAY,
    NOTIFY_FAILURE,
    NOTIFY_NEVER,
    NOTIFY_SUCCESS,
    Recipient,
    SpoolHeader,
    SpoolMessage,
)
from twisted_mta.taint import Tainted

if TYPE_CHECKING:
    from twisted_mta.smtp.message import IncomingMessage
    from twisted_mta.smtp.server import ESMTPServer

_NOTIFY_BITS = {"NEVER": NOTIFY_NEVER, "SUCCESS": NOTIFY_SUCCESS,
                "FAILURE": NOTIFY_FAILURE, "DELAY": NOTIFY_DELAY}


@functools.cache
def _login() -> tuple[str, int, int]:
    # A passwd lookup per message would cost more than parsing it.
    uid, gid = os.getuid(), os.getgid()
    try:
        return pwd.getpwuid(uid).pw_name, uid, gid
    except KeyError:
        return str(uid), uid, gid


def spool_message(server: ESMTPServer, message_id: str, received_time: float,
                  message: IncomingMessage) -> SpoolMessage:
    """The -H record for the message *server* has just received."""
    txn = server.transaction
    variables = server.vars
    login, uid, gid = _login()
    now = server.clock.seconds()
    recipients = []
    for r in txn.recipients:
        flags = 0
        for word in r.notify or ():
            flags |= _NOTIFY_BITS[word]
        recipients.append(Recipient(Tainted(r.address), orcpt=r.orcpt, dsn_flags=flags))
    acl_vars = {name: value for name, value in variables.items()
                if name.startswith(("acl_c", "acl_m")) and isinstance(value, str)}
    return SpoolMessage(
        id=message_id,
        sender=Tainted(txn.sender or ""),
        originator_login=login, originator_uid=uid, originator_gid=gid,
        received=split_time(received_time),
        received_complete=split_time(now),
        helo_name=Tainted(server.helo) if server.helo else None,
        host_address=server.sender_host_address or None,
        host_port=int(variables.get("sender_host_port") or 0),
        host_name=variables.get("sender_host_name") or None,
        host_auth=server.authenticated,
        host_auth_pubname=server.authenticated_public_name(),
        interface_address=server.local[0] if server.local else None,
        interface_port=server.local[1] if server.local else 0,
        received_protocol=variables.get("received_protocol"),
        acl_vars=acl_vars,
        wireformat=False,
        body_linecount=message.body_linecount,
        max_received_linelength=message.max_linelength,
        body_zerocount=message.body_zerocount,
        auth_id=variables.get("authenticated_id") if server.authenticated else None,
        auth_sender=txn.auth_sender,
        deliver_firsttime=True,
        frozen_at=int(now) if "freeze" in txn.controls else None,
        tls_certificate_verified=variables.get("tls_in_certificate_verified") == "1",
        tls_cipher=variables.get("tls_in_cipher") or None,
        tls_peerdn=variables.get("tls_in_peerdn") or None,
        tls_sni=variables.get("tls_in_sni") or None,
        tls_ver=variables.get("tls_in_ver") or None,
        smtputf8=txn.smtputf8,
        dsn_envid=txn.dsn_envid,
        dsn_ret={"FULL": DSN_RET_FULL, "HDRS": DSN_RET_HDRS}.get(txn.dsn_ret or "", 0),
        recipients=recipients,
        headers=[SpoolHeader(h.text, h.flag) for h in message.headers],
    )
