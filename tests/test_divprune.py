"""DivPrune's defining property: greedy max-min cosine diversity, checked on crafted inputs."""

from __future__ import annotations

import math

import torch
from hypothesis import given
from hypothesis import strategies as st
from tokenprune.strategies.divprune import max_min_diverse

import tokenprune as tp
from tokenprune.testing.models import IMAGE_TOKEN_ID
from tokenprune.testing.oracles import Prompt, hooked, llava_inputs


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


def naive_max_min(features: torch.Tensor, k: int) -> set[int]:
    """Greedy max-min diversity written out naively (float64, every pair recomputed): the oracle."""
    unit = torch.nn.functional.normalize(features.double(), dim=-1).tolist()

    def distance(i: int, j: int) -> float:
        return 1 - sum(a * b for a, b in zip(unit[i], unit[j], strict=True))

    rows = range(len(unit))
    chosen = [max(rows, key=lambda i: min(distance(i, j) for j in rows if j != i))]
    while len(chosen) < k:
        chosen.append(
            max((i for i in rows if i not in chosen), key=lambda i: min(distance(i, c) for c in chosen))
        )
    return set(chosen)


@torch.no_grad()
def test_divprune_before_the_language_model_keeps_the_naive_max_min_set(llava_sdpa):
    """End to end at layer 0: the kept image tokens are, per image or per sample, the naive greedy
    max-min set of the projector outputs the language model receives (crafted, one set per image)."""
    inputs = llava_inputs([Prompt([2, 3, 1], 2), Prompt([4, 1], 1)])
    features = torch.randn(3, 36, 64, generator=torch.Generator().manual_seed(11))
    features[1, :30] = features[1, 30:31] + 0.01 * features[1, :30]  # a near-duplicate cluster: 6 left
    first_image = [0, 2]  # of each sample, in the batch's image order
    units = {"sample": [(0, [0, 1]), (1, [2])], "per_frame": [(0, [0]), (0, [1]), (1, [2])]}
    projector = llava_sdpa.model.multi_modal_projector
    with hooked([projector.register_forward_hook(lambda *_: features)]):
        for budget, unit_images in units.items():
            config = tp.ReductionConfig(strategy="divprune", layer=0, keep=4, budget=budget)
            with tp.attach(llava_sdpa, config) as handle:
                out = llava_sdpa.generate(**inputs, max_new_tokens=3, do_sample=False)
                (event,) = handle.trace
            assert event.visual_after == ([8, 4] if budget == "per_frame" else [4, 4])
            assert out.shape[1] == inputs["input_ids"].shape[1] + 3
            for b, images in unit_images:
                visual = (inputs["input_ids"][b] == IMAGE_TOKEN_ID).nonzero().squeeze(1).view(-1, 36)
                slots = visual[[i - first_image[b] for i in images]].reshape(-1).tolist()
                chosen = {i for i, position in enumerate(slots) if position in event.kept[b].tolist()}
                assert chosen == naive_max_min(features[images].reshape(-1, 64), 4)
