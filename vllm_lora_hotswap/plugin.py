"""The vLLM general plugin: ``vllm.general_plugins`` entry point ``lora_hotswap``.

vLLM calls :func:`register` in every process it starts (API server, engine
core, each worker, a short model-inspection subprocess), so it is cheap and
idempotent and only installs hooks; nothing runs until the API server starts
the swap pipeline.
"""

from __future__ import annotations

import logging

from . import SUPPORTED_VLLM
from .settings import ENV_PREFIX, HotSwapSettings, load_settings

logger = logging.getLogger("vllm.lora_hotswap")
_registered = False


def check_vllm_version(version: str) -> None:
    from packaging.specifiers import SpecifierSet
    from packaging.version import InvalidVersion, Version

    try:  # local tags such as "+cpu" do not matter
        ok = Version(Version(version).base_version) in SpecifierSet(",".join(SUPPORTED_VLLM))
    except InvalidVersion:
        ok = False
    if not ok:
        raise RuntimeError(
            f"vllm-lora-hotswap supports vLLM {','.join(SUPPORTED_VLLM)}, found {version}: install a "
            "supported vLLM (pip install 'vllm-lora-hotswap[gpu]' or '[cpu]') or unset VLLM_HOTSWAP_ROOT"
        )


def _declare_environment_variables() -> None:
    """Tell vLLM our ``VLLM_HOTSWAP_*`` variables are known, so its environment check
    neither warns about them nor (with strict validation) refuses to start."""
    import os

    import vllm.envs as envs

    for field in HotSwapSettings.model_fields:
        name = ENV_PREFIX + field.upper()
        envs.environment_variables.setdefault(name, lambda name=name: os.environ.get(name))


def register() -> None:
    global _registered
    if _registered:
        return
    _registered = True
    _declare_environment_variables()
    settings = load_settings()  # a bad VLLM_HOTSWAP_* value stops the server here, with its name
    if not settings.active:
        logger.info("vllm-lora-hotswap: VLLM_HOTSWAP_ROOT is unset; plugin inactive")
        return
    import vllm

    check_vllm_version(vllm.__version__)
    from .engine import install_hooks

    install_hooks()
