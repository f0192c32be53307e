"""The `site: cache` stage: visual entries leave the KV cache of decoder layers >= K between decode steps.

The prefill runs as configured (its own stages included); at its end the stage records, on the cache,
layer K's key slots and the prompt's layout (`ledger.CacheSiteState`). A hook on layer K's attention
keeps the inputs of the newest `window` query tokens of every forward. Before a due decode step (step 1,
then every `every` steps) the reducer ranks the visual entries of layer K's cache by the attention those
query tokens pay them, recomputed from the cached keys and the queries projected again (the layer keeps
its own attention backend). The removed entries then leave the cache of every layer from K on
(`restore=False`: compacted, so decode attends to fewer entries) or are set aside by the layers' masks
(`restore=True`: each selection chooses again among the visual entries of the first). Kept entries keep
their slots' rotated keys, hence their positions. Every tensor follows the cache's device.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from tokenprune.config import ReductionConfig, Stage
from tokenprune.contracts.adapter import Adapter
from tokenprune.contracts.layout import VisualLayout
from tokenprune.contracts.probe import AttentionInputs
from tokenprune.contracts.reducer import Reducer, Signals, TokenView, group_counts
from tokenprune.core.language.forward import Pass
from tokenprune.core.language.ledger import (
    RECORD_ATTRIBUTE,
    CachedStage,
    CacheLedger,
    CacheRecord,
    CacheSiteState,
    record_of,
)
from tokenprune.core.language.lifecycle import Hooks
from tokenprune.core.language.reduction import layout_on
from tokenprune.core.selection import ReductionEvent, checked_select
from tokenprune.errors import ConfigError, StrategyError
from tokenprune.indexing import gather_tokens, left_aligned_index


class CacheSite:
    """The `site: cache` stage of one attachment: its hooks' captures and the pruning between steps."""

    def __init__(
        self, adapter: Adapter, config: ReductionConfig, reducer: Reducer, stage: Stage, ledger: CacheLedger
    ) -> None:
        if stage.positions == "renumbered":
            raise ConfigError(
                f"`site: cache` stage at layer {stage.layer}: `positions: renumbered` cannot apply to it: "
                "its kept entries keep the keys they were cached with, rotated at their positions; renumber "
                "in a prefill stage instead"
            )
        self.config = config
        self.reducer = reducer
        self.stage = stage
        self.layer = stage.layer
        self.ledger = ledger
        self.n_layers = len(adapter.decoder_layers())
        self.probe = adapter.probe(stage.layer)
        self._captured: AttentionInputs | None = None

    def install(self, hooks: Hooks, live: Callable[[], bool]) -> None:
        """Keep layer K's attention inputs of every forward the attachment drives (`live`)."""

        def store(inputs: AttentionInputs) -> None:
            if live():
                self._captured = inputs

        hooks.add(self.probe.watch(store))

    # -- between forwards ----------------------------------------------------------------------

    def after_prefill(self, finished: Pass) -> None:
        """Start the stage's state on the prefilled cache: layer K's slots and the prompt's layout."""
        cache = finished.cache
        if cache is None or self._captured is None:
            return
        record = record_of(cache)
        if finished.current is None or record is None:  # no prefill stage shortened anything
            record = CacheRecord(self.ledger.owner, cache.get_seq_length(self.layer))
            setattr(cache, RECORD_ATTRIBUTE, record)
        _add_region(record, self.layer, finished.padding_mask, cache.layers[self.layer].keys)
        device = record.stages[0].key_valid.device
        batch, length = record.stages[0].key_valid.shape[0], record.original_length
        layout = finished.layout or VisualLayout.from_segments(batch, length, [], device)
        real = _real(finished.padding_mask, batch, length, layout.visual.device)
        record.cache_site = CacheSiteState(layout=layout, original=layout.visual & real)

    def after_forward(self, cache: Any) -> None:
        """Keep the newest `window` query tokens of the forward that just ran on `cache`."""
        captured, self._captured = self._captured, None
        record = None if cache is None else record_of(cache)
        if captured is None or record is None or record.cache_site is None:
            return
        state, window = record.cache_site, self.stage.window
        if state.recent is not None:
            captured = _joined(state.recent, captured)
        hidden, rotary = captured.hidden, captured.rotary
        state.recent = AttentionInputs(
            hidden[:, -window:], tuple(t[..., -window:, :] for t in rotary), captured.keys[:, -window:]
        )

    def before_forward(self, cache: Any, padding_mask: Tensor | None) -> ReductionEvent | None:
        """Count the forward about to run on `cache`; prune first when it is a due step (its event)."""
        record = None if cache is None else record_of(cache)
        if record is None or record.owner != self.ledger.owner or record.cache_site is None:
            return None
        state = record.cache_site
        state.forwards += 1
        step, every = state.forwards, self.stage.every
        due = step == 1 or (every is not None and (step - 1) % every == 0)
        if not due or state.recent is None:
            return None
        return self._prune(cache, record, state, padding_mask, step)

    # -- one selection -------------------------------------------------------------------------

    def _prune(
        self, cache: Any, record: CacheRecord, state: CacheSiteState, padding_mask: Tensor | None, step: int
    ) -> ReductionEvent:
        """Select among layer K's cached visual entries, apply it to every layer from K on, record it."""
        region = _region(record, self.layer)
        keys = cache.layers[self.layer].keys
        device = keys.device
        valid = state.bases.get(self.layer, region.key_valid).to(device)
        positions = region.key_positions.to(device)
        view = self._view(cache, record, state, valid, positions, padding_mask)
        keep, merge = checked_select(self.reducer, view)
        if merge is not None:
            raise StrategyError(
                f"{type(self.reducer).__name__}: a `site: cache` stage drops entries, it cannot merge"
            )
        if self.stage.restore and state.pool is None:
            state.pool = view.candidates
        removed = _by_position(view.candidates & ~keep, positions, state.original.shape[1])
        before = self._counts(state, region)
        for stage in record.stages:
            if stage.layer >= self.layer:
                self._apply(cache, record, state, stage, removed)
        return self._event(region, before, self._counts(state, region), step)

    def _view(
        self,
        cache: Any,
        record: CacheRecord,
        state: CacheSiteState,
        valid: Tensor,
        positions: Tensor,
        padding_mask: Tensor | None,
    ) -> TokenView:
        """What the reducer sees of layer K's cached prompt entries (`docs/cache-site.md`)."""
        keys = cache.layers[self.layer].keys
        device, slots = keys.device, positions.shape[1]
        layout = layout_on(state.layout, device)
        real = valid & (positions >= 0)
        window = torch.arange(slots, device=device) >= keys.shape[2] - self.stage.window
        candidates = gather_tokens(layout.visual, positions, 1) & real & ~window
        if state.pool is not None:
            candidates &= state.pool.to(device)
        frame = gather_tokens(layout.frame, positions, 1).masked_fill(~candidates, -1)
        budgets = self._budgets(state, layout, candidates, frame)
        allowed = torch.cat([real, _since(padding_mask, record, keys.shape[2] - slots, device)], dim=1)
        signals = Signals(
            {
                "attention": lambda query="last": self._attention(state.recent, keys, allowed)[:, :slots],
                "keys": lambda rope=True, heads="mean": keys[:, :, :slots].float().mean(dim=1),
            }
        )
        return TokenView(
            hidden=keys[:, :, :slots].mean(dim=1),
            candidates=candidates,
            valid=real,
            segment=gather_tokens(layout.segment, positions, 1).masked_fill(~candidates, -1),
            coords=gather_tokens(layout.coords, positions, 1),
            extent=gather_tokens(layout.extent, positions, 1),
            positions=positions,
            budget=budgets.sum(dim=1),
            layer=self.layer,
            signals=signals,
            frame=frame,
            frame_budget=budgets if self.config.budget == "per_frame" else None,
            site="cache",
            kind=gather_tokens(layout.kind, positions, 1).masked_fill(~candidates, -1),
        )

    def _attention(self, recent: AttentionInputs, keys: Tensor, allowed: Tensor) -> Tensor:
        """[B, Lc] head-averaged attention the newest query tokens pay each cached entry of layer K,
        averaged over those of them that are real (a query row on padding counts for nothing)."""
        device = keys.device
        recent = AttentionInputs(
            recent.hidden.to(device), tuple(t.to(device) for t in recent.rotary), recent.keys.to(device)
        )
        rows = self.probe.cached_rows(recent, keys, allowed)  # [B, w, Lc]
        weight = allowed[:, -rows.shape[1] :].float()
        return (rows * weight[..., None]).sum(dim=1) / weight.sum(dim=1, keepdim=True).clamp(min=1)

    def _budgets(
        self, state: CacheSiteState, layout: VisualLayout, candidates: Tensor, frame: Tensor
    ) -> Tensor:
        """[B, G] entries to keep: the stage's share of the prompt's original visual tokens per sample (or
        per frame with `budget: per_frame`), capped by the candidates present."""
        per_frame = self.config.budget == "per_frame"
        n_groups = max(layout.frames, 1) if per_frame else 1
        original = state.original.to(candidates.device)

        def counts(mask: Tensor, groups: Tensor) -> Tensor:
            return group_counts(mask, groups if per_frame else torch.zeros_like(groups), n_groups)

        rows = torch.stack([counts(original, layout.frame), counts(candidates, frame)]).tolist()
        budgets = [
            [min(self.stage.kept_count(n), c) for n, c in zip(*sample, strict=True)]
            for sample in zip(*rows, strict=True)
        ]
        return torch.tensor(budgets, dtype=torch.long, device=candidates.device)

    def _apply(
        self, cache: Any, record: CacheRecord, state: CacheSiteState, stage: CachedStage, removed: Tensor
    ) -> None:
        """Take the `removed` [B, N] original positions out of the key slots of `stage`'s layers."""
        device = stage.key_valid.device
        positions = stage.key_positions.to(removed.device)
        drop = (removed.gather(1, positions.clamp(min=0)) & (positions >= 0)).to(device)
        stage.all_real = None
        if self.stage.restore:
            base = state.bases.setdefault(stage.layer, stage.key_valid)
            stage.key_valid = base & ~drop
            return
        inner = left_aligned_index(stage.key_valid & ~drop)
        for layer in range(stage.layer, _region_end(record, stage.layer, self.n_layers)):
            cached = cache.layers[layer]
            cached.keys, cached.values = (
                _compacted(t, inner, stage.key_valid.shape[1]) for t in (cached.keys, cached.values)
            )
        stage.key_valid = inner >= 0
        stage.key_positions = gather_tokens(positions.to(device), inner, 1).masked_fill(inner < 0, -1)
        if stage.key_bias is not None:
            stage.key_bias = gather_tokens(stage.key_bias, inner, 1).masked_fill(inner < 0, 0.0)

    def _counts(self, state: CacheSiteState, region: CachedStage) -> list[int]:
        """[B] real entries, then [B] visual entries, of layer K's cached prompt as its slots are now."""
        positions = region.key_positions
        real = region.key_valid & (positions >= 0)
        visual = gather_tokens(state.layout.visual.to(positions.device), positions, 1) & real
        return torch.stack([real.sum(1), visual.sum(1)]).tolist()

    def _event(
        self, region: CachedStage, before: list[list[int]], after: list[list[int]], step: int
    ) -> ReductionEvent:
        """The trace entry of one selection: layer K's prompt entries before and after it, per sample."""
        real = region.key_valid & (region.key_positions >= 0)
        inner = left_aligned_index(real)
        kept = gather_tokens(region.key_positions, inner, 1).masked_fill(inner < 0, -1)
        return ReductionEvent(
            self.layer, before[0], after[0], before[1], after[1], kept=kept, site="cache", step=step
        )


def _by_position(slots: Tensor, positions: Tensor, length: int) -> Tensor:
    """[B, length] bool: the original positions of the True `slots` [B, L] (`positions`: -1 for filler)."""
    marked = torch.zeros(slots.shape[0], length + 1, dtype=torch.long, device=slots.device)
    marked.scatter_add_(1, positions.masked_fill(positions < 0, length), slots.long())
    return marked[:, :length] > 0


def _region(record: CacheRecord, layer: int) -> CachedStage:
    """The stage of `record` whose key slots start at `layer`."""
    return next(stage for stage in record.stages if stage.layer == layer)


def _region_end(record: CacheRecord, layer: int, n_layers: int) -> int:
    """The first layer after `layer` where another stage's key slots start (or the layer count)."""
    return min([stage.layer for stage in record.stages if stage.layer > layer] + [n_layers])


def _add_region(record: CacheRecord, layer: int, padding_mask: Tensor | None, keys: Tensor) -> None:
    """Give `record` a stage starting at `layer`: a copy of the stage covering it, or the whole prompt."""
    if any(stage.layer == layer for stage in record.stages):
        return
    covering = [stage for stage in record.stages if stage.layer < layer]
    if covering:
        source = covering[-1]
        region = CachedStage(
            layer, source.key_valid.clone(), source.key_bias, key_positions=source.key_positions
        )
    else:
        batch, device, length = keys.shape[0], keys.device, record.original_length
        valid = _real(padding_mask, batch, length, device)
        positions = torch.arange(length, device=device).expand(batch, -1).masked_fill(~valid, -1)
        region = CachedStage(layer, valid, None, key_positions=positions)
    record.stages = sorted([*record.stages, region], key=lambda stage: stage.layer)


def _real(padding_mask: Tensor | None, batch: int, length: int, device: torch.device) -> Tensor:
    """[B, length] bool: the real tokens of the prompt (all of them without a padding mask)."""
    if padding_mask is None:
        return torch.ones(batch, length, dtype=torch.bool, device=device)
    return padding_mask[:, :length].to(device=device, dtype=torch.bool)


def _since(padding_mask: Tensor | None, record: CacheRecord, count: int, device: torch.device) -> Tensor:
    """[B, count] bool: which of the tokens cached since the prompt are real (the caller's mask says)."""
    if padding_mask is None:
        batch = record.stages[0].key_valid.shape[0]
        return torch.ones(batch, count, dtype=torch.bool, device=device)
    start = record.original_length
    return padding_mask[:, start : start + count].to(device=device, dtype=torch.bool)


def _compacted(states: Tensor, inner: Tensor, prompt: int) -> Tensor:
    """Cached states [B, H, P + G, d] with their P prompt slots gathered at `inner` [B, P'] (-1: filler)."""
    batch, heads, _, dim = states.shape
    index = inner.clamp(min=0).to(states.device)[:, None, :, None].expand(batch, heads, -1, dim)
    return torch.cat([states[:, :, :prompt].gather(2, index), states[:, :, prompt:]], dim=2)


def _joined(older: AttentionInputs, newer: AttentionInputs) -> AttentionInputs:
    """The query tokens of two forwards one after the other."""
    rotary = tuple(_cat_tokens(a, b) for a, b in zip(older.rotary, newer.rotary, strict=True))
    return AttentionInputs(
        _cat_tokens(older.hidden, newer.hidden), rotary, _cat_tokens(older.keys, newer.keys)
    )


def _cat_tokens(older: Tensor, newer: Tensor) -> Tensor:
    """`older` then `newer` along their token dimension (-2), a batch dimension of 1 broadcast."""
    shape = [max(a, b) for a, b in zip(older.shape, newer.shape, strict=True)]
    shape[-2] = -1
    return torch.cat([older.to(newer.device).expand(shape), newer.expand(shape)], dim=-2)
