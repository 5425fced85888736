"""A vLLM that differs from what the plugin relies on: a real server starts, logs one
error naming the symbol and the supported range, and serves without the plugin."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from hotswap_devkit.server import VllmServer
from tests.conftest import PROMPTS
from vllm_lora_hotswap import SUPPORTED_VLLM
from vllm_lora_hotswap.store import CheckpointStore

pytestmark = pytest.mark.engine

# Loaded by every Python process of the server (API server, engine core, worker): the
# plugin now relies on a method this vLLM lacks, as it would on a future release.
SITECUSTOMIZE = """
from vllm_lora_hotswap.compat import vllm_symbols

vllm_symbols.SYMBOLS += (
    vllm_symbols.Symbol("vllm.lora.model_manager", "LRUCacheLoRAModelManager._renamed_in_a_future_release", "method"),
)
"""


def test_a_vllm_that_differs_serves_without_the_plugin(toy_model: Path, tmp_path: Path, make_lora, reference) -> None:
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(SITECUSTOMIZE)
    store = CheckpointStore(tmp_path / "store")
    store.publish("lora1", make_lora(97))
    python_path = os.pathsep.join(filter(None, [str(site), os.environ.get("PYTHONPATH")]))
    server = VllmServer(toy_model, store.root, tmp_path / "server.log", env={"PYTHONPATH": python_path}).start()
    try:
        assert server.tokens(str(toy_model), PROMPTS[0])[1] == reference(None, PROMPTS[0])
        assert [m["id"] for m in server.client.get("/v1/models").json()["data"]] == [str(toy_model)]
        assert server.client.get("/v1/lora/adapters").status_code == 404
        errors = [line for line in server.log_path.read_text().splitlines() if "The plugin is NOT active" in line]
        assert len(errors) == 1, errors
        assert f"vllm-lora-hotswap supports vLLM {','.join(SUPPORTED_VLLM)}; vLLM " in errors[0]
        assert (
            "vllm.lora.model_manager.LRUCacheLoRAModelManager._renamed_in_a_future_release: does not exist"
            in errors[0]
        )
    finally:
        server.stop()
