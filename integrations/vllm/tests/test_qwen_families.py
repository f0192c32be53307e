"""vLLM + tokenprune-vllm == transformers + `tp.attach` on tiny Qwen2.5-VL and Qwen3-VL models (fp32, greedy,
renumbered M-RoPE; Qwen3-VL's DeepStack features following the kept tokens), single requests and batches;
vLLM's own video pruning beside a reduction is refused."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from test_qwen_vl import assert_vllm_equals_hf, reduction, with_fast_rope
from tokenprune_vllm.checkpoints import VLLM_TOY_SIZE, word_tokenizer
from tokenprune_vllm.qwen2_vl import PrunedQwen2VLForConditionalGeneration, refuse_own_pruning
from tokenprune_vllm.qwen_vl import (
    PrunedQwen2_5_VLForConditionalGeneration,
    PrunedQwen3VLForConditionalGeneration,
)
from transformers import (
    Qwen2_5_VLProcessor,
    Qwen2VLImageProcessor,
    Qwen2VLVideoProcessor,
    Qwen3VLProcessor,
    Qwen3VLVideoProcessor,
)
from vllm.config import MultiModalConfig

from tokenprune.errors import ConfigError
from tokenprune.testing.families.qwen3_vl import toy_qwen3_vl
from tokenprune.testing.models import (
    VIDEO_TOKEN_ID,
    VISION_END_TOKEN_ID,
    VISION_START_TOKEN_ID,
    toy_qwen2_5_vl,
)

# family: (toy builder, processor, video processor); images only (videos: test_qwen2_5_vl_video.py,
# test_qwen3_vl_video.py)
FAMILIES = {
    "qwen2_5_vl": (toy_qwen2_5_vl, Qwen2_5_VLProcessor, Qwen2VLVideoProcessor),
    "qwen3_vl": (toy_qwen3_vl, Qwen3VLProcessor, Qwen3VLVideoProcessor),
}
# an engine start each (~100 s): per family the unreduced model, a feature-only choice and one more, a
# seeded choice on Qwen2.5-VL, a grid merge on Qwen3-VL (merged tokens carry their survivor's DeepStack rows)
REDUCED = {
    ("qwen2_5_vl", "divprune"): {"keep": 9},
    ("qwen2_5_vl", "random"): {"ratio": 0.5, "params": {"seed": 3}},
    ("qwen3_vl", "divprune"): {"keep": 9},
    ("qwen3_vl", "pool"): {"keep": 9},
}


@pytest.fixture(scope="module")
def qwen(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory):
    """A seeded tiny model of the family `request.param` with its processor, in the layout vLLM reads; and
    the HF model."""
    toy, processor, video_processor = FAMILIES[request.param]
    folder = tmp_path_factory.mktemp(request.param)
    model = with_fast_rope(toy(VLLM_TOY_SIZE)).eval()
    model.save_pretrained(folder)
    specials = {
        "video_token": f"w{VIDEO_TOKEN_ID}",
        "vision_start_token": f"w{VISION_START_TOKEN_ID}",
        "vision_end_token": f"w{VISION_END_TOKEN_ID}",
    }
    processor(
        image_processor=Qwen2VLImageProcessor(patch_size=VLLM_TOY_SIZE.patch),
        video_processor=video_processor(patch_size=VLLM_TOY_SIZE.patch),
        tokenizer=word_tokenizer(VLLM_TOY_SIZE.vocab, specials),
    ).save_pretrained(folder)
    return folder, model


@pytest.mark.parametrize("qwen", sorted(FAMILIES), indirect=True)
def test_unreduced_vllm_equals_unreduced_hf(qwen, tmp_path: Path) -> None:
    assert_vllm_equals_hf(qwen, tmp_path, None)


@pytest.mark.parametrize(
    ("qwen", "strategy", "budget"),
    [(family, strategy, budget) for (family, strategy), budget in sorted(REDUCED.items())],
    indirect=["qwen"],
)
def test_reduced_vllm_equals_hf_attach(qwen, tmp_path: Path, strategy: str, budget: dict[str, Any]) -> None:
    assert_vllm_equals_hf(qwen, tmp_path, reduction(strategy, budget))


@pytest.mark.parametrize("family", ["Qwen2.5-VL", "Qwen3-VL"])
def test_vllm_own_video_pruning_beside_a_reduction_is_refused(family: str) -> None:
    """The Qwen-VL classes check the engine's multimodal config when built, before the weights load."""
    refuse_own_pruning(MultiModalConfig(), family)  # vLLM's pruning off: served
    with pytest.raises(ConfigError, match=f"cannot serve {family} with vLLM's own video pruning on"):
        refuse_own_pruning(MultiModalConfig(video_pruning_rate=0.5), family)


@pytest.mark.parametrize(
    "model",
    [
        PrunedQwen2VLForConditionalGeneration,
        PrunedQwen2_5_VLForConditionalGeneration,
        PrunedQwen3VLForConditionalGeneration,
    ],
)
def test_the_processor_cuts_videos_exactly_where_the_model_reduces_them(model: type) -> None:
    """A model with text between its videos' frames (Qwen3-VL) gets a processor cutting each frame's run,
    and passing the videos whole where the model does (one budget per video): otherwise the prompt would
    hold another count of placeholders than the embeddings returned."""
    assert model._processor_factory.processor.frames_apart is model.frames_apart
