"""Masks of a shortened sequence, in the backend's own format, keeping the model's attention rules.

A shortened layer sees a subset of the original tokens, so the rules of the unreduced model are
stated in ORIGINAL positions (slots of the input sequence, as the model's own masks count them):

- causal: a query sees keys at or before it;
- sliding window (`layer_types[i] == "sliding_attention"`): a key at most `sliding_window - 1`
  original positions before the query; removed tokens do not bring farther keys into the window;
- bidirectional blocks (Gemma 3's images): tokens of one block see each other both ways; a block
  is whatever of it is kept.

transformers' own mask functions express the rules (`causal_mask_function`, `sliding_window_overlay`,
`blockwise_overlay`, `and_masks`, `or_masks`), made position-aware by `_at_original_positions`, and
the backend's mask interface builds the mask from them.
A layer with neither a window nor blocks gets the plain causal mask over its (sorted) keys, which
lets SDPA skip the mask where transformers would.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor
from transformers.masking_utils import (
    ALL_MASK_ATTENTION_FUNCTIONS,
    and_masks,
    blockwise_overlay,
    causal_mask_function,
    or_masks,
    sliding_window_overlay,
)

from tokenprune.errors import StrategyError

SLIDING = "sliding_attention"
FULL = "full_attention"
CHUNKED = "chunked_attention"


def build_causal_mask(
    config, key_valid: Tensor, q_length: int, dtype: torch.dtype, key_bias: Tensor | None = None
):
    """The attention mask, in the format of `config`'s attention backend, for a shortened layer.

    `key_valid` [B, kv] says which key slots are real; queries are the last `q_length` slots;
    a query attends to real keys at or before it in (shortened) sequence order. The backend's
    own mask function builds it, so eager gets an additive float mask, SDPA a boolean one (or
    None for a plain causal pattern, keeping the fused kernel), FlashAttention a padding mask.
    `key_bias` [B, kv] (proportional attention: log of merged sizes) makes it an additive float
    mask with the bias added to every query's logit of each key; SDPA stays fused.
    """
    return build_mask(config, key_valid, q_length, dtype, key_bias=key_bias)


def build_mask(
    config,
    key_valid: Tensor,
    q_length: int,
    dtype: torch.dtype,
    positions: Tensor | None = None,
    window: int | None = None,
    blocks: Tensor | None = None,
    key_bias: Tensor | None = None,
):
    """The mask of one shortened layer: causal, within `window`, both ways inside `blocks`.

    `key_valid` [B, kv]: real key slots; queries are the last `q_length` slots. `positions` [B, kv]:
    the original position of each slot (needed with a window or blocks; filler slots -1). `window`:
    the sliding window in original positions. `blocks` [B, N]: the bidirectional block of each
    original position (-1: none). `key_bias` [B, kv]: added to every query's logit of each key.
    """
    rule = causal_mask_function
    if window is not None or blocks is not None:
        if positions is None:
            raise ValueError("a sliding window or bidirectional blocks need the keys' original positions")
        rule = _original_rule(positions, window, blocks)
    plain = rule is causal_mask_function and key_bias is None
    mask = _backend_mask(config, key_valid, q_length, dtype, rule, allow_is_causal_skip=plain)
    return mask if key_bias is None else _with_key_bias(mask, key_bias, dtype, config._attn_implementation)


def _original_rule(positions: Tensor, window: int | None, blocks: Tensor | None):
    """The model's rule in original positions, as a mask function over slots of the shortened sequence."""
    rule = causal_mask_function
    if blocks is not None:
        # one more column of -1: filler slots (position -1) belong to no block
        padded = torch.cat([blocks, blocks.new_full((blocks.shape[0], 1), -1)], dim=1).to(positions.device)
        rule = or_masks(rule, blockwise_overlay(padded))
    if window is not None:
        rule = and_masks(sliding_window_overlay(window), rule)
    return _at_original_positions(rule, positions)


def _at_original_positions(rule: Callable, positions: Tensor) -> Callable:
    """`rule` over slots of the shortened sequence, judged at their original positions [B, L].

    What transformers >= 5.23 calls `remap_positions_for_packed_sequence`; written here so the
    masks need no newer transformers than vLLM's.
    """

    def at_positions(batch_idx, head_idx, q_idx, kv_idx):
        return rule(batch_idx, head_idx, positions[batch_idx, q_idx], positions[batch_idx, kv_idx])

    return at_positions


def layer_window(config, layer_type: str) -> int | None:
    """The sliding window of layers of `layer_type` (None: global attention)."""
    return getattr(config, "sliding_window", None) if layer_type == SLIDING else None


def layer_types(config) -> Sequence[str]:
    """The kind of each decoder layer; for a model that does not say, inferred as transformers' caches
    infer it: a window in every layer when the config has one (Mistral), chunks when it has a chunk size."""
    types = getattr(config, "layer_types", None)
    if types:
        return types
    if getattr(config, "sliding_window", None) and getattr(config, "use_sliding_window", True):
        kind = SLIDING
    else:
        kind = CHUNKED if getattr(config, "attention_chunk_size", None) is not None else FULL
    return [kind] * config.num_hidden_layers


def has_local_rules(config) -> bool:
    """Whether some layer of the model slides a window over its keys."""
    return any(layer_window(config, kind) is not None for kind in layer_types(config))


@dataclass
class LayerMasks:
    """The masks of the layers after a site (or of one decode step), one per kind of layer.

    Built the first time a layer of that kind asks (`for_layer`), then shared by the later layers
    of that kind. `positions` [B, kv] are the keys' original positions (-1: filler) and `key_valid`
    which are real; queries are the last `q_length`. With `cache`, a layer sees only the keys its
    cache layer returns (a sliding cache keeps the last `sliding_window - 1` entries):
    `cache.get_mask_sizes` slices them. `plain_none`: the plain causal mask is known to be None.
    """

    config: Any
    positions: Tensor
    key_valid: Tensor
    q_length: int
    dtype: torch.dtype
    key_bias: Tensor | None = None
    cache: Any = None
    plain_none: bool = False
    _built: dict[str, Any] = field(default_factory=dict, init=False, repr=False)

    def for_layer(self, layer: int, blocks: Callable[[], Tensor | None] = lambda: None) -> Any:
        """The mask of decoder layer `layer`; `blocks()` [B, N]: bidirectional blocks by original position."""
        kind = layer_types(self.config)[layer]
        if kind not in self._built:
            self._built[kind] = self._build(layer, layer_window(self.config, kind), blocks())
        return self._built[kind]

    def _build(self, layer: int, window: int | None, blocks: Tensor | None) -> Any:
        if self.plain_none and window is None and blocks is None:
            return None
        positions, valid, bias = self.positions, self.key_valid, self.key_bias
        if self.cache is not None:
            kv_length, kv_offset = self.cache.get_mask_sizes(self.q_length, layer)
            seen = slice(kv_offset, kv_offset + kv_length)
            positions, valid = positions[:, seen], valid[:, seen]
            bias = None if bias is None else bias[:, seen]
        return build_mask(self.config, valid, self.q_length, self.dtype, positions, window, blocks, bias)


def layer_mask(value: Any, layer: int, blocks: Callable[[], Tensor | None]) -> Any:
    """The mask layer `layer` gets from an override: its kind's from `LayerMasks`, else `value` itself."""
    return value.for_layer(layer, blocks) if isinstance(value, LayerMasks) else value


def takes_key_bias(config) -> bool:
    """Whether `config`'s attention backend can carry a float key bias (an additive 4-D mask).

    FlashAttention gets a padding mask and flex attention a block mask: neither can. A backend with
    no mask function registered in transformers cannot either, as far as tokenprune knows. The same
    backends cannot carry a sliding window or blocks in original positions either.
    """
    if config._attn_implementation not in ALL_MASK_ATTENTION_FUNCTIONS:
        return False
    mask = _backend_mask(
        config,
        torch.ones(1, 1, dtype=torch.bool),
        1,
        torch.float32,
        causal_mask_function,
        allow_is_causal_skip=False,
    )
    return isinstance(mask, Tensor) and mask.ndim == 4


def _backend_mask(
    config, key_valid: Tensor, q_length: int, dtype: torch.dtype, rule, allow_is_causal_skip: bool
):
    """The mask of `rule` over real keys `key_valid` [B, kv], made by the backend's own mask function."""
    batch, kv_length = key_valid.shape
    interface = ALL_MASK_ATTENTION_FUNCTIONS[config._attn_implementation]
    return interface(
        batch_size=batch,
        q_length=q_length,
        kv_length=kv_length,
        q_offset=kv_length - q_length,
        kv_offset=0,
        mask_function=rule,
        attention_mask=key_valid,
        allow_is_causal_skip=allow_is_causal_skip,
        dtype=dtype,
        config=config,
        use_vmap=False,
        device=key_valid.device,
    )


def _with_key_bias(mask: Tensor | None, key_bias: Tensor, dtype: torch.dtype, backend: str) -> Tensor:
    """An additive float mask [B, 1, q, kv]: `mask`'s exclusions plus `key_bias` on every query row."""
    if not isinstance(mask, Tensor) or mask.ndim != 4:
        raise StrategyError(
            f"proportional attention adds log(size) to attention logits, which needs a 4-D mask: "
            f"attention {backend!r} has none; use sdpa or eager, or turn proportional attention off"
        )
    if mask.dtype == torch.bool:
        excluded = torch.zeros(mask.shape, dtype=dtype, device=mask.device)
        mask = excluded.masked_fill(~mask, torch.finfo(dtype).min)
    return mask + key_bias[:, None, None, :].to(dtype)
