"""DivPrune's defining property: greedy max-min cosine diversity, checked on crafted inputs."""

from __future__ import annotations

import math

import torch
from hypothesis import given
from hypothesis import strategies as st
from tokenprune.strategies.divprune import max_min_diverse

import tokenprune as tp
from tokenprune.testing.oracles import Prompt, llava_inputs


def on_circle(degrees: list[float]) -> torch.Tensor:
    return torch.tensor([[math.cos(math.radians(a)), math.sin(math.radians(a))] for a in degrees])


def test_first_pick_has_the_farthest_nearest_neighbour_then_max_min():
    # a tight cluster at 0-10 degrees, a pair at 90/95, a loner at 200: the loner goes first,
    # then the point farthest from it (the cluster's far side, 10 degrees), then the pair's 95 degrees.
    points = on_circle([0, 5, 10, 90, 95, 200])
    assert max_min_diverse(points, 3) == [5, 2, 4]


@given(st.lists(st.floats(-180, 180), min_size=2, max_size=30, unique=True), st.data())
def test_each_pick_maximises_the_minimum_distance_to_the_chosen(angles, data):
    points = on_circle(angles) * torch.tensor(data.draw(st.floats(0.5, 3.0)))  # scale does not matter
    k = data.draw(st.integers(1, len(angles)))
    chosen = max_min_diverse(points, k)
    distance = (
        1 - torch.nn.functional.normalize(points, dim=-1) @ torch.nn.functional.normalize(points, dim=-1).T
    )
    nearest = (distance + torch.eye(len(angles)) * 10).min(dim=1).values
    assert nearest[chosen[0]] >= nearest.max() - 1e-6
    for step in range(1, k):
        to_chosen = distance[:, chosen[:step]].min(dim=1).values
        rest = [i for i in range(len(angles)) if i not in chosen[:step]]
        assert to_chosen[chosen[step]] >= to_chosen[rest].max() - 1e-6
    assert len(set(chosen)) == k


@torch.no_grad()
def test_divprune_before_the_language_model_keeps_the_budget(llava_sdpa):
    inputs = llava_inputs([Prompt([2, 3, 1], 2), Prompt([4, 1], 1)])
    for budget in ("sample", "per_frame"):
        config = tp.ReductionConfig(strategy="divprune", layer=0, keep=7, budget=budget)
        with tp.attach(llava_sdpa, config) as handle:
            out = llava_sdpa.generate(**inputs, max_new_tokens=3, do_sample=False)
            event = handle.trace[0]
        expected = [14, 7] if budget == "per_frame" else [7, 7]
        assert event.visual_after == expected
        assert out.shape[1] == inputs["input_ids"].shape[1] + 3
