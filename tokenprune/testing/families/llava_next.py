"""LLaVA-NeXT: anyres tiles, unpadding and row newlines, so every image has its own token count."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn
from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

from tokenprune.registry import adapter_for
from tokenprune.testing.family import Family, Sample
from tokenprune.testing.models import toy_llava_next
from tokenprune.testing.oracles import Prompt, left_padded
from tokenprune.testing.suite_inputs import item_seeds, seeded_pixels

# (height, width) of the k-th image of a sample: wide, tall and square tilings with unpadding.
IMAGE_SIZES = ((24, 40), (50, 20), (30, 30))


def model(attn_implementation: str) -> nn.Module:
    return toy_llava_next(attn_implementation=attn_implementation)


def inputs(model: nn.Module, samples: Sequence[Sample], seed: int) -> dict[str, Tensor]:
    """A left-padded batch: placeholder counts from the adapter's `tokens_per_image`, pixels per tile."""
    sizes = [IMAGE_SIZES[k % len(IMAGE_SIZES)] for s in samples for k in range(s.items)]
    image_sizes = torch.tensor(sizes, dtype=torch.long).reshape(-1, 2)
    counts = adapter_for(model, "llava_next").tokens_per_image({"image_sizes": image_sizes}, None)
    rows, first = [], 0
    for i, sample in enumerate(samples):
        rows.append(Prompt(sample.text, sample.items).ids(counts[first : first + sample.items], seed + i))
        first += sample.items
    ids, mask = left_padded(rows)
    batch = {"input_ids": ids, "attention_mask": mask}
    if sizes:
        side = model.config.vision_config.image_size
        tiles = [image_size_to_num_patches(s, model.config.image_grid_pinpoints, side) for s in sizes]
        seeds = item_seeds(samples, seed)
        pixels = torch.zeros(len(sizes), max(tiles), 3, side, side)
        for image, (count, image_seed) in enumerate(zip(tiles, seeds, strict=True)):
            pixels[image, :count] = seeded_pixels((count, 3, side, side), image_seed)
        batch["pixel_values"] = pixels
        batch["image_sizes"] = image_sizes
    return batch


FAMILY = Family(adapter="llava_next", model=model, inputs=inputs)
