"""FEATHER: the grid at the first stage, exact budgets, and attention without RoPE over the visual keys."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from tokenprune.strategies.feather import Feather, whole
from tokenprune.strategies.uniform import lattice

import tokenprune as tp
from tokenprune.contracts.reducer import top_k_mask
from tokenprune.registry import STRATEGIES
from tokenprune.testing.models import IMAGE_TOKEN_ID, ToySize, toy_llava
from tokenprune.testing.oracles import Prompt, llava_inputs

CONFIGS = Path(__file__).parents[1] / "configs"
TOL = 1e-5


def image_view(
    side: int, budget: int, scores: torch.Tensor, positions: torch.Tensor | None = None, layer: int = 8
):
    """One sample: 2 text tokens, a side x side image, 2 text tokens; `scores` fake the attention signal."""
    length = side * side + 4
    visual = torch.zeros(1, length, dtype=torch.bool)
    visual[0, 2 : 2 + side * side] = True
    coords = torch.full((1, length, 3), -1)
    coords[0, visual[0]] = torch.tensor([[0, r, c] for r in range(side) for c in range(side)])
    extent = torch.zeros(1, length, 3, dtype=torch.long)
    extent[visual] = torch.tensor([1, side, side])
    return tp.TokenView(
        hidden=torch.zeros(1, length, 4),
        candidates=visual,
        valid=torch.ones(1, length, dtype=torch.bool),
        segment=torch.where(visual, 0, -1),
        coords=coords,
        extent=extent,
        positions=torch.arange(length)[None] if positions is None else positions,
        budget=torch.tensor([budget]),
        signals=tp.Signals({"attention": lambda query, rope, over: scores}),
        frame=torch.where(visual, 0, -1),
        layer=layer,
    )


def cell_mask(side: int, cells: list[tuple[int, int, int]]) -> torch.Tensor:
    mask = torch.zeros(1, side * side + 4, dtype=torch.bool)
    for _, r, c in cells:
        mask[0, 2 + side * r + c] = True
    return mask


def test_whole_rows_are_those_with_no_gap_in_their_positions():
    valid = torch.tensor([[0, 1, 1, 1], [1, 1, 1, 1], [0, 1, 1, 1]], dtype=torch.bool)
    positions = torch.tensor([[-1, 2, 3, 4], [0, 1, 2, 3], [-1, 0, 2, 3]])
    assert whole(positions, valid).tolist() == [True, True, False]


@pytest.mark.parametrize("budget", [16, 40, 144])
def test_the_first_stage_keeps_the_whole_grid_then_the_best_scores(budget):
    side = 12
    scores = torch.rand(1, side * side + 4, generator=torch.Generator().manual_seed(budget))
    view = image_view(side, budget, scores)
    keep = Feather().select(view)
    grid = cell_mask(side, lattice((1, side, side), 16))  # every 3rd row and column: 4 x 4 cells
    assert sorted({r for _, r, _ in lattice((1, side, side), 16)}) == [1, 4, 7, 10]
    assert int(keep.sum()) == budget
    assert bool(keep[grid].all())
    rest = top_k_mask(scores, view.candidates & ~grid, torch.tensor([budget - 16]))
    assert torch.equal(keep, grid | rest)


def test_a_budget_smaller_than_the_grid_keeps_its_best_cells():
    side = 12
    scores = torch.rand(1, side * side + 4, generator=torch.Generator().manual_seed(3))
    keep = Feather().select(image_view(side, 5, scores))
    grid = cell_mask(side, lattice((1, side, side), 16))
    assert torch.equal(keep, top_k_mask(scores, grid, torch.tensor([5])))


def test_a_later_stage_ranks_by_score_only():
    side = 6
    scores = torch.rand(1, 40, generator=torch.Generator().manual_seed(4))
    positions = torch.arange(40)[None] + torch.arange(40)[None].ge(20)  # a gap: an earlier stage removed one
    view = image_view(side, 9, scores, positions=positions)
    assert torch.equal(Feather().select(view), top_k_mask(scores, view.candidates, torch.tensor([9])))


def test_grid_layers_name_the_stages_with_the_grid():
    side = 6
    scores = torch.rand(1, 40, generator=torch.Generator().manual_seed(5))
    grid = cell_mask(side, lattice((1, side, side), 4))
    at_16 = Feather(Feather.Params(grid_layers=[16]))
    stage_1 = image_view(side, 6, scores, layer=8)
    assert torch.equal(at_16.select(stage_1), top_k_mask(scores, stage_1.candidates, torch.tensor([6])))
    assert bool(at_16.select(image_view(side, 6, scores, layer=16))[grid].all())


@given(
    budgets=st.lists(st.integers(0, 8), min_size=2, max_size=2),
    per_frame=st.booleans(),
    seed=st.integers(0, 99),
)
def test_budgets_are_exact_per_sample_and_per_frame(budgets, per_frame, seed):
    """Two samples, each an image of 2 frames of 2 x 2 tokens; any budget, any split over frames."""
    gen = torch.Generator().manual_seed(seed)
    visual = torch.zeros(2, 12, dtype=torch.bool)
    visual[:, 2:10] = True
    coords = torch.full((2, 12, 3), -1)
    coords[:, 2:10] = torch.tensor([[t, r, c] for t in range(2) for r in range(2) for c in range(2)])
    extent = torch.zeros(2, 12, 3, dtype=torch.long)
    extent[visual] = torch.tensor([2, 2, 2])
    frame_budget = torch.tensor([[min(b, 4), b - min(b, 4)] for b in budgets]) if per_frame else None
    view = tp.TokenView(
        hidden=torch.zeros(2, 12, 4),
        candidates=visual,
        valid=torch.ones(2, 12, dtype=torch.bool),
        segment=torch.where(visual, 0, -1),
        coords=coords,
        extent=extent,
        positions=torch.arange(12).expand(2, 12),
        budget=torch.tensor(budgets),
        layer=8,
        signals=tp.Signals({"attention": lambda query, rope, over: torch.rand(2, 12, generator=gen)}),
        frame=torch.where(visual, coords[..., 0], -1),
        frame_budget=frame_budget,
    )
    keep = Feather().select(view)
    assert keep.sum(1).tolist() == budgets and not bool((keep & ~visual).any())
    if per_frame:
        counts = [[int((keep[b] & (view.frame[b] == f)).sum()) for f in range(2)] for b in range(2)]
        assert counts == frame_budget.tolist()


# -- the signal: attention without RoPE, softmax over the visual keys --------------------------------


@pytest.fixture
def recorded():
    seen: list[dict[str, torch.Tensor]] = []

    @tp.register_strategy("record_attention")
    class RecordAttention(tp.Reducer):
        requires = frozenset({"attention"})

        def select(self, view: tp.TokenView) -> torch.Tensor:
            get = view.signals.get
            seen.append(
                {
                    (rope, over): get("attention", query="last", rope=rope, over=over)
                    for rope in (True, False)
                    for over in ("all", "visual")
                }
            )
            return top_k_mask(torch.zeros(view.valid.shape), view.candidates, *view.quota())

    yield seen
    STRATEGIES.unregister("record_attention")


def last_row(model, inputs, layer: int, rope: bool, keys: torch.Tensor) -> torch.Tensor:
    """[B, N] the last token's head-averaged attention at `layer` over `keys` [B, N], computed by hand."""
    language = model.model.language_model
    attention = language.layers[layer].self_attn
    hidden = model(**inputs, use_cache=False, output_hidden_states=True).hidden_states[layer]
    normed = language.layers[layer].input_layernorm(hidden)
    batch, length = normed.shape[:2]
    q = attention.q_proj(normed[:, -1:]).view(batch, 1, -1, attention.head_dim).transpose(1, 2)
    k = attention.k_proj(normed).view(batch, length, -1, attention.head_dim).transpose(1, 2)
    if rope:
        cos, sin = language.rotary_emb(hidden, torch.arange(length)[None])
        q = q * cos[:, None, -1:] + rotate_half(q) * sin[:, None, -1:]
        k = k * cos[:, None] + rotate_half(k) * sin[:, None]
    k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
    logits = (q @ k.transpose(-1, -2)).squeeze(2) * attention.head_dim**-0.5  # [B, H, N]
    logits = logits.masked_fill(~keys[:, None], float("-inf"))
    return torch.softmax(logits, dim=-1).mean(dim=1)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat([-x[..., half:], x[..., :half]], dim=-1)


@torch.no_grad()
@pytest.mark.parametrize("layer", [1, 3])
def test_attention_without_rope_over_visual_keys_equals_a_hand_computation(llava_sdpa, recorded, layer):
    model = llava_sdpa
    inputs = llava_inputs([Prompt([3, 2, 4], 2), Prompt([1, 6], 1)])
    inputs.pop("attention_mask")  # no padding: the hand computation's positions are 0..N-1
    inputs = {**inputs, "input_ids": inputs["input_ids"][:1], "pixel_values": inputs["pixel_values"][:2]}
    visual = inputs["input_ids"] == IMAGE_TOKEN_ID
    with tp.attach(model, tp.ReductionConfig(strategy="record_attention", layer=layer, ratio=0.5)):
        model(**inputs, use_cache=False)
    (got,) = recorded
    everything = torch.ones_like(visual)
    for rope in (True, False):
        for over, keys in (("all", everything), ("visual", visual)):
            expected = last_row(model, inputs, layer - 1, rope, keys)
            assert (got[rope, over] - expected).abs().max() <= TOL, (rope, over)
    assert float(got[False, "visual"][~visual].abs().max()) == 0.0


@torch.no_grad()
def test_visual_keys_renormalise_the_eager_attention_per_head(llava_eager, recorded):
    """With padding and RoPE: eager maps of layer K-1 restricted to the visual keys, renormalised per head."""
    inputs = llava_inputs([Prompt([3, 2, 4], 2), Prompt([1, 6], 1)])
    maps = llava_eager(**inputs, use_cache=False, output_attentions=True).attentions[1][:, :, -1]  # [B, H, N]
    visual = (inputs["input_ids"] == IMAGE_TOKEN_ID) & inputs["attention_mask"].bool()
    restricted = maps * visual[:, None]
    expected = (restricted / restricted.sum(-1, keepdim=True)).mean(1)
    with tp.attach(llava_eager, tp.ReductionConfig(strategy="record_attention", layer=2, ratio=0.5)):
        llava_eager(**inputs, use_cache=False)
    real = inputs["attention_mask"].bool()
    assert (recorded[0][True, "visual"] - expected)[real].abs().max() <= TOL


# -- the paper's schedule -------------------------------------------------------------------------------


@torch.no_grad()
def test_the_paper_config_keeps_the_grid_at_layer_8_then_21_tokens():
    config = tp.load_config(CONFIGS / "feather-llava.yaml")
    assert [(s.layer, s.keep) for s in config.stages] == [(8, 236), (16, 21)]
    model = toy_llava(ToySize(layers=17, grid=24, heads=2, kv_heads=1))
    inputs = llava_inputs([Prompt([5, 3], 1)], tokens_per_image=576)
    inputs["pixel_values"] = torch.randn(1, 3, 96, 96, generator=torch.Generator().manual_seed(0))
    with tp.attach(model, config) as handle:
        model(**inputs, use_cache=False)
        first, second = handle.trace
    assert (first.visual_after, second.visual_after) == ([236], [21])
    image = set((first.kept[0] - 5).tolist())
    grid = {24 * r + c for _, r, c in lattice((1, 24, 24), 64)}
    assert grid <= image
    assert sorted({r for _, r, _ in lattice((1, 24, 24), 64)}) == list(range(1, 24, 3))
