"""Detect which adapters in the store may have changed.

Polling is the ground truth: file-system events do not cross nodes on CPFS or
NFS. One poll lists the root and reads each adapter's poll signature (two
small reads and a stat), whatever the number of retained versions. Where the
platform delivers inotify events, a side thread hints the adapters that
changed so the next check runs at once instead of at the next poll.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterable
from pathlib import Path

from .store import CheckpointStore, NotFoundError

logger = logging.getLogger("vllm.lora_hotswap")

Signature = tuple[str | None, str | None, int]


class StoreWatcher:
    def __init__(
        self,
        store: CheckpointStore,
        serves: Callable[[str], bool],
        poll_interval: float,
        events: bool = True,
    ):
        self.store = store
        self.serves = serves
        self.poll_interval = poll_interval
        self._use_events = events
        self._signatures: dict[str, Signature] = {}
        self._hinted: set[str] = set()
        self._lock = threading.Lock()
        self._wakeup = threading.Event()
        self._restart_events = threading.Event()
        self._thread: threading.Thread | None = None

    # -- polling -----------------------------------------------------------------------
    def poll(self, only: Iterable[str] | None = None) -> set[str]:
        """Adapters whose signature changed since the last poll (new and vanished included).

        Raises:
            StoreUnavailableError: the root is missing or unreadable.
        """
        listed = [a for a in self.store.adapters() if self.serves(a)]
        with self._lock:
            known = set(self._signatures)
        if only is None:
            names = listed
            vanished = known - set(listed)
        else:
            names = [a for a in only if a in listed]
            vanished = {a for a in only if a in known and a not in listed}
        signatures: dict[str, Signature | None] = dict.fromkeys(vanished)
        for adapter in names:  # store reads: no lock
            try:
                signatures[adapter] = self.store.poll_signature(adapter)
            except NotFoundError:
                signatures[adapter] = None
        changed = set()
        with self._lock:  # the events thread reads the names; the swap jobs invalidate
            for adapter, signature in signatures.items():
                if signature is None:
                    self._signatures.pop(adapter, None)
                    changed.add(adapter)
                elif self._signatures.get(adapter) != signature:
                    if adapter not in self._signatures:
                        self._restart_events.set()  # a new directory to watch
                    self._signatures[adapter] = signature
                    changed.add(adapter)
        return changed

    def invalidate(self, adapter: str) -> None:
        """Check ``adapter`` again at the next poll even if nothing changed (retry)."""
        with self._lock:
            self._signatures.pop(adapter, None)

    # -- events ------------------------------------------------------------------------
    def start_events(self, stop: threading.Event) -> None:
        if not self._use_events or self._thread is not None:
            return
        self._thread = threading.Thread(target=self._event_loop, args=(stop,), name="hotswap-events", daemon=True)
        self._thread.start()

    def wait(self, timeout: float) -> set[str]:
        """Block up to ``timeout`` seconds for event hints; returns the hinted adapters."""
        self._wakeup.wait(timeout)
        with self._lock:
            self._wakeup.clear()
            hinted, self._hinted = self._hinted, set()
        return hinted

    def wake(self) -> None:
        self._wakeup.set()

    def _event_loop(self, stop: threading.Event) -> None:
        import watchfiles

        root = self.store.root
        while not stop.is_set():
            self._restart_events.clear()
            with self._lock:
                paths = [root, *(root / a for a in self._signatures)]
            try:
                for changes in watchfiles.watch(
                    *paths,
                    watch_filter=None,
                    debounce=50,
                    step=5,
                    stop_event=stop,
                    rust_timeout=1000,
                    yield_on_timeout=True,
                    recursive=False,
                    raise_interrupt=False,
                ):
                    names = {_adapter_of(root, path) for _, path in changes}
                    names.discard(None)
                    if names:
                        with self._lock:
                            self._hinted |= names  # type: ignore[arg-type]
                        self._wakeup.set()
                    if self._restart_events.is_set():
                        break
            except Exception as exc:  # root gone, watch limit reached, ...: polling carries on
                logger.debug("file-system events unavailable (%s); polling only", exc)
                stop.wait(self.poll_interval)


def _adapter_of(root: Path, path: str) -> str | None:
    try:
        first = Path(path).relative_to(root).parts[0]
    except (ValueError, IndexError):
        return None
    return None if first.startswith(".") else first
