"""LLaVA-NeXT (`LlavaNextForConditionalGeneration`): anyres images, unpadded, with row newlines.

Each image's placeholders hold, in order, the base (low-resolution) grid, then the high-resolution
grid assembled from the anyres tiles, unpadded to the image's aspect ratio, with one
`image_newline` token closing each row. Two segments per image are candidates: the base grid (kind
"base", `TokenView.of_kind`) and the unpadded high-resolution grid (with its real rows and columns).
Newline tokens are not candidates: like text they are always kept, so the layout's rows stay delimited.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from transformers.models.llava_next.modeling_llava_next import get_anyres_image_grid_shape, unpad_image

from tokenprune.contracts.adapter import VisionTower
from tokenprune.contracts.layout import Segment, grid_coords
from tokenprune.errors import InputError

from .llava import LlavaAdapter


class LlavaNextAdapter(LlavaAdapter):
    """Adapter for LLaVA-NeXT (LLaVA-1.6) models."""

    name = "llava_next"
    no_vision_tower = (
        "its anyres tiles reach the language model unpadded, in a layout that depends on each image's size, "
        "while a vision site maps the i-th tower item to the i-th run of a fixed number of placeholders; "
        "generate() passes `image_sizes` to the encoder but not to the forward that fills the placeholders, "
        "so a tile's patches cannot be matched exactly to their placeholders there"
    )
    model_types = ("llava_next",)

    def vision_towers(self) -> tuple[VisionTower, ...]:
        """No tower: see `no_vision_tower`."""
        return ()

    def tokens_per_image(self, inputs: dict[str, Any], placeholders: Tensor) -> list[int]:
        return [self._base_count() + rows * (cols + 1) for rows, cols in self.high_res_shapes(inputs)]

    def image_segments(
        self, inputs: dict[str, Any], image: int, sample: int, positions: Tensor
    ) -> list[Segment]:
        side = self.patch_side()
        base = self._base_count()
        rows, cols = self.high_res_shapes(inputs)[image]
        grid = positions[base:].view(rows, cols + 1)[:, :cols].reshape(-1)  # drop each row's newline
        segments = [Segment(sample, positions[:base], grid_coords(side, side), (1, side, side), "base")]
        if cols:  # (1, 0): a lone newline after the base grid, no high-resolution grid (LLaVA-OneVision)
            segments.append(Segment(sample, grid, grid_coords(rows, cols), (1, rows, cols)))
        return segments

    def _base_count(self) -> int:
        return self.patch_side() ** 2

    def high_res_shapes(self, inputs: dict[str, Any]) -> list[tuple[int, int]]:
        """(rows, cols) of each image's unpadded high-resolution grid, newlines not counted (a variant's
        hook: `(1, 0)` stands for a lone newline closing the base grid)."""
        if inputs.get("image_sizes") is not None:
            return [self.high_res_shape(size) for size in inputs["image_sizes"]]
        encoded = (inputs.get("mm_encoder_outputs") or {}).get("image")
        if encoded is None:
            raise InputError("LLaVA-NeXT inputs with image tokens need `image_sizes` (or pre-encoded images)")
        return [self._shape_from_features(features) for features in encoded.pooler_output]

    def high_res_shape(self, size: Tensor) -> tuple[int, int]:
        """The model's own anyres tiling and unpadding, applied to an index grid."""
        config = self.model.config
        tiles_h, tiles_w = get_anyres_image_grid_shape(
            size, config.image_grid_pinpoints, config.vision_config.image_size
        )
        side = self.patch_side()
        rows, cols = unpad_image(torch.empty(1, tiles_h * side, tiles_w * side), size).shape[1:]
        return rows, cols

    def _shape_from_features(self, features: Tensor) -> tuple[int, int]:
        """Pre-encoded images (as `generate` passes them): rows end with exact copies of `image_newline`."""
        high = features[self._base_count() :]
        rows = int((high == self.base_model().image_newline.to(high)).all(dim=-1).sum())
        return rows, high.shape[0] // max(rows, 1) - 1
