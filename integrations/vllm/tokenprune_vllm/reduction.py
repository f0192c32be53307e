"""Glue between a tokenprune `ReductionConfig` and vLLM: checks at engine start, per-item selection.

vLLM fixes each image's or video's placeholder count in its front-end, before scheduling, so only
reductions that act before the language model, with a budget computable from the item's grid, can run
there. `load_reduction` reads the config named by the environment variable `TOKENPRUNE_VLLM_CONFIG` (a
YAML or JSON file, as `tokenprune run` takes) and refuses, with the reason, anything vLLM cannot carry.
`ImageReduction.select` picks one item's kept features with the registered strategy's own `select`, on a
`TokenView` of that item alone (an image, or a video with its frames): the same code `tp.attach` runs at
layer 0.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
from collections.abc import Callable
from dataclasses import dataclass

import torch
from tokenprune.adapters.qwen2_vl import Qwen2VLAdapter
from torch import Tensor

from tokenprune.config import ReductionConfig, Stage, load_config
from tokenprune.contracts.layout import Segment, VisualLayout, line_coords
from tokenprune.contracts.reducer import PositionPolicy, Reducer, TokenView
from tokenprune.core.grid import GridTokens, retained_layers
from tokenprune.core.merging import merge_tokens
from tokenprune.core.selection import check_strategy_site, checked_select
from tokenprune.core.vision_site import VISION_SIGNALS
from tokenprune.errors import ConfigError, StrategyError
from tokenprune.registry import strategy_class

CONFIG_ENV = "TOKENPRUNE_VLLM_CONFIG"

# One item's merged tokens: an image's (H, W) grid, or (T, H, W) with T frames (a video's temporal patches).
Grid = tuple[int, int] | tuple[int, int, int]
# An item's layer-0 budget: one count over its tokens, or one per frame (`budget: per_frame`).
Budget = int | tuple[int, ...]


@dataclass(frozen=True)
class ImageReduction:
    """One checked pre-LLM reduction: how many tokens each image (or video) keeps, and which."""

    config: ReductionConfig
    reducer: Reducer

    @property
    def stage(self) -> Stage:
        return self.config.stages[0]

    @property
    def in_vision_tower(self) -> bool:
        """Whether the stage reduces a vision-tower layer's output (`site: vision`), not layer 0's input."""
        return self.stage.site == "vision"

    @property
    def positions(self) -> PositionPolicy:
        """The stage's position policy (`original` or `renumbered`), as `tp.attach` resolves it."""
        return self.config.position_policy(self.stage)

    def kept_count(self, n_tokens: int, prefix: int = 0) -> int:
        """Placeholder tokens an image of `n_tokens` features keeps (the processor's count); `prefix` of them
        lead the patches (a class token), never reduced in a vision tower, a candidate like any at layer 0."""
        if self.in_vision_tower:
            return self.stage.kept_count(n_tokens - prefix) + prefix
        return self.stage.kept_count(n_tokens)

    def item_budget(self, n_tokens: int, grid: Grid) -> Budget:
        """The layer-0 budget of an item of `n_tokens` on `grid`, as `tp.attach` counts a sample holding
        it alone: `Stage.kept_count` of its tokens, or with `budget: per_frame` of each frame's."""
        frames = item_segment(n_tokens, grid).extent[0]
        if self.config.budget == "per_frame":
            return (self.stage.kept_count(n_tokens // frames),) * frames
        return self.stage.kept_count(n_tokens)

    def item_kept_count(self, n_tokens: int, grid: Grid) -> int:
        """Placeholders an item of `n_tokens` on `grid` keeps at layer 0: a function of its grid and the
        config only (strategies keep their budget exactly), so the processor can count them."""
        budget = self.item_budget(n_tokens, grid)
        return budget if isinstance(budget, int) else sum(budget)

    def retained(self) -> dict[int, int]:
        """Earlier vision layers whose attention the stage also reads ({layer: stage layer}, HiPrune's)."""
        return retained_layers(self.reducer, [self.stage.layer]) if self.in_vision_tower else {}

    def grid_tokens(self, grid: tuple[int, int]) -> GridTokens:
        """Fresh state of one vision-tower run over [class token, (H, W) patches]: what `tp.attach`'s vision
        site reduces with; survivors in their original order, as they reach the projector there."""
        return GridTokens(self.reducer, 1, grid, True, "spatial", site="vision", retain=self.retained())

    def select(self, features: Tensor, grid: Grid) -> Tensor:
        """[k, D] kept (or merged) features of one item's [N, D] features on its grid (N = H W, or T H W;
        H W + 1 with a class token), in their original order, as layer 0 gets them under `tp.attach`."""
        return self.select_kept(features, grid)[0]

    def select_kept(self, features: Tensor, grid: Grid) -> tuple[Tensor, Tensor]:
        """`select`'s [k, D] features and the [k] indices of the kept tokens (their cells, for M-RoPE)."""
        view = item_view(features, grid, self.item_budget(features.shape[0], grid))
        keep, merge = checked_select(self.reducer, view)
        hidden = features[None]
        if merge is not None:
            hidden = merge_tokens(hidden, view.token_sizes(), merge)[0]
        return hidden[0][keep[0]], keep[0].nonzero()[:, 0]


def item_segment(n_tokens: int, grid: Grid) -> Segment:
    """The segment of one item of `n_tokens` at positions 0..N-1: its (t, row, col) cells on its (T, H, W)
    grid as the Qwen2-VL adapter places an image's or a video's (an image: T = 1), or one row of cells when
    a class token leads the patches (LLaVA's "full" features, as the LLaVA adapter has them)."""
    shape = (1, *grid) if len(grid) == 2 else grid
    if math.prod(shape) == n_tokens:
        return Qwen2VLAdapter.item_segment(0, torch.arange(n_tokens), shape)
    return Segment(0, torch.arange(n_tokens), *line_coords(n_tokens))


def item_view(
    features: Tensor, grid: Grid, budget: Budget, text: tuple[Tensor, Tensor] | None = None
) -> TokenView:
    """The `TokenView` of one item's features [N, D] at the language model's layer 0, every item token a
    candidate, its frames numbered as the core's `VisualLayout` numbers them; a tuple `budget` is one
    count per frame (`budget: per_frame`); `text` ([T1, D], [T2, D]) puts prompt tokens before and after
    it (the text probe's views)."""
    before, after = text if text is not None else (features[:0], features[:0])
    hidden = torch.cat([before, features, after])
    segment = item_segment(features.shape[0], grid)
    segment = dataclasses.replace(segment, positions=segment.positions + before.shape[0])
    device = features.device
    layout = VisualLayout.from_segments(1, hidden.shape[0], [segment], device)
    per_frame = not isinstance(budget, int)
    return TokenView(
        hidden=hidden[None],
        candidates=layout.visual,
        valid=torch.ones_like(layout.visual),
        segment=layout.segment,
        coords=layout.coords,
        extent=layout.extent,
        positions=torch.arange(hidden.shape[0], device=device)[None],
        budget=torch.tensor([sum(budget) if per_frame else budget], device=device),
        layer=0,
        frame=layout.frame,
        frame_budget=torch.tensor([budget], device=device) if per_frame else None,
        kind=layout.kind,
        frame_size=features.shape[0] // max(layout.frames, 1),  # an item's frames are equal
        max_budget=sum(budget) if per_frame else budget,
    )


def reads_text(reducer: Reducer, grid: tuple[int, int] = (4, 4), width: int = 16) -> bool:
    """Whether the reducer's choice among an image's tokens depends on the prompt around the image.

    vLLM encodes an image without its prompt, so only reductions that pick the same tokens whatever the
    text can run there. Probed on seeded features: the image alone, then between two different texts.
    """
    generator = torch.Generator().manual_seed(0)
    features = torch.randn(grid[0] * grid[1], width, generator=generator)
    texts = [
        None,
        *(
            (torch.randn(3, width, generator=generator), torch.randn(4, width, generator=generator))
            for _ in range(2)
        ),
    ]
    choices = [
        _image_choice(reducer, item_view(features, grid, features.shape[0] // 2, text)) for text in texts
    ]
    return any(not torch.equal(choice, choices[0]) for choice in choices[1:])


def _image_choice(reducer: Reducer, view: TokenView) -> Tensor:
    """[N] per image token: -2 removed, -1 kept, else the image token it merges into."""
    keep, merge = checked_select(reducer, view)
    image = view.candidates[0]
    first = int(image.nonzero()[0])
    into = torch.full_like(view.positions[0], -2) if merge is None else merge.into[0] - first
    return torch.where(keep[0], -1, into.clamp(min=-2))[image]


@functools.cache
def active_reduction() -> ImageReduction | None:
    """This process's reduction (`load_reduction`, read once): the processor and the model share it."""
    return load_reduction()


def load_reduction() -> ImageReduction | None:
    """The reduction named by `TOKENPRUNE_VLLM_CONFIG`, checked for vLLM; None when the variable is unset."""
    path = os.environ.get(CONFIG_ENV)
    if not path:
        return None
    return checked_reduction(load_config(path), source=path)


def checked_reduction(config: ReductionConfig, source: str = "the config") -> ImageReduction:
    """An `ImageReduction` of `config`, or a `ConfigError` saying why vLLM cannot run it."""
    reducer_cls = strategy_class(config.strategy)
    reducer = reducer_cls(reducer_cls.Params.model_validate(config.params))

    def refuse(reason: str) -> ConfigError:
        return ConfigError(f"tokenprune-vllm cannot serve {source} ({config.strategy!r}): {reason}")

    if len(config.stages) != 1:
        raise refuse("vLLM fixes each image's token count before scheduling: give exactly one stage")
    stage = config.stages[0]
    reduction = ImageReduction(config, reducer)
    if stage.site == "vision":
        _checked_vision_stage(reduction, refuse)
    else:
        _checked_input_stage(reduction, refuse)
    if merges_proportionally(reduction):
        raise refuse(
            "its merges carry proportional attention (a log-size bias on the merged tokens' keys), which "
            "vLLM's fused attention kernels cannot add: set `proportional_attention: false`"
        )
    return reduction


def _checked_input_stage(reduction: ImageReduction, refuse: Callable[[str], ConfigError]) -> None:
    """A stage at the language model's input vLLM can carry: layer 0, no model signal, image-only choice."""
    stage, reducer = reduction.stage, reduction.reducer
    if stage.layer != 0:
        raise refuse(
            f"only reductions before the language model (`layer: 0`, or `site: vision`) run in vLLM; a "
            f"stage at layer {stage.layer} prunes inside a model whose per-step attention metadata, KV "
            "blocks and logits indices vLLM shares across layers (see docs/serving.md, in-LLM pruning)"
        )
    if type(reducer).requires:
        raise refuse(
            f"it reads signals of the language model's layers ({', '.join(sorted(type(reducer).requires))}), "
            "which vLLM computes inside its fused attention kernels and does not expose: choose a strategy "
            "that acts before the language model"
        )
    try:
        check_strategy_site(reducer, "language")
    except ConfigError as exc:
        raise refuse(str(exc)) from exc
    try:  # a strategy refusing the budget (a per-frame one across frames) refuses here, not on a request
        reduction.select_kept(torch.randn(32, 16, generator=torch.Generator().manual_seed(0)), (2, 4, 4))
    except StrategyError as exc:
        raise refuse(str(exc)) from exc
    if reads_text(reducer):
        raise refuse(
            "its choice of image tokens depends on the prompt's text, but vLLM encodes each image without "
            "its prompt (the text-conditioned methods need the instruction beside the image)"
        )


def _checked_vision_stage(reduction: ImageReduction, refuse: Callable[[str], ConfigError]) -> None:
    """A `site: vision` stage vLLM can carry: a strategy for vision sites, reading the signals they offer."""
    reducer = reduction.reducer
    try:
        check_strategy_site(reducer, "vision")
    except ConfigError as exc:
        raise refuse(str(exc)) from exc
    missing = type(reducer).requires - VISION_SIGNALS
    if missing:
        raise refuse(f"it needs {', '.join(sorted(missing))}, which a vision site does not offer")


def merges_proportionally(reduction: ImageReduction, grid: tuple[int, int] = (4, 4), width: int = 16) -> bool:
    """Whether the stage's merges ask for proportional attention, probed on seeded tokens and attention
    (a strategy's `Merge` says so only when it selects)."""
    generator = torch.Generator().manual_seed(0)
    length, heads = 1 + grid[0] * grid[1], 2
    features = torch.randn(1, length, width, generator=generator)
    half = reduction.stage.model_copy(update={"keep": None, "ratio": 0.5})  # the config's keep may be all
    if not reduction.in_vision_tower:
        _, merge = checked_select(
            reduction.reducer, item_view(features[0, 1:], grid, half.kept_count(length - 1))
        )
        return merge is not None and merge.proportional_attention
    tokens = reduction.grid_tokens(grid)
    for layer in sorted({reduction.stage.layer, *reduction.retained()}):
        for name in ("queries", "keys"):
            tokens.capture(layer, name, torch.randn(1, heads, length, width // heads, generator=generator))
    tokens.reduce(half, features, (width // heads) ** -0.5)
    return tokens.proportional
