"""Tokens of a [prefix, row-major patch grid] sequence, reduced in place: ViT blocks and VLM vision towers.

Such a site has no text, no cache and no causal mask: every token but the protected prefix (class,
distillation, register tokens) is a candidate, positions were added before the first block, and
the order of tokens after a reduction is free.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from tokenprune.contracts.layout import grid_coords
from tokenprune.contracts.reducer import Merge, Reducer, Signals, SignalUnavailable, TokenView
from tokenprune.core.merging import follow_groups, initial_groups, key_bias, merge_tokens
from tokenprune.core.selection import checked_select, reduction_event
from tokenprune.errors import ConfigError
from tokenprune.indexing import gather_tokens

if TYPE_CHECKING:
    from tokenprune.config import Stage
    from tokenprune.core.selection import ReductionEvent


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

    @property
    def n_patches(self) -> int:
        return self.grid[0] * self.grid[1]

    def capture(self, layer: int, name: str, value: Tensor) -> None:
        """Keep a block's `"queries"` or `"keys"` [B, H, L, d] for the signals of a site at `layer`."""
        self.captured.setdefault(layer, {})[name] = value

    def bias(self, dtype: torch.dtype, device: torch.device) -> Tensor | None:
        """[B, 1, 1, L] log(size) per key once something merged with proportional attention, else None;
        on the device of the hidden states it meets."""
        bias = key_bias(self.sizes) if self.proportional else None
        return None if bias is None else bias[:, None, None, :].to(device, dtype)

    def reduce(self, stage: Stage, x: Tensor, scale: float) -> Tensor:
        """Apply the reducer at `stage` to `x` [B, L, D]; `scale` is the site's attention logit scale.

        The queries and keys captured for this stage are released here: nothing of the block's
        attention outlives its reduction.
        """
        batch, length = x.shape[:2]
        if self.index is None:
            self.index = torch.arange(length, device=x.device).expand(batch, length)
            self.groups = initial_groups(torch.ones(batch, length, dtype=torch.bool, device=x.device))
        self._follow(x.device)
        captured = self.captured.pop(stage.layer, {})
        signals = self._signals(captured, scale, self.bias(torch.float32, x.device))
        view = self._view(stage, x, signals)
        keep, merge = checked_select(self.reducer, view)
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
        )

    def _signals(self, captured: dict[str, Tensor], scale: float, bias: Tensor | None) -> Signals:
        """`keys()` [B, L, d] head-averaged; `attention(query)` [B, L] from the class token or all tokens,
        from the `captured` queries and keys of the stage's block."""
        queries, keys = captured.get("queries"), captured.get("keys")
        if keys is None:
            return Signals()

        def attention(query: str = "class") -> Tensor:
            if query == "class" and not self.has_class_token:
                raise SignalUnavailable(
                    "this vision encoder has no class token: methods ranking by its attention do not apply "
                    "(fastv: use score 'mean')"
                )
            if query not in ("class", "mean"):
                raise SignalUnavailable(f"a vision site has query rows 'class' and 'mean', not {query!r}")
            rows = queries[:, :, :1] if query == "class" else queries
            logits = (rows.float() @ keys.float().transpose(-1, -2)) * scale
            if bias is not None:
                logits = logits + bias
            return logits.softmax(dim=-1).mean(dim=(1, 2))

        return Signals({"keys": lambda: keys.float().mean(dim=1), "attention": attention})


def check_site_layers(stages: tuple[Stage, ...], n_layers: int, unit: str) -> None:
    """Refuse a stage past the last of `n_layers` layers (or blocks) of its site."""
    for stage in stages:
        if stage.layer >= n_layers:
            raise ConfigError(
                f"layer {stage.layer} is past the last {unit}: the model has {n_layers} (0..{n_layers - 1})"
            )


def _ordered(survive: Tensor, rank: Tensor) -> Tensor:
    """[B, L'] slots of the surviving tokens by increasing rank, ties by slot (every row keeps L')."""
    width = int(survive[0].sum())
    ranked = rank.masked_fill(~survive, torch.iinfo(torch.long).max)
    return torch.sort(ranked, dim=1, stable=True).indices[:, :width]
