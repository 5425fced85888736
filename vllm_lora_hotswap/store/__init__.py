"""The versioned checkpoint store (the on-disk protocol; no vLLM import)."""

from .checkpoint import AdapterConfig, ReadyManifest, validate_checkpoint_dir
from .errors import (
    InvalidCheckpointError,
    InvalidNameError,
    NotFoundError,
    PartialPublishError,
    StoreError,
    UnreadableError,
    UnsafePathError,
)
from .names import check_adapter_name, next_version, split_served_name
from .records import AdapterServing, FailureRecord, InstanceRecord, SwapRecord
from .safetensors_layout import TensorBytes
from .store import CheckpointStore, GcReport, StoreUnavailableError, VersionEntry, VersionInfo

__all__ = [
    "AdapterConfig",
    "AdapterServing",
    "CheckpointStore",
    "FailureRecord",
    "GcReport",
    "InstanceRecord",
    "InvalidCheckpointError",
    "InvalidNameError",
    "NotFoundError",
    "PartialPublishError",
    "ReadyManifest",
    "StoreError",
    "StoreUnavailableError",
    "SwapRecord",
    "TensorBytes",
    "UnreadableError",
    "UnsafePathError",
    "VersionEntry",
    "VersionInfo",
    "check_adapter_name",
    "next_version",
    "split_served_name",
    "validate_checkpoint_dir",
]
