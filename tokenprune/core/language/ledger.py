"""The cache ledger: what later forwards on a reduced KV cache need, carried by the cache itself.

A prefill that reduces writes a `CacheRecord` on the cache object (per stage: its first layer,
which key slots are real, the proportional-attention bias). The record travels with the cache:
`copy.deepcopy(cache)` copies it, so a copy continues exactly as the original would. Each
attachment has an owner number; a cache reduced under another attachment (one since detached)
is refused, since its layers from K on hold fewer entries than a bare model expects. A `site: cache`
stage keeps its own state on the record too (`CacheSiteState`) and rewrites the key slots it prunes.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor
from transformers import PretrainedConfig

from tokenprune.contracts.layout import VisualLayout
from tokenprune.contracts.probe import AttentionInputs
from tokenprune.core.masks import LayerMasks, build_causal_mask, has_local_rules
from tokenprune.errors import InputError

# The attribute of a cache object that holds its record (copied along with the cache).
RECORD_ATTRIBUTE = "_tokenprune_record"

_owners = itertools.count()


@dataclass
class CachedStage:
    """The key slots a stage left in the cache of its layers, and their proportional-attention bias."""

    layer: int
    key_valid: Tensor  # [B, L] bool: real slots among the stage's cached prompt entries
    key_bias: Tensor | None  # [B, L] log(size) per slot, or None
    all_real: bool | None = None  # every slot of key_valid is real: read once, at the first continuation
    key_positions: Tensor | None = None  # [B, L] original position per slot (-1: filler), for sliding windows

    def keys_all_real(self) -> bool:
        """Whether every cached slot of the stage is real (one host read, then remembered)."""
        if self.all_real is None:
            self.all_real = bool(self.key_valid.all())
        return self.all_real


@dataclass
class CacheSiteState:
    """What a `site: cache` stage carries between the forwards on one cache (`core.language.cache_site`)."""

    layout: VisualLayout  # the prompt's visual layout, by original position
    original: Tensor  # [B, N] bool: the prompt's real visual tokens, which budgets count from
    forwards: int = 0  # forwards run on the cache since its prefill (the prefill is 0)
    recent: AttentionInputs | None = None  # layer K's inputs of the newest `window` query tokens
    pool: Tensor | None = None  # restore: [B, P] bool slots of layer K chosen among at every selection
    bases: dict[int, Tensor] = field(default_factory=dict)  # restore: key_valid of each region before it


@dataclass
class CacheRecord:
    """What later forwards on one KV cache need: per stage, its first layer and its key slots.

    A `site: cache` stage adds a stage at its layer K (when no prefill stage starts there) and rewrites
    the key slots of every stage from K on when entries leave; `cache_site` holds its state.
    """

    owner: int  # the attachment that reduced the cache (an int: a deep copy keeps it)
    original_length: int  # prompt tokens before any reduction
    stages: list[CachedStage] = field(default_factory=list)
    cache_site: CacheSiteState | None = None


def record_of(cache: Any) -> CacheRecord | None:
    """The reduction record a cache carries, if any attachment reduced it."""
    return getattr(cache, RECORD_ATTRIBUTE, None)


class CacheLedger:
    """Reads and writes the records of the caches one attachment reduces."""

    def __init__(self, first_layer: int) -> None:
        self.first_layer = first_layer
        self.owner = next(_owners)

    def mode(self, cache: Any) -> str:
        """The mode of a forward on `cache`: "prefill" (reduce), "cached" (continue ours) or "off"."""
        if cache is None or cache.get_seq_length(self.first_layer) == 0:
            return "prefill"
        record = record_of(cache)
        if record is None:
            return "off"
        if record.owner != self.owner:
            raise InputError(
                "this KV cache was shortened by another tokenprune attachment (one since detached?): "
                "continue it under that attachment, or start a new cache"
            )
        return "cached"

    def remember(
        self, cache: Any, layer: int, kept: Tensor, original_length: int, bias: Tensor | None
    ) -> None:
        """Record the key slots stage `layer` leaves in `cache` (the first stage starts a new record)."""
        if cache is None:
            return
        record = record_of(cache)
        if record is None or layer == self.first_layer:
            record = CacheRecord(self.owner, original_length)
            setattr(cache, RECORD_ATTRIBUTE, record)
        record.stages.append(CachedStage(layer, kept >= 0, bias, key_positions=kept))

    def past_length(self, cache: Any) -> int | None:
        """Tokens before a new forward, counted in the original sequence, when layer 0 was shortened.

        The language model counts positions from layer 0's cache length; after a layer-0 site they
        must continue from the original prompt length instead. None when no correction is needed.
        """
        record = record_of(cache) if cache is not None else None
        if record is None or record.owner != self.owner or self.first_layer != 0:
            return None
        first = record.stages[0]
        return cache.get_seq_length(first.layer) - first.key_valid.shape[1] + record.original_length

    def continuation_mask(
        self, cache: Any, layer: int, hidden: Tensor, padding_mask: Tensor | None, config: PretrainedConfig
    ) -> Any:
        """The mask of new tokens `hidden` [B, q, D] over the kept cache entries of the stage at `layer`.

        A model with sliding-window layers gets a `LayerMasks` (one mask per kind of layer, each over
        the entries its cache layer returns, windowed in original positions); others one mask.
        """
        record = record_of(cache)
        cached = next(stage for stage in record.stages if stage.layer == layer)
        batch, q_length = hidden.shape[:2]
        new_total = cache.get_seq_length(layer) - cached.key_valid.shape[1] + q_length
        if padding_mask is not None and padding_mask.shape[1] != record.original_length + new_total:
            raise InputError(
                f"attention_mask covers {padding_mask.shape[1]} tokens, but the cache holds "
                f"{record.original_length} prompt tokens and {new_total} since, this call included"
            )
        new_padding = None if padding_mask is None else padding_mask[:, record.original_length :]
        local = has_local_rules(config)
        skipped = _needs_no_mask(config, cached, q_length, new_padding)
        if skipped and not local:
            return None
        device = hidden.device
        key_valid = cached.key_valid.to(device)
        if padding_mask is None:
            new_valid = torch.ones(batch, new_total, dtype=torch.bool, device=device)
        else:
            new_valid = new_padding.to(device=device, dtype=torch.bool)
        keys = torch.cat([key_valid, new_valid], dim=1)
        bias = None
        if cached.key_bias is not None:
            key_bias = cached.key_bias.to(device)
            bias = torch.cat([key_bias, key_bias.new_zeros(new_valid.shape)], dim=1)
        if not local:
            return build_causal_mask(config, keys, q_length, hidden.dtype, key_bias=bias)
        since = torch.arange(new_total, device=device) + record.original_length
        positions = torch.cat([cached.key_positions.to(device), since.expand(batch, -1)], dim=1)
        return LayerMasks(config, positions, keys, q_length, hidden.dtype, bias, cache, plain_none=skipped)


def _needs_no_mask(
    config: PretrainedConfig, cached: CachedStage, q_length: int, new_padding: Tensor | None
) -> bool:
    """Whether SDPA's mask for one new token is None, as transformers' `sdpa_mask` would decide: no key
    bias, every cached slot and every token since the prompt real (`new_padding`: the caller's mask
    over them). Skips building the mask at each decode step."""
    if config._attn_implementation != "sdpa" or cached.key_bias is not None or q_length != 1:
        return False
    if torch.compiler.is_compiling() or not cached.keys_all_real():
        return False
    return new_padding is None or bool(new_padding.all())
