"""``POST /api/v1/sample`` on a real engine: greedy output equals HF + PEFT for the version it names."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
from transformers import AutoTokenizer

from hotswap_devkit.server import VllmServer
from tests.conftest import PROMPTS
from vllm_lora_hotswap.client import VLLMClient, VLLMClientConfig
from vllm_lora_hotswap.store import CheckpointStore

GREEDY = {"max_tokens": 8, "temperature": 0.0, "ignore_eos": True}


def sample(engine: VllmServer, body: dict) -> dict:
    response = engine.client.post("/api/v1/sample", json=body)
    assert response.status_code == 200, response.text
    return response.json()


@pytest.mark.engine
def test_sample_answers_with_the_served_version_and_pinned_ones(
    engine: VllmServer, shared_store: CheckpointStore, make_lora, reference
) -> None:
    lora_v1, lora_v2 = make_lora(31), make_lora(32)
    v1 = shared_store.publish("sampled", lora_v1)
    engine.wait_served("sampled", v1)
    token_prompt = AutoTokenizer.from_pretrained(engine.model)(PROMPTS[0]).input_ids

    data = sample(
        engine,
        {"prompts": [*PROMPTS, token_prompt], "model_id": "sampled", "sampling_params": {**GREEDY, "logprobs": True}},
    )
    assert data["model_id"] == f"sampled@{v1}" and data["logprobs_mode"] == "raw_logprobs"
    assert len(data["samples"]) == len(PROMPTS) + 1
    for prompt, s in zip([*PROMPTS, PROMPTS[0]], data["samples"], strict=True):
        assert s["version"] == v1 and s["model"] == f"sampled@{v1}"
        assert s["token_ids"] == reference(lora_v1, prompt), f"{prompt!r} is not {v1}'s PEFT output"
        assert s["prompt_token_ids"] == AutoTokenizer.from_pretrained(engine.model)(prompt).input_ids
        assert s["finish_reason"] == "length" and isinstance(s["text"], str)
        assert len(s["logprobs"]) == 8 and all(math.isfinite(x) and x <= 0 for x in s["logprobs"])

    v2 = shared_store.publish("sampled", lora_v2)
    engine.wait_served("sampled", v2)
    latest = sample(engine, {"prompts": list(PROMPTS), "model_id": "sampled", "sampling_params": GREEDY})
    pinned = sample(engine, {"prompts": list(PROMPTS), "model_id": f"sampled@{v1}", "sampling_params": GREEDY})
    for prompt, new, old in zip(PROMPTS, latest["samples"], pinned["samples"], strict=True):
        assert (new["version"], old["version"]) == (v2, v1)
        assert new["token_ids"] == reference(lora_v2, prompt) and old["token_ids"] == reference(lora_v1, prompt)
        assert "logprobs" not in new

    base = sample(engine, {"prompts": [PROMPTS[1]], "sampling_params": GREEDY})
    (s,) = base["samples"]
    assert s["version"] is None and s["model"] == str(engine.model) and s["token_ids"] == reference(None, PROMPTS[1])

    # The `vllm_backend`-compatible client API goes through the same route.
    client = VLLMClient(VLLMClientConfig(base_urls=[engine.url]))
    (completion,) = client.generate([PROMPTS[2]], GREEDY, adapter="sampled")
    assert completion["version"] == v2 and completion["token_ids"] == reference(lora_v2, PROMPTS[2])


@pytest.mark.engine
@pytest.mark.parametrize(
    ("body", "status", "named"),
    [
        ({"prompts": ["x"], "model_id": "no-such-adapter"}, 404, "no-such-adapter"),
        (
            {"prompts": ["x"], "model_id": "no-such-adapter@2020-01-01T00-00-00Z"},
            404,
            "no-such-adapter@2020-01-01T00-00-00Z",
        ),
        ({"prompts": ["x"], "sampling_params": {"temperature": 5}}, 400, "sampling_params.temperature"),
        ({"prompts": ["x"], "sampling_params": {"max_tokens": 0}}, 400, "sampling_params.max_tokens"),
        ({"prompts": ["x"], "sampling_params": {"temprature": 0.5}}, 400, "sampling_params.temprature"),
        ({"prompts": []}, 400, "prompts"),
        ({"prompts": ["x", ""]}, 400, "prompts.1"),
        ({"prompt": ["x"]}, 400, "prompts"),
    ],
)
def test_sample_errors_name_the_model_or_the_field(engine: VllmServer, body: dict, status: int, named: str) -> None:
    response = engine.client.post("/api/v1/sample", json=body)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert named in error["message"], error
    if status == 400:
        assert error["param"] == named


@pytest.mark.engine
def test_sample_errors_reach_the_client_with_their_message(engine: VllmServer) -> None:
    client = VLLMClient(VLLMClientConfig(base_urls=[engine.url]))
    with pytest.raises(RuntimeError, match=r"/api/v1/sample answered 404: .*'no-such-adapter'"):
        client.generate(["x"], adapter="no-such-adapter")


def test_sample_needs_the_servers_api_key() -> None:
    """vLLM's --api-key middleware guards /v1/* only: the route checks the key itself."""
    from fastapi import FastAPI
    from fastapi.testclient import TestClient

    from vllm_lora_hotswap.engine import sample_api
    from vllm_lora_hotswap.weights.routes import api_key_hashes

    app = FastAPI()
    app.include_router(sample_api.router)
    app.state.lora_hotswap_key_hashes = api_key_hashes(SimpleNamespace(api_key=["secret"]))
    client = TestClient(app)
    assert client.post("/api/v1/sample", json={"prompts": ["x"]}).status_code == 401
    wrong = client.post("/api/v1/sample", json={"prompts": ["x"]}, headers={"Authorization": "Bearer nope"})
    assert wrong.status_code == 401
    # With the key the request reaches the route, whose validation answers before any engine is needed.
    keyed = client.post("/api/v1/sample", json={"prompts": []}, headers={"Authorization": "Bearer secret"})
    assert keyed.status_code == 400 and keyed.json()["error"]["param"] == "prompts"
