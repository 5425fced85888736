"""A TRL/transformers callback that publishes the LoRA being trained into a checkpoint store.

Engines running the ``vllm_lora_hotswap`` plugin follow the store, so each
publication reaches every engine within its poll interval. This module needs
the store only (no vLLM): a trainer process never imports an inference engine.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import threading
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal, Protocol

from accelerate.utils import extract_model_from_parallel
from peft import PeftModel
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from vllm_lora_hotswap.notify import CommitNotifier
from vllm_lora_hotswap.store import CheckpointStore, check_adapter_name
from vllm_lora_hotswap.store.checkpoint import CONFIG_FILE
from vllm_lora_hotswap.store.publish import RESERVED_METADATA
from vllm_lora_hotswap.store.staged import StagedVersion

from .adapter_files import save_adapter
from .sharding import FSDP, current_accelerator_state, gathered_adapter, sharded_training

logger = logging.getLogger(__name__)

# Keys this callback writes into every version's metadata.json.
CALLBACK_METADATA = frozenset(
    {
        "metric",
        "value",
        "reward",
        "metric_step",
        "reasons",
        "global_step",
        "epoch",
        "base_model",
        "peft_config",
        "published_at",
    }
)
_REWARD_METRIC = re.compile(r"(eval_)?(reward|rewards/.+/mean)")


class WeightSyncClient(Protocol):
    """Pushes full model weights to inference engines (full fine-tuning, no adapter to publish)."""

    def update_model_weights(self, model: Any) -> None: ...


@dataclass
class Publication:
    """One publication, as the training process saw it.

    ``blocked_seconds`` is the time the training step waited (gathering the
    adapter and saving it straight into the store's staging directory); the
    checks, hashing, fsyncs and commit run in the background and take
    ``commit_seconds``, after which ``version`` (or ``error``) is set. With a
    ``weight_sync`` client ``version`` stays None.
    """

    step: int
    value: float | None
    reasons: tuple[str, ...]
    blocked_seconds: float = 0.0
    version: str | None = None
    commit_seconds: float | None = None
    error: str | None = None


def _finite(value: object) -> float | None:
    """The logged value as a float, or None for a missing, NaN, infinite or non-numeric one."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value) if math.isfinite(value) else None


class HotSwapCallback(TrainerCallback):
    r"""
    A [`~transformers.TrainerCallback`] that publishes the LoRA adapter being trained into a `vllm_lora_hotswap`
    checkpoint store whenever the watched metric improves (and/or on a schedule), so that every vLLM engine
    following the store serves it within seconds.

    At each publication the adapter is saved straight into the store's staging directory for a new version (the only
    part the training step waits for, recorded in `publications[i].blocked_seconds`; the bytes are written once, with
    no temporary copy); a single background thread then checks, hashes and fsyncs the files and commits the version
    atomically, in publication order, and has the store make the next version's staging directory ahead
    (`CheckpointStore.prepare_next`: the next save writes into pages the page cache holds). Background errors are
    logged, kept in `errors` and never raised into training; `on_train_end` waits for pending publications.

    Only the main process writes. Under DeepSpeed ZeRO-3 every rank gathers the adapter's parameters before the main
    process saves them (the gathering is not exercised by this project's tests, which run on one CPU process). FSDP
    is refused at `on_train_begin`. For full fine-tuning (no PEFT model), pass `weight_sync`: an object with
    `update_model_weights(model)` that is called instead of publishing.

    Args:
        root (`str` or `os.PathLike`, *optional*):
            Root of the checkpoint store (a shared directory). Required unless only `weight_sync` is used.
        adapter (`str`, *optional*):
            Adapter name in the store (what clients request, e.g. `"lora1"`). Required with `root`.
        metric (`str`, *optional*, defaults to `"reward"`):
            Logged metric to watch, e.g. `"reward"`, `"rewards/<func>/mean"`, `"eval_reward"`.
        mode (`str`, *optional*, defaults to `"max"`):
            `"max"` if a larger value is better, `"min"` otherwise.
        min_delta (`float`, *optional*, defaults to `0.0`):
            How much the metric must beat the best value so far to count as an improvement.
        on_improvement (`bool`, *optional*, defaults to `True`):
            Publish when the metric improves.
        every_n_steps (`int`, *optional*):
            Also publish every `every_n_steps` optimizer steps, whatever the metric.
        publish_on_train_end (`bool`, *optional*, defaults to `False`):
            Publish the final weights when training ends (unless that step was already published).
        keep (`int`, *optional*):
            After each publication keep only the newest `keep` versions of `adapter` in the store (plus pinned,
            kept and served ones; see `CheckpointStore.gc`).
        metadata (`dict`, *optional*):
            Extra JSON-serialisable entries written into every version's `metadata.json`.
        weight_sync (*optional*):
            Client for full fine-tuning; see above.
        engines (`Sequence[str]`, *optional*):
            Base URLs of engines to notify after each commit (`POST /v1/lora/notify`), so that they read the store at
            once rather than at their next poll: what engines on other nodes of an NFS/CPFS store need (no
            file-system event crosses nodes). They are also told as soon as the weight file is written and
            hashed, before the commit, and read it meanwhile (used only if the committed `READY` has the same
            sha256). Best effort, off the training thread. `FleetRollout` adds its URLs.
        api_key (`str`, *optional*):
            The `engines`' `--api-key`.
        durable (`bool`, *optional*, defaults to `True`):
            Fsync every version before and after it becomes visible, so that it survives a power loss. `False`
            skips every fsync, for versions published at every RL step (TRL's own adapter path does not sync
            either): a killed trainer still never leaves a torn or half-visible version, but an OS crash or power
            loss may lose the last versions, or leave one whose files are short, which every engine refuses
            (its `READY` sha256 does not match) while serving the version before it.

    Example:

    ```python
    >>> from peft import LoraConfig
    >>> from trl import GRPOConfig, GRPOTrainer
    >>> from trl_callbacks import HotSwapCallback

    >>> trainer = GRPOTrainer(
    ...     model="Qwen/Qwen2.5-0.5B-Instruct",
    ...     reward_funcs=reward_len,
    ...     args=GRPOConfig(output_dir="out", logging_steps=1),
    ...     train_dataset=dataset,
    ...     peft_config=LoraConfig(r=16, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"),
    ...     callbacks=[HotSwapCallback(root="/cpfs/lora_ckpts", adapter="lora1", metric="reward", mode="max")],
    ... )
    >>> trainer.train()
    ```
    """

    def __init__(
        self,
        root: str | os.PathLike[str] | None = None,
        adapter: str | None = None,
        *,
        metric: str = "reward",
        mode: Literal["max", "min"] = "max",
        min_delta: float = 0.0,
        on_improvement: bool = True,
        every_n_steps: int | None = None,
        publish_on_train_end: bool = False,
        keep: int | None = None,
        metadata: Mapping[str, Any] | None = None,
        weight_sync: WeightSyncClient | None = None,
        engines: Sequence[str] | None = None,
        api_key: str | None = None,
        durable: bool = True,
    ):
        if weight_sync is not None and not callable(getattr(weight_sync, "update_model_weights", None)):
            raise ValueError(f"weight_sync must have an update_model_weights(model) method, got {weight_sync!r}")
        if (root is None) != (adapter is None):
            raise ValueError(f"root and adapter go together, got root={root!r}, adapter={adapter!r}")
        if root is None and weight_sync is None:
            raise ValueError("root and adapter are required (or weight_sync for full fine-tuning)")
        if adapter is not None:
            check_adapter_name(adapter)
        if not isinstance(metric, str) or not metric:
            raise ValueError(f"metric must be a non-empty metric name, got {metric!r}")
        if mode not in ("max", "min"):
            raise ValueError(f"mode must be 'max' or 'min', got {mode!r}")
        if isinstance(min_delta, bool) or not isinstance(min_delta, int | float) or not 0 <= min_delta < math.inf:
            raise ValueError(f"min_delta must be a finite number >= 0, got {min_delta!r}")
        flags = (
            ("on_improvement", on_improvement),
            ("publish_on_train_end", publish_on_train_end),
            ("durable", durable),
        )
        for name, flag in flags:
            if not isinstance(flag, bool):
                raise ValueError(f"{name} must be True or False, got {flag!r}")
        for name, count in (("every_n_steps", every_n_steps), ("keep", keep)):
            if count is not None and (isinstance(count, bool) or not isinstance(count, int) or count < 1):
                raise ValueError(f"{name} must be a positive integer or None, got {count!r}")
        if not on_improvement and every_n_steps is None and not publish_on_train_end:
            raise ValueError(
                "on_improvement=False with neither every_n_steps nor publish_on_train_end: nothing would be published"
            )
        self.store = CheckpointStore(root) if root is not None else None
        self.adapter = adapter
        self.metric = metric
        self.mode = mode
        self.min_delta = float(min_delta)
        self.on_improvement = on_improvement
        self.every_n_steps = every_n_steps
        self.publish_on_train_end = publish_on_train_end
        self.keep = keep
        self.durable = durable
        self.metadata = _check_static_metadata(metadata)
        self.weight_sync = weight_sync
        self.publications: list[Publication] = []
        self.errors: list[Exception] = []
        self.best: float | None = None
        self._last_value: tuple[float, int] | None = None  # (value, step it was logged at)
        self._last_published_step: int | None = None
        self._schedule_due = False
        self._metric_checked = False
        self._sharding: str | None = None
        self._executor: ThreadPoolExecutor | None = None
        self._pending: list[Future[None]] = []
        self.notifier = CommitNotifier(engines or (), api_key=api_key)
        self._committed = threading.Condition()  # notified when a publication is committed or failed
        # Who has the next version's spare staging directory made, and when: the callback right
        # after each commit, or (True: make_spares_when_asked) the caller of prepare_spare.
        self._spares_when_asked = False
        self._spare_size: int | None = None  # the last weight file's size, for the next spare

    # -- decisions ---------------------------------------------------------------------
    def improves(self, value: float) -> bool:
        """Whether ``value`` beats the best value so far by more than ``min_delta``."""
        if self.best is None:
            return True
        if self.mode == "max":
            return value > self.best + self.min_delta
        return value < self.best - self.min_delta

    def _check_metric_logged(self, logs: Mapping[str, Any]) -> None:
        """Fail on the first log of the metric's kind (training or ``eval_``) that lacks it.

        Training step logs carry ``loss`` and evaluation logs ``eval_*`` keys;
        other logs (the end-of-training summary) say nothing about the metric.
        """
        if self._metric_checked:
            return
        if self.metric.startswith("eval_"):
            relevant = any(key.startswith("eval_") for key in logs)
        else:
            relevant = "loss" in logs
        if not relevant:
            return
        if self.metric not in logs:
            available = ", ".join(sorted(key for key in logs if key != "epoch"))
            raise ValueError(
                f"HotSwapCallback: metric {self.metric!r} is not in the trainer's logs; logged: {available}"
            )
        self._metric_checked = True

    # -- trainer events ----------------------------------------------------------------
    def on_train_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        model = extract_model_from_parallel(kwargs["model"])
        self.check_setup(model, sharded_training(current_accelerator_state()))
        if self._is_peft(model) and state.is_world_process_zero:
            assert self.store is not None  # check_setup
            # Fail now on an unmounted or read-only store, not in the background at the first publish.
            self.store.root.mkdir(parents=True, exist_ok=True)
            if not os.access(self.store.root, os.W_OK):
                raise ValueError(f"HotSwapCallback: store root {self.store.root} is not writable")

    def check_setup(self, model: Any, sharding: str | None) -> None:
        """Refuse what the callback cannot publish; ``sharding`` as :func:`sharded_training` returns it."""
        if sharding == FSDP:
            raise ValueError(
                "HotSwapCallback does not support FSDP: the callback receives the unwrapped model and cannot gather "
                "its full state dict. Use DeepSpeed (ZeRO-2 or ZeRO-3) or DDP, or publish saved checkpoints with "
                "`lora-hotswap publish`."
            )
        if not self._is_peft(model):
            if self.weight_sync is None:
                raise ValueError(
                    f"HotSwapCallback needs a PEFT LoRA model (pass peft_config=LoraConfig(...) to the trainer) or a "
                    f"weight_sync client for full fine-tuning; got a {type(model).__name__}"
                )
            if sharding is not None:
                raise ValueError(
                    f"HotSwapCallback: weight_sync with {sharding} is not supported (the client would receive "
                    "partitioned parameters)"
                )
        else:
            peft_type = model.peft_config[model.active_adapter].peft_type
            if peft_type != "LORA":  # PeftType is a str enum
                raise ValueError(f"HotSwapCallback publishes LoRA adapters; the model's adapter is {peft_type.value}")
            if self.store is None:
                raise ValueError("HotSwapCallback: root and adapter are needed to publish a PEFT model")
        self._sharding = sharding

    def on_step_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        if self.every_n_steps is None or state.global_step % self.every_n_steps:
            return
        if control.should_log:
            # This step's log comes right after: publish once there, with its value.
            self._schedule_due = True
        else:
            self._publish(state, kwargs["model"], ("schedule",))

    def on_log(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        logs: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        if not logs:
            return
        self._check_metric_logged(logs)
        reasons: list[str] = []
        value = _finite(logs.get(self.metric))
        if value is not None:
            self._last_value = (value, state.global_step)
            if self.improves(value):
                self.best = value
                if self.on_improvement:
                    reasons.append("improvement")
        if self._schedule_due:
            self._schedule_due = False
            reasons.append("schedule")
        if reasons:
            self._publish(state, kwargs["model"], tuple(reasons))

    def on_train_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        if self.publish_on_train_end:
            self._publish(state, kwargs["model"], ("train_end",))
        self.flush()
        if self.errors:
            logger.error(
                "HotSwapCallback: %d publication(s) failed; the first: %s (see callback.errors)",
                len(self.errors),
                self.errors[0],
            )

    # -- publishing --------------------------------------------------------------------
    def publish(self, state: TrainerState, model: Any, reason: str = "manual") -> None:
        """Publish ``model``'s adapter now (``FleetRollout`` does so before its first rollout).

        Example: ``callback.publish(trainer.state, trainer.model, reason="rollout")``; like every
        publication it is appended to ``publications`` and committed in the background.
        """
        self._publish(state, model, (reason,))

    @staticmethod
    def _is_peft(model: Any) -> bool:
        return isinstance(model, PeftModel)

    def _publish(self, state: TrainerState, model: Any, reasons: tuple[str, ...]) -> None:
        # Every rank runs this (ZeRO-3 gathering is collective); only the main process writes.
        if state.global_step == self._last_published_step:
            return  # same weights as the version published at this step
        self._last_published_step = state.global_step
        started = time.perf_counter()
        model = extract_model_from_parallel(model)
        value = self._last_value[0] if self._last_value else None
        publication = Publication(step=state.global_step, value=value, reasons=reasons)
        if not self._is_peft(model):
            if state.is_world_process_zero:
                self._sync_weights(model, publication, started)
            return
        assert self.store is not None and self.adapter is not None  # check_setup
        staged: StagedVersion | None = None
        doing = "saving the adapter"
        try:
            with gathered_adapter(model, self._sharding):
                if not state.is_world_process_zero:
                    return
                doing = f"publishing {self.adapter} into {self.store.root}"
                staged = self.store.open_version(
                    self.adapter, durable=self.durable, on_written=self._notify_written
                )  # the engines read the weight file while its floats are checked and it commits
                doing = "saving the adapter"
                save_adapter(model, staged)
            metadata = self._metadata(state, reasons, staged.path)
        except Exception as exc:
            if staged is not None:
                staged.abort()
            self._record_error(publication, exc, doing)
            self.publications.append(publication)
            return
        publication.blocked_seconds = time.perf_counter() - started
        self.publications.append(publication)
        self._submit(publication, staged, metadata)

    def make_spares_when_asked(self) -> None:
        """From now on, make the next version's spare staging directory only when
        :meth:`prepare_spare` is called, not right after each commit. ``FleetRollout`` calls this
        and asks once a batch's samples are back: the spare is then written while the trainer
        computes, not while the engines swap in the version just committed and answer its first
        batch on the same cores.

        Example: ``hotswap.make_spares_when_asked()``, then ``hotswap.prepare_spare()`` from a
        custom rollout loop once its batch is back.
        """
        self._spares_when_asked = True

    def prepare_spare(self) -> bool:
        """Have the store make the next version's staging directory now, with a file the size of
        the last weight file saved (``CheckpointStore.prepare_next``): the next save writes into
        pages the page cache holds. The callback calls it after each commit; ``FleetRollout``
        instead when a batch's samples are back (see :meth:`make_spares_when_asked`). False when
        there is nothing to make (no weights saved yet) or one is ready or being made.

        Example: ``hotswap.prepare_spare()`` from a custom rollout loop, once its batch is back.
        """
        size = self._spare_size
        if size is None or self.store is None or self.adapter is None:
            return False
        return self.store.prepare_next(self.adapter, size)

    def _notify_written(self, staged: StagedVersion) -> None:
        assert self.adapter is not None  # check_setup
        self.notifier.notify_written(self.adapter, staged)

    def _sync_weights(self, model: Any, publication: Publication, started: float) -> None:
        assert self.weight_sync is not None  # check_setup
        try:
            self.weight_sync.update_model_weights(model)
        except Exception as exc:
            self._record_error(publication, exc, "weight_sync.update_model_weights")
        publication.blocked_seconds = time.perf_counter() - started
        self.publications.append(publication)

    def _metadata(self, state: TrainerState, reasons: tuple[str, ...], source: Path) -> dict[str, Any]:
        peft_config = json.loads((source / CONFIG_FILE).read_text())
        metadata: dict[str, Any] = {
            **self.metadata,
            "metric": self.metric,
            "reasons": list(reasons),
            "global_step": state.global_step,
            "epoch": state.epoch,
            "base_model": peft_config.get("base_model_name_or_path"),
            "peft_config": peft_config,
            "published_at": datetime.now(UTC).isoformat(),
        }
        if self._last_value is not None:
            value, step = self._last_value
            metadata.update(value=value, metric_step=step)
            if _REWARD_METRIC.fullmatch(self.metric):
                metadata["reward"] = value
        return metadata

    def _submit(self, publication: Publication, staged: StagedVersion, metadata: dict[str, Any]) -> None:
        if self._executor is None:
            # One worker: versions are committed in the order they were captured.
            self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="hotswap-publish")
        self._pending = [f for f in self._pending if not f.done()]
        self._pending.append(self._executor.submit(self._commit, publication, staged, metadata))

    def _commit(self, publication: Publication, staged: StagedVersion, metadata: dict[str, Any]) -> None:
        assert self.store is not None and self.adapter is not None  # check_setup
        started = time.perf_counter()
        try:
            publication.version = staged.commit(metadata)  # on failure the staging directory is gone
            self.notifier.notify(self.adapter, publication.version)  # returns at once; never raises
            if staged.weights_digest is not None:  # the next save writes into pages already cached
                self._spare_size = staged.weights_digest.size
                if not self._spares_when_asked:
                    self.prepare_spare()
            logger.info(
                "HotSwapCallback: published %s@%s (step %d, %s=%s, step blocked %.3fs)",
                self.adapter,
                publication.version,
                publication.step,
                self.metric,
                publication.value,
                publication.blocked_seconds,
            )
        except Exception as exc:
            self._record_error(publication, exc, f"publishing {self.adapter} into {self.store.root}")
        else:
            if self.keep is not None:
                try:  # the version is published: a failed clean-up is not the publication's failure
                    self.store.gc(keep=self.keep, adapters=[self.adapter])
                except Exception as exc:
                    self.errors.append(exc)
                    logger.error("HotSwapCallback: removing old versions of %s failed: %s", self.adapter, exc)
        finally:
            publication.commit_seconds = time.perf_counter() - started
            with self._committed:
                self._committed.notify_all()

    def _record_error(self, publication: Publication, exc: Exception, doing: str) -> None:
        publication.error = f"{doing}: {type(exc).__name__}: {exc}"
        self.errors.append(exc)
        logger.error("HotSwapCallback: step %d: %s", publication.step, publication.error, exc_info=exc)

    def wait_for_commit(self, publication: Publication, timeout: float | None = None) -> bool:
        """Wait until ``publication`` has a version or an error; False if ``timeout`` passed first."""
        with self._committed:
            return self._committed.wait_for(
                lambda: publication.version is not None or publication.error is not None, timeout
            )

    def flush(self, timeout: float | None = None) -> bool:
        """Wait for pending publications; True when none is left. Never raises their errors."""
        _, not_done = wait(self._pending, timeout=timeout)
        return not not_done


def _check_static_metadata(metadata: Mapping[str, Any] | None) -> dict[str, Any]:
    if metadata is None:
        return {}
    if not isinstance(metadata, Mapping):
        raise ValueError(f"metadata must be a dict, got {type(metadata).__name__}")
    clashes = sorted((RESERVED_METADATA | CALLBACK_METADATA) & set(metadata))
    if clashes:
        raise ValueError(f"metadata keys {clashes} are reserved (set by the store or by HotSwapCallback)")
    try:
        return json.loads(json.dumps(dict(metadata), allow_nan=False))
    except (TypeError, ValueError) as exc:
        raise ValueError(f"metadata must be JSON-serialisable: {exc}") from None
