"""What made a run folder: its config, its data, its model and the library versions, as one fingerprint.

`<run>/fingerprint.json` is written when a run starts. Four parts, each with a digest:

- `config`: the grid as resolved, each cell's config and label, and the context every cell shares
  (`tokenprune.lab.grid`: model source, dtype, attention, adapter, prompt, generation, batch size);
- `dataset`: the contents of the samples as loaded (ids, questions, answers, every image's pixels),
  never the path: an edited answer changes it, a moved file does not;
- `model`: a builtin's package folder, a local checkpoint folder's files (`folder_digest`), or a hub
  id's commit in the local cache (the id alone when it is not cached);
- `versions`: tokenprune, torch, transformers.

A rerun into a folder of another fingerprint is refused, naming the parts that differ (and for the
config the cells added and removed), unless `--restart` moves the old rows aside or `--branch` runs
into a folder of its own. Rows carry the fingerprint's short hash; `tokenprune report` refuses rows of
different fingerprints in one table unless `--allow-mixed`.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch
import transformers

import tokenprune as tp
from tokenprune.builtin.models import TOY_LLAVA_DIR, TOY_VIDEO_LLAVA_DIR
from tokenprune.errors import ConfigError
from tokenprune.lab.config import AblationConfig, DatasetSpec
from tokenprune.lab.datasets import Sample, contents_digest
from tokenprune.lab.grid import Cell, context, digest
from tokenprune.lab.results import RESULTS_GLOB, Row, merge, results_files

FINGERPRINT_FILE = "fingerprint.json"
PARTS = ("config", "dataset", "model", "versions")
BUILTIN_FOLDERS = {  # builtins whose weights are package files
    "builtin:toy-llava": TOY_LLAVA_DIR,
    "builtin:toy-video-llava": TOY_VIDEO_LLAVA_DIR,
}
FULL_HASH_BYTES = 256 * 2**20  # files up to this size are hashed whole
STRIDE_SAMPLES = 256  # a larger file: its size, its safetensors header and this many strided chunks
CHUNK_BYTES = 64 * 2**10


# -- the parts --------------------------------------------------------------------------------------


def dataset_part(samples: Sequence[Sample], source: str) -> dict[str, Any]:
    """The dataset's contents as loaded (`contents_digest`), with the count and source for the reader."""
    return {"digest": contents_digest(samples), "samples": len(samples), "source": source}


def lmms_eval_part(spec: DatasetSpec) -> dict[str, Any]:
    """lmms-eval's tasks: their names, the limit and lmms-eval's version (their data is lmms-eval's to
    read; a task edited without a new lmms-eval version goes unseen)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        installed = version("lmms-eval")
    except PackageNotFoundError:
        raise ConfigError(
            f"dataset source {spec.source!r} needs lmms-eval: pip install 'tokenprune-vlm[lmms-eval]'"
        ) from None
    tasks = {"tasks": spec.tasks, "limit": spec.limit, "lmms_eval": installed}
    return {"digest": digest(tasks), "source": spec.source, **tasks}


def config_part(config: AblationConfig, cells: Sequence[Cell], dataset: str) -> dict[str, Any]:
    """The grid as resolved: each cell (label and config) and the context every cell's key holds."""
    listed = [{"label": cell.label, "cell": cell.config()} for cell in cells]
    shared = context(config, dataset)
    return {"digest": digest({"cells": listed, "context": shared}), "cells": listed, "context": shared}


def model_part(source: str) -> dict[str, Any]:
    """The model's identity: a digest of its files, or a hub id's cached commit (else the id itself)."""
    folder = BUILTIN_FOLDERS.get(source)
    if folder is None and not source.startswith("builtin:") and Path(source).expanduser().is_dir():
        folder = Path(source).expanduser()
    if folder is not None:
        return {"digest": folder_digest(folder), "source": source, "identity": "digest of the folder's files"}
    if source.startswith("builtin:"):  # generated from a seed by this tokenprune version
        return {"digest": digest([source, tp.__version__]), "source": source, "identity": "builtin, seeded"}
    commit = cached_commit(source)
    if commit is None:
        return {"digest": source, "source": source, "identity": "hub id (no commit in the local cache)"}
    return {"digest": commit, "source": source, "identity": "hub commit in the local cache"}


def versions_part() -> dict[str, Any]:
    """The libraries whose versions can change a result."""
    versions = {
        "tokenprune": tp.__version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
    }
    return {"digest": digest(versions), **versions}


def folder_digest(folder: Path) -> str:
    """Every file of `folder` (hidden ones left out) by relative path and `file_digest`."""
    files = sorted(p for p in folder.rglob("*") if p.is_file() and not _hidden(p.relative_to(folder)))
    return digest([[str(p.relative_to(folder)), file_digest(p)] for p in files])


def _hidden(relative: Path) -> bool:
    """A path under a hidden folder or of a hidden file (caches, lock files)."""
    return any(part.startswith(".") or part == "__pycache__" for part in relative.parts)


def file_digest(path: Path) -> str:
    """SHA-256 of a file up to `FULL_HASH_BYTES`; of a larger one, its size, its safetensors header
    (every tensor's name, dtype, shape and offsets) and `STRIDE_SAMPLES` chunks spread evenly over it.

    Sizes and times would miss a fine-tune saved over the same files; hashing 15 GB of weights at
    every run start would take minutes. A fine-tune changes every tensor it touches, so the strided
    chunks (16 MiB per file) meet its changes; the header catches any change of layout or dtype.
    """
    size = path.stat().st_size
    hasher = hashlib.sha256(str(size).encode())
    with path.open("rb") as handle:
        if size <= FULL_HASH_BYTES:
            for block in iter(lambda: handle.read(2**20), b""):
                hasher.update(block)
            return hasher.hexdigest()
        if path.suffix == ".safetensors":
            length = int.from_bytes(handle.read(8), "little")
            hasher.update(handle.read(min(length, size - 8)))
        for index in range(STRIDE_SAMPLES):
            handle.seek((size - CHUNK_BYTES) * index // (STRIDE_SAMPLES - 1))
            hasher.update(handle.read(CHUNK_BYTES))
    return hasher.hexdigest()


def cached_commit(repo_id: str) -> str | None:
    """The commit the local Hugging Face cache resolves `repo_id`'s main revision to, if it holds one."""
    from huggingface_hub import try_to_load_from_cache

    try:
        path = try_to_load_from_cache(repo_id, "config.json")
    except ValueError:  # not a valid repo id
        return None
    return Path(path).parent.name if isinstance(path, str) else None


# -- a run's fingerprint --------------------------------------------------------------------------


@dataclass(frozen=True)
class Fingerprint:
    """The four parts of what made a run; `short` names it in every row."""

    parts: dict[str, dict[str, Any]]

    @classmethod
    def of(cls, config: AblationConfig, cells: Sequence[Cell], dataset: dict[str, Any]) -> Fingerprint:
        """The fingerprint of a run of `cells` (the whole grid, not a shard) on `dataset`'s samples."""
        return cls(
            {
                "config": config_part(config, cells, dataset["digest"]),
                "dataset": dataset,
                "model": model_part(config.model.source),
                "versions": versions_part(),
            }
        )

    @property
    def short(self) -> str:
        """One hash of the four parts' digests."""
        return digest([self.parts[part]["digest"] for part in PARTS])

    def to_json(self) -> str:
        """The content of `fingerprint.json`."""
        return json.dumps({"fingerprint": self.short, **self.parts}, indent=1, sort_keys=True) + "\n"

    @classmethod
    def read(cls, folder: Path) -> Fingerprint | None:
        """The fingerprint written in `folder`, or None when there is none (or it cannot be read)."""
        try:
            data = json.loads((folder / FINGERPRINT_FILE).read_text())
            return cls({part: data[part] for part in PARTS})
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def differences(self, other: Fingerprint) -> list[str]:
        """What differs from `other` (the one already written), part by part, in words."""
        found = []
        for part in PARTS:
            mine, theirs = self.parts[part], other.parts[part]
            if mine["digest"] != theirs["digest"]:
                describe = _describe_config if part == "config" else _describe_leaves
                found.append(f"{part}: {describe(theirs, mine)}")
        return found


def _describe_config(old: dict[str, Any], new: dict[str, Any]) -> str:
    """Changed context fields, then the cells added and removed (by label)."""
    context = _describe_leaves(old["context"], new["context"])
    words = [context] if context else []
    before = {digest(cell["cell"]): cell["label"] for cell in old["cells"]}
    after = {digest(cell["cell"]): cell["label"] for cell in new["cells"]}
    added = [label for key, label in after.items() if key not in before]
    removed = [label for key, label in before.items() if key not in after]
    if added:
        words.append(f"cells added: {', '.join(added)}")
    if removed:
        words.append(f"cells removed: {', '.join(removed)}")
    return "; ".join(words) or "the cells' configs"


def _changed(old: Any, new: Any, prefix: str = "") -> list[tuple[str, str]]:
    """(dotted field, `old -> new`) of every leaf that differs between two JSON-like mappings."""
    if isinstance(old, dict) and isinstance(new, dict):
        return [
            change
            for key in sorted(set(old) | set(new), key=str)
            for change in _changed(old.get(key), new.get(key), f"{prefix}{key}.")
        ]
    return [] if old == new else [(prefix.rstrip("."), f"{old!r} -> {new!r}")]


def _describe_leaves(old: dict[str, Any], new: dict[str, Any]) -> str:
    """Each field that differs, `old -> new` (digests included)."""
    return "; ".join(f"{field} {value}" for field, value in _changed(old, new))


# -- a run folder and its fingerprint -----------------------------------------------------------------


def conflicts(folder: Path, fingerprint: Fingerprint) -> list[str]:
    """What makes `folder` another run's: the parts that differ from its fingerprint.json, or rows
    written before fingerprints. Empty when the run may go on (or start) there."""
    written = Fingerprint.read(folder)
    if written is not None:
        return fingerprint.differences(written)
    if any(folder.glob(RESULTS_GLOB)):
        return ["it holds results rows but no fingerprint.json (rows written before run fingerprints)"]
    return []


def refusal(folder: Path, differences: Sequence[str]) -> ConfigError:
    """The error of a rerun into a folder of another run: what differs, and the two ways on."""
    only_versions = all(d.startswith("versions:") for d in differences)
    why = " (rows measured under other library versions are not mixed in one run)" if only_versions else ""
    return ConfigError(
        f"{folder} holds another run: {'; '.join(differences)}{why}. Give --restart to move its rows "
        f"aside into {folder}/superseded-<time>/ and start over, or --branch NAME to run into {folder}-NAME"
    )


def claim(folder: Path, fingerprint: Fingerprint, restart: bool) -> Path | None:
    """Make `folder` the run folder of `fingerprint` (written to fingerprint.json), under a lock that
    shards starting together share. A folder of another run is refused (`refusal`), or with `restart`
    its contents move into `superseded-<time>/` (returned), never deleted."""
    folder.mkdir(parents=True, exist_ok=True)
    with (folder / ".fingerprint.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        differences = conflicts(folder, fingerprint)
        if differences and not restart:
            raise refusal(folder, differences)
        moved = move_aside(folder) if differences else None
        if Fingerprint.read(folder) is None:
            partial = folder / f".{FINGERPRINT_FILE}.{os.getpid()}.partial"
            partial.write_text(fingerprint.to_json())
            partial.replace(folder / FINGERPRINT_FILE)
    return moved


def move_aside(folder: Path) -> Path:
    """Move everything in `folder` but earlier superseded folders and hidden files into
    `superseded-<UTC time>/`; returns that folder."""
    target = folder / f"superseded-{datetime.now(UTC).strftime('%Y%m%dT%H%M%S%fZ')}"
    target.mkdir()
    for entry in sorted(folder.iterdir()):
        if entry != target and not entry.name.startswith((".", "superseded-")):
            entry.rename(target / entry.name)
    return target


# -- rows of several folders in one report -----------------------------------------------------------


def check_mixing(rows: Sequence[Row], origin: Sequence[Path], allow_mixed: bool) -> list[str]:
    """Refuse rows of different fingerprints in one table (ConfigError naming folders and differences).

    `origin` holds each row's results file. Rows written before fingerprints
    count as one fingerprint of their own (`none`). With `allow_mixed`, the note the table carries.
    """
    folders: dict[str, set[Path]] = {}
    for row, path in zip(rows, origin, strict=True):
        folders.setdefault(row.get("fingerprint") or "none", set()).add(path.parent)
    if len(folders) < 2:
        return []
    groups = [f"{short} ({', '.join(sorted(map(str, paths)))})" for short, paths in folders.items()]
    what = _what_differs([sorted(paths)[0] for paths in folders.values()])
    text = f"rows of {len(folders)} run fingerprints in one table: {'; '.join(groups)}{what}"
    if not allow_mixed:
        raise ConfigError(f"{text}. Report them apart, or give --allow-mixed to put them in one table")
    return [f"Mixed (--allow-mixed): {text}."]


def _what_differs(folders: Sequence[Path]) -> str:
    """`: <differences>` between the first folder's fingerprint and each other's, where both are written."""
    first = Fingerprint.read(folders[0])
    found = []
    for folder in folders[1:]:
        other = Fingerprint.read(folder)
        if first is not None and other is not None:
            found.append(f"{folder} against {folders[0]}: {'; '.join(other.differences(first))}")
    return f"; {' | '.join(found)}" if found else ""


def gather_rows(folders: Sequence[Path], allow_mixed: bool = False) -> tuple[list[Row], list[str]]:
    """The rows of `folders`, one per key (`results.merge`), refused when of several fingerprints
    (`check_mixing`); with the notes on duplicates and mixing, also printed on stderr."""
    merged = merge(results_files(folders))
    notes = merged.notes + check_mixing(merged.rows, merged.origin, allow_mixed)
    for note in notes:
        print(f"report: {note}", file=sys.stderr)
    return merged.rows, notes


def write_notes(path: Path, notes: Sequence[str]) -> None:
    """Append the notes of `gather_rows` to a summary (nothing when there are none)."""
    if notes:
        with path.open("a") as handle:
            handle.write("\n".join(["", "Notes:", "", *(f"- {note}" for note in notes), ""]))
