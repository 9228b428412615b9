"""Atomic outputs: a file or directory appears whole under its final name, or not at all.

Everything is written under a temporary name in the same directory, flushed, then renamed (`os.replace` is atomic
on POSIX filesystems). A crash, a kill -9 or a full disk leaves at most a `.tmp-*` leftover, never a partial
adapter, report or checkpoint that looks valid. A failing write raises StorageError naming the path.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path

from distributed_peft.errors import StorageError

TMP_PREFIX = ".tmp-"


def _tmp_sibling(path: Path) -> Path:
    return path.with_name(f"{TMP_PREFIX}{path.name}-{uuid.uuid4().hex[:8]}{path.suffix}")


def storage_error(path: Path, exc: OSError) -> StorageError:
    """One line naming the path and the reason (disk full, permission, not a directory...)."""
    reason = "the disk is full" if exc.errno in (errno.ENOSPC, errno.EDQUOT) else exc.strerror or str(exc)
    return StorageError(f"cannot write {path}: {reason}; nothing partial was left under that name")


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary sibling path to write; it replaces `path` only when the block succeeds."""
    path = Path(path)
    tmp = _tmp_sibling(path)
    try:
        yield tmp
        os.replace(tmp, path)
    except OSError as exc:
        raise storage_error(path, exc) from exc
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write_text(path: str | Path, text: str) -> Path:
    path = Path(path)
    with atomic_path(path) as tmp, tmp.open("w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    return path


def atomic_savefig(fig, path: str | Path) -> Path:
    """matplotlib's savefig through a temporary file (the format comes from the suffix, which is kept)."""
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format=path.suffix.lstrip("."))
    return path


@contextlib.contextmanager
def atomic_directory(path: str | Path) -> Iterator[Path]:
    """Yield a temporary directory to fill; it takes `path`'s place (replacing an older one) when the block succeeds."""
    path = Path(path)
    tmp = _tmp_sibling(path)
    try:
        tmp.mkdir(parents=True)
        yield tmp
        old = None
        if path.exists():
            old = _tmp_sibling(path)
            os.replace(path, old)  # the old one steps aside; the new one is renamed in right after
        os.replace(tmp, path)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except OSError as exc:
        raise storage_error(path, exc) from exc
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def remove_leftovers(directory: str | Path) -> int:
    """Delete `.tmp-*` leftovers of an interrupted write in a directory; return how many there were."""
    directory = Path(directory)
    if not directory.is_dir():
        return 0
    leftovers = [p for p in directory.iterdir() if p.name.startswith(TMP_PREFIX)]
    for leftover in leftovers:
        shutil.rmtree(leftover, ignore_errors=True) if leftover.is_dir() else leftover.unlink(missing_ok=True)
    return len(leftovers)


def check_writable(directory: str | Path) -> None:
    """Raise StorageError (one line) unless `directory`, or the folder it will be created in, takes files.

    Writes nothing: the kernel's access check (a read-only filesystem, or permissions that bind this user).
    """
    directory = Path(directory).absolute()
    existing = directory
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        reason = f"{existing} is a file"
    elif not os.access(existing, os.W_OK | os.X_OK):
        reason = f"{existing} is read-only for this user"
    else:
        return
    raise StorageError(
        f"output_dir={str(directory)!r} is not writable: {reason}; allowed: a directory this user can write"
    )
