"""Publisher → engine notices: "adapter@version is committed, look now".

Why: an engine learns of a version from file-system events on its own node,
and otherwise only at its next poll. Across nodes (NFS, CPFS) no event
arrives, so a multi-node on-policy step would wait a poll interval per sync.
A publisher that knows its engines (``FleetRollout``'s URLs, the fleet
scheduler's instances, ``HotSwapCallback(engines=...)``) tells them over
HTTP right after the commit.

How: ``POST /v1/lora/notify`` on each engine, off the publisher's thread,
with a short timeout; a failure is logged, never raised. A notice is only a
hint: the engine reads the store and validates as after any event, so a lost
notice costs the poll interval and a forged one a wasted look (a forged notice
of written weights: one read of the named file per worker). The engine's
side is :mod:`vllm_lora_hotswap.engine.notices`. Nothing here imports vLLM.

A publisher that wrote the weights with ``StagedVersion.write_weights`` also
says so before the commit (:meth:`CommitNotifier.notify_written`): the
engines' workers read the file while it is committed, and use those bytes only
if the committed ``READY`` records their sha256
(:mod:`vllm_lora_hotswap.engine.read_ahead`).
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

import httpx

if TYPE_CHECKING:
    from .store.staged import StagedVersion

logger = logging.getLogger("vllm.lora_hotswap")
NOTIFY_PATH = "/v1/lora/notify"
WAIT_PATH = "/v1/lora/wait"
# A notice is worth something only if it arrives before the poll would have: an engine
# that does not answer within this is down or overloaded, and the poll covers it.
NOTICE_TIMEOUT_S = 2.0
MAX_SENDERS = 8


def _headers(api_key: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {api_key}"} if api_key else {}


def _body(adapter: str, version: str | None) -> dict[str, Any]:
    return {"adapter": adapter, "version": version}


class CommitNotifier:
    """Sends notices to a set of engines from a small thread pool; :meth:`notify` never blocks.

    Example: ``CommitNotifier(["http://gpu1:8000"], api_key=key).notify("policy", version)``
    """

    def __init__(self, urls: Iterable[str] = (), *, api_key: str | None = None, timeout: float = NOTICE_TIMEOUT_S):
        self.timeout = timeout
        self._targets: dict[str, dict[str, str]] = {}  # url -> its headers (engines may differ in key)
        self._failing: set[str] = set()  # URLs whose last notice failed: logged once until one succeeds
        self._no_read_ahead: set[str] = set()  # URLs that refused a written notice (no reads ahead there)
        self._lock = threading.Lock()
        self._http: httpx.Client | None = None
        # Two pools: a written notice held up by a slow engine never delays a commit's notice.
        self._pools: dict[bool, ThreadPoolExecutor] = {}  # written? -> its senders
        self.add(urls, api_key=api_key)

    def add(self, urls: Iterable[str], *, api_key: str | None = None) -> None:
        """Also notify ``urls`` (base URLs of engines; one already known keeps its key)."""
        with self._lock:
            for url in urls:
                self._targets.setdefault(url.rstrip("/"), _headers(api_key))

    @property
    def urls(self) -> list[str]:
        with self._lock:
            return list(self._targets)

    def notify(self, adapter: str, version: str | None) -> list[Future[bool]]:
        """Tell every engine that ``adapter`` changed (``version`` committed); returns at once.
        Each future says whether that engine accepted the notice (never raises)."""
        return self._send_all(_body(adapter, version))

    def notify_written(self, adapter: str, staged: StagedVersion) -> list[Future[bool]]:
        """Tell every engine that ``staged``'s weight file is written, before its commit: each
        engine reads it ahead, and uses those bytes only if the committed ``READY`` records
        the same sha256 (``vllm_lora_hotswap.engine.read_ahead``). Returns at once; nothing to
        send before :meth:`StagedVersion.write_weights`. The commit's :meth:`notify` follows.

        Example::

            save_adapter(model, staged)
            notifier.notify_written("policy", staged)
            notifier.notify("policy", staged.commit())
        """
        digest = staged.weights_digest
        if digest is None:
            return []
        written = {"staging": staged.path.name, "sha256": digest.sha256, "size": digest.size}
        return self._send_all({"adapter": adapter, "written": written})

    def _send_all(self, body: dict[str, Any]) -> list[Future[bool]]:
        written = "written" in body
        try:
            with self._lock:
                # A written notice is only a head start: none to an engine that is failing (the
                # commit's notice finds out when it is back) or that cannot read ahead.
                skip = (self._failing | self._no_read_ahead) if written else set()
                targets = [(url, headers) for url, headers in self._targets.items() if url not in skip]
                if not targets:
                    return []
                if self._http is None:
                    self._http = httpx.Client(timeout=httpx.Timeout(self.timeout, connect=min(self.timeout, 1.0)))
                if written not in self._pools:
                    self._pools[written] = ThreadPoolExecutor(
                        min(MAX_SENDERS, max(1, len(self._targets))),
                        thread_name_prefix="hotswap-written-notice" if written else "hotswap-notice",
                    )
                pool, http = self._pools[written], self._http
            return [pool.submit(self._send, http, url, headers, body) for url, headers in targets]
        except Exception as exc:  # noqa: BLE001 - a notice is best effort: never raised into training
            logger.warning("hot-swap: notices for %s not sent (%s: %s)", body["adapter"], type(exc).__name__, exc)
            return []

    def _send(self, http: httpx.Client, url: str, headers: dict[str, str], body: dict[str, Any]) -> bool:
        try:
            response = http.post(url + NOTIFY_PATH, json=body, headers=headers)
            status = response.status_code
            problem = None if status < 400 else f"answered {status}: {response.text[:200]}"
        except (httpx.HTTPError, RuntimeError) as exc:  # RuntimeError: the client was closed meanwhile
            status, problem = None, f"{type(exc).__name__}: {exc}"
        return self._outcome(url, body, problem, status)

    def _outcome(self, url: str, body: dict[str, Any], problem: str | None, status: int | None = None) -> bool:
        if problem is not None and "written" in body:  # only a head start: the commit's notice follows
            if status in (404, 422):  # an engine without reads ahead (an older plugin): not asked again
                with self._lock:
                    self._no_read_ahead.add(url)
            logger.debug("hot-swap: notice of %s's written weights to %s failed (%s)", body["adapter"], url, problem)
            return False
        with self._lock:
            first = problem is not None and url not in self._failing
            if problem is None:
                self._failing.discard(url)
            else:
                self._failing.add(url)
        if problem is not None:
            # Once per failing engine, then quietly until it answers again: it still gets
            # the version at its next poll.
            logger.log(
                logging.WARNING if first else logging.DEBUG,
                "hot-swap: notice of %s@%s to %s failed (%s); it will see the version at its next poll",
                body["adapter"],
                body["version"],
                url,
                problem,
            )
        return problem is None

    def close(self) -> None:
        with self._lock:
            pools, http, self._pools, self._http = list(self._pools.values()), self._http, {}, None
        for pool in pools:
            pool.shutdown(wait=True)
        if http is not None:
            http.close()


async def notify_async(
    http: httpx.AsyncClient,
    urls: Iterable[str],
    adapter: str,
    version: str | None,
    *,
    timeout: float = NOTICE_TIMEOUT_S,
) -> list[bool]:
    """The same notice from an asyncio publisher (the fleet scheduler), sent to all ``urls`` at
    once with ``http``'s headers; a failure is logged and reported as False, never raised."""

    async def send(url: str) -> bool:
        try:
            response = await http.post(url.rstrip("/") + NOTIFY_PATH, json=_body(adapter, version), timeout=timeout)
            if response.status_code < 400:
                return True
            problem = f"answered {response.status_code}: {response.text[:200]}"
        except httpx.HTTPError as exc:
            problem = f"{type(exc).__name__}: {exc}"
        logger.debug("hot-swap: notice of %s@%s to %s failed (%s)", adapter, version, url, problem)
        return False

    return list(await asyncio.gather(*(send(url) for url in urls)))
