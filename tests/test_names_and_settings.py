from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import given
from hypothesis import strategies as st

from vllm_lora_hotswap.settings import ConfigError, load_settings
from vllm_lora_hotswap.store.errors import InvalidNameError
from vllm_lora_hotswap.store.names import (
    check_adapter_name,
    check_version_name,
    is_version_name,
    next_version,
    split_served_name,
    version_time,
)


@pytest.mark.parametrize("name", ["lora1", "my-adapter_2", "Qwen2.5-lora", "a" * 128])
def test_valid_adapter_names(name: str) -> None:
    assert check_adapter_name(name) == name


@pytest.mark.parametrize(
    "name",
    [
        "",
        "../x",
        "/etc",
        "a/b",
        "a\\b",
        ".hidden",
        "..",
        "a..b",
        "lora@v1",
        "ｌora1",
        "lorа1",
        "a" * 129,
        "a b",
        "x\n",
    ],
)
def test_unsafe_adapter_names_are_refused(name: str) -> None:
    with pytest.raises(InvalidNameError, match="invalid adapter name"):
        check_adapter_name(name)


@given(st.text())
def test_any_accepted_name_is_a_plain_ascii_path_component(name: str) -> None:
    try:
        check_adapter_name(name)
    except InvalidNameError:
        return
    assert name.isascii() and "/" not in name and ".." not in name and not name.startswith(".")


def test_version_names_follow_the_seed_form() -> None:
    moment = datetime(2025, 8, 18, 10, 0, 0, tzinfo=UTC)
    assert next_version(moment, None) == "2025-08-18T10-00-00Z"
    assert next_version(moment, "2025-08-18T10-00-00Z") == "2025-08-18T10-00-00Z-0001"
    assert next_version(moment, "2025-08-18T10-00-00Z-0001") == "2025-08-18T10-00-00Z-0002"
    assert next_version(moment + timedelta(seconds=1), "2025-08-18T10-00-00Z-0002") == "2025-08-18T10-00-01Z"
    assert version_time("2025-08-18T10-00-00Z-0002") == moment
    check_version_name("2025-08-18T10-00-00Z")
    assert not is_version_name("2025-08-18T10:00:00Z")


@given(st.lists(st.integers(min_value=-10_000, max_value=10_000), min_size=1, max_size=60))
def test_versions_sort_in_publication_order_whatever_the_clock_does(offsets: list[int]) -> None:
    """Same-second publishes and clocks jumping backwards still give increasing names."""
    base = datetime(2025, 8, 18, 10, 0, 0, tzinfo=UTC)
    names: list[str] = []
    for offset in offsets:
        names.append(next_version(base + timedelta(seconds=offset), names[-1] if names else None))
    assert names == sorted(names)
    assert len(set(names)) == len(names)
    assert all(is_version_name(n) for n in names)


def test_served_names_split_on_at() -> None:
    assert split_served_name("lora1") == ("lora1", None)
    assert split_served_name("lora1@2025-08-18T10-00-00Z") == ("lora1", "2025-08-18T10-00-00Z")


def test_settings_defaults_and_parsing(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("ROOT", "ADAPTERS", "POLL_INTERVAL", "PROBE", "MODE", "INSTANCE_ID"):
        monkeypatch.delenv(f"VLLM_HOTSWAP_{name}", raising=False)
    settings = load_settings()
    assert not settings.active
    assert settings.adapters == ("*",) and settings.poll_interval == 5.0 and settings.probe
    assert settings.mode == "versioned" and settings.instance_id is None
    monkeypatch.setenv("VLLM_HOTSWAP_ROOT", "/cpfs/lora")
    monkeypatch.setenv("VLLM_HOTSWAP_ADAPTERS", "lora1, team-*")
    monkeypatch.setenv("VLLM_HOTSWAP_PROBE", "0")
    monkeypatch.setenv("VLLM_HOTSWAP_MODE", "inplace")
    settings = load_settings()
    assert settings.active and settings.adapters == ("lora1", "team-*") and not settings.probe
    assert settings.serves("lora1") and settings.serves("team-a") and not settings.serves("lora2")


def test_the_probe_prompt_is_one_token_unless_set(tmp_path) -> None:
    from hotswap_devkit.toy_models import make_tokenizer
    from vllm_lora_hotswap.engine.worker_rpc import probe_token_ids

    tokenizer = make_tokenizer(tmp_path / "tokenizer")
    assert probe_token_ids(tokenizer, None) == [tokenizer.bos_token_id]
    assert probe_token_ids(tokenizer, "Hello there") == tokenizer.encode("Hello there")
    tokenizer.bos_token = None  # a tokenizer without BOS (Qwen's): the first token of "Hello"
    assert probe_token_ids(tokenizer, None) == tokenizer.encode("Hello", add_special_tokens=False)[:1]
    assert probe_token_ids(None, None) == [0]  # vLLM started without a tokenizer


@pytest.mark.parametrize(
    ("var", "value"),
    [
        ("POLL_INTERVAL", "abc"),
        ("POLL_INTERVAL", "-1"),
        ("MODE", "sideways"),
        ("PROBE", "maybe"),
        ("ADAPTERS", " , "),
        ("PROBE_PROMPT", ""),
        ("IDLE_SPIN", "-0.1"),
        ("IDLE_SPIN", "2"),
    ],
)
def test_bad_settings_name_the_variable(monkeypatch: pytest.MonkeyPatch, var: str, value: str) -> None:
    monkeypatch.setenv(f"VLLM_HOTSWAP_{var}", value)
    with pytest.raises(ConfigError, match=f"VLLM_HOTSWAP_{var}="):
        load_settings()


def test_idle_spin_is_vllms_own_unless_set(monkeypatch: pytest.MonkeyPatch) -> None:
    assert load_settings().idle_spin is None
    monkeypatch.setenv("VLLM_HOTSWAP_IDLE_SPIN", "0.005")
    assert load_settings().idle_spin == 0.005


@given(st.text(max_size=30))
def test_any_poll_interval_string_is_a_value_or_a_config_error(value: str) -> None:
    try:
        settings = load_settings(poll_interval=value)
    except ConfigError:
        return
    assert settings.poll_interval > 0


def test_the_wheel_ships_neither_the_demo_nor_the_toy_models() -> None:
    """Packages come from pyproject's find rules; the demo and toy models stay in the repository."""
    import tomllib
    from pathlib import Path

    from setuptools import find_packages

    root = Path(__file__).resolve().parents[1]
    rules = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"]
    packages = find_packages(str(root), include=rules["include"])
    assert "vllm_lora_hotswap" in packages and "trl_callbacks" in packages
    assert not [p for p in packages if p.startswith(("hotswap_demo", "hotswap_devkit", "tests", "benchmarks"))], (
        packages
    )
    assert not (root / "vllm_lora_hotswap" / "toy_models.py").exists()
