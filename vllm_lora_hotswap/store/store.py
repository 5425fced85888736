"""The checkpoint store: the one source of truth trainers write and engines follow.

Layout (a shared directory; CPFS or NFS in production)::

    <root>/<adapter>/<version>/{adapter_config.json, adapter_model.safetensors, metadata.json, READY}
    <root>/<adapter>/LATEST      newest version's name, rewritten by every publish
    <root>/<adapter>/ACTIVE      optional pin (rollback); absent = follow the newest
    <root>/<adapter>/RETIRED     optional: engines stop serving the adapter
    <root>/<adapter>/<version>/KEEP, FAILED.<instance>.json
    <root>/.instances/<instance-id>.json

A publish copies into ``<adapter>/.staging/`` on the same file system (or a
trainer saves there directly: :meth:`CheckpointStore.open_version`, no second
copy), fsyncs, writes ``metadata.json`` and ``READY`` and renames the directory
into place: the rename is the commit, so a reader never sees a READY version
with missing or partial files. Every file is fsynced before the rename and the
adapter directory right after it, so a crash at any point loses at most the
version being published, never a committed one (step by step: :mod:`.staged`,
docs/publishing.md). Version names are allocated under a per-adapter POSIX lock
(released by the kernel if the publisher dies), so they sort in publication
order even with concurrent publishers or a clock that jumps backwards.
"""

from __future__ import annotations

import os
import shutil
import time
import uuid
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from .checkpoint import (
    METADATA_FILE,
    READY_FILE,
    SAFETENSORS_FILE,
    AdapterConfig,
    check_lora_shapes,
    find_weight_file,
    read_adapter_config,
    read_ready,
    verify_manifest,
    weight_specs,
)
from .errors import (
    InvalidCheckpointError,
    NotFoundError,
    PartialPublishError,
    StoreError,
    UnreadableError,
)
from .files import (
    atomic_write,
    ensure_inside,
    make_dir,
    make_new_dir,
    read_json_bounded,
    read_small_text,
)
from .layout import (
    FAILED_PREFIX,
    INSTANCES_DIR,
    KEEP_FILE,
    LATEST_FILE,
    PIN_FILE,
    RETIRED_FILE,
    STAGING_DIR,
)
from .names import (
    check_adapter_name,
    check_instance_id,
    check_version_name,
    is_version_name,
)
from .publish import CopiedVersion, commit, copy_in
from .records import FailureRecord, InstanceRecord
from .spare import Spares
from .staged import StagedVersion


class StoreUnavailableError(StoreError):
    """The store root is missing or unreadable (unmounted, renamed, permissions)."""


@dataclass(frozen=True)
class VersionInfo:
    adapter: str
    version: str
    path: Path
    config: AdapterConfig
    weight_file: Path
    metadata: Mapping[str, Any]
    ready_at: float  # mtime of READY: when the version was committed

    @property
    def size_bytes(self) -> int:
        return self.weight_file.stat().st_size


@dataclass(frozen=True)
class VersionEntry:
    """A READY version as ``lora-hotswap list`` shows it."""

    version: str
    kept: bool
    failed_on: tuple[str, ...]
    metadata: Mapping[str, Any] = field(default_factory=dict)


@dataclass
class GcReport:
    deleted: list[str] = field(default_factory=list)  # "adapter/version"
    abandoned: list[str] = field(default_factory=list)  # paths of partial writes removed
    instances: list[str] = field(default_factory=list)  # records of instances gone for over ``grace``


def version_names(adapter_dir: str | os.PathLike[str]) -> list[str]:
    """The version directories of ``adapter_dir``, oldest first (symlinks are never versions);
    none if it does not exist."""
    try:
        with os.scandir(adapter_dir) as entries:
            return sorted(e.name for e in entries if is_version_name(e.name) and e.is_dir(follow_symlinks=False))
    except FileNotFoundError:
        return []


class CheckpointStore:
    """Versioned LoRA checkpoints under one root directory."""

    def __init__(self, root: str | os.PathLike[str], *, clock: Callable[[], datetime] | None = None):
        self.root = Path(root)
        self._clock = clock or (lambda: datetime.now(UTC))
        self._spares = Spares()  # staging directories made ahead by prepare_next

    # -- paths -------------------------------------------------------------------------
    def adapter_dir(self, adapter: str) -> Path:
        return ensure_inside(self.root, self.root / check_adapter_name(adapter))

    def version_dir(self, adapter: str, version: str) -> Path:
        return ensure_inside(self.root, self.adapter_dir(adapter) / check_version_name(version))

    def _require_root(self) -> None:
        if not self.root.is_dir():
            raise StoreUnavailableError(f"store root {self.root} is not a readable directory")

    # -- reading -----------------------------------------------------------------------
    def adapters(self) -> list[str]:
        """Adapter names in the store (directories with a valid name), sorted."""
        self._require_root()
        names = []
        with os.scandir(self.root) as entries:
            for entry in entries:
                try:
                    check_adapter_name(entry.name)
                except StoreError:
                    continue
                if entry.is_dir(follow_symlinks=False):
                    names.append(entry.name)
        return sorted(names)

    def _version_names(self, adapter: str) -> list[str]:
        """Version directories, oldest first; symlinks are never versions."""
        return version_names(self.adapter_dir(adapter))

    def is_ready(self, adapter: str, version: str) -> bool:
        return (self.version_dir(adapter, version) / READY_FILE).is_file()

    def versions(self, adapter: str) -> list[str]:
        """READY versions of ``adapter``, oldest first (= publication order)."""
        return [v for v in self._version_names(adapter) if self.is_ready(adapter, v)]

    def pinned_version(self, adapter: str) -> str | None:
        pin = read_small_text(self.adapter_dir(adapter) / PIN_FILE)
        return pin or None

    def is_retired(self, adapter: str) -> bool:
        return (self.adapter_dir(adapter) / RETIRED_FILE).exists()

    def failures(self, adapter: str, version: str) -> list[FailureRecord]:
        directory = self.version_dir(adapter, version)
        records = []
        try:
            names = sorted(n for n in os.listdir(directory) if n.startswith(FAILED_PREFIX))
        except FileNotFoundError:
            return []
        for name in names:
            try:
                records.append(FailureRecord.model_validate(read_json_bounded(directory / name)))
            except (OSError, ValueError, StoreError):
                instance = name.removeprefix(FAILED_PREFIX).removesuffix(".json")
                records.append(FailureRecord(instance_id=instance, phase="?", reason="unreadable failure record"))
        return records

    def _is_failed(self, adapter: str, version: str) -> bool:
        try:
            return any(n.startswith(FAILED_PREFIX) for n in os.listdir(self.version_dir(adapter, version)))
        except FileNotFoundError:
            return False

    def active_version(self, adapter: str) -> str | None:
        """The pin if present, else the newest READY version no engine marked failed."""
        pin = self.pinned_version(adapter)
        if pin is not None:
            return pin
        for version in reversed(self._version_names(adapter)):
            if self.is_ready(adapter, version) and not self._is_failed(adapter, version):
                return version
        return None

    def failed_versions_after(self, adapter: str, version: str | None) -> dict[str, list[FailureRecord]]:
        """READY versions newer than ``version`` that an engine marked failed, newest first."""
        failed = {}
        for candidate in reversed(self._version_names(adapter)):
            if version is not None and candidate <= version:
                break
            if self.is_ready(adapter, candidate) and (records := self.failures(adapter, candidate)):
                failed[candidate] = records
        return failed

    def poll_signature(self, adapter: str) -> tuple[str | None, str | None, int]:
        """Cheap change detector: two small reads and one stat, whatever the version count.

        Reading LATEST/ACTIVE (rather than only stat-ing the directory) gets
        close-to-open freshness on NFS, where directory attributes are cached.
        """
        directory = self.adapter_dir(adapter)
        latest = read_small_text(directory / LATEST_FILE)
        pin = read_small_text(directory / PIN_FILE)
        try:
            mtime = os.stat(directory).st_mtime_ns
        except FileNotFoundError:
            raise NotFoundError(f"adapter {adapter!r} not found in {self.root}") from None
        return latest, pin, mtime

    def read_metadata(self, adapter: str, version: str) -> dict[str, Any]:
        path = self.version_dir(adapter, version) / METADATA_FILE
        try:
            value = read_json_bounded(path)
        except FileNotFoundError:
            return {}
        if not isinstance(value, dict):
            raise InvalidCheckpointError(f"{path}: expected a JSON object")
        return value

    def entries(self, adapter: str) -> list[VersionEntry]:
        """READY versions with their keep/failure marks and metadata, oldest first."""
        result = []
        for version in self.versions(adapter):
            directory = self.version_dir(adapter, version)
            try:
                metadata = self.read_metadata(adapter, version)
            except (OSError, StoreError):
                metadata = {"error": "unreadable metadata.json"}
            result.append(
                VersionEntry(
                    version=version,
                    kept=(directory / KEEP_FILE).exists(),
                    failed_on=tuple(r.instance_id for r in self.failures(adapter, version)),
                    metadata=metadata,
                )
            )
        return result

    def validate(self, adapter: str, version: str, *, read_weights: bool = True) -> VersionInfo:
        """Everything the store can check before an engine loads a version.

        READY present and well-formed, every listed file with its size and
        sha256, a PEFT LoRA config, and weight shapes consistent with it.
        ``read_weights=False`` reads only a safetensors weight file's header (for
        the shapes) and its size, not its tensor data: for a reader that hashes
        it against READY in the one pass that loads it (an engine's staging).
        """
        directory = self.version_dir(adapter, version)
        ready = directory / READY_FILE
        try:
            manifest = read_ready(directory)
            ready_at = os.stat(ready).st_mtime
        except FileNotFoundError:
            raise NotFoundError(f"{adapter}@{version}: no READY version at {directory}") from None
        except PermissionError:
            raise UnreadableError(f"{ready}: cannot read (Permission denied)") from None
        verify_manifest(directory, manifest, unread=() if read_weights else (SAFETENSORS_FILE,))
        config = read_adapter_config(directory)
        weights = find_weight_file(directory)
        if manifest.files and weights.name not in manifest.files:
            raise InvalidCheckpointError(f"{weights}: not listed in READY")
        try:
            check_lora_shapes(weight_specs(weights), config, str(weights))
        except PermissionError:
            raise UnreadableError(f"{weights}: cannot read (Permission denied)") from None
        return VersionInfo(
            adapter, version, directory, config, weights, self.read_metadata(adapter, version), ready_at
        )

    # -- writing -----------------------------------------------------------------------
    def publish(self, adapter: str, src_dir: str | os.PathLike[str], metadata: Mapping[str, Any] | None = None) -> str:
        """Copy the PEFT LoRA in ``src_dir`` into the store as a new READY version.

        Returns the new version's name. Nothing is visible to readers unless
        the whole version (files, metadata, READY) was committed.
        """
        return self._commit(self._copy_in(adapter, src_dir, metadata))

    def publish_many(
        self, sources: Mapping[str, str | os.PathLike[str]], metadata: Mapping[str, Any] | None = None
    ) -> dict[str, str]:
        """Publish a new version of several adapters at once (the policies of one RL step):
        every copy is written and synced first, then the versions are committed together,
        so they become READY within milliseconds of each other instead of a copy and an
        fsync queue apart. Returns adapter -> version. Each version commits on its own: if
        some fail, the others are still published, and :class:`PartialPublishError` says
        which were (``published``) and why each other one was not (``errors``)."""
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(max(1, len(sources)), thread_name_prefix="publish") as pool:
            copies = {adapter: pool.submit(self._copy_in, adapter, src, metadata) for adapter, src in sources.items()}
            errors: dict[str, BaseException] = {
                a: e for a, copy in copies.items() if (e := copy.exception()) is not None
            }
            commits = {a: pool.submit(self._commit, copy.result()) for a, copy in copies.items() if a not in errors}
            errors.update({a: e for a, done in commits.items() if (e := done.exception()) is not None})
        published = {adapter: done.result() for adapter, done in commits.items() if adapter not in errors}
        if errors:
            raise PartialPublishError(published, errors)
        return published

    def open_version(
        self,
        adapter: str,
        metadata: Mapping[str, Any] | None = None,
        *,
        durable: bool = True,
        on_written: Callable[[StagedVersion], object] | None = None,
    ) -> StagedVersion:
        """A new version of ``adapter`` to write in place, with no second copy: write the PEFT
        LoRA into ``.path``, then commit (see :class:`StagedVersion`)::

            with store.open_version("lora1", {"step": 100}) as staged:
                model.save_pretrained(staged.path)

        ``durable=False`` skips every fsync (for versions published at every RL step): a
        killed publisher still never leaves a torn or half-visible version, but an OS crash
        or power loss may lose the last versions, or leave one whose files are short, which
        every engine refuses (its ``READY`` sha256 does not match); see docs/publishing.md.
        ``on_written(staged)`` runs as soon as :meth:`StagedVersion.write_weights` has written
        and hashed the weight file (``HotSwapCallback`` sends its written notice from it)::

            store.open_version("policy", on_written=lambda s: notifier.notify_written("policy", s))
        """
        return StagedVersion(
            self.root,
            self.adapter_dir(adapter),
            adapter,
            metadata,
            self._clock,
            lambda: self._version_names(adapter),
            durable=durable,
            spare=self._spares.take(adapter),
            on_written=on_written,
        )

    def prepare_next(self, adapter: str, size: int) -> bool:
        """Make ``adapter``'s next staging directory now, in the background at idle priority,
        with a file of ``size`` zeros whose pages the page cache then holds: the next
        :meth:`open_version` of ``adapter`` takes it, and a weight file of that size written by
        :meth:`StagedVersion.write_weights` lands in those pages instead of new ones (see
        :mod:`.spare`). False if one of that size is ready or being made already.

        Example (``HotSwapCallback`` does this after each commit)::

            version = staged.commit()
            store.prepare_next("policy", staged.weights_digest.size)
        """
        return self._spares.prepare(self.adapter_dir(adapter) / STAGING_DIR, adapter, size)

    def spare_ready(self, adapter: str) -> bool:
        """Whether ``adapter``'s next staging directory (:meth:`prepare_next`) is made and waits
        for the next :meth:`open_version`."""
        return self._spares.ready(adapter)

    def spare_directory(self, adapter: str) -> Path | None:
        """``adapter``'s next staging directory (:meth:`prepare_next`), made or still being made,
        which the next :meth:`open_version` takes once ready; None if there is none."""
        return self._spares.directory(adapter)

    def _copy_in(
        self, adapter: str, src_dir: str | os.PathLike[str], metadata: Mapping[str, Any] | None
    ) -> CopiedVersion:
        return copy_in(self.root, self.adapter_dir(adapter), adapter, src_dir, metadata)

    def _commit(self, copied: CopiedVersion) -> str:
        return commit(self.root, copied, self._clock, lambda: self._version_names(copied.adapter))

    def pin(self, adapter: str, version: str) -> None:
        """Roll back (or forward): every engine serves ``version`` until :meth:`follow`."""
        if not self.is_ready(adapter, version):
            raise NotFoundError(f"{adapter}@{version}: no READY version to pin")
        atomic_write(self.adapter_dir(adapter) / PIN_FILE, version.encode())

    def follow(self, adapter: str) -> None:
        """Remove the pin: engines follow the newest READY version again."""
        if not self.adapter_dir(adapter).is_dir():
            raise NotFoundError(f"adapter {adapter!r} not found in {self.root}")
        (self.adapter_dir(adapter) / PIN_FILE).unlink(missing_ok=True)

    def set_kept(self, adapter: str, version: str, kept: bool) -> None:
        """Mark a version kept (gc never deletes it) or clear the mark."""
        if not self.is_ready(adapter, version):
            raise NotFoundError(f"{adapter}@{version}: no READY version")
        marker = self.version_dir(adapter, version) / KEEP_FILE
        if kept:
            atomic_write(marker, b"")
        else:
            marker.unlink(missing_ok=True)

    def retire(self, adapter: str) -> None:
        """Engines stop serving ``adapter`` and free its slots; its versions stay on disk."""
        if not self.adapter_dir(adapter).is_dir():
            raise NotFoundError(f"adapter {adapter!r} not found in {self.root}")
        atomic_write(self.adapter_dir(adapter) / RETIRED_FILE, b"")

    def record_failure(self, adapter: str, version: str, instance_id: str, phase: str, reason: str) -> None:
        """Mark ``version`` failed on ``instance_id`` so no engine retries it in a loop."""
        check_instance_id(instance_id)
        record = FailureRecord(instance_id=instance_id, phase=phase, reason=reason[:4000], at=time.time())
        directory = self.version_dir(adapter, version)
        try:
            atomic_write(directory / f"{FAILED_PREFIX}{instance_id}.json", record.model_dump_json(indent=2).encode())
            # Failure records live in the version directory; touch the adapter
            # directory so every engine's poll signature sees the change.
            os.utime(self.adapter_dir(adapter))
        except FileNotFoundError:
            pass  # the version was deleted meanwhile: nothing left to mark

    # -- instances ---------------------------------------------------------------------
    def write_instance_record(self, record: InstanceRecord) -> None:
        directory = self.root / INSTANCES_DIR
        self._require_root()
        try:
            # Not make_dir: a heartbeat must never recreate a root that was unmounted or moved.
            make_new_dir(directory)
        except FileExistsError:
            pass
        atomic_write(
            directory / f"{check_instance_id(record.instance_id)}.json", record.model_dump_json(indent=2).encode()
        )

    def instance_records(self) -> list[InstanceRecord]:
        """Every readable instance record; damaged ones are skipped."""
        self._require_root()
        records = []
        try:
            names = sorted(os.listdir(self.root / INSTANCES_DIR))
        except FileNotFoundError:
            return []
        for name in names:
            if not name.endswith(".json") or name.startswith("."):
                continue
            try:
                records.append(InstanceRecord.model_validate(read_json_bounded(self.root / INSTANCES_DIR / name)))
            except (OSError, ValueError, StoreError):
                continue
        return records

    def remove_instance_record(self, instance_id: str) -> None:
        (self.root / INSTANCES_DIR / f"{check_instance_id(instance_id)}.json").unlink(missing_ok=True)

    # -- retention ---------------------------------------------------------------------
    def gc(self, keep: int | None = None, grace: float = 3600.0, adapters: Iterable[str] | None = None) -> GcReport:
        """Delete old versions and abandoned partial writes (of ``adapters``, default all).

        Keeps the newest ``keep`` READY versions (all when None), the pinned
        and active versions, versions marked kept, and every version an alive
        instance has installed. Partial writes older than ``grace`` seconds go,
        and so do the records of instances with no heartbeat for ``grace`` seconds
        (replaced pods, offline engines of finished processes).
        """
        if keep is not None and keep < 1:
            raise ValueError(f"keep must be at least 1, got {keep}")
        report = GcReport()
        in_use: dict[str, set[str]] = {}
        now = time.time()
        for record in self.instance_records():
            if now - record.heartbeat > grace:
                self.remove_instance_record(record.instance_id)
                report.instances.append(record.instance_id)
            elif not record.is_stale():
                for adapter, serving in record.adapters.items():
                    in_use.setdefault(adapter, set()).update(serving.installed_versions)
                    if serving.served_version:
                        in_use[adapter].add(serving.served_version)
        for adapter in self.adapters() if adapters is None else [check_adapter_name(a) for a in adapters]:
            adapter_dir = self.adapter_dir(adapter)
            self._clean_staging(adapter_dir / STAGING_DIR, now, grace, report)
            ready = self.versions(adapter)
            protected = set(ready if keep is None else ready[-keep:])
            protected |= {self.pinned_version(adapter), self.active_version(adapter)} | in_use.get(adapter, set())
            for version in self._version_names(adapter):
                directory = adapter_dir / version
                if version in ready:
                    if version in protected or (directory / KEEP_FILE).exists():
                        continue
                    self._delete_tree(adapter_dir, directory)
                    report.deleted.append(f"{adapter}/{version}")
                elif _older_than(directory, now, grace):
                    self._delete_tree(adapter_dir, directory)
                    report.abandoned.append(str(directory))
        return report

    def _clean_staging(self, staging_root: Path, now: float, grace: float, report: GcReport) -> None:
        try:
            entries = list(os.scandir(staging_root))
        except FileNotFoundError:
            return
        for entry in entries:
            path = Path(entry.path)
            if entry.name.startswith(".trash-") or _older_than(path, now, grace):
                shutil.rmtree(path, ignore_errors=True)
                report.abandoned.append(str(path))

    @staticmethod
    def _delete_tree(adapter_dir: Path, directory: Path) -> None:
        # Move out of sight first (atomic), then delete at leisure.
        make_dir(adapter_dir / STAGING_DIR)
        trash = adapter_dir / STAGING_DIR / f".trash-{directory.name}-{uuid.uuid4().hex[:8]}"
        os.rename(directory, trash)
        shutil.rmtree(trash, ignore_errors=True)


def _older_than(path: Path, now: float, grace: float) -> bool:
    try:
        return now - os.stat(path).st_mtime > grace
    except FileNotFoundError:
        return False
