"""The end of a message: Received header, PRDR, the DATA ACL, the spool
and the ``<=`` log line (Exim's ``receive_msg()`` after the data).

The 250 goes out only after the ``-D`` and ``-H`` files and the spool
directory are fsynced, in a worker thread so the reactor keeps serving.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from twisted_mta.expand.errors import ExpansionError
from twisted_mta.smtp.message import Header, IncomingMessage, logged_message_id
from twisted_mta.smtp.replies import printing, user_reply

if TYPE_CHECKING:
    from twisted_mta.smtp.server import ESMTPServer

FAKE_RESPONSE_TEXT = ("Your message has been rejected but is being kept for evaluation.\n"
                      "If it was a legitimate message, it may still be delivered to the "
                      "target recipient(s).")

_PRDR_TEXT = {"accept": ("250", "acceptance"), "discard": ("250", "acceptance"),
              "defer": ("450", "temporary refusal")}


async def receive_message(server: ESMTPServer, message: IncomingMessage, *,
                          chunked: bool) -> None:
    """Finish the transaction for *message*: reply, log, spool."""
    txn = server.transaction
    try:
        await _receive(server, message, chunked=chunked)
    finally:
        if server.config.get("acl_smtp_mime"):
            from twisted_mta.smtp.mime import unspool

            await unspool(server, server.vars.get("message_exim_id"),
                          keep="no_mbox_unspool" in txn.controls)


async def _receive(server: ESMTPServer, message: IncomingMessage, *, chunked: bool) -> None:
    txn = server.transaction
    variables = server.vars
    message_id, received_time = server.allocate_message_id()
    variables["message_exim_id"] = variables["message_id"] = message_id
    if message.too_big:
        server.reply("552", "Message size exceeds maximum permitted")
        server.log_write(f"rejected from <{txn.sender}> {server.host_and_ident(True)}: message "
                         f"too big: read={message.size_read} max={server.message_size_limit()}",
                         ("main", "reject"), message_id=message_id)
        server.finish_transaction()
        return
    recipients = txn.recipients
    variables["received_for"] = recipients[0].address if len(recipients) == 1 else ""
    received = await _received_header(server, received_time)
    if received is None:
        server.finish_transaction()
        return
    message.add_header(Header(received, "P"), 0)
    received_count = sum(1 for h in message.headers if h.name.lower() == "received")
    if received_count > server.config.get("received_headers_max", 30):
        server.reply("550", 'Too many "Received" headers - suspected mail loop')
        server.log_write(f'{server.host_and_ident(True)} F=<{txn.sender}> rejected: too many '
                         f'"Received" headers - suspected mail loop', ("main", "reject"),
                         message_id=message_id)
        server.finish_transaction()
        return
    _apply_acl_headers(server, message)
    _message_variables(server, message)

    # Exim's blackholed_by: who took the last recipient away.
    blackholed_by = None if recipients else "MAIL ACL" if txn.discarded else "RCPT ACL"
    if recipients and server.config.get("acl_smtp_mime"):
        from twisted_mta.smtp.mime import run_mime_acl

        mime_outcome = await run_mime_acl(server, message, message_id)
        if mime_outcome is not None:
            _apply_acl_headers(server, message)
            _header_variables(server, message)
            if mime_outcome.verdict == "discard":
                blackholed_by, recipients = "MIME ACL", []
            elif mime_outcome.verdict != "accept":
                server.acl_failed("mime", mime_outcome, "")
                server.finish_transaction()
                return

    prdr_lines: list[bytes] | None = None
    kept = list(recipients)
    if txn.prdr and len(recipients) > 1 and _prdr_acl_set(server):
        prdr_lines, kept = await _run_prdr(server, recipients)
        if not kept:
            txn.recipients = []
    if kept and server.config.get("acl_smtp_data"):
        outcome = await server.acl("data")
    else:
        outcome = None
    if prdr_lines is not None:
        server.send(b"353 PRDR content analysis beginning\r\n")
        for reply in prdr_lines:
            server.send(reply)
    if outcome is not None and outcome.verdict not in ("accept", "discard"):
        server.acl_failed("data", outcome, "")
        server.finish_transaction()
        return
    _apply_acl_headers(server, message)
    if outcome is not None and outcome.verdict == "discard":
        blackholed_by = "DATA ACL"
    if blackholed_by is not None:
        # Logged as received, then thrown away; the client is told it
        # was accepted.
        log_msg = outcome.log_message if outcome is not None else None
        server.log_write(reception_log_line(server, message, prdr_lines is not None),
                         ("main",), message_id=message_id)
        server.log_write(f"=> blackhole ({blackholed_by} discarded recipients)"
                         f"{': ' + log_msg if log_msg else ''}", ("main",),
                         message_id=message_id)
        server.log_write("Completed", ("main",), message_id=message_id)
        await server.log_flushed()
        _final_reply(server, outcome, message_id, chunked)
        server.after_message_reply()
        server.finish_transaction()
        return
    txn.recipients = kept
    variables["message_size"] = str(message.size())
    for note in server.pending_prdr_logs:
        server.log_write(note, ("main",), message_id=message_id)
    server.pending_prdr_logs = []
    if kept:
        if not server.host_checking:
            await server.store_message(message_id, received_time, message)
        server.log_write(reception_log_line(server, message, prdr_lines is not None),
                         ("main",), message_id=message_id)
        if "freeze" in txn.controls:
            server.log_write("frozen by ACL", ("main",), message_id=message_id)
        elif "queue" in txn.controls and "delay_delivery" in server.selector():
            server.log_write("no immediate delivery: queued by ACL", ("main",),
                             message_id=message_id)
        # As in Exim, a message the client is told about is in the log.
        await server.log_flushed()
    if prdr_lines is not None:
        _prdr_final_reply(server, message_id)
    else:
        _final_reply(server, outcome, message_id, chunked)
        server.after_message_reply()
    if kept and not server.host_checking and server.settings.on_message is not None \
            and not _queued(server):
        server.settings.on_message(message_id)
    server.finish_transaction(accepted=bool(kept))


def _queued(server: ESMTPServer) -> bool:
    """No delivery straight after reception: queue_only, smtp_accept_queue,
    ``control = queue`` or a freeze."""
    controls = server.transaction.controls
    return bool("queue" in controls or "freeze" in controls or server.queue_only
                or server.config.get("queue_only"))


async def _received_header(server: ESMTPServer, received_time: float) -> str | None:
    text = server.config.get("received_header_text")
    try:
        expanded = await server.ctx.expand(text)
    except ExpansionError as e:
        server.log_write(f'Expansion of "{text}" (received_header_text) failed: {e.message}',
                         ("main", "panic"))
        server.reply("451", "Temporary local problem - please try later")
        return None
    stamp = time.strftime("%a, %d %b %Y %H:%M:%S ", time.localtime(received_time))
    zone = time.strftime("%z", time.localtime(received_time))
    return f"{expanded};\n\t{stamp}{zone}\n"


def _apply_acl_headers(server: ESMTPServer, message: IncomingMessage) -> None:
    """Headers added by ACLs go in (at the end, or where a ``:at_start:``
    style prefix says); ``remove_header`` names are marked deleted."""
    from twisted_mta.spool.flags import header_flag

    txn = server.transaction
    for text in txn.add_headers:
        position = "end"
        for prefix in (":at_start:", ":at_start_rfc:", ":after_received:", ":at_end:"):
            if text.startswith(prefix):
                position, text = prefix.strip(":"), text[len(prefix):]
                break
        for line in _header_lines(text):
            if any(h.text == line for h in message.headers):
                continue
            header = Header(line, header_flag(line))
            if position == "at_start":
                message.add_header(header, 0)
            elif position in ("after_received", "at_start_rfc"):
                index = 0
                while index < len(message.headers) and \
                        message.headers[index].name.lower() == "received":
                    index += 1
                message.add_header(header, index)
            else:
                message.add_header(header)
    txn.add_headers = []
    for name in txn.remove_headers:
        lowered = name.lower().rstrip(":")
        for h in message.headers:
            if h.name.lower() == lowered:
                h.flag = "*"
    txn.remove_headers = []


def _header_lines(text: str) -> list[str]:
    """Split ACL header text into header lines; a line that is not a
    header gets ``X-ACL-Warn: `` in front, as Exim does."""
    from twisted_mta.smtp.message import _is_header_line

    lines: list[str] = []
    for raw in text.split("\n"):
        if not raw:
            continue
        if raw[:1] in (" ", "\t") and lines:
            lines[-1] += raw + "\n"
            continue
        if not _is_header_line(raw.encode("latin-1", "replace")):
            raw = "X-ACL-Warn: " + raw
        lines.append(raw + "\n")
    return lines


def _message_variables(server: ESMTPServer, message: IncomingMessage) -> None:
    variables = server.vars
    variables["message_size"] = str(message.size_read)
    variables["message_body_size"] = str(len(message.body))
    variables["body_linecount"] = str(message.body_linecount)
    variables["message_linecount"] = str(message.lines_read)
    variables["body_zerocount"] = str(message.body_zerocount)
    variables["max_received_linelength"] = str(message.max_linelength)
    visible = int(server.config.get("message_body_visible", 500) or 500)
    body = message.body.decode("latin-1")
    variables["message_body"] = body[:visible].replace("\n", " ")
    variables["message_body_end"] = body[-visible:].replace("\n", " ")
    _header_variables(server, message)


def _header_variables(server: ESMTPServer, message: IncomingMessage) -> None:
    """$h_*, $message_headers: the headers as they are now."""
    variables = server.vars
    variables["__headers__"] = message.decoded_header_values()
    variables["__headers_list__"] = message.headers
    variables["message_headers"] = "".join(h.text for h in message.headers
                                           if h.flag != "*").rstrip("\n")


def _prdr_acl_set(server: ESMTPServer) -> bool:
    value = server.config.get("acl_smtp_data_prdr")
    return value is None or bool(value)


async def _run_prdr(server: ESMTPServer, recipients: list[Any]
                    ) -> tuple[list[bytes], list[Any]]:
    """Run the PRDR ACL for each recipient in order: the reply lines and
    the recipients kept."""
    lines: list[bytes] = []
    kept = []
    results = []
    for recipient in recipients:
        local_part, _, domain = recipient.address.rpartition("@")
        server.vars["local_part"], server.vars["domain"] = local_part, domain
        outcome = await server.acl("prdr")
        code, word = _PRDR_TEXT.get(outcome.verdict, ("550", "refusal"))
        # smtp_user_msg(): the ACL's message may carry its own (extended)
        # code and several lines.
        lines.append(user_reply(code, outcome.user_message
                                or f"PRDR R=<{recipient.address}> {word}"))
        if outcome.log_message or outcome.user_message:
            note = (outcome.log_message or outcome.user_message).split("\n", 1)[0]
            server.pending_prdr_logs.append(f"PRDR {recipient.address} {note}")
        else:
            server.pending_prdr_logs.append(f"PRDR R=<{recipient.address}> {word}")
        results.append(outcome.verdict)
        if outcome.verdict == "accept":
            kept.append(recipient)
    server.vars.pop("local_part", None)
    server.vars.pop("domain", None)
    server.prdr_results = results
    return lines, kept


def _prdr_final_reply(server: ESMTPServer, message_id: str) -> None:
    """Exim's final PRDR reply, computed with its bit arithmetic: OK=0,
    DEFER=1, FAIL=2, DISCARD=7."""
    values = {"accept": 0, "defer": 1, "deny": 2, "drop": 2, "error": 3, "discard": 7}
    all_fail, all_pass = 2, 0
    for verdict in server.prdr_results:
        all_fail &= values[verdict]
        all_pass |= values[verdict]
    if all_fail == 2:
        code, text = "550", "rejected for all recipients"
    elif all_pass == 0:
        code, text = "250", "accepted"
    else:
        code, text = "250", "accepted for some recipients"
    fake = _fake_response(server)
    if fake is not None and code == "250":
        server.reply(*fake)
    else:
        server.reply(code, f"id={message_id} message {text}")


def _final_reply(server: ESMTPServer, outcome: Any, message_id: str,
                 chunked: bool = False) -> None:
    fake = _fake_response(server)
    if fake is not None:
        server.reply(*fake)
    elif outcome is not None and outcome.user_message:
        server.user_reply("250", outcome.user_message)
    else:
        if chunked:
            # The last BDAT's own acknowledgement comes first, as in Exim.
            server.send(f"250- {server.last_chunk_size} byte chunk, total "
                        f"{server.chunked_total}\r\n".encode())
        server.reply("250", f"OK id={message_id}")


def _fake_response(server: ESMTPServer) -> tuple[str, str] | None:
    """(code, text) when ``control = fakereject`` or ``fakedefer`` was set:
    the message is kept but the client is told otherwise."""
    controls = server.transaction.controls
    for name, code in (("fakereject", "550"), ("fakedefer", "450")):
        if name in controls:
            return code, controls[name]
    return None


def reception_log_line(server: ESMTPServer, message: IncomingMessage, prdr: bool) -> str:
    """The ``<=`` line (element order as Exim's receive.c)."""
    txn = server.transaction
    selector = server.selector()
    variables = server.vars
    # A fakereject message is logged "(=": kept, but refused as far as the
    # client knows.
    arrow = "(=" if "fakereject" in txn.controls else "<="
    parts = [f"{arrow} {txn.sender or '<>'}"]
    host = server.host_and_ident(True)
    if server.sender_host_address:
        parts.append(host)
    elif variables.get("sender_ident"):
        parts.append(f"U={variables['sender_ident']}")
    parts.append(f"P={variables.get('received_protocol', 'smtp')}")
    if "pipelining" in selector and server.pipelining_advertised():
        parts.append("L" + ("*" if server.early_pipe_used else
                            "." if server.early_pipe_advertised else "")
                     + ("" if server.pipelining_used else "-"))
    cipher = variables.get("tls_in_cipher")
    if cipher:
        if "tls_cipher" in selector:
            parts.append(f"X={cipher}")
        if "tls_certificate_verified" in selector:
            verified = variables.get("tls_in_certificate_verified") == "1"
            parts.append(f"CV={'yes' if verified else 'no'}")
        if "tls_peerdn" in selector and variables.get("tls_in_peerdn"):
            parts.append(f'DN="{variables["tls_in_peerdn"]}"')
        if "tls_sni" in selector and variables.get("tls_in_sni"):
            parts.append(f"SNI={variables['tls_in_sni']}")
    if server.authenticated:
        auth = f"A={server.authenticated}"
        if variables.get("authenticated_id"):
            auth += f":{variables['authenticated_id']}"
        if "smtp_mailauth" in selector and txn.auth_sender:
            auth += f":{txn.auth_sender}"
        parts.append(auth)
    if prdr:
        parts.append("PRDR")
    if "proxy" in selector and variables.get("proxy_local_address") \
            and variables.get("proxy_external_address"):
        parts.append(f"PRX={variables['proxy_local_address']}")
    if server.chunking_used:
        parts.append("K")
    parts.append(f"S={message.size()}")
    if "8bitmime" in selector:
        parts.append(f"M8S={8 if txn.body_type == '8BITMIME' else 7 if txn.body_type else 0}")
    if "receive_time" in selector:
        parts.append(f"RT={server.receive_time():.3f}s")
    if "msg_id" in selector:
        msg_id = logged_message_id(message.headers)
        if msg_id is not None:
            parts.append(f"id={printing(msg_id)}")
    if "subject" in selector:
        for h in message.headers:
            if h.name.lower() == "subject" and h.flag != "*":
                subject = printing(h.value.strip().replace("\n", ""))
                parts.append(f'T="{subject}"')
                break
    if "received_sender" in selector:
        parts.append(f"from <{txn.sender}>")
    if "received_recipients" in selector:
        parts.append("for " + " ".join(r.address for r in server.all_recipients))
    return " ".join(parts)
