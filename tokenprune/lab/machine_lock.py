"""Timed sections run alone: a machine-wide reader-writer lock between tokenprune's processes.

Shards run side by side for accuracy; a timing taken while another shard computes is spoilt. So a
timed section (`timing_alone`: `paired_generation`, `footprint`) holds the lock exclusively, and
every compute section (`computing`: one evaluation batch, a model load) holds it shared: shards
compute together, and a timing waits for the batches in flight, then runs with no tokenprune
process computing. A turnstile keeps a waiting timing from starving: computers pass through it
(taken and released at once), a timing holds it while it waits, so no new batch starts meanwhile.

The locks are `flock`s on two files in `lock_dir()`, one folder per user and machine
(`/tmp/tokenprune-<uid>`, or `$TOKENPRUNE_LOCK_DIR`); the kernel releases them when a process
dies. The state is per process: a section inside a section of the same process takes nothing
more, except a timing inside a compute section, which is refused (it would wait for itself).
"""

from __future__ import annotations

import fcntl
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from tokenprune.errors import ConfigError

LOCK_DIR_ENV = "TOKENPRUNE_LOCK_DIR"
# /tmp, not $TMPDIR: schedulers (SLURM) give each job its own TMPDIR, which would keep shards apart.
DEFAULT_ROOT = Path("/tmp")

_held: tuple[int, list[int]] | None = None  # this process's mode (LOCK_SH, LOCK_EX) and open lock files


def lock_dir() -> Path:
    """The folder of the lock files (created, private to the user): `$TOKENPRUNE_LOCK_DIR` or /tmp's."""
    configured = os.environ.get(LOCK_DIR_ENV)
    folder = Path(configured) if configured else DEFAULT_ROOT / f"tokenprune-{os.getuid()}"
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    if folder.stat().st_uid != os.getuid():
        raise ConfigError(f"{folder}: the timing lock folder belongs to another user; set {LOCK_DIR_ENV}")
    return folder


@contextmanager
def timing_alone() -> Iterator[None]:
    """Run the block with no other tokenprune process of this user on this machine computing or timing."""
    with _section(fcntl.LOCK_EX):
        yield


@contextmanager
def computing() -> Iterator[None]:
    """Run the block beside other computing processes, never during another process's timed section."""
    with _section(fcntl.LOCK_SH):
        yield


@contextmanager
def _section(mode: int) -> Iterator[None]:
    """Hold the lock in `mode` for the block, unless this process already holds it."""
    global _held
    if _held is not None:
        if mode == fcntl.LOCK_EX and _held[0] == fcntl.LOCK_SH:
            raise RuntimeError("a timed section cannot start inside a compute section of the same process")
        yield
        return
    _held = (mode, _acquire(mode))
    try:
        yield
    finally:
        _, files = _held
        _held = None
        for fd in files:
            fcntl.flock(fd, fcntl.LOCK_UN)  # explicit: a forked child may still hold a copy of `fd`
            os.close(fd)


def _acquire(mode: int) -> list[int]:
    """The open lock files once `mode` is held: through the turnstile, then the room."""
    folder = lock_dir()
    turnstile = _locked(folder / "turnstile.lock", fcntl.LOCK_EX)
    if mode == fcntl.LOCK_SH:  # pass through: a timing waiting in the turnstile goes first
        fcntl.flock(turnstile, fcntl.LOCK_UN)
        os.close(turnstile)
        return [_locked(folder / "room.lock", mode)]
    try:
        room = _locked(folder / "room.lock", mode)
    except BaseException:  # Ctrl-C while waiting: leave the turnstile to the others
        os.close(turnstile)
        raise
    return [room, turnstile]


def _locked(path: Path, mode: int) -> int:
    """A descriptor of `path` (created if missing, never through a link) holding a `mode` flock."""
    fd = os.open(path, os.O_RDONLY | os.O_CREAT | os.O_NOFOLLOW, 0o600)
    try:
        fcntl.flock(fd, mode)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _forget_in_child() -> None:
    """After a fork: the child holds nothing (closing its copies leaves the parent's locks held)."""
    global _held
    if _held is not None:
        for fd in _held[1]:
            os.close(fd)
        _held = None


os.register_at_fork(after_in_child=_forget_in_child)
