"""VisPruner: important patches by [CLS] attention, then diverse ones left by rounds of duplicate removal.

On hand-built views: duplicates are what the rounds remove; the selection equals a per-sample
transcription of the reference's rounds (sorted lists, one image or frame at a time) for ragged
budgets, per-frame budgets, any split and step, with the budget exact; without a class token the mean
attention ranks. Through LLaVA's tower (`site: vision`, SDPA): the kept patches are that transcription
run on the tower's own [CLS] attention and layer output; on timm ViTs with and without a class token;
refused at language sites and on Qwen2-VL. The registry-driven suites (tests/test_vision_site.py) hold
it to the mask oracle, batch == alone and cache == recomputation on LLaVA and Video-LLaVA.
"""

from __future__ import annotations

import pytest
import timm
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st
from pydantic import ValidationError
from tokenprune.strategies.vispruner import VisPruner

import tokenprune as tp
from tokenprune.testing.models import toy_qwen2_vl
from tokenprune.testing.oracles import Prompt, class_token_view, generation_positions, llava_inputs


def reference_rounds(
    attention: list[float], features: torch.Tensor, budget: int, ratio: float, step: int
) -> set:
    """The reference's selection for one image or frame, on its patches: a transcription with lists."""
    order = sorted(range(len(attention)), key=lambda i: (-attention[i], i))
    n_important = int(budget * ratio)
    important, rest, diverse = order[:n_important], order[n_important:], budget - n_important
    unit = F.normalize(features, dim=-1)
    while diverse > 0 and min(step, len(rest) - diverse) > 0:
        removed = min(step, len(rest) - diverse)
        a, b = rest[0::2], rest[1::2]
        scores = [max((float(unit[i] @ unit[j]) for j in b), default=float("-inf")) for i in a]
        by_score = sorted(range(len(a)), key=lambda k: (-scores[k], k))
        rest = [a[k] for k in by_score[removed:]] + b
    return set(important) | (set(rest) if diverse > 0 else set())


def vision_view(
    attention: torch.Tensor, features: torch.Tensor, budget: list[int], grid: tuple
) -> tp.TokenView:
    """Images of a patch grid after the class token, with per-row budgets: attention [B, 1 + P] from the
    class token, features [B, 1 + P, d] (the layer's output)."""
    view = class_token_view(attention.shape[0], grid, 0, {"attention": lambda query="class": attention})
    view.hidden, view.budget = features, torch.tensor(budget)
    return view


def test_duplicates_are_what_the_rounds_remove():
    """6 patches, budget 4 = 2 important + 2 diverse: of the rest, two pairs of duplicates (patches 0 and
    5, 1 and 4) lose one of each pair; the important ones are the two most attended."""
    attention = torch.tensor([[0.0, 0.1, 0.2, 0.9, 0.8, 0.3, 0.4]])
    features = torch.zeros(1, 7, 3)
    features[0, 1:] = torch.tensor(
        [[1.0, 0, 0], [0, 1, 0], [1, 1, 1], [-1, 1, 0], [0, 1, 0.01], [1, 0, 0.01]]
    )
    keep = VisPruner().select(vision_view(attention, features, [4], (2, 3)))
    kept = set((keep[0].nonzero().squeeze(1) - 1).tolist())
    assert {2, 3} <= kept  # important
    assert len(kept & {0, 5}) == 1 and len(kept & {1, 4}) == 1  # one of each duplicate pair


@given(
    batch=st.integers(1, 3),
    grid=st.sampled_from([(2, 3), (4, 4), (5, 3), (6, 6)]),
    shares=st.lists(st.floats(0.0, 1.0), min_size=3, max_size=3),
    ratio=st.sampled_from([0.0, 0.5, 0.75, 1.0, 0.3]),
    step=st.integers(1, 9),
    seed=st.integers(0, 2**16),
)
def test_the_selection_is_the_references_for_ragged_budgets(batch, grid, shares, ratio, step, seed):
    gen = torch.Generator().manual_seed(seed)
    n = grid[0] * grid[1]
    budget = [round(share * n) for share in shares[:batch]]
    attention, features = torch.rand(batch, 1 + n, generator=gen), torch.randn(batch, 1 + n, 5, generator=gen)
    keep = VisPruner(VisPruner.Params(important_ratio=ratio, step=step)).select(
        vision_view(attention, features, budget, grid)
    )
    assert keep.sum(dim=1).tolist() == budget and not keep[:, 0].any()
    for b in range(batch):
        expected = reference_rounds(attention[b, 1:].tolist(), features[b, 1:], budget[b], ratio, step)
        assert set((keep[b, 1:].nonzero().squeeze(1)).tolist()) == expected


@given(
    frames=st.integers(1, 3),
    shares=st.lists(st.floats(0.0, 1.0), min_size=3, max_size=3),
    seed=st.integers(0, 99),
)
def test_per_frame_budgets_run_the_rounds_in_each_frame(frames, shares, seed):
    """Two images (rows), the patch grid split into `frames` bands of rows: each band its own budget."""
    gen = torch.Generator().manual_seed(seed)
    grid = (6, 4)
    n, band = grid[0] * grid[1], grid[0] * grid[1] // frames
    attention, features = torch.rand(2, 1 + n, generator=gen), torch.randn(2, 1 + n, 5, generator=gen)
    view = vision_view(attention, features, [0, 0], grid)
    frame = torch.arange(n) // band
    members = [(frame == f).nonzero().squeeze(1) for f in range(frames)]
    view.frame = torch.cat([torch.tensor([-1]), frame]).expand(2, -1).contiguous()
    view.frame_budget = torch.tensor(
        [[round(s * len(m)) for s, m in zip(shares[:frames], members, strict=True)]] * 2
    )
    view.budget = view.frame_budget.sum(dim=1)
    keep = VisPruner().select(view)
    for b in range(2):
        for f, patches in enumerate(members):
            expected = reference_rounds(
                attention[b, 1 + patches].tolist(),
                features[b, 1 + patches],
                int(view.frame_budget[b, f]),
                0.5,
                8,
            )
            got = keep[b, 1 + patches].nonzero().squeeze(1)
            assert set(got.tolist()) == expected


def test_without_a_class_token_the_mean_attention_ranks():
    asked = []

    def attention(query: str = "class") -> torch.Tensor:
        asked.append(query)
        if query == "class":
            raise tp.SignalUnavailable("this vision encoder has no class token")
        return torch.tensor([[0.0, 0.1, 0.5, 0.2, 0.4]])

    view = class_token_view(1, (2, 2), 2, {"attention": attention})
    keep = VisPruner(VisPruner.Params(important_ratio=1.0)).select(view)
    assert asked == ["class", "mean"] and keep[0].nonzero().squeeze(1).tolist() == [2, 4]


def test_params_paper_defaults_and_validation():
    params = VisPruner.Params()
    assert (params.important_ratio, params.step) == (0.5, 8)
    assert VisPruner.positions == "renumbered" and VisPruner.sites == {"vision"} and not VisPruner.merges
    with pytest.raises(ValidationError):
        VisPruner.Params(important_ratio=1.5)
    with pytest.raises(ValidationError):
        VisPruner.Params(step=0)


def received_attention(model, pixel_values: torch.Tensor, layer: int, query: str) -> torch.Tensor:
    """[images, 1 + P]: head-averaged attention each token receives at CLIP layer `layer` of the unreduced
    tower, from the class token (`class`) or averaged over every query row (`mean`)."""
    tower = model.model.vision_tower
    captured = []
    hook = tower.encoder.layers[layer].layer_norm1.register_forward_hook(
        lambda m, a, out: captured.append(out)
    )
    try:
        tower(pixel_values)
    finally:
        hook.remove()
    attention, x = tower.encoder.layers[layer].self_attn, captured[0]
    shape = (*x.shape[:2], attention.num_heads, attention.head_dim)
    queries = attention.q_proj(x).view(shape).transpose(1, 2)
    keys = attention.k_proj(x).view(shape).transpose(1, 2)
    rows = queries[:, :, :1] if query == "class" else queries
    return ((rows @ keys.transpose(-1, -2)) * attention.scale).softmax(-1).mean(dim=(1, 2))


def in_the_tower(layer: int, keep: int, **params) -> tp.ReductionConfig:
    return tp.ReductionConfig(
        strategy="vispruner", stages=[{"site": "vision", "layer": layer, "keep": keep}], params=params
    )


@torch.no_grad()
@given(keep=st.integers(0, 36), ratio=st.sampled_from([0.5, 0.75]))
def test_in_llava_the_kept_patches_are_the_references_on_the_towers_signals(llava3, keep, ratio):
    model = llava3
    inputs = llava_inputs([Prompt([3, 4], 1), Prompt([1, 2, 5], 2)])
    attention = received_attention(model, inputs["pixel_values"], 1, "class")
    tower_out = model.model.vision_tower(inputs["pixel_values"], output_hidden_states=True).hidden_states[2]
    with tp.attach(model, in_the_tower(1, keep, important_ratio=ratio)) as handle:
        model(**inputs, position_ids=generation_positions(inputs["attention_mask"]), use_cache=False)
        tower, language = handle.trace
    assert tower.visual_after == [keep] * 3 and language.visual_after == [keep, 2 * keep]
    for image in range(3):
        expected = reference_rounds(attention[image, 1:].tolist(), tower_out[image, 1:], keep, ratio, 8)
        assert set((tower.kept[image][tower.kept[image] >= 1] - 1).tolist()) == expected


@torch.no_grad()
@pytest.mark.parametrize("class_token", [True, False])
def test_on_a_vit_with_and_without_a_class_token(class_token):
    """A timm ViT-Ti/16 (196 patches), block 5, 64 kept; without a class token the mean attention ranks."""
    torch.manual_seed(0)
    pool = "token" if class_token else "avg"
    model = timm.create_model(
        "vit_tiny_patch16_224", pretrained=False, class_token=class_token, global_pool=pool
    )
    images = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    with tp.attach(model.eval(), tp.ReductionConfig(strategy="vispruner", layer=5, keep=64)) as handle:
        logits = model(images)
        (event,) = handle.trace
    assert event.tokens_after == [64 + int(class_token)] * 2 and torch.isfinite(logits).all()


def test_refused_where_it_cannot_apply(llava_sdpa):
    with pytest.raises(tp.AttachError, match=r"qwen2_vl.*no class token"):
        tp.attach(toy_qwen2_vl(), in_the_tower(0, 8))
    with pytest.raises(tp.ConfigError, match="vision sites"):
        tp.attach(llava_sdpa, tp.ReductionConfig(strategy="vispruner", layer=2, keep=8))
