"""Validation of checkpoint files: configs, READY manifests, weights. Parsers never crash."""

from __future__ import annotations

import json
import os
import pickle
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.support.fake import write_lora
from vllm_lora_hotswap.store import InvalidCheckpointError, validate_checkpoint_dir
from vllm_lora_hotswap.store.checkpoint import (
    load_bin_tensors,
    parse_adapter_config,
    parse_ready,
    read_safetensors_header,
)
from vllm_lora_hotswap.store.files import parse_json_bounded

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4),
    max_leaves=30,
)


def test_a_peft_lora_directory_validates(tmp_path: Path) -> None:
    config, weights = validate_checkpoint_dir(write_lora(tmp_path / "a"))
    assert (
        config.r == 8 and config.target_modules == ("q_proj", "v_proj") and weights.name == "adapter_model.safetensors"
    )


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"peft_type": "PREFIX_TUNING"}, "not 'LORA'"),
        ({"r": 0}, "positive integer"),
        ({"r": "8"}, "positive integer"),
        ({"lora_alpha": "big"}, "lora_alpha"),
        ({"target_modules": [1, 2]}, "target_modules"),
        ({"rank_pattern": {"(": 4}}, "rank_pattern"),
    ],
)
def test_bad_configs_are_named(change: dict, message: str) -> None:
    base = {"peft_type": "LORA", "r": 8, "lora_alpha": 16, "target_modules": ["q_proj"]}
    with pytest.raises(InvalidCheckpointError, match=message):
        parse_adapter_config(json.dumps({**base, **change}).encode(), "adapter_config.json")


def test_missing_config_and_missing_weights(tmp_path: Path) -> None:
    lora = write_lora(tmp_path / "a")
    (lora / "adapter_config.json").unlink()
    with pytest.raises(InvalidCheckpointError, match="adapter_config.json: missing"):
        validate_checkpoint_dir(lora)
    lora = write_lora(tmp_path / "b")
    (lora / "adapter_model.safetensors").unlink()
    with pytest.raises(InvalidCheckpointError, match="no weight file"):
        validate_checkpoint_dir(lora)


def test_truncated_and_corrupt_safetensors(tmp_path: Path) -> None:
    lora = write_lora(tmp_path / "a")
    weights = lora / "adapter_model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) - 100])
    with pytest.raises(InvalidCheckpointError, match="truncated"):
        read_safetensors_header(weights)
    weights.write_bytes(b"\xff" * 64)
    with pytest.raises(InvalidCheckpointError, match="corrupt or truncated"):
        read_safetensors_header(weights)
    weights.write_bytes(b"")
    with pytest.raises(InvalidCheckpointError, match="truncated"):
        read_safetensors_header(weights)


def test_rank_that_disagrees_with_the_config(tmp_path: Path) -> None:
    lora = write_lora(tmp_path / "a", rank=8, extra_config={"r": 4})
    with pytest.raises(InvalidCheckpointError, match="rank 8/8, adapter_config.json says 4"):
        validate_checkpoint_dir(lora)


def test_nan_and_inf_weights(tmp_path: Path) -> None:
    for value in (float("nan"), float("inf")):
        with pytest.raises(InvalidCheckpointError, match="NaN or inf"):
            validate_checkpoint_dir(write_lora(tmp_path / str(value), value=value))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.float8_e5m2])
@pytest.mark.parametrize("value", [None, float("nan"), float("inf"), -float("inf")])
def test_non_finite_weights_of_every_float_dtype_are_found(
    tmp_path: Path, dtype: torch.dtype, value: float | None
) -> None:
    from safetensors.torch import save_file

    from vllm_lora_hotswap.store.checkpoint import check_finite

    weights = torch.randn(6, 5)
    if value is not None:
        weights[4, 3] = value
    path = tmp_path / "adapter_model.safetensors"
    save_file({"m.lora_A.weight": torch.randn(2, 5), "w": weights.to(dtype), "steps": torch.arange(3)}, path)
    if value is None:
        check_finite(path)
    else:
        with pytest.raises(InvalidCheckpointError, match="tensor 'w' holds NaN or inf"):
            check_finite(path)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_non_finite_value_deep_in_a_tensor_larger_than_the_checks_chunk_is_found(
    tmp_path: Path, dtype: torch.dtype
) -> None:
    from safetensors.torch import save_file

    from vllm_lora_hotswap.store.checkpoint import _FINITE_CHUNK_BYTES, check_finite

    weights = torch.randn(3 * _FINITE_CHUNK_BYTES // 4 + 7)  # three chunks and more, as float32
    path = tmp_path / "adapter_model.safetensors"
    save_file({"w": weights.to(dtype)}, path)
    check_finite(path)
    weights[-1] = float("nan")
    save_file({"w": weights.to(dtype)}, path)
    with pytest.raises(InvalidCheckpointError, match="tensor 'w' holds NaN or inf"):
        check_finite(path)


def test_publishing_a_safetensors_adapter_imports_neither_torch_nor_vllm(tmp_path: Path) -> None:
    import subprocess
    import sys

    source = write_lora(tmp_path / "src", hidden=64, layers=2)
    code = (
        "import sys\n"
        "from vllm_lora_hotswap.cli import main\n"
        f"sys.argv = ['lora-hotswap', 'publish', 'lora1', {str(source)!r}, '--root', {str(tmp_path / 'store')!r}]\n"
        "try:\n    main()\nexcept SystemExit as exit:\n    assert exit.code in (0, None), exit.code\n"
        "print(sorted(m for m in ('torch', 'vllm') if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip().endswith("[]"), out


class _RunsCode:
    def __reduce__(self):
        return (os.system, ("touch /tmp/lora-hotswap-pwned",))


def test_a_pickle_that_runs_code_is_refused_and_never_runs(tmp_path: Path) -> None:
    marker = Path("/tmp/lora-hotswap-pwned")
    marker.unlink(missing_ok=True)
    path = tmp_path / "adapter_model.bin"
    with open(path, "wb") as out:
        pickle.dump({"x.lora_A.weight": _RunsCode()}, out)
    with pytest.raises(InvalidCheckpointError, match="weights_only=True"):
        load_bin_tensors(path)
    assert not marker.exists()


def test_bin_weights_are_accepted(tmp_path: Path) -> None:
    lora = write_lora(tmp_path / "a")
    from safetensors.torch import load_file

    torch.save(load_file(lora / "adapter_model.safetensors"), lora / "adapter_model.bin")
    (lora / "adapter_model.safetensors").unlink()
    _, weights = validate_checkpoint_dir(lora)
    assert weights.name == "adapter_model.bin"


def test_oversized_and_deeply_nested_json_is_bounded() -> None:
    with pytest.raises(InvalidCheckpointError, match="over the"):
        parse_json_bounded(b" " * (2 << 20), "metadata.json")
    with pytest.raises(InvalidCheckpointError, match="nested"):
        parse_json_bounded(b"[" * 100_000 + b"]" * 100_000, "metadata.json")
    nested: object = 1
    for _ in range(40):
        nested = [nested]
    with pytest.raises(InvalidCheckpointError, match="nested deeper"):
        parse_json_bounded(json.dumps({"a": nested}).encode(), "metadata.json")


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(st.one_of(st.binary(max_size=300), json_values.map(lambda v: json.dumps(v).encode())))
def test_config_parser_never_crashes(data: bytes) -> None:
    try:
        parse_adapter_config(data, "adapter_config.json")
    except InvalidCheckpointError:
        pass


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.one_of(
        st.binary(max_size=300),
        json_values.map(lambda v: json.dumps(v).encode()),
        st.dictionaries(st.text(max_size=12), json_values, max_size=3).map(
            lambda files: json.dumps({"format": 1, "files": files}).encode()
        ),
    )
)
def test_ready_parser_never_crashes(data: bytes) -> None:
    try:
        manifest = parse_ready(data)
    except InvalidCheckpointError:
        return
    for name in manifest.files:
        assert "/" not in name and not name.startswith(".")


@settings(max_examples=200, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(st.binary(max_size=200))
def test_safetensors_header_parser_never_crashes(tmp_path: Path, data: bytes) -> None:
    path = tmp_path / "adapter_model.safetensors"
    path.write_bytes(data)
    try:
        read_safetensors_header(path)
    except InvalidCheckpointError:
        pass
