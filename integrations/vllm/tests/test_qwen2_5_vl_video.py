"""vLLM + tokenprune-vllm == transformers + `tp.attach` on a tiny Qwen2.5-VL's videos (fp32, greedy, sharp
attention, RoPE base 4): its M-RoPE time ids step by `second_per_grid_ts` x `tokens_per_second` (here 2 s
per temporal patch x 2 = 4), which vLLM's front-end derives from the video's metadata (`engine.VIDEO_FPS`)
and the HF side gets from the same metadata through Qwen2.5-VL's own processor."""

from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import Any

import pytest
from engine import assert_vllm_equals_hf as parity
from engine import video, video_metadata
from test_qwen_positions_video import (
    MAX_TOKENS,
    MEDIA,
    MIXED,
    VIDEO_ALONE,
    Media,
    hf_greedy,
    saved_sharp_qwen,
)
from transformers import Qwen2_5_VLProcessor

from tokenprune.testing.models import VIDEO_TOKEN_ID, toy_qwen2_5_vl

# one engine start (~100 s): the kept tokens' own time-scaled ids, decode continuing after the unreduced
# prompt's largest (here a choice whose greedy tokens the timing changes on every video request)
CONFIG = {"strategy": "vidcom2", "layer": 0, "ratio": 0.6, "positions": "original"}


class TimedVideoProcessor(Qwen2_5_VLProcessor):
    """Qwen2.5-VL's processor on videos alone, given the metadata vLLM is given (`engine.video_metadata`):
    its `second_per_grid_ts` is the one vLLM's front-end computes with this processor."""

    def __call__(self, videos: list, **kwargs: Any) -> Any:
        metadata = [video_metadata(len(frames)) for frames in videos]
        return super().__call__(videos=videos, video_metadata=metadata, **kwargs)


IMAGES, VIDEOS = MEDIA
TIMED = (
    IMAGES,
    Media(
        "videos",
        video,
        TimedVideoProcessor,
        "pixel_values_videos",
        "video_grid_thw",
        VIDEO_TOKEN_ID,
        2,
        extras=("second_per_grid_ts",),
    ),
)


@pytest.fixture(scope="module")
def qwen2_5_vl(tmp_path_factory: pytest.TempPathFactory):
    """A seeded tiny Qwen2.5-VL and its processor in vLLM's layout; the HF model."""
    folder = tmp_path_factory.mktemp("qwen2_5-vl-video")
    return folder, saved_sharp_qwen(folder, toy_qwen2_5_vl, Qwen2_5_VLProcessor)


def test_the_videos_time_ids_step_by_more_than_one(qwen2_5_vl) -> None:
    """2 seconds per temporal patch x `tokens_per_second` 2: a step of 4, below the grid's side 7 (vLLM and
    transformers then continue the text after a video at the same id)."""
    folder, model = qwen2_5_vl
    processed = TimedVideoProcessor.from_pretrained(folder)([video(0)], return_tensors="pt")
    step = processed["second_per_grid_ts"].item() * model.config.vision_config.tokens_per_second
    frames, height, _ = processed["video_grid_thw"][0].tolist()
    assert step == 4 and (frames - 1) * step < height // model.config.vision_config.spatial_merge_size


def test_the_time_scaled_ids_change_hf_tokens_here(qwen2_5_vl) -> None:
    """The parity test tells the timing apart: the default timing (1 s per patch) changes HF's tokens."""
    folder, model = qwen2_5_vl
    timed, untimed = (
        partial(hf_greedy, model, folder, config=CONFIG, kinds=kinds) for kinds in (TIMED, MEDIA)
    )
    assert all(timed(request) != untimed(request) for request in [*VIDEO_ALONE, MIXED[1], MIXED[3]])


def test_reduced_vllm_equals_hf_attach(qwen2_5_vl, tmp_path: Path) -> None:
    folder, model = qwen2_5_vl
    hf = partial(hf_greedy, model, folder, config=CONFIG, kinds=TIMED)
    parity(folder, [VIDEO_ALONE, MIXED], MAX_TOKENS, CONFIG, tmp_path, hf)
