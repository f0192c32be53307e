"""Attention scores recomputed from one attention module's own projections, for the rows needed.

FastV's reference asks the model for full attention maps, which forces eager attention. Here the
layer runs on its own backend (SDPA, FlashAttention...) and a pre-hook keeps a reference to its
inputs; when a strategy asks, the probe projects queries for the rows needed and all keys, applies
the module's own rotary embedding, and never builds a [B, H, N, N] matrix.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from tokenprune.sequence import gather_tokens

QUERY_CHUNK = 256


class ProjectionProbe:
    """Head-averaged attention of a q_proj/k_proj attention module (Llama, Mistral, Qwen2 style)."""

    def __init__(self, attention: nn.Module) -> None:
        self.attention = attention
        module = sys.modules[type(attention).__module__]
        self.rotary: Callable[..., tuple[Tensor, Tensor]] = module.apply_rotary_pos_emb

    def inputs_of(self, kwargs: dict[str, Any], args: tuple) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        """(normed hidden states, (cos, sin)) as the module's forward receives them."""
        hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
        return hidden, kwargs["position_embeddings"]

    @torch.no_grad()
    def received(self, inputs: tuple[Tensor, tuple[Tensor, Tensor]], valid: Tensor, query: str) -> Tensor:
        """[B, L] attention each token receives, averaged over heads and over the chosen query rows.

        `valid` [B, L] marks real tokens: padding and filler are neither queries nor keys.
        `query="last"`: the last real token's row; `"mean"`: the mean over every real token's row.
        """
        hidden, (cos, sin) = inputs
        batch, length, _ = hidden.shape
        keys = self._keys(hidden, cos, sin)
        if query == "last":
            last = length - 1 - valid.flip(1).to(torch.int8).argmax(dim=1)
            rows = last[:, None]
            return self._rows(hidden, cos, sin, keys, rows, valid).squeeze(1)
        total = torch.zeros(batch, length, dtype=torch.float32, device=hidden.device)
        for start in range(0, length, QUERY_CHUNK):
            rows = torch.arange(start, min(start + QUERY_CHUNK, length), device=hidden.device).expand(
                batch, -1
            )
            probs = self._rows(hidden, cos, sin, keys, rows, valid)
            total += (probs * valid.gather(1, rows)[..., None]).sum(dim=1)
        return total / valid.sum(dim=1, keepdim=True).clamp(min=1)

    def _keys(self, hidden: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        attn = self.attention
        keys = attn.k_proj(hidden).view(*hidden.shape[:2], -1, attn.head_dim).transpose(1, 2)
        keys, _ = self.rotary(keys, keys, cos, sin)
        return keys.repeat_interleave(attn.num_key_value_groups, dim=1)

    def _rows(
        self, hidden: Tensor, cos: Tensor, sin: Tensor, keys: Tensor, rows: Tensor, valid: Tensor
    ) -> Tensor:
        """[B, r, L] softmax attention of query rows `rows` [B, r], averaged over heads, in float32."""
        attn = self.attention
        picked = gather_tokens(hidden, rows, 1)
        queries = attn.q_proj(picked).view(*rows.shape, -1, attn.head_dim).transpose(1, 2)
        queries, _ = self.rotary(queries, queries, gather_tokens(cos, rows, 1), gather_tokens(sin, rows, 1))
        logits = (queries.float() @ keys.float().transpose(-1, -2)) * attn.scaling
        key_index = torch.arange(hidden.shape[1], device=hidden.device)
        allowed = valid[:, None, :] & (key_index[None, None, :] <= rows[:, :, None])
        logits = logits.masked_fill(~allowed[:, None], float("-inf"))
        return torch.softmax(logits, dim=-1).nan_to_num(0.0).mean(dim=1)
