"""Pictures of a reduction over its input image: which patches survive, which merge together.

Works from a trace event's source map (`ReductionEvent.groups`), so it draws any strategy on any
adapter: pruning shows the kept patches, merging shows ToMe's picture of each merge group painted
in the mean colour of its patches.
"""

from __future__ import annotations

import numpy as np
import torch
from matplotlib.figure import Figure
from matplotlib.patches import Patch
from torch import Tensor

BORDER = np.array([0.05, 0.05, 0.05])
REMOVED_DIMMING = 0.2


def patch_groups(groups: Tensor, positions: Tensor) -> Tensor:
    """[n] the group of each patch of one image: `groups` [N] of one sample (an event's row), at the
    image's sequence `positions` [n] (row-major). Group ids are original positions; -1: removed."""
    return groups[positions.to(groups.device)].cpu()


def group_image(image: np.ndarray, groups: Tensor, grid: tuple[int, int]) -> np.ndarray:
    """[H, W, 3] float image: each group of patches in its mean colour, borders between groups dark,
    removed patches dimmed. `image` [H, W, 3] (uint8 or floats in [0, 1]); `groups` [rows * cols]."""
    pixels = image.astype(np.float64) / (255.0 if image.dtype == np.uint8 else 1.0)
    height, width = pixels.shape[:2]
    rows, cols = grid
    patch_row = np.arange(height) * rows // height
    patch_col = np.arange(width) * cols // width
    labels = groups.numpy()[(patch_row[:, None] * cols + patch_col[None, :])]  # [H, W] group per pixel
    painted = _mean_colours(pixels, labels)
    painted[labels < 0] = pixels[labels < 0] * REMOVED_DIMMING
    painted[_borders(labels)] = BORDER
    return painted


def _mean_colours(pixels: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Each pixel replaced by the mean colour of the pixels sharing its label."""
    _, inverse = np.unique(labels, return_inverse=True)
    inverse = inverse.reshape(-1)
    flat = pixels.reshape(-1, 3)
    totals = np.zeros((inverse.max() + 1, 3))
    np.add.at(totals, inverse, flat)
    counts = np.bincount(inverse)[:, None]
    return (totals / counts)[inverse].reshape(pixels.shape)


def _borders(labels: np.ndarray) -> np.ndarray:
    """[H, W] bool: pixels whose right or lower neighbour belongs to another group."""
    edge = np.zeros(labels.shape, dtype=bool)
    edge[:, :-1] |= labels[:, :-1] != labels[:, 1:]
    edge[:-1, :] |= labels[:-1, :] != labels[1:, :]
    return edge


def draw_groups(image: np.ndarray, groups: Tensor, grid: tuple[int, int], title: str = "") -> Figure:
    """A matplotlib figure: the image beside its merge groups (or kept patches), with a legend."""
    figure = Figure(figsize=(6, 3.6), layout="constrained")
    left, right = figure.subplots(1, 2)
    left.imshow(image)
    left.set_title("input")
    right.imshow(group_image(image, groups, grid))
    kept = len(torch.unique(groups[groups >= 0]))
    right.set_title(f"{title} {kept}/{len(groups)} tokens".strip())
    for axis in (left, right):
        axis.axis("off")
    figure.legend(handles=group_legend(groups), loc="outside lower center", ncols=3, fontsize="x-small")
    return figure


def group_legend(groups: Tensor) -> list[Patch]:
    """Legend patches for what the picture holds: merge groups, patches kept alone, removed patches."""
    _, sizes = torch.unique(groups[groups >= 0], return_counts=True)
    shown = [
        (
            bool((sizes > 1).any()),
            Patch(facecolor="0.7", edgecolor=BORDER, label="merged: the group's mean colour"),
        ),
        (
            bool((sizes == 1).any()),
            Patch(facecolor="white", edgecolor="0.6", label="kept alone: its own colour"),
        ),
        (bool((groups < 0).any()), Patch(facecolor=str(REMOVED_DIMMING), label="removed: dimmed")),
    ]
    return [patch for present, patch in shown if present]
