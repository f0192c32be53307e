"""LLaVA-OneVision: anyres-max images (tiled when alone in a sample, untiled when several) and pooled videos.

The toy: a SigLIP tower of 6 x 6 patches per 24px tile ("full" features, no class token, as released),
anyres pinpoints of 1 x 2, 2 x 1 and 2 x 2 tiles, `anyres_max_2` so that 2 x 2 grids are downscaled
(the released `anyres_max_9` only downscales images larger than the toy's tiles allow), a Qwen2 decoder
with an untied output layer. Videos pool each frame to 3 x 3 tokens.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn
from transformers import (
    LlavaOnevisionConfig,
    LlavaOnevisionForConditionalGeneration,
    PreTrainedModel,
    Qwen2Config,
    SiglipVisionConfig,
)
from transformers.models.llava_onevision.modeling_llava_onevision import image_size_to_num_patches

from tokenprune.adapters.llava_onevision import LlavaOnevisionAdapter
from tokenprune.testing.family import Family, Sample
from tokenprune.testing.models import (
    IMAGE_TOKEN_ID,
    VIDEO_TOKEN_ID,
    ToySize,
    decoder_sizes,
    seeded_model,
    vision_tower_sizes,
)
from tokenprune.testing.oracles import TEXT_IDS, left_padded
from tokenprune.testing.suite_inputs import seeded_pixels

# (height, width) of the k-th image of a sample: wide and tall unpadded grids, a downscaled 2 x 2 grid.
IMAGE_SIZES = ((24, 40), (50, 20), (44, 48))
FRAMES = 3


def qwen2_text_config(size: ToySize, attn_implementation: str) -> Qwen2Config:
    """The toy's Qwen2 decoder (q/k/v biases, as LLaVA-OneVision's and InternVL's), untied output layer."""
    return Qwen2Config(
        **decoder_sizes(size), tie_word_embeddings=False, attn_implementation=attn_implementation
    )


def toy_llava_onevision(
    size: ToySize | None = None, attn_implementation: str = "sdpa", seed: int = 0
) -> PreTrainedModel:
    """A LLaVA-OneVision-shaped model in eval mode, float32, seeded; it never generates placeholders."""
    size = size or ToySize()
    tile = size.grid * size.patch
    config = LlavaOnevisionConfig(
        vision_config=SiglipVisionConfig(
            **vision_tower_sizes(size),
            image_size=tile,
            patch_size=size.patch,
        ),
        text_config=qwen2_text_config(size, attn_implementation),
        image_token_id=IMAGE_TOKEN_ID,
        video_token_id=VIDEO_TOKEN_ID,
        image_grid_pinpoints=[[tile, 2 * tile], [2 * tile, tile], [2 * tile, 2 * tile]],
        vision_aspect_ratio="anyres_max_2",
        vision_feature_layer=-1,
        vision_feature_select_strategy="full",
        tie_word_embeddings=False,
        attn_implementation=attn_implementation,
    )
    placeholders = (IMAGE_TOKEN_ID, VIDEO_TOKEN_ID)
    return seeded_model(LlavaOnevisionForConditionalGeneration, config, seed, placeholders)


def model(attn_implementation: str) -> nn.Module:
    return toy_llava_onevision(attn_implementation=attn_implementation)


def media_inputs(
    model: nn.Module, prompts: Sequence[Sequence[int | str]], seed: int = 0, frames: int = FRAMES
) -> dict[str, Tensor]:
    """A left-padded batch as the processor lays it out; a prompt is text run lengths, "image" and "video".

    Image k of a sample has size IMAGE_SIZES[k % 3]; it is tiled only when alone in its sample
    (`batch_num_images`). Sample i draws text and pixels from seed + i, so it can be rebuilt alone.
    """
    adapter = LlavaOnevisionAdapter(model)
    tile = model.config.vision_config.image_size
    per_sample = [sum(item == "image" for item in prompt) for prompt in prompts]
    sizes = torch.tensor(
        [IMAGE_SIZES[k % len(IMAGE_SIZES)] for n in per_sample for k in range(n)], dtype=torch.long
    ).reshape(-1, 2)
    batch_num_images = torch.tensor(per_sample)
    counts = iter(
        adapter.tokens_per_image({"image_sizes": sizes, "batch_num_images": batch_num_images}, None)
    )
    tiles = [
        image_size_to_num_patches(size, model.config.image_grid_pinpoints, tile) if n == 1 else 1
        for n, size in zip([n for n in per_sample for _ in range(n)], sizes, strict=True)
    ]
    rows, images, videos = [], [], []
    for i, prompt in enumerate(prompts):
        gen = torch.Generator().manual_seed(seed + i)
        row: list[int] = []
        for k, item in enumerate(prompt):
            item_seed = 1000 * (seed + i) + k
            if item == "image":
                row += [IMAGE_TOKEN_ID] * next(counts)
                images.append(seeded_pixels((tiles[len(images)], 3, tile, tile), item_seed))
            elif item == "video":
                row += [VIDEO_TOKEN_ID] * (frames * adapter.tokens_per_frame() + 1)
                videos.append(seeded_pixels((frames, 3, tile, tile), item_seed))
            else:
                row += torch.randint(TEXT_IDS.start, TEXT_IDS.stop, (item,), generator=gen).tolist()
        rows.append(row)
    ids, mask = left_padded(rows)
    batch = {"input_ids": ids, "attention_mask": mask}
    if images:
        pixels = torch.zeros(len(images), max(tiles), 3, tile, tile)
        for image, tiles_of_image in enumerate(images):
            pixels[image, : len(tiles_of_image)] = tiles_of_image
        batch.update(pixel_values=pixels, image_sizes=sizes, batch_num_images=batch_num_images)
    if videos:
        batch["pixel_values_videos"] = torch.stack(videos)
    return batch


def interleaved(sample: Sample, media: str) -> list[int | str]:
    """The sample's text runs with its `items` media between them."""
    prompt: list[int | str] = []
    for k, length in enumerate(sample.text):
        prompt.append(length)
        if k < sample.items:
            prompt.append(media)
    return prompt


def image_inputs(model: nn.Module, samples: Sequence[Sample], seed: int) -> dict[str, Tensor]:
    return media_inputs(model, [interleaved(sample, "image") for sample in samples], seed)


def video_inputs(model: nn.Module, samples: Sequence[Sample], seed: int) -> dict[str, Tensor]:
    return media_inputs(model, [interleaved(sample, "video") for sample in samples], seed)


FAMILY = Family(adapter="llava_onevision", model=model, inputs=image_inputs)
VIDEO_FAMILY = Family(adapter="llava_onevision", model=model, inputs=video_inputs, video=True)
