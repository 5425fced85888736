"""A ``gloo`` backend for vLLM's weight-transfer API: base weights to CPU engines.

Same protocol as vLLM's ``nccl`` backend (init / start / update / finish on
the workers, ``trainer_init`` / ``send_weights`` on the trainer), over a
stateless gloo process group, so the whole base-weight flow runs on CPU
engines and in CI, where NCCL silently does nothing. The plugin registers it
in both factories; start the server with
``--weight-transfer-config '{"backend": "gloo"}'``.

Parameters travel in buckets of up to ``bucket_bytes``, packed and received
without a per-bucket allocation (:mod:`.packing`, which an NCCL transport can
share): both sides cut the same buckets from the same metadata, the trainer
packs the next bucket while the last one is on the wire, and the workers post
every receive at once into one allocation. The workers hold a whole update in
host memory before loading any of it, so an update is all or nothing (see
:meth:`GlooWeightTransferEngine.receive_weights`).
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import time
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

from ..compat.vllm_symbols import source_metadata, source_tensors
from . import packing, reload
from .packing import DEFAULT_BUCKET_BYTES, buckets, unpack
from .reload import NothingLoaded, UpdateRefused
from .spec import check_update, spec_of

# How long the trainer still waits for the workers' check once a server answered an error
# (a refusal answers right after the check completes; a server that never joined does not).
REFUSAL_GRACE_S = 2.0
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
    # Hold the receive buffer between updates: host memory of the update's size stays taken,
    # and a push skips faulting that much fresh memory in (on the benchmark model, 415 MB:
    # about 190 ms, more than the plain broadcast of the bytes itself).
    keep_buffer: bool = False


@dataclass
class GlooTrainerInitInfo(TrainerInitInfo):
    """Trainer side. ``world_size`` counts the trainer and every engine rank of every server."""

    backend: ClassVar[str] = BACKEND

    master_address: str
    master_port: int
    world_size: int
    bucket_bytes: int = DEFAULT_BUCKET_BYTES
    timeout_s: float = 600.0
    keep_buffer: bool = False  # the workers' (see GlooWeightTransferInitInfo)


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


_nbytes = packing.nbytes
_unpack = unpack  # what _load unpacks each bucket with


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
        self.keep_buffer = False
        self._buffer: torch.Tensor | None = None  # the last update's bytes, kept to receive the next
        self._warned_no_spec = False

    def init_transfer_engine(self, init_info: GlooWeightTransferInitInfo) -> None:
        parallel = self.parallel_config
        rank = parallel.data_parallel_index * parallel.world_size + parallel.rank + init_info.rank_offset
        self.bucket_bytes = init_info.bucket_bytes
        self.keep_buffer = init_info.keep_buffer
        self._buffer = None
        self.group = join_group(
            init_info.master_address, init_info.master_port, rank, init_info.world_size, init_info.timeout_s
        )

    def start_weight_update(self) -> None:
        """Nothing to prepare: layers are replaced only once a whole update has arrived."""

    def finish_weight_update(self) -> None:
        """Nothing left to do: each ``update_weights`` call finished its own load."""

    def receive_weights(self, update_info: GlooWeightTransferUpdateInfo) -> None:
        """All or nothing: check the announced parameters against the engine's and the
        memory a reload of them needs (:func:`.reload.shortfall`), receive every byte into
        host memory, and only then load them, through vLLM's reload (layer-wise, or in
        place with 0.34's ``VLLM_RELOAD_MODE=direct``), finished within this call: between
        two calls the model is never half-replaced, whatever the trainer does next. A
        refused update or a transfer cut off half-way raises :class:`.reload.NothingLoaded`
        and leaves the old weights serving; a failure once layers are being replaced ends
        this worker, so the engine is reported dead (and restarted by its launcher) instead
        of serving a half-loaded model. Send whole layers per call (the plugin's trainer
        sends the whole model in one)."""
        if self.group is None:
            raise RuntimeError("gloo weight transfer is not initialised: call init_weight_transfer_engine first")
        params = update_info.params()
        refusal: ValueError | None = None
        try:
            self._check(update_info)
        except ValueError as exc:
            refusal = exc
        # Every rank (the trainer included) learns whether any engine refused before a
        # byte is sent, so a refusal never leaves the others waiting for buckets.
        refusals = _count(self.group, refusal is not None)
        if refusal is not None:
            reason = str(refusal).rstrip(".")
            raise UpdateRefused(f"{reason}. Nothing was loaded: the previous weights keep serving.") from refusal
        if refusals:
            raise NothingLoaded("another engine of the transfer group refused this update; nothing was loaded")
        plan = buckets(params, self.bucket_bytes)
        started = time.perf_counter()
        received = self._receive(plan, params)
        if not _status(self.group, True):
            raise NothingLoaded(
                "the trainer abandoned this update before its end (see its error); nothing was loaded, "
                "the previous weights keep serving"
            )
        loading = time.perf_counter()
        self._load(plan, params, received)
        logger.info(
            "hotswap gloo weights received bytes=%d buckets=%d seconds=%.3f receiving=%.3f loading=%.3f",
            sum(flat.numel() for flat in received),
            len(plan),
            time.perf_counter() - started,
            loading - started,
            time.perf_counter() - loading,
        )

    def _check(self, update_info: GlooWeightTransferUpdateInfo) -> None:
        """Refuse (ValueError) what this engine cannot load: a parameter its model lacks
        or has in another shape or dtype, or more than its free memory holds."""
        spec = spec_of(self.model)
        if spec is not None:
            check_update(zip(update_info.names, update_info.shapes, update_info.dtype_names), spec)
        elif not self._warned_no_spec:
            logger.warning(
                "hot-swap: this model was not loaded by vLLM's default loader, so base-weight "
                "updates are not checked against its parameters before loading"
            )
            self._warned_no_spec = True
        held = 0 if self._buffer is None else self._buffer.numel()  # already taken: it receives this one
        short = reload.shortfall(self.model, self.device, max(0, sum(_nbytes(m) for m in update_info.params()) - held))
        if short is not None:
            raise ValueError(f"not enough memory for this update: {short}")

    def _receive(self, plan: list[list[int]], params: list[ParamMeta]) -> list[torch.Tensor]:
        """The whole update into one host allocation, as the trainer's buckets travel
        (:func:`.packing.wire_buckets`, all posted at once); one view of it per bucket of
        ``plan``, the groups loaded together."""
        sizes = [sum(_nbytes(params[i]) for i in bucket) for bucket in packing.wire_buckets(params, self.bucket_bytes)]
        into = self._buffer if self._buffer is not None and self._buffer.numel() >= sum(sizes) else None
        self._buffer = None  # a larger update replaces a kept buffer: never both held at once
        flat = packing.receive(sizes, lambda view: self.group.broadcast(view, 0), into=into)
        if self.keep_buffer:
            self._buffer = flat if into is None else into
        return list(flat.split([sum(_nbytes(params[i]) for i in bucket) for bucket in plan]))

    def _load(self, plan: list[list[int]], params: list[ParamMeta], received: list[torch.Tensor]) -> None:
        # Every tensor is cut out of the received bytes before any layer is replaced: a
        # failure there is a refusal (NothingLoaded), not a half-loaded model.
        try:
            groups = [_unpack(flat, [params[i] for i in bucket]) for bucket, flat in zip(plan, received, strict=True)]
        except Exception as exc:
            raise NothingLoaded(f"the received update could not be unpacked ({exc}); nothing was loaded") from exc
        try:
            reload.begin(self.model)
            for group in groups:
                self.model.load_weights(list(group))
            reload.finish(self.model, self.model_config, self.device)
        except BaseException:
            logger.critical(
                "hot-swap: loading base weights failed after layers were replaced; this worker exits so "
                "the engine is reported dead and restarted rather than serving a half-loaded model",
                exc_info=True,
            )
            sys.stderr.flush()
            os._exit(70)  # EX_SOFTWARE; vLLM's executor notices the dead worker and fails the engine

    def shutdown(self) -> None:
        self.group = None
        self._buffer = None


def _let_time_out(group: Any, work: Any) -> None:
    """Drop a group whose collective nobody else will join. Destroying it would block
    until that collective times out, so a daemon thread holds it until then."""
    threading.Thread(target=_wait_out, args=(group, work), name="gloo-abandoned-group", daemon=True).start()


def _wait_out(group: Any, work: Any) -> None:
    try:
        work.wait()
    except RuntimeError:  # the timeout: expected, nobody else joins
        pass


def _count(group: Any, flag: bool) -> int:
    """How many ranks of ``group`` raise ``flag`` (each rank calls this)."""
    count = torch.tensor([int(flag)], dtype=torch.int32)
    group.allreduce(count).wait()
    return int(count.item())


def _status(group: Any, complete: bool) -> bool:
    """The trainer's word after the last bucket: whether the update it sent is complete."""
    status = torch.tensor([int(complete)], dtype=torch.uint8)
    group.broadcast(status, 0).wait()
    return bool(status.item())


class GlooTrainerWeightTransferEngine(TrainerWeightTransferEngine[GlooTrainerInitInfo]):
    """Trainer side: rank 0 of the group; packs buckets and broadcasts them."""

    init_info_cls = GlooTrainerInitInfo

    def __init__(self, *, client: VLLMWeightSyncClient, source: WeightSource, init_info: GlooTrainerInitInfo):
        super().__init__(client=client, source=source, is_sender=init_info.is_sender)
        self.init_info = init_info
        self.group: Any = None
        self._packer = packing.Packer(init_info.bucket_bytes)  # its buffers outlive a push: no page faults
        # Seconds the last push spent in each phase, as the trainer saw them (benchmark 5 reports them).
        self.timings: dict[str, float] = {}

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
            keep_buffer=init_info.keep_buffer,
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
        if self.group is None:
            raise RuntimeError(
                "the gloo transfer group is closed (a server failed an update before joining it): "
                "close the communicator and initialise it again"
            )
        meta = source_metadata(self.source)
        if not self.is_sender:
            for _ in source_tensors(self.source):  # keep in step with the sender's collectives (FSDP gathers)
                pass
            return
        update_info = GlooWeightTransferUpdateInfo(
            names=[m.name for m in meta],
            dtype_names=[str(m.dtype).removeprefix("torch.") for m in meta],
            shapes=[list(m.shape) for m in meta],
        )
        self.timings = {}
        started = time.perf_counter()
        self.client.start_weight_update()
        self.timings["start"] = time.perf_counter() - started
        try:
            self._update(meta, update_info)
            finishing = time.perf_counter()
            self.client.finish_weight_update(weight_version)
            self.timings["finish"] = time.perf_counter() - finishing
        except BaseException:
            self._resume()
            raise

    def _update(self, meta: list[ParamMeta], update_info: GlooWeightTransferUpdateInfo) -> None:
        errors: list[BaseException] = []

        def receive() -> None:
            try:
                self.client.update_weights(asdict(update_info))
            except BaseException as exc:  # noqa: BLE001 - re-raised below
                errors.append(exc)

        # update_weights returns only once the workers received everything,
        # so it runs beside the broadcast.
        receiver = threading.Thread(target=receive, name="weight-sync-update", daemon=True)
        started = time.perf_counter()
        receiver.start()
        failure: BaseException | None = None
        accepted = self._no_refusals(receiver, errors)
        sending = time.perf_counter()
        self.timings["check"] = sending - started  # the request reaching the workers, and their check
        if accepted:
            try:
                self._broadcast(meta)
            except Exception as exc:  # noqa: BLE001 - re-raised below, after the workers were told
                failure = exc
        loading = time.perf_counter()
        self.timings["send"] = loading - sending  # every bucket and the status byte
        receiver.join()
        self.timings["load"] = time.perf_counter() - loading  # the workers' load, and the answer
        if failure is not None:
            raise failure
        if errors:
            raise errors[0]

    def _no_refusals(self, receiver: threading.Thread, errors: list[BaseException]) -> bool:
        """Whether every engine accepted the update's parameters (the workers' check).

        A server that fails before its workers reach the check (restarted since the
        rendezvous, say) never joins it: its error is raised instead of waiting out the
        group's timeout, and the group, left with a collective pending, is dropped."""
        assert self.group is not None
        count = torch.zeros(1, dtype=torch.int32)
        work = self.group.allreduce(count)
        failed_at: float | None = None
        while not work.is_completed():
            if failed_at is None and errors and not receiver.is_alive():
                failed_at = time.monotonic()
            if failed_at is not None and time.monotonic() - failed_at > REFUSAL_GRACE_S:
                _let_time_out(self.group, work)
                self.group = None
                raise errors[0]
            time.sleep(0.005)
        work.wait()
        return int(count.item()) == 0

    def _resume(self) -> None:
        """Generation resumes whatever failed (a client without ``resume``, such as
        vLLM's own HTTP client, leaves that to the servers)."""
        resume = getattr(self.client, "resume", None)
        if resume is None:
            return
        try:
            resume()
        except Exception:  # the update's own error is the one to raise
            logger.exception("hot-swap: resuming generation after a failed weight update failed")

    def _broadcast(self, meta: list[ParamMeta]) -> None:
        """Every bucket, then the status byte. If the source fails half-way, the rest
        goes out as zeros and the status says incomplete: the workers load nothing."""
        assert self.source is not None and self.group is not None
        group = self.group
        plan = packing.wire_buckets(meta, self.init_info.bucket_bytes)
        stream = source_tensors(self.source)  # in metadata order, one tensor at a time (FSDP gathers lazily)
        failure: Exception | None = None

        def packed() -> Iterator[torch.Tensor]:
            nonlocal failure
            for bucket in plan:
                flat = None
                if failure is None:
                    try:
                        flat = self._pack(meta, bucket, stream)
                    except Exception as exc:  # noqa: BLE001 - re-raised once the workers were told
                        failure = exc
                yield (
                    flat if flat is not None else torch.zeros(sum(_nbytes(meta[i]) for i in bucket), dtype=torch.uint8)
                )

        packing.send(packed(), lambda flat: group.broadcast(flat, 0))
        _status(group, failure is None)
        if failure is not None:
            raise failure

    def _pack(
        self, meta: list[ParamMeta], bucket: list[int], stream: Iterator[tuple[str, torch.Tensor]]
    ) -> torch.Tensor:
        """One bucket's bytes, each tensor checked against the metadata the workers were sent."""
        tensors = []
        for index in bucket:
            expected = meta[index]
            name, tensor = next(stream)
            if name != expected.name or tensor.dtype != expected.dtype or tuple(tensor.shape) != expected.shape:
                raise ValueError(
                    f"WeightSource yielded {name} {tensor.dtype} {tuple(tensor.shape)} where its metadata "
                    f"declared {expected.name} {expected.dtype} {expected.shape}"
                )
            tensors.append(tensor)
        return self._packer.pack(tensors)

    def shutdown(self) -> None:
        self.group = None
        self._packer.release()
