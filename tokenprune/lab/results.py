"""The results of an ablation: one JSON line per finished cell, appended so that a kill loses at most one.

A run folder holds `results.jsonl` (or `results.shard-I-of-N.jsonl` for shard I of N, so shards
never write one file). Each line is written by a single `write` on a file opened for appending,
then flushed to disk: a line is either whole or a torn tail. Reading drops any line that is not
a JSON object with a `key` (with a warning, never an error); before its first append, a writer
cuts its own file back to its last whole line. A cell that raised has a row with its `error` and
no measurements.

Rows of every results file of one or more folders merge by `key` (the hash of the cell config and
of what it is measured on), one row per key, by one rule (`merge`): a measured row beats a row
with an error; among those, the latest `finished_at` wins; at equal times, the last one read
(files in the order given, lines in file order). A key with rows in several files (shards or
folders that overlap) is a duplicate: `Merged.notes` says which rows it found and which it kept.
"""

from __future__ import annotations

import fcntl
import json
import os
import warnings
from collections.abc import Iterable
from dataclasses import dataclass
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


@dataclass(frozen=True)
class Merged:
    """The rows of several results files, one per cell and fingerprint in grid order; the results file
    each came from; duplicates."""

    rows: list[Row]
    origin: list[Path]  # per row of `rows`: the results file of the row kept
    notes: list[str]  # one per cell found in several files: the rows found, the one kept and why


def merge(files: Iterable[Path]) -> Merged:
    """One row per key and fingerprint: measured over error, then the latest `finished_at`, then the last
    read. Rows of one key but different fingerprints (another model, data or versions) are not
    duplicates: both stay, for `fingerprint.check_mixing` to refuse or to note."""
    found: dict[tuple[str, str], list[tuple[Row, Path]]] = {}
    for path in files:
        for row in read_rows(path):
            found.setdefault((row["key"], row.get("fingerprint") or ""), []).append((row, path))
    kept = {cell: max(enumerate(rows), key=_rank)[1] for cell, rows in found.items()}
    notes = [
        _duplicate_note(rows, kept[cell]) for cell, rows in found.items() if len({p for _, p in rows}) > 1
    ]
    order = sorted(kept.values(), key=lambda pair: (pair[0].get("index", 0), pair[0]["key"]))
    return Merged([row for row, _ in order], [path for _, path in order], notes)


def _rank(item: tuple[int, tuple[Row, Path]]) -> tuple[bool, str, int]:
    """Measured before error, then the later `finished_at` (ISO text, UTC), then the later read."""
    order, (row, _) = item
    return "error" not in row, str(row.get("finished_at") or ""), order


def _duplicate_note(rows: list[tuple[Row, Path]], kept: tuple[Row, Path]) -> str:
    """`duplicate cell LABEL (key K): N rows in A, B; kept the one of B (measured, finished T)`."""
    row, path = kept
    files = ", ".join(dict.fromkeys(str(p) for _, p in rows))
    state = "with an error" if "error" in row else "measured"
    return (
        f"duplicate cell {row.get('label', '?')} (key {row['key']}): {len(rows)} rows in {files}; "
        f"kept the one of {path} ({state}, finished {row.get('finished_at', '?')})"
    )


def merge_rows(files: Iterable[Path]) -> list[Row]:
    """Rows of several results files, one per key and fingerprint (by `merge`'s rule), in grid order."""
    return merge(files).rows


def seedless_reduction(row: Row) -> dict[str, Any] | None:
    """A row's reduction as recorded, without its `seed` parameter (None: the baseline)."""
    reduction = row["cell"]["reduction"]
    if reduction is None:
        return None
    return {**reduction, "params": {k: v for k, v in (reduction.get("params") or {}).items() if k != "seed"}}


def cell_group(row: Row) -> str:
    """What the rows of one cell share, whatever their seed: the reduction but its seed, and the run's
    fingerprint (the same cell run on other weights or data is another cell). Rows written before
    cells were recorded group by their key."""
    if row.get("cell") is None:
        return row["key"]
    return json.dumps([seedless_reduction(row), row.get("fingerprint")], sort_keys=True)


def baseline_for(rows: Iterable[Row], row: Row) -> Row | None:
    """The measured baseline of `row`'s run (same fingerprint): the one its paired comparisons use."""
    return next(
        (
            other
            for other in rows
            if other.get("strategy") == "baseline"
            and "error" not in other
            and other.get("fingerprint") == row.get("fingerprint")
        ),
        None,
    )


def results_files(folders: Iterable[Path]) -> list[Path]:
    """Every results file (whole runs and shards) in `folders`."""
    return [path for folder in folders for path in sorted(Path(folder).glob(RESULTS_GLOB))]


class ResultStore:
    """The append-only results file of one run (or shard) in `folder`, and the keys finished in it."""

    def __init__(self, folder: Path, shard: tuple[int, int] | None = None) -> None:
        self.folder = Path(folder)
        self.path = self.folder / results_name(shard)
        self._mended = False

    def finished(self, timing: dict[str, Any], fingerprint: str | None = None) -> set[str]:
        """Keys of the cells measured here (any run or shard) with the `timing` settings and method and
        under the run `fingerprint`.

        A cell whose kept row records an `error`, was timed otherwise (older rows have no `timing`)
        or carries another fingerprint is not finished: a rerun measures it again and its new row
        replaces the old.
        """
        return {
            row["key"]
            for row in merge_rows(results_files([self.folder]))
            if "error" not in row and row.get("timing") == timing and row.get("fingerprint") == fingerprint
        }

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
