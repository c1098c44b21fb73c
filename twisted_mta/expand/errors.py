"""Failures of string expansion, with Exim's message texts."""


class ExpansionError(Exception):
    """An expansion failed; ``message`` is Exim's ``expand_string_message``."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class ForcedFailure(ExpansionError):
    """A forced failure (``fail``, a DEFER from ``${acl}``...): callers may treat
    it differently from an error (for example "not in list")."""


class LookupDefer(ExpansionError):
    """A lookup could not be completed now (server down, timeout, bad key)."""


class TaintError(ExpansionError):
    """Tainted data was about to be used where Exim forbids it."""
