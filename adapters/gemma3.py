"""Gemma 3 (`Gemma3ForConditionalGeneration`): sliding-window and global layers, images attended both ways.

Candidates: every image placeholder (`config.image_token_id`, `<image_soft_token>`); the
`<start_of_image>` / `<end_of_image>` tokens around each image are text and always kept. An image
(a pan-and-scan crop is an image of its own) is one segment of `mm_tokens_per_image` tokens, the
`s x s` grid of the projector's average pooling (`s = sqrt(mm_tokens_per_image)`, 16 x 16 = 256).

Masks: the model lets the tokens of each image attend to each other both ways (when the inputs carry
`token_type_ids`, as the processor returns them) and interleaves sliding-window layers with global
ones (`config.text_config.layer_types`). The core keeps both rules on shortened layers, in original
positions: `bidirectional_blocks` groups the visual tokens exactly as the model's own
`get_block_sequence_ids_for_mask` does, and the window counts original positions.

Positions and rotary tables are the model's own, gathered by original position for each kind of
layer (a local and a global RoPE base). The scaled embeddings (`sqrt(hidden_size)`) are the model's:
placeholders are found in `input_ids`, or in `inputs_embeds` as the model finds them.
"""

from __future__ import annotations

import math
from typing import Any

from torch import Tensor
from transformers.models.gemma3.modeling_gemma3 import get_block_sequence_ids_for_mask

from tokenprune.contracts.adapter import ConditionalGenerationAdapter
from tokenprune.contracts.layout import Segment, VisualLayout, grid_coords, placeholder_runs
from tokenprune.errors import InputError

IMAGE_TOKEN_TYPE = 1  # the value of `token_type_ids` at image placeholders


class Gemma3Adapter(ConditionalGenerationAdapter):
    """Adapter for Gemma 3: images as 2-D grid segments, sliding windows and image blocks kept."""

    name = "gemma3"
    model_types = ("gemma3",)
    no_vision_tower = (
        "Gemma 3's SigLIP tower has no class token (the query of class-attention rankings), and its "
        "projector average-pools each k x k group of patches into one token, so a patch removed in the "
        "tower has no placeholder of its own: the pooled token would average fewer patches than the model's"
    )

    def visual_layout(self, inputs: dict[str, Any]) -> VisualLayout | None:
        n_images = _image_count(inputs)
        if n_images == 0:
            return None  # text only, or a decode step (`generate` drops the images after prefill)
        input_ids = self.input_ids(inputs)
        self._check_token_types(inputs, input_ids)
        side = math.isqrt(self.model.config.mm_tokens_per_image)
        placeholders = input_ids == self.model.config.image_token_id
        try:
            runs = placeholder_runs(placeholders, [side * side] * n_images)
        except InputError as error:
            raise InputError(f"Gemma 3 images of {side * side} tokens each: {error}") from None
        coords = grid_coords(side, side)
        segments = [Segment(sample, positions, coords, (1, side, side)) for sample, positions in runs]
        return VisualLayout.from_segments(*input_ids.shape, segments, input_ids.device)

    def bidirectional_blocks(self, visual: Tensor) -> Tensor | None:
        """Each run of image tokens is one block, as the model's own `get_block_sequence_ids_for_mask`."""
        return get_block_sequence_ids_for_mask(visual.long() * IMAGE_TOKEN_TYPE, device=visual.device)

    def _check_token_types(self, inputs: dict[str, Any], input_ids: Tensor) -> None:
        """The model attends both ways within an image only with `token_type_ids`, 1 exactly at image
        placeholders: tokenprune needs them so, to keep the same blocks."""
        if getattr(self.text_config(), "use_bidirectional_attention", False):
            raise InputError(
                "this Gemma 3 attends both ways everywhere (use_bidirectional_attention): an encoder, "
                "whose shortened layers tokenprune does not mask"
            )
        types = inputs.get("token_type_ids")
        if types is None:
            raise InputError(
                "Gemma 3 inputs with images need `token_type_ids` (the processor returns them): the model "
                "lets each image's tokens attend to each other both ways only with them"
            )
        expected = (input_ids == self.model.config.image_token_id).long() * IMAGE_TOKEN_TYPE
        differs = types.to(expected) != expected
        real = inputs.get("attention_mask")
        if real is not None:
            differs &= real.bool()
        if bool(differs.any()):
            raise InputError(
                f"`token_type_ids` must be {IMAGE_TOKEN_TYPE} exactly at image placeholders "
                f"({self.model.config.image_token_id}) and 0 elsewhere"
            )


def _image_count(inputs: dict[str, Any]) -> int:
    """Images this forward carries: pixel values, or features `generate` encoded beforehand."""
    pixels = inputs.get("pixel_values")
    if pixels is not None:
        return pixels.shape[0]
    encoded = (inputs.get("mm_encoder_outputs") or {}).get("image")
    return 0 if encoded is None else len(encoded.pooler_output)
