"""Samples as model inputs: prompts from the template, the processor's left-padded batches, and back.

A batch carries its samples' ids, questions and answers (the per-sample predictions of a results row
name them), and each sample's reference-answer token: the first token of its first answer as the
prompt continues, whose first-step log-probability a cell records.

Batches stay on the CPU: `Batch.on(device)` moves one batch at a time to the model, so a run holds
one batch on the device, never the whole dataset. `model_view` turns a batch's pixels back into the
first image as the vision tower sees it (the background of the survival maps).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from PIL import Image
from torch import Tensor

from tokenprune.errors import ConfigError
from tokenprune.lab.datasets import Sample
from tokenprune.lab.loading import Loaded

IMAGE_MARK = "<image>"
VIDEO_MARK = "<video>"


@dataclass
class Batch:
    """Processor outputs of a few samples (left-padded, on the CPU), what each sample is and asks, its
    accepted answers, its real token count and its reference-answer token (None: none to score)."""

    inputs: dict[str, Tensor]
    ids: list[str]
    questions: list[str]
    answers: list[list[str]]
    tokens: list[int]
    answer_tokens: list[int | None]

    def on(self, device: torch.device) -> dict[str, Tensor]:
        """The inputs on `device`: a copy for one forward or generation, freed when the caller drops it."""
        return {name: tensor.to(device) for name, tensor in self.inputs.items()}


def make_batches(loaded: Loaded, samples: Sequence[Sample], batch_size: int) -> list[Batch]:
    """The samples as model inputs, `batch_size` at a time, kept on the CPU (see `Batch.on`)."""
    if loaded.processor is None:
        raise ConfigError(
            "this model has no processor to turn samples into inputs: use a checkpoint saved with one"
        )
    batches = []
    for start in range(0, len(samples), batch_size):
        chunk = samples[start : start + batch_size]
        texts = [prompt_text(loaded, s) for s in chunk]
        inputs = loaded.processor(
            **media(chunk),
            text=texts,
            padding=True,
            padding_side="left",
            return_tensors="pt",
        )
        inputs = {k: v.cpu() for k, v in inputs.items()}
        tokens = inputs["attention_mask"].sum(dim=1).tolist()
        answer_tokens = [
            answer_token(loaded.processor, text, s.answers[0]) for text, s in zip(texts, chunk, strict=True)
        ]
        batches.append(
            Batch(
                inputs=inputs,
                ids=[s.id for s in chunk],
                questions=[s.question for s in chunk],
                answers=[s.answers for s in chunk],
                tokens=tokens,
                answer_tokens=answer_tokens,
            )
        )
    return batches


def answer_token(processor: Any, prompt: str, answer: str) -> int | None:
    """The first token of `answer` as it continues `prompt` (the token a first step would have to pick).

    The answer follows the prompt after a space unless the prompt ends in whitespace (a chat
    template's `assistant\n`); the token is the first where the tokenised prompt and the tokenised
    prompt + answer part. None when they part inside the prompt (the answer merges with its last
    token) or the answer adds no token.
    """
    tokenizer = getattr(processor, "tokenizer", processor)
    separator = "" if prompt[-1:].isspace() else " "
    alone = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    whole = tokenizer(prompt + separator + answer, add_special_tokens=False)["input_ids"]
    common = _common_prefix(alone, whole)
    return whole[common] if common == len(alone) < len(whole) else None


def _common_prefix(first: Sequence[int], second: Sequence[int]) -> int:
    """How many leading tokens two token lists share."""
    for position, (a, b) in enumerate(zip(first, second, strict=False)):
        if a != b:
            return position
    return min(len(first), len(second))


def media(samples: Sequence[Sample]) -> dict[str, list]:
    """The processor's media arguments: the samples' `images`, and their `videos` when any has one
    (then `images` only when there are some: a video processor is not given an empty image list)."""
    images = [image for s in samples for image in s.images]
    videos = [video for s in samples for video in s.videos]
    if not videos:
        return {"images": images}
    return {"videos": videos, **({"images": images} if images else {})}


def prompt_text(loaded: Loaded, sample: Sample) -> str:
    """The template with the question, and one image (video) token per image (video) of the sample where
    `<image>` (`<video>`) is.

    The processor's own image token (Qwen2-VL's `<|image_pad|>`) marks the place as well as `<image>`;
    a template with neither gets `<image>\\n` in front (videos: the same with `<video>`).
    """
    text = loaded.prompt.format(question=sample.question)
    if sample.videos:
        video_token = getattr(loaded.processor, "video_token", None) or VIDEO_MARK
        text = _placed(text, VIDEO_MARK, video_token, len(sample.videos))
    if sample.images or not sample.videos:
        image_token = getattr(loaded.processor, "image_token", None) or IMAGE_MARK
        text = _placed(text, IMAGE_MARK, image_token, len(sample.images))
    return text


def _placed(text: str, mark: str, token: str, count: int) -> str:
    """`count` copies of `token` where `mark` (else `token`) is in `text`, or in front of it."""
    mark = mark if mark in text or token not in text else token
    if mark not in text:
        text = f"{mark}\n{text}"
    return text.replace(mark, token * count, 1)


def model_view(processor: Any, inputs: dict[str, Tensor]) -> Image.Image | None:
    """The first image of a batch as the vision tower sees it: pixel values, un-normalised.

    Pixels [images, C, H, W] or [images, tiles, C, H, W]: the first (tile). Flattened patch rows with
    their grids (Qwen2-VL's processors): the first image put back together. Else None (the survival
    maps are then drawn on a plain background).
    """
    pixels = inputs.get("pixel_values")
    image_processor = getattr(processor, "image_processor", None)
    if pixels is None:
        return None
    if pixels.ndim in (4, 5):
        first = pixels.reshape(-1, *pixels.shape[-3:])[0].float().cpu()
    elif pixels.ndim == 2:
        unflattened = _unpatchify(pixels, inputs.get("image_grid_thw"), image_processor)
        if unflattened is None:
            return None
        first = unflattened.float().cpu()
    else:
        return None
    mean = torch.tensor(getattr(image_processor, "image_mean", None) or [0.0, 0.0, 0.0])
    std = torch.tensor(getattr(image_processor, "image_std", None) or [1.0, 1.0, 1.0])
    rgb = (first * std[:, None, None] + mean[:, None, None]).clamp(0, 1)
    return Image.fromarray((rgb.permute(1, 2, 0).numpy() * 255).round().astype("uint8"))


def _unpatchify(rows: Tensor, grids: Tensor | None, image_processor: Any) -> Tensor | None:
    """[C, H, W] of the first image of flattened patch rows [sum(t * h * w), C * T * p * p].

    The layout of Qwen2-VL's image processors: per image, blocks of `merge x merge` patches in
    row-major order, the patches of a block in row-major order, each row (channel, time, y, x) with
    the image copied over the `T` time steps. None without the grids or the processor's sizes.
    """
    names = ("patch_size", "merge_size", "temporal_patch_size")
    sizes = [getattr(image_processor, name, None) for name in names]
    if grids is None or not all(isinstance(size, int) for size in sizes):
        return None
    patch, merge, temporal = sizes
    _, height, width = (int(x) for x in grids[0])
    channels = rows.shape[-1] // (temporal * patch * patch)
    if height % merge or width % merge or channels * temporal * patch * patch != rows.shape[-1]:
        return None
    blocks = rows[: height * width].reshape(
        height // merge, width // merge, merge, merge, channels, temporal, patch, patch
    )[..., 0, :, :]  # [H/m, W/m, m, m, C, p, p], first time step
    return blocks.permute(4, 0, 2, 5, 1, 3, 6).reshape(channels, height * patch, width * patch)
