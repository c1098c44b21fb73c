"""Which ACLs each condition, modifier, control and verify type may be used in.

Exim 4.96 checks this when an ACL runs, not when the configuration is read:
an item used in an ACL it does not belong to makes the statement (and so
the ACL) return an error, which the client sees as a temporary failure.
The tables here state, as in Exim's ``acl.c``, the ACLs where each item is
forbidden (or, where that is the shorter list, where it is allowed).

An ACL is named by its ``where``: ``connect``, ``helo``, ``mail``, ``rcpt``
... as the SMTP server passes them; ``unknown`` (an empty ``where``) is an
ACL run from an expansion outside any SMTP ACL, as ``${acl}`` under ``-be``.
"""

from __future__ import annotations

# Exim's ACL_WHERE_* in its order (some checks compare positions), with the
# names its messages use.
WHERE_NAMES = {
    "rcpt": "RCPT", "mail": "MAIL", "predata": "PREDATA", "mime": "MIME", "dkim": "DKIM",
    "data": "DATA", "prdr": "PRDR", "notsmtp": "non-SMTP", "auth": "AUTH",
    "connect": "connection", "etrn": "ETRN", "expn": "EXPN", "helo": "EHLO or HELO",
    "mailauth": "MAILAUTH", "notsmtp_start": "non-SMTP-start", "notquit": "NOTQUIT",
    "quit": "QUIT", "starttls": "STARTTLS", "vrfy": "VRFY", "delivery": "delivery",
    "unknown": "unknown",
}
WHERE_ORDER = {name: i for i, name in enumerate(WHERE_NAMES)}
ALL = frozenset(WHERE_NAMES)

# The ACLs that have a message to look at (Exim's ACL_BITS_HAVEDATA).
HAVE_DATA = frozenset(("mime", "dkim", "data", "prdr", "notsmtp", "quit", "notquit"))


def where_key(where: str) -> str:
    """The table key for a session's *where* (empty: ``unknown``)."""
    return where if where in WHERE_NAMES else "unknown"


def where_name(where: str) -> str:
    """The name Exim's messages give the ACL *where* (``EHLO or HELO``,
    ``connection``, ``unknown`` ...)."""
    return WHERE_NAMES[where_key(where)]


def _only(*allowed: str) -> frozenset[str]:
    """Forbidden everywhere except in *allowed*."""
    return ALL - frozenset(allowed)


def _never(*forbidden: str) -> frozenset[str]:
    return frozenset(forbidden)


_MESSAGE_ACLS = ("mail", "rcpt", "predata", "data", "prdr", "mime", "notsmtp")
_NOT_CONNECTION = ("auth", "connect", "helo", "mailauth", "quit", "etrn", "expn",
                   "starttls", "vrfy")

# Conditions and modifiers: where each is forbidden.  Items missing here
# (acl, condition, continue, control, dnslists, endpass, log_message,
# log_reject_target, logwrite, message, ratelimit, seen, set, udpsend,
# verify) are allowed everywhere at this level; control, dnslists,
# ratelimit and verify check further once their argument is known.
CONDITION_FORBIDS: dict[str, frozenset[str]] = {
    "add_header": _only(*_MESSAGE_ACLS, "dkim", "notsmtp_start"),
    "authenticated": _never("notsmtp", "notsmtp_start", "connect", "helo"),
    "bmi_optin": _never("auth", "connect", "helo", "data", "mime", "prdr", "etrn", "expn",
                        "mailauth", "mail", "starttls", "vrfy", "predata", "notsmtp_start"),
    "dcc": _only("data", "prdr", "notsmtp"),
    "decode": _only("mime"),
    "delay": _never("notquit"),
    "dkim_signers": _only("dkim"),
    "dkim_status": _only("dkim"),
    "dmarc_status": _only("data"),
    "domains": _only("rcpt", "vrfy", "prdr"),
    "encrypted": _never("notsmtp", "notsmtp_start", "helo"),
    "hosts": _never("notsmtp", "notsmtp_start"),
    "local_parts": _only("rcpt", "vrfy", "prdr"),
    "malware": _only("data", "prdr", "notsmtp"),
    "mime_regex": _only("mime"),
    "queue": _never("notsmtp", "prdr", "data"),
    "recipients": _only("rcpt"),
    "regex": _only("data", "prdr", "notsmtp", "mime"),
    "remove_header": _only(*_MESSAGE_ACLS, "notsmtp_start"),
    "sender_domains": _never(*_NOT_CONNECTION),
    "senders": _never(*_NOT_CONNECTION),
    "spam": _only("data", "prdr", "notsmtp"),
    "spf": _never(*(w for w in _NOT_CONNECTION if w != "quit"), "notsmtp", "notsmtp_start"),
    "spf_guess": _never(*(w for w in _NOT_CONNECTION if w != "quit"), "notsmtp",
                        "notsmtp_start"),
}

# Items whose argument Exim expands before the check above (the rest are
# checked first and expanded while they are tested).
NOT_EXPANDED_AT_TOP = frozenset((
    "acl", "authenticated", "domains", "encrypted", "hosts", "local_parts", "recipients",
    "sender_domains", "senders",
))

# Controls, in Exim's (sorted) table order, with whether they take options
# (``/...``) and where they are forbidden.  "error" is Exim's placeholder
# for a control it could not decode; it is in the table, so "control =
# error" finds it.
CONTROLS: dict[str, tuple[bool, frozenset[str]]] = {
    "allow_auth_unadvertised": (False, _only("connect", "helo")),
    "caseful_local_part": (False, _only("rcpt")),
    "caselower_local_part": (False, _only("rcpt")),
    "cutthrough_delivery": (True, frozenset()),
    "debug": (True, frozenset()),
    "dkim_disable_verify": (False, _never("data", "notsmtp", "prdr", "notsmtp_start")),
    "dmarc_disable_verify": (False, _never("data", "notsmtp", "notsmtp_start")),
    "dmarc_enable_forensic": (False, _never("data", "notsmtp", "notsmtp_start")),
    "dscp": (True, _never("notsmtp", "notsmtp_start", "notquit")),
    "enforce_sync": (False, _never("notsmtp", "notsmtp_start")),
    "error": (False, frozenset()),
    "fakedefer": (True, _only("mail", "rcpt", "predata", "data", "prdr", "mime")),
    "fakereject": (True, _only("mail", "rcpt", "predata", "data", "prdr", "mime")),
    "freeze": (True, _only("mail", "rcpt", "predata", "data", "notsmtp", "mime")),
    "no_callout_flush": (False, _never("notsmtp", "notsmtp_start")),
    "no_delay_flush": (False, _never("notsmtp", "notsmtp_start")),
    "no_enforce_sync": (False, _never("notsmtp", "notsmtp_start")),
    "no_mbox_unspool": (False, _only("mail", "rcpt", "predata", "data", "mime")),
    "no_multiline_responses": (False, _never("notsmtp", "notsmtp_start")),
    "no_pipelining": (False, _never("notsmtp", "notsmtp_start")),
    "queue": (True, _only("mail", "rcpt", "predata", "data", "notsmtp", "mime")),
    "submission": (True, _only("mail", "rcpt", "predata")),
    "suppress_local_fixups": (False, _only("mail", "rcpt", "predata", "notsmtp_start")),
    "utf8_downconvert": (True, _only("rcpt", "vrfy")),
}
_CONTROL_ORDER = list(CONTROLS)

# verify = <type>: (name, where allowed, takes no options, prefix length
# when the type is matched by its start, as "sender=address").
_VERIFY_TYPES = (
    ("reverse_host_lookup", ALL, False, 0),
    ("certificate", ALL, True, 0),
    ("helo", ALL, True, 0),
    ("csa", ALL, False, 0),
    ("header_syntax", HAVE_DATA, True, 0),
    ("not_blind", HAVE_DATA, False, 0),
    ("header_sender", HAVE_DATA, False, 0),
    ("sender", frozenset(("mail", "rcpt", "predata", "data", "notsmtp")), False, 6),
    ("recipient", frozenset(("rcpt",)), False, 0),
    ("header_names_ascii", HAVE_DATA, True, 0),
)


def item_error(name: str, modifier: bool, where: str) -> str | None:
    """The error for condition or modifier *name* used in ACL *where*, or
    None when it may be used there."""
    key = where_key(where)
    if key not in CONDITION_FORBIDS.get(name, ()):
        return None
    return f"cannot {'use' if modifier else 'test'} {name} condition in {WHERE_NAMES[key]} ACL"


def _find_control(text: str) -> str | None:
    # Exim's binary chop, comparing each name with the start of the text.
    first, last = 0, len(_CONTROL_ORDER)
    while last > first:
        middle = (first + last) // 2
        name = _CONTROL_ORDER[middle]
        head = text[:len(name)]
        if head == name:
            return name
        if head > name:
            first = middle + 1
        else:
            last = middle
    return None


def decode_control(text: str) -> tuple[str | None, str | None]:
    """(control name, error) for the (expanded) argument of ``control =``:
    the name is None when Exim cannot decode it, and the error is then its
    syntax error message."""
    name = _find_control(text)
    if name is not None:
        rest = text[len(name):]
        if not rest or (CONTROLS[name][0] and rest[0] in "/_"):
            return name, None
    return None, f'syntax error in "control={text}"'


def control_error(text: str, where: str) -> tuple[str | None, str | None]:
    """(control name, error) for ``control = text`` in ACL *where*: the
    error is Exim's syntax error or its refusal of the control there."""
    name, error = decode_control(text)
    if name is None:
        return None, error
    if where_key(where) in CONTROLS[name][1]:
        return name, f'cannot use "control={name}" in {where_name(where)} ACL'
    return name, None


def verify_error(text: str, where: str) -> str | None:
    """The error for ``verify = text`` in ACL *where* when the verify type
    may not be used there; None otherwise (including types Exim does not
    know and options a type does not take, which the verify code itself
    reports)."""
    first = text.split("/", 1)[0].strip()
    lower = first.lower()
    for name, allowed, no_options, prefix in _VERIFY_TYPES:
        matched = lower[:prefix] == name[:prefix] if prefix else lower == name
        if matched:
            if no_options and "/" in text:
                return None
            if where_key(where) in allowed:
                return None
            return f"cannot verify {name} in ACL for {where_name(where)}"
    return None
