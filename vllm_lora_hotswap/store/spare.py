"""Staging directories made ahead of a publisher's next version, with its weight file's pages already cached.

Why: a write into a new file makes the kernel find a fresh page for every 4 KiB
of it, and where fresh pages are dear that, not the copy, is the write's cost.
On a VM that hands freed memory back to its host (free page reporting, as on
the benchmark machine) every such page faults into the host, and 10 MB written
into a new file cost there an order of magnitude more CPU than the same bytes
written over a file whose pages the page cache holds (the policy-sync
benchmark shows what that does to the trainer's save: its one-engine path runs
with and without a spare). A pod whose memory limit the page cache has filled
pays the same way (each new page is reclaimed first). An RL trainer writes its
adapter, the same size every time, at every step, on the critical path of the
step's policy sync.

How: between two publications (``HotSwapCallback`` after a commit, or once
a rollout's batch is back), :meth:`CheckpointStore.prepare_next` makes the adapter's
next staging directory and asks a helper process to write a file of zeros of
the size just written into it (:data:`SPARE_FILE`, renamed into place once
complete). The helper runs at idle priority (``SCHED_IDLE``: only on a core
nothing else wants, so it never slows an engine, a rollout or the training
step), and is a process, not a thread, because a Python thread at idle
priority would hold up the publisher's other threads whenever it waits for the
GIL (CPython makes the thread that drops the GIL on request wait until the
requester has taken it). The next :meth:`CheckpointStore.open_version` of that
adapter takes the directory once the file is there whole, and
:meth:`StagedVersion.write_weights` writes a weight file of that size over it,
in place, then renames it to ``adapter_model.safetensors``. Anything else
(another size, a file written by other means, a spare not finished yet or
older than :data:`MAX_AGE_S`, no helper) leaves the write as without a spare;
an unused spare file is dropped at the commit, as any extra file, spares not
taken are removed when the process exits, and a spare directory left by a
process that was killed is a staging directory like any other: ``gc`` removes
it after its grace. Costs: the zeros are written once more (on NFS, sent to the
server at close), one directory and one file of the adapter's size wait per
adapter between steps, and one small Python process per publishing process.
"""

from __future__ import annotations

import atexit
import logging
import os
import shutil
import stat
import subprocess
import sys
import threading
import time
import uuid
import weakref
from dataclasses import dataclass, field
from pathlib import Path

from .files import make_dir, make_new_dir

logger = logging.getLogger("vllm.lora_hotswap")
SPARE_FILE = ".spare"  # not a weight file's name: a commit drops it if it is still there
MAX_AGE_S = 600.0  # a spare not taken by then is dropped (far inside gc's default grace of an hour)

# The helper: one request per line, "<size> <path in hex>"; it writes <path>.part, then renames
# it to <path>. Standard library only, isolated mode: it starts in milliseconds. It writes 64 KiB
# per call: a kernel without preemption (PREEMPT_NONE, common on VMs) lets a task that wakes on
# the helper's core in only when the helper's write call returns, and 10 MB of fresh pages take
# tens of milliseconds in one call.
_HELPER = r"""
import os, sys
try:
    os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
except (AttributeError, OSError):
    os.nice(19)
zeros = memoryview(bytes(65536))
for line in sys.stdin.buffer:
    size, path = line.split()
    path = bytes.fromhex(path.decode())
    part = path + b".part"
    try:
        fd = os.open(part, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
        try:
            os.fchmod(fd, 0o644)
            left = int(size)
            while left:
                left -= os.write(fd, zeros[: min(left, len(zeros))])
        finally:
            os.close(fd)
        os.rename(part, path)
    except OSError:
        try:
            os.unlink(part)
        except OSError:
            pass
"""


@dataclass
class Spare:
    """A staging directory made ahead, where the helper writes a file of zeros (:data:`SPARE_FILE`)."""

    directory: Path
    size: int
    made: float = field(default_factory=time.monotonic)

    @property
    def file(self) -> Path:
        return self.directory / SPARE_FILE

    def complete(self) -> bool:
        """The helper has written the whole file."""
        try:
            info = os.stat(self.file, follow_symlinks=False)
        except OSError:
            return False
        return stat.S_ISREG(info.st_mode) and info.st_size == self.size

    def remove(self) -> None:
        shutil.rmtree(self.directory, ignore_errors=True)


class _Helper:
    """The process that writes spares' zeros at idle priority; started on first use, ends when
    this process does (its standard input closes)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._process: subprocess.Popen[bytes] | None = None  # guarded by _lock

    def write(self, path: Path, size: int) -> bool:
        request = f"{size} {os.fsencode(path).hex()}\n".encode()
        process = self._running()
        if process is None:
            return False
        assert process.stdin is not None
        try:
            # One write call of a line far below PIPE_BUF: atomic against other threads' lines,
            # and never blocks (the helper reads them as it goes).
            os.write(process.stdin.fileno(), request)
        except OSError as exc:
            logger.debug("hot-swap: the spare writer is not available (%s)", exc)
            with self._lock:
                if self._process is process:
                    self._process = None
            return False
        return True

    def _running(self) -> subprocess.Popen[bytes] | None:
        """The helper, started if it is not running (the start outside the lock; of two threads
        that start one at once, the later one's ends: its standard input closes)."""
        with self._lock:
            process = self._process
        if process is not None and process.poll() is None:
            return process
        try:
            started = subprocess.Popen(
                [sys.executable, "-I", "-c", _HELPER],
                stdin=subprocess.PIPE,
                stdout=subprocess.DEVNULL,
                close_fds=True,
                bufsize=0,
            )
        except OSError as exc:
            logger.debug("hot-swap: the spare writer cannot start (%s)", exc)
            return None
        with self._lock:
            if self._process is process:  # nobody replaced it meanwhile
                self._process, started = started, None  # type: ignore[assignment]
            current = self._process
        if started is not None:  # another thread's helper is in place: this one ends
            assert started.stdin is not None
            started.stdin.close()
            try:
                started.wait(timeout=5)  # reaped: it exits once its standard input closes
            except subprocess.TimeoutExpired:
                started.kill()
        return current

    @property
    def pid(self) -> int | None:
        with self._lock:
            return None if self._process is None else self._process.pid


HELPER = _Helper()


class Spares:
    """One store's spares, at most one per adapter; :meth:`prepare` after a commit, :meth:`take`
    when a version is opened."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._spares: dict[str, Spare] = {}  # by adapter; guarded by _lock
        _LIVE.add(self)

    def prepare(self, staging_root: Path, adapter: str, size: int) -> bool:
        """Have ``adapter``'s spare made with a file of ``size`` zeros; False if one of that size
        is being made or waits already, or none can be."""
        if size <= 0:
            return False
        with self._lock:
            current = self._spares.get(adapter)
            if current is not None and current.size == size and not _expired(current):
                return False
            self._spares.pop(adapter, None)
        if current is not None:
            current.remove()  # of another size, or old: the helper's write into it fails quietly
        spare = Spare(staging_root / uuid.uuid4().hex, size)
        try:
            make_dir(staging_root)
            make_new_dir(spare.directory)
        except OSError as exc:
            logger.debug("hot-swap: no spare staging directory for %s (%s)", adapter, exc)
            return False
        if not HELPER.write(spare.file, size):
            spare.remove()
            return False
        with self._lock:
            self._spares[adapter] = spare
        return True

    def directory(self, adapter: str) -> Path | None:
        """``adapter``'s spare staging directory, whole or still being written; None if none."""
        with self._lock:
            spare = self._spares.get(adapter)
        return None if spare is None else spare.directory

    def ready(self, adapter: str) -> bool:
        """``adapter`` has a spare and its file is whole."""
        with self._lock:
            spare = self._spares.get(adapter)
        return spare is not None and spare.complete()

    def take(self, adapter: str) -> Spare | None:
        """``adapter``'s spare if its file is whole and it is fresh (then it is this caller's
        alone); None otherwise, a spare still being written staying for a later call."""
        with self._lock:
            spare = self._spares.get(adapter)
        if spare is None:
            return None
        expired = _expired(spare)
        if not expired and not spare.complete():
            return None
        with self._lock:
            if self._spares.get(adapter) is not spare:  # taken or replaced meanwhile
                return None
            del self._spares[adapter]
        if expired:
            spare.remove()
            return None
        try:
            os.utime(spare.directory)  # young again for gc's grace, now that a version is written there
        except OSError:  # removed meanwhile (a gc with a short grace): the version starts afresh
            spare.remove()
            return None
        return spare

    def discard(self) -> None:
        """Remove every spare not taken (at exit: nothing of this process will take them)."""
        with self._lock:
            spares, self._spares = list(self._spares.values()), {}
        for spare in spares:
            spare.remove()


def _expired(spare: Spare) -> bool:
    return time.monotonic() - spare.made > MAX_AGE_S


_LIVE: weakref.WeakSet[Spares] = weakref.WeakSet()


@atexit.register
def _discard_all() -> None:
    for spares in list(_LIVE):
        spares.discard()
