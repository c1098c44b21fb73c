"""The delivery status notifications exim-py sends, worded and laid out as
Exim 4.96 does (deliver.c): the failure DSN or bounce, the success DSN for
``NOTIFY=SUCCESS``, and the delay warning.

Each is a ``multipart/report`` message made of a text part, a
``message/delivery-status`` part and the original message or its headers.
It is spooled like a message a local program hands over with ``-t -oi -f
<> -E<id>`` (:func:`twisted_mta.submit.submit`), so it is logged as ``<= <>
R=<original id> U=<exim user> P=local``, and then delivered like any
message.

The functions that build the texts are synchronous and pure;
:class:`DsnSender` does the expansions, reads the spool, spools the result
and logs.  Facts about a delivery that the address dataclass has no field
for are read from ``DeliveryAddress.extra`` under the keys below; routers
and transports set them.
"""

from __future__ import annotations

import os
import pwd
import random
import re
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from twisted_mta.queue.address import DeliveryAddress
from twisted_mta.smtp.params import xtext_decode
from twisted_mta.smtp.replies import printing
from twisted_mta.spool.message import (
    DSN_LASTHOP,
    DSN_RET_FULL,
    DSN_RET_HDRS,
    NOTIFY_DELAY,
    NOTIFY_FAILURE,
    NOTIFY_NEVER,
    NOTIFY_SUCCESS,
    SpoolHeader,
    SpoolMessage,
)

# -- keys in DeliveryAddress.extra -------------------------------------------------

#: True when ``message`` may be shown to the sender (Exim's af_pass_message):
#: a remote SMTP server's reply, ``:fail:`` text, "Unrouteable address".
PASS_MESSAGE = "pass_message"
#: Whether the SMTP next hop took the DSN parameters: True (it advertised
#: DSN), False (it did not); absent for a non-SMTP delivery.
DSN_AWARE = "dsn_aware"
#: The remote server's greeting (its first line), for ``dsn_extra_info``;
#: set only when the error came from the connection-level exchange
#: (connect, greeting, EHLO/HELO, MAIL, DATA), not from a RCPT reply.
SMTP_GREETING = "smtp_greeting"
#: The first line of the remote server's EHLO/HELO reply, likewise.
HELO_RESPONSE = "helo_response"
#: Text a transport's ``return_output`` caught, quoted in the bounce.
RETURN_OUTPUT = "return_output"
#: Set to discard a failure without a bounce (af_ignore_error).
IGNORE_ERROR = "ignore_error"
#: Set by the retry code when a deferred address failed by timing out.
RETRY_TIMEDOUT = "retry_timedout"
#: Set here on a child of a redirect router with hide_child_in_errmsg.
HIDE_CHILD = "hide_child"

#: The NOTIFY bits (Exim's rf_dsnflags): an address with none of them
#: gets the default treatment.
NOTIFY_ANY = NOTIFY_NEVER | NOTIFY_SUCCESS | NOTIFY_FAILURE | NOTIFY_DELAY
#: basic_errno values at or below this mean "retry time not reached":
#: a deferral without a real attempt does not trigger a delay warning.
ERRNO_WARN_BASE = -53
#: The -D file is compared with bounce_return_size_limit rounded up to this.
DELIVER_IN_BUFFER_SIZE = 8192
DSN_LIMIT_HEADER = ("X-Exim-DSN-Information: Due to administrative limits only headers "
                    "are returned")
_INTRO = "This message was created automatically by mail delivery software.\n"


@dataclass
class DsnOptions:
    """The settings a DSN text depends on, already expanded."""

    from_text: str                       # dsn_from
    reporting_mta: str                   # smtp_active_hostname
    primary_hostname: str
    reply_to: str | None = None          # errors_reply_to
    return_body: bool = True             # bounce_return_body
    return_size_limit: int = 102400      # bounce_return_size_limit
    return_linesize_limit: int = 998     # bounce_return_linesize_limit
    message_text: str | None = None      # bounce_message_text
    extra_info: bool = False             # dsn_extra_info
    config: Any = None                   # to tell redirect children apart

    @classmethod
    def from_config(cls, config: Any, from_text: str,
                    message: SpoolMessage | None = None) -> DsnOptions:
        """Options from *config*; the Reporting-MTA is the message's
        active host name when it was received under another name."""
        primary = config.get("primary_hostname")
        active = (message.active_hostname if message is not None else None) or primary
        return cls(from_text=from_text, reporting_mta=active, primary_hostname=primary,
                   reply_to=config.get("errors_reply_to"),
                   return_body=bool(config.get("bounce_return_body", True)),
                   return_size_limit=int(config.get("bounce_return_size_limit", 102400) or 0),
                   return_linesize_limit=int(config.get("bounce_return_linesize_limit", 998)),
                   message_text=config.get("bounce_message_text"),
                   extra_info=bool(config.get("dsn_extra_info", False)), config=config)


class Template:
    """The sections of a bounce_message_file or warn_message_file, already
    expanded; a missing or empty section (or no file) gives None, and the
    built-in text is used."""

    def __init__(self, sections: Iterable[str | None] = (), present: bool = False) -> None:
        self._sections = list(sections)
        self.present = present

    def next(self) -> str | None:
        return self._sections.pop(0) if self._sections else None


def split_template(text: str) -> list[str | None]:
    """A message file's sections: lines up to a ``****`` line each; an
    empty section is None (Exim's next_emf())."""
    sections: list[str | None] = []
    current: list[str] = []
    for line in text.splitlines(keepends=True):
        if line == "****\n":
            sections.append("".join(current) or None)
            current = []
        else:
            current.append(line)
    if current:
        sections.append("".join(current))
    return sections


# -- facts about addresses ---------------------------------------------------------


def is_pfr(address: DeliveryAddress) -> bool:
    """A pipe, file or autoreply delivery (Exim's af_pfr)."""
    return address.pipe_command is not None or address.file_path is not None \
        or address.address.startswith(">")


def generated_by_redirect(address: DeliveryAddress, config: Any = None) -> bool:
    """Whether Exim would have made *address* afresh for a redirect (it then
    has no NOTIFY flags and no ORCPT), rather than copied it (an unseen
    router's clone keeps them)."""
    parent = address.parent
    if parent is None:
        return False
    if is_pfr(address):
        return True
    if address.address.lower() == parent.address.lower():
        return False
    router = config.router(parent.router) if config is not None and parent.router else None
    return router is None or router.driver == "redirect"


def dsn_data(address: DeliveryAddress, config: Any = None) -> tuple[int, str | None]:
    """The DSN flags and ORCPT Exim 4.96 holds for *address*.

    Exim 4.96 does not pass NOTIFY and ORCPT to the addresses a redirect
    generates: their failures are reported whatever the envelope recipient
    asked for, without Original-Recipient, and they get no success DSN (the
    redirected recipient itself gets it, when it is redirected)."""
    flags, orcpt = address.dsn_flags, address.orcpt
    if generated_by_redirect(address, config):
        flags, orcpt = 0, None
    if address.dsn_lasthop:
        flags |= DSN_LASTHOP
    return flags, orcpt


def passable(address: DeliveryAddress) -> bool:
    return bool(address.extra.get(PASS_MESSAGE))


def ignore_error(address: DeliveryAddress) -> bool:
    """Errors are discarded: flagged so, or ``errors_to = ""``."""
    return bool(address.extra.get(IGNORE_ERROR)) or address.errors_to == ""


def errors_address(address: DeliveryAddress, sender: str) -> str:
    """Where a report about *address* goes: its errors_to, or the sender."""
    return address.errors_to or sender


def onetime_parent(message: SpoolMessage, address: DeliveryAddress) -> str | None:
    """The original recipient of a ``one_time`` child kept in the -H file."""
    number = address.top.number
    if 0 <= number < len(message.recipients):
        pno = message.recipients[number].pno
        if 0 <= pno < len(message.recipients):
            return message.recipients[pno].address
    return None


# -- text pieces -------------------------------------------------------------------


def make_boundary(now: float, rng: random.Random) -> str:
    """The MIME boundary, ``<time>-eximdsn-<random>``."""
    return f"{int(now)}-eximdsn-{rng.randrange(2 ** 31)}"


_MESSAGE_ID = re.compile(r"<([^<>\s]+@[^<>\s]+)>")


def _skip_comments(text: str, pos: int) -> int:
    while pos < len(text):
        if text[pos].isspace():
            pos += 1
        elif text[pos] == "(":
            depth = 0
            while pos < len(text):
                if text[pos] == "\\":
                    pos += 1
                elif text[pos] == "(":
                    depth += 1
                elif text[pos] == ")":
                    depth -= 1
                    if depth == 0:
                        pos += 1
                        break
                pos += 1
        else:
            break
    return pos


def _message_ids(text: str) -> list[str]:
    """The ``<id>``s at the start of *text*, up to the first that does
    not parse (Exim's parse_message_id() loop)."""
    ids: list[str] = []
    pos = _skip_comments(text, 0)
    while pos < len(text):
        match = _MESSAGE_ID.match(text, pos)
        if match is None:
            break
        ids.append(match.group(0))
        pos = _skip_comments(text, match.end())
    return ids


def references_header(headers: list[SpoolHeader]) -> str:
    """``References:`` for a DSN (moan_write_references()): the message's
    References: (else In-Reply-To:) ids, at most the first and the last
    eleven, then its Message-ID; empty when it has neither."""
    message_id = None
    for h in headers:
        if h.flag == "I":
            message_id = h.text.split(":", 1)[1].lstrip()
    found = None
    for name in ("references:", "in-reply-to:"):
        found = next((h for h in headers if h.flag != "*"
                      and h.text[:len(name)].lower() == name), None)
        if found is not None:
            break
    if found is None and message_id is None:
        return ""
    out = "References:"
    if found is not None:
        kept: list[str] = []
        for ident in _message_ids(found.text.split(":", 1)[1]):
            if len(kept) == 12:
                kept = [kept[0]] + kept[2:] + [ident]
            else:
                kept.append(ident)
        out += "".join(f" {i}" for i in kept)
    return out + (f" {message_id}" if message_id is not None else "\n")


def _envelope_id(message: SpoolMessage) -> str:
    if message.dsn_envid is None:
        return ""
    # Shown as received (still xtext), once it is known to decode.
    if xtext_decode(message.dsn_envid):
        return f"Original-Envelope-ID: {message.dsn_envid}\n"
    return "X-Original-Envelope-ID: error decoding xtext formatted ENVID\n"


def address_information(address: DeliveryAddress, first: str, more: str, end: str, *,
                        original: str | None = None) -> tuple[str, bool]:
    """An address as a DSN's text shows it (print_address_information()):
    a generated pipe or file as "pipe to ... generated by ...", the
    recipient it came from, and the host used.  The flag is False when
    the address is hidden (hide_child_in_errmsg)."""
    out = [first]
    shown = True
    top = address.top
    if address.parent is not None and address.extra.get(HIDE_CHILD):
        printed = "an undisclosed address"
        shown = False
    elif not is_pfr(address) or address.parent is None:
        printed = address.address
    else:
        target = address.address
        if target.startswith(">"):
            kind, target = "mail", target[1:]
        elif target.startswith("|"):
            kind = "pipe"
        else:
            kind = "save"
        out.append(f"{kind} to {target}{more}generated by ")
        printed = address.parent.address
    out.append(printing(printed))
    if top is not address:
        source = original or top.address
        if source.lower() != printed.lower():
            ultimately = "ultimately " if top is not address.parent else ""
            out.append(f"{more}({ultimately}generated from {printing(source)})")
    host = address.host_used
    if host is not None:
        out.append(f"\n    host {host.name} [{host.address or ''}]")
    out.append(end)
    return "".join(out), shown


def address_error(address: DeliveryAddress, lead: str) -> str:
    """The error shown for an address (print_address_error()): its message
    when passable, else its user_message; lines indented by four, and a
    break after a colon past column 45."""
    text = address.message if passable(address) and address.message else None
    text = text or address.user_message
    if not text:
        return ""
    out = [f"\n    {lead}"]
    count = len(lead)
    i = 0
    while i < len(text):
        c = text[i]
        if c == "\\" and text[i + 1:i + 2] == "n" or c == "\n":
            out.append("\n    ")
            i += 1 if c == "\n" else 2
            count = 0
            continue
        out.append(c)
        count += 1
        i += 1
        if c == ":" and i < len(text) and text[i].isspace() and count > 45:
            out.append("\n   ")  # the space that follows makes the fourth
            count = 0
    return "".join(out)


def diagnostic_code(address: DeliveryAddress) -> str:
    """``Diagnostic-Code: smtp; ...`` from a passable error: the text after
    its first ": ", continuation lines folded, cut after about 950
    characters; empty when there is none."""
    message = address.message if passable(address) else None
    if not message:
        return ""
    cut = message.find(": ")
    if cut < 0:
        return ""
    text = message[cut + 2:]
    out = ["Diagnostic-Code: smtp; "]
    count = len(out[0])
    i = 0
    while i < len(text):
        if count > 950:  # under the 998-character line limit
            out.append("[truncated]")
            break
        c = text[i]
        if c == "\\" and text[i + 1:i + 2] == "n" or c == "\n":
            out.append("\n ")
            i += 1 if c == "\n" else 2
            count += 2
        else:
            out.append(c)
            i += 1
            count += 1
    return "".join(out) + "\n"


def wrap_header(text: str, cols: int = 79, maxchars: int = 1023, indent: str = " ",
                indent_cols: int = 1) -> str:
    """Fold *text* for a header (Exim's wrap_header()): a ``\\n`` sequence
    or a newline starts a continuation line, a line too long is broken at
    its last blank before *cols*, and the whole is cut at *maxchars*."""
    out: list[str] = []
    length = 0
    column = 0
    s = text
    while s:
        backslash = s.find("\\")
        if backslash >= 0 and s[backslash + 1:backslash + 2] == "n":
            end, tail = backslash, 2
        else:
            newline = s.find("\n")
            end, tail = (newline, 1) if newline >= 0 else (len(s), 0)
        if column + end > cols:
            for u in range(cols - column, 10, -1):
                if s[u].isspace():
                    v = u
                    while v > 1 and s[v - 1].isspace():
                        v -= 1
                    out.append(s[:v])
                    length += v
                    s = s[u + 1:].lstrip()
                    break
            else:
                take = cols - column
                out.append(s[:take])
                length += take
                s = s[take:]
        else:
            out.append(s[:end])
            length += end
            s = s[end + tail:]
        if not s:
            break
        if length >= maxchars:
            return "".join(out)[:maxchars]
        out.append("\n" + indent[:1])
        length += 1 + len(indent[:1])
        column = indent_cols
    return "".join(out)


def _first_line(text: Any) -> str:
    return str(text).replace("\\n", "\n").split("\n", 1)[0][:128] if text else ""


def _address_action(address: DeliveryAddress, action: str, status: str, config: Any) -> str:
    _, orcpt = dsn_data(address, config)
    lines = f"Original-Recipient: {orcpt}\n" if orcpt else ""
    return lines + (f"Action: {action}\nFinal-Recipient: rfc822;{address.top.address}\n"
                    f"Status: {status}\n")


def _mime_headers(boundary: str) -> str:
    return (f"Content-Type: multipart/report; report-type=delivery-status; "
            f"boundary={boundary}\nMIME-Version: 1.0\n")


def _subject_and_date_lines(headers: list[SpoolHeader]) -> str:
    # Exim skips a fixed "Subject: " / "Date: " and looks at every header
    # line, removed ones included.
    out = []
    for h in headers:
        if h.text[:8].lower() == "subject:":
            out.append(f"The subject of the message is: {h.text[9:]}")
        elif h.text[:5].lower() == "date:":
            out.append(f"The date of the message is:    {h.text[6:]}")
    return "".join(out)


def returned_message(message: SpoolMessage, body: bytes | None,
                     add_header: str | None = None) -> str:
    """The original message as a DSN quotes it: ``Return-path:``, the
    headers (not those removed), *add_header*, a blank line, and the
    body if given (LF line ends)."""
    out = [f"Return-path: <{message.sender}>\n"]
    out.extend(h.text for h in message.headers if h.flag != "*")
    if add_header:
        out.append(add_header + "\n")
    out.append("\n")
    if body is not None:
        text = body.decode("latin-1")
        out.append(text.replace("\r\n", "\n") if message.wireformat else text)
    return "".join(out)


def return_choice(message: SpoolMessage, options: DsnOptions,
                  data_size: int) -> tuple[bool, bool]:
    """Whether a bounce returns the body, and whether it says the body was
    left out by administrative limits (RET=HDRS first, then
    bounce_return_body, the line length and the -D file size)."""
    if message.dsn_ret == DSN_RET_HDRS:
        return False, False
    if not options.return_body:
        return False, message.dsn_ret == DSN_RET_FULL
    limit = options.return_size_limit
    rounded = (limit // DELIVER_IN_BUFFER_SIZE + 1) * DELIVER_IN_BUFFER_SIZE
    if message.max_received_linelength > options.return_linesize_limit \
            or (limit > 0 and data_size > rounded):
        return False, True
    return True, False


def warnings_due(delay_warning: tuple[int, ...], queue_time: int) -> tuple[int, int]:
    """How many delay warnings should have gone by *queue_time*, and the
    delay the latest one reports; the last interval of the list repeats."""
    count = 0
    while count < len(delay_warning) and queue_time >= delay_warning[count]:
        count += 1
    if count == 0:
        return 0, 0
    show = delay_warning[count - 1]
    if count >= len(delay_warning):
        gap = show - (delay_warning[count - 2] if count > 1 else 0)
        extra = (queue_time - show) // gap
        show += gap * extra
        count += extra
    return count, show


def delay_text(queue_time: int, show_time: int) -> str:
    """``N minutes`` under two hours on the queue, else ``N hours``."""
    if queue_time < 120 * 60:
        return f"{show_time // 60} minutes"
    return f"{show_time // 3600} hours"


# -- the three reports -------------------------------------------------------------


def _relayed(address: DeliveryAddress, flags: int) -> str:
    if flags & DSN_LASTHOP:
        return "via non DSN router"
    if address.extra.get(DSN_AWARE) is False:
        return "to non-DSN-aware mailer"
    return 'via non "Remote SMTP" router'


def wants_success_dsn(address: DeliveryAddress, config: Any = None) -> bool:
    """NOTIFY=SUCCESS, and the report is not passed on to a next hop that
    took the DSN parameters (or the router is a DSN last hop)."""
    flags, _ = dsn_data(address, config)
    return bool(flags & NOTIFY_SUCCESS) and (
        address.extra.get(DSN_AWARE) is not True or bool(flags & DSN_LASTHOP))


def success_dsn(message: SpoolMessage, addresses: list[DeliveryAddress],
                options: DsnOptions, boundary: str) -> str:
    """The success DSN for *addresses* (delivered, in order)."""
    config = options.config
    out = []
    if options.reply_to:
        out.append(f"Reply-To: {options.reply_to}\n")
    out.append(f"From: {options.from_text}\n")
    out.append(f"Auto-Submitted: auto-generated\nTo: {message.sender}\n"
               "Subject: Delivery Status Notification\n")
    out.append(references_header(message.headers))
    out.append(_mime_headers(boundary) + "\n")
    out.append(f"--{boundary}\nContent-type: text/plain; charset=us-ascii\n\n{_INTRO}"
               " ----- The following addresses had successful delivery notifications -----\n")
    for a in addresses:
        flags, _ = dsn_data(a, config)
        out.append(f"<{a.address}> (relayed {_relayed(a, flags)})\n\n")
    out.append(_status_part(message, options, boundary, "message/delivery-status"))
    for a in addresses:
        flags, _ = dsn_data(a, config)
        out.append(_address_action(a, "delivered", "2.0.0", config))
        host = a.host_used
        if host is not None and host.name:
            # A fixed text, not the next hop's reply.
            out.append(f"Remote-MTA: dns; {host.name}\nDiagnostic-Code: smtp; 250 Ok\n\n")
        else:
            kind = "DSN" if flags & DSN_LASTHOP else "SMTP"
            out.append(f"Diagnostic-Code: X-Exim; relayed via non {kind} router\n\n")
    out.append(_headers_part(message, boundary))
    return "".join(out)


def _failed_recipients(addresses: list[DeliveryAddress]) -> str:
    out: list[str] = []
    count = 0
    for a in addresses:
        if a.extra.get(HIDE_CHILD):
            continue
        if count >= 50:  # a new header every fifty addresses
            out.append("\n")
            count = 0
        out.append("X-Failed-Recipients: " if count == 0 else ",\n  ")
        count += 1
        shown = a.parent.address if is_pfr(a) and a.parent is not None else a.address
        out.append(printing(shown))
    if count:
        out.append("\n")
    return "".join(out)


def _extra_info(address: DeliveryAddress) -> str:
    """The dsn_extra_info fields of a bounce (Exim's EXPERIMENTAL_DSN_INFO)."""
    out = []
    host = address.host_used
    if host is not None and host.name:
        if host.address:
            port = host.port if host.port is not None else 25
            out.append(f"Remote-MTA: X-ip; [{host.address}]{'' if port == 25 else f':{port}'}\n")
        for name, key in (("X-Remote-MTA-smtp-greeting", SMTP_GREETING),
                          ("X-Remote-MTA-helo-response", HELO_RESPONSE)):
            value = _first_line(address.extra.get(key))
            if value:
                out.append(wrap_header(f"{name}: X-str; {value}") + "\n")
    if passable(address) and address.message:
        out.append(wrap_header(f"X-Exim-Diagnostic: X-str; {address.message}") + "\n")
    return "".join(out)


def _report_headers(message: SpoolMessage, options: DsnOptions, recipients: str,
                    boundary: str) -> str:
    """The headers a bounce and a delay warning share: ``Reply-To:``,
    ``Auto-Submitted:``, ``From:``, ``To:``, ``References:`` and MIME."""
    reply_to = f"Reply-To: {options.reply_to}\n" if options.reply_to else ""
    return (f"{reply_to}Auto-Submitted: auto-replied\nFrom: {options.from_text}\n"
            f"To: {recipients}\n{references_header(message.headers)}{_mime_headers(boundary)}")


def _text_part(boundary: str, template: Template, explanation: str) -> str:
    """The opening of a report's text part: the template's next section,
    else the standard introduction followed by *explanation*."""
    section = template.next()
    return (f"--{boundary}\nContent-type: text/plain; charset=us-ascii\n\n"
            + (section if section is not None else _INTRO + explanation))


def _status_part(message: SpoolMessage, options: DsnOptions, boundary: str, kind: str) -> str:
    """The opening of a report's delivery-status part (of MIME type
    *kind*): the per-message fields."""
    return (f"--{boundary}\nContent-type: {kind}\n\n"
            f"Reporting-MTA: dns; {options.reporting_mta}\n{_envelope_id(message)}\n")


def _headers_part(message: SpoolMessage, boundary: str) -> str:
    """The last part of a success DSN or a delay warning: the original
    message's headers, then the closing boundary."""
    return (f"--{boundary}\nContent-type: text/rfc822-headers\n\n"
            f"{returned_message(message, None)}\n--{boundary}--\n")


def _address_entry(message: SpoolMessage, address: DeliveryAddress, reason_lead: str) -> str:
    """An address in a report's text part, with its error (led by
    *reason_lead*) when it may be shown."""
    text, shown = address_information(address, "  ", "\n    ", "",
                                      original=onetime_parent(message, address))
    return text + (address_error(address, reason_lead) if shown else "") + "\n"


def bounce_dsn(message: SpoolMessage, addresses: list[DeliveryAddress], recipient: str,
               options: DsnOptions, boundary: str, returned: str, *, with_body: bool,
               template: Template | None = None, bcc: str | None = None) -> str:
    """The failure DSN for *addresses*, which share *recipient* (in Exim's
    chain order: the latest failure first).  *returned* is the output of
    :func:`returned_message`, *with_body* whether it holds the body."""
    template = template or Template()
    config = options.config
    to_sender = recipient.lower() == message.sender.lower()
    out = [_failed_recipients(addresses), _report_headers(message, options, recipient, boundary)]
    if bcc:
        out.append(f"Bcc: {bcc}\n")
    section = template.next()
    if section is not None:
        out.append(section + "\n")
    else:
        out.append("Subject: Mail delivery failed"
                   f"{': returning message to sender' if to_sender else ''}\n\n")
    if to_sender:
        explanation = ("\nA message that you sent could not be delivered to one or more of its\n"
                       "recipients. This is a permanent error. The following address(es) "
                       "failed:\n")
    else:
        explanation = (f"\nA message sent by\n\n  <{message.sender}>\n\n"
                       "could not be delivered to one or more of its recipients. The following\n"
                       "address(es) failed:\n")
    out.append(_text_part(boundary, template, (options.message_text or "") + explanation))
    out.append("\n")
    # The report part lists the addresses in the reverse order, those with
    # transport output first (Exim's "handled" chain is built backwards).
    handled: list[DeliveryAddress] = []
    with_output: list[DeliveryAddress] = []
    for a in addresses:
        out.append(_address_entry(message, a, ""))
        if a.extra.get(RETURN_OUTPUT):
            with_output.append(a)
        else:
            handled.insert(0, a)
    out.append("\n")
    section = template.next()
    if with_output:
        out.append(section if section is not None else
                   "The following text was generated during the delivery attempt"
                   f"{'s' if len(with_output) > 1 else ''}:\n")
        for a in with_output:
            text, _ = address_information(a, "------ ", "\n       ", " ------\n",
                                          original=onetime_parent(message, a))
            out.append(f"\n{text}\n{a.extra[RETURN_OUTPUT]}")
            handled.insert(0, a)
        out.append("\n")
    kind = "message/global-delivery-status" if message.smtputf8 else "message/delivery-status"
    out.append(_status_part(message, options, boundary, kind))
    for a in handled:
        out.append(_address_action(a, "failed", "5.0.0", config))
        host = a.host_used
        if host is not None and host.name:
            out.append(f"Remote-MTA: dns; {host.name}\n")
            if options.extra_info:
                out.append(_extra_info(a))
            out.append(diagnostic_code(a))
        elif options.extra_info:
            out.append(_extra_info(a))
        out.append("\n")
    template.next()  # the "copy" section: read, never used
    out.append(f"--{boundary}\n")
    if message.smtputf8:
        kind = "message/global" if with_body else "message/global-headers"
    else:
        kind = "message/rfc822" if with_body else "text/rfc822-headers"
    out.append(f"Content-type: {kind}\n\n{returned}\n--{boundary}--\n")
    return "".join(out)


def warning_dsn(message: SpoolMessage, addresses: list[DeliveryAddress], recipients: str,
                options: DsnOptions, boundary: str, delay: str,
                template: Template | None = None) -> str:
    """The delay warning for *addresses* (deferred; Exim's chain order,
    the latest first), sent to *recipients* (a comma list)."""
    template = template or Template()
    config = options.config
    out = [_report_headers(message, options, recipients, boundary)]
    section = template.next()
    out.append(section + "\n" if section is not None else
               f"Subject: Warning: message {message.id} delayed {delay}\n\n")
    if recipients == message.sender:
        explanation = ("A message that you sent has not yet been delivered to one or more of "
                       "its\nrecipients after more than ")
    else:
        explanation = (f"A message sent by\n\n  <{message.sender}>\n\n"
                       "has not yet been delivered to one or more of its recipients after "
                       "more than \n")
    several = len(addresses) > 1
    explanation += (f"{delay} on the queue on {options.primary_hostname}.\n\n"
                    f"The message identifier is:     {message.id}\n"
                    f"{_subject_and_date_lines(message.headers)}\n"
                    f"The address{'es' if several else ''} to which the message has not yet "
                    f"been delivered {'are' if several else 'is'}:\n")
    out.append(_text_part(boundary, template, explanation))
    out.append("\n")
    out.extend(_address_entry(message, a, "Delay reason: ") for a in addresses)
    out.append("\n")
    if template.present:
        out.append(template.next() or "")
    else:
        out.append("No action is required on your part. Delivery attempts will continue for\n"
                   "some time, and this warning may be repeated at intervals if the message\n"
                   "remains undelivered. Eventually the mail delivery software will give up,\n"
                   "and when that happens, the message will be returned to you.\n")
    out.append("\n" + _status_part(message, options, boundary, "message/delivery-status"))
    for a in addresses:
        out.append(_address_action(a, "delayed", "4.0.0", config))
        host = a.host_used
        if host is not None and host.name:
            out.append(f"Remote-MTA: dns; {host.name}\n" + diagnostic_code(a))
        out.append("\n")
    out.append(_headers_part(message, boundary))
    return "".join(out)


# -- spooling them -----------------------------------------------------------------


@dataclass
class BounceOutcome:
    """What :meth:`DsnSender.send_bounces` did: the failed addresses that
    are finished with (reported, or their error ignored), the new
    messages, and the recipients a report could not be made for."""

    handled: list[DeliveryAddress] = field(default_factory=list)
    message_ids: list[str] = field(default_factory=list)
    failures: list[tuple[str, str]] = field(default_factory=list)


def dsn_caller(config: Any) -> Any:
    """Who DSNs come from: the Exim user (``exim_user``, else the user
    exim-py runs as), trusted to set the sender."""
    from twisted_mta.submit import Caller

    uid = config.get("exim_user")
    uid = os.getuid() if uid is None else int(uid)
    gid = config.get("exim_group")
    try:
        entry = pwd.getpwuid(uid)
        login = entry.pw_name
        gid = entry.pw_gid if gid is None else gid
    except KeyError:
        login = str(uid)
    return Caller(login, uid, os.getgid() if gid is None else int(gid), "", trusted=True)


async def _run_inline(function: Callable[..., Any], *args: Any) -> Any:
    return function(*args)


class DsnSender:
    """Builds, spools and logs the DSNs of one process.

    @param run_blocking: runs a blocking function (spool I/O) and returns
        its result; the default runs it in place.
    """

    def __init__(self, config: Any, spool: Any, log: Any, clock: Any, *,
                 id_allocator: Any = None, caller: Any = None,
                 rng: random.Random | None = None,
                 run_blocking: Callable[..., Awaitable[Any]] | None = None) -> None:
        self.config = config
        self.spool = spool
        self.log = log
        self.clock = clock
        if id_allocator is None:
            from twisted_mta.spool.ids import MessageIdAllocator

            id_allocator = MessageIdAllocator(clock.seconds, os.getpid(),
                                              config.get("localhost_number"))
        self.id_allocator = id_allocator
        self.caller = caller
        self.rng = rng or random.Random()
        self.run_blocking = run_blocking or _run_inline

    # -- shared ------------------------------------------------------------------

    def _log(self, text: str, message_id: str, targets: tuple[str, ...] = ("main",)) -> None:
        self.log.write(text, targets, message_id)

    def _context(self, ctx: Any, **variables: str) -> Any:
        from twisted_mta.expand.context import ExpansionContext

        if ctx is None:
            new = ExpansionContext(config=self.config)
        else:
            new = ExpansionContext(config=ctx.config, reactor=ctx.reactor,
                                   variables=ctx.variables, threadpool=ctx.threadpool,
                                   resolver=ctx.resolver)
        new.variables.update(variables)
        return new

    async def options(self, message: SpoolMessage, ctx: Any) -> DsnOptions:
        """The settings for a report on *message*, dsn_from expanded."""
        from twisted_mta.expand.errors import ExpansionError

        default = "Mail Delivery System <Mailer-Daemon@$qualify_domain>"
        text = self.config.get("dsn_from") or default
        try:
            from_text = await ctx.expand(text)
        except ExpansionError as e:
            self._log(f"Failed to expand dsn_from (using default): {e.message}", message.id,
                      ("main", "panic"))
            from_text = await ctx.expand(default)
        return DsnOptions.from_config(self.config, from_text, message)

    async def _template(self, option: str, reason: str, names: tuple[str, ...],
                        message: SpoolMessage, ctx: Any) -> Template:
        """Read and expand bounce_message_file or warn_message_file."""
        from twisted_mta.expand.errors import ExpansionError
        from twisted_mta.taint import is_tainted

        name = self.config.get(option)
        if not name:
            return Template()
        try:
            path = await ctx.expand(name)
        except ExpansionError:
            path = ""
        if not path:
            self._log(f"Failed to expand {option}: '{name}'", message.id, ("main", "panic"))
            return Template()
        if not path.startswith("/") or is_tainted(path):
            what = "untainted" if path.startswith("/") else "absolute"
            self._log(f"{option} is not {what} after expansion: '{path}'", message.id,
                      ("main", "panic"))
            return Template()
        try:
            text = await self.run_blocking(_read_text, path)
        except OSError as e:
            self._log(f"Failed to open {path} for {reason} message texts: {e.strerror}",
                      message.id, ("main", "panic"))
            return Template()
        sections: list[str | None] = []
        for section_name, raw in zip(names, split_template(text), strict=False):
            if raw is None:
                sections.append(None)
                continue
            try:
                sections.append(await ctx.expand(raw))
            except ExpansionError as e:
                self._log("Failed to expand string from bounce_message_file or "
                          f"warn_message_file ({section_name}): {e.message}", message.id,
                          ("main", "panic"))
                sections.append(None)
        return Template(sections, present=True)

    async def _spool(self, text: str, message: SpoolMessage) -> str:
        """Spool one report as ``exim -t -oi -f <> -E<id>`` would; its id."""
        from twisted_mta.submit import Submission, submit

        caller = self.caller or dsn_caller(self.config)
        submission = Submission(text.encode("latin-1"), sender="", extract_recipients=True,
                                dot_ends=False, protocol="local", reference=message.id,
                                local_error=True)
        for _ in range(10):
            try:
                return await submit(submission, config=self.config, spool=self.spool,
                                    log=self.log, id_allocator=self.id_allocator,
                                    clock=self.clock, caller=caller,
                                    run_blocking=self.run_blocking)
            except FileExistsError:
                continue  # an id another allocator in this process handed out
        raise FileExistsError("no free message id")

    # -- the reports ---------------------------------------------------------------

    async def send_success(self, message: SpoolMessage, delivered: list[DeliveryAddress],
                           ctx: Any = None) -> list[str]:
        """Send one success DSN for the addresses of *delivered* (in the
        order they succeeded) that asked for it; the new message ids."""
        wanted = [a for a in delivered if wants_success_dsn(a, self.config)]
        if not wanted or not message.sender:
            return []
        ctx = self._context(ctx)
        options = await self.options(message, ctx)
        text = success_dsn(message, wanted, options,
                           make_boundary(self.clock.seconds(), self.rng))
        try:
            return [await self._spool(text, message)]
        except Exception as e:  # the delivery itself is done; say so and go on
            self._log(f"failed to send success DSN to {message.sender}: {e}", message.id,
                      ("main", "panic"))
            return []

    async def send_bounces(self, message: SpoolMessage, failed: list[DeliveryAddress],
                           ctx: Any = None) -> BounceOutcome:
        """Report the addresses of *failed* (in the order they failed): one
        bounce per errors address, the sender's unless errors_to is set.

        As in Exim, only the first address of each batch is checked for
        errors being ignored or for a NOTIFY without FAILURE; others that
        share its errors address are reported with it."""
        outcome = BounceOutcome()
        chain = list(reversed(failed))
        sender = message.sender
        while chain:
            first = chain[0]
            if sender == "" and not first.errors_to and not ignore_error(first):
                if not first.extra.get(RETRY_TIMEDOUT):
                    self._log("internal error: bounce message failure is neither frozen nor "
                              "ignored (it's been ignored)", message.id, ("main", "panic"))
                first.extra[IGNORE_ERROR] = True
            flags, _ = dsn_data(first, self.config)
            if ignore_error(first) or (flags & NOTIFY_ANY and not flags & NOTIFY_FAILURE):
                chain.pop(0)
                parent = f" <{first.parent.address}>" if first.parent is not None else ""
                why = "" if ignore_error(first) else \
                    ": RFC 3461 DSN, failure notify not requested"
                self._log(f"{first.address}{parent}: error ignored{why}", message.id)
                outcome.handled.append(first)
                continue
            recipient = errors_address(first, sender)
            batch = [a for a in chain if errors_address(a, sender) == recipient]
            chain = [a for a in chain if errors_address(a, sender) != recipient]
            try:
                outcome.message_ids.append(await self._bounce(message, batch, recipient, ctx))
            except Exception as e:  # keep the addresses: they fail again next time
                outcome.failures.append((recipient, str(e) or type(e).__name__))
                continue
            outcome.handled.extend(batch)
        return outcome

    async def _bounce(self, message: SpoolMessage, batch: list[DeliveryAddress],
                      recipient: str, ctx: Any) -> str:
        self._mark_hidden(batch)
        ctx = self._context(ctx, bounce_recipient=recipient)
        options = await self.options(message, ctx)
        template = await self._template("bounce_message_file", "error",
                                        ("header", "intro", "generated text", "copy"),
                                        message, ctx)
        data_path = self.spool.locate(message.id).data
        data_size = await self.run_blocking(_file_size, data_path)
        with_body, limited = return_choice(message, options, data_size)
        body = await self.run_blocking(self.spool.read_body, message.id) if with_body else None
        returned = returned_message(message, body, DSN_LIMIT_HEADER if limited else None)
        bcc = await self._errors_copy(recipient, ctx, message)
        text = bounce_dsn(message, batch, recipient, options,
                          make_boundary(self.clock.seconds(), self.rng), returned,
                          with_body=with_body, template=template, bcc=bcc)
        return await self._spool(text, message)

    def _mark_hidden(self, addresses: list[DeliveryAddress]) -> None:
        """Flag the children of redirect routers with hide_child_in_errmsg."""
        for a in addresses:
            if a.parent is not None and a.parent.router:
                router = self.config.router(a.parent.router)
                if router is not None and router.get("hide_child_in_errmsg"):
                    a.extra[HIDE_CHILD] = True

    async def _errors_copy(self, recipient: str, ctx: Any, message: SpoolMessage) -> str | None:
        """The Bcc: errors_copy asks for (moan_check_errorcopy())."""
        from twisted_mta.expand.errors import ExpansionError
        from twisted_mta.lists import ListDefer, match_list
        from twisted_mta.values import split_list

        setting = self.config.get("errors_copy")
        if not setting or "@" not in recipient:
            return None
        local, _, domain = recipient.rpartition("@")
        for item in split_list(str(setting)):
            pattern, rest = _dequote(item)
            rest = rest.strip()
            if not rest:
                continue
            try:
                matched = await match_list(recipient, pattern, "address", ctx)
            except ListDefer:
                matched = None
            if matched is None:
                continue
            try:
                return await self._context(ctx, local_part=local, domain=domain).expand(rest)
            except ExpansionError as e:
                self._log(f"Failed to expand {rest} when processing errors_copy: {e.message}",
                          message.id, ("main", "panic"))
                return None
        return None

    async def send_warning(self, message: SpoolMessage, deferred: list[DeliveryAddress],
                           ctx: Any = None) -> str | None:
        """Send a delay warning for *deferred* (Exim's chain order, the
        latest deferral first) if one is due: the new message id.  The
        -H file's warning count is updated in *message*; the caller
        writes it."""
        if not deferred:
            return None
        sender = message.sender
        recipients = ""
        for a in deferred:
            target = errors_address(a, sender)
            if sender and target not in recipients:  # Exim's substring test
                recipients += ("," if recipients else "") + target
        if not any(a.basic_errno > ERRNO_WARN_BASE for a in deferred):
            return None  # nothing was really tried: the reason would be missing
        flags, _ = dsn_data(deferred[0], self.config)
        if flags & NOTIFY_ANY and not flags & NOTIFY_DELAY:
            return None
        delay_warning = tuple(self.config.get("delay_warning", (86400,)) or ())
        if not delay_warning or not sender:
            return None
        ctx = self._context(ctx)
        if not await self._warning_condition(message, deferred, ctx):
            return None
        queue_time = int(self.clock.seconds() - message.received[0])
        count, show_time = warnings_due(delay_warning, queue_time)
        if message.warning_count >= count:
            return None
        delay = delay_text(queue_time, show_time)
        self._mark_hidden(deferred)
        ctx = self._context(ctx, warn_message_delay=delay, warn_message_recipients=recipients,
                            warn_message_recipient=recipients)
        options = await self.options(message, ctx)
        template = await self._template("warn_message_file", "warning",
                                        ("header", "intro", "final"), message, ctx)
        text = warning_dsn(message, deferred, recipients, options,
                           make_boundary(self.clock.seconds(), self.rng), delay, template)
        try:
            new_id = await self._spool(text, message)
        except Exception as e:  # no count update: it is tried again next time
            self._log(f"failed to send delay warning to {recipients}: {e}", message.id,
                      ("main", "panic"))
            return None
        message.warning_count = count
        return new_id

    async def _warning_condition(self, message: SpoolMessage,
                                 deferred: list[DeliveryAddress], ctx: Any) -> bool:
        from twisted_mta.expand.errors import ExpansionError, ForcedFailure

        condition = self.config.get("delay_warning_condition")
        if not condition:
            return True
        domains = {(a.parent.domain if is_pfr(a) and a.parent is not None else a.domain)
                   for a in deferred}
        ctx.variables.pop("domain", None)
        if len(domains) == 1:
            ctx.variables["domain"] = domains.pop()
        try:
            result = await ctx.expand(str(condition))
        except ForcedFailure:
            return False
        except ExpansionError as e:
            self._log(f'failed to expand condition "{condition}" for delay_warning option: '
                      f"{e.message}", message.id, ("main", "panic"))
            return False
        finally:
            ctx.variables.pop("domain", None)
        return result.lower() not in ("", "0", "no", "false")


def _dequote(item: str) -> tuple[str, str]:
    """The first word of *item* (a quoted string allowed) and the rest."""
    item = item.lstrip()
    if item.startswith('"'):
        out: list[str] = []
        i = 1
        while i < len(item) and item[i] != '"':
            if item[i] == "\\" and i + 1 < len(item):
                i += 1
            out.append(item[i])
            i += 1
        return "".join(out), item[i + 1:]
    word = re.match(r"\S*", item)
    end = word.end() if word else 0
    return item[:end], item[end:]


def _read_text(path: str) -> str:
    with open(path, encoding="latin-1") as f:
        return f.read()


def _file_size(path: str) -> int:
    try:
        return os.path.getsize(path)
    except OSError:
        return 0
