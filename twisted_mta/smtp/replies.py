"""Formatting SMTP replies the way Exim does (``smtp_respond()``,
``smtp_message_code()``)."""

from __future__ import annotations

import re

from twisted_mta.taint import join_taint

# A configured message may start with its own code, and an extended code.
_USER_CODE = re.compile(r"\d\d\d\s(?:\d\.\d\d?\d?\.\d\d?\d?\s)?")


def split_user_code(default_code: str, message: str, check: bool = True
                    ) -> tuple[str, str, bool]:
    """(code prefix, text, valid): a message that starts ``NNN `` or
    ``NNN X.Y.Z `` supplies its own code when its first digit matches the
    default's class; the prefix includes the extended code.  *valid* is
    False when the message tried a code of the wrong class (Exim then logs
    a panic and keeps the default)."""
    m = _USER_CODE.match(message)
    if m is None:
        return default_code, message, True
    text = message[m.end():]
    if check and message[0] != default_code[0]:
        return default_code, text, False
    return m.group().rstrip(), text, True


def format_reply(code: str, message: str) -> bytes:
    """One reply, several lines when *message* has newlines (leading
    whitespace of continuation lines is dropped).  *code* may carry an
    extended status code (``550 5.7.1``), repeated on every line."""
    basic, _, extended = code.partition(" ")
    prefix_rest = f"{extended} " if extended else ""
    lines = message.split("\n")
    if len(lines) > 1 and lines[-1] == "":
        lines.pop()
    out = []
    for i, line in enumerate(lines):
        if i:
            line = line.lstrip(" \t")
        sep = " " if i == len(lines) - 1 else "-"
        out.append(f"{basic}{sep}{prefix_rest}{line}\r\n")
    return "".join(out).encode("latin-1", "replace")


def user_reply(default_code: str, message: str, check: bool = True) -> bytes:
    """The reply for an ACL-supplied *message* (Exim's smtp_user_msg)."""
    code, text, _ = split_user_code(default_code, message, check)
    return format_reply(code, text)


def split_message(text: str) -> str:
    """Exim's string_split_message(): a message longer than 75 characters
    gets newlines in place of some of its spaces, so that as a reply it is
    several lines of at most 75 characters where that can be done.

    Each line is broken at the last space in its characters 37 to 76,
    preferring the last space that follows a colon; a line with no space
    there is broken at the first space (or newline) after that instead,
    and one with none at all ends the splitting.  Existing newlines start
    new lines."""
    if len(text) <= 75:
        return text
    chars = list(text)
    end = len(chars)
    start = 0  # the start of the current line
    while True:
        pos = start
        while pos < end and pos - start < 75 and chars[pos] != "\n":
            pos += 1
        if pos >= end:
            break
        if chars[pos] == "\n":
            start = pos + 1
            continue
        # chars[pos] is the 76th character of the line: look back for a
        # space, but not into the first 36 characters.
        split = None
        for back in range(pos, start + 35, -1):
            if chars[back] == " ":
                if chars[back - 1] == ":":
                    split = back
                    break
                if split is None:
                    split = back
        if split is None:
            split = next((i for i in range(pos + 1, end) if chars[i] in " \n"), None)
        if split is None:
            break
        chars[split] = "\n"
        start = split + 1
    return join_taint("".join(chars), text)


def printing(text: str) -> str:
    """Exim's string_printing(): non-printing characters escaped."""
    if all(" " <= c < "\x7f" or c == "\t" for c in text):
        return text
    out = []
    for c in text:
        if " " <= c < "\x7f" or c == "\t":
            out.append(c)
        elif c in "\n\r\b\f\v":
            out.append("\\" + {"\n": "n", "\r": "r", "\b": "b", "\f": "f", "\v": "v"}[c])
        else:
            out.append(f"\\{ord(c) & 0xff:03o}" if ord(c) < 256 or 0xDC80 <= ord(c) < 0xDD00
                       else c)
    return "".join(out)
