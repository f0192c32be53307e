"""The timm ViT adapter: exactness at r=0, parity with the ToMe reference, schedules and invariants.

Small timm models built by name with random weights (no download), float32, 8 x 8 patches.
Tolerances: 1e-5 (max abs diff) for r=0 against the unpatched model and for the reference parity.
"""

from __future__ import annotations

import pytest
import timm
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st
from tome_reference import reference_forward

import tokenprune as tp
from tokenprune.core.merging import sources

TOL = 1e-5
SIZE = {"img_size": 64, "patch_size": 8, "depth": 4, "embed_dim": 64, "num_heads": 4, "num_classes": 10}
FAMILIES = {
    "vit": ("vit_tiny_patch16_224", {}),
    "deit_distilled": ("deit_tiny_distilled_patch16_224", {}),
    "deit3_layerscale": ("deit3_small_patch16_224", {"init_values": 0.5}),
    "qk_norm": ("vit_tiny_patch16_224", {"qk_norm": True}),
    "reg4_class": ("vit_small_patch14_reg4_dinov2", {"init_values": 0.5}),
    "reg4_gap": ("vit_base_patch16_reg4_gap_256", {}),
}
N_PATCHES = 64


def vit(family: str, seed: int = 0) -> torch.nn.Module:
    name, extra = FAMILIES[family]
    torch.manual_seed(seed)
    return timm.create_model(name, pretrained=False, **SIZE, **extra).eval()


@pytest.fixture(scope="module")
def models():
    return {family: vit(family) for family in FAMILIES}


def images(batch: int = 2, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, 3, 64, 64, generator=torch.Generator().manual_seed(seed))


def every_block(ratio: float) -> tp.ReductionConfig:
    return tp.ReductionConfig(strategy="tome", stages=[{"layer": i, "ratio": ratio} for i in range(4)])


@torch.no_grad()
@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("config", [every_block(0.0), tp.ReductionConfig(strategy="tome", params={"r": 0})])
def test_nothing_reduced_is_exact_and_stays_fused(models, family, config, monkeypatch):
    model, x = models[family], images()
    expected, expected_features = model(x), model.forward_features(x)
    calls = []
    fused = F.scaled_dot_product_attention
    monkeypatch.setattr(F, "scaled_dot_product_attention", lambda *a, **k: calls.append(1) or fused(*a, **k))
    with tp.attach(model, config):
        logits, features = model(x), model.forward_features(x)
    assert (logits - expected).abs().max() <= TOL
    assert (features - expected_features).abs().max() <= TOL
    assert len(calls) == 2 * len(model.blocks)  # every block still ran fused SDPA


@torch.no_grad()
@pytest.mark.parametrize(("r", "inflect"), [(2, 0.0), (5, 0.0), (4, -1.0), ([9, 0, 3, 6], 0.0)])
def test_same_outputs_as_the_reference_patch(models, r, inflect):
    model, x = models["vit"], images(3)
    schedule = tp.removals_per_layer(r, len(model.blocks), inflect)
    expected, sizes = reference_forward(model, x, schedule)
    with tp.attach(model, tp.ReductionConfig(strategy="tome", params={"r": r, "inflect": inflect})) as handle:
        logits = model(x)
        final = handle.trace[-1]
    assert (logits - expected).abs().max() <= TOL
    assert torch.equal(final.sizes, sizes[..., 0])  # the same sizes in the same (reference) order


def expected_counts(removals: list[int], prefix: int) -> list[int]:
    """Tokens after each block with removals, applying ToMe's cap of half the unprotected tokens."""
    tokens, counts = prefix + N_PATCHES, []
    for r in removals:
        r = min(r, (tokens - prefix) // 2)
        if r > 0:
            tokens -= r
            counts.append(tokens)
    return counts


schedules = st.one_of(
    st.integers(0, 40).map(lambda r: {"r": r}),
    st.builds(lambda r, slope: {"r": r, "inflect": slope}, st.integers(0, 20), st.sampled_from([-1.0, 0.5])),
    st.lists(st.integers(0, 40), min_size=1, max_size=6).map(lambda rs: {"r": rs}),
)


@torch.no_grad()
@given(family=st.sampled_from(list(FAMILIES)), params=schedules, batch=st.integers(1, 3))
def test_token_counts_sizes_and_sources(models, family, params, batch):
    """Counts follow the schedule; protected tokens survive first; sizes sum to N; sources partition."""
    model = models[family]
    prefix = model.num_prefix_tokens
    removals = tp.removals_per_layer(params["r"], 4, params.get("inflect", 0.0))
    with tp.attach(model, tp.ReductionConfig(strategy="tome", params=params)) as handle:
        model(images(batch))
        trace = handle.trace
    assert [e.tokens_after[0] for e in trace] == expected_counts(removals, prefix)
    total = prefix + N_PATCHES
    for event in trace:
        assert torch.equal(event.kept[:, :prefix], torch.arange(prefix).expand(batch, -1))
        assert torch.all(event.sizes.sum(dim=1) == total)
        covered = sources(event.groups, event.kept).sum(dim=1)  # [B, N]: holders per token
        assert torch.all(covered == 1)
        assert torch.equal(event.sizes, sources(event.groups, event.kept).sum(-1).float())


@torch.no_grad()
@pytest.mark.parametrize(
    ("strategy", "params"), [("random", {}), ("uniform", {}), ("fastv", {"score": "class"})]
)
def test_other_strategies_run_at_tomes_budgets(models, strategy, params):
    model = models["deit_distilled"]
    prefix = model.num_prefix_tokens
    stages = tp.schedule_stages(tp.removals_per_layer(6, 4), prefix + N_PATCHES, prefix)
    with tp.attach(model, tp.ReductionConfig(strategy="tome", params={"r": 6})) as handle:
        model(images())
        merged = [e.tokens_after for e in handle.trace]
    with tp.attach(model, tp.ReductionConfig(strategy=strategy, params=params, stages=stages)) as handle:
        model(images())
        pruned = handle.trace
    assert [e.tokens_after for e in pruned] == merged
    for event in pruned:
        assert torch.equal(event.kept[:, :prefix], torch.arange(prefix).expand(2, -1))
        assert event.sizes is None  # pruning merges nothing


@torch.no_grad()
def test_class_attention_ranks_by_the_class_tokens_row(models):
    model, x = models["vit"], images(1)
    captured = {}
    hook = model.blocks[1].attn.register_forward_hook(lambda m, a, o: captured.setdefault("input", a[0]))
    config = tp.ReductionConfig(strategy="fastv", params={"score": "class"}, layer=1, keep=10)
    with tp.attach(model, config) as h:
        model(x)
        kept = h.trace[0].kept[0]
    hook.remove()
    attn = model.blocks[1].attn
    qkv = attn.qkv(captured["input"]).reshape(1, -1, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
    rows = ((qkv[0][:, :, :1] @ qkv[1].transpose(-1, -2)) * attn.scale).softmax(-1).mean(dim=(1, 2))[0]
    expected = rows[1:].topk(10).indices.sort().values + 1
    assert torch.equal(kept[1:], expected)


def test_class_attention_needs_a_class_token(models):
    config = tp.ReductionConfig(strategy="fastv", params={"score": "class"}, layer=1, keep=10)
    with tp.attach(models["reg4_gap"], config), pytest.raises(tp.SignalUnavailable, match="class token"):
        models["reg4_gap"](images())


@torch.no_grad()
def test_repeated_calls_and_forward_features_leave_no_stale_state(models):
    model, x = models["deit3_layerscale"], images()
    with tp.attach(model, tp.ReductionConfig(strategy="tome", params={"r": 8})) as handle:
        first = model(x)
        features = model.forward_features(images(1, seed=3))
        assert features.shape[1] == handle.trace[-1].tokens_after[0]
        assert torch.equal(model(x), first)
        assert torch.equal(model.forward_head(model.forward_features(x)), first)


@torch.no_grad()
def test_average_pooling_weighs_tokens_by_size(models):
    model, x = models["reg4_gap"], images()
    with tp.attach(model, tp.ReductionConfig(strategy="tome", params={"r": 10})) as handle:
        features = model.forward_features(x)
        pooled = model.pool(features)
        sizes = handle.trace[-1].sizes[:, model.num_prefix_tokens :, None]
    tokens = features[:, model.num_prefix_tokens :]
    assert torch.allclose(pooled, (tokens * sizes).sum(1) / sizes.sum(1), atol=TOL)


@torch.no_grad()
def test_spatial_order_sorts_survivors_by_position(models):
    model = models["vit"]
    config = tp.ReductionConfig(strategy="tome", params={"r": 8}, token_order="spatial")
    with tp.attach(model, config) as handle:
        model(images())
        for event in handle.trace:
            assert torch.equal(event.kept, event.kept.sort(dim=1).values)


@torch.no_grad()
def test_detach_restores_the_model_exactly(models):
    model, x = models["qk_norm"], images()
    expected = model(x)
    handle = tp.attach(model, tp.ReductionConfig(strategy="tome", params={"r": 8}))
    assert not torch.equal(model(x), expected)
    handle.detach()
    assert torch.equal(model(x), expected)
    for module in model.modules():
        assert "forward" not in vars(module) and "pool" not in vars(module)
        assert not module._forward_hooks and not module._forward_pre_hooks


def test_bad_sites_are_refused(models):
    with pytest.raises(tp.ConfigError, match="past the last block"):
        tp.attach(models["vit"], tp.ReductionConfig(strategy="tome", layer=4, ratio=0.5))
