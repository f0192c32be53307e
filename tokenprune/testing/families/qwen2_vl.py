"""Qwen2-VL: images and videos of their own grids, 3-D M-RoPE positions computed by the model."""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn

from tokenprune.testing.family import Family, Sample
from tokenprune.testing.models import toy_qwen2_vl
from tokenprune.testing.qwen_inputs import Item, QwenPrompt, qwen_inputs

# The k-th item of a sample: a 4 x 6 image (6 tokens), then a 2-frame 4 x 4 video (8 tokens), in turn.
ITEMS = (Item((1, 4, 6)), Item((2, 4, 4), video=True))


def prompts(samples: Sequence[Sample]) -> list[QwenPrompt]:
    """Qwen prompts of the samples, items alternating between an image and a video."""
    return [QwenPrompt(s.text, [ITEMS[k % len(ITEMS)] for k in range(s.items)]) for s in samples]


def model(attn_implementation: str) -> nn.Module:
    return toy_qwen2_vl(attn_implementation=attn_implementation)


def inputs(model: nn.Module, samples: Sequence[Sample], seed: int) -> dict[str, Tensor]:
    return qwen_inputs(model, prompts(samples), seed)


FAMILY = Family(adapter="qwen2_vl", model=model, inputs=inputs, model_positions=True)
