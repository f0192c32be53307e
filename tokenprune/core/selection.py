"""What every site shares about a selection: checking it against the budget, and recording it.

A `ReductionEvent` is the trace entry of one stage, for language-model sites
(`tokenprune.core.language`) and grid sites (ViT blocks, vision towers: `tokenprune.core.grid`) alike.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from tokenprune.contracts.reducer import Merge, Reducer, Site, TokenView, group_counts, strategy_label
from tokenprune.errors import ConfigError, StrategyError
from tokenprune.indexing import gather_tokens


@dataclass
class ReductionEvent:
    """One stage of the most recent reducing forward; lists hold one entry per sample.

    `kept` [B, L']: original sequence positions that survive the stage, sorted, text included.
    Original padding is never kept; a row keeping fewer tokens than the longest row is
    left-filled with -1.
    `groups` [B, N]: for each original token, the original position of the surviving token that
    holds it (itself, or the token it was merged into), -1 once removed or for padding.
    `sizes` [B, L'] float: original tokens each kept token stands for; None when nothing merged.
    `site`: "language" (B = samples, positions in the input ids) or "vision" (B = images of the
    vision batch or of the ViT, positions in the encoder's [prefix, patches] sequence) or "cache"
    (entries of the prompt left the KV cache of layers >= `layer` between decode steps; counts are over
    the prompt's cached entries).
    `step`: at a cache site, the index of the generated token whose forward is the first to run without
    the removed entries (the prefill produces token 0: pruning right after it is step 1); None elsewhere.
    """

    layer: int
    tokens_before: list[int]
    tokens_after: list[int]
    visual_before: list[int]
    visual_after: list[int]
    kept: Tensor
    groups: Tensor | None = None
    sizes: Tensor | None = None
    site: str = "language"
    step: int | None = None


def checked_select(reducer: Reducer, view: TokenView) -> tuple[Tensor, Merge | None]:
    """(keep mask, merge or None) of `reducer.select(view)`, refused with a `StrategyError` naming the
    registered strategy when it breaks the contract (a `Merge` from a strategy not declaring `merges`)."""
    selection = reducer.select(view)
    name = strategy_label(reducer)
    if isinstance(selection, Merge):
        if not type(reducer).merges:
            raise StrategyError(
                f"{name}: select returned a Merge, but the class does not declare `merges = True`: "
                "set it (merging strategies are checked against their own oracles), or return a bool mask"
            )
        keep, merge = selection.keep, selection
    else:
        keep, merge = selection, None
    check_selection(name, keep, view, merge)
    return keep, merge


def check_selection(name: str, keep: Tensor, view: TokenView, merge: Merge | None = None) -> None:
    """Refuse a selection breaking the contract: wrong shape or type, non-candidates kept, off budget."""
    if not isinstance(keep, Tensor) or keep.shape != view.candidates.shape or keep.dtype != torch.bool:
        got = f"{tuple(keep.shape)} {keep.dtype}" if isinstance(keep, Tensor) else type(keep).__name__
        raise StrategyError(f"{name}: select returned {got}, expected bool {tuple(view.candidates.shape)}")
    budget, groups = view.quota()
    per_group = group_counts(keep, groups, budget.shape[1])
    outside, off_budget = torch.stack([(keep & ~view.candidates).any(), (per_group != budget).any()]).tolist()
    if outside:
        raise StrategyError(f"{name}: select kept tokens that are not candidates (text, padding or filler)")
    if off_budget:
        unit = "sample" if view.frame_budget is None else "frame"
        raise StrategyError(
            f"{name}: select kept {per_group.tolist()} per {unit} (a row per sample), "
            f"the budget is {budget.tolist()}"
        )
    if merge is not None:
        _check_merge(name, keep, view, merge)


def group_members(groups: Tensor, n_groups: int) -> Tensor:
    """[B, G, L] bool: the tokens of each group, from `groups` [B, L] (0..n_groups-1; -1: none)."""
    return groups[:, None, :] == torch.arange(n_groups, device=groups.device)[None, :, None]


MERGE_RULES = ("average", "target_plus_mean")


def _check_merge(name: str, keep: Tensor, view: TokenView, merge: Merge) -> None:
    """A merge moves removed candidates into kept candidates, nothing else, by a known rule."""
    if merge.combine not in MERGE_RULES:
        raise StrategyError(f"{name}: Merge.combine {merge.combine!r} is not one of {', '.join(MERGE_RULES)}")
    into = merge.into
    if into.shape != keep.shape or into.dtype != torch.long:
        raise StrategyError(
            f"{name}: Merge.into must be long {tuple(keep.shape)}, got {into.dtype} {tuple(into.shape)}"
        )
    joined = into >= 0
    target_kept = keep.gather(1, into.clamp(min=0, max=keep.shape[1] - 1)) & (into < keep.shape[1])
    if bool((joined & (keep | ~view.candidates | ~target_kept)).any()):
        raise StrategyError(f"{name}: Merge.into may only move removed candidates into kept candidates")
    if merge.weights is not None:
        _check_weights(name, keep, view, merge)


def _check_weights(name: str, keep: Tensor, view: TokenView, merge: Merge) -> None:
    """Weights: [B, L, L] floats >= 0, rows only at kept candidates, columns only at candidates, averaged."""
    weights, shape = merge.weights, (*keep.shape, keep.shape[1])
    if not isinstance(weights, Tensor) or tuple(weights.shape) != shape or not weights.is_floating_point():
        got = (
            f"{weights.dtype} {tuple(weights.shape)}"
            if isinstance(weights, Tensor)
            else type(weights).__name__
        )
        raise StrategyError(f"{name}: Merge.weights must be float {shape}, got {got}")
    if merge.combine != "average":
        raise StrategyError(f"{name}: Merge.weights combine by a weighted average: set combine='average'")
    used = weights != 0
    outside = (used.any(-1) & ~keep) | (used.any(-2) & ~view.candidates)
    if bool(outside.any() | (weights < 0).any()):
        raise StrategyError(
            f"{name}: Merge.weights must be >= 0, with rows only at kept candidates "
            "and columns only at candidates"
        )


def reduction_event(
    layer: int, view: TokenView, kept: Tensor, visual: Tensor, groups: Tensor, sizes: Tensor | None
) -> ReductionEvent:
    """The trace entry of one stage: real and visual tokens before and after it, per sample, and sources."""
    before = gather_tokens(visual, view.positions, 1) & view.valid
    after = gather_tokens(visual, kept, 1) & (kept >= 0)
    counts = torch.stack([view.valid.sum(1), (kept >= 0).sum(1), before.sum(1), after.sum(1)]).tolist()
    return ReductionEvent(layer, *counts, kept=kept, groups=groups, sizes=sizes)


def check_strategy_site(reducer: Reducer, site: Site) -> None:
    """Refuse a strategy at a kind of site its method does not act at (its `sites`)."""
    if site not in type(reducer).sites:
        where = " and ".join(sorted(type(reducer).sites))
        raise ConfigError(
            f"{type(reducer).__name__} acts at {where} sites, not at a {site} site"
            + (" (use `site: vision` stages)" if "vision" in type(reducer).sites else "")
        )
