"""The grid of an ablation as a researcher writes it: several sites per strategy, seeds, the params
each cell runs with; and `tokenprune strategies [--params]` / `adapters`, the listings to write it from."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Literal

import entrypoints
import pytest
import torch
import yaml
from pydantic import BaseModel, ConfigDict

import tokenprune as tp
from tokenprune.errors import ConfigError
from tokenprune.lab.cli import main
from tokenprune.lab.config import AblationConfig, load_ablation_config
from tokenprune.lab.grid import Cell, expand_grid
from tokenprune.registry import STRATEGIES


def cells_of(grid: dict, **fields) -> list[Cell]:
    """The cells of a config with this grid (the data's digest fixed: no samples are loaded)."""
    return expand_grid(AblationConfig.model_validate({"grid": grid, **fields}), "data")


def labels_of(grid: dict, **fields) -> list[str]:
    return [cell.label for cell in cells_of(grid, **fields)]


# -- sites ---------------------------------------------------------------------------------


def test_one_strategy_runs_at_each_of_several_sites():
    grid = {
        "strategies": ["random", "fastv"],
        "keeps": [9],
        "sites": {"random": [{"layers": [0]}, {"site": "vision", "layers": [0, 1]}, {}]},
    }
    cells = cells_of(grid)
    assert [cell.label for cell in cells] == [
        "baseline",
        "random K=0 keep=9 seed=0",  # before the language model
        "random K=v0 keep=9 seed=0",  # inside the tower, after vision layer 0
        "random K=v1 keep=9 seed=0",
        "random K=2 keep=9 seed=0",  # {}: the grid's `layers`
        "fastv K=2 keep=9",  # a strategy without `sites` stays at the grid's layers
    ]
    stages = [cell.reduction.stages for cell in cells[1:5]]
    assert [(s.site, s.layer, s.keep) for (s,) in stages] == [
        ("language", 0, 9),
        ("vision", 0, 9),
        ("vision", 1, 9),
        ("language", 2, 9),
    ]
    assert len({cell.key for cell in cells}) == len(cells)


def test_a_single_site_is_a_list_of_one():
    one = {"strategies": ["random"], "sites": {"random": {"site": "vision", "layers": [1]}}}
    listed = {"strategies": ["random"], "sites": {"random": [{"site": "vision", "layers": [1]}]}}
    assert labels_of(one) == labels_of(listed) == ["baseline", "random K=v1 R=0.5 seed=0"]
    assert [c.key for c in cells_of(one)] == [c.key for c in cells_of(listed)]


@pytest.mark.parametrize(
    ("sites", "message"),
    [
        ({"random": []}, "grid.sites.random: List should have at least 1 item"),
        (
            {"random": [{"layers": [0]}, {"site": "vision"}]},
            "grid.sites.random.1: a vision site counts layers",
        ),
        ({"fastv": [{"layers": [1]}, {"layers": [0]}]}, "grid: layers: fastv at layer 0"),
    ],
)
def test_bad_site_lists_name_the_site(tmp_path, sites, message):
    path = tmp_path / "bad.yaml"
    path.write_text(f"grid: {{strategies: [random, fastv], sites: {sites}}}\n")
    with pytest.raises(ConfigError, match=message):
        load_ablation_config(path)


def test_named_layers_give_the_field_of_every_layer_of_a_site():
    grid = AblationConfig.model_validate(
        {
            "grid": {
                "strategies": ["fastv", "random"],
                "layers": [1, 2],
                "sites": {"random": [{"layers": [0]}, {"site": "vision", "layers": [3]}]},
                "extra": [{"strategy": "tome", "stages": [{"site": "vision", "layer": 5, "ratio": 0.5}]}],
            }
        }
    ).grid
    assert grid.named_layers("language") == {"grid.layers": {1, 2}, "grid.sites.random.0.layers": {0}}
    assert grid.named_layers("vision") == {"grid.sites.random.1.layers": {3}, "grid.extra": {5}}


# -- seeds ---------------------------------------------------------------------------------


def test_seeds_apply_to_extra_cells_that_do_not_set_their_own():
    extra = [
        {"strategy": "random", "layer": 1, "keep": 9},  # no seed: one cell per entry of `seeds`
        {"strategy": "random", "layer": 1, "keep": 8, "params": {"seed": 5}},  # its own seed: once
        {"strategy": "random", "layer": 1, "keep": 7, "params": {"seed": 0}},  # the default, but written
        {"strategy": "uniform", "layer": 1, "keep": 9},  # no seed parameter: once
    ]
    cells = cells_of({"strategies": ["fastv"], "extra": extra}, seeds=[0, 1, 2])[2:]
    assert [(cell.label, cell.seed) for cell in cells] == [
        ("random K=1 keep=9 seed=0", 0),
        ("random K=1 keep=9 seed=1", 1),
        ("random K=1 keep=9 seed=2", 2),
        ("random K=1 keep=8 seed=5", 5),
        ("random K=1 keep=7 seed=0", 0),
        ("uniform K=1 keep=9", None),
    ]
    assert [cell.reduction.params for cell in cells[:3]] == [{"seed": 0}, {"seed": 1}, {"seed": 2}]


def test_an_extra_cell_equal_to_a_product_cell_runs_once_per_seed():
    grid = {
        "strategies": ["random"],
        "layers": [1],
        "extra": [{"strategy": "random", "layer": 1, "ratio": 0.5}],
    }
    assert labels_of(grid, seeds=[3, 4]) == ["baseline", "random K=1 R=0.5 seed=3", "random K=1 R=0.5 seed=4"]


def test_a_position_policy_other_than_the_strategys_shows_in_the_label():
    two = {"strategy": "fastv", "stages": [{"layer": 1, "ratio": 0.5}, {"layer": 2, "ratio": 0.5}]}
    extra = [
        {"strategy": "fastv", "layer": 1, "ratio": 0.5, "positions": "renumbered"},  # fastv: original
        {"strategy": "divprune", "layer": 0, "keep": 9},  # its own default, renumbered: not shown
        {"strategy": "divprune", "layer": 0, "keep": 9, "positions": "original"},
        {**two, "stages": [two["stages"][0], {**two["stages"][1], "positions": "renumbered"}]},
    ]
    assert labels_of({"strategies": ["fastv"], "layers": [1], "extra": extra})[1:] == [
        "fastv K=1 R=0.5",
        "fastv K=1 R=0.5 positions=renumbered",
        "divprune K=0 keep=9",
        "divprune K=0 keep=9 positions=original",
        "fastv K=1,2 R=0.5,0.5 positions=original,renumbered",
    ]


def test_cells_of_strategies_without_a_seed_carry_none():
    cells = cells_of({"strategies": ["fastv", "uniform", "random"], "layers": [1]}, seeds=[7])
    assert [(cell.label, cell.seed, cell.config()["seed"]) for cell in cells] == [
        ("baseline", None, None),
        ("fastv K=1 R=0.5", None, None),
        ("uniform K=1 R=0.5", None, None),
        ("random K=1 R=0.5 seed=7", 7, 7),
    ]


def test_a_seed_the_grid_varies_is_the_cells_seed():
    grid = {"strategies": ["random"], "layers": [1], "params": {"random": {"seed": [3, 4]}}}
    cells = cells_of(grid, seeds=[0, 1])[1:]  # the grid's seeds, not `seeds`
    assert [(cell.label, cell.seed) for cell in cells] == [
        ("random K=1 R=0.5 seed=3", 3),
        ("random K=1 R=0.5 seed=4", 4),
    ]


# -- params as they run --------------------------------------------------------------------


class SitedParams(BaseModel):
    """`score`: None (default) is `a` in a language model and `b` in a vision tower."""

    model_config = ConfigDict(extra="forbid")

    score: Literal["a", "b", "c"] | None = None
    width: int = 3

    def resolved(self, site: str) -> SitedParams:
        """These params with `score` as it runs at `site`."""
        return self.model_copy(update={"score": self.score or {"language": "a", "vision": "b"}[site]})


@pytest.fixture
def sited():
    """Registers `sited`: a strategy whose Params say what their None stands for at each site."""

    @tp.register_strategy("sited")
    class Sited(tp.Reducer):
        Params = SitedParams

        def select(self, view: tp.TokenView) -> torch.Tensor:
            return view.candidates

    yield "sited"
    STRATEGIES.unregister("sited")


def test_null_params_show_and_record_the_value_they_run_with(sited):
    grid = {"strategies": [sited], "layers": [1], "params": {sited: {"score": [None, "a", "c"]}}}
    cells = cells_of(grid)[1:]
    # null and `a` are one config at a language site: one cell
    assert [cell.label for cell in cells] == ["sited K=1 R=0.5 score=a", "sited K=1 R=0.5 score=c"]
    assert [cell.reduction.params for cell in cells] == [
        {"score": "a", "width": 3},
        {"score": "c", "width": 3},
    ]
    written = {"strategies": [sited], "layers": [1], "params": {sited: {"score": "a", "width": 3}}}
    assert cells[0].key == cells_of(written)[1].key  # the same resolved config: the same key


def test_extra_cells_resolve_at_their_site_and_show_what_differs(sited):
    extra = [
        {"strategy": sited, "stages": [{"site": "vision", "layer": 0, "ratio": 0.5}]},
        {
            "strategy": sited,
            "stages": [{"site": "vision", "layer": 0, "ratio": 0.5}],
            "params": {"score": "b"},
        },
        {
            "strategy": sited,
            "stages": [{"site": "vision", "layer": 0, "ratio": 0.5}],
            "params": {"score": "a"},
        },
    ]
    cells = cells_of({"strategies": ["fastv"], "extra": extra})[2:]
    assert [cell.label for cell in cells] == [f"{sited} K=v0 R=0.5", f"{sited} K=v0 R=0.5 score=a"]
    assert [cell.reduction.params["score"] for cell in cells] == ["b", "a"]


def test_rows_record_every_parameter_with_its_default():
    cells = cells_of({"strategies": ["dart", "tome"], "layers": [1], "params": {"dart": {"text_pivots": 2}}})
    assert cells[1].label == "dart K=1 R=0.5 text_pivots=2"
    assert cells[1].reduction.params == {"image_pivots": 4, "text_pivots": 2}
    assert cells[2].reduction.params == {"r": None, "inflect": 0.0, "proportional_attention": True}


# -- listings ------------------------------------------------------------------------------


def words(text: str) -> list[str]:
    """Each line with its runs of spaces as one (column widths are not the point)."""
    return [" ".join(line.split()) for line in text.splitlines()]


def test_strategies_lists_each_name_with_its_one_line_doc(capsys):
    assert main(["strategies"]) == 0
    lines = words(capsys.readouterr().out)
    assert [line.split()[0] for line in lines] == tp.list_strategies()
    assert "fastv Attention-rank pruning (FastV)." in lines
    assert "random Uniformly random subset, reproducible per sample." in lines


def test_strategies_params_lists_type_default_and_description(capsys):
    assert main(["strategies", "--params"]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    fastv = lines.index(next(line for line in lines if line.startswith("fastv ")))
    assert (
        lines[fastv + 1]
        == "    score: 'last' | 'mean' | 'class' | None = None  # query rows ranking the tokens"
    )
    assert "    seed: int >= 0 = 0  # seed of the per-sample random scores" in lines
    assert "    r: int >= 0 | list[int >= 0] | None = None  # merges per block: r or a list" in lines
    assert "    contextual_share: float >= 0.0 <= 1.0 = 0.15625  # share of the budget kept" in out
    uniform = lines.index(next(line for line in lines if line.startswith("uniform ")))
    assert lines[uniform + 1] == "    (no parameters)"


def test_adapters_list_the_model_types_they_serve(capsys):
    assert main(["adapters"]) == 0
    lines = words(capsys.readouterr().out)
    assert [line.split()[0] for line in lines] == tp.list_adapters()
    assert (
        "qwen2_vl qwen2_vl, qwen2_5_vl Adapter for Qwen2-VL and Qwen2.5-VL: images and videos, 3-D M-RoPE"
        in " ".join(lines)
    )
    assert "llava llava Adapter for LLaVA-1.5 style models (one fixed-size grid per image)." in lines
    assert any(line.startswith("vit - ") for line in lines)  # chosen by its class, not a model type


def test_a_broken_plugin_is_listed_with_why(monkeypatch, capsys):
    real = entrypoints.get_group_all
    broken = entrypoints.EntryPoint("zz_broken", "tp_test_no_such_module", "Broken")
    monkeypatch.setattr(
        entrypoints,
        "get_group_all",
        lambda group, path=None: [*real(group, path), *([broken] if group == STRATEGIES.group else [])],
    )
    monkeypatch.setattr(STRATEGIES, "_discovered", None)
    assert main(["strategies", "--params"]) == 0
    lines = words(capsys.readouterr().out)
    assert lines[-1].startswith(
        "zz_broken failed to load: strategy 'zz_broken' from tp_test_no_such_module:Broken"
    )
    assert "fastv Attention-rank pruning (FastV)." in lines  # the others still listed


# -- the docs ------------------------------------------------------------------------------

GUIDE = Path(__file__).resolve().parents[1] / "docs" / "running-an-ablation.md"


def guide_block(after: str, language: str) -> str:
    """The first ```language block of the guide after the text `after`."""
    text = GUIDE.read_text()
    start = text.index(f"```{language}\n", text.index(after)) + len(language) + 4
    return text[start : text.index("```", start)]


def test_the_guides_site_list_gives_the_cells_its_comments_name():
    block = guide_block("A list of sites runs the strategy at each", "yaml")
    config = AblationConfig.model_validate(yaml.safe_load(block))
    labels = [cell.label for cell in expand_grid(config, "data")]
    assert labels == ["baseline", "fastv K=2 keep=16", *re.findall(r"# .*?: (random .*)", block)]


def test_the_guides_listings_are_what_the_commands_print(capsys):
    block = guide_block("`tokenprune strategies` lists", "")
    for command in re.split(r"^\$ tokenprune ", block, flags=re.M)[1:]:
        name, *shown = command.splitlines()
        assert main(name.split()) == 0
        printed = capsys.readouterr().out.splitlines()
        assert [line for line in shown if line != "..."] == [line for line in printed if line in shown]


# -- cache stages ----------------------------------------------------------------------------


def test_cache_stages_show_as_c_with_their_schedule_where_it_is_not_the_default():
    cache = {"site": "cache", "layer": 2, "keep": 9}
    extra = [
        {"strategy": "vlcache", "stages": [cache]},
        {"strategy": "vlcache", "stages": [{**cache, "window": 3}]},
        {"strategy": "dycoke", "stages": [{"layer": 0, "keep": 20}, {**cache, "every": 1, "restore": True}]},
    ]
    assert labels_of({"strategies": ["fastv"], "layers": [1], "keeps": [9], "extra": extra})[2:] == [
        "vlcache K=c2 keep=9",
        "vlcache K=c2 keep=9 window=3",
        "dycoke K=0,c2 keep=20,9 every=1 restore",
    ]


def test_cell_configs_leave_out_cache_fields_at_their_defaults_and_build_the_same_reduction():
    """Keys of cells without a cache stage are those of runs recorded before `every`/`window`/`restore`
    existed; every recorded config builds its reduction back (a language stage refuses those fields)."""
    extra = [
        {"strategy": "dycoke", "stages": [{"layer": 0, "keep": 20}, {"site": "cache", "layer": 2, "keep": 9}]}
    ]
    extra.append({"strategy": "vlcache", "stages": [{"site": "cache", "layer": 2, "keep": 9, "window": 3}]})
    cells = cells_of({"strategies": ["fastv"], "layers": [1], "keeps": [9], "extra": extra})[1:]
    recorded = [cell.config()["reduction"] for cell in cells]
    assert recorded[0]["stages"] == [
        {"layer": 1, "keep": 9, "ratio": None, "site": "language", "positions": None}
    ]
    added = [[set(stage) - set(recorded[0]["stages"][0]) for stage in r["stages"]] for r in recorded[1:]]
    assert added == [[set(), set()], [{"window"}]]
    rebuilt = [
        tp.ReductionConfig(**{k: v for k, v in r.items() if k not in ("layer", "ratio", "keep")})
        for r in recorded
    ]
    assert [r.model_dump() for r in rebuilt] == [
        cell.reduction.model_dump() for cell in cells
    ]  # from the stages
