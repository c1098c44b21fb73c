"""The AUTH command: Exim's checks around the authenticators of
L{twisted_mta.smtp.auth}."""

from __future__ import annotations

from typing import TYPE_CHECKING

from twisted_mta.smtp.auth import (
    BAD_MECHANISM_NAME,
    auth_command_refusal,
    b64encode,
    find_authenticator,
    parse_auth_argument,
    unsupported_mechanism,
)

if TYPE_CHECKING:
    from twisted_mta.smtp.server import ESMTPServer


async def run_auth_command(server: ESMTPServer, argument: str) -> None:
    """Check the state, run the AUTH ACL, then the chosen authenticator."""
    server.vars["authentication_failed"] = "1"
    unadvertised = "allow_auth_unadvertised" in server.transaction.controls
    refusal = auth_command_refusal(
        advertised="AUTH" in server.advertised, authenticated=bool(server.authenticated),
        in_transaction=server.transaction.sender is not None,
        allow_unadvertised=unadvertised)
    if refusal is not None:
        await server.synprot("protocol", str(refusal[0]), None, refusal[1])
        return
    if server.config.get("acl_smtp_auth"):
        outcome = await server.acl("auth")
        if outcome.verdict != "accept":
            server.acl_failed("auth", outcome, argument)
            return
    parsed = parse_auth_argument(argument)
    if parsed is None:
        await server.synprot("syntax", str(BAD_MECHANISM_NAME[0]), None, BAD_MECHANISM_NAME[1])
        return
    mechanism, initial = parsed
    chosen = find_authenticator(server.authenticators, mechanism,
                                None if unadvertised else server.auth_mechanisms)
    if chosen is None:
        code, text = unsupported_mechanism(mechanism)
        await server.synprot("protocol", str(code), None, text)
        return

    async def ask(prompt: str) -> str:
        server.send(f"334 {b64encode(prompt)}\r\n".encode())
        return await server.read_auth_line()

    try:
        outcome = await chosen.authenticate(initial or None, ask, server.ctx,
                                            host_ident=server.host_and_ident(False),
                                            defer_user_msg=server.auth_defer_text)
    except ConnectionError:
        # The client left mid-exchange; the session's EOF handling follows.
        return
    server.auth_defer_text = outcome.defer_user_msg
    code, text = outcome.reply
    server.send(f"{code} {text}\r\n".encode("latin-1", "replace"))
    for name, value in outcome.variable_updates().items():
        if value is None:
            server.vars.pop(name, None)
        else:
            server.vars[name] = value
    if outcome.result == "ok":
        server.authenticated = chosen.name
        server.vars["received_protocol"] = server.protocol_name()
    elif outcome.log:
        server.log_write(outcome.log, ("main", "reject"))
