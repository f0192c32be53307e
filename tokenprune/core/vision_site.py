"""Reducing inside a VLM's vision tower (CLIP-style, LLaVA), before the projector.

Stages with `site: vision` reduce the output of vision encoder layer `layer`: the later vision
layers run on fewer tokens (with proportional attention after merges), and the features reach
the projector at their original patch slots, merged tokens at their destination's slot. The
language model then starts without the removed tokens: the session hands this selection to a
layer-0 site (`handoff`), so placeholders, positions and the cache need nothing new. Merges
happen on the vision features, before the (non-linear) projector, as VisionZip and ToMe do.
A strategy that also reads the attention of earlier tower layers (`signal_layers`, HiPrune's object
layer) has their queries and keys kept from those layers until the last stage reading them.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from tokenprune.contracts.adapter import VisionTower
from tokenprune.contracts.reducer import Reducer
from tokenprune.core.grid import GridTokens, check_site_layers, retained_layers
from tokenprune.core.language.lifecycle import Hooks
from tokenprune.core.selection import check_strategy_site
from tokenprune.errors import ConfigError, InputError

if TYPE_CHECKING:
    from tokenprune.config import Stage
    from tokenprune.core.selection import ReductionEvent


VISION_SIGNALS = frozenset({"keys", "attention"})


@dataclass
class Handoff:
    """What the language model's layer 0 receives from one tower for one forward, per item.

    Over the tower's tokens [I, L] (prefix included): survive bool, the token stays; holder long, the
    token now holding it (itself, the one it merged into, -1 once dropped); sizes float or None.
    """

    survive: Tensor
    holder: Tensor
    sizes: Tensor | None
    proportional: bool

    def select(
        self, item: Tensor, token: Tensor, placed: Tensor, candidates: Tensor, positions: Tensor
    ) -> tuple[Tensor, Tensor, Tensor | None]:
        """(keep, into, sizes) [B, N] for the sequence tokens `placed` [B, N] at (item, token).

        `keep` and `into` concern the `candidates` among them; `into` is the sequence position of the
        token a merged one joined (-1: kept, dropped, or not a candidate).
        """
        device = positions.device  # the language model's: the tower may run on another one
        item, token = item.to(device).clamp(min=0), token.to(device).clamp(min=0)
        survive, holders = self.survive.to(device), self.holder.to(device)
        keep = survive[item, token] & placed & candidates
        position_of = torch.full_like(holders, -1)
        position_of[item[placed], token[placed]] = positions[placed]
        holder = holders[item, token]
        dropped_or_kept = keep | ~(placed & candidates) | (holder < 0)
        into = position_of[item, holder.clamp(min=0)].masked_fill(dropped_or_kept, -1)
        sizes = None if self.sizes is None else torch.where(placed, self.sizes.to(device)[item, token], 1.0)
        return keep, into, sizes


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
        self.retain = retained_layers(reducer, self.stages)  # earlier layers whose attention a stage reads
        self.token_order = token_order
        self.tokens: GridTokens | None = None
        self.to_project = False  # the tower's latest output has not reached the projector yet
        self.projected: Tensor | None = None  # what the projector made of it, until a forward takes it
        self.taken: list[weakref.ref[Tensor]] = []  # the features of it that forwards took, held weakly
        self.runs = 0  # tower runs so far
        self.expected: int | list[weakref.ref[Tensor]] | None = None  # this forward's: run count, or features

    @property
    def events(self) -> list[ReductionEvent]:
        return [] if self.tokens is None else self.tokens.events

    def install(self, hooks: Hooks) -> None:
        """Register the hooks, each recorded in `hooks` as placed, so that removing `hooks` undoes a
        failed install too."""
        hooks.add([self.tower.layers[0].register_forward_pre_hook(self._start)])
        first = min(self.stages)
        for index, layer in enumerate(self.tower.layers):
            if index in self.stages or index in self.retain:
                self._watch(index, layer.self_attn, hooks)
            if index in self.stages:
                # prepended: transformers records hidden states with forward hooks of its own, which must
                # see the reduced output
                hooks.add([layer.register_forward_hook(self._reducer_hook(index), prepend=True)])
            if index > first:
                hooks.add([layer.register_forward_pre_hook(self._bias_hook)])
        hooks.add([self.tower.projector.register_forward_pre_hook(self._restore_slots)])
        hooks.add([self.tower.projector.register_forward_hook(self._record_projection)])

    def _start(self, module: nn.Module, args: tuple) -> None:
        """The tower encodes new items (in the forward, or before prefill in `generate`): start afresh."""
        self.tokens, self.projected, self.taken = None, None, []
        self.to_project = True
        self.runs += 1

    def expect(self, inputs: dict[str, Any]) -> None:
        """A language-model forward begins: its features are encoded ones, or the tower runs inside it."""
        encoded = (inputs.get("mm_encoder_outputs") or {}).get(self.tower.modality)
        if encoded is None:
            self.expected = self.runs
        else:  # held weakly: the caller's features must not outlive the caller's use of them
            self.expected = [weakref.ref(part) for part in _tensors(encoded.pooler_output)]

    def handoff(self) -> Handoff | None:
        """The selection for the language model, from the tower run whose features this forward uses.

        None when they come from elsewhere: encoded before attaching, or copied (generate's expansion
        for beam search and `num_return_sequences` repeats them).
        """
        tokens = self.tokens
        if tokens is None or tokens.index is None or not self._features_are_ours():
            return None
        everything = torch.arange(tokens.protected + tokens.n_patches, device=tokens.index.device)
        sizes = None
        if tokens.sizes is not None:
            sizes = torch.ones(tokens.groups.shape, device=tokens.index.device)
            sizes.scatter_(1, tokens.index, tokens.sizes.float())
        return Handoff(tokens.groups == everything, tokens.groups, sizes, tokens.proportional)

    def _features_are_ours(self) -> bool:
        """The tower ran during this forward, or the encoded features are its projection, as the same
        storage or as a copy cast to another dtype or device (equal values). Once a forward takes the
        projection, only weak references to what it took remain."""
        if isinstance(self.expected, int):
            ours = self.runs > self.expected
            parts = [] if self.projected is None else [self.projected]
        else:
            parts = [ref() for ref in self.expected or []]
            alive = bool(parts) and all(part is not None for part in parts)
            ours = alive and (self._shares_storage(parts) or _is_projection(parts, self.projected))
        if ours and self.projected is not None:
            self.taken, self.projected = [weakref.ref(part) for part in parts], None
        return ours

    def _shares_storage(self, parts: list[Tensor]) -> bool:
        """Every part is a view of the projection, or of features a forward took of it."""
        owners = [ref() for ref in self.taken] + [self.projected]
        storages = {owner.untyped_storage().data_ptr() for owner in owners if owner is not None}
        return all(part.untyped_storage().data_ptr() in storages for part in parts)

    # -- hooks ------------------------------------------------------------------------------------

    def _tokens(self) -> GridTokens:
        if self.tokens is None:
            self.tokens = GridTokens(
                self.reducer,
                self.tower.prefix_tokens,
                self.tower.grid,
                True,
                self.token_order,
                site="vision",
                retain=dict(self.retain),
            )
        return self.tokens

    def _watch(self, index: int, attention: nn.Module, hooks: Hooks) -> None:
        def capture(name: str) -> Callable[..., None]:
            def hook(module: nn.Module, args: tuple, out: Tensor) -> None:
                heads = out.view(*out.shape[:2], attention.num_heads, attention.head_dim).transpose(1, 2)
                self._tokens().capture(index, name, heads)

            return hook

        hooks.add([attention.q_proj.register_forward_hook(capture("queries"))])
        hooks.add([attention.k_proj.register_forward_hook(capture("keys"))])

    def _reducer_hook(self, index: int) -> Callable[..., Tensor]:
        def hook(module: nn.Module, args: tuple, out: Tensor) -> Tensor:
            return self._tokens().reduce(self.stages[index], out, module.self_attn.scale)

        return hook

    def _bias_hook(self, module: nn.Module, args: tuple) -> tuple | None:
        """Later vision layers attend to merged tokens in proportion to their sizes."""
        bias = None if self.tokens is None else self.tokens.bias(args[0].dtype, args[0].device)
        if bias is None:
            return None
        if len(args) > 1 and args[1] is not None:
            raise InputError("a vision tower with an attention mask cannot take merged tokens")
        return (args[0], bias, *args[2:])

    def _restore_slots(self, module: nn.Module, args: tuple) -> tuple | None:
        """Features back at their original slots ([I, P, D], or [I, prefix + P, D] with `keeps_prefix`;
        removed slots are zeros). A projector shared by several towers restores each tower's own call."""
        tokens = self.tokens
        if not self.to_project or tokens is None or tokens.index is None:
            return None
        features, prefix = args[0], 0 if self.tower.keeps_prefix else self.tower.prefix_tokens
        slots = tokens.index[:, prefix:].to(features.device) - prefix
        if features.shape[1] != slots.shape[1]:
            raise InputError(
                f"the projector received {features.shape[1]} features, the vision site kept {slots.shape[1]}"
            )
        full = features.new_zeros(features.shape[0], tokens.groups.shape[1] - prefix, features.shape[-1])
        full.scatter_(1, slots[..., None].expand(-1, -1, features.shape[-1]), features)
        return (full, *args[1:])

    def _record_projection(self, module: nn.Module, args: tuple, output: Tensor) -> None:
        """Keep the projector's output of this tower's call: generate() passes views of it back."""
        if self.to_project:
            self.projected, self.to_project = output, False


def _tensors(encoded: Any) -> list[Tensor]:
    """The tensors of a `pooler_output`: one [items, tokens, D] tensor, or a list of [tokens, D] per item."""
    parts = list(encoded) if isinstance(encoded, (list, tuple)) else [encoded]
    return parts if all(isinstance(part, Tensor) for part in parts) else []


def _is_projection(parts: list[Tensor], projection: Tensor | None) -> bool:
    """Whether `parts` hold exactly the values of `projection` (perhaps cast), in order."""
    if projection is None:
        return False
    width = projection.shape[-1]
    if any(part.shape[-1] != width for part in parts) or sum(p.numel() for p in parts) != projection.numel():
        return False
    features = torch.cat([part.reshape(-1, width) for part in parts])
    return torch.equal(projection.reshape(-1, width).to(features.device, features.dtype), features)
