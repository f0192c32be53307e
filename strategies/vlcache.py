"""VL-Cache: after prefill, keep the visual KV entries the prompt's post-vision tokens attend to most.

Tu et al., "VL-Cache: Sparsity and Modality-Aware KV Cache Compression for Vision-Language Model
Inference Acceleration", arXiv:2410.23317 (https://arxiv.org/abs/2410.23317). Its modality-aware
scoring ranks each cached entry by the attention the language tokens after the image (the
"post-vision" window) pay to it, summed over those queries and the heads, and prunes the cache once,
right after prefill. Here it is a `site: cache` stage (`every: null`, `restore: false`) whose
`window` is the post-vision part of the prompt; its ranking is the stage's attention signal (the mean
over heads and window, the same order as the sum). Text entries are never candidates: the budget
(`ratio` or `keep`) counts the visual entries. The paper's sparsity-aware layer-wise budgets are not
expressed (every layer from K on keeps the same entries): see docs/strategies.md.
"""

from __future__ import annotations

from typing import ClassVar

from torch import Tensor

from tokenprune.contracts.reducer import ScoreReducer, Site, TokenView


class VLCache(ScoreReducer):
    """The visual cache entries most attended by the post-vision window, pruned once after prefill."""

    requires: ClassVar[frozenset[str]] = frozenset({"attention"})
    sites: ClassVar[frozenset[Site]] = frozenset({"cache"})

    def score(self, view: TokenView) -> Tensor:
        return view.signals.attention()
