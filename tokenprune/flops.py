"""FLOPs of a language model's forward: the FastV paper's formula, and a faithful count from a model's shapes.

Two counts, for two purposes:

- **The paper's model** (FastV, arXiv:2403.06764, eq. 5): `C(n) = 4nd^2 + 2n^2d + 2ndm` per layer,
  for n tokens, hidden size d and FFN size m. It counts one unit per multiply-accumulate, an FFN of
  two matrices and a full (non-causal) n x n attention; it exists to reproduce the paper's table.
- **A faithful count** of a given model (`model_flops`): its own projection shapes (grouped-query
  attention: `num_key_value_heads` x `head_dim` for k and v), the attention scores and the weighted
  sum over every key slot, and three matrices (gate, up, down) for a gated MLP. A multiply-accumulate
  counts as **2 FLOPs**, the convention of `torch.utils.flop_counter` and of most hardware peak figures.
  Decoder layers only, matrix products only: embeddings, norms, rotary tables and softmax (O(n d)
  or O(n kv heads) element-wise work) and the LM head (one token per step in generation) are left out.

`tokens_per_layer` turns a `handle.trace` into the token count each decoder layer processed, so a
reduced run is counted with the lengths it actually ran at; `tower_flops` counts a VLM's vision tower
the same way from the trace's `site: vision` events (its own column: the decoder count leaves it out).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from tokenprune.contracts.reducer import Site
    from tokenprune.core.selection import ReductionEvent

BILLION = 1e9

# -- the FastV paper's model (eq. 5) --------------------------------------------------------------


def paper_layer_flops(n: float, d: float, m: float) -> float:
    """FastV eq. 5, one layer on n tokens: `4nd^2 + 2n^2d + 2ndm` (multiply-accumulates, 2-matrix FFN)."""
    return 4 * n * d**2 + 2 * n**2 * d + 2 * n * d * m


def paper_total_flops(n: float, n_kept: float, d: float, m: float, layers: int, k: int) -> float:
    """The paper's count of a whole model: K layers on n tokens, the other T - K on n' tokens."""
    return k * paper_layer_flops(n, d, m) + (layers - k) * paper_layer_flops(n_kept, d, m)


def paper_reduction(n: float, n_kept: float, d: float, m: float, layers: int, k: int) -> float:
    """The paper's reduction ratio `1 - (K C(n) + (T-K) C(n')) / (T C(n))` (0.453: 13B, K=2, R=50%)."""
    return 1.0 - paper_total_flops(n, n_kept, d, m, layers, k) / (layers * paper_layer_flops(n, d, m))


def paper_per_layer_billions(
    n: float, n_kept: float, d: float, m: float, layers: int, k: int
) -> tuple[float, float]:
    """The paper's FLOPs column (full, reduced), in billions: the model total divided by its T layers.

    "Per-layer average" is meant literally: full = `C(n)` (every layer alike), reduced =
    `(K C(n) + (T-K) C(n')) / T`. With n = 612, n' = 324 this gives LLaVA-1.5-13B (T=40, d=5120,
    m=13824) 154.6 -> 84.6 and LLaVA-1.5-7B (T=32, d=4096, m=11008) 99.3 -> 54.8, the paper's values
    to 0.1; no factor 2 (eq. 5 counts multiply-accumulates), no LM head, no vision tower.
    """
    full = paper_layer_flops(n, d, m)
    reduced = paper_total_flops(n, n_kept, d, m, layers, k) / layers
    return full / BILLION, reduced / BILLION


# -- a faithful count from a model's own shapes ---------------------------------------------------


@dataclass(frozen=True)
class LayerShape:
    """The widths that set one decoder layer's cost: hidden, heads, key/value heads, head dim, FFN."""

    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    gated: bool = True

    @classmethod
    def from_config(cls, config: Any, gated: bool = True) -> LayerShape:
        """Read the shapes from a text config (Llama, Mistral, Qwen2 style field names).

        `gated`: the MLP has three matrices (gate, up, down), as every Llama-family model has;
        pass False for a two-matrix MLP (GPT-2, OPT).
        """
        heads = config.num_attention_heads
        return cls(
            hidden=config.hidden_size,
            heads=heads,
            kv_heads=getattr(config, "num_key_value_heads", None) or heads,
            head_dim=getattr(config, "head_dim", None) or config.hidden_size // heads,
            intermediate=config.intermediate_size,
            gated=gated,
        )


def projection_flops(shape: LayerShape, n: int) -> int:
    """q, k, v and o projections of n tokens; k and v are `kv_heads * head_dim` wide (GQA)."""
    q_width = shape.heads * shape.head_dim
    kv_width = shape.kv_heads * shape.head_dim
    return 2 * n * shape.hidden * (2 * q_width + 2 * kv_width)


def attention_flops(shape: LayerShape, n: int, kv: int) -> int:
    """Scores `q k^T` and the weighted sum `p v`: `2 n kv head_dim` per head each, every key slot counted.

    A causal mask skips about half the pairs in principle; dense kernels (SDPA's math path, eager)
    compute them all, and the paper counts them all, so they are counted here too.
    """
    return 2 * (2 * n * kv * shape.head_dim * shape.heads)


def mlp_flops(shape: LayerShape, n: int) -> int:
    """The MLP of n tokens: three `d x m` matrices when gated (gate, up, down), two otherwise."""
    matrices = 3 if shape.gated else 2
    return matrices * 2 * n * shape.hidden * shape.intermediate


def layer_flops(shape: LayerShape, n: int, kv: int | None = None) -> int:
    """One decoder layer on n query tokens attending to kv key slots (kv = n in a prefill without cache)."""
    kv = n if kv is None else kv
    return projection_flops(shape, n) + attention_flops(shape, n, kv) + mlp_flops(shape, n)


def model_flops(
    text_config: Any,
    tokens_per_layer: Sequence[int],
    kv_lengths: Sequence[int] | None = None,
    gated: bool = True,
) -> int:
    """FLOPs of every decoder layer of one sample, layer i running on `tokens_per_layer[i]` tokens.

    `kv_lengths[i]`: key slots layer i attends to (cache included); None means a prefill without
    cache, where each layer attends to its own tokens. One count per sample: for a batch, sum the
    samples (padding slots are not counted). Multiply-accumulate = 2 FLOPs; see the module docstring.
    """
    n_layers = text_config.num_hidden_layers
    if len(tokens_per_layer) != n_layers:
        raise ValueError(f"{len(tokens_per_layer)} token counts given for a model of {n_layers} layers")
    if kv_lengths is None:
        kv_lengths = tokens_per_layer
    elif len(kv_lengths) != n_layers:
        raise ValueError(f"{len(kv_lengths)} kv lengths given for a model of {n_layers} layers")
    shape = LayerShape.from_config(text_config, gated=gated)
    return sum(layer_flops(shape, n, kv) for n, kv in zip(tokens_per_layer, kv_lengths, strict=True))


# -- token counts of a reduced run ------------------------------------------------------------------

# The first layer of its site that an event's reduction reaches: a language stage reduces the input of
# its decoder layer, a vision stage the output of its tower layer (the tower's next layer sees it first).
FIRST_REDUCED_LAYER = {"language": 0, "vision": 1}


def tokens_per_layer(
    n_layers: int,
    trace: Sequence[ReductionEvent],
    full_tokens: int | Sequence[int],
    site: Site = "language",
) -> list[list[int]]:
    """Per item, the tokens each layer of `site` processed in a run whose reductions are `trace`.

    Only the events of `site` count. `"language"`: the decoder's layers, one item per sample; from an
    event's `layer` on, a sample's layers see its `tokens_after`. The tokens a vision tower removed are
    already gone from every decoder layer: the session records them in a language event at layer 0.
    `"vision"`: a VLM tower's layers, one item per image (or frame, or tile) of the tower's batch; the
    layers after an event's `layer` see its `tokens_after`. Layers before the first event see
    `full_tokens` (an int for every item, or one per item). Padding and filler slots are not counted.
    """
    events = sorted((event for event in trace if event.site == site), key=lambda event: event.layer)
    batch = _batch_size(events, full_tokens)
    full = [full_tokens] * batch if isinstance(full_tokens, int) else list(full_tokens)
    counts = [[n] * n_layers for n in full]
    for event in events:
        if not 0 <= event.layer < n_layers:
            raise ValueError(f"{site} event at layer {event.layer}, the {site} model has {n_layers} layers")
        start = event.layer + FIRST_REDUCED_LAYER[site]
        for item, after in enumerate(event.tokens_after):
            counts[item][start:] = [after] * (n_layers - start)
    return counts


def trace_flops(
    text_config: Any, trace: Sequence[ReductionEvent], full_tokens: int | Sequence[int]
) -> list[int]:
    """Per sample, decoder `model_flops` of a prefill reduced as `trace` says (empty: the unreduced run).

    `full_tokens`: real tokens of each sample's input ids (an int for every sample). Vision-site events
    are left to `tower_flops`; their effect on the decoder is counted here.
    """
    counts = tokens_per_layer(text_config.num_hidden_layers, trace, full_tokens)
    return [model_flops(text_config, sample) for sample in counts]


def tower_flops(
    vision_config: Any, trace: Sequence[ReductionEvent], full_tokens: int | Sequence[int], gated: bool = False
) -> list[int]:
    """Per item of a VLM vision tower's batch (image, frame or tile), the FLOPs of its encoder layers.

    `vision_config`: the tower's config (CLIP style field names; `gated=False`: a two-matrix MLP, as
    CLIP and SigLIP have). `trace`: a run's events, of which the `site: vision` ones count (those of one
    tower); `full_tokens`: tokens entering the tower per item, class token included (CLIP-L/14 at 336px:
    577), an int for every item or one per item. Every layer of the tower is counted, as transformers
    runs them all, also those after the layer whose features reach the projector.
    """
    n_layers = vision_config.num_hidden_layers
    counts = tokens_per_layer(n_layers, trace, full_tokens, site="vision")
    shape = LayerShape.from_config(vision_config, gated=gated)
    return [sum(layer_flops(shape, n) for n in item) for item in counts]


def cached_entries(
    n_layers: int,
    trace: Sequence[ReductionEvent],
    full_tokens: int | Sequence[int],
    step: int,
    restore: bool = False,
) -> list[list[int]]:
    """Per sample, the prompt entries each layer's KV cache holds when decode forward `step` runs.

    Prefill (`site: language`) events set each layer's entries as `tokens_per_layer` does; a
    `site: cache` event of step <= `step` leaves, in layers >= its layer, the entries it kept that
    the layer still held (original positions, so a later prefill stage's removals stay removed).
    With `restore` (the cache stage's field) its entries stay in the cache, masked: a dense attention
    kernel still computes over them, so its events leave the counts as the prefill set them.
    """
    counts = tokens_per_layer(n_layers, trace, full_tokens)
    prefill = sorted((e for e in trace if e.site == "language"), key=lambda e: e.layer)
    due = [e for e in trace if e.site == "cache" and e.step is not None and e.step <= step]
    if not due or restore:
        return counts
    cache = max(due, key=lambda e: e.step)
    for item, sample in enumerate(counts):
        survivors = _positions(cache, item)
        for layer in range(cache.layer, n_layers):
            held = [e for e in prefill if e.layer <= layer]
            sample[layer] = len(survivors & _positions(held[-1], item)) if held else len(survivors)
    return counts


def decode_flops(
    text_config: Any,
    trace: Sequence[ReductionEvent],
    full_tokens: int | Sequence[int],
    new_tokens: int,
    restore: bool = False,
) -> list[int]:
    """Per sample, decoder `model_flops` of the decode forwards of a `new_tokens` generation.

    Forward i (1 .. new_tokens - 1) runs one token per layer over the prompt entries its cache holds
    then (`cached_entries`: prefill and `site: cache` reductions; with `restore`, entries set aside stay
    held and counted) and the i tokens since (itself included): the work of a dense attention kernel.
    """
    n_layers = text_config.num_hidden_layers
    per_sample: list[int] = []
    for step in range(1, new_tokens):
        counts = cached_entries(n_layers, trace, full_tokens, step, restore)
        flops = [model_flops(text_config, [1] * n_layers, [n + step for n in item]) for item in counts]
        per_sample = flops if not per_sample else [a + b for a, b in zip(per_sample, flops, strict=True)]
    return per_sample or [0] * len(tokens_per_layer(n_layers, trace, full_tokens))


def _positions(event: ReductionEvent, item: int) -> set[int]:
    """The original positions item `item` of an event keeps."""
    row = event.kept[item]
    return set(row[row >= 0].tolist())


def _batch_size(events: Sequence[ReductionEvent], full_tokens: int | Sequence[int]) -> int:
    """Items the counts are for: one per entry of `full_tokens`, else of the first event; all must agree."""
    if not isinstance(full_tokens, int):
        batch = len(full_tokens)
    elif events:
        batch = len(events[0].tokens_after)
    else:
        batch = 1
    for event in events:
        if len(event.tokens_after) != batch:
            items = len(event.tokens_after)
            raise ValueError(f"{event.site} event at layer {event.layer} has {items} items, expected {batch}")
    return batch
