"""LLaVA-OneVision: anyres-max images, untiled images of multi-image samples, pooled videos, the oracles.

Independent expectations: the processor's own token arithmetic (`_get_number_of_features`, run on the
toy's sizes), the model accepting the placeholder counts (its `masked_scatter` check), and the mask
oracle of `oracles.py`: kept positions' prefill logits within 1e-4 of it, greedy generation with the KV
cache equal to its greedy run without a cache, ratio 0 within 1e-5 of no attachment, a sample in a
padded batch equal to the sample alone.
"""

from __future__ import annotations

from functools import partial
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from conftest import BUILT_IN_STRATEGIES, assert_every_paper_grid_cell_reduces
from hypothesis import given
from hypothesis import strategies as st
from tokenprune.adapters.llava_onevision import LlavaOnevisionAdapter
from tokenprune.strategies.uniform import lattice
from transformers import LlavaOnevisionImageProcessor, LlavaOnevisionProcessor, LlavaOnevisionVideoProcessor

import tokenprune as tp
from tokenprune.builtin.models import word_tokenizer
from tokenprune.builtin.toyvqa import vocabulary
from tokenprune.contracts.reducer import split_budget
from tokenprune.testing.families.llava_onevision import media_inputs, toy_llava_onevision
from tokenprune.testing.models import IMAGE_TOKEN_ID, VIDEO_TOKEN_ID, ToySize
from tokenprune.testing.oracles import assert_same_greedy, generation_positions, oracle_greedy, oracle_logits
from tokenprune.testing.oracles import greedy as greedy_with_logits

STRATEGIES = list(BUILT_IN_STRATEGIES)
PRUNING = [name for name in STRATEGIES if not tp.strategy_class(name).merges]
LAYER_ZERO = [name for name in PRUNING if not tp.strategy_class(name).requires]
BUDGETS = ["sample", "per_frame"]
LOGIT_TOL = 1e-4
IDENTITY_TOL = 1e-5
POOLED = 3  # 6 x 6 patches pooled 2 x 2 per video frame
MIXED = [[2, "image", 3], [1, "image", 2, "image", 1, "video", 2]]  # tiled; two untiled and a video

Item = int | str
prompts = st.builds(
    lambda texts, media: [
        x for pair in zip(texts, [*media, None], strict=False) for x in pair if x is not None
    ],
    st.lists(st.integers(1, 4), min_size=3, max_size=3),
    st.lists(st.sampled_from(["image", "video"]), max_size=2),
)


@pytest.fixture(scope="module")
def models():
    return {impl: toy_llava_onevision(attn_implementation=impl) for impl in ("sdpa", "eager")}


@pytest.fixture(scope="module")
def onevision(models):
    return models["sdpa"]


def run(model, inputs):
    """A prefill with the positions `generate` uses for left-padded rows."""
    return model(**inputs, position_ids=generation_positions(inputs["attention_mask"]), use_cache=False)


def encoded(model, inputs) -> dict:
    """The inputs as `generate` hands them to the forward: media encoded, their size inputs popped."""
    media = {}
    if "pixel_values" in inputs:
        media["image"] = model.model.get_image_features(
            inputs["pixel_values"], inputs["image_sizes"], batch_num_images=inputs["batch_num_images"]
        )
    if "pixel_values_videos" in inputs:
        media["video"] = model.model.get_video_features(inputs["pixel_values_videos"])
    popped = ("pixel_values", "pixel_values_videos", "image_sizes", "batch_num_images")
    return {**{k: v for k, v in inputs.items() if k not in popped}, "mm_encoder_outputs": media}


def kept_rows(trace) -> list[list[int]]:
    return [row[row >= 0].tolist() for row in trace[-1].kept]


def processor_count(model, size: tuple[int, int]) -> int:
    """The processor's token count of one image alone in its sample (its own arithmetic, no tokenizer)."""
    config, tile = model.config, model.config.vision_config.image_size
    arithmetic = SimpleNamespace(
        image_processor=SimpleNamespace(image_grid_pinpoints=config.image_grid_pinpoints),
        num_image_tokens=(tile // config.vision_config.patch_size) ** 2,
        vision_aspect_ratio=config.vision_aspect_ratio,
    )
    arithmetic._get_unpadded_features = partial(LlavaOnevisionProcessor._get_unpadded_features, arithmetic)
    return LlavaOnevisionProcessor._get_number_of_features(arithmetic, *size, tile, tile)


# -- the layout ------------------------------------------------------------------------------------


@torch.no_grad()
@given(size=st.tuples(st.integers(8, 80), st.integers(8, 80)))
def test_image_tokens_equal_the_processors_and_the_models(onevision, size):
    inputs = {"image_sizes": torch.tensor([size]), "batch_num_images": torch.tensor([1])}
    (count,) = LlavaOnevisionAdapter(onevision).tokens_per_image(inputs, None)
    assert count == processor_count(onevision, size)
    features = encoded(onevision, media_inputs(onevision, [[1, "image", 1]]))  # the model's own packing
    assert len(features["mm_encoder_outputs"]["image"].pooler_output[0]) == processor_count(
        onevision, (24, 40)
    )


@torch.no_grad()
def test_layout_grids_newlines_frames_and_generate(onevision):
    inputs = media_inputs(onevision, MIXED)
    layout = LlavaOnevisionAdapter(onevision).visual_layout(inputs)
    ids = inputs["input_ids"]
    placeholders = (ids == IMAGE_TOKEN_ID) | (ids == VIDEO_TOKEN_ID)
    # sample 0: a 24 x 40 image alone: base 6 x 6, unpadded 6 x 10 with 6 newlines;
    # sample 1: two untiled images (6 x 6 and a newline each), a 3-frame video (3 x 3 cells) and a newline
    assert (placeholders & ~layout.visual).sum(1).tolist() == [6, 3]
    assert layout.visual.sum(1).tolist() == [36 + 60, 36 + 36 + 3 * 9]
    extents = [sorted({tuple(e) for e in layout.extent[b][layout.visual[b]].tolist()}) for b in range(2)]
    assert extents == [[(1, 6, 6), (1, 6, 10)], [(1, 6, 6), (3, POOLED, POOLED)]]
    assert layout.frame.amax(1).tolist() == [1, 4]  # two grids; two images and three frames
    run(onevision, inputs)  # the model accepts the counts
    from_generate = LlavaOnevisionAdapter(onevision).visual_layout(encoded(onevision, inputs))
    for name in ("visual", "segment", "coords", "extent", "frame"):
        assert torch.equal(getattr(layout, name), getattr(from_generate, name)), name


@torch.no_grad()
def test_anyres_max_downscales_large_grids(onevision):
    """44 x 48 picks 2 x 2 tiles: 12 x 12 patches, over anyres_max_2's 72, so 12 // sqrt(2) = 8 per side."""
    adapter = LlavaOnevisionAdapter(onevision)
    assert adapter.high_res_shape(torch.tensor([44, 48])) == (8, 8)
    inputs = media_inputs(onevision, [[1, "image", 1]])  # IMAGE_SIZES[0]: 24 x 40, not downscaled
    assert adapter.high_res_shapes(inputs) == [(6, 10)]


def test_image_counts_that_disagree_are_input_errors(onevision):
    inputs = media_inputs(onevision, MIXED)
    with pytest.raises(tp.InputError, match="batch_num_images"):
        LlavaOnevisionAdapter(onevision).visual_layout({**inputs, "batch_num_images": torch.tensor([1, 1])})
    with pytest.raises(tp.InputError, match="placeholder"):
        LlavaOnevisionAdapter(onevision).visual_layout({**inputs, "batch_num_images": torch.tensor([2, 1])})


def test_vision_site_is_refused_with_the_reason(onevision):
    config = tp.ReductionConfig(strategy="random", stages=[{"site": "vision", "layer": 0, "ratio": 0.5}])
    with pytest.raises(tp.AttachError, match="pooled bilinearly"):
        tp.attach(onevision, config)


def test_chosen_automatically(onevision):
    with tp.attach(onevision, tp.ReductionConfig(strategy="random", layer=1, ratio=0.5)) as handle:
        assert isinstance(handle.adapter, LlavaOnevisionAdapter)


# -- budgets ---------------------------------------------------------------------------------------


@torch.no_grad()
@pytest.mark.parametrize("ratio", [0.5, 0.8])
def test_uniform_strides_over_frames_rows_and_columns(onevision, ratio):
    inputs = media_inputs(onevision, [[3, "video", 2]], frames=3)
    with tp.attach(onevision, tp.ReductionConfig(strategy="uniform", layer=1, ratio=ratio)) as handle:
        run(onevision, inputs)
        (row,) = kept_rows(handle.trace)
    offsets = [p - 3 for p in row if inputs["input_ids"][0, p] == VIDEO_TOKEN_ID]
    assert offsets[-1] == 3 * POOLED * POOLED  # the video's newline is kept
    cells = [(o // 9, o % 9 // POOLED, o % POOLED) for o in offsets[:-1]]
    (share,) = split_budget(round(27 * (1 - ratio)), [27])
    assert cells == lattice((3, POOLED, POOLED), share)


@torch.no_grad()
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_per_frame_budget_gives_each_frame_and_grid_its_share(onevision, strategy):
    inputs = media_inputs(onevision, MIXED)
    layout = LlavaOnevisionAdapter(onevision).visual_layout(inputs)
    config = tp.ReductionConfig(strategy=strategy, layer=2, ratio=0.6, budget="per_frame")
    with tp.attach(onevision, config) as handle:
        run(onevision, inputs)
        (event,) = handle.trace
    for b, row in enumerate(kept_rows([event])):
        kept_frames = layout.frame[b][row]
        for f in range(int(layout.frame[b].max()) + 1):
            size = int((layout.frame[b] == f).sum())
            assert int((kept_frames == f).sum()) == round(size * 0.4), (b, f)


# -- exactness -------------------------------------------------------------------------------------


@torch.no_grad()
@pytest.mark.parametrize(("strategy", "attn"), [*((s, "sdpa") for s in STRATEGIES), ("fastv", "eager")])
def test_ratio_zero_is_identity(models, strategy, attn):
    config = tp.ReductionConfig(strategy=strategy, layer=1, ratio=0.0, budget="per_frame")
    assert_ratio_zero_is_identity(models[attn], media_inputs(models[attn], MIXED), config)


def assert_ratio_zero_is_identity(model, inputs, config):
    """At ratio 0: prefill logits within IDENTITY_TOL, greedy tokens equal to the unattached run's."""
    reference, reference_tokens = run(model, inputs).logits, greedy_with_logits(model, inputs, 3)[0]
    with tp.attach(model, config):
        logits, tokens = run(model, inputs).logits, greedy_with_logits(model, inputs, 3)[0]
    real = inputs["attention_mask"].bool()
    assert (logits - reference)[real].abs().max() <= IDENTITY_TOL
    assert torch.equal(tokens, reference_tokens)


def assert_matches_oracles(model, inputs, config, steps: int = 3):
    """Prefill logits at kept positions and greedy generation with the cache equal the mask oracle's,
    whose kept tokens keep their original positions (whatever the strategy's reference code does)."""
    config = config.model_copy(update={"positions": "original"})
    with tp.attach(model, config) as handle:
        logits = run(model, inputs).logits
        trace = handle.trace
        out, _ = greedy_with_logits(model, inputs, steps)
        assert all(torch.equal(a.kept, b.kept) for a, b in zip(handle.trace, trace, strict=True))
    expected = oracle_logits(model, inputs, trace)
    for b, row in enumerate(kept_rows(trace)):
        assert (logits[b, row] - expected[b, row]).abs().max() <= LOGIT_TOL
    tokens, step_logits = oracle_greedy(model, inputs, trace, steps)
    assert_same_greedy(out, tokens, step_logits)


@torch.no_grad()
@pytest.mark.parametrize(("strategy", "attn"), [*((name, "sdpa") for name in PRUNING), ("fastv", "eager")])
def test_mask_oracle_at_layer_k(models, strategy, attn):
    config = tp.ReductionConfig(strategy=strategy, layer=2, ratio=0.6, budget="per_frame")
    assert_matches_oracles(models[attn], media_inputs(models[attn], MIXED), config)


@torch.no_grad()
@pytest.mark.parametrize(
    ("strategy", "attn"), [*((name, "sdpa") for name in LAYER_ZERO), ("random", "eager")]
)
def test_mask_oracle_at_layer_zero(models, strategy, attn):
    config = tp.ReductionConfig(strategy=strategy, layer=0, ratio=0.5)
    assert_matches_oracles(models[attn], media_inputs(models[attn], MIXED), config)


@torch.no_grad()
@given(batch=st.lists(prompts, min_size=1, max_size=2), layer=st.integers(1, 3), ratio=st.floats(0.1, 0.9))
def test_mask_oracle_on_drawn_batches(onevision, batch, layer, ratio):
    config = tp.ReductionConfig(strategy="fastv", layer=layer, ratio=ratio)
    assert_matches_oracles(onevision, media_inputs(onevision, batch), config)


@torch.no_grad()
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_batch_equals_each_sample_alone(onevision, strategy):
    """Samples of one, two and no images, and a video: each as it would be alone."""
    batch = [[2, "image", 3], [1, "image", 2, "image", 1, "video", 2], [4], [1, "video", 1]]
    assert_batch_equals_each_sample_alone(onevision, media_inputs, batch, strategy)


def assert_batch_equals_each_sample_alone(model, build_inputs, batch, strategy: str):
    """Each sample of the padded `batch` (inputs from `build_inputs(model, prompts, seed=...)`) keeps the
    same tokens and generates the same greedy tokens as it does alone."""
    inputs = build_inputs(model, batch)
    pad = (1 - inputs["attention_mask"]).sum(1)
    config = tp.ReductionConfig(strategy=strategy, layer=2, ratio=0.5, budget="per_frame")
    with tp.attach(model, config) as handle:
        together = greedy_with_logits(model, inputs, 3)[0]
        kept_together = kept_rows(handle.trace)
        for b, prompt in enumerate(batch):
            alone, logits = greedy_with_logits(model, build_inputs(model, [prompt], seed=b), 3)
            assert [p - int(pad[b]) for p in kept_together[b]] == kept_rows(handle.trace)[0]
            assert_same_greedy(together[b : b + 1], alone, logits)


@torch.no_grad()
def test_decode_positions_equal_the_unreduced_runs(onevision):
    inputs = media_inputs(onevision, MIXED)
    seen: list = []
    layer = onevision.model.language_model.layers[3]
    handle_hook = layer.register_forward_pre_hook(
        lambda m, a, kw: seen.append(kw["position_embeddings"][0][:, -1:].clone()), with_kwargs=True
    )
    try:
        greedy_with_logits(onevision, inputs, 3)
        unreduced, seen[:] = list(seen), []
        with tp.attach(onevision, tp.ReductionConfig(strategy="fastv", layer=2, ratio=0.7)):
            greedy_with_logits(onevision, inputs, 3)
    finally:
        handle_hook.remove()
    assert len(seen) == len(unreduced) == 3
    for reduced_step, unreduced_step in zip(seen[1:], unreduced[1:], strict=True):  # the decode steps
        assert torch.equal(reduced_step, unreduced_step)


@torch.no_grad()
def test_detach_restores_outputs_exactly(onevision):
    assert_detach_restores_outputs_exactly(onevision, media_inputs(onevision, MIXED))


def assert_detach_restores_outputs_exactly(model, inputs):
    """A FastV attachment changes the logits; detaching restores them bit for bit and leaves no hook."""
    hooks = sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in model.modules())
    before = run(model, inputs).logits
    handle = tp.attach(model, tp.ReductionConfig(strategy="fastv", layer=2, ratio=0.75))
    reduced = run(model, inputs).logits
    handle.detach()
    assert not torch.equal(reduced, before)
    assert torch.equal(run(model, inputs).logits, before)
    assert sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in model.modules()) == hooks


@torch.no_grad()
def test_every_cell_of_the_paper_grid_reduces_a_model_of_its_depth():
    """configs/paper-grid-llava-onevision.yaml on a toy with LLaVA-OneVision-0.5B's 24 decoder layers."""
    model = toy_llava_onevision(ToySize(hidden=32, layers=24, intermediate=64), seed=2)
    inputs = media_inputs(model, [[2, "image", 3], [1, "image", 2, "image", 1]])
    visual = [36 + 60, 36 + 36]
    assert_every_paper_grid_cell_reduces("paper-grid-llava-onevision.yaml", model, inputs, visual)


# -- the real processor ----------------------------------------------------------------------------


def toy_processor(model) -> LlavaOnevisionProcessor:
    """The toy's processor, built offline: a word tokenizer (`<image>` 3, `<video>` 4), 24 px tiles."""
    tokens = ["<pad>", "<s>", "</s>", "<image>", "<video>", "<unk>", *vocabulary()]
    size = {"height": 24, "width": 24}
    return LlavaOnevisionProcessor(
        image_processor=LlavaOnevisionImageProcessor(
            size=size, image_grid_pinpoints=model.config.image_grid_pinpoints
        ),
        video_processor=LlavaOnevisionVideoProcessor(size=size),
        tokenizer=word_tokenizer(tokens, ["<image>", "<video>"]),
        num_image_tokens=36,
        vision_feature_select_strategy="full",
        vision_aspect_ratio=model.config.vision_aspect_ratio,
    )


def noise(height: int, width: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 255, (height, width, 3), dtype=np.uint8)


@torch.no_grad()
def test_the_processors_batch_matches_the_oracles():
    """One tiled image; two untiled images and a video: the processor's own placeholders and pixels."""
    model = toy_llava_onevision(ToySize(vocab=len(vocabulary()) + 6), seed=1)
    batch = toy_processor(model)(
        text=["<image> what is this?", "<image> and <image> and <video> how many?"],
        images=[[noise(24, 40, 0)], [noise(50, 20, 1), noise(44, 48, 2)]],
        videos=[np.stack([noise(30, 30, 3 + t) for t in range(3)])],
        return_tensors="pt",
        padding=True,
    )
    inputs = dict(batch)
    assert inputs["batch_num_images"].tolist() == [1, 2]
    layout = LlavaOnevisionAdapter(model).visual_layout(inputs)
    assert layout.visual.sum(1).tolist() == [36 + 60, 36 + 36 + 3 * 9]
    config = tp.ReductionConfig(strategy="fastv", layer=2, ratio=0.6, budget="per_frame")
    assert_matches_oracles(model, inputs, config)
