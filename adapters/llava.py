"""LLaVA (`LlavaForConditionalGeneration`, `LlavaModel`): images as runs of image placeholder tokens.

Candidates: every image placeholder token. Each image is one segment whose grid is the vision
tower's patch grid (e.g. 24 x 24 for 336px CLIP-L/14); with `vision_feature_select_strategy="full"`
the class token leads the run and the segment is one row of tokens. Images may sit anywhere in
the prompt, several per sample; the i-th image of the batch fills the i-th run of placeholders.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from torch import Tensor, nn
from transformers import PretrainedConfig

from tokenprune.adapter import Adapter
from tokenprune.layout import Segment, VisualLayout, grid_coords, line_coords, placeholder_runs


class LlavaAdapter(Adapter):
    """Adapter for LLaVA-1.5 style models (one fixed-size grid per image)."""

    name = "llava"
    model_types = ("llava",)

    def _base(self) -> nn.Module:
        """The `LlavaModel` (inside a `...ForConditionalGeneration`, or the model itself)."""
        return getattr(self.model, "model", self.model)

    def entry_module(self) -> nn.Module:
        return self._base()

    def decoder_layers(self) -> Sequence[nn.Module]:
        return self._base().language_model.layers

    def text_config(self) -> PretrainedConfig:
        return self._base().language_model.config

    def visual_layout(self, inputs: dict[str, Any]) -> VisualLayout | None:
        input_ids = inputs.get("input_ids")
        if input_ids is None:
            return None
        placeholders = input_ids == self.model.config.image_token_id
        if not bool(placeholders.any()):
            return None
        segments = [
            Segment(sample, positions, *self._grid(len(positions)))
            for sample, positions in placeholder_runs(placeholders, self.tokens_per_image(inputs, placeholders))
        ]
        return VisualLayout.from_segments(*input_ids.shape, segments, input_ids.device)

    def tokens_per_image(self, inputs: dict[str, Any], placeholders: Tensor) -> list[int]:
        """Placeholder count of each image of the batch, in order."""
        per_image = self._patch_side() ** 2 + (self._strategy(inputs) == "full")
        pixels = inputs.get("pixel_values")
        n_images = pixels.shape[0] if pixels is not None else int(placeholders.sum()) // per_image
        return [per_image] * n_images

    def _grid(self, n: int) -> tuple[Tensor, tuple[int, int, int]]:
        side = math.isqrt(n)
        if side * side == n:
            return grid_coords(side, side), (1, side, side)
        return line_coords(n)

    def _patch_side(self) -> int:
        vision = self.model.config.vision_config
        return vision.image_size // vision.patch_size

    def _strategy(self, inputs: dict[str, Any]) -> str:
        return inputs.get("vision_feature_select_strategy") or self.model.config.vision_feature_select_strategy
