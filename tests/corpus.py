"""Shared helpers for the tests that replay Exim 4.96's recorded output."""

from __future__ import annotations

import os
import shutil
import sys


def decode_corpus_field(text: str) -> str:
    """Undo the corpus escapes (\\\\ \\n \\t \\r \\xHH) in one left-to-right pass;
    the result holds one character per byte."""
    out: list[str] = []
    i = 0
    while i < len(text):
        c = text[i]
        if c == "\\" and i + 1 < len(text):
            nxt = text[i + 1]
            if nxt == "x" and i + 3 < len(text) + 0:
                out.append(chr(int(text[i + 2:i + 4], 16)))
                i += 4
                continue
            out.append({"n": "\n", "t": "\t", "r": "\r", "\\": "\\"}.get(nxt, "\\" + nxt))
            i += 2
            continue
        out.append(c)
        i += 1
    return "".join(out)


def exim_py_command() -> list[str]:
    """How to run the installed ``exim-py`` command (or the module)."""
    script = os.path.join(os.path.dirname(sys.executable), "exim-py")
    if os.path.exists(script):
        return [script]
    found = shutil.which("exim-py")
    return [found] if found else [sys.executable, "-m", "twisted_mta.cli"]
