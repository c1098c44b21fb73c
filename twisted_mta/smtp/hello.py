"""The HELO/EHLO argument check (Exim's ``check_helo()``)."""

from __future__ import annotations

from twisted_mta.lists import ip_version


def check_helo_argument(argument: str, allow_chars: str = "", accept_junk: bool = False
                        ) -> str | None:
    """The HELO name if *argument* is acceptable, else None.

    A name may hold letters, digits, dots, hyphens and the characters of
    ``helo_allow_chars``; an address literal is ``[ip]``, ``[IPv4:ip]`` or
    ``[IPv6:ip]``.  Hosts in ``helo_accept_junk_hosts`` may send anything
    (even nothing)."""
    if accept_junk:
        return argument
    if not argument:
        return None
    if argument.startswith("["):
        if not argument.endswith("]"):
            return None
        inner = argument[1:-1]
        tag = inner[:5].lower()
        if tag == "ipv6:":
            ok = ip_version(inner[5:]) == 6
        elif tag == "ipv4:":
            ok = ip_version(inner[5:]) == 4
        else:
            ok = ip_version(inner) != 0
        return argument if ok else None
    for c in argument:
        if not (c.isascii() and c.isalnum()) and c not in ".-" and c not in allow_chars:
            return None
    return argument
