"""The stage channel between the API server and the workers, on real Unix sockets in one process."""

from __future__ import annotations

import threading
import time

import pytest

from vllm_lora_hotswap.engine import stage_channel
from vllm_lora_hotswap.engine.stage_channel import ServerChannel, WorkerChannel


@pytest.fixture
def channel():
    server = ServerChannel()
    yield server
    server.close()


def no_install(lora_id: int, path: str) -> dict:
    raise AssertionError("these tests send no installs")


def workers(server: ServerChannel, count: int) -> tuple[list[WorkerChannel], list[list[tuple[int, str, str]]]]:
    received: list[list[tuple[int, str, str]]] = [[] for _ in range(count)]
    ends = [
        WorkerChannel(str(server.directory), f"0-{i}", lambda *item, i=i: received[i].append(item), no_install)
        for i in range(count)
    ]
    assert server.connect([str(end.path) for end in ends])
    return ends, received


def test_stage_requests_reach_every_worker_and_reports_wake_the_waiter(channel: ServerChannel) -> None:
    ends, received = workers(channel, 2)
    assert channel.stage([[3, "a@v1", "/store/a/v1"]])
    deadline = time.monotonic() + 5
    while not all(received) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert received == [[(3, "a@v1", "/store/a/v1")]] * 2
    assert [s["state"] for s in channel.statuses((3, "/store/a/v1"))] == ["pending", "pending"]

    ends[1].report(3, "/store/a/v1", {"state": "ready", "error": None, "nbytes": 10})
    woke = threading.Event()

    def waiter() -> None:
        channel.wait((3, "/store/a/v1"), timeout=10)
        woke.set()

    threading.Thread(target=waiter, daemon=True).start()
    assert not woke.wait(0.2), "one worker of two reported: still pending"
    ends[0].report(3, "/store/a/v1", {"state": "failed", "error": "ValueError: NaN", "nbytes": 0})
    assert woke.wait(5)
    assert [s["state"] for s in channel.statuses((3, "/store/a/v1"))] == ["failed", "ready"]  # in worker order


def test_a_stage_whose_reports_stop_coming_is_left_to_the_rpc(channel: ServerChannel, monkeypatch) -> None:
    workers(channel, 1)
    monkeypatch.setattr(stage_channel, "REPORT_PATIENCE_S", 0.05)
    assert channel.statuses((1, "/x")) is None  # never staged through the channel
    assert channel.stage([[1, "a@v1", "/x"]])
    time.sleep(0.1)
    assert channel.statuses((1, "/x")) is None


def test_an_unreachable_worker_makes_the_stage_fall_back(channel: ServerChannel) -> None:
    ends, _ = workers(channel, 1)
    ends[0].path.unlink()
    assert not channel.stage([[1, "a@v1", "/x"]])
    assert channel.statuses((1, "/x")) is None


def test_a_worker_that_could_not_bind_means_no_channel(channel: ServerChannel) -> None:
    assert not channel.connect([None])
    assert not channel.connect([])


def test_the_rpc_fallback_stages_what_a_late_message_has_not_started_yet(monkeypatch) -> None:
    """Under load the RPC that asks about a silent stage can reach the worker before the
    channel thread read the stage message: the RPC starts the stage, the late message
    finds it started, and the version is never failed as "not staged"."""
    from vllm_lora_hotswap.engine import worker as worker_module

    started: list[tuple[int, str]] = []
    release = threading.Event()

    def fake_stage(self, entry) -> None:
        started.append((entry.lora_id, entry.path))
        release.wait(5)
        self._finish(entry, lora=object(), nbytes=7)

    monkeypatch.setattr(worker_module.WorkerHotSwap, "_stage", fake_stage)
    hotswap = worker_module.WorkerHotSwap.__new__(worker_module.WorkerHotSwap)
    hotswap.staging, hotswap._lock, hotswap.channel = {}, threading.Lock(), None

    assert hotswap.status_or_stage(4, "a@v2", "/store/a/v2")["state"] == "pending"
    hotswap.stage(4, "a@v2", "/store/a/v2")  # the channel message, late
    release.set()
    deadline = time.monotonic() + 5
    while hotswap.staging[4, "/store/a/v2"].state == "pending" and time.monotonic() < deadline:
        time.sleep(0.01)
    status = hotswap.status_or_stage(4, "a@v2", "/store/a/v2")
    assert status == {"state": "ready", "error": None, "nbytes": 7, "timings": {}}
    assert started == [(4, "/store/a/v2")]  # staged once


def test_installs_reach_every_worker_and_each_answer_comes_back_in_worker_order(channel: ServerChannel) -> None:
    answers = [
        {"ok": True, "error": None, "seconds": 0.001},
        {"ok": False, "in_step": True, "error": "no slot", "seconds": 0.0},
    ]
    asked: list[list[tuple[int, str]]] = [[], []]

    def on_install(i: int):
        def install(lora_id: int, path: str) -> dict:
            asked[i].append((lora_id, path))
            return answers[i]

        return install

    ends = [WorkerChannel(str(channel.directory), f"0-{i}", lambda *_: None, on_install(i)) for i in range(2)]
    assert channel.connect([str(end.path) for end in ends])
    assert channel.install([(3, "/store/a/v1"), (4, "/store/b/v1")]) == [answers, answers]
    assert asked == [[(3, "/store/a/v1"), (4, "/store/b/v1")]] * 2


def test_an_install_a_worker_does_not_answer_is_left_to_the_rpc(channel: ServerChannel) -> None:
    silent = threading.Event()
    ends = [
        WorkerChannel(
            str(channel.directory), "0-0", lambda *_: None, lambda *_: {"ok": True, "error": None, "seconds": 0.0}
        ),
        WorkerChannel(str(channel.directory), "0-1", lambda *_: None, lambda *_: silent.wait(5) and {"ok": True}),
    ]
    assert channel.connect([str(end.path) for end in ends])
    assert channel.install([(3, "/store/a/v1")], timeout=0.2) == [None]
    silent.set()
    time.sleep(0.1)  # the late answer arrives and is dropped
    assert channel._installs == {}
