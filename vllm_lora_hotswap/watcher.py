"""Detect which adapters in the store may have changed.

Polling is the ground truth: file-system events do not cross nodes on CPFS or
NFS. One poll lists the root and reads each adapter's poll signature (two
small reads and a stat), whatever the number of retained versions. Two things
make the next check run at once instead of at the next poll, both only hints:

* file-system events: on Linux a side thread reads inotify directly and hints
  an adapter the moment a name in its directory appears or goes (a commit's
  rename), with no debounce: a burst of events costs a few cheap polls, a
  debounce would cost every publish its window. Elsewhere ``watchfiles``;
* a publisher's notice (``POST /v1/lora/notify``, see :mod:`.engine.notices`):
  across nodes no event arrives, so the publisher says "look now".

A hint never says what changed: the poll reads the store and decides, so a
lost hint costs the poll interval and a false one a wasted poll. Hints are a
set of names, bounded: a flood of unknown names cannot grow memory.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterable
from pathlib import Path

from . import inotify
from .store import CheckpointStore, NotFoundError

logger = logging.getLogger("vllm.lora_hotswap")

Signature = tuple[str | None, str | None, int]
# Names waiting for the controller thread, which drains them within one pass; more than
# this many distinct ones at once are dropped (the next poll still sees any real change).
MAX_HINTS = 1024


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
        self._interrupt_events: Callable[[], None] | None = None  # the inotify loop's, while it runs
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
        interrupt = self._interrupt_events
        if interrupt is not None and self._restart_events.is_set():
            interrupt()  # watch the new directory now, before its first version lands
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

    def hint(self, adapters: Iterable[str]) -> bool:
        """Check ``adapters`` at once (only those that are in the store and served here);
        False if some were dropped because too many names are waiting already."""
        kept = True
        with self._lock:
            for adapter in adapters:
                if adapter in self._hinted:
                    continue
                if len(self._hinted) >= MAX_HINTS:
                    kept = False
                    break
                self._hinted.add(adapter)
        self._wakeup.set()
        return kept

    def _event_loop(self, stop: threading.Event) -> None:
        if inotify.available():
            try:
                self._inotify_loop(stop)
                return
            except Exception as exc:  # no descriptor (limit reached), ...: the portable path
                logger.warning("hot-swap: inotify unavailable (%s); using watchfiles", exc)
        self._watchfiles_loop(stop)

    def _inotify_loop(self, stop: threading.Event) -> None:
        """Hint an adapter as soon as an entry of its directory (or of the root) comes or goes."""
        root = self.store.root
        with inotify.Inotify() as watch:
            self._interrupt_events = watch.interrupt
            try:
                owners: dict[int, str | None] = {}  # watch descriptor -> adapter (None: the root)
                watched: dict[str, int] = {}
                root_wd: int | None = None
                while not stop.is_set():
                    if root_wd is None:
                        try:
                            root_wd = watch.add(root)
                        except OSError as exc:  # root gone or unreadable: polling says so
                            logger.debug("hot-swap: cannot watch %s (%s); polling only for now", root, exc)
                            stop.wait(min(self.poll_interval, 1.0))
                            continue
                        owners[root_wd] = None
                    self._restart_events.clear()
                    with self._lock:
                        wanted = set(self._signatures)
                    fresh = set()
                    for adapter in wanted - watched.keys():
                        try:
                            wd = watch.add(root / adapter)
                        except OSError:
                            continue  # vanished since the poll: the poll will say so
                        watched[adapter], owners[wd] = wd, adapter
                        fresh.add(adapter)
                    for adapter in watched.keys() - wanted:
                        wd = watched.pop(adapter)
                        owners.pop(wd, None)
                        watch.remove(wd)
                    if fresh:  # a version committed between the poll that found the directory
                        self.hint(fresh)  # and the watch raised no event: look once more
                    hinted = set()
                    for event in watch.read(1.0):
                        if event.overflow:  # events were lost: look at everything watched
                            hinted |= watched.keys()
                            continue
                        if event.wd not in owners:
                            continue
                        owner = owners[event.wd]
                        if event.mask & (inotify.IN_IGNORED | inotify.IN_DELETE_SELF | inotify.IN_MOVE_SELF):
                            # That directory left its path (a moved one keeps its watch): watch the path again.
                            owners.pop(event.wd, None)
                            watch.remove(event.wd)
                            if owner is None:
                                root_wd = None
                            elif watched.get(owner) == event.wd:
                                del watched[owner]
                                hinted.add(owner)
                            continue
                        if event.name.startswith("."):
                            continue  # staging, temporary files, the lock, instance records
                        hinted.add(event.name if owner is None else owner)
                    if hinted:
                        self.hint(hinted)
            finally:
                self._interrupt_events = None

    def _watchfiles_loop(self, stop: threading.Event) -> None:
        """Where inotify is not to be had: ``watchfiles`` waits for a quiet step (at most the
        debounce) before it reports, a few tens of milliseconds per publish."""
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
                        self.hint(names)  # type: ignore[arg-type]
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
