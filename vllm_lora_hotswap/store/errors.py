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


class PartialPublishError(StoreError):
    """``publish_many``: some adapters were published, others not. ``published`` maps each
    published adapter to its new version, ``errors`` each other adapter to its error."""

    def __init__(self, published: dict[str, str], errors: dict[str, BaseException]):
        self.published, self.errors = published, errors
        done = ", ".join(f"{adapter}@{version}" for adapter, version in published.items()) or "none"
        failed = "; ".join(f"{adapter}: {type(error).__name__}: {error}" for adapter, error in errors.items())
        super().__init__(
            f"published {len(published)} of {len(published) + len(errors)} adapters ({done}); not published: {failed}"
        )
