"""Writing a new version straight into the store, so its bytes are written once.

:meth:`CheckpointStore.publish` copies a finished checkpoint directory in: the
trainer's save and the store's copy write every byte twice. A trainer that is
about to save anyway saves into the version's staging directory instead::

    with store.open_version("lora1", metadata={"step": 100}) as staged:
        model.save_pretrained(staged.path)
    staged.version  # committed on a clean exit; on an exception nothing is published

Committing reads each file once, from the page cache it was just written to:
the config is parsed, the weight file's header checked against it and its
floats checked for NaN/inf while the same bytes are hashed for ``READY``. That
was measured against hashing as the bytes are written (serialise to memory,
hash, write: ``python -m benchmarks.publish_path trainer``): for a 10 MB adapter
saving and then hashing from the page cache is cheaper (safetensors writes a
file faster than it serialises to bytes), and it keeps PEFT's own
``save_pretrained``. Then the same commit as a copied publish: metadata,
``READY``, one rename.

Durability, step by step (what a crash at each point can lose; docs/publishing.md):

1. the writer's files land in ``<adapter>/.staging/<id>/``, unsynced: a crash
   loses the version; readers never look there; ``gc`` removes it after its grace;
2. commit: every file checked, hashed, made 0644 and fsynced, then
   ``metadata.json`` and ``READY`` written and fsynced, and the staging
   directory fsynced: still invisible, so a crash still loses only this version;
3. the rename to ``<adapter>/<version>`` is the commit, and the adapter
   directory is fsynced right after: from then on the version survives a power
   loss whole (never a ``READY`` next to a short file);
4. ``LATEST`` is rewritten atomically: a crash before it leaves it naming the
   previous version, a hint only (readers list the version directories).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import threading
import time
import uuid
from collections.abc import Callable, Mapping
from datetime import datetime
from pathlib import Path
from typing import Any

from .checkpoint import (
    BIN_FILE,
    CONFIG_FILE,
    SAFETENSORS_FILE,
    AdapterConfig,
    FileDigest,
    check_finite,
    check_finite_bytes,
    check_lora_shapes,
    find_weight_file,
    parse_adapter_config,
    parse_safetensors_header,
    weight_specs,
)
from .errors import InvalidCheckpointError, StoreError
from .files import FILE_MODE, ensure_inside, hash_file, make_dir, make_new_dir
from .layout import STAGING_DIR
from .publish import CopiedVersion, check_metadata, commit

_SYNC_IN_THREAD_BYTES = 1 << 20


class StagedVersion:
    """A version being written in place; :attr:`path` is its staging directory.

    Write a PEFT LoRA there (``adapter_config.json`` and ``adapter_model.safetensors``
    or ``.bin``; any other file is dropped at the commit), then :meth:`commit`, or
    :meth:`abort`. As a context manager it commits on a clean exit and aborts on an
    exception. :attr:`timings` says where the commit's time went (seconds).
    """

    def __init__(
        self,
        root: Path,
        adapter_dir: Path,
        adapter: str,
        metadata: Mapping[str, Any] | None,
        clock: Callable[[], datetime],
        versions: Callable[[], list[str]],
    ):
        self.adapter = adapter
        self.version: str | None = None
        self.timings: dict[str, float] = {}
        self._root, self._adapter_dir, self._clock, self._versions = root, adapter_dir, clock, versions
        self._metadata = check_metadata(metadata)
        self._done = False
        try:
            make_dir(adapter_dir)
            ensure_inside(root, adapter_dir)
            make_dir(adapter_dir / STAGING_DIR)
            self.path = adapter_dir / STAGING_DIR / uuid.uuid4().hex
            make_new_dir(self.path)
        except OSError as exc:
            raise StoreError(
                f"publishing {adapter} into {root} failed: {exc.strerror or exc}; nothing was published"
            ) from exc

    def __fspath__(self) -> str:
        return str(self.path)

    def __enter__(self) -> StagedVersion:
        return self

    def __exit__(self, kind: type[BaseException] | None, *_: object) -> None:
        if self._done:  # committed or aborted by hand inside the block
            return
        if kind is None:
            self.commit()
        else:
            self.abort()

    def commit(self, metadata: Mapping[str, Any] | None = None) -> str:
        """Check, hash and sync what was written, and make it the adapter's newest READY
        version; returns its name. ``metadata`` replaces what :meth:`open_version` was given.
        On any failure the staging directory is removed and nothing is published."""
        if self._done:
            raise StoreError(f"{self.path}: this staged version of {self.adapter} was already committed or aborted")
        self._done = True
        try:
            extra = self._metadata if metadata is None else check_metadata(metadata)
            started = time.perf_counter()
            config, digests = seal(self.path)
            sealed = time.perf_counter()
        except OSError as exc:
            self.abort()
            raise StoreError(
                f"publishing {self.adapter} into {self._root} failed: {exc.strerror or exc}; nothing was published"
            ) from exc
        except BaseException:
            self.abort()
            raise
        copied = CopiedVersion(self.adapter, self._adapter_dir, self.path, None, config, extra, digests)
        self.version = commit(self._root, copied, self._clock, self._versions)  # removes the staging dir on failure
        self.timings = {"check+hash+fsync": sealed - started, "commit": time.perf_counter() - sealed}
        return self.version

    def abort(self) -> None:
        """Drop what was written; nothing is published."""
        self._done = True
        shutil.rmtree(self.path, ignore_errors=True)


def seal(staging: Path) -> tuple[AdapterConfig, dict[str, FileDigest]]:
    """Check the checkpoint written into ``staging`` as :func:`validate_checkpoint_dir` does,
    hash each file from the same read, and make each 0644 and durable (fsync)."""
    weights = find_weight_file(staging)
    keep = {CONFIG_FILE, weights.name}
    with os.scandir(staging) as entries:
        extra = [Path(e.path) for e in entries if e.name not in keep]
    for path in extra:  # PEFT's README.md, a second weight format: not part of a version
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink()
    config_path = staging / CONFIG_FILE
    syncs: list[threading.Thread] = []
    errors: list[OSError] = []
    try:
        try:
            config_bytes = _read_then_sync(config_path, syncs, errors)
        except FileNotFoundError:
            raise InvalidCheckpointError(f"{config_path}: missing (a PEFT LoRA needs adapter_config.json)") from None
        config = parse_adapter_config(config_bytes, str(config_path))
        digests = {CONFIG_FILE: FileDigest(len(config_bytes), hashlib.sha256(config_bytes).hexdigest())}
        if weights.name == SAFETENSORS_FILE:
            data = _read_then_sync(weights, syncs, errors)  # its fsync overlaps the checks and the hash
            specs = parse_safetensors_header(data, weights)
            check_lora_shapes(specs, config, str(weights))
            check_finite_bytes(data, specs, weights)
            digests[weights.name] = FileDigest(len(data), hashlib.sha256(data).hexdigest())
        else:  # a .bin state dict: torch loads it (weights_only) for the checks, then it is hashed
            assert weights.name == BIN_FILE
            check_lora_shapes(weight_specs(weights), config, str(weights))
            check_finite(weights)
            digests[weights.name] = FileDigest(*hash_file(weights))
            _read_then_sync(weights, syncs, errors, keep=False)
    finally:
        for thread in syncs:
            thread.join()
    if errors:
        raise errors[0]
    return config, digests


def _read_then_sync(path: Path, syncs: list[threading.Thread], errors: list[OSError], *, keep: bool = True) -> bytes:
    """The file's bytes (when ``keep``); then it is made 0644 (whatever the writer's umask) and
    fsynced: by a thread for a large file (appended to ``syncs``; its error to ``errors``), so
    the fsync overlaps the checks and the hash; inline for a small one, whose fsync is quick and
    whose thread would wait up to a GIL switch interval (5 ms) to finish."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)

    def sync() -> None:
        try:
            os.fchmod(fd, FILE_MODE)
            os.fsync(fd)
        except OSError as exc:
            errors.append(exc)
        finally:
            os.close(fd)

    try:
        data = b""
        if keep:
            with os.fdopen(os.dup(fd), "rb") as reader:
                data = reader.read()
        small = os.fstat(fd).st_size < _SYNC_IN_THREAD_BYTES
    except BaseException:
        os.close(fd)
        raise
    if small:
        sync()
        return data
    thread = threading.Thread(target=sync, name="hotswap-fsync", daemon=True)
    thread.start()
    syncs.append(thread)
    return data
