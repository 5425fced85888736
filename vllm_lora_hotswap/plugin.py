"""The vLLM general plugin: ``vllm.general_plugins`` entry point ``lora_hotswap``.

vLLM calls :func:`register` in every process it starts (API server, engine
core, each worker, a short model-inspection subprocess), so it is cheap and
idempotent and only installs hooks; nothing runs until the API server starts
the swap pipeline.
"""

from __future__ import annotations

import logging
import os

from .settings import ENV_PREFIX, HotSwapSettings, load_settings

logger = logging.getLogger("vllm.lora_hotswap")
_registered = False


def _declare_environment_variables() -> None:
    """Tell vLLM our ``VLLM_HOTSWAP_*`` variables are known, so its environment check
    neither warns about them nor (with strict validation) refuses to start."""
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
    if not vllm_matches():
        return
    from .engine import install_hooks

    install_hooks(settings)


# The verdict of the check, handed to the processes this one spawns (engine core,
# workers: same environment, same vLLM): they neither repeat the check nor log it again.
_CHECKED = "LORA_HOTSWAP_VLLM_CHECK"


def vllm_matches() -> bool:
    """Check every private vLLM symbol the plugin relies on; on a mismatch log one
    error and leave vLLM untouched (it serves without the plugin)."""
    import vllm

    from .compat import vllm_symbols

    key = f"{vllm.__version__}:{os.path.dirname(vllm.__file__)}"
    verdict = os.environ.get(_CHECKED, "")
    if verdict.startswith(key + "="):
        return verdict == key + "=ok"
    error = vllm_symbols.check_installed()
    os.environ[_CHECKED] = f"{key}={'ok' if error is None else 'mismatch'}"
    if error is not None:
        logger.error("%s. The plugin is NOT active: vLLM serves without hot-swapping.", error)
        return False
    return True
