"""Timed sections run alone across processes (`machine_lock`), and a timing that other processes
competed with is flagged (`timing.others_during`, `speed.flags`)."""

from __future__ import annotations

import multiprocessing
import os
import resource
import time
from collections.abc import Callable
from multiprocessing.synchronize import Event
from pathlib import Path

import pytest

from tokenprune.errors import ConfigError
from tokenprune.lab import machine_lock, timing
from tokenprune.lab.machine_lock import computing, lock_dir, timing_alone
from tokenprune.lab.speed import PairedSpeed, flags
from tokenprune.lab.timing import OthersLoad, others_during, summarize

FORK = multiprocessing.get_context("fork")


@pytest.fixture(autouse=True)
def private_lock_dir(tmp_path, monkeypatch):
    """Each test's locks in its own folder: no other run on this machine waits for them, nor they for it."""
    monkeypatch.setenv(machine_lock.LOCK_DIR_ENV, str(tmp_path / "locks"))


# -- the lock -------------------------------------------------------------------------------------


def _in_section(section: Callable, stamps, name: str, hold: Event | None) -> None:
    """Child: stamp `<name> try`, enter `section`, stamp `<name> in`, wait for `hold`, stamp `<name> out`."""
    stamps.put((f"{name} try", time.monotonic()))
    with section():
        stamps.put((f"{name} in", time.monotonic()))
        if hold is not None:
            hold.wait(timeout=30)
        stamps.put((f"{name} out", time.monotonic()))


def _start(section: Callable, stamps, name: str, hold: Event | None = None) -> multiprocessing.Process:
    """A forked child running `_in_section`."""
    child = FORK.Process(target=_in_section, args=(section, stamps, name, hold))
    child.start()
    return child


def _await(stamps, seen: dict[str, float], *wanted: str) -> None:
    """Collect stamps into `seen` until all of `wanted` have come."""
    while not seen.keys() >= set(wanted):
        name, stamp = stamps.get(timeout=30)
        seen[name] = stamp


def test_a_compute_section_waits_for_another_process_timing():
    stamps, seen = FORK.Queue(), {}
    with timing_alone():
        computer = _start(computing, stamps, "compute")  # forked while the timing is held
        _await(stamps, seen, "compute try")
        time.sleep(0.3)
        timing_ended = time.monotonic()
    computer.join(timeout=30)
    _await(stamps, seen, "compute in")
    assert seen["compute try"] < timing_ended <= seen["compute in"]


def test_computers_share_and_a_waiting_timing_goes_before_new_computers():
    """A computes; B asks to time (waits for A); C asks to compute after B: C waits for B, though the
    room is only shared while B waits (the turnstile); two computers do not wait for each other."""
    stamps, seen = FORK.Queue(), {}
    release_a = FORK.Event()
    a = _start(computing, stamps, "A", release_a)
    _await(stamps, seen, "A in")
    b = _start(timing_alone, stamps, "B")
    _await(stamps, seen, "B try")
    time.sleep(0.3)  # B is waiting in the turnstile
    c = _start(computing, stamps, "C")
    _await(stamps, seen, "C try")
    time.sleep(0.3)
    release_a.set()
    for child in (a, b, c):
        child.join(timeout=30)
    _await(stamps, seen, "A out", "B in", "B out", "C in")
    assert seen["A out"] <= seen["B in"] and seen["B out"] <= seen["C in"]
    assert seen["C try"] < seen["A out"]  # C came while A's compute was in flight, and still waited

    seen.clear()
    release_a = FORK.Event()
    a = _start(computing, stamps, "A", release_a)
    _await(stamps, seen, "A in")
    d = _start(computing, stamps, "D")
    _await(stamps, seen, "D out")  # D computes while A does
    release_a.set()
    for child in (a, d):
        child.join(timeout=30)
    _await(stamps, seen, "A out", "D out")
    assert seen["D out"] < seen["A out"]


def test_sections_nest_within_a_process_except_a_timing_inside_a_compute():
    with timing_alone(), computing(), timing_alone():
        pass
    refused = pytest.raises(RuntimeError, match="timed section cannot start inside a compute section")
    with computing(), computing(), refused, timing_alone():
        pass
    with timing_alone():  # the refusal released what the outer section held
        pass


def test_a_lock_folder_of_another_user_is_refused(monkeypatch):
    someone_else = os.stat(lock_dir()).st_uid + 1
    monkeypatch.setattr(machine_lock.os, "getuid", lambda: someone_else)
    with pytest.raises(ConfigError, match="belongs to another user; set TOKENPRUNE_LOCK_DIR"):
        lock_dir()


def test_the_lock_folder_is_per_user_in_tmp(monkeypatch):
    monkeypatch.delenv(machine_lock.LOCK_DIR_ENV)
    assert lock_dir() == Path("/tmp") / f"tokenprune-{os.getuid()}"


# -- others' CPU: the arithmetic on given readings -----------------------------------------------


class _Readings:
    """Stand-ins for the machine's and this process's CPU seconds and the clock: before, then after."""

    def __init__(self, monkeypatch, machine: tuple, own: tuple, clock: tuple) -> None:
        for name, values in (("machine_cpu_s", machine), ("own_cpu_s", own)):
            monkeypatch.setattr(timing, name, iter(values).__next__)
        monkeypatch.setattr(timing.time, "perf_counter", iter(clock).__next__)


def _speed(others: OthersLoad | None) -> PairedSpeed:
    """A clean pair of measurements (no spread, every token made) with `others` as the load."""
    ratio = summarize([1.0, 1.0], [0.5, 0.5])
    return PairedSpeed(ratio, ratio, [32] * 4, others)


def test_others_are_the_machines_cpu_less_this_processes(monkeypatch):
    _Readings(monkeypatch, machine=(100.0, 103.0), own=(5.0, 6.0), clock=(10.0, 12.0))
    result, load = others_during(lambda: "ran")
    assert result == "ran" and load == OthersLoad(cores=1.0, wall_s=2.0)  # (3 - 1) s over 2 s
    assert flags(_speed(load), 32) == ["timing: other processes used 1.00 cores > 0.25"]


def test_a_machine_busy_with_this_process_alone_is_not_flagged(monkeypatch):
    _Readings(monkeypatch, machine=(100.0, 104.2), own=(5.0, 9.0), clock=(10.0, 12.0))
    _, load = others_during(lambda: None)
    assert load.cores == pytest.approx(0.1, abs=1e-12)
    assert flags(_speed(load), 32) == [] and flags(_speed(None), 32) == []


def test_without_proc_stat_the_row_says_it_could_not_check(monkeypatch):
    monkeypatch.setattr(timing, "PROC_STAT", Path("/nonexistent/stat"))
    assert timing.machine_cpu_s() is None
    _, load = others_during(lambda: None)
    assert load.cores is None
    assert flags(_speed(load), 32) == ["timing: other processes' CPU use cannot be read here (no /proc/stat)"]


# -- others' CPU: the kernel's readings --------------------------------------------------------------


def _spin(seconds: float, done) -> None:
    """Child: keep one core busy for `seconds`, then say so."""
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        pass
    done.put(os.getpid())


def _spinners(join_inside: bool) -> tuple[OthersLoad, float]:
    """A section in which one child per core spins for 1 s: the load it measures, and the children's
    CPU seconds (waited for inside the section when `join_inside`, after it otherwise)."""
    done = FORK.Queue()
    children = [FORK.Process(target=_spin, args=(1.0, done)) for _ in range(os.cpu_count() or 1)]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)

    def section() -> None:
        for child in children:
            child.start()
        for _ in children:
            done.get(timeout=60)
        if join_inside:
            for child in children:
                child.join(timeout=60)

    _, load = others_during(section)
    for child in children:
        child.join(timeout=60)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return load, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


@pytest.mark.skipif(not timing.PROC_STAT.exists(), reason="the machine's CPU time is read from /proc/stat")
def test_busy_processes_during_a_timing_are_counted_and_flagged_and_own_children_are_not():
    """The same spinning children, once others (still running at the end of the section) and once
    this process's own (waited for inside it): the first counts, the second is subtracted."""
    busy, busy_children_s = _spinners(join_inside=False)
    quiet, quiet_children_s = _spinners(join_inside=True)
    tick = 1 / os.sysconf("SC_CLK_TCK")
    resolution = (os.cpu_count() or 1) * 4 * tick  # readings round down to a tick per core
    assert busy.cores * busy.wall_s >= busy_children_s - resolution  # every second they spun is in
    assert flags(_speed(busy), 32) == [f"timing: other processes used {busy.cores:.2f} cores > 0.25"]
    # waited for inside the section, the same children are this process's: their share drops out
    assert busy.cores - quiet.cores >= 0.5 * quiet_children_s / quiet.wall_s > 0
