"""Writing a new version straight into the store, so its bytes are written once.

:meth:`CheckpointStore.publish` copies a finished checkpoint directory in: the
trainer's save and the store's copy write every byte twice. A trainer that is
about to save anyway saves into the version's staging directory instead::

    with store.open_version("lora1", metadata={"step": 100}) as staged:
        model.save_pretrained(staged.path)
    staged.version  # committed on a clean exit; on an exception nothing is published

A writer that has the tensors in memory hands them to
:meth:`StagedVersion.write_weights` (``trl_callbacks.save_adapter`` does, for a
staged version): a thread writes the safetensors file from the tensors' own
memory (:mod:`.safetensors_layout`) while the calling thread hashes the same
buffers for ``READY``, so the hash costs no time of its own; the version's
``on_written`` hook then runs (the publisher's notice: the engines start reading
the file) and the floats are checked for NaN/inf; the thread fsyncs the file
while the writer goes on (the commit's start), and the commit waits for that
fsync instead of reading the file back. Over a spare staging directory
(:mod:`.spare`) the file is written into pages the page cache holds already.
A file saved into :attr:`StagedVersion.path` by any other means (PEFT's ``save_pretrained``)
is read once at the commit, from the page cache it was just written to, and
checked and hashed from that read. ``python -m benchmarks.publish_path trainer``
measures both side by side. Then the same commit as a copied publish: metadata,
``READY``, one rename.

Durability, step by step (what a crash at each point can lose; docs/publishing.md):

1. the writer's files land in ``<adapter>/.staging/<id>/``, unsynced (the weight
   file of :meth:`StagedVersion.write_weights` is being synced): a crash loses the version;
   nothing is served from there (an engine told of the weight file may read it
   ahead, and uses it only if the committed ``READY`` has its sha256); ``gc``
   removes it after its grace;
2. commit: every file checked, hashed, made 0644 and fsynced, then
   ``metadata.json`` and ``READY`` written and fsynced, and the staging
   directory fsynced: still invisible, so a crash still loses only this version;
3. the rename to ``<adapter>/<version>`` is the commit, and the adapter
   directory is fsynced right after: from then on the version survives a power
   loss whole (never a ``READY`` next to a short file);
4. ``LATEST`` is replaced by a rename, nothing fsynced (a hint only: readers list
   the version directories): a crash before it leaves it naming the previous
   version.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import threading
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from .checkpoint import (
    BIN_FILE,
    CONFIG_FILE,
    SAFETENSORS_FILE,
    AdapterConfig,
    FileDigest,
    TensorSpec,
    check_finite,
    check_finite_bytes,
    check_lora_shapes,
    find_weight_file,
    parse_adapter_config,
    parse_safetensors_header,
    weight_specs,
)
from .errors import InvalidCheckpointError, StoreError
from .files import FILE_MODE, ensure_inside, hash_file, make_dir, make_new_dir, write_new_file, write_over_file
from .layout import STAGING_DIR
from .publish import CopiedVersion, check_metadata, commit
from .safetensors_layout import TensorBytes, safetensors_layout
from .spare import Spare

logger = logging.getLogger("vllm.lora_hotswap")
_SYNC_IN_THREAD_BYTES = 1 << 20
_WRITE_IN_THREAD_BYTES = 1 << 20


@dataclass(frozen=True)
class _WrittenWeights:
    """What :meth:`StagedVersion.write_weights` wrote: the file's digest and its tensors' specs,
    and the thread that fsyncs the file (with the list its error goes to; None: a small file,
    written inline and fsynced by :meth:`synced`)."""

    path: Path
    digest: FileDigest
    specs: dict[str, TensorSpec]
    sync: threading.Thread | None
    sync_errors: list[OSError]
    durable: bool = True  # False: never fsynced

    def synced(self) -> None:
        """Wait for the file's fsync (or make it); raise its error."""
        if not self.durable:
            return
        if self.sync is None:
            _fsync(self.path)
            return
        self.sync.join()
        if self.sync_errors:
            raise self.sync_errors[0]


class StagedVersion:
    """A version being written in place; :attr:`path` is its staging directory.

    Write a PEFT LoRA there (``adapter_config.json`` and ``adapter_model.safetensors``
    or ``.bin``; any other file is dropped at the commit), or hand the tensors to
    :meth:`write_weights` and write the config there; then :meth:`commit`, or
    :meth:`abort`. As a context manager it commits on a clean exit and aborts on an
    exception. :attr:`timings` says where the time went (seconds).
    """

    def __init__(
        self,
        root: Path,
        adapter_dir: Path,
        adapter: str,
        metadata: Mapping[str, Any] | None,
        clock: Callable[[], datetime],
        versions: Callable[[], list[str]],
        *,
        durable: bool = True,
        spare: Spare | None = None,
        on_written: Callable[[StagedVersion], object] | None = None,
    ):
        self.adapter = adapter
        self.durable = durable
        self.version: str | None = None
        self.timings: dict[str, float] = {}
        self._root, self._adapter_dir, self._clock, self._versions = root, adapter_dir, clock, versions
        self._metadata = check_metadata(metadata)
        self._done = False
        self._written: _WrittenWeights | None = None  # once write_weights checked the floats too
        self._digest: FileDigest | None = None  # once write_weights wrote and hashed the file
        self._on_written = on_written
        # Made ahead (:mod:`.spare`): its file of zeros takes a weight file of its size in place.
        self._spare = spare
        if spare is not None:
            self.path = spare.directory
            return
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

    @property
    def weights_digest(self) -> FileDigest | None:
        """The weight file's size and sha256 once :meth:`write_weights` wrote and hashed it (None
        before): what a notice of the written file tells the engines
        (``CommitNotifier.notify_written``)."""
        return self._digest

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

    def write_weights(self, tensors: Mapping[str, TensorBytes], metadata: Mapping[str, str] | None = None) -> None:
        """Write ``tensors`` as this version's ``adapter_model.safetensors`` (with safetensors'
        ``metadata``), straight from their memory, while this thread hashes the same bytes for
        ``READY``; then the ``on_written`` hook given to ``open_version`` runs, and the floats
        are checked for NaN/inf (a notice sent by the hook for a file that then fails the check
        costs the engines one read of it: the version is never committed). The file's fsync
        goes on in the background after this returns (a file under 1 MiB is fsynced by the
        commit), and the commit waits for it instead of reading the file back. The
        buffers must not change until this returns. Raises :class:`InvalidCheckpointError` for
        NaN/inf, ValueError for a tensor whose size is not its shape's, :class:`StoreError` if
        the write fails; abort the version then (a ``with`` block does).

        Example (``trl_callbacks.save_adapter`` does this with torch tensors)::

            staged.write_weights({"m.lora_A.weight": TensorBytes("F32", (8, 64), array_a), ...}, {"format": "pt"})
        """
        if self._done:
            raise StoreError(f"{self.path}: this staged version of {self.adapter} was already committed or aborted")
        started = time.perf_counter()
        header, buffers, specs = safetensors_layout(tensors, metadata)
        path = self.path / SAFETENSORS_FILE
        parts = [header, *(view for _, view in buffers)]
        size = sum(len(part) for part in parts)
        errors: list[BaseException] = []  # the write's (this call raises it)
        sync_errors: list[OSError] = []  # the fsync's (the commit raises it)
        written = threading.Event()
        in_thread = size >= _WRITE_IN_THREAD_BYTES  # a small file is written before a thread would start
        spare, self._spare = self._spare, None
        over = spare.file if spare is not None and spare.size == size else None

        def write() -> None:
            try:
                if over is None or not write_over_file(over, path, *parts, size=size):
                    write_new_file(path, *parts, sync=False)
            except BaseException as exc:  # noqa: BLE001 - raised by write_weights, on the caller's thread
                errors.append(exc)
                return
            finally:
                written.set()  # the caller's buffers are free from here
            if not in_thread or not self.durable:
                return  # the commit fsyncs it (off the training thread, for the callback), if durable
            try:  # synced now, beside the hash, the config's save and the commit's start
                _fsync(path)
            except OSError as exc:
                sync_errors.append(exc)

        writer = threading.Thread(target=write, name="hotswap-write", daemon=True)
        if in_thread:
            writer.start()
        else:
            writer.run()
        try:
            digest = hashlib.sha256(header)
            for _, view in buffers:
                digest.update(view)  # releases the GIL: runs beside the writer
        finally:
            written.wait()
        if errors:
            reason = getattr(errors[0], "strerror", None) or errors[0]
            raise StoreError(f"writing {path} failed: {reason}") from errors[0]
        self._digest = FileDigest(size, digest.hexdigest())
        if self._on_written is not None:  # the engines read the file while the floats are checked
            try:
                self._on_written(self)
            except Exception as exc:  # noqa: BLE001 - a notice is a hint; the write stands
                logger.debug("hot-swap: the written hook of %s failed (%s)", self.path, exc)
        for name, view in buffers:
            spec = specs[name]
            check_finite_bytes(view, {name: TensorSpec(spec.dtype, spec.shape)}, path)
        self._written = _WrittenWeights(
            path, self._digest, specs, writer if in_thread else None, sync_errors, self.durable
        )
        self.timings["write+hash"] = time.perf_counter() - started

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
            config, digests = seal(self.path, self._written, durable=self.durable)
            sealed = time.perf_counter()
        except OSError as exc:
            self.abort()
            raise StoreError(
                f"publishing {self.adapter} into {self._root} failed: {exc.strerror or exc}; nothing was published"
            ) from exc
        except BaseException:
            self.abort()
            raise
        copied = CopiedVersion(self.adapter, self._adapter_dir, self.path, None, config, extra, digests, self.durable)
        self.version = commit(self._root, copied, self._clock, self._versions)  # removes the staging dir on failure
        self.timings.update({"check+hash+fsync": sealed - started, "commit": time.perf_counter() - sealed})
        return self.version

    def abort(self) -> None:
        """Drop what was written; nothing is published."""
        self._done = True
        shutil.rmtree(self.path, ignore_errors=True)


def seal(
    staging: Path, written: _WrittenWeights | None = None, *, durable: bool = True
) -> tuple[AdapterConfig, dict[str, FileDigest]]:
    """Check the checkpoint written into ``staging`` as :func:`validate_checkpoint_dir` does,
    hash each file from the same read, and make each 0644 and durable (fsync; not with
    ``durable=False``). ``written``:
    what :meth:`StagedVersion.write_weights` learnt while writing the weight file, which
    stands for reading it (its size on disk is still checked)."""
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
            config_bytes = _read_then_sync(config_path, syncs, errors, durable=durable)
        except FileNotFoundError:
            raise InvalidCheckpointError(f"{config_path}: missing (a PEFT LoRA needs adapter_config.json)") from None
        config = parse_adapter_config(config_bytes, str(config_path))
        digests = {CONFIG_FILE: FileDigest(len(config_bytes), hashlib.sha256(config_bytes).hexdigest())}
        if weights.name == SAFETENSORS_FILE and written is not None:
            written.synced()  # hashed and checked as it was written, synced since: only its size is read
            size = os.stat(weights, follow_symlinks=False).st_size
            if size != written.digest.size:
                raise InvalidCheckpointError(
                    f"{weights}: {size} bytes on disk, {written.digest.size} were written (changed after write_weights?)"
                )
            check_lora_shapes(written.specs, config, str(weights))
            digests[weights.name] = written.digest
        elif weights.name == SAFETENSORS_FILE:
            data = _read_then_sync(
                weights, syncs, errors, durable=durable
            )  # its fsync overlaps the checks and the hash
            specs = parse_safetensors_header(data, weights)
            check_lora_shapes(specs, config, str(weights))
            check_finite_bytes(data, specs, weights)
            digests[weights.name] = FileDigest(len(data), hashlib.sha256(data).hexdigest())
        else:  # a .bin state dict: torch loads it (weights_only) for the checks, then it is hashed
            assert weights.name == BIN_FILE
            check_lora_shapes(weight_specs(weights), config, str(weights))
            check_finite(weights)
            digests[weights.name] = FileDigest(*hash_file(weights))
            _read_then_sync(weights, syncs, errors, keep=False, durable=durable)
    finally:
        for thread in syncs:
            thread.join()
    if errors:
        raise errors[0]
    return config, digests


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _read_then_sync(
    path: Path, syncs: list[threading.Thread], errors: list[OSError], *, keep: bool = True, durable: bool = True
) -> bytes:
    """The file's bytes (when ``keep``); then it is made 0644 (whatever the writer's umask) and
    fsynced (if ``durable``): by a thread for a large file (appended to ``syncs``; its error to
    ``errors``), so the fsync overlaps the checks and the hash; inline for a small one, whose
    fsync is quick and whose thread would wait up to a GIL switch interval (5 ms) to finish."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)

    def sync() -> None:
        try:
            os.fchmod(fd, FILE_MODE)
            if durable:
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
        small = not durable or os.fstat(fd).st_size < _SYNC_IN_THREAD_BYTES
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
