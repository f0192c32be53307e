"""Qwen2.5-VL: as Qwen2-VL, with windowed vision attention and videos timed at 1.5 s per temporal patch."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from tokenprune.testing.families.qwen2_vl import prompts
from tokenprune.testing.family import Family, Sample
from tokenprune.testing.models import toy_qwen2_5_vl
from tokenprune.testing.qwen_inputs import qwen_inputs


def model(attn_implementation: str) -> nn.Module:
    return toy_qwen2_5_vl(attn_implementation=attn_implementation)


def inputs(model: nn.Module, samples: Sequence[Sample], seed: int) -> dict[str, Tensor]:
    """Qwen inputs with `second_per_grid_ts`: temporal positions 3 apart (2 tokens per second)."""
    batch = qwen_inputs(model, prompts(samples), seed)
    if "video_grid_thw" in batch:
        batch["second_per_grid_ts"] = torch.full((len(batch["video_grid_thw"]),), 1.5)
    return batch


FAMILY = Family(adapter="qwen2_vl", model=model, inputs=inputs, model_positions=True)
