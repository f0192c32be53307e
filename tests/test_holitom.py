"""HoliTom: the best global segmentation, static cells merged over their window, merging inside; oracles."""

from __future__ import annotations

import itertools

import torch
from hypothesis import given
from hypothesis import strategies as st
from test_prunevid import (
    MERGE,
    QUESTION,
    assert_alone_equals_batched,
    assert_every_cell_collapses_to_its_first_token,
    assert_follows_oracle,
    assert_refuses_a_per_frame_budget,
    cell_slots,
    family_model,
    question_mask_hooks,
    staged,
    static_video,
    video_view,
)
from tokenprune.strategies.holitom import HoliTom, HoliTomParams, previous_in_time, window_starts
from tokenprune.strategies.prunevid import video_sizes
from torch import Tensor, nn

import tokenprune as tp
from tokenprune.contracts.reducer import Signals, TokenView
from tokenprune.core.selection import checked_select
from tokenprune.registry import adapter_for
from tokenprune.testing.exactness import merge_oracle_logits
from tokenprune.testing.family import Family
from tokenprune.testing.oracles import hooked


def run(view: TokenView, **params) -> tp.Merge:
    """A selection checked against the contract (budget, candidates, merge targets)."""
    _, merge = checked_select(HoliTom(HoliTomParams(**params)), view)
    assert merge is not None
    return merge


def patterned_video(stays: list[list[bool]], width: int = 16, seed: int = 0) -> Tensor:
    """[T, 1, C, D]: cell c of frame t repeats frame t-1's feature where stays[t-1][c], else a new one."""
    generator = torch.Generator().manual_seed(seed)
    columns = len(stays[0])
    frames = [torch.randn(columns, width, generator=generator)]
    for row in stays:
        fresh = torch.randn(columns, width, generator=generator)
        frames.append(torch.where(torch.tensor(row)[:, None], frames[-1], fresh))
    return torch.stack(frames)[:, None]


def saving(stays: list[list[bool]], starts: list[int]) -> int:
    """Tokens a segmentation saves: per window [s, e], (e - s) x cells staying over all of s..e."""
    bounds = [*starts, len(stays) + 1]
    total = 0
    for s, after in itertools.pairwise(bounds):
        e = after - 1
        static = [all(stays[t - 1][c] for t in range(s + 1, e + 1)) for c in range(len(stays[0]))]
        total += (e - s) * sum(static)
    return total


@given(st.integers(2, 6), st.integers(1, 3), st.integers(0, 2**16))
def test_the_segmentation_saves_the_most_of_all_segmentations(steps, columns, seed):
    """Random stay patterns: the dynamic programme's windows save as much as the best of every split."""
    generator = torch.Generator().manual_seed(seed)
    stays = (torch.rand(steps - 1, columns, generator=generator) < 0.6).tolist()
    view = video_view(patterned_video(stays, seed=seed), budget=1)
    sizes = video_sizes(view)
    previous = previous_in_time(view, sizes)
    unit = torch.nn.functional.normalize(view.features(), dim=-1)
    cosine = (unit * unit.gather(1, previous.clamp(min=0)[..., None].expand_as(unit))).sum(-1)
    starts = window_starts(view, (cosine > 0.8) & (previous >= 0), previous, sizes)
    chosen = starts[0].nonzero().squeeze(1).tolist()
    assert chosen[0] == 0
    splits = [[0, *cut] for k in range(steps) for cut in itertools.combinations(range(1, steps), k)]
    assert saving(stays, chosen) == max(saving(stays, split) for split in splits)


def test_a_static_video_collapses_to_one_token_per_cell():
    view = video_view(static_video(4, 2, 3), budget=6)
    merge = run(view)
    assert_every_cell_collapses_to_its_first_token(view, merge)


def test_a_changing_region_survives_while_the_static_rest_collapses():
    frames = static_video(4, 2, 3)
    frames[:, 0, 0] = 3 * torch.eye(16)[:4]
    view = video_view(frames, budget=5 + 4)
    merge = run(view)
    assert merge.keep[0, cell_slots(view, 0, 0)].all()
    assert int(merge.keep.sum()) == 9


def test_windows_follow_the_scenes():
    """Two scenes of four frames: windows [0, 3] and [4, 7]; each scene keeps its own token per cell."""
    frames = torch.cat([static_video(4, 2, 2, seed=0), static_video(4, 2, 2, seed=1)])
    view = video_view(frames, budget=8)
    merge = run(view)
    assert merge.keep[0].nonzero().squeeze(1).tolist() == [2, 3, 4, 5, 18, 19, 20, 21]


@given(st.integers(0, 2**16), st.integers(1, 5), st.integers(1, 3), st.floats(0.0, 1.0), st.floats(0.1, 1.0))
def test_any_budget_is_met_exactly_by_one_hop_merges(seed, steps, columns, keep, noise):
    frames = static_video(steps, 2, columns, seed=seed)
    frames = frames + noise * torch.randn(frames.shape, generator=torch.Generator().manual_seed(seed + 1))
    view = video_view(frames, budget=round(keep * steps * 2 * columns))
    merge = run(view, tau=0.5)
    assert merge.keep[0, merge.into[merge.into >= 0]].all()


def test_inside_the_language_model_the_rest_joins_the_most_similar_kept_token():
    """Layer K: the three most attended visual tokens stay; each other joins the one it resembles most."""
    frames = torch.eye(16)[:8].reshape(2, 2, 2, 16)
    frames[1] = frames[0] + 0.1 * torch.eye(16)[8:12].reshape(2, 2, 16)  # frame 1 resembles frame 0
    view = video_view(frames, budget=4, layer=2)
    scores = torch.zeros(1, view.hidden.shape[1])
    scores[0, [2, 3, 4, 5]] = 1.0
    view.signals = Signals({"attention": lambda query="last": scores})
    _, merge = checked_select(HoliTom(), view)
    assert merge.keep[0].nonzero().squeeze(1).tolist() == [2, 3, 4, 5]
    assert merge.into[0, 6:10].tolist() == [2, 3, 4, 5]
    assert not merge.proportional_attention


def test_a_per_frame_budget_is_refused_before_the_language_model():
    assert_refuses_a_per_frame_budget(HoliTom())


# -- end to end: the merge oracle of the outer stage, and the inner merge replayed on top ------------------


OUTER, INNER = MERGE, QUESTION  # PruneVid's stages: the reference also keeps positions inside


def inner_merge_hook(family: Family, model: nn.Module, trace) -> list:
    """A pre-hook on the inner stage's layer: each survivor becomes the mean, over the original tokens it
    holds, of the hidden state of the outer survivor holding each (their sizes weigh the outer ones)."""
    outer, inner = trace

    def merge(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        hidden = args[0] if args else kwargs["hidden_states"]
        merged = hidden.clone()
        for b in range(hidden.shape[0]):
            held = outer.groups[b].clamp(min=0)
            for position in inner.kept[b][inner.kept[b] >= 0].tolist():
                members = (inner.groups[b] == position).nonzero().squeeze(1)
                merged[b, position] = hidden[b, held[members]].mean(0)
        return ((merged, *args[1:]), kwargs) if args else (args, {**kwargs, "hidden_states": merged})

    layer = adapter_for(model, family.adapter).decoder_layers()[inner.layer]
    return [layer.register_forward_pre_hook(merge, with_kwargs=True)]


@torch.no_grad()
def two_stage_oracle(family: Family, model: nn.Module, inputs: dict, trace, config, prompt: int) -> Tensor:
    """The outer stage's merge oracle, the inner stage's merge at its layer, its merged keys hidden after."""
    hooks = inner_merge_hook(family, model, trace) + question_mask_hooks(family, model, inputs, trace, prompt)
    with hooked(hooks):
        return merge_oracle_logits(family, model, inputs, trace[0], False, config)


__all__ = ["family_model"]  # the fixture, shared with test_prunevid


def test_the_outer_stage_equals_the_merge_oracle_with_the_cache(family_model):
    assert_follows_oracle(family_model, staged("holitom", OUTER), None)


def test_both_stages_equal_the_outer_and_inner_merges_replayed(family_model):
    """Outer merge at layer 0, inner merge at layer 2: kept logits equal the merge oracle of the outer
    stage with the inner merge replayed at layer 2 and its merged keys hidden from there (1e-4), and
    greedy decoding on the cache follows that oracle."""
    assert_follows_oracle(family_model, staged("holitom", OUTER, INNER), two_stage_oracle)


@torch.no_grad()
def test_a_sample_alone_equals_the_same_sample_in_a_batch(family_model):
    family, model, batch = family_model
    assert_alone_equals_batched(family, model, batch, staged("holitom", OUTER, INNER))
