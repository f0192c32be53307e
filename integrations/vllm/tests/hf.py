"""The Hugging Face side of the parity tests: greedy continuations, reduced by `tp.attach` or not."""

from __future__ import annotations

from collections.abc import Iterable
from contextlib import nullcontext
from typing import Any

import torch
from torch import Tensor

import tokenprune as tp
from tokenprune.testing.models import IMAGE_TOKEN_ID


def expanded(prompt: Iterable[int], counts: Iterable[int], placeholder: int = IMAGE_TOKEN_ID) -> Tensor:
    """The prompt's ids [1, N] with each `placeholder` (an image's, or a video's) repeated by its item's
    token count, in order."""
    counts = iter(counts)
    ids = [t for token in prompt for t in ([token] * next(counts) if token == placeholder else [token])]
    return torch.tensor([ids])


def greedy_continuation(
    model: Any, input_ids: Tensor, config: dict[str, Any] | None, max_tokens: int, **inputs: Tensor
) -> list[int]:
    """transformers' greedy tokens after `input_ids`, under `tp.attach(config)` unless None."""
    attached = nullcontext() if config is None else tp.attach(model, tp.ReductionConfig(**config))
    with attached, torch.no_grad():
        out = model.generate(
            input_ids=input_ids,
            attention_mask=torch.ones_like(input_ids),
            max_new_tokens=max_tokens,
            do_sample=False,
            **inputs,
        )
    return out[0, input_ids.shape[1] :].tolist()
