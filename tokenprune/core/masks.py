"""Shared mechanics of a shortened sequence: gathering tokens, re-laying out rows, building masks.

Every adapter reuses these; none re-implements them. Index tensors are [B, L] positions into a
longer sequence, with -1 marking filler slots (a row keeping fewer tokens than the longest row
is left-filled, so the last token of every row stays at the end, as generation expects).
"""

from __future__ import annotations

import torch
from torch import Tensor
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, causal_mask_function

from tokenprune.errors import StrategyError


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
    mask = _backend_mask(config, key_valid, q_length, dtype, allow_is_causal_skip=key_bias is None)
    return mask if key_bias is None else _with_key_bias(mask, key_bias, dtype, config._attn_implementation)


def takes_key_bias(config) -> bool:
    """Whether `config`'s attention backend can carry a float key bias (an additive 4-D mask).

    FlashAttention gets a padding mask and flex attention a block mask: neither can. A backend with
    no mask function registered in transformers cannot either, as far as tokenprune knows.
    """
    if config._attn_implementation not in ALL_MASK_ATTENTION_FUNCTIONS:
        return False
    mask = _backend_mask(
        config, torch.ones(1, 1, dtype=torch.bool), 1, torch.float32, allow_is_causal_skip=False
    )
    return isinstance(mask, Tensor) and mask.ndim == 4


def _backend_mask(config, key_valid: Tensor, q_length: int, dtype: torch.dtype, allow_is_causal_skip: bool):
    """The causal mask over real keys `key_valid` [B, kv], made by the backend's own mask function."""
    batch, kv_length = key_valid.shape
    interface = ALL_MASK_ATTENTION_FUNCTIONS[config._attn_implementation]
    return interface(
        batch_size=batch,
        q_length=q_length,
        kv_length=kv_length,
        q_offset=kv_length - q_length,
        kv_offset=0,
        mask_function=causal_mask_function,
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
