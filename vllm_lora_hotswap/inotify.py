"""Linux inotify through ctypes: a commit's rename is seen the moment the kernel reports it.

Why not ``watchfiles`` on the critical path: it batches changes until the
directory has been quiet for a step (and at most a debounce window), which
put 15-30 ms between a publish's commit and the engine noticing it. inotify
itself has no such wait; the store's watcher reads the queued events as soon
as the descriptor is readable and hints the adapters at once.

How: one inotify descriptor, non-recursive watches added and removed from any
thread (the kernel serialises them), and a self-pipe so :meth:`Inotify.read`
returns early when another thread wants the watch list looked at again.
Linux only; :func:`available` says whether it can be used here.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
import select
import struct
import sys
import threading
from dataclasses import dataclass

IN_MODIFY = 0x00000002
IN_ATTRIB = 0x00000004
IN_CLOSE_WRITE = 0x00000008
IN_MOVED_FROM = 0x00000040
IN_MOVED_TO = 0x00000080
IN_CREATE = 0x00000100
IN_DELETE = 0x00000200
IN_DELETE_SELF = 0x00000400
IN_MOVE_SELF = 0x00000800
IN_Q_OVERFLOW = 0x00004000
IN_IGNORED = 0x00008000
IN_ONLYDIR = 0x01000000
IN_ISDIR = 0x40000000
IN_NONBLOCK = os.O_NONBLOCK
IN_CLOEXEC = os.O_CLOEXEC
# What changes a store's visible state: names appearing (a commit's rename, LATEST/ACTIVE
# replaced), disappearing (gc, follow, a retired mark removed), written in place by a writer
# that does not rename, or the watched directory's own times touched (an engine's failure
# record lands in the version directory, and the store touches the adapter directory so that
# every other engine looks). Modifications of an open file are left out: the close says it.
STORE_EVENTS = (
    IN_ATTRIB
    | IN_CLOSE_WRITE
    | IN_MOVED_FROM
    | IN_MOVED_TO
    | IN_CREATE
    | IN_DELETE
    | IN_DELETE_SELF
    | IN_MOVE_SELF
    | IN_ONLYDIR
)
_HEADER = struct.Struct("iIII")  # struct inotify_event: wd, mask, cookie, len (name follows)
_READ_SIZE = 64 * 1024


@dataclass(frozen=True)
class Event:
    wd: int
    mask: int
    name: str  # the entry inside the watched directory ("" for the directory itself)

    @property
    def overflow(self) -> bool:
        return bool(self.mask & IN_Q_OVERFLOW)


_libc: ctypes.CDLL | None = None


def _lib() -> ctypes.CDLL:
    global _libc
    if _libc is None:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
        libc.inotify_init1.argtypes = [ctypes.c_int]
        libc.inotify_add_watch.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_uint32]
        libc.inotify_rm_watch.argtypes = [ctypes.c_int, ctypes.c_int]
        _libc = libc
    return _libc


def available() -> bool:
    """Whether inotify can be used in this process (Linux, a libc that has it)."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        return hasattr(_lib(), "inotify_init1")
    except OSError:
        return False


class Inotify:
    """One inotify descriptor and a wake pipe. ``add``/``remove``/``interrupt`` from any thread;
    ``read`` from one."""

    def __init__(self) -> None:
        fd = _lib().inotify_init1(IN_NONBLOCK | IN_CLOEXEC)
        if fd < 0:
            code = ctypes.get_errno()
            raise OSError(code, f"inotify_init1: {os.strerror(code)}")
        try:
            self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError:
            os.close(fd)
            raise
        self.fd = fd
        # poll, not select: a process with over 1,024 descriptors open (a serving engine can
        # be one) gets numbers select cannot wait on.
        self._poller = select.poll()
        self._poller.register(fd, select.POLLIN)
        self._poller.register(self._wake_r, select.POLLIN)
        self._lock = threading.Lock()
        self._closed = False

    def add(self, path: str | os.PathLike[str], mask: int = STORE_EVENTS) -> int:
        """Watch the directory ``path``; returns its watch descriptor.

        Raises:
            OSError: the path is gone, not a directory, or the watch limit is reached.
        """
        wd = _lib().inotify_add_watch(self.fd, os.fsencode(path), mask)
        if wd < 0:
            code = ctypes.get_errno()
            raise OSError(code, f"inotify_add_watch({os.fspath(path)!r}): {os.strerror(code)}")
        return wd

    def remove(self, wd: int) -> None:
        """Stop watching ``wd`` (one the kernel already dropped is no error)."""
        _lib().inotify_rm_watch(self.fd, wd)

    def interrupt(self) -> None:
        """Make a ``read`` in progress (or the next one) return at once."""
        with self._lock:  # never write into a closed descriptor's number, reused since
            if self._closed:
                return
            try:
                os.write(self._wake_w, b"\0")
            except BlockingIOError:  # the pipe is full: a wake is pending already
                pass

    def read(self, timeout: float | None) -> list[Event]:
        """Queued events, waiting up to ``timeout`` seconds for the first one (empty: timed
        out or interrupted)."""
        ready = self._poller.poll(None if timeout is None else max(0, round(timeout * 1000)))
        readable = {fd for fd, _ in ready}
        if self._wake_r in readable:
            try:
                while os.read(self._wake_r, 4096):
                    pass
            except BlockingIOError:
                pass
        if self.fd not in readable:
            return []
        try:
            data = os.read(self.fd, _READ_SIZE)
        except BlockingIOError:
            return []
        except OSError as exc:
            if exc.errno == errno.EINTR:
                return []
            raise
        events, offset = [], 0
        while offset + _HEADER.size <= len(data):
            wd, mask, _, length = _HEADER.unpack_from(data, offset)
            offset += _HEADER.size
            raw = data[offset : offset + length].split(b"\0", 1)[0]
            offset += length
            events.append(Event(wd, mask, os.fsdecode(raw)))
        return events

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            for fd in (self.fd, self._wake_r, self._wake_w):
                try:
                    os.close(fd)
                except OSError:
                    pass

    def __enter__(self) -> Inotify:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
