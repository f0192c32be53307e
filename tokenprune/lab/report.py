"""`tokenprune report RUN_DIR...`: tables and figures from the results rows of one or more run folders.

Writes `summary.csv` (every measured field), `summary.md` (the table for a paper), and figures as
PNG and PDF: accuracy vs prefill FLOPs per strategy with the Pareto front, fidelity vs the
fraction of visual tokens removed, measured prefill speed-up vs the FLOPs bound, and per strategy
the patches of the sample image that survive (or the merge groups that form). Shards merge:
give every folder (or copy their results files into one). Rows of several seeds of one cell
average into one point of a curve.
"""

from __future__ import annotations

import csv
import json
import statistics
from collections import Counter, defaultdict
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib import colormaps
from matplotlib.collections import LineCollection
from matplotlib.figure import Figure
from PIL import Image

from tokenprune.errors import ConfigError
from tokenprune.lab.results import merge_rows, results_files
from tokenprune.lab.timing import NOISY_SPREAD

SAMPLE_IMAGE = "sample.png"
SURVIVAL_PANELS = 8  # per strategy figure, the cells shown (by layer, then ratio)
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
Row = dict[str, Any]


def build_report(folders: Sequence[str | Path], out: str | Path | None = None) -> list[Path]:
    """Every table and figure from the rows of `folders`, written to `out` (default: the first folder)."""
    folders = [Path(f) for f in folders]
    every = merge_rows(results_files(folders))
    rows = [row for row in every if "error" not in row]  # the measured cells; failed ones are listed
    if not rows:
        raise ConfigError(f"no measured results rows in {', '.join(map(str, folders))} (results*.jsonl)")
    out = Path(out) if out is not None else folders[0]
    out.mkdir(parents=True, exist_ok=True)
    written = [write_csv(every, out / "summary.csv"), write_markdown(every, out / "summary.md")]
    written += save(pareto_figure(rows), out / "accuracy-vs-flops")
    written += save(fidelity_figure(rows), out / "fidelity-vs-ratio")
    written += save(speedup_figure(rows), out / "speedup-vs-flops-bound")
    image = _sample_image(folders)
    for strategy, figure in survival_figures(rows, image).items():
        written += save(figure, out / f"survival-{strategy}")
    return written


def save(figure: Figure, stem: Path) -> list[Path]:
    """`stem.png` and `stem.pdf`, without timestamps (the same rows give the same files)."""
    paths = [stem.with_suffix(".png"), stem.with_suffix(".pdf")]
    figure.savefig(paths[0], dpi=150, metadata={"Software": None})
    figure.savefig(paths[1], metadata={"CreationDate": None, "Producer": None, "Creator": None})
    return paths


# -- tables -----------------------------------------------------------------------------------------


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


# -- curves -----------------------------------------------------------------------------------------


def series(rows: Sequence[Row]) -> dict[str, list[Row]]:
    """Reduced rows grouped into curves (the label without budget and seed), seeds averaged per point."""
    groups: dict[str, dict[float, list[Row]]] = defaultdict(lambda: defaultdict(list))
    for row in rows:
        if row["strategy"] != "baseline":
            groups[curve_name(row["label"])][removed(row)].append(row)
    return {name: [_mean_row(points[x]) for x in sorted(points)] for name, points in sorted(groups.items())}


def curve_name(label: str) -> str:
    """`fastv K=2 R=0.75 score=mean seed=1` -> `fastv K=2 score=mean`: the budget and seed dropped."""
    return " ".join(part for part in label.split() if not part.startswith(("R=", "keep=", "seed=")))


def curve_styles(names: Sequence[str]) -> dict[str, dict[str, Any]]:
    """A colour per strategy, a line style and marker per variant (layers, params) of it."""
    strategies = sorted({name.split()[0] for name in names})
    variants = sorted({name.partition(" ")[2] for name in names})
    palette, lines, markers = colormaps["tab10"], ("-", "--", ":", "-."), ("o", "s", "^", "D")
    styles = {}
    for name in names:
        strategy, _, variant = name.partition(" ")
        number = variants.index(variant)
        styles[name] = {
            "color": palette(strategies.index(strategy) % 10),
            "linestyle": lines[number % len(lines)],
            "marker": markers[number % len(markers)],
        }
    return styles


def removed(row: Row) -> float:
    """The fraction of visual tokens a cell removed, as measured (also for `keep` budgets)."""
    before = row["visual_tokens_before"]
    return 1.0 - row["visual_tokens_after"] / before if before else 0.0


def _mean_row(rows: list[Row]) -> Row:
    """One row of several (seeds of one cell): its numeric fields averaged where every row has them."""
    numeric = {k for k, v in rows[0].items() if isinstance(v, int | float) and not isinstance(v, bool)}
    mean = {
        k: statistics.mean(r[k] for r in rows) for k in numeric if all(r.get(k) is not None for r in rows)
    }
    return {**rows[0], **mean}


def _baseline(rows: Sequence[Row]) -> Row | None:
    """The unreduced row, if the rows hold one."""
    return next((row for row in rows if row["strategy"] == "baseline"), None)


def pareto_figure(rows: Sequence[Row]) -> Figure:
    """Accuracy (exact match) vs prefill GFLOPs per sample: one curve per strategy, the Pareto front."""
    figure = Figure(figsize=(8, 4.4), layout="constrained")
    ax = figure.add_subplot()
    points = []
    curves = series(rows)
    styles = curve_styles(list(curves))
    for name, curve in curves.items():
        x = [r["prefill_flops"] / 1e9 for r in curve]
        y = [r["accuracy_exact"] for r in curve]
        ax.plot(x, y, label=name, **styles[name])
        points += zip(x, y, strict=True)
    baseline = _baseline(rows)
    if baseline is not None:
        point = (baseline["prefill_flops"] / 1e9, baseline["accuracy_exact"])
        ax.plot(*point, marker="*", markersize=14, color="black", linestyle="none", label="unreduced")
        points.append(point)
    front = pareto_front(points)
    ax.step(*zip(*front, strict=True), where="post", color="grey", linestyle="--", label="Pareto front")
    ax.set(xlabel="prefill GFLOPs per sample (decoder)", ylabel="accuracy (exact match)")
    ax.set_title("Accuracy vs FLOPs")
    ax.grid(alpha=0.3)
    figure.legend(loc="outside right upper", fontsize="small")
    return figure


def pareto_front(points: Sequence[tuple[float, float]]) -> list[tuple[float, float]]:
    """The points no other point beats on both cost (lower x) and accuracy (higher y), by cost."""
    front: list[tuple[float, float]] = []
    for x, y in sorted(points, key=lambda p: (p[0], -p[1])):
        if not front or y > front[-1][1]:
            front.append((x, y))
    return front


def fidelity_figure(rows: Sequence[Row]) -> Figure:
    """First-token top-1 agreement and KL against the unreduced model vs the fraction removed."""
    figure = Figure(figsize=(11.5, 4), layout="constrained")
    agree, kl = figure.subplots(1, 2)
    curves = series(rows)
    styles = curve_styles(list(curves))
    for name, curve in curves.items():
        x = [removed(r) for r in curve]
        agree.plot(x, [r["top1_agreement"] for r in curve], label=name, **styles[name])
        kl.plot(x, [r["first_token_kl"] for r in curve], label=name, **styles[name])
    agree.set(xlabel="visual tokens removed", ylabel="first-token top-1 agreement", ylim=(-0.02, 1.02))
    kl.set(xlabel="visual tokens removed", ylabel="first-token KL (unreduced || reduced)")
    kl.set_yscale("symlog", linthresh=1e-3)
    for ax in (agree, kl):
        ax.grid(alpha=0.3)
    figure.legend(*agree.get_legend_handles_labels(), loc="outside right upper", fontsize="small")
    figure.suptitle("Fidelity to the unreduced model")
    return figure


def speedup_figure(rows: Sequence[Row]) -> Figure:
    """Measured prefill speed-up vs the FLOPs bound (unreduced FLOPs / reduced FLOPs), y = x for reference."""
    figure = Figure(figsize=(7.2, 4.6), layout="constrained")
    ax = figure.add_subplot()
    top = 1.0
    curves = series(rows)
    styles = curve_styles(list(curves))
    for name, curve in curves.items():
        timed = [r for r in curve if r.get("prefill_speedup") is not None]  # None: not finite, no point
        bound = [1 / r["flops_ratio"] for r in timed]
        measured = [r["prefill_speedup"] for r in timed]
        ax.plot(bound, measured, label=name, **{**styles[name], "linestyle": "none"})
        top = max([top, *bound, *measured])
    ax.plot([1, top], [1, top], color="grey", linestyle="--", label="FLOPs bound")
    ax.set(xlabel="FLOPs bound (x)", ylabel="measured prefill speed-up (x)")
    ax.set_title("Measured speed-up vs FLOPs bound")
    ax.grid(alpha=0.3)
    figure.legend(loc="outside right upper", fontsize="small")
    return figure


# -- which patches survive ------------------------------------------------------------------------


def survival_figures(rows: Sequence[Row], image: Image.Image | None) -> dict[str, Figure]:
    """Per strategy, its cells' survival maps over the sample image (first seed of each cell)."""
    by_strategy: dict[str, dict[str, Row]] = defaultdict(dict)
    for row in rows:
        if row.get("survival") is not None:
            name = row["label"].removesuffix(f" seed={row['seed']}")
            by_strategy[row["strategy"]].setdefault(name, row)
    figures = {}
    for strategy, cells in by_strategy.items():
        chosen = sorted(cells.values(), key=lambda r: (r["layer"] or 0, removed(r)))[:SURVIVAL_PANELS]
        figures[strategy] = survival_figure(chosen, image)
    return figures


def survival_figure(rows: Sequence[Row], image: Image.Image | None) -> Figure:
    """One panel per row: removed patches dark, each merge group tinted and outlined."""
    figure = Figure(figsize=(2.6 * len(rows), 3.0), layout="constrained")
    axes = figure.subplots(1, len(rows), squeeze=False)[0]
    for ax, row in zip(axes, rows, strict=True):
        height, width = row["survival"]["grid"]
        state = np.asarray(row["survival"]["state"]).reshape(height, width)
        background = image if image is not None else Image.new("RGB", (width, height), (128, 128, 128))
        extent = (0, width, height, 0)
        ax.imshow(background, extent=extent)
        ax.imshow(survival_overlay(state), extent=extent, interpolation="nearest")
        ax.add_collection(LineCollection(group_borders(state), colors="white", linewidths=0.8))
        kept = len(np.unique(state[state >= 0]))
        ax.set_title(f"{row['label']}\n{kept}/{height * width} kept", fontsize="small")
        ax.set_xticks([])
        ax.set_yticks([])
    figure.suptitle(f"{rows[0]['strategy']}: visual tokens kept on the sample image")
    return figure


def merge_groups(state: np.ndarray) -> np.ndarray:
    """The survivors that hold more than one grid cell (merge groups)."""
    survivors, sizes = np.unique(state[state >= 0], return_counts=True)
    return survivors[sizes > 1]


def survival_overlay(state: np.ndarray) -> np.ndarray:
    """[H, W, 4] RGBA: removed cells dark, merge groups tinted (neighbours apart), tokens kept alone clear."""
    overlay = np.zeros((*state.shape, 4))
    overlay[state < 0] = (0.0, 0.0, 0.0, 0.75)
    palette = colormaps["tab20"]
    for group, colour in group_colours(state).items():
        overlay[state == group] = (*palette(colour)[:3], 0.55)
    return overlay


def group_colours(state: np.ndarray) -> dict[int, int]:
    """A tab20 index per merge group, greedily different from the groups it touches."""
    touching: dict[int, set[int]] = defaultdict(set)
    for a, b in ((state[:, :-1], state[:, 1:]), (state[:-1, :], state[1:, :])):
        for x, y in zip(a.ravel().tolist(), b.ravel().tolist(), strict=True):
            if x != y:
                touching[x].add(y)
                touching[y].add(x)
    colours: dict[int, int] = {}
    for group in merge_groups(state).tolist():
        used = {colours[n] for n in touching[group] if n in colours}
        colours[group] = next((c for c in range(20) if c not in used), len(colours) % 20)
    return colours


def group_borders(state: np.ndarray) -> list[tuple[tuple[int, int], tuple[int, int]]]:
    """Grid edges (x, y) between two cells in different groups where one is a merge group."""
    merged = set(merge_groups(state).tolist())
    height, width = state.shape
    edges = []
    for r in range(height):
        for c in range(width):
            here = state[r, c]
            if c + 1 < width and here != state[r, c + 1] and {here, state[r, c + 1]} & merged:
                edges.append(((c + 1, r), (c + 1, r + 1)))
            if r + 1 < height and here != state[r + 1, c] and {here, state[r + 1, c]} & merged:
                edges.append(((c, r + 1), (c + 1, r + 1)))
    return edges


def _sample_image(folders: Sequence[Path]) -> Image.Image | None:
    """The sample image the runner saved in the first folder that has one."""
    for folder in folders:
        path = folder / SAMPLE_IMAGE
        if path.exists():
            with Image.open(path) as image:
                return image.convert("RGB")
    return None
