"""InternVL: images of 1, 3 and 5 tiles (a single tile; 2 or 4 tiles and their thumbnail), 9 tokens per tile.

The toy: an InternVL vision tower of 6 x 6 patches per 24px tile (class token dropped, "default"),
pixel-shuffled 2 x 2 into 3 x 3 tokens, and a Qwen2 decoder with an untied output layer, as InternVL
2.5 and 3. Each image is written as the processor writes it: `<img>`, its tiles' placeholders, `</img>`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn
from transformers import InternVLConfig, InternVLForConditionalGeneration, PreTrainedModel
from transformers.models.internvl.configuration_internvl import InternVLVisionConfig

from tokenprune.testing.families.llava_onevision import qwen2_text_config
from tokenprune.testing.family import Family, Sample
from tokenprune.testing.models import IMAGE_TOKEN_ID, ToySize, seeded_model, vision_tower_sizes
from tokenprune.testing.oracles import TEXT_IDS, left_padded
from tokenprune.testing.suite_inputs import seeded_pixels

IMAGE_START_ID = 7  # `<img>`
IMAGE_END_ID = 8  # `</img>`
TILES = (3, 1, 5)  # tiles of the k-th image of a sample, thumbnail included


def toy_internvl(
    size: ToySize | None = None, attn_implementation: str = "sdpa", seed: int = 0
) -> PreTrainedModel:
    """An InternVL-shaped model in eval mode, float32, seeded; it never generates placeholders."""
    size = size or ToySize()
    tile = size.grid * size.patch
    config = InternVLConfig(
        vision_config=InternVLVisionConfig(
            **vision_tower_sizes(size),
            image_size=[tile, tile],
            patch_size=[size.patch, size.patch],
        ),
        text_config=qwen2_text_config(size, attn_implementation),
        image_token_id=IMAGE_TOKEN_ID,
        image_seq_length=(size.grid // 2) ** 2,
        downsample_ratio=0.5,
        vision_feature_layer=-1,
        vision_feature_select_strategy="default",
        tie_word_embeddings=False,
        attn_implementation=attn_implementation,
    )
    return seeded_model(InternVLForConditionalGeneration, config, seed)


def model(attn_implementation: str) -> nn.Module:
    return toy_internvl(attn_implementation=attn_implementation)


def tiled_inputs(model: nn.Module, prompts: Sequence[Sequence[int]], seed: int = 0) -> dict[str, Tensor]:
    """A left-padded batch; a prompt alternates text run lengths and tile counts: [text, tiles, text, ...].

    Sample i draws text and pixels from seed + i, so that it can be rebuilt alone.
    """
    tile, per_tile = model.config.vision_config.image_size[0], model.config.image_seq_length
    rows, pixels = [], []
    for i, prompt in enumerate(prompts):
        gen = torch.Generator().manual_seed(seed + i)
        row: list[int] = []
        for k, n in enumerate(prompt):
            if k % 2:
                row += [IMAGE_START_ID, *[IMAGE_TOKEN_ID] * n * per_tile, IMAGE_END_ID]
                pixels.append(seeded_pixels((n, 3, tile, tile), 1000 * (seed + i) + k))
            else:
                row += torch.randint(TEXT_IDS.start, TEXT_IDS.stop, (n,), generator=gen).tolist()
        rows.append(row)
    ids, mask = left_padded(rows)
    batch = {"input_ids": ids, "attention_mask": mask}
    if pixels:
        batch["pixel_values"] = torch.cat(pixels)
    return batch


def inputs(model: nn.Module, samples: Sequence[Sample], seed: int) -> dict[str, Tensor]:
    """The k-th image of a sample has TILES[k % 3] tiles."""
    prompts = []
    for sample in samples:
        prompt = [sample.text[0]]
        for k, length in enumerate(sample.text[1:]):
            prompt += [TILES[k % len(TILES)], length]
        prompts.append(prompt)
    return tiled_inputs(model, prompts, seed)


FAMILY = Family(adapter="internvl", model=model, inputs=inputs)
