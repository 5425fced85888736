"""A safetensors file laid out from tensors in memory, so it can be written and hashed at once.

Why: a publication's weight file is hashed for ``READY``. Saving it with
safetensors and then reading it back to hash it puts the hash (about 1 ms per
MB) after the write; serialising it to one ``bytes`` first copies every tensor
once more. Laid out as a header plus the tensors' own memory, the file can be
written by one thread while another hashes the same buffers
(:meth:`.staged.StagedVersion.write_weights`).

How: the layout is the one safetensors writes: an 8-byte little-endian header
length, a JSON header (``__metadata__`` first, then each tensor's ``dtype``,
``shape`` and ``data_offsets``) padded with spaces to a multiple of 8, then the
tensors' bytes back to back, ordered by element size (largest first), then by
name. For one dtype, as an adapter has, that is byte for byte what
``safetensors.torch.save`` writes (tests/test_store.py checks it).
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from .checkpoint import DTYPE_BYTES, TensorSpec


@dataclass(frozen=True)
class TensorBytes:
    """One tensor as safetensors stores it: ``data`` is its memory, C order, little-endian."""

    dtype: str  # a safetensors dtype name: "F32", "BF16", ...
    shape: tuple[int, ...]
    data: Any  # any buffer (bytes, a numpy array, a memoryview); read, never copied

    def view(self) -> memoryview:
        return memoryview(self.data).cast("B")


def safetensors_layout(
    tensors: Mapping[str, TensorBytes], metadata: Mapping[str, str] | None = None
) -> tuple[bytes, list[tuple[str, memoryview]], dict[str, TensorSpec]]:
    """The file's first bytes (length and header), its tensors' buffers in file order, and
    each tensor's spec (``offset`` from the start of the file, as the header parser gives).
    Raises ValueError for an unknown dtype or a buffer whose size is not its shape's."""
    order = sorted(tensors.items(), key=lambda item: (-DTYPE_BYTES.get(item[1].dtype, 0), item[0]))
    header: dict[str, Any] = {"__metadata__": dict(metadata)} if metadata else {}
    buffers: list[tuple[str, memoryview]] = []
    end = 0
    for name, tensor in order:
        if tensor.dtype not in DTYPE_BYTES:
            raise ValueError(f"tensor {name!r}: unknown safetensors dtype {tensor.dtype!r}")
        view = tensor.view()
        expected = math.prod(tensor.shape) * DTYPE_BYTES[tensor.dtype]
        if len(view) != expected:
            raise ValueError(f"tensor {name!r}: {len(view)} bytes for shape {list(tensor.shape)} of {tensor.dtype}")
        header[name] = {"dtype": tensor.dtype, "shape": list(tensor.shape), "data_offsets": [end, end + expected]}
        buffers.append((name, view))
        end += expected
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)
    start = 8 + len(encoded)
    specs = {
        name: TensorSpec(tensors[name].dtype, tuple(tensors[name].shape), start + header[name]["data_offsets"][0])
        for name, _ in buffers
    }
    return struct.pack("<Q", len(encoded)) + encoded, buffers, specs
