"""Tokens of a [prefix, row-major patch grid] sequence, reduced in place: ViT blocks and VLM vision towers.

Such a site has no text, no cache and no causal mask: every token but the protected prefix (class,
distillation, register tokens) is a candidate, positions were added before the first block, and
the order of tokens after a reduction is free.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from tokenprune.contracts.layout import SEGMENT_KINDS, grid_coords
from tokenprune.contracts.reducer import Merge, Reducer, Signals, SignalUnavailable, TokenView
from tokenprune.core.merging import follow_groups, initial_groups, key_bias, merge_tokens
from tokenprune.core.selection import checked_select, reduction_event
from tokenprune.errors import ConfigError
from tokenprune.indexing import gather_tokens

if TYPE_CHECKING:
    from tokenprune.config import Stage
    from tokenprune.core.selection import ReductionEvent


def retained_layers(reducer: Reducer, stage_layers: Iterable[int]) -> dict[int, int]:
    """{earlier layer: the last stage layer that reads it}, from the reducer's `signal_layers`."""
    retained: dict[int, int] = {}
    for stage_layer in sorted(stage_layers):
        for layer in reducer.signal_layers(stage_layer):
            if not 0 <= layer <= stage_layer:
                raise ConfigError(
                    f"{type(reducer).__name__} reads the attention of layer {layer} at a stage on layer "
                    f"{stage_layer}: only layers 0..{stage_layer} have run there"
                )
            retained[layer] = stage_layer
    return retained


@dataclass
class GridTokens:
    """One forward's tokens of a [prefix, row-major patch grid] sequence, reduced in place.

    Shared by every site where the order of tokens is free (ViT blocks, a VLM's vision tower):
    it tracks each current token's original position, size and sources, builds the `TokenView`,
    applies the reducer's selection or merge, and gives the proportional-attention bias.
    """

    reducer: Reducer
    protected: int
    grid: tuple[int, int]
    has_class_token: bool
    token_order: str
    site: str = "vision"
    index: Tensor | None = None  # [B, L] original position of each current token (its representative)
    sizes: Tensor | None = None
    groups: Tensor | None = None
    proportional: bool = False
    captured: dict[int, dict[str, Tensor]] = field(default_factory=dict)
    events: list[ReductionEvent] = field(default_factory=list)
    grid_table: Tensor | None = None  # [P, 3] coords of the patch grid, on the tokens' device
    retain: dict[int, int] = field(default_factory=dict)  # earlier layer -> the last stage layer reading it

    @property
    def n_patches(self) -> int:
        return self.grid[0] * self.grid[1]

    def capture(self, layer: int, name: str, value: Tensor) -> None:
        """Keep a block's `"queries"` or `"keys"` [B, H, L, d] for the signals of a site at `layer` (or of
        a later stage reading `layer`), with the tokens' original positions and key bias at that layer."""
        entry = self.captured.setdefault(layer, {})
        entry[name] = value
        if self.index is not None:
            entry["index"] = self.index
        bias = self.bias(torch.float32, value.device)
        if bias is not None:
            entry["bias"] = bias

    def bias(self, dtype: torch.dtype, device: torch.device) -> Tensor | None:
        """[B, 1, 1, L] log(size) per key once something merged with proportional attention, else None;
        on the device of the hidden states it meets."""
        bias = key_bias(self.sizes) if self.proportional else None
        return None if bias is None else bias[:, None, None, :].to(device, dtype)

    def reduce(self, stage: Stage, x: Tensor, scale: float) -> Tensor:
        """Apply the reducer at `stage` to `x` [B, L, D]; `scale` is the site's attention logit scale.

        The queries and keys captured for this stage, and those of earlier blocks no later stage reads,
        are released here: nothing of a block's attention outlives its last use.
        """
        batch, length = x.shape[:2]
        if self.index is None:
            self.index = torch.arange(length, device=x.device).expand(batch, length)
            self.groups = initial_groups(torch.ones(batch, length, dtype=torch.bool, device=x.device))
        self._follow(x.device)
        signals = self._signals(stage.layer, scale)
        view = self._view(stage, x, signals)
        keep, merge = checked_select(self.reducer, view)
        self._release(stage.layer)
        sizes = self.sizes
        if merge is not None:
            x, sizes = merge_tokens(x, view.token_sizes(), merge)
            self.proportional = merge.proportional_attention
        survive = ~view.candidates | keep
        inner = _ordered(survive, self._rank(merge))
        kept = gather_tokens(self.index, inner, 1)
        self.groups = follow_groups(self.groups, self.index, survive, None if merge is None else merge.into)
        self.sizes = None if sizes is None else gather_tokens(sizes, inner, 1)
        original = torch.arange(self.protected + self.n_patches, device=x.device).expand(batch, -1)
        patches = original >= self.protected
        event = reduction_event(stage.layer, view, kept, patches, self.groups, self.sizes)
        event.site = self.site
        self.events.append(event)
        self.index = kept
        return gather_tokens(x, inner, 1)

    def _follow(self, device: torch.device) -> None:
        """Move the per-forward state to `device`: a dispatched encoder may run its blocks on several."""
        if self.index.device == device:
            return
        self.index, self.groups = self.index.to(device), self.groups.to(device)
        self.sizes = None if self.sizes is None else self.sizes.to(device)
        self.grid_table = None if self.grid_table is None else self.grid_table.to(device)

    def _rank(self, merge: Merge | None) -> Tensor:
        """Order of the survivors: the strategy's (ToMe's reference order) or spatial (original position)."""
        if self.token_order == "spatial":
            return self.index
        if merge is not None and merge.rank is not None:
            return merge.rank
        return torch.zeros_like(self.index)  # keep the current order

    def _view(self, stage: Stage, x: Tensor, signals: Signals) -> TokenView:
        index = self.index
        candidates = index >= self.protected
        patch = (index - self.protected).clamp(min=0)
        if self.grid_table is None:  # once per forward, not per block
            self.grid_table = grid_coords(*self.grid).to(x.device)
        coords = self.grid_table[patch].masked_fill(~candidates[..., None], -1)
        extent = torch.tensor([1, *self.grid], device=x.device).expand(*index.shape, 3)
        kept = min(stage.kept_count(self.n_patches), int(candidates[0].sum()))
        return TokenView(
            hidden=x,
            candidates=candidates,
            valid=torch.ones_like(candidates),
            segment=torch.where(candidates, 0, -1),
            coords=coords,
            extent=extent * candidates[..., None],
            positions=index,
            budget=torch.full((x.shape[0],), kept, dtype=torch.long, device=x.device),
            layer=stage.layer,
            signals=signals,
            frame=torch.where(candidates, 0, -1),
            sizes=self.sizes,
            site="vision",
            kind=torch.where(candidates, SEGMENT_KINDS.index("grid"), -1),
        )

    def _signals(self, stage_layer: int, scale: float) -> Signals:
        """`keys()` [B, L, d] head-averaged; `attention(query, layer=None)` [B, L] from the class token or
        all tokens, from the captured queries and keys of the stage's block, or of an earlier `layer` this
        site was asked to keep (carried to the current tokens by original position; every layer of one
        encoder shares the logit `scale`)."""
        captured = self.captured.get(stage_layer, {})
        keys = captured.get("keys")
        if keys is None:
            return Signals()

        def attention(query: str = "class", layer: int | None = None) -> Tensor:
            if layer is None or layer == stage_layer:
                return self._received(captured, query, scale)
            if layer not in self.captured:
                kept = sorted(set(self.captured) - {stage_layer}) or "none"
                raise SignalUnavailable(
                    f"the attention of layer {layer} was not kept at this site (earlier layers kept: "
                    f"{kept}): vision towers keep those a strategy names in `signal_layers`, ViT blocks none"
                )
            earlier = self.captured[layer]
            scores = self._received(earlier, query, scale)
            return _carried(scores, earlier.get("index"), self.index, self.protected + self.n_patches)

        return Signals({"keys": lambda: keys.float().mean(dim=1), "attention": attention})

    def _received(self, captured: dict[str, Tensor], query: str, scale: float) -> Tensor:
        """[B, L] head-averaged attention each token receives from the class token's row or from every
        row (mean), from `captured` queries, keys and key bias of one block."""
        if query == "class" and not self.has_class_token:
            raise SignalUnavailable(
                "this vision encoder has no class token: methods ranking by its attention do not apply "
                "(fastv: use score 'mean')"
            )
        if query not in ("class", "mean"):
            raise SignalUnavailable(f"a vision site has query rows 'class' and 'mean', not {query!r}")
        queries, keys = captured["queries"], captured["keys"]
        rows = queries[:, :, :1] if query == "class" else queries
        logits = (rows.float() @ keys.float().transpose(-1, -2)) * scale
        if "bias" in captured:
            logits = logits + captured["bias"]
        return logits.softmax(dim=-1).mean(dim=(1, 2))

    def _release(self, layer: int) -> None:
        """Drop the captured blocks no later stage reads: nothing of a block's attention outlives its use."""
        for captured in [done for done in self.captured if self.retain.get(done, done) <= layer]:
            del self.captured[captured]


def check_site_layers(stages: tuple[Stage, ...], n_layers: int, unit: str) -> None:
    """Refuse a stage past the last of `n_layers` layers (or blocks) of its site."""
    for stage in stages:
        if stage.layer >= n_layers:
            raise ConfigError(
                f"layer {stage.layer} is past the last {unit}: the model has {n_layers} (0..{n_layers - 1})"
            )


def _carried(scores: Tensor, then: Tensor | None, now: Tensor, width: int) -> Tensor:
    """[B, L_now] `scores` [B, L_then] of the tokens at original positions `then` (None: 0..L_then-1),
    read at the current tokens' positions `now` (a merged token: its representative's score); `width`
    original positions in all."""
    if then is None:
        then = torch.arange(scores.shape[1], device=scores.device).expand_as(scores)
    table = scores.new_zeros(scores.shape[0], width).scatter_(1, then.to(scores.device), scores)
    return table.gather(1, now.to(table.device))


def _ordered(survive: Tensor, rank: Tensor) -> Tensor:
    """[B, L'] slots of the surviving tokens by increasing rank, ties by slot (every row keeps L')."""
    width = int(survive[0].sum())
    ranked = rank.masked_fill(~survive, torch.iinfo(torch.long).max)
    return torch.sort(ranked, dim=1, stable=True).indices[:, :width]
