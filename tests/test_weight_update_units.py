"""Base-weight updates without an engine: the parameter check, the gloo trainer's error
paths, the client's retries while a server is paused, the offline adapter's errors."""

from __future__ import annotations

import functools
from typing import Any

import httpx
import pytest
import torch

from hotswap_devkit.server import free_port
from vllm_lora_hotswap.weights.spec import check_update

SPEC = {"model.embed.weight": ((16, 8), "float32"), "model.step": ((1,), "int64")}


def test_an_update_is_checked_by_name_shape_and_dtype() -> None:
    check_update(
        [("model.embed.weight", [16, 8], "bfloat16"), ("model.step", (1,), "torch.int64")], SPEC
    )  # casts load
    with pytest.raises(
        ValueError, match=r"parameter 'model.extra' \[2\] float32: the engine's model has no such parameter"
    ):
        check_update([("model.embed.weight", [16, 8], "float32"), ("model.extra", [2], "float32")], SPEC)
    with pytest.raises(
        ValueError, match=r"parameter 'model.embed.weight' has shape \[16, 4\], the engine's model expects \[16, 8\]"
    ):
        check_update([("model.embed.weight", [16, 4], "float32")], SPEC)
    with pytest.raises(
        ValueError, match=r"parameter 'model.step' has dtype float32, the engine's model expects int64"
    ):
        check_update([("model.step", [1], "float32")], SPEC)


class FakeServers:
    """The trainer's view of the servers: records calls, fails where told."""

    def __init__(self, fail: str | None = None):
        self.fail = fail
        self.calls: list[str] = []

    def _call(self, name: str) -> None:
        self.calls.append(name)
        if name == self.fail:
            raise RuntimeError(f"http://server/{name} answered 500: {name} failed")

    def init_weight_transfer_engine(self, init_info: dict[str, Any]) -> None:
        self._call("init")

    def start_weight_update(self) -> None:
        self._call("start")

    def update_weights(self, update_info: Any) -> None:
        self._call("update")

    def finish_weight_update(self, weight_version: str | None = None) -> None:
        self._call("finish")

    def resume(self) -> None:
        self._call("resume")


def _trainer(servers: FakeServers, model: torch.nn.Module) -> Any:
    """A gloo trainer alone in its group (world size 1): every collective completes at once."""
    from vllm.distributed.weight_transfer.base import ModuleSource

    from vllm_lora_hotswap.weights.gloo import GlooTrainerInitInfo, GlooTrainerWeightTransferEngine, join_group

    info = GlooTrainerInitInfo("127.0.0.1", free_port(), 1, rank=0)
    engine = GlooTrainerWeightTransferEngine(client=servers, source=ModuleSource(model), init_info=info)
    engine.group = join_group(info.master_address, info.master_port, 0, 1, 30)
    return engine


@pytest.mark.parametrize("fail", ["update", "finish"])
def test_the_gloo_push_resumes_the_servers_when_a_server_fails(fail: str) -> None:
    servers = FakeServers(fail=fail)
    with pytest.raises(RuntimeError, match=f"{fail} failed"):
        _trainer(servers, torch.nn.Linear(4, 2)).send_weights("v1")
    assert servers.calls[-1] == "resume" and servers.calls.count("resume") == 1
    assert "finish" not in servers.calls or fail == "finish"


def test_the_gloo_push_resumes_the_servers_when_its_source_fails_half_way(monkeypatch: pytest.MonkeyPatch) -> None:
    from vllm_lora_hotswap.weights import gloo

    def wrong_tensors(source: Any) -> Any:
        yield "weight", torch.zeros(3)  # metadata declared weight [2, 4]

    monkeypatch.setattr(gloo, "source_tensors", wrong_tensors)
    servers = FakeServers()
    with pytest.raises(
        ValueError, match=r"WeightSource yielded weight torch.float32 \(3,\) where its metadata declared weight"
    ):
        _trainer(servers, torch.nn.Linear(4, 2)).send_weights("v1")
    assert servers.calls == ["start", "update", "resume"]


def test_a_server_failing_before_its_workers_join_does_not_hang_the_trainer() -> None:
    """E.g. a server restarted since the rendezvous: its workers never join the update."""
    import threading
    import time

    from vllm.distributed.weight_transfer.base import ModuleSource

    from vllm_lora_hotswap.weights.gloo import GlooTrainerInitInfo, GlooTrainerWeightTransferEngine, join_group

    info = GlooTrainerInitInfo("127.0.0.1", free_port(), 2, rank=0)
    silent: list[Any] = []  # the engine rank that never takes part
    peer = threading.Thread(target=lambda: silent.append(join_group(info.master_address, info.master_port, 1, 2, 30)))
    peer.start()
    servers = FakeServers(fail="update")
    engine = GlooTrainerWeightTransferEngine(
        client=servers, source=ModuleSource(torch.nn.Linear(4, 2)), init_info=info
    )
    engine.group = join_group(info.master_address, info.master_port, 0, 2, 30)
    peer.join()
    started = time.monotonic()
    with pytest.raises(RuntimeError, match="update failed"):
        engine.send_weights("v1")
    assert time.monotonic() - started < 10 and servers.calls == ["start", "update", "resume"]
    with pytest.raises(RuntimeError, match="the gloo transfer group is closed .* initialise it again"):
        engine.send_weights("v2")


PAUSED = {
    "error": {
        "message": "Generation is paused. Please retry after it resumes.",
        "type": "ServiceUnavailableError",
        "code": 503,
    }
}


def _client(
    monkeypatch: pytest.MonkeyPatch, completions: list[httpx.Response], **config: Any
) -> tuple[Any, list[str]]:
    from vllm_lora_hotswap.client import VLLMClient, VLLMClientConfig

    seen: list[str] = []

    def handle(request: httpx.Request) -> httpx.Response:
        seen.append(request.url.path)
        if request.url.path == "/api/v1/sample":
            return completions.pop(0)
        return httpx.Response(200, json={})

    monkeypatch.setattr(httpx, "Client", functools.partial(httpx.Client, transport=httpx.MockTransport(handle)))
    return VLLMClient(VLLMClientConfig(base_urls=["http://server:8000"], **config)), seen


def test_generation_is_retried_while_a_server_is_paused_for_a_weight_update(monkeypatch: pytest.MonkeyPatch) -> None:
    sample = {"text": " hi", "token_ids": [5], "model": "m", "version": None}
    done = httpx.Response(200, json={"samples": [sample]})
    client, seen = _client(monkeypatch, [httpx.Response(503, json=PAUSED), httpx.Response(503, json=PAUSED), done])
    assert client.generate(["hello"], {"max_tokens": 1}, adapter="m") == [sample]
    assert seen.count("/api/v1/sample") == 3


def test_other_errors_and_a_pause_longer_than_the_limit_are_raised(monkeypatch: pytest.MonkeyPatch) -> None:
    other = httpx.Response(503, json={"error": "lora1@v cannot be loaded now: all 8 LoRA slots are in use"})
    client, seen = _client(monkeypatch, [other])
    with pytest.raises(RuntimeError, match="answered 503: lora1@v cannot be loaded now"):
        client.generate(["hello"], adapter="lora1@v")
    assert seen.count("/api/v1/sample") == 1
    client, seen = _client(monkeypatch, [httpx.Response(503, json=PAUSED) for _ in range(10)], paused_timeout=0.2)
    with pytest.raises(RuntimeError, match="answered 503: .*Generation is paused"):
        client.generate(["hello"], adapter="m")
    assert 2 <= seen.count("/api/v1/sample") < 10


class FailingLLM:
    def __init__(self, error: Exception):
        self.error = error

    def collective_rpc(self, method: str, args: tuple[Any, ...] = ()) -> list[Any]:
        raise self.error


@pytest.mark.parametrize(
    "error",
    [
        NotImplementedError("Method 'hotswap_stage' is not implemented."),  # in process
        Exception(  # across processes (engine core, workers)
            "Call to collective_rpc method failed: Worker failed with error 'Method 'hotswap_stage' is not "
            "implemented.', please check the stack trace above for the root cause"
        ),
    ],
)
def test_offline_workers_without_the_plugin_are_named(error: Exception) -> None:
    from vllm_lora_hotswap.engine.offline import OfflineEngine

    engine = OfflineEngine(FailingLLM(error), [0], 1)
    with pytest.raises(RuntimeError, match="set VLLM_HOTSWAP_ROOT before creating the LLM"):
        engine._rpc("hotswap_stage", 1, "a", "/p")
    other = OfflineEngine(FailingLLM(ValueError("something else")), [0], 1)
    with pytest.raises(ValueError, match="something else"):
        other._rpc("hotswap_stage", 1, "a", "/p")


def test_a_probe_aborted_by_a_weight_update_is_not_the_versions_failure() -> None:
    from types import SimpleNamespace

    from vllm_lora_hotswap.engine.worker_rpc import WorkerRpcEngine
    from vllm_lora_hotswap.pipeline.engine_api import CheckpointRejected, EngineUnavailable

    aborted = SimpleNamespace(finish_reason="abort", token_ids=[], logprobs=[])
    verdict = WorkerRpcEngine.probe_verdict(aborted)
    assert isinstance(verdict, EngineUnavailable) and "aborted by the engine" in str(verdict)
    empty = WorkerRpcEngine.probe_verdict(SimpleNamespace(finish_reason="length", token_ids=[], logprobs=[]))
    assert isinstance(empty, CheckpointRejected) and "no tokens" in str(empty)


# -- the reload's memory check, and the worker's incomplete-update flag --------------------


def _model_of(*sizes: int) -> torch.nn.Module:
    """Layers of ``sizes`` float32 elements each: the largest is the one a reload holds at once."""
    return torch.nn.Sequential(*(torch.nn.Linear(size, 1, bias=False) for size in sizes))


@pytest.mark.parametrize(
    ("device", "free", "short"),
    [
        ("cpu", {"cpu": 10_000}, None),  # 4,000 of the update + 3 x 1,600 of the largest layer fit
        ("cpu", {"cpu": 8_000}, "8,800"),
        ("cuda", {"cuda": 5_000, "cpu": 4_000}, None),  # the device holds the reload, the host the update
        ("cuda", {"cuda": 4_000, "cpu": 1 << 30}, "cuda"),
        ("cuda", {"cuda": 1 << 30, "cpu": 3_000}, "host"),
    ],
)
def test_the_reload_memory_check_counts_the_update_and_three_times_its_largest_layer(
    monkeypatch: pytest.MonkeyPatch, device: str, free: dict[str, int], short: str | None
) -> None:
    from vllm_lora_hotswap.weights import reload

    monkeypatch.setattr(reload, "free_bytes", lambda where: free[where.type])
    monkeypatch.setattr(reload, "reload_lifecycle", lambda: False)  # vLLM 0.32 here: its own figures are 0.34's
    verdict = reload.shortfall(_model_of(100, 400, 250), torch.device(device), update_bytes=4_000)
    if short is None:
        assert verdict is None
        return
    assert verdict is not None
    if device == "cpu":
        assert verdict.startswith(
            "the update needs about 0.0 MiB of free host memory (0.0 MiB to hold the update + 3 x its largest "
            "layer of 0.0 MiB to reload it layer by layer) and 0.0 MiB is free."
        )
        assert "Lower VLLM_CPU_KVCACHE_SPACE" in verdict
    else:
        assert f"of free {short} memory" in verdict
        assert "--gpu-memory-utilization below 1.0" in verdict and "/start_weight_update" in verdict


def test_the_largest_layer_is_the_largest_module_of_its_own_tensors(monkeypatch: pytest.MonkeyPatch) -> None:
    from vllm_lora_hotswap.weights import reload

    monkeypatch.setattr(reload, "reload_lifecycle", lambda: False)
    assert reload.largest_layer_bytes(_model_of(100, 400, 250)) == 400 * 4


class FakeWorker:
    """vLLM 0.34's worker as the plugin's ``update_weights`` RPC sees it."""

    def __init__(self, error: BaseException) -> None:
        self._incomplete_weight_updates = {False}  # set by start_weight_update
        self._weight_update_is_draft = False
        self.error = error

    def update_weights(self, update_info: Any) -> None:
        raise self.error


@pytest.mark.parametrize(
    ("error", "incomplete"),
    [
        ("refused", set()),  # nothing was replaced: the weights are complete
        ("cut off", set()),
        ("other", {False}),  # another engine's failure may have replaced layers: as vLLM leaves it
    ],
)
def test_an_update_that_loaded_nothing_takes_back_the_incomplete_mark(error: str, incomplete: set[bool]) -> None:
    from types import SimpleNamespace

    from vllm_lora_hotswap.engine import rpc
    from vllm_lora_hotswap.weights.reload import NothingLoaded, UpdateRefused

    raised = {"refused": UpdateRefused("no"), "cut off": NothingLoaded("cut"), "other": RuntimeError("half")}[error]
    worker = FakeWorker(raised)
    with pytest.raises(type(raised)):
        rpc.update_weights(SimpleNamespace(worker=worker), {"names": []})
    assert worker._incomplete_weight_updates == incomplete


def test_an_update_on_a_vllm_without_the_mark_only_raises() -> None:
    from types import SimpleNamespace

    from vllm_lora_hotswap.engine import rpc
    from vllm_lora_hotswap.weights.reload import UpdateRefused

    class OldWorker:  # vLLM 0.32 and 0.33
        def update_weights(self, update_info: Any) -> None:
            raise UpdateRefused("no")

    with pytest.raises(UpdateRefused, match="no"):
        rpc.update_weights(SimpleNamespace(worker=OldWorker()), {})


def test_a_parameter_that_starts_misaligned_in_its_bucket_is_unpacked_by_a_copy() -> None:
    """An odd-sized bf16 tensor puts the next float32 tensor at an offset no float32 view can
    start at (all of an update is received into one allocation)."""
    from types import SimpleNamespace

    from vllm_lora_hotswap.weights import packing

    odd, wide = torch.arange(5, dtype=torch.bfloat16), torch.arange(6, dtype=torch.float32).reshape(2, 3)
    flat = torch.cat([odd.view(torch.uint8), wide.view(-1).view(torch.uint8)])
    params = [
        SimpleNamespace(name="odd", dtype=torch.bfloat16, shape=(5,)),
        SimpleNamespace(name="wide", dtype=torch.float32, shape=(2, 3)),
    ]
    unpacked = dict(packing.unpack(flat, params))
    assert torch.equal(unpacked["odd"], odd) and torch.equal(unpacked["wide"], wide)
