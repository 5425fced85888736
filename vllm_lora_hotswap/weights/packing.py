"""Parameters packed into few large transfers, for any broadcast (gloo on CPU, NCCL on GPU).

Why: a full-weight push should run at the speed of the transport. Every
collective has a fixed cost (a round trip on gloo, a launch on NCCL, a Python
call on both), so parameters travel in buckets, as vLLM's NCCL engine packs
them; and a packing copy that allocates (``torch.cat``) costs more than the
wire on a CPU, where each fresh buffer is page-faulted in again: measured on
the benchmark model (415 MB, 2 cores), packing that way took 660 ms of a
935 ms broadcast. So neither side allocates per bucket: the sender copies into
a few buffers it keeps (``copy_`` into slices) and sends a bucket of one
parameter in place, with no copy; the receiver takes the whole update into one
allocation, each bucket into its own slice, with every receive posted at once.

How: both sides cut the same buckets from the same metadata (:func:`buckets`).
The sender (:class:`Packer` and :func:`send`) packs bucket *k + 1* while bucket
*k* is on the wire, keeping two buffers; the receiver (:func:`receive`) gets
one view per bucket and :func:`unpack` turns a bucket into named views of it.
``broadcast`` is any callable that starts a broadcast of one tensor from the
sender and returns something with ``wait()``: a gloo process group's work, or
an event recorded after an NCCL broadcast on its stream.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable, Sequence
from typing import Any, Protocol

import torch

DEFAULT_BUCKET_BYTES = 64 << 20
DEPTH = 2  # buckets on the wire at once on the sender (and buffers it keeps)
ALONE_FRACTION = 16  # a parameter of at least bucket_bytes / 16 travels alone, in place


class Meta(Protocol):
    """What packing needs of a parameter (vLLM's ``ParamMeta`` has it)."""

    name: str
    dtype: torch.dtype
    shape: Sequence[int]


class Waitable(Protocol):
    def wait(self) -> Any: ...


Broadcast = Callable[[torch.Tensor], Waitable]


def nbytes(meta: Meta) -> int:
    numel = 1
    for dim in meta.shape:
        numel *= dim
    return numel * meta.dtype.itemsize


def buckets(params: Sequence[Meta], bucket_bytes: int, *, alone_bytes: int | None = None) -> list[list[int]]:
    """Indices of ``params`` grouped into buckets of at most ``bucket_bytes`` (a larger
    parameter gets a bucket of its own, and so does one of ``alone_bytes`` or more).
    Both sides call this with the same arguments."""
    alone = bucket_bytes if alone_bytes is None else alone_bytes
    groups: list[list[int]] = []
    size = 0
    for index, meta in enumerate(params):
        size_of = nbytes(meta)
        if not groups or size + size_of > bucket_bytes or size_of >= alone or size >= alone:
            groups.append([])
            size = 0
        groups[-1].append(index)
        size += size_of
    return groups


def wire_buckets(params: Sequence[Meta], bucket_bytes: int) -> list[list[int]]:
    """The buckets that travel: small parameters packed together, and each parameter of
    at least ``bucket_bytes / ALONE_FRACTION`` alone, sent in place. On a CPU the packing
    copy competes with the wire for the same cores (on the benchmark model it took 390 ms
    of a 530 ms broadcast even into kept buffers), while one more collective costs tens
    of microseconds; a 4 MiB parameter (at the default bucket) is worth its own."""
    return buckets(params, bucket_bytes, alone_bytes=max(1, bucket_bytes // ALONE_FRACTION))


def as_bytes(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor``'s bytes as a flat uint8 view (a copy only if it is not contiguous)."""
    return tensor.detach().contiguous().view(-1).view(torch.uint8)


class Packer:
    """The sender's buffers: ``DEPTH`` of ``bucket_bytes`` on ``device``, allocated at the
    first bucket that needs one and kept (pinned when they stage a GPU's tensors for a
    CPU transport), so a push allocates nothing per bucket. The caller must not pack into
    a buffer whose broadcast has not completed: :func:`send` keeps to that."""

    def __init__(self, bucket_bytes: int, device: torch.device | str = "cpu"):
        self.bucket_bytes = bucket_bytes
        self.device = torch.device(device)
        self._buffers: list[torch.Tensor | None] = [None] * DEPTH
        self._next = 0

    def pack(self, tensors: Sequence[torch.Tensor]) -> torch.Tensor:
        """One bucket's bytes: a lone tensor already on the device as it is (no copy),
        anything else copied into the next buffer."""
        if len(tensors) == 1 and tensors[0].device == self.device:
            return as_bytes(tensors[0])
        size = sum(t.numel() * t.element_size() for t in tensors)
        if size > self.bucket_bytes:  # one parameter larger than a bucket, elsewhere
            return as_bytes(tensors[0].to(self.device))
        slot = self._next
        self._next = (slot + 1) % DEPTH
        buffer = self._buffers[slot]
        if buffer is None:
            pin = self.device.type == "cpu" and tensors[0].is_cuda
            buffer = torch.empty(self.bucket_bytes, dtype=torch.uint8, device=self.device, pin_memory=pin)
            self._buffers[slot] = buffer
        offset = 0
        for tensor in tensors:
            length = tensor.numel() * tensor.element_size()
            buffer[offset : offset + length].copy_(as_bytes(tensor), non_blocking=buffer.is_pinned())
            offset += length
        if buffer.is_pinned():
            torch.cuda.synchronize()  # the copies above were asynchronous
        return buffer[:offset]

    def release(self) -> None:
        self._buffers = [None] * DEPTH


def send(packed: Iterable[torch.Tensor], broadcast: Broadcast) -> None:
    """Broadcast each bucket as ``packed`` yields it, ``DEPTH`` on the wire at once: the
    next bucket is packed while the last one travels, into the buffer that has completed
    (``packed`` is consumed lazily, one bucket after each wait)."""
    # Each bucket is held until its broadcast completes: a transport whose work handle does
    # not keep its tensor alive (NCCL on a stream) must not see the memory reused meanwhile.
    pending: deque[tuple[torch.Tensor, Waitable]] = deque()
    for flat in packed:
        pending.append((flat, broadcast(flat)))
        if len(pending) >= DEPTH:
            pending.popleft()[1].wait()
    while pending:
        pending.popleft()[1].wait()


def receive(
    sizes: Sequence[int], broadcast: Broadcast, device: torch.device | str = "cpu", *, into: torch.Tensor | None = None
) -> torch.Tensor:
    """Buckets of ``sizes`` bytes, back to back into one allocation (``into``'s start if
    given: memory already faulted in), every receive posted at once; returns the bytes
    once all have arrived."""
    total = sum(sizes)
    flat = torch.empty(total, dtype=torch.uint8, device=device) if into is None else into[:total]
    for work in [broadcast(view) for view in flat.split(list(sizes))]:
        work.wait()
    return flat


def unpack(flat: torch.Tensor, params: Sequence[Meta]) -> list[tuple[str, torch.Tensor]]:
    """A bucket's parameters as named views of its bytes (no copy), or a copy for one whose
    bytes do not start at a multiple of its element size (an odd-sized narrower tensor
    before it): a view of another dtype must be aligned to it."""
    parts = flat.split([nbytes(meta) for meta in params])
    named = []
    for meta, part in zip(params, parts, strict=True):
        if part.storage_offset() % torch.empty((), dtype=meta.dtype).element_size():
            part = part.clone()
        named.append((meta.name, part.view(meta.dtype).view(tuple(meta.shape))))
    return named
