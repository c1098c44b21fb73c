"""Exim's expansion operators (``${op:arg}``) and the pure helpers behind
several expansion items and conditions.

Every value is a ``str`` holding one byte per character (Latin-1), so
lengths, hashes and case changes work on bytes as in Exim; case changes are
ASCII-only (C locale).  Failures raise :class:`ExpansionError` with Exim's
message text.  Behaviour follows Exim 4.96 as shipped in Debian 12 (with the
CVE-2023-42117 ``string_is_ip_address()`` rewrite, headers_charset UTF-8 and
IDNA 2008).
"""

from __future__ import annotations

import base64
import ctypes
import errno
import hashlib
import hmac
import os
import random
import re
import socket
import stat as stat_module
import warnings
from collections.abc import Callable

import idna

from twisted_mta.expand.addresses import (
    AddressError,
    extract_address,
    extract_addresses,
)
from twisted_mta.expand.arith import eval_expression
from twisted_mta.expand.errors import ExpansionError
from twisted_mta.values import interpret_escape, split_list

with warnings.catch_warnings():
    # crypt is deprecated (removed in 3.13) but is the only stdlib crypt(3).
    warnings.simplefilter("ignore", DeprecationWarning)
    try:
        import crypt as _crypt
    except ImportError:  # pragma: no cover - Python 3.13+
        _crypt = None  # type: ignore[assignment]

__all__ = [
    "EVALUATOR_OPERATORS",
    "OPERATORS",
    "condition_integer",
    "crypteq",
    "dequote",
    "extract_field",
    "extract_json",
    "extract_keyed",
    "get_operator",
    "item_hash",
    "item_hmac",
    "item_length",
    "item_listquote",
    "item_nhash",
    "item_substr",
    "item_tr",
    "listextract",
    "parse_bool",
    "split_operator_name",
    "string_compare",
    "string_is_ip_address",
]

_SPACE = " \t\n\r\f\v"
_INT64_MAX = (1 << 63) - 1
_INT64_MIN = -(1 << 63)
_LOWER = str.maketrans("ABCDEFGHIJKLMNOPQRSTUVWXYZ", "abcdefghijklmnopqrstuvwxyz")
_UPPER = str.maketrans("abcdefghijklmnopqrstuvwxyz", "ABCDEFGHIJKLMNOPQRSTUVWXYZ")

# Exim's hash alphabet really does have "rts" out of order.
_HASHCODES = "abcdefghijklmnopqrtsuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"
_PRIMES = (2, 3, 5, 7, 11, 13, 17, 19, 23, 29, 31, 37, 41, 43, 47, 53, 59, 61,
           67, 71, 73, 79, 83, 89, 97, 101, 103, 107, 109, 113)
_BASE32 = "abcdefghijklmnopqrstuvwxyz234567"
_BASE62 = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
_B64 = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
_B64_VALUE = {c: i for i, c in enumerate(_B64)}

_NON_PRINTING = re.compile(r"[^\x20-\x7e\t]")
_C_ESCAPES = {"\n": "\\n", "\r": "\\r", "\b": "\\b", "\v": "\\v", "\f": "\\f"}
_HIGH_OR_BACKSLASH = re.compile(r"[\\\x7f-\xff]")
_HEXQUOTE = re.compile(r"[^\x21-\x7e]")
_RX_META = re.compile(r"[^A-Za-z0-9]")
_QUOTE_OK = re.compile(r"[A-Za-z0-9_.\-]+")
_LOCAL_PART_OK = re.compile(r"(?!\.)(?:[A-Za-z0-9!#$%&'*+\-/=?^_`{|}~]|\.(?!\Z))+")
_DIGITS = re.compile(r"[0-9]*")
_STRTOL = re.compile(r"[ \t\n\r\f\v]*([+-]?)([0-9]*)")
_MIME_WORD_START = re.compile(r"=\?")
_SIZE_SUFFIX = {"k": 1024, "m": 1024 ** 2, "g": 1024 ** 3}

Operator = Callable[[str], str]


def _lc(s: str) -> str:
    return s.translate(_LOWER)


def _bytes(s: str) -> bytes:
    return s.encode("latin-1")


def _text(b: bytes) -> str:
    return b.decode("latin-1")


def _strtol(s: str) -> tuple[int, str]:
    """C strtol(s, &end, 10): the value (saturated to 64 bits) and the rest;
    with no digits the value is 0 and the rest is all of *s*."""
    m = _STRTOL.match(s)
    assert m is not None
    if not m.group(2):
        return 0, s
    value = int(m.group(1) + m.group(2))
    return max(_INT64_MIN, min(_INT64_MAX, value)), s[m.end():]


def _c_int(value: int) -> int:
    """Truncate to a C ``int`` as an ``(int)`` cast does."""
    value &= 0xFFFFFFFF
    return value - (1 << 32) if value >= (1 << 31) else value


# ---------------------------------------------------------------------------
# Substrings and hashes (shared by the operator and item forms)

def _substr(subject: str, value1: int, value2: int) -> str:
    """extract_substr(): *value2* < 0 means "unset"."""
    sublen = len(subject)
    if value1 < 0:
        value1 += sublen
        if value1 < 0:
            value2 = max(value2 + value1, 0)
            value1 = 0
        elif value2 < 0:
            value2 = value1
            value1 = 0
    elif value1 > sublen:
        value1, value2 = sublen, 0
    elif value2 < 0:
        value2 = sublen
    value2 = min(value2, sublen - value1)
    return subject[value1:value1 + value2]


def _hash(subject: str, value1: int, value2: int) -> str:
    """compute_hash(): *value1* characters from the first *value2* (default
    26) of Exim's hash alphabet."""
    if value2 < 0:
        value2 = 26
    elif value2 > len(_HASHCODES):
        raise ExpansionError(f'hash count "{value2}" too big')
    if value1 < 0:
        # Exim reads outside the string here (undefined behaviour).
        raise ExpansionError(f'hash length "{value1}" must not be negative')
    sublen = len(subject)
    if value1 >= sublen:
        return subject  # no hashing, so a zero count does no harm
    if value2 == 0:
        # Exim 4.96 dies with SIGFPE here.
        raise ExpansionError("hash count must not be zero")
    if value1 == 0:
        return ""
    work = [ord(c) for c in subject[:value1]]
    i = 0
    for j in range(value1, sublen):
        c = ord(subject[j])
        shift = (c + j) & 7
        work[i] = (work[i] ^ ((c << shift) | (c >> (8 - shift)))) & 0xFF
        i += 1
        if i >= value1:
            i = 0
    return "".join(_HASHCODES[b % value2] for b in work)


def _nhash(subject: str, value1: int, value2: int) -> str:
    """compute_nhash(): ``n`` or, with *value2* >= 0, ``n/m``."""
    if value1 == 0 or value2 == 0:
        # Exim 4.96 dies with SIGFPE (division by zero); fail instead.
        raise ExpansionError("division by zero in nhash")
    total = 0
    i = 0
    for c in subject:
        if i == 0:
            i = len(_PRIMES) - 1
        total += _PRIMES[i] * ord(c)
        i -= 1
    total &= (1 << 64) - 1
    if value2 < 0:
        return str(total % (value1 & ((1 << 64) - 1)))
    total %= (value1 * value2) & ((1 << 64) - 1)
    return f"{total // value2}/{total % value2}"


def _underscore_numbers(name: str, arg: str, is_length: bool) -> tuple[int, int]:
    """Read ``N`` or ``N_M`` after the operator name, as Exim's loop does
    (including its quirks: ``substr_`` is valid, ``substr_1_`` is not)."""
    sign = 1
    values = [0, -1]
    which = 0
    if is_length:
        which, values[1] = 1, 0
    elif name[0] == "s" and arg.startswith("-"):
        sign = -1
        arg = arg[1:]
    i = 0
    while i < len(arg):
        c = arg[i]
        if i != 0 and c == "_" and which == 0:
            which, values[1] = 1, 0
            if i + 1 < len(arg):
                i += 1
        elif not ("0" <= c <= "9"):
            raise ExpansionError(f'non-digit after underscore in "{name}"')
        else:
            values[which] = values[which] * 10 + ord(c) - 48
            i += 1
    return _c_int(values[0] * sign), _c_int(values[1])


def _numeric_op(kind: str, name: str, arg: str | None) -> Operator:
    if arg is None:
        raise ExpansionError(f"missing values after {name}")
    value1, value2 = _underscore_numbers(name, arg, kind == "length")
    if kind == "hash":
        return lambda s: _hash(s, value1, value2)
    if kind == "nhash":
        return lambda s: _nhash(s, value1, value2)
    return lambda s: _substr(s, value1, value2)


def _item_numbers(item: str, args: list[str | None]) -> list[int]:
    values = []
    for i, text in enumerate(args):
        if text is None:
            values.append(0 if i == 0 else -1)
            continue
        value, rest = _strtol(text)
        value = _c_int(value)
        if rest or (i != 0 and value < 0):
            kind = " positive" if i != 0 else ""
            raise ExpansionError(f'"{text}" is not a{kind} number (in "{item}" expansion)')
        values.append(value)
    return values


def item_length(n: str, s: str) -> str:
    """``${length{n}{s}}``."""
    _, length = _item_numbers("length", [None, n])
    return _substr(s, 0, length)


def item_substr(start: str, length: str | None, s: str) -> str:
    """``${substr{start}{length}{s}}`` (length None when only two arguments
    were given); a negative start counts from the end."""
    value1, value2 = _item_numbers("substr", [start, length])
    return _substr(s, value1, value2)


def item_hash(n: str, m: str | None, s: str) -> str:
    """``${hash{n}{m}{s}}`` (m None for the two-argument form)."""
    value1, value2 = _item_numbers("hash", [n, m])
    return _hash(s, value1, value2)


def item_nhash(n: str, m: str | None, s: str) -> str:
    """``${nhash{n}{m}{s}}``; a zero divisor fails rather than crash."""
    value1, value2 = _item_numbers("nhash", [n, m])
    return _nhash(s, value1, value2)


def item_hmac(algo: str, key: str, data: str) -> str:
    """``${hmac{md5|sha1}{key}{data}}`` in lower-case hex."""
    if algo not in ("md5", "sha1"):
        raise ExpansionError(f'hmac algorithm "{algo}" is not recognised')
    return hmac.new(_bytes(key), _bytes(data), algo).hexdigest()


def item_tr(subject: str, from_chars: str, to_chars: str) -> str:
    """``${tr{subject}{from}{to}}``: the last occurrence in *from* decides,
    and a short *to* repeats its last character."""
    if not to_chars:
        return subject
    last = len(to_chars) - 1
    table = {c: to_chars[min(i, last)] for i, c in enumerate(from_chars)}
    return "".join(table.get(c, c) for c in subject)


def item_listquote(sep: str, s: str) -> str:
    """``${listquote{sep}{s}}``: double the separator; empty gives a space."""
    if not s:
        return " "
    if not sep:
        return s
    return s.replace(sep[0], sep[0] * 2)


# ---------------------------------------------------------------------------
# extract / listextract

def _field_number(text: str) -> int | None:
    """The trimmed text as ``-?digits`` (Exim's test), else None."""
    p = text.strip(_SPACE)
    negative = p.startswith("-")
    digits = p[1:] if negative else p
    if _DIGITS.fullmatch(digits) is None:
        return None
    value = _c_int(int(digits)) if digits else 0
    return -value if negative else value


def extract_field(n: str, seps: str, s: str) -> str | None:
    """``${extract{n}{seps}{s}}``: field *n* (1-based, negative from the
    end, 0 the whole string) of *s* split on any character of *seps*;
    None when there are not enough fields."""
    field = _field_number(n)
    if field is None:
        raise ExpansionError('first argument of "extract" must be numeric')
    if field == 0:
        return s
    if seps:
        fields = re.split("[" + re.escape(seps) + "]", s)
    else:
        fields = [s]
    if field > 0:
        return fields[field - 1] if field <= len(fields) else None
    return fields[field] if -field <= len(fields) else None


def dequote(s: str, pos: int = 0) -> tuple[str, int]:
    """string_dequote(): a word up to white space, or a ``"quoted"`` string
    with backslash escapes; returns the text and the position after it."""
    n = len(s)
    if pos >= n or s[pos] != '"':
        end = pos
        while end < n and s[end] not in _SPACE:
            end += 1
        return s[pos:end], end
    out: list[str] = []
    i = pos + 1
    while i < n and s[i] != '"':
        if s[i] == "\\":
            ch, i = interpret_escape(s, i)
            out.append(ch)
        else:
            out.append(s[i])
            i += 1
    if i < n:
        i += 1
    return "".join(out), i


def extract_keyed(key: str, s: str) -> str | None:
    """``${extract{key}{s}}``: the value of ``key=value`` (blanks allowed
    round ``=``, quoted values dequoted, key caseless); None if absent."""
    lkey = _lc(key)
    n = len(s)
    i = 0
    while i < n and s[i] in _SPACE:
        i += 1
    while i < n:
        start = i
        while i < n and s[i] != "=" and s[i] not in _SPACE:
            i += 1
        dkey = s[start:i]
        while i < n and s[i] in _SPACE:
            i += 1
        if i < n and s[i] == "=":
            i += 1
            while i < n and s[i] in _SPACE:
                i += 1
        data, i = dequote(s, i)
        if _lc(dkey) == lkey:
            return data
        while i < n and s[i] in _SPACE:
            i += 1
    return None


def _dewrap_missing(s: str, wrap: str) -> str:
    """The character dewrap() reports missing: the opener if the text does
    not start with it, else the closer."""
    return wrap[1] if s.lstrip(_SPACE).startswith(wrap[0]) else wrap[0]


def _dewrap(s: str, wrap: str) -> str | None:
    """dewrap(): the text inside the *wrap* pair after leading blanks; a
    backslash protects the next character (and stays)."""
    p = 0
    while p < len(s) and s[p] in _SPACE:
        p += 1
    if p >= len(s) or s[p] != wrap[0]:
        return None
    quotes = wrap[0] == wrap[1]
    depth = 0
    start = p = p + 1
    while p < len(s):
        c = s[p]
        if c == "\\":
            p += 1
        elif not quotes and c == wrap[0]:
            depth += 1
        elif c == wrap[1]:
            if depth == 0:
                return s[start:p]
            depth -= 1
        p += 1
    return None


def _json_items(text: str):
    """json_nextinlist(): top-level comma-separated elements."""
    i, n = 0, len(text)
    while True:
        while i < n and text[i] in _SPACE:
            i += 1
        start = i
        arrays = objects = 0
        while i < n and (text[i] != "," or arrays or objects):
            c = text[i]
            if c == "[":
                arrays += 1
            elif c == "]":
                arrays -= 1
            elif c == "{":
                objects += 1
            elif c == "}":
                objects -= 1
            i += 1
        if i == start:
            return
        yield text[start:i]
        if i < n:
            i += 1


def extract_json(key: str, s: str, strip_quotes: bool) -> str | None:
    """``${extract json{key}{s}}`` (*strip_quotes* for ``jsons``).  A numeric
    key selects a 1-based array element, otherwise an object member; None
    when missing.  Values are returned as JSON text (strings keep their
    quotes unless *strip_quotes*)."""
    field = _field_number(key)
    wrap = "[]" if field is not None else "{}"
    body = _dewrap(s, wrap)
    if body is None:
        kind = "array" if field is not None else "object"
        raise ExpansionError(f"missing '{_dewrap_missing(s, wrap)}' wrapping {kind} for extract json")
    value: str | None = None
    if field is not None:
        if field <= 0:
            raise ExpansionError('first argument of "extract" must be greater than zero')
        for item in _json_items(body):
            field -= 1
            if field == 0:
                value = item.rstrip(_SPACE)
                break
    else:
        wanted = key.strip(_SPACE)
        for item in _json_items(body):
            name = _dewrap(item, '""')
            if name is None:
                raise ExpansionError("missing '\"' wrapping string key for extract json")
            if name == wanted:
                rest = item[item.index('"') + len(name) + 2:].lstrip(_SPACE)
                if not rest.startswith(":"):
                    raise ExpansionError("missing object value-separator for extract json")
                value = rest[1:].lstrip(_SPACE)
                break
    if strip_quotes and value is not None:
        stripped = _dewrap(value, '""')
        if stripped is None:
            raise ExpansionError(
                "missing '\"' wrapping string result for extract jsons"
            )
        value = stripped
    return value


def listextract(n: str, list_text: str) -> str | None:
    """``${listextract{n}{list}}``: 1-based, negative from the end; None
    when out of range."""
    text = n.strip(_SPACE)
    if not text:
        raise ExpansionError('first argument of "listextract" must not be empty')
    field = _field_number(text)
    if field is None:
        raise ExpansionError('first argument of "listextract" must be numeric')
    items = split_list(list_text)
    if field < 0:
        field += len(items) + 1
        if field <= 0:
            return None
    if field == 0 or field > len(items):
        return None
    return items[field - 1]


# ---------------------------------------------------------------------------
# Conditions

def _b64encode(b: bytes) -> str:
    return _text(base64.b64encode(b))


def crypteq(plain: str, hashed: str) -> bool:
    """The ``crypteq`` condition: ``{md5}`` and ``{sha1}`` in hex (caseless)
    or base64, ``{crypt}``/``{crypt16}``, or bare crypt(3)."""
    lower = _lc(hashed)
    for prefix, algo, hex_len, b64_len in (("{md5}", "md5", 32, 24), ("{sha1}", "sha1", 40, 28)):
        if lower.startswith(prefix):
            coded = hashed[len(prefix):]
            digest = hashlib.new(algo, _bytes(plain)).digest()
            if len(coded) == b64_len:
                return _b64encode(digest) == coded
            if len(coded) == hex_len:
                return digest.hex() == _lc(coded)
            return False
    use_crypt16 = False
    if lower.startswith("{crypt}"):
        hashed = hashed[7:]
    elif lower.startswith("{crypt16}"):
        hashed = hashed[9:]
        use_crypt16 = True
    elif hashed.startswith("{"):
        raise ExpansionError(f'unknown encryption mechanism in "{hashed}"')
    if len(hashed) < 2:
        return False
    coded = _crypt16(plain, hashed) if use_crypt16 else _crypt3(plain, hashed)
    return coded == hashed


def _crypt3(key: str, salt: str) -> str | None:
    if _crypt is None:  # pragma: no cover - Python 3.13+
        raise ExpansionError("crypt error: crypt() is not available\n")
    try:
        # crypt(3) works on bytes; the C library sees the Latin-1 bytes.
        return _crypt.crypt(key, salt)
    except OSError:
        return None  # EINVAL: an invalid salt just fails to match


def _crypt16(key: str, salt: str) -> str | None:
    """Exim's own crypt16(): DES over the first eight and next eight bytes."""
    first = _crypt3(key, salt)
    if first is None:
        return None
    result = first[:13]
    if len(key) > 8:
        second = _crypt3(key[8:], result[2:4])
        if second is None:
            return None
        result += second[2:13]
    return result


def parse_bool(s: str, lax: bool) -> bool:
    """The ``bool`` / ``bool_lax`` conditions."""
    t = s.strip(_SPACE)
    if not t:
        return False
    digits = t[1:] if t[0] == "-" else t
    if _DIGITS.fullmatch(digits):
        if lax and len(t) > 1:
            return True
        value, _ = _strtol(t)
        return _c_int(value) != 0
    if _lc(t) in ("true", "yes"):
        return True
    if _lc(t) in ("false", "no") or lax:
        return lax and _lc(t) not in ("false", "no")
    raise ExpansionError(f'unrecognised boolean value "{t}"')


def condition_integer(s: str, non_negative: bool = False, empty_is_zero: bool = True) -> int:
    """An operand of a numeric condition (``<`` ``=`` ...) or ``randint``:
    decimal with an optional K/M/G suffix; blank means 0
    (expanded_string_integer()).  The numeric conditions also cast an empty
    operand to 0 before calling it; ``randint`` does not."""
    if not s and empty_is_zero:
        return 0
    t = s.lstrip(_SPACE)
    if not t and s:
        return 0  # all blanks: Exim keeps the pre-4.64 behaviour
    m = _STRTOL.match(t)
    assert m is not None
    if not m.group(2):
        raise ExpansionError(f'integer expected but "{t}" found')
    value = int(m.group(1) + m.group(2))
    if value < 0 and non_negative:
        raise ExpansionError(f'non-negative integer expected but "{t}" found')
    rest = t[m.end():]
    overflow = not _INT64_MIN <= value <= _INT64_MAX
    scale = _SIZE_SUFFIX.get(rest[:1].lower())
    if scale:
        value *= scale
        overflow = overflow or not _INT64_MIN <= value <= _INT64_MAX
        rest = rest[1:]
    if overflow:
        raise ExpansionError(f'absolute value of integer "{t}" is too large (overflow)')
    if rest.strip(_SPACE):
        raise ExpansionError(f'invalid integer "{t}"')
    return value


_COMPARE = {
    "eq": lambda a, b: a == b,
    "lt": lambda a, b: a < b,
    "le": lambda a, b: a <= b,
    "gt": lambda a, b: a > b,
    "ge": lambda a, b: a >= b,
}


def string_compare(op: str, a: str, b: str) -> bool:
    """``eq lt le gt ge`` and their caseless ``i`` forms: byte order,
    ASCII-only case folding (strcmpic folds to lower case)."""
    if op.endswith("i"):
        return _COMPARE[op[:-1]](_lc(a), _lc(b))
    return _COMPARE[op](a, b)


# ---------------------------------------------------------------------------
# IP addresses

def string_is_ip_address(s: str, allow_mask: bool = False) -> tuple[int, int]:
    """Exim's string_is_ip_address() (post CVE-2023-42117, inet_pton based).

    Returns (4, 6 or 0, offset of the ``/`` or 0).  A mask is accepted only
    if *allow_mask*; a ``%scope`` only on IPv6."""
    mask_offset = 0
    end = len(s)
    slash = s.find("/")
    if slash >= 0:
        if not allow_mask:
            return 0, 0
        value, rest = _strtol(s[slash + 1:])
        if rest or value < 0:
            return 0, 0
        mask_offset = end = slash
    percent = s.find("%")
    if percent >= 0:
        if slash >= 0:
            return 0, 0
        if any(not (c.isascii() and (c.isalnum() or (c.isprintable() and not c.isspace())))
               for c in s[percent + 1:]):
            return 0, 0
        end = percent
    addr = s[:end]
    family = socket.AF_INET6 if ":" in addr else socket.AF_INET
    try:
        socket.inet_pton(family, addr)
    except (OSError, UnicodeError, ValueError):
        return 0, mask_offset
    if family == socket.AF_INET:
        return (0, mask_offset) if percent >= 0 else (4, mask_offset)
    return 6, mask_offset


def _ip_words(addr: str) -> tuple[int, bytes]:
    """(4 or 6, packed address) ignoring any /mask or %scope."""
    addr = re.split("[/%]", addr, maxsplit=1)[0]
    if ":" in addr:
        return 6, socket.inet_pton(socket.AF_INET6, addr)
    return 4, socket.inet_pton(socket.AF_INET, addr)


def _ipv6_compress(packed: bytes) -> str:
    """ipv6_nmtoa(): collapse the first longest run of zero groups, even a
    run of one (unlike RFC 5952); all zeros famously gives ``:``."""
    groups = [int.from_bytes(packed[i:i + 2], "big") for i in range(0, 16, 2)]
    best_start, best_len = -1, 0
    i = 0
    while i < 8:
        if groups[i] == 0:
            j = i
            while j < 8 and groups[j] == 0:
                j += 1
            if j - i > best_len:
                best_start, best_len = i, j - i
            i = j
        else:
            i += 1
    text = [f"{g:x}" for g in groups]
    if best_start < 0:
        return ":".join(text)
    if best_len == 8:
        return ":"
    left = ":".join(text[:best_start])
    right = ":".join(text[best_start + best_len:])
    return f"{left}::{right}"


def _ipv6_full(packed: bytes, sep: str) -> str:
    return sep.join(packed[i:i + 2].hex() for i in range(0, 16, 2))


def _op_mask(s: str, normalised: bool) -> str:
    family, mask_offset = string_is_ip_address(s, True)
    if family == 0:
        raise ExpansionError(f'"{s}" is not an IP address')
    if mask_offset == 0:
        raise ExpansionError(f'missing mask value in "{s}"')
    mask, rest = _strtol(s[mask_offset + 1:])
    if rest or mask < 0 or mask > (32 if family == 4 else 128):
        raise ExpansionError(f'mask value too big in "{s}"')
    _, packed = _ip_words(s[:mask_offset])
    bits = len(packed) * 8
    value = int.from_bytes(packed, "big") & (((1 << bits) - 1) ^ ((1 << (bits - mask)) - 1))
    masked = value.to_bytes(len(packed), "big")
    if family == 4:
        return f"{socket.inet_ntop(socket.AF_INET, masked)}/{mask}"
    if normalised:
        return f"{_ipv6_compress(masked)}/{mask}"
    return f"{_ipv6_full(masked, '.')}/{mask}"


def _ipv6_packed(s: str) -> bytes:
    family, _ = string_is_ip_address(s)
    if family == 0:
        raise ExpansionError(f'"{s}" is not an IP address')
    kind, packed = _ip_words(s)
    return packed if kind == 6 else b"\0" * 10 + b"\xff\xff" + packed


def _op_reverse_ip(s: str) -> str:
    family, _ = string_is_ip_address(s, True)
    if family == 0:
        raise ExpansionError(f"reverse_ip() not given an IP address [{s}]")
    s = s.removeprefix("::ffff:")
    kind, packed = _ip_words(s)
    if kind == 4:
        return ".".join(str(b) for b in reversed(packed))
    return ".".join(reversed(packed.hex()))


# ---------------------------------------------------------------------------
# Encodings

def _strtoul(s: str) -> tuple[int, str]:
    """C strtoul(s, &end, 10) on a 64-bit system: a magnitude beyond 2**64-1
    saturates to ULONG_MAX, then a leading minus negates modulo 2**64."""
    m = _STRTOL.match(s)
    assert m is not None
    if not m.group(2):
        return 0, s
    value = int(m.group(2))
    if value > (1 << 64) - 1:
        value = (1 << 64) - 1
    elif m.group(1) == "-":
        value = -value & ((1 << 64) - 1)
    return value, s[m.end():]


def _op_base32(s: str) -> str:
    value, rest = _strtoul(s)
    if rest:
        raise ExpansionError(f'argument for base32 operator is "{s}", which is not a decimal number')
    out = []
    while value:
        out.append(_BASE32[value & 31])
        value >>= 5
    return "".join(reversed(out))


def _decode_number(s: str, alphabet: str, base_name: str) -> str:
    """A number written in *alphabet*, wrapped to a signed 64-bit value as
    Exim's C code does."""
    value = 0
    for c in s:
        i = alphabet.find(c)
        if i < 0:
            raise ExpansionError(
                f'argument for {base_name}d operator is "{s}", which is not a base '
                f"{len(alphabet)} number"
            )
        value = (value * len(alphabet) + i) & ((1 << 64) - 1)
    return str(value - (1 << 64) if value >= (1 << 63) else value)


def _op_base32d(s: str) -> str:
    return _decode_number(s, _BASE32, "base32")


def _op_base62(s: str) -> str:
    value, rest = _strtoul(s)
    if rest:
        raise ExpansionError(f'argument for base62 operator is "{s}", which is not a decimal number')
    out = []
    for _ in range(6):
        out.append(_BASE62[value % 62])
        value //= 62
    return "".join(reversed(out))


def _op_base62d(s: str) -> str:
    return _decode_number(s, _BASE62, "base62")


def _b64decode(s: str) -> str | None:
    """Exim's b64decode(): blanks ignored, padding required; None if bad."""
    chars = [c for c in s if c not in _SPACE]
    out = bytearray()
    i, n = 0, len(chars)
    while i < n:
        quad = chars[i:i + 4]
        i += 4
        if len(quad) < 2 or quad[0] not in _B64_VALUE or quad[1] not in _B64_VALUE:
            return None
        x, y = _B64_VALUE[quad[0]], _B64_VALUE[quad[1]]
        out.append(((x << 2) | (y >> 4)) & 0xFF)
        if len(quad) < 3:
            return None
        if quad[2] == "=":
            if len(quad) < 4 or quad[3] != "=" or i < n:
                return None
            break
        if quad[2] not in _B64_VALUE:
            return None
        x = _B64_VALUE[quad[2]]
        out.append(((y << 4) | (x >> 2)) & 0xFF)
        if len(quad) < 4:
            return None
        if quad[3] == "=":
            if i < n:
                return None
            break
        if quad[3] not in _B64_VALUE:
            return None
        out.append(((x << 6) | _B64_VALUE[quad[3]]) & 0xFF)
    return _text(bytes(out))


def _op_base64d(s: str) -> str:
    decoded = _b64decode(s)
    if decoded is None:
        raise ExpansionError(f'string "{s}" is not well-formed for "base64d" operator')
    return decoded.split("\0", 1)[0]  # the result is a C string


def _op_hex2b64(s: str) -> str:
    if any(c not in "0123456789abcdefABCDEF" for c in s):
        raise ExpansionError(f'"{s}" is not a hex string')
    if len(s) % 2:
        raise ExpansionError(f'"{s}" contains an odd number of characters')
    return _b64encode(bytes.fromhex(s))


def _escape(s: str) -> str:
    """string_printing(): C escapes or ``\\ooo`` for non-printing bytes."""
    return _NON_PRINTING.sub(lambda m: _C_ESCAPES.get(m.group(), f"\\{ord(m.group()):03o}"), s)


def _quote(s: str, local_part: bool) -> str:
    ok = _LOCAL_PART_OK if local_part else _QUOTE_OK
    if s and ok.fullmatch(s):
        return s
    body = s.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n").replace("\r", "\\r")
    return f'"{body}"'


def _rfc2047_encode(s: str, charset: str = "UTF-8") -> str:
    """parse_quote_2047(): Q-encode if anything needs it, splitting words
    longer than 67 characters (but not inside a two-byte pair)."""
    header = f"=?{charset}?Q?"
    out: list[str] = [header]
    # Exim measures from the end of the first header but from the start of
    # later ones, so the first word holds 10 more characters.
    length = line_start = len(header)
    coded = False
    first_byte = False
    for ch in s:
        if length - line_start > 67 and not first_byte:
            out.append("?= ")
            length += 3
            line_start = length
            out.append(header)
            length += len(header)
        o = ord(ch)
        if o < 33 or o > 126 or ch in "?=()<>@,;:\\\".[]_":
            if ch == " ":
                out.append("_")
                length += 1
                first_byte = False
            else:
                out.append(f"={o:02X}")
                length += 3
                coded = True
                first_byte = not first_byte
        else:
            out.append(ch)
            length += 1
            first_byte = False
    if not coded:
        return s
    out.append("?=")
    return "".join(out)


def _qp_decode(s: str) -> str | None:
    out: list[str] = []
    i, n = 0, len(s)
    while i < n:
        c = s[i]
        i += 1
        if c == "_":
            out.append(" ")
        elif c == "=":
            pair = s[i:i + 2]
            if len(pair) < 2 or any(h not in "0123456789abcdefABCDEF" for h in pair):
                return None
            out.append(chr(int(pair, 16)))
            i += 2
        elif c in " \t":
            return None
        else:
            out.append(c)
    return "".join(out)


def _next_mime_word(s: str, pos: int) -> tuple[int, int, str, str] | None:
    """decode_mimeword(): (start, end, charset, decoded) of the next valid
    encoded word at or after *pos*."""
    while True:
        m = _MIME_WORD_START.search(s, pos)
        if m is None:
            return None
        start = m.start()
        q1 = s.find("?", start + 2)
        q2 = s.find("?", q1 + 1) if q1 >= 0 else -1
        end = s.find("?=", q2 + 1) if q2 >= 0 else -1
        if q1 < 0 or q2 < 0 or end < 0:
            return None
        pos = start + 2
        if end - start > 73 or q2 - q1 != 2:
            continue
        encoding = s[q1 + 1].upper()
        data = s[q2 + 1:end]
        decoded = _b64decode(data) if encoding == "B" else _qp_decode(data) if encoding == "Q" else None
        if decoded is not None:
            return start, end + 2, s[start + 2:q1], decoded


def _load_iconv():
    """glibc's iconv_open()/iconv()/iconv_close() through ctypes, or None."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        funcs = (libc.iconv_open, libc.iconv, libc.iconv_close)
    except (OSError, AttributeError):  # pragma: no cover - not glibc
        return None
    funcs[0].restype = ctypes.c_void_p
    funcs[0].argtypes = [ctypes.c_char_p, ctypes.c_char_p]
    funcs[1].restype = ctypes.c_size_t
    funcs[1].argtypes = [ctypes.c_void_p] + [ctypes.c_void_p] * 4
    funcs[2].argtypes = [ctypes.c_void_p]
    return funcs


_ICONV = _load_iconv()
_ICONV_FAILED = ctypes.c_void_p(-1).value


def _iconv_convert(raw: bytes, charset: str) -> bytes | int:
    """rfc2047_decode()'s translation of one word to UTF-8: converted output
    until iconv() stalls, then the rest verbatim.  An ``int`` result is the
    errno of a failed iconv_open()."""
    name = _bytes(charset).split(b"\0", 1)[0]
    if _ICONV is None:  # pragma: no cover - fall back to Python's codecs
        try:
            text = raw.decode(name.decode("latin-1"))
        except LookupError:
            return errno.EINVAL
        except UnicodeDecodeError as e:
            return raw[:e.start].decode(name.decode("latin-1")).encode("utf-8") + raw[e.start:]
        return text.encode("utf-8")
    iconv_open, iconv, iconv_close = _ICONV
    cd = iconv_open(b"UTF-8", name)
    if cd is None or cd == _ICONV_FAILED:
        return ctypes.get_errno()
    try:
        inbuf = ctypes.create_string_buffer(raw, len(raw))
        inptr = ctypes.c_void_p(ctypes.addressof(inbuf))
        inleft = ctypes.c_size_t(len(raw))
        outbuf = ctypes.create_string_buffer(256)
        out = bytearray()
        while inleft.value > 0:
            outptr = ctypes.c_void_p(ctypes.addressof(outbuf))
            outleft = ctypes.c_size_t(256)
            iconv(cd, ctypes.byref(inptr), ctypes.byref(inleft), ctypes.byref(outptr),
                  ctypes.byref(outleft))
            if outleft.value == 256:  # no output: copy the rest untranslated
                done = len(raw) - inleft.value
                out += raw[done:]
                break
            out += outbuf.raw[:256 - outleft.value]
        return bytes(out)
    finally:
        iconv_close(cd)


def _op_rfc2047d(s: str) -> str:
    word = _next_mime_word(s, 0)
    if word is None:
        return s
    out: list[str] = []
    error = None
    pos = 0
    while word is not None:
        start, end, charset, decoded = word
        out.append(s[pos:start])
        if _lc(charset) != "utf-8":  # headers_charset
            converted = _iconv_convert(_bytes(decoded), charset)
            if isinstance(converted, int):
                # Exim carries on untranslated; the last such error wins.
                error = (f'iconv_open("UTF-8", "{charset}") failed: {os.strerror(converted)}'
                         + (" (maybe unsupported conversion)" if converted == errno.EINVAL else ""))
            else:
                decoded = _text(converted)
        out.append(decoded.replace("\0", "?"))
        pos = end
        word = _next_mime_word(s, pos)
        if word is not None and not s[pos:word[0]].strip(_SPACE):
            pos = word[0]  # blanks between encoded words vanish
    if error is not None:
        raise ExpansionError(error)
    out.append(s[pos:])
    return "".join(out)


def _op_from_utf8(s: str) -> str:
    """GETUTF8INC over the bytes; code points above 255 become ``_``."""
    out: list[str] = []
    i, n = 0, len(s)
    while i < n:
        c = ord(s[i])
        i += 1
        if c & 0xC0 == 0xC0:
            extra = (1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1,
                     1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1,
                     2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2,
                     3, 3, 3, 3, 3, 3, 3, 3, 4, 4, 4, 4, 5, 5, 5, 5)[c & 0x3F]
            shift = 6 * extra
            c = (c & (0xFF, 0x1F, 0x0F, 0x07, 0x03, 0x01)[extra]) << shift
            for _ in range(extra):
                shift -= 6
                if i < n:
                    c |= (ord(s[i]) & 0x3F) << shift
                i += 1
        out.append(chr(c) if c <= 255 else "_")
    return "".join(out)


def _op_utf8clean(s: str) -> str:
    """Replace each malformed UTF-8 sequence with ``?``, as Exim does."""
    out: list[str] = []
    seq: list[str] = []
    bytes_left = 0
    codepoint = 0
    for ch in s:
        c = ord(ch)
        bad = 0
        if bytes_left:
            if c & 0xC0 != 0x80:
                bad = 1
            else:
                codepoint = (codepoint << 6) | (c & 0x3F)
                seq.append(ch)
                bytes_left -= 1
                if bytes_left == 0:
                    if codepoint > 0x10FFFF or codepoint & 0x1FF800 == 0xD800:
                        bad = -1  # beyond RFC 3629, or a UTF-16 surrogate
                    else:
                        out.extend(seq)
                        seq = []
        else:
            if not c & 0x80:
                out.append(ch)
                continue
            if c & 0xE0 == 0xC0:
                if c in (0xC0, 0xC1):
                    bad = -1
                else:
                    bytes_left, codepoint = 1, c & 0x1F
            elif c & 0xF0 == 0xE0:
                bytes_left, codepoint = 2, c & 0x0F
            elif c & 0xF8 == 0xF0:
                bytes_left, codepoint = 3, c & 0x07
            else:
                bad = -1
            seq = [ch]
        if bad:
            bytes_left = 0
            seq = []
            out.append("?")
            if bad == 1 and not c & 0x80:
                out.append(ch)
    if bytes_left:
        out.append("?")
    return "".join(out)


def _utf8(s: str) -> str:
    """Decode byte-per-character text as UTF-8 (strictly)."""
    return _bytes(s).decode("utf-8")


def _idna_error(direction: str, s: str, reason: str) -> ExpansionError:
    return ExpansionError(f"error converting {direction} ({_escape(s)}) to {'alabel' if direction == 'utf8' else 'utf8'}: {reason}")


def _load_idn():
    """libidn2's idn2_lookup_u8() and libidn's punycode_decode(), the
    libraries Debian's Exim uses, through ctypes; None where missing."""
    try:
        idn2 = ctypes.CDLL("libidn2.so.0")
        idn = ctypes.CDLL("libidn.so.12")
        libc = ctypes.CDLL(None)
        funcs = (idn2.idn2_lookup_u8, idn2.idn2_strerror, idn.punycode_decode,
                 idn.punycode_strerror, idn.stringprep_ucs4_to_utf8, libc.free)
    except (OSError, AttributeError):  # pragma: no cover - libraries absent
        return None
    funcs[0].argtypes = [ctypes.c_char_p, ctypes.POINTER(ctypes.c_void_p), ctypes.c_int]
    funcs[0].restype = ctypes.c_int
    funcs[1].argtypes = [ctypes.c_int]
    funcs[1].restype = ctypes.c_char_p
    funcs[2].argtypes = [ctypes.c_size_t, ctypes.c_char_p, ctypes.POINTER(ctypes.c_size_t),
                         ctypes.c_void_p, ctypes.c_void_p]
    funcs[2].restype = ctypes.c_int
    funcs[3].argtypes = [ctypes.c_int]
    funcs[3].restype = ctypes.c_char_p
    funcs[4].argtypes = [ctypes.c_void_p, ctypes.c_ssize_t, ctypes.c_void_p,
                         ctypes.POINTER(ctypes.c_size_t)]
    funcs[4].restype = ctypes.c_void_p
    funcs[5].argtypes = [ctypes.c_void_p]
    return funcs


_IDN = _load_idn()
_IDN2_NFC_INPUT = 1


def _op_domain_to_alabel(s: str) -> str:
    if s.isascii():
        return s
    if _IDN is not None:
        lookup, strerror, *_rest, free = _IDN
        out = ctypes.c_void_p()
        rc = lookup(_bytes(_lc(s)).split(b"\0", 1)[0], ctypes.byref(out), _IDN2_NFC_INPUT)
        if rc != 0:
            raise _idna_error("utf8", s, _text(strerror(rc)))
        try:
            return _text(ctypes.string_at(out.value))
        finally:
            free(out)
    try:  # pragma: no cover - without libidn2
        return idna.encode(_utf8(_lc(s)), uts46=False).decode("ascii")
    except UnicodeDecodeError:
        raise _idna_error("utf8", s, "string encoding error") from None
    except idna.IDNAError as e:
        raise _idna_error("utf8", s, _text(str(e).encode("utf-8"))) from None


def _punycode_decode(label: str, s: str) -> str:
    """string_localpart_alabel_to_utf8_(): punycode-decode what follows
    the ``xn--`` prefix."""
    if _IDN is not None:
        _lookup, _strerror, decode, strerror, to_utf8, free = _IDN
        data = _bytes(label[4:]).split(b"\0", 1)[0]
        buf = (ctypes.c_uint32 * (len(data) + 1))()
        n = ctypes.c_size_t(len(data))
        rc = decode(len(data), data, ctypes.byref(n), buf, None)
        if rc != 0:
            raise _idna_error("alabel", s, _text(strerror(rc)))
        written = ctypes.c_size_t(0)
        out = to_utf8(buf, n.value, None, ctypes.byref(written))
        if not out:
            return ""
        try:
            return _text(ctypes.string_at(out, written.value))
        finally:
            free(out)
    try:  # pragma: no cover - without libidn
        return _text(label[4:].encode("ascii").decode("punycode").encode("utf-8"))
    except (UnicodeError, ValueError):
        raise _idna_error("alabel", s, "Invalid input") from None


def _op_domain_from_alabel(s: str) -> str:
    labels = split_list(f"<.{s}")
    return ".".join(_punycode_decode(lb, s) if lb.startswith("xn--") else lb for lb in labels)


def _op_localpart_to_alabel(s: str) -> str:
    if s.isascii():
        return s
    try:
        return "xn--" + _utf8(s).encode("punycode").decode("ascii")
    except UnicodeDecodeError:
        raise _idna_error("utf8", s, "l_u2a: bad UTF-8 input") from None


def _op_localpart_from_alabel(s: str) -> str:
    if not s.startswith("xn--"):
        raise _idna_error("alabel", s, "bad alabel prefix")
    return _punycode_decode(s, s)


# ---------------------------------------------------------------------------
# Numbers and times

def _op_eval(decimal: bool) -> Operator:
    return lambda s: str(eval_expression(s, decimal))


_TIME_COMPONENT = re.compile(r"([0-9]+)([wdhms])")
_TIME_UNIT = {"w": 604800, "d": 86400, "h": 3600, "m": 60, "s": 1}


def _op_time_eval(s: str) -> str:
    """readconf_readtime(): each number is read by sscanf("%d") (a long,
    saturated, then cut to an int), the sum wraps as a C int, and a negative
    total is an error."""
    total = 0
    pos = 0
    while True:
        m = _TIME_COMPONENT.match(s, pos)
        if m is None:
            total = -1
            break
        total = _c_int(total + _c_int(min(int(m.group(1)), _INT64_MAX)) * _TIME_UNIT[m.group(2)])
        pos = m.end()
        if pos == len(s):
            break
    if total < 0:
        raise ExpansionError(f'string "{s}" is not an Exim time interval in "time_eval" operator')
    return str(total)


def _op_time_interval(s: str) -> str:
    m = _DIGITS.match(s)
    assert m is not None
    if m.end() != len(s):
        raise ExpansionError(f'string "{s}" is not a positive number in "time_interval" operator')
    t = _c_int(int(s)) if s else 0
    if t == -(1 << 31):
        # readconf_printtime() negates INT_MIN, which overflows; the build
        # of Exim 4.96 being matched then prints this.
        return "-5d3h14m8s"
    sign = ""
    if t < 0:
        sign, t = "-", -t
    parts = []
    for size, unit in ((604800, "w"), (86400, "d"), (3600, "h"), (60, "m")):
        count, t = divmod(t, size)
        if count:
            parts.append(f"{count}{unit}")
    if t or not parts:
        parts.append(f"{t}s")
    return sign + "".join(parts)


def _op_randint(s: str) -> str:
    limit = condition_integer(s, non_negative=True, empty_is_zero=False)
    return str(random.randrange(limit) if limit > 0 else 0)


_MODE_NORMAL = ("---", "--x", "-w-", "-wx", "r--", "r-x", "rw-", "rwx")
_MODE_SETID = ("--S", "--s", "-wS", "-ws", "r-S", "r-s", "rwS", "rws")
_MODE_STICKY = ("--T", "--t", "-wT", "-wt", "r-T", "r-t", "rwT", "rwt")
_FILE_TYPE = {stat_module.S_IFIFO: "p", stat_module.S_IFCHR: "c", stat_module.S_IFDIR: "d",
              stat_module.S_IFBLK: "b", stat_module.S_IFREG: "-"}


def _op_stat(s: str) -> str:
    try:
        st = os.stat(_bytes(s))
    except OSError as e:
        raise ExpansionError(f"stat({s}) failed: {e.strerror}") from None
    mode = st.st_mode
    smode = _FILE_TYPE.get(stat_module.S_IFMT(mode), "?")
    smode += (_MODE_SETID if mode & 0o4000 else _MODE_NORMAL)[(mode >> 6) & 7]
    smode += (_MODE_SETID if mode & 0o2000 else _MODE_NORMAL)[(mode >> 3) & 7]
    smode += (_MODE_STICKY if mode & 0o1000 else _MODE_NORMAL)[mode & 7]
    return (
        f"mode={mode & 0o77777:04o} smode={smode} inode={st.st_ino} device={st.st_dev} "
        f"links={st.st_nlink} uid={st.st_uid} gid={st.st_gid} size={st.st_size} "
        f"atime={int(st.st_atime)} mtime={int(st.st_mtime)} ctime={int(st.st_ctime)}"
    )


# ---------------------------------------------------------------------------
# Addresses

def _op_address(part: str) -> Operator:
    def op(s: str) -> str:
        try:
            address, domain = extract_address(s)
        except AddressError:
            return ""  # these operators yield nothing for a bad address
        if part == "domain":
            return address[domain:] if domain else ""
        if part == "local_part" and domain:
            return address[:domain - 1]
        return address

    return op


def _op_addresses(s: str) -> str:
    sep = ":"
    stripped = s.lstrip(_SPACE)
    if stripped.startswith(">"):
        if len(stripped) < 2:
            raise ExpansionError(f"output separator missing in expanding ${{addresses:{stripped}}}")
        sep, s = stripped[1], stripped[2:]
    out: list[str] = []
    for address in extract_addresses(s):
        piece = address.replace(sep, sep + sep)
        if out and address.startswith(sep):
            piece = " " + piece  # so the doubled separator is not read as one
        out.append(piece)
    return sep.join(out)


# ---------------------------------------------------------------------------
# Hashes

def _hex_upper(algo: str) -> Operator:
    return lambda s: hashlib.new(algo, _bytes(s)).hexdigest().upper()


_SHA2 = {None: "sha256", "256": "sha256", "384": "sha384", "512": "sha512"}
_SHA3 = {None: "sha3_256", "224": "sha3_224", "256": "sha3_256", "384": "sha3_384", "512": "sha3_512"}


# ---------------------------------------------------------------------------
# The tables

OPERATORS: dict[str, Operator] = {
    "address": _op_address("address"),
    "addresses": _op_addresses,
    "base32": _op_base32,
    "base32d": _op_base32d,
    "base62": _op_base62,
    "base62d": _op_base62d,
    "base64": lambda s: _b64encode(_bytes(s)),
    "base64d": _op_base64d,
    "domain": _op_address("domain"),
    "escape": _escape,
    "escape8bit": lambda s: _HIGH_OR_BACKSLASH.sub(lambda m: f"\\{ord(m.group()):03o}", s),
    "eval": _op_eval(False),
    "eval10": _op_eval(True),
    "from_utf8": _op_from_utf8,
    "hex2b64": _op_hex2b64,
    "hexquote": lambda s: _HEXQUOTE.sub(lambda m: f"\\x{ord(m.group()):02x}", s),
    "ipv6denorm": lambda s: _ipv6_full(_ipv6_packed(s), ":"),
    "ipv6norm": lambda s: _ipv6_compress(_ipv6_packed(s)),
    "lc": _lc,
    "listcount": lambda s: str(len(split_list(s))),
    "local_part": _op_address("local_part"),
    "mask": lambda s: _op_mask(s, False),
    "md5": lambda s: hashlib.md5(_bytes(s)).hexdigest(),
    "quote": lambda s: _quote(s, False),
    "quote_local_part": lambda s: _quote(s, True),
    "randint": _op_randint,
    "reverse_ip": _op_reverse_ip,
    "rfc2047": _rfc2047_encode,
    "rfc2047d": _op_rfc2047d,
    "rxquote": lambda s: _RX_META.sub(lambda m: "\\" + m.group(), s),
    "sha1": _hex_upper("sha1"),
    "sha2": _hex_upper("sha256"),
    "sha256": _hex_upper("sha256"),
    "sha3": _hex_upper("sha3_256"),
    "stat": _op_stat,
    "str2b64": lambda s: _b64encode(_bytes(s)),
    "strlen": lambda s: str(len(s)),
    "time_eval": _op_time_eval,
    "time_interval": _op_time_interval,
    "uc": lambda s: s.translate(_UPPER),
    "utf8_domain_from_alabel": _op_domain_from_alabel,
    "utf8_domain_to_alabel": _op_domain_to_alabel,
    "utf8_localpart_from_alabel": _op_localpart_from_alabel,
    "utf8_localpart_to_alabel": _op_localpart_to_alabel,
    "utf8clean": _op_utf8clean,
}

# Names whose underscore is part of the name (Exim's op_table_underscore).
_UNDERSCORE_NAMES = frozenset(n for n in OPERATORS if "_" in n)

# Operators that need the configuration or the evaluator: the evaluator
# implements them (``quote_<lookup>`` is ``quote`` with an argument).
EVALUATOR_OPERATORS = frozenset({"expand", "listnamed"})

_NUMERIC_KIND = {"length": "length", "l": "length", "substr": "substr", "s": "substr",
                 "hash": "hash", "h": "hash", "nhash": "nhash", "nh": "nhash"}


def split_operator_name(name: str) -> tuple[str, str | None]:
    """Split ``name`` as Exim does: a name from the underscore table is
    whole; otherwise the text after the first ``_`` is an argument.
    Returns (operator, argument or None); the operator may be unknown."""
    if name in _UNDERSCORE_NAMES:
        return name, None
    base, underscore, arg = name.partition("_")
    return base, arg if underscore else None


def get_operator(name: str) -> Operator:
    """The function for ``${name:...}``, including the underscore/numeric
    forms.  Operators in EVALUATOR_OPERATORS, and ``quote_<lookup>``, raise
    LookupError: the evaluator must handle them before calling this."""
    base, arg = split_operator_name(name)
    kind = _NUMERIC_KIND.get(base)
    if kind is not None:
        return _numeric_op(kind, name, arg)
    if base in EVALUATOR_OPERATORS or (base == "quote" and arg is not None):
        raise LookupError(f"{name} is implemented by the evaluator")
    if base in ("sha2", "sha256"):
        algo = _SHA2.get(arg)
        if algo is None:
            raise ExpansionError("unrecognised sha2 variant")
        return _hex_upper(algo)
    if base == "sha3":
        algo = _SHA3.get(arg)
        if algo is None:
            raise ExpansionError("unrecognised sha3 variant")
        return _hex_upper(algo)
    if base == "mask" and arg is not None:
        normalised = arg.startswith("n")
        return lambda s: _op_mask(s, normalised)
    op = OPERATORS.get(base)
    if op is None:
        raise ExpansionError(f'unknown expansion operator "{name}"')
    return op
