"""SIGTERM in every phase of every command: stop within seconds, one line, exit 75, nothing half-written.

SLURM's pre-emption, `scancel`, a spot instance's notice and `kill` send SIGTERM. While a command runs, the handler
installed by `handle_sigterm` raises `Preempted` at once (data loading, evaluation, generation, merging...), except
inside `deferred()` blocks: there (training steps, checkpoint and adapter saves) it only raises a flag that the code
checks at its next safe point (`requested()`), so every rank stops at the same step after a checkpoint and no save is
cut in half.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager

from distributed_peft.errors import Preempted

_requested = threading.Event()
_deferring = 0
_phase = ["starting"]
_arrived_while = [""]


def _stopped() -> Preempted:
    return Preempted(f"SIGTERM while {_arrived_while[0]}: stopped; rerun the same command to start again or resume")


def _handler(signum, frame) -> None:
    if not _requested.is_set():
        _arrived_while[0] = _phase[-1]
    _requested.set()
    if _deferring == 0:
        raise _stopped()


@contextmanager
def handle_sigterm() -> Iterator[None]:
    """Install the handler for the duration of a command (main thread only; elsewhere a no-op)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    _requested.clear()
    previous = signal.signal(signal.SIGTERM, _handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
        _requested.clear()


@contextmanager
def deferred() -> Iterator[None]:
    """Inside this block SIGTERM only raises the flag; the code checks `requested()` at its safe points."""
    global _deferring
    _deferring += 1
    try:
        yield
    finally:
        _deferring -= 1


@contextmanager
def phase(name: str) -> Iterator[None]:
    """Name what the command is doing, for the line printed when SIGTERM stops it."""
    _phase.append(name)
    try:
        yield
    finally:
        _phase.pop()


def requested() -> bool:
    """Whether SIGTERM arrived (on this process) since the command started."""
    return _requested.is_set()


def raise_if_requested() -> None:
    """At the end of a deferred block: stop now if SIGTERM arrived inside it."""
    if _requested.is_set():
        raise _stopped()
