"""Base weights over vLLM's weight-transfer API (gloo on CPU) and the `vllm_backend`-compatible client API, on a real server."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import torch

from hotswap_devkit.server import VllmServer, free_port, sse_lines
from hotswap_devkit.toy_models import ReferenceModel
from tests.conftest import PROMPTS
from vllm_lora_hotswap.client import VLLMClient, VLLMClientConfig
from vllm_lora_hotswap.store import CheckpointStore

pytestmark = pytest.mark.engine
API_KEY = "test-secret"


@pytest.fixture(scope="module")
def weights_engine(toy_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[VllmServer]:
    server = VllmServer(
        toy_model,
        tmp_path_factory.mktemp("weights-store"),
        tmp_path_factory.mktemp("logs") / "weights.log",
        args=["--weight-transfer-config", '{"backend": "gloo"}'],
        api_key=API_KEY,
    ).start()
    yield server
    server.stop()


@pytest.fixture
def client(weights_engine: VllmServer) -> VLLMClient:
    return VLLMClient(
        VLLMClientConfig(
            base_urls=[weights_engine.url],
            api_key=API_KEY,
            store_root=str(weights_engine.root),
            group_port=free_port(),
        )
    )


def perturbed_model(base: Path, out: Path, seed: int):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(torch.randn(parameter.shape, generator=generator) * 0.05)
    model.save_pretrained(out)
    for tokenizer_file in base.glob("tokenizer*"):
        shutil.copy(tokenizer_file, out)
    return model


def test_base_weights_over_gloo_keep_adapters_served_without_disk_reads(
    weights_engine: VllmServer, client: VLLMClient, toy_model: Path, make_lora, tmp_path: Path
) -> None:
    store = CheckpointStore(weights_engine.root)
    lora = make_lora(91)
    version = client.register_lora_adapter("sync", lora)
    # Any read of this version from disk would now fail: the adapter must come from its staged copy.
    weights = store.version_dir("sync", version) / "adapter_model.safetensors"
    weights.rename(weights.with_suffix(".moved"))
    try:
        model = perturbed_model(toy_model, tmp_path / "new-base", seed=1)
        client.init_communicator("cpu")
        client.update_model_weights(model, "step-1")
        base_ref, lora_ref = ReferenceModel(tmp_path / "new-base"), ReferenceModel(tmp_path / "new-base", lora)
        for prompt in PROMPTS:
            assert weights_engine.tokens(str(toy_model), prompt)[1] == base_ref.greedy(prompt, 8)
            assert weights_engine.tokens("sync", prompt) == (f"sync@{version}", lora_ref.greedy(prompt, 8))
        assert weights_engine.client.get("/weight_info").json() == {"weight_version": "step-1"}
        assert weights_engine.client.get("/v1/lora/adapters").json()["weight_version"] == "step-1"
        assert 'vllm_hotswap_weight_version{version="step-1"} 1.0' in weights_engine.client.get("/metrics").text
        client.close_communicator()
    finally:
        weights.with_suffix(".moved").rename(weights)


def _stream_until(engine: VllmServer, stop: threading.Event, results: list, errors: list) -> None:
    body = {
        "model": str(engine.model),
        "prompt": PROMPTS[1],
        "max_tokens": 24,
        "temperature": 0.0,
        "ignore_eos": True,
        "stream": True,
        "return_token_ids": True,
    }
    while not stop.is_set():
        try:
            tokens, finish = 0, None
            with engine.client.stream("POST", "/v1/completions", json=body) as response:
                response.raise_for_status()
                for line in sse_lines(response):
                    if line.startswith("data: {"):
                        choice = json.loads(line[6:])["choices"][0]
                        tokens += len(choice.get("token_ids") or [])
                        finish = choice.get("finish_reason") or finish
            results.append((tokens, finish))
        except BaseException as exc:  # noqa: BLE001 - asserted below
            errors.append(exc)


@pytest.mark.parametrize("mode", ["wait", "keep"])
def test_a_push_while_clients_stream_loses_no_request(
    weights_engine: VllmServer, toy_model: Path, tmp_path: Path, mode: str
) -> None:
    client = VLLMClient(
        VLLMClientConfig(base_urls=[weights_engine.url], api_key=API_KEY, update_mode=mode, group_port=free_port())
    )
    model = perturbed_model(toy_model, tmp_path / "base", seed=2)
    client.init_communicator("cpu")
    stop, results, errors = threading.Event(), [], []
    threads = [threading.Thread(target=_stream_until, args=(weights_engine, stop, results, errors)) for _ in range(6)]
    for thread in threads:
        thread.start()
    try:
        for step in range(3):
            client.update_model_weights(model, f"{mode}-{step}")
    finally:
        stop.set()
        for thread in threads:
            thread.join(120)
        client.close_communicator()
    assert not errors, errors[:3]
    assert len(results) >= 6 and all(result == (24, "length") for result in results), results
    reference = ReferenceModel(tmp_path / "base")
    assert weights_engine.tokens(str(toy_model), PROMPTS[0])[1] == reference.greedy(PROMPTS[0], 8)


def test_control_routes_refuse_requests_without_the_api_key(weights_engine: VllmServer) -> None:
    before = weights_engine.client.get("/weight_info").json()
    anonymous = httpx.Client(base_url=weights_engine.url, timeout=30)
    wrong = httpx.Client(base_url=weights_engine.url, timeout=30, headers={"Authorization": "Bearer nope"})
    for http in (anonymous, wrong):
        for path, body in [
            ("/init_weight_transfer_engine", {"init_info": {}}),
            ("/start_weight_update", {"mode": "abort"}),
            ("/update_weights", {"update_info": {}}),
            ("/finish_weight_update", {"weight_version": "evil"}),
            ("/shutdown_weight_transfer_engine", None),
            ("/reset_prefix_cache", None),
            ("/resume", None),
        ]:
            assert http.post(path, json=body).status_code == 401, path
        assert http.get("/weight_info").status_code == 401
        assert http.get("/get_world_size").status_code == 401
        assert http.get("/v1/lora/adapters").status_code == 401
    # No development endpoints are opened by the plugin.
    for path in ("/collective_rpc", "/sleep", "/wake_up", "/server_info", "/pause"):
        assert weights_engine.client.post(path, json={"method": "hotswap_state"}).status_code in (404, 405), path
    assert weights_engine.client.get("/weight_info").json() == before
    assert weights_engine.tokens(str(weights_engine.model), PROMPTS[0])  # still serving


def test_control_routes_on_every_address_without_a_key_refuse_to_start(toy_model: Path, tmp_path: Path) -> None:
    server = VllmServer(
        toy_model,
        tmp_path / "store",
        tmp_path / "open.log",
        args=["--host", "0.0.0.0", "--weight-transfer-config", '{"backend": "gloo"}'],
    )
    (tmp_path / "store").mkdir()
    with pytest.raises(RuntimeError, match="exited"):
        server.start()
    log = server.log_path.read_text()
    assert "listens on 0.0.0.0 without an API key" in log and "Pass --api-key" in log, server.log_tail()


def test_client_api_against_a_real_server(
    weights_engine: VllmServer, client: VLLMClient, make_lora, reference
) -> None:
    lora = make_lora(92)
    with pytest.raises(ValueError, match="LoRA path does not exist: /no/such/lora"):
        client.register_lora_adapter("clientlora", "/no/such/lora")
    version = client.register_lora_adapter("clientlora", lora)
    assert {
        "adapter_id": "clientlora",
        "lora_path": str(CheckpointStore(weights_engine.root).version_dir("clientlora", version)),
        "version": version,
    } in client.list_lora_adapters()
    (completion,) = client.generate(
        ["hello world hello"], {"max_tokens": 4, "temperature": 0, "ignore_eos": True}, adapter="clientlora"
    )
    assert completion["model"] == f"clientlora@{version}" and len(completion["token_ids"]) == 4
    client.reset_prefix_cache()
    info = client.get_client_info()
    assert info["base_urls"] == [weights_engine.url] and any(a["adapter_id"] == "clientlora" for a in info["adapters"])
    client.unregister_lora_adapter("clientlora")
    assert all(a["adapter_id"] != "clientlora" for a in client.list_lora_adapters())


def test_client_errors_name_the_thing(weights_engine: VllmServer) -> None:
    with pytest.raises(ConnectionError, match=r"can't be reached at http://127.0.0.1:9"):
        VLLMClient(VLLMClientConfig(base_urls=["http://127.0.0.1:9"]))
    with pytest.raises(RuntimeError, match="call init_communicator"):
        VLLMClient(VLLMClientConfig(base_urls=[weights_engine.url], api_key=API_KEY)).update_model_weights(
            torch.nn.Linear(2, 2)
        )
    script = (
        "import sys; sys.modules['vllm'] = None\n"  # as if vLLM were not installed
        "from vllm_lora_hotswap.weights.trainer import WeightSync\n"
        "try:\n    WeightSync(None, backend='gloo', master_port=1)\n"
        "except ImportError as e:\n    print(e)\n"
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout
    assert "vLLM is not available" in out and "pip install 'vllm-lora-hotswap[gpu]'" in out


@pytest.mark.gpu
def test_nccl_push_into_a_gpu_engine(toy_model: Path, tmp_path: Path) -> None:
    server = VllmServer(
        toy_model,
        tmp_path / "store",
        tmp_path / "nccl.log",
        args=["--weight-transfer-config", '{"backend": "nccl"}'],
        env={"VLLM_CPU_KVCACHE_SPACE": ""},
    ).start()
    try:
        client = VLLMClient(VLLMClientConfig(base_urls=[server.url], group_port=free_port()))
        model = perturbed_model(toy_model, tmp_path / "base", seed=3).cuda()
        client.init_communicator("cuda")
        client.update_model_weights(model, "gpu-1")
        reference = ReferenceModel(tmp_path / "base")
        assert server.tokens(str(toy_model), PROMPTS[0])[1] == reference.greedy(PROMPTS[0], 8)
        client.close_communicator()
    finally:
        server.stop()
