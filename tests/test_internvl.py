"""InternVL: tiles and a thumbnail per image, each a 3 x 3 pixel-shuffled grid, and the exactness oracles.

Independent expectations: placeholder arithmetic (`<img>`, 9 placeholders per tile, `</img>`), the
model accepting the counts, and the mask oracle of `oracles.py` with the tolerances of
test_llava_onevision.py.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import BUILT_IN_STRATEGIES, assert_every_paper_grid_cell_reduces
from hypothesis import given
from hypothesis import strategies as st
from test_llava_onevision import (
    assert_batch_equals_each_sample_alone,
    assert_detach_restores_outputs_exactly,
    assert_matches_oracles,
    assert_ratio_zero_is_identity,
    kept_rows,
    run,
)
from tokenprune.adapters.internvl import InternVLAdapter
from transformers import GotOcr2ImageProcessor, InternVLProcessor, InternVLVideoProcessor

import tokenprune as tp
from tokenprune.builtin.models import word_tokenizer
from tokenprune.builtin.toyvqa import vocabulary
from tokenprune.contracts.layout import SEGMENT_KINDS
from tokenprune.testing.families.internvl import tiled_inputs, toy_internvl
from tokenprune.testing.models import IMAGE_TOKEN_ID, ToySize

STRATEGIES = list(BUILT_IN_STRATEGIES)
PRUNING = [name for name in STRATEGIES if not tp.strategy_class(name).merges]
LAYER_ZERO = [name for name in PRUNING if not tp.strategy_class(name).requires]
TILE = 9  # 6 x 6 patches pixel-shuffled to 3 x 3
MIXED = [
    [2, 3, 1, 1, 2],
    [1, 5, 0],
]  # text, tiles, text...: 2 tiles + thumbnail and a single tile; 4 + thumbnail

prompts = st.builds(
    lambda texts, tiles: [
        x for pair in zip(texts, [*tiles, None], strict=False) for x in pair if x is not None
    ],
    st.lists(st.integers(1, 3), min_size=3, max_size=3),
    st.lists(st.sampled_from([1, 3, 5]), max_size=2),
)


@pytest.fixture(scope="module")
def models():
    return {impl: toy_internvl(attn_implementation=impl) for impl in ("sdpa", "eager")}


@pytest.fixture(scope="module")
def internvl(models):
    return models["sdpa"]


def encoded(model, inputs) -> dict:
    """The inputs as `generate` hands them to the forward: the tiles encoded."""
    media = {"image": model.model.get_image_features(inputs["pixel_values"])}
    rest = {k: v for k, v in inputs.items() if k != "pixel_values"}
    return {**rest, "mm_encoder_outputs": media}


# -- the layout ------------------------------------------------------------------------------------


@torch.no_grad()
def test_each_tile_and_the_thumbnail_is_a_segment(internvl):
    inputs = tiled_inputs(internvl, MIXED)
    layout = InternVLAdapter(internvl).visual_layout(inputs)
    ids = inputs["input_ids"]
    assert torch.equal(layout.visual, ids == IMAGE_TOKEN_ID)
    assert layout.visual.sum(1).tolist() == [4 * TILE, 5 * TILE]
    assert layout.extent[layout.visual].unique(dim=0).tolist() == [[1, 3, 3]]
    for b, tiles in enumerate([4, 5]):  # segments in placeholder order: a tiled image's thumbnail is its last
        positions = (ids[b] == IMAGE_TOKEN_ID).nonzero().squeeze(1)
        assert layout.segment[b, positions].tolist() == [t for t in range(tiles) for _ in range(TILE)]
        assert layout.coords[b, positions[:TILE], 1:].tolist() == [[r, c] for r in range(3) for c in range(3)]
    run(internvl, inputs)  # the model accepts the counts
    from_generate = InternVLAdapter(internvl).visual_layout(encoded(internvl, inputs))
    for name in ("visual", "segment", "coords", "extent", "frame", "kind"):
        assert torch.equal(getattr(layout, name), getattr(from_generate, name)), name


@torch.no_grad()
def test_a_strategy_sees_which_tile_is_the_thumbnail(internvl):
    """The thumbnail is a segment of kind "thumbnail": a strategy keeping only those keeps exactly it."""

    class Thumbnails(tp.ScoreReducer):
        def score(self, view: tp.TokenView) -> torch.Tensor:
            return view.of_kind("thumbnail").float()

    tp.register_strategy("thumbnails-only")(Thumbnails)
    try:
        inputs = tiled_inputs(internvl, MIXED)
        config = tp.ReductionConfig(strategy="thumbnails-only", layer=2, keep=TILE)
        with tp.attach(internvl, config) as handle:
            run(internvl, inputs)
            (event,) = handle.trace
    finally:
        tp.registry.STRATEGIES.unregister("thumbnails-only")
    layout = InternVLAdapter(internvl).visual_layout(inputs)
    thumbnail = SEGMENT_KINDS.index("thumbnail")
    for b, (row, segment) in enumerate(zip(kept_rows([event]), [2, 4], strict=True)):
        is_thumbnail = layout.kind[b] == thumbnail
        assert torch.equal(is_thumbnail, layout.segment[b] == segment)  # a tiled image's last tile only
        kept = torch.tensor(row)
        assert kept[layout.visual[b, kept]].tolist() == is_thumbnail.nonzero().squeeze(1).tolist()


def test_placeholders_that_are_not_whole_tiles_are_input_errors(internvl):
    inputs = tiled_inputs(internvl, [[2, 3, 1]])
    with pytest.raises(tp.InputError, match="not whole tiles"):
        InternVLAdapter(internvl).visual_layout({**inputs, "pixel_values": inputs["pixel_values"][:2]})


def test_vision_site_is_refused_with_the_reason(internvl):
    config = tp.ReductionConfig(strategy="random", stages=[{"site": "vision", "layer": 0, "ratio": 0.5}])
    with pytest.raises(tp.AttachError, match="pixel shuffle"):
        tp.attach(internvl, config)


@torch.no_grad()
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_per_frame_budget_gives_each_tile_its_share(internvl, strategy):
    inputs = tiled_inputs(internvl, MIXED)
    layout = InternVLAdapter(internvl).visual_layout(inputs)
    config = tp.ReductionConfig(strategy=strategy, layer=2, ratio=5 / 9, budget="per_frame")
    with tp.attach(internvl, config) as handle:
        run(internvl, inputs)
        (event,) = handle.trace
    for b, row in enumerate(kept_rows([event])):
        kept_segments = layout.segment[b][row]
        assert [int((kept_segments == s).sum()) for s in range(4 + b)] == [4] * (4 + b)


# -- exactness -------------------------------------------------------------------------------------


@torch.no_grad()
@pytest.mark.parametrize(("strategy", "attn"), [*((s, "sdpa") for s in STRATEGIES), ("fastv", "eager")])
def test_ratio_zero_is_identity(models, strategy, attn):
    config = tp.ReductionConfig(strategy=strategy, layer=1, ratio=0.0)
    assert_ratio_zero_is_identity(models[attn], tiled_inputs(models[attn], MIXED), config)


@torch.no_grad()
@pytest.mark.parametrize(("strategy", "attn"), [*((s, "sdpa") for s in PRUNING), ("fastv", "eager")])
def test_mask_oracle_at_layer_k(models, strategy, attn):
    config = tp.ReductionConfig(strategy=strategy, layer=2, ratio=0.6, budget="per_frame")
    assert_matches_oracles(models[attn], tiled_inputs(models[attn], MIXED), config)


@torch.no_grad()
@pytest.mark.parametrize(("strategy", "attn"), [*((s, "sdpa") for s in LAYER_ZERO), ("random", "eager")])
def test_mask_oracle_at_layer_zero(models, strategy, attn):
    config = tp.ReductionConfig(strategy=strategy, layer=0, ratio=0.5)
    assert_matches_oracles(models[attn], tiled_inputs(models[attn], MIXED), config)


@torch.no_grad()
@given(batch=st.lists(prompts, min_size=1, max_size=2), layer=st.integers(1, 3), ratio=st.floats(0.1, 0.9))
def test_mask_oracle_on_drawn_batches(internvl, batch, layer, ratio):
    config = tp.ReductionConfig(strategy="fastv", layer=layer, ratio=ratio)
    assert_matches_oracles(internvl, tiled_inputs(internvl, batch), config)


@torch.no_grad()
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_batch_equals_each_sample_alone(internvl, strategy):
    """Samples of two images, one image and none, each as it would be alone."""
    assert_batch_equals_each_sample_alone(internvl, tiled_inputs, [[2, 3, 1, 1, 2], [1, 5, 0], [4]], strategy)


@torch.no_grad()
def test_detach_restores_outputs_exactly(internvl):
    assert_detach_restores_outputs_exactly(internvl, tiled_inputs(internvl, MIXED))


@torch.no_grad()
def test_every_cell_of_the_paper_grid_reduces_a_model_of_its_depth():
    """configs/paper-grid-internvl.yaml on a toy with InternVL3-1B's 24 decoder layers."""
    model = toy_internvl(ToySize(hidden=32, layers=24, intermediate=64), seed=2)
    inputs = tiled_inputs(model, [[2, 3, 1, 1, 2], [1, 5, 1]])
    assert_every_paper_grid_cell_reduces("paper-grid-internvl.yaml", model, inputs, [4 * TILE, 5 * TILE])


# -- the real processor ----------------------------------------------------------------------------

SPECIAL = {"start_image_token": "<img>", "end_image_token": "</img>", "context_image_token": "<IMG_CONTEXT>"}


def toy_processor() -> InternVLProcessor:
    """The toy's processor, built offline: a word tokenizer (`<IMG_CONTEXT>` 3), 24 px tiles, 1 to 4 tiles."""
    tokens = ["<pad>", "<s>", "</s>", "<IMG_CONTEXT>", "<video>", "<unk>", "<img>", "</img>", *vocabulary()]
    tokenizer = word_tokenizer(tokens, [*SPECIAL.values(), "<video>"])
    for name, token in {**SPECIAL, "video_token": "<video>"}.items():  # what InternVL's tokenizer declares
        setattr(tokenizer, name, token)
        setattr(tokenizer, f"{name}_id", tokenizer.convert_tokens_to_ids(token))
    size = {"height": 24, "width": 24}
    return InternVLProcessor(
        image_processor=GotOcr2ImageProcessor(size=size, crop_to_patches=True, max_patches=4),
        video_processor=InternVLVideoProcessor(size=size),
        tokenizer=tokenizer,
        image_seq_length=TILE,
    )


def noise(height: int, width: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 255, (height, width, 3), dtype=np.uint8)


@torch.no_grad()
def test_the_processors_batch_matches_the_oracles():
    """2 tiles + thumbnail; a single tile, 2 tiles + thumbnail and a 3-frame video (a tile per frame)."""
    model = toy_internvl(ToySize(vocab=len(vocabulary()) + 8), seed=1)
    batch = toy_processor()(
        text=["<IMG_CONTEXT> what is this?", "<IMG_CONTEXT> and <IMG_CONTEXT> how many? <video>"],
        images=[[noise(24, 48, 0)], [noise(24, 24, 1), noise(48, 96, 2)]],
        videos=[np.stack([noise(30, 30, 3 + t) for t in range(3)])],
        return_tensors="pt",
        padding=True,
    )
    inputs = dict(batch)
    layout = InternVLAdapter(model).visual_layout(inputs)
    assert layout.visual.sum(1).tolist() == [3 * TILE, 7 * TILE]
    assert (layout.segment.amax(1) + 1).tolist() == [3, 7]
    config = tp.ReductionConfig(strategy="fastv", layer=2, ratio=0.6, budget="per_frame")
    assert_matches_oracles(model, inputs, config)
