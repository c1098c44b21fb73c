"""PCRE2 patterns (as Exim uses them) compiled with Python's ``re``.

Values hold one byte per character, so patterns are compiled with
``re.ASCII`` (PCRE2 without UTF: ``\\w``, ``\\d`` and caseless matching are
ASCII-only) and ``re.DOTALL`` off, as in PCRE2's defaults.  The syntax that
differs is translated: ``\\Q...\\E``, ``\\z``/``\\Z``, ``\\h``, ``\\x{HH}``,
``\\e``, POSIX classes ``[:alpha:]``, ``(?<name>`` and ``\\g{N}``/``\\gN``.
Error messages are mapped to PCRE2's texts for the common cases; offsets
refer to the translated pattern, which equals the original unless one of
the translations above occurred before the error.
"""

from __future__ import annotations

import functools
import re

from twisted_mta.expand.errors import ExpansionError

_POSIX = {
    "alpha": "a-zA-Z", "digit": "0-9", "alnum": "a-zA-Z0-9", "upper": "A-Z",
    "lower": "a-z", "space": r" \t\n\r\f\v", "blank": r" \t", "punct": r"!-/:-@\[-`{-~",
    "xdigit": "0-9A-Fa-f", "word": r"\w", "cntrl": r"\x00-\x1f\x7f", "print": r" -~",
    "graph": "!-~",
}
_SIMPLE_ESCAPES = {"z": r"\Z", "Z": r"(?=\n?\Z)", "h": r"[ \t\xa0]", "H": r"[^ \t\xa0]", "e": r"\x1b"}

_ERRORS = [
    (re.compile(r"bad character range"), "range out of order in character class", 2),
    (re.compile(r"missing \), unterminated subpattern"), "missing closing parenthesis", None),
    (re.compile(r"unbalanced parenthesis"), "unmatched closing parenthesis", 0),
    (re.compile(r"unterminated character set"), "missing terminating ] for character class", None),
    (re.compile(r"nothing to repeat|multiple repeat"), "quantifier does not follow a repeatable item", 0),
    (re.compile(r"bad escape \(end of pattern\)"), "\\ at end of pattern", None),
]


_INLINE_FLAGS = re.compile(r"\(\?([imsx]*(?:-[imsx]*)?)\)")


def _translate(pattern: str) -> str:
    out: list[str] = []
    i, n = 0, len(pattern)
    in_class = False
    # Python only accepts flag settings such as (?i) at the very start, so
    # each one becomes a scoped (?i:...) closed where PCRE's setting ends:
    # at the end of the enclosing group, and reopened after each "|".
    scoped: list[list[str]] = [[]]
    while i < n:
        c = pattern[i]
        if c == "\\" and i + 1 < n:
            e = pattern[i + 1]
            if e == "Q":
                end = pattern.find("\\E", i + 2)
                literal = pattern[i + 2:] if end < 0 else pattern[i + 2:end]
                out.append(re.escape(literal))
                i = n if end < 0 else end + 2
                continue
            if e == "E":
                i += 2
                continue
            if e == "x" and i + 2 < n and pattern[i + 2] == "{":
                end = pattern.find("}", i + 3)
                if end > 0:
                    out.append(f"\\x{int(pattern[i + 3:end] or '0', 16) & 0xFF:02x}")
                    i = end + 1
                    continue
            if e == "g" and i + 2 < n:
                m = re.match(r"\{(-?\d+)\}|(\d+)", pattern[i + 2:])
                if m:
                    out.append(f"(?:\\{m.group(1) or m.group(2)})")
                    i += 2 + m.end()
                    continue
            if not in_class and e in _SIMPLE_ESCAPES:
                out.append(_SIMPLE_ESCAPES[e])
                i += 2
                continue
            out.append(pattern[i:i + 2])
            i += 2
            continue
        if in_class:
            if c == "[" and pattern.startswith("[:", i):
                end = pattern.find(":]", i + 2)
                name = pattern[i + 2:end] if end > 0 else ""
                negate = name.startswith("^")
                if name.lstrip("^") in _POSIX and not negate:
                    out.append(_POSIX[name])
                    i = end + 2
                    continue
            if c == "]":
                in_class = False
            out.append(c)
            i += 1
            continue
        if c == "[":
            in_class = True
            out.append(c)
            i += 1
            # A ] straight after [ or [^ is a literal in both dialects.
            if pattern.startswith("^", i):
                out.append("^")
                i += 1
            if pattern.startswith("]", i):
                out.append("\\]")
                i += 1
            continue
        if c == "(":
            m = _INLINE_FLAGS.match(pattern, i)
            if m:
                out.append(f"(?{m.group(1)}:")
                scoped[-1].append(m.group(1))
                i = m.end()
                continue
            scoped.append([])
            if pattern.startswith("(?<", i) and i + 3 < n and pattern[i + 3] not in "=!":
                out.append("(?P<")
                i += 3
                continue
        elif c == ")" and len(scoped) > 1:
            out.append(")" * len(scoped.pop()))
        elif c == "|":
            flags = scoped[-1]
            out.append(")" * len(flags) + "|" + "".join(f"(?{f}:" for f in flags))
            i += 1
            continue
        out.append(c)
        i += 1
    out.append(")" * len(scoped[0]))
    return "".join(out)


@functools.lru_cache(maxsize=1024)
def compile_regex(pattern: str) -> re.Pattern[str]:
    """Compile an Exim (PCRE2) regular expression; errors use Exim's text
    ``regular expression error in "<pattern>": <reason> at offset <n>``."""
    translated = _translate(pattern)
    try:
        return re.compile(translated, re.ASCII)
    except re.error as e:
        message = e.msg
        offset = len(pattern) if e.pos is None else e.pos
        for test, pcre_message, shift in _ERRORS:
            if test.search(e.msg):
                message = pcre_message
                offset = len(pattern) if shift is None else offset + shift
                break
        raise ExpansionError(
            f'regular expression error in "{pattern}": {message} at offset {offset}'
        ) from None
