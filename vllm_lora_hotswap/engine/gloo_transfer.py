"""A ``gloo`` backend for vLLM's weight-transfer API: base weights to CPU engines.

Same protocol as vLLM's ``nccl`` backend (init / start / update / finish on
the workers, ``trainer_init`` / ``send_weights`` on the trainer), over a
stateless gloo process group, so the whole base-weight flow runs on CPU
engines and in CI, where NCCL silently does nothing. The plugin registers it
in both factories; start the server with
``--weight-transfer-config '{"backend": "gloo"}'``.

Parameters travel in buckets of up to ``bucket_bytes``: both sides cut the
same buckets from the same metadata, and the next bucket is already on the
wire while the current one is packed (trainer) or loaded (workers).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from datetime import timedelta
from typing import Any, ClassVar, Self

import torch
from vllm.distributed.weight_transfer.base import (
    ParamMeta,
    TrainerInitInfo,
    TrainerWeightTransferEngine,
    VLLMWeightSyncClient,
    WeightSource,
    WeightTransferEngine,
    WeightTransferInitInfo,
    WeightTransferUpdateInfo,
)

DEFAULT_BUCKET_BYTES = 64 << 20
BACKEND = "gloo"

logger = logging.getLogger("vllm.lora_hotswap")


@dataclass(kw_only=True)
class GlooWeightTransferInitInfo(WeightTransferInitInfo):
    """Worker side: where to meet the trainer, and this server's first rank in the group."""

    master_address: str
    master_port: int
    rank_offset: int
    world_size: int
    bucket_bytes: int = DEFAULT_BUCKET_BYTES
    timeout_s: float = 600.0


@dataclass
class GlooTrainerInitInfo(TrainerInitInfo):
    """Trainer side. ``world_size`` counts the trainer and every engine rank of every server."""

    backend: ClassVar[str] = BACKEND

    master_address: str
    master_port: int
    world_size: int
    bucket_bytes: int = DEFAULT_BUCKET_BYTES
    timeout_s: float = 600.0


@dataclass
class GlooWeightTransferUpdateInfo(WeightTransferUpdateInfo):
    names: list[str]
    dtype_names: list[str]
    shapes: list[list[int]]

    def __post_init__(self) -> None:
        if not len(self.names) == len(self.dtype_names) == len(self.shapes):
            raise ValueError(
                f"names, dtype_names and shapes differ in length: "
                f"{len(self.names)}, {len(self.dtype_names)}, {len(self.shapes)}"
            )

    def params(self) -> list[ParamMeta]:
        return [
            ParamMeta(name, getattr(torch, dtype), tuple(shape))
            for name, dtype, shape in zip(self.names, self.dtype_names, self.shapes, strict=True)
        ]


def _nbytes(meta: ParamMeta) -> int:
    numel = 1
    for dim in meta.shape:
        numel *= dim
    return numel * torch.empty((), dtype=meta.dtype).element_size()


def buckets(params: list[ParamMeta], bucket_bytes: int) -> list[list[int]]:
    """Indices of ``params`` grouped into buckets of at most ``bucket_bytes``
    (a larger parameter gets a bucket of its own). Both sides call this."""
    groups: list[list[int]] = []
    size = 0
    for index, meta in enumerate(params):
        nbytes = _nbytes(meta)
        if not groups or size + nbytes > bucket_bytes:
            groups.append([])
            size = 0
        groups[-1].append(index)
        size += nbytes
    return groups


def join_group(host: str, port: int, rank: int, world_size: int, timeout_s: float) -> Any:
    from vllm.distributed.utils import stateless_init_torch_distributed_process_group

    return stateless_init_torch_distributed_process_group(
        host, port, rank, world_size, backend="gloo", timeout=timedelta(seconds=timeout_s)
    )


class GlooWeightTransferEngine(WeightTransferEngine[GlooWeightTransferInitInfo, GlooWeightTransferUpdateInfo]):
    """Worker side: receive buckets from trainer rank 0 and load them layer-wise."""

    init_info_cls = GlooWeightTransferInitInfo
    update_info_cls = GlooWeightTransferUpdateInfo

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.group: Any = None
        self.bucket_bytes = DEFAULT_BUCKET_BYTES

    def init_transfer_engine(self, init_info: GlooWeightTransferInitInfo) -> None:
        parallel = self.parallel_config
        rank = parallel.data_parallel_index * parallel.world_size + parallel.rank + init_info.rank_offset
        self.bucket_bytes = init_info.bucket_bytes
        self.group = join_group(
            init_info.master_address, init_info.master_port, rank, init_info.world_size, init_info.timeout_s
        )

    def start_weight_update(self) -> None:
        from vllm.model_executor.model_loader.reload import initialize_layerwise_reload

        initialize_layerwise_reload(self.model)

    def finish_weight_update(self) -> None:
        from vllm.model_executor.model_loader.reload import finalize_layerwise_reload

        finalize_layerwise_reload(self.model, self.model_config)

    def receive_weights(self, update_info: GlooWeightTransferUpdateInfo) -> None:
        if self.group is None:
            raise RuntimeError("gloo weight transfer is not initialised: call init_weight_transfer_engine first")
        params = update_info.params()
        plan = buckets(params, self.bucket_bytes)
        sizes = [sum(_nbytes(params[i]) for i in bucket) for bucket in plan]
        in_flight: deque[tuple[int, torch.Tensor, Any]] = deque()

        def post(index: int) -> None:
            flat = torch.empty(sizes[index], dtype=torch.uint8)
            in_flight.append((index, flat, self.group.broadcast(flat, 0)))

        started = time.perf_counter()
        waiting = loading = 0.0
        for index in range(min(2, len(plan))):
            post(index)
        while in_flight:
            index, flat, work = in_flight.popleft()
            mark = time.perf_counter()
            work.wait()
            waiting += time.perf_counter() - mark
            if index + 2 < len(plan):
                post(index + 2)
            mark = time.perf_counter()
            self.model.load_weights(list(_unpack(flat, [params[i] for i in plan[index]])))
            loading += time.perf_counter() - mark
        # Which side bounds a push: the wire (waiting) or vLLM's layer-wise load (loading).
        logger.info(
            "hotswap gloo weights received bytes=%d buckets=%d seconds=%.3f waiting=%.3f loading=%.3f",
            sum(sizes), len(plan), time.perf_counter() - started, waiting, loading,
        )  # fmt: skip

    def shutdown(self) -> None:
        self.group = None


def _unpack(flat: torch.Tensor, params: list[ParamMeta]) -> Iterator[tuple[str, torch.Tensor]]:
    offset = 0
    for meta in params:
        nbytes = _nbytes(meta)
        yield meta.name, flat[offset : offset + nbytes].view(meta.dtype).view(meta.shape)
        offset += nbytes


class GlooTrainerWeightTransferEngine(TrainerWeightTransferEngine[GlooTrainerInitInfo]):
    """Trainer side: rank 0 of the group; packs buckets and broadcasts them."""

    init_info_cls = GlooTrainerInitInfo

    def __init__(self, *, client: VLLMWeightSyncClient, source: WeightSource, init_info: GlooTrainerInitInfo):
        super().__init__(client=client, source=source, is_sender=init_info.is_sender)
        self.init_info = init_info
        self.group: Any = None

    @classmethod
    def trainer_init(
        cls, init_info: GlooTrainerInitInfo, *, client: VLLMWeightSyncClient, source: WeightSource | None = None
    ) -> Self:
        if source is None:
            raise ValueError("gloo weight transfer needs a WeightSource (e.g. ModuleSource(model))")
        engine = cls(client=client, source=source, init_info=init_info)
        if not engine.is_sender:
            return engine
        worker_info = GlooWeightTransferInitInfo(
            master_address=init_info.master_address,
            master_port=init_info.master_port,
            rank_offset=1,
            world_size=init_info.world_size,
            bucket_bytes=init_info.bucket_bytes,
            timeout_s=init_info.timeout_s,
        )
        # The workers block in init until everyone has joined: join concurrently.
        with ThreadPoolExecutor(max_workers=1) as pool:
            future = pool.submit(client.init_weight_transfer_engine, asdict(worker_info))
            engine.group = join_group(
                init_info.master_address, init_info.master_port, 0, init_info.world_size, init_info.timeout_s
            )
            future.result()
        return engine

    def send_weights(self, weight_version: str | None = None) -> None:
        assert self.source is not None
        meta = self.source.metadata()
        if not self.is_sender:
            for _ in self.source:  # keep in step with the sender's collectives (FSDP gathers)
                pass
            return
        update_info = GlooWeightTransferUpdateInfo(
            names=[m.name for m in meta],
            dtype_names=[str(m.dtype).removeprefix("torch.") for m in meta],
            shapes=[list(m.shape) for m in meta],
        )
        self.client.start_weight_update()
        errors: list[BaseException] = []

        def receive() -> None:
            try:
                self.client.update_weights(asdict(update_info))
            except BaseException as exc:  # noqa: BLE001 - re-raised below
                errors.append(exc)

        # update_weights returns only once the workers received everything,
        # so it runs beside the broadcast.
        receiver = threading.Thread(target=receive, name="weight-sync-update", daemon=True)
        receiver.start()
        self._broadcast(meta)
        receiver.join()
        if errors:
            raise errors[0]
        self.client.finish_weight_update(weight_version)

    def _broadcast(self, meta: list[ParamMeta]) -> None:
        assert self.source is not None and self.group is not None
        plan = buckets(meta, self.init_info.bucket_bytes)
        stream = iter(self.source)  # in metadata order, one tensor at a time (FSDP gathers lazily)
        pending: deque[tuple[torch.Tensor, Any]] = deque()
        for bucket in plan:
            parts = []
            for index in bucket:
                expected = meta[index]
                name, tensor = next(stream)
                if name != expected.name or tensor.dtype != expected.dtype or tuple(tensor.shape) != expected.shape:
                    raise ValueError(
                        f"WeightSource yielded {name} {tensor.dtype} {tuple(tensor.shape)} where metadata() "
                        f"declared {expected.name} {expected.dtype} {expected.shape}"
                    )
                parts.append(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8))
            flat = torch.cat(parts) if len(parts) > 1 else parts[0]
            pending.append((flat, self.group.broadcast(flat, 0)))
            if len(pending) > 1:  # pack the next bucket while this one is on the wire
                pending.popleft()[1].wait()
        while pending:
            pending.popleft()[1].wait()

    def shutdown(self) -> None:
        self.group = None

