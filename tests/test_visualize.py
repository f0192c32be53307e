"""The merge-group picture: groups painted in their mean colour, borders, removed patches dimmed."""

from __future__ import annotations

import numpy as np
import timm
import torch

import tokenprune as tp
from tokenprune.lab.visualize import BORDER, draw_groups, group_image, patch_groups


def test_group_image_paints_each_group_in_its_mean_colour():
    image = np.random.default_rng(0).random((8, 8, 3))
    groups = torch.tensor([0, 0, 2, -1])  # 2 x 2 patches of 4 x 4 pixels: a pair, a single, a removed one
    painted = group_image(image, groups, (2, 2))
    first_group = np.concatenate([image[:4, :4], image[:4, 4:]], axis=1).reshape(-1, 3).mean(0)
    assert np.allclose(painted[1, 1], first_group) and np.allclose(painted[1, 5], first_group)
    assert np.allclose(painted[5, 1], image[4:, :4].reshape(-1, 3).mean(0))
    assert np.allclose(painted[6, 6], image[6, 6] * 0.2)
    assert np.allclose(painted[1, 3], first_group)  # no border inside a group
    assert np.allclose(painted[3, 1], BORDER)  # a border between two groups


def patch_colours(grid: int, patch: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """An image of grid x grid patches, each one uniform random colour: (colours [grid**2, 3], image)."""
    colours = np.random.default_rng(seed).random((grid * grid, 3))
    image = colours.reshape(grid, grid, 1, 1, 3).repeat(patch, 2).repeat(patch, 3)
    return colours, image.transpose(0, 2, 1, 3, 4).reshape(grid * patch, grid * patch, 3)


@torch.no_grad()
def test_picture_of_a_real_tome_trace_changes_exactly_the_merged_patches():
    """On an image of uniformly coloured patches, the picture keeps a patch's colour exactly when it
    merged with no other patch, paints merged ones in their group's mean, and draws borders only
    between groups; the trace's sizes count each group's patches."""
    grid, patch = 8, 8
    torch.manual_seed(0)
    model = timm.create_model(
        "vit_tiny_patch16_224", pretrained=False, img_size=grid * patch, patch_size=patch, depth=2
    ).eval()
    colours, image = patch_colours(grid, patch, seed=1)
    pixels = torch.from_numpy(image).permute(2, 0, 1)[None].float()
    with tp.attach(model, tp.ReductionConfig(strategy="tome", params={"r": 16})) as handle:
        model(pixels)
        event = handle.trace[-1]
    groups = patch_groups(event.groups[0], torch.arange(1, grid * grid + 1))  # after the class token
    members = {int(g): (groups == g).nonzero().squeeze(1).tolist() for g in groups.unique()}
    kept = event.kept[0].tolist()
    assert {g: len(m) for g, m in members.items()} == {g: int(event.sizes[0, kept.index(g)]) for g in members}
    assert max(len(m) for m in members.values()) > 1  # something merged
    painted = group_image(image, groups, (grid, grid))
    for p, group in enumerate(groups.tolist()):
        row, col = divmod(p, grid)
        interior = painted[row * patch : (row + 1) * patch - 1, col * patch : (col + 1) * patch - 1]
        assert np.allclose(interior, colours[members[group]].mean(0))
        assert np.allclose(interior, colours[p]) == (len(members[group]) == 1)
        if col + 1 < grid:  # the patch's right edge is a border exactly between two groups
            on_edge = painted[row * patch, (col + 1) * patch - 1]
            assert np.allclose(on_edge, BORDER) == (group != int(groups[p + 1]))
    figure = draw_groups(image, groups, (grid, grid), title="tome r=16")
    shown = figure.axes[1]
    assert np.array_equal(shown.images[0].get_array(), painted)
    assert shown.get_title() == f"tome r=16 {len(members)}/{grid * grid} tokens"
