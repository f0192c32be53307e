"""An adapter for LLaVA-1.5 style models, written from scratch against the `tokenprune.Adapter` contract.

It handles the same models as the built-in `llava` adapter and exists to show a complete
third-party adapter. `model_types` is empty, so tokenprune never picks it by itself: ask for it
with `tokenprune.attach(model, config, adapter="example_llava")`.

Layout: every image is a run of `config.image_token_id` placeholders, one per vision patch, in a
square grid of side `image_size // patch_size` (with `vision_feature_select_strategy="full"` the
class token leads the run, and the image is described as one row of tokens).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch import nn
from transformers import PretrainedConfig

from tokenprune import Adapter, Segment, VisualLayout
from tokenprune.contracts.layout import grid_coords, line_coords, placeholder_runs


class ExampleLlavaAdapter(Adapter):
    """LLaVA-1.5 (`LlavaForConditionalGeneration` or `LlavaModel`): one fixed grid per image."""

    name = "example_llava"
    model_types = ()  # chosen only by name: never competes with the built-in `llava` adapter

    def _base(self) -> nn.Module:
        """The `LlavaModel`, inside a `...ForConditionalGeneration` or the model itself."""
        return getattr(self.model, "model", self.model)

    def entry_module(self) -> nn.Module:
        return self._base()

    def decoder_layers(self) -> Sequence[nn.Module]:
        return self._base().language_model.layers

    def text_config(self) -> PretrainedConfig:
        return self._base().language_model.config

    def visual_layout(self, inputs: dict[str, Any]) -> VisualLayout | None:
        input_ids = inputs.get("input_ids")
        if input_ids is None:  # inputs_embeds only: nothing says where the images are
            return None
        config = self.model.config
        placeholders = input_ids == config.image_token_id
        if not bool(placeholders.any()):  # text-only call, or a decode step
            return None
        side = config.vision_config.image_size // config.vision_config.patch_size
        select = inputs.get("vision_feature_select_strategy") or config.vision_feature_select_strategy
        full = select == "full"  # the class token leads each image's run
        per_image = side * side + int(full)
        pixels = inputs.get("pixel_values")
        n_images = pixels.shape[0] if pixels is not None else int(placeholders.sum()) // per_image
        if full:
            coords, extent = line_coords(per_image)
        else:
            coords, extent = grid_coords(side, side), (1, side, side)
        segments = [
            Segment(sample, positions, coords, extent)
            for sample, positions in placeholder_runs(placeholders, [per_image] * n_images)
        ]
        return VisualLayout.from_segments(*input_ids.shape, segments, input_ids.device)
