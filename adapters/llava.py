"""LLaVA (`LlavaForConditionalGeneration`, `LlavaModel`): images as runs of image placeholder tokens.

Candidates: every image placeholder token. Each image is one segment whose grid is the vision
tower's patch grid (e.g. 24 x 24 for 336px CLIP-L/14); with `vision_feature_select_strategy="full"`
the class token leads the run and the segment is one row of tokens. Images may sit anywhere in
the prompt, several per sample; the i-th image of the batch fills the i-th run of placeholders.
"""

from __future__ import annotations

import math
from typing import Any

from torch import Tensor

from tokenprune.contracts.adapter import ConditionalGenerationAdapter, VisionTower
from tokenprune.contracts.layout import Segment, VisualLayout, grid_coords, line_coords, placeholder_runs


class LlavaAdapter(ConditionalGenerationAdapter):
    """Adapter for LLaVA-1.5 style models (one fixed-size grid per image)."""

    name = "llava"
    model_types = ("llava",)

    def visual_layout(self, inputs: dict[str, Any]) -> VisualLayout | None:
        if not self.has_images(inputs):
            return None  # a generated token may equal the placeholder id: without images it is text
        input_ids = self.input_ids(inputs)
        placeholders = input_ids == self.model.config.image_token_id
        runs = placeholder_runs(placeholders, self.tokens_per_image(inputs, placeholders))
        segments = [
            segment
            for image, (sample, positions) in enumerate(runs)
            for segment in self.image_segments(inputs, image, sample, positions)
        ]
        return VisualLayout.from_segments(*input_ids.shape, segments, input_ids.device)

    @staticmethod
    def has_images(inputs: dict[str, Any]) -> bool:
        """Whether this forward carries images (pixels, or features pre-encoded by `generate`)."""
        encoded = inputs.get("mm_encoder_outputs") or {}
        return inputs.get("pixel_values") is not None or encoded.get("image") is not None

    def tokens_per_image(self, inputs: dict[str, Any], placeholders: Tensor) -> list[int]:
        """Placeholder count of each image of the batch, in order."""
        per_image = self.patch_side() ** 2 + (self._select_strategy(inputs) == "full")
        encoded = (inputs.get("mm_encoder_outputs") or {}).get("image")
        if encoded is not None:
            return [len(features) for features in encoded.pooler_output]
        return [per_image] * inputs["pixel_values"].shape[0]

    def image_segments(
        self, inputs: dict[str, Any], image: int, sample: int, positions: Tensor
    ) -> list[Segment]:
        """The segments (grids) of one image whose placeholders sit at `positions` of `sample`."""
        n = len(positions)
        side = math.isqrt(n)
        if side * side == n:
            return [Segment(sample, positions, grid_coords(side, side), (1, side, side))]
        return [Segment(sample, positions, *line_coords(n))]

    def vision_towers(self) -> tuple[VisionTower, ...]:
        """The CLIP encoder up to `vision_feature_layer` (one int layer); with "full" its class token
        reaches the language model too."""
        config = self.model.config
        full = config.vision_feature_select_strategy == "full"
        tower = self.clip_tower(self.base_model().vision_tower, config.image_token_id, keeps_prefix=full)
        return () if tower is None else (tower,)

    def clip_tower(
        self, tower: Any, placeholder_id: int, keeps_prefix: bool = False, modality: str = "image"
    ) -> VisionTower | None:
        """A CLIP vision model read at `vision_feature_layer` (an int, not the embeddings); None otherwise."""
        feature = self.model.config.vision_feature_layer
        if not isinstance(feature, int) or feature == 0:
            return None
        layers = tower.encoder.layers
        # hidden_states[0] is the embedding output, hidden_states[k] the output of layer k - 1
        feature_layer = len(layers) + feature if feature < 0 else feature - 1
        side = self.patch_side()
        projector = self.base_model().multi_modal_projector
        return VisionTower(
            layers, feature_layer, 1, (side, side), projector, placeholder_id, keeps_prefix, modality
        )

    def patch_side(self) -> int:
        """Patches per side of one vision-tower input."""
        vision = self.model.config.vision_config
        return vision.image_size // vision.patch_size

    def _select_strategy(self, inputs: dict[str, Any]) -> str:
        return (
            inputs.get("vision_feature_select_strategy") or self.model.config.vision_feature_select_strategy
        )
