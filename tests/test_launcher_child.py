"""The launcher's exec shim: an instance stops when the launcher is killed outright."""

from __future__ import annotations

import subprocess
import sys
import time

import psutil


def test_a_child_is_stopped_when_its_launcher_is_sigkilled() -> None:
    # A stand-in launcher: starts one child through the shim, prints its pid, then waits.
    launcher_code = (
        "import os, subprocess, sys, time\n"
        "child = subprocess.Popen([sys.executable, '-m', 'vllm_lora_hotswap.fleet.child', str(os.getpid()),"
        " 'sleep', '120'], start_new_session=True)\n"
        "print(child.pid, flush=True)\n"
        "time.sleep(120)\n"
    )
    launcher = subprocess.Popen([sys.executable, "-c", launcher_code], stdout=subprocess.PIPE, text=True)
    assert launcher.stdout is not None
    child = psutil.Process(int(launcher.stdout.readline()))
    deadline = time.monotonic() + 30
    while child.name() != "sleep":  # the shim has become the command
        assert time.monotonic() < deadline, "the shim never ran its command"
        time.sleep(0.05)
    assert child.ppid() == launcher.pid
    launcher.kill()
    launcher.wait()
    child.wait(timeout=30)  # raises if the child outlives the launcher: nothing else signals it
