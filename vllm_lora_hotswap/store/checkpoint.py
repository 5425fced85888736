"""What a valid PEFT LoRA checkpoint is, checked without vLLM.

Three files make a version: ``adapter_config.json`` (``peft_type`` LORA),
one weight file (``adapter_model.safetensors``, or ``adapter_model.bin``
loaded only with ``weights_only=True``) and the ``READY`` manifest with each
file's size and sha256. Every check raises :class:`InvalidCheckpointError`
naming the file and the reason.
"""

from __future__ import annotations

import json
import math
import os
import re
import struct
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import InvalidCheckpointError, UnreadableError
from .files import hash_file, parse_json_bounded

CONFIG_FILE = "adapter_config.json"
SAFETENSORS_FILE = "adapter_model.safetensors"
BIN_FILE = "adapter_model.bin"
WEIGHT_FILES = (SAFETENSORS_FILE, BIN_FILE)  # order = preference
METADATA_FILE = "metadata.json"
READY_FILE = "READY"
MAX_READY_BYTES = 1 << 20  # a READY manifest is read up to this (a few hundred bytes in practice)
MANIFEST_FORMAT = 1
MAX_HEADER_BYTES = 64 << 20

# The safetensors dtypes: bytes per element and the torch dtype's name (named, not imported:
# the trainer's save and the engine's load map them to torch from this one table).
_DTYPES = {
    "F64": (8, "float64"),
    "F32": (4, "float32"),
    "F16": (2, "float16"),
    "BF16": (2, "bfloat16"),
    "I64": (8, "int64"),
    "I32": (4, "int32"),
    "I16": (2, "int16"),
    "I8": (1, "int8"),
    "U8": (1, "uint8"),
    "BOOL": (1, "bool"),
    "F8_E4M3": (1, "float8_e4m3fn"),
    "F8_E5M2": (1, "float8_e5m2"),
}
DTYPE_BYTES = {name: size for name, (size, _) in _DTYPES.items()}
TORCH_DTYPE_NAMES = {name: torch_name for name, (_, torch_name) in _DTYPES.items()}
# PEFT names: "<module>.lora_A.weight", "<module>.lora_embedding_B" (an adapter name may sit
# before ".weight" in older saves). lora_A is [r, in] and lora_B [out, r], embeddings included.
_LORA_TENSOR = re.compile(r"(?P<module>.+)\.lora_(?:embedding_)?(?P<kind>[AB])(?:\.[A-Za-z0-9_-]+)?(?:\.weight)?")


@dataclass(frozen=True)
class AdapterConfig:
    """The parts of a PEFT ``adapter_config.json`` that the store and engines use."""

    r: int
    lora_alpha: float
    target_modules: tuple[str, ...] | str | None
    base_model: str | None
    bias: str
    rank_pattern: Mapping[str, int] = field(default_factory=dict)
    raw: Mapping[str, Any] = field(default_factory=dict, repr=False)

    def rank_of(self, module: str) -> int:
        """Rank PEFT gives ``module`` (``rank_pattern`` overrides ``r``)."""
        for pattern, rank in self.rank_pattern.items():
            if re.fullmatch(rf"(.*\.)?({pattern})", module):
                return rank
        return self.r

    def summary(self) -> dict[str, Any]:
        modules = list(self.target_modules) if isinstance(self.target_modules, tuple) else self.target_modules
        return {
            "r": self.r,
            "lora_alpha": self.lora_alpha,
            "target_modules": modules,
            "base_model": self.base_model,
        }


def parse_adapter_config(data: bytes, where: str = CONFIG_FILE) -> AdapterConfig:
    raw = parse_json_bounded(data, where)
    if not isinstance(raw, dict):
        raise InvalidCheckpointError(f"{where}: expected a JSON object, got {type(raw).__name__}")
    peft_type = raw.get("peft_type")
    if peft_type != "LORA":
        raise InvalidCheckpointError(f"{where}: peft_type is {peft_type!r}, not 'LORA'")
    r = raw.get("r")
    if isinstance(r, bool) or not isinstance(r, int) or r < 1:
        raise InvalidCheckpointError(f"{where}: 'r' must be a positive integer, got {r!r}")
    alpha = raw.get("lora_alpha", 8)
    if isinstance(alpha, bool) or not isinstance(alpha, int | float) or not math.isfinite(alpha):
        raise InvalidCheckpointError(f"{where}: 'lora_alpha' must be a number, got {alpha!r}")
    targets = raw.get("target_modules")
    if isinstance(targets, list):
        if not all(isinstance(t, str) for t in targets):
            raise InvalidCheckpointError(f"{where}: 'target_modules' must list module names")
        targets = tuple(targets)
    elif targets is not None and not isinstance(targets, str):
        raise InvalidCheckpointError(f"{where}: 'target_modules' must be a list or a string")
    base = raw.get("base_model_name_or_path")
    if base is not None and not isinstance(base, str):
        raise InvalidCheckpointError(f"{where}: 'base_model_name_or_path' must be a string")
    bias = raw.get("bias", "none")
    if not isinstance(bias, str):
        raise InvalidCheckpointError(f"{where}: 'bias' must be a string")
    pattern = raw.get("rank_pattern") or {}
    if not isinstance(pattern, dict) or not all(
        isinstance(k, str) and isinstance(v, int) and not isinstance(v, bool) and v >= 1 for k, v in pattern.items()
    ):
        raise InvalidCheckpointError(f"{where}: 'rank_pattern' must map module patterns to ranks")
    for key in pattern:
        try:
            re.compile(key)
        except re.error as exc:
            raise InvalidCheckpointError(f"{where}: bad rank_pattern key {key!r} ({exc})") from None
    return AdapterConfig(
        r=r,
        lora_alpha=float(alpha),
        target_modules=targets,
        base_model=base,
        bias=bias,
        rank_pattern=pattern,
        raw=raw,
    )


def read_adapter_config(directory: Path) -> AdapterConfig:
    path = directory / CONFIG_FILE
    try:
        with open(path, "rb") as reader:
            data = reader.read((1 << 20) + 1)
    except FileNotFoundError:
        raise InvalidCheckpointError(f"{path}: missing (a PEFT LoRA needs adapter_config.json)") from None
    except OSError as exc:
        raise UnreadableError(f"{path}: cannot read ({exc.strerror})") from None
    return parse_adapter_config(data, str(path))


def find_weight_file(directory: Path) -> Path:
    for name in WEIGHT_FILES:
        path = directory / name
        if path.is_file():
            return path
    raise InvalidCheckpointError(f"{directory}: no weight file (expected {' or '.join(WEIGHT_FILES)})")


@dataclass(frozen=True)
class TensorSpec:
    dtype: str
    shape: tuple[int, ...]
    offset: int = 0  # safetensors: where the tensor's bytes start in the file


def read_safetensors_header(path: Path) -> dict[str, TensorSpec]:
    """Tensor names, dtypes and shapes, checked against the file's real size.

    Catches truncated and corrupt files without reading the tensor data.
    """
    try:
        size = os.stat(path).st_size
        with open(path, "rb") as reader:
            prefix = reader.read(8)
            header_len = _header_length(prefix, size, path)
            header_bytes = reader.read(header_len)
    except OSError as exc:
        raise UnreadableError(f"{path}: cannot read ({exc.strerror})") from None
    return _parse_header(header_bytes, header_len, size, path)


def parse_safetensors_header(data: bytes | bytearray | memoryview, path: Path) -> dict[str, TensorSpec]:
    """:func:`read_safetensors_header` for a weight file already read whole into ``data``."""
    header_len = _header_length(bytes(data[:8]), len(data), path)
    return _parse_header(bytes(data[8 : 8 + header_len]), header_len, len(data), path)


def _header_length(prefix: bytes, size: int, path: Path) -> int:
    if len(prefix) < 8:
        raise InvalidCheckpointError(f"{path}: truncated ({size} bytes, no safetensors header)")
    (header_len,) = struct.unpack("<Q", prefix)
    if header_len > min(MAX_HEADER_BYTES, size - 8):
        raise InvalidCheckpointError(
            f"{path}: corrupt or truncated (header claims {header_len} bytes, file has {size})"
        )
    return header_len


def _parse_header(header_bytes: bytes, header_len: int, size: int, path: Path) -> dict[str, TensorSpec]:
    header = parse_json_bounded(header_bytes, str(path), max_bytes=MAX_HEADER_BYTES)
    if not isinstance(header, dict):
        raise InvalidCheckpointError(f"{path}: corrupt safetensors header")
    data_len = size - 8 - header_len
    specs: dict[str, TensorSpec] = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype = info["dtype"]
            shape = tuple(int(d) for d in info["shape"])
            begin, end = (int(o) for o in info["data_offsets"])
        except (TypeError, KeyError, ValueError):
            raise InvalidCheckpointError(f"{path}: corrupt header entry for tensor {name!r}") from None
        if dtype not in DTYPE_BYTES or any(d < 0 for d in shape):
            raise InvalidCheckpointError(f"{path}: tensor {name!r} has unsupported dtype or shape")
        if not 0 <= begin <= end <= data_len or end - begin != math.prod(shape) * DTYPE_BYTES[dtype]:
            raise InvalidCheckpointError(
                f"{path}: tensor {name!r} lies outside the file's {data_len} data bytes (truncated?)"
            )
        specs[name] = TensorSpec(dtype, shape, 8 + header_len + begin)
    return specs


def check_lora_shapes(specs: Mapping[str, TensorSpec], config: AdapterConfig, where: str) -> None:
    """Every module has a lora_A/lora_B pair whose rank is the config's."""
    pairs: dict[str, dict[str, tuple[int, ...]]] = {}
    for name, spec in specs.items():
        match = _LORA_TENSOR.fullmatch(name)
        if match is None:
            continue  # modules_to_save and similar full weights
        pairs.setdefault(match["module"], {})[match["kind"]] = spec.shape
    if not pairs:
        raise InvalidCheckpointError(f"{where}: no LoRA tensors (lora_A/lora_B) found")
    for module, pair in pairs.items():
        a, b = pair.get("A"), pair.get("B")
        if a is None or b is None:
            raise InvalidCheckpointError(f"{where}: module {module!r} lacks its lora_A or lora_B tensor")
        if len(a) != 2 or len(b) != 2:
            raise InvalidCheckpointError(f"{where}: module {module!r} has non-2D LoRA tensors")
        expected = config.rank_of(module.removeprefix("base_model.model."))
        rank_a, rank_b = a[0], b[1]
        if rank_a != expected or rank_b != expected:
            raise InvalidCheckpointError(
                f"{where}: module {module!r} has rank {rank_a}/{rank_b}, adapter_config.json says {expected}"
            )


def load_bin_tensors(path: Path) -> dict[str, Any]:
    """Load a ``.bin`` state dict without running any code it may carry."""
    import pickle

    import torch

    try:
        tensors = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, AttributeError) as exc:
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise InvalidCheckpointError(
            f"{path}: refused to load with weights_only=True ({first_line}); publish safetensors instead"
        ) from None
    if not isinstance(tensors, dict) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in tensors.items()
    ):
        raise InvalidCheckpointError(f"{path}: not a state dict of named tensors")
    return tensors


def weight_specs(path: Path) -> dict[str, TensorSpec]:
    if path.name == SAFETENSORS_FILE:
        return read_safetensors_header(path)
    return {name: TensorSpec(str(t.dtype), tuple(t.shape)) for name, t in load_bin_tensors(path).items()}


def check_finite(path: Path) -> None:
    """Reject weights holding NaN or inf."""
    if path.name == SAFETENSORS_FILE:
        _check_safetensors_finite(path)
        return
    import torch  # loading a .bin state dict needs it anyway

    for name, tensor in load_bin_tensors(path).items():
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise InvalidCheckpointError(f"{path}: tensor {name!r} holds NaN or inf")


# numpy's own float types are checked with isfinite; the others by their bits: a float is NaN
# or inf exactly when all its exponent bits are set (float8 e4m3 has no inf; its NaN also sets
# the mantissa). numpy only, for every float dtype, bf16 included: publishing never imports
# torch for this check.
_NUMPY_FLOATS = {"F64": "<f8", "F32": "<f4", "F16": "<f2"}
_FINITE_CHUNK_BYTES = 1 << 22  # a multiple of every dtype's size
_NON_FINITE_BITS = {
    "F64": ("<u8", 0x7FF0000000000000),
    "F32": ("<u4", 0x7F800000),
    "F16": ("<u2", 0x7C00),
    "BF16": ("<u2", 0x7F80),
    "F8_E5M2": ("u1", 0x7C),
    "F8_E4M3": ("u1", 0x7F),
}


def _check_safetensors_finite(path: Path) -> None:
    import numpy as np

    specs = read_safetensors_header(path)  # first: a file too short to map is named as truncated
    check_finite_bytes(np.memmap(path, dtype=np.uint8, mode="r"), specs, path)


def check_finite_bytes(data: Any, specs: Mapping[str, TensorSpec], path: Path) -> None:
    """Reject NaN or inf in the float tensors of a safetensors file's bytes (``data``: any buffer)."""
    import numpy as np

    data = np.frombuffer(data, dtype=np.uint8)
    for name, spec in specs.items():
        if spec.dtype not in _NON_FINITE_BITS:
            continue  # integers and booleans are always finite
        end = spec.offset + math.prod(spec.shape) * DTYPE_BYTES[spec.dtype]
        # A chunk at a time: the check's temporaries stay small (and their pages reused),
        # whatever the tensor's size.
        for start in range(spec.offset, end, _FINITE_CHUNK_BYTES):
            chunk = data[start : min(end, start + _FINITE_CHUNK_BYTES)]
            if spec.dtype in _NUMPY_FLOATS:  # one pass, a boolean temporary (a quarter of the bit test's time)
                finite = bool(np.isfinite(chunk.view(_NUMPY_FLOATS[spec.dtype])).all())
            else:
                dtype, mask = _NON_FINITE_BITS[spec.dtype]
                finite = not np.any((chunk.view(dtype) & np.array(mask, dtype=dtype)) == mask)
            if not finite:
                raise InvalidCheckpointError(f"{path}: tensor {name!r} holds NaN or inf")


def validate_checkpoint_dir(directory: Path, *, finite: bool = True) -> tuple[AdapterConfig, Path]:
    """Full check of a PEFT LoRA directory: config, weight file, shapes (and NaN/inf)."""
    config = read_adapter_config(directory)
    weights = find_weight_file(directory)
    check_lora_shapes(weight_specs(weights), config, str(weights))
    if finite:
        check_finite(weights)
    return config, weights


@dataclass(frozen=True)
class FileDigest:
    size: int
    sha256: str


@dataclass(frozen=True)
class ReadyManifest:
    """Content of ``READY``. Empty ``files`` means a seed-style empty marker (no checksums)."""

    files: Mapping[str, FileDigest]

    def to_json(self) -> bytes:
        payload = {
            "format": MANIFEST_FORMAT,
            "files": {n: {"size": d.size, "sha256": d.sha256} for n, d in sorted(self.files.items())},
        }
        return (json.dumps(payload, indent=2) + "\n").encode()


def read_ready(directory: str | os.PathLike[str]) -> ReadyManifest:
    """``directory``'s ``READY`` manifest (its first MiB, parsed); the ``OSError`` of the open if
    it cannot be read (``FileNotFoundError``: no ``READY``)."""
    ready = os.path.join(directory, READY_FILE)
    with open(ready, "rb") as reader:
        return parse_ready(reader.read(MAX_READY_BYTES), ready)


def parse_ready(data: bytes, where: str = READY_FILE) -> ReadyManifest:
    if not data.strip():
        return ReadyManifest(files={})
    raw = parse_json_bounded(data, where)
    if not isinstance(raw, dict) or raw.get("format") != MANIFEST_FORMAT:
        raise InvalidCheckpointError(f"{where}: not a format-{MANIFEST_FORMAT} READY manifest")
    files = raw.get("files")
    if not isinstance(files, dict):
        raise InvalidCheckpointError(f"{where}: 'files' must be an object")
    digests: dict[str, FileDigest] = {}
    for name, entry in files.items():
        if not isinstance(name, str) or "/" in name or name.startswith(".") or not name:
            raise InvalidCheckpointError(f"{where}: bad file name {name!r}")
        size = entry.get("size") if isinstance(entry, dict) else None
        sha = entry.get("sha256") if isinstance(entry, dict) else None
        if (
            isinstance(size, bool)
            or not isinstance(size, int)
            or size < 0
            or not isinstance(sha, str)
            or not re.fullmatch(r"[0-9a-f]{64}", sha)
        ):
            raise InvalidCheckpointError(f"{where}: bad size/sha256 for {name!r}")
        digests[name] = FileDigest(size, sha)
    return ReadyManifest(files=digests)


def verify_manifest(directory: Path, manifest: ReadyManifest, unread: tuple[str, ...] = ()) -> None:
    """Each listed file exists with the recorded size and sha256 (files named in ``unread``:
    the size only, for a reader that hashes them as it loads them)."""
    for name, digest in manifest.files.items():
        path = directory / name
        try:
            size = os.stat(path).st_size
        except FileNotFoundError:
            raise InvalidCheckpointError(f"{path}: listed in READY but missing") from None
        if size != digest.size:
            raise InvalidCheckpointError(
                f"{path}: size {size} bytes, READY records {digest.size} (truncated or replaced?)"
            )
        if name in unread:
            continue
        try:
            _, sha = hash_file(path)
        except OSError as exc:
            raise UnreadableError(f"{path}: cannot read ({exc.strerror})") from None
        if sha != digest.sha256:
            raise InvalidCheckpointError(
                f"{path}: checksum mismatch (sha256 {sha[:12]}…, READY says {digest.sha256[:12]}…)"
            )
