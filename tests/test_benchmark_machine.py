"""The benchmark results name the commit they measured (no engine)."""

from __future__ import annotations

import subprocess
from pathlib import Path

from benchmarks.machine import commit


def _git(repository: Path, *args: str) -> str:
    return subprocess.run(["git", *args], cwd=repository, capture_output=True, text=True, check=True).stdout.strip()


def test_the_commit_says_whether_the_measured_tree_differs_from_it(tmp_path: Path) -> None:
    assert commit(str(tmp_path)) is None  # not a git checkout
    _git(tmp_path, "init", "-q")
    (tmp_path / "benchmarks" / "results").mkdir(parents=True)
    (tmp_path / "code.py").write_text("one\n")
    (tmp_path / "benchmarks" / "results" / "results.md").write_text("old\n")
    _git(tmp_path, "add", ".")
    _git(tmp_path, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "-m", "m")
    head = _git(tmp_path, "rev-parse", "--short", "HEAD")
    assert commit(str(tmp_path)) == head
    (tmp_path / "benchmarks" / "results" / "results.md").write_text("new\n")  # what a run rewrites
    (tmp_path / "notes.txt").write_text("untracked\n")
    assert commit(str(tmp_path)) == head
    (tmp_path / "code.py").write_text("two\n")
    assert commit(str(tmp_path)) == f"{head} + changes"
