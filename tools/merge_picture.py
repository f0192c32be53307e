"""Draw docs/images/tome-groups.png: ToMe's merge groups on a synthetic image, with the tested helper.

    python tools/merge_picture.py

A timm ViT-B/16 with random weights (seeded: no download) merges with r=16 per block; the groups
of the last block are drawn over the input by `tokenprune.lab.visualize.draw_groups`. With random
weights the keys follow the patches' colours, not their meaning: flat regions merge first.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import timm
import torch

import tokenprune as tp
from tokenprune.lab.visualize import draw_groups, patch_groups

OUT = Path(__file__).resolve().parents[1] / "docs" / "images" / "tome-groups.png"


def synthetic_image(size: int = 224) -> np.ndarray:
    """A sky-and-grass scene with a sun and a red house: a few flat regions and some edges."""
    y, x = np.mgrid[0:size, 0:size]
    image = np.zeros((size, size, 3), dtype=np.uint8)
    image[:] = (120, 170, 230)
    image[y > 0.62 * size] = (70, 150, 60)
    image[(x - 0.78 * size) ** 2 + (y - 0.2 * size) ** 2 < (0.09 * size) ** 2] = (250, 220, 60)
    house = (x > 0.2 * size) & (x < 0.5 * size) & (y > 0.45 * size) & (y < 0.75 * size)
    image[house] = (190, 40, 40)
    return image


@torch.no_grad()
def main() -> None:
    torch.manual_seed(0)
    model = timm.create_model("vit_base_patch16_224", pretrained=False).eval()
    image = synthetic_image()
    pixels = (torch.from_numpy(image).permute(2, 0, 1)[None].float() / 255 - 0.5) / 0.5
    with tp.attach(model, tp.ReductionConfig(strategy="tome", params={"r": 16})) as handle:
        model(pixels)
        event = handle.trace[-1]
    groups = patch_groups(event.groups[0], torch.arange(1, 197))
    OUT.parent.mkdir(parents=True, exist_ok=True)
    draw_groups(image, groups, (14, 14), title="ToMe r=16:").savefig(OUT, dpi=100)
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
