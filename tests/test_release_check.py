"""``make compat VLLM=<version>|latest`` on releases made here: wheels built from the
installed vLLM's source with another version number (and a renamed symbol), and a
package index that answers with a given newest release. Nothing is downloaded."""

from __future__ import annotations

import importlib.util
import stat
import zipfile
from pathlib import Path

import pytest

from vllm_lora_hotswap import SUPPORTED_VLLM
from vllm_lora_hotswap.compat import release_check

RANGE = ",".join(SUPPORTED_VLLM)
RENAMED = ("lora/worker_manager.py", "def _load_adapter(", "def _load_lora(")


def _installed() -> Path:
    spec = importlib.util.find_spec("vllm")
    assert spec is not None and spec.submodule_search_locations
    return Path(next(iter(spec.submodule_search_locations)))


def make_wheel(wheels: Path, version: str, renamed: bool = False) -> Path:
    """The installed vLLM's Python files as the wheel of ``version`` (one method renamed)."""
    wheels.mkdir(parents=True, exist_ok=True)
    wheel = wheels / f"vllm-{version}-cp38-abi3-manylinux_2_28_x86_64.whl"
    source = _installed()
    with zipfile.ZipFile(wheel, "w") as archive:
        for path in source.rglob("*.py"):
            relative = path.relative_to(source).as_posix()
            text = path.read_text()
            if relative == "_version.py":
                text = text.replace(text.split("__version__ = version = '")[1].split("'")[0], version)
            if renamed and relative == RENAMED[0]:
                text = text.replace(RENAMED[1], RENAMED[2])
            archive.writestr(f"vllm/{relative}", text)
    return wheel


def fake_index(tmp_path: Path, newest: str | None) -> str:
    """A stand-in for ``python`` whose ``pip index versions vllm`` names ``newest`` (or fails)."""
    script = tmp_path / "python"
    if newest is None:
        script.write_text("#!/bin/sh\necho 'ERROR: network unreachable' >&2\nexit 1\n")
    else:
        script.write_text(f"#!/bin/sh\necho 'vllm ({newest})'\necho 'Available versions: {newest}, 0.34.0'\n")
    script.chmod(script.stat().st_mode | stat.S_IEXEC)
    return str(script)


@pytest.fixture(scope="module")
def wheels(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("wheels")
    make_wheel(folder, "0.32.9", renamed=True)
    make_wheel(folder, "9.1.0", renamed=True)
    return folder


def test_a_mismatch_inside_the_range_fails_naming_the_symbol(wheels: Path) -> None:
    status, message = release_check.check_release("0.32.9", wheels)
    assert status == 1
    assert message.startswith(f"FAIL vLLM 0.32.9 is inside the supported range {RANGE}, and 1 of the ")
    assert "\n  - vllm.lora.worker_manager.WorkerLoRAManager._load_adapter: does not exist\n" in message


def test_the_newest_release_beyond_the_range_is_a_warning_naming_each_difference(
    wheels: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    python = fake_index(tmp_path, "9.1.0")
    status, message = release_check.check_release("latest", wheels, python)
    assert status == 0
    assert message.startswith(
        f"WARNING vLLM 9.1.0 (the newest release on the index) is newer than the supported range {RANGE}, so the "
        "plugin stays inactive on it; "
    )  # the source is 0.32's: the symbols of later releases differ too
    assert "WorkerLoRAManager._load_adapter: does not exist" in message
    assert "then raise SUPPORTED_VLLM" in message
    monkeypatch.setattr(release_check.sys, "executable", python)
    assert release_check.main(["latest", "--wheels", str(wheels)]) == 0
    assert capsys.readouterr().err.startswith("::warning::WARNING vLLM 9.1.0 (the newest release on the index)")


def test_a_newer_release_that_matches_is_still_a_warning() -> None:
    status, message = release_check.verdict("9.2.0", [])
    assert status == 0 and message.startswith("WARNING vLLM 9.2.0 is newer than the supported range")
    assert "symbols the plugin relies on match, but that does not prove its behaviour unchanged" in message


def test_an_older_release_is_refused_without_a_download(tmp_path: Path) -> None:
    assert release_check.check_release("0.31.0", tmp_path / "empty") == (
        1,
        f"FAIL vLLM 0.31.0 is older than the supported range {RANGE}",
    )
    assert not (tmp_path / "empty").exists()


def test_an_unreachable_index_is_a_skip_that_says_nothing_was_checked(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(release_check.sys, "executable", fake_index(tmp_path, None))
    assert release_check.main(["latest", "--wheels", str(tmp_path)]) == release_check.UNREACHABLE
    err = capsys.readouterr().err
    assert err.startswith(
        "::warning::make compat VLLM=latest SKIPPED, nothing was checked: cannot list vLLM's releases"
    )
    assert "network unreachable" in err
