"""FasterVLM: the top-T patches by the vision encoder's [CLS] attention reach the language model.

On hand-built views: the class token's row ranks, ties to the earlier patch, the budget is exact.
Through LLaVA's tower (`site: vision`, SDPA): the kept patches are the top-T of the [CLS] attention
recomputed from the tower's own projections, T exactly per image for any T, generate on a
left-padded batch with the KV cache equals recomputation; on a timm ViT inside a block (the same
selection as FastV's class-token score); refused on Qwen2-VL, which has no class token.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import timm
import torch
from hypothesis import given
from hypothesis import strategies as st
from tokenprune.strategies.fastervlm import FasterVLM

import tokenprune as tp
from tokenprune.testing.models import IMAGE_TOKEN_ID, ToySize, toy_llava, toy_qwen2_vl
from tokenprune.testing.oracles import Prompt, class_token_view, generation_positions, llava_inputs

CONFIGS = Path(__file__).parent.parent / "configs"


def vision_view(attention: torch.Tensor, budget: int, asked: list | None = None) -> tp.TokenView:
    """Images of one row of P patches after the class token; `asked` collects the query rows asked for."""

    def class_attention(query: str = "class") -> torch.Tensor:
        if asked is not None:
            asked.append(query)
        return attention

    batch, length = attention.shape
    return class_token_view(batch, (1, length - 1), budget, {"attention": class_attention})


def test_the_class_tokens_row_ranks_the_patches():
    attention = torch.tensor([[0.9, 0.1, 0.4, 0.2, 0.4, 0.3], [0.9, 0.5, 0.1, 0.2, 0.3, 0.4]])
    asked = []
    keep = FasterVLM().select(vision_view(attention, budget=2, asked=asked))
    assert asked == ["class"]
    assert keep.nonzero().tolist() == [[0, 2], [0, 4], [1, 1], [1, 5]]  # a tie goes to the earlier patch


@given(
    batch=st.integers(1, 3), patches=st.integers(1, 600), share=st.floats(0.0, 1.0), seed=st.integers(0, 99)
)
def test_the_budget_is_exact_and_the_top_t_are_kept(batch, patches, share, seed):
    attention = torch.rand(batch, 1 + patches, generator=torch.Generator().manual_seed(seed))
    budget = round(share * patches)
    keep = FasterVLM().select(vision_view(attention, budget))
    assert keep.sum(dim=1).tolist() == [budget] * batch and not keep[:, 0].any()
    for b in range(batch):
        expected = attention[b, 1:].topk(budget).indices + 1
        assert set(keep[b].nonzero().squeeze(1).tolist()) == set(expected.tolist())


def in_the_tower(keep: int, layer: int = 0) -> tp.ReductionConfig:
    return tp.ReductionConfig(strategy="fastervlm", stages=[{"site": "vision", "layer": layer, "keep": keep}])


def class_attention(model, pixel_values: torch.Tensor, layer: int) -> torch.Tensor:
    """[images, P]: head-averaged attention from the class token to each patch at CLIP layer `layer`,
    recomputed from the unreduced tower's own projections."""
    tower = model.model.vision_tower
    captured = []
    norm = tower.encoder.layers[layer].layer_norm1
    hook = norm.register_forward_hook(lambda m, a, out: captured.append(out))
    try:
        tower(pixel_values)
    finally:
        hook.remove()
    attention, x = tower.encoder.layers[layer].self_attn, captured[0]
    shape = (*x.shape[:2], attention.num_heads, attention.head_dim)
    queries = attention.q_proj(x).view(shape).transpose(1, 2)
    keys = attention.k_proj(x).view(shape).transpose(1, 2)
    rows = ((queries[:, :, :1] @ keys.transpose(-1, -2)) * attention.scale).softmax(-1)
    return rows.mean(dim=(1, 2))[:, 1:]


@torch.no_grad()
@given(keep=st.integers(0, 36))
def test_in_llava_the_top_t_patches_by_cls_attention_reach_the_language_model(llava_sdpa, keep):
    model = llava_sdpa
    inputs = llava_inputs([Prompt([3, 4], 1), Prompt([1, 2, 5], 2)])
    expected = class_attention(model, inputs["pixel_values"], 0)
    with tp.attach(model, in_the_tower(keep)) as handle:
        model(**inputs, position_ids=generation_positions(inputs["attention_mask"]), use_cache=False)
        tower, language = handle.trace
    assert tower.visual_after == [keep] * 3 and tower.sizes is None
    for image in range(3):
        kept = tower.kept[image][tower.kept[image] >= 1] - 1
        assert set(kept.tolist()) == set(expected[image].topk(keep).indices.tolist())
    assert language.visual_after == [keep, 2 * keep]
    visual = inputs["input_ids"] == IMAGE_TOKEN_ID
    for b in range(2):
        kept = language.kept[b][language.kept[b] >= 0]
        assert int(visual[b, kept].sum()) == keep * (b + 1)


@torch.no_grad()
def test_the_llava_config_keeps_64_patches_from_layer_22():
    """configs/fastervlm-llava.yaml on a LLaVA with CLIP-L's depth and grid: 24 layers, 24 x 24 patches."""
    config = tp.load_config(CONFIGS / "fastervlm-llava.yaml")
    assert [(s.site, s.layer, s.keep) for s in config.stages] == [("vision", 22, 64)]
    model = toy_llava(ToySize(grid=24, vision_layers=24, layers=2))
    inputs = llava_inputs([Prompt([5, 3], 1)], tokens_per_image=576)
    inputs["pixel_values"] = torch.randn(1, 3, 96, 96, generator=torch.Generator().manual_seed(0))
    expected = class_attention(model, inputs["pixel_values"], 22)[0].topk(64).indices
    with tp.attach(model, config) as handle:
        model(**inputs, use_cache=False)
        tower, language = handle.trace
    assert (tower.layer, tower.visual_after, language.visual_after) == (22, [64], [64])
    assert set((tower.kept[0, 1:] - 1).tolist()) == set(expected.tolist())


@torch.no_grad()
def test_on_a_vit_it_selects_as_fastv_with_the_class_score():
    """A timm ViT-Ti/16 at 224 (196 patches), block 5, 98 kept: the issue's example."""
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False).eval()
    images = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    with tp.attach(model, tp.ReductionConfig(strategy="fastervlm", layer=5, keep=98)) as handle:
        logits = model(images)
        (event,) = handle.trace
    fastv = tp.ReductionConfig(strategy="fastv", params={"score": "class"}, layer=5, keep=98)
    with tp.attach(model, fastv) as handle:
        expected = model(images)
        (reference,) = handle.trace
    assert event.tokens_after == [99, 99]
    assert torch.equal(event.kept, reference.kept) and torch.equal(logits, expected)


def test_refused_where_it_cannot_apply(llava_sdpa):
    with pytest.raises(tp.AttachError, match=r"qwen2_vl.*no class token"):
        tp.attach(toy_qwen2_vl(), in_the_tower(8))
    with pytest.raises(tp.ConfigError, match="vision sites"):
        tp.attach(llava_sdpa, tp.ReductionConfig(strategy="fastervlm", layer=2, keep=8))
