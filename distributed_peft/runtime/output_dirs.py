"""Where a command may write, and one run per directory.

A command writes only into a directory that is absent, empty, or one this project made (it holds our marker file,
or only what our commands write, from before the marker existed). A directory holding anything else (a checkout, a
home directory, a user's files) is refused in one line before anything is written. A run holds an exclusive lock on
its directory (`flock`, released by the OS when the process dies, even by kill -9); a second run into it stops at
once, naming the holder's PID. A failed run removes only what it created.

Where a command writes when the user names no directory: runs/<name> (`run_dir`); under a Hydra multirun each job's
own directory in the sweep's (`default_output_dir`); a dpeft-eval report in a new runs/eval-<task>-<time>
(`new_report_dir`).
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import re
import shutil
import socket
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from distributed_peft.constants import METRICS_FILE
from distributed_peft.errors import StorageError
from distributed_peft.runtime.atomic_files import TMP_PREFIX

RUNS_DIR = Path("runs")  # every default output directory lies in it, relative to the working directory

OWNER_MARKER = ".dpeft-owner.json"
LOCK_FILE = ".dpeft.lock"
# Names our commands write into a directory (train, eval, launch, merge, reproduce, explore screenshots...): a
# directory from before the marker existed, holding only these and a config.yaml or adapter/, is one of ours.
OUR_ENTRIES = {
    OWNER_MARKER,
    LOCK_FILE,
    "adapter",
    "checkpoints",
    "config.yaml",
    "split.json",
    METRICS_FILE,
    "eval.json",
    "eval.md",
    "loss.png",
    "eval_metrics.png",
    "README.md",
    "launch",
    "tensorboard",
    "wandb",
    "reproduce.md",
    "multirun.yaml",
    "bench.json",
    "bench.md",
    "bench_scaling.json",
    "bench_scaling.md",
}
_LEGACY_SIGNS = {"config.yaml", "adapter", "checkpoints", "bench.json", "bench_scaling.json"}


def run_dir(name: str) -> str:
    """runs/<name>: the directory a command writes into when the user names none."""
    return f"{RUNS_DIR}/{name}"


def default_output_dir(name: str) -> str:
    """runs/<name>; in a Hydra multirun (-m) each job's own directory under the sweep's, so no two jobs share one."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN:
        sweep = HydraConfig.get().sweep
        return str(Path(sweep.dir) / str(sweep.subdir))
    return run_dir(name)


def new_report_dir(task_name: str, root: Path = RUNS_DIR) -> Path:
    """runs/eval-<task>-<YYYYmmdd-HHMMSS>, with -2, -3... when that exists already."""
    stem = f"eval-{re.sub(r'[^A-Za-z0-9._-]+', '-', task_name)}-{time.strftime('%Y%m%d-%H%M%S')}"
    path, n = root / stem, 2
    while path.exists():
        path, n = root / f"{stem}-{n}", n + 1
    return path


def foreign_entries(directory: Path) -> list[str]:
    """Entries of an existing directory that this project did not write (empty when it is ours or empty)."""
    names = sorted(p.name for p in directory.iterdir() if p.name != LOCK_FILE and not p.name.startswith(TMP_PREFIX))
    if not names or (directory / OWNER_MARKER).is_file():
        return []
    if set(names) & _LEGACY_SIGNS:  # an earlier run of ours, from before the marker
        return [n for n in names if n not in OUR_ENTRIES and not n.startswith(TMP_PREFIX)]
    return names


def check_output_dir(path: str | Path, key: str = "output_dir") -> None:
    """Raise StorageError (one line) unless `path` is absent, empty or ours; writes nothing."""
    path = Path(path)
    if not path.exists():
        return
    if not path.is_dir():
        raise StorageError(f"{key}={str(path)!r} is a file; allowed: a new or empty directory, or one of our runs")
    foreign = foreign_entries(path)
    if foreign:
        shown = ", ".join(foreign[:4]) + (f" and {len(foreign) - 4} more" if len(foreign) > 4 else "")
        raise StorageError(
            f"{key}={str(path)!r} holds files distributed-peft did not write ({shown}); nothing was touched; "
            "allowed: a new or empty directory, or one made by a distributed-peft command"
        )


@dataclass
class ClaimedDir:
    """A directory a command may write into; `release()` removes what this command created there."""

    path: Path
    created: Path | None  # the topmost directory this command created (path itself or a parent), None if none
    existed_before: set[str] = field(default_factory=set)
    lock: DirectoryLock | None = None

    def unlock(self) -> None:
        if self.lock is not None:
            self.lock.release()
            self.lock = None

    def release(self) -> None:
        """Undo the claim after a failure: the directory if it was ours to create, else only what appeared in it."""
        self.unlock()
        if not self.path.is_dir():
            return
        if self.created is not None:
            shutil.rmtree(self.created, ignore_errors=True)
            return
        for entry in self.path.iterdir():
            if entry.name not in self.existed_before:
                shutil.rmtree(entry, ignore_errors=True) if entry.is_dir() else entry.unlink(missing_ok=True)


def claim_output_dir(
    path: str | Path, key: str = "output_dir", command: str | None = None, lock: bool = False
) -> ClaimedDir:
    """Check `path` (see check_output_dir), create it if absent, lock it if asked, and mark it as ours.

    Raises StorageError; when the lock is held by another run nothing is written or removed.
    """
    path = Path(path)
    check_output_dir(path, key)
    created = None
    for candidate in (path.absolute(), *path.absolute().parents):
        if candidate.exists():
            break
        created = candidate
    existed_before = {p.name for p in path.iterdir()} if created is None else set()
    try:
        path.mkdir(parents=True, exist_ok=True)
        held = DirectoryLock(path, key).acquire() if lock else None
        marker = path / OWNER_MARKER
        if not marker.is_file():
            record = {"created_by": "distributed-peft", "command": command or " ".join(sys.argv), "time": time.time()}
            marker.write_text(json.dumps(record, indent=2) + "\n")
    except OSError as exc:
        reason = "the disk is full" if exc.errno in (errno.ENOSPC, errno.EDQUOT) else exc.strerror or str(exc)
        raise StorageError(f"{key}={str(path)!r} cannot be written: {reason}") from exc
    return ClaimedDir(path, created, existed_before, held)


def _in_use(directory: Path, key: str, holder: str) -> StorageError:
    return StorageError(
        f"{key}={str(directory)!r} is in use by another run ({holder or 'PID unknown'}); "
        "wait for it to finish, stop it, or choose another output_dir"
    )


def check_not_locked(directory: str | Path, key: str = "output_dir") -> None:
    """Refuse a directory whose lock another run holds, naming the holder; takes no lock that outlives the check."""
    try:
        fd = os.open(Path(directory) / LOCK_FILE, os.O_RDONLY)
    except OSError:  # no lock file: no run has held it
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)  # conflicts only with a holder's exclusive lock
    except OSError as exc:
        raise _in_use(Path(directory), key, os.pread(fd, 4096, 0).decode(errors="replace").strip()) from exc
    finally:
        os.close(fd)  # releases the probe's shared lock


def claim_on_main_process(accelerator, path: str | Path, command: str | None = None) -> ClaimedDir | None:
    """Rank 0 checks, creates, locks and marks `path` (see claim_output_dir); every rank learns the outcome and, on a
    refusal, raises: rank 0 with the reason, the others silently. Returns rank 0's claim, None elsewhere."""
    from distributed_peft.runtime.atomic_files import check_writable
    from distributed_peft.runtime.distributed import global_sum

    claim = error = None
    if accelerator.is_main_process:
        try:
            check_writable(path)
            claim = claim_output_dir(path, command=command, lock=True)  # another run's lock: nothing touched
        except StorageError as exc:
            error = exc
    if global_sum(accelerator, error is not None) > 0:
        raise error or StorageError([])  # rank 0 alone says why; the other ranks stop without a word
    return claim


class DirectoryLock:
    """An exclusive, non-blocking `flock` on <directory>/.dpeft.lock, held until release() or process death."""

    def __init__(self, directory: str | Path, key: str = "output_dir"):
        self.directory, self.key = Path(directory), key
        self.path = self.directory / LOCK_FILE
        self._fd: int | None = None

    def acquire(self) -> DirectoryLock:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            holder = ""
            try:
                holder = os.pread(fd, 4096, 0).decode(errors="replace").strip()
            finally:
                os.close(fd)
            if exc.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                raise StorageError(f"{self.key}={str(self.directory)!r} cannot be locked: {exc.strerror}") from exc
            raise _in_use(self.directory, self.key, holder) from exc
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"PID {os.getpid()} on {socket.gethostname()}\n".encode(), 0)
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> DirectoryLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
