"""Shared fixtures: a tiny real model, PEFT adapters, HF+PEFT references and a real vLLM engine."""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from hotswap_devkit.server import VllmServer
from hotswap_devkit.toy_models import ReferenceModel, make_adapter, make_model
from tests.support.fake import write_lora
from vllm_lora_hotswap.store import CheckpointStore

PROMPTS = ("the quick brown fox", "hello world hello", "rewards go up when the policy")
MAX_TOKENS = 8


def pytest_unconfigure(config: pytest.Config) -> None:
    """The soak's one-line summary, as the very last line of the run (after pytest's own)."""
    from tests.support.soak import REPORT

    if REPORT.parts:
        print(REPORT.line(), flush=True)


# Fixtures that start a real vLLM engine: a test using one is marked ``engine`` here, so
# ``make test-fast`` (-m "not engine") leaves it out whether or not its file says so.
ENGINE_FIXTURES = frozenset({"engine"})


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    import torch

    for item in items:
        if ENGINE_FIXTURES.intersection(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.engine)
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def toy_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_model(tmp_path_factory.mktemp("toy-model") / "tiny-llama")


@pytest.fixture(scope="session")
def make_lora(toy_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Callable[..., Path]:
    """``make_lora(seed, rank=8, targets=("q_proj", "v_proj"))``: a cached random PEFT adapter."""
    root = tmp_path_factory.mktemp("adapters")

    @functools.cache
    def factory(seed: int, rank: int = 8, targets: tuple[str, ...] = ("q_proj", "v_proj")) -> Path:
        return make_adapter(toy_model, root / f"seed{seed}-r{rank}-{'-'.join(targets)}", seed, rank, targets)

    return factory


@pytest.fixture(scope="session")
def reference(toy_model: Path) -> Callable[..., list[int]]:
    """``reference(adapter_dir, prompt, max_tokens=8)``: HF + PEFT greedy token ids (the oracle)."""
    models = functools.cache(lambda adapter: ReferenceModel(toy_model, adapter))

    @functools.cache
    def lookup(adapter: Path | None, prompt: str, max_tokens: int = MAX_TOKENS) -> list[int]:
        return models(adapter).greedy(prompt, max_tokens)

    return lookup


@pytest.fixture(scope="module")
def lora(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small PEFT-format adapter written directly (no model): for in-memory engine tests."""
    return write_lora(tmp_path_factory.mktemp("lora") / "a", hidden=32, layers=1)


@pytest.fixture
def store(tmp_path: Path) -> CheckpointStore:
    """An empty store of the test's own."""
    (tmp_path / "store").mkdir()
    return CheckpointStore(tmp_path / "store")


@pytest.fixture(scope="session")
def shared_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("store")


@pytest.fixture
def shared_store(shared_root: Path) -> Iterator[CheckpointStore]:
    """The shared engine's store; adapters a test creates are retired afterwards (freeing slots)."""
    store = CheckpointStore(shared_root)
    before = set(store.adapters())
    yield store
    for adapter in set(store.adapters()) - before:
        store.retire(adapter)


@pytest.fixture(scope="session")
def engine(toy_model: Path, shared_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[VllmServer]:
    """One real vLLM CPU engine with the plugin (versioned mode, prefix caching, probe on),
    shared by the tests; each test uses its own adapter names."""
    log = tmp_path_factory.mktemp("logs") / "shared-engine.log"
    server = VllmServer(toy_model, shared_root, log, args=["--enable-prefix-caching"]).start()
    yield server
    server.stop()
