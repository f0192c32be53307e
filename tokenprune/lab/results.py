"""The results of an ablation: one JSON line per finished cell, appended so that a kill loses at most one.

A run folder holds `results.jsonl` (or `results.shard-I-of-N.jsonl` for shard I of N, so shards
never write one file). Each line is written by a single `write` on a file opened for appending,
then flushed to disk: a line is either whole or a torn tail. Reading drops any line that is not
a JSON object with a `key` (with a warning, never an error); before its first append, a writer
cuts its own file back to its last whole line. Rows of every results file of one or
more folders merge by `key` (the hash of the cell config), the latest line winning. A cell that
raised has a row with its `error` and no measurements.
"""

from __future__ import annotations

import fcntl
import json
import os
import warnings
from collections.abc import Iterable
from pathlib import Path
from typing import Any

RESULTS_GLOB = "results*.jsonl"
Row = dict[str, Any]  # one results line: a cell's identity, measurements and context


class CorruptLineWarning(UserWarning):
    """A results line that could not be read (a torn write or an edit) and was dropped."""


def results_name(shard: tuple[int, int] | None) -> str:
    """The results file a run (or shard `(index, count)` of one) appends to."""
    return "results.jsonl" if shard is None else f"results.shard-{shard[0]}-of-{shard[1]}.jsonl"


def read_rows(path: Path) -> list[dict[str, Any]]:
    """The rows of one results file; unreadable lines are dropped with a `CorruptLineWarning`."""
    if not path.exists():
        return []
    rows = []
    for number, line in enumerate(path.read_bytes().split(b"\n"), start=1):
        if not line.strip():
            continue
        row = _parse(line)
        if row is None:
            warnings.warn(
                f"{path} line {number}: dropped an unreadable line", CorruptLineWarning, stacklevel=2
            )
            continue
        rows.append(row)
    return rows


def _parse(line: bytes) -> dict[str, Any] | None:
    """A results row from one line, or None when it is not a JSON object with a `key`."""
    try:
        row = json.loads(line)
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None
    return row if isinstance(row, dict) and isinstance(row.get("key"), str) else None


def merge_rows(files: Iterable[Path]) -> list[dict[str, Any]]:
    """Rows of several results files, one per `key` (the last one read wins), in grid order."""
    merged: dict[str, dict[str, Any]] = {}
    for path in files:
        for row in read_rows(path):
            merged[row["key"]] = row
    return sorted(merged.values(), key=lambda row: (row.get("index", 0), row["key"]))


def results_files(folders: Iterable[Path]) -> list[Path]:
    """Every results file (whole runs and shards) in `folders`."""
    return [path for folder in folders for path in sorted(Path(folder).glob(RESULTS_GLOB))]


class ResultStore:
    """The append-only results file of one run (or shard) in `folder`, and the keys finished in it."""

    def __init__(self, folder: Path, shard: tuple[int, int] | None = None) -> None:
        self.folder = Path(folder)
        self.path = self.folder / results_name(shard)
        self._mended = False

    def finished(self, timing: dict[str, Any]) -> set[str]:
        """Keys of the cells measured, with the `timing` settings and method, by any run or shard here.

        A cell whose latest row records an `error`, or was timed otherwise (older rows have no
        `timing`), is not finished: a rerun measures it again and its new row replaces the old.
        """
        rows = merge_rows(results_files([self.folder]))
        return {row["key"] for row in rows if "error" not in row and row.get("timing") == timing}

    def append(self, row: dict[str, Any]) -> None:
        """Add one row as one line: one `write` in append mode, then `fsync`, under an exclusive lock.

        The lock (`flock`) keeps another writer of the same file from reading a line this one is
        still writing as a torn tail and cutting it.
        """
        if "key" not in row:
            raise ValueError("a results row needs its cell's `key`")
        self.folder.mkdir(parents=True, exist_ok=True)
        line = (json.dumps(row, sort_keys=True, allow_nan=True) + "\n").encode()
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            self._mend_tail()
            written = 0
            while written < len(line):  # a regular file takes it in one write; loop on a short one
                written += os.write(fd, line[written:])
            os.fsync(fd)
        finally:
            os.close(fd)  # closing releases the lock

    def _mend_tail(self) -> None:
        """Before the first append: cut a torn last line (a killed write), or end a whole one."""
        if self._mended:
            return
        data = self.path.read_bytes()
        end = data.rfind(b"\n") + 1
        with self.path.open("r+b") as handle:
            if end < len(data) and _parse(data[end:]) is not None:
                handle.seek(0, os.SEEK_END)
                handle.write(b"\n")
            elif end < len(data):
                warnings.warn(
                    f"{self.path}: dropped an unfinished last line ({len(data) - end} bytes)",
                    CorruptLineWarning,
                    stacklevel=3,
                )
                handle.truncate(end)
        self._mended = True
