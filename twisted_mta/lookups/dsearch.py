"""``dsearch``: is there a directory entry named after the key
(Exim's ``lookups/dsearch.c``)?

Options: ``ret=full`` returns the full path rather than the key;
``filter=file`` only matches regular files, ``filter=dir`` directories and
``filter=subdir`` directories other than ``.`` and ``..``.  The entry is
checked with lstat(), so a symbolic link is neither a file nor a directory.
"""

from __future__ import annotations

import errno
import os
import stat
from typing import Any

from zope.interface import implementer

from twisted_mta.expand.errors import ExpansionError, LookupDefer
from twisted_mta.interfaces import ILookup
from twisted_mta.lookups.search import register_lookup


def _check_directory(path: str) -> None:
    """Exim's dsearch open and check steps, with their error texts."""
    try:
        os.scandir(path).close()
    except OSError as e:
        raise ExpansionError(f"failed to open {path} for directory search: {e.strerror}") from None
    if not path.startswith("/"):
        raise ExpansionError(f"dirname '{path}' for dsearch is not absolute")
    try:
        info = os.stat(path)
    except OSError:
        raise ExpansionError(f"{path}: stat failed") from None
    if not stat.S_ISDIR(info.st_mode):
        raise ExpansionError(f"{path} is not a directory (dsearch lookup)")


@implementer(ILookup)
class DirectorySearch:
    """The ``dsearch`` lookup type (an L{ILookup})."""

    name = "dsearch"
    query_style = False
    cacheable = True

    async def find(self, source: str, key: str, options: dict[str, str], context: Any) -> str | None:
        _check_directory(source)
        if "/" in key:
            raise LookupDefer(f"key for dsearch lookup contains a slash: {key}")
        wanted = options.get("filter")
        path = f"{source}/{key}"
        try:
            info = os.lstat(path)
        except OSError as e:
            if e.errno == errno.ENOENT:
                return None
            raise LookupDefer(f"{path}: lstat: {e.strerror}") from None
        mode = info.st_mode
        if wanted == "file" and not stat.S_ISREG(mode):
            return None
        if wanted in ("dir", "subdir") and not stat.S_ISDIR(mode):
            return None
        if wanted == "subdir" and key in (".", ".."):
            return None
        # The entry exists, so the result is not tainted.
        return str(path if options.get("ret") == "full" else key)

    def quote(self, value: str, extra: str | None) -> None:
        return None


register_lookup(DirectorySearch())
