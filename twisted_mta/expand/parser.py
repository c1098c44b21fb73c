"""Parse an expansion string into a tree of nodes, with Exim's error texts.

The grammar follows Exim's ``expand_string_internal()``: only ``$`` and
``\\`` are special at top level, items take brace-delimited arguments, and a
``{yes}{no}`` tail may follow some of them.  Everything Exim reports while
scanning (unknown variables, operators, conditions, brace problems) is
reported here, so the unused arm of an ``${if}`` fails just as in Exim.
"""

from __future__ import annotations

import re
from collections.abc import Callable

from twisted_mta.expand import conditions, items, operators_ctx
from twisted_mta.expand.errors import ExpansionError
from twisted_mta.expand.nodes import (
    Condition,
    Header,
    Item,
    Numeric,
    Operator,
    Seq,
    Text,
    Variable,
    YesNo,
)
from twisted_mta.expand.variables import unknown_variable_hint, variable_getter
from twisted_mta.values import interpret_escape

_NAME_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789")
_HEADER_PREFIXES = ("h_", "header_", "rh_", "rheader_", "lh_", "lheader_", "bh_", "bheader_")

#: Operators whose name contains an underscore that is not an argument.
_UNDERSCORE_OPERATORS = frozenset(
    (
        "from_utf8", "local_part", "quote_local_part", "reverse_ip", "time_eval",
        "time_interval", "utf8_domain_from_alabel", "utf8_domain_to_alabel",
        "utf8_localpart_from_alabel", "utf8_localpart_to_alabel",
    )
)


# A run of characters with no meaning to the parser: everything up to the next
# "$", "}" or backslash.
_TEXT_RUN = re.compile(r"[^$}\\]*")


def _is_alpha(c: str) -> bool:
    return ("a" <= c <= "z") or ("A" <= c <= "Z")


def _is_digit(c: str) -> bool:
    return "0" <= c <= "9"


def _is_space(c: str) -> bool:
    return c in " \t\n\r\f\v"


class Parser:
    """A cursor over one expansion string."""

    def __init__(self, text: str) -> None:
        self.s = text
        self.n = len(text)
        # A header name that swallowed a "}" (its colon was forgotten) changes
        # Exim's bracketing messages into a hint about the colon.
        self.malformed_header = False
        # Where an unknown variable name ended, for ${run}'s scan.
        self.fail_pos: int | None = None

    # -- lexical helpers ---------------------------------------------------

    def skip_space(self, pos: int) -> int:
        s, n = self.s, self.n
        while pos < n and _is_space(s[pos]):
            pos += 1
        return pos

    def char(self, pos: int) -> str:
        return self.s[pos] if pos < self.n else ""

    def read_name(self, pos: int, extras: str) -> tuple[str, int]:
        s, n = self.s, self.n
        start = pos
        while pos < n and (s[pos] in _NAME_CHARS or s[pos] in extras):
            pos += 1
        return s[start:pos], pos

    def read_number(self, pos: int) -> tuple[int, int]:
        start = pos
        while pos < self.n and _is_digit(self.s[pos]):
            pos += 1
        return int(self.s[start:pos]), pos

    def escape(self, pos: int) -> tuple[str, int]:
        """Interpret the escape whose backslash is at *pos*."""
        return interpret_escape(self.s, pos)

    def remaining(self, pos: int) -> str:
        return self.s[pos:]

    # -- sequences -----------------------------------------------------------

    def parse_seq(self, pos: int, ket_ends: bool, honour_dollar: bool = True) -> tuple[Seq, int]:
        """Parse until a closing brace (if *ket_ends*) or the end."""
        s, n = self.s, self.n
        start = pos
        parts: list = []
        text: list[str] = []

        def flush() -> None:
            if text:
                parts.append(Text("".join(text)))
                text.clear()

        while pos < n:
            c = s[pos]
            if c == "\\":
                if pos + 1 >= n:
                    raise ExpansionError("\\ at end of string")
                if s[pos + 1] == "N":
                    end = s.find("\\N", pos + 2)
                    if end < 0:
                        text.append(s[pos + 2:])
                        pos = n
                    else:
                        text.append(s[pos + 2:end])
                        pos = end + 2
                else:
                    ch, pos = self.escape(pos)
                    text.append(ch)
                continue
            if ket_ends and c == "}":
                break
            if c != "$" or not honour_dollar:
                end = _TEXT_RUN.match(s, pos + 1).end()
                text.append(s[pos:end])
                pos = end
                continue
            node, pos = self.parse_dollar(pos + 1)
            if node is not None:
                flush()
                parts.append(node)
        if ket_ends and pos >= n:
            if self.malformed_header:
                raise ExpansionError(
                    "missing } at end of string - could be header name not terminated by colon"
                )
            raise ExpansionError("missing } at end of string")
        flush()
        return Seq(parts, s[start:pos]), pos

    def parse_dollar(self, pos: int) -> tuple[object, int]:
        """Parse what follows a ``$``."""
        c = self.char(pos)
        if _is_alpha(c):
            name, pos = self.read_name(pos, "_")
            prefix = _header_prefix(name)
            if prefix is not None:
                return self.parse_header(name, prefix, pos)
            getter = variable_getter(name)
            if getter is None:
                self.fail_pos = pos
                raise ExpansionError(
                    f'unknown variable name "{name}"' + unknown_variable_hint(name)
                )
            return Variable(name, getter), pos
        if _is_digit(c):
            number, pos = self.read_number(pos)
            return Numeric(number), pos
        if c != "{":
            raise ExpansionError("$ not followed by letter, digit, or {")
        pos += 1
        c = self.char(pos)
        if _is_digit(c):
            number, pos = self.read_number(pos)
            if self.char(pos) != "}":
                raise ExpansionError("} expected after number")
            return Numeric(number), pos + 1
        if not _is_alpha(c):
            raise ExpansionError("letter or digit expected after ${")
        name, pos = self.read_name(pos, "_-")
        item_parser = ITEM_PARSERS.get(name)
        if item_parser is not None:
            return item_parser(self, name, pos)
        if self.char(pos) == ":":
            return self.parse_operator(name, pos)
        if self.char(pos) == "}":
            getter = variable_getter(name)
            if getter is None:
                raise ExpansionError(
                    f'unknown variable in "${{{name}}}"' + unknown_variable_hint(name)
                )
            return Variable(name, getter), pos + 1
        raise ExpansionError(
            f'"${{{name}" is not a known operator (or a }} is missing in a variable reference)'
        )

    def parse_header(self, name: str, prefix: str, pos: int) -> tuple[object, int]:
        s, n = self.s, self.n
        header = name[len(prefix):]
        while pos < n and " " < s[pos] <= "~" and s[pos] != ":":
            header += s[pos]
            pos += 1
        if pos < n and s[pos] == ":":
            pos += 1
        if "}" in header:
            self.malformed_header = True
        return Header(prefix, header), pos

    def parse_operator(self, name: str, pos: int) -> tuple[object, int]:
        arg, pos = self.parse_seq(pos + 1, True)
        pos += 1
        return operators_ctx.make_operator(name, arg), pos

    # -- arguments -------------------------------------------------------------

    def parse_braced(self, pos: int, honour_dollar: bool = True) -> tuple[Seq, int]:
        """Parse ``{...}`` with *pos* at the opening brace; returns the
        position after the closing brace."""
        seq, pos = self.parse_seq(pos + 1, True, honour_dollar)
        return seq, pos + 1

    def read_subs(
        self, pos: int, most: int, least: int, check_end: bool, name: str
    ) -> tuple[list[Seq], int]:
        """Exim's ``read_subs()``: up to *most* braced arguments, at least
        *least*, then optionally the closing brace of the item."""
        args: list[Seq] = []
        pos = self.skip_space(pos)
        for i in range(most):
            if self.char(pos) != "{":
                if i < least:
                    raise ExpansionError(
                        f"Not enough arguments for '{name}' (min is {least})"
                    )
                break
            seq, pos = self.parse_braced(pos)
            args.append(seq)
            pos = self.skip_space(pos)
        if check_end:
            c = self.char(pos)
            pos += 1
            if c != "}":
                if c == "{":
                    raise ExpansionError(f"Too many arguments for '{name}' (max is {most})")
                raise ExpansionError(f"missing '}}' after '{name}'")
        return args, pos

    def curly_problem(self, where: str, pos: int) -> ExpansionError:
        if self.malformed_header:
            return ExpansionError(_MALFORMED_HEADER)
        return ExpansionError(
            "curly-bracket problem in conditional yes/no parsing: "
            f"{where}\n remaining string is '{self.remaining(pos)}'"
        )

    def parse_yesno(self, kind: str, pos: int) -> tuple[YesNo, int]:
        """The ``{yes}{no}`` tail and the item's closing brace."""
        pos = self.skip_space(pos)
        if self.char(pos) == "}":
            return YesNo(kind, None, None, False), pos + 1
        if self.char(pos) != "{":
            raise self.curly_problem("'yes' part did not start with '{'", pos)
        yes, pos = self.parse_seq(pos + 1, True)
        pos += 1
        no = None
        forced = False
        pos = self.skip_space(pos)
        if self.char(pos) == "{":
            no, pos = self.parse_seq(pos + 1, True)
            pos += 1
        elif self.char(pos) != "}":
            word, pos = self.read_name(pos, "_")
            if word != "fail":
                raise ExpansionError(f'syntax error in "{kind}" item - "fail" expected')
            forced = True
        pos = self.skip_space(pos)
        if self.char(pos) != "}":
            raise self.curly_problem("did not close with '}'", pos)
        return YesNo(kind, yes, no, forced), pos + 1

    # -- conditions -----------------------------------------------------------

    def parse_condition(self, pos: int) -> tuple[Condition, int]:
        negated = False
        while True:
            pos = self.skip_space(pos)
            if self.char(pos) == "!":
                negated = not negated
                pos += 1
            else:
                break
        c = self.char(pos)
        if c and c in "=<>":
            name = c
            pos += 1
            if self.char(pos) == "=":
                name += "="
                pos += 1
        else:
            name, pos = self.read_name(pos, "_")
        if not name:
            raise ExpansionError(
                f'condition name expected, but found "{self.s[pos:pos + 16]}"'
            )
        cond_parser = conditions.CONDITION_PARSERS.get(name)
        if cond_parser is None:
            raise ExpansionError(f'unknown condition "{name}"')
        return cond_parser(self, name, negated, pos)



_MALFORMED_HEADER = (
    "missing or misplaced { or } - could be header name not terminated by colon"
)


def _header_prefix(name: str) -> str | None:
    for prefix in _HEADER_PREFIXES:
        if name.startswith(prefix):
            return prefix
    return None


ITEM_PARSERS: dict[str, Callable[[Parser, str, int], tuple[Item, int]]] = items.ITEM_PARSERS

_CACHE: dict[str, Seq | ExpansionError] = {}
_CACHE_LIMIT = 10000


def parse(text: str) -> Seq:
    """Parse *text* (cached); raises ExpansionError for a syntax error."""
    cached = _CACHE.get(text)
    if cached is None:
        try:
            cached, _ = Parser(text).parse_seq(0, False)
        except ExpansionError as e:
            cached = e
        if len(_CACHE) >= _CACHE_LIMIT:
            _CACHE.clear()
        _CACHE[text] = cached
    if isinstance(cached, ExpansionError):
        raise type(cached)(cached.message)
    return cached


__all__ = ["Parser", "parse", "Operator", "Text"]
