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


@torch.no_grad()
def test_draw_groups_of_a_real_tome_trace(tmp_path):
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=64, patch_size=8, depth=2)
    model.eval()
    image = np.zeros((64, 64, 3), dtype=np.uint8)
    image[8:40, 8:40] = (220, 30, 30)
    pixels = torch.from_numpy(image).permute(2, 0, 1)[None].float() / 255
    with tp.attach(model, tp.ReductionConfig(strategy="tome", params={"r": 16})) as handle:
        model(pixels)
        event = handle.trace[-1]
    groups = patch_groups(event.groups[0], torch.arange(1, 65))
    assert len(groups.unique()) == event.tokens_after[0] - 1  # every surviving patch token is one group
    figure = draw_groups(image, groups, (8, 8), title="tome r=16")
    figure.savefig(tmp_path / "groups.png")
    assert (tmp_path / "groups.png").stat().st_size > 1000
