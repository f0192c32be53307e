"""Reducing inside a VLM's vision tower (CLIP-style, LLaVA), before the projector.

Stages with `site: vision` reduce the output of vision encoder layer `layer`: the later vision
layers run on fewer tokens (with proportional attention after merges), and the features reach
the projector at their original patch slots, merged tokens at their destination's slot. The
language model then starts without the removed tokens: the session hands this selection to a
layer-0 site (`handoff`), so placeholders, positions and the cache need nothing new. Merges
happen on the vision features, before the (non-linear) projector, as VisionZip and ToMe do.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from tokenprune.encoder import GridTokens, check_site_layers
from tokenprune.errors import ConfigError, InputError
from tokenprune.layout import VisualLayout
from tokenprune.reducer import Reducer
from tokenprune.selection import check_strategy_site

if TYPE_CHECKING:
    from tokenprune.config import Stage
    from tokenprune.selection import ReductionEvent


VISION_SIGNALS = frozenset({"keys", "attention"})


@dataclass(frozen=True)
class VisionTower:
    """What an adapter exposes of its vision encoder for `site: vision` stages.

    `layers`: encoder layers whose `self_attn` has `q_proj`, `k_proj`, `num_heads`, `head_dim` and
    `scale`, each returning its hidden states; `feature_layer`: the layer whose output feeds the
    projector (LLaVA's `vision_feature_layer=-2`: the penultimate); `prefix_tokens`: leading tokens
    dropped before the projector (the class token); `projector`: its input is [images, patches, D].
    """

    layers: Sequence[nn.Module]
    feature_layer: int
    prefix_tokens: int
    grid: tuple[int, int]
    projector: nn.Module


@dataclass
class Handoff:
    """What the language model's layer 0 receives for one forward, per image of the vision batch.

    survive [I, P] bool: patches whose token stays; holder [I, P] long: the patch now holding each
    patch (itself, the one it merged into, -1 once dropped); sizes [I, P] float or None.
    """

    survive: Tensor
    holder: Tensor
    sizes: Tensor | None
    proportional: bool


class VisionSite:
    """The hooks of `site: vision` stages on one vision tower."""

    def __init__(
        self, tower: VisionTower, stages: Sequence[Stage], reducer: Reducer, token_order: str
    ) -> None:
        check_strategy_site(reducer, "vision")
        check_site_layers(tuple(stages), tower.feature_layer + 1, "vision layer feeding the projector")
        missing = type(reducer).requires - VISION_SIGNALS
        if missing:
            raise ConfigError(
                f"{type(reducer).__name__} needs {', '.join(sorted(missing))}, which a vision site does not "
                f"offer (it offers {', '.join(sorted(VISION_SIGNALS))})"
            )
        self.tower = tower
        self.stages = {stage.layer: stage for stage in stages}
        self.reducer = reducer
        self.token_order = token_order
        self.tokens: GridTokens | None = None

    @property
    def events(self) -> list[ReductionEvent]:
        return [] if self.tokens is None else self.tokens.events

    def install(self) -> list[RemovableHandle]:
        """Register the hooks; returns their handles."""
        handles = [self.tower.layers[0].register_forward_pre_hook(self._start)]
        first = min(self.stages)
        for index, layer in enumerate(self.tower.layers):
            if index in self.stages:
                handles += self._watch(index, layer.self_attn)
                # prepended: transformers records hidden states with forward hooks of its own, which must
                # see the reduced output
                handles.append(layer.register_forward_hook(self._reducer_hook(index), prepend=True))
            if index > first:
                handles.append(layer.register_forward_pre_hook(self._bias_hook))
        handles.append(self.tower.projector.register_forward_pre_hook(self._restore_slots))
        return handles

    def _start(self, module: nn.Module, args: tuple) -> None:
        """The tower encodes new images (in the forward, or before prefill in `generate`): start afresh."""
        self.tokens = None

    def handoff(self) -> Handoff | None:
        """The selection for the language model from the tower's latest images (None before any)."""
        tokens = self.tokens
        if tokens is None or tokens.index is None:
            return None
        prefix, n_images = self.tower.prefix_tokens, tokens.index.shape[0]
        patches = torch.arange(tokens.n_patches, device=tokens.index.device)
        survive = (tokens.groups[:, prefix:] == patches + prefix) & (tokens.groups[:, prefix:] >= 0)
        holder = (tokens.groups[:, prefix:] - prefix).masked_fill(tokens.groups[:, prefix:] < 0, -1)
        sizes = None
        if tokens.sizes is not None:
            sizes = torch.ones(n_images, tokens.n_patches, device=survive.device)
            slots = tokens.index[:, prefix:] - prefix
            sizes.scatter_(1, slots, tokens.sizes[:, prefix:].float())
        return Handoff(survive, holder, sizes, tokens.proportional)

    # -- hooks ------------------------------------------------------------------------------------

    def _tokens(self) -> GridTokens:
        if self.tokens is None:
            self.tokens = GridTokens(
                self.reducer, self.tower.prefix_tokens, self.tower.grid, True, self.token_order, site="vision"
            )
        return self.tokens

    def _watch(self, index: int, attention: nn.Module) -> list[RemovableHandle]:
        def capture(name: str) -> Callable[..., None]:
            def hook(module: nn.Module, args: tuple, out: Tensor) -> None:
                heads = out.view(*out.shape[:2], attention.num_heads, attention.head_dim).transpose(1, 2)
                self._tokens().capture(index, name, heads)

            return hook

        return [
            attention.q_proj.register_forward_hook(capture("queries")),
            attention.k_proj.register_forward_hook(capture("keys")),
        ]

    def _reducer_hook(self, index: int) -> Callable[..., Tensor]:
        def hook(module: nn.Module, args: tuple, out: Tensor) -> Tensor:
            return self._tokens().reduce(self.stages[index], out, module.self_attn.scale)

        return hook

    def _bias_hook(self, module: nn.Module, args: tuple) -> tuple | None:
        """Later vision layers attend to merged tokens in proportion to their sizes."""
        bias = None if self.tokens is None else self.tokens.bias(args[0].dtype)
        if bias is None:
            return None
        if len(args) > 1 and args[1] is not None:
            raise InputError("a vision tower with an attention mask cannot take merged tokens")
        return (args[0], bias, *args[2:])

    def _restore_slots(self, module: nn.Module, args: tuple) -> tuple | None:
        """Features back at their original patch slots ([I, P, D]; removed slots are zeros)."""
        tokens = self.tokens
        if tokens is None or tokens.index is None:
            return None
        features, prefix = args[0], self.tower.prefix_tokens
        slots = tokens.index[:, prefix:] - prefix
        if features.shape[1] != slots.shape[1]:
            raise InputError(
                f"the projector received {features.shape[1]} features, the vision site kept {slots.shape[1]}"
            )
        full = features.new_zeros(features.shape[0], tokens.n_patches, features.shape[-1])
        full.scatter_(1, slots[..., None].expand(-1, -1, features.shape[-1]), features)
        return (full, *args[1:])


def image_slots(layout: VisualLayout, valid: Tensor, grid: tuple[int, int]) -> tuple[Tensor, Tensor]:
    """(image, patch) [B, N] of every visual token of a LLaVA-style layout (-1 elsewhere).

    Images fill placeholders in batch order, so a sample's i-th image is the vision batch's
    (images in earlier samples + i)-th.
    """
    per_sample = (layout.segment.max(dim=1).values + 1).clamp(min=0)
    first = torch.cumsum(per_sample, dim=0) - per_sample
    visual = layout.visual & valid
    image = (first[:, None] + layout.segment).masked_fill(~visual, -1)
    patch = (layout.coords[..., 1] * grid[1] + layout.coords[..., 2]).masked_fill(~visual, -1)
    return image, patch
