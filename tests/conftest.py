"""Shared fixtures: tiny seeded LLaVA models (no download) and hypothesis profiles for torch work."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, settings

import tokenprune as tp
from tokenprune.lab.config import load_ablation_config
from tokenprune.lab.grid import expand_grid
from tokenprune.testing.models import ToySize, toy_llava, toy_llava_next, toy_video_llava

# HYPOTHESIS_PROFILE picks how hard the property tests search: `ci` (the default) runs 12 derandomised
# examples per test, the same on every run; `dev` 40 random ones; `thorough` (before a release, or
# after touching the mechanics) 200 random ones, printing the seed of any failure to replay it.
settings.register_profile(
    "ci", max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=True
)
settings.register_profile("dev", max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.register_profile(
    "thorough",
    max_examples=200,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    print_blob=True,
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

torch.set_num_threads(min(2, torch.get_num_threads()))

# Every installed strategy that acts in a language model goes through every exactness test of the
# language-model sites: a new one is tested by registering it (vision sites: test_vision_site.py).
BUILT_IN_STRATEGIES = tuple(
    name for name in tp.list_strategies() if "language" in tp.strategy_class(name).sites
)

PAPER_GRID_STRATEGIES = {"fastv", "random", "uniform", "tome", "divprune", "dart", "pdrop", "feather"}


@torch.no_grad()
def assert_every_paper_grid_cell_reduces(
    config_name: str, model: torch.nn.Module, inputs: Mapping[str, torch.Tensor], visual: Sequence[int]
) -> None:
    """Run every reduced cell of configs/<config_name> on `model`: each keeps its last stage's budget
    of the `visual` tokens per sample, so a paper grid cannot ship a cell the model's depth refuses."""
    config = load_ablation_config(Path(__file__).parents[1] / "configs" / config_name)
    cells = expand_grid(config, dataset="-")[1:]
    assert {cell.reduction.strategy for cell in cells} == PAPER_GRID_STRATEGIES
    for cell in cells:
        with tp.attach(model, cell.reduction) as handle:
            model(**inputs)
            expected = [cell.reduction.stages[-1].kept_count(n) for n in visual]
            assert handle.trace[-1].visual_after == expected, cell.label


@pytest.fixture(scope="session")
def llava_sdpa():
    return toy_llava(attn_implementation="sdpa")


@pytest.fixture(scope="session")
def llava_eager():
    return toy_llava(attn_implementation="eager")


@pytest.fixture(scope="session", params=["sdpa", "eager"])
def llava(request, llava_sdpa, llava_eager):
    return llava_sdpa if request.param == "sdpa" else llava_eager


@pytest.fixture(scope="session")
def llava3():
    """A toy LLaVA whose CLIP tower has 3 layers: features come from layer 1 (vision_feature_layer=-2)."""
    return toy_llava(ToySize(vision_layers=3))


@pytest.fixture(scope="session")
def video_llava3():
    """Video-LLaVA whose towers have 3 layers: features come from layer 1 (vision_feature_layer=-2)."""
    return toy_video_llava(ToySize(vision_layers=3))


@pytest.fixture(scope="session")
def llava_next():
    return toy_llava_next(attn_implementation="sdpa")
