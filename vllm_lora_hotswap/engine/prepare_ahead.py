"""Adapters built, and written into a free LoRA slot, from the bytes read ahead of their commit.

Why: with the weight file read ahead (:mod:`.read_ahead`), staging on an RL step's
critical path still had vLLM's loader build the adapter, the NaN/inf and shape
checks, the q/k/v packing and scaling, and the copy into a LoRA slot: most of its
time, and all of it depends only on the two files the publisher has written by
the time it sends its written notice. How: once the bytes read ahead hash to the
announced sha256, the read-ahead thread reads the staging directory's
``adapter_config.json`` (hashing it), hands vLLM's own loader a copy of that config
in a private directory and the weights from memory
(:func:`.single_read.served_from_memory`), runs the stage's checks and packing, and
writes the adapter into a *free* slot: never one it would take from an adapter
in use, for a version that may never be committed.

Trust: staging adopts the result only when the committed ``READY`` records the
sha256 of both files it was built from (:class:`.single_read.SingleRead`), and
vLLM's loader reads no other file of an adapter directory. Adopting gives it its
id (vLLM's ``LoRAModel.clone``), and the install flips the slot as after any
stage. Anything else (another config committed, a failure here, a commit that
never comes, vLLM's LRU taking the slot for a step) costs what staging cost
before: the slot is released and staging builds from the committed files.
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vllm.lora.request import LoRARequest

from ..store.checkpoint import CONFIG_FILE, SAFETENSORS_FILE
from .device_slots import DeviceSlotReservation, SlotWriter
from .read_ahead import read_regular_file
from .single_read import served_from_memory

logger = logging.getLogger("vllm.lora_hotswap")
MAX_CONFIG_BYTES = 1 << 20  # an adapter_config.json larger than this is not built ahead
_PLACEHOLDER_ID = 1  # vLLM's loader wants an id > 0; adopting gives the real one


@dataclass
class PreparedAdapter:
    """An adapter built from a read ahead, maybe written into a slot, waiting for its commit."""

    config_sha256: str  # of the adapter_config.json it was built with
    lora: Any  # vllm LoRAModel (placeholder id), merged and scaled, as a stage leaves it
    nbytes: int
    slot: DeviceSlotReservation | None  # the free slot it was written into (None: none was free)
    release: Callable[[DeviceSlotReservation], None]
    seconds: float  # how long building it (and the slot write) took, off the critical path

    def adopt(self, lora_id: int) -> Any:
        """The adapter under ``lora_id`` (same tensors); the slot goes with it (:meth:`take_slot`)."""
        return self.lora.clone(lora_id)

    def take_slot(self) -> DeviceSlotReservation | None:
        slot, self.slot = self.slot, None
        return slot

    def discard(self) -> None:
        """It will not be adopted: its slot is free again."""
        slot = self.take_slot()
        if slot is not None:
            self.release(slot)


class AdapterPreparer:
    """A worker's ``prepare`` hook for its reads ahead: given what it uses of the worker, the
    loader (vLLM's ``_load_adapter``), the stage's checks and packing (returning the bytes the
    adapter holds) and the slot writer."""

    def __init__(self, load: Callable[[LoRARequest], Any], check: Callable[[Any], int], slots: SlotWriter):
        self._load = load
        self._check = check
        self._slots = slots
        self.built = 0  # adapters built ahead
        self.failed = 0  # reads ahead it could not build from (staging then builds, and says why)

    def __call__(self, weights_path: str, directory: int, data: bytearray) -> PreparedAdapter | bytearray | None:
        """Build from ``data``, the bytes of ``weights_path``, with the config in ``directory``
        (an open descriptor of the staging directory, which the commit may have renamed since).
        ``data`` itself when no build could start (no config yet: staging still takes the bytes);
        None when the build failed, since vLLM's loader may have scaled them in place."""
        start = time.perf_counter()
        try:
            config = _read_config(directory)
        except OSError as exc:
            config = None
            logger.debug("hot-swap: no config to build %s ahead of its commit (%s)", weights_path, exc)
        if config is None:
            self.failed += 1
            return data
        try:
            with tempfile.TemporaryDirectory(prefix="lora-hotswap-ahead-") as private:
                # The config as hashed (the staging file could change after); an empty stand-in
                # for the weights that vLLM's loader checks exists, then reads from ``data``.
                Path(private, CONFIG_FILE).write_bytes(config)
                weights = Path(private, SAFETENSORS_FILE)
                weights.touch()
                with served_from_memory(weights, data):
                    lora = self._load(LoRARequest("hotswap-read-ahead", _PLACEHOLDER_ID, private))
            nbytes = self._check(lora)
        except Exception as exc:  # noqa: BLE001 - staging builds it again from the commit, and reports
            self.failed += 1
            logger.debug("hot-swap: building %s ahead of its commit failed (%s)", weights_path, exc)
            return None
        slot = self._slots.reserve(ahead=True)
        try:
            if slot is not None and not self._slots.write(slot, lora):
                slot = None  # vLLM needed the slot meanwhile
        except Exception as exc:  # noqa: BLE001 - staging writes it again, and reports
            logger.debug("hot-swap: writing %s into a slot ahead of its commit failed (%s)", weights_path, exc)
            self._slots.release(slot)
            slot = None
        self.built += 1
        seconds = time.perf_counter() - start
        return PreparedAdapter(hashlib.sha256(config).hexdigest(), lora, nbytes, slot, self._slots.release, seconds)


def _read_config(directory: int) -> bytes | None:
    try:
        size = os.stat(CONFIG_FILE, dir_fd=directory, follow_symlinks=False).st_size
    except FileNotFoundError:
        return None
    if size > MAX_CONFIG_BYTES:
        return None
    data = read_regular_file(CONFIG_FILE, size, dir_fd=directory)
    return None if data is None else bytes(data)
