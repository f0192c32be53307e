"""The built-in trained model and task that need no download: the toy LLaVA answering `builtin:toy-vqa`.

The toy LLaVA is a trained `LlavaForConditionalGeneration` shipped as package data (see
`tools/train_toy.py` and docs/toy-model.md) and loaded through `from_pretrained`, as any local
checkpoint would be. Its folder also holds `tokenprune.json`: the prompt template, the number of
new tokens an answer takes and the accuracy measured when it was trained.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
from transformers import (
    AutoProcessor,
    BatchFeature,
    CLIPImageProcessor,
    LlavaForConditionalGeneration,
    LlavaProcessor,
    PreTrainedTokenizerFast,
    ProcessorMixin,
)

from tokenprune.builtin.toyvqa import (
    IMAGE_SIZE,
    PATCH_SIZE,
    Split,
    VQASample,
    generate_samples,
    normalize_answer,
    vocabulary,
)
from tokenprune.errors import ConfigError

TOY_LLAVA_DIR = Path(__file__).parent / "data" / "toy-llava"
BUILTIN_DATASETS = ("builtin:toy-vqa",)


@dataclass(frozen=True)
class BuiltinModel:
    """A loaded built-in model with its processor, prompt template (`{question}`) and answer length."""

    model: LlavaForConditionalGeneration
    processor: ProcessorMixin
    prompt: str
    max_new_tokens: int


def load_toy_llava(attn_implementation: str = "sdpa") -> BuiltinModel:
    """The trained toy LLaVA, in eval mode, float32, through `from_pretrained` on its package folder.

    Configs name it `builtin:toy-llava`: `tokenprune.lab.loading.BUILTIN_MODELS` is the one table of
    `builtin:` model names, for `tokenprune run` and `tokenprune ablate` alike.
    """
    folder = TOY_LLAVA_DIR
    model = LlavaForConditionalGeneration.from_pretrained(
        folder, attn_implementation=attn_implementation, dtype=torch.float32
    )
    settings = json.loads((folder / "tokenprune.json").read_text())
    return BuiltinModel(
        model.eval(), AutoProcessor.from_pretrained(folder), settings["prompt"], settings["max_new_tokens"]
    )


def builtin_dataset(name: str, split: Split, n: int, seed: int = 0) -> list[VQASample]:
    """`n` samples of a built-in task's split, deterministic in (split, seed)."""
    if name not in BUILTIN_DATASETS:
        raise ConfigError(f"unknown builtin dataset {name!r}; known: {', '.join(BUILTIN_DATASETS)}")
    return generate_samples(split, n, seed)


def encode(builtin: BuiltinModel, samples: Sequence[VQASample]) -> BatchFeature:
    """The processor's batch for `samples`: prompts left-padded so that generation continues them all."""
    prompts = [builtin.prompt.format(question=s.question) for s in samples]
    return builtin.processor(
        images=[s.image for s in samples],
        text=prompts,
        padding=True,
        padding_side="left",
        return_tensors="pt",
    )


@torch.no_grad()
def answer_questions(builtin: BuiltinModel, samples: Sequence[VQASample], batch_size: int = 32) -> list[str]:
    """The model's greedy answers to `samples`, decoded without special tokens, in batches."""
    answers = []
    for start in range(0, len(samples), batch_size):
        inputs = encode(builtin, samples[start : start + batch_size])
        output = builtin.model.generate(**inputs, max_new_tokens=builtin.max_new_tokens, do_sample=False)
        new = output[:, inputs["input_ids"].shape[1] :]
        answers += builtin.processor.batch_decode(new, skip_special_tokens=True)
    return answers


def vqa_accuracy(predictions: Sequence[str], samples: Sequence[VQASample]) -> float:
    """The fraction of predictions equal to one of their sample's answers, after `normalize_answer`."""
    hits = sum(
        normalize_answer(p) in {normalize_answer(a) for a in s.answers}
        for p, s in zip(predictions, samples, strict=True)
    )
    return hits / len(samples)


TOY_SPECIAL_TOKENS = ("<pad>", "<s>", "</s>", "<image>", "<unk>")  # ids 0-4; <image> 3 (testing.models)


def word_tokenizer(
    tokens: Sequence[str], special: Sequence[str], bos_first: bool = True
) -> PreTrainedTokenizerFast:
    """A word-level tokenizer: `tokens[i]` has id i (`<pad>`, `<s>`, `</s>`, `<unk>` among them).

    Lowercased, split on whitespace and punctuation, padded on the left; `special` are the extra
    special tokens (image placeholders); `bos_first` prepends `<s>` to every text.
    """
    core = Tokenizer(models.WordLevel({token: i for i, token in enumerate(tokens)}, unk_token="<unk>"))
    core.normalizer = normalizers.Lowercase()
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    if bos_first:
        bos = tokens.index("<s>")
        core.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", bos)])
    return PreTrainedTokenizerFast(
        tokenizer_object=core,
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        additional_special_tokens=list(special),
        padding_side="left",
        model_input_names=["input_ids", "attention_mask"],
    )


def toy_llava_processor() -> LlavaProcessor:
    """The toy LLaVA's processor: the task's words, `<image>` expanded to the 144 patch features (no CLS)."""
    size = {"height": IMAGE_SIZE, "width": IMAGE_SIZE}
    return LlavaProcessor(
        image_processor=CLIPImageProcessor(size=size, crop_size=size, do_center_crop=False),
        tokenizer=word_tokenizer([*TOY_SPECIAL_TOKENS, *vocabulary()], ["<image>"]),
        patch_size=PATCH_SIZE,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
    )
