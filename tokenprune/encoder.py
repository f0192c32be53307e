"""Reducing inside a vision transformer's blocks, between attention and MLP (where ToMe merges).

A ViT has no text, no cache and no causal mask: every token but the protected prefix (class,
distillation, register tokens) is a candidate, positions were added before the first block, and
the order of tokens after a reduction is free. An `EncoderAdapter` describes one family (its
blocks, how to run each half of a block, where its queries and keys are, how it pools); the
`EncoderSession` drives any of them with the shared reducer, merging and source-tracking code.
"""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from tokenprune.adapter import BaseAdapter
from tokenprune.errors import ConfigError, InputError
from tokenprune.layout import grid_coords
from tokenprune.merging import follow_groups, initial_groups, key_bias, merge_tokens
from tokenprune.reducer import Merge, Reducer, Signals, SignalUnavailable, TokenView
from tokenprune.schedule import schedule_stages
from tokenprune.selection import check_selection, check_strategy_site, reduction_event, selection_parts
from tokenprune.sequence import gather_tokens

if TYPE_CHECKING:
    from tokenprune.config import ReductionConfig, Stage
    from tokenprune.selection import ReductionEvent

Capture = Callable[[str, Tensor], None]


class EncoderAdapter(BaseAdapter):
    """A vision transformer: `prefix_tokens()` protected tokens, then a row-major patch grid."""

    @abstractmethod
    def entry_module(self) -> nn.Module:
        """A module that runs first in every forward (the patch embedding): state is reset there."""

    @abstractmethod
    def blocks(self) -> Sequence[nn.Module]:
        """The transformer blocks, in order."""

    @abstractmethod
    def prefix_tokens(self) -> int:
        """How many leading tokens are never reduced (class, distillation, register tokens)."""

    @abstractmethod
    def has_class_token(self) -> bool:
        """Whether the first prefix token is a class token (the query of `attention("class")`)."""

    @abstractmethod
    def grid(self) -> tuple[int, int]:
        """(rows, cols) of the patch grid following the prefix tokens."""

    @abstractmethod
    def attend(self, block: nn.Module, x: Tensor, bias: Tensor | None) -> Tensor:
        """`x` plus the block's attention branch; `bias` [B, 1, 1, N] is added to every attention logit."""

    @abstractmethod
    def feed_forward(self, block: nn.Module, x: Tensor) -> Tensor:
        """`x` plus the block's MLP branch."""

    @abstractmethod
    def watch(self, block: nn.Module, capture: Capture) -> list[RemovableHandle]:
        """Hooks that pass the block's attention `"queries"` and `"keys"` [B, H, N, d] to `capture`."""

    @abstractmethod
    def attention_scale(self, block: nn.Module) -> float:
        """The factor applied to query-key products before the softmax."""

    @abstractmethod
    def size_weighted_pooling(self, sizes: Callable[[], Tensor | None]) -> Callable[[], None]:
        """Make the model's pooling weigh each token by `sizes()` [B, N] (None: as is); returns the undo."""

    def session(self, config: ReductionConfig, reducer: Reducer) -> EncoderSession:
        return EncoderSession(self, config, reducer)


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

    def bias(self, dtype: torch.dtype) -> Tensor | None:
        """[B, 1, 1, L] log(size) per key once something merged with proportional attention, else None."""
        bias = key_bias(self.sizes) if self.proportional else None
        return None if bias is None else bias[:, None, None, :].to(dtype)

    def reduce(self, stage: Stage, x: Tensor, scale: float) -> Tensor:
        """Apply the reducer at `stage` to `x` [B, L, D]; `scale` is the site's attention logit scale."""
        batch, length = x.shape[:2]
        if self.index is None:
            self.index = torch.arange(length, device=x.device).expand(batch, length)
            self.groups = initial_groups(torch.ones(batch, length, dtype=torch.bool, device=x.device))
        view = self._view(stage, x, self._signals(stage.layer, scale, self.bias(torch.float32)))
        keep, merge = selection_parts(self.reducer.select(view))
        check_selection(type(self.reducer).__name__, keep, view, merge)
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

    def _signals(self, layer: int, scale: float, bias: Tensor | None) -> Signals:
        """`keys()` [B, L, d] head-averaged; `attention(query)` [B, L] from the class token or all tokens."""
        captured = self.captured.get(layer, {})
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


class EncoderSession:
    """The hooks of a reduction attached to a vision transformer; one `GridTokens` per forward."""

    def __init__(self, adapter: EncoderAdapter, config: ReductionConfig, reducer: Reducer) -> None:
        self.model = adapter.model
        self.adapter = adapter
        self.config = config
        self.reducer = reducer
        check_strategy_site(reducer, "vision")
        self.stages = {stage.layer: stage for stage in self._stages()}
        self.trace: list[ReductionEvent] = []
        self._pass: GridTokens | None = None
        self._undo: list[Callable[[], None]] = []

    def _stages(self) -> tuple[Stage, ...]:
        n_blocks = len(self.adapter.blocks())
        stages = self.config.stages
        if not stages:
            removals = self.reducer.removals(n_blocks)
            protected, (rows, cols) = self.adapter.prefix_tokens(), self.adapter.grid()
            stages = schedule_stages(removals, protected + rows * cols, protected)
        check_site_layers(stages, n_blocks, "block")
        return stages

    # -- attaching ------------------------------------------------------------------------------

    def install(self) -> None:
        entry = self.adapter.entry_module().register_forward_pre_hook(self._on_entry)
        self._undo.append(entry.remove)
        if not self.stages:
            return
        for layer, block in enumerate(self.adapter.blocks()):
            if layer < min(self.stages):
                continue
            if layer in self.stages:
                self._undo += [h.remove for h in self.adapter.watch(block, self._capture(layer))]
            block.forward = self._block_forward(layer, block)
            self._undo.append(lambda block=block: delattr(block, "forward"))
        self._undo.append(self.adapter.size_weighted_pooling(self._current_sizes))

    def remove(self) -> None:
        for undo in reversed(self._undo):
            undo()
        self._undo.clear()
        self._pass = None

    def _on_entry(self, module: nn.Module, args: tuple) -> None:
        adapter, order = self.adapter, self.config.token_order
        self._pass = GridTokens(
            self.reducer, adapter.prefix_tokens(), adapter.grid(), adapter.has_class_token(), order
        )
        self.trace = self._pass.events

    def _capture(self, layer: int) -> Capture:
        def capture(name: str, value: Tensor) -> None:
            if self._pass is not None:
                self._pass.capture(layer, name, value)

        return capture

    def _current_sizes(self) -> Tensor | None:
        return None if self._pass is None else self._pass.sizes

    def _block_forward(self, layer: int, block: nn.Module) -> Callable[..., Tensor]:
        """The block run in its two halves, with the reduction (if any) between them."""

        def forward(x: Tensor, attn_mask: Tensor | None = None, is_causal: bool = False) -> Tensor:
            if attn_mask is not None or is_causal:
                raise InputError("a ViT with a reduction attached takes no attention mask or causal flag")
            tokens = self._pass
            x = self.adapter.attend(block, x, None if tokens is None else tokens.bias(x.dtype))
            if tokens is not None and layer in self.stages:
                x = tokens.reduce(self.stages[layer], x, self.adapter.attention_scale(block))
            return self.adapter.feed_forward(block, x)

        return forward


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
