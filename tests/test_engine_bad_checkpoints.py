"""Bad checkpoints never reach the engine loop: not served, the reason visible, the engine answering."""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from hotswap_devkit.server import VllmServer
from tests.conftest import PROMPTS
from tests.support.fake import write_lora
from tests.support.inject import inject_version
from vllm_lora_hotswap.store import CheckpointStore

pytestmark = pytest.mark.engine


def _truncated(src: Path) -> None:
    weights = src / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-64])


def _corrupt(src: Path) -> None:
    (src / "adapter_model.safetensors").write_bytes(os.urandom(4096))


def _replace(make: Callable[[Path], Path]) -> Callable[[Path], None]:
    def apply(src: Path) -> None:
        for child in src.iterdir():
            child.unlink()
        make(src)

    return apply


def _no_config(src: Path) -> None:
    (src / "adapter_config.json").unlink()


def _no_weights(src: Path) -> None:
    (src / "adapter_model.safetensors").unlink()


def _flip_last_byte(src: Path) -> None:
    weights = src / "adapter_model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))


PWNED = Path("/tmp/lora-hotswap-engine-pwned")


class _RunsCode:
    def __reduce__(self):
        return (os.system, (f"touch {PWNED}",))


def _pickle_that_runs_code(src: Path) -> None:
    (src / "adapter_model.safetensors").unlink()
    with open(src / "adapter_model.bin", "wb") as out:
        pickle.dump({"base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": _RunsCode()}, out)


def _huge_config(src: Path) -> None:
    config = json.loads((src / "adapter_config.json").read_text())
    config["padding"] = "x" * (2 << 20)
    (src / "adapter_config.json").write_text(json.dumps(config))


def _deep_config(src: Path) -> None:
    config = json.loads((src / "adapter_config.json").read_text())
    nested: object = 1
    for _ in range(64):
        nested = [nested]
    config["nested"] = nested
    (src / "adapter_config.json").write_text(json.dumps(config))


def _no_change(src: Path) -> None:
    pass


# case: (damage before commit, reason in the error, damage after READY recorded the checksums)
CASES: dict[str, tuple[Callable[[Path], None], str] | tuple[Callable[[Path], None], str, Callable[[Path], None]]] = {
    "truncated": (_truncated, "truncated"),
    "corrupt": (_corrupt, "corrupt"),
    "nan": (_replace(lambda d: write_lora(d, value=float("nan"))), "NaN or inf"),
    "inf": (_replace(lambda d: write_lora(d, value=float("inf"))), "NaN or inf"),
    # Finite weights whose product overflows float32: only the probe's generation can tell.
    "overflow": (_replace(lambda d: write_lora(d, value=1e30)), "non-finite logprobs"),
    "rank": (_replace(lambda d: write_lora(d, rank=32)), "exceeds the engine's --max-lora-rank 16"),
    "modules": (_replace(lambda d: write_lora(d, modules=("nonexistent_proj",))), "nonexistent_proj"),
    "base-name": (_replace(lambda d: write_lora(d, base_model="meta-llama/Llama-3-8B")), "trained on base model"),
    "base-shape": (_replace(lambda d: write_lora(d, hidden=256, base_model="tiny-llama")), "different base model"),
    "no-config": (_no_config, "adapter_config.json: missing"),
    "ready-without-weights": (_no_weights, "no weight file"),
    "checksum-mismatch": (_no_change, "checksum mismatch", _flip_last_byte),
    "pickle-that-runs-code": (_pickle_that_runs_code, "weights_only=True"),
    "oversized-config": (_huge_config, "over the"),
    "deeply-nested-config": (_deep_config, "nested deeper"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_version_is_refused_and_the_last_good_one_keeps_serving(
    engine: VllmServer, shared_store: CheckpointStore, make_lora, reference, tmp_path: Path, case: str
) -> None:
    store = shared_store
    adapter = f"bad-{case}"
    good = make_lora(41)
    v1 = store.publish(adapter, good)
    engine.wait_served(adapter, v1)

    damage, reason, *after_ready = CASES[case]
    src = tmp_path / "bad"
    subprocess.run(["cp", "-r", str(good), str(src)], check=True)
    damage(src)
    PWNED.unlink(missing_ok=True)
    v2 = inject_version(store, adapter, src, after_ready=after_ready[0] if after_ready else None)

    def refused() -> bool:
        swap = engine.adapters()[adapter]["last_swap"]
        return swap is not None and swap["version"] == v2 and swap["result"] == "failed"

    engine.wait_until(refused, 30, f"{adapter}@{v2} to be refused")
    record = engine.adapters()[adapter]
    assert record["served_version"] == v1 and reason in record["last_error"]
    for prompt in PROMPTS:
        assert engine.tokens(adapter, prompt) == (f"{adapter}@{v1}", reference(good, prompt))
    assert any(reason in f.reason for f in store.failures(adapter, v2))  # no engine retries it
    assert not PWNED.exists()

    status = subprocess.run(
        [sys.executable, "-m", "vllm_lora_hotswap.cli", "status", "--root", str(store.root), "--json"],
        capture_output=True,
        text=True,
        check=True,
    )
    (entry,) = [a for a in json.loads(status.stdout)["adapters"] if a["adapter"] == adapter]
    assert entry["active_version"] == v1  # the failure record makes v1 active again for everyone
    assert any(reason in error for error in entry["errors"].values())


def test_weights_without_ready_are_never_considered(
    engine: VllmServer, shared_store: CheckpointStore, make_lora, reference
) -> None:
    store = shared_store
    good = make_lora(42)
    v1 = store.publish("half-written", good)
    engine.wait_served("half-written", v1)
    partial = inject_version(store, "half-written", make_lora(43), ready=False)
    assert store.active_version("half-written") == v1
    newer = make_lora(44)
    v3 = store.publish("half-written", newer)  # the engine looks at the adapter again: past the partial one
    engine.wait_served("half-written", v3)
    assert engine.tokens("half-written", PROMPTS[0]) == (f"half-written@{v3}", reference(newer, PROMPTS[0]))
    swaps = [line for line in engine.log_path.read_text().splitlines() if "hotswap swap adapter=half-written " in line]
    assert [line for line in swaps if f" version={v3} " in line], swaps
    assert not [line for line in swaps if f" version={partial} " in line], "a version without READY was tried"
