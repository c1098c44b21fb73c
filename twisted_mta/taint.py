"""Tainted data: values that came from the network or a message.

Exim refuses to use such data as a file name, a command or an expansion
string.  We mark it with a ``str`` subclass, so ordinary string code keeps
working and the mark is visible wherever a value is about to be used.

All expansion values are ``str`` objects in which every character is one
byte (decoded as Latin-1); see :mod:`twisted_mta.expand`.
"""


class Tainted(str):
    """A string whose content came from outside the configuration."""

    __slots__ = ()


def is_tainted(value: str) -> bool:
    return isinstance(value, Tainted)


def taint(value: str) -> str:
    return value if isinstance(value, Tainted) else Tainted(value)


def join_taint(result: str, *sources: str) -> str:
    """Return *result* marked tainted when any of *sources* is."""
    for source in sources:
        if isinstance(source, Tainted):
            return Tainted(result)
    return result
