"""InternVL (`InternVLForConditionalGeneration`; InternVL 2.5 and 3): 448-px tiles plus a thumbnail.

The processor writes each image as `<img>`, then `image_seq_length` context placeholders
(`image_token_id`) per tile, then `</img>`: so every contiguous run of placeholders is one image, and
its length gives its tile count. Each tile reaches the language model pixel-shuffled: its side x side
patches (class token dropped) become (side / 2) x (side / 2) tokens (16 x 16 for 448 px, patch 14),
row-major. Every tile is a grid segment of its own, extent (1, side / 2, side / 2); with several tiles
the last is the thumbnail (the whole image resized to one tile, the processor's `use_thumbnail`), a
segment of its own, after the tiles, of kind "thumbnail" (`TokenView.of_kind`). Video frames are
written as single-tile images, one run each.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor

from tokenprune.contracts.adapter import VisionTower
from tokenprune.contracts.layout import Segment, grid_coords, run_lengths
from tokenprune.errors import InputError

from .llava import LlavaAdapter


class InternVLAdapter(LlavaAdapter):
    """Adapter for InternVL: each tile a grid segment, the thumbnail of a tiled image the last one."""

    name = "internvl"
    model_types = ("internvl",)
    no_vision_tower = (
        "its pixel shuffle folds each 2 x 2 block of the tower's patches into one placeholder, so a "
        "placeholder holds four tower tokens, while a vision site needs exactly one per placeholder"
    )

    def vision_towers(self) -> tuple[VisionTower, ...]:
        """No tower: see `no_vision_tower`."""
        return ()

    def tokens_per_image(self, inputs: dict[str, Any], placeholders: Tensor) -> list[int]:
        """Each contiguous run of placeholders is one image (`<img>` and `</img>` delimit it): whole tiles."""
        runs = run_lengths(placeholders)
        per_tile = self.tokens_per_tile()
        tiles = sum(n // per_tile for n in runs)
        expected = self._tile_count(inputs)
        if any(n % per_tile for n in runs) or tiles != expected:
            raise InputError(
                f"image placeholder runs of {runs} tokens are not whole tiles of {per_tile} tokens for the "
                f"{expected} tiles given"
            )
        return runs

    def image_segments(
        self, inputs: dict[str, Any], image: int, sample: int, positions: Tensor
    ) -> list[Segment]:
        """One segment per tile, in the processor's order: the tiles row by row, then the thumbnail
        (kind "thumbnail") when there are several."""
        side = self.token_side()
        tiles = positions.split(side * side)
        return [
            Segment(sample, tile, grid_coords(side, side), (1, side, side), _tile_kind(i, len(tiles)))
            for i, tile in enumerate(tiles)
        ]

    def tokens_per_tile(self) -> int:
        """Placeholders of one tile: its patch grid after the pixel shuffle."""
        return self.token_side() ** 2

    def token_side(self) -> int:
        """Tokens per side of one tile after the pixel shuffle (16 for 448 px tiles of 14 px patches)."""
        return round(self.patch_side() * self.model.config.downsample_ratio)

    def patch_side(self) -> int:
        vision = self.model.config.vision_config
        return _first(vision.image_size) // _first(vision.patch_size)

    def _tile_count(self, inputs: dict[str, Any]) -> int:
        """Tiles of the batch: rows of `pixel_values`, or of the features `generate` encoded."""
        pixels = inputs.get("pixel_values")
        if pixels is not None:
            return pixels.shape[0]
        return inputs["mm_encoder_outputs"]["image"].pooler_output.shape[0]


def _first(size: int | list[int] | tuple[int, ...]) -> int:
    """The height of a size given as one int or as (height, width)."""
    return size if isinstance(size, int) else size[0]


def _tile_kind(tile: int, tiles: int) -> str:
    """The last of several tiles is the thumbnail (the whole image in one tile); a lone tile is the image."""
    return "thumbnail" if tiles > 1 and tile == tiles - 1 else "grid"
