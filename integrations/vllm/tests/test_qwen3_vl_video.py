"""vLLM + tokenprune-vllm == transformers + `tp.attach` on a tiny Qwen3-VL's timestamped videos (fp32, greedy,
sharp attention, RoPE base 4). Each temporal patch of a Qwen3-VL video is a frame of its own in the prompt,
`<t seconds><vision_start>` placeholders `<vision_end>`, so the processor can cut each frame's placeholders
only to a count known before the pixels: the frame's budget (`budget: per_frame`). Unreduced, `evs`
(renumbered) and `pool` (a merge, `original`), on a video alone, batches mixing image and video requests,
and a prompt holding both; under one budget per video the videos pass whole."""

from __future__ import annotations

from functools import partial
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from engine import VIDEO_FRAMES, Request, image, video, video_metadata
from engine import assert_vllm_equals_hf as parity
from hf import greedy_continuation
from test_qwen_positions_video import BOTH, MAX_TOKENS, MIXED, PIXELS, VIDEO_ALONE, with_sharp_attention
from test_qwen_vl import with_fast_rope
from tokenprune_vllm.checkpoints import VLLM_TOY_SIZE, word_tokenizer
from tokenprune_vllm.qwen2_vl import runs_cut
from tokenprune_vllm.qwen_vl import PrunedQwen3VLForConditionalGeneration
from transformers import Qwen2VLImageProcessor, Qwen3VLProcessor, Qwen3VLVideoProcessor

from tokenprune.testing.families.qwen3_vl import toy_qwen3_vl
from tokenprune.testing.models import (
    IMAGE_TOKEN_ID,
    VIDEO_TOKEN_ID,
    VISION_END_TOKEN_ID,
    VISION_START_TOKEN_ID,
)

# vLLM's Qwen3-VL front-end tokenizes these literal strings: the toy tokenizer names the ids so
QWEN_NAMES = {
    VIDEO_TOKEN_ID: "<|video_pad|>",
    VISION_START_TOKEN_ID: "<|vision_start|>",
    VISION_END_TOKEN_ID: "<|vision_end|>",
}
HALF = [0.5, 0.5, 0.5]  # Qwen3-VL's pixel mean and std (vLLM normalizes video pixels with the image ones)
# an engine start each. `pool` merges each frame into one token (which carries its survivor's DeepStack
# rows): that token misses its frame's last row and column, so the policies give different ids there (checked
# below); `evs` keeps frame 0's tokens, then the changed ones
SERVED = {
    "evs-per-frame": {"strategy": "evs", "layer": 0, "ratio": 0.5, "budget": "per_frame"},
    "pool-per-frame-original": {
        "strategy": "pool",
        "layer": 0,
        "keep": 1,
        "budget": "per_frame",
        "positions": "original",
    },
}


@pytest.fixture(scope="module")
def qwen3_vl(tmp_path_factory: pytest.TempPathFactory):
    """A seeded tiny Qwen3-VL (sharp attention, fast RoPE) and its processor in vLLM's layout; the HF
    model."""
    folder = tmp_path_factory.mktemp("qwen3-vl-video")
    model = with_sharp_attention(with_fast_rope(toy_qwen3_vl(VLLM_TOY_SIZE))).eval()
    model.save_pretrained(folder)
    size = {"shortest_edge": PIXELS, "longest_edge": 4 * PIXELS}
    roles = {"video_token": "<|video_pad|>", "vision_start_token": "<|vision_start|>"}
    Qwen3VLProcessor(
        image_processor=Qwen2VLImageProcessor(
            patch_size=VLLM_TOY_SIZE.patch, size=size, image_mean=HALF, image_std=HALF
        ),
        video_processor=Qwen3VLVideoProcessor(patch_size=VLLM_TOY_SIZE.patch, size=size),
        tokenizer=word_tokenizer(
            VLLM_TOY_SIZE.vocab, {**roles, "vision_end_token": "<|vision_end|>"}, QWEN_NAMES
        ),
    ).save_pretrained(folder)
    return folder, model


def hf_inputs(folder: Path, request: Request) -> dict[str, Any]:
    """transformers' inputs of `request` from Qwen3-VL's own processor: the prompt as text (the toy's
    words), each video expanded with its timestamps from the metadata vLLM is given."""
    processor = Qwen3VLProcessor.from_pretrained(folder)
    text = " ".join(processor.tokenizer.convert_ids_to_tokens(request.prompt))
    media: dict[str, Any] = {"images": [image(s) for s in request.images] or None}
    if request.videos:
        media["videos"] = [video(s) for s in request.videos]
        media["video_metadata"] = [video_metadata(VIDEO_FRAMES) for _ in request.videos]
    inputs = dict(processor(text=text, **media, do_sample_frames=False, return_tensors="pt"))
    ids = inputs["input_ids"]
    inputs["mm_token_type_ids"] = (ids == IMAGE_TOKEN_ID).long() + 2 * (ids == VIDEO_TOKEN_ID).long()
    return inputs


def hf_greedy(model, folder: Path, request: Request, config: dict[str, Any] | None) -> list[int]:
    """transformers' greedy continuation of `request` under `tp.attach(config)` (None: unreduced)."""
    inputs = hf_inputs(folder, request)
    ids = inputs.pop("input_ids")
    inputs.pop("attention_mask")
    return greedy_continuation(model, ids, config, MAX_TOKENS, **inputs)


def test_a_video_is_one_timestamped_run_of_placeholders_per_temporal_patch(qwen3_vl) -> None:
    """Its 4 frames make 2 temporal patches of 4 x 4 merged tokens: two runs, text before each."""
    ids = hf_inputs(qwen3_vl[0], VIDEO_ALONE[0])["input_ids"][0].tolist()
    runs = [len(run) for run in "".join("v" if t == VIDEO_TOKEN_ID else " " for t in ids).split()]
    assert runs == [16, 16]
    first = ids.index(VIDEO_TOKEN_ID)
    assert ids[first - 1] == VISION_START_TOKEN_ID and ids[first - 2] != VISION_START_TOKEN_ID  # a timestamp


def test_each_frames_run_is_cut_to_its_budget_and_restored_for_the_ids() -> None:
    """The processor's cut (`runs_cut`) and the M-RoPE override's restoration (`_full_span`) are inverse,
    a frame that keeps none included."""
    timestamp, frame = [0, 0, VISION_START_TOKEN_ID], [VIDEO_TOKEN_ID] * 4
    full = [*timestamp, *frame, VISION_END_TOKEN_ID] * 2
    for budget in [(2, 0), (4, 1), (0, 3)]:
        cut = runs_cut(full, VIDEO_TOKEN_ID, budget)
        expected = [*timestamp, *frame[: budget[0]], VISION_END_TOKEN_ID, *timestamp, *frame[: budget[1]]]
        assert cut == [*expected, VISION_END_TOKEN_ID]
        restored = PrunedQwen3VLForConditionalGeneration._full_span(qwen3_stand_in(), two_frame_video(), cut)
        assert restored == full


def qwen3_stand_in() -> SimpleNamespace:
    """What `_full_span` reads of a vLLM Qwen3-VL model, with its videos reduced."""
    config = SimpleNamespace(
        image_token_id=IMAGE_TOKEN_ID, video_token_id=VIDEO_TOKEN_ID, vision_end_token_id=VISION_END_TOKEN_ID
    )
    return SimpleNamespace(
        config=config,
        visual=SimpleNamespace(spatial_merge_size=2),
        frames_apart=True,
        _reduces=lambda _: True,
    )


def two_frame_video() -> SimpleNamespace:
    """A video feature of 2 temporal patches of 4 x 4 patches (2 x 2 merged tokens each)."""
    return SimpleNamespace(
        modality="video", data={"video_grid_thw": SimpleNamespace(data=torch.tensor([2, 4, 4]))}
    )


def test_the_position_policies_give_different_tokens_here(qwen3_vl) -> None:
    """The `original` parity test tells the policies apart: `renumbered` ids change HF's greedy tokens."""
    folder, model = qwen3_vl
    original = SERVED["pool-per-frame-original"]
    renumbered = {**original, "positions": "renumbered"}
    for request in (*VIDEO_ALONE, MIXED[1], MIXED[3]):
        assert hf_greedy(model, folder, request, original) != hf_greedy(model, folder, request, renumbered)


def test_unreduced_vllm_equals_unreduced_hf(qwen3_vl, tmp_path: Path) -> None:
    folder, model = qwen3_vl
    hf = partial(hf_greedy, model, folder, config=None)
    parity(folder, [VIDEO_ALONE, MIXED], MAX_TOKENS, None, tmp_path, hf)


@pytest.mark.parametrize("name", sorted(SERVED))
def test_reduced_vllm_equals_hf_attach(qwen3_vl, tmp_path: Path, name: str) -> None:
    config, (folder, model) = SERVED[name], qwen3_vl
    hf = partial(hf_greedy, model, folder, config=config)
    parity(folder, [VIDEO_ALONE, MIXED, BOTH], MAX_TOKENS, config, tmp_path, hf)


def test_one_budget_per_video_leaves_the_videos_whole(qwen3_vl, tmp_path: Path) -> None:
    """With `budget: sample` the images are reduced and the videos pass whole: vLLM's tokens equal HF's
    with the reduction on the image requests and none on the video ones."""
    folder, model = qwen3_vl
    config = {"strategy": "divprune", "layer": 0, "keep": 9}

    def hf(request: Request) -> list[int]:
        return hf_greedy(model, folder, request, None if request.videos else config)

    parity(folder, [VIDEO_ALONE, MIXED], MAX_TOKENS, config, tmp_path, hf)
