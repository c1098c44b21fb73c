"""Exim's configuration line processing: macros, includes, conditionals,
comments and continuation lines (readconf.c ``get_config_line()``)."""

from __future__ import annotations

import os
import re
from collections.abc import Iterator

from twisted_mta.config.errors import ConfigError

# Where a macro name may start: an upper-case letter, or "_" before one.
_CANDIDATE = re.compile(r"[A-Z]|_[A-Z]")
_DEFINITION = re.compile(r"([A-Za-z0-9_]*)\s*(==?)\s*(.*)\Z", re.DOTALL)
_NAME_CHARS = re.compile(r"[A-Za-z0-9_]*")
_CONDITIONALS = ("ifdef", "ifndef", "elifdef", "elifndef", "else", "endif")
# State transitions (0 = reading, 1 = skipping to .else/.elif, 2 = skipping
# to .endif), indexed by state and by: if-true, if-false, elif-true, elif-false.
_NEXT_STATE = ((0, 1, 2, 2), (2, 2, 0, 1), (2, 2, 2, 2))
_NESTING_LIMIT = 20
_SPACE_OR_END = ("", " ", "\t", "\r", "\v", "\f")


WHITESPACE = " \t\n\r\v\f"


def _is_upper(c: str) -> bool:
    # C isupper() in the C locale: ASCII only, unlike str.isupper().
    return "A" <= c <= "Z"


class Macros:
    """The ordered macro table: built-ins, then ``-D`` definitions, then the
    file's definitions, each kept in definition order."""

    def __init__(self, builtins: dict[str, str], defines: dict[str, str] | None = None) -> None:
        self.values: dict[str, str] = dict(builtins)
        self._command_line: set[str] = set()
        self._user: list[str] = []
        for name, value in (defines or {}).items():
            self.values[name] = value
            self._command_line.add(name)
            self._user.append(name)

    @property
    def command_line(self) -> dict[str, str]:
        """The ``-D`` definitions, as given (to start another process on
        the same configuration)."""
        return {name: self.values[name] for name in self._user if name in self._command_line}

    def substitute(self, line: str, logical_start: bool = True) -> tuple[str, bool]:
        """Replace macros in one physical line, as Exim does.

        On the first line of a logical line, the name of a macro being
        defined (``NAME = ...``) is left alone.  Built-in macros are tried
        only when the first possible macro name in the line starts with
        ``_`` (an Exim quirk)."""
        start = len(line) - len(line.lstrip(WHITESPACE))
        if logical_start and start < len(line) and _is_upper(line[start]):
            end = _NAME_CHARS.match(line, start).end()
            rest = line[end:].lstrip(WHITESPACE)
            if rest.startswith("="):
                start = len(line) - len(rest)
        first = _CANDIDATE.search(line, start)
        if first is None:
            return line, False
        start = first.start()
        names = self.values if line[start] == "_" else self._user
        found = False
        for name in names:
            pos = line.find(name, start)
            if pos < 0:
                continue
            replacement = self.values[name]
            while pos >= 0:
                line = line[:pos] + replacement + line[pos + len(name):]
                # The replacement is not rescanned for this same macro.
                pos = line.find(name, pos + len(replacement))
            found = True
        return line, found

    def define(self, text: str, reader: LineReader | None = None) -> str:
        """Process a ``NAME = value`` or ``NAME == value`` line; return NAME.

        Only a malformed line is reported with its location (from *reader*),
        as in Exim."""
        m = _DEFINITION.match(text)
        if m is None:
            message = "malformed macro definition"
            raise reader.error(message) if reader else ConfigError(message)
        name, op, value = m.group(1), m.group(2), m.group(3).strip(WHITESPACE)
        existing = None
        for other in self.values:
            if other == name:
                if other not in self._command_line and op != "==":
                    raise ConfigError(
                        f'macro "{name}" is already defined (use "==" if you want to redefine it)')
                existing = other
                break
            if len(other) < len(name) and other in name:
                raise ConfigError(
                    f'"{name}" cannot be defined as a macro because previously '
                    f'defined macro "{other}" is a substring')
        if existing is not None and existing in self._command_line:
            return name
        if op == "==":
            if existing is None:
                raise ConfigError(f'can\'t redefine an undefined macro "{name}"')
            self.values[name] = value
            return name
        self.values[name] = value
        self._user.append(name)
        return name


class LineReader:
    """Yields logical lines of a configuration file, tracking the current
    file and physical line number for error messages."""

    def __init__(self, text: str, filename: str, macros: Macros) -> None:
        self.macros = macros
        self.filename = filename
        self.lineno = 0
        self._lines = text.split("\n")
        if self._lines and self._lines[-1] == "":
            self._lines.pop()
        self._index = 0
        self._directory = os.path.dirname(filename) or "."
        self._stack: list[tuple[list[str], int, str, str, int]] = []
        self._state = 0
        self._states: list[int] = []

    def error(self, message: str) -> ConfigError:
        """A ConfigError located at the current line."""
        return ConfigError(message, self.filename, self.lineno)

    def _next_physical(self) -> str | None:
        while self._index >= len(self._lines):
            if not self._stack:
                return None
            (self._lines, self._index, self.filename, self._directory,
             self.lineno) = self._stack.pop()
        line = self._lines[self._index]
        self._index += 1
        self.lineno += 1
        return line

    def _include(self, rest: str, if_exists: bool) -> None:
        path = rest.strip(WHITESPACE)
        if len(path) >= 2 and path[0] == '"' and path[-1] == '"':
            path = path[1:-1]
        if not path.startswith("/"):
            if if_exists:
                raise self.error(f'.include specifies a non-absolute path "{path}"')
            path = f"{self._directory}/{path}"
        if if_exists and not os.path.exists(path):
            return
        try:
            with open(path, "rb") as f:
                data = f.read().decode("latin-1")
        except OSError:
            raise self.error(f"failed to open included configuration file {path}") from None
        self._stack.append((self._lines, self._index, self.filename, self._directory, self.lineno))
        self._lines = data.split("\n")
        if self._lines and self._lines[-1] == "":
            self._lines.pop()
        self._index = 0
        self.filename = path
        self._directory = path.rsplit("/", 1)[0]
        self.lineno = 0

    def _conditional(self, line: str, found: bool) -> bool:
        """Handle a .ifdef-style directive; False if *line* is not one."""
        word = line[1:].split(None, 1)[0] if line[1:2] not in _SPACE_OR_END else ""
        if word not in _CONDITIONALS:
            return False
        if word in ("ifdef", "ifndef"):
            if len(self._states) >= _NESTING_LIMIT - 1:
                raise self.error(f".{word} nested too deeply")
            self._states.append(self._state)
            hit = found if word == "ifdef" else not found
            self._state = _NEXT_STATE[self._state][0 if hit else 1]
            return True
        if not self._states:
            raise self.error(f".{word} without matching .ifdef")
        if word == "endif":
            self._state = self._states.pop()
        elif word == "else":
            self._state = _NEXT_STATE[self._state][2]
        else:
            hit = found if word == "elifdef" else not found
            self._state = _NEXT_STATE[self._state][2 if hit else 3]
        return True

    def __iter__(self) -> Iterator[str]:
        return self

    def __next__(self) -> str:
        """The next logical line (stripped), or StopIteration at EOF."""
        parts: list[str] = []
        while True:
            raw = self._next_physical()
            if raw is None:
                if self._states:
                    raise self.error("Unexpected end of configuration file: .endif missing")
                if parts:
                    break
                raise StopIteration
            text, found = self.macros.substitute(raw, not parts)
            text = text.lstrip(WHITESPACE)
            if text.startswith("#"):
                continue
            if text.startswith(".") and self._conditional(text, found):
                continue
            if self._state != 0:
                continue
            if text.startswith(".include") and (
                    text[8:9] in _SPACE_OR_END):
                self._include(text[8:], False)
                continue
            if text.startswith(".include_if_exists") and (
                    text[18:19] in _SPACE_OR_END):
                self._include(text[18:], True)
                continue
            text = text.rstrip(WHITESPACE)
            parts.append(text)
            if text:
                if not text.endswith("\\"):
                    break
                parts[-1] = text[:-1]
            elif len(parts) > 1:
                # A blank line ends a continuation.
                parts.pop()
                break
            else:
                parts.pop()
        return "".join(parts)
