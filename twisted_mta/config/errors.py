"""The configuration error, printed the way Exim prints it."""

from __future__ import annotations

from datetime import datetime


class ConfigError(Exception):
    """A fatal configuration error.

    *filename*/*lineno* locate it when Exim would say "in line N of F";
    *where* replaces that for errors Exim reports per driver ("for r1 router").
    """

    def __init__(self, message: str, filename: str | None = None,
                 lineno: int | None = None, where: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.filename = filename
        self.lineno = lineno
        self.where = where

    def header(self) -> str:
        """The first line of Exim's report, without the timestamp."""
        if self.lineno is not None and self.filename is not None:
            return f"Exim configuration error in line {self.lineno} of {self.filename}:"
        if self.where:
            return f"Exim configuration error {self.where}:"
        return "Exim configuration error:"

    def format(self, now: datetime) -> str:
        """Exim's two-line stderr report (with a trailing newline)."""
        stamp = now.strftime("%Y-%m-%d %H:%M:%S")
        return f"{stamp} {self.header()}\n  {self.message}\n"

    def __str__(self) -> str:
        return f"{self.header()} {self.message}"
