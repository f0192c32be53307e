"""Each batched selection keeps exactly what its per-sample form keeps, on random ragged batches.

The per-sample forms below are the strategies' former implementations (Python loops over samples
and frames, one host read per group), kept here as the references. Batches are ragged: samples of
different lengths (left padding), images of different sizes split into frames, budgets per sample or
per frame, zero budgets and full ones.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from tokenprune.strategies.cdpruner import CDPruner
from tokenprune.strategies.dart import Dart
from tokenprune.strategies.divprune import DivPrune
from tokenprune.strategies.downsample import Downsample
from tokenprune.strategies.pdrop import PyramidDrop
from tokenprune.strategies.pool import Pool
from tokenprune.strategies.tome import _redirect
from tokenprune.strategies.uniform import UniformGrid, lattice, strided
from tokenprune.strategies.visionzip import assign_to_targets
from tokenprune.strategies.vispruner import VisPruner

import tokenprune as tp
from tokenprune.contracts.reducer import split_budget

# -- the per-sample references ------------------------------------------------------------------


def reference_max_min(features: torch.Tensor, k: int) -> list[int]:
    """DivPrune's greedy max-min cosine distance on one set of rows (ties: the earlier row)."""
    if k == 0:
        return []
    unit = torch.nn.functional.normalize(features, dim=-1)
    distance = 1 - unit @ unit.T
    nearest = distance.fill_diagonal_(float("inf")).min(dim=1).values
    distance.fill_diagonal_(0.0)
    chosen = [int(nearest.argmax())]
    to_chosen = distance[chosen[0]].clone()
    to_chosen[chosen] = float("-inf")
    for _ in range(k - 1):
        pick = int(to_chosen.argmax())
        chosen.append(pick)
        to_chosen = torch.minimum(to_chosen, distance[pick])
        to_chosen[chosen] = float("-inf")
    return chosen


def reference_divprune(view: tp.TokenView) -> torch.Tensor:
    keep = torch.zeros_like(view.candidates)
    budget, groups = view.quota()
    for b in range(keep.shape[0]):
        for group, k in enumerate(budget[b].tolist()):
            members = (view.candidates[b] & (groups[b] == group)).nonzero().squeeze(1)
            keep[b, members[reference_max_min(view.features()[b, members], k)]] = True
    return keep


def top_indices(values: torch.Tensor, k: int) -> list[int]:
    order = torch.sort(values, descending=True, stable=True).indices
    return sorted(order[: min(k, len(values))].tolist())


def reference_least_duplicated(
    visual: torch.Tensor, norms: torch.Tensor, text_pivots: torch.Tensor, k: int, image_pivots: int
) -> list[int]:
    """DART on one group: visual pivots by norm, then each pivot's least similar free tokens."""
    if k == 0:
        return []
    pivots = top_indices(norms, min(image_pivots, k))
    unit = torch.nn.functional.normalize(visual, dim=-1)
    anchors = torch.cat([unit[pivots], torch.nn.functional.normalize(text_pivots, dim=-1)])
    free = torch.ones(len(visual), dtype=torch.bool)
    free[pivots] = False
    chosen = list(pivots)
    for anchor, share in zip(anchors, split_budget(k - len(pivots), [1] * len(anchors)), strict=True):
        similarity = (unit @ anchor).masked_fill(~free, float("inf"))
        picked = torch.sort(similarity, stable=True).indices[:share]
        free[picked] = False
        chosen += picked.tolist()
    return chosen


def reference_dart(view: tp.TokenView, image_pivots: int, text_pivots: int) -> torch.Tensor:
    keep = torch.zeros_like(view.candidates)
    norms = view.signals.get("keys", rope=True, heads="concat").abs().sum(dim=-1)
    features = view.signals.get("normed_output")
    visual = view.valid & (view.coords[..., 0] >= 0)
    budget, groups = view.quota()
    position = torch.arange(keep.shape[1])
    for b in range(keep.shape[0]):
        last_visual = int(position[visual[b]].max()) if bool(visual[b].any()) else -1
        text = (view.valid[b] & ~visual[b] & (position > last_visual)).nonzero().squeeze(1)
        text = text[top_indices(norms[b, text], text_pivots)]
        for group, k in enumerate(budget[b].tolist()):
            members = (view.candidates[b] & (groups[b] == group)).nonzero().squeeze(1)
            picked = reference_least_duplicated(
                features[b, members], norms[b, members], features[b, text], k, image_pivots
            )
            keep[b, members[picked]] = True
    return keep


# -- random ragged batches ----------------------------------------------------------------------


@st.composite
def ragged_views(draw: st.DrawFn) -> tp.TokenView:
    """A batch of samples `[pad] text [image: frames of H x W] text`, each of its own sizes and budget.

    Features are exact-tie cases (axis directions, zero rows included) or Gaussian (no near-ties
    within rounding: the two forms' matrix products may round differently); per-frame budgets or
    one budget per sample; a few candidates may be missing (an earlier stage removed them).
    """
    batch = draw(st.integers(1, 4))
    per_frame = draw(st.booleans())
    shapes = [
        (draw(st.integers(1, 3)), draw(st.integers(1, 4)), draw(st.integers(1, 4)), draw(st.integers(0, 4)))
        for _ in range(batch)
    ]  # frames, rows, columns, text after the image
    lengths = [2 + t * h * w + after for t, h, w, after in shapes]
    length = max(lengths)
    n_frames = max(t for t, _, _, _ in shapes)
    fields = {
        "valid": torch.zeros(batch, length, dtype=torch.bool),
        "candidates": torch.zeros(batch, length, dtype=torch.bool),
        "segment": torch.full((batch, length), -1),
        "coords": torch.full((batch, length, 3), -1),
        "extent": torch.zeros(batch, length, 3, dtype=torch.long),
        "positions": torch.full((batch, length), -1),
    }
    budgets = torch.zeros(batch, n_frames, dtype=torch.long)
    for b, ((t, h, w, _), n) in enumerate(zip(shapes, lengths, strict=True)):
        start = length - n
        fields["valid"][b, start:] = True
        fields["positions"][b, start:] = torch.arange(n)
        image = slice(start + 2, start + 2 + t * h * w)
        fields["segment"][b, image] = 0
        fields["coords"][b, image] = torch.cartesian_prod(torch.arange(t), torch.arange(h), torch.arange(w))
        fields["extent"][b, image] = torch.tensor([t, h, w])
        missing = draw(st.lists(st.integers(0, t * h * w - 1), max_size=2))
        present = torch.ones(t * h * w, dtype=torch.bool)
        present[missing] = False  # absent: an earlier stage removed them (a filler slot here)
        absent = torch.zeros(length, dtype=torch.bool)
        absent[image] = ~present
        fields["candidates"][b, image] = present
        for name, filler in (
            ("valid", False),
            ("segment", -1),
            ("coords", -1),
            ("extent", 0),
            ("positions", -1),
        ):
            fields[name][b, absent] = filler
        frames_present = present.view(t, h * w).sum(1)
        budgets[b, :t] = torch.tensor([draw(st.integers(0, int(c))) for c in frames_present])
    frame = torch.where(fields["candidates"], fields["coords"][..., 0], -1)
    if not per_frame:
        totals = fields["candidates"].sum(1)
        budgets = torch.tensor([[draw(st.integers(0, int(c)))] for c in totals])
    seed = torch.Generator().manual_seed(draw(st.integers(0, 999)))
    if draw(st.booleans()):  # exact ties: scaled axis directions, whose cosines are exactly 0 or +-1
        axis = torch.nn.functional.one_hot(torch.randint(0, 4, (batch, length), generator=seed), 4).float()
        features = axis * torch.randint(-2, 3, (batch, length, 1), generator=seed).float()
    else:  # distinct values: no ties, and none within rounding of each other
        features = torch.randn(batch, length, 4, generator=seed)
    keys = torch.randint(-2, 3, (batch, length, 6), generator=torch.Generator().manual_seed(batch)).float()
    return tp.TokenView(
        hidden=features,
        budget=budgets.sum(1),
        layer=2,
        signals=tp.Signals(
            {
                "keys": lambda rope, heads: keys,
                "normed_output": lambda: features,
                "attention": lambda query: keys.sum(-1),  # integer sums: ties
                "next_attention": lambda query: keys.sum(-1),
            }
        ),
        frame=frame,
        frame_budget=budgets if per_frame else None,
        **fields,
    )


@given(ragged_views())
def test_batched_divprune_keeps_what_the_per_sample_form_keeps(view):
    assert torch.equal(DivPrune().select(view), reference_divprune(view))


@given(ragged_views(), st.integers(1, 4), st.integers(0, 4))
def test_batched_dart_keeps_what_the_per_sample_form_keeps(view, image_pivots, text_pivots):
    params = Dart.Params(image_pivots=image_pivots, text_pivots=text_pivots)
    assert torch.equal(Dart(params).select(view), reference_dart(view, image_pivots, text_pivots))


def reference_uniform(view: tp.TokenView) -> torch.Tensor:
    keep = torch.zeros_like(view.candidates)
    for b in range(view.candidates.shape[0]):
        per_frame = view.frame_budget is not None
        groups = view.frame[b] if per_frame else view.segment[b]
        ids = groups[view.candidates[b]].unique().tolist()
        sizes = [int((groups == g).sum()) for g in ids]
        shares = view.frame_budget[b, ids].tolist() if per_frame else split_budget(int(view.budget[b]), sizes)
        for group, share in zip(ids, shares, strict=True):
            where = (groups == group).nonzero().squeeze(1)
            extent, coords = view.extent[b, where[0]].tolist(), view.coords[b, where]
            if per_frame:
                extent, coords = [1, *extent[1:]], coords * torch.tensor([0, 1, 1])
            cell_to_token = {tuple(c): int(i) for c, i in zip(coords.tolist(), where.tolist(), strict=True)}
            chosen = [cell_to_token[c] for c in reference_lattice(tuple(extent), share) if c in cell_to_token]
            keep[b, chosen] = True
            missing = share - len(chosen)
            if missing:
                rest = [int(i) for i in where if not keep[b, i]]
                keep[b, rest[:: max(1, len(rest) // missing)][:missing]] = True
    return keep


def reference_axis_counts(extent: tuple[int, ...], k: int) -> list[int]:
    counts = [1] * len(extent)
    while math.prod(counts) < k:
        open_axes = [a for a in range(len(extent)) if counts[a] < extent[a]]
        axis = max(open_axes, key=lambda a: (extent[a] / counts[a], -a))
        counts[axis] += 1
    return counts


def reference_lattice(extent: tuple[int, ...], k: int) -> list[tuple[int, ...]]:
    if k == 0:
        return []
    axes = [strided(size, n) for size, n in zip(extent, reference_axis_counts(extent, k), strict=True)]
    cells = [
        tuple(c)
        for c in torch.cartesian_prod(*[torch.tensor(a) for a in axes]).reshape(-1, len(axes)).tolist()
    ]
    return [cells[i] for i in strided(len(cells), k)]


@given(ragged_views())
def test_batched_uniform_keeps_what_the_per_sample_form_keeps(view):
    assert torch.equal(UniformGrid().select(view), reference_uniform(view))


@given(st.integers(1, 6), st.integers(1, 30), st.integers(1, 30), st.data())
def test_lattice_counts_equal_the_greedy(t, h, w, data):
    k = data.draw(st.integers(0, t * h * w))
    assert lattice((t, h, w), k) == reference_lattice((t, h, w), k)


# -- host reads in the forward path ---------------------------------------------------------------

HOST_READS = ("item", "tolist", "__bool__", "__int__", "__float__", "__index__")


def host_reads(run: Callable[[], object]) -> int:
    """How many times `run` reads a tensor back to the host (`.item()`, `.tolist()`, `bool`, `int`...)."""
    count = 0

    def counted(name: str) -> Callable[..., object]:
        original = getattr(torch.Tensor, name)

        def read(self: torch.Tensor, *args: object) -> object:
            nonlocal count
            count += 1
            return original(self, *args)

        return read

    with pytest.MonkeyPatch.context() as patch:
        for name in HOST_READS:
            patch.setattr(torch.Tensor, name, counted(name))
        run()
    return count


SYNC_FREE = {
    "uniform": UniformGrid(),
    "pool": Pool(),
    "downsample": Downsample(),
    "dart": Dart(),
    "vispruner": VisPruner(),
    "pdrop": PyramidDrop(),
}


@pytest.mark.parametrize("name", sorted(SYNC_FREE))
@settings(max_examples=10)
@given(view=ragged_views())
def test_batched_selections_read_nothing_back_to_the_host(name, view):
    assert host_reads(lambda: SYNC_FREE[name].select(view)) == 0


@pytest.mark.parametrize("greedy", [DivPrune(), CDPruner()], ids=["divprune", "cdpruner"])
@settings(max_examples=10)
@given(view=ragged_views())
def test_greedy_selections_read_only_their_number_of_steps(greedy, view):
    assert host_reads(lambda: greedy.select(view)) == 1


@settings(max_examples=10)
@given(view=ragged_views())
def test_visionzip_assigns_contextual_tokens_without_host_reads(view):
    groups = view.quota()[1]
    targets = view.candidates & (torch.arange(view.candidates.shape[1]) % 3 == 0)
    members = view.candidates & ~targets
    assert host_reads(lambda: assign_to_targets(view.hidden, members, targets, groups)) == 0


def test_tome_follows_a_merged_survivor_in_one_hop_without_host_reads():
    into = torch.tensor([[-1, 0, 3, -1, 0, -1]])  # 1 and 4 merged into 0 earlier; 0 merges into 3 now
    into[0, 0] = 3
    assert host_reads(lambda: _redirect(into)) == 0
    assert _redirect(into).tolist() == [[3, 3, 3, -1, 3, -1]]
