"""Crash-safe file primitives: atomic writes, bounded JSON reads, contained paths.

Files are 0644 and directories 0755 whatever the writer's umask: every engine,
whichever user it runs as, can read a version (a trainer under umask 077 would
otherwise publish versions only it can read), and nothing the store writes is
group- or world-writable.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import stat
import uuid
from pathlib import Path
from typing import Any

from .errors import InvalidCheckpointError, UnsafePathError

FILE_MODE = 0o644
DIR_MODE = 0o755
MAX_JSON_BYTES = 1 << 20  # metadata, configs, records: 1 MiB is already generous
MAX_JSON_DEPTH = 32
_COPY_CHUNK = 8 << 20


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def make_dir(path: Path) -> None:
    """Create ``path`` (and missing parents) with mode 0755; existing is fine."""
    try:
        make_new_dir(path)
    except FileExistsError:
        return
    except FileNotFoundError:
        make_dir(path.parent)
        make_dir(path)


def make_new_dir(path: Path) -> None:
    """Create the directory ``path``, which must not exist, with mode 0755 whatever the umask."""
    os.mkdir(path, DIR_MODE)
    os.chmod(path, DIR_MODE)


def _create(path: Path) -> int:
    """A new file's descriptor, for writing, with mode 0644 whatever the umask."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, FILE_MODE)
    try:
        os.fchmod(fd, FILE_MODE)
    except BaseException:
        os.close(fd)
        raise
    return fd


def write_new_file(path: Path, *parts: Any, sync: bool = True) -> int:
    """Write ``parts`` (buffers: bytes, memoryviews, numpy arrays) back to back to a file that
    must not exist yet (0644), fsync it unless ``sync`` is false, and return its size."""
    fd = _create(path)
    try:
        size = write_parts(fd, *parts)
        if sync:
            os.fsync(fd)
    finally:
        os.close(fd)
    return size


def write_parts(fd: int, *parts: Any) -> int:
    """Write ``parts`` (buffers) back to back at ``fd``'s offset; returns how many bytes."""
    size = 0
    for part in parts:
        view = memoryview(part).cast("B")
        size += len(view)
        while view:
            view = view[os.write(fd, view) :]
    return size


def write_over_file(spare: Path, path: Path, *parts: Any, size: int) -> bool:
    """Write ``parts`` (``size`` bytes in all) over ``spare``, a regular file of exactly that
    size, then rename it to ``path`` (not synced): the bytes land in the pages the page cache
    holds for it. False, with nothing written, if ``spare`` is missing or not such a file."""
    try:
        fd = os.open(spare, os.O_WRONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode) or info.st_size != size or info.st_nlink != 1:
            return False
        write_parts(fd, *parts)
    finally:
        os.close(fd)
    os.rename(spare, path)
    return True


def atomic_write(path: Path, data: bytes, *, sync: bool = True) -> None:
    """Replace ``path`` with ``data`` so readers see the old or the new content, never a mix;
    durable (file and directory fsynced) unless ``sync`` is false."""
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:12]}")
    try:
        write_new_file(tmp, data, sync=sync)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if sync:
        fsync_dir(path.parent)


def copy_and_hash(src: Path, dst: Path) -> tuple[int, str]:
    """Copy ``src`` to the new file ``dst`` (fsynced); return its size and sha256."""
    digest = hashlib.sha256()
    size = 0
    fd = _create(dst)
    try:
        with open(src, "rb") as reader:
            while chunk := reader.read(_COPY_CHUNK):
                digest.update(chunk)
                size += len(chunk)
                view = memoryview(chunk)
                while view:
                    view = view[os.write(fd, view) :]
        os.fsync(fd)
    finally:
        os.close(fd)
    return size, digest.hexdigest()


def hash_file(path: Path) -> tuple[int, str]:
    digest = hashlib.sha256()
    size = 0
    with open(path, "rb") as reader:
        while chunk := reader.read(_COPY_CHUNK):
            digest.update(chunk)
            size += len(chunk)
    return size, digest.hexdigest()


def read_small_text(path: Path, limit: int = 4096) -> str | None:
    """Content of a small marker file, or None when it does not exist."""
    try:
        with open(path, "rb") as reader:
            data = reader.read(limit + 1)
    except FileNotFoundError:
        return None
    except NotADirectoryError:
        return None
    if len(data) > limit:
        raise InvalidCheckpointError(f"{path}: larger than {limit} bytes")
    return data.decode("utf-8", errors="replace").strip()


def _depth(value: Any, level: int = 0) -> int:
    if level > MAX_JSON_DEPTH:
        return level
    if isinstance(value, dict):
        return max((_depth(v, level + 1) for v in value.values()), default=level + 1)
    if isinstance(value, list):
        return max((_depth(v, level + 1) for v in value), default=level + 1)
    return level


def parse_json_bounded(data: bytes, where: str, *, max_bytes: int = MAX_JSON_BYTES) -> Any:
    """Parse JSON that came from outside: bounded in size and nesting."""
    if len(data) > max_bytes:
        raise InvalidCheckpointError(f"{where}: {len(data)} bytes, over the {max_bytes}-byte limit")
    try:
        value = json.loads(data)
    except RecursionError:
        raise InvalidCheckpointError(f"{where}: JSON nested too deeply") from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise InvalidCheckpointError(f"{where}: not valid JSON ({exc})") from None
    if _depth(value) > MAX_JSON_DEPTH:
        raise InvalidCheckpointError(f"{where}: JSON nested deeper than {MAX_JSON_DEPTH} levels")
    return value


def read_json_bounded(path: Path, *, max_bytes: int = MAX_JSON_BYTES) -> Any:
    with open(path, "rb") as reader:
        data = reader.read(max_bytes + 1)
    return parse_json_bounded(data, str(path), max_bytes=max_bytes)


def ensure_inside(root: Path, path: Path) -> Path:
    """Return ``path`` if it resolves (symlinks followed) inside ``root``, else raise."""
    real_root = os.path.realpath(root)
    real = os.path.realpath(path)
    if real != real_root and not real.startswith(real_root + os.sep):
        raise UnsafePathError(f"{path} resolves to {real}, outside the store root {real_root}")
    return path


def is_missing_error(exc: OSError) -> bool:
    return exc.errno in (errno.ENOENT, errno.ENOTDIR)
