"""Input helpers of the built-in families: each item draws its own seeded pixels, alone or in a batch."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from tokenprune.testing.family import Sample


def seeded_pixels(shape: tuple[int, ...], seed: int) -> Tensor:
    """Standard-normal pixels of one item drawn from its own seed."""
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def item_seeds(samples: Sequence[Sample], seed: int) -> list[int]:
    """The seed of each item in batch order: item k of sample i draws from 1000 * (seed + i) + k."""
    return [1000 * (seed + i) + k for i, sample in enumerate(samples) for k in range(sample.items)]
