"""The built-in trained models and tasks that need no download: the toy LLaVA answering `builtin:toy-vqa`
and the toy Video-LLaVA answering `builtin:toy-video-vqa`.

Each is a trained model shipped as package data (see `tools/train_toy.py`, `tools/train_toy_video.py`,
docs/toy-model.md and docs/toy-video-model.md) and loaded through `from_pretrained`, as any local
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
    PreTrainedModel,
    PreTrainedTokenizerFast,
    ProcessorMixin,
    VideoLlavaForConditionalGeneration,
    VideoLlavaImageProcessor,
    VideoLlavaProcessor,
    VideoLlavaVideoProcessor,
)

from tokenprune.builtin import toyvideo
from tokenprune.builtin.toyvideo import VideoSample
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
TOY_VIDEO_LLAVA_DIR = Path(__file__).parent / "data" / "toy-video-llava"
GENERATORS = {"builtin:toy-vqa": generate_samples, "builtin:toy-video-vqa": toyvideo.generate_samples}
BUILTIN_DATASETS = tuple(GENERATORS)


@dataclass(frozen=True)
class BuiltinModel:
    """A loaded built-in model with its processor, prompt template (`{question}`) and answer length."""

    model: PreTrainedModel
    processor: ProcessorMixin
    prompt: str
    max_new_tokens: int


def load_toy_llava(attn_implementation: str = "sdpa") -> BuiltinModel:
    """The trained toy LLaVA, in eval mode, float32, through `from_pretrained` on its package folder.

    Configs name it `builtin:toy-llava`: `tokenprune.lab.loading.BUILTIN_MODELS` is the one table of
    `builtin:` model names, for `tokenprune run` and `tokenprune ablate` alike.
    """
    return _load(LlavaForConditionalGeneration, TOY_LLAVA_DIR, attn_implementation)


def load_toy_video_llava(attn_implementation: str = "sdpa") -> BuiltinModel:
    """The trained toy Video-LLaVA (`builtin:toy-video-llava`), in eval mode, float32, as `load_toy_llava`."""
    return _load(VideoLlavaForConditionalGeneration, TOY_VIDEO_LLAVA_DIR, attn_implementation)


def _load(model_class: type[PreTrainedModel], folder: Path, attn_implementation: str) -> BuiltinModel:
    """A built-in model's weights and processor through `from_pretrained`; its settings: tokenprune.json."""
    model = model_class.from_pretrained(folder, attn_implementation=attn_implementation, dtype=torch.float32)
    settings = json.loads((folder / "tokenprune.json").read_text())
    return BuiltinModel(
        model.eval(), AutoProcessor.from_pretrained(folder), settings["prompt"], settings["max_new_tokens"]
    )


def builtin_dataset(name: str, split: Split, n: int, seed: int = 0) -> list[VQASample] | list[VideoSample]:
    """`n` samples of a built-in task's split, deterministic in (split, seed)."""
    if name not in GENERATORS:
        raise ConfigError(f"unknown builtin dataset {name!r}; known: {', '.join(BUILTIN_DATASETS)}")
    return GENERATORS[name](split, n, seed)


def media(samples: Sequence[VQASample | VideoSample]) -> dict[str, list]:
    """The processor's media argument for `samples`: `videos` (frame lists) for clips, `images` otherwise."""
    if all(isinstance(s, VideoSample) for s in samples):
        return {"videos": [s.frames for s in samples]}
    return {"images": [s.image for s in samples]}


def encode(builtin: BuiltinModel, samples: Sequence[VQASample | VideoSample]) -> BatchFeature:
    """The processor's batch for `samples`: prompts left-padded so that generation continues them all."""
    prompts = [builtin.prompt.format(question=s.question) for s in samples]
    return builtin.processor(
        **media(samples), text=prompts, padding=True, padding_side="left", return_tensors="pt"
    )


@torch.no_grad()
def answer_questions(
    builtin: BuiltinModel, samples: Sequence[VQASample | VideoSample], batch_size: int = 32
) -> list[str]:
    """The model's greedy answers to `samples`, decoded without special tokens, in batches."""
    answers = []
    for start in range(0, len(samples), batch_size):
        inputs = encode(builtin, samples[start : start + batch_size])
        output = builtin.model.generate(**inputs, max_new_tokens=builtin.max_new_tokens, do_sample=False)
        new = output[:, inputs["input_ids"].shape[1] :]
        answers += builtin.processor.batch_decode(new, skip_special_tokens=True)
    return answers


def vqa_accuracy(predictions: Sequence[str], samples: Sequence[VQASample | VideoSample]) -> float:
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


TOY_VIDEO_TOKEN = "<video>"  # id 5, after TOY_SPECIAL_TOKENS


def toy_video_llava_processor() -> VideoLlavaProcessor:
    """The toy Video-LLaVA's processor: the task's words, `<video>` expanded to 8 x (1 + 16) frame tokens.

    Frames are resized to 32 x 32 with no centre crop (the generated frames go through unchanged apart
    from CLIP's normalisation); images, which the task never has, are processed the same way.
    """
    size = {"height": toyvideo.FRAME_SIZE, "width": toyvideo.FRAME_SIZE}
    resize = {"size": size, "crop_size": size, "do_center_crop": False}
    tokens = [*TOY_SPECIAL_TOKENS, TOY_VIDEO_TOKEN, *toyvideo.vocabulary()]
    return VideoLlavaProcessor(
        image_processor=VideoLlavaImageProcessor(**resize),
        video_processor=VideoLlavaVideoProcessor(**resize),
        tokenizer=word_tokenizer(tokens, ["<image>", TOY_VIDEO_TOKEN]),
        patch_size=toyvideo.PATCH_SIZE,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
    )
