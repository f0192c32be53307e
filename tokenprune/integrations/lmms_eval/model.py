"""The `tokenprune` model of lmms-eval: a checkpoint tokenprune drives, unreduced or with a reduction on.

`--model tokenprune --model_args KEY=VALUE,...` (`args.ModelArgs`): `pretrained` (a local folder, a hub
id or `builtin:toy-llava`, loaded by the lab's one loader), a reduction as `strategy`, `layer`, `keep` or
`ratio` and `params.NAME=value`, or as `reduction=PATH.yaml` (a `tp.ReductionConfig` file); neither
means unreduced. The adapter is chosen by the model's type as `tp.attach` chooses it (or `adapter`).

- Prompts: the processor's chat template where the checkpoint has one; else the loader's template
  (`Loaded.prompt`: the toy's own for `builtin:toy-llava`, LLaVA-1.5's for a checkpoint without one),
  with one image token per image, as `tokenprune ablate` builds them.
- `generate_until`: batches of `batch_size` samples of one task and one set of generation kwargs,
  left-padded; greedy unless the task asks for a temperature above 0. A sample's answer does not
  depend on its batch. `until` strings cut the answer after generation.
- `loglikelihood` (multiple choice): the context is prefilled with the reduction attached, the
  continuation runs on its reduced KV cache, one request at a time.
- Visuals: PIL images; videos as a file path (`max_frames` frames read by transformers' `load_video`),
  a list of PIL frames or a [T, H, W, C] array, for adapters whose processor takes `videos`.
- Costs per task (`efficiency.Efficiency`): written to `efficiency_path`, by default beside lmms-eval's
  results (`<output_path>/<model>/<time>_tokenprune_efficiency.json`) when it runs with `--output_path`.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
from lmms_eval.api.instance import Instance
from lmms_eval.api.model import lmms
from PIL import Image
from torch import Tensor
from transformers import LogitsProcessor, LogitsProcessorList

import tokenprune as tp
from tokenprune.core.language.forward import cache_of, with_cache
from tokenprune.errors import InputError
from tokenprune.flops import trace_flops
from tokenprune.integrations.lmms_eval import TASKS_DIR
from tokenprune.integrations.lmms_eval.args import ModelArgs, default_device
from tokenprune.integrations.lmms_eval.efficiency import Efficiency
from tokenprune.lab.batches import prompt_text
from tokenprune.lab.datasets import Sample
from tokenprune.lab.loading import Loaded, attached, load_model
from tokenprune.lab.machine_lock import computing
from tokenprune.lab.metrics import visual_counts
from tokenprune.lab.timing import now, synchronizer

DEFAULT_MAX_NEW_TOKENS = 128  # when a task gives none
VIDEO_SUFFIXES = (".mp4", ".avi", ".mov", ".mkv", ".webm", ".gif")
IMAGE_MARK = "<image>"


class TokenPruneLMM(lmms):
    """lmms-eval's `tokenprune` model: tokenprune's loader, adapters and reductions behind lmms-eval's API."""

    is_simple = True

    def __init__(self, **model_args: Any) -> None:
        super().__init__()
        args = ModelArgs.parse(model_args)
        reduction = args.reduction_config()
        loaded = load_model(
            args.pretrained,
            dtype=args.dtype,
            device=default_device(args.device),
            device_map=args.device_map,
            attn_implementation=args.attn_implementation,
            adapter=args.adapter,
        )
        path = Path(args.efficiency_path) if args.efficiency_path else cli_sidecar_path(args.pretrained)
        self._setup(loaded, args.pretrained, reduction, args.batch_size, args.max_frames, path)

    @classmethod
    def from_loaded(
        cls, loaded: Loaded, name: str, reduction: tp.ReductionConfig | None, batch_size: int
    ) -> TokenPruneLMM:
        """A model around an already loaded one (an ablation loads once and sets `reduction` per cell)."""
        self = cls.__new__(cls)
        lmms.__init__(self)
        self._setup(loaded, name, reduction, batch_size, ModelArgs().max_frames, None)
        return self

    def _setup(
        self,
        loaded: Loaded,
        name: str,
        reduction: tp.ReductionConfig | None,
        batch_size: int,
        max_frames: int,
        efficiency_path: Path | None,
    ) -> None:
        self.loaded = loaded
        self.name = name
        self.reduction = reduction
        self._batch_size = batch_size
        self.max_frames = max_frames
        self.efficiency_path = efficiency_path
        self.costs = Efficiency()
        self.first_batch: dict[str, Tensor] | None = None  # the first batch's inputs (CPU): a timing batch
        self._sync = synchronizer(loaded.device)

    @staticmethod
    def include_path() -> Path:
        """The folder of tokenprune's lmms-eval tasks (`tokenprune_toy_vqa`), for `--include_path`."""
        return TASKS_DIR

    @property
    def batch_size(self) -> int:
        return self._batch_size

    @property
    def device(self) -> torch.device:
        return self.loaded.device

    def generate_until(self, requests: list[Instance]) -> list[str]:
        """Answers to `requests` in their order, batched by task and generation kwargs, longest first."""
        answers = [""] * len(requests)
        for batch in self._batches(requests):
            args = [requests[i].args for i in batch]
            contexts = [a[0] for a in args]
            task, gen_kwargs = args[0][4], args[0][1]
            visuals = [self._visuals(*a[2:]) for a in args]
            for i, answer in zip(batch, self._generate(task, contexts, visuals, gen_kwargs), strict=True):
                answers[i] = answer
        self._write_costs()
        return answers

    def loglikelihood(self, requests: list[Instance]) -> list[tuple[float, bool]]:
        """(log-probability, is greedy) of each request's continuation after its context, one at a time."""
        scores = []
        for request in requests:
            context, target, doc_to_visual, doc_id, task, split = request.args
            doc = self.task_dict[task][split][doc_id]
            continuation = target if isinstance(target, str) else target(doc)
            try:
                scores.append(self._loglikelihood(task, context, continuation, doc_to_visual(doc)))
            except Exception as exc:
                raise InputError(
                    f"task {task!r}: the tokenprune model cannot score a multiple-choice continuation "
                    f"(loglikelihood) with adapter {self.loaded.adapter.name!r}: {type(exc).__name__}: {exc}"
                ) from exc
        self._write_costs()
        return scores

    def generate_until_multi_round(self, requests: list[Instance]) -> list[str]:
        """Multi-round tasks are not supported (each round would need its own reduced prefill)."""
        task = requests[0].task_name if requests else "?"
        raise InputError(f"task {task!r}: the tokenprune model does not run multi-round generation")

    def efficiency(self) -> dict[str, Any]:
        """The costs of each task answered so far (the sidecar's content)."""
        return self.costs.summary(self._run_info())

    def _batches(self, requests: Sequence[Instance]) -> Iterator[list[int]]:
        """Indices of `requests` in batches: one task and one set of generation kwargs each, longest first."""
        groups: dict[tuple[str, str], list[int]] = {}
        for i, request in enumerate(requests):
            key = (request.args[4], json.dumps(request.args[1], sort_keys=True, default=str))
            groups.setdefault(key, []).append(i)
        for indices in groups.values():
            ordered = sorted(indices, key=lambda i: -len(requests[i].args[0]))
            for start in range(0, len(ordered), self._batch_size):
                yield ordered[start : start + self._batch_size]

    def _visuals(self, doc_to_visual: Callable[[Any], Any], doc_id: int, task: str, split: str) -> list[Any]:
        """The images and videos lmms-eval's task gives for one document (none for a text-only one)."""
        return list(doc_to_visual(self.task_dict[task][split][doc_id]) or [])

    @torch.no_grad()
    @computing()  # waits while another tokenprune process times, as the lab's batches do
    def _generate(
        self, task: str, contexts: list[str], visuals: list[list[Any]], gen_kwargs: dict[str, Any]
    ) -> list[str]:
        """One batch's answers, with the reduction attached; its costs counted under `task`."""
        inputs = self._encode(contexts, visuals)
        settings, until = generation_settings(gen_kwargs)
        model, clock = self.loaded.model, FirstTokenClock(self._sync)
        with self._reduced() as (handle, timer):
            start = now(self._sync)
            out = model.generate(**inputs, **settings, logits_processor=LogitsProcessorList([clock]))
            trace = [] if handle is None else handle.trace
            overhead = None if timer is None else timer.seconds
        self._count(task, inputs, trace, clock.first - start, overhead)
        new = out[:, inputs["input_ids"].shape[1] :]
        texts = self.loaded.processor.batch_decode(new, skip_special_tokens=True)
        return [cut_at(text, until) for text in texts]

    @torch.no_grad()
    @computing()
    def _loglikelihood(self, task: str, context: str, continuation: str, visuals: Any) -> tuple[float, bool]:
        """The continuation's summed log-probability and whether greedy decoding would produce it."""
        inputs = self._encode([context], [list(visuals or [])])
        tokenizer = self.loaded.processor.tokenizer
        target = tokenizer(continuation, add_special_tokens=False, return_tensors="pt")["input_ids"]
        if target.shape[1] == 0:
            raise InputError(f"the continuation {continuation!r} has no tokens")
        target = target.to(self.device)
        model = self.loaded.model
        with self._reduced() as (handle, timer):
            start = now(self._sync)
            prefill = model(**inputs, use_cache=True)
            prefill_s = now(self._sync) - start
            logits = prefill.logits[:, -1:]
            if target.shape[1] > 1:
                mask = torch.cat([inputs["attention_mask"], torch.ones_like(target)], dim=1)
                rest = model(
                    input_ids=target[:, :-1],
                    attention_mask=mask[:, :-1],
                    **with_cache(cache_of(prefill)),
                    use_cache=True,
                )
                logits = torch.cat([logits, rest.logits], dim=1)
            trace = [] if handle is None else handle.trace
            overhead = None if timer is None else timer.seconds
        self._count(task, inputs, trace, prefill_s, overhead)
        logprobs = torch.log_softmax(logits[0].float(), dim=-1)
        picked = logprobs.gather(-1, target[0][:, None]).sum()
        return float(picked), bool((logprobs.argmax(dim=-1) == target[0]).all())

    @contextmanager
    def _reduced(self) -> Iterator[tuple[tp.Handle | None, tp.SelectionTimer | None]]:
        """The reduction attached for the block, with its selection timer; (None, None): unreduced."""
        with attached(self.loaded.model, self.reduction, self.loaded.adapter.name) as handle:
            if handle is None:
                yield None, None
                return
            with handle.time_selections(self._sync) as timer:
                yield handle, timer

    def _encode(self, contexts: Sequence[str], visuals: Sequence[list[Any]]) -> dict[str, Tensor]:
        """The processor's left-padded batch on the model's device, floating inputs in the model's dtype."""
        prompts, images, videos = [], [], []
        for context, items in zip(contexts, visuals, strict=True):
            sample_images, sample_videos = split_visuals(items, self.max_frames)
            prompts.append(self._prompt(context, len(sample_images), len(sample_videos)))
            images += sample_images
            videos += sample_videos
        media: dict[str, Any] = {}
        if images:
            media["images"] = images
        if videos:
            media["videos"] = videos
        batch = self.loaded.processor(
            text=prompts, padding=True, padding_side="left", return_tensors="pt", **media
        )
        if self.first_batch is None:
            self.first_batch = {name: value.cpu() for name, value in batch.items()}
        dtype = next(self.loaded.model.parameters()).dtype
        return {
            name: value.to(self.device, dtype) if value.is_floating_point() else value.to(self.device)
            for name, value in batch.items()
        }

    def _prompt(self, context: str, n_images: int, n_videos: int) -> str:
        """The chat template's prompt where the processor has one, else the loader's template."""
        processor = self.loaded.processor
        if getattr(processor, "chat_template", None):
            content = [{"type": "image"}] * n_images + [{"type": "video"}] * n_videos
            content.append({"type": "text", "text": context.replace(IMAGE_MARK, "").strip()})
            messages = [{"role": "user", "content": content}]
            return processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        if n_videos:
            raise InputError(
                f"model {self.name!r} has no chat template to place videos in its prompt: "
                "use a checkpoint saved with one"
            )
        return prompt_text(self.loaded, Sample("", [None] * n_images, context, []))

    def _count(
        self, task: str, inputs: dict[str, Tensor], trace: list, prefill_s: float, overhead: float | None
    ) -> None:
        """Add one batch's visual tokens, prefill FLOPs and seconds to `task`'s costs."""
        language = [event for event in trace if event.site == "language"]
        tokens = inputs["attention_mask"].sum(dim=1).tolist()
        before = language[0].visual_before if language else visual_counts(self.loaded.adapter, inputs)
        kept = language[-1].visual_after if language else before
        flops = trace_flops(self.loaded.adapter.text_config(), trace, tokens)
        self.costs.add(task, before, kept, flops, prefill_s, overhead)

    def _run_info(self) -> dict[str, Any]:
        """What ran: model, adapter, reduction, dtype, device, batch size, rank."""
        return {
            "tokenprune": tp.__version__,
            "model": self.name,
            "adapter": self.loaded.adapter.name,
            "reduction": None if self.reduction is None else self.reduction.model_dump(mode="json"),
            "dtype": str(next(self.loaded.model.parameters()).dtype).removeprefix("torch."),
            "device": str(self.device),
            "batch_size": self._batch_size,
            "rank": self.rank,
            "world_size": self.world_size,
        }

    def _write_costs(self) -> None:
        """Rewrite the sidecar file (one per rank under a data-parallel launch), when there is one."""
        if self.efficiency_path is None:
            return
        path = self.efficiency_path
        if self.world_size > 1:
            path = path.with_name(f"{path.stem}_rank{self.rank}{path.suffix}")
        self.costs.write(path, self._run_info())


class FirstTokenClock(LogitsProcessor):
    """Reads the clock when `generate` has the first token's logits: the end of the prefill."""

    def __init__(self, synchronize: Callable[[], None]) -> None:
        self.synchronize = synchronize
        self.first = float("nan")

    def __call__(self, input_ids: torch.LongTensor, scores: torch.Tensor) -> torch.Tensor:
        if self.first != self.first:  # NaN: not read yet
            self.first = now(self.synchronize)
        return scores


def generation_settings(gen_kwargs: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """`generate` arguments from a task's generation kwargs, and its `until` strings.

    Greedy unless `temperature` > 0 (or `do_sample`); `max_new_tokens` (default 128), `num_beams`,
    `top_p` pass through; other task-specific kwargs are ignored.
    """
    until = gen_kwargs.get("until") or []
    temperature = float(gen_kwargs.get("temperature") or 0.0)
    sample = bool(gen_kwargs.get("do_sample")) or temperature > 0
    settings: dict[str, Any] = {
        "max_new_tokens": int(gen_kwargs.get("max_new_tokens") or DEFAULT_MAX_NEW_TOKENS),
        "num_beams": int(gen_kwargs.get("num_beams") or 1),
        "do_sample": sample,
    }
    if sample:
        settings["temperature"] = temperature or 1.0
        if gen_kwargs.get("top_p") is not None:
            settings["top_p"] = float(gen_kwargs["top_p"])
    return settings, [until] if isinstance(until, str) else list(until)


def cut_at(text: str, until: Sequence[str]) -> str:
    """`text` up to the first of the `until` strings it contains."""
    for stop in until:
        if stop:
            text = text.split(stop, 1)[0]
    return text


def split_visuals(items: Sequence[Any], max_frames: int) -> tuple[list[Image.Image], list[Any]]:
    """A document's visuals as (images, videos): PIL images; video files, frame lists, [T, H, W, C] arrays."""
    images, videos = [], []
    for item in items:
        if isinstance(item, Image.Image):
            images.append(item.convert("RGB"))
        elif isinstance(item, str | Path) and str(item).lower().endswith(VIDEO_SUFFIXES):
            from transformers.video_utils import load_video

            videos.append(load_video(str(item), num_frames=max_frames)[0])
        elif isinstance(item, str | Path):
            with Image.open(item) as image:
                images.append(image.convert("RGB"))
        elif isinstance(item, list | tuple | np.ndarray | Tensor):
            videos.append(item)
        else:
            raise InputError(f"a visual of type {type(item).__name__} (audio?) is not supported")
    return images, videos


def cli_sidecar_path(model_name: str) -> Path | None:
    """Beside lmms-eval's results when this process is its command line with `--output_path`, else None."""
    if "lmms" not in Path(sys.argv[0]).as_posix():
        return None
    parser = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    parser.add_argument("--output_path")
    parser.add_argument("--timezone", default="Asia/Singapore")  # lmms-eval's default, for its file names
    known, _ = parser.parse_known_args(sys.argv[1:])
    if not known.output_path:
        return None
    from lmms_eval.utils import get_datetime_str, sanitize_model_name

    stamp = get_datetime_str(timezone=known.timezone)
    return Path(known.output_path) / sanitize_model_name(model_name) / f"{stamp}_tokenprune_efficiency.json"
