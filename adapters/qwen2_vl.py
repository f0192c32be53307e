"""Qwen2-VL and Qwen2.5-VL (`Qwen2VLForConditionalGeneration`, `Qwen2_5_VLForConditionalGeneration`).

Candidates: every image placeholder (`config.image_token_id`, `<|image_pad|>`) and every video
placeholder (`config.video_token_id`, `<|video_pad|>`); `<|vision_start|>` and `<|vision_end|>` are
text and always kept. An image is one segment whose grid is its merged patch grid
`(1, h / m, w / m)` (`image_grid_thw` after the vision tower's `m x m` patch merger). A video is one
segment with the grid `(t, h / m, w / m)`, `t` temporal patches of `temporal_patch_size` frames,
coordinates `(t, row, col)`: `uniform` strides over time and space, and `budget: per_frame` gives
each time step its own budget.

Positions: the model computes 3-D M-RoPE positions (temporal, height, width) for the whole prompt
before its language model and folds them into the `(cos, sin)` tables every decoder layer gets. Under
the `original` policy the core gathers those tables by original position, so kept tokens keep their
3-D positions and nothing is recomputed; under `renumbered` it renumbers the kept tokens (each kept
visual token keeps its (t, h, w) offset in its item's grid: docs/positions.md) and recomputes the
tables through the language model's own `rotary_emb`. Decode positions are the model's own (`generate`
passes them; otherwise the model adds its `rope_deltas` to the cache length), except after a layer-0
site, where `continued_position_ids` counts from the original prompt length as the unreduced model
does (less the renumbering's shift under `renumbered`).

Grids come from `image_grid_thw` / `video_grid_thw` when given. `generate` encodes the images itself
and calls the model with the grids dropped, the features in `mm_encoder_outputs` and the 3-D position
ids it computed with the grids: the grid of each item is then read from those position ids.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from tokenprune.contracts.adapter import ConditionalGenerationAdapter
from tokenprune.contracts.layout import Segment, VisualLayout, grid_coords, placeholder_runs
from tokenprune.errors import InputError


@dataclass(frozen=True)
class Modality:
    """Where one kind of visual input lives in the model's inputs and configuration."""

    name: str  # the key in `mm_encoder_outputs`
    pixels: str
    grids: str
    token_id: str  # the config attribute naming its placeholder id
    token_type: int  # its value in `mm_token_type_ids`


IMAGE = Modality("image", "pixel_values", "image_grid_thw", "image_token_id", 1)
VIDEO = Modality("video", "pixel_values_videos", "video_grid_thw", "video_token_id", 2)

Shape = tuple[int, int, int]


class Qwen2VLAdapter(ConditionalGenerationAdapter):
    """Adapter for Qwen2-VL and Qwen2.5-VL: images and videos, 3-D M-RoPE positions kept."""

    name = "qwen2_vl"
    no_vision_tower = (
        "Qwen2-VL's vision encoder has no class token (the query of class-attention rankings) and "
        "merges each 2 x 2 group of patches before the language model"
    )
    model_types = ("qwen2_vl", "qwen2_5_vl")

    def visual_layout(self, inputs: dict[str, Any]) -> VisualLayout | None:
        present = [m for m in (IMAGE, VIDEO) if _has_features(inputs, m)]
        if not present:
            return None  # text only, or a decode step (`generate` drops the visual inputs after prefill)
        input_ids = self.input_ids(inputs)
        self._check_token_types(inputs, input_ids)
        segments = [s for m in present for s in self._modality_segments(inputs, input_ids, m)]
        segments.sort(key=lambda s: (s.sample, int(s.positions[0])))  # numbered in prompt order
        return VisualLayout.from_segments(*input_ids.shape, segments, input_ids.device)

    def continued_position_ids(self, positions: Tensor, inputs: dict[str, Any]) -> Tensor:
        """[3, B, q] M-RoPE ids: sequence positions plus the model's `rope_deltas`, as Qwen counts them."""
        reference = inputs.get("input_ids")
        batch = (reference if reference is not None else inputs["inputs_embeds"]).shape[0]
        positions = positions.expand(batch, -1)
        deltas = self.base_model().rope_deltas
        if deltas is not None:
            positions = positions + deltas.repeat_interleave(batch // deltas.shape[0], dim=0).to(positions)
        return positions[None].expand(3, -1, -1)

    @staticmethod
    def item_segment(sample: int, positions: Tensor, shape: Shape) -> Segment:
        """The segment of one image or video whose placeholders sit at `positions` of `sample`."""
        frames, height, width = shape
        coords = torch.cat([grid_coords(height, width, frame=t) for t in range(frames)])
        return Segment(sample, positions, coords, shape)

    # -- reading the inputs ---------------------------------------------------------------------

    def _modality_segments(
        self, inputs: dict[str, Any], input_ids: Tensor, modality: Modality
    ) -> Iterator[Segment]:
        placeholders = input_ids == getattr(self.model.config, modality.token_id)
        shapes = self._grid_shapes(inputs, modality)
        counts = _encoded_counts(inputs, modality) if shapes is None else [t * h * w for t, h, w in shapes]
        try:
            runs = placeholder_runs(placeholders, counts)
        except InputError as error:
            raise InputError(f"{modality.name}s: {error}") from None
        for item, (sample, positions) in enumerate(runs):
            shape = shapes[item] if shapes is not None else _shape_from_positions(inputs, sample, positions)
            yield self.item_segment(sample, positions, shape)

    def _grid_shapes(self, inputs: dict[str, Any], modality: Modality) -> list[Shape] | None:
        """(t, h, w) after the patch merger of each item, from the grids; None when not given."""
        grids = inputs.get(modality.grids)
        pixels = inputs.get(modality.pixels)
        if grids is None:
            if pixels is not None:
                raise InputError(f"`{modality.pixels}` need `{modality.grids}` (the processor returns both)")
            return None
        if pixels is not None and pixels.shape[0] != int(grids.prod(-1).sum()):
            raise InputError(
                f"`{modality.pixels}` has {pixels.shape[0]} patch rows but `{modality.grids}` "
                f"{grids.tolist()} describes {int(grids.prod(-1).sum())}"
            )
        merge = self.model.config.vision_config.spatial_merge_size
        return [(t, h // merge, w // merge) for t, h, w in grids.tolist()]

    def _check_token_types(self, inputs: dict[str, Any], input_ids: Tensor) -> None:
        """The 3-D positions follow `mm_token_type_ids`: with `input_ids` it must be given, and it must mark
        the placeholders (from `inputs_embeds` alone the model computes no positions from it)."""
        types = inputs.get("mm_token_type_ids")
        if types is None and inputs.get("input_ids") is None:
            return
        if types is None:
            raise InputError(
                "Qwen2-VL inputs with images or videos need `mm_token_type_ids` (the processor returns it): "
                "the model computes its 3-D M-RoPE positions from it"
            )
        config = self.model.config
        expected = (input_ids == config.image_token_id).long() * IMAGE.token_type
        expected += (input_ids == config.video_token_id).long() * VIDEO.token_type
        real = inputs.get("attention_mask")
        differs = types.to(expected) != expected
        if real is not None:
            differs &= real.bool()
        if bool(differs.any()):
            raise InputError(
                f"`mm_token_type_ids` must be {IMAGE.token_type} exactly at image placeholders "
                f"({config.image_token_id}), {VIDEO.token_type} at video placeholders "
                f"({config.video_token_id}) and 0 elsewhere"
            )


def _has_features(inputs: dict[str, Any], modality: Modality) -> bool:
    """Whether this forward carries this modality (pixels, or features pre-encoded by `generate`)."""
    encoded = inputs.get("mm_encoder_outputs") or {}
    return inputs.get(modality.pixels) is not None or encoded.get(modality.name) is not None


def _encoded_counts(inputs: dict[str, Any], modality: Modality) -> list[int]:
    """Placeholder count of each pre-encoded item, in order."""
    return [len(features) for features in inputs["mm_encoder_outputs"][modality.name].pooler_output]


def _shape_from_positions(inputs: dict[str, Any], sample: int, positions: Tensor) -> Shape:
    """An item's merged (t, h, w) from the model's 3-D position ids (height and width rows span the grid of
    the tokens at the item's first temporal position: Qwen3-VL numbers each frame as a grid of its own).

    Without 3-D position ids the grid is unknown and the item is described as one row of tokens.
    """
    position_ids = inputs.get("position_ids")
    n = len(positions)
    if position_ids is None or position_ids.ndim != 3:
        return (1, 1, n)
    ids = position_ids[-3:, min(sample, position_ids.shape[1] - 1), positions.to(position_ids.device)]
    rows = ids[1:, ids[0] == ids[0, 0]]
    height, width = (rows.amax(dim=1) - rows.amin(dim=1) + 1).tolist()
    if n % (height * width):
        raise InputError(f"position ids of a {n}-token item describe a {height} x {width} grid")
    return (n // (height * width), height, width)
