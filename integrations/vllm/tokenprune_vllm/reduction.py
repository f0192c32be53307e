"""Glue between a tokenprune `ReductionConfig` and vLLM: checks at engine start, per-image selection.

vLLM fixes each image's placeholder count in its front-end, before scheduling, so only reductions that
act before the language model, with a fixed budget per image, can run there. `load_reduction` reads the
config named by the environment variable `TOKENPRUNE_VLLM_CONFIG` (a YAML or JSON file, as
`tokenprune run` takes) and refuses, with the reason, anything vLLM cannot carry. `ImageReduction.select`
picks one image's kept features with the registered strategy's own `select`, on a `TokenView` of that
image alone: the same code `tp.attach` runs at layer 0.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from tokenprune.config import ReductionConfig, Stage, load_config
from tokenprune.contracts.layout import SEGMENT_KINDS, grid_coords
from tokenprune.contracts.reducer import Reducer, TokenView
from tokenprune.core.grid import GridTokens, retained_layers
from tokenprune.core.merging import merge_tokens
from tokenprune.core.selection import check_strategy_site, checked_select
from tokenprune.core.vision_site import VISION_SIGNALS
from tokenprune.errors import ConfigError
from tokenprune.registry import strategy_class

CONFIG_ENV = "TOKENPRUNE_VLLM_CONFIG"


@dataclass(frozen=True)
class ImageReduction:
    """One checked pre-LLM reduction: how many tokens each image keeps, and which."""

    config: ReductionConfig
    reducer: Reducer

    @property
    def stage(self) -> Stage:
        return self.config.stages[0]

    @property
    def in_vision_tower(self) -> bool:
        """Whether the stage reduces a vision-tower layer's output (`site: vision`), not layer 0's input."""
        return self.stage.site == "vision"

    def kept_count(self, n_tokens: int, prefix: int = 0) -> int:
        """Placeholder tokens an image of `n_tokens` features keeps (the processor's count); `prefix` of them
        lead the patches (a class token), never reduced in a vision tower, a candidate like any at layer 0."""
        if self.in_vision_tower:
            return self.stage.kept_count(n_tokens - prefix) + prefix
        return self.stage.kept_count(n_tokens)

    def retained(self) -> dict[int, int]:
        """Earlier vision layers whose attention the stage also reads ({layer: stage layer}, HiPrune's)."""
        return retained_layers(self.reducer, [self.stage.layer]) if self.in_vision_tower else {}

    def grid_tokens(self, grid: tuple[int, int]) -> GridTokens:
        """Fresh state of one vision-tower run over [class token, (H, W) patches]: what `tp.attach`'s vision
        site reduces with; survivors in their original order, as they reach the projector there."""
        return GridTokens(self.reducer, 1, grid, True, "spatial", site="vision", retain=self.retained())

    def select(self, features: Tensor, grid: tuple[int, int]) -> Tensor:
        """[k, D] kept (or merged) features of one image's [N, D] features on an (H, W) patch grid (N = H W),
        in their original order, as the language model's layer 0 receives them under `tp.attach`."""
        return self.select_kept(features, grid)[0]

    def select_kept(self, features: Tensor, grid: tuple[int, int]) -> tuple[Tensor, Tensor]:
        """`select`'s [k, D] features and the [k] indices of the kept tokens (their cells, for M-RoPE)."""
        view = image_view(features, grid, self.kept_count(features.shape[0]))
        keep, merge = checked_select(self.reducer, view)
        hidden = features[None]
        if merge is not None:
            hidden = merge_tokens(hidden, view.token_sizes(), merge)[0]
        return hidden[0][keep[0]], keep[0].nonzero()[:, 0]


def image_view(
    features: Tensor, grid: tuple[int, int], budget: int, text: tuple[Tensor, Tensor] | None = None
) -> TokenView:
    """The `TokenView` of one image's features [N, D] at the language model's layer 0, every image token a
    candidate; `text` ([T1, D], [T2, D]) puts prompt tokens before and after it (the text probe's views)."""
    before, after = text if text is not None else (features[:0], features[:0])
    n_tokens, device = features.shape[0], features.device
    if grid[0] * grid[1] == n_tokens:
        coords, extent = grid_coords(*grid), (1, *grid)
    else:  # a class token leads the patches ("full" feature selection): one row, as the LLaVA adapter has it
        coords, extent = grid_coords(1, n_tokens), (1, 1, n_tokens)
    hidden = torch.cat([before, features, after])
    image = torch.zeros(hidden.shape[0], dtype=torch.bool, device=device)
    image[before.shape[0] : before.shape[0] + n_tokens] = True
    cells = torch.full((hidden.shape[0], 3), -1, device=device)
    cells[image] = coords.to(device)
    image_only = torch.where(image, 0, -1)[None]
    return TokenView(
        hidden=hidden[None],
        candidates=image[None],
        valid=torch.ones_like(image)[None],
        segment=image_only,
        coords=cells[None],
        extent=(torch.tensor(extent, device=device) * image[:, None])[None],
        positions=torch.arange(hidden.shape[0], device=device)[None],
        budget=torch.tensor([budget], device=device),
        layer=0,
        frame=image_only,
        kind=torch.where(image_only >= 0, SEGMENT_KINDS.index("grid"), -1),
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
        _image_choice(reducer, image_view(features, grid, features.shape[0] // 2, text)) for text in texts
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
    if config.budget != "sample":
        raise refuse("`budget: per_frame` concerns videos; images get one budget each")
    if config.position_policy(stage) != "renumbered":
        raise refuse(
            "`positions: original` needs positions with gaps, but vLLM numbers every scheduled token itself "
            "(contiguously per request, decode continuing from the prompt's length) and gives the model no "
            "way to tell the requests of a batch apart: set `positions: renumbered`"
        )
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
            reduction.reducer, image_view(features[0, 1:], grid, half.kept_count(length - 1))
        )
        return merge is not None and merge.proportional_attention
    tokens = reduction.grid_tokens(grid)
    for layer in sorted({reduction.stage.layer, *reduction.retained()}):
        for name in ("queries", "keys"):
            tokens.capture(layer, name, torch.randn(1, heads, length, width // heads, generator=generator))
    tokens.reduce(half, features, (width // heads) ** -0.5)
    return tokens.proportional
