"""Video-LLaVA: 2-frame videos (a class token and 6 x 6 patches per frame) and images, in turn."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from tokenprune.testing.family import Family, Sample
from tokenprune.testing.models import IMAGE_TOKEN_ID, VIDEO_TOKEN_ID, ToySize, toy_video_llava
from tokenprune.testing.oracles import TEXT_IDS, left_padded
from tokenprune.testing.suite_inputs import seeded_pixels

FRAMES = 2


def model(attn_implementation: str) -> nn.Module:
    """Video-LLaVA whose towers have 3 layers, so vision sites have a layer before the features."""
    return toy_video_llava(ToySize(vision_layers=3), attn_implementation=attn_implementation)


def inputs(model: nn.Module, samples: Sequence[Sample], seed: int) -> dict[str, Tensor]:
    """A left-padded batch: the k-th item of a sample is a video for even k, an image for odd k."""
    vision = model.config.vision_config
    side, grid = vision.image_size, (vision.image_size // vision.patch_size) ** 2
    rows, media = [], {"pixel_values_videos": [], "pixel_values": []}
    for i, sample in enumerate(samples):
        gen = torch.Generator().manual_seed(seed + i)
        row: list[int] = []
        for k, length in enumerate(sample.text):
            row += torch.randint(TEXT_IDS.start, TEXT_IDS.stop, (length,), generator=gen).tolist()
            if k == sample.items:
                break
            item_seed = 1000 * (seed + i) + k
            if k % 2 == 0:
                row += [VIDEO_TOKEN_ID] * FRAMES * (1 + grid)
                media["pixel_values_videos"].append(seeded_pixels((FRAMES, 3, side, side), item_seed))
            else:
                row += [IMAGE_TOKEN_ID] * grid
                media["pixel_values"].append(seeded_pixels((3, side, side), item_seed))
        rows.append(row)
    ids, mask = left_padded(rows)
    return {"input_ids": ids, "attention_mask": mask, **{k: torch.stack(v) for k, v in media.items() if v}}


FAMILY = Family(adapter="video_llava", model=model, inputs=inputs, video=True)
