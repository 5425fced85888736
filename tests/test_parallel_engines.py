"""Engines with more than one worker: tensor parallel (two ranks, one engine core) and data
parallel (two engine cores behind one API server), on vLLM's CPU build.

Every rank and every replica must hold the version before it is served, and none may read
the store inside a step (``disk_loads``); every claim is checked against PEFT's output."""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from hotswap_devkit.server import VllmServer
from tests.conftest import PROMPTS
from tests.support.fake import write_lora
from tests.support.inject import inject_version
from vllm_lora_hotswap.store import CheckpointStore

pytestmark = pytest.mark.engine
LAYOUTS = {"tp2": ["--tensor-parallel-size", "2"], "dp2": ["--data-parallel-size", "2"]}


@pytest.fixture(scope="module", params=sorted(LAYOUTS))
def parallel_engine(
    request: pytest.FixtureRequest, toy_model: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[VllmServer]:
    root = tmp_path_factory.mktemp(f"store-{request.param}")
    log = tmp_path_factory.mktemp("logs") / f"{request.param}.log"
    # Two CPU workers need a core each (vLLM refuses to bind two to one NUMA node otherwise).
    server = VllmServer(toy_model, root, log, env={"VLLM_CPU_OMP_THREADS_BIND": "0|1"}, args=LAYOUTS[request.param])
    server.start(timeout=600)
    yield server
    server.stop()


def workers(engine: VllmServer) -> list[dict]:
    return engine.client.get("/v1/lora/workers").json()["workers"]


def assert_every_worker_holds(engine: VllmServer, store: CheckpointStore, adapter: str, version: str) -> None:
    states = workers(engine)
    assert len(states) == 2, states  # two ranks, or two replicas of one worker each
    for state in states:
        assert str(store.version_dir(adapter, version)) in state["installed"].values(), states
        assert state["disk_loads"] == 0, states


def test_publish_rollback_and_a_bad_version_on_every_worker(
    parallel_engine: VllmServer, make_lora, reference, tmp_path: Path
) -> None:
    engine, store = parallel_engine, CheckpointStore(parallel_engine.root)
    lora_v1, lora_v2 = make_lora(91), make_lora(92)
    v1 = store.publish("par", lora_v1)
    engine.wait_served("par", v1, timeout=120)
    assert_every_worker_holds(engine, store, "par", v1)
    v2 = store.publish("par", lora_v2)
    engine.wait_served("par", v2, timeout=120)
    assert_every_worker_holds(engine, store, "par", v2)

    # Sixteen requests at once: with two replicas, both get some; each answers with v2's output.
    requests = [PROMPTS[i % len(PROMPTS)] for i in range(16)]
    with ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(lambda prompt: engine.tokens("par", prompt), requests))
    assert answers == [(f"par@{v2}", reference(lora_v2, prompt)) for prompt in requests]

    store.pin("par", v1)  # rollback
    engine.wait_served("par", v1, timeout=120)
    assert engine.tokens("par", PROMPTS[0]) == (f"par@{v1}", reference(lora_v1, PROMPTS[0]))

    bad = inject_version(store, "par", write_lora(tmp_path / "nan", value=float("nan")))
    store.follow("par")  # the newest version is the bad one: refused, then the newest good one
    engine.wait_served("par", v2, timeout=120)
    assert [f.phase for f in store.failures("par", bad)] == ["stage"]
    assert engine.tokens("par", PROMPTS[1]) == (f"par@{v2}", reference(lora_v2, PROMPTS[1]))
    assert all(str(store.version_dir("par", bad)) not in w["installed"].values() for w in workers(engine))
    assert all(w["disk_loads"] == 0 for w in workers(engine))
