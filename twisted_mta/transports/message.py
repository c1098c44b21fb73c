"""Writing a message as a transport sends it: Exim's
``transport_write_message()`` and ``transport_headers_send()``.

The work is split in two.  :func:`build_headers` runs on the reactor
thread, because it expands strings (``headers_add``, ``headers_remove``,
the date): it produces the whole header section as text.  A
:class:`MessageStream` then produces the bytes to write, in chunks: the
header section, then the body read from the -D file (after its first
line), with the line-ending and ``check_string`` processing applied.  The
stream reads the spool file, so it is iterated in a worker thread; a
driver writing to a file does the whole loop in one thread call
(:func:`write_all_to_fd`), a driver writing to a pipe or socket fetches
one chunk at a time (:func:`next_chunk`).  A chunk gathers everything up to
:data:`CHUNK_SIZE` bytes, so a message of up to that size (headers, body
and final dot) is produced in a single trip to the thread pool.

What is written, in Exim's order:

1. ``Return-path: <sender>`` (``return_path_add``), ``Envelope-to:``
   (``envelope_to_add``: the envelope recipients the batch descends from),
   ``Delivery-date:`` (``delivery_date_add``);
2. the headers of the -H file, less those flagged deleted (``*``) and
   those matched by the transport's ``headers_remove`` or the routers';
3. the routers' ``headers_add`` lines, then the transport's;
4. a blank line, then the body.

``use_crlf`` turns each LF into CRLF; a -D file in wire format (CRLF
lines, received with CHUNKING) has its CRs dropped unless ``use_crlf``.
``check_string``/``escape_string`` replace the check string where a line
starts with it (``From `` to ``>From `` for mbox files, ``.`` to ``..``
for batched SMTP); only the body is checked unless the headers are too
(``use_bsmtp``).  Unlike Exim, the check does not depend on where the file
happened to be split into chunks.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from twisted_mta.expand.errors import ExpansionError, ForcedFailure
from twisted_mta.transports.common import expand, run_blocking
from twisted_mta.values import split_list_with

#: How many bytes a chunk of a MessageStream gathers, and how much of the
#: -D file one read asks for.  Each chunk is one trip to the thread pool
#: for a driver writing to a socket or pipe, which costs far more than
#: copying a few hundred KiB; the bound keeps a big message from being
#: held in memory whole.
CHUNK_SIZE = 256 * 1024


@dataclass
class WriteOptions:
    """The ``topt_*`` bits and strings of Exim's ``transport_ctx``."""

    add_return_path: bool = False
    add_envelope_to: bool = False
    add_delivery_date: bool = False
    use_crlf: bool = False
    end_dot: bool = False
    no_headers: bool = False        # body_only
    no_body: bool = False           # headers_only
    escape_headers: bool = False    # apply check_string to the headers too
    check_string: str | None = None
    escape_string: str | None = None
    size_limit: int = 0             # 0: the whole body

    @classmethod
    def from_instance(cls, instance: Any, **kw: Any) -> WriteOptions:
        """The options every transport takes from its generic settings."""
        return cls(add_return_path=bool(instance.get("return_path_add")),
                   add_envelope_to=bool(instance.get("envelope_to_add")),
                   add_delivery_date=bool(instance.get("delivery_date_add")),
                   no_headers=bool(instance.get("body_only")),
                   no_body=bool(instance.get("headers_only")), **kw)


class HeaderChangeError(Exception):
    """``headers_add`` or ``headers_remove`` failed to expand (Exim's
    ERRNO_CHHEADER_FAIL).  *message* is the expansion error; *routing* is
    set when the failing text came from a router, whose own message Exim
    would have given when routing."""

    def __init__(self, message: str, routing: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.routing = routing


# -- the header section ---------------------------------------------------------


async def build_headers(job: Any, instance: Any, options: WriteOptions,
                        return_path: str) -> str | None:
    """The header section (ending with its blank line) as Latin-1 text, or
    None with ``body_only``.  Raises HeaderChangeError."""
    if options.no_headers:
        return None
    out: list[str] = []
    if options.add_return_path:
        out.append(f"Return-path: <{return_path}>\n")
    if options.add_envelope_to:
        seen: list[Any] = []
        for address in job.addresses:
            top = address.top
            if not any(top is s for s in seen):
                seen.append(top)
        out.append("Envelope-to: " + ",\n ".join(a.address for a in seen) + "\n")
    if options.add_delivery_date:
        out.append(f"Delivery-date: {await job.ctx.expand('$tod_full')}\n")

    first = job.addresses[0] if job.addresses else None
    removals = await _removals(job, instance, first)
    for header in job.message.headers:
        if header.flag == "*":
            continue
        if any(_removes(item, header.text) for item in removals):
            continue
        out.append(header.text)

    added: list[str] = []
    if first is not None:
        for raw in first.headers_add:
            added += await _expand_items(job, raw, "\n",
                                         f"{first.router} router failed to expand add_headers")
    option = instance.get("headers_add")
    if option:
        added += await _expand_items(job, str(option), "\n")
    out.extend(text if text.endswith("\n") else text + "\n" for text in added)
    out.append("\n")
    return "".join(out)


async def _removals(job: Any, instance: Any, first: Any) -> list[str]:
    items: list[str] = []
    option = instance.get("headers_remove")
    if option:
        items += await _expand_items(job, str(option), ":")
    if first is not None:
        for raw in first.headers_remove:
            items += await _expand_items(
                job, raw, ":", f"{first.router} router failed to expand remove_headers")
    return items


async def _expand_items(job: Any, text: str, separator: str,
                        router_failure: str | None = None) -> list[str]:
    """The items of a ``headers_add``/``headers_remove`` list, expanded,
    less those that expand to nothing or are forced to fail.  An item that
    fails to expand raises HeaderChangeError; for a router's list,
    *router_failure* starts its routing message."""
    items: list[str] = []
    for item in split_list_with(text, separator):
        try:
            expanded = await expand(job, item)
        except ForcedFailure:
            continue
        except ExpansionError as e:
            routing = None
            if router_failure is not None:
                routing = f'{router_failure} item "{item}": {e.message}'
            raise HeaderChangeError(e.message, routing) from None
        if expanded:
            items.append(expanded)
    return items


def _removes(item: str, header: str) -> bool:
    """Whether a headers_remove item matches a header line: a caseless
    name match (``name`` then optional blanks and a colon), or a caseless
    prefix match when the item ends with ``*``."""
    if item.endswith("*"):
        return header[:len(item) - 1].lower() == item[:-1].lower()
    if header[:len(item)].lower() != item.lower():
        return False
    rest = header[len(item):].lstrip(" \t")
    return rest.startswith(":")


# -- the byte stream ------------------------------------------------------------


class _LineFilter:
    """The per-byte processing of Exim's write_chunk(), done a chunk at a
    time: drop the CR of CRLF (*strip_cr*), replace *check* by *escape*
    at the start of a line, then turn LF into CRLF (*crlf*).  A partial
    line that could still turn out to start with the check string is held
    back until the next chunk shows how it continues."""

    def __init__(self, check: bytes | None, escape: bytes | None, *, crlf: bool,
                 strip_cr: bool, line_start: bool) -> None:
        self.check = check if check and escape is not None else None
        self.escape = escape or b""
        self.crlf = crlf
        self.strip_cr = strip_cr
        self.line_start = line_start
        self.carry = b""
        self.cr = b""

    def feed(self, data: bytes) -> bytes:
        if self.strip_cr:
            data = self.cr + data
            self.cr = b""
            if data.endswith(b"\r"):
                self.cr, data = b"\r", data[:-1]
            data = data.replace(b"\r\n", b"\n")
        if self.check is not None:
            data = self._escape(data, final=False)
        return data.replace(b"\n", b"\r\n") if self.crlf else data

    def flush(self) -> bytes:
        data, self.cr = self.cr, b""
        if self.check is not None:
            data = self._escape(data, final=True)
        return data.replace(b"\n", b"\r\n") if self.crlf else data

    def _escape(self, data: bytes, final: bool) -> bytes:
        check = self.check
        assert check is not None
        data = self.carry + data
        start = self.line_start
        self.carry = b""
        if not final:
            newline = data.rfind(b"\n")
            tail_start = newline + 1
            at_line = newline >= 0 or start
            tail = data[tail_start:]
            if at_line and len(tail) < len(check) and check.startswith(tail):
                self.carry = tail
                data = data[:tail_start]
                self.line_start = True
            else:
                self.line_start = False
        if not data:
            return data
        if start:
            return (b"\n" + data).replace(b"\n" + check, b"\n" + self.escape)[1:]
        return data.replace(b"\n" + check, b"\n" + self.escape)


class MessageStream:
    """The bytes a transport writes for one message, produced in chunks.

    *headers* is the section from :func:`build_headers` (None for
    ``body_only``); *before* and *after* are written as they are, without
    line-ending or check-string processing (``message_prefix`` and the
    batched SMTP envelope; ``message_suffix`` and its final dot), as Exim
    writes them with transport_write_string().  *body*, when given, is
    the -D file's content after its first line, already read: the stream
    then reads no file, and iterating it does not block.  After iteration,
    *count* is the number of bytes produced (Exim's ``transport_count``)
    and *newlines* the number of line ends in the message itself.
    """

    def __init__(self, headers: str | None, data_path: str, options: WriteOptions, *,
                 wireformat: bool = False, before: bytes = b"", after: bytes = b"",
                 body: bytes | None = None) -> None:
        self.headers = headers
        self.data_path = data_path
        self.options = options
        self.wireformat = wireformat
        self.before = before
        self.after = after
        self.body = body
        self.count = 0
        self.newlines = 0

    def __iter__(self) -> Iterator[bytes]:
        return _Chunks(self, self._chunks())

    def _chunks(self) -> Iterator[bytes]:
        opts = self.options
        check = opts.check_string.encode("latin-1") if opts.check_string else None
        escape = opts.escape_string.encode("latin-1") \
            if opts.escape_string is not None else None
        yield self.before
        if self.headers is not None:
            raw = self.headers.encode("latin-1")
            self.newlines += raw.count(b"\n")
            head = _LineFilter(check if opts.escape_headers else None, escape,
                               crlf=opts.use_crlf, strip_cr=False, line_start=False)
            yield head.feed(raw) + head.flush()
        if not opts.no_body:
            body = _LineFilter(check, escape, crlf=opts.use_crlf and not self.wireformat,
                               strip_cr=self.wireformat and not opts.use_crlf,
                               line_start=True)
            for data in self._body_reads():
                self.newlines += data.count(b"\n")
                yield body.feed(data)
            yield body.flush()
        if opts.end_dot:
            yield b".\r\n" if opts.use_crlf else b".\n"
        yield self.after


    def _body_reads(self) -> Iterator[bytes]:
        """The body in pieces of up to CHUNK_SIZE bytes (up to size_limit
        bytes in all): from *body* when given, else read from the file."""
        limit = self.options.size_limit
        if self.body is not None:
            data = self.body[:limit] if limit > 0 else self.body
            for start in range(0, len(data), CHUNK_SIZE):
                yield data[start:start + CHUNK_SIZE]
            return
        with open(self.data_path, "rb") as f:
            _skip_id_line(f, self.data_path)
            left = limit if limit > 0 else -1
            while left != 0:
                data = f.read(CHUNK_SIZE if left < 0 else min(CHUNK_SIZE, left))
                if not data:
                    break
                if left > 0:
                    left -= len(data)
                yield data


class _Chunks(Iterator[bytes]):
    """The iterator of a MessageStream: its pieces (header section, body
    reads, final dot...) gathered into chunks of at least CHUNK_SIZE bytes
    but the last.  *finished* is set as the last chunk is returned, so that
    :func:`next_chunk` knows the end without another trip to the thread
    pool.  An error while gathering (the -D file unreadable) is raised by
    the call after the one returning the pieces gathered before it, so a
    driver still writes the bytes produced before the error."""

    def __init__(self, stream: MessageStream, pieces: Iterator[bytes]) -> None:
        self.stream = stream
        self.pieces = pieces
        self.finished = False
        self.error: Exception | None = None

    def __next__(self) -> bytes:
        if self.error is not None:
            error, self.error = self.error, None
            self.finished = True
            raise error
        if self.finished:
            raise StopIteration
        gathered: list[bytes] = []
        size = 0
        try:
            for piece in self.pieces:
                if piece:
                    gathered.append(piece)
                    size += len(piece)
                    if size >= CHUNK_SIZE:
                        break
            else:
                self.finished = True
        except Exception as e:
            if not gathered:
                self.finished = True
                raise
            self.error = e
        if not gathered:
            raise StopIteration
        chunk = gathered[0] if len(gathered) == 1 else b"".join(gathered)
        self.stream.count += size
        return chunk


def _skip_id_line(f: Any, path: str) -> None:
    """Position *f* after the -D file's first line, ``<id>-D``."""
    first = f.readline(256)
    if not first.endswith(b"-D\n"):
        raise OSError(f"{path} does not start with its name")


def write_all_to_fd(stream: MessageStream, fd: int) -> int:
    """Write the whole stream to *fd* (blocking: call in a thread); the
    byte count.  Raises OSError as the write fails."""
    for chunk in stream:
        view = memoryview(chunk)
        while view:
            written = os.write(fd, view)
            view = view[written:]
    return stream.count


_END = object()


async def next_chunk(job: Any, chunks: Iterator[bytes]) -> bytes | None:
    """The next chunk of *chunks*, read in the job's thread pool; None at
    the end (known without the pool once a MessageStream's iterator has
    returned its last chunk)."""
    if isinstance(chunks, _Chunks) and chunks.finished:
        return None
    chunk = await run_blocking(job, next, chunks, _END)
    return None if chunk is _END else chunk


def spool_message_size(message: Any, data_path: str) -> int:
    """Exim's ``$message_size`` for a message read from the spool: the
    body, one for the blank line, and the headers not flagged deleted
    (blocking: it stats the -D file)."""
    return read_spooled_body(message, data_path, 0)[0]


def read_spooled_body(message: Any, data_path: str, keep: int) -> tuple[int, bytes | None]:
    """``(size, body)``: what :func:`spool_message_size` gives, and the
    -D file's content after its first line when that is at most *keep*
    bytes (else None: the caller reads the file itself), read in the same
    visit to the file (blocking).  The body is None too when the file does
    not start with its name, so that the stream reading it raises."""
    with open(data_path, "rb") as f:
        first = f.readline(256)
        length = os.fstat(f.fileno()).st_size - len(first)
        body = f.read() if length <= keep and first.endswith(b"-D\n") else None
    return message_size(message, length), body


def message_size(message: Any, body_length: int) -> int:
    """Exim's ``$message_size`` for a spooled message whose body (the -D
    file after its first line) is *body_length* bytes: the body, one for
    the blank line, and the headers not flagged deleted."""
    return body_length + 1 + sum(len(h.text) for h in message.headers if h.flag != "*")


def spooled_body(data: bytes) -> bytes | None:
    """The body in *data*, a whole -D file: what follows its first line,
    or None when that line is not ``<id>-D`` as a stream reading the file
    would see it (the stream then raises)."""
    end = data.find(b"\n", 0, 256)
    if end < 0 or not data[:end + 1].endswith(b"-D\n"):
        return None
    return data[end + 1:]
