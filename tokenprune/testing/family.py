"""What the conformance suite needs of one model family: a tiny seeded model, batches for it, its masks.

A family is registered under the entry-point group `tokenprune.families` (name -> a `Family`), so the
suite of `tokenprune.testing` runs every check against every registered adapter, built-in or third-party.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from torch import Tensor, nn


@dataclass(frozen=True)
class Sample:
    """One sample of a batch: text chunk lengths around `items` visual items (len(text) == items + 1)."""

    text: tuple[int, ...]
    items: int


# attn_implementation ("sdpa" or "eager") -> a tiny float32 model in eval mode, seeded, with untied or
# rescaled output layer so greedy decoding does not degenerate.
ModelFactory = Callable[[str], nn.Module]
# (model, samples, seed) -> the keyword inputs of one left-padded batch, as the family's processor makes
# them (`input_ids`, `attention_mask`, pixels and whatever else the model needs), placeholders laid out by
# the model. Sample i draws its ids and pixels from seed + i: `inputs(model, [samples[i]], seed + i)` is
# sample i alone.
InputFactory = Callable[[nn.Module, Sequence[Sample], int], dict[str, Tensor]]
# (model, inputs, layer) -> bool [B, N, N]: which keys each query may attend to in decoder layer `layer` of
# the unreduced model, before any reduction (causal over real tokens unless the family says otherwise: sliding
# windows, bidirectional image blocks). The mask oracle removes the reduced tokens from this pattern.
AttentionPattern = Callable[[nn.Module, dict[str, Tensor], int], Tensor]


@dataclass(frozen=True)
class Family:
    """A model family as the conformance suite sees it."""

    adapter: str  # the registered adapter name the family's models are attached with
    model: ModelFactory
    inputs: InputFactory
    max_items: int = 2  # most visual items per sample the suite asks for
    video: bool = False  # items are videos (several frames each) rather than images
    attention: AttentionPattern | None = None  # None: causal over real tokens
    # The model computes its own (3-D) positions from the inputs (Qwen-VL's M-RoPE): the oracles pass no
    # position ids. False: the oracles pass the positions `generate` derives from the left-padded mask.
    model_positions: bool = False
