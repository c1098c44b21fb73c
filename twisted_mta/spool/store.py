"""The spool directory: where messages wait, in Exim 4.96's layout.

``input/<id>-D`` holds the body after a first line ``<id>-D``;
``input/<id>-H`` the envelope and headers; ``input/<id>-J`` a journal of
deliveries made during an attempt; ``msglog/<id>`` the message's own log;
``db/`` the hints databases.  With ``split_spool_directory`` the files of
a message go in ``input/<c>/`` and ``msglog/<c>/`` where ``c`` is the
sixth character of its id (the last digit of its time).  Like Exim, reads
look in both the split and unsplit places and listing scans every
one-character subdirectory, so changing the option loses no messages.

A message exists once its -H file does.  Exim writes (and fsyncs) the -D
file first, then the -H file under the temporary name ``hdr.<id>``,
fsyncs it, renames it into place and fsyncs the directory;
:meth:`Spool.write_message` does the same, so a crash leaves either a
complete message or debris that :mod:`twisted_mta.spool.recovery` removes.

The methods here block on the file system; the daemon calls them in a
thread pool.
"""

from __future__ import annotations

import errno
import fcntl
import os
import threading
from dataclasses import dataclass

from twisted_mta.spool.header import format_header_file, parse_header_file
from twisted_mta.spool.ids import MESSAGE_ID_LENGTH, is_message_id
from twisted_mta.spool.message import SpoolMessage

SPOOL_MODE = 0o640
DIRECTORY_MODE = 0o750
#: The -D file's first line, ``<id>-D\n``: what Exim locks while it works
#: on a message, and where the body starts.
DATA_START_OFFSET = MESSAGE_ID_LENGTH + 3
TEMP_HEADER_PREFIX = "hdr."
_SPOOL_NAME_LENGTH = MESSAGE_ID_LENGTH + 2


@dataclass(frozen=True)
class MessagePaths:
    """The files of one message."""

    header: str
    data: str
    journal: str
    msglog: str
    temp_header: str


def _fsync_directory(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    except OSError as e:
        # Some file systems cannot sync a directory; Exim ignores EINVAL too.
        if e.errno != errno.EINVAL:
            raise
    finally:
        os.close(fd)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]


def lock_data_file(fd: int) -> None:
    """Take Exim's lock on an open -D file: a POSIX write lock on its first
    line.  Raises BlockingIOError (or PermissionError) when another
    process holds it."""
    fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB, DATA_START_OFFSET, 0, os.SEEK_SET)


def _open_new(path: str, retry_after_unlink: bool) -> int:
    try:
        return os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, SPOOL_MODE)
    except FileExistsError:
        if not retry_after_unlink:
            raise
        # A temporary -H left by a crash: Exim has one go at removing it.
        os.unlink(path)
        return os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, SPOOL_MODE)


class Spool:
    """A spool directory (``spool_directory``), optionally split
    (``split_spool_directory``)."""

    def __init__(self, directory: str, split: bool = False, *, create: bool = True) -> None:
        self.directory = directory
        self.split = split
        self._writing: set[str] = set()
        self._writing_lock = threading.Lock()
        if create:
            for name in ("input", "msglog", "db"):
                self._makedirs(os.path.join(directory, name))

    # ------------------------------------------------------------ paths

    @staticmethod
    def _makedirs(path: str) -> None:
        os.makedirs(path, mode=DIRECTORY_MODE, exist_ok=True)

    def subdir(self, message_id: str, split: bool | None = None) -> str:
        """The subdirectory a message's files go in: its id's sixth
        character when the spool is split, else empty."""
        return message_id[5] if (self.split if split is None else split) else ""

    def input_directory(self, subdir: str = "") -> str:
        """``input/`` or ``input/<subdir>/``."""
        return os.path.join(self.directory, "input", subdir) if subdir else \
            os.path.join(self.directory, "input")

    def paths(self, message_id: str, split: bool | None = None) -> MessagePaths:
        """Where the files of *message_id* go under this spool's setting
        (or under *split* when given)."""
        if not is_message_id(message_id):
            # Ids become file names: refuse anything else (e.g. "../x").
            raise ValueError(f"not a message id: {message_id!r}")
        sub = self.subdir(message_id, split)
        inp = self.input_directory(sub)
        msglog = os.path.join(self.directory, "msglog", sub, message_id) if sub else \
            os.path.join(self.directory, "msglog", message_id)
        return MessagePaths(
            header=os.path.join(inp, message_id + "-H"),
            data=os.path.join(inp, message_id + "-D"),
            journal=os.path.join(inp, message_id + "-J"),
            msglog=msglog,
            temp_header=os.path.join(inp, TEMP_HEADER_PREFIX + message_id),
        )

    def data_path(self, message_id: str) -> str:
        """The -D file of *message_id* (where it is, else where it would go)."""
        return self.locate(message_id).data

    def header_path(self, message_id: str) -> str:
        """The -H file of *message_id* (where it is, else where it would go)."""
        return self.locate(message_id).header

    def locate(self, message_id: str) -> MessagePaths:
        """The paths of *message_id*: the configured place if its -H file
        is there, else the other (split or unsplit) place if it is there,
        else the configured place."""
        first = self.paths(message_id)
        if os.path.exists(first.header):
            return first
        other = self.paths(message_id, split=not self.split)
        if os.path.exists(other.header):
            return other
        return first

    def writing(self) -> frozenset[str]:
        """Ids whose files this object is writing right now."""
        with self._writing_lock:
            return frozenset(self._writing)

    # ------------------------------------------------------------ writing

    def write_message(self, msg: SpoolMessage, body: bytes) -> None:
        """Put a new message on the spool and make it durable (blocking).

        *body* is written as given after the ``<id>-D`` line (LF line
        endings, or CRLF when ``msg.wireformat``).  The -D file is held
        with Exim's lock while its -H file is written, so other Exim
        processes leave it alone.  On failure nothing of the message is
        left behind and the error is raised.
        """
        paths = self.paths(msg.id)
        header = format_header_file(msg)
        with self._writing_lock:
            if msg.id in self._writing:
                raise FileExistsError(errno.EEXIST, "message id in use", msg.id)
            self._writing.add(msg.id)
        try:
            self._write_data_and_header(paths, msg.id, body, header)
        finally:
            with self._writing_lock:
                self._writing.discard(msg.id)

    def _write_data_and_header(self, paths: MessagePaths, message_id: str, body: bytes,
                               header: bytes) -> None:
        try:
            fd = _open_new(paths.data, retry_after_unlink=False)
        except FileNotFoundError:
            self._makedirs(os.path.dirname(paths.data))
            fd = _open_new(paths.data, retry_after_unlink=False)
        try:
            os.fchmod(fd, SPOOL_MODE)  # whatever the umask did
            lock_data_file(fd)
            _write_all(fd, f"{message_id}-D\n".encode("ascii"))
            _write_all(fd, body)
            os.fsync(fd)
            self._install_header(paths, header)
        except BaseException:
            try:
                os.unlink(paths.data)
            except OSError:
                pass
            raise
        finally:
            os.close(fd)

    def write_header(self, msg: SpoolMessage) -> None:
        """Replace the -H file of a message already on the spool (as Exim
        does after a delivery attempt), atomically and durably.  The caller
        should hold the lock on the message's -D file."""
        self._install_header(self.locate(msg.id), format_header_file(msg))

    def _install_header(self, paths: MessagePaths, header: bytes) -> None:
        fd = _open_new(paths.temp_header, retry_after_unlink=True)
        try:
            os.fchmod(fd, SPOOL_MODE)
            _write_all(fd, header)
            os.fsync(fd)
        except BaseException:
            os.close(fd)
            os.unlink(paths.temp_header)
            raise
        os.close(fd)
        try:
            os.rename(paths.temp_header, paths.header)
        except BaseException:
            os.unlink(paths.temp_header)
            raise
        # The rename is only durable once the directory entry is on disk.
        _fsync_directory(os.path.dirname(paths.header))

    def append_msglog(self, message_id: str, text: str) -> None:
        """Append *text* (whole lines) to the message's msglog file."""
        path = self.locate(message_id).msglog
        self._makedirs(os.path.dirname(path))
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, SPOOL_MODE)
        try:
            _write_all(fd, text.encode("latin-1"))
        finally:
            os.close(fd)

    # ------------------------------------------------------------ reading

    def read_header(self, message_id: str) -> SpoolMessage:
        """Parse the -H file of *message_id* (FileNotFoundError if there is
        none, SpoolFormatError if Exim could not read it)."""
        with open(self.locate(message_id).header, "rb") as f:
            return parse_header_file(f.read(), expected_id=message_id)

    def read_body(self, message_id: str) -> bytes:
        """The body of *message_id*: its -D file after the first line."""
        with open(self.locate(message_id).data, "rb") as f:
            first = f.read(DATA_START_OFFSET)
            if first != f"{message_id}-D\n".encode("ascii"):
                raise ValueError(f"{message_id}-D does not start with its name")
            return f.read()

    def scan_directories(self) -> list[tuple[str, str]]:
        """``(subdir, path)`` of ``input/`` and each one-character
        alphanumeric subdirectory of it (Exim scans them all)."""
        base = self.input_directory()
        found = [("", base)]
        try:
            entries = sorted(os.scandir(base), key=lambda e: e.name)
        except FileNotFoundError:
            return []
        for entry in entries:
            if len(entry.name) == 1 and entry.name.isascii() and entry.name.isalnum() \
                    and entry.is_dir(follow_symlinks=False):
                found.append((entry.name, entry.path))
        return found

    def list_ids(self) -> list[str]:
        """The ids of complete messages (those with a -H file), in Exim's
        queue order: by time, then by the sub-second part (the pid is
        ignored; ties are broken by id to be stable)."""
        ids = set()
        for _, path in self.scan_directories():
            try:
                names = os.listdir(path)
            except FileNotFoundError:
                continue
            for name in names:
                if len(name) == _SPOOL_NAME_LENGTH and name.endswith("-H"):
                    ids.add(name[:-2])
        return sorted(ids, key=lambda i: (i[:6], i[14:], i))

    # ------------------------------------------------------------ removing

    def remove(self, message_id: str) -> bool:
        """Delete every file of *message_id* from both the split and the
        unsplit places; True if anything was there.

        The -H file goes first, so that a crash part-way leaves an
        incomplete message (which recovery tidies) rather than a -H file
        whose body has gone.  (Exim removes -D first, but holds its lock.)
        """
        removed = False
        for split in (self.split, not self.split):
            paths = self.paths(message_id, split=split)
            for path in (paths.header, paths.data, paths.journal, paths.msglog,
                         paths.temp_header):
                try:
                    os.unlink(path)
                    removed = True
                except FileNotFoundError:
                    pass
        return removed
