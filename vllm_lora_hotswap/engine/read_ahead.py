"""Weight files read ahead of their commit, so staging starts with the bytes in memory.

Why: on an RL step the trainer writes the adapter, then commits it (the config,
fsyncs, ``READY``, the rename), and only then does an engine learn of the
version, validate it and read and hash the weight file, one step after the
other on the critical path, while the engine sat idle during the commit. A
publisher that has just written the weight file (and hashed it,
:meth:`StagedVersion.write_weights`) can say so at once:
``POST /v1/lora/notify`` with ``{"adapter", "written": {"staging", "sha256",
"size"}}``. Each worker then reads that file from the staging directory and
hashes it while the commit runs (from the committed version instead, if the
commit renamed the staging directory before the notice came).

Trust: none in the notice. A read ahead is kept only if the bytes read hash to
the sha256 the notice claims, and staging uses it only if the committed
``READY`` records that same sha256 for the weight file: the bytes are then
exactly those of the committed file, as if read from it. Anything else (a
forged or stale notice, a file changed or gone, a commit that never comes)
leaves staging reading the committed file as before, and costs each worker
one read and hash of the named file. The file is opened without following a symlink
and read only if it is a regular file of the announced size, up to
:data:`MAX_BYTES`; at most :data:`MAX_ENTRIES` reads ahead of :data:`MAX_BYTES` in
all are held, and one not taken within :data:`MAX_AGE_S` is dropped.

A worker can go further than the bytes (``start(..., prepare=)``): it builds
the adapter from them and writes it into a free LoRA slot
(:mod:`.prepare_ahead`), and the entry holds that instead. The trust rule is the
same: staging adopts it only if ``READY`` records both the weights' and the
config's sha256 it was built from.
"""

from __future__ import annotations

import hashlib
import logging
import os
import stat
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass
from typing import BinaryIO, Protocol

from ..store.checkpoint import read_ready
from ..store.errors import InvalidCheckpointError
from ..store.store import version_names

logger = logging.getLogger("vllm.lora_hotswap")
MAX_BYTES = 4 << 30  # all reads ahead held at once, in bytes (a larger file is read at staging)
MAX_ENTRIES = 4  # reads ahead held at once (several adapters published together)
MAX_AGE_S = 120.0  # one not taken by then (its commit failed, or never came) is dropped
TAKE_PATIENCE_S = 30.0  # a stage waits this long at most for a read ahead still running


class Prepared(Protocol):
    """What a ``prepare`` hook makes of the bytes read ahead (:class:`.prepare_ahead.PreparedAdapter`)."""

    config_sha256: str  # of the adapter_config.json it was built with

    def discard(self) -> None:
        """Free what it holds (a LoRA slot): it will not be taken."""


# The weight file's path, its directory (an open descriptor: valid after the commit renames the
# directory, and only until the hook returns), and its bytes; it returns what it made of them,
# the bytes themselves untouched (it could not start), or None.
Prepare = Callable[[str, int, bytearray], Prepared | bytearray | None]


@dataclass
class _Entry:
    started: float  # time.monotonic()
    size: int
    # The bytes, once read and hashed to the sha256 (or what ``prepare`` made of them); None if not.
    data: Future[bytearray | Prepared | None]
    abandoned: bool = False  # a stage gave up waiting for it: discarded once done; guarded by _lock


def _discard(entries: list[_Entry]) -> None:
    """Free what dropped entries hold (called without the lock: a slot's release takes another)."""
    for entry in entries:
        held = entry.data.result() if entry.data.done() else None
        if held is not None and not isinstance(held, bytearray):
            held.discard()


class ReadsAhead:
    """A worker's reads ahead, by sha256: :meth:`start` from a notice, :meth:`take` at staging.

    Memory: the bytes of reads still running (wherever their entry went) and of reads done
    and not yet taken count against :data:`MAX_BYTES`, and :data:`MAX_ENTRIES` bounds the
    entries. Only a read that is done makes room (the oldest first), and a sweeper drops
    those not taken within :data:`MAX_AGE_S`, so memory held for a commit that never came
    is freed without a next notice.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._entries: dict[str, _Entry] = {}  # by sha256, oldest first; guarded by _lock
        self._running_bytes = 0  # of reads not yet done; guarded by _lock
        self._sweeper: threading.Thread | None = None  # runs while entries exist; guarded by _lock
        self.started = 0
        self.taken = 0  # stages that used a read ahead instead of reading the file
        self.discarded = 0  # reads that failed, or whose bytes were not the announced ones

    def start(self, path: str, sha256: str, size: int, prepare: Prepare | None = None) -> bool:
        """Read ``path`` (``size`` bytes, hashing to ``sha256``) in a thread, then hand the bytes
        to ``prepare`` if given (the entry holds what it returns); False when not started
        (already read or being read, or no room that a finished read could make)."""
        if not 0 < size <= MAX_BYTES:
            return False
        entry = _Entry(time.monotonic(), size, Future())
        dropped: list[_Entry] = []
        try:
            with self._lock:
                dropped += self._drop_stale(entry.started)
                if sha256 in self._entries:
                    return False
                while len(self._entries) >= MAX_ENTRIES or self._held() + size > MAX_BYTES:
                    done = next((key for key, e in self._entries.items() if e.data.done()), None)
                    if done is None:
                        return False
                    dropped.append(self._entries.pop(done))
                if self._held() + size > MAX_BYTES:  # reads dropped or taken still running
                    return False
                self._entries[sha256] = entry
                self._running_bytes += size
                self.started += 1
                if self._sweeper is None:
                    self._sweeper = threading.Thread(target=self._sweep, name="hotswap-read-ahead-sweep", daemon=True)
                    self._sweeper.start()
        finally:
            _discard(dropped)
        threading.Thread(
            target=self._read, args=(path, sha256, entry, prepare), name="hotswap-read-ahead", daemon=True
        ).start()
        return True

    def take(self, sha256: str) -> bytearray | Prepared | None:
        """The bytes read ahead that hash to ``sha256``, or what ``prepare`` made of them
        (waiting for a read still running), or None; each read ahead is taken once."""
        with self._lock:
            dropped = self._drop_stale(time.monotonic())
            entry = self._entries.pop(sha256, None)
        _discard(dropped)
        if entry is None:
            return None
        try:
            data = entry.data.result(TAKE_PATIENCE_S)
        except FutureTimeout:  # a stuck read: staging reads the committed file instead
            with self._lock:  # what it prepares is never taken: discarded here, or by _read once done
                entry.abandoned = True
                done = entry.data.done()
            if done:
                _discard([entry])
            return None
        if data is not None:
            with self._lock:
                self.taken += 1
        return data

    def _held(self) -> int:
        return self._running_bytes + sum(e.size for e in self._entries.values() if e.data.done())

    def _drop_stale(self, now: float) -> list[_Entry]:
        """Drop reads done and not taken within MAX_AGE_S (a running one is counted until it ends);
        the caller discards what they hold once it has let go of the lock."""
        stale = [k for k, e in self._entries.items() if e.data.done() and now - e.started > MAX_AGE_S]
        return [self._entries.pop(key) for key in stale]

    def _sweep(self) -> None:
        while True:
            time.sleep(max(MAX_AGE_S / 4, 0.05))
            with self._lock:
                dropped = self._drop_stale(time.monotonic())
                finished = not self._entries
                if finished:
                    self._sweeper = None
            _discard(dropped)
            if finished:
                return

    def _read(self, path: str, sha256: str, entry: _Entry, prepare: Prepare | None) -> None:
        data: bytearray | Prepared | None = None
        directory = None
        try:
            # The directory first: the publisher's commit may rename it any moment now.
            directory = _open_staging_or_committed(path, sha256)
            data = read_regular_file(os.path.basename(path), entry.size, dir_fd=directory)
            if data is not None and hashlib.sha256(data).hexdigest() != sha256:
                data = None
            if data is None:
                logger.debug("hot-swap: read ahead of %s: not the announced file; staging reads the commit", path)
            elif prepare is not None:
                # The bytes back if it could not start; None if it failed later (the bytes may be
                # half-scaled by then), and staging reads the commit.
                data = prepare(path, directory, data)
        except Exception as exc:  # noqa: BLE001 - a read ahead is only a hint: staging reads the file
            data = None
            logger.debug("hot-swap: read ahead of %s failed (%s); staging reads the commit", path, exc)
        finally:
            if directory is not None:
                os.close(directory)
            with self._lock:
                self._running_bytes -= entry.size
                self.discarded += data is None
                entry.data.set_result(data)
                abandoned = entry.abandoned
            if abandoned:
                _discard([entry])


_DIRECTORY_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_LOOK_BACK = 4  # newest versions of the adapter searched for a staging directory the commit renamed


def _open_staging_or_committed(path: str, sha256: str) -> int:
    """An open descriptor of the directory of ``path`` (``<adapter>/.staging/<id>/<weights>``),
    or, when the commit has renamed it already (the notice came late), of the newest version
    whose ``READY`` gives the weight file that sha256: the same bytes wherever they are read."""
    staging = os.path.dirname(path)
    try:
        return os.open(staging, _DIRECTORY_FLAGS)
    except FileNotFoundError:
        adapter_dir = os.path.dirname(os.path.dirname(staging))
        for name in reversed(version_names(adapter_dir)[-_LOOK_BACK:]):
            version = os.path.join(adapter_dir, name)
            try:
                manifest = read_ready(version)
            except (OSError, InvalidCheckpointError):
                continue
            digest = manifest.files.get(os.path.basename(path))
            if digest is not None and digest.sha256 == sha256:
                return os.open(version, _DIRECTORY_FLAGS)
        raise


def read_regular_file(path: str, size: int, *, dir_fd: int | None = None) -> bytearray | None:
    """The ``size`` bytes of the regular file ``path`` (relative to ``dir_fd`` if given; no
    symlink followed at the end, never blocking on a FIFO or device), or None when it is
    something else or of another size."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=dir_fd)
    with os.fdopen(fd, "rb", buffering=0) as reader:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode) or info.st_size != size:
            return None
        data, done = read_into_new_buffer(reader, size)
    return data if done == size else None  # else it shrank while read


# Bytes per read call. A kernel without preemption (PREEMPT_NONE, common on VMs) lets no other
# task onto this core until a call returns, and a call that reads 10 MB into fresh pages takes
# milliseconds: the engine's other processes (its API server noticing a commit) would wait.
READ_CHUNK = 1 << 20


def read_into_new_buffer(reader: BinaryIO, size: int) -> tuple[bytearray, int]:
    """Up to ``size`` bytes of ``reader`` (unbuffered) into one new writable buffer, and how many
    came (fewer at the end of the file), :data:`READ_CHUNK` bytes per call."""
    data = bytearray(size)
    view, done = memoryview(data), 0
    while done < size:
        count = reader.readinto(view[done : done + READ_CHUNK])
        if not count:
            break
        done += count
    return data, done


READS_AHEAD = ReadsAhead()  # this worker process's
