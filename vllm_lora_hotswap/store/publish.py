"""Publishing a version: copy into ``<adapter>/.staging/``, then commit by a rename.

The copy (the slow part: bytes and fsyncs) needs no lock. The commit allocates
the version's name and renames the staging directory into place under the
adapter's publish lock: a POSIX lock for other processes (the kernel drops it
if the publisher dies) and a thread lock within this one (POSIX locks are per
process).
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import os
import shutil
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from .checkpoint import (
    CONFIG_FILE,
    METADATA_FILE,
    READY_FILE,
    AdapterConfig,
    FileDigest,
    ReadyManifest,
    validate_checkpoint_dir,
)
from .errors import InvalidCheckpointError, NotFoundError, StoreError
from .files import (
    atomic_write,
    copy_and_hash,
    ensure_inside,
    fsync_dir,
    make_dir,
    make_new_dir,
    parse_json_bounded,
    write_new_file,
)
from .layout import LATEST_FILE, LOCK_FILE, RETIRED_FILE, STAGING_DIR
from .names import next_version

RESERVED_METADATA = frozenset({"adapter", "version", "created_at", "source", "publisher", "lora"})
# Per adapter directory: (lock, threads holding or waiting for it); dropped when none is.
_thread_locks: dict[str, tuple[threading.Lock, int]] = {}
_thread_locks_guard = threading.Lock()


@dataclass(frozen=True)
class CopiedVersion:
    """A version's files in a staging directory, not yet committed."""

    adapter: str
    adapter_dir: Path
    staging: Path
    source: str | None  # the directory copied from (metadata's "source"); None: written in place
    config: AdapterConfig
    extra: dict[str, Any]
    digests: dict[str, FileDigest]
    durable: bool = True  # False: no fsync anywhere (StagedVersion's durable=False)


def copy_in(
    root: Path, adapter_dir: Path, adapter: str, src_dir: str | os.PathLike[str], metadata: Mapping[str, Any] | None
) -> CopiedVersion:
    """The files of a new version of ``adapter``, copied and synced into a staging directory."""
    src = Path(src_dir)
    if not src.is_dir():
        raise NotFoundError(f"source {src} is not a directory")
    config, weights = validate_checkpoint_dir(src)
    extra = check_metadata(metadata)
    make_dir(adapter_dir)
    ensure_inside(root, adapter_dir)
    make_dir(adapter_dir / STAGING_DIR)
    staging = adapter_dir / STAGING_DIR / f"{uuid.uuid4().hex}"
    make_new_dir(staging)
    try:
        digests = {
            name: FileDigest(*copy_and_hash(src / name, staging / name)) for name in (CONFIG_FILE, weights.name)
        }
    except OSError as exc:  # e.g. the file system is full: nothing was committed
        shutil.rmtree(staging, ignore_errors=True)
        raise StoreError(
            f"publishing {adapter} from {src} into {root} failed: {exc.strerror or exc}; nothing was published"
        ) from exc
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return CopiedVersion(adapter, adapter_dir, staging, str(src.resolve()), config, extra, digests)


def commit(
    root: Path,
    copied: CopiedVersion,
    clock: Callable[[], datetime],
    versions: Callable[[], list[str]],
) -> str:
    """Commit ``copied`` under the next version name (``versions``: the names taken)."""
    try:
        with publish_lock(copied.adapter_dir):
            return _rename_into_place(copied, clock, max(versions(), default=None))
    except OSError as exc:
        shutil.rmtree(copied.staging, ignore_errors=True)
        raise StoreError(
            f"publishing {copied.adapter}{_from(copied.source)} into {root} failed: "
            f"{exc.strerror or exc}; nothing was published"
        ) from exc
    except BaseException:
        shutil.rmtree(copied.staging, ignore_errors=True)
        raise


def _rename_into_place(copied: CopiedVersion, clock: Callable[[], datetime], newest: str | None) -> str:
    staging, adapter_dir, digests = copied.staging, copied.adapter_dir, dict(copied.digests)
    for _ in range(100):  # a non-cooperating writer may take a name between listing and rename
        version = next_version(clock(), newest)
        metadata = {
            **copied.extra,
            "adapter": copied.adapter,
            "version": version,
            "created_at": datetime.now(UTC).isoformat(),
            "source": copied.source,
            "publisher": f"{socket.gethostname()}:{os.getpid()}",
            "lora": copied.config.summary(),
        }
        for name in (METADATA_FILE, READY_FILE):
            (staging / name).unlink(missing_ok=True)
        # Written in place, not atomically: nobody reads these two in the staging directory,
        # and its one fsync below makes both names durable before the rename publishes them.
        encoded = (json.dumps(metadata, indent=2, sort_keys=True) + "\n").encode()
        durable = copied.durable
        write_new_file(staging / METADATA_FILE, encoded, sync=durable)
        digests[METADATA_FILE] = FileDigest(len(encoded), hashlib.sha256(encoded).hexdigest())
        write_new_file(staging / READY_FILE, ReadyManifest(files=digests).to_json(), sync=durable)
        if durable:
            fsync_dir(staging)
        try:
            os.rename(staging, adapter_dir / version)
        except OSError as exc:
            if exc.errno in (errno.EEXIST, errno.ENOTEMPTY):
                newest = version
                continue
            raise
        if durable:
            fsync_dir(adapter_dir)
        # LATEST is a hint (readers list the version directories; a poll compares its content):
        # neither its bytes nor its rename are fsynced.
        atomic_write(adapter_dir / LATEST_FILE, version.encode(), sync=False)
        (adapter_dir / RETIRED_FILE).unlink(missing_ok=True)
        return version
    raise StoreError(f"could not allocate a version name under {adapter_dir}")


def _from(source: str | None) -> str:
    return "" if source is None else f" from {source}"


def check_metadata(metadata: Mapping[str, Any] | None) -> dict[str, Any]:
    if metadata is None:
        return {}
    if not isinstance(metadata, Mapping):
        raise InvalidCheckpointError(f"metadata must be a JSON object, got {type(metadata).__name__}")
    reserved = RESERVED_METADATA & set(metadata)
    if reserved:
        raise InvalidCheckpointError(f"metadata keys {sorted(reserved)} are reserved for the store")
    try:
        encoded = json.dumps(dict(metadata), allow_nan=False).encode()
    except (TypeError, ValueError) as exc:
        raise InvalidCheckpointError(f"metadata is not JSON-serialisable: {exc}") from None
    return parse_json_bounded(encoded, "metadata")


@contextmanager
def publish_lock(adapter_dir: Path, timeout: float = 60.0) -> Iterator[None]:
    with _thread_lock(str(adapter_dir)):
        fd = os.open(adapter_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            deadline = time.monotonic() + timeout
            while True:
                try:
                    fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except OSError as exc:
                    if exc.errno not in (errno.EACCES, errno.EAGAIN):
                        raise
                    if time.monotonic() > deadline:
                        raise StoreError(
                            f"timed out after {timeout:.0f}s waiting for the publish lock of {adapter_dir}"
                        ) from None
                    time.sleep(0.01)
            yield
        finally:
            os.close(fd)  # closing releases the lock


@contextmanager
def _thread_lock(key: str) -> Iterator[None]:
    with _thread_locks_guard:
        lock, users = _thread_locks.get(key) or (threading.Lock(), 0)
        _thread_locks[key] = (lock, users + 1)
    try:
        with lock:
            yield
    finally:
        with _thread_locks_guard:
            lock, users = _thread_locks[key]
            if users == 1:
                del _thread_locks[key]
            else:
                _thread_locks[key] = (lock, users - 1)
