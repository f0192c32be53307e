"""The figures of a report: accuracy vs FLOPs with the Pareto front, fidelity vs tokens removed, measured
speed-up vs the FLOPs bound, and per strategy the survival maps of the sample image."""

from __future__ import annotations

import statistics
from collections import defaultdict
from collections.abc import Sequence
from typing import Any

import numpy as np
from matplotlib import colormaps
from matplotlib.collections import LineCollection
from matplotlib.figure import Figure
from PIL import Image

from tokenprune.lab.results import Row

SURVIVAL_PANELS = 8  # per strategy figure, the cells shown (by layer, then ratio)


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
