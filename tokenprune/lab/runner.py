"""`tokenprune ablate CONFIG`: a grid of reductions on one model and one VQA dataset, a row per cell.

The YAML file (`tokenprune.lab.config`) names the model, the dataset, the generation settings and a
grid (`tokenprune.lab.grid`); the unreduced baseline is always the grid's first cell. For each cell,
on every sample: accuracy, fidelity to the unreduced model and prefill FLOPs
(`tokenprune.lab.metrics`); on the timing batch, prefill and decode against the baseline in paired,
order-alternating repeats, KV-cache bytes, peak memory and the strategy's own time
(`tokenprune.lab.speed`).

Rows go to `runs/<name>/results.jsonl` (`tokenprune.lab.results`): a killed run loses at most the cell
in flight and the same command resumes it. A cell that raises is recorded with its error (and run
again on resume); the others go on. `tokenprune.lab.report` turns the rows into tables and plots.
"""

from __future__ import annotations

import math
import os
import platform
import sys
import time
import traceback
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TextIO

import torch
import transformers
from torch import nn

import tokenprune as tp
from tokenprune.errors import ConfigError, TokenPruneError
from tokenprune.lab.batches import Batch, make_batches, model_view
from tokenprune.lab.config import AblationConfig, StrategySite, load_ablation_config
from tokenprune.lab.datasets import load_samples
from tokenprune.lab.grid import Cell, expand_grid, shard_cells
from tokenprune.lab.loading import Loaded, load_model
from tokenprune.lab.metrics import Outputs, accuracy, costs, evaluate, fidelity
from tokenprune.lab.report import SAMPLE_IMAGE
from tokenprune.lab.results import ResultStore
from tokenprune.lab.speed import Footprint, PairedSpeed, flags, footprint, paired_generation
from tokenprune.lab.timing import TIMING_METHOD


@dataclass
class Bench:
    """What the cells share: the loaded model, the batches (on the CPU), the unreduced reference outputs."""

    config: AblationConfig
    config_file: Path
    loaded: Loaded
    batches: list[Batch]
    timed: Batch  # the first samples, timed
    reference: Outputs
    baseline_footprint: Footprint  # KV bytes and peak memory of the unreduced model on `timed`

    @classmethod
    def open(cls, config: AblationConfig, config_file: Path) -> Bench:
        """Load the model and the samples; answer every sample unreduced (the reference) and measure
        the unreduced model's memory on the timing batch."""
        loaded = open_model(config)
        _check_layers(config, config_file, loaded)
        samples = load_samples(
            config.dataset.source, config.dataset.split, config.dataset.limit, config.dataset.seed
        )
        batches = make_batches(loaded, samples, config.batch_size)
        timed_samples = samples[: config.timing.batch_size or config.batch_size]
        timed = make_batches(loaded, timed_samples, len(timed_samples))[0]
        reference = evaluate(loaded, batches, None)
        tokens, adapter = config.timing.decode_tokens, loaded.adapter.name
        base = footprint(loaded.model, timed.on(loaded.device), None, tokens, adapter)
        return cls(config, config_file, loaded, batches, timed, reference, base)

    def measure(self, cell: Cell) -> dict[str, Any]:
        """The results row of one cell."""
        start = time.perf_counter()
        torch.manual_seed(cell.seed)
        outputs = (
            self.reference
            if cell.reduction is None
            else evaluate(self.loaded, self.batches, cell.reduction, self.reference.logprobs)
        )
        answers = [a for batch in self.batches for a in batch.answers]
        return {
            **identity(cell),
            **self._context(),
            "samples": len(answers),
            "predictions": outputs.predictions,
            **accuracy(outputs.predictions, answers),
            **fidelity(outputs, self.reference),
            **costs(outputs, self.reference),
            **self.timings(cell.reduction),
            "survival": outputs.survival,
            "finished_at": datetime.now(UTC).isoformat(timespec="seconds"),
            "wall_s": time.perf_counter() - start,
        }

    def failure(self, cell: Cell, error: Exception) -> dict[str, Any]:
        """The row of a cell that raised: its identity and the error, no measurement."""
        return {
            **identity(cell),
            **self._context(),
            "error": f"{type(error).__name__}: {error}",
            "finished_at": datetime.now(UTC).isoformat(timespec="seconds"),
        }

    def timings(self, reduction: tp.ReductionConfig | None) -> dict[str, Any]:
        """The timing columns of a cell: paired ratios against the baseline, memory, selection time."""
        spec, loaded = self.config.timing, self.loaded
        inputs = self.timed.on(loaded.device)  # one copy on the device for this cell, dropped after it
        speed = paired_generation(
            loaded.model,
            inputs,
            reduction,
            spec.decode_tokens,
            spec.repeats,
            spec.warmup,
            loaded.adapter.name,
        )
        cell = self.baseline_footprint
        if reduction is not None:
            cell = footprint(loaded.model, inputs, reduction, spec.decode_tokens, loaded.adapter.name)
        return {**timing_fields(speed, spec.decode_tokens), **_memory_fields(self.baseline_footprint, cell)}

    def _context(self) -> dict[str, Any]:
        """The fields every row of the run shares: run name, config file, environment."""
        return {
            "run": self.config.name,
            "config_file": str(self.config_file),
            "timing": timing_settings(self.config),
            "environment": environment(self.loaded.model),
        }

    def save_sample_image(self, folder: Path) -> None:
        """The first image of the dataset as the model sees it (the survival maps' background)."""
        image = model_view(self.loaded.processor, self.batches[0].inputs)
        if image is not None:
            folder.mkdir(parents=True, exist_ok=True)
            partial = folder / f".{SAMPLE_IMAGE}.{os.getpid()}.partial"  # shards may write it at once
            image.save(partial, format="PNG")
            partial.replace(folder / SAMPLE_IMAGE)


def open_model(config: AblationConfig) -> Loaded:
    """The config's model through the lab's one loader, with its prompt and answer length as configured."""
    spec = config.model
    loaded = load_model(
        spec.source,
        dtype=spec.dtype,
        device=spec.device,
        device_map=spec.device_map,
        attn_implementation=spec.attn_implementation,
        adapter=spec.adapter,
    )
    return replace(
        loaded,
        prompt=spec.prompt or loaded.prompt,
        max_new_tokens=config.generation.max_new_tokens or loaded.max_new_tokens,
    )


def timing_fields(speed: PairedSpeed, new_tokens: int) -> dict[str, Any]:
    """Medians of the times, the speed-ups (median of the per-pair ratios, inverted), their spreads, flags.

    Nothing is clamped: a bad measurement keeps its value and is named in `timing_flags`.
    """
    fields: dict[str, Any] = {"timing_repeats": speed.prefill.repeats, "timing_decode_tokens": new_tokens}
    for name, ratio in (("prefill_s", speed.prefill), ("decode_s_per_token", speed.decode)):
        stem = name.split("_")[0]
        fields[name], fields[f"baseline_{name}"] = ratio.variant_s, ratio.baseline_s
        fields[f"{stem}_speedup"] = _finite(ratio.speedup)
        fields[f"{stem}_spread"] = _finite(ratio.spread)
    fields["timing_flags"] = flags(speed, new_tokens)
    return fields


def _finite(value: float) -> float | None:
    """The value, or None when it is infinite or NaN (JSON has neither)."""
    return value if math.isfinite(value) else None


def _memory_fields(base: Footprint, cell: Footprint) -> dict[str, Any]:
    """KV-cache bytes and peak memory of the cell and the baseline, and the cell's selection time."""
    return {
        "kv_cache_bytes": cell.kv_cache_bytes,
        "baseline_kv_cache_bytes": base.kv_cache_bytes,
        "peak_memory_bytes": cell.peak_memory_bytes,
        "baseline_peak_memory_bytes": base.peak_memory_bytes,
        "overhead_s": cell.overhead_s,
    }


def _check_layers(config: AblationConfig, config_file: Path, loaded: Loaded) -> None:
    """Refuse decoder layers the model does not have, before any cell runs (vision layers: at attach)."""
    depth = len(loaded.adapter.decoder_layers())
    grid = config.grid
    fields: dict[str, set[int]] = {}
    for name in grid.active_strategies():
        where = grid.sites.get(name, StrategySite())
        if where.site == "language":
            field = "grid.layers" if where.layers is None else f"grid.sites.{name}.layers"
            fields.setdefault(field, set()).update(where.layers or grid.layers)
    fields["grid.extra"] = {
        stage.layer for reduction in grid.extra for stage in reduction.stages if stage.site == "language"
    }
    for field, layers in fields.items():
        too_deep = sorted(layer for layer in layers if layer >= depth)
        if too_deep:
            raise ConfigError(
                f"{config_file}: {field}: layer(s) {too_deep} past the model's last decoder layer "
                f"({depth} layers: 0..{depth - 1})"
            )


def identity(cell: Cell) -> dict[str, Any]:
    """The fields that say which cell a row is."""
    reduction = cell.reduction
    stage = None if reduction is None else reduction.stages[0]
    return {
        "key": cell.key,
        "index": cell.index,
        "label": cell.label,
        "strategy": "baseline" if reduction is None else reduction.strategy,
        "layer": None if stage is None else stage.layer,
        "site": None if stage is None else stage.site,
        "ratio": 0.0 if stage is None else stage.ratio,
        "keep": None if stage is None else stage.keep,
        "params": {} if reduction is None else reduction.params,
        "seed": cell.seed,
        "cell": cell.config(),
    }


def environment(model: nn.Module) -> dict[str, Any]:
    """Library versions and the device a row was measured on."""
    device = next(model.parameters()).device
    name = (
        torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else platform.processor() or platform.machine()
    )
    return {
        "tokenprune": tp.__version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "device": str(device),
        "device_name": name,
        "threads": torch.get_num_threads(),
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


def timing_settings(config: AblationConfig) -> dict[str, Any]:
    """How a run times its cells (settings and method version): a row timed otherwise is re-measured."""
    return {**config.timing.model_dump(), "method": TIMING_METHOD}


def run_folder(config: AblationConfig, output: str | Path | None = None) -> Path:
    """`<output>/<name>`: where a run's results, tables and figures go."""
    return Path(output or config.output) / str(config.name)


def describe(cells: Sequence[Cell], finished: set[str]) -> str:
    """The `--dry-run` listing: index, key, state and label of each cell."""
    lines = [f"{len(cells)} cells ({sum(c.key in finished for c in cells)} finished)"]
    for cell in cells:
        state = "done" if cell.key in finished else "todo"
        lines.append(f"{cell.index:>4}  {cell.key}  {state}  {cell.label}")
    return "\n".join(lines)


def run_ablation(
    config_file: str | Path,
    shard: tuple[int, int] | None = None,
    dry_run: bool = False,
    output: str | Path | None = None,
    threads: int | None = None,
    stream: TextIO | None = None,
) -> Path:
    """Run (or resume) the unfinished cells of a shard, progress on `stream` (stderr); returns the folder."""
    stream = stream or sys.stderr
    config_file = Path(config_file)
    config = load_ablation_config(config_file)
    cells = shard_cells(expand_grid(config), shard)
    folder = run_folder(config, output)
    store = ResultStore(folder, shard)
    finished = store.finished(timing_settings(config))
    for name in config.grid.missing():
        print(f"skipping strategy {name!r}: not installed (grid.if_installed)", file=stream)
    if dry_run:
        print(describe(cells, finished), file=sys.stdout)
        return folder
    todo = [cell for cell in cells if cell.key not in finished]
    print(f"{folder}: {len(cells)} cells, {len(cells) - len(todo)} already finished", file=stream)
    if not todo:
        return folder
    with torch_threads(threads or config.threads):
        run_cells(Bench.open(config, config_file), folder, store, todo, stream)
    return folder


class CellsFailed(TokenPruneError):
    """Some cells of a run raised; their rows hold the error, and the others' rows are in `folder`."""

    def __init__(self, folder: Path, store: ResultStore, labels: list[str]) -> None:
        super().__init__(
            f"{len(labels)} cell(s) failed, recorded with their error in {store.path} "
            f"(a rerun tries them again): {', '.join(labels)}"
        )
        self.folder = folder


def run_cells(bench: Bench, folder: Path, store: ResultStore, todo: list[Cell], stream: TextIO) -> None:
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
