"""DART: pivots by key norm, each taking the least similar tokens; its signals against direct computations."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from tokenprune.strategies.dart import Dart, least_duplicated

import tokenprune as tp
from tokenprune.contracts.reducer import split_budget, top_k_mask
from tokenprune.registry import STRATEGIES
from tokenprune.testing.models import IMAGE_TOKEN_ID
from tokenprune.testing.oracles import Prompt, llava_inputs, oracle_masks, removed_positions

TOL = 1e-5


def on_circle(degrees: list[float]) -> torch.Tensor:
    return torch.tensor([[math.cos(math.radians(a)), math.sin(math.radians(a))] for a in degrees])


# -- the selection on crafted inputs ---------------------------------------------------------------


def test_a_pivot_takes_the_tokens_least_similar_to_it():
    visual = on_circle([0, 10, 20, 90, 180, 170, 100, 45])
    norms = torch.tensor([9.0, 1, 1, 1, 1, 1, 1, 1])  # token 0 (0 degrees) is the only visual pivot
    assert least_duplicated(visual, norms, torch.zeros(0, 2), 4, image_pivots=1) == [0, 4, 5, 6]


def test_pivots_share_the_budget_in_sequence_order_and_the_pool_shrinks():
    visual = on_circle([0, 10, 20, 90, 180, 170, 100, 45])
    norms = torch.tensor([9.0, 1, 1, 8, 1, 1, 1, 1])  # pivots: 0 degrees, then 90 degrees
    # 0 degrees takes 180 and 170; 90 degrees, from what is left, takes 10 and 20 (not 180 again).
    assert least_duplicated(visual, norms, torch.zeros(0, 2), 6, image_pivots=2) == [0, 3, 4, 5, 1, 2]
    # a text pivot at 270 degrees comes after them: 5 = 1 visual pivot + shares 2, 2 (text: 90, 100).
    text = on_circle([270])
    assert least_duplicated(visual, norms, text, 5, image_pivots=1) == [0, 4, 5, 3, 6]


@given(
    angles=st.lists(st.floats(-180, 180), min_size=1, max_size=24),
    n_text=st.integers(0, 4),
    image_pivots=st.integers(1, 4),
    data=st.data(),
)
def test_each_pivot_prefers_tokens_less_similar_than_any_left_out(angles, n_text, image_pivots, data):
    gen = torch.Generator().manual_seed(len(angles))
    visual = on_circle(angles) * torch.rand(len(angles), 1, generator=gen).add(0.5)  # scale does not matter
    norms = torch.randn(len(angles), generator=gen)
    text = on_circle(data.draw(st.lists(st.floats(-180, 180), min_size=n_text, max_size=n_text)))
    k = data.draw(st.integers(0, len(angles)))
    chosen = least_duplicated(visual, norms, text, k, image_pivots)
    assert len(chosen) == len(set(chosen)) == k
    if k == 0:
        return
    pivots = min(image_pivots, k)
    assert set(chosen[:pivots]) == set(norms.topk(pivots).indices.tolist())  # the largest key norms
    unit = torch.nn.functional.normalize(visual, dim=-1)
    anchors = torch.cat([unit[sorted(chosen[:pivots])], torch.nn.functional.normalize(text, dim=-1)])
    left_out = [i for i in range(len(angles)) if i not in chosen]
    shares = split_budget(k - pivots, [1] * len(anchors))
    start = pivots
    for anchor, share in zip(anchors, shares, strict=True):
        picked = chosen[start : start + share]
        start += share
        if picked and left_out:
            assert (unit[picked] @ anchor).max() <= (unit[left_out] @ anchor).min() + 1e-6


def crafted_view(budget: list[int], frame_budget: list[list[int]] | None = None) -> tp.TokenView:
    """Two samples of 14 slots: text, an image of 8 tokens (2 frames of 2 x 2), text; sample 1 left-padded."""
    visual = torch.zeros(2, 14, dtype=torch.bool)
    visual[0, 2:10] = visual[1, 4:12] = True
    valid = torch.ones(2, 14, dtype=torch.bool)
    valid[1, :2] = False
    coords = torch.full((2, 14, 3), -1)
    extent = torch.zeros(2, 14, 3, dtype=torch.long)
    grid = torch.tensor([[t, r, c] for t in range(2) for r in range(2) for c in range(2)])
    coords[0, 2:10], coords[1, 4:12] = grid, grid
    extent[visual] = torch.tensor([2, 2, 2])
    frame = torch.where(visual, coords[..., 0], -1)
    features = torch.randn(2, 14, 6, generator=torch.Generator().manual_seed(0))
    keys = torch.randn(2, 14, 12, generator=torch.Generator().manual_seed(1))
    keys[0, 0] = keys[1, 2] = 100.0  # text *before* the image: never a pivot, whatever its norm
    return tp.TokenView(
        hidden=features,
        candidates=visual,
        valid=valid,
        segment=torch.where(visual, 0, -1),
        coords=coords,
        extent=extent,
        positions=torch.arange(14).expand(2, 14),
        budget=torch.tensor(budget),
        layer=2,
        signals=tp.Signals({"keys": lambda rope, heads: keys, "normed_output": lambda: features}),
        frame=frame,
        frame_budget=None if frame_budget is None else torch.tensor(frame_budget),
    )


@pytest.mark.parametrize("k", range(9))
def test_select_keeps_the_budget_exactly_with_the_visual_pivots(k):
    view = crafted_view([k, k])
    keep = Dart().select(view)
    assert keep.sum(1).tolist() == [k, k] and not bool((keep & ~view.candidates).any())
    norms = view.signals.get("keys", rope=True, heads="concat").abs().sum(-1)
    for b in range(2):
        visual = view.candidates[b].nonzero().squeeze(1)
        pivots = visual[norms[b, visual].topk(min(4, k)).indices]
        assert bool(keep[b, pivots].all())
        text = (view.valid[b] & ~view.candidates[b]).nonzero().squeeze(1)
        text = text[text > visual.max()]
        expected = least_duplicated(
            view.hidden[b, visual],
            norms[b, visual],
            view.hidden[b, text[norms[b, text].topk(min(4, len(text))).indices.sort().values]],
            k,
            4,
        )
        assert sorted(visual[expected].tolist()) == keep[b].nonzero().squeeze(1).tolist()


@pytest.mark.parametrize("shares", [[0, 0], [1, 3], [4, 4], [2, 0]])
def test_select_keeps_each_frames_budget(shares):
    view = crafted_view([sum(shares)] * 2, [shares, shares[::-1]])
    keep = Dart().select(view)
    for b, expected in enumerate([shares, shares[::-1]]):
        assert [int((keep[b] & (view.frame[b] == f)).sum()) for f in range(2)] == expected


# -- the signals it reads ------------------------------------------------------------------------------


@pytest.fixture
def recorded():
    """Registers `record_keys`: keeps the first candidates, records DART's signals at every stage."""
    seen: list[dict[str, torch.Tensor]] = []

    @tp.register_strategy("record_keys")
    class RecordKeys(tp.Reducer):
        requires = frozenset({"keys", "normed_output"})

        def select(self, view: tp.TokenView) -> torch.Tensor:
            get = view.signals.get
            seen.append(
                {
                    "rope": get("keys", rope=True, heads="concat"),
                    "plain": get("keys", rope=False, heads="concat"),
                    "mean": view.signals.keys(),
                    "normed": get("normed_output"),
                }
            )
            return top_k_mask(torch.zeros(view.valid.shape), view.candidates, *view.quota())

    yield seen
    STRATEGIES.unregister("record_keys")


@torch.no_grad()
@pytest.mark.parametrize("layer", [1, 2, 3])
def test_keys_and_normed_output_equal_direct_computations(llava_sdpa, recorded, layer):
    """Post-RoPE keys = the KV cache's; plain keys = k_proj(input norm(h)); normed = final norm(h)."""
    model, inputs = llava_sdpa, llava_inputs([Prompt([3, 2, 4], 2), Prompt([1, 6], 1)])
    real = inputs["attention_mask"].bool()
    out = model(**inputs, use_cache=True, output_hidden_states=True)
    language = model.model.language_model
    cached = out.past_key_values.layers[layer - 1].keys  # [B, Hkv, N, d], after RoPE
    attention, norm = language.layers[layer - 1].self_attn, language.layers[layer - 1].input_layernorm
    plain = attention.k_proj(norm(out.hidden_states[layer - 1]))  # hidden_states[i]: the input of layer i
    with tp.attach(model, tp.ReductionConfig(strategy="record_keys", layer=layer, ratio=0.5)):
        model(**inputs, use_cache=False)
    (got,) = recorded
    assert (got["rope"] - cached.transpose(1, 2).flatten(2))[real].abs().max() <= TOL
    assert (got["plain"] - plain)[real].abs().max() <= TOL
    assert (got["mean"] - plain.view(*plain.shape[:2], -1, attention.head_dim).mean(2))[
        real
    ].abs().max() <= TOL
    assert (got["normed"] - language.norm(out.hidden_states[layer]))[real].abs().max() <= TOL


@torch.no_grad()
def test_keys_at_a_later_stage_equal_the_mask_oracles_cache(llava_sdpa, recorded):
    model, inputs = llava_sdpa, llava_inputs([Prompt([3, 2, 4], 2), Prompt([1, 6], 1)])
    config = tp.ReductionConfig(
        strategy="record_keys", stages=[{"layer": 1, "ratio": 0.5}, {"layer": 3, "ratio": 0.8}]
    )
    with tp.attach(model, config) as handle:
        model(**inputs, use_cache=False)
        trace = handle.trace
    valid = inputs["attention_mask"].bool()
    handles = oracle_masks(model, removed_positions(trace[:1], valid), valid)
    try:
        cache = model(**inputs, use_cache=True).past_key_values
    finally:
        for h in handles:
            h.remove()
    expected = cache.layers[2].keys.transpose(1, 2).flatten(2)
    kept = trace[0].kept
    for b in range(2):
        row = kept[b] >= 0
        assert (recorded[1]["rope"][b, row] - expected[b, kept[b, row]]).abs().max() <= TOL


# -- on the model -----------------------------------------------------------------------------------


@torch.no_grad()
def test_dart_on_the_model_equals_the_selection_on_an_unreduced_forward(llava_sdpa):
    model, inputs = llava_sdpa, llava_inputs([Prompt([3, 2, 4], 2), Prompt([1, 6], 1)])
    out = model(**inputs, use_cache=True, output_hidden_states=True)
    keys = out.past_key_values.layers[1].keys.transpose(1, 2).flatten(2)
    normed = model.model.language_model.norm(out.hidden_states[2])
    with tp.attach(model, tp.ReductionConfig(strategy="dart", layer=2, keep=20)) as handle:
        model(**inputs, use_cache=False)
        kept = handle.trace[0].kept
    for b in range(2):
        ids, real = inputs["input_ids"][b], inputs["attention_mask"][b].bool()
        visual = ((ids == IMAGE_TOKEN_ID) & real).nonzero().squeeze(1)
        text = (~(ids == IMAGE_TOKEN_ID) & real).nonzero().squeeze(1)
        text = text[text > visual.max()]
        norms = keys[b].abs().sum(-1)
        text_pivots = text[norms[text].topk(min(4, len(text))).indices.sort().values]
        expected = visual[least_duplicated(normed[b, visual], norms[visual], normed[b, text_pivots], 20, 4)]
        row = kept[b][kept[b] >= 0]
        assert row[ids[row] == IMAGE_TOKEN_ID].tolist() == sorted(expected.tolist())


def test_dart_needs_a_layer_before_the_site(llava_sdpa):
    with pytest.raises(tp.ConfigError, match="keys"):
        tp.attach(llava_sdpa, tp.ReductionConfig(strategy="dart", layer=0, ratio=0.5))
