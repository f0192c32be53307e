"""`--model_args` of lmms-eval's `tokenprune` model: validated, and turned into a `tp.ReductionConfig`.

lmms-eval parses `--model_args KEY=VALUE,...` into keyword arguments (numbers and booleans
converted); `ModelArgs.parse` validates them, gathering `params.NAME=value` into the strategy's
`params`, and every problem is a `ConfigError` naming the argument.
"""

from __future__ import annotations

import os
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError

import tokenprune as tp
from tokenprune.errors import ConfigError, describe_errors
from tokenprune.lab.loading import DType

PARAMS_PREFIX = "params."


class ModelArgs(BaseModel):
    """`--model_args` of `--model tokenprune` (`params.NAME=value` become `params`)."""

    model_config = ConfigDict(extra="forbid")

    pretrained: str = Field("builtin:toy-llava", description="a local folder, a hub id or builtin:toy-llava")
    strategy: str | None = Field(None, description="a registered strategy; None and no reduction: unreduced")
    layer: int | None = None
    keep: int | None = None
    ratio: float | None = None
    params: dict[str, Any] = Field(default_factory=dict, description="the strategy's parameters")
    reduction: str | None = Field(None, description="a ReductionConfig YAML or JSON file (not with strategy)")
    dtype: DType = "float32"
    device: str | None = Field(None, description="None: this process's GPU when there is one, else cpu")
    device_map: str | None = Field(None, description="accelerate's placement, e.g. auto")
    attn_implementation: Literal["sdpa", "eager", "flash_attention_2"] = "sdpa"
    adapter: str | None = Field(None, description="None: chosen by the model's type")
    batch_size: int = Field(1, ge=1)
    max_batch_size: int | None = Field(None, description="lmms-eval's automatic batch sizes: not used")
    max_frames: int = Field(8, ge=1, description="frames read from a video file")
    efficiency_path: str | None = Field(None, description="the costs' JSON file; None: beside the results")

    @classmethod
    def parse(cls, values: dict[str, Any]) -> ModelArgs:
        """The arguments lmms-eval parsed from `--model_args`; a ConfigError naming a bad or unknown one."""
        params = {k.removeprefix(PARAMS_PREFIX): v for k, v in values.items() if k.startswith(PARAMS_PREFIX)}
        plain = {k: v for k, v in values.items() if not k.startswith(PARAMS_PREFIX) and v is not None}
        try:
            return cls.model_validate({**plain, "params": params})
        except ValidationError as exc:
            raise ConfigError(
                f"--model_args of tokenprune: {describe_errors(exc, known_fields=cls.model_fields)}"
            ) from None

    def reduction_config(self) -> tp.ReductionConfig | None:
        """The reduction asked for: from `reduction`, or from `strategy` and its budget; None: unreduced."""
        fields = {"layer": self.layer, "keep": self.keep, "ratio": self.ratio}
        given = {name: value for name, value in fields.items() if value is not None}
        if self.reduction is not None:
            if self.strategy or given or self.params:
                raise ConfigError(
                    "--model_args of tokenprune: give either reduction=PATH or "
                    "strategy/layer/keep/ratio/params.NAME, not both"
                )
            return tp.load_config(self.reduction)
        if self.strategy is None:
            if given or self.params:
                raise ConfigError(
                    f"--model_args of tokenprune: {', '.join([*given, *self.params])} given without a "
                    "strategy: add strategy=NAME (e.g. strategy=fastv), or drop them to evaluate unreduced"
                )
            return None
        try:
            return tp.ReductionConfig(strategy=self.strategy, params=self.params, **given)
        except ValidationError as exc:
            raise ConfigError(f"--model_args of tokenprune: {describe_errors(exc)}") from None


def default_device(device: str | None) -> str:
    """The device asked for, one GPU per process under a data-parallel launch (`LOCAL_RANK`), or the CPU."""
    local_rank = os.environ.get("LOCAL_RANK")
    if device in (None, "cuda") and torch.cuda.is_available():
        return f"cuda:{local_rank or 0}"
    return device or "cpu"
