"""Messages that do not come over SMTP: ``exim-py -bm`` / ``-t`` (what a
local program hands to sendmail) and the messages exim-py makes itself
(bounces and other DSNs).

As Exim's receive.c does for non-SMTP input: CR before LF is dropped, a
line with a single dot ends the message unless ``-i``, ``-t`` takes the
recipients from To:, Cc: and Bcc: (and drops Bcc:), and a missing
Message-Id:, From: and Date: are added, in that order, at the end of the
headers.
"""

from __future__ import annotations

import os
import pwd
import time
from dataclasses import dataclass, field
from typing import Any

from twisted_mta.expand.addresses import extract_addresses, qualify_addresses
from twisted_mta.smtp.message import DataReader, Header, IncomingMessage, logged_message_id
from twisted_mta.smtp.replies import printing
from twisted_mta.spool.flags import header_flag
from twisted_mta.spool.ids import split_time
from twisted_mta.spool.message import Recipient, SpoolHeader, SpoolMessage
from twisted_mta.taint import Tainted


class SubmissionError(Exception):
    """The message cannot be accepted; the text is Exim's."""


@dataclass
class Caller:
    """Who is submitting: login, uid, gid, the name from the password file
    and whether Exim would trust them to set the sender."""

    login: str
    uid: int
    gid: int
    name: str = ""
    trusted: bool = False

    @classmethod
    def current(cls, config: Any) -> Caller:
        uid, gid = os.getuid(), os.getgid()
        try:
            entry = pwd.getpwuid(uid)
            login, name = entry.pw_name, entry.pw_gecos.split(",", 1)[0]
        except KeyError:
            login, name = str(uid), ""
        trusted = uid == 0 or login in _list(config.get("trusted_users"))
        return cls(login, uid, gid, name.replace("&", login.capitalize()), trusted)


def _list(text: str | None) -> list[str]:
    from twisted_mta.values import split_list

    return split_list(text) if text else []


@dataclass
class Submission:
    """One non-SMTP message.  *sender* None means "the caller"; "" is
    ``<>``."""

    data: bytes
    recipients: list[str] = field(default_factory=list)
    sender: str | None = None
    extract_recipients: bool = False
    dot_ends: bool = True
    protocol: str = "local"
    #: -N: the message is never delivered ("*>" lines), as Exim's -N.
    dont_deliver: bool = False
    #: The id of the message a bounce is about (logged as ``R=``).
    reference: str | None = None
    #: A report exim-py makes itself (``-E``): spooled with ``-localerror``.
    local_error: bool = False


def read_message(data: bytes, dot_ends: bool, size_limit: int = 0) -> IncomingMessage:
    """Headers and body from non-SMTP input."""
    if dot_ends:
        for marker in (b"\n.\n", b"\n.\r\n"):
            if data.startswith(marker[1:]):
                data = b""
                break
            cut = data.find(marker)
            if cut >= 0:
                data = data[:cut + 1]
                break
    reader = DataReader(size_limit, dot_ends=False)
    reader.feed_chunk(data, True)
    return reader.message()


async def submit(submission: Submission, *, config: Any, spool: Any, log: Any,
                 id_allocator: Any, clock: Any, caller: Caller,
                 ctx: Any = None, run_blocking: Any = None) -> str:
    """Spool *submission* and log its ``<=`` line; the message id.  Raises
    SubmissionError for a message Exim would refuse."""
    from twisted_mta.expand.context import ExpansionContext

    ctx = ctx or ExpansionContext(config=config)
    message = read_message(submission.data, submission.dot_ends,
                           await _size_limit(config, ctx))
    if message.too_big:
        raise SubmissionError("message too big")
    qualify_domain = config.get("qualify_domain")
    qualify_recipient = config.get("qualify_recipient")
    if submission.sender is None or (submission.sender and not caller.trusted):
        sender = f"{caller.login}@{qualify_domain}"
        sender_forced = False
    else:
        sender = submission.sender
        if sender and "@" not in sender:
            sender = f"{sender}@{qualify_domain}"
        sender_forced = True
    recipients = [_qualify(r, qualify_recipient) for r in submission.recipients]
    if submission.extract_recipients:
        recipients = _extract_recipients(message, recipients, qualify_recipient)
    if not recipients:
        raise SubmissionError("no recipients")
    _qualify_headers(message, qualify_recipient)
    message_id, received_time = id_allocator.allocate()
    variables = ctx.variables
    variables.update({"message_exim_id": message_id, "message_id": message_id,
                      "sender_address": sender, "received_protocol": submission.protocol,
                      "sender_ident": caller.login,
                      "received_for": recipients[0] if len(recipients) == 1 else ""})
    received = await ctx.expand(config.get("received_header_text"))
    stamp = time.strftime("%a, %d %b %Y %H:%M:%S %z", time.localtime(received_time))
    message.add_header(Header(f"{received};\n\t{stamp}\n", "P"), 0)
    # Only a Message-ID the message came with is logged (no +msg_id_created).
    original_id = logged_message_id(message.headers)
    _add_missing_headers(message, config, message_id, sender, caller,
                         use_name=not caller.trusted or not sender_forced, stamp=stamp)
    record = SpoolMessage(
        id=message_id, sender=sender, originator_login=caller.login,
        originator_uid=caller.uid, originator_gid=caller.gid,
        received=split_time(received_time), received_complete=split_time(clock.seconds()),
        ident=caller.login, received_protocol=submission.protocol,
        body_linecount=message.body_linecount,
        max_received_linelength=message.max_linelength,
        body_zerocount=message.body_zerocount, deliver_firsttime=True,
        # A caller sending as themselves counts as authenticated, as in
        # Exim; any local caller may use unqualified addresses.
        auth_id=None if sender_forced else caller.login,
        auth_sender=None if sender_forced else sender,
        allow_unqualified_recipient=True, allow_unqualified_sender=True,
        sender_local=not sender_forced, local_error_message=submission.local_error,
        dont_deliver=submission.dont_deliver,
        recipients=[Recipient(Tainted(r)) for r in recipients],
        headers=[SpoolHeader(h.text, h.flag) for h in message.headers])
    # Spool writes fsync: in the daemon they go to the thread pool.
    if run_blocking is not None:
        await run_blocking(spool.write_message, record, message.body)
    else:
        spool.write_message(record, message.body)
    reference = f" R={submission.reference}" if submission.reference else ""
    log.write(f"<= {sender or '<>'}{reference} U={caller.login} P={submission.protocol} "
              f"S={message.size()}" + _log_fields(message, original_id, sender, recipients, log),
              ("main",), message_id)
    return message_id


async def _size_limit(config: Any, ctx: Any) -> int:
    from twisted_mta.values import parse_integer

    text = config.get("message_size_limit")
    if not text:
        return 0
    return parse_integer(await ctx.expand(str(text))) or 0


_QUALIFIED_HEADERS = frozenset(("from", "sender", "reply-to", "to", "cc", "bcc"))


def _qualify_headers(message: IncomingMessage, domain: str) -> None:
    """Unqualified addresses in the address headers get the domain: the
    old header is marked deleted and the new one follows it."""
    rewritten: list[Header] = []
    for header in message.headers:
        rewritten.append(header)
        name = header.name.lower().removeprefix("resent-")
        if header.flag == "*" or name not in _QUALIFIED_HEADERS:
            continue
        value = qualify_addresses(header.value, domain)
        if value is not None:
            header.flag = "*"
            text = f"{header.name}:{value}"
            rewritten.append(Header(text, header_flag(text)))
    message.headers = rewritten


def _qualify(address: str, domain: str) -> str:
    return address if "@" in address else f"{address}@{domain}"


def _extract_recipients(message: IncomingMessage, given: list[str],
                        domain: str) -> list[str]:
    """``-t``: To:, Cc: and Bcc: (their Resent- forms if any exist); the
    command-line addresses are taken out, and Bcc: is removed."""
    resent = any(h.name.lower().startswith("resent-") for h in message.headers)
    names = {f"{'resent-' if resent else ''}{n}" for n in ("to", "cc", "bcc")}
    found: list[str] = []
    for header in message.headers:
        name = header.name.lower()
        if name in names:
            for address in extract_addresses(header.value, sep=","):
                address = _qualify(address, domain)
                if address not in found:
                    found.append(address)
            if name.endswith("bcc"):
                header.flag = "*"
    excluded = {a.lower() for a in given}
    return [a for a in found if a.lower() not in excluded]


def _add_missing_headers(message: IncomingMessage, config: Any, message_id: str, sender: str,
                         caller: Caller, *, use_name: bool, stamp: str) -> None:
    present = {h.name.lower() for h in message.headers if h.flag != "*"}
    hostname = config.get("primary_hostname")
    if "message-id" not in present:
        _append(message, f"Message-Id: <E{message_id}@{hostname}>\n")
    if "from" not in present:
        name = caller.name if use_name else ""
        address = sender or f"{caller.login}@{config.get('qualify_domain')}"
        _append(message, f"From: {name} <{address}>\n" if name else f"From: {address}\n")
    if "date" not in present:
        _append(message, f"Date: {stamp}\n")


def _append(message: IncomingMessage, text: str) -> None:
    message.add_header(Header(text, header_flag(text)))


def _log_fields(message: IncomingMessage, msg_id: str | None, sender: str,
                recipients: list[str], log: Any) -> str:
    """What follows ``S=`` on the ``<=`` line, as the log selector asks."""
    selectors = getattr(log, "selectors", frozenset())
    out = []
    if "8bitmime" in selectors:
        out.append(" M8S=0")
    if msg_id is not None and "msg_id" in selectors:
        out.append(f" id={printing(msg_id)}")
    subject = message.decoded_header_values().get("subject")
    if subject is not None and "subject" in selectors:
        # $h_subject: cut at 100 characters, quotes and backslashes escaped.
        quoted = "".join("\\" + c if c in '"\\' else c for c in subject[:100])
        out.append(" T=" + printing('"' + quoted + '"'))
    if "received_sender" in selectors:
        out.append(f" from <{sender}>")
    if "received_recipients" in selectors and recipients:
        out.append(" for " + " ".join(recipients))
    return "".join(out)
