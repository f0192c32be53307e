"""The lab's one model loader and one dtype table: `tokenprune run`, `tokenprune ablate`, benchmarks/.

`load_model(source, ...)` takes a `builtin:` name (`BUILTIN_MODELS`: no download), a local checkpoint
folder or a hub id (through transformers' `from_pretrained`, `device_map` through accelerate), and
returns a `Loaded`: the model in eval mode, its processor, the prompt template and answer length it
expects, and the tokenprune adapter that drives it. `DTYPES` maps the dtype names configs use to
torch dtypes.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

import tokenprune as tp
from tokenprune.builtin.models import BuiltinModel, load_toy_llava, load_toy_video_llava
from tokenprune.errors import ConfigError
from tokenprune.testing.models import ToySize, toy_llava

DType = Literal["float32", "bfloat16", "float16"]
DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}
BUILTIN_PREFIX = "builtin:"
DEFAULT_PROMPT = "USER: <image>\n{question} ASSISTANT:"  # LLaVA-1.5's conversation format
DEFAULT_MAX_NEW_TOKENS = 16


@dataclass
class Loaded:
    """A model ready to answer: its processor (None when none is saved), prompt template and answer length."""

    model: nn.Module
    processor: Any | None
    prompt: str  # a template with {question}; <image> marks where the images go
    max_new_tokens: int
    adapter: tp.Adapter

    @property
    def device(self) -> torch.device:
        """The device of the model's first parameter: where its inputs go (the first one under device_map)."""
        return next(self.model.parameters()).device


def _toy_llava(attn_implementation: str) -> tuple[nn.Module, Any, str, int]:
    """`builtin:toy-llava`: the trained toy LLaVA shipped with the package, answering `builtin:toy-vqa`."""
    return _parts(load_toy_llava(attn_implementation))


def _toy_video_llava(attn_implementation: str) -> tuple[nn.Module, Any, str, int]:
    """`builtin:toy-video-llava`: the trained toy Video-LLaVA shipped with the package, answering
    `builtin:toy-video-vqa`."""
    return _parts(load_toy_video_llava(attn_implementation))


def _parts(builtin: BuiltinModel) -> tuple[nn.Module, Any, str, int]:
    """A loaded built-in model as `BUILTIN_MODELS` returns it: model, processor, prompt, answer length."""
    return builtin.model, builtin.processor, builtin.prompt, builtin.max_new_tokens


def _tiny_llava(attn_implementation: str) -> tuple[nn.Module, Any, str, int]:
    """`builtin:tiny-llava`: random seeded weights in LLaVA-1.5's layout (576 visual tokens), no processor."""
    size = ToySize(
        hidden=256,
        layers=8,
        heads=8,
        kv_heads=4,
        intermediate=704,
        grid=24,
        patch=14,
        vocab=1000,
        vision_hidden=64,
        vision_layers=2,
    )
    model = toy_llava(size, attn_implementation=attn_implementation)
    return model, None, DEFAULT_PROMPT, DEFAULT_MAX_NEW_TOKENS


BUILTIN_MODELS: dict[str, Callable[[str], tuple[nn.Module, Any, str, int]]] = {
    "builtin:toy-llava": _toy_llava,
    "builtin:tiny-llava": _tiny_llava,
    "builtin:toy-video-llava": _toy_video_llava,
}


def load_model(
    source: str,
    *,
    dtype: DType = "float32",
    device: str = "cpu",
    device_map: str | dict[str, int | str] | None = None,
    attn_implementation: str = "sdpa",
    adapter: str | None = None,
    processor: bool = True,
) -> Loaded:
    """A `builtin:` model, or a checkpoint (folder or hub id) through `from_pretrained`, in eval mode.

    `processor=False` skips loading the processor (`tokenprune run` feeds synthetic inputs); a
    checkpoint's prompt is LLaVA-1.5's and its answer length `DEFAULT_MAX_NEW_TOKENS`.
    """
    if source.startswith(BUILTIN_PREFIX):
        model, proc, prompt, answer_length = _builtin(source, device_map, attn_implementation)
        model = model.to(device, DTYPES[dtype])
    else:
        model = _from_pretrained(source, dtype, device, device_map, attn_implementation)
        proc = _processor(source) if processor else None
        prompt, answer_length = DEFAULT_PROMPT, DEFAULT_MAX_NEW_TOKENS
    model.eval()
    return Loaded(model, proc, prompt, answer_length, tp.adapter_for(model, adapter))


def _builtin(name: str, device_map: object, attn_implementation: str) -> tuple[nn.Module, Any, str, int]:
    """A model of `BUILTIN_MODELS` (float32, on the CPU), or a ConfigError listing the known names."""
    if name not in BUILTIN_MODELS:
        raise ConfigError(f"unknown builtin model {name!r}; known: {', '.join(BUILTIN_MODELS)}")
    if device_map is not None:
        raise ConfigError(f"{name} loads on one device: drop device_map and give device")
    return BUILTIN_MODELS[name](attn_implementation)


def _from_pretrained(
    source: str,
    dtype: DType,
    device: str,
    device_map: str | dict[str, int | str] | None,
    attn_implementation: str,
) -> nn.Module:
    """`AutoModelForImageTextToText.from_pretrained`, on `device` or placed by accelerate's `device_map`."""
    from transformers import AutoModelForImageTextToText

    if source.startswith(("/", ".", "~")) and not Path(source).expanduser().is_dir():
        raise ConfigError(f"model {source!r}: no such checkpoint folder")
    extra: dict[str, Any] = {}
    if device_map is not None:
        _require_accelerate()
        extra["device_map"] = device_map
    try:
        model = AutoModelForImageTextToText.from_pretrained(
            source, dtype=DTYPES[dtype], attn_implementation=attn_implementation, **extra
        )
    except (OSError, ValueError) as exc:  # not found, not a checkpoint
        raise ConfigError(f"model {source!r}: cannot load it with from_pretrained: {exc}") from exc
    return model if device_map is not None else model.to(device)


def _processor(source: str) -> Any:
    """The checkpoint's processor (`AutoProcessor`), or a ConfigError when none was saved with it."""
    from transformers import AutoProcessor

    try:
        return AutoProcessor.from_pretrained(source)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"model {source!r}: cannot load its processor: {exc}") from exc


def _require_accelerate() -> None:
    """A ConfigError saying what to install when `device_map` is asked for without accelerate."""
    try:
        import accelerate  # noqa: F401
    except ImportError:
        raise ConfigError("device_map needs the `accelerate` package: pip install accelerate") from None


@contextmanager
def attached(
    model: nn.Module, reduction: tp.ReductionConfig | None, adapter: str | None
) -> Iterator[tp.Handle | None]:
    """`reduction` attached to `model` for the block (None: the bare model, no handle), detached after."""
    if reduction is None:
        yield None
        return
    with tp.attach(model, reduction, adapter=adapter) as handle:
        yield handle
