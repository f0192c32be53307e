"""vLLM + tokenprune-vllm == transformers + `tp.attach` on a tiny Qwen2-VL (fp32, greedy, RoPE base 4, sharp
attention): under `positions: original` (the kept tokens' own M-RoPE ids, decode continuing after the
unreduced prompt) and with videos reduced by the video strategies (one budget per video, or one per
frame), single requests and batches mixing image and video requests; each item's kept count depends on
its grid and the config only."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import torch
from engine import Request, image, video
from engine import assert_vllm_equals_hf as parity
from hf import expanded, greedy_continuation
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError
from test_qwen_vl import with_fast_rope
from tokenprune_vllm.checkpoints import VLLM_TOY_SIZE, word_tokenizer
from tokenprune_vllm.reduction import checked_reduction
from transformers import Qwen2VLImageProcessor, Qwen2VLProcessor, Qwen2VLVideoProcessor

import tokenprune as tp
from tokenprune.errors import TokenPruneError
from tokenprune.testing.models import (
    IMAGE_TOKEN_ID,
    VIDEO_TOKEN_ID,
    VISION_END_TOKEN_ID,
    VISION_START_TOKEN_ID,
    toy_qwen2_vl,
)

MAX_TOKENS = 8
SHARPNESS = 4.0  # the language model's query and key projections scaled: attention logits x 16
# images and video frames are resized to 56 x 56 pixels: 14 x 14 patches of 4, 7 x 7 merged tokens; the
# videos' 4 frames make 2 temporal patches (T = 2 <= max(H, W): vLLM's and transformers' ids agree)
PIXELS = 56 * 56
IMAGE = [VISION_START_TOKEN_ID, IMAGE_TOKEN_ID, VISION_END_TOKEN_ID]
VIDEO = [VISION_START_TOKEN_ID, VIDEO_TOKEN_ID, VISION_END_TOKEN_ID]
IMAGE_ALONE = [Request([1, 17, *IMAGE, 40, 41, 42], [0])]
VIDEO_ALONE = [Request([1, 18, *VIDEO, 43, 44], [], (0,))]
MIXED = [  # image and video requests of different prompts and lengths, the item at different places
    Request([1, 17, *IMAGE, 40, 41, 42], [1]),
    Request([1, *VIDEO, 90, 91], [], (1,)),
    Request([1, 20, 21, 22, *IMAGE, 55, 56, 57], [2]),
    Request([1, 30, 31, *VIDEO, 60, 61, 62, 63], [], (2,)),
]
# an image and a video in one prompt: `tp.attach` gives a sample one budget over all its items, vLLM one
# per item, so they agree with one budget per frame only
BOTH = [Request([1, 12, *IMAGE, 70, *VIDEO, 71, 72], [3], (3,)), *MIXED[:2]]
# an engine start each (~100 s): a plain choice and the three video methods, both position policies, both
# budgets; per_frame also serves the prompt holding an image and a video. The policies give different ids
# only where an item's kept cells miss its last row and column (the text after it then moves): `uniform`'s
# lattice of 4 does, and there they change the greedy tokens (checked below); the others keep cells there
UNIFORM_ORIGINAL = {"strategy": "uniform", "layer": 0, "keep": 4, "positions": "original"}
SERVED = {
    "uniform-original": (UNIFORM_ORIGINAL, [IMAGE_ALONE, VIDEO_ALONE, MIXED]),
    "evs-per-frame": (
        {"strategy": "evs", "layer": 0, "ratio": 0.5, "budget": "per_frame"},
        [VIDEO_ALONE, MIXED, BOTH],
    ),
    "vidcom2-original": (
        {"strategy": "vidcom2", "layer": 0, "ratio": 0.6, "positions": "original"},
        [VIDEO_ALONE, MIXED],
    ),
    "fastvid-per-frame-original": (
        {
            "strategy": "fastvid",
            "layer": 0,
            "keep": 10,
            "budget": "per_frame",
            "positions": "original",
            "params": {"segments": 2, "anchor_step": 1},
        },
        [VIDEO_ALONE, MIXED, BOTH],
    ),
}


@dataclass(frozen=True)
class Media:
    """One modality of a request as transformers takes it: its items, processor and input names."""

    field: str  # the request's seeds of this modality
    make: Callable[[int], Any]  # seed -> item (an image, or a video's frames)
    processor: type
    pixels: str
    grids: str
    placeholder: int
    token_type: int  # its value in `mm_token_type_ids`
    extras: tuple[str, ...] = ()  # further processor outputs the model takes (Qwen2.5-VL's video timing)


MEDIA = (
    Media("images", image, Qwen2VLImageProcessor, "pixel_values", "image_grid_thw", IMAGE_TOKEN_ID, 1),
    Media("videos", video, Qwen2VLVideoProcessor, "pixel_values_videos", "video_grid_thw", VIDEO_TOKEN_ID, 2),
)


@pytest.fixture(scope="module")
def qwen2_vl(tmp_path_factory: pytest.TempPathFactory):
    """A seeded tiny Qwen2-VL and its processor (videos sized as images) in vLLM's layout; the HF model."""
    folder = tmp_path_factory.mktemp("qwen2-vl-video")
    return folder, saved_sharp_qwen(folder, toy_qwen2_vl, Qwen2VLProcessor)


def saved_sharp_qwen(folder: Path, toy: Callable[..., Any], processor: type) -> Any:
    """The seeded tiny Qwen-VL `toy` (sharp attention, fast RoPE) and its `processor` (videos sized as
    images) saved in `folder` in vLLM's layout; the HF model."""
    model = with_sharp_attention(with_fast_rope(toy(VLLM_TOY_SIZE))).eval()
    model.save_pretrained(folder)
    size = {"shortest_edge": PIXELS, "longest_edge": 4 * PIXELS}
    processor(
        image_processor=Qwen2VLImageProcessor(patch_size=VLLM_TOY_SIZE.patch, size=size),
        video_processor=Qwen2VLVideoProcessor(patch_size=VLLM_TOY_SIZE.patch, size=size),
        tokenizer=word_tokenizer(VLLM_TOY_SIZE.vocab, {"video_token": f"w{VIDEO_TOKEN_ID}"}),
    ).save_pretrained(folder)
    return model


def with_sharp_attention(model):
    """The model with its language model's query and key projections scaled by `SHARPNESS`: a seeded tiny
    model attends almost uniformly, so moving the text after an item by a position or two changes no
    greedy token; with sharper attention it does, and the parity tests check the policies' ids."""
    with torch.no_grad():
        for layer in model.model.language_model.layers:
            for projection in (layer.self_attn.q_proj, layer.self_attn.k_proj):
                projection.weight.mul_(SHARPNESS)
                if projection.bias is not None:  # Qwen3-VL's projections have none
                    projection.bias.mul_(SHARPNESS)
    return model


def hf_greedy(
    model, folder: Path, request: Request, config: dict[str, Any] | None, kinds: tuple[Media, ...] = MEDIA
) -> list[int]:
    """transformers' greedy continuation of `request` (its images and videos, processed as `kinds` say),
    under `tp.attach(config)`."""
    merged = model.config.vision_config.spatial_merge_size**2
    ids, inputs = torch.tensor([request.prompt]), {}
    for media in kinds:
        seeds = getattr(request, media.field)
        if not seeds:
            continue
        processed = media.processor.from_pretrained(folder)(
            [media.make(s) for s in seeds], return_tensors="pt"
        )
        grids = processed[media.grids]
        ids = expanded(ids[0].tolist(), (grids.prod(-1) // merged).tolist(), media.placeholder)
        inputs.update({name: processed[name] for name in (media.pixels, media.grids, *media.extras)})
    types = sum((ids == media.placeholder).long() * media.token_type for media in kinds)
    return greedy_continuation(model, ids, config, MAX_TOKENS, mm_token_type_ids=types, **inputs)


def test_the_toy_items_have_the_grids_the_tests_describe(qwen2_vl) -> None:
    folder = qwen2_vl[0]
    images = Qwen2VLImageProcessor.from_pretrained(folder)([image(0)], return_tensors="pt")
    videos = Qwen2VLVideoProcessor.from_pretrained(folder)([video(0)], return_tensors="pt")
    side = int(PIXELS**0.5) // VLLM_TOY_SIZE.patch
    assert images.image_grid_thw.tolist() == [[1, side, side]]
    assert videos.video_grid_thw.tolist() == [[2, side, side]]


def test_the_position_policies_give_different_tokens_here(qwen2_vl) -> None:
    """The `original` parity test tells the policies apart: `renumbered` ids change HF's greedy tokens."""
    folder, model = qwen2_vl
    renumbered = {**UNIFORM_ORIGINAL, "positions": "renumbered"}
    requests = [*IMAGE_ALONE, *VIDEO_ALONE]
    original = [hf_greedy(model, folder, request, UNIFORM_ORIGINAL) for request in requests]
    assert all(hf_greedy(model, folder, r, renumbered) != o for r, o in zip(requests, original, strict=True))


@pytest.mark.parametrize("name", sorted(SERVED))
def test_reduced_vllm_equals_hf_attach(qwen2_vl, tmp_path: Path, name: str) -> None:
    config, groups = SERVED[name]
    folder, model = qwen2_vl
    parity(folder, groups, MAX_TOKENS, config, tmp_path, partial(hf_greedy, model, folder, config=config))


def layer0_reductions() -> list[tp.ReductionConfig]:
    """Every registered strategy vLLM serves at layer 0, with one budget per item and one per frame."""
    served = []
    for name in tp.list_strategies():
        for budget in ("sample", "per_frame"):
            config = tp.ReductionConfig(
                strategy=name, layer=0, ratio=0.6, budget=budget, positions="original"
            )
            try:
                checked_reduction(config)
            except (TokenPruneError, ValidationError):
                continue
            served.append(config)
    return served


LAYER0 = layer0_reductions()


def test_the_video_strategies_are_served_at_layer_0() -> None:
    assert {"evs", "vidcom2", "fastvid", "divprune", "random"} <= {config.strategy for config in LAYER0}


@pytest.mark.parametrize("strategy", ["prunevid", "holitom"])
def test_a_budget_the_strategy_refuses_is_refused_when_the_config_loads(strategy: str) -> None:
    """Merging across frames, they refuse one budget per frame: at engine start, not on a request."""
    config = tp.ReductionConfig(strategy=strategy, layer=0, ratio=0.5, budget="per_frame")
    with pytest.raises(TokenPruneError, match="a per-frame budget does not apply"):
        checked_reduction(config)


@pytest.mark.parametrize("config", LAYER0, ids=lambda c: f"{c.strategy}-{c.budget}")
@settings(max_examples=12, deadline=None, derandomize=True)  # the main suite's `ci` profile
@given(frames=st.integers(1, 4), height=st.integers(1, 4), width=st.integers(1, 4), seed=st.integers(0, 99))
def test_an_items_kept_count_depends_on_its_grid_and_the_config_only(
    config: tp.ReductionConfig, frames: int, height: int, width: int, seed: int
) -> None:
    """What the processor counts from the grid is what the strategy keeps, whatever the features."""
    reduction = checked_reduction(config)
    grid, n_tokens = (frames, height, width), frames * height * width
    generator = torch.Generator().manual_seed(seed)
    features = torch.randn(n_tokens, 16, generator=generator)
    kept, index = reduction.select_kept(features, grid)
    expected = reduction.item_kept_count(n_tokens, grid)
    assert kept.shape == (expected, 16) and index.shape == (expected,)
    per_frame = reduction.stage.kept_count(height * width) * frames
    assert expected == (per_frame if config.budget == "per_frame" else reduction.stage.kept_count(n_tokens))
