"""The reduction step at a language-model site: pick tokens, gather what the later layers need.

At the site the Reducer picks tokens on a `TokenView`; the step gathers hidden states, gives the
later layers rotary tables and position ids as the stage's position policy has them (`original`:
gathered by position; `renumbered`: recomputed through the model's rotary module, `positions`),
builds the mask of the shortened sequence, and records the event and the cache's key slots. Every
tensor it creates or indexes with follows the device of the hidden states the site meets (under a
device map they may differ from the inputs').
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import Tensor

from tokenprune.config import ReductionConfig, Stage
from tokenprune.contracts.adapter import Adapter
from tokenprune.contracts.layout import VisualLayout
from tokenprune.contracts.reducer import PositionPolicy, Reducer, TokenView, group_counts
from tokenprune.core.language.forward import Pass, Shortened
from tokenprune.core.language.ledger import CacheLedger
from tokenprune.core.language.positions import as_rows, like_model, remember_shift, renumbered
from tokenprune.core.language.signals import site_signals
from tokenprune.core.masks import LayerMasks
from tokenprune.core.merging import follow_groups, initial_groups, key_bias, merge_tokens
from tokenprune.core.selection import checked_select, reduction_event
from tokenprune.core.vision_site import VisionSite
from tokenprune.errors import InputError
from tokenprune.indexing import compose, gather_tokens, left_aligned_index, scatter_tokens

# The layer-0 site that applies `site: vision` stages to the language model's input.
HANDOFF = Stage(layer=0, ratio=0.0)


class ReductionStep:
    """Reduces the sequence entering a site's layer, for one attachment."""

    def __init__(
        self,
        adapter: Adapter,
        config: ReductionConfig,
        reducer: Reducer,
        visions: list[VisionSite],
        ledger: CacheLedger,
        policies: dict[int, PositionPolicy],
    ) -> None:
        self.adapter = adapter
        self.config = config
        self.reducer = reducer
        self.visions = visions
        self.ledger = ledger
        self.policies = policies  # the position policy of the stage at each layer

    def reduce(self, state: Pass, stage: Stage, hidden: Tensor, kwargs: dict[str, Any]) -> Tensor:
        """The hidden states [B, L', D] the layers from `stage` on see; `state.current` describes them."""
        batch, length = hidden.shape[:2]
        device = hidden.device
        if state.current is None:
            if state.layout is None:
                state.layout = VisualLayout.from_segments(batch, length, [], device)
            index = torch.arange(length, device=device).expand(batch, length)
            valid = _padding_valid(state.padding_mask, batch, length, device)
            state.restore = torch.cat([hidden, hidden.new_zeros(batch, 1, hidden.shape[-1])], dim=1)
            index, sizes = index.masked_fill(~valid, -1), None
            state.groups = initial_groups(valid)
        else:
            index, sizes = state.current.index.to(device), state.current.sizes
            sizes = None if sizes is None else sizes.to(device)
            valid = index >= 0
            state.restore = scatter_tokens(state.restore.to(device), index, hidden, in_place=True)
            state.groups = state.groups.to(device)
        state.layout = layout_on(state.layout, device)
        view = self._view(state, stage, hidden, index, valid, sizes)
        if stage is HANDOFF:
            keep, into, sizes = self._handoff(state, view)
        else:
            keep, merge = checked_select(self.reducer, view)
            into = None if merge is None else merge.into
            if merge is not None:
                hidden, sizes = merge_tokens(hidden, view.token_sizes(), merge)
                state.proportional = merge.proportional_attention
        survive = (valid & ~view.candidates) | keep
        inner = left_aligned_index(survive)
        kept = compose(index, inner)
        state.groups = follow_groups(state.groups, index, survive, into)
        sizes = None if sizes is None else gather_tokens(sizes, inner, 1).masked_fill(kept < 0, 1.0)
        bias = key_bias(sizes) if state.proportional else None
        overrides = self._overrides(kept, kwargs, hidden.dtype, bias)
        if self.policies[stage.layer] == "renumbered":
            overrides.update(self._renumbered(state, kept, hidden, kwargs))
        else:
            overrides.update(_kept_positions(state.current, kept, inner, kwargs))
        state.current = Shortened(kept, overrides, sizes)
        state.events.append(
            reduction_event(stage.layer, view, kept, state.layout.visual, state.groups, sizes)
        )
        self.ledger.remember(state.cache, stage.layer, kept, state.restore.shape[1] - 1, bias)
        remember_shift(state.cache, stage.layer, state.shift, first=stage.layer == self.ledger.first_layer)
        return gather_tokens(hidden, inner, 1)

    def rotary_tables(self, hidden: Tensor, positions: Tensor) -> tuple[Tensor, Tensor]:
        """(cos, sin) for `positions`, from the language model's own rotary module, on `hidden`'s device."""
        rotary = self.adapter.rotary_embedding()
        return tuple(t.to(hidden.device) for t in rotary(hidden, positions.to(hidden.device)))

    def _renumbered(
        self, state: Pass, kept: Tensor, hidden: Tensor, kwargs: dict[str, Any]
    ) -> dict[str, Any]:
        """Rotary tables and position ids of the kept tokens numbered afresh (`positions.renumbered`).

        Counted from the model's own positions of the whole input (what its rotary module received);
        `state.shift` becomes the one decode steps of the layers from here on continue with.
        """
        own = state.positions
        if own is None or kwargs.get("position_embeddings") is None:
            raise InputError(
                "`positions: renumbered` recomputes the rotary tables that decoder layers receive: this "
                "language model passed its layers none (or its rotary module was not called)"
            )
        batch, device = kept.shape[0], hidden.device
        real = _padding_valid(state.padding_mask, batch, own.shape[-1], device)
        segment = state.layout.segment
        positions, state.shift = renumbered(as_rows(own.to(device), batch), segment, real, kept)
        tables = self.rotary_tables(hidden, like_model(positions, own))
        overrides: dict[str, Any] = {"position_embeddings": tables}
        sequence = kwargs.get("position_ids")  # the layers' 1-D ids (Qwen: the text positions): contiguous
        if sequence is not None:
            rows = as_rows(sequence.to(device), batch)
            overrides["position_ids"] = renumbered(rows[:1], segment, real, kept)[0][0].to(sequence.device)
        return overrides

    def _handoff(self, state: Pass, view: TokenView) -> tuple[Tensor, Tensor | None, Tensor | None]:
        """(keep, into, sizes) at layer 0 from the vision towers' reductions of this forward's items.

        Layer 0 sees the input sequence, so slots are original positions; the merged features already
        sit at their destination's slot, so nothing is averaged again here.
        """
        device = view.positions.device
        keep, into, sizes = view.candidates, torch.full_like(view.positions, -1), None
        for site, slots in zip(self.visions, state.vision_slots, strict=False):  # none: no media
            item, token = (t.to(device) for t in slots)
            placed = (item >= 0) & view.valid
            if not bool(placed.any()):
                continue
            handoff = site.handoff()
            if handoff is None or int(item.max()) >= handoff.survive.shape[0]:
                raise InputError(
                    "`site: vision` stages need the features the vision tower encoded while attached, "
                    "one set per sample: pass pixel values (not features encoded before attaching), and "
                    "no beam search or num_return_sequences > 1, which repeat the encoded features"
                )
            state.vision_events += site.events
            selection = handoff.select(item, token, placed, view.candidates, view.positions)
            keep = torch.where(placed, selection[0], keep)
            into = torch.where(placed, selection[1], into)
            if selection[2] is not None:
                sizes = torch.where(placed, selection[2], 1.0 if sizes is None else sizes)
                state.proportional = state.proportional or handoff.proportional
        return keep, into, sizes

    def _view(
        self, state: Pass, stage: Stage, hidden: Tensor, index: Tensor, valid: Tensor, sizes: Tensor | None
    ) -> TokenView:
        """What the reducer sees of the sequence entering the site (layout gathered by `index`)."""
        layout = state.layout
        last_real = torch.zeros_like(valid).scatter_(1, _last_true(valid)[:, None], True)
        candidates = gather_tokens(layout.visual, index, 1) & valid & ~last_real
        segment = gather_tokens(layout.segment, index, 1).masked_fill(~candidates, -1)
        frame = gather_tokens(layout.frame, index, 1)
        protected = gather_tokens(layout.visual, index, 1) & valid & ~candidates  # a visual last token
        frame, protected_frame = frame.masked_fill(~candidates, -1), frame.masked_fill(~protected, -1)
        budgets, frame_size, max_budget = self._budgets(
            state, stage, (candidates, frame), (protected, protected_frame)
        )
        return TokenView(
            hidden=hidden,
            candidates=candidates,
            valid=valid,
            segment=segment,
            coords=gather_tokens(layout.coords, index, 1),
            extent=gather_tokens(layout.extent, index, 1),
            positions=index,
            budget=budgets.sum(dim=1),
            layer=stage.layer,
            signals=site_signals(self.adapter, state, stage.layer, valid),
            frame=frame,
            frame_budget=budgets if self.config.budget == "per_frame" else None,
            sizes=sizes,
            kind=gather_tokens(layout.kind, index, 1).masked_fill(~candidates, -1),
            frame_size=frame_size,
            max_budget=max_budget,
        )

    def _budgets(
        self, state: Pass, stage: Stage, candidates: tuple[Tensor, Tensor], protected: tuple[Tensor, Tensor]
    ) -> tuple[Tensor, int, int]:
        """([B, G] candidates to keep: one budget per sample (G = 1) or one per frame; the view's bounds:
        the most candidates in one frame, the largest budget of a sample).

        Counted from the group's original visual tokens (a schedule's ratios all refer to the input),
        less the visual tokens kept anyway (a visual last token), capped by the candidates present.
        Each of `candidates` and `protected` is (mask [B, L], frame [B, L]).
        """
        layout = state.layout
        device = candidates[0].device
        original = layout.visual & _padding_valid(state.padding_mask, *layout.visual.shape, device)
        groups = ((original, layout.frame), protected, candidates)  # (mask, frame), counted per frame
        rows = torch.stack([group_counts(*g, max(layout.frames, 1)) for g in groups]).tolist()  # one sync
        frame_size = max((max(frames) for frames in rows[2]), default=0)
        if self.config.budget != "per_frame":  # one group per sample
            rows = [[[sum(frames)] for frames in part] for part in rows]
        budgets = [
            [min(max(stage.kept_count(n) - f, 0), c) for n, f, c in zip(*sample, strict=True)]
            for sample in zip(*rows, strict=True)
        ]
        max_budget = max((sum(sample) for sample in budgets), default=0)
        return torch.tensor(budgets, dtype=torch.long, device=device), frame_size, max_budget

    def _overrides(
        self, kept: Tensor, kwargs: dict[str, Any], dtype: torch.dtype, bias: Tensor | None
    ) -> dict[str, Any]:
        """Layer inputs for the shortened sequence besides positions: the mask, built beside `kept`."""
        config = self.adapter.text_config()
        overrides: dict[str, Any] = {
            "attention_mask": LayerMasks(config, kept, kept >= 0, kept.shape[1], dtype, key_bias=bias)
        }
        return overrides


def _kept_positions(
    current: Shortened | None, kept: Tensor, inner: Tensor, kwargs: dict[str, Any]
) -> dict[str, Any]:
    """Rotary tables and position ids of the kept tokens as the layers before the stage had them
    (the `original` policy): gathered from the model's full-length ones, or from the previous stage's.

    A merged token keeps the position of the token it was merged into (the survivor's own).
    """
    source, index = (kwargs, kept) if current is None else (current.overrides, inner)
    overrides: dict[str, Any] = {}
    rotary = source.get("position_embeddings")
    if rotary is not None:
        overrides["position_embeddings"] = tuple(gather_tokens(t, index.to(t.device), -2) for t in rotary)
    positions = source.get("position_ids")
    if positions is not None:
        overrides["position_ids"] = gather_tokens(positions, index.to(positions.device), -1)
    return overrides


def _padding_valid(mask: Tensor | None, batch: int, length: int, device: torch.device) -> Tensor:
    """[B, length] bool: the real tokens of the last `length` slots of the caller's padding mask."""
    if mask is None:
        return torch.ones(batch, length, dtype=torch.bool, device=device)
    return mask[:, -length:].to(device=device, dtype=torch.bool)


def _last_true(mask: Tensor) -> Tensor:
    """[B] index of the last True entry of each row of `mask` [B, L]."""
    return mask.shape[1] - 1 - mask.flip(1).to(torch.int8).argmax(dim=1)


def layout_on(layout: VisualLayout, device: torch.device) -> VisualLayout:
    """The layout with its tensors on `device` (itself when they are there already)."""
    if layout.visual.device == device:
        return layout
    moved = {
        f.name: getattr(layout, f.name).to(device) for f in dataclasses.fields(layout) if f.name != "frames"
    }
    return dataclasses.replace(layout, **moved)
