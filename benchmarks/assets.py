"""The benchmark model and adapters, generated locally once and cached.

Generation takes a minute or two on CPU (a 430 MB float32 Llama and a dozen
PEFT adapters); every directory is complete once its ``.done`` marker exists,
so an interrupted run regenerates only what it did not finish.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

from hotswap_devkit.toy_models import BENCH_MODEL, make_adapter, make_model

CACHE = Path(__file__).resolve().parent / ".cache"
QV = ("q_proj", "v_proj")
ALL_LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# Two adapters of each shape: a swap alternates between them, so every version
# really changes the weights (and the page cache holds both, for both paths).
SEEDS = (101, 202)


@dataclass(frozen=True)
class AdapterShape:
    rank: int
    targets: tuple[str, ...]

    @property
    def label(self) -> str:
        return f"r{self.rank}-{'qv' if self.targets == QV else 'all'}"


SHAPES = tuple(AdapterShape(rank, targets) for targets in (QV, ALL_LINEAR) for rank in (8, 16, 64))


@dataclass(frozen=True)
class Assets:
    model: Path
    adapters: dict[str, tuple[Path, ...]]  # shape label -> one directory per seed

    def adapter_bytes(self, label: str) -> int:
        """Bytes of the LoRA tensors (what an install copies into a slot)."""
        return tensor_bytes(self.adapters[label][0] / "adapter_model.safetensors")


def tensor_bytes(path: Path) -> int:
    from safetensors import safe_open

    total = 0
    with safe_open(str(path), framework="pt") as weights:
        for name in weights.keys():  # noqa: SIM118 - safe_open has no __iter__
            tensor = weights.get_slice(name)
            numel = 1
            for dim in tensor.get_shape():
                numel *= dim
            total += numel * 4  # float32 adapters
    return total


def _done(path: Path) -> bool:
    return (path / ".done").exists()


def _mark_done(path: Path) -> None:
    (path / ".done").write_text("")


def prepare(cache: Path = CACHE, shapes: tuple[AdapterShape, ...] = SHAPES) -> Assets:
    """Make (or reuse) the bench model and two adapters per shape."""
    model = cache / "bench-llama"
    spec_file = model / "spec.json"
    spec = json.dumps(asdict(BENCH_MODEL), sort_keys=True)
    if not (_done(model) and spec_file.exists() and spec_file.read_text() == spec):
        print(f"  generating the benchmark model in {model} (once)", flush=True)
        make_model(model, BENCH_MODEL)
        spec_file.write_text(spec)
        _mark_done(model)
    adapters: dict[str, tuple[Path, ...]] = {}
    for shape in shapes:
        paths = []
        for seed in SEEDS:
            path = cache / "adapters" / f"{shape.label}-seed{seed}"
            if not _done(path):
                print(f"  generating adapter {path.name} (once)", flush=True)
                make_adapter(model, path, seed, shape.rank, shape.targets)
                _mark_done(path)
            paths.append(path)
        adapters[shape.label] = tuple(paths)
    return Assets(model, adapters)
