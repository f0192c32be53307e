"""Video-LLaVA: images and videos in one prompt, per-frame class tokens, and the exactness oracles.

Independent expectations come from placeholder arithmetic (a video frame is 1 + 6 * 6 tokens: the
class token, then the patch grid row-major) and from the mask oracle of `oracles.py` (Video-LLaVA's
language model sits at `model.model.language_model`, as LLaVA's): kept positions' prefill logits
within 1e-4 of it, greedy generation with the KV cache equal to its greedy run without a cache,
ratio 0 within 1e-5 of no attachment.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import pytest
import torch
from conftest import BUILT_IN_STRATEGIES
from hypothesis import given
from hypothesis import strategies as st
from test_docs_examples import marked_blocks
from tokenprune.adapters.video_llava import VideoLlavaAdapter
from tokenprune.strategies.uniform import lattice

import tokenprune as tp
from tokenprune.contracts.reducer import split_budget
from tokenprune.testing.models import IMAGE_TOKEN_ID, VIDEO_TOKEN_ID, toy_video_llava
from tokenprune.testing.oracles import (
    TEXT_IDS,
    assert_same_greedy,
    generation_positions,
    left_padded,
    oracle_greedy,
    oracle_logits,
)
from tokenprune.testing.oracles import greedy as greedy_with_logits

STRATEGIES = list(BUILT_IN_STRATEGIES)
# The mask oracle is the claim of pruning; merging strategies have their own oracle (test_tome.py).
PRUNING = [name for name in STRATEGIES if not tp.strategy_class(name).merges]
BUDGETS = ["sample", "per_frame"]
SIDE = 6  # the toy model's patch grid
IMAGE_TOKENS = SIDE * SIDE
FRAME_TOKENS = 1 + SIDE * SIDE
LOGIT_TOL = 1e-4
IDENTITY_TOL = 1e-5
DOC = Path(__file__).resolve().parents[1] / "docs" / "adapters" / "video-llava.md"

Item = int | str  # a run of text tokens, "image" or "video"


@pytest.fixture(scope="module")
def video_llava():
    return toy_video_llava(attn_implementation="sdpa")


@pytest.fixture(scope="module")
def video_llava_eager():
    return toy_video_llava(attn_implementation="eager")


def media_inputs(
    prompts: Sequence[Sequence[Item]], frames: int = 8, seed: int = 0
) -> dict[str, torch.Tensor]:
    """A left-padded batch; sample i draws its text and pixels from seed + i (so it can be rebuilt alone)."""
    rows, images, videos = [], [], []
    for i, prompt in enumerate(prompts):
        gen = torch.Generator().manual_seed(seed + i)
        row: list[int] = []
        for item in prompt:
            if item == "image":
                row += [IMAGE_TOKEN_ID] * IMAGE_TOKENS
                images.append(torch.randn(3, 24, 24, generator=gen))
            elif item == "video":
                row += [VIDEO_TOKEN_ID] * frames * FRAME_TOKENS
                videos.append(torch.randn(frames, 3, 24, 24, generator=gen))
            else:
                row += torch.randint(TEXT_IDS.start, TEXT_IDS.stop, (item,), generator=gen).tolist()
        rows.append(row)
    ids, mask = left_padded(rows)
    inputs = {"input_ids": ids, "attention_mask": mask}
    if images:
        inputs["pixel_values"] = torch.stack(images)
    if videos:
        inputs["pixel_values_videos"] = torch.stack(videos)
    return inputs


def interleave(texts: list[int], media: list[str]) -> list[Item]:
    """Text runs around the media: texts[0], media[0], texts[1], ..., ending with text."""
    return [x for pair in zip(texts, [*media, None], strict=False) for x in pair if x is not None]


def prompts_with(min_media: int) -> st.SearchStrategy[list[Item]]:
    """Prompts of up to two images/videos (at least `min_media`), text around and between them."""
    return st.builds(
        interleave,
        st.lists(st.integers(1, 5), min_size=3, max_size=3),
        st.lists(st.sampled_from(["image", "video"]), min_size=min_media, max_size=2),
    )


prompts = prompts_with(0)
batches = st.tuples(prompts_with(1), st.lists(prompts, max_size=1)).map(lambda t: [t[0], *t[1]])


def run(model, inputs):
    """A prefill with the positions `generate` uses for left-padded rows."""
    return model(**inputs, position_ids=generation_positions(inputs["attention_mask"]), use_cache=False)


def greedy(model, inputs, steps: int) -> torch.Tensor:
    """Greedy tokens [B, steps] from `generate` with the KV cache."""
    return greedy_with_logits(model, inputs, steps)[0]


def encoded(model, inputs) -> dict[str, torch.Tensor]:
    """The inputs as `generate` hands them to the model: pixels replaced by `mm_encoder_outputs`."""
    media = {}
    if "pixel_values" in inputs:
        media["image"] = model.model.get_image_features(inputs["pixel_values"], return_dict=True)
    if "pixel_values_videos" in inputs:
        media["video"] = model.model.get_video_features(inputs["pixel_values_videos"], return_dict=True)
    rest = {k: v for k, v in inputs.items() if not k.startswith("pixel_values")}
    return {**rest, "mm_encoder_outputs": media}


def kept_rows(trace) -> list[list[int]]:
    return [row[row >= 0].tolist() for row in trace[-1].kept]


# -- the layout ------------------------------------------------------------------------------------


@torch.no_grad()
def test_layout_frames_class_tokens_and_prompt_order(video_llava):
    inputs = media_inputs([[2, "video", 1, "image", 3], [1, "image", 2, "image", 1, "video", 2]], frames=8)
    layout = VideoLlavaAdapter(video_llava).visual_layout(inputs)
    ids = inputs["input_ids"]
    assert torch.equal(layout.visual, (ids == IMAGE_TOKEN_ID) | (ids == VIDEO_TOKEN_ID))
    for b, expected_segments in enumerate([[0, 1, 2], [0, 1, 2, 3]]):
        video = int((ids[b] == VIDEO_TOKEN_ID).nonzero()[0])
        for t in range(8):
            cls = video + t * FRAME_TOKENS
            assert layout.coords[b, cls].tolist() == [t, 0, 0]
            assert layout.extent[b, cls].tolist() == [8, 1, 1]
            for cell in (0, 7, IMAGE_TOKENS - 1):
                assert layout.coords[b, cls + 1 + cell].tolist() == [t, cell // SIDE, cell % SIDE]
                assert layout.extent[b, cls + 1 + cell].tolist() == [8, SIDE, SIDE]
        assert list(dict.fromkeys(layout.segment[b][layout.visual[b]].tolist())) == expected_segments
    images = ids == IMAGE_TOKEN_ID
    assert layout.extent[images].unique(dim=0).tolist() == [[1, SIDE, SIDE]]
    video_llava(**inputs)  # the model itself accepts these placeholder counts


@torch.no_grad()
def test_generate_inputs_give_the_same_layout(video_llava):
    """`generate` passes encoded features only: frames per video come from the placeholder runs."""
    inputs = media_inputs([[2, "video", "video", 1, "image", 2], [1, "video", 3]], frames=2)
    adapter = VideoLlavaAdapter(video_llava)
    from_pixels = adapter.visual_layout(inputs)
    renamed = {k: v for k, v in inputs.items() if k != "pixel_values"}
    renamed["pixel_values_images"] = inputs["pixel_values"]  # the deprecated name, as `VideoLlavaModel` takes
    for other in (adapter.visual_layout(encoded(video_llava, inputs)), adapter.visual_layout(renamed)):
        for field in ("visual", "segment", "coords", "extent"):
            assert torch.equal(getattr(from_pixels, field), getattr(other, field)), field
    assert from_pixels.extent[from_pixels.visual].unique(dim=0).tolist() == [[1, 6, 6], [2, 1, 1], [2, 6, 6]]


@torch.no_grad()
def test_back_to_back_videos_in_every_run_read_as_one_longer_video(video_llava):
    """The documented limit of encoded inputs: without pixels, T divides every run (the largest such T)."""
    inputs = media_inputs([[2, "video", "video", 2]], frames=2)
    adapter = VideoLlavaAdapter(video_llava)
    assert adapter.frames_per_video(inputs, inputs["input_ids"] == VIDEO_TOKEN_ID) == [2, 2]
    features = encoded(video_llava, inputs)
    assert adapter.frames_per_video(features, features["input_ids"] == VIDEO_TOKEN_ID) == [4]


@torch.no_grad()
def test_full_feature_strategy_makes_the_image_class_token_a_segment(video_llava):
    inputs = media_inputs([[2, "image", 1, "video", 2]], frames=2)
    image = inputs["input_ids"][0] == IMAGE_TOKEN_ID
    first = int(image.nonzero()[0])
    ids = torch.cat([inputs["input_ids"][:, : first + 1], inputs["input_ids"][:, first:]], dim=1)
    full = {**inputs, "input_ids": ids, "attention_mask": torch.ones_like(ids)}
    full["vision_feature_select_strategy"] = "full"
    layout = VideoLlavaAdapter(video_llava).visual_layout(full)
    assert layout.extent[0, first].tolist() == [1, 1, 1] and layout.segment[0, first] == 0
    assert layout.extent[0, first + 1].tolist() == [1, SIDE, SIDE] and layout.segment[0, first + 1] == 1
    reference = video_llava(**full).logits
    with tp.attach(video_llava, tp.ReductionConfig(strategy="uniform", layer=1, ratio=0.0)) as handle:
        assert (video_llava(**full).logits - reference).abs().max() <= IDENTITY_TOL
        assert handle.trace[0].visual_before == [IMAGE_TOKENS + 1 + 2 * FRAME_TOKENS]
    with tp.attach(video_llava, tp.ReductionConfig(strategy="uniform", layer=1, ratio=0.5)) as handle:
        video_llava(**full)
        kept = handle.trace[0].kept
        video_llava.generate(**full, max_new_tokens=2, do_sample=False)  # encodes the image itself
        assert torch.equal(handle.trace[0].kept, kept)


def test_inconsistent_inputs_are_input_errors(video_llava):
    inputs = media_inputs([[2, "video", 2]], frames=2)
    adapter = VideoLlavaAdapter(video_llava)
    short = {**inputs, "input_ids": inputs["input_ids"][:, 1:]}
    short["input_ids"] = torch.cat([short["input_ids"][:, :3], short["input_ids"][:, 4:]], dim=1)
    with pytest.raises(tp.InputError, match="placeholder"):
        adapter.visual_layout(short)
    videos = inputs["pixel_values_videos"]
    with pytest.raises(tp.InputError, match="hold 0 image placeholder"):  # no embedding is a placeholder's
        adapter.visual_layout({"inputs_embeds": torch.zeros(1, 5, 64), "pixel_values_videos": videos})
    features = encoded(video_llava, short)
    with pytest.raises(tp.InputError, match="whole frames"):
        adapter.visual_layout(features)
    assert adapter.visual_layout({"input_ids": inputs["input_ids"]}) is None  # decode steps: no media


def test_chosen_automatically(video_llava):
    assert "video_llava" in tp.list_adapters()
    with tp.attach(video_llava, tp.ReductionConfig(ratio=0.5)) as handle:
        assert isinstance(handle.adapter, VideoLlavaAdapter)


# -- budgets and strategies -------------------------------------------------------------------------


@torch.no_grad()
@pytest.mark.parametrize("strategy", STRATEGIES)
@given(ratio=st.floats(0.0, 0.95), layer=st.integers(1, 3), frames=st.integers(1, 8))
def test_budgets_sample_and_per_frame(video_llava, strategy, ratio, layer, frames):
    """`sample`: one budget over every visual token; `per_frame`: each frame (segment, t) keeps its share."""
    inputs = media_inputs([[2, "video", 1, "image", 2], [1, "image", 1]], frames=frames)
    layout = VideoLlavaAdapter(video_llava).visual_layout(inputs)
    for budget in BUDGETS:
        config = tp.ReductionConfig(strategy=strategy, layer=layer, ratio=ratio, budget=budget)
        with tp.attach(video_llava, config) as handle:
            video_llava(**inputs, use_cache=False)
            (event,) = handle.trace
        for b, row in enumerate(kept_rows([event])):
            segments = layout.segment[b][row]
            n_visual = int(layout.visual[b].sum())
            assert int((segments >= 0).sum()) == event.visual_after[b]
            if budget == "sample":
                assert event.visual_after[b] == round(n_visual * (1 - ratio))
                continue
            kept_frames = layout.frame[b][row]
            for f in range(int(layout.frame[b].max()) + 1):
                size = int((layout.frame[b] == f).sum())
                assert int((kept_frames == f).sum()) == round(size * (1 - ratio)), (b, f)


@torch.no_grad()
@pytest.mark.parametrize("ratio", [0.5, 0.9])
def test_uniform_strides_over_frames_rows_and_columns(video_llava, ratio):
    inputs = media_inputs([[3, "video", 2]], frames=8)
    with tp.attach(video_llava, tp.ReductionConfig(strategy="uniform", layer=1, ratio=ratio)) as handle:
        video_llava(**inputs, use_cache=False)
        (row,) = kept_rows(handle.trace)
    offsets = [p - 3 for p in row if inputs["input_ids"][0, p] == VIDEO_TOKEN_ID]
    frame_of = [(o // FRAME_TOKENS, o % FRAME_TOKENS - 1) for o in offsets]
    classes = [(t, 0, 0) for t, cell in frame_of if cell < 0]
    cells = [(t, cell // SIDE, cell % SIDE) for t, cell in frame_of if cell >= 0]
    share_cls, share_cells = split_budget(round(8 * FRAME_TOKENS * (1 - ratio)), [8, 8 * IMAGE_TOKENS])
    assert classes == lattice((8, 1, 1), share_cls)
    assert cells == lattice((8, SIDE, SIDE), share_cells)
    assert len({t for t, _, _ in cells}) < 8  # a stride over time, not every frame thinned alike


# -- exactness ------------------------------------------------------------------------------------


@torch.no_grad()
@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("budget", BUDGETS)
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_ratio_zero_is_identity(video_llava, video_llava_eager, strategy, budget, attn):
    model = video_llava if attn == "sdpa" else video_llava_eager
    inputs = media_inputs([[2, "video", 1, "image", 2], [1, "image", 2, "image", 3]], frames=8)
    reference = run(model, inputs).logits
    reference_tokens = greedy(model, inputs, 4)
    with tp.attach(model, tp.ReductionConfig(strategy=strategy, layer=1, ratio=0.0, budget=budget)):
        logits = run(model, inputs).logits
        tokens = greedy(model, inputs, 4)
    real = inputs["attention_mask"].bool()
    assert (logits - reference)[real].abs().max() <= IDENTITY_TOL
    assert torch.equal(tokens, reference_tokens)


def assert_matches_oracles(model, inputs, config, steps: int = 3):
    """Prefill logits at kept positions and greedy generation with the cache equal the mask oracle's."""
    with tp.attach(model, config) as handle:
        logits = run(model, inputs).logits
        trace = handle.trace
        out = greedy(model, inputs, steps)
        assert torch.equal(handle.trace[0].kept, trace[0].kept)  # generate's encoded media: same layout
    expected = oracle_logits(model, inputs, trace, config=config)  # each stage's position policy
    for b, row in enumerate(kept_rows(trace)):
        assert (logits[b, row] - expected[b, row]).abs().max() <= LOGIT_TOL
    tokens, step_logits = oracle_greedy(model, inputs, trace, steps, config=config)
    assert_same_greedy(out, tokens, step_logits)


@torch.no_grad()
@pytest.mark.parametrize("strategy", PRUNING)
@given(
    batch=batches,
    frames=st.sampled_from([1, 3, 8]),
    layer=st.integers(1, 3),
    ratio=st.floats(0.1, 0.9),
    budget=st.sampled_from(BUDGETS),
)
def test_mask_oracle_prefill_and_cached_generation(
    video_llava, strategy, batch, frames, layer, ratio, budget
):
    config = tp.ReductionConfig(strategy=strategy, layer=layer, ratio=ratio, budget=budget)
    assert_matches_oracles(video_llava, media_inputs(batch, frames), config)


@torch.no_grad()
@pytest.mark.parametrize("score", ["last", "mean"])
def test_mask_oracle_eager_eight_frames(video_llava_eager, score):
    inputs = media_inputs([[3, "image", 2, "video", 2], [1, "video", 4]], frames=8)
    config = tp.ReductionConfig(layer=2, ratio=0.5, params={"score": score})
    assert_matches_oracles(video_llava_eager, inputs, config)


@torch.no_grad()
@pytest.mark.parametrize("strategy", PRUNING)
def test_mask_oracle_multi_stage(video_llava, strategy):
    inputs = media_inputs([[2, "video", 1, "image", 1], [3, "image", 2]], frames=8)
    config = tp.ReductionConfig(
        strategy=strategy, budget="per_frame", stages=[{"layer": 1, "ratio": 0.4}, {"layer": 3, "ratio": 0.7}]
    )
    assert_matches_oracles(video_llava, inputs, config)


@torch.no_grad()
@pytest.mark.parametrize("strategy", STRATEGIES)
@given(
    batch=st.lists(prompts, min_size=2, max_size=3),
    layer=st.integers(1, 3),
    ratio=st.floats(0.0, 0.9),
    budget=st.sampled_from(BUDGETS),
)
def test_batch_equals_each_sample_alone(video_llava, strategy, batch, layer, ratio, budget):
    inputs = media_inputs(batch, frames=2)
    pad = (1 - inputs["attention_mask"]).sum(1)
    config = tp.ReductionConfig(strategy=strategy, layer=layer, ratio=ratio, budget=budget)
    with tp.attach(video_llava, config) as handle:
        together = greedy(video_llava, inputs, 4)
        kept_together = kept_rows(handle.trace)
        for b, prompt in enumerate(batch):
            alone_inputs = media_inputs([prompt], frames=2, seed=b)
            alone, logits = greedy_with_logits(video_llava, alone_inputs, 4)
            assert [p - int(pad[b]) for p in kept_together[b]] == kept_rows(handle.trace)[0]
            assert_same_greedy(together[b : b + 1], alone, logits)


@torch.no_grad()
def test_detach_restores_outputs_exactly(video_llava):
    inputs = media_inputs([[2, "video", 1, "image", 2]], frames=8)
    hooks = sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in video_llava.modules())
    before = run(video_llava, inputs).logits
    handle = tp.attach(video_llava, tp.ReductionConfig(strategy="fastv", layer=2, ratio=0.75))
    reduced = run(video_llava, inputs).logits
    handle.detach()
    after = run(video_llava, inputs).logits
    assert not torch.equal(reduced, before)
    assert torch.equal(after, before)
    assert sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in video_llava.modules()) == hooks


def test_doc_example_runs():
    (line, code), *rest = marked_blocks(DOC)
    assert not rest, "one tested example"
    exec(compile("\n" * (line - 1) + code, str(DOC), "exec", dont_inherit=True), {"__name__": "docs_example"})
