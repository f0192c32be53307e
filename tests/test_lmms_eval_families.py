"""The lmms-eval `tokenprune` model on LLaVA-NeXT, Qwen2-VL and Qwen2.5-VL: images of their own token counts.

Tiny seeded models with real processors built offline (word tokenizers, image processors sized for
the toys, chat templates) answer questions about noise images of five sizes: LLaVA-NeXT tiles and
unpads them, Qwen resizes them to its patch grid, so each sample has its own count of visual tokens.
The oracles: the same requests at batch 1, and `tp.attach` + `generate` on the processor's own batch.
Random weights' answers mean nothing: only that they agree is checked.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import replace
from typing import Any

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before lmms-eval imports datasets, which reads them once
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
pytest.importorskip("lmms_eval")

import numpy as np
import torch
from lmms_eval.api.instance import Instance
from PIL import Image
from test_ablate_qwen2_vl import MERGE, PATCH, toy_qwen_processor
from test_lmms_eval import VIDEO_TEMPLATE
from transformers import (
    LlavaNextImageProcessor,
    LlavaNextProcessor,
    ProcessorMixin,
    Qwen2_5_VLProcessor,
    Qwen2VLImageProcessor,
    Qwen2VLProcessor,
    Qwen2VLVideoProcessor,
)

import tokenprune as tp
from tokenprune.builtin.models import toy_llava_processor
from tokenprune.integrations.lmms_eval.model import TokenPruneLMM
from tokenprune.lab.loading import Loaded
from tokenprune.testing.models import ToySize, toy_llava_next, toy_qwen2_5_vl, toy_qwen2_vl

FASTV_4 = tp.ReductionConfig(strategy="fastv", layer=1, keep=4)
REDUCTIONS = {"unreduced": None, "fastv": FASTV_4}
TASK = "families"
SIZES = [(40, 24), (32, 48), (64, 16), (40, 40), (24, 56)]  # (width, height): 15 to 25 Qwen tokens each
# longest first, the order the model answers them in: its per-sample costs are in document order
QUESTIONS = [
    "what colour is the circle?",
    "which shape is red?",
    "how many objects?",
    "what is this?",
    "how many?",
]
NEW_TOKENS = 4
QWEN_TEMPLATE = VIDEO_TEMPLATE.replace("<image> ", "<|vision_start|><|image_pad|><|vision_end|>").replace(
    "<video> ", "<|vision_start|><|video_pad|><|vision_end|>"
)
QWEN_PIXELS = {"shortest_edge": 8 * 8, "longest_edge": 64 * 64}  # min and max: the images keep their sizes


def qwen_loaded(
    toy: Callable[..., torch.nn.Module], processor_class: type[ProcessorMixin], seed: int
) -> Loaded:
    """A toy Qwen2-VL or Qwen2.5-VL with its processor: 4-pixel patches, 2 x 2 merger, a chat template."""
    tokenizer = toy_qwen_processor().tokenizer
    sizes = {"size": QWEN_PIXELS, "patch_size": PATCH, "merge_size": MERGE, "temporal_patch_size": 2}
    processor = processor_class(
        image_processor=Qwen2VLImageProcessor(**sizes),
        video_processor=Qwen2VLVideoProcessor(**sizes),
        tokenizer=tokenizer,
        chat_template=QWEN_TEMPLATE,
    )
    model = toy(ToySize(patch=PATCH, vocab=len(tokenizer)), seed=seed)
    return Loaded(model, processor, "{question}", NEW_TOKENS, tp.adapter_for(model))


def llava_next_loaded(seed: int) -> Loaded:
    """A toy LLaVA-NeXT with its processor: the model's tile side and grid pinpoints, a chat template."""
    tokenizer = toy_llava_processor().tokenizer
    size = replace(ToySize(), vocab=len(tokenizer))
    model = toy_llava_next(size, seed=seed)
    tile = size.grid * size.patch
    processor = LlavaNextProcessor(
        image_processor=LlavaNextImageProcessor(
            size={"shortest_edge": tile},
            crop_size={"height": tile, "width": tile},
            image_grid_pinpoints=model.config.image_grid_pinpoints,
        ),
        tokenizer=tokenizer,
        patch_size=size.patch,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=VIDEO_TEMPLATE,
    )
    return Loaded(model, processor, "{question}", NEW_TOKENS, tp.adapter_for(model))


FAMILIES = {  # seeds whose answers differ between images and between unreduced and FastV
    "llava_next": lambda: llava_next_loaded(seed=1),
    "qwen2_vl": lambda: qwen_loaded(toy_qwen2_vl, Qwen2VLProcessor, seed=3),
    "qwen2_5_vl": lambda: qwen_loaded(toy_qwen2_5_vl, Qwen2_5_VLProcessor, seed=5),
}


def noise_image(size: tuple[int, int]) -> Image.Image:
    """A seeded noise image of (width, height) `size`."""
    width, height = size
    pixels = np.random.default_rng(width * height).integers(0, 256, (height, width, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


def doc_to_visual(doc: dict[str, Any]) -> list[Image.Image]:
    """The document's one image, as an lmms-eval task's `doc_to_visual` gives it."""
    return [noise_image(doc["size"])]


DOCS = [{"question": q, "size": s} for q, s in zip(QUESTIONS, SIZES, strict=True)]


def ask(
    loaded: Loaded, reduction: tp.ReductionConfig | None, batch_size: int
) -> tuple[list[str], TokenPruneLMM]:
    """The plug-in's answers to every document, through `generate_until`, and the plug-in (its costs)."""
    lmm = TokenPruneLMM.from_loaded(loaded, "toy", reduction, batch_size=batch_size)
    lmm.task_dict = {TASK: {"test": DOCS}}
    requests = [
        Instance(
            request_type="generate_until",
            arguments=(doc["question"], {"max_new_tokens": NEW_TOKENS}, doc_to_visual, doc_id, TASK, "test"),
            idx=0,
            metadata={"task": TASK, "doc_id": doc_id, "repeats": 1},
        )
        for doc_id, doc in enumerate(DOCS)
    ]
    return lmm.generate_until(requests), lmm


@torch.no_grad()
def attach_and_generate(loaded: Loaded, reduction: tp.ReductionConfig | None) -> tuple[list[str], list]:
    """Answers of `model.generate` on the processor's left-padded batch of every document, and the trace."""
    processor = loaded.processor
    prompts = [
        processor.apply_chat_template(
            [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": doc["question"]}]}],
            add_generation_prompt=True,
            tokenize=False,
        )
        for doc in DOCS
    ]
    images = [noise_image(doc["size"]) for doc in DOCS]
    inputs = processor(text=prompts, images=images, padding=True, padding_side="left", return_tensors="pt")
    with tp.attach(loaded.model, reduction) if reduction else nullcontext() as handle:
        out = loaded.model.generate(**inputs, max_new_tokens=NEW_TOKENS, do_sample=False)
        trace = [] if handle is None else handle.trace
    new = out[:, inputs["input_ids"].shape[1] :]
    return processor.batch_decode(new, skip_special_tokens=True), trace


@pytest.fixture(scope="module", params=FAMILIES)
def loaded(request) -> Loaded:
    return FAMILIES[request.param]()


@pytest.fixture(scope="module")
def asked(loaded) -> dict[tuple[str, int], tuple[list[str], TokenPruneLMM]]:
    """The plug-in's answers, unreduced and with FastV, at batch 1 and 4 (5 documents: a batch of 1 too)."""
    return {(name, b): ask(loaded, reduction, b) for name, reduction in REDUCTIONS.items() for b in (1, 4)}


@pytest.fixture(scope="module")
def direct(loaded) -> dict[str, tuple[list[str], list]]:
    """The oracle's answers and trace, unreduced and with FastV."""
    return {name: attach_and_generate(loaded, reduction) for name, reduction in REDUCTIONS.items()}


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_batch_4_answers_equal_batch_1_answers(asked, reduction):
    (alone, _), (batched, lmm) = asked[reduction, 1], asked[reduction, 4]
    assert batched == alone
    assert len(set(alone)) > 1  # answers that depend on the image
    assert lmm.efficiency()["tasks"][TASK]["batches"] == 2


@pytest.mark.parametrize("batch_size", [1, 4])
def test_the_costs_count_each_images_tokens_and_keep_the_budget(asked, direct, batch_size):
    before = direct["fastv"][1][0].visual_before  # the adapter's layout of the processor's batch
    assert len(set(before)) > 1  # variable token counts per image: the point of these families
    for name, kept in (("unreduced", before), ("fastv", [FASTV_4.keep] * len(DOCS))):
        _, lmm = asked[name, batch_size]
        costs = lmm.costs.tasks[TASK]
        assert (costs.visual_before, costs.visual_kept) == (before, kept)
        assert lmm.efficiency()["tasks"][TASK]["visual_tokens_kept"] == sum(kept) / len(kept)


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_answers_are_those_of_attach_and_generate(asked, direct, reduction):
    """The plug-in adds nothing of its own: its prompts, batches and reduction are the direct ones."""
    assert asked[reduction, 4][0] == direct[reduction][0]
    assert asked["fastv", 4][0] != asked["unreduced", 4][0]  # the reduction changes answers: agreeing counts
