"""The figures of a report: accuracy vs cost with the Pareto front, fidelity vs the budget, measured
speed-up vs the FLOPs bound, and per strategy the survival maps of the sample image.

Rows group into series by their cell's fields (strategy, site, the rest of the reduction but its
budgets and seed) and into points by cell (the seeds of one cell average into one point, with
error bars of one standard deviation over seeds). Each (strategy, site) pair has its own colour and
marker, each variant of a pair (layers, params) its own line style; every point carries its budget.
A series that would hide a point of another (the same place on the axes) is drawn a few typographic
points sideways; the data are unchanged.
"""

from __future__ import annotations

import itertools
import json
import statistics
from collections import defaultdict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from matplotlib import colormaps
from matplotlib.artist import Artist
from matplotlib.axes import Axes
from matplotlib.collections import LineCollection
from matplotlib.figure import Figure
from matplotlib.patches import Patch
from matplotlib.ticker import FormatStrFormatter, SymmetricalLogLocator
from matplotlib.transforms import Transform, offset_copy
from PIL import Image

from tokenprune.errors import ConfigError
from tokenprune.lab.results import Row, cell_group, seedless_reduction

SURVIVAL_PANELS = 8  # per strategy figure, the cells shown (by site, layer, then budget)
SURVIVAL_SEEDS = 4  # per strategy figure, the seeds shown (a row of maps each)
MARKERS = (
    "o",
    "s",
    "^",
    "D",
    "v",
    "P",
    "X",
    "<",
    "h",
    ">",
    "p",
)  # 11: with 10 or 20 colours, pairs stay apart
LINE_STYLES = ("-", "--", ":", "-.")  # per variant of a pair, with
FILL_STYLES = ("full", "none", "left", "bottom")  # (markers alone, in the speed-up figure)
TOUCH = 0.02  # points closer than this (axes fraction, both ways) would hide one another
SHIFT_STEP = 6.0  # typographic points between series drawn side by side (a marker's width)
KL_LINEAR_BELOW = 1e-3  # the KL axis is logarithmic above this, linear below (KL may be 0)
LABEL_CLEARANCE = 0.03  # a budget label is left out where the same text is this close (axes fraction)


# -- what is plotted ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Quantity:
    """A plotted quantity: a short name (titles), an axis label, its value in a row (None: not measured)."""

    name: str
    label: str
    value: Callable[[Row], float | None]


def _field(name: str, scale: float = 1.0) -> Callable[[Row], float | None]:
    """A row's field `name` divided by `scale` (None when the row has none)."""

    def value(row: Row) -> float | None:
        return None if row.get(name) is None else row[name] / scale

    return value


def _total_gflops(row: Row) -> float:
    """Prefill GFLOPs of the decoder and the vision tower together; refused when the tower is not counted."""
    if row.get("tower_flops") is None:
        raise ConfigError(
            f"--x total-flops: row {row['label']!r} has no `tower_flops` (its model exposes no single "
            "vision tower); use --x flops or --x tokens"
        )
    return (row["prefill_flops"] + row["tower_flops"]) / 1e9


def removed(row: Row) -> float:
    """The fraction of visual tokens a cell removed, as measured (also for `keep` budgets)."""
    before = row["visual_tokens_before"]
    return 1.0 - row["visual_tokens_after"] / before if before else 0.0


X_AXES = {
    "tokens": Quantity(
        "tokens kept", "visual tokens kept per sample (after the last stage)", _field("visual_tokens_after")
    ),
    "flops": Quantity("decoder FLOPs", "prefill GFLOPs per sample (decoder)", _field("prefill_flops", 1e9)),
    "total-flops": Quantity(
        "total FLOPs", "prefill GFLOPs per sample (decoder + vision tower)", _total_gflops
    ),
}
REMOVED = Quantity("fraction removed", "visual tokens removed (fraction, measured)", removed)
ACCURACY = Quantity("accuracy", "accuracy (exact match)", _field("accuracy_exact"))
AGREEMENT = Quantity("agreement", "first-token top-1 agreement", _field("top1_agreement"))
KL = Quantity("KL", "first-token KL (unreduced || reduced)", _field("first_token_kl"))
SPEEDUP = Quantity("speed-up", "measured prefill speed-up (x)", _field("prefill_speedup"))
FLOPS_BOUND = Quantity(
    "FLOPs bound", "FLOPs bound (x): unreduced / reduced decoder FLOPs", lambda r: 1 / r["flops_ratio"]
)


def x_axis(name: str) -> Quantity:
    """The x quantity of the accuracy figure by its name (`--x`)."""
    if name not in X_AXES:
        raise ConfigError(f"--x: {name!r} is not one of {', '.join(X_AXES)}")
    return X_AXES[name]


def budget_axis(rows: Sequence[Row]) -> Quantity:
    """The budget in the unit the grid was given in: tokens kept when every cell has a `keep`, else
    the fraction removed."""
    reduced = [row for row in rows if row["strategy"] != "baseline"]
    return X_AXES["tokens"] if reduced and all(row.get("keep") is not None for row in reduced) else REMOVED


# -- series and points -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Point:
    """One cell: its rows, one per seed."""

    rows: tuple[Row, ...]

    def mean(self, quantity: Quantity) -> float | None:
        """The mean over seeds (None when a seed has no value)."""
        values = [quantity.value(row) for row in self.rows]
        return None if any(v is None for v in values) else statistics.fmean(values)

    def spread(self, quantity: Quantity) -> float:
        """One standard deviation over seeds (0 with one seed)."""
        values = [quantity.value(row) for row in self.rows]
        return statistics.stdev(values) if len(values) > 1 else 0.0

    @property
    def budget(self) -> str:
        """`R=0.5`, `keep=64`, `keep=43,21,11`: the cell's budget per stage, from its config."""
        stages = self.rows[0]["cell"]["reduction"]["stages"]
        parts = [
            ("R", f"{s['ratio']:g}") if s["ratio"] is not None else ("keep", str(s["keep"])) for s in stages
        ]
        kinds = {kind for kind, _ in parts}
        if len(kinds) == 1:
            return f"{kinds.pop()}={','.join(value for _, value in parts)}"
        return ",".join(f"{kind}={value}" for kind, value in parts)


@dataclass(frozen=True)
class Series:
    """The cells of one strategy at one site and one variant (layers, params), over budgets."""

    strategy: str
    site: str
    name: str  # the legend entry, unique in a figure
    points: tuple[Point, ...]


def series(rows: Sequence[Row]) -> list[Series]:
    """The reduced rows as series, in the order of their first row; seeds of one cell form one point."""
    cells: dict[str, dict[str, list[Row]]] = defaultdict(lambda: defaultdict(list))
    for row in rows:
        if row["strategy"] != "baseline":
            cells[_variant_key(row)][cell_group(row)].append(row)
    groups = [[Point(tuple(seeds)) for seeds in points.values()] for points in cells.values()]
    names = _unique_names([points[0].rows[0] for points in groups])
    return [
        Series(points[0].rows[0]["strategy"], points[0].rows[0]["site"], name, tuple(points))
        for name, points in zip(names, groups, strict=True)
    ]


def _variant_key(row: Row) -> str:
    """The reduction of a row's cell without its seed and budgets, and its run's fingerprint: the cells
    of one series share it."""
    reduction = seedless_reduction(row) or {}
    stages = [{k: v for k, v in stage.items() if k not in ("ratio", "keep")} for stage in reduction["stages"]]
    budgetless = {k: v for k, v in reduction.items() if k not in ("ratio", "keep")}
    return json.dumps([{**budgetless, "stages": stages}, row.get("fingerprint")], sort_keys=True)


def curve_name(label: str) -> str:
    """`fastv K=2 R=0.75 score=mean seed=1` -> `fastv K=2 score=mean`: the budget and seed dropped."""
    return " ".join(part for part in label.split() if not part.startswith(("R=", "keep=", "seed=")))


def _unique_names(firsts: Sequence[Row]) -> list[str]:
    """A legend name per series (from the label of its first row), its site and a number added where
    two would read the same."""
    names = [curve_name(row["label"]) for row in firsts]
    names = [
        f"{n} ({row['site']})" if names.count(n) > 1 else n for n, row in zip(names, firsts, strict=True)
    ]
    return [f"{n} #{names[:i].count(n) + 1}" if names.count(n) > 1 else n for i, n in enumerate(names)]


def series_styles(curves: Sequence[Series]) -> dict[str, dict[str, Any]]:
    """Per series name: a colour and marker per (strategy, site) pair, a line and fill style per variant."""
    pairs = list(dict.fromkeys((c.strategy, c.site) for c in curves))
    palette = colormaps["tab10" if len(pairs) <= 10 else "tab20"]
    variants: dict[tuple[str, str], int] = defaultdict(int)
    styles = {}
    for curve in curves:
        pair = pairs.index((curve.strategy, curve.site))
        number = variants[curve.strategy, curve.site]
        variants[curve.strategy, curve.site] += 1
        styles[curve.name] = {
            "color": palette(pair % palette.N),
            "marker": MARKERS[pair % len(MARKERS)],
            "linestyle": LINE_STYLES[number % len(LINE_STYLES)],
            "fillstyle": FILL_STYLES[number % len(FILL_STYLES)],
        }
    return styles


# -- drawing series ----------------------------------------------------------------------------------


@dataclass
class _Drawn:
    """A series on the axes: its points with both values, their positions, its artists."""

    points: list[Point]
    xy: list[tuple[float, float]]
    artists: list[Artist]
    color: Any


def draw_series(
    ax: Axes,
    curves: Sequence[Series],
    x: Quantity,
    y: Quantity,
    fixed: Sequence[tuple[float, float]] = (),
    lines: bool = True,
) -> list[str]:
    """Each series as markers (joined when `lines`), error bars over seeds and budget labels; series
    that would hide a point of another, or one of the `fixed` points, shifted sideways. Returns the
    notes the legend should carry (what the error bars are, that series were shifted)."""
    styles = series_styles(curves)
    drawn = [
        d for d in (_draw_one(ax, curve, x, y, styles[curve.name], lines) for curve in curves) if d.points
    ]
    ax.autoscale_view()
    to_axes = ax.transData + ax.transAxes.inverted()  # the axes' scales and limits, as fractions
    shifts = sideways_shifts(
        [to_axes.transform(p).tolist() if p else [] for p in [list(fixed), *(d.xy for d in drawn)]]
    )
    placed: list[tuple[str, Sequence[float]]] = []
    for curve, shift in zip(drawn, shifts[1:], strict=True):
        where = offset_copy(ax.transData, fig=ax.get_figure(), x=shift, units="points")
        for artist in curve.artists:
            artist.set_transform(where)
        _label_budgets(ax, curve, where, placed)
    return _notes([p for d in drawn for p in d.points], any(shifts))


def _label_budgets(
    ax: Axes, curve: _Drawn, where: Transform, placed: list[tuple[str, Sequence[float]]]
) -> None:
    """Each point's budget beside it (drawn through `where`), unless the same text is already `placed`
    close by (labels and places in axes fractions, appended to)."""
    to_axes = ax.transData + ax.transAxes.inverted()
    for point, xy in zip(curve.points, curve.xy, strict=True):
        spot = to_axes.transform(xy)
        if not any(text == point.budget and _near(spot, other, LABEL_CLEARANCE) for text, other in placed):
            ax.annotate(point.budget, xy, xycoords=where, xytext=(3, 3), textcoords="offset points",
                        fontsize=5.5, color=curve.color)  # fmt: skip
            placed.append((point.budget, spot))


def _draw_one(
    ax: Axes, curve: Series, x: Quantity, y: Quantity, style: dict[str, Any], lines: bool
) -> _Drawn:
    """One series: its points with both values (in x order), a line with markers, error bars when
    a point has several seeds."""
    points = sorted((p for p in curve.points if None not in (p.mean(x), p.mean(y))), key=lambda p: p.mean(x))
    if not points:
        return _Drawn([], [], [], style["color"])
    xy = [(p.mean(x), p.mean(y)) for p in points]
    xs, ys = zip(*xy, strict=True)
    artists: list[Artist] = ax.plot(
        xs, ys, label=curve.name, **{**style, **({} if lines else {"linestyle": "none"})}
    )
    if any(len(p.rows) > 1 for p in points):
        spreads = [p.spread(y) for p in points]
        artists += ax.errorbar(
            xs, ys, yerr=spreads, fmt="none", ecolor=style["color"], capsize=2
        ).get_children()
    return _Drawn(points, xy, artists, style["color"])


def _notes(points: Sequence[Point], shifted: bool) -> list[str]:
    """What the legend says about error bars (the seeds they span) and sideways shifts."""
    seeds = sorted({len(p.rows) for p in points if len(p.rows) > 1})
    notes = []
    if seeds:
        counts = f"{seeds[0]}-{seeds[-1]}" if len(seeds) > 1 else str(seeds[0])
        notes.append(f"points: mean over seeds; bars: ±1 std (n={counts})")
    if shifted:
        notes.append(f"series sharing a point: drawn {SHIFT_STEP:g} pt apart")
    return notes


def add_notes(ax: Axes, notes: Sequence[str]) -> None:
    """The notes as legend entries without marks, after the others."""
    for note in dict.fromkeys(notes):
        ax.plot([], [], linestyle="none", label=note)


def sideways_shifts(point_sets: Sequence[Sequence[Sequence[float]]]) -> list[float]:
    """Per set of points (axes fractions), a sideways shift in typographic points: 0 for the first
    set and any set that touches no earlier one, else the first shift (0, +s, -s, +2s, ...) that no
    earlier set it touches uses."""
    shifts: list[float] = []
    for i, points in enumerate(point_sets):
        taken = {
            shifts[j] for j in range(i) if any(_near(p, q, TOUCH) for p in points for q in point_sets[j])
        }
        shifts.append(next(s for s in _shift_candidates() if s not in taken))
    return shifts


def _shift_candidates() -> Iterator[float]:
    """0, +step, -step, +2 step, -2 step, ..."""
    yield 0.0
    for n in itertools.count(1):
        yield n * SHIFT_STEP
        yield -n * SHIFT_STEP


def _near(p: Sequence[float], q: Sequence[float], distance: float) -> bool:
    """Whether two points (axes fractions) lie within `distance` of each other both ways."""
    return abs(p[0] - q[0]) < distance and abs(p[1] - q[1]) < distance


# -- the figures -------------------------------------------------------------------------------------


def _baseline(rows: Sequence[Row]) -> Row | None:
    """The unreduced row, if the rows hold one."""
    return next((row for row in rows if row["strategy"] == "baseline"), None)


def pareto_figure(rows: Sequence[Row], x: str = "flops") -> Figure:
    """Accuracy (exact match) vs the chosen cost `x` (`X_AXES`): a series per strategy, site and
    variant, the unreduced point, the Pareto front."""
    cost = x_axis(x)
    figure = Figure(figsize=(8.8, 4.8), layout="constrained")
    ax = figure.add_subplot()
    curves = series(rows)
    baseline = _baseline(rows)
    fixed = [] if baseline is None else [(cost.value(baseline), ACCURACY.value(baseline))]
    if fixed:
        ax.plot(*fixed[0], marker="*", markersize=14, color="black", linestyle="none", label="unreduced")
    notes = draw_series(ax, curves, cost, ACCURACY, fixed)
    front = pareto_front([(p.mean(cost), p.mean(ACCURACY)) for c in curves for p in c.points] + fixed)
    ax.step(*zip(*front, strict=True), where="post", color="grey", linestyle="--", label="Pareto front")
    add_notes(ax, notes)
    ax.set(xlabel=cost.label, ylabel=ACCURACY.label)
    ax.set_title(f"Accuracy vs {cost.name}")
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
    """First-token top-1 agreement and KL against the unreduced model vs the budget, in the grid's unit
    (tokens kept when the grid gave keeps, else the fraction removed)."""
    figure = Figure(figsize=(12.5, 4.4), layout="constrained")
    agree, kl = figure.subplots(1, 2)
    budget = budget_axis(rows)
    curves = series(rows)
    agree.set(ylim=(-0.02, 1.02))
    kl.set_yscale("symlog", linthresh=KL_LINEAR_BELOW)
    notes = []
    for ax, quantity in ((agree, AGREEMENT), (kl, KL)):
        notes += draw_series(ax, curves, budget, quantity)
        ax.set(xlabel=budget.label, ylabel=quantity.label)
        ax.grid(alpha=0.3)
    _log_ticks(kl)
    add_notes(agree, notes)
    figure.legend(*agree.get_legend_handles_labels(), loc="outside right upper", fontsize="small")
    figure.suptitle(f"Fidelity to the unreduced model vs {budget.name}")
    return figure


def _log_ticks(ax: Axes) -> None:
    """Ticks of a symlog y axis named in plain numbers, enough of them to read a value: 1-2-5 per decade
    over a few decades, every integer multiple when the data span less than two."""
    low, high = ax.get_ylim()
    decades = np.log10(max(high, KL_LINEAR_BELOW) / max(low, KL_LINEAR_BELOW))
    subs = (1, 2, 5) if decades > 2 else tuple(range(1, 10))
    ax.yaxis.set_major_locator(SymmetricalLogLocator(linthresh=KL_LINEAR_BELOW, base=10, subs=subs))
    ax.yaxis.set_major_formatter(FormatStrFormatter("%g"))


def speedup_figure(rows: Sequence[Row]) -> Figure:
    """Measured prefill speed-up vs the FLOPs bound (unreduced FLOPs / reduced FLOPs), y = x for reference."""
    figure = Figure(figsize=(8.0, 4.8), layout="constrained")
    ax = figure.add_subplot()
    ax.axline((1, 1), slope=1, color="grey", linestyle="--", label="FLOPs bound")
    add_notes(ax, draw_series(ax, series(rows), FLOPS_BOUND, SPEEDUP, lines=False))  # speed-up None: no point
    ax.set(xlabel=FLOPS_BOUND.label, ylabel=SPEEDUP.label)
    ax.set_title("Measured speed-up vs FLOPs bound")
    ax.grid(alpha=0.3)
    figure.legend(loc="outside right upper", fontsize="small")
    return figure


# -- survival maps -----------------------------------------------------------------------------------


def survival_figures(rows: Sequence[Row], image: Image.Image | None) -> dict[str, Figure]:
    """Per strategy, its cells' survival maps over the sample image: a column per cell, a row per seed."""
    by_strategy: dict[str, list[Point]] = defaultdict(list)
    for curve in series([row for row in rows if row.get("survival") is not None]):
        by_strategy[curve.strategy] += curve.points
    return {strategy: survival_figure(points, image) for strategy, points in by_strategy.items()}


def survival_figure(cells: Sequence[Point], image: Image.Image | None) -> Figure:
    """One panel per cell and seed: removed patches dark, each merge group tinted and outlined; a legend,
    and a note of the cells or seeds left out."""
    order = sorted(cells, key=lambda p: (p.rows[0]["site"], p.rows[0]["layer"] or 0, removed(p.rows[0])))
    shown = order[:SURVIVAL_PANELS]
    seeds = sorted({row["seed"] for p in shown for row in p.rows}, key=lambda s: (s is not None, s))
    seeds_shown = seeds[:SURVIVAL_SEEDS]
    figure = Figure(figsize=(2.6 * len(shown), 2.9 * len(seeds_shown) + 0.5), layout="constrained")
    axes = figure.subplots(len(seeds_shown), len(shown), squeeze=False)
    merged = False
    for seed, panels in zip(seeds_shown, axes, strict=True):
        for ax, cell in zip(panels, shown, strict=True):
            row = next((r for r in cell.rows if r["seed"] == seed), None)
            if row is None:  # a cell without this seed
                ax.set_axis_off()
            else:
                merged |= _survival_panel(ax, row, image)
    strategy = shown[0].rows[0]["strategy"]
    notes = [f"{len(shown)} of {len(order)} cells"] if len(order) > len(shown) else []
    if len(seeds) > len(seeds_shown):
        notes.append(f"seeds {', '.join(map(str, seeds_shown))} of {len(seeds)}")
    figure.suptitle(
        f"{strategy}: visual tokens kept on the sample image{' (' + '; '.join(notes) + ')' if notes else ''}"
    )
    figure.legend(handles=survival_legend(merged), loc="outside lower center", ncols=3, fontsize="small")
    return figure


def _survival_panel(ax: Axes, row: Row, image: Image.Image | None) -> bool:
    """One cell's map for one seed on `ax`; whether it has merge groups."""
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
    return len(merge_groups(state)) > 0


def survival_legend(merged: bool) -> list[Patch]:
    """Legend patches: kept, removed, and merge groups when a panel has any."""
    handles = [
        Patch(facecolor="none", edgecolor="0.4", label="kept (the image shows through)"),
        Patch(facecolor=(0.0, 0.0, 0.0, 0.75), label="removed"),
    ]
    if merged:
        tint = (*colormaps["tab20"](0)[:3], 0.55)
        handles.append(Patch(facecolor=tint, edgecolor="0.4", label="merged: one tint per group, outlined"))
    return handles


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
