"""Qwen2-VL / Qwen2.5-VL: images and videos, 3-D M-RoPE positions, rope_deltas, generate's pre-encoded inputs.

Tolerances (float32): ratio 0 equals no attachment (max abs diff <= 1e-5); prefill logits at kept
positions equal the mask oracle's (<= 1e-4); greedy tokens equal the oracle's except after a
near-tie of its top two logits.
"""

from __future__ import annotations

import pytest
import torch
from conftest import BUILT_IN_STRATEGIES
from hypothesis import given
from hypothesis import strategies as st
from tokenprune.adapters.qwen2_vl import Qwen2VLAdapter
from transformers import DynamicCache

import tokenprune as tp
from tokenprune.contracts.layout import grid_coords
from tokenprune.core.language.forward import with_cache
from tokenprune.testing.models import IMAGE_TOKEN_ID, VIDEO_TOKEN_ID, toy_qwen2_5_vl, toy_qwen2_vl
from tokenprune.testing.oracles import assert_same_greedy, greedy
from tokenprune.testing.qwen_inputs import (
    Item,
    QwenPrompt,
    qwen_inputs,
    qwen_oracle_greedy,
    qwen_oracle_logits,
)

STRATEGIES = list(BUILT_IN_STRATEGIES)
# The mask oracle is the claim of pruning; merging strategies have their own oracle (test_tome.py).
PRUNING = [name for name in STRATEGIES if not tp.strategy_class(name).merges]


def first_layer(strategy: str, layer: int) -> int:
    """`layer`, or 1 for a strategy needing signals of the layer before its site."""
    return max(layer, 1) if tp.strategy_class(strategy).requires else layer


LOGIT_TOL = 1e-4
IDENTITY_TOL = 1e-5

sides = st.sampled_from([2, 4, 6])
items = st.one_of(
    st.builds(lambda h, w: Item((1, h, w)), sides, sides),
    st.builds(lambda t, h, w: Item((t, h, w), video=True), st.integers(1, 3), sides, sides),
)
prompts = st.builds(
    lambda text, chosen: QwenPrompt(text[: len(chosen) + 1], chosen),
    st.lists(st.integers(1, 4), min_size=3, max_size=3),
    st.lists(items, max_size=2),
)


def configs(strategies: list[str]) -> st.SearchStrategy[tp.ReductionConfig]:
    return st.builds(
        lambda strategy, layer, ratio, budget: tp.ReductionConfig(
            strategy=strategy, layer=first_layer(strategy, layer), ratio=ratio, budget=budget
        ),
        st.sampled_from(strategies),
        st.integers(0, 3),
        st.floats(0.1, 0.9),
        st.sampled_from(["sample", "per_frame"]),
    )


MIXED = [
    QwenPrompt([2, 1, 3], [Item((1, 4, 6)), Item((2, 4, 4), video=True)]),
    QwenPrompt([1, 2], [Item((1, 2, 4))]),
]


@pytest.fixture(scope="module")
def qwen_models():
    return {impl: toy_qwen2_vl(attn_implementation=impl) for impl in ("sdpa", "eager")}


@pytest.fixture(scope="module")
def qwen(qwen_models):
    return qwen_models["sdpa"]


@pytest.fixture(scope="module")
def qwen25():
    return toy_qwen2_5_vl()


def timed(model, inputs: dict) -> dict:
    """Qwen2.5-VL video inputs with 1.5 s per temporal patch (temporal positions 3 apart)."""
    if model.config.model_type == "qwen2_5_vl" and "video_grid_thw" in inputs:
        inputs["second_per_grid_ts"] = torch.full((len(inputs["video_grid_thw"]),), 1.5)
    return inputs


def layer_inputs(model, layers: list[int]):
    """Pre-hooks recording the keyword inputs of the given decoder layers at every forward."""
    seen: dict[int, list[dict]] = {i: [] for i in layers}
    handles = [
        model.model.language_model.layers[i].register_forward_pre_hook(
            lambda m, a, kw, i=i: seen[i].append(kw), with_kwargs=True
        )
        for i in layers
    ]
    return seen, handles


def assert_matches_oracle(model, inputs: dict, config: tp.ReductionConfig, steps: int = 3) -> None:
    """Prefill logits at kept positions and greedy generation with the cache equal the mask oracle's."""
    with tp.attach(model, config) as handle:
        logits = model(**inputs, use_cache=False).logits
        trace = handle.trace
        out = model.generate(**inputs, max_new_tokens=steps, min_new_tokens=steps, do_sample=False)
        assert all(torch.equal(a.kept, b.kept) for a, b in zip(handle.trace, trace, strict=True))
    expected = qwen_oracle_logits(model, inputs, trace, config=config)  # each stage's position policy
    for b, row in enumerate(trace[-1].kept):
        row = row[row >= 0]
        assert (logits[b, row] - expected[b, row]).abs().max() <= LOGIT_TOL
    tokens, step_logits = qwen_oracle_greedy(model, inputs, trace, steps, config=config)
    assert_same_greedy(out[:, -steps:], tokens, step_logits)


# -- the layout ----------------------------------------------------------------------------------


@torch.no_grad()
def test_layout_images_and_frames(qwen):
    inputs = qwen_inputs(qwen, MIXED)
    ids = inputs["input_ids"]
    layout = Qwen2VLAdapter(qwen).visual_layout(inputs)
    assert torch.equal(layout.visual, (ids == IMAGE_TOKEN_ID) | (ids == VIDEO_TOKEN_ID))
    assert layout.segment[0][layout.visual[0]].tolist() == [0] * 6 + [1] * 8  # an image, a video
    assert layout.frame[0][layout.visual[0]].tolist() == [0] * 6 + [1] * 4 + [2] * 4  # the video: 2 frames
    assert layout.extent[0][layout.visual[0]].unique(dim=0).tolist() == [[1, 2, 3], [2, 2, 2]]
    assert layout.extent[1][layout.visual[1]].unique(dim=0).tolist() == [[1, 1, 2]]
    video = ids[0] == VIDEO_TOKEN_ID
    assert torch.equal(layout.coords[0][video], torch.cat([grid_coords(2, 2, frame=t) for t in (0, 1)]))
    qwen(**inputs)  # the model itself accepts these inputs


@torch.no_grad()
@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl"])
def test_generate_sees_the_same_layout(qwen, qwen25, family):
    """`generate` drops the grids and passes pre-encoded features and 3-D positions: same layout."""
    model = qwen if family == "qwen2_vl" else qwen25
    inputs = timed(model, qwen_inputs(model, [*MIXED, QwenPrompt([3, 1], [Item((3, 6, 4), video=True)])]))
    calls = []
    handle = model.model.register_forward_pre_hook(lambda m, a, kw: calls.append(kw), with_kwargs=True)
    try:
        model.generate(**inputs, max_new_tokens=1, do_sample=False)
    finally:
        handle.remove()
    prefill = calls[0]
    assert prefill["image_grid_thw"] is None and prefill["mm_encoder_outputs"]["video"] is not None
    adapter = Qwen2VLAdapter(model)
    from_generate, from_grids = adapter.visual_layout(prefill), adapter.visual_layout(inputs)
    for name in ("visual", "segment", "coords", "extent"):
        assert torch.equal(getattr(from_generate, name), getattr(from_grids, name)), name


@torch.no_grad()
def test_uniform_per_frame_takes_the_same_lattice_in_every_frame(qwen):
    inputs = qwen_inputs(qwen, [QwenPrompt([2, 3], [Item((3, 8, 8), video=True)])])
    config = tp.ReductionConfig(strategy="uniform", layer=1, ratio=0.75, budget="per_frame")
    with tp.attach(qwen, config) as handle:
        qwen(**inputs, use_cache=False)
        kept = handle.trace[0].kept[0]
    first = int((inputs["input_ids"][0] == VIDEO_TOKEN_ID).nonzero()[0])
    cells = [
        sorted(p - first - 16 * t for p in kept.tolist() if 0 <= p - first - 16 * t < 16) for t in range(3)
    ]
    assert cells[0] == cells[1] == cells[2] == [5, 7, 13, 15]  # a 2 x 2 lattice of the 4 x 4 merged grid


@torch.no_grad()
def test_fastv_keeps_the_tokens_eager_attention_ranks_first(qwen_models):
    """The probe's scores on the folded M-RoPE tables equal the attention eager returns at layer K-1."""
    model = qwen_models["eager"]
    fastv = tp.ReductionConfig(strategy="fastv", layer=2, ratio=0.75)
    assert_fastv_keeps_the_top_of_eager_attention(model, qwen_inputs(model, MIXED[:1]), fastv)


def assert_fastv_keeps_the_top_of_eager_attention(model, inputs: dict, fastv: tp.ReductionConfig) -> None:
    """FastV at layer 2, ratio 0.75 on a sample of 14 visual tokens keeps the 4 that the last query's
    head-averaged eager attention at layer 1 ranks first."""
    maps = model(**inputs, use_cache=False, output_attentions=True).attentions[1].mean(dim=1)[0, -1]
    with tp.attach(model, fastv) as handle:
        model(**inputs, use_cache=False)
        kept = handle.trace[0].kept[0]
    ids = inputs["input_ids"][0]
    visual = ((ids == IMAGE_TOKEN_ID) | (ids == VIDEO_TOKEN_ID)).nonzero().squeeze(1)
    expected = visual[maps[visual].topk(4).indices].sort().values  # round(14 * 0.25)
    assert torch.equal(kept[torch.isin(kept, visual)], expected)


# -- exactness -----------------------------------------------------------------------------------


@torch.no_grad()
@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("model_name", ["qwen2_vl sdpa", "qwen2_vl eager", "qwen2_5_vl sdpa"])
def test_ratio_zero_is_identity(qwen_models, qwen25, model_name, strategy):
    model = qwen25 if model_name.startswith("qwen2_5") else qwen_models[model_name.split()[1]]
    inputs = timed(model, qwen_inputs(model, MIXED))
    reference = model(**inputs).logits
    reference_tokens = model.generate(**inputs, max_new_tokens=4, do_sample=False)
    config = tp.ReductionConfig(strategy=strategy, layer=first_layer(strategy, 0) * 2, ratio=0.0)
    with tp.attach(model, config) as handle:
        logits = model(**inputs).logits
        tokens = model.generate(**inputs, max_new_tokens=4, do_sample=False)
        assert isinstance(handle.adapter, Qwen2VLAdapter)
    real = inputs["attention_mask"].bool()
    assert (logits - reference)[real].abs().max() <= IDENTITY_TOL
    assert torch.equal(tokens, reference_tokens)


@torch.no_grad()
@given(batch=st.lists(prompts, min_size=1, max_size=3), config=configs(PRUNING), eager=st.booleans())
def test_prefill_and_greedy_match_the_mask_oracle(qwen_models, batch, config, eager):
    model = qwen_models["eager" if eager else "sdpa"]
    assert_matches_oracle(model, qwen_inputs(model, batch), config)


@torch.no_grad()
@pytest.mark.parametrize("strategy", PRUNING)
def test_multi_stage_matches_the_mask_oracle(qwen, strategy):
    config = tp.ReductionConfig(
        strategy=strategy, stages=[{"layer": 1, "ratio": 0.4}, {"layer": 3, "ratio": 0.7}]
    )
    assert_matches_oracle(qwen, qwen_inputs(qwen, MIXED), config)


@torch.no_grad()
@pytest.mark.parametrize(("strategy", "layer"), [("fastv", 2), ("random", 0), ("uniform", 0), ("uniform", 2)])
def test_qwen2_5_matches_the_mask_oracle(qwen25, strategy, layer):
    inputs = timed(qwen25, qwen_inputs(qwen25, [*MIXED, QwenPrompt([1, 1], [Item((2, 6, 4), video=True)])]))
    assert_matches_oracle(qwen25, inputs, tp.ReductionConfig(strategy=strategy, layer=layer, ratio=0.5))


@torch.no_grad()
@given(batch=st.lists(prompts, min_size=2, max_size=3), config=configs(STRATEGIES))
def test_batch_equals_each_sample_alone(qwen, batch, config):
    assert_batch_equals_each_sample_alone(qwen, batch, config)


def assert_batch_equals_each_sample_alone(model, batch: list, config: tp.ReductionConfig) -> None:
    """Each sample of the left-padded `batch` keeps the same tokens and generates the same greedy tokens
    as it does alone."""
    inputs = qwen_inputs(model, batch)
    pad = (1 - inputs["attention_mask"]).sum(1)
    with tp.attach(model, config) as handle:
        together, _ = greedy(model, inputs, 3)
        kept_together = handle.trace[0].kept
        for b, prompt in enumerate(batch):
            alone, logits = greedy(model, qwen_inputs(model, [prompt], seed=b), 3)
            kept_alone = handle.trace[0].kept[0]
            row = kept_together[b]
            assert torch.equal(row[row >= 0] - pad[b], kept_alone[kept_alone >= 0])
            assert_same_greedy(together[b : b + 1], alone, logits)


# -- positions -----------------------------------------------------------------------------------


@torch.no_grad()
@given(
    batch=st.lists(prompts, min_size=1, max_size=3),
    layer=st.integers(0, 3),
    ratio=st.floats(0.0, 0.9),
    strategy=st.sampled_from(["random", "uniform"]),
)
def test_positions_equal_the_unreduced_run(qwen, batch, layer, ratio, strategy):
    """Kept tokens keep their 3-D rotary tables; every decode step gets the unreduced run's positions."""
    inputs = qwen_inputs(qwen, batch)
    steps, watched = 3, sorted({0, layer, 3})
    unreduced = generated_layer_inputs(qwen, inputs, steps, watched)
    with tp.attach(qwen, tp.ReductionConfig(strategy=strategy, layer=layer, ratio=ratio)) as handle:
        reduced = generated_layer_inputs(qwen, inputs, steps, watched)
        kept = handle.trace[0].kept
    assert_positions_equal_the_unreduced_run(reduced, unreduced, kept, layer, steps)


def generated_layer_inputs(model, inputs: dict, steps: int, watched: list[int]) -> dict[int, list[dict]]:
    """The keyword inputs of the `watched` decoder layers at every forward of a greedy `generate`
    (hooked after any attachment: what the layers get)."""
    seen, handles = layer_inputs(model, watched)
    try:
        model.generate(**inputs, max_new_tokens=steps, min_new_tokens=steps, do_sample=False)
    finally:
        for h in handles:
            h.remove()
    return seen


def assert_positions_equal_the_unreduced_run(reduced, unreduced, kept, layer: int, steps: int) -> None:
    """Kept tokens keep their rotary tables at the stage's `layer`; every decode step of every watched
    layer gets the unreduced run's position ids and tables."""
    for got, want in zip(
        reduced[layer][0]["position_embeddings"], unreduced[layer][0]["position_embeddings"], strict=True
    ):
        want = want.expand(len(kept), -1, -1)
        for b, row in enumerate(kept):
            assert torch.equal(got[b, row >= 0], want[b, row[row >= 0]])
    for i in reduced:
        for step in range(1, steps):
            got, want = reduced[i][step], unreduced[i][step]
            assert torch.equal(got["position_ids"], want["position_ids"])
            for a, b in zip(got["position_embeddings"], want["position_embeddings"], strict=True):
                assert torch.equal(a, b)


def hand_loop(model, inputs: dict, steps: int, watched: list[int]) -> tuple[torch.Tensor, dict]:
    """Greedy decoding with a KV cache and no position ids (the model counts them): tokens, layer inputs."""
    seen, handles = layer_inputs(model, watched)
    banned = [*model.generation_config.suppress_tokens, model.generation_config.eos_token_id]
    cache, tokens = DynamicCache(config=model.config), []
    try:
        out = model(**inputs, **with_cache(cache), use_cache=True)
        for _ in range(steps):
            nxt = out.logits[:, -1].index_fill(-1, torch.tensor(banned), float("-inf")).argmax(-1)[:, None]
            tokens.append(nxt)
            step = {"input_ids": nxt, "mm_token_type_ids": torch.zeros_like(nxt)}
            out = model(**step, **with_cache(cache), use_cache=True)
    finally:
        for h in handles:
            h.remove()
    return torch.cat(tokens, dim=1), seen


@torch.no_grad()
@pytest.mark.parametrize("layer", [0, 2])
@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl"])
def test_decode_loop_without_position_ids(qwen, qwen25, family, layer):
    """A hand-written loop: the model counts positions from layer 0's cache, shorter after a layer-0 site."""
    model = qwen if family == "qwen2_vl" else qwen25
    inputs = timed(model, qwen_inputs(model, MIXED[:1]))
    del inputs["attention_mask"]  # transformers' own Qwen decode positions need no padding mask
    steps, watched = 3, [0, 3]
    _, unreduced = hand_loop(model, inputs, steps, watched)
    config = tp.ReductionConfig(strategy="random", layer=layer, ratio=0.6)
    with tp.attach(model, config):
        tokens, seen = hand_loop(model, inputs, steps, watched)
        expected = model.generate(**inputs, max_new_tokens=steps, min_new_tokens=steps, do_sample=False)
    assert torch.equal(tokens, expected[:, -steps:])
    for i in watched:
        for step in range(1, steps + 1):
            for a, b in zip(
                seen[i][step]["position_embeddings"], unreduced[i][step]["position_embeddings"], strict=True
            ):
                assert torch.equal(a, b)


@torch.no_grad()
@pytest.mark.parametrize("layer", [0, 2])
def test_a_second_generate_is_not_affected_by_the_first(qwen, layer):
    """`rope_deltas` stays on the model between calls: a new prompt must not inherit the last one's."""
    first = qwen_inputs(qwen, [QwenPrompt([4, 1], [Item((3, 6, 6), video=True)])], seed=3)
    second = qwen_inputs(qwen, MIXED)
    with tp.attach(qwen, tp.ReductionConfig(strategy="uniform", layer=layer, ratio=0.5)) as handle:
        qwen.model.rope_deltas = None
        fresh = qwen.generate(**second, max_new_tokens=4, do_sample=False)
        fresh_kept = handle.trace[0].kept
        qwen.generate(**first, max_new_tokens=4, do_sample=False)
        again = qwen.generate(**second, max_new_tokens=4, do_sample=False)
        assert torch.equal(handle.trace[0].kept, fresh_kept)
    assert torch.equal(again, fresh)


# -- inputs, attaching, detaching --------------------------------------------------------------------


def _without_token_types(inputs: dict) -> dict:
    return {k: v for k, v in inputs.items() if k != "mm_token_type_ids"}


def _grid_too_large(inputs: dict) -> dict:
    grids = inputs["image_grid_thw"].clone()
    grids[0, 1] += 2
    rows = int(grids.prod(-1).sum())
    return {**inputs, "image_grid_thw": grids, "pixel_values": inputs["pixel_values"][:1].expand(rows, -1)}


def _pixels_off_grid(inputs: dict) -> dict:
    return {**inputs, "pixel_values_videos": inputs["pixel_values_videos"][:-1]}


def _types_off_placeholders(inputs: dict) -> dict:
    types = inputs["mm_token_type_ids"].clone()
    types[types == 2] = 1
    return {**inputs, "mm_token_type_ids": types}


@torch.no_grad()
@pytest.mark.parametrize(
    ("broken", "message"),
    [
        (_without_token_types, "mm_token_type_ids"),
        (_grid_too_large, "images: the input ids hold"),
        (_pixels_off_grid, "patch rows"),
        (_types_off_placeholders, "must be 1 exactly at image placeholders"),
    ],
)
def test_bad_inputs_fail_before_any_layer(qwen, broken, message):
    inputs = broken(qwen_inputs(qwen, MIXED))
    ran = []
    hook = qwen.model.language_model.layers[0].register_forward_pre_hook(lambda *a: ran.append(1))
    try:
        config = tp.ReductionConfig(strategy="random", layer=0, ratio=0.5)
        with tp.attach(qwen, config), pytest.raises(tp.InputError, match=message):
            qwen(**inputs)
        if broken is _without_token_types:  # `generate` would compute text-only positions without it
            with tp.attach(qwen, config), pytest.raises(tp.InputError, match=message):
                qwen.generate(**inputs, max_new_tokens=2)
    finally:
        hook.remove()
    assert not ran


@torch.no_grad()
def test_text_only_and_detach(qwen25):
    inputs = timed(qwen25, qwen_inputs(qwen25, MIXED))
    text = qwen_inputs(qwen25, [QwenPrompt([5]), QwenPrompt([3])])
    before = qwen25(**inputs).logits
    before_text = qwen25(**text).logits
    handle = tp.attach(qwen25, tp.ReductionConfig(strategy="fastv", layer=1, ratio=0.5))
    qwen25(**inputs)
    qwen25.generate(**inputs, max_new_tokens=2)
    assert torch.equal(qwen25(**text).logits, before_text)
    assert handle.trace[0].visual_after == [0, 0]
    handle.detach()
    assert torch.equal(qwen25(**inputs).logits, before)
    modules = [qwen25.model, *qwen25.model.language_model.layers]
    assert not any(m._forward_pre_hooks or m._forward_hooks for m in modules)
