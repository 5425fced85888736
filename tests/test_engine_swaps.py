"""A real vLLM CPU engine follows the store: every served version is checked against HF + PEFT."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

from tests.conftest import PROMPTS
from tests.support.server import VllmServer
from vllm_lora_hotswap.store import CheckpointStore

pytestmark = pytest.mark.engine


def assert_serves(engine: VllmServer, model: str, adapter_dir: Path, reference: Callable, version: str) -> None:
    for prompt in PROMPTS:
        served_by, tokens = engine.tokens(model, prompt)
        assert served_by == f"{model.split('@')[0]}@{version}"
        assert tokens == reference(adapter_dir, prompt), f"{model} on {prompt!r} is not {version}'s PEFT output"


def test_a_published_version_is_served_exactly(engine: VllmServer, shared_root: Path, make_lora, reference) -> None:
    """Foundation: greedy output of a published store version equals HF + PEFT."""
    store = CheckpointStore(shared_root)
    lora = make_lora(1)
    version = store.publish("basic", lora, {"reward": 0.5})
    engine.wait_served("basic", version)
    assert_serves(engine, "basic", lora, reference, version)
    assert engine.tokens(str(engine.model), PROMPTS[0])[1] == reference(None, PROMPTS[0])


def test_swap_rollback_follow_and_pinned_versions(engine: VllmServer, shared_root: Path, make_lora, reference) -> None:
    store = CheckpointStore(shared_root)
    lora_v1, lora_v2 = make_lora(11), make_lora(12)
    v1 = store.publish("lora1", lora_v1, {"reward": 0.1})
    engine.wait_served("lora1", v1)
    assert_serves(engine, "lora1", lora_v1, reference, v1)

    published = time.monotonic()
    v2 = store.publish("lora1", lora_v2, {"reward": 0.2})
    engine.wait_served("lora1", v2, timeout=0.5 + 30)  # poll interval + swap time (generous on 2 cores)
    assert time.monotonic() - published < 30
    assert_serves(engine, "lora1", lora_v2, reference, v2)

    store.pin("lora1", v1)  # rollback
    engine.wait_served("lora1", v1)
    assert_serves(engine, "lora1", lora_v1, reference, v1)

    store.follow("lora1")
    engine.wait_served("lora1", v2)
    assert_serves(engine, "lora1", lora_v2, reference, v2)

    # A retained version answers by name while the adapter serves another.
    assert_serves(engine, f"lora1@{v1}", lora_v1, reference, v1)
    models = {m["id"]: m for m in engine.client.get("/v1/models").json()["data"]}
    assert models["lora1"]["root"] == str(store.version_dir("lora1", v2))
    assert not any("@" in name for name in models)


def test_unknown_pinned_version_is_a_clear_404(engine: VllmServer, shared_root: Path, make_lora) -> None:
    store = CheckpointStore(shared_root)
    version = store.publish("lora404", make_lora(1))
    engine.wait_served("lora404", version)
    response = engine.client.post(
        "/v1/completions", json={"model": "lora404@2020-01-01T00-00-00Z", "prompt": "hi", "max_tokens": 2}
    )
    assert response.status_code == 404
    assert "no such READY version" in response.json()["error"]["message"]
    assert engine.adapters()["lora404"]["last_error"] is None


def test_new_adapter_is_listed_and_servable_within_the_poll_interval(engine: VllmServer, shared_root: Path, make_lora) -> None:
    store = CheckpointStore(shared_root)
    version = store.publish("fresh", make_lora(2))
    engine.wait_until(
        lambda: "fresh" in {m["id"] for m in engine.client.get("/v1/models").json()["data"]}, 30, "fresh in /v1/models"
    )
    assert engine.tokens("fresh", PROMPTS[0])[0] == f"fresh@{version}"


def test_prefix_cache_never_serves_the_old_version(engine: VllmServer, shared_root: Path, make_lora, reference) -> None:
    """A prompt longer than a KV block (128 tokens on CPU) is cached under v1; after the
    swap the same prompt must get v2's output, never v1's cached blocks."""
    store = CheckpointStore(shared_root)
    lora_v1, lora_v2 = make_lora(21), make_lora(22)
    long_prompt = " ".join(["the store is the one source of truth that engines follow"] * 9)  # ~160 tokens
    v1 = store.publish("cached", lora_v1)
    engine.wait_served("cached", v1)
    for _ in range(2):  # the second request hits the prefix cache
        assert engine.tokens("cached", long_prompt)[1] == reference(lora_v1, long_prompt)
    v2 = store.publish("cached", lora_v2)
    engine.wait_served("cached", v2)
    for _ in range(2):
        assert engine.tokens("cached", long_prompt) == (f"cached@{v2}", reference(lora_v2, long_prompt))
    metrics = engine.client.get("/metrics").text
    hits = [line for line in metrics.splitlines() if line.startswith("vllm:prefix_cache_hits_total")]
    assert hits and float(hits[0].split()[-1]) > 0, "the prefix cache was never used"


def _stream(engine: VllmServer, model: str, prompt: str, max_tokens: int) -> tuple[set[str], list[int]]:
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0.0,
            "ignore_eos": True, "return_token_ids": True, "stream": True}  # fmt: skip
    served_by: set[str] = set()
    tokens: list[int] = []
    with httpx.stream("POST", f"{engine.url}/v1/completions", json=body, timeout=120) as response:
        response.raise_for_status()
        for line in response.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            served_by.add(chunk["model"])
            for choice in chunk["choices"]:
                tokens.extend(choice.get("token_ids") or [])
    return served_by, tokens


def test_streaming_clients_during_30_swaps_each_get_exactly_one_version(
    engine: VllmServer, shared_root: Path, make_lora, reference
) -> None:
    store = CheckpointStore(shared_root)
    loras = [make_lora(31), make_lora(32)]
    prompt = PROMPTS[1]
    expected = [reference(lora, prompt, 16) for lora in loras]
    weights_of: dict[str, int] = {}
    first = store.publish("stream", loras[0])
    weights_of[first] = 0
    engine.wait_served("stream", first)

    done = threading.Event()
    results: list[tuple[set[str], list[int]]] = []
    errors: list[BaseException] = []

    def client() -> None:
        while not done.is_set():
            try:
                results.append(_stream(engine, "stream", prompt, 16))
            except BaseException as exc:  # noqa: BLE001 - collected and asserted below
                errors.append(exc)

    threads = [threading.Thread(target=client) for _ in range(16)]
    for thread in threads:
        thread.start()
    try:
        for swap in range(30):
            which = (swap + 1) % 2
            version = store.publish("stream", loras[which])
            weights_of[version] = which
            engine.wait_served("stream", version, timeout=60)
    finally:
        done.set()
        for thread in threads:
            thread.join(120)
    assert not errors, errors[:3]
    assert len(results) >= 30
    versions_seen = set()
    for served_by, tokens in results:
        assert len(served_by) == 1, f"one response streamed from several versions: {served_by}"
        version = next(iter(served_by)).split("@", 1)[1]
        versions_seen.add(version)
        assert tokens == expected[weights_of[version]], f"response from {version} mixes versions"
    assert len(versions_seen) >= 5
