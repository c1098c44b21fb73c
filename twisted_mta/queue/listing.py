"""Listing the queue: ``-bp`` and its variants, and ``-bpc``.

The output is Exim 4.96's (``queue_list()`` in queue.c) byte for byte, for
any spool directory Exim could have written:

* one entry per message: the time on the queue (``25m``, up to 90
  minutes; then ``2h`` up to 72 hours; then ``3d``), the size, the id, the
  sender in angle brackets (``<>`` for a bounce) followed by ``(login)``
  when an untrusted caller chose it, and ``*** frozen ***``;
* then one line per recipient, ``D`` marking those already delivered (in
  the -H file's non-recipients tree or the -J journal); ``-bpu`` leaves
  those out, ``-bpa`` adds ``+D`` lines for delivered addresses that are
  not recipients (the ones routing generated), in tree order;
* then a blank line.

The size is what Exim would send: the -D file less its first line, plus
one for the blank line before the body, plus every header in the -H file
that is not flagged ``*``.  Messages come in arrival order (by time, then
the sub-second part of the id; Exim's merge sort, ties included), or with
``-bpr`` in Exim's cheap "random" order, which depends on the directory
order and the current second and so is reproduced exactly too.

Everything here is synchronous: it is for the command line.  The current
time is passed in, so that tests can fix it.
"""

from __future__ import annotations

import errno
import os
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass
from typing import BinaryIO

from twisted_mta.spool.header import SpoolFormatError, parse_envelope
from twisted_mta.spool.ids import MESSAGE_ID_LENGTH
from twisted_mta.spool.message import SpoolMessage
from twisted_mta.spool.tree import TreeNode, tree_insert

__all__ = [
    "LIST_ALL", "LIST_RANDOM", "LIST_TOP", "LIST_UNDELIVERED", "QueueFile",
    "count_queue", "format_age", "format_size", "list_option", "list_queue",
    "queue_files",
]

#: ``-bp``: the recipients, ``D`` marking the delivered ones.
LIST_TOP = 0
#: ``-bpu``: only the undelivered recipients.
LIST_UNDELIVERED = 1
#: ``-bpa``: as ``-bp``, plus ``+D`` lines for generated addresses.
LIST_ALL = 2
#: Added for ``-bpr``: in Exim's "random" order instead of arrival order.
LIST_RANDOM = 8

#: The -D file's first line (``<id>-D\n``), not counted in sizes.
_DATA_START_OFFSET = MESSAGE_ID_LENGTH + 3
_SPOOL_NAME_LENGTH = MESSAGE_ID_LENGTH + 2
# Exim sorts with a bottom-up merge sort of this many levels.
_LOG2_MAXNODES = 32
_DIGITS = frozenset("0123456789")
# C's isspace() in the C locale, as fscanf skips it.
_SPACE = " \t\n\r\v\f"
# Exim's fgets() buffer for -J lines (big_buffer_size).
_BIG_BUFFER_SIZE = 16384


def list_option(arg: str) -> tuple[str, int] | None:
    """The mode and :func:`list_queue` option for a ``-bp...`` argument:
    ``("bpc", 0)`` for a count, ``("bp", LIST_...)`` for a listing, None for
    anything Exim 4.96 does not accept (``-bpx``, ``-bpcx``, ``-bpi``)."""
    if not arg.startswith("-bp"):
        return None
    rest = arg[3:]
    if rest == "c":
        return "bpc", 0
    option = 0
    if rest.startswith("r"):
        option, rest = LIST_RANDOM, rest[1:]
    if rest == "":
        return "bp", option
    if rest == "u":
        return "bp", option + LIST_UNDELIVERED
    if rest == "a":
        return "bp", option + LIST_ALL
    return None


def format_size(size: int) -> str:
    """Exim's ``string_format_size()``: five characters."""
    if size == 0:
        return "     "
    if size < 1024:
        return f"{size:5d}"
    if size < 10 * 1024:
        return f"{size / 1024.0:4.1f}K"
    if size < 1024 * 1024:
        return f"{_cdiv(size + 512, 1024):4d}K"
    if size < 10 * 1024 * 1024:
        return f"{size / (1024.0 * 1024.0):4.1f}M"
    return f"{_cdiv(size + 512 * 1024, 1024 * 1024):4d}M"


def format_age(seconds: int) -> str:
    """The age column for a message *seconds* old (negative when its
    receive time is in the future, as Exim shows it: ``-5m``)."""
    minutes = _cdiv(seconds, 60)
    if minutes > 90:
        hours = _cdiv(minutes + 30, 60)
        if hours > 72:
            return f"{_cdiv(hours + 12, 24):2d}d"
        return f"{hours:2d}h"
    return f"{minutes:2d}m"


def _cdiv(a: int, b: int) -> int:
    """C integer division (truncating toward zero)."""
    q = abs(a) // abs(b)
    return q if (a >= 0) == (b > 0) else -q


# ---------------------------------------------------------------- the spool directory

@dataclass(frozen=True)
class QueueFile:
    """A -H file found in the spool: its name (``<id>-H``) and the
    one-character subdirectory of ``input/`` it is in ("" for none)."""

    name: str
    subdir: str

    @property
    def message_id(self) -> str:
        return self.name[:MESSAGE_ID_LENGTH]


def _listdir(path: str) -> list[str] | None:
    """The entries of *path* in the order the file system gives them (as
    readdir() does), as Latin-1 text; None when it cannot be read."""
    try:
        return [n.decode("latin-1") for n in os.listdir(os.fsencode(path))]
    except OSError:
        return None


def _is_subdir_name(name: str) -> bool:
    # isalnum() in the C locale; Exim does not check it is a directory.
    return len(name) == 1 and name.isascii() and name.isalnum()


def _is_header_name(name: str) -> bool:
    return len(name) == _SPOOL_NAME_LENGTH and name.endswith("-H")


def _scan(spool_directory: str, split: bool) -> Iterable[tuple[str, list[str]]]:
    """``(subdir, names)`` for ``input/`` and then each one-character
    entry found in it, as ``queue_get_spool_list()`` walks them.  Like
    Exim, an empty subdirectory is removed (with its msglog twin) when the
    spool is no longer split."""
    base = os.path.join(spool_directory, "input")
    names = _listdir(base)
    if names is None:
        return
    subdirs = [n for n in names if _is_subdir_name(n)]
    yield "", [n for n in names if not _is_subdir_name(n)]
    for sub in subdirs:
        path = os.path.join(base, sub)
        entries = _listdir(path)
        if entries is None:
            continue
        yield sub, entries
        if not split and not entries:
            for empty in (path, os.path.join(spool_directory, "msglog", sub)):
                try:
                    os.rmdir(empty)
                except OSError:
                    pass


def count_queue(spool_directory: str, split: bool = False) -> int:
    """``-bpc``: the number of -H files in ``input/`` and its
    subdirectories (whether or not they can be read)."""
    return sum(1 for _, names in _scan(spool_directory, split)
               for name in names if _is_header_name(name))


def _key_compare(a: str, b: str) -> int:
    # Time first, then the sub-second part; the pid does not count.
    d = (a[:6] > b[:6]) - (a[:6] < b[:6])
    if d == 0:
        d = (a[14:] > b[14:]) - (a[14:] < b[14:])
    return d


def _merge(a: list[QueueFile], b: list[QueueFile]) -> list[QueueFile]:
    """Exim's ``merge_queue_lists()``: on equal keys *b* goes first."""
    out: list[QueueFile] = []
    i = j = 0
    while i < len(a) and j < len(b):
        if _key_compare(a[i].name, b[j].name) < 0:
            out.append(a[i])
            i += 1
        else:
            out.append(b[j])
            j += 1
    out.extend(a[i:] if i < len(a) else b[j:])
    return out


def queue_files(spool_directory: str, split: bool = False, *, randomize: bool = False,
                now: int = 0) -> list[QueueFile]:
    """Every -H file on the queue in the order Exim lists them: arrival
    order, or with *randomize* the order ``-bpr`` gives at time *now*."""
    found = [QueueFile(name, sub) for sub, names in _scan(spool_directory, split)
             for name in names if _is_header_name(name)]
    if randomize:
        # Each file after the first goes to the front or the back of the
        # list according to the next bit of the time's low 16 bits.
        reset = now & 0xFFFF
        flags = 0
        shuffled: deque[QueueFile] = deque()
        for item in found:
            if not shuffled:
                shuffled.append(item)
                continue
            if flags == 0:
                flags = reset
            if flags & 1 == 0:
                shuffled.appendleft(item)
            else:
                shuffled.append(item)
            flags >>= 1
        return list(shuffled)
    roots: list[list[QueueFile] | None] = [None] * _LOG2_MAXNODES
    for item in found:
        run = [item]
        for j in range(_LOG2_MAXNODES):
            level = roots[j]
            if level:
                run = _merge(run, level)
                roots[j] = run if j == _LOG2_MAXNODES - 1 else None
            else:
                roots[j] = run
                break
    result: list[QueueFile] = []
    for level in roots:
        result = _merge(result, level or [])
    return result


# ---------------------------------------------------------------- reading one message

# The outcomes of Exim's spool_read_header().
_READ_OK = "ok"
_NOT_OPEN = "notopen"
_ENV_ERROR = "enverror"
_HDR_ERROR = "hdrerror"
#: errno value standing for "format error" (Exim's ERRNO_SPOOLFORMAT).
_FORMAT_ERROR = -20


@dataclass
class _HeaderRead:
    result: str
    error: int = 0                       # errno, or _FORMAT_ERROR
    message: SpoolMessage | None = None  # when the envelope was read
    header_size: int = 0                 # Exim's message_size from the headers
    subdir: str = ""                     # where the -H file was found


def _header_section(text: str, pos: int) -> tuple[int, bool]:
    """Walk the header section from *pos* (its blank line) as
    ``spool_read_header()`` does; return the bytes of headers that would
    be sent (all counts but those flagged ``*``, up to any fault) and
    whether the section was sound."""
    end = text.find("\n", pos)
    if end < 0 or end != pos:
        return 0, False
    pos = end + 1
    size = 0
    n = len(text)
    while pos < n:
        if text[pos] not in _DIGITS:
            return size, False
        start = pos
        while pos < n and text[pos] in _DIGITS:
            pos += 1
        length = int(text[start:pos])
        if pos >= n:
            # fscanf() matched the number but not the flag letter: the
            # letter is left undefined in Exim; the bytes that should
            # follow are missing, so the file is at fault either way.
            return size + length, False
        flag = text[pos]
        pos += 1
        while pos < n and text[pos] in _SPACE:
            pos += 1
        if flag != "*":
            size += length
        chunk = text[pos:pos + length]
        if len(chunk) < length or "\0" in chunk:
            return size, False
        pos += length
    return size, True


def _read_header(spool_directory: str, split: bool, name: str,
                 subdir: str | None) -> _HeaderRead:
    """Open and read the -H file *name* in *subdir*, or (None) in the split
    then the unsplit place (the other way round when not split)."""
    places = [subdir] if subdir is not None else [
        name[5] if split == (i == 0) and len(name) > 5 else "" for i in range(2)]
    data = None
    error = 0
    where = ""
    for place in places:
        where = place
        if "/" in name or "\0" in name:
            error = errno.ENOENT
            continue
        try:
            with open(os.path.join(spool_directory, "input", place, name), "rb") as f:
                data = f.read()
            break
        except OSError as e:
            error = e.errno or errno.EIO
            if error != errno.ENOENT:
                # A file that opens but cannot be read (a directory) is a
                # read error in the envelope for Exim; both print alike.
                return _HeaderRead(_NOT_OPEN, error, subdir=place)
    if data is None:
        return _HeaderRead(_NOT_OPEN, error, subdir=where)
    try:
        msg, pos = parse_envelope(data, expected_id=name[:MESSAGE_ID_LENGTH])
    except SpoolFormatError:
        return _HeaderRead(_ENV_ERROR, _FORMAT_ERROR, subdir=where)
    if not name.endswith("-H") or len(name) != _SPOOL_NAME_LENGTH:
        return _HeaderRead(_ENV_ERROR, _FORMAT_ERROR, subdir=where)
    size, ok = _header_section(data.decode("latin-1"), pos)
    return _HeaderRead(_READ_OK if ok else _HDR_ERROR, 0 if ok else _FORMAT_ERROR,
                       msg, size, where)


def _read_journal(path: str) -> list[str]:
    """The addresses in a -J file, read as Exim does: fgets() pieces of a
    line at most, each without its last character (the newline)."""
    try:
        with open(path, "rb") as f:
            text = f.read().decode("latin-1")
    except OSError:
        return []
    names = []
    pos = 0
    limit = _BIG_BUFFER_SIZE - 1
    while pos < len(text):
        end = text.find("\n", pos, pos + limit)
        end = end + 1 if end >= 0 else min(len(text), pos + limit)
        names.append(text[pos:end - 1])
        pos = end
    return names


def _compare(a: str, b: str) -> int:
    ka, kb = a.encode("latin-1", "replace"), b.encode("latin-1", "replace")
    return (ka > kb) - (ka < kb)


def _find(root: TreeNode | None, name: str) -> TreeNode | None:
    while root is not None:
        c = _compare(name, root.name)
        if c == 0:
            return root
        root = root.left if c < 0 else root.right
    return None


def _in_order(root: TreeNode | None) -> Iterable[TreeNode]:
    stack: list[TreeNode] = []
    node = root
    while stack or node is not None:
        while node is not None:
            stack.append(node)
            node = node.left
        node = stack.pop()
        yield node
        node = node.right


# ---------------------------------------------------------------- the listing

def list_queue(spool_directory: str, out: BinaryIO, *, split: bool = False,
               option: int = LIST_TOP, message_ids: Iterable[str] = (),
               now: int) -> None:
    """Write Exim's ``-bp`` listing (with *option* LIST_* plus LIST_RANDOM
    as given) of the whole queue, or of *message_ids* when any are given
    (then in that order, and a missing one is reported instead of
    skipped).  *now* is the current time in seconds."""
    ids = list(message_ids)
    explicit = bool(ids)
    if explicit:
        files: list[QueueFile] = [QueueFile(f"{i}-H", "*") for i in ids]
    else:
        files = queue_files(spool_directory, split, randomize=option >= LIST_RANDOM,
                            now=now)
    if option >= LIST_RANDOM:
        option -= LIST_RANDOM
    for qf in files:
        text = _list_one(spool_directory, split, qf, explicit, option, now)
        if text is not None:
            out.write(text.encode("latin-1", "replace"))
    out.flush()


def _list_one(spool_directory: str, split: bool, qf: QueueFile, explicit: bool,
              option: int, now: int) -> str | None:
    read = _read_header(spool_directory, split, qf.name, None if explicit else qf.subdir)
    if read.result == _NOT_OPEN and read.error == errno.ENOENT and not explicit:
        return None  # delivered or removed since the directory was read
    parts: list[str] = []
    msg = read.message
    env_read = read.result in (_READ_OK, _HDR_ERROR)
    non_recipients: TreeNode | None = None
    size = 0
    if env_read:
        assert msg is not None
        non_recipients = msg.non_recipients
        input_dir = os.path.join(spool_directory, "input", read.subdir)
        base = os.path.join(input_dir, qf.name[:-1])
        try:
            size = read.header_size + os.stat(base + "D").st_size - _DATA_START_OFFSET + 1
        except OSError:
            size = 0
        parts.append(format_age(now - msg.received[0]) + " ")
        for name in _read_journal(base + "J"):
            non_recipients, _ = tree_insert(non_recipients, name)
    # Exim prints 16 bytes of "<id>-H" whatever the argument's length.
    parts.append(format_size(size) + " " + qf.name[:MESSAGE_ID_LENGTH].ljust(16, "\0"))
    if env_read:
        assert msg is not None
        parts.append(f" <{msg.sender}>")
        if msg.sender_set_untrusted:
            parts.append(f" ({msg.originator_login})")
    if read.result != _READ_OK:
        parts.append("\n    ")
        if read.error == _FORMAT_ERROR:
            try:
                st = os.stat(os.path.join(spool_directory, "input", read.subdir, qf.name))
                parts.append(f"*** spool format error: size={st.st_size} ***")
            except OSError:
                parts.append("*** spool format error ***")
        else:
            parts.append(f"*** spool read error: {os.strerror(read.error)} ***")
        if read.result != _HDR_ERROR:
            parts.append("\n\n")
            return "".join(parts)
    assert msg is not None
    if msg.frozen_at is not None:
        parts.append(" *** frozen ***")
    parts.append("\n")
    marked: set[int] = set()
    for recipient in msg.recipients:
        delivered = _find(non_recipients, recipient.address)
        if delivered is None or option != LIST_UNDELIVERED:
            parts.append(f"        {'D' if delivered else ' '} {recipient.address}\n")
        if delivered is not None:
            marked.add(id(delivered))
    if option == LIST_ALL:
        for node in _in_order(non_recipients):
            if id(node) not in marked:
                parts.append(f"       +D {node.name}\n")
    parts.append("\n")
    return "".join(parts)
