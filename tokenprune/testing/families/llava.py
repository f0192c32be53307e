"""LLaVA-1.5: 36 placeholder tokens per image (the toy's 6 x 6 CLIP grid)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from tokenprune.testing.family import Family, Sample
from tokenprune.testing.models import ToySize, toy_llava
from tokenprune.testing.oracles import Prompt, llava_inputs
from tokenprune.testing.suite_inputs import item_seeds, seeded_pixels


def model(attn_implementation: str) -> nn.Module:
    """The toy LLaVA with a 3-layer CLIP tower, so vision sites have a layer before the features."""
    return toy_llava(ToySize(vision_layers=3), attn_implementation=attn_implementation)


def inputs(model: nn.Module, samples: Sequence[Sample], seed: int) -> dict[str, Tensor]:
    """A left-padded batch; each image draws its own seeded pixels."""
    batch = llava_inputs([Prompt(s.text, s.items) for s in samples], seed=seed)
    side = model.config.vision_config.image_size
    seeds = item_seeds(samples, seed)
    if seeds:
        batch["pixel_values"] = torch.stack([seeded_pixels((3, side, side), s) for s in seeds])
    return batch


FAMILY = Family(adapter="llava", model=model, inputs=inputs)
