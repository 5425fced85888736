"""Group calls: concurrent callers share one batched call to the engine.

Transactions of different adapters reach the same phase at nearly the same
moment (eight publishes land together). Each worker RPC costs a step boundary,
so instead of eight installs there is one: the first caller becomes the
leader, takes every request queued so far, makes one call, hands each caller
its own result, and repeats while requests keep arriving. No lock is held
during the call itself.

With ``overlap`` a call does not wait for the one in flight: the leader hands
leadership on as soon as it has taken its group, so whatever arrives next
starts its own call at once. That fits an engine that groups concurrent work
itself (a served vLLM's scheduler takes every request that arrived during a
step into the next one); queueing behind the call in flight would only add an
idle gap and split the next group again.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from typing import Generic, TypeVar

Item = TypeVar("Item")
Result = TypeVar("Result")


class GroupCall(Generic[Item, Result]):
    """``call(item)`` as if alone; ``batch(items)`` runs once per group of concurrent
    callers and returns one result per item (an ``Exception`` instance is raised to
    that item's caller alone)."""

    def __init__(self, batch: Callable[[Sequence[Item]], Sequence[Result | Exception]], *, overlap: bool = False):
        self._batch = batch
        self._overlap = overlap
        self._lock = threading.Lock()
        self._queue: list[tuple[Item, Future[Result]]] = []
        self._leading = False

    def __call__(self, item: Item) -> Result:
        future: Future[Result] = Future()
        with self._lock:
            self._queue.append((item, future))
            lead, self._leading = not self._leading, True
        if lead:
            self._lead()
        return future.result()

    def _lead(self) -> None:
        while True:
            with self._lock:
                group, self._queue = self._queue, []
                if not group or self._overlap:
                    self._leading = False
                if not group:
                    return
            try:
                results = self._batch([item for item, _ in group])
                if len(results) != len(group):
                    raise RuntimeError(f"batched call returned {len(results)} results for {len(group)} items")
            except BaseException as exc:  # noqa: BLE001 - every caller of the group gets it
                for _, future in group:
                    future.set_exception(exc)
            else:
                for (_, future), result in zip(group, results):
                    if isinstance(result, Exception):
                        future.set_exception(result)
                    else:
                        future.set_result(result)
            if self._overlap:
                return  # whoever arrived meanwhile leads their own call
