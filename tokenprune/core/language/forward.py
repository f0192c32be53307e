"""The state of one forward of the entry module: what the layer hooks share while the model runs.

A `Pass` lives from the entry pre-hook to the entry's exit hook and is dropped there, with every
tensor it holds (captured attention inputs, the full-length restore buffer, the shortened layout).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from torch import Tensor
from transformers.modeling_outputs import CausalLMOutputWithPast

from tokenprune.contracts.layout import VisualLayout
from tokenprune.core.selection import ReductionEvent


@dataclass
class Shortened:
    """The sequence as the layers from one stage on see it during one forward."""

    index: Tensor | None  # [B, L] original positions, -1 for filler (None on a cached continuation)
    overrides: dict[str, Any]  # layer keyword inputs replaced: mask, rotary tables, position ids
    sizes: Tensor | None = None  # [B, L] original tokens per token once something merged
    tables_by_kind: dict[str, Any] = field(default_factory=dict)  # rotary tables gathered per layer kind


@dataclass
class Pass:
    """State of one forward of the entry module."""

    layout: VisualLayout | None  # None: no visual tokens (decode steps, text-only prompts)
    padding_mask: Tensor | None  # the caller's 2-D attention mask, if any
    mode: str | None = None  # "prefill" (reduce), "cached" (continue on a reduced cache) or "off"
    current: Shortened | None = None
    cache: Any = None
    probe_inputs: dict[int, Any] = field(default_factory=dict)
    restore: Tensor | None = None
    groups: Tensor | None = None  # [B, N] source map (see ReductionEvent.groups)
    vision_slots: list[tuple[Tensor, Tensor]] = field(default_factory=list)  # per vision site: (item, token)
    vision_events: list[ReductionEvent] = field(default_factory=list)  # of the towers handed off
    proportional: bool = False  # a merge asked for proportional attention
    positions: Tensor | None = None  # the ids the model gave its rotary module in this forward
    shift: Tensor | None = None  # [B] decode positions of the current stage's layers: the model's less this
    events: list[ReductionEvent] = field(default_factory=list)


# The keyword (and output field) of the KV cache: `cache` from transformers 5.23, `past_key_values` before.
CACHE_KEYWORD = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"


def cache_of(kwargs: dict[str, Any]) -> Any:
    """The KV cache a forward received (or a model output holds), under either of its names."""
    return kwargs.get("cache", kwargs.get("past_key_values"))


def with_cache(cache: Any) -> dict[str, Any]:
    """Keyword arguments passing `cache` to a forward or `generate`, under this transformers' name."""
    return {CACHE_KEYWORD: cache}
