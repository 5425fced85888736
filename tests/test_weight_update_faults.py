"""Bad base-weight pushes on a real server (gloo, CPU): an unknown parameter, a wrong shape,
an update the engine lacks the memory to reload and a trainer killed half-way each leave
the engine serving its previous weights, not paused; a probe that lands in an update is
not recorded as the version's failure."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import torch

from hotswap_devkit.server import VllmServer, free_port
from hotswap_devkit.toy_models import ReferenceModel
from tests.conftest import PROMPTS
from tests.support.fake import write_lora
from tests.test_weight_sync import perturbed_model
from vllm_lora_hotswap.client import VLLMClient, VLLMClientConfig
from vllm_lora_hotswap.store import CheckpointStore

pytestmark = pytest.mark.engine
API_KEY = "faults-secret"
ANSWER_WITHIN = 30.0  # seconds after a failed push by which completions must be answered again
PROBE_HOLD = 60.0  # a paused engine holds a probe for as long as the test likes: so may requests wait for it


LOW_MEMORY_SITE = Path(__file__).parent / "support" / "low_memory"


@pytest.fixture(scope="module")
def free_bytes_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """While this file exists, the server's reload memory check reads its free memory from it."""
    return tmp_path_factory.mktemp("memory") / "free_bytes"


@pytest.fixture(scope="module")
def server(toy_model: Path, tmp_path_factory: pytest.TempPathFactory, free_bytes_file: Path) -> Iterator[VllmServer]:
    python_path = os.pathsep.join(filter(None, [str(LOW_MEMORY_SITE), os.environ.get("PYTHONPATH")]))
    server = VllmServer(
        toy_model,
        tmp_path_factory.mktemp("faults-store"),
        tmp_path_factory.mktemp("logs") / "faults.log",
        args=["--weight-transfer-config", '{"backend": "gloo"}'],
        api_key=API_KEY,
        env={
            "VLLM_HOTSWAP_PROBE_HOLD": str(PROBE_HOLD),
            "PYTHONPATH": python_path,
            "HOTSWAP_TEST_FREE_BYTES_FILE": str(free_bytes_file),
        },
    ).start()
    yield server
    server.stop()


@pytest.fixture
def client(server: VllmServer) -> Iterator[VLLMClient]:
    client = VLLMClient(VLLMClientConfig(base_urls=[server.url], api_key=API_KEY, group_port=free_port()))
    client.init_communicator("cpu")
    yield client
    client.close_communicator()


def hf_model(path: Path) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)


def assert_serves_the_previous_weights(server: VllmServer, previous: Path) -> None:
    """Completions are answered within ANSWER_WITHIN seconds, with ``previous``'s greedy tokens."""
    started = time.monotonic()
    body = {
        "model": str(server.model),
        "prompt": PROMPTS[0],
        "max_tokens": 8,
        "temperature": 0.0,
        "ignore_eos": True,
        "return_token_ids": True,
    }
    response = server.client.post("/v1/completions", json=body, timeout=ANSWER_WITHIN)
    assert response.status_code == 200, response.text
    assert time.monotonic() - started < ANSWER_WITHIN
    assert response.json()["choices"][0]["token_ids"] == ReferenceModel(previous).greedy(PROMPTS[0], 8)
    assert server.client.get("/health").status_code == 200


def push_unchecked(client: VLLMClient, model: torch.nn.Module, version: str) -> None:
    """A push that skips the client's check, as another trainer would: the workers must refuse it."""
    from vllm.distributed.weight_transfer.base import ModuleSource

    assert client._sync is not None
    engine = client._sync.engine
    engine.source = ModuleSource(model)
    engine.send_weights(version)


def with_unknown_parameter(path: Path) -> torch.nn.Module:
    model = hf_model(path)
    model.register_parameter("value_head", torch.nn.Parameter(torch.zeros(4)))
    return model


def with_wrong_shape(path: Path) -> torch.nn.Module:
    model = hf_model(path)
    attention = model.model.layers[1].self_attn
    attention.k_proj.weight = torch.nn.Parameter(attention.k_proj.weight.data[:64].clone())
    return model


CASES = {
    "unknown-name": (
        with_unknown_parameter,
        r"parameter 'value_head' \[4\] float32: the engine's model has no such parameter",
    ),
    "wrong-shape": (
        with_wrong_shape,
        r"parameter 'model.layers.1.self_attn.k_proj.weight' has shape \[64, 128\], "
        r"the engine's model expects \[128, 128\]",
    ),
}


@pytest.mark.parametrize("case", CASES)
def test_a_bad_push_is_refused_by_the_client_before_any_server_pauses(
    server: VllmServer, client: VLLMClient, toy_model: Path, case: str
) -> None:
    make, error = CASES[case]
    with pytest.raises(ValueError, match=f"{server.url} cannot take this update: {error}"):
        client.update_model_weights(make(toy_model), f"client-{case}")
    assert_serves_the_previous_weights(server, toy_model)


@pytest.mark.parametrize("case", CASES)
def test_a_bad_push_is_refused_by_the_workers_before_any_layer_is_touched(
    server: VllmServer, client: VLLMClient, toy_model: Path, case: str
) -> None:
    make, error = CASES[case]
    with pytest.raises(RuntimeError, match=f"/update_weights answered 500: .*{error}"):
        push_unchecked(client, make(toy_model), f"workers-{case}")
    assert_serves_the_previous_weights(server, toy_model)
    assert "workers-" not in str(server.client.get("/weight_info").json()["weight_version"])


KILLED_TRAINER = textwrap.dedent("""
    import sys, time
    from transformers import AutoModelForCausalLM
    from vllm.distributed.weight_transfer.base import ModuleSource
    from vllm_lora_hotswap.weights.gloo import GlooTrainerInitInfo, GlooTrainerWeightTransferEngine
    from vllm_lora_hotswap.weights.trainer import FleetWeightSyncClient

    url, key, port, model_dir = sys.argv[1:5]
    client = FleetWeightSyncClient([url], api_key=key)
    info = GlooTrainerInitInfo("127.0.0.1", int(port), 1 + client.engine_ranks, bucket_bytes=64 << 10, rank=0)
    engine = GlooTrainerWeightTransferEngine.trainer_init(info, client=client, source=ModuleSource(
        AutoModelForCausalLM.from_pretrained(model_dir)))
    pack, packed = engine._pack, []

    def pack_then_stall(*args):
        packed.append(1)
        if len(packed) == 4:  # three buckets are on the wire: the workers are receiving
            print("HALF-WAY", flush=True)
            time.sleep(600)
        return pack(*args)

    engine._pack = pack_then_stall
    engine.send_weights("never")
""")


def test_a_trainer_killed_half_way_leaves_the_previous_weights_serving(
    server: VllmServer, toy_model: Path, tmp_path: Path
) -> None:
    perturbed_model(toy_model, tmp_path / "new", seed=7)
    trainer = subprocess.Popen(
        [sys.executable, "-c", KILLED_TRAINER, server.url, API_KEY, str(free_port()), str(tmp_path / "new")],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "PYTHONPATH": os.getcwd()},
    )
    try:
        assert trainer.stdout is not None
        lines = []
        for line in trainer.stdout:
            lines.append(line)
            if "HALF-WAY" in line:
                break
        assert lines and "HALF-WAY" in lines[-1], "".join(lines[-30:])
        trainer.send_signal(signal.SIGKILL)
        trainer.wait(30)
    finally:
        if trainer.poll() is None:
            trainer.kill()
    assert_serves_the_previous_weights(server, toy_model)
    assert server.client.get("/weight_info").json()["weight_version"] != "never"


def test_an_update_short_of_memory_is_refused_before_any_layer_is_touched(
    server: VllmServer, client: VLLMClient, toy_model: Path, tmp_path: Path, free_bytes_file: Path
) -> None:
    """The reload would run out of memory half-way (the check reads 1 MiB free): the update
    is refused before a byte is sent, naming what to set; the engine serves on, unpaused."""
    model = perturbed_model(toy_model, tmp_path / "big", seed=9)
    refusal = (
        r"/update_weights answered 500: .*not enough memory for this update: the update needs about "
        r"[0-9.]+ [MG]iB of free host memory \([0-9.]+ [MG]iB to hold the update \+ 3 x its largest layer of "
        r"[0-9.]+ [MG]iB to reload it layer by layer\) and 1.0 MiB is free\. Lower VLLM_CPU_KVCACHE_SPACE"
    )
    free_bytes_file.write_text(str(1 << 20))
    try:
        with pytest.raises(RuntimeError, match=refusal):
            client.update_model_weights(model, "short-of-memory")
    finally:
        free_bytes_file.unlink()
    assert_serves_the_previous_weights(server, toy_model)
    assert server.client.get("/weight_info").json()["weight_version"] != "short-of-memory"


HOLD = 4.0  # seconds the update holds the engine paused while a new version waits in its probe


def test_a_rollout_pinning_a_version_under_probe_runs_beside_the_probe_and_waits_for_its_verdict(
    server: VllmServer, make_lora, reference, tmp_path: Path
) -> None:
    """A paused engine holds each new version's probe: a sample request pinning that version
    (as FleetRollout sends) is admitted beside it, not made to wait for the switch. After the
    resume it is answered with the version's output if the probe passed, and with a 409 (its
    samples discarded) if the probe failed: here finite weights whose product overflows."""
    store = CheckpointStore(server.root)
    http = httpx.Client(base_url=server.url, timeout=120, headers={"Authorization": f"Bearer {API_KEY}"})
    good = make_lora(93)
    overflowing = tmp_path / "overflow"
    write_lora(overflowing, value=1e30)
    answers: dict[str, httpx.Response] = {}

    def sample(name: str, model_id: str) -> None:
        greedy = {"max_tokens": 8, "temperature": 0.0, "ignore_eos": True}
        body = {"prompts": [PROMPTS[0]], "model_id": model_id, "sampling_params": greedy}
        answers[name] = http.post("/api/v1/sample", json=body)

    assert http.post("/start_weight_update", json={"mode": "wait"}).status_code == 200
    try:
        versions = {
            "good": store.publish("gated-good", good),
            "overflow": store.publish("gated-overflow", overflowing),
        }
        for name in versions:
            server.wait_until(
                lambda n=name: server.adapters().get(f"gated-{n}", {}).get("state") == "swapping", 30, name
            )
        time.sleep(HOLD)  # both probes wait on the paused engine: both versions are open to pinned samples
        senders = [threading.Thread(target=sample, args=(n, f"gated-{n}@{v}")) for n, v in versions.items()]
        for sender in senders:
            sender.start()
        time.sleep(1.0)  # admitted, waiting on the paused engine too
        assert answers == {}
    finally:
        assert http.post("/finish_weight_update", json={"weight_version": "gated"}).status_code == 200
    for sender in senders:
        sender.join(60)
    good_answer, refused = answers["good"], answers["overflow"]
    assert good_answer.status_code == 200, good_answer.text
    (served,) = good_answer.json()["samples"]
    assert served["version"] == versions["good"] and served["token_ids"] == reference(good, PROMPTS[0])
    assert refused.status_code == 409, refused.text
    assert f"gated-overflow@{versions['overflow']} did not pass its probe" in refused.json()["error"]["message"]
    server.wait_served("gated-good", versions["good"], 60)
    assert server.adapters()["gated-overflow"]["served_version"] is None
    assert_serves_the_previous_weights(server, server.model)  # the engine lives, unpaused


def test_a_good_push_after_the_failures_serves_the_new_weights(
    server: VllmServer, client: VLLMClient, toy_model: Path, tmp_path: Path
) -> None:
    model = perturbed_model(toy_model, tmp_path / "good", seed=8)
    client.update_model_weights(model, "good-after-faults")
    reference = ReferenceModel(tmp_path / "good")
    for prompt in PROMPTS:
        assert server.tokens(str(toy_model), prompt)[1] == reference.greedy(prompt, 8)
    assert server.client.get("/weight_info").json()["weight_version"] == "good-after-faults"


def test_a_probe_inside_a_base_weight_update_leaves_no_failure_record(server: VllmServer, make_lora) -> None:
    store = CheckpointStore(server.root)
    http = httpx.Client(base_url=server.url, timeout=60, headers={"Authorization": f"Bearer {API_KEY}"})
    assert http.post("/start_weight_update", json={"mode": "wait"}).status_code == 200
    try:
        version = store.publish("pausedprobe", make_lora(96))
        server.wait_until(lambda: server.adapters().get("pausedprobe", {}).get("state") == "swapping", 30, "the swap")
        time.sleep(HOLD)  # stage and install take milliseconds: the probe is now waiting on the paused engine
    finally:
        assert http.post("/finish_weight_update", json={"weight_version": "probe-pause"}).status_code == 200
    server.wait_served("pausedprobe", version, 120)
    assert store.failures("pausedprobe", version) == []
    swap = server.adapters()["pausedprobe"]["last_swap"]
    assert swap["result"] == "served" and swap["timings"]["probe"] >= HOLD * 0.5, swap


# Loaded by every process of a second server: the worker's load fails once half of the
# update is in (as a loader bug would), after layers started being replaced.
FAILING_LOAD = """
from vllm_lora_hotswap.weights import gloo

original = gloo.GlooWeightTransferEngine._load


def load_half_then_fail(self, plan, params, received):
    model, real = self.model, self.model.load_weights

    def load_weights(weights):
        real(weights[: len(weights) // 2])
        raise RuntimeError("injected: the loader failed half-way")

    model.load_weights = load_weights
    try:
        original(self, plan, params, received)
    finally:
        del model.load_weights


gloo.GlooWeightTransferEngine._load = load_half_then_fail
"""


def test_a_load_failing_after_layers_were_replaced_marks_the_engine_dead(toy_model: Path, tmp_path: Path) -> None:
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(FAILING_LOAD)
    python_path = os.pathsep.join(filter(None, [str(site), os.environ.get("PYTHONPATH")]))
    server = VllmServer(
        toy_model,
        tmp_path / "store",
        tmp_path / "failing-load.log",
        env={"PYTHONPATH": python_path},
        args=["--weight-transfer-config", '{"backend": "gloo"}'],
        api_key=API_KEY,
    ).start()
    try:
        client = VLLMClient(VLLMClientConfig(base_urls=[server.url], api_key=API_KEY, group_port=free_port()))
        client.init_communicator("cpu")
        with pytest.raises((RuntimeError, ConnectionError)):
            client.update_model_weights(perturbed_model(toy_model, tmp_path / "new", seed=9), "half")

        def unhealthy() -> bool:
            try:
                return server.client.get("/health", timeout=5).status_code != 200
            except httpx.HTTPError:  # the API server has stopped
                return True

        server.wait_until(unhealthy, 60, "the engine to be reported dead")
        assert "loading base weights failed after layers were replaced" in server.log_path.read_text()
    finally:
        server.stop()


def test_a_request_that_arrives_during_the_probe_is_served_by_the_new_version(server: VllmServer, make_lora) -> None:
    """Without the hold it would be routed to the old version at once (and then wait in the
    paused engine all the same); with it, it waits for the verdict and gets the new one."""
    store = CheckpointStore(server.root)
    old, new = make_lora(97), make_lora(98)
    previous = store.publish("heldprobe", old)
    server.wait_served("heldprobe", previous, 120)
    http = httpx.Client(base_url=server.url, timeout=60, headers={"Authorization": f"Bearer {API_KEY}"})
    answer: dict[str, tuple[str, list[int]]] = {}
    request = threading.Thread(target=lambda: answer.update(first=server.tokens("heldprobe", PROMPTS[0])))
    assert http.post("/start_weight_update", json={"mode": "wait"}).status_code == 200
    try:
        version = store.publish("heldprobe", new)
        server.wait_until(lambda: server.adapters()["heldprobe"].get("phase") == "probe", 60, "the probe")
        request.start()
        request.join(1.0)
        assert request.is_alive()
    finally:
        assert http.post("/finish_weight_update", json={"weight_version": "held-request"}).status_code == 200
    request.join(120)
    # Earlier tests here pushed other base weights, so PEFT on the toy model is no oracle:
    # each version's own output is, asked for by its pinned name.
    expected = server.tokens(f"heldprobe@{version}", PROMPTS[0])
    assert answer["first"] == expected
    assert expected[1] != server.tokens(f"heldprobe@{previous}", PROMPTS[0])[1]
