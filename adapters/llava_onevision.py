"""LLaVA-OneVision (`LlavaOnevisionForConditionalGeneration`): anyres-max images, several images, videos.

Images are LLaVA-NeXT's (the `llava_next` adapter's segments: base grid, then the unpadded
high-resolution grid with a newline closing each row), with two variations:
- anyres-max: a high-resolution grid larger than `vision_aspect_ratio` (`anyres_max_9`: 9 tiles' worth
  of patches) is downscaled by the model (bilinear) to fewer rows and columns; the adapter runs the
  model's own `pack_image_features` on marker features to get each grid's exact shape;
- a sample with several images (`batch_num_images` > 1) gets each image untiled: its base grid then a
  single newline token.

A video of T frames fills T * h * w + 1 video placeholders (`video_token_id`): each frame's features
bilinearly pooled by the model to h x w = ceil(side / 2) per side, frame after frame, then one newline.
The frames are one segment of extent (T, h, w), coords (t, row, col): `budget: per_frame` gives every
(video, t) frame its share and `uniform` strides over time as well. Newlines are never candidates.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor
from transformers.models.llava_onevision.modeling_llava_onevision import image_size_to_num_patches

from tokenprune.contracts.layout import Segment, grid_coords, placeholder_runs
from tokenprune.errors import InputError

from .llava_next import LlavaNextAdapter
from .video_llava import VideoLlavaAdapter

LONE_NEWLINE = (1, 0)  # `high_res_shape` of an untiled image: no grid, one newline after the base grid


class LlavaOnevisionAdapter(LlavaNextAdapter, VideoLlavaAdapter):
    """Adapter for LLaVA-OneVision: LLaVA-NeXT's images (anyres-max, untiled when several), pooled videos."""

    name = "llava_onevision"
    model_types = ("llava_onevision",)
    no_vision_tower = (
        "its tower's patches reach the language model resampled: video frames pooled bilinearly 2 x 2, "
        "large anyres grids downscaled bilinearly (anyres-max), the rest unpadded per image size, while a "
        "vision site needs each placeholder to hold exactly one tower token, and generate() passes "
        "`image_sizes` and `batch_num_images` to the encoder, not to the forward that fills the placeholders"
    )

    def high_res_shapes(self, inputs: dict[str, Any]) -> list[tuple[int, int]]:
        """As LLaVA-NeXT's, but the images of a sample holding several are untiled (a lone newline)."""
        sizes = inputs.get("image_sizes")
        if sizes is None:
            return super().high_res_shapes(inputs)  # generate's encoded features: read from the newlines
        tiled = _tiled_images(inputs.get("batch_num_images"), len(sizes))
        return [
            self.high_res_shape(size) if tile else LONE_NEWLINE
            for size, tile in zip(sizes, tiled, strict=True)
        ]

    def high_res_shape(self, size: Tensor) -> tuple[int, int]:
        """The model's own `pack_image_features` (tiling, unpadding, anyres-max downscaling) run on markers:
        zero features, newlines of one, so the newlines count the rows."""
        config, side = self.model.config, self.patch_side()
        tiles = image_size_to_num_patches(size, config.image_grid_pinpoints, config.vision_config.image_size)
        markers = [torch.zeros(tiles, side * side, 1)]
        (packed,), _ = self.base_model().pack_image_features(
            markers, size[None], torch.ones(1), config.vision_aspect_ratio
        )
        high = packed[side * side :, 0]
        rows = int(high.sum())
        return rows, len(high) // rows - 1

    def tokens_per_frame(self) -> int:
        """Placeholders of one pooled video frame."""
        return self.pooled_side() ** 2

    def pooled_side(self) -> int:
        """Rows (and columns) of a video frame after the model's 2 x 2 bilinear pooling."""
        return math.ceil(self.patch_side() / 2)

    def frames_per_video(self, inputs: dict[str, Any], placeholders: Tensor) -> list[int]:
        """Frame count of each video: from its pixels, or from its encoded features (frames, a newline)."""
        pixels = inputs.get("pixel_values_videos")
        if pixels is not None:
            return [pixels.shape[1]] * pixels.shape[0]
        encoded = inputs["mm_encoder_outputs"]["video"].pooler_output  # [videos, T * h * w + 1, D]
        frames, rest = divmod(encoded.shape[1] - 1, self.tokens_per_frame())
        if rest:
            raise InputError(
                f"encoded videos of {encoded.shape[1]} tokens are not whole pooled frames + newline"
            )
        return [frames] * encoded.shape[0]

    def video_segments(self, sample: int, positions: Tensor, frames: int) -> list[Segment]:
        """The pooled frames of one video as one (T, h, w) volume; the closing newline is not a candidate."""
        side = self.pooled_side()
        volume = torch.cat([grid_coords(side, side, frame=t) for t in range(frames)])
        return [Segment(sample, positions[:-1], volume, (frames, side, side))]

    def _video_layout(self, inputs: dict[str, Any], input_ids: Tensor) -> list[Segment]:
        placeholders = input_ids == self.model.config.video_token_id
        frames = self.frames_per_video(inputs, placeholders)
        runs = placeholder_runs(placeholders, [t * self.tokens_per_frame() + 1 for t in frames])
        return [
            segment
            for (sample, positions), t in zip(runs, frames, strict=True)
            for segment in self.video_segments(sample, positions, t)
        ]


def _tiled_images(batch_num_images: Tensor | list[int] | None, images: int) -> list[bool]:
    """Whether each image is tiled: the model tiles an image only when its sample holds no other
    (`batch_num_images`; without it, every image is tiled)."""
    if batch_num_images is None:
        return [True] * images
    tiled = [int(n) == 1 for n in batch_num_images for _ in range(int(n))]
    if len(tiled) != images:
        raise InputError(f"`batch_num_images` counts {len(tiled)} images, `image_sizes` {images}")
    return tiled
