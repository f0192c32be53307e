"""vLLM + tokenprune-vllm == transformers + `tp.attach` on a tiny Qwen2-VL (fp32, greedy, renumbered M-RoPE);
a `site: vision` stage, which the Qwen-VL families do not serve, is refused at engine start, saying why."""

from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import Any

import pytest
from engine import Request, image, one_stage, run_engine, written
from engine import assert_vllm_equals_hf as parity
from hf import expanded, greedy_continuation
from tokenprune_vllm.checkpoints import VLLM_TOY_SIZE, word_tokenizer
from transformers import Qwen2VLImageProcessor, Qwen2VLProcessor, Qwen2VLVideoProcessor

from tokenprune.testing.models import (
    IMAGE_TOKEN_ID,
    VIDEO_TOKEN_ID,
    VISION_END_TOKEN_ID,
    VISION_START_TOKEN_ID,
    toy_qwen2_vl,
)

MAX_TOKENS = 8
ROPE_THETA = 4.0
IMAGE = [VISION_START_TOKEN_ID, IMAGE_TOKEN_ID, VISION_END_TOKEN_ID]
SINGLE = [Request([1, 17, *IMAGE, 40, 41, 42], [0])]
BATCH = [  # different images, prompts and lengths, the image at different places
    Request([1, 17, *IMAGE, 40, 41, 42], [1]),
    Request([1, *IMAGE, 90, 91], [2]),
    Request([1, 20, 21, 22, 23, *IMAGE, 55, 56, 57, 58, 59], [3]),
]
# the strategies run here (an engine start each, ~100 s): a feature-only choice, a grid merge, a seeded one
SERVED = {
    "divprune": {"keep": 9},
    "pool": {"keep": 9},
    "random": {"ratio": 0.5, "params": {"seed": 3}},
}


@pytest.fixture(scope="module")
def qwen2_vl(tmp_path_factory: pytest.TempPathFactory):
    """A seeded tiny Qwen2-VL with its processor, in the layout vLLM reads; and the HF model."""
    folder = tmp_path_factory.mktemp("qwen2-vl")
    model = with_fast_rope(toy_qwen2_vl(VLLM_TOY_SIZE)).eval()
    model.save_pretrained(folder)
    Qwen2VLProcessor(
        image_processor=Qwen2VLImageProcessor(patch_size=VLLM_TOY_SIZE.patch),
        video_processor=Qwen2VLVideoProcessor(patch_size=VLLM_TOY_SIZE.patch),
        tokenizer=word_tokenizer(VLLM_TOY_SIZE.vocab, {"video_token": f"w{VIDEO_TOKEN_ID}"}),
    ).save_pretrained(folder)
    return folder, model


def with_fast_rope(model):
    """The model with a small RoPE base: a few positions apart change the greedy tokens, so the parity
    tests check the M-RoPE ids too (at the default base these tiny models ignore small shifts)."""
    config = model.config
    config.text_config.rope_parameters["rope_theta"] = ROPE_THETA
    fast = type(model)(config)
    fast.load_state_dict(model.state_dict())
    fast.generation_config = model.generation_config  # the toy's suppressed placeholder ids
    return fast


def reduction(strategy: str, budget: dict[str, Any]) -> dict[str, Any]:
    """A one-stage layer-0 config (tokenprune numbers the shortened prompt: `renumbered`)."""
    return one_stage(strategy, {"layer": 0}, budget)


def hf_greedy(model, folder: Path, request: Request, config: dict[str, Any] | None) -> list[int]:
    """transformers' greedy continuation of `request`, under `tp.attach(config)` unless None."""
    pixels = Qwen2VLImageProcessor.from_pretrained(folder)(
        [image(s) for s in request.images], return_tensors="pt"
    )
    input_ids = expanded(request.prompt, (pixels.image_grid_thw.prod(-1) // 4).tolist())
    return greedy_continuation(
        model,
        input_ids,
        config,
        MAX_TOKENS,
        mm_token_type_ids=(input_ids == IMAGE_TOKEN_ID).long(),  # 1: image
        pixel_values=pixels.pixel_values,
        image_grid_thw=pixels.image_grid_thw,
    )


def assert_vllm_equals_hf(qwen2_vl, tmp_path: Path, config: dict[str, Any] | None) -> None:
    """Single requests and a batch of different ones: vLLM's tokens == HF's, request by request."""
    folder, model = qwen2_vl
    greedy = partial(hf_greedy, model, folder, config=config)
    parity(folder, [SINGLE, BATCH], MAX_TOKENS, config, tmp_path, greedy)


def test_unreduced_vllm_equals_unreduced_hf(qwen2_vl, tmp_path: Path) -> None:
    assert_vllm_equals_hf(qwen2_vl, tmp_path, None)


@pytest.mark.parametrize("strategy", sorted(SERVED))
def test_reduced_vllm_equals_hf_attach(qwen2_vl, tmp_path: Path, strategy: str) -> None:
    assert_vllm_equals_hf(qwen2_vl, tmp_path, reduction(strategy, SERVED[strategy]))


def test_a_vision_site_stops_the_engine_at_start(qwen2_vl, tmp_path: Path) -> None:
    """The Qwen-VL classes serve `layer: 0` stages only: a vision-tower stage stops the engine, saying why."""
    config = {
        "strategy": "divprune",
        "stages": [{"layer": 0, "site": "vision", "keep": 9}],
        "positions": "renumbered",
    }
    done = run_engine(qwen2_vl[0], [SINGLE], MAX_TOKENS, written(tmp_path, config), tmp_path)
    assert done.returncode != 0
    assert "serves Qwen2-VL with `layer: 0` reductions only" in done.stderr
