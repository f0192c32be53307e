"""The tables of a report: `summary.csv` (every measured field) and `summary.md` (the table for a paper)."""

from __future__ import annotations

import csv
import json
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from tokenprune.lab.results import Row
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


def write_csv(rows: Sequence[Row], path: Path) -> Path:
    """Every measured field of every row, plus the environment it was measured in."""
    environment = ("device", "device_name", "torch", "transformers", "tokenprune")
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow([*CSV_FIELDS, *environment])
        for row in rows:
            values = [_csv_value(row, f) for f in CSV_FIELDS]
            writer.writerow([*values, *(row.get("environment", {}).get(e) for e in environment)])
    return path


def _csv_value(row: Row, field: str) -> Any:
    """One CSV cell: `params` as JSON, `timing_flags` as `; `-joined text, the rest as they are."""
    if field == "params":
        return json.dumps(row.get(field), sort_keys=True)
    if field == "timing_flags":
        return "; ".join(row.get(field) or [])
    return row.get(field)


MARKDOWN_COLUMNS: tuple[tuple[str, Callable[[Row], str]], ...] = (
    ("cell", lambda r: r["label"]),
    ("visual tokens", lambda r: f"{r['visual_tokens_after']:.0f}"),
    ("accuracy EM", lambda r: _percent(r["accuracy_exact"])),
    ("accuracy contains", lambda r: _percent(r["accuracy_contains"])),
    ("top-1 agree", lambda r: _percent(r["top1_agreement"])),
    ("KL", lambda r: f"{r['first_token_kl']:.3g}"),
    ("same answer", lambda r: _percent(r["continuation_match"])),
    ("prefill GFLOPs", lambda r: f"{r['prefill_flops'] / 1e9:.3g}"),
    ("FLOPs bound", lambda r: f"{1 / r['flops_ratio']:.2f}x"),
    ("tower GFLOPs", lambda r: "" if r.get("tower_flops") is None else f"{r['tower_flops'] / 1e9:.3g}"),
    ("prefill ms", lambda r: f"{r['prefill_s'] * 1e3:.3g}"),
    ("prefill speed-up", lambda r: _optional_speedup(r.get("prefill_speedup"))),
    ("prefill spread", lambda r: _optional_percent(r.get("prefill_spread"))),
    ("decode ms/token", lambda r: f"{r['decode_s_per_token'] * 1e3:.3g}"),
    ("decode speed-up", lambda r: _optional_speedup(r.get("decode_speedup"))),
    ("decode spread", lambda r: _optional_percent(r.get("decode_spread"))),
    ("KV cache KiB/sample", lambda r: f"{r['kv_cache_bytes'] / 1024:.4g}"),
    ("overhead ms", lambda r: "" if r["overhead_s"] is None else f"{r['overhead_s'] * 1e3:.3g}"),
    ("flag", lambda r: "; ".join(r.get("timing_flags") or [])),
)


def write_markdown(rows: Sequence[Row], path: Path) -> Path:
    """The summary table (one line per measured cell), how it was measured, and the cells that failed."""
    measured = [row for row in rows if "error" not in row]
    headers = [name for name, _ in MARKDOWN_COLUMNS]
    lines = [
        "| " + " | ".join(headers) + " |",
        "| " + " | ".join("---" if i == 0 else "---:" for i in range(len(headers))) + " |",
    ]
    lines += ["| " + " | ".join(cell(row) for _, cell in MARKDOWN_COLUMNS) + " |" for row in measured]
    failed = [f"- {row['label']}: {row['error']}" for row in rows if "error" in row]
    failures = ["Failed cells (no measurement):", "", *failed, ""] if failed else []
    path.write_text("\n".join([*lines, "", _footnote(measured), "", *failures]))
    return path


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


def _optional_percent(value: float | None) -> str:
    """A percentage, or blank for a row that has none."""
    return "" if value is None else _percent(value)


def _optional_speedup(value: float | None) -> str:
    """A speed-up as `1.23x`, or blank for a row that has none."""
    return "" if value is None else f"{value:.2f}x"


def _percent(value: float) -> str:
    """A fraction as a percentage with one decimal."""
    return f"{100 * value:.1f}%"
