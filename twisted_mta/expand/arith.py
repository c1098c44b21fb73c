"""``${eval:}`` and ``${eval10:}``: Exim's integer expression evaluator.

A recursive-descent parser over one cursor, mirroring ``eval_expr()`` in
Exim's expand.c so that results, wrap-around and the "after processing"
position in error messages are the same.  Arithmetic is signed 64-bit:
literals saturate (as ``sscanf``/``strtoll`` do), ``*`` and suffix scaling
wrap, shifts use the low six bits of the count (x86 behaviour).
"""

from __future__ import annotations

import re

from twisted_mta.expand.errors import ExpansionError

_MAX = (1 << 63) - 1
_MIN = -(1 << 63)
_HALF = _MAX // 2
_SUFFIX = {"k": 1024, "m": 1024 ** 2, "g": 1024 ** 3}
_SPACE = " \t\n\r\f\v"

# What "%lli" (auto base) and "%lld" consume at a digit.  "0x" with no hex
# digit after it is consumed by glibc's scanf and reads as 0.
_AUTO_NUMBER = re.compile(r"0[xX][0-9a-fA-F]*|0[0-7]*|[0-9]+")
_DEC_NUMBER = re.compile(r"[0-9]+")


def _wrap(n: int) -> int:
    """Reduce to a signed 64-bit value, as C arithmetic does."""
    n &= (1 << 64) - 1
    return n - (1 << 64) if n >= (1 << 63) else n


class _Parser:
    def __init__(self, text: str, decimal: bool) -> None:
        self.text = text
        self.pos = 0
        self.decimal = decimal

    def error(self, message: str) -> ExpansionError:
        return ExpansionError(
            f"error in expression evaluation: {message} "
            f'(after processing "{self.text[:self.pos]}")'
        )

    def peek(self, offset: int = 0) -> str:
        i = self.pos + offset
        return self.text[i] if i < len(self.text) else ""

    def skip_space(self) -> None:
        while self.peek() and self.peek() in _SPACE:
            self.pos += 1

    def expr(self, endket: bool) -> int:
        x = self.op_or()
        if endket:
            if self.peek() != ")":
                raise self.error("expecting closing parenthesis")
            self.pos += 1
            self.skip_space()
        elif self.pos < len(self.text):
            raise self.error("expecting operator")
        return x

    def number(self) -> int:
        self.skip_space()
        c = self.peek()
        if c.isdigit() and c.isascii():
            m = (_DEC_NUMBER if self.decimal else _AUTO_NUMBER).match(self.text, self.pos)
            assert m is not None
            digits = m.group()
            self.pos = m.end()
            if digits[:2] in ("0x", "0X"):
                n = int(digits, 0) if len(digits) > 2 else 0
            elif len(digits) > 1 and digits[0] == "0" and not self.decimal:
                n = int(digits, 8)
            else:
                n = int(digits)
            n = min(n, _MAX)
            scale = _SUFFIX.get(self.peek().lower())
            if scale:
                n = _wrap(n * scale)
                self.pos += 1
            self.skip_space()
            return n
        if c == "(":
            self.pos += 1
            return self.expr(True)
        raise self.error("expecting number or opening parenthesis")

    def unary(self) -> int:
        self.skip_space()
        op = self.peek()
        if op in ("+", "-", "~"):
            self.pos += 1
            x = self.unary()
            if op == "-":
                return _wrap(-x)
            if op == "~":
                return ~x
            return x
        return self.number()

    def mult(self) -> int:
        x = self.unary()
        while (op := self.peek()) in ("*", "/", "%"):
            self.pos += 1
            y = self.unary()
            if y == -1 and x == _MIN and op != "*":
                x = _MAX  # Exim coerces the one case that would trap
                continue
            if op == "*":
                x = _wrap(x * y)
                continue
            if y == 0:
                raise self.error("divide by zero" if op == "/" else "modulo by zero")
            q = abs(x) // abs(y)
            if (x < 0) != (y < 0):
                q = -q  # C division truncates toward zero
            x = q if op == "/" else x - q * y
        return x

    def sum(self) -> int:
        x = self.mult()
        while (op := self.peek()) in ("+", "-"):
            self.pos += 1
            y = self.mult()
            # Exim's deliberately conservative (and lopsided) overflow test.
            if x >= _HALF or (x <= -_HALF and y <= -_HALF):
                raise self.error("overflow in sum" if op == "+" else "overflow in difference")
            x = x + y if op == "+" else x - y
        return x

    def shift(self) -> int:
        x = self.sum()
        while self.peek() in ("<", ">") and self.peek(1) == self.peek():
            op = self.peek()
            self.pos += 2
            y = self.sum() & 63
            x = _wrap(x << y) if op == "<" else x >> y
        return x

    def _binary(self, op: str, operand, combine) -> int:
        x = operand()
        while self.peek() == op:
            self.pos += 1
            x = combine(x, operand())
        return x

    def op_and(self) -> int:
        return self._binary("&", self.shift, lambda a, b: a & b)

    def op_xor(self) -> int:
        return self._binary("^", self.op_and, lambda a, b: a ^ b)

    def op_or(self) -> int:
        return self._binary("|", self.op_xor, lambda a, b: a | b)


def eval_expression(text: str, decimal: bool = False) -> int:
    """Evaluate an Exim arithmetic expression (``${eval:}``; *decimal* for
    ``${eval10:}``, where ``0x`` and leading-zero octal are not recognised)."""
    return _Parser(text, decimal).expr(False)
