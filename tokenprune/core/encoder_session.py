"""Reducing inside a vision transformer's blocks, between attention and MLP (where ToMe merges).

An `EncoderAdapter` describes one family (its blocks, how to run each half of a block, where its
queries and keys are, how it pools); the `EncoderSession` drives any of them, one `GridTokens`
(`tokenprune.core.grid`) per forward.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from tokenprune.contracts.adapter import Capture, EncoderAdapter, replace_attribute
from tokenprune.contracts.reducer import Reducer
from tokenprune.core.grid import GridTokens, check_site_layers
from tokenprune.core.schedule import schedule_stages
from tokenprune.core.selection import check_strategy_site
from tokenprune.errors import AttachError, ConfigError, InputError, TokenPruneError

if TYPE_CHECKING:
    from tokenprune.config import ReductionConfig, Stage
    from tokenprune.core.selection import ReductionEvent


class EncoderSession:
    """The hooks of a reduction attached to a vision transformer; one `GridTokens` per forward."""

    def __init__(self, adapter: EncoderAdapter, config: ReductionConfig, reducer: Reducer) -> None:
        self.model = adapter.model
        self.adapter = adapter
        self.config = config
        self.reducer = reducer
        check_strategy_site(reducer, "vision")
        if any(stage.site == "cache" for stage in config.stages):
            raise ConfigError(
                f"adapter {adapter.name!r} drives a vision encoder, which has no KV cache: "
                "`site: cache` stages need a language model"
            )
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
        """Place the hooks and block forwards, all or nothing: a failure removes what was placed."""
        try:
            self._place()
        except TokenPruneError:
            self.remove()
            raise
        except Exception as error:
            self.remove()
            raise AttachError(
                f"attaching to {type(self.model).__name__} failed and was undone: "
                f"{type(error).__name__}: {error}"
            ) from error

    def _place(self) -> None:
        """Each placement is followed at once by its undo, so `remove` undoes exactly what was placed."""
        entry = self.adapter.entry_module().register_forward_pre_hook(self._on_entry)
        self._undo.append(entry.remove)
        if not self.stages:
            return
        for layer, block in enumerate(self.adapter.blocks()):
            if layer < min(self.stages):
                continue
            if layer in self.stages:
                for handle in self.adapter.watch(block, self._capture(layer)):
                    self._undo.append(handle.remove)
            forward = self._block_forward(layer, block)
            self._undo.append(replace_attribute(block, _forward_attribute(block), forward))
        self._undo.append(self.adapter.size_weighted_pooling(self._current_sizes))

    def remove(self) -> None:
        """Undo every placement, latest first; safe after a partial install and when called twice."""
        undo, self._undo = self._undo, []
        for step in reversed(undo):
            step()
        self._pass = None

    def _on_entry(self, module: nn.Module, args: tuple) -> None:
        if torch.is_grad_enabled() and self.adapter.recomputes_blocks():
            raise AttachError(
                "gradient checkpointing recomputes each block in the backward pass, which would reduce its "
                "tokens a second time: turn it off while a reduction is attached "
                "(model.set_grad_checkpointing(False)), or run under torch.no_grad()"
            )
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
            x = self.adapter.attend(block, x, None if tokens is None else tokens.bias(x.dtype, x.device))
            if tokens is not None and layer in self.stages:
                x = tokens.reduce(self.stages[layer], x, self.adapter.attention_scale(block))
            return self.adapter.feed_forward(block, x)

        return forward


def _forward_attribute(block: nn.Module) -> str:
    """Where the block's own computation lives: accelerate's dispatch wraps it in a `forward` that moves
    the inputs to the block's device (and loads offloaded weights) around `_old_forward`."""
    return "_old_forward" if hasattr(block, "_hf_hook") and hasattr(block, "_old_forward") else "forward"
