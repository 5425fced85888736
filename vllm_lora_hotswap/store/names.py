"""Names in the store: adapters, versions and instances.

Version names are UTC timestamps in the scheduler API's form ``YYYY-MM-DDTHH-MM-SSZ``. A
publish that lands in the same second as the newest version (or after the clock
went backwards) continues that second with a zero-padded sequence suffix,
``...Z-0001``, so that sorting by name is publication order, always.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime

from .errors import InvalidNameError

# ASCII only: no separators, no look-alike code points, no leading dot, no '@'
# (the engine routes ``adapter@version``).
_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")
_INSTANCE_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:-]{0,127}")
_TIMESTAMP_FORMAT = "%Y-%m-%dT%H-%M-%SZ"
_VERSION_RE = re.compile(r"(\d{4}-\d{2}-\d{2}T\d{2}-\d{2}-\d{2}Z)(?:-(\d{4}))?")
MAX_SEQUENCE = 9999


def check_adapter_name(name: object) -> str:
    """Return ``name`` if it is a safe adapter name, else raise :class:`InvalidNameError`."""
    if not isinstance(name, str) or not _NAME_RE.fullmatch(name) or ".." in name:
        raise InvalidNameError(
            f"invalid adapter name {name!r}: use 1-128 ASCII letters, digits, '.', '_' or '-', "
            "starting with a letter or digit, without '..'"
        )
    return name


def check_instance_id(name: object) -> str:
    if not isinstance(name, str) or not _INSTANCE_RE.fullmatch(name) or ".." in name:
        raise InvalidNameError(
            f"invalid instance id {name!r}: use 1-128 ASCII letters, digits, '.', '_', ':' or '-', "
            "starting with a letter or digit"
        )
    return name


def is_version_name(name: str) -> bool:
    return _VERSION_RE.fullmatch(name) is not None


def check_version_name(name: object) -> str:
    if not isinstance(name, str) or not is_version_name(name):
        raise InvalidNameError(
            f"invalid version {name!r}: versions are UTC timestamps like 2025-08-18T10-00-00Z "
            "(optionally with a -NNNN sequence suffix)"
        )
    return name


def timestamp_name(moment: datetime) -> str:
    return moment.astimezone(UTC).strftime(_TIMESTAMP_FORMAT)


def next_version(now: datetime, newest: str | None) -> str:
    """The name for a version published at ``now`` after the newest existing one.

    The result is always greater than ``newest``: the plain timestamp when time
    has moved past ``newest``'s second, else ``newest``'s second with the next
    sequence number.
    """
    candidate = timestamp_name(now)
    if newest is None or candidate > newest:
        return candidate
    match = _VERSION_RE.fullmatch(newest)
    if match is None:
        raise InvalidNameError(f"cannot order a version after {newest!r}: not a version name")
    sequence = int(match.group(2) or 0) + 1
    if sequence > MAX_SEQUENCE:
        raise InvalidNameError(
            f"more than {MAX_SEQUENCE} versions in the second {match.group(1)}; slow the publisher down"
        )
    return f"{match.group(1)}-{sequence:04d}"


def version_time(version: str) -> datetime:
    """The UTC second a version name stands for (its sequence suffix ignored)."""
    match = _VERSION_RE.fullmatch(check_version_name(version))
    assert match is not None
    return datetime.strptime(match.group(1), _TIMESTAMP_FORMAT).replace(tzinfo=UTC)


def split_served_name(model: str) -> tuple[str, str | None]:
    """Split a request's ``model`` field into ``(adapter, version or None)``.

    ``lora1`` follows the active version; ``lora1@2025-08-18T10-00-00Z`` pins one.
    """
    adapter, sep, version = model.partition("@")
    return adapter, (version if sep else None)
