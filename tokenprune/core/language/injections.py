"""Per-token inputs a model adds between its decoder layers follow the tokens a site kept.

Some models add side inputs to the hidden states of chosen tokens between decoder layers: Qwen3-VL's
DeepStack adds features of several vision-tower layers at the visual positions after each of its first
decoder layers. The model prepares them for the full-length sequence, packed: a mask [B, N] of the
tokens that receive one, and one row per True entry in row-major order. After a site the layers see a
shorter sequence, so the model's own injection would meet the wrong rows (or fail on the shape).

An adapter whose model does this implements `FollowsTokens`: given `CurrentRows`, which tells for the
forward in progress the original positions of the rows the decoder layers see, it wraps the model's
injection (through `replace_attribute`) and moves the packed inputs onto those rows with
`follow_packed`. Every kept token receives exactly its own side input, as in the unreduced model; a
merged token is the survivor it was merged into and receives the survivor's own.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Sequence
from typing import Protocol, runtime_checkable

from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from tokenprune.core.language.forward import Pass
from tokenprune.core.language.lifecycle import Hooks
from tokenprune.indexing import gather_tokens


class CurrentRows:
    """The original positions of the rows the decoder layers see, during the forward in progress."""

    def __init__(self, state: Callable[[], Pass | None]) -> None:
        self._state = state
        self._restored: weakref.ref[Pass] | None = None  # the forward whose full length is back

    def positions(self) -> Tensor | None:
        """[B, L] original positions (-1: filler) of the shortened rows; None while the sequence is whole
        (before the first site, on a decode step, after the last layer gave back the full length)."""
        state = self._state()
        if state is None or state.mode != "prefill" or state.current is None:
            return None
        if self._restored is not None and self._restored() is state:
            return None
        return state.current.index

    def watch_restore(self, last_layer: nn.Module) -> RemovableHandle:
        """A hook on the last decoder layer, placed after the one that restores the full length."""

        def restored(module: nn.Module, args: tuple, output: Tensor) -> None:
            state = self._state()
            self._restored = None if state is None else weakref.ref(state)

        return last_layer.register_forward_hook(restored)


@runtime_checkable
class FollowsTokens(Protocol):
    """An adapter whose model adds per-token side inputs between decoder layers."""

    def follow_tokens(self, rows: CurrentRows) -> Callable[[], None]:
        """Make the model's injection follow `rows`; returns the undo."""


class Undo:
    """An undo function in the shape of a hook handle, removed with the attachment's hooks."""

    def __init__(self, undo: Callable[[], None]) -> None:
        self.remove = undo


def follow_side_inputs(
    adapter: object, state: Callable[[], Pass | None], layers: Sequence[nn.Module], hooks: Hooks
) -> None:
    """Make `adapter`'s side inputs follow the kept tokens (nothing for other adapters), recorded in `hooks`.

    Place it after the hook that restores the full length on the last layer: its watcher runs after it.
    """
    if not isinstance(adapter, FollowsTokens):
        return
    rows = CurrentRows(state)
    hooks.add([rows.watch_restore(layers[-1])])
    hooks.add([Undo(adapter.follow_tokens(rows))])


def follow_packed(mask: Tensor, packed: Tensor, positions: Tensor) -> tuple[Tensor, Tensor]:
    """A packed side input moved onto the rows at original `positions` [B, L] (-1: filler).

    `mask` [B, N] marks the tokens of the full-length sequence that receive a row of `packed` [n, D]
    (row-major). Returns the mask [B, L] of the rows that receive one and their rows, in the same packing.
    """
    mask, packed = mask.to(positions.device), packed.to(positions.device)
    full = packed.new_zeros(*mask.shape, packed.shape[-1])
    full[mask] = packed
    kept_mask = gather_tokens(mask, positions, 1) & (positions >= 0)
    return kept_mask, gather_tokens(full, positions, 1)[kept_mask]
