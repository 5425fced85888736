"""Scheduling primitives of the swap pipeline: one job per adapter, claims per version.

* :meth:`AdapterJobs.submit` runs ``work(adapter)`` in a pool, at most one job per
  adapter at a time; submitting an adapter whose job runs marks it *dirty*, and
  the job runs ``work`` again before it ends, so a change is never lost and
  versions of one adapter never race.
* :meth:`AdapterJobs.claim` gives a key such as ``(adapter, version)`` to one
  holder at a time (a transaction or a retirement); others wait for it to end,
  or give up.

The lock here guards these tables alone and is never held while work runs.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from typing import Generic, TypeVar

Record = TypeVar("Record")
logger = logging.getLogger("vllm.lora_hotswap")


class AdapterJobs(Generic[Record]):
    def __init__(self, work: Callable[[str], Record | None], max_parallel: int, *, on_idle: Callable[[], None]):
        self._work = work
        self._on_idle = on_idle  # a job ended
        self._lock = threading.Lock()
        self._jobs: dict[str, Future[list[Record]]] = {}
        self._dirty: set[str] = set()
        self._claims: dict[object, threading.Event] = {}  # set when the claim ends
        self._pool = ThreadPoolExecutor(max_parallel, thread_name_prefix="hotswap-swap")

    def submit(self, adapter: str) -> Future[list[Record]]:
        """The adapter's job (a new one, or the running one, which will look again)."""
        with self._lock:
            job = self._jobs.get(adapter)
            if job is not None:
                self._dirty.add(adapter)
                return job
            job = self._jobs[adapter] = self._pool.submit(self._run, adapter)
            return job

    def mark_dirty(self, adapter: str) -> None:
        """Have the running job of ``adapter`` run its work once more."""
        with self._lock:
            self._dirty.add(adapter)

    def is_dirty(self, adapter: str) -> bool:
        with self._lock:
            return adapter in self._dirty

    def _run(self, adapter: str) -> list[Record]:
        records: list[Record] = []
        while True:
            with self._lock:
                self._dirty.discard(adapter)
            try:
                record = self._work(adapter)
            except Exception:  # the job must end cleanly; the next poll tries again
                logger.exception("hot-swap: syncing %s failed", adapter)
                record = None
            if record is not None:
                records.append(record)
            with self._lock:
                if adapter not in self._dirty:
                    del self._jobs[adapter]
                    break
        self._on_idle()
        return records

    @contextmanager
    def claim(self, key: object, *, wait: bool) -> Iterator[bool]:
        """Hold ``key`` for the ``with`` block. With ``wait``, first wait for its holder to
        finish; without, yield False at once if it is held."""
        while True:
            with self._lock:
                holder = self._claims.get(key)
                if holder is None:
                    self._claims[key] = threading.Event()
                    break
            if not wait:
                yield False
                return
            holder.wait()
        try:
            yield True
        finally:
            with self._lock:
                self._claims.pop(key).set()

    def shutdown(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
