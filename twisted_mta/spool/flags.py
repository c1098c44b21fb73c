"""The flag letter Exim stores in front of each header in a -H file.

``F`` From, ``T`` To, ``C`` Cc, ``B`` Bcc, ``I`` Message-Id, ``P``
Received, ``R`` Reply-To, ``S`` Sender, ``*`` a header that is kept in the
file but not sent (removed or replaced), and a space for anything else.
The ``Resent-`` forms of From, To, Cc, Bcc, Sender and Message-Id get the
same letter as the plain ones; ``Resent-Received`` and ``Resent-Reply-To``
do not exist for Exim and get a space.
"""

from __future__ import annotations

from collections.abc import Sequence

OTHER = " "
OLD = "*"

# Exim's header name table: (lower-case name, allowed after "Resent-", type).
# Types that are not spool flags (Date, Subject, ...) are given as names.
_NAMES: tuple[tuple[str, bool, str], ...] = (
    ("bcc", True, "B"),
    ("cc", True, "C"),
    ("date", True, "date"),
    ("delivery-date", False, "delivery-date"),
    ("envelope-to", False, "envelope-to"),
    ("from", True, "F"),
    ("message-id", True, "I"),
    ("received", False, "P"),
    ("reply-to", False, "R"),
    ("return-path", False, "return-path"),
    ("sender", True, "S"),
    ("subject", False, "subject"),
    ("to", True, "T"),
)
_SPACE = " \t\n\r\v\f"
# Exim lower-cases with the C library in the C locale: ASCII letters only.
_ASCII_LOWER = str.maketrans("ABCDEFGHIJKLMNOPQRSTUVWXYZ", "abcdefghijklmnopqrstuvwxyz")


def _lower(text: str) -> str:
    return text.translate(_ASCII_LOWER)


def _is_resent(text: str) -> bool:
    return _lower(text[:7]) == "resent-"


def header_type(text: str) -> str:
    """Exim's type for the header line *text*: a flag letter (``BCFIPRST``),
    one of ``date``, ``delivery-date``, ``envelope-to``, ``return-path``,
    ``subject``, or a space for any other header.

    Exim finds the name by a binary search of its table comparing only the
    table name's length of the header, then requires optional white space
    and a colon; the search is reproduced step by step so that odd names
    are classified the same way.
    """
    resent = _is_resent(text)
    if resent:
        text = text[7:]
    low, high = 0, len(_NAMES)
    while low < high:
        mid = (low + high) // 2
        name, allow_resent, kind = _NAMES[mid]
        head = _lower(text[:len(name)])
        # A header shorter than the name compares as if padded with NULs.
        c = (head > name) - (head < name) if len(head) == len(name) else (
            -1 if head <= name[:len(head)] else 1)
        if c == 0:
            rest = text[len(name):].lstrip(_SPACE)
            if rest.startswith(":"):
                return kind if not resent or allow_resent else OTHER
            c = 1
        if c > 0:
            low = mid + 1
        else:
            high = mid
    return OTHER


def header_flag(text: str) -> str:
    """The spool flag letter for the header *text* taken on its own."""
    kind = header_type(text)
    return kind if len(kind) == 1 else OTHER


def classify_headers(texts: Sequence[str], *, sender_is_old: bool = False,
                     return_path_remove: bool = True,
                     delivery_date_remove: bool = True,
                     envelope_to_remove: bool = True) -> list[str]:
    """The flags Exim gives the headers *texts* of an incoming message.

    On top of :func:`header_flag` this applies Exim's rules for a whole
    header section: when any ``Resent-`` header is present only the first
    ``Resent-Message-Id`` is flagged ``I`` (otherwise the first
    ``Message-Id``); Return-Path, Delivery-Date and Envelope-To are
    flagged ``*`` under the ``*_remove`` options (all true by default);
    *sender_is_old* flags the relevant Sender header ``*`` (Exim does that
    for an untrusted local sender or in submission mode, unless
    ``active_local_sender_retain``).  Exim's rewrite of a bare-login
    From: in non-SMTP input is left to the receiver.
    """
    resents = any(_is_resent(t) for t in texts)
    flags: list[str] = []
    seen_id = False
    for text in texts:
        is_resent = _is_resent(text)
        kind = header_type(text)
        flag = OTHER
        if kind in ("B", "C", "F", "P", "R", "T"):
            flag = kind
        elif kind == "I":
            if not seen_id and (not resents or is_resent):
                seen_id = True
                flag = "I"
        elif kind == "S":
            flag = OLD if sender_is_old and (not resents or is_resent) else "S"
        elif kind == "return-path" and return_path_remove:
            flag = OLD
        elif kind == "delivery-date" and delivery_date_remove:
            flag = OLD
        elif kind == "envelope-to" and envelope_to_remove:
            flag = OLD
        flags.append(flag)
    return flags
