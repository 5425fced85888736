"""``make gpu-check`` where there is no GPU (as on every CI machine): it says so, claims no
result and exits 0; its figures come only from a machine with one."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest


def test_without_a_gpu_it_says_so_and_claims_nothing(tmp_path: Path) -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is present: the check runs for real (make gpu-check)")
    out = tmp_path / "gpu_check.json"
    result = subprocess.run(
        [sys.executable, "-m", "benchmarks.gpu_check", "--out", str(out)], capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == {"ok": None, "note": "no CUDA device on this machine: nothing was checked"}
    assert json.loads(out.read_text())["ok"] is None
