"""Count the file-system calls a piece of code makes (the real calls, only counted)."""

from __future__ import annotations

import builtins
import os
from collections import Counter

import pytest


class FsOps:
    """Counts the file-system calls made while active (real calls, just counted)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch):
        self.counts: Counter[str] = Counter()
        for module, name in (
            (os, "stat"),
            (os, "lstat"),
            (os, "scandir"),
            (os, "listdir"),
            (os, "open"),
            (builtins, "open"),
        ):
            original = getattr(module, name)

            def counted(*args, __original=original, __name=name, **kwargs):
                self.counts[__name] += 1
                return __original(*args, **kwargs)

            monkeypatch.setattr(module, name, counted)

    def measure(self, action) -> Counter[str]:
        self.counts.clear()
        action()
        return Counter(self.counts)
