"""Shared fixtures: tiny seeded LLaVA models (no download) and hypothesis profiles for torch work."""

from __future__ import annotations

import os

import pytest
import torch
from hypothesis import HealthCheck, settings

import tokenprune as tp
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
