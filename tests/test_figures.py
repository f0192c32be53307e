"""The report's figures: styles per (strategy, site), budget labels, error bars over seeds, the cost axis,
no point hidden under another, the fidelity axis in the grid's unit, survival maps per seed with a legend.

Rows are built by hand (the fields the runner writes), so each test states the values it plots.
"""

from __future__ import annotations

import itertools
import shutil
import statistics
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from matplotlib.collections import LineCollection
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from tokenprune.errors import ConfigError
from tokenprune.lab.cli import main
from tokenprune.lab.figures import (
    REMOVED,
    SHIFT_STEP,
    SURVIVAL_SEEDS,
    X_AXES,
    Point,
    fidelity_figure,
    pareto_figure,
    series,
    sideways_shifts,
    speedup_figure,
    survival_figures,
)
from tokenprune.lab.report import build_report
from tokenprune.lab.visualize import draw_groups

ROOT = Path(__file__).resolve().parents[1]
BEFORE = 144  # visual tokens before reduction


def make_row(
    strategy: str,
    layers: tuple[int, ...] = (1,),
    site: str = "language",
    ratio: float | None = None,
    keep: int | None = None,
    seed: int | None = None,
    accuracy: float = 0.5,
    **fields: Any,
) -> dict[str, Any]:
    """A measured results row as the runner writes it (one budget for every stage)."""
    stages = [{"site": site, "layer": layer, "ratio": ratio, "keep": keep} for layer in layers]
    params = {} if seed is None else {"seed": seed}
    reduction = {
        "strategy": strategy,
        "stages": stages,
        "params": params,
        "budget": "sample",
        "token_order": "reference",
    }
    reduction |= {"layer": layers[0], "ratio": ratio, "keep": keep}
    kept = keep if keep is not None else round(BEFORE * (1 - ratio))
    k = ",".join(f"v{layer}" if site == "vision" else str(layer) for layer in layers)
    budget = f"R={ratio:g}" if ratio is not None else f"keep={keep}"
    label = f"{strategy} K={k} {budget}" + ("" if seed is None else f" seed={seed}")
    row = {
        "key": f"{label} {site}",
        "label": label,
        "strategy": strategy,
        "site": site,
        "layer": layers[0],
        "ratio": ratio,
        "keep": keep,
        "seed": seed,
        "cell": {"reduction": reduction, "seed": seed},
        "visual_tokens_before": BEFORE,
        "visual_tokens_after": kept,
        "prefill_flops": 1e6 * kept + 1e8 * layers[0],
        "tower_flops": 3e7 if site == "language" else 2e5 * kept,
        "flops_ratio": (1e6 * kept + 1e8 * layers[0]) / 3e8,
        "accuracy_exact": accuracy,
        "top1_agreement": accuracy,
        "first_token_kl": 1 - accuracy,
        "prefill_speedup": 1.5,
        "survival": None,
    }
    return row | fields


def baseline_row() -> dict[str, Any]:
    """The unreduced row."""
    return {
        "key": "baseline", "label": "baseline", "strategy": "baseline", "site": None, "layer": None,
        "ratio": 0.0, "keep": None, "seed": 0, "cell": {"reduction": None, "seed": 0},
        "visual_tokens_before": BEFORE, "visual_tokens_after": BEFORE, "prefill_flops": 3e8,
        "tower_flops": 3e7, "flops_ratio": 1.0, "accuracy_exact": 1.0, "top1_agreement": 1.0,
        "first_token_kl": 0.0, "prefill_speedup": 1.0, "survival": None,
    }  # fmt: skip


def series_lines(figure: Figure, ax_index: int = 0) -> dict[str, Line2D]:
    """The series lines of an axes by legend name (markers, with data)."""
    ax = figure.axes[ax_index]
    return {line.get_label(): line for line in ax.get_lines() if line.get_xydata().size and has_marker(line)}


def has_marker(line: Line2D) -> bool:
    """Whether a line draws markers (series, the unreduced star), not only a line."""
    return line.get_marker() not in (None, "None", "", " ")


def display_points(figure: Figure, ax_index: int = 0) -> list[np.ndarray]:
    """Where every marker of an axes is drawn, in display pixels."""
    ax = figure.axes[ax_index]
    return [
        line.get_transform().transform(xy)
        for line in ax.get_lines()
        if has_marker(line)
        for xy in line.get_xydata()
    ]


SITES_GRID = [
    baseline_row(),
    *(make_row("random", (0,), "language", ratio=r, seed=0, accuracy=0.2 + r / 2) for r in (0.5, 0.75)),
    *(make_row("random", (0,), "vision", ratio=r, seed=0, accuracy=0.3 + r / 3) for r in (0.5, 0.75)),
    *(make_row("fastv", (1,), ratio=r, accuracy=0.1 + r / 4) for r in (0.5, 0.75)),
    *(make_row("fastv", (2,), ratio=r, accuracy=0.15 + r / 5) for r in (0.5, 0.75)),
]


def test_each_strategy_and_site_has_its_own_colour_and_marker_and_each_variant_its_own_line():
    lines = series_lines(pareto_figure(SITES_GRID))
    pairs = {
        "random K=0": ("random", "language"),
        "random K=v0": ("random", "vision"),
        "fastv K=1": ("fastv", "language"),
        "fastv K=2": ("fastv", "language"),
    }
    assert set(pairs) <= set(lines)
    looks = {name: (lines[name].get_color(), lines[name].get_marker()) for name in pairs}
    for a, b in itertools.combinations(pairs, 2):
        same_pair = pairs[a] == pairs[b]
        assert (looks[a][0] == looks[b][0]) == same_pair, (a, b)
        assert (looks[a][1] == looks[b][1]) == same_pair, (a, b)
    first, second = lines["fastv K=1"], lines["fastv K=2"]
    assert first.get_linestyle() != second.get_linestyle() and first.get_fillstyle() != second.get_fillstyle()


def test_legend_entries_are_unique_even_when_two_series_read_the_same():
    rows = [make_row("random", (0,), site, ratio=0.5, seed=0) for site in ("language", "vision")]
    rows[1] |= {"label": rows[0]["label"]}  # labels that do not say the site
    figure = pareto_figure([baseline_row(), *rows])
    labels = [text.get_text() for text in figure.legends[0].get_texts()]
    assert len(labels) == len(set(labels))
    assert {"random K=0 (language)", "random K=0 (vision)"} <= set(labels)


def test_every_point_carries_its_budget_label():
    rows = [make_row("fastv", (1,), keep=k, accuracy=a) for k, a in ((16, 0.2), (64, 0.5), (128, 0.9))]
    rows.append(make_row("pdrop", (1, 2), keep=32, accuracy=0.7))
    ax = pareto_figure(rows, "tokens").axes[0]
    labels = {(text.get_text(), text.xy) for text in ax.texts}
    assert labels == {
        ("keep=16", (16.0, 0.2)),
        ("keep=64", (64.0, 0.5)),
        ("keep=128", (128.0, 0.9)),
        ("keep=32,32", (32.0, 0.7)),
    }


def test_budget_of_mixed_stages_names_each():
    row = make_row("pdrop", (1, 2), keep=32)
    row["cell"]["reduction"]["stages"][1] |= {"keep": None, "ratio": 0.5}
    assert Point((row,)).budget == "keep=32,R=0.5"


def test_seeds_of_a_cell_average_into_one_point_with_a_one_std_error_bar():
    accuracies = {0: 0.3, 1: 0.5, 2: 0.55}
    rows = [make_row("random", keep=32, seed=s, accuracy=a) for s, a in accuracies.items()]
    rows.append(make_row("random", keep=64, seed=0, accuracy=0.6))  # one seed: no bar
    figure = pareto_figure(rows, "tokens")
    ax = figure.axes[0]
    line = series_lines(figure)["random K=1"]
    assert line.get_xydata().tolist() == [
        [32, pytest.approx(statistics.fmean(accuracies.values()))],
        [64, 0.6],
    ]
    bars = [c for c in ax.collections if isinstance(c, LineCollection)]
    segments = [segment for bar in bars for segment in bar.get_segments()]
    spans = sorted(abs(segment[1][1] - segment[0][1]) for segment in segments)
    assert spans == pytest.approx([0.0, 2 * statistics.stdev(accuracies.values())])
    labels = [text.get_text() for text in figure.legends[0].get_texts()]
    assert "points: mean over seeds; bars: ±1 std (n=3)" in labels


def test_one_seed_draws_no_error_bars():
    ax = pareto_figure(SITES_GRID).axes[0]
    assert not [c for c in ax.collections if isinstance(c, LineCollection)]


@pytest.mark.parametrize(
    ("axis", "expected"),
    [
        ("tokens", lambda r: r["visual_tokens_after"]),
        ("flops", lambda r: r["prefill_flops"] / 1e9),
        ("total-flops", lambda r: (r["prefill_flops"] + r["tower_flops"]) / 1e9),
    ],
)
def test_the_accuracy_figure_plots_the_chosen_cost(axis, expected):
    figure = pareto_figure(SITES_GRID, axis)
    lines = series_lines(figure)
    for curve in series(SITES_GRID):
        want = sorted(expected(point.rows[0]) for point in curve.points)
        assert lines[curve.name].get_xdata().tolist() == pytest.approx(want), curve.name
    assert figure.axes[0].get_xlabel() == X_AXES[axis].label
    assert lines["unreduced"].get_xdata().tolist() == [pytest.approx(expected(SITES_GRID[0]))]


def test_an_unknown_cost_axis_or_an_uncounted_tower_is_refused():
    with pytest.raises(ConfigError, match="--x: 'gflops' is not one of tokens, flops, total-flops"):
        pareto_figure(SITES_GRID, "gflops")
    rows = [baseline_row(), make_row("fastv", ratio=0.5, tower_flops=None)]
    with pytest.raises(ConfigError, match=r"--x total-flops: row 'fastv K=1 R=0\.5' has no `tower_flops`"):
        pareto_figure(rows, "total-flops")


def test_points_at_the_same_place_are_drawn_apart():
    """fastv and tome with equal FLOPs and accuracy (and a third one too): none hides another."""
    rows = [baseline_row()]
    for strategy in ("fastv", "tome", "uniform"):
        rows += [make_row(strategy, ratio=r, accuracy=0.4 + r / 4) for r in (0.5, 0.75)]
    for figure in (
        pareto_figure(rows),
        pareto_figure(rows, "tokens"),
        fidelity_figure(rows),
        speedup_figure(rows),
    ):
        for index in range(len(figure.axes)):
            drawn = display_points(figure, index)
            gaps = [np.abs(a - b).max() for a, b in itertools.combinations(drawn, 2)]
            assert min(gaps) >= SHIFT_STEP * figure.dpi / 72 - 1e-6
    lines = series_lines(pareto_figure(rows))
    assert lines["fastv K=1"].get_xdata().tolist() == lines["tome K=1"].get_xdata().tolist()  # data unchanged


def test_sideways_shifts_move_only_sets_that_touch():
    alone, here, there = [(0.1, 0.1)], [(0.5, 0.5), (0.9, 0.9)], [(0.5, 0.505)]
    assert sideways_shifts([alone, here, there, there, [(0.9, 0.9)]]) == [
        0.0, 0.0, SHIFT_STEP, -SHIFT_STEP, SHIFT_STEP,
    ]  # fmt: skip
    assert sideways_shifts([[], alone, [(0.3, 0.3)]]) == [0.0, 0.0, 0.0]


def test_fidelity_is_plotted_against_the_budget_in_the_unit_of_the_grid():
    keeps = [baseline_row(), *(make_row("fastv", keep=k, accuracy=k / 144) for k in (16, 48))]
    figure = fidelity_figure(keeps)
    assert [ax.get_xlabel() for ax in figure.axes] == [X_AXES["tokens"].label] * 2
    assert series_lines(figure)["fastv K=1"].get_xdata().tolist() == [16, 48]
    ratios = [baseline_row(), *(make_row("fastv", ratio=r, accuracy=1 - r) for r in (0.5, 0.75))]
    figure = fidelity_figure(ratios)
    assert [ax.get_xlabel() for ax in figure.axes] == [REMOVED.label] * 2
    assert series_lines(figure)["fastv K=1"].get_xdata().tolist() == [0.5, 0.75]


def survival(grid: int, state: list[int]) -> dict[str, Any]:
    """A survival map as the runner records it."""
    return {"grid": [grid, grid], "state": state}


def test_survival_maps_have_a_legend_and_a_row_per_seed():
    rows = [
        make_row("random", keep=k, seed=s, survival=survival(2, [0, -1, -1, 3] if s else [0, 1, -1, -1]))
        for k in (2, 1)
        for s in (0, 1)
    ]
    rows.append(make_row("tome", keep=2, survival=survival(2, [0, 0, 2, -1])))  # a merge group of two
    figures = survival_figures(rows, None)
    random, tome = figures["random"], figures["tome"]
    assert [t.get_text() for t in random.legends[0].get_texts()] == [
        "kept (the image shows through)",
        "removed",
    ]
    assert [t.get_text() for t in tome.legends[0].get_texts()][-1] == "merged: one tint per group, outlined"
    titles = [ax.get_title().split("\n")[0] for ax in random.axes]
    assert titles == [
        "random K=1 keep=2 seed=0", "random K=1 keep=1 seed=0",
        "random K=1 keep=2 seed=1", "random K=1 keep=1 seed=1",
    ]  # fmt: skip
    assert "seeds" not in random.get_suptitle()


def test_survival_maps_say_which_seeds_they_leave_out():
    seeds = range(SURVIVAL_SEEDS + 2)
    rows = [make_row("random", keep=1, seed=s, survival=survival(2, [0, -1, -1, -1])) for s in seeds]
    figure = survival_figures(rows, None)["random"]
    assert len(figure.axes) == SURVIVAL_SEEDS
    shown = ", ".join(str(s) for s in range(SURVIVAL_SEEDS))
    assert figure.get_suptitle().endswith(f"(seeds {shown} of {len(seeds)})")


def test_report_writes_the_accuracy_figure_on_the_chosen_axis(tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(ROOT / "docs" / "ablation" / "ablation-default", run)
    assert main(["report", str(run), "--out", str(tmp_path / "out"), "--x", "total-flops"]) == 0
    assert str(tmp_path / "out" / "accuracy-vs-total-flops.png") in capsys.readouterr().out
    assert main(["report", str(run), "--out", str(tmp_path / "out"), "--x", "gflops"]) == 2
    assert "--x: 'gflops' is not one of tokens, flops, total-flops" in capsys.readouterr().err


def test_build_report_refuses_an_unknown_axis_before_writing(tmp_path):
    with pytest.raises(ConfigError, match="--x"):
        build_report([ROOT / "docs" / "ablation" / "ablation-default"], tmp_path / "out", x="ratio")
    assert not (tmp_path / "out").exists()


def test_the_merge_picture_has_a_legend_of_what_it_shows():
    image = np.zeros((4, 4, 3))
    pruned = draw_groups(image, torch.tensor([0, 1, -1, -1]), (2, 2))
    assert [t.get_text() for t in pruned.legends[0].get_texts()] == [
        "kept alone: its own colour",
        "removed: dimmed",
    ]
    merged = draw_groups(image, torch.tensor([0, 0, 2, 3]), (2, 2))
    assert [t.get_text() for t in merged.legends[0].get_texts()] == [
        "merged: the group's mean colour",
        "kept alone: its own colour",
    ]


def test_the_kl_axis_names_values_also_within_one_decade():
    """KL of 3 to 9 lies between two powers of ten: the axis still names several values in its span."""
    rows = [
        baseline_row(),
        *(make_row("fastv", ratio=r, first_token_kl=kl) for r, kl in ((0.5, 3.1), (0.9, 8.8))),
    ]
    kl = fidelity_figure(rows).axes[1]
    low, high = kl.get_ylim()
    named = [t for t in kl.yaxis.get_major_locator().tick_values(low, high) if low <= t <= high]
    assert len(named) >= 3 and kl.yaxis.get_major_formatter()(named[0]) == f"{named[0]:g}"
