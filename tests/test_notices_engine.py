"""A publisher's notice against a real vLLM engine that neither watches nor (in practice) polls.

The engine runs with file-system events off and an hour between polls, as an engine on
another node of an NFS store would see a publish: only a notice can make it look before
then, so a version served within this test was served because of the notice. The store
stays the source of truth: a notice for a version the store lacks changes nothing. The
engine has an ``--api-key``, which both new routes require.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from hotswap_devkit.server import VllmServer
from trl_callbacks import FleetRollout, HotSwapCallback, Publication
from vllm_lora_hotswap.notify import CommitNotifier
from vllm_lora_hotswap.store import CheckpointStore

pytestmark = pytest.mark.engine
API_KEY = "notice-key"
ADAPTER = "notified"
FORGED = "2099-01-01T00-00-00Z"


@pytest.fixture(scope="module")
def quiet_engine(
    toy_model: Path, make_lora, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[VllmServer, CheckpointStore]]:
    root = tmp_path_factory.mktemp("notice-store")
    store = CheckpointStore(root)
    store.publish(ADAPTER, make_lora(1))  # served from start-up (the start-up sync reads the store once)
    env = {"VLLM_HOTSWAP_EVENTS": "0", "VLLM_HOTSWAP_POLL_INTERVAL": "3600"}
    server = VllmServer(
        toy_model, root, tmp_path_factory.mktemp("logs") / "quiet-engine.log", env=env, api_key=API_KEY
    )
    server.start()
    yield server, store
    server.stop()


def wait_served(server: VllmServer, version: str, timeout: float) -> dict:
    response = server.client.get(
        "/v1/lora/wait", params={"adapter": ADAPTER, "version": version, "timeout": timeout}, timeout=timeout + 30
    )
    response.raise_for_status()
    return response.json()


def test_a_notified_version_is_served_long_before_the_next_poll(quiet_engine, make_lora) -> None:
    server, store = quiet_engine
    first = store.active_version(ADAPTER)
    assert server.adapters()[ADAPTER]["served_version"] == first
    second = store.publish(ADAPTER, make_lora(2))
    # Without a notice nothing moves: no events, the next poll is an hour away.
    assert not wait_served(server, second, 2)["reached"]
    futures = CommitNotifier([server.url], api_key=API_KEY).notify(ADAPTER, second)
    assert [f.result(30) for f in futures] == [True]
    answer = wait_served(server, second, 60)
    assert answer["reached"] and answer["served_version"] == second, server.log_tail(30)
    assert server.tokens(ADAPTER, "hello")[0] == f"{ADAPTER}@{second}"


def test_a_forged_notice_changes_nothing(quiet_engine) -> None:
    server, store = quiet_engine

    def swaps() -> dict:  # what a notice could change (a replaced version's slot is freed meanwhile)
        return {
            name: {key: a[key] for key in ("served_version", "last_swap", "last_error")}
            for name, a in server.adapters().items()
        }

    before = swaps()
    for body in ({"adapter": ADAPTER, "version": FORGED}, {"adapter": "ghost", "version": FORGED}):
        response = server.client.post("/v1/lora/notify", json=body)
        assert response.status_code == 202
    assert not wait_served(server, FORGED, 2)["reached"]  # it looked, and found nothing to serve
    after = swaps()
    assert after == before and "ghost" not in after  # same version, same last swap, no error, no new adapter
    assert store.versions(ADAPTER)[-1] < FORGED


def test_the_routes_need_the_api_key(quiet_engine) -> None:
    server, _ = quiet_engine
    body = {"adapter": ADAPTER, "version": FORGED}
    for headers in ({}, {"Authorization": "Bearer wrong"}):
        assert httpx.post(f"{server.url}/v1/lora/notify", json=body, headers=headers).status_code == 401
        params = {"adapter": ADAPTER, "version": FORGED, "timeout": 0}
        assert httpx.get(f"{server.url}/v1/lora/wait", params=params, headers=headers).status_code == 401
    futures = CommitNotifier([server.url]).notify(ADAPTER, FORGED)  # a publisher without the key: refused, not raised
    assert [f.result(30) for f in futures] == [False]


def test_fleet_rollout_notifies_and_waits_on_the_engine(quiet_engine, make_lora, tmp_path: Path) -> None:
    server, store = quiet_engine
    hotswap = HotSwapCallback(store.root, ADAPTER, on_improvement=False, every_n_steps=1)
    rollout = FleetRollout([server.url], hotswap, max_staleness=0, timeout=120, api_key=API_KEY)
    version = store.publish(ADAPTER, make_lora(3))  # as the callback's commit does, then its notice:
    hotswap.publications.append(Publication(step=1, value=None, reasons=("schedule",), version=version))
    assert [f.result(30) for f in hotswap.notifier.notify(ADAPTER, version)] == [True]
    assert rollout._wait_for_version() == (version, version, 0)  # served, or open to pinned samples in its probe
    server.wait_served(ADAPTER, version, 30)  # long before the 3600 s poll


def test_a_written_notice_lets_the_workers_read_the_weights_while_the_commit_runs(
    quiet_engine, make_lora, reference
) -> None:
    """The publisher's first notice (weights written, before the commit) has the worker read the
    file from the staging directory and build the adapter into a free slot; staging then adopts
    it, since the committed READY records the sha256 of both files it was built from, and the
    version serves what HF + PEFT greedy gives for it. A config changed after the notice, and a
    forged notice, make staging build from the committed files."""
    from safetensors.torch import load_file

    from vllm_lora_hotswap.store.safetensors_layout import TensorBytes
    from vllm_lora_hotswap.store.staged import StagedVersion

    server, store = quiet_engine

    def counters() -> tuple[int, ...]:
        workers = server.client.get("/v1/lora/workers").json()["workers"]
        keys = ("reads_ahead", "reads_ahead_taken", "built_ahead", "prepared_ahead", "slot_writes")
        return tuple(sum(w[key] for w in workers) for key in keys)

    def written(source: Path) -> StagedVersion:
        """``source`` saved into a staged version as HotSwapCallback saves: weights, then config."""
        tensors = load_file(source / "adapter_model.safetensors")
        staged = store.open_version(ADAPTER)
        staged.write_weights(
            {k: TensorBytes("F32", tuple(t.shape), t.numpy()) for k, t in tensors.items()}, {"format": "pt"}
        )
        (staged.path / "adapter_config.json").write_bytes((source / "adapter_config.json").read_bytes())
        return staged

    notifier = CommitNotifier([server.url], api_key=API_KEY)
    before = counters()
    staged = written(make_lora(4))
    assert [f.result(30) for f in notifier.notify_written(ADAPTER, staged)] == [True]
    server.wait_until(lambda: counters()[0] == before[0] + 1, 30, "the read ahead to start")
    version = staged.commit()
    assert [f.result(30) for f in notifier.notify(ADAPTER, version)] == [True]
    assert wait_served(server, version, 60)["reached"], server.log_tail(30)
    # Built and written into a slot from the bytes read ahead; the stage adopted it (no second write).
    assert counters() == (before[0] + 1, before[1] + 1, before[2] + 1, before[3] + 1, before[4] + 1)
    model, ids = server.tokens(ADAPTER, "hello")
    assert (model, ids) == (f"{ADAPTER}@{version}", reference(store.version_dir(ADAPTER, version), "hello"))

    # The config rewritten after the notice (another scaling): what was built ahead is not the
    # committed adapter, so staging builds it again from the committed files.
    before = counters()
    staged = written(make_lora(6))
    assert [f.result(30) for f in notifier.notify_written(ADAPTER, staged)] == [True]
    server.wait_until(lambda: counters()[2] == before[2] + 1, 30, "the adapter to be built ahead")
    config = json.loads((staged.path / "adapter_config.json").read_text())
    config["lora_alpha"] = config["lora_alpha"] * 4
    (staged.path / "adapter_config.json").write_text(json.dumps(config))
    version = staged.commit()
    notifier.notify(ADAPTER, version)
    assert wait_served(server, version, 60)["reached"], server.log_tail(30)
    assert counters()[1:4] == (before[1] + 1, before[2] + 1, before[3])  # taken, built, not adopted
    assert server.tokens(ADAPTER, "hello")[1] == reference(store.version_dir(ADAPTER, version), "hello")
    before = counters()

    # A forged written notice (a sha256 the file does not have) is read and dropped: the next
    # version is staged from its committed file, and served.
    source = make_lora(5)
    staged = store.open_version(ADAPTER)
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        (staged.path / name).write_bytes((source / name).read_bytes())
    size = (staged.path / "adapter_model.safetensors").stat().st_size
    forged = {"adapter": ADAPTER, "written": {"staging": staged.path.name, "sha256": "0" * 64, "size": size}}
    assert server.client.post("/v1/lora/notify", json=forged).json() == {"accepted": True}
    version = staged.commit()
    notifier.notify(ADAPTER, version)
    assert wait_served(server, version, 60)["reached"], server.log_tail(30)
    assert counters()[:4] == (before[0] + 1, before[1], before[2], before[3])
    assert server.tokens(ADAPTER, "hello")[1] == reference(store.version_dir(ADAPTER, version), "hello")
    notifier.close()
