"""`tokenprune ablate CONFIG`: a grid of reductions on one model and one VQA dataset, a row per cell.

The YAML file (`tokenprune.lab.config`) names the model, the dataset, the generation settings and a
grid (`tokenprune.lab.grid`); the unreduced baseline is always the grid's first cell. For each cell,
on every sample: accuracy, fidelity to the unreduced model and prefill FLOPs
(`tokenprune.lab.metrics`); on the timing batch, prefill and decode against the baseline in paired,
order-alternating repeats, KV-cache bytes, peak memory and the strategy's own time
(`tokenprune.lab.speed`).

Before any cell computes, `tokenprune.lab.checks` checks the grid against the model's config and
the dataset's first records, and the run folder's `fingerprint.json` (`tokenprune.lab.fingerprint`)
must be this run's: another config, dataset, model or library version is refused unless the run
restarts (the old rows move aside) or branches into a folder of its own.

Rows go to `runs/<name>/results.jsonl` (`tokenprune.lab.results`): a killed run loses at most the cell
in flight and the same command resumes it; Ctrl-C ends with `Interrupted` (how many cells are
saved). A cell that raises is recorded with its error (and run again on resume); the others go on.
`tokenprune.lab.report` turns the rows into tables and plots.
"""

from __future__ import annotations

import math
import sys
import time
import traceback
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TextIO

import torch

from tokenprune.errors import ConfigError, TokenPruneError
from tokenprune.lab.batches import Batch, make_batches
from tokenprune.lab.bench import BaseBench, baseline_footprint, identity, open_model, timing_settings
from tokenprune.lab.checks import check_ablation, check_batch_keeps
from tokenprune.lab.config import AblationConfig, load_ablation_config
from tokenprune.lab.datasets import LMMS_EVAL_SOURCE, Sample, load_samples, resolve_source
from tokenprune.lab.fingerprint import Fingerprint, claim, conflicts, dataset_part, lmms_eval_part, refusal
from tokenprune.lab.grid import Cell, expand_grid, shard_cells
from tokenprune.lab.lmms_bench import LmmsBench
from tokenprune.lab.metrics import Outputs, accuracy, costs, evaluate, fidelity
from tokenprune.lab.predictions import prediction_fields
from tokenprune.lab.results import ResultStore


@dataclass
class Bench(BaseBench):
    """A bench on a VQA dataset: the batches (on the CPU) and the unreduced reference outputs."""

    batches: list[Batch]
    reference: Outputs

    @classmethod
    def open(cls, plan: Plan) -> Bench:
        """Load the model and batch the samples; check the cells' keeps against the first batch;
        answer every sample unreduced (the reference); measure the unreduced model's memory on the
        timing batch (the first samples)."""
        config = plan.config
        loaded = open_model(config)
        batches = make_batches(loaded, plan.samples, config.batch_size)
        check_batch_keeps(plan.config_file, plan.grid, loaded.adapter.visual_layout(batches[0].inputs))
        timed_samples = plan.samples[: config.timing.batch_size or config.batch_size]
        timed = make_batches(loaded, timed_samples, len(timed_samples))[0].inputs
        reference = evaluate(loaded, batches, None)
        base = baseline_footprint(loaded, timed, config)
        return cls(config, plan.config_file, loaded, timed, base, plan.fingerprint.short, batches, reference)

    def measure(self, cell: Cell) -> dict[str, Any]:
        """The results row of one cell."""
        start = time.perf_counter()
        outputs = (
            self.reference
            if cell.reduction is None
            else evaluate(self.loaded, self.batches, cell.reduction, self.reference.logprobs)
        )
        answers = [a for batch in self.batches for a in batch.answers]
        return {
            **identity(cell),
            **self.context(),
            "samples": len(answers),
            **prediction_fields(outputs, self.batches),
            **accuracy(outputs.predictions, answers),
            **fidelity(outputs, self.reference),
            **costs(outputs, self.reference),
            **self.timings(cell.reduction),
            "survival": outputs.survival,
            "finished_at": datetime.now(UTC).isoformat(timespec="seconds"),
            "wall_s": time.perf_counter() - start,
        }


class Progress:
    """One stderr line per cell: `[i/n] label  elapsed  ETA` (the ETA from this run's mean cell time)."""

    def __init__(self, total: int, stream: TextIO) -> None:
        self.total = total
        self.stream = stream
        self.started = time.perf_counter()
        self.done = 0

    def start(self, cell: Cell) -> None:
        """Print the line of the cell that starts now."""
        elapsed = time.perf_counter() - self.started
        eta = "?" if not self.done else _clock(elapsed / self.done * (self.total - self.done))
        print(
            f"[{self.done + 1}/{self.total}] {cell.label}  elapsed {_clock(elapsed)}  ETA {eta}",
            file=self.stream,
            flush=True,
        )

    def finish(self) -> None:
        """Count a cell as done (for the ETA)."""
        self.done += 1


def _clock(seconds: float) -> str:
    """Seconds as `m:ss`, rounded up."""
    minutes, secs = divmod(math.ceil(seconds), 60)
    return f"{minutes}:{secs:02d}"


def load_config(config_file: Path) -> AblationConfig:
    """The ablation config of `config_file`, its dataset path taken relative to the file's folder."""
    config = load_ablation_config(config_file)
    config.dataset.source = resolve_source(config.dataset.source, config_file.parent)
    return config


def run_folder(config: AblationConfig, output: str | Path | None = None, branch: str | None = None) -> Path:
    """`<output>/<name>` (`<name>-<branch>` on a branch): where a run's results, tables and figures go."""
    if branch is not None and (not branch or "/" in branch or branch.startswith(".")):
        raise ConfigError(f"--branch takes a plain folder-name suffix (no '/', not hidden): got {branch!r}")
    return Path(output or config.output) / (str(config.name) + ("" if branch is None else f"-{branch}"))


def describe(cells: Sequence[Cell], finished: set[str]) -> str:
    """The `--dry-run` listing: index, key, state and label of each cell."""
    lines = [f"{len(cells)} cells ({sum(c.key in finished for c in cells)} finished)"]
    for cell in cells:
        state = "done" if cell.key in finished else "todo"
        lines.append(f"{cell.index:>4}  {cell.key}  {state}  {cell.label}")
    return "\n".join(lines)


@dataclass(frozen=True)
class Plan:
    """What a run does: its folder, its fingerprint, the whole grid and this shard's cells."""

    config: AblationConfig
    config_file: Path
    samples: list[Sample]
    fingerprint: Fingerprint
    grid: list[Cell]
    cells: list[Cell]
    folder: Path


def plan_run(
    config_file: Path, shard: tuple[int, int] | None, output: str | Path | None, branch: str | None
) -> Plan:
    """Check the config up front, load the samples, fingerprint the run and list its cells."""
    config = load_config(config_file)
    check_ablation(config, config_file)
    spec = config.dataset
    if spec.source == LMMS_EVAL_SOURCE:
        samples, dataset = [], lmms_eval_part(spec)
    else:
        samples = load_samples(spec.source, spec.split, spec.limit, spec.seed)
        dataset = dataset_part(samples, spec.source)
    grid = expand_grid(config, dataset["digest"])
    fingerprint = Fingerprint.of(config, grid, dataset)
    folder = run_folder(config, output, branch)
    return Plan(config, config_file, samples, fingerprint, grid, shard_cells(grid, shard), folder)


def run_ablation(
    config_file: str | Path,
    shard: tuple[int, int] | None = None,
    dry_run: bool = False,
    output: str | Path | None = None,
    threads: int | None = None,
    stream: TextIO | None = None,
    *,
    restart: bool = False,
    branch: str | None = None,
) -> Path:
    """Run (or resume) the unfinished cells of a shard, progress on `stream` (stderr); returns the folder.

    `restart`: a folder of another run moves aside first; `branch`: run into `<name>-<branch>`.
    Raises `Interrupted` on Ctrl-C, `CellsFailed` when cells raised, ConfigError before any cell.
    """
    stream = stream or sys.stderr
    plan = plan_run(Path(config_file), shard, output, branch)
    config, folder = plan.config, plan.folder
    for name in config.grid.missing():
        print(f"skipping strategy {name!r}: not installed (grid.if_installed)", file=stream)
    store = ResultStore(folder, shard)
    if dry_run:
        print(describe(plan.cells, _dry_run_finished(plan, store, restart, stream)), file=sys.stdout)
        return folder
    moved = claim(folder, plan.fingerprint, restart)
    if moved is not None:
        print(f"--restart: the rows of another run moved into {moved}", file=stream)
    finished = store.finished(timing_settings(config), plan.fingerprint.short)
    todo = [cell for cell in plan.cells if cell.key not in finished]
    print(f"{folder}: {len(plan.cells)} cells, {len(plan.cells) - len(todo)} already finished", file=stream)
    if not todo:
        return folder
    try:
        with torch_threads(threads or config.threads):
            bench = open_bench(plan)
            run_cells(bench, folder, store, todo, stream)
    except KeyboardInterrupt:
        saved = store.finished(timing_settings(config), plan.fingerprint.short)
        raise Interrupted(sum(cell.key in saved for cell in plan.cells), len(plan.cells)) from None
    return folder


def _dry_run_finished(plan: Plan, store: ResultStore, restart: bool, stream: TextIO) -> set[str]:
    """The cells a run would find finished; raises the refusal a run would raise (writes nothing)."""
    differences = conflicts(plan.folder, plan.fingerprint) if plan.folder.is_dir() else []
    if differences and not restart:
        raise refusal(plan.folder, differences)
    if differences:
        print(f"--restart: the rows of another run in {plan.folder} would move aside", file=stream)
        return set()
    return store.finished(timing_settings(plan.config), plan.fingerprint.short)


def open_bench(plan: Plan) -> BaseBench:
    """The bench of the run's dataset source: lmms-eval's tasks, or the samples of a VQA dataset."""
    if plan.config.dataset.source == LMMS_EVAL_SOURCE:
        return LmmsBench.open(plan.config, plan.config_file, plan.fingerprint.short)
    return Bench.open(plan)


class Interrupted(KeyboardInterrupt):
    """Ctrl-C during a run: how many of its cells are saved (the same command resumes the rest)."""

    def __init__(self, saved: int, total: int) -> None:
        super().__init__(f"{saved} of {total} cells saved; rerun the same command to resume")
        self.saved, self.total = saved, total


class CellsFailed(TokenPruneError):
    """Some cells of a run raised; their rows hold the error, and the others' rows are in `folder`."""

    def __init__(self, folder: Path, store: ResultStore, labels: list[str]) -> None:
        super().__init__(
            f"{len(labels)} cell(s) failed, recorded with their error in {store.path} "
            f"(a rerun tries them again): {', '.join(labels)}"
        )
        self.folder = folder


def run_cells(bench: BaseBench, folder: Path, store: ResultStore, todo: list[Cell], stream: TextIO) -> None:
    """Measure and record each cell in turn; a cell that raises is recorded with its error, the rest go on.

    Raises `CellsFailed` at the end, naming the failed cells, when there were any.
    """
    bench.save_sample_image(folder)
    progress = Progress(len(todo), stream)
    failed = []
    for cell in todo:
        progress.start(cell)
        try:
            row = bench.measure(cell)
        except Exception as exc:  # one broken cell must not cost the hours of the others
            print(f"cell {cell.index} ({cell.label}) failed: {type(exc).__name__}: {exc}", file=stream)
            if not isinstance(exc, TokenPruneError):
                traceback.print_exc(file=stream)
            row = bench.failure(cell, exc)
            failed.append(cell.label)
        store.append(row)
        progress.finish()
    if failed:
        raise CellsFailed(folder, store, failed)


@contextmanager
def torch_threads(count: int | None) -> Iterator[None]:
    """Run with `count` torch CPU threads (None: as they are), restored afterwards."""
    before = torch.get_num_threads()
    if count:
        torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)
