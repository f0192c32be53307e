"""What the benchmarks share: options, the machine line, paired-ratio rows, LLaVA-shaped prompts, the ideal.

Every comparison is a paired, order-alternating ratio from `tokenprune.lab.timing.paired_ratio`: the
median of per-repeat ratios (variant time over baseline time), its interquartile range, and a flag
when that spread exceeds 10%. The "ideal" is the work a perfect implementation of a pruning method
would do when handed the kept tokens: the model's own forward, with pre-hooks that run the decoder
layers from K on the kept hidden states, rotary tables and position ids (gathered once), and a mask
built once; no scoring, no checks, no restoring of the full length.
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
import transformers
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

import tokenprune as tp
from tokenprune.flops import model_flops
from tokenprune.indexing import gather_tokens
from tokenprune.lab.loading import DTYPES
from tokenprune.lab.timing import NOISY_SPREAD, PairedRatio, paired_ratio, synchronizer
from tokenprune.lab.timing import elapsed as clocked
from tokenprune.testing.models import IMAGE_TOKEN_ID, PAD_TOKEN_ID, ToySize, toy_llava

SMOKE_HELP = (
    "tiny sizes, 2 repeats: proves the script runs (tests/test_benchmarks.py); its timings mean nothing"
)
PAD_STEP = 3  # sample i of a padded batch has PAD_STEP * i padding tokens on the left

# -- options and the machine -------------------------------------------------------------------


def timing_arguments(parser: argparse.ArgumentParser, repeats: int = 9, warmup: int = 1) -> None:
    """--repeats, --warmup, --threads and --smoke, the same in every benchmark."""
    parser.add_argument("--repeats", type=int, default=repeats, help="paired repeats per ratio")
    parser.add_argument("--warmup", type=int, default=warmup, help="unrecorded pairs first")
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    parser.add_argument("--smoke", action="store_true", help=SMOKE_HELP)


def apply_smoke(args: argparse.Namespace, **tiny: Any) -> argparse.Namespace:
    """Under --smoke, overwrite the sizes with `tiny` and time 2 repeats after 1 warm-up pair."""
    if args.smoke:
        for name, value in {"repeats": 2, "warmup": 1, **tiny}.items():
            setattr(args, name, value)
    return args


def cpu_model() -> str:
    """The CPU's model name as `lscpu` prints it (from /proc/cpuinfo), or the platform's word for it."""
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return os.uname().machine


def machine() -> str:
    """One line naming the machine and the software: a timing is not readable without it."""
    return (
        f"{cpu_model()}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads; torch "
        f"{torch.__version__}, transformers {transformers.__version__}; {load()}"
    )


def quiet_run(args: argparse.Namespace) -> None:
    """Use `args.threads` torch threads and silence transformers' warnings: the table is the output."""
    torch.set_num_threads(args.threads)
    transformers.logging.set_verbosity_error()


def paired_description(args: argparse.Namespace) -> str:
    """How every ratio of a run is measured (`compare`)."""
    return f"paired ratios: median of {args.repeats} order-alternating repeats after {args.warmup} warm-up"


def load() -> str:
    """The 1-minute load average: above the core count, other work is skewing the timings."""
    return f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores"


# -- measuring ---------------------------------------------------------------------------------


def elapsed(
    run: Callable[[], object],
    setup: Callable[[], object] | None = None,
    teardown: Callable[[], object] | None = None,
) -> float:
    """Seconds of one `run()` under inference mode (the lab's clock, CUDA synchronised); `setup` and
    `teardown` run outside the clock.

    One call, no hidden warm-up calls (`paired_ratio` warms up): a LLaVA-shaped batch-8 prefill
    takes seconds, and every extra call of it multiplies the benchmark's wall time.
    """
    if setup is not None:
        setup()
    try:
        with torch.inference_mode():
            return clocked(run, synchronizer())
    finally:
        if teardown is not None:
            teardown()


ROW_HEADER = f"{'variant / baseline':<44}{'ratio':>8}{'IQR':>8}{'base ms':>10}{'var ms':>10}  flags"


def ratio_row(label: str, result: PairedRatio, target: float | None = None) -> str:
    """One printed row: median ratio, IQR, median times, the noise flag and a target verdict."""
    flags = [f"NOISY (spread {100 * result.spread:.0f}% > {100 * NOISY_SPREAD:.0f}%)"] if result.noisy else []
    if target is not None:
        flags.append(f"target <= {target:.2f}: {'met' if result.ratio <= target else 'MISSED'}")
    times = f"{1e3 * result.baseline_s:>10.1f}{1e3 * result.variant_s:>10.1f}"
    return f"{label:<44}{result.ratio:>8.3f}{result.iqr:>8.3f}{times}  {'; '.join(flags)}"


def compare(
    label: str,
    baseline: Callable[[], float],
    variant: Callable[[], float],
    args: argparse.Namespace,
    target: float | None = None,
) -> PairedRatio:
    """Measure `variant` against `baseline` with `paired_ratio` and print its row."""
    result = paired_ratio(baseline, variant, repeats=args.repeats, warmup=args.warmup)
    print(ratio_row(label, result, target), flush=True)
    return result


def check_close(what: str, a: Tensor, b: Tensor, dtype: torch.dtype) -> None:
    """Fail loudly when two runs that must agree do not (1e-4 in float32, 5e-2 in half precision)."""
    tolerance = 1e-4 if dtype == torch.float32 else 5e-2
    if not torch.allclose(a.float(), b.float(), atol=tolerance, rtol=tolerance):
        raise RuntimeError(f"{what}: last-token logits differ by {(a - b).abs().max().item():.2e}")


# -- LLaVA-shaped model and prompts --------------------------------------------------------------

LLAVA_SHAPE = {
    "hidden": 1024,
    "layers": 8,
    "heads": 16,
    "kv_heads": 16,
    "intermediate": 2816,
    "vocab": 32000,
    "grid": 24,
    "text_before": 24,
    "text_after": 16,
}
SMOKE_SHAPE = {
    "hidden": 64,
    "layers": 4,
    "heads": 4,
    "kv_heads": 2,
    "intermediate": 128,
    "vocab": 256,
    "grid": 4,
    "text_before": 8,
    "text_after": 4,
}


def llava_arguments(parser: argparse.ArgumentParser, **defaults: int) -> None:
    """Sizes of the LLaVA-shaped model (`LLAVA_SHAPE` unless `defaults` say otherwise) and --dtype."""
    for name, value in {**LLAVA_SHAPE, **defaults}.items():
        parser.add_argument(f"--{name.replace('_', '-')}", type=int, default=value)
    parser.add_argument("--dtype", choices=list(DTYPES), default="float32")


def llava_description(args: argparse.Namespace) -> str:
    """The model's shape in one line."""
    return (
        f"LLaVA-shaped random model: {args.layers} layers, hidden {args.hidden}, heads {args.heads}/"
        f"{args.kv_heads} kv, MLP {args.intermediate} (gated), vocab {args.vocab}, {args.dtype}, SDPA; "
        f"{args.grid**2} visual tokens between {args.text_before} and {args.text_after} text tokens"
    )


def llava_size(args: argparse.Namespace, vision_hidden: int, vision_layers: int) -> ToySize:
    """The `ToySize` of `llava_arguments`' sizes in `args`, 2-pixel patches and the given vision tower."""
    return ToySize(
        hidden=args.hidden,
        layers=args.layers,
        heads=args.heads,
        kv_heads=args.kv_heads,
        intermediate=args.intermediate,
        grid=args.grid,
        patch=2,
        vocab=args.vocab,
        vision_hidden=vision_hidden,
        vision_layers=vision_layers,
    )


def llava_model(args: argparse.Namespace) -> nn.Module:
    """`toy_llava` at the sizes of `args` (a one-layer vision tower: it is never timed)."""
    size = llava_size(args, vision_hidden=32, vision_layers=1)
    return toy_llava(size, attn_implementation="sdpa").to(DTYPES[args.dtype])


def llava_prompt(model: nn.Module, args: argparse.Namespace, batch: int) -> dict[str, Any]:
    """Model inputs for `batch` prompts of one image each; a batch > 1 is left-padded to one length.

    Sample i has `PAD_STEP * i` padding tokens in place of its first text tokens. The image
    features are computed here, once, and passed as `mm_encoder_outputs`: the tower is not timed.
    """
    generator = torch.Generator().manual_seed(0)
    text = torch.randint(10, args.vocab, (batch, args.text_before + args.text_after), generator=generator)
    image = torch.full((batch, args.grid**2), IMAGE_TOKEN_ID)
    ids = torch.cat([text[:, : args.text_before], image, text[:, args.text_before :]], dim=1)
    inputs: dict[str, Any] = {"input_ids": ids}
    if batch > 1:
        mask = torch.ones_like(ids)
        for sample in range(batch):
            padding = min(PAD_STEP * sample, args.text_before)
            ids[sample, :padding], mask[sample, :padding] = PAD_TOKEN_ID, 0
        inputs["attention_mask"] = mask
    side = 2 * args.grid  # patch 2
    pixels = torch.randn(batch, 3, side, side, generator=generator).to(DTYPES[args.dtype])
    with torch.inference_mode():
        features = model.model.get_image_features(pixel_values=pixels, return_dict=True)
    inputs["mm_encoder_outputs"] = {"image": features}
    return inputs


def prefill_logits(model: nn.Module, inputs: dict[str, Any]) -> Tensor:
    """The model's own forward without a cache; last-token logits only, as in generation."""
    return model(**inputs, use_cache=False, logits_to_keep=1).logits


# -- tokenprune and the ideal handed its indices ----------------------------------------------


def ideal_hooks(layers: list[nn.Module], k: int, kept: Tensor) -> list[RemovableHandle]:
    """Pre-hooks running layers >= `k` on the tokens `kept` [B, L] (original positions, -1: filler).

    At layer k, inside the forward, the hidden states, rotary tables and position ids are gathered
    and the mask is built, once; later layers reuse them. The mask is None (SDPA's causal kernel)
    when no slot is filler, else a boolean [B, 1, L, L] causal mask over the real slots.
    """
    shortened: dict[str, Any] = {}

    def hook(module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> tuple[tuple, dict[str, Any]]:
        positional = bool(args)
        hidden = args[0] if positional else kwargs["hidden_states"]
        if module is layers[k]:
            hidden = gather_tokens(hidden, kept, 1)
            shortened["attention_mask"] = _kept_mask(kept)
            shortened["position_embeddings"] = tuple(
                gather_tokens(t, kept, -2) for t in kwargs["position_embeddings"]
            )
            if kwargs.get("position_ids") is not None:
                shortened["position_ids"] = gather_tokens(kwargs["position_ids"], kept, -1)
        if positional:
            return (hidden, *args[1:]), {**kwargs, **shortened}
        return args, {**kwargs, **shortened, "hidden_states": hidden}

    return [layer.register_forward_pre_hook(hook, with_kwargs=True) for layer in layers[k:]]


def _kept_mask(kept: Tensor) -> Tensor | None:
    """None when every slot is a real token; else the boolean causal mask over real keys.

    A filler query attends to itself only, so that no row of the softmax is empty.
    """
    valid = kept >= 0
    if bool(valid.all()):
        return None
    length = kept.shape[1]
    causal = torch.ones(length, length, dtype=torch.bool, device=kept.device).tril()
    itself = torch.eye(length, dtype=torch.bool, device=kept.device)
    return ((causal & valid[:, None, :]) | itself)[:, None]


def removing(handles: list[RemovableHandle]) -> None:
    """Remove every hook of `handles` and empty the list."""
    while handles:
        handles.pop().remove()


def kept_tokens(
    model: nn.Module, inputs: dict[str, Any], config: tp.ReductionConfig
) -> tuple[Tensor, Tensor]:
    """(kept [B, L] from the trace, last-token logits) of one prefill under `config`."""
    with tp.attach(model, config) as handle, torch.inference_mode():
        logits = prefill_logits(model, inputs)
        kept = handle.trace[0].kept
    return kept, logits


def tokenprune_run(
    model: nn.Module, inputs: dict[str, Any], config: tp.ReductionConfig
) -> Callable[[], float]:
    """Seconds of one prefill with `config` attached (attach and detach outside the clock)."""
    handles: list[tp.Handle] = []
    return lambda: elapsed(
        lambda: prefill_logits(model, inputs),
        setup=lambda: handles.append(tp.attach(model, config)),
        teardown=lambda: handles.pop().detach(),
    )


def ideal_run(model: nn.Module, inputs: dict[str, Any], k: int, kept: Tensor) -> Callable[[], float]:
    """Seconds of one prefill of the ideal handed `kept` (its hooks placed and removed outside the clock)."""
    layers = list(tp.adapter_for(model).decoder_layers())
    handles: list[Any] = []
    return lambda: elapsed(
        lambda: prefill_logits(model, inputs),
        setup=lambda: handles.extend(ideal_hooks(layers, k, kept)),
        teardown=lambda: removing(handles),
    )


def ideal_logits(model: nn.Module, inputs: dict[str, Any], k: int, kept: Tensor) -> Tensor:
    """Last-token logits of the ideal handed `kept`."""
    handles = ideal_hooks(list(tp.adapter_for(model).decoder_layers()), k, kept)
    try:
        with torch.inference_mode():
            return prefill_logits(model, inputs)
    finally:
        removing(handles)


def flops_bound(text_config: Any, k: int, full: int, kept: int) -> float:
    """Unreduced decoder FLOPs over reduced ones (layers >= `k` on `kept` slots: what really runs)."""
    layers = text_config.num_hidden_layers
    reduced = [full] * k + [kept] * (layers - k)
    return model_flops(text_config, [full] * layers) / model_flops(text_config, reduced)


# -- timing tokenprune's own hooks ----------------------------------------------------------


def hooks_by_module(model: nn.Module) -> dict[nn.Module, set[int]]:
    """The ids of every forward (pre-)hook on every module: what exists before attaching."""
    return {module: {*module._forward_pre_hooks, *module._forward_hooks} for module in model.modules()}


def hook_label(hook: Callable) -> str:
    """A readable name of a hook, from its own code (so renaming a hook renames its row)."""
    return getattr(hook, "__qualname__", type(hook).__name__).replace(".<locals>", "")


def time_new_hooks(model: nn.Module, before: dict[nn.Module, set[int]], totals: dict[str, float]) -> None:
    """Wrap every hook placed since `before` so that its seconds add up in `totals` by hook name.

    The wrappers replace the hooks under their own ids, so detaching removes them as usual.
    """
    for module, known in before.items():
        for hooks in (module._forward_pre_hooks, module._forward_hooks):
            for key in set(hooks) - known:
                hooks[key] = _timed_hook(hooks[key], hook_label(hooks[key]), totals)


def _timed_hook(hook: Callable, label: str, totals: dict[str, float]) -> Callable:
    """`hook`, adding the seconds of each call to `totals[label]`."""

    def timed(*args: Any, **kwargs: Any) -> Any:
        start = time.perf_counter()
        try:
            return hook(*args, **kwargs)
        finally:
            totals[label] = totals.get(label, 0.0) + time.perf_counter() - start

    return timed


@contextmanager
def timed_attachment(
    model: nn.Module, config: tp.ReductionConfig, totals: dict[str, float]
) -> Iterator[tp.Handle]:
    """Attach `config` with every hook it places timed into `totals`; detach on exit."""
    before = hooks_by_module(model)
    with tp.attach(model, config) as handle:
        time_new_hooks(model, before, totals)
        yield handle
