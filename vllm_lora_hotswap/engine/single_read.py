"""Staging reads a version's weight file once: hashed against READY, loaded from the same bytes.

Why: hashing the weight file in the API server's validation and then loading it
in each worker's staging would read every byte twice on the critical path of a
swap. How: validation leaves the tensor data unread (``CheckpointStore.validate(read_weights=False)``:
READY, sizes, the small files' hashes, the config, the weight file's header for
the shapes) and each worker's staging thread reads the weight file once into
memory: the bytes are hashed, then vLLM's own loader (``_load_adapter``: its
checks, its name mapping) gets its tensors from those bytes instead of opening
the file again. The config is read by validation and by vLLM's loader, once
each, as before. The digest still gates the install: :meth:`SingleRead.verify`
runs before the adapter is written into a slot or reported ready, and a
mismatch fails the stage ("checksum mismatch"), which refuses the version.
After a publisher's written notice the bytes may have been read ahead, and the
adapter built from them ahead (:mod:`.read_ahead`, :mod:`.prepare_ahead`): the
stage takes them only if READY records their sha256 (and, for an adapter built
ahead, its config's), and :attr:`SingleRead.prepared` then holds the adapter.

How vLLM's loader gets the bytes: ``vllm.lora.lora_model`` opens the file with
``safetensors.safe_open``; that module's ``safetensors`` name is replaced by a
proxy whose ``safe_open`` serves the file a thread registered (only in that
thread, only for that path) and passes every other call to safetensors. Where
the name is missing (another vLLM), nothing is replaced and vLLM reads the file
itself: a second read, never a weaker check. A ``.bin`` weight file is
validated whole by the API server as before and then loaded by vLLM (two
reads: torch loads a pickle only from a file, and only behind that check).
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from ..store.checkpoint import (
    CONFIG_FILE,
    SAFETENSORS_FILE,
    TORCH_DTYPE_NAMES,
    TensorSpec,
    find_weight_file,
    parse_safetensors_header,
    read_ready,
    verify_manifest,
)
from ..store.errors import InvalidCheckpointError
from .read_ahead import READS_AHEAD, read_into_new_buffer

if TYPE_CHECKING:
    from .prepare_ahead import PreparedAdapter

logger = logging.getLogger("vllm.lora_hotswap")
_local = threading.local()  # .served: (real path of a weight file, its tensors) for this thread's load
_TORCH_DTYPES = {name: getattr(torch, torch_name) for name, torch_name in TORCH_DTYPE_NAMES.items()}


class _FromMemory:
    """What ``safe_open`` returns, over tensors already read: ``keys`` and ``get_tensor``."""

    def __init__(self, tensors: dict[str, torch.Tensor]):
        self._tensors = tensors

    def __enter__(self) -> _FromMemory:
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def keys(self) -> list[str]:
        return list(self._tensors)

    def get_tensor(self, name: str) -> torch.Tensor:
        return self._tensors[name]


class _SafetensorsProxy:
    """Stands for the ``safetensors`` module inside ``vllm.lora.lora_model``."""

    def __init__(self, real: Any):
        self._real = real

    def __getattr__(self, name: str) -> Any:
        return getattr(self._real, name)

    def safe_open(self, filename: Any, framework: str, *args: Any, **kwargs: Any) -> Any:
        served = getattr(_local, "served", None)
        if served is not None and framework == "pt" and os.path.realpath(filename) == served[0]:
            _local.hit = True
            return _FromMemory(served[1])
        return self._real.safe_open(filename, framework, *args, **kwargs)


def _install() -> bool:
    try:
        from vllm.lora import lora_model
    except ImportError:
        return False
    current = getattr(lora_model, "safetensors", None)
    if isinstance(current, _SafetensorsProxy):
        return True
    if current is None or not callable(getattr(current, "safe_open", None)):
        logger.warning("hot-swap: vllm.lora.lora_model has no safetensors.safe_open; staging reads weight files twice")
        return False
    lora_model.safetensors = _SafetensorsProxy(current)
    return True


INSTALLED = _install()


class SingleRead:
    """One stage's read of ``directory``'s weight file; use as a context manager around vLLM's
    load, and call :meth:`verify` before the adapter goes anywhere."""

    def __init__(self, directory: str | os.PathLike[str]):
        self.directory = Path(directory)
        self.from_memory = False  # vLLM's loader took the tensors from our bytes
        self.read_ahead = False  # those bytes were read ahead of the commit (:mod:`.read_ahead`)
        # The adapter built from them ahead (:mod:`.prepare_ahead`): no load at all, READY's
        # sha256 of both files it was built from matched.
        self.prepared: PreparedAdapter | None = None
        self._expected = None
        self._digest: str | None = None  # sha256 of the bytes read (None: nothing to verify here)

    def __enter__(self) -> SingleRead:
        manifest = read_ready(self.directory)
        weights = find_weight_file(self.directory)
        self.weights = weights
        self._expected = manifest.files.get(weights.name)
        if manifest.files and self._expected is None:
            raise InvalidCheckpointError(f"{weights}: not listed in READY")
        if weights.name != SAFETENSORS_FILE:
            return self  # a .bin: validation hashed it and checked what it holds
        if not INSTALLED:
            verify_manifest(self.directory, manifest)  # hashed now; vLLM then reads the file itself
            return self
        expected = self._expected
        ahead = None if expected is None else READS_AHEAD.take(expected.sha256)
        if ahead is not None and not isinstance(ahead, bytearray):  # built and put in a slot ahead
            config = manifest.files.get(CONFIG_FILE)
            if config is not None and config.sha256 == ahead.config_sha256:  # all that vLLM's loader read
                self.prepared = ahead  # type: ignore[assignment] # the only hook that prepares: prepare_ahead's
                self.read_ahead, self._digest = True, expected.sha256
                return self
            ahead.discard()  # built with another config than the one committed: build again
            ahead = None
        if ahead is not None:  # read while the publisher committed, and hashed to READY's sha256
            data, self.read_ahead, self._digest = ahead, True, expected.sha256
        else:
            data = _read_whole(weights)
            if expected is not None:
                if len(data) != expected.size:
                    raise InvalidCheckpointError(
                        f"{weights}: size {len(data)} bytes, READY records {expected.size} (truncated or replaced?)"
                    )
                # Hashed before vLLM's loader sees the bytes: its tensors are views of them that it
                # scales in place, so a hash running beside the load could read scaled bytes.
                self._digest = hashlib.sha256(data).hexdigest()
        try:
            specs = parse_safetensors_header(data, weights)  # validation checked it against the config
        except InvalidCheckpointError:
            self.verify()  # a torn or replaced file is named as that, not by its first symptom
            raise
        _local.served, _local.hit = (os.path.realpath(weights), _tensors(data, specs)), False
        return self

    def __exit__(self, kind: type[BaseException] | None, *_: object) -> None:
        # True only if vLLM's loader opened the file through the proxy (it then read no disk), or
        # built the adapter from the bytes read ahead.
        self.from_memory = self.prepared is not None or (
            getattr(_local, "served", None) is not None and getattr(_local, "hit", False)
        )
        _local.served, _local.hit = None, False
        if kind is not None and self._digest is not None:
            self.verify()  # the same: a checksum mismatch explains a failed load best

    def verify(self) -> None:
        """Raise unless the bytes read hash to READY's sha256 (a no-op for an empty READY)."""
        if self._digest is None or self._expected is None:
            return
        sha = self._digest
        if sha != self._expected.sha256:
            raise InvalidCheckpointError(
                f"{self.weights}: checksum mismatch (sha256 {sha[:12]}…, READY says {self._expected.sha256[:12]}…)"
            )


@contextmanager
def served_from_memory(weights: Path, data: bytearray) -> Iterator[None]:
    """Inside this block, on this thread, vLLM's loader gets the tensors of ``weights`` (a
    safetensors path, which need not hold them) from ``data``: views of it, which it may scale."""
    if not INSTALLED:
        raise RuntimeError("vLLM's loader cannot be fed from memory here (no safetensors.safe_open to serve)")
    _local.served, _local.hit = (
        (os.path.realpath(weights), _tensors(data, parse_safetensors_header(data, weights))),
        False,
    )
    try:
        yield
    finally:
        _local.served, _local.hit = None, False


def _read_whole(path: Path) -> bytearray:
    """The file's bytes, in one buffer (writable: tensors are views of it, and vLLM scales them in place)."""
    with open(path, "rb", buffering=0) as reader:
        size = os.fstat(reader.fileno()).st_size
        data, done = read_into_new_buffer(reader, size)
        if reader.read(1):
            raise InvalidCheckpointError(f"{path}: grew while it was read (written to after READY?)")
    return data if done == size else data[:done]


def _tensors(data: bytearray, specs: dict[str, TensorSpec]) -> dict[str, torch.Tensor]:
    """Views of ``data``, one per tensor, in the file's own order (no copy)."""
    tensors = {}
    for name, spec in sorted(specs.items(), key=lambda item: item[1].offset):
        dtype = _TORCH_DTYPES[spec.dtype]
        count = 1
        for dim in spec.shape:
            count *= dim
        flat = (
            torch.frombuffer(data, dtype=dtype, count=count, offset=spec.offset)
            if count
            else torch.empty(0, dtype=dtype)
        )
        tensors[name] = flat.reshape(spec.shape)
    return tensors
