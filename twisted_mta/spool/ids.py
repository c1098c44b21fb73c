"""Exim 4.96 message ids: ``TTTTTT-PPPPPP-SS`` in base 62.

``TTTTTT`` is the receive time in seconds, ``PPPPPP`` the pid of the
receiving process and ``SS`` the fraction of the second in 5 ms units
(0-199), or ``localhost_number * 200`` plus that fraction when
``localhost_number`` is set.  The spool files are ``<id>-H`` and ``<id>-D``;
the external form (``$message_exim_id`` is the bare id, the generated
Message-Id uses ``E<id>``) is not handled here.

Exim keeps ids unique by sleeping, after each message, until the clock
has moved past the 5 ms tick of the id it just used.  A Twisted daemon
receives every message in one process and must not block the reactor, so
:class:`MessageIdAllocator` instead hands out the next unused tick: in a
burst of more than 200 messages a second the ids (and the received times
returned with them) run slightly ahead of the clock, exactly as if we had
waited, and fall back in step once the burst is over.
"""

from __future__ import annotations

import re
from collections.abc import Callable

BASE62_CHARS = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
_BASE62_VALUE = {c: i for i, c in enumerate(BASE62_CHARS)}

#: Sub-second resolution of 4.96 ids in microseconds (the spec still says
#: 1/2000 s; the code uses 5000 us).
ID_RESOLUTION_USEC = 5000
TICKS_PER_SECOND = 1_000_000 // ID_RESOLUTION_USEC
#: Largest localhost_number Exim accepts where ids use base 62.
LOCALHOST_MAX = 16
MESSAGE_ID_LENGTH = 16

MESSAGE_ID_RE = re.compile(r"[0-9A-Za-z]{6}-[0-9A-Za-z]{6}-[0-9A-Za-z]{2}\Z")


def base62(value: int, width: int = 6) -> str:
    """*value* in base 62 as exactly *width* digits.

    Like Exim's ``string_base62()`` the high-order digits that do not fit are
    dropped rather than reported, so the result is ``value mod 62**width``.
    """
    if value < 0:
        raise ValueError("base62 of a negative number")
    digits = []
    for _ in range(width):
        value, digit = divmod(value, 62)
        digits.append(BASE62_CHARS[digit])
    return "".join(reversed(digits))


def base62_value(text: str) -> int:
    """The number that the base-62 digits *text* represent."""
    value = 0
    for c in text:
        value = value * 62 + _BASE62_VALUE[c]
    return value


def is_message_id(text: str) -> bool:
    """True when *text* has the shape of a 4.96 message id."""
    return MESSAGE_ID_RE.match(text) is not None


def id_time(message_id: str) -> int:
    """The receive time (epoch seconds) encoded in *message_id*; Exim uses
    this when a message's -H file cannot be read."""
    return base62_value(message_id[:6])


def split_time(t: float) -> tuple[int, int]:
    """*t* as (seconds, microseconds), rounded to the nearest microsecond."""
    return divmod(round(t * 1_000_000), 1_000_000)


def make_message_id(seconds: int, pid: int, fraction: int) -> str:
    """The id for a time in *seconds*, a *pid* and the final field's number
    *fraction* (sub-second ticks, plus ``localhost_number * 200``)."""
    return f"{base62(seconds)}-{base62(pid)}-{base62(fraction, 2)}"


class MessageIdAllocator:
    """Allocates unique message ids for one receiving process.

    *clock_seconds* returns the wall-clock time (``time.time`` or a
    reactor's ``seconds``); *pid* is the process id that goes in the id.
    """

    def __init__(self, clock_seconds: Callable[[], float], pid: int,
                 localhost_number: int | None = None) -> None:
        if localhost_number is not None and not 0 <= localhost_number <= LOCALHOST_MAX:
            raise ValueError(f"localhost_number must be between 0 and {LOCALHOST_MAX}")
        if pid < 0:
            raise ValueError("negative pid")
        self._clock = clock_seconds
        self.pid = pid
        self.localhost_number = localhost_number
        self._last_tick: int | None = None

    def allocate(self) -> tuple[str, float]:
        """Return ``(message_id, received_time)`` for a new message.

        The received time is the clock reading, or the start of the tick
        the id was moved on to when the clock has not yet left the last
        id's tick (what Exim would have read after waiting for it).
        """
        now = self._clock()
        sec, usec = split_time(now)
        tick = sec * TICKS_PER_SECOND + usec // ID_RESOLUTION_USEC
        if self._last_tick is not None and tick <= self._last_tick:
            # Exim would sleep here until the tick changes; we take the next
            # tick instead, which also copes with a clock that steps back.
            tick = self._last_tick + 1
            sec, sub = divmod(tick, TICKS_PER_SECOND)
            now = sec + sub * ID_RESOLUTION_USEC / 1_000_000
        self._last_tick = tick
        sec, sub = divmod(tick, TICKS_PER_SECOND)
        if self.localhost_number is not None:
            sub += self.localhost_number * TICKS_PER_SECOND
        return make_message_id(sec, self.pid, sub), now
