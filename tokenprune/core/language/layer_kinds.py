"""Per-layer inputs of models whose decoder layers come in kinds (`config.layer_types`).

Gemma 3 interleaves sliding-window layers with global ones, each kind with its own mask and its
own rotary tables (a local and a global RoPE base); Qwen2-family checkpoints with
`use_sliding_window` switch to sliding layers from `max_window_layers` on. A layer takes the mask
of its kind (`LayerMasks`) and, in such a model, its own rotary tables gathered by original position.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import Tensor

from tokenprune.core.masks import layer_mask, layer_types
from tokenprune.indexing import gather_tokens


def layer_inputs(
    overrides: dict[str, Any],
    layer: int,
    kwargs: dict[str, Any],
    config: Any,
    index: Tensor | None,
    blocks: Callable[[], Tensor | None],
) -> dict[str, Any]:
    """`overrides` as decoder layer `layer` takes them.

    `index` [B, L]: original position of each token (-1: filler; None on a decode step, which
    overrides no tables); `blocks()` [B, N]: the bidirectional blocks by original position (asked
    once per kind of layer). In a model of several kinds, every layer gathers its own full-length
    tables by `index` (the `original` position policy: the only one such models take).
    """
    taken = {**overrides}
    if "attention_mask" in taken:
        taken["attention_mask"] = layer_mask(taken["attention_mask"], layer, blocks)
    rotary = kwargs.get("position_embeddings")
    mixed = len(set(layer_types(config))) > 1
    if mixed and index is not None and "position_embeddings" in taken and rotary is not None:
        taken["position_embeddings"] = tuple(gather_tokens(t, index.to(t.device), -2) for t in rotary)
    return taken
