"""VisionZip: dominant patches by class attention, contextual tokens merged into strided targets.

On hand-built views: the selection equals an independent transcription of the reference's steps
(top-D class attention, strided targets among the rest, argmax cosine of keys), the budget is
exact for every budget and split, and every removed patch lands in exactly one contextual token.
Through LLaVA's tower (`site: vision`, SDPA): the projector receives each contextual token as the
reference computes it, target + mean(members), or with `contextual_merge: average` the plain
average of the group (tolerance 1e-5), sources partition the patches, generate on a left-padded batch
with the KV cache equals recomputation; on a timm ViT inside a block; refused on Qwen2-VL.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import timm
import torch
from hypothesis import given
from hypothesis import strategies as st
from pydantic import ValidationError
from tokenprune.strategies.visionzip import VisionZip, split_counts

import tokenprune as tp
from tokenprune.core.merging import merge_target_plus_mean, sources
from tokenprune.testing.models import IMAGE_TOKEN_ID, ToySize, toy_llava, toy_qwen2_vl
from tokenprune.testing.oracles import Prompt, class_token_view, generation_positions, llava_inputs

CONFIGS = Path(__file__).parent.parent / "configs"
TOL = 1e-5


def vision_view(attention: torch.Tensor, keys: torch.Tensor, budget: int, grid: tuple) -> tp.TokenView:
    """Images of a patch grid after the class token: attention [B, 1 + P] from it, keys [B, 1 + P, d]."""

    def class_attention(query: str = "class") -> torch.Tensor:
        assert query == "class"
        return attention

    signals = {"attention": class_attention, "keys": lambda: keys}
    return class_token_view(attention.shape[0], grid, budget, signals)


def reference_selection(attention: torch.Tensor, keys: torch.Tensor, n_dominant: int, n_contextual: int):
    """The reference's steps for one image, on patches only: (dominant set, targets, {member: target}).

    attention [P] class-to-patch, keys [P, d]. Transcribed loop by loop from the paper's code.
    """
    dominant = set(attention.topk(n_dominant).indices.tolist())
    rest = [p for p in range(len(attention)) if p not in dominant]
    if n_contextual == 0:
        return dominant, [], {}
    step = max(1, len(rest) // n_contextual)
    targets = rest[::step][:n_contextual]
    unit = keys / keys.norm(dim=-1, keepdim=True)
    members = [p for p in rest if p not in targets]
    return dominant, targets, {p: targets[int((unit[targets] @ unit[p]).argmax())] for p in members}


def test_a_hand_built_image():
    """8 patches (2 x 4), budget 4 split 2 + 2: the two most attended patches, targets 0 and 5."""
    attention = torch.tensor([[0.5, 0.1, 0.9, 0.2, 0.8, 0.3, 0.05, 0.15, 0.25]])
    keys = torch.zeros(1, 9, 2)
    keys[0, 1:] = torch.tensor(
        [[1, 0], [9, 9], [1, 0.1], [9, 9], [0.2, 1], [0, 1], [-1, 5], [3, 1]], dtype=torch.float32
    )
    view = vision_view(attention, keys, budget=4, grid=(2, 4))
    merge = VisionZip(VisionZip.Params(contextual_share=0.5)).select(view)
    # dominant: patches 1 and 3 (slots 2, 4); rest 0, 2, 4, 5, 6, 7 with step 3: targets 0 and 5
    assert merge.keep[0].nonzero().squeeze(1).tolist() == [1, 2, 4, 6]
    assert merge.into[0].tolist() == [-1, -1, -1, 1, -1, 6, -1, 6, 1]
    assert merge.proportional_attention is False


def test_the_papers_splits():
    budget = torch.tensor([[64], [128], [192]])
    dominant, contextual = split_counts(budget, VisionZip.Params().contextual_share)
    assert dominant.squeeze(1).tolist() == [54, 108, 162]
    assert contextual.squeeze(1).tolist() == [10, 20, 30]
    assert split_counts(torch.tensor([[3]]), 10 / 64)[1].item() == 1  # round(0.47) = 0, at least one
    assert split_counts(torch.tensor([[0]]), 10 / 64)[1].item() == 0
    assert split_counts(torch.tensor([[5]]), 0.0)[1].item() == 0


@given(
    batch=st.integers(1, 3),
    grid=st.sampled_from([(2, 3), (4, 4), (5, 3), (24, 24)]),
    budget_share=st.floats(0.0, 1.0),
    share=st.sampled_from([0.0, 10 / 64, 0.3, 1.0]),
    seed=st.integers(0, 2**16),
)
def test_the_selection_is_the_references_with_the_exact_budget(batch, grid, budget_share, share, seed):
    """Kept = top-D attention + C strided targets, exactly the budget; every removed patch lands in
    exactly one contextual token, the target most similar to it (none are dropped unless C = 0)."""
    gen = torch.Generator().manual_seed(seed)
    n = grid[0] * grid[1]
    budget = round(budget_share * n)
    attention, keys = torch.rand(batch, 1 + n, generator=gen), torch.randn(batch, 1 + n, 8, generator=gen)
    view = vision_view(attention, keys, budget, grid)
    merge = VisionZip(VisionZip.Params(contextual_share=share)).select(view)
    n_dominant, n_contextual = (int(c) for c in split_counts(torch.tensor([[budget]]), share))
    for b in range(batch):
        dominant, targets, members = reference_selection(
            attention[b, 1:], keys[b, 1:], n_dominant, n_contextual
        )
        kept = set((merge.keep[b, 1:].nonzero().squeeze(1)).tolist())
        assert len(kept) == budget == n_dominant + n_contextual
        assert kept == dominant | set(targets)
        into = merge.into[b, 1:]
        assert {p: int(into[p]) - 1 for p in range(n) if into[p] >= 0} == members
        removed = [p for p in range(n) if p not in kept]
        assert all(into[p] >= 0 for p in removed) or n_contextual == 0
        assert all(int(into[p]) - 1 in targets for p in removed if into[p] >= 0)
        assert merge.into[b, 0] == -1 and not merge.keep[b, 0]  # the class token is not a candidate


def in_the_tower(keep: int, **params) -> tp.ReductionConfig:
    return tp.ReductionConfig(
        strategy="visionzip", stages=[{"site": "vision", "layer": 0, "keep": keep}], params=params
    )


def test_params_are_validated():
    with pytest.raises(ValidationError):
        in_the_tower(8, contextual_share=1.5)
    with pytest.raises(ValidationError):
        in_the_tower(8, dominant=54)


def contextual_token(features: torch.Tensor, target: int, members: torch.Tensor, rule: str) -> torch.Tensor:
    """What a kept patch becomes: `target + mean(others)` (the reference) or the mean of them all."""
    others = members[members != target]
    if rule == "average" or len(others) == 0:
        return features[members].mean(dim=0)
    return features[target] + features[others].mean(dim=0)


def test_target_plus_mean_touches_only_targets_and_sums_sizes():
    x = torch.tensor([[[1.0], [float("nan")], [3.0], [5.0], [7.0]]])  # slot 1 merges nowhere
    sizes = torch.tensor([[1.0, 1.0, 2.0, 1.0, 1.0]])
    into = torch.tensor([[-1, -1, 0, 0, -1]])  # slots 2 (size 2) and 3 join slot 0
    merged, new_sizes = merge_target_plus_mean(x, sizes, into)
    assert float(merged[0, 0, 0]) == pytest.approx(1.0 + (2 * 3.0 + 5.0) / 3, rel=1e-6)  # target + mean
    assert torch.isnan(merged[0, 1, 0]) and merged[0, 4, 0] == 7.0  # others as they were
    assert new_sizes.tolist() == [[4.0, 1.0, 2.0, 1.0, 1.0]]


@torch.no_grad()
@given(
    keep=st.integers(1, 36),
    share=st.sampled_from([10 / 64, 0.5]),
    rule=st.sampled_from(["target_plus_mean", "average"]),
)
def test_in_llava_the_projector_gets_the_contextual_tokens(llava_sdpa, keep, share, rule):
    """Toy LLaVA (feature layer 0): the stage's output is the projector's input. Each kept patch is
    itself (dominant) or its contextual token: by default its target plus the mean of its members
    (the reference code), with `average` the mean of them all; sources partition."""
    model = llava_sdpa
    inputs = llava_inputs([Prompt([3, 4], 1), Prompt([1, 2, 5], 2)])
    features = model.model.vision_tower(inputs["pixel_values"], output_hidden_states=True).hidden_states[1]
    received = []
    reduction = in_the_tower(keep, contextual_share=share, contextual_merge=rule)
    with tp.attach(model, reduction) as handle:
        hook = model.model.multi_modal_projector.register_forward_pre_hook(lambda m, a: received.append(a[0]))
        try:
            model(**inputs, position_ids=generation_positions(inputs["attention_mask"]), use_cache=False)
        finally:
            hook.remove()
        tower, language = handle.trace
    (projected,) = received  # [images, 36, D]: kept features at their patch slots
    assert tower.visual_after == [keep] * 3
    groups = tower.groups  # [images, 37]: the token holding each original token
    assert torch.all(groups >= 0)  # nothing dropped: every patch lives on in a kept token
    covered = sources(groups, tower.kept)
    assert torch.all(covered.sum(dim=1) == 1)  # ... in exactly one
    assert torch.equal(tower.sizes, covered.sum(-1).float())
    for image in range(3):
        for holder in tower.kept[image, 1:].tolist():
            members = (groups[image] == holder).nonzero().squeeze(1)
            expected = contextual_token(features[image], holder, members, rule)
            assert (projected[image, holder - 1] - expected).abs().max() <= TOL
    # the language model starts with the kept placeholders only, their sizes carried on
    visual = (inputs["input_ids"] == IMAGE_TOKEN_ID) & inputs["attention_mask"].bool()
    assert language.visual_after == [keep, 2 * keep]
    for b in range(2):
        kept = language.kept[b][language.kept[b] >= 0]
        sizes = language.sizes[b][language.kept[b] >= 0][visual[b, kept]]
        assert float(sizes.sum()) == int(visual[b].sum())


@torch.no_grad()
def test_the_llava_config_keeps_54_dominant_and_10_contextual():
    """configs/visionzip-llava.yaml on a LLaVA with CLIP-L's depth and grid: 24 layers, 24 x 24 patches."""
    config = tp.load_config(CONFIGS / "visionzip-llava.yaml")
    assert [(s.site, s.layer, s.keep) for s in config.stages] == [("vision", 22, 64)]
    model = toy_llava(ToySize(grid=24, vision_layers=24, layers=2))
    inputs = llava_inputs([Prompt([5, 3], 1)], tokens_per_image=576)
    inputs["pixel_values"] = torch.randn(1, 3, 96, 96, generator=torch.Generator().manual_seed(0))
    with tp.attach(model, config) as handle:
        model(**inputs, use_cache=False)
        tower, language = handle.trace
    assert (tower.layer, tower.visual_after, language.visual_after) == (22, [64], [64])
    merged = tower.sizes[0, 1:] > 1
    assert int(merged.sum()) <= 10 and float(tower.sizes[0, 1:].sum()) == 576
    assert int((tower.sizes[0, 1:] == 1).sum()) >= 54


def vit_model(name: str = "vit_tiny_patch16_224") -> torch.nn.Module:
    torch.manual_seed(0)
    size = {"img_size": 64, "patch_size": 8, "depth": 4, "embed_dim": 64, "num_heads": 4, "num_classes": 10}
    return timm.create_model(name, pretrained=False, **size).eval()


@torch.no_grad()
def test_on_a_vit_inside_a_block():
    model, images = vit_model(), torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    with tp.attach(model, tp.ReductionConfig(strategy="visionzip", layer=2, keep=20)) as handle:
        logits = model(images)
        (event,) = handle.trace
    assert logits.shape == (2, 10) and torch.isfinite(logits).all()
    assert event.tokens_after == [21, 21]  # the class token and 20 patches: 17 dominant + 3 contextual
    assert torch.all(event.sizes.sum(dim=1) == 65)
    assert torch.all(sources(event.groups, event.kept).sum(dim=1) == 1)
    assert torch.all((event.sizes[:, 1:] > 1).sum(dim=1) <= 3)


def test_a_vit_without_a_class_token_is_refused_with_the_reason():
    model = vit_model("vit_base_patch16_reg4_gap_256")
    config = tp.ReductionConfig(strategy="visionzip", layer=1, keep=10)
    with tp.attach(model, config), pytest.raises(tp.SignalUnavailable, match="no class token"):
        model(torch.randn(1, 3, 64, 64))


def test_refused_where_it_cannot_apply(llava_sdpa):
    with pytest.raises(tp.AttachError, match=r"qwen2_vl.*no class token"):
        tp.attach(toy_qwen2_vl(), in_the_tower(8))
    with pytest.raises(tp.ConfigError, match="vision sites"):
        tp.attach(llava_sdpa, tp.ReductionConfig(strategy="visionzip", layer=2, keep=8))
