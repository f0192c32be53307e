"""Qwen3-VL and its MoE variant: DeepStack features follow the kept tokens, timestamped videos, q/k norms.

The toy's DeepStack features are added after decoder layers 0, 1 and 2 of 4: sites at K = 0, 1, 2 reduce
before or inside the injections, K = 3 after them. The mask oracle is the unreduced model (DeepStack added
to every visual token, removed ones included, as the model does) with removed tokens masked as keys from
the stage's layer on. Tolerances (float32): ratio 0 equals no attachment (max abs diff <= 1e-5); logits
at kept positions equal the oracle's (<= 1e-4); greedy tokens equal the oracle's except after a near-tie
of its top two logits.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
import yaml
from conftest import BUILT_IN_STRATEGIES, assert_every_paper_grid_cell_reduces
from hypothesis import given
from hypothesis import strategies as st
from test_ablate_qwen2_vl import PROMPT, toy_qwen_processor
from test_qwen2_vl import (
    assert_batch_equals_each_sample_alone,
    assert_fastv_keeps_the_top_of_eager_attention,
    assert_positions_equal_the_unreduced_run,
    generated_layer_inputs,
)
from tokenprune.adapters.qwen3_vl import Qwen3VLAdapter
from transformers.models.qwen3_vl import Qwen3VLProcessor

import tokenprune as tp
from tokenprune.contracts.adapter import replace_attribute
from tokenprune.contracts.layout import grid_coords
from tokenprune.core.language.injections import follow_packed
from tokenprune.lab.cli import main
from tokenprune.lab.results import read_rows
from tokenprune.testing.families.qwen3_vl import (
    TIMESTAMP_TOKENS,
    TimedPrompt,
    ToySize,
    toy_qwen3_vl,
    toy_qwen3_vl_moe,
)
from tokenprune.testing.models import IMAGE_TOKEN_ID, PAD_TOKEN_ID, VIDEO_TOKEN_ID
from tokenprune.testing.oracles import assert_same_greedy
from tokenprune.testing.qwen_inputs import Item, qwen_inputs, qwen_oracle_greedy, qwen_oracle_logits

LOGIT_TOL = 1e-4
IDENTITY_TOL = 1e-5
PRUNING = [name for name in BUILT_IN_STRATEGIES if not tp.strategy_class(name).merges]
MERGING = [name for name in BUILT_IN_STRATEGIES if tp.strategy_class(name).merges]

MIXED = [
    TimedPrompt([2, 1, 3], [Item((1, 4, 6)), Item((2, 4, 4), video=True)]),
    TimedPrompt([1, 2], [Item((1, 2, 4))]),
    TimedPrompt([3, 1], [Item((3, 4, 2), video=True)]),
]


def config(strategy: str, layer: int, ratio: float = 0.5, **extra) -> tp.ReductionConfig:
    """A one-stage config at original positions (the mask oracle's)."""
    return tp.ReductionConfig(strategy=strategy, layer=layer, ratio=ratio, positions="original", **extra)


def signal_layer(strategy: str, layer: int) -> int:
    """`layer`, or 1 for a strategy needing signals of the layer before its site."""
    return max(layer, 1) if tp.strategy_class(strategy).requires else layer


@pytest.fixture(scope="module")
def models():
    return {impl: toy_qwen3_vl(attn_implementation=impl) for impl in ("sdpa", "eager")}


@pytest.fixture(scope="module")
def qwen3(models):
    return models["sdpa"]


def assert_matches_oracle(model, inputs: dict, cfg: tp.ReductionConfig, steps: int = 3) -> None:
    """Prefill logits at kept positions and greedy generation with the cache equal the mask oracle's."""
    with tp.attach(model, cfg) as handle:
        logits = model(**inputs, use_cache=False).logits
        trace = handle.trace
        out = model.generate(**inputs, max_new_tokens=steps, min_new_tokens=steps, do_sample=False)
        assert all(torch.equal(a.kept, b.kept) for a, b in zip(handle.trace, trace, strict=True))
    expected = qwen_oracle_logits(model, inputs, trace)
    for b, row in enumerate(trace[-1].kept):
        row = row[row >= 0]
        assert (logits[b, row] - expected[b, row]).abs().max() <= LOGIT_TOL
    tokens, step_logits = qwen_oracle_greedy(model, inputs, trace, steps)
    assert_same_greedy(out[:, -steps:], tokens, step_logits)


# -- the layout ----------------------------------------------------------------------------------


@torch.no_grad()
def test_timestamped_video_is_one_segment_of_frames(qwen3):
    inputs = qwen_inputs(qwen3, MIXED[:1])
    ids = inputs["input_ids"][0]
    layout = Qwen3VLAdapter(qwen3).visual_layout(inputs)
    video = (ids == VIDEO_TOKEN_ID).nonzero().squeeze(1)
    assert int(video[4] - video[3]) == 3 + TIMESTAMP_TOKENS  # <vision_end> <t seconds> <vision_start>
    assert torch.equal(layout.visual[0], (ids == IMAGE_TOKEN_ID) | (ids == VIDEO_TOKEN_ID))
    assert layout.segment[0][layout.visual[0]].tolist() == [0] * 6 + [1] * 8
    assert layout.frame[0][layout.visual[0]].tolist() == [0] * 6 + [1] * 4 + [2] * 4
    assert torch.equal(layout.coords[0][video], torch.cat([grid_coords(2, 2, frame=t) for t in (0, 1)]))


@torch.no_grad()
def test_generate_sees_the_same_layout(qwen3):
    """`generate` passes pre-encoded features and 3-D positions that restart for every frame: same layout."""
    inputs = qwen_inputs(qwen3, MIXED)
    calls = []
    handle = qwen3.model.register_forward_pre_hook(lambda m, a, kw: calls.append(kw), with_kwargs=True)
    try:
        qwen3.generate(**inputs, max_new_tokens=1, do_sample=False)
    finally:
        handle.remove()
    assert calls[0].get("video_grid_thw") is None and calls[0]["mm_encoder_outputs"]["video"] is not None
    adapter = Qwen3VLAdapter(qwen3)
    from_generate, from_grids = adapter.visual_layout(calls[0]), adapter.visual_layout(inputs)
    for name in ("visual", "segment", "coords", "extent", "frame"):
        assert torch.equal(getattr(from_generate, name), getattr(from_grids, name)), name


@torch.no_grad()
def test_uniform_per_frame_takes_the_same_lattice_in_every_frame(qwen3):
    inputs = qwen_inputs(qwen3, [TimedPrompt([2, 3], [Item((3, 8, 8), video=True)])])
    with tp.attach(qwen3, config("uniform", 1, 0.75, budget="per_frame")) as handle:
        qwen3(**inputs, use_cache=False)
        kept = handle.trace[0].kept[0]
    frames = (inputs["input_ids"][0] == VIDEO_TOKEN_ID).nonzero().squeeze(1).view(3, 16)
    cells = [torch.isin(frame, kept).nonzero().squeeze(1).tolist() for frame in frames]
    assert cells[0] == cells[1] == cells[2] == [5, 7, 13, 15]  # a 2 x 2 lattice of the 4 x 4 merged grid


# -- DeepStack -------------------------------------------------------------------------------------


def test_packed_inputs_follow_the_kept_rows():
    mask = torch.tensor([[False, True, True, False, True], [True, False, False, True, False]])
    packed = torch.arange(5.0)[:, None]  # rows of (0,1) (0,2) (0,4) (1,0) (1,3)
    positions = torch.tensor([[0, 2, 3, 4], [-1, -1, 1, 3]])
    kept_mask, rows = follow_packed(mask, packed, positions)
    assert kept_mask.tolist() == [[False, True, False, True], [False, False, False, True]]
    assert rows.squeeze(1).tolist() == [1.0, 2.0, 4.0]


@torch.no_grad()
@pytest.mark.parametrize("backend", ["sdpa", "eager"])
@pytest.mark.parametrize("layer", [0, 1, 2, 3])
def test_deepstack_follows_the_kept_tokens(models, backend, layer):
    """Before (K = 0), inside (K = 1, 2) and after (K = 3) the DeepStack layers: the mask oracle holds."""
    model = models[backend]
    assert_matches_oracle(model, qwen_inputs(model, MIXED), config("random", layer), steps=2)


@torch.no_grad()
@pytest.mark.parametrize("strategy", PRUNING)
def test_every_pruning_strategy_inside_the_deepstack_layers(qwen3, strategy):
    cfg = tp.ReductionConfig(
        strategy=strategy,
        stages=[{"layer": signal_layer(strategy, 0), "ratio": 0.4}, {"layer": 2, "ratio": 0.7}],
        positions="original",
    )
    assert_matches_oracle(qwen3, qwen_inputs(qwen3, MIXED), cfg, steps=2)


@contextmanager
def deepstack_calls(model) -> Iterator[list[tuple]]:
    """(hidden in, mask, features, hidden out) of every DeepStack injection while the body runs."""
    language = model.model.language_model
    inject, calls = language._deepstack_process, []

    def spy(hidden, mask, features):
        out = inject(hidden, mask, features)
        calls.append((hidden, mask, features, out))
        return out

    undo = replace_attribute(language, "_deepstack_process", spy)
    try:
        yield calls
    finally:
        undo()


@torch.no_grad()
@pytest.mark.parametrize("strategy", MERGING)
def test_a_merged_token_receives_its_survivors_feature(qwen3, strategy):
    """A merge inside the DeepStack layers: each survivor later receives its own feature, and no other."""
    inputs = qwen_inputs(qwen3, MIXED)
    with tp.attach(qwen3, config(strategy, 1)) as handle, deepstack_calls(qwen3) as reduced:
        qwen3(**inputs, use_cache=False)
        kept = handle.trace[0].kept
    with deepstack_calls(qwen3) as unreduced:
        qwen3(**inputs, use_cache=False)
    assert len(reduced) == len(unreduced) == 3
    for (hidden, _, _, out), (_, mask, features, _) in zip(reduced[1:], unreduced[1:], strict=True):
        full = features.new_zeros(*mask.shape, features.shape[-1])
        full[mask] = features
        real = kept >= 0
        assert torch.allclose((out - hidden)[real], full[torch.where(real)[0], kept[real]], atol=1e-6)


@torch.no_grad()
def test_a_decoder_no_deeper_than_deepstack():
    """DeepStack after the last layer meets the full length again, even when the short rows are as many."""
    model = toy_qwen3_vl(ToySize(layers=2))
    batch = [TimedPrompt([30]), TimedPrompt([2, 1], [Item((1, 4, 4))])]  # rows of equal length
    inputs = qwen_inputs(model, batch)
    with tp.attach(model, config("random", 1, 0.5)) as handle:
        logits = model(**inputs, use_cache=False).logits
        trace = handle.trace
    assert trace[0].kept.shape[1] == inputs["input_ids"].shape[1]  # the shortened rows are as many
    expected = qwen_oracle_logits(model, inputs, trace)
    for b, row in enumerate(trace[0].kept):
        row = row[row >= 0]
        assert (logits[b, row] - expected[b, row]).abs().max() <= LOGIT_TOL


# -- exactness -----------------------------------------------------------------------------------


@torch.no_grad()
@pytest.mark.parametrize(
    ("strategy", "backend"),
    [*((name, "sdpa") for name in BUILT_IN_STRATEGIES), ("random", "eager"), ("fastv", "eager")],
)
def test_ratio_zero_is_identity(models, backend, strategy):
    model = models[backend]
    inputs = qwen_inputs(model, MIXED)
    reference = model(**inputs).logits
    reference_tokens = model.generate(**inputs, max_new_tokens=3, do_sample=False)
    with tp.attach(model, config(strategy, signal_layer(strategy, 0), 0.0)):
        logits = model(**inputs).logits
        tokens = model.generate(**inputs, max_new_tokens=3, do_sample=False)
    real = inputs["attention_mask"].bool()
    assert (logits - reference)[real].abs().max() <= IDENTITY_TOL
    assert torch.equal(tokens, reference_tokens)


sides = st.sampled_from([2, 4])
items = st.one_of(
    st.builds(lambda h, w: Item((1, h, w)), sides, sides),
    st.builds(lambda t, h, w: Item((t, h, w), video=True), st.integers(1, 3), sides, sides),
)
prompts = st.builds(
    lambda text, chosen: TimedPrompt(text[: len(chosen) + 1], chosen),
    st.lists(st.integers(1, 4), min_size=3, max_size=3),
    st.lists(items, max_size=2),
)


@torch.no_grad()
@given(
    batch=st.lists(prompts, min_size=2, max_size=3),
    strategy=st.sampled_from(["random", "uniform", "fastv"]),
    layer=st.integers(0, 3),
)
def test_batch_equals_each_sample_alone(qwen3, batch, strategy, layer):
    assert_batch_equals_each_sample_alone(qwen3, batch, config(strategy, signal_layer(strategy, layer)))


@torch.no_grad()
@pytest.mark.parametrize("layer", [0, 2])
def test_decode_positions_equal_the_unreduced_run(qwen3, layer):
    inputs = qwen_inputs(qwen3, MIXED)
    steps, watched = 3, sorted({0, layer, 3})
    unreduced = generated_layer_inputs(qwen3, inputs, steps, watched)
    with tp.attach(qwen3, config("random", layer, 0.6)) as handle:
        reduced = generated_layer_inputs(qwen3, inputs, steps, watched)
        kept = handle.trace[0].kept
    assert_positions_equal_the_unreduced_run(reduced, unreduced, kept, layer, steps)


# -- attention signals ---------------------------------------------------------------------------


@torch.no_grad()
def test_fastv_keeps_the_tokens_eager_attention_ranks_first(models):
    """The probe applies the per-head q/k norms: its scores equal the attention eager returns at K-1."""
    model = models["eager"]
    assert_fastv_keeps_the_top_of_eager_attention(
        model, qwen_inputs(model, MIXED[:1]), config("fastv", 2, 0.75)
    )


# -- the MoE variant, refusals, detaching --------------------------------------------------------------


@torch.no_grad()
@pytest.mark.parametrize("layer", [1, 3])
def test_moe_variant(layer):
    model = toy_qwen3_vl_moe()
    with tp.attach(model, config("uniform", 0)) as handle:
        assert isinstance(handle.adapter, Qwen3VLAdapter)
    assert_matches_oracle(model, qwen_inputs(model, MIXED[:2]), config("fastv", layer))


def test_vision_sites_are_refused(qwen3):
    cfg = tp.ReductionConfig(strategy="visionzip", stages=[{"site": "vision", "layer": 1, "keep": 4}])
    with pytest.raises(tp.AttachError, match=r"no class token.*DeepStack"):
        tp.attach(qwen3, cfg)


@torch.no_grad()
def test_detach_leaves_nothing(qwen3):
    inputs = qwen_inputs(qwen3, MIXED)
    before = qwen3(**inputs).logits
    language = qwen3.model.language_model
    handle = tp.attach(qwen3, config("fastv", 1))
    assert "_deepstack_process" in vars(language)
    qwen3.generate(**inputs, max_new_tokens=2)
    handle.detach()
    assert "_deepstack_process" not in vars(language)
    assert torch.equal(qwen3(**inputs).logits, before)
    assert not any(m._forward_pre_hooks or m._forward_hooks for m in qwen3.modules())


# -- the paper grid ------------------------------------------------------------------------------------


@torch.no_grad()
def test_every_cell_of_the_qwen3_vl_paper_grid_reduces_a_model_of_its_depth():
    """configs/paper-grid-qwen3-vl.yaml on a Qwen3-VL with Qwen3-VL-2B's 28 decoder layers (tiny width)."""
    model = toy_qwen3_vl(ToySize(hidden=32, layers=28, intermediate=64), seed=2)
    prompts = [TimedPrompt([3, 4], [Item((1, 12, 12))]), TimedPrompt([2, 5], [Item((1, 8, 12))])]
    inputs = qwen_inputs(model, prompts)  # 36 and 24 visual tokens, left-padded
    assert_every_paper_grid_cell_reduces("paper-grid-qwen3-vl.yaml", model, inputs, [36, 24])


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """A toy Qwen3-VL and a real `Qwen3VLProcessor` (Qwen2-VL's toy processor parts), saved for
    `from_pretrained`: 36 tokens per toy-task image."""
    folder = tmp_path_factory.mktemp("qwen3-vl")
    parts = toy_qwen_processor()
    processor = Qwen3VLProcessor(
        image_processor=parts.image_processor,
        video_processor=parts.video_processor,
        tokenizer=parts.tokenizer,
    )
    model = toy_qwen3_vl(ToySize(vocab=len(processor.tokenizer)), seed=1)
    model.generation_config.update(bos_token_id=1, eos_token_id=2, pad_token_id=PAD_TOKEN_ID)
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


def test_the_runner_ablates_a_qwen3_vl_checkpoint(tmp_path, checkpoint):
    """`tokenprune ablate` loads the checkpoint through the auto classes and reduces every cell."""
    config = {
        "output": str(tmp_path / "runs"),
        "model": {"source": str(checkpoint), "prompt": PROMPT},
        "dataset": {"source": "builtin:toy-vqa", "limit": 6},
        "generation": {"max_new_tokens": 2},
        "batch_size": 3,
        "threads": 1,
        "timing": {"warmup": 0, "repeats": 1, "decode_tokens": 32},
        "grid": {
            "strategies": ["fastv"],
            "layers": [1],
            "ratios": [0.5],
            "extra": [{"strategy": "divprune", "layer": 0, "keep": 4}],
        },
    }
    (tmp_path / "qwen3.yaml").write_text(yaml.safe_dump(config))
    assert main(["ablate", str(tmp_path / "qwen3.yaml"), "--no-report"]) == 0
    rows = read_rows(tmp_path / "runs" / "qwen3" / "results.jsonl")
    assert [row["label"] for row in rows] == ["baseline", "fastv K=1 R=0.5", "divprune K=0 keep=4"]
    assert [row["visual_tokens_after"] for row in rows] == [36, 18, 4]
    assert all(row["visual_tokens_before"] == 36 and row["samples"] == 6 for row in rows)
    assert 0 < rows[2]["flops_ratio"] < rows[1]["flops_ratio"] < 1
