"""Write versions into a store the way a buggy or foreign publisher would.

``CheckpointStore.publish`` refuses bad checkpoints, so tests that need a bad
version in the store (to show engines refuse it) commit one directly: the same
layout, READY with correct checksums of whatever files are there.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

from vllm_lora_hotswap.store import CheckpointStore, next_version
from vllm_lora_hotswap.store.checkpoint import FileDigest, ReadyManifest
from vllm_lora_hotswap.store.files import atomic_write, hash_file


def inject_version(
    store: CheckpointStore,
    adapter: str,
    src: Path,
    *,
    manifest: bool = True,
    ready: bool = True,
    after_ready: Callable[[Path], None] | None = None,
) -> str:
    """Commit ``src``'s files as a new version of ``adapter`` without validating them
    (``after_ready`` changes the files once READY has recorded their checksums)."""
    adapter_dir = store.adapter_dir(adapter)
    adapter_dir.mkdir(parents=True, exist_ok=True)
    newest = max(store._version_names(adapter), default=None)
    version = next_version(datetime.now(UTC), newest)
    staging = adapter_dir / ".staging" / f"inject-{version}"
    staging.parent.mkdir(exist_ok=True)
    shutil.copytree(src, staging, symlinks=True)
    if ready:
        digests = {p.name: FileDigest(*hash_file(p)) for p in sorted(staging.iterdir()) if manifest and p.is_file()}
        atomic_write(staging / "READY", ReadyManifest(files=digests).to_json() if manifest else b"")
    if after_ready is not None:
        after_ready(staging)
    os.rename(staging, adapter_dir / version)
    atomic_write(adapter_dir / "LATEST", version.encode())
    return version
