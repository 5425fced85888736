"""The check of every private vLLM symbol the plugin relies on: against the installed
vLLM (live and parsed) and against doctored copies of its source. No engine runs."""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

import pytest

from vllm_lora_hotswap import SUPPORTED_VLLM, plugin
from vllm_lora_hotswap.compat import vllm_symbols
from vllm_lora_hotswap.compat.vllm_symbols import SYMBOLS, check_source

RANGE = ",".join(SUPPORTED_VLLM)


@pytest.fixture(scope="module")
def installed_source() -> Path:
    import importlib.util

    spec = importlib.util.find_spec("vllm")
    assert spec is not None and spec.submodule_search_locations
    return Path(next(iter(spec.submodule_search_locations)))


@pytest.fixture
def source_copy(installed_source: Path, tmp_path: Path) -> Path:
    """The Python files of the installed vLLM, to doctor."""
    shutil.copytree(
        installed_source, tmp_path / "vllm", ignore=shutil.ignore_patterns("*.so", "__pycache__", "*.json", "*.cu*")
    )
    return tmp_path


def _edit(root: Path, relative: str, old: str, new: str) -> None:
    path = root / "vllm" / relative
    text = path.read_text()
    assert old in text, (relative, old)
    path.write_text(text.replace(old, new))


def test_the_installed_vllm_matches_when_parsed_and_when_imported(installed_source: Path) -> None:
    version, error = check_source(installed_source)
    assert vllm_symbols.supported(version)
    assert error is None
    assert vllm_symbols.check_installed() is None


def test_a_renamed_method_is_named_with_the_supported_range(source_copy: Path) -> None:
    _edit(source_copy, "lora/model_manager.py", "def _create_merged_loras_inplace(", "def _create_merged_loras(")
    version, error = check_source(source_copy)
    assert error is not None
    assert f"supports vLLM {RANGE}" in error and f"vLLM {version} differs" in error
    assert "vllm.lora.model_manager.LRUCacheLoRAModelManager._create_merged_loras_inplace: does not exist" in error
    assert error.count(": does not exist") == 1 and error.count("differs") == 1  # that one only


def test_a_changed_signature_a_removed_attribute_and_a_method_turned_property_are_each_named(
    source_copy: Path,
) -> None:
    _edit(
        source_copy,
        "v1/engine/async_llm.py",
        'mode: PauseMode = "abort",\n        clear_cache: bool = True,',
        'mode: PauseMode = "abort",',
    )
    _edit(source_copy, "entrypoints/openai/models/serving.py", "self.lora_id_counter = ", "self.lora_counter = ")
    _edit(
        source_copy,
        "distributed/weight_transfer/base.py",
        "    def metadata(self) -> list[ParamMeta]:\n        return [",
        "    @property\n    def metadata(self) -> list[ParamMeta]:\n        return [",
    )
    _, error = check_source(source_copy)
    assert error is not None
    assert "vllm.v1.engine.async_llm.AsyncLLM.pause_generation: takes (mode), not clear_cache" in error
    assert "vllm.entrypoints.openai.models.serving.OpenAIServingModels.lora_id_counter: no such attribute" in error
    assert "vllm.distributed.weight_transfer.base.ModuleSource.metadata: is not a method (it is a property)" in error


def test_a_release_outside_the_range_is_refused_by_version(source_copy: Path) -> None:
    path = source_copy / "vllm" / "_version.py"
    text = path.read_text()
    major_minor = text.split("__version__ = version = '")[1].split("'")[0]
    path.write_text(text.replace(major_minor, "0.35.0"))
    assert check_source(source_copy) == ("0.35.0", f"vllm-lora-hotswap supports vLLM {RANGE}; found vLLM 0.35.0")


def test_the_endpoint_plugin_wrapper_is_bypassed_by_a_module_level_import(source_copy: Path) -> None:
    """vLLM's loader is wrapped (no VLLM_PLUGINS needed): a caller that bound it at import
    time would call the original, and the plugin's routes would silently be missing."""
    _edit(
        source_copy,
        "plugins/endpoint_plugins/interface.py",
        "    from vllm.plugins import load_endpoint_plugins\n",
        "",
    )
    module_level = "from fastapi import FastAPI\nfrom vllm.plugins import load_endpoint_plugins\n"
    _edit(source_copy, "plugins/endpoint_plugins/interface.py", "from fastapi import FastAPI\n", module_level)
    _, error = check_source(source_copy)
    assert error is not None
    assert (
        "vllm.plugins.endpoint_plugins.interface.attach_endpoint_plugins: no longer imports "
        "vllm.plugins.load_endpoint_plugins when called, so the plugin's wrapper of it is bypassed"
    ) in error


def test_the_live_check_reads_the_wrapped_callers_body() -> None:
    import vllm.plugins.endpoint_plugins.interface  # noqa: F401 - inspected live, not parsed

    assert vllm_symbols.check_installed() is None


@pytest.fixture(scope="module")
def vllm_034(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """vLLM 0.34.0's Python files, from the wheel `make compat VLLM=0.34.0` downloads (CI does
    so before the tests); it is a CUDA build, so it is parsed here, never installed."""
    import zipfile

    wheels = sorted(Path(os.environ.get("VLLM_WHEELS", "/tmp/vllm-wheels")).glob("vllm-0.34.0-*.whl"))
    if not wheels:
        pytest.skip("no vLLM 0.34.0 wheel in VLLM_WHEELS: run `make compat VLLM=0.34.0` first")
    root = tmp_path_factory.mktemp("vllm-0.34.0")
    with zipfile.ZipFile(wheels[0]) as archive:
        archive.extractall(
            root, [name for name in archive.namelist() if name.startswith("vllm/") and name.endswith(".py")]
        )
    return root


def test_vllm_034_matches_and_a_renamed_lora_mapping_is_named(vllm_034: Path) -> None:
    assert check_source(vllm_034) == ("0.34.0", None)
    _edit(vllm_034, "lora/model_manager.py", "self._last_mapping", "self._previous_mapping")
    try:
        version, error = check_source(vllm_034)
    finally:
        _edit(vllm_034, "lora/model_manager.py", "self._previous_mapping", "self._last_mapping")
    assert version == "0.34.0" and error is not None
    assert "vllm.lora.model_manager.LRUCacheLoRAModelManager._last_mapping: no such attribute" in error


def test_a_wheel_is_read_in_place(installed_source: Path, tmp_path: Path) -> None:
    import zipfile

    wheel = tmp_path / "vllm-0.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        for path in installed_source.rglob("*.py"):
            archive.write(path, f"vllm/{path.relative_to(installed_source).as_posix()}")
    assert check_source(wheel) == check_source(installed_source)


def test_a_tree_without_vllm_is_an_error_naming_it(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert vllm_symbols.main(["--source", str(tmp_path)]) == 2
    assert f"no vllm package in {tmp_path}" in capsys.readouterr().err


def test_the_command_line_says_ok_or_fail(
    installed_source: Path, source_copy: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert vllm_symbols.main(["--source", str(installed_source)]) == 0
    assert "symbols the plugin relies on match" in capsys.readouterr().out
    _edit(source_copy, "lora/worker_manager.py", "def _load_adapter(", "def _load_lora(")
    assert vllm_symbols.main(["--source", str(source_copy)]) == 1
    assert "WorkerLoRAManager._load_adapter: does not exist" in capsys.readouterr().err


def test_the_live_check_imports_no_vllm_module() -> None:
    """It runs in every vLLM process: what is not loaded there is read from source."""
    import subprocess
    import sys

    script = (
        "import sys, vllm\n"
        "from vllm_lora_hotswap.compat import vllm_symbols\n"
        "before = set(sys.modules)\n"
        "assert vllm_symbols.check_installed() is None\n"
        "print(sorted(m for m in set(sys.modules) - before if m.startswith('vllm.')))\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"


def test_the_live_check_names_a_missing_method(monkeypatch: pytest.MonkeyPatch) -> None:
    from vllm.lora.model_manager import LoRAModelManager

    monkeypatch.delattr(LoRAModelManager, "_create_merged_loras_inplace")
    error = vllm_symbols.check_installed()
    assert error is not None and f"supports vLLM {RANGE}" in error
    assert "LRUCacheLoRAModelManager._create_merged_loras_inplace: does not exist" in error


def test_on_a_mismatch_the_plugin_logs_one_error_and_installs_nothing(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    import vllm

    import vllm_lora_hotswap.engine as engine

    monkeypatch.setenv("VLLM_HOTSWAP_ROOT", str(tmp_path))
    monkeypatch.setenv(plugin._CHECKED, "")
    monkeypatch.setattr(
        vllm_symbols, "check_installed", lambda: "vllm-lora-hotswap supports vLLM X; vLLM Y differs: Z"
    )
    monkeypatch.setattr(engine, "install_hooks", lambda settings: pytest.fail("hooks installed despite a mismatch"))
    for _process in ("api server", "engine core, spawned by it"):  # the second inherits the verdict
        monkeypatch.setattr(plugin, "_registered", False)
        with caplog.at_level(logging.INFO, logger="vllm.lora_hotswap"):
            plugin.register()
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert errors == [
        "vllm-lora-hotswap supports vLLM X; vLLM Y differs: Z. The plugin is NOT active: vLLM serves without hot-swapping."
    ]
    assert os.environ[plugin._CHECKED] == f"{vllm.__version__}:{os.path.dirname(vllm.__file__)}=mismatch"


def test_every_symbol_names_a_vllm_module_and_a_known_kind() -> None:
    assert all(
        s.module.startswith("vllm") and s.kind in {"class", "function", "method", "property", "attribute"}
        for s in SYMBOLS
    )
    # Each entry that differs between releases exists in some supported release.
    assert {s.versions for s in SYMBOLS} == {
        "",
        "<0.33",
        "<0.34",
        vllm_symbols.WEIGHT_SOURCE_V2,
        vllm_symbols.RELOAD_LIFECYCLE,
    }


@pytest.mark.parametrize(
    ("version", "spec", "inside"),
    [
        ("0.32.0", ">=0.32.0,<0.34", True),
        ("0.33.0", ">=0.32.0,<0.34", True),
        ("0.34.0", ">=0.32.0,<0.34", False),
        ("0.31.9", ">=0.32.0,<0.34", False),
        ("0.32.0+cpu", "<0.33", True),  # local tags do not count
        ("0.33.0rc1", ">=0.33", True),  # nor pre-release suffixes
        ("0.33.1", "<0.33", False),
        ("0.32", ">=0.32.0", True),
        ("0.32.0", "", True),
        ("unknown", "", False),
    ],
)
def test_version_ranges(version: str, spec: str, inside: bool) -> None:
    assert vllm_symbols.version_in(version, spec) is inside
