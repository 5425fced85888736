"""Faults around the store: a full file system, unreadable files, garbage in every
file the store reads, and the store root vanishing under a running engine."""

from __future__ import annotations

import os
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from hotswap_devkit.server import VllmServer
from tests.conftest import PROMPTS
from tests.support.fake import write_lora
from vllm_lora_hotswap.cli import app
from vllm_lora_hotswap.store import CheckpointStore, StoreError, UnreadableError

NOBODY = 65534


@pytest.fixture
def small_file_system() -> Iterator[Path]:
    """A 2 MiB tmpfs (mounting needs root; elsewhere the test says why it is skipped)."""
    mount_point = Path(tempfile.mkdtemp(prefix="hotswap-full-"))
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mount_point)], capture_output=True, text=True
    )
    if mounted.returncode != 0:
        mount_point.rmdir()
        pytest.skip(f"cannot mount a small tmpfs here ({mounted.stderr.strip()}): the full-disk case needs root")
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", str(mount_point)], check=True)
        mount_point.rmdir()


def test_full_file_system_refuses_the_publish_and_loses_nothing(small_file_system: Path, tmp_path: Path) -> None:
    store = CheckpointStore(small_file_system / "store")
    small = write_lora(tmp_path / "small")  # a few KB
    big = write_lora(tmp_path / "big", rank=16, hidden=2048, layers=8)  # ~4 MB: does not fit
    first = store.publish("lora1", small)
    with pytest.raises(
        StoreError, match=r"publishing lora1 from .* failed: No space left on device; nothing was published"
    ):
        store.publish("lora1", big)
    assert store.versions("lora1") == [first] and store.active_version("lora1") == first
    store.validate("lora1", first)
    assert not list((store.adapter_dir("lora1") / ".staging").iterdir())  # the partial copy is gone
    assert store.publish("lora1", small) > first  # space came back: publishing works again


def test_unreadable_files_name_the_file_and_the_reason(tmp_path: Path) -> None:
    """Validation by a reader without permission (an engine running as another user): an
    ``UnreadableError``, which engines retry and never record as the version's failure."""
    root = Path(tempfile.mkdtemp(prefix="hotswap-perm-"))  # outside pytest's private tmp tree
    try:
        os.chmod(root, 0o755)
        store = CheckpointStore(root / "store")
        version = store.publish("lora1", write_lora(tmp_path / "src"))
        weights = store.version_dir("lora1", version) / "adapter_model.safetensors"
        os.chmod(weights, 0o000)
        assert _validate_as_another_user(store, version) == f"{weights}: cannot read (Permission denied)"
    finally:
        subprocess.run(["rm", "-rf", str(root)], check=True)


def _validate_as_another_user(store: CheckpointStore, version: str) -> str:
    """``store.validate`` in a forked child that dropped root (if it had it); its error text."""
    read_end, write_end = os.pipe()
    child = os.fork()
    if child == 0:  # pragma: no cover - the child
        try:
            if os.geteuid() == 0:
                os.setuid(NOBODY)
            store.validate("lora1", version)
            message = "validated"
        except UnreadableError as exc:
            message = str(exc)
        except BaseException as exc:
            message = f"crashed: {exc!r}"
        os.write(write_end, message.encode())
        os._exit(0)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as pipe:
        message = pipe.read().decode()
    os.waitpid(child, 0)
    return message


# -- garbage in every file the store reads ------------------------------------------------
GARBAGE = st.one_of(
    st.binary(max_size=200),
    st.text(max_size=100).map(str.encode),
    st.sampled_from([b"", b"{}", b"[]", b"null", b'{"files": 3}', b"../../etc/passwd", b"\x00" * 10, b"9" * 400]),
)
STORE_FILES = (
    "LATEST",
    "ACTIVE",
    "RETIRED",
    "READY",
    "metadata.json",
    "adapter_config.json",
    "FAILED.x",
    "instance.json",
)


@pytest.fixture(scope="module")
def lora_source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_lora(tmp_path_factory.mktemp("src") / "lora")


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow]
)
@given(damage=st.dictionaries(st.sampled_from(STORE_FILES), GARBAGE, min_size=1))
def test_cli_never_crashes_on_a_garbage_store(lora_source: Path, damage: dict[str, bytes]) -> None:
    """Whatever the files hold, every read-only command answers with output or one clear error."""
    with tempfile.TemporaryDirectory() as tmp:
        store = CheckpointStore(Path(tmp) / "store")
        version = store.publish("lora1", lora_source)
        adapter_dir, version_dir = store.adapter_dir("lora1"), store.version_dir("lora1", version)
        instances = store.root / ".instances"
        instances.mkdir(exist_ok=True)
        places = {
            "LATEST": adapter_dir,
            "ACTIVE": adapter_dir,
            "RETIRED": adapter_dir,
            "FAILED.x": version_dir,
            "READY": version_dir,
            "metadata.json": version_dir,
            "adapter_config.json": version_dir,
            "instance.json": instances,
        }
        for name, data in damage.items():
            target = places[name] / name
            if target.exists():
                os.chmod(target, 0o644)
            target.write_bytes(data)
        runner = CliRunner()
        for command in (
            ["list"],
            ["list", "lora1"],
            ["status"],
            ["status", "--json"],
            ["list", "--json"],
            ["gc", "--keep", "1"],
        ):
            result = runner.invoke(app, [*command, "--root", str(store.root)])
            assert result.exit_code in (0, 1), (command, damage, result.output)
            if result.exception is not None and not isinstance(result.exception, SystemExit):
                raise AssertionError(f"{command} on {damage} raised {result.exception!r}") from result.exception
            if result.exit_code == 1:
                assert result.output.startswith("error: "), (command, result.output)


@settings(max_examples=200, deadline=None)
@given(data=GARBAGE)
def test_instance_records_parser_never_crashes(data: bytes) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        store = CheckpointStore(Path(tmp))
        (store.root / ".instances").mkdir(parents=True)
        (store.root / ".instances" / "x.json").write_bytes(data)
        assert isinstance(store.instance_records(), list)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=GARBAGE)
def test_metadata_parser_never_crashes(lora_source: Path, data: bytes) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        store = CheckpointStore(Path(tmp))
        version = store.publish("lora1", lora_source)
        path = store.version_dir("lora1", version) / "metadata.json"
        os.chmod(path, 0o644)
        path.write_bytes(data)
        try:
            assert isinstance(store.read_metadata("lora1", version), dict)
        except StoreError as exc:
            assert str(path) in str(exc)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    text=st.one_of(
        st.text(max_size=60), st.sampled_from(['{"adapter": 1}', '{"reward": NaN}', "[1]", '{"a": {"b": {}}}'])
    )
)
def test_cli_publish_metadata_is_an_object_or_one_clear_error(lora_source: Path, text: str) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        result = CliRunner().invoke(app, ["publish", "lora1", str(lora_source), "--metadata", text, "--root", tmp])
        assert result.exit_code in (0, 1), result.output
        if result.exit_code == 1:
            assert result.output.startswith("error: ") and len(result.output.strip().splitlines()) == 1, result.output
        else:
            assert CheckpointStore(tmp).versions("lora1")


# -- the store root vanishing under a running engine ---------------------------------------
@pytest.mark.engine
def test_store_root_vanishing_and_returning(
    engine: VllmServer, shared_store: CheckpointStore, make_lora, reference
) -> None:
    """An unmounted or renamed root: the engine keeps serving, says so, and follows again on return."""
    store = shared_store
    lora_v1, lora_v2 = make_lora(131), make_lora(132)
    v1 = store.publish("vanish", lora_v1)
    engine.wait_served("vanish", v1)
    away = store.root.with_name(store.root.name + "-away")
    os.rename(store.root, away)
    try:
        engine.wait_until(lambda: engine.adapters_record().get("last_error"), 10, "the store error to show")
        assert str(store.root) in engine.adapters_record()["last_error"]
        for prompt in PROMPTS:
            assert engine.tokens("vanish", prompt) == (f"vanish@{v1}", reference(lora_v1, prompt))
    finally:
        os.rename(away, store.root)
    v2 = store.publish("vanish", lora_v2)
    engine.wait_served("vanish", v2)
    assert engine.adapters_record().get("last_error") is None
    assert engine.tokens("vanish", PROMPTS[0]) == (f"vanish@{v2}", reference(lora_v2, PROMPTS[0]))
