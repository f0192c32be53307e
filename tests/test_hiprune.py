"""HiPrune: anchors by a middle layer's attention, their grid neighbours, registers by the stage layer's.

On hand-built views: an edge anchor's buffers stay in its row (no wrap-around); the selection equals a
per-image transcription (anchors, 4-neighbours, registers) for any budget and alpha, with anchors first
and then buffers when they exceed the budget. Through LLaVA's tower (`site: vision`, SDPA): the anchors
come from the object layer's attention (recomputed from the unreduced tower), kept until a later stage
reads it, also across an earlier reduction; an object layer past the stage is refused when attaching,
and on a ViT past the stage's block it is refused with the reason. The registry-driven suites
(tests/test_vision_site.py) hold it to the mask oracle, batch == alone and cache == recomputation.
"""

from __future__ import annotations

import pytest
import timm
import torch
from hypothesis import given
from hypothesis import strategies as st
from pydantic import ValidationError
from test_vispruner import received_attention
from tokenprune.strategies.hiprune import HiPrune

import tokenprune as tp
from tokenprune.testing.models import ToySize, toy_llava, toy_qwen2_vl
from tokenprune.testing.oracles import Prompt, class_token_view, generation_positions, llava_inputs


def reference_selection(shallow: list, deep: list, grid: tuple, budget: int, alpha: float) -> set:
    """HiPrune for one image on its patches (row-major), transcribed with lists and grid neighbours."""
    rows, cols = grid
    n_anchors = round(budget * alpha / 5)
    anchors = sorted(range(len(shallow)), key=lambda i: (-shallow[i], i))[:n_anchors]
    buffers = set()
    for a in anchors:
        r, c = divmod(a, cols)
        for dr, dc in ((-1, 0), (1, 0), (0, -1), (0, 1)):
            if 0 <= r + dr < rows and 0 <= c + dc < cols:
                buffers.add((r + dr) * cols + c + dc)
    buffers -= set(anchors)
    by_shallow = sorted(buffers, key=lambda i: (-shallow[i], i))
    first = (anchors + by_shallow)[:budget]
    others = sorted(set(range(len(deep))) - set(first), key=lambda i: (-deep[i], i))
    return set(first) | set(others[: budget - len(first)])


def vision_view(
    shallow: torch.Tensor, deep: torch.Tensor, grid: tuple, budget: int, asked: list
) -> tp.TokenView:
    """Images of a patch grid after the class token: mean attention [B, 1 + P] at the object layer
    (`layer=8`) and at the stage's layer (22)."""

    def attention(query: str = "class", layer: int | None = None) -> torch.Tensor:
        asked.append((query, layer))
        return shallow if layer == 8 else deep

    return class_token_view(shallow.shape[0], grid, budget, {"attention": attention})


def test_an_edge_anchors_buffers_stay_in_its_row():
    """4 x 4 grid, budget 10, alpha 1: two anchors (patches 7, the right edge, and 0); their buffers 3,
    6, 11 and 1, 4 (not 8: the reference's `7 + 1`), then the three registers 12, 13, 14."""
    shallow, deep = torch.zeros(1, 17), torch.zeros(1, 17)
    shallow[0, 1 + 7], shallow[0, 1 + 0] = 0.9, 0.8
    deep[0, 1 + 8], deep[0, 1 + 12], deep[0, 1 + 13], deep[0, 1 + 14] = 0.1, 0.5, 0.4, 0.3
    asked = []
    keep = HiPrune(HiPrune.Params(alpha=1.0)).select(vision_view(shallow, deep, (4, 4), 10, asked))
    assert set((keep[0].nonzero().squeeze(1) - 1).tolist()) == {7, 0, 3, 6, 11, 1, 4, 12, 13, 14}
    assert asked == [("mean", None), ("mean", 8)]


@given(
    batch=st.integers(1, 3),
    grid=st.sampled_from([(2, 3), (4, 4), (5, 3), (24, 24)]),
    share=st.floats(0.0, 1.0),
    alpha=st.sampled_from([0.1, 0.5, 1.0, 0.0]),
    seed=st.integers(0, 2**16),
)
def test_the_selection_is_anchors_buffers_and_registers(batch, grid, share, alpha, seed):
    gen = torch.Generator().manual_seed(seed)
    n = grid[0] * grid[1]
    budget = round(share * n)
    shallow, deep = torch.rand(batch, 1 + n, generator=gen), torch.rand(batch, 1 + n, generator=gen)
    keep = HiPrune(HiPrune.Params(alpha=alpha)).select(vision_view(shallow, deep, grid, budget, []))
    assert keep.sum(dim=1).tolist() == [budget] * batch and not keep[:, 0].any()
    for b in range(batch):
        expected = reference_selection(shallow[b, 1:].tolist(), deep[b, 1:].tolist(), grid, budget, alpha)
        assert set((keep[b, 1:].nonzero().squeeze(1)).tolist()) == expected


def test_params_paper_defaults_and_the_object_layer():
    params = HiPrune.Params()
    assert (params.alpha, params.object_layer) == (0.1, None)
    assert HiPrune.positions == "renumbered" and HiPrune.sites == {"vision"} and not HiPrune.merges
    assert HiPrune().signal_layers(22) == {8} and HiPrune().signal_layers(3) == frozenset()
    assert HiPrune(HiPrune.Params(object_layer=1)).signal_layers(3) == {1}
    with pytest.raises(ValidationError):
        HiPrune.Params(alpha=2.0)
    with pytest.raises(ValidationError):
        HiPrune.Params(object_layer=-1)


def in_the_tower(stages: list[tuple[int, int]], **params) -> tp.ReductionConfig:
    return tp.ReductionConfig(
        strategy="hiprune",
        stages=[{"site": "vision", "layer": layer, "keep": keep} for layer, keep in stages],
        params=params,
    )


@torch.no_grad()
@given(keep=st.integers(0, 36), alpha=st.sampled_from([0.1, 0.5, 1.0]), object_layer=st.integers(0, 1))
def test_in_llava_anchors_come_from_the_object_layer_and_registers_from_the_stages(
    llava3, keep, alpha, object_layer
):
    """The toy's tower feeds the projector from layer 1: the stage there, anchors from layer 0 or 1."""
    model = llava3
    inputs = llava_inputs([Prompt([3, 4], 1), Prompt([1, 2, 5], 2)])
    shallow = received_attention(model, inputs["pixel_values"], object_layer, "mean")
    deep = received_attention(model, inputs["pixel_values"], 1, "mean")
    reduction = in_the_tower([(1, keep)], alpha=alpha, object_layer=object_layer)
    with tp.attach(model, reduction) as handle:
        model(**inputs, position_ids=generation_positions(inputs["attention_mask"]), use_cache=False)
        tower, language = handle.trace
    assert tower.visual_after == [keep] * 3 and language.visual_after == [keep, 2 * keep]
    for image in range(3):
        expected = reference_selection(
            shallow[image, 1:].tolist(), deep[image, 1:].tolist(), (6, 6), keep, alpha
        )
        assert set((tower.kept[image][tower.kept[image] >= 1] - 1).tolist()) == expected


@torch.no_grad()
def test_the_object_layer_is_kept_across_an_earlier_stage():
    """Stages at layers 1 and 2 both read layer 0: at the second, the anchors are the top survivors of
    the first by layer 0's attention (carried by original position to the shortened sequence)."""
    model = toy_llava(ToySize(vision_layers=4))
    inputs = llava_inputs([Prompt([3, 4], 1), Prompt([1, 2, 5], 2)])
    shallow = received_attention(model, inputs["pixel_values"], 0, "mean")
    with tp.attach(model, in_the_tower([(1, 24), (2, 10)], alpha=1.0, object_layer=0)) as handle:
        model(**inputs, position_ids=generation_positions(inputs["attention_mask"]), use_cache=False)
        first, second, _ = handle.trace
    for image in range(3):
        survivors = first.kept[image][first.kept[image] >= 1]
        anchors = survivors[shallow[image, survivors].topk(2).indices]  # round(10 * 1.0 / 5) = 2
        assert set(anchors.tolist()) <= set(second.kept[image].tolist())
        assert len(second.kept[image]) == 1 + 10


def test_refused_where_it_cannot_apply(llava_sdpa):
    with pytest.raises(tp.ConfigError, match="reads the attention of layer 3 at a stage on layer 1"):
        tp.attach(toy_llava(ToySize(vision_layers=3)), in_the_tower([(1, 8)], object_layer=3))
    with pytest.raises(tp.AttachError, match=r"qwen2_vl.*no class token"):
        tp.attach(toy_qwen2_vl(), in_the_tower([(0, 8)]))
    with pytest.raises(tp.ConfigError, match="vision sites"):
        tp.attach(llava_sdpa, tp.ReductionConfig(strategy="hiprune", layer=2, keep=8))


@torch.no_grad()
def test_on_a_vit_the_object_layer_must_be_the_stages():
    """timm ViT blocks keep only the stage's attention: at block 5 (object layer: the stage's own) it
    runs; at block 10 the paper's object layer 8 is refused with the reason."""
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False).eval()
    images = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    with tp.attach(model, tp.ReductionConfig(strategy="hiprune", layer=5, keep=64)) as handle:
        model(images)
        assert handle.trace[0].tokens_after == [65]
    paper_layer = tp.ReductionConfig(strategy="hiprune", layer=10, keep=64)
    with tp.attach(model, paper_layer), pytest.raises(tp.SignalUnavailable, match="layer 8 was not kept"):
        model(images)
