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

from tokenprune.core.language.forward import Shortened
from tokenprune.core.masks import layer_mask, layer_types
from tokenprune.indexing import gather_tokens


def layer_inputs(
    current: Shortened, layer: int, kwargs: dict[str, Any], config: Any, blocks: Callable[[], Tensor | None]
) -> dict[str, Any]:
    """The overrides of `current` as decoder layer `layer` takes them.

    `current.index` [B, L]: original position of each token (-1: filler; None on a decode step, which
    overrides no tables); `blocks()` [B, N]: the bidirectional blocks by original position (asked
    once per kind of layer). In a model of several kinds, each kind's full-length tables are gathered
    by the index once per forward, for the first layer of that kind (the `original` position policy:
    the only one such models take).
    """
    taken = {**current.overrides}
    if "attention_mask" in taken:
        taken["attention_mask"] = layer_mask(taken["attention_mask"], layer, blocks)
    rotary, index = kwargs.get("position_embeddings"), current.index
    kinds = layer_types(config)
    if len(set(kinds)) > 1 and index is not None and "position_embeddings" in taken and rotary is not None:
        kind = kinds[layer]
        if kind not in current.tables_by_kind:
            current.tables_by_kind[kind] = tuple(gather_tokens(t, index.to(t.device), -2) for t in rotary)
        taken["position_embeddings"] = current.tables_by_kind[kind]
    return taken
