"""Errors of the checkpoint store. Each message names the thing and the reason."""


class StoreError(Exception):
    """Base class: something in the store cannot be done as asked."""


class InvalidNameError(StoreError, ValueError):
    """An adapter, version or instance name is not allowed."""


class UnsafePathError(StoreError):
    """A path would resolve outside the store root (symlink or traversal)."""


class InvalidCheckpointError(StoreError, ValueError):
    """An adapter checkpoint (config, weights, READY, metadata) fails validation."""


class UnreadableError(StoreError):
    """A file exists but cannot be read here (permissions, an I/O error): a fault of
    this reader, not of the checkpoint, so no engine records the version as failed."""


class NotFoundError(StoreError, LookupError):
    """An adapter or version does not exist (or is not READY)."""
