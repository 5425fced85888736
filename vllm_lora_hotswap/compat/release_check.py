"""``make compat VLLM=<version>|latest``: check a vLLM release from the package index.

Why: vLLM ships a release every few weeks and the plugin relies on its private
symbols (:mod:`.vllm_symbols`). A release inside the supported range that
renames one must fail CI at once; a release beyond the range must be noticed
the day it appears, with what differs in it, before users upgrade onto a
plugin that stays inactive there.

How: the release's wheel is downloaded without its dependencies (cached in a
folder, so each release is fetched once) and its source parsed, never imported,
so a CUDA-only release is checked on any machine. ``latest`` is the newest
release on the index. The verdict, and the exit status:

* inside the supported range: every symbol matches (0) or the mismatches are
  named (1);
* newer than the range: a warning (0) that names each symbol that differs, or
  says that all match, and what to do to support the release;
* older than the range: refused (1);
* the index or the wheel cannot be reached: a warning that nothing was checked
  (:data:`UNREACHABLE`, 75), which CI reports and goes past.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
from pathlib import Path

from .. import SUPPORTED_VLLM
from .vllm_symbols import SourceTree, release_numbers, source_mismatches, supported, symbols_for, version_in

UNREACHABLE = 75  # EX_TEMPFAIL: nothing was checked
WHEEL_GLOB = "vllm-{version}-*.whl"


class Unreachable(Exception):
    """The package index or the wheel could not be had: nothing was checked."""


def newest_release(python: str | None = None) -> str:
    """The newest vLLM release on the package index (``pip index versions vllm``)."""
    result = subprocess.run(
        [python or sys.executable, "-m", "pip", "index", "versions", "vllm"],
        capture_output=True,
        text=True,
        check=False,
    )
    match = re.search(r"^vllm \(([^)]+)\)", result.stdout, re.MULTILINE)
    if result.returncode != 0 or match is None:
        raise Unreachable(f"cannot list vLLM's releases: {(result.stderr or result.stdout).strip()[-300:]}")
    return match.group(1)


def wheel(version: str, wheels: Path, python: str | None = None) -> Path:
    """The wheel of vLLM ``version`` in ``wheels``, downloaded (no dependencies) if not there yet."""
    found = sorted(wheels.glob(WHEEL_GLOB.format(version=version)))
    if not found:
        wheels.mkdir(parents=True, exist_ok=True)
        command = [python or sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:"]
        result = subprocess.run(
            [*command, f"vllm=={version}", "-d", str(wheels)], capture_output=True, text=True, check=False
        )
        found = sorted(wheels.glob(WHEEL_GLOB.format(version=version)))
        if result.returncode != 0 or not found:
            raise Unreachable(f"cannot download vllm=={version}: {result.stderr.strip()[-300:]}")
    return found[0]


def verdict(version: str, problems: list[Exception], newest: bool = False) -> tuple[int, str]:
    """(exit status, message) for a release and the symbols that differ in it (``newest``:
    it is the newest release on the index)."""
    name = f"vLLM {version}" + (" (the newest release on the index)" if newest else "")
    supported_range = ",".join(SUPPORTED_VLLM)
    count = len(symbols_for(version))
    if supported(version):
        if not problems:
            return 0, f"OK {name}: all {count} symbols the plugin relies on match"
        listed = "".join(f"\n  - {p}" for p in problems)
        return 1, (
            f"FAIL {name} is inside the supported range {supported_range}, and {len(problems)} of the "
            f"{count} symbols the plugin relies on differ in it:{listed}\n"
            "Adapt the plugin to it (a versions= entry per release in vllm_symbols.py), or narrow SUPPORTED_VLLM."
        )
    if not _older_than_range(version):
        if problems:
            listed = "".join(f"\n  - {p}" for p in problems)
            found = f"{len(problems)} of the {count} symbols the plugin relies on differ in it:{listed}"
        else:
            found = f"all {count} symbols the plugin relies on match, but that does not prove its behaviour unchanged."
        return 0, (
            f"WARNING {name} is newer than the supported range {supported_range}, so the plugin stays "
            f"inactive on it; {found}\n"
            f"To support it: read its changes to the code paths in vllm_symbols.py against the last supported "
            f"release, adapt what differs (a versions= entry per release), then raise SUPPORTED_VLLM "
            f"(vllm_lora_hotswap/__init__.py), the [gpu] extra's bound and .ci/run's list of releases."
        )
    return 1, f"FAIL {name} is older than the supported range {supported_range}"


def _older_than_range(version: str) -> bool:
    return not version_in(version, ",".join(clause for clause in SUPPORTED_VLLM if clause.lstrip().startswith(">")))


def check_release(release: str, wheels: Path, python: str | None = None) -> tuple[int, str]:
    """Resolve, fetch and check ``release`` (a version or ``latest``): (exit status, message)."""
    version = newest_release(python) if release == "latest" else release
    newest = release == "latest"
    if _older_than_range(version):  # nothing to download
        return verdict(version, [], newest)
    tree = SourceTree(wheel(version, wheels, python))
    if tree.version != version and release_numbers(tree.version) != release_numbers(version):
        raise ValueError(f"the wheel for vLLM {version} says it is vLLM {tree.version}")
    return verdict(tree.version, list(source_mismatches(tree, tree.version)), newest)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m vllm_lora_hotswap.compat.release_check",
        description="Check a vLLM release from the package index against what the plugin relies on.",
    )
    parser.add_argument("release", help="a vLLM version (0.34.0) or 'latest', the newest on the index")
    parser.add_argument("--wheels", default="/tmp/vllm-wheels", help="folder of downloaded wheels (a cache)")
    args = parser.parse_args(argv)
    try:
        status, message = check_release(args.release, Path(args.wheels))
    except Unreachable as exc:
        print(f"::warning::make compat VLLM={args.release} SKIPPED, nothing was checked: {exc}", file=sys.stderr)
        return UNREACHABLE
    except (ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if message.startswith("WARNING"):
        print(f"::warning::{message}", file=sys.stderr)
    else:
        print(message, file=sys.stderr if status else sys.stdout)
    return status


if __name__ == "__main__":
    sys.exit(main())
