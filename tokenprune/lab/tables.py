"""The tables of a report: `summary.csv`, `summary.md` and `comparisons.csv`.

- `summary.csv`: every measured field of every row (one line per cell and seed), the environment,
  and what the report derives: total FLOPs, the seeds' accuracy spread, the accuracy difference from
  the baseline with its interval and McNemar's p.
- `summary.md`: the table for a paper, one line per cell with its seeds together (mean ± standard
  deviation over them), units in the headers and a legend of the columns under it.
- `comparisons.csv`: every two cells on the same samples: their accuracy difference and McNemar's test.

The statistics (`tokenprune.lab.stats`) come from the rows' per-sample predictions
(`tokenprune.lab.predictions`); rows written without them leave those columns blank.
"""

from __future__ import annotations

import csv
import itertools
import json
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tokenprune.lab.predictions import SamplePredictions, has_predictions
from tokenprune.lab.results import Row, baseline_for, cell_group
from tokenprune.lab.stats import BOOTSTRAP_SEED, CONFIDENCE, RESAMPLES, Comparison, Spread, compare, spread
from tokenprune.lab.timing import NOISY_SPREAD

CSV_FIELDS = (
    "index",
    "label",
    "strategy",
    "layer",
    "site",
    "ratio",
    "keep",
    "params",
    "seed",
    "samples",
    "visual_tokens_before",
    "visual_tokens_after",
    "accuracy_exact",
    "accuracy_contains",
    "top1_agreement",
    "first_token_kl",
    "continuation_match",
    "prefill_flops",
    "baseline_prefill_flops",
    "flops_ratio",
    "tower_flops",
    "baseline_tower_flops",
    "prefill_s",
    "baseline_prefill_s",
    "prefill_speedup",
    "prefill_spread",
    "decode_s_per_token",
    "baseline_decode_s_per_token",
    "decode_speedup",
    "decode_spread",
    "timing_repeats",
    "timing_decode_tokens",
    "timing_flags",
    "kv_cache_bytes",
    "baseline_kv_cache_bytes",
    "peak_memory_bytes",
    "baseline_peak_memory_bytes",
    "overhead_s",
    "error",
    "key",
)


DERIVED_FIELDS = (
    "total_flops",
    "seeds",
    "accuracy_exact_seed_mean",
    "accuracy_exact_seed_std",
    "accuracy_exact_diff",
    "accuracy_exact_diff_low",
    "accuracy_exact_diff_high",
    "mcnemar_p",
)
ENVIRONMENT_FIELDS = ("device", "device_name", "torch", "transformers", "tokenprune")
COMPARISON_FIELDS = (
    "a",
    "b",
    "a_keys",
    "b_keys",
    "samples",
    "a_accuracy_exact",
    "b_accuracy_exact",
    "difference",
    "only_a_right",
    "only_b_right",
    "mcnemar_p",
)


@dataclass(frozen=True)
class Line:
    """One cell with its seeds (one row each), and its accuracy against the baseline."""

    rows: list[Row]
    comparison: Comparison | None  # None: the baseline itself, or nothing to compare

    @property
    def label(self) -> str:
        """The cell's label; with several seeds, without the seed."""
        label = self.rows[0]["label"]
        if len(self.rows) == 1:
            return label
        return " ".join(part for part in label.split() if not part.startswith("seed="))

    @property
    def is_baseline(self) -> bool:
        """Whether this is the unreduced baseline."""
        return self.rows[0].get("strategy") == "baseline"

    @property
    def predictions(self) -> list[SamplePredictions] | None:
        """The seeds' per-sample predictions, or None when a seed's row has none."""
        return _predictions_of(self.rows)

    def value(self, field: str) -> float | None:
        """A numeric field, averaged over the seeds (None when a seed lacks it)."""
        values = [row.get(field) for row in self.rows]
        return None if any(v is None for v in values) else sum(values) / len(values)

    def spread(self, field: str) -> Spread | None:
        """Mean, standard deviation and count of a field over the seeds (None when a seed lacks it)."""
        values = [row.get(field) for row in self.rows]
        return None if None in values else spread(values)


@dataclass(frozen=True)
class Summary:
    """The rows of a report, their cells as lines, and each measured row's accuracy against the baseline."""

    rows: list[Row]
    lines: list[Line]
    by_row: dict[str, Comparison | None]  # by `row_id`


def summarize(rows: Sequence[Row]) -> Summary:
    """Group the measured rows into cells (seeds together) and compare each with its run's baseline."""
    measured = [row for row in rows if "error" not in row]
    lines = [Line(group, _against(_reference(measured, group[0]), group)) for group in seed_groups(measured)]
    by_row: dict[str, Comparison | None] = {}
    for line in lines:
        reference = _reference(measured, line.rows[0])
        for row in line.rows:
            by_row[row_id(row)] = line.comparison if len(line.rows) == 1 else _against(reference, [row])
    return Summary(list(rows), lines, by_row)


def row_id(row: Row) -> str:
    """A row's cell key and run fingerprint: unique among the rows of a report, mixed ones included."""
    return f"{row['key']}/{row.get('fingerprint')}"


def _reference(measured: Sequence[Row], row: Row) -> SamplePredictions | None:
    """The per-sample predictions of the baseline of `row`'s run, when it has them."""
    baseline = baseline_for(measured, row)
    return SamplePredictions.of(baseline) if baseline and has_predictions(baseline) else None


def seed_groups(rows: Sequence[Row]) -> list[list[Row]]:
    """The rows grouped by cell, seeds apart (the same reduction but for its `seed`), in row order."""
    groups: dict[str, list[Row]] = {}
    for row in rows:
        groups.setdefault(cell_group(row), []).append(row)
    return list(groups.values())


def _against(reference: SamplePredictions | None, rows: list[Row]) -> Comparison | None:
    """Exact-match accuracy of `rows` (seeds of one cell) against the baseline's, when both have
    per-sample predictions on the same samples; None otherwise and for the baseline itself."""
    seeds = _predictions_of(rows)
    if reference is None or seeds is None or rows[0].get("strategy") == "baseline":
        return None
    if not all(reference.same_samples(p) for p in seeds):
        return None
    return compare([reference], seeds)


def _predictions_of(rows: Sequence[Row]) -> list[SamplePredictions] | None:
    """Each row's per-sample predictions, or None when a row has none."""
    if not all(has_predictions(row) for row in rows):
        return None
    return [SamplePredictions.of(row) for row in rows]


def write_tables(rows: Sequence[Row], folder: Path) -> list[Path]:
    """`summary.csv`, `summary.md` and `comparisons.csv` of `rows` in `folder` (statistics done once)."""
    summary = summarize(rows)
    return [
        write_csv(summary, folder / "summary.csv"),
        write_markdown(summary, folder / "summary.md"),
        write_comparisons(summary, folder / "comparisons.csv"),
    ]


def write_csv(summary: Summary, path: Path) -> Path:
    """Every measured field of every row, what the report derives from it, and its environment."""
    line_of = {row_id(row): line for line in summary.lines for row in line.rows}
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow([*CSV_FIELDS, *DERIVED_FIELDS, *ENVIRONMENT_FIELDS])
        for row in summary.rows:
            values = [_csv_value(row, f) for f in CSV_FIELDS]
            derived = _derived(row, line_of.get(row_id(row)), summary.by_row.get(row_id(row)))
            environment = [row.get("environment", {}).get(e) for e in ENVIRONMENT_FIELDS]
            writer.writerow([*values, *derived, *environment])
    return path


def _derived(row: Row, line: Line | None, comparison: Comparison | None) -> list[Any]:
    """The DERIVED_FIELDS of one row (blank for a failed row and where there is nothing to compare)."""
    seeds = None if line is None else line.spread("accuracy_exact")
    interval = None if comparison is None else comparison.interval
    return [
        total_flops(row),
        None if seeds is None else seeds.n,
        None if seeds is None else seeds.mean,
        None if seeds is None else seeds.std,
        None if comparison is None else comparison.difference,
        None if interval is None else interval.low,
        None if interval is None else interval.high,
        None if comparison is None or comparison.mcnemar is None else comparison.mcnemar.p_value,
    ]


def total_flops(row: Row) -> float | None:
    """Decoder prefill plus vision tower FLOPs per sample; None where the tower is not counted."""
    decoder, tower = row.get("prefill_flops"), row.get("tower_flops")
    return None if decoder is None or tower is None else decoder + tower


def write_comparisons(summary: Summary, path: Path) -> Path:
    """Every two cells with per-sample predictions on the same samples: accuracy difference (b - a)
    and McNemar's exact test (cells of one seed each)."""
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(COMPARISON_FIELDS)
        lines = [(line, line.predictions) for line in summary.lines]
        for (a, a_seeds), (b, b_seeds) in itertools.combinations(lines, 2):
            if a_seeds and b_seeds and a_seeds[0].same_samples(b_seeds[0]):
                writer.writerow(_comparison_line(a, b, compare(a_seeds, b_seeds, interval=False)))
    return path


def _comparison_line(a: Line, b: Line, comparison: Comparison) -> list[Any]:
    """One line of `comparisons.csv`."""
    test = comparison.mcnemar
    return [
        a.label,
        b.label,
        " ".join(row["key"] for row in a.rows),
        " ".join(row["key"] for row in b.rows),
        a.rows[0]["samples"],
        a.value("accuracy_exact"),
        b.value("accuracy_exact"),
        comparison.difference,
        None if test is None else test.only_reference,
        None if test is None else test.only_other,
        None if test is None else test.p_value,
    ]


def _csv_value(row: Row, field: str) -> Any:
    """One CSV cell: `params` as JSON, `timing_flags` as `; `-joined text, the rest as they are."""
    if field == "params":
        return json.dumps(row.get(field), sort_keys=True)
    if field == "timing_flags":
        return "; ".join(row.get(field) or [])
    return row.get(field)


@dataclass(frozen=True)
class Column:
    """A column of summary.md: its header (units; `{batch}`: the timing batch), its cells, its legend."""

    header: str
    cell: Callable[[Line], str]
    legend: str
    cache_only: bool = False  # shown only where a cell has a `site: cache` stage


def _scaled(field: str, scale: float = 1.0, digits: str = ".3g") -> Callable[[Line], str]:
    """A cell showing a field (mean over seeds) times `scale`; blank where a row has none."""

    def cell(line: Line) -> str:
        value = line.value(field)
        return "" if value is None else format(value * scale, digits)

    return cell


def _accuracy(field: str) -> Callable[[Line], str]:
    """A cell showing an accuracy in percent; over several seeds `mean ± std (n=seeds)`."""

    def cell(line: Line) -> str:
        seeds = line.spread(field)
        if seeds is None:
            return ""
        if seeds.std is None:
            return f"{100 * seeds.mean:.1f}"
        return f"{100 * seeds.mean:.1f} ± {100 * seeds.std:.1f} (n={seeds.n})"

    return cell


def _difference(line: Line) -> str:
    """The accuracy difference from the baseline in points, with its interval."""
    if line.is_baseline:
        return "(baseline)"
    if line.comparison is None or line.comparison.interval is None:
        return ""
    interval = line.comparison.interval
    return f"{100 * interval.estimate:+.1f} [{100 * interval.low:+.1f}, {100 * interval.high:+.1f}]"


def _mcnemar(line: Line) -> str:
    """McNemar's p against the baseline, two significant digits."""
    test = None if line.comparison is None else line.comparison.mcnemar
    return "" if test is None else f"{test.p_value:.2g}"


def _bound(line: Line) -> str:
    """The decoder FLOPs bound: the inverse of the FLOPs ratio."""
    ratio = line.value("flops_ratio")
    return "" if not ratio else f"{1 / ratio:.2f}"


def _total_gflops(line: Line) -> str:
    """Decoder plus tower GFLOPs per sample (mean over seeds); blank where the tower is not counted."""
    totals = [total_flops(row) for row in line.rows]
    return "" if None in totals else f"{sum(totals) / len(totals) / 1e9:.3g}"


def _flags(line: Line) -> str:
    """The timing flags of the seeds' rows, each once."""
    return "; ".join(dict.fromkeys(flag for row in line.rows for flag in row.get("timing_flags") or []))


LEGEND_TITLE = "Columns (a cell of several seeds shows the mean of its rows, except where said):"
MARKDOWN_COLUMNS: tuple[Column, ...] = (
    Column(
        "cell",
        lambda line: line.label,
        "strategy, layer K it acts at (`K=v1`: vision-tower layer 1), budget (R: fraction of the "
        "visual tokens removed; keep: tokens kept) and the parameters that differ from the defaults",
    ),
    Column(
        "visual tokens kept", _scaled("visual_tokens_after", digits=".0f"), "per sample, after the last stage"
    ),
    Column(
        "accuracy EM (%)",
        _accuracy("accuracy_exact"),
        "exact match after normalisation; a cell of several seeds: mean ± standard deviation (n=seeds)",
    ),
    Column(
        f"Δ EM vs baseline (pp, {CONFIDENCE:.0%} CI)",
        _difference,
        "exact-match accuracy minus the baseline's on the same samples, in percentage points, with its "
        f"{CONFIDENCE:.0%} paired bootstrap interval ({RESAMPLES:,} resamples of the samples, seed "
        f"{BOOTSTRAP_SEED}); several seeds: of each sample's accuracy averaged over them; blank: no "
        "per-sample predictions to compare (see the note below)",
    ),
    Column(
        "McNemar p",
        _mcnemar,
        "two-sided exact McNemar test against the baseline: a binomial test on the samples only one of "
        "the two answered right (cells of one seed)",
    ),
    Column(
        "accuracy contains (%)",
        _accuracy("accuracy_contains"),
        "an accepted answer appears in the answer as whole words; seeds as for EM",
    ),
    Column("top-1 agree (%)", _scaled("top1_agreement", 100, ".1f"), "first token as the unreduced model's"),
    Column(
        "KL (nats)", _scaled("first_token_kl"), "KL(unreduced ‖ cell) of the first token, mean over samples"
    ),
    Column(
        "same answer (%)", _scaled("continuation_match", 100, ".1f"), "greedy answer as the unreduced model's"
    ),
    Column(
        "decoder GFLOPs per sample",
        _scaled("prefill_flops", 1e-9),
        "decoder prefill (multiply-accumulate = 2), without the vision tower and the LM head",
    ),
    Column("decoder FLOPs bound (x)", _bound, "the baseline's decoder FLOPs over the cell's"),
    Column("tower GFLOPs per sample", _scaled("tower_flops", 1e-9), "vision tower (blank: not counted)"),
    Column(
        "total GFLOPs per sample",
        _total_gflops,
        "decoder prefill + vision tower: the cost on which pruning in the tower and in the language model "
        "compare (blank where the tower is not counted)",
    ),
    Column(
        "prefill ms per {batch}", _scaled("prefill_s", 1e3), "time to the first token, median of the rounds"
    ),
    Column(
        "prefill speed-up (x)",
        _scaled("prefill_speedup", digits=".2f"),
        "median of the paired ratios, inverted",
    ),
    Column(
        "prefill spread (%)",
        _scaled("prefill_spread", 100, ".1f"),
        "interquartile range of the ratios / median",
    ),
    Column("decode ms per token ({batch})", _scaled("decode_s_per_token", 1e3), "median of the rounds"),
    Column("decode speed-up (x)", _scaled("decode_speedup", digits=".2f"), "as for prefill"),
    Column("decode spread (%)", _scaled("decode_spread", 100, ".1f"), "as for prefill"),
    Column("KV cache KiB per sample", _scaled("kv_cache_bytes", 1 / 1024, ".4g"), "after the prefill"),
    Column(
        "KV cache KiB per sample after decoding",
        _scaled("kv_cache_bytes_decoded", 1 / 1024, ".4g"),
        "after the timed generation: `site: cache` stages prune it between decode steps",
        cache_only=True,
    ),
    Column(
        "overhead ms per prefill ({batch})",
        _scaled("overhead_s", 1e3),
        "the strategy's own selection time (scores, top-k) in one prefill",
    ),
    Column("flag", _flags, "why a row's times should not be printed as they are"),
)


def write_markdown(summary: Summary, path: Path) -> Path:
    """The table (one line per cell), the column legend, how it was measured, the cells that failed."""
    measured = [row for row in summary.rows if "error" not in row]
    batch = _timing_batch(measured)
    columns = markdown_columns(summary.rows)
    headers = [column.header.format(batch=batch) for column in columns]
    lines = [
        "| " + " | ".join(headers) + " |",
        "| " + " | ".join("---" if i == 0 else "---:" for i in range(len(headers))) + " |",
    ]
    lines += ["| " + " | ".join(c.cell(line) for c in columns) + " |" for line in summary.lines]
    lines += lmms_eval_table(summary.lines)
    legend = [f"- **{h}**: {c.legend}" for h, c in zip(headers, columns, strict=True)]
    failed = [f"- {row['label']}: {row['error']}" for row in summary.rows if "error" in row]
    failures = ["Failed cells (no measurement):", "", *failed, ""] if failed else []
    notes = [_footnote(measured), *_uncompared(summary.lines)]
    path.write_text("\n".join([*lines, "", LEGEND_TITLE, "", *legend, "", *notes, "", *failures]))
    return path


def markdown_columns(rows: Sequence[Row]) -> list[Column]:
    """The markdown table's columns: those of `site: cache` stages only where a cell has one."""
    cached = any(has_cache_stage(row) for row in rows)
    return [column for column in MARKDOWN_COLUMNS if cached or not column.cache_only]


def has_cache_stage(row: Row) -> bool:
    """Whether the row's cell has a `site: cache` stage (it prunes the KV cache while decoding)."""
    reduction = row.get("cell", {}).get("reduction") or {}
    return any(stage.get("site") == "cache" for stage in reduction.get("stages", []))


def lmms_eval_table(lines: Sequence[Line]) -> list[str]:
    """The metrics lmms-eval reported, per task, one line per cell (none when no row ran lmms-eval)."""
    columns = sorted(
        {
            (task, metric)
            for line in lines
            for row in line.rows
            for task, metrics in row.get("lmms_eval", {}).items()
            for metric in metrics
        }
    )
    if not columns:
        return []
    header = ["cell", *(f"{task} {metric}" for task, metric in columns)]
    table = ["", "lmms-eval's metrics per task (mean over seeds):", ""]
    table += ["| " + " | ".join(header) + " |", "| --- |" + " ---: |" * len(columns)]
    for line in lines:
        values = [_lmms_eval_value(line, task, metric) for task, metric in columns]
        table.append("| " + " | ".join([line.label, *values]) + " |")
    return table


def _lmms_eval_value(line: Line, task: str, metric: str) -> str:
    """One lmms-eval metric of a cell, the mean over its seeds; blank where a seed lacks it."""
    values = [row.get("lmms_eval", {}).get(task, {}).get(metric) for row in line.rows]
    return "" if None in values else f"{sum(values) / len(values):.4g}"


def _timing_batch(rows: Sequence[Row]) -> str:
    """`batch of N` when every row was timed on N samples, else `timing batch`."""
    sizes = {_timed_samples(row) for row in rows}
    size = sizes.pop() if len(sizes) == 1 else None
    return "timing batch" if size is None else f"batch of {size}"


def _timed_samples(row: Row) -> int | None:
    """The samples a row was timed on: `timing.batch_size` (at most the samples); None when unrecorded."""
    if row.get("timing_batch_size") is not None:
        return row["timing_batch_size"]
    size = (row.get("timing") or {}).get("batch_size")
    return None if size is None else min(size, row["samples"])


def _uncompared(lines: Sequence[Line]) -> list[str]:
    """A note naming the cells without a comparison with the baseline, when there are any."""
    missing = [line.label for line in lines if not line.is_baseline and line.comparison is None]
    if not missing:
        return []
    return [
        "",
        "No accuracy comparison with the baseline (no per-sample predictions in the rows, or not on the "
        f"baseline's samples): {', '.join(missing)}.",
    ]


def _footnote(rows: Sequence[Row]) -> str:
    """Where and how the rows were measured."""
    environment = rows[0].get("environment", {})
    samples = sorted({row["samples"] for row in rows})
    return (
        f"{len(rows)} cells, {'/'.join(map(str, samples))} samples each; {environment.get('device')} "
        f"({environment.get('device_name')}, threads={environment.get('threads')}), torch "
        f"{environment.get('torch')}, transformers {environment.get('transformers')}, tokenprune "
        f"{environment.get('tokenprune')}. FLOPs: decoder prefill per sample (multiply-accumulate = 2). "
        + _timing_methods(rows)
    )


def _timing_methods(rows: Sequence[Row]) -> str:
    """How the times of the rows were taken; when rows were timed differently, each way with its count."""
    methods = Counter(_timing_method(row) for row in rows)
    if len(methods) == 1:
        return next(iter(methods))
    counts = "; ".join(
        f"{count} {'cell' if count == 1 else 'cells'}: {method.removeprefix('Times: ')}"
        for method, count in methods.items()
    )
    return f"Times by mixed timing methods, not comparable across them (rerun to re-measure): {counts}"


def _timing_method(row: Row) -> str:
    """How the times of one row were taken (rows written before paired timing say so)."""
    if "timing_repeats" not in row:
        return (
            "Times: medians on the first batch after warm-up, each cell interleaved with a fresh baseline "
            "measurement; speed-ups are against that baseline (no spread: measured before paired timing)."
        )
    return (
        f"Times: on the timing batch, each cell against the baseline in {row['timing_repeats']} paired, "
        "order-alternating rounds after warm-up; a speed-up is the median of the per-round ratios, its "
        f"spread their interquartile range over the median (flagged above {NOISY_SPREAD:.0%}); decode "
        f"over {row['timing_decode_tokens']} new tokens. The baseline row is the baseline against itself."
    )
