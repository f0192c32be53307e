"""Where the visual tokens of one batch are: built by an adapter from the input ids, read by the core.

An adapter describes each image (or frame, or sub-grid) as a `Segment`: the sample it sits in,
the sequence positions of its tokens, the (t, row, col) cell of each token in its grid, and its
kind (`SEGMENT_KINDS`), so a strategy can treat a thumbnail or a base grid apart without knowing the model.
`VisualLayout.from_segments` turns a list of segments into batch tensors once per forward.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch
from torch import Tensor

from tokenprune.errors import InputError

# What a segment is, read by strategies as `TokenView.kind` (an index into this tuple):
# "grid" an image, frame volume or tile; "thumbnail" a whole image resized to one tile next to its tiles
# (InternVL); "base" the low-resolution view of an image shown before its high-resolution grid (LLaVA-NeXT).
SEGMENT_KINDS = ("grid", "thumbnail", "base")


@dataclass(frozen=True)
class Segment:
    """One image/frame/sub-grid: `positions` [n] in sample `sample`, `coords` [n, 3] in a (T, H, W) grid,
    `kind` one of `SEGMENT_KINDS`."""

    sample: int
    positions: Tensor
    coords: Tensor
    extent: tuple[int, int, int]
    kind: str = "grid"

    def __post_init__(self) -> None:
        if self.kind not in SEGMENT_KINDS:
            raise ValueError(f"segment kind {self.kind!r}: expected one of {', '.join(SEGMENT_KINDS)}")


@dataclass(frozen=True)
class VisualLayout:
    """Per-token tensors over the full input sequence [B, N]; see `TokenView` for their meaning."""

    visual: Tensor
    segment: Tensor
    coords: Tensor
    extent: Tensor
    frame: Tensor  # [B, N] index of the token's (segment, t) pair in its sample, -1 for non-visual
    kind: Tensor  # [B, N] index of the token's segment kind in `SEGMENT_KINDS`, -1 for non-visual
    frames: int = 0  # the largest number of (segment, t) frames in one sample

    @classmethod
    def from_segments(
        cls, batch: int, length: int, segments: list[Segment], device: torch.device
    ) -> VisualLayout:
        visual = torch.zeros(batch, length, dtype=torch.bool, device=device)
        segment = torch.full((batch, length), -1, dtype=torch.long, device=device)
        coords = torch.full((batch, length, 3), -1, dtype=torch.long, device=device)
        extent = torch.zeros(batch, length, 3, dtype=torch.long, device=device)
        frame = torch.full((batch, length), -1, dtype=torch.long, device=device)
        kind = torch.full((batch, length), -1, dtype=torch.long, device=device)
        per_sample, frames_per_sample = [0] * batch, [0] * batch
        for seg in segments:
            pos = seg.positions.to(device)
            visual[seg.sample, pos] = True
            segment[seg.sample, pos] = per_sample[seg.sample]
            coords[seg.sample, pos] = seg.coords.to(device)
            extent[seg.sample, pos] = torch.tensor(seg.extent, device=device)
            times, frame_of = seg.coords[:, 0].unique(return_inverse=True)
            frame[seg.sample, pos] = frames_per_sample[seg.sample] + frame_of.to(device)
            kind[seg.sample, pos] = SEGMENT_KINDS.index(seg.kind)
            per_sample[seg.sample] += 1
            frames_per_sample[seg.sample] += len(times)
        return cls(visual, segment, coords, extent, frame, kind, max(frames_per_sample, default=0))


def grid_coords(height: int, width: int, frame: int = 0) -> Tensor:
    """[H*W, 3] (t, row, col) of a row-major grid."""
    rows, cols = torch.meshgrid(torch.arange(height), torch.arange(width), indexing="ij")
    return torch.stack([torch.full_like(rows, frame), rows, cols], dim=-1).reshape(-1, 3)


def line_coords(n: int) -> tuple[Tensor, tuple[int, int, int]]:
    """Coordinates of n tokens with no known grid: one row of n cells."""
    return grid_coords(1, n), (1, 1, n)


def placeholder_runs(mask: Tensor, counts: list[int]) -> list[tuple[int, Tensor]]:
    """Split the placeholder positions of `mask` [B, N], in row-major order, into items of `counts` tokens.

    Images fill placeholders in this order (the models' `masked_scatter`), so the i-th item of
    `counts` is the i-th image of the batch. Returns (sample, positions) per item; an item may not
    straddle two samples. Raises InputError when the counts and the placeholders disagree.
    """
    found = int(mask.sum().item())
    if found != sum(counts):
        raise InputError(
            f"the input ids hold {found} image placeholder tokens but the images need {sum(counts)} "
            f"({len(counts)} image(s) of {counts} tokens)"
        )
    samples, positions = mask.nonzero(as_tuple=True)
    items, start = [], 0
    for n in counts:
        sample = samples[start : start + n]
        if n and bool((sample != sample[0]).any()):
            raise InputError(f"image {len(items)} has placeholder tokens in two samples of the batch")
        items.append((int(sample[0]) if n else 0, positions[start : start + n]))
        start += n
    return items


def run_lengths(mask: Tensor) -> list[int]:
    """Lengths of the maximal runs of consecutive True entries of `mask` [B, N], row-major.

    Models that delimit each image or frame (`<img>` ... `</img>`) write one run per item: an adapter
    reads item sizes from them when the inputs do not give them.
    """
    samples, positions = mask.nonzero(as_tuple=True)
    if len(positions) == 0:
        return []
    breaks = (samples[1:] != samples[:-1]) | (positions[1:] != positions[:-1] + 1)
    ends = (breaks.nonzero().squeeze(1) + 1).tolist()
    return [end - start for start, end in itertools.pairwise([0, *ends, len(positions)])]
