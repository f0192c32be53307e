"""`tokenprune ablate` on a Qwen2-VL checkpoint loaded through `from_pretrained`.

The test saves a toy Qwen2-VL (random weights, `tokenprune.testing.models.toy_qwen2_vl`) with a real
`Qwen2VLProcessor` built offline: Qwen2-VL's image and video processors sized so that a 192 x 192
toy image becomes 12 x 12 patches of 4 pixels, 6 x 6 = 36 tokens after the 2 x 2 merger, and a
word-level tokenizer whose vision tokens sit at the toy config's ids. The run uses the builtin toy
VQA task in batches of 3 (left-padded). Answers of random weights mean nothing: no accuracy is checked.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import yaml
from conftest import assert_every_paper_grid_cell_reduces
from PIL import Image
from transformers import (
    AutoModelForImageTextToText,
    AutoProcessor,
    Qwen2VLForConditionalGeneration,
    Qwen2VLImageProcessor,
    Qwen2VLProcessor,
    Qwen2VLVideoProcessor,
)

from tokenprune.builtin.models import word_tokenizer
from tokenprune.builtin.toyvqa import IMAGE_SIZE, vocabulary
from tokenprune.lab.batches import prompt_text
from tokenprune.lab.cli import main
from tokenprune.lab.datasets import load_samples
from tokenprune.lab.results import read_rows
from tokenprune.testing.models import PAD_TOKEN_ID, ToySize, qwen_token_ids, toy_qwen2_vl
from tokenprune.testing.qwen_inputs import Item, QwenPrompt, qwen_inputs

PATCH = 4
MERGE = 2
SIDE = 48  # pixels after the processor's resize: 12 x 12 patches, 6 x 6 merged tokens
GRID = SIDE // PATCH // MERGE
TOKENS = GRID * GRID
VISION_TOKENS = {
    "image_token_id": "<|image_pad|>",
    "video_token_id": "<|video_pad|>",
    "vision_start_token_id": "<|vision_start|>",
    "vision_end_token_id": "<|vision_end|>",
}
PROMPT = "<|vision_start|><image><|vision_end|>{question}"
SAMPLES = 6
BATCH = 3


def toy_qwen_processor() -> Qwen2VLProcessor:
    """Qwen2-VL's processor over the toy task's words, its vision tokens at the toy config's ids."""
    ids = {"<pad>": PAD_TOKEN_ID, "<s>": 1, "</s>": 2}
    ids |= {VISION_TOKENS[name]: i for name, i in qwen_token_ids().items()}
    assert sorted(ids.values()) == list(range(len(ids)))
    for word in ["<unk>", *vocabulary()]:
        ids[word] = len(ids)
    tokenizer = word_tokenizer(sorted(ids, key=ids.get), VISION_TOKENS.values(), bos_first=False)
    sizes = {
        "size": {"shortest_edge": SIDE * SIDE, "longest_edge": SIDE * SIDE},  # min and max pixels
        "patch_size": PATCH,
        "merge_size": MERGE,
        "temporal_patch_size": 2,
    }
    return Qwen2VLProcessor(
        image_processor=Qwen2VLImageProcessor(**sizes),
        video_processor=Qwen2VLVideoProcessor(**sizes),
        tokenizer=tokenizer,
    )


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """The toy Qwen2-VL and its processor, saved for `from_pretrained`."""
    folder = tmp_path_factory.mktemp("qwen2-vl")
    processor = toy_qwen_processor()
    model = toy_qwen2_vl(ToySize(patch=PATCH, vocab=len(processor.tokenizer)), seed=1)
    model.generation_config.update(bos_token_id=1, eos_token_id=2, pad_token_id=PAD_TOKEN_ID)
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, checkpoint) -> Path:
    """fastv and random at K=1 R=0.5, divprune keep=4 at layer 0, through `tokenprune ablate`."""
    folder = tmp_path_factory.mktemp("run")
    config = {
        "output": str(folder / "runs"),
        "model": {"source": str(checkpoint), "prompt": PROMPT},
        "dataset": {"source": "builtin:toy-vqa", "limit": SAMPLES},
        "generation": {"max_new_tokens": 2},
        "batch_size": BATCH,
        "threads": 1,
        "timing": {"warmup": 0, "repeats": 1, "decode_tokens": 32},
        "grid": {
            "strategies": ["fastv", "random"],
            "layers": [1],
            "ratios": [0.5],
            "extra": [{"strategy": "divprune", "layer": 0, "keep": 4}],
        },
    }
    (folder / "qwen.yaml").write_text(yaml.safe_dump(config))
    torch.manual_seed(0)
    assert main(["ablate", str(folder / "qwen.yaml"), "--no-report"]) == 0
    return folder / "runs" / "qwen"


def test_the_checkpoint_loads_through_the_auto_classes(checkpoint):
    model = AutoModelForImageTextToText.from_pretrained(checkpoint, dtype=torch.float32)
    processor = AutoProcessor.from_pretrained(checkpoint)
    assert isinstance(model, Qwen2VLForConditionalGeneration) and isinstance(processor, Qwen2VLProcessor)
    for name, token in VISION_TOKENS.items():
        assert processor.tokenizer.convert_tokens_to_ids(token) == getattr(model.config, name)
    assert processor.image_token_id == model.config.image_token_id
    assert len(processor.tokenizer) <= model.config.text_config.vocab_size
    samples = load_samples("builtin:toy-vqa", "test", SAMPLES)
    prompts = [PROMPT.replace("<image>", processor.image_token).format(question=s.question) for s in samples]
    inputs = processor(images=[s.images[0] for s in samples], text=prompts, padding=True, return_tensors="pt")
    assert samples[0].images[0].size == (IMAGE_SIZE, IMAGE_SIZE)
    assert inputs["image_grid_thw"].tolist() == [[1, GRID * MERGE, GRID * MERGE]] * SAMPLES
    assert ((inputs["input_ids"] == model.config.image_token_id).sum(dim=1) == TOKENS).all()
    # "how many objects" is shorter than its neighbours: the first batch of 3 is left-padded
    assert len(set(inputs["attention_mask"][:BATCH].sum(dim=1).tolist())) > 1


def test_every_cell_of_the_grid_runs_on_qwen2_vl(finished_run):
    rows = read_rows(finished_run / "results.jsonl")
    assert [row["label"] for row in rows] == [
        "baseline",
        "fastv K=1 R=0.5",
        "random K=1 R=0.5 seed=0",
        "divprune K=0 keep=4",
    ]
    baseline, *reduced = rows
    assert baseline["top1_agreement"] == 1.0 and baseline["first_token_kl"] == 0.0
    assert baseline["continuation_match"] == 1.0 and baseline["flops_ratio"] == 1.0
    assert baseline["visual_tokens_before"] == baseline["visual_tokens_after"] == TOKENS
    assert baseline["survival"] is None
    for row, kept in zip(reduced, (TOKENS // 2, TOKENS // 2, 4), strict=True):
        assert row["samples"] == SAMPLES
        assert row["visual_tokens_before"] == TOKENS and row["visual_tokens_after"] == kept
        assert 0 < row["flops_ratio"] < 1 and row["kv_cache_bytes"] < baseline["kv_cache_bytes"]
        assert row["first_token_kl"] > 0  # against the unreduced distribution (against itself it is 0)
        assert len(row["predictions"]) == SAMPLES and row["timing_decode_tokens"] == 32
        survival = row["survival"]
        assert survival["grid"] == [GRID, GRID] and sum(s >= 0 for s in survival["state"]) == kept
    assert reduced[-1]["flops_ratio"] < reduced[0]["flops_ratio"]  # 4 tokens from layer 0 < 18 from 1


def test_the_sample_image_is_the_image_put_back_from_its_patches(finished_run):
    """Qwen2-VL's processor flattens the pixels into patch rows: the runner reassembles the first image."""
    drawn = np.asarray(Image.open(finished_run / "sample.png").convert("RGB"), dtype=float)
    image = load_samples("builtin:toy-vqa", "test", 1)[0].images[0].convert("RGB")
    resized = np.asarray(image.resize((SIDE, SIDE), Image.Resampling.BICUBIC), dtype=float)
    assert drawn.shape == (SIDE, SIDE, 3)
    assert np.abs(drawn - resized).mean() < 2.0  # the processor's resize, normalised and back


def test_the_report_is_built_from_the_qwen2_vl_rows(finished_run, capsys):
    assert main(["report", str(finished_run)]) == 0
    summary = (finished_run / "summary.md").read_text()
    assert summary.count("\n| ") == 5 and "| divprune K=0 keep=4 |" in summary
    assert {f"survival-{s}.png" for s in ("fastv", "random", "divprune")} <= {
        p.name for p in finished_run.iterdir()
    }


@pytest.mark.parametrize("mark", ["<image>", "<|image_pad|>"])
def test_the_processors_own_image_token_also_marks_where_the_images_go(mark):
    loaded = SimpleNamespace(
        processor=SimpleNamespace(image_token="<|image_pad|>"),
        prompt=f"<|vision_start|>{mark}<|vision_end|>{{question}}",
    )
    sample = SimpleNamespace(question="what colour is the circle?", images=[None, None], videos=[])
    assert prompt_text(loaded, sample) == (
        "<|vision_start|><|image_pad|><|image_pad|><|vision_end|>what colour is the circle?"
    )


@torch.no_grad()
def test_every_cell_of_the_qwen2_vl_paper_grid_reduces_a_model_of_its_depth():
    """configs/paper-grid-qwen2-vl.yaml on a Qwen2-VL with Qwen2-VL-2B's 28 decoder layers (tiny width)."""
    model = toy_qwen2_vl(ToySize(hidden=32, layers=28, intermediate=64), seed=2)
    prompts = [QwenPrompt([3, 4], [Item((1, 12, 12))]), QwenPrompt([2, 5], [Item((1, 8, 12))])]
    inputs = qwen_inputs(model, prompts)  # 36 and 24 visual tokens, left-padded
    assert_every_paper_grid_cell_reduces("paper-grid-qwen2-vl.yaml", model, inputs, [36, 24])
