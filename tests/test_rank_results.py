"""How one answer per worker (every tensor-parallel rank of every data-parallel replica)
becomes one answer per version: a version is ready or installed only when every rank says so."""

from __future__ import annotations

from typing import Any

import pytest

from vllm_lora_hotswap.engine.worker_rpc import WorkerRpcEngine
from vllm_lora_hotswap.pipeline.engine_api import CheckpointRejected, InstallRequest, LoraHandle, NoCapacity


class Ranks(WorkerRpcEngine):
    """Workers whose answers the test gives: ``answers[method]`` is one answer per rank."""

    def __init__(self, answers: dict[str, list[Any]]):
        self.answers = answers

    def _rpc(self, method: str, *args: Any) -> list[Any]:
        return self.answers[method]


A = LoraHandle("a", "v1", 1, "a@v1", "/store/a/v1")
B = LoraHandle("b", "v1", 2, "b@v1", "/store/b/v1")


def status(state: str, nbytes: int = 0, error: str | None = None) -> dict[str, Any]:
    return {"state": state, "nbytes": nbytes, "error": error}


def test_a_version_is_staged_only_when_every_rank_staged_it() -> None:
    engine = Ranks(
        {
            "hotswap_status": [
                [status("ready", 10), status("ready", 10)],  # rank 0: a, b
                [status("ready", 10), status("pending")],  # rank 1: a, b
            ]
        }
    )
    a, b = engine.stage_status([A, B])
    assert (a.state, a.nbytes) == ("ready", 20) and b.state == "pending"


def test_one_rank_that_fails_staging_fails_the_version() -> None:
    engine = Ranks({"hotswap_status": [[status("ready", 10)], [status("failed", error="ValueError: NaN")]]})
    (a,) = engine.stage_status([A])
    assert (a.state, a.error) == ("failed", "worker 1 of 2: ValueError: NaN")


@pytest.mark.parametrize(
    "failure, expected",
    [
        ({"ok": False, "error": "shape mismatch"}, CheckpointRejected),
        ({"ok": False, "capacity": True, "error": "all 8 LoRA slots"}, NoCapacity),
    ],
)
def test_one_rank_that_fails_an_install_fails_that_version_alone(failure: dict[str, Any], expected: type) -> None:
    ok = {"ok": True, "error": None}
    engine = Ranks(
        {
            "hotswap_install": [
                {"results": [ok, ok], "seconds": 0.002},
                {"results": [ok, failure], "seconds": 0.003},
            ]
        }
    )
    a, b = engine.install([InstallRequest(A), InstallRequest(B)])
    assert a == 0.003  # the engine loop is held until the slowest rank is done
    assert isinstance(b, expected) and f"worker 1 of 2: {failure['error']}" in str(b)
