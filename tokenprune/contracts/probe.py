"""Signals recomputed from one attention module's own projections, for the rows needed.

FastV's reference asks the model for full attention maps, which forces eager attention. Here the
layer runs on its own backend (SDPA, FlashAttention...) while hooks keep references to what it
computes anyway (its input, rotary tables and key projection); when a strategy asks, the probe
projects queries for the rows needed only and never builds a [B, H, N, N] matrix.

The same probe serves a layer that has not run yet (PyramidDrop ranks with the projections of the
layer whose input the site produces): `project` gives it the inputs that layer would see.

Attentions that normalise each head's queries and keys after projecting them (`q_norm`, `k_norm`:
Qwen3, Gemma 3) are read the same way: the probe applies those norms before the rotary embedding, as
the module does.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from tokenprune.errors import AttachError
from tokenprune.indexing import gather_tokens, left_aligned_index

QUERY_CHUNK = 256

# What the probe reads of an attention module besides its module's `apply_rotary_pos_emb`.
PROJECTION_PARTS = ("q_proj", "k_proj", "head_dim", "scaling")

# Signals read from the layer before the site: a site before layer 0 cannot offer them.
LAYER_BEFORE_SIGNALS = frozenset({"attention", "keys", "attention_from", "variation"})


def unavailable_at(layer: int, requires: frozenset[str]) -> frozenset[str]:
    """The signals of `requires` that a site before decoder layer `layer` cannot provide."""
    return requires & LAYER_BEFORE_SIGNALS if layer == 0 else frozenset()


@dataclass(frozen=True)
class AttentionInputs:
    """What one attention forward saw: normed hidden states [B, N, D], (cos, sin), raw keys [B, N, Hkv*d]."""

    hidden: Tensor
    rotary: tuple[Tensor, Tensor]
    keys: Tensor


class ProjectionProbe:
    """Attention rows and keys of a q_proj/k_proj attention module (Llama, Mistral, Qwen2 style)."""

    def __init__(self, attention: nn.Module) -> None:
        self.attention = attention
        self.rotary: Callable[..., tuple[Tensor, Tensor]] = _rotary_helper(attention)
        missing = [name for name in PROJECTION_PARTS if not hasattr(attention, name)]
        if missing:
            raise AttachError(
                f"the attention probe needs {', '.join(missing)} on {type(attention).__name__}, which "
                "has none: override `Adapter.probe` for this attention"
            )
        softcap = getattr(attention, "attn_logit_softcapping", None)
        if softcap is not None:
            raise AttachError(
                "the attention probe does not reproduce attention logit soft-capping "
                f"(attn_logit_softcapping={softcap}) of {type(attention).__name__}: "
                "override `Adapter.probe` for this attention"
            )

    def watch(self, store: Callable[[AttentionInputs], None]) -> list[RemovableHandle]:
        """Hooks handing `store` the inputs and key projection of every forward of the module."""
        pending: dict[str, Any] = {}

        def before(module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
            pending["hidden"] = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
            pending["rotary"] = kwargs["position_embeddings"]

        def keys(module: nn.Module, args: tuple, output: Tensor) -> None:
            if pending:
                store(AttentionInputs(pending.pop("hidden"), pending.pop("rotary"), output))

        def done(module: nn.Module, args: tuple, output: Any) -> None:
            pending.clear()  # a forward that failed before its key projection keeps nothing either

        return [
            self.attention.register_forward_pre_hook(before, with_kwargs=True),
            self.attention.k_proj.register_forward_hook(keys),
            self.attention.register_forward_hook(done, always_call=True),
        ]

    @torch.no_grad()
    def project(self, normed: Tensor, rotary: tuple[Tensor, Tensor]) -> AttentionInputs:
        """What the module would see for normed hidden states [B, N, D]: its key projection computed.

        The rotary tables follow `normed` (under a device map the model keeps them elsewhere).
        """
        rotary = tuple(t.to(normed.device) for t in rotary)
        return AttentionInputs(normed, rotary, self.attention.k_proj(normed))

    @torch.no_grad()
    def received(
        self,
        inputs: AttentionInputs,
        valid: Tensor,
        query: str,
        rope: bool = True,
        keys_allowed: Tensor | None = None,
    ) -> Tensor:
        """[B, L] attention each token receives, averaged over heads and over the chosen query rows.

        `valid` [B, L] marks real tokens: padding and filler are neither queries nor keys.
        `query="last"`: the last real token's row; `"mean"`: the mean over every real token's row.
        `rope=False`: queries and keys without the rotary embedding (no distance decay, FEATHER).
        `keys_allowed` [B, L] bool: the softmax runs over these keys only (others receive 0).
        """
        if query not in ("last", "mean"):
            raise ValueError(f"signal option query={query!r}: expected 'last' or 'mean' at a decoder layer")
        batch, length, _ = inputs.hidden.shape
        keys = self._key_states(inputs, rope)
        asked_on, valid = valid.device, valid.to(keys.device)  # the layer may run on another device
        allowed = valid if keys_allowed is None else valid & keys_allowed.to(keys.device)
        if query == "last":
            last = length - 1 - valid.flip(1).to(torch.int8).argmax(dim=1)
            return self._rows(inputs, keys, last[:, None], allowed, rope).squeeze(1).to(asked_on)
        total = torch.zeros(batch, length, dtype=torch.float32, device=keys.device)
        for start in range(0, length, QUERY_CHUNK):
            rows = torch.arange(start, min(start + QUERY_CHUNK, length), device=keys.device).expand(batch, -1)
            probs = self._rows(inputs, keys, rows, allowed, rope)
            total += probs.mul_(valid.gather(1, rows)[..., None]).sum(dim=1)
        return (total / valid.sum(dim=1, keepdim=True).clamp(min=1)).to(asked_on)

    @torch.no_grad()
    def received_from(self, inputs: AttentionInputs, valid: Tensor, rows: Tensor) -> Tensor:
        """[B, L] float32 attention each token receives from the query rows `rows` [B, L] bool, averaged
        over heads and those rows (0 without any), with RoPE: only the asked rows are projected."""
        keys = self._key_states(inputs, rope=True)
        index = left_aligned_index(rows.to(keys.device))  # [B, R] slots of the rows, -1 filler
        if index.shape[1] == 0:
            return torch.zeros(rows.shape, dtype=torch.float32, device=valid.device)
        probs = self._rows(inputs, keys, index.clamp(min=0), valid.to(keys.device), rope=True)  # [B, R, L]
        weight = (index >= 0).float()
        total = (probs * weight[..., None]).sum(dim=1) / weight.sum(dim=1, keepdim=True).clamp(min=1)
        return total.to(valid.device)

    @torch.no_grad()
    def keys(self, inputs: AttentionInputs, rope: bool, heads: Literal["mean", "concat"]) -> Tensor:
        """Float32 keys per token: [B, N, Hkv*d] heads concatenated, or [B, N, d] averaged over heads.

        `rope=True`: after the rotary embedding, as the layer attends with them and caches them.
        """
        if heads not in ("mean", "concat"):
            raise ValueError(f"signal option heads={heads!r}: expected 'mean' or 'concat'")
        keys = self._key_states(inputs, rope).transpose(1, 2)  # [B, N, Hkv, d]
        return keys.flatten(2) if heads == "concat" else keys.mean(dim=2)

    def _key_states(self, inputs: AttentionInputs, rope: bool) -> Tensor:
        """[B, Hkv, N, d] keys (through the module's `k_norm` if any), after the module's rotary
        embedding unless `rope=False`, in float32."""
        keys = self._per_head(inputs.keys, "k_norm").transpose(1, 2)
        if rope:
            keys, _ = self.rotary(keys, keys, *inputs.rotary)
        return keys.float()

    def _rows(
        self, inputs: AttentionInputs, keys: Tensor, rows: Tensor, allowed: Tensor, rope: bool
    ) -> Tensor:
        """[B, r, L] softmax attention of query rows `rows` [B, r], averaged over heads, in float32.

        Keys are those `allowed` [B, L] at or before each row (causal). Query heads are grouped over
        their shared key head (GQA) instead of repeating the keys.
        """
        hidden = gather_tokens(inputs.hidden, rows, 1)
        rotary = tuple(gather_tokens(t, rows, 1) for t in inputs.rotary) if rope else None
        return self._attend(self._queries(hidden, rotary), keys, rows, allowed)

    @torch.no_grad()
    def cached_rows(self, inputs: AttentionInputs, keys: Tensor, allowed: Tensor) -> Tensor:
        """[B, w, Lc] float32 head-averaged attention of each row of `inputs` over cached keys.

        `inputs` hold the w newest query tokens (normed hidden states and their rotary tables), which
        are the last w slots of the cache; `keys` [B, Hkv, Lc, d] are the layer's cached keys (after
        its rotary embedding, as it caches them); `allowed` [B, Lc] the slots that may be attended.
        """
        batch, n_rows = inputs.hidden.shape[:2]
        rows = torch.arange(keys.shape[2] - n_rows, keys.shape[2], device=keys.device).expand(batch, -1)
        return self._attend(self._queries(inputs.hidden, inputs.rotary), keys.float(), rows, allowed)

    def _queries(self, hidden: Tensor, rotary: tuple[Tensor, Tensor] | None) -> Tensor:
        """[B, H, r, d] queries of normed hidden states [B, r, D], rotated by `rotary` unless None."""
        queries = self._per_head(self.attention.q_proj(hidden), "q_norm").transpose(1, 2)
        if rotary is not None:
            queries, _ = self.rotary(queries, queries, *rotary)
        return queries

    def _attend(self, queries: Tensor, keys: Tensor, rows: Tensor, allowed: Tensor) -> Tensor:
        """[B, r, L] softmax of queries [B, H, r, d] sitting at slots `rows` [B, r] over keys
        [B, Hkv, L, d] `allowed` [B, L] at or before each row, averaged over heads, in float32."""
        attn = self.attention
        batch, n_rows = rows.shape
        kv_heads, dim = keys.shape[1], keys.shape[-1]
        grouped = queries.float().reshape(batch, kv_heads, -1, n_rows, dim).flatten(2, 3)
        # in place from here: each step's input is a fresh float32 tensor nothing else holds
        logits = (grouped @ keys.transpose(-1, -2)).view(batch, -1, n_rows, keys.shape[2]).mul_(attn.scaling)
        key_index = torch.arange(keys.shape[2], device=keys.device)
        causal = allowed[:, None, :] & (key_index[None, None, :] <= rows[:, :, None])
        logits.masked_fill_(~causal[:, None], float("-inf"))
        return torch.softmax(logits, dim=-1).nan_to_num_(0.0).mean(dim=1)

    def _per_head(self, projected: Tensor, norm_name: str) -> Tensor:
        """A projection [B, n, H*d] split into heads [B, n, H, d], through the module's per-head norm
        `norm_name` (`q_norm` / `k_norm`) when it has one."""
        heads = projected.unflatten(-1, (-1, self.attention.head_dim))
        norm = getattr(self.attention, norm_name, None)
        return heads if norm is None else norm(heads)


def _rotary_helper(attention: nn.Module) -> Callable[..., tuple[Tensor, Tensor]]:
    """The `apply_rotary_pos_emb` of the module defining the attention class (Llama-style models)."""
    module = sys.modules.get(type(attention).__module__)
    helper = getattr(module, "apply_rotary_pos_emb", None)
    if helper is None:
        raise AttachError(
            f"the attention probe needs `apply_rotary_pos_emb` in the module of {type(attention).__name__} "
            f"({type(attention).__module__}), which has none: override `Adapter.probe` for this attention"
        )
    return helper
