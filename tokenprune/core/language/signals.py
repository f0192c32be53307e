"""The signals of a language-model site: what the model computes around it, captured and offered lazily.

Per forward, `Pass.probe_inputs[site]` holds `"before"`: the probe of layer `site - 1` and what its
attention saw; `"entering"`: the hidden states entering layer `site` and the rotary tables the
model passes it (full length), as they are before the site reduces anything; `"embeddings"`: the
language model's input embeddings (layer 0's input, full length); `"crossed"`: the hidden states
layer `site - 1` received and returned (its own sequence, the one entering the site). They are
references to tensors the model computes anyway, dropped with the `Pass` at the end of the forward.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from tokenprune.contracts.adapter import Adapter
from tokenprune.contracts.probe import AttentionInputs
from tokenprune.contracts.reducer import Signals
from tokenprune.core.language.forward import Pass
from tokenprune.core.language.lifecycle import Hooks
from tokenprune.indexing import gather_tokens

# The slot of one site's captures in the running forward, or None between forwards.
CaptureSlot = Callable[[], dict[str, Any] | None]


def watch_site(adapter: Adapter, site: int, slot: CaptureSlot, hooks: Hooks) -> None:
    """Hooks keeping references to what the model computes around the site before layer `site`."""

    def entering(module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
        captured = slot()
        if captured is not None:
            hidden = args[0] if args else kwargs["hidden_states"]
            captured["entering"] = (hidden, kwargs.get("position_embeddings"))

    def embeddings(module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
        captured = slot()
        if captured is not None:
            captured["embeddings"] = args[0] if args else kwargs["hidden_states"]

    layers = adapter.decoder_layers()
    hooks.pre(layers[site], entering)
    hooks.pre(layers[0], embeddings)
    if site > 0:
        probe = adapter.probe(site - 1)

        def store(inputs: AttentionInputs) -> None:
            captured = slot()
            if captured is not None:
                captured["before"] = (probe, inputs)

        def crossed(module: nn.Module, args: tuple, kwargs: dict[str, Any], output: Any) -> None:
            captured = slot()
            if captured is not None:  # after the layer's pre-hooks: the sequence it really ran on
                received = args[0] if args else kwargs["hidden_states"]
                captured["crossed"] = (received, output[0] if isinstance(output, tuple) else output)

        hooks.add(probe.watch(store))
        hooks.add([layers[site - 1].register_forward_hook(crossed, with_kwargs=True)])


def site_signals(adapter: Adapter, state: Pass, layer: int, valid: Tensor) -> Signals:
    """The lazy signals of the site before decoder layer `layer`, on the sequence entering it.

    - `attention(query="last", rope=True, over="all")` [B, L]: head-averaged attention received
      at layer K-1 (needs K >= 1); `rope=False` drops the rotary embedding from queries and keys;
      `over="visual"` takes the softmax over the visual keys only.
    - `keys(rope=False, heads="mean")`: layer K-1's keys, float32 [B, L, d] averaged over heads or
      [B, L, Hkv*d] (`heads="concat"`), before (`rope=False`) or after the rotary embedding.
    - `next_attention(query="last", rope=True, over="all")` [B, L]: the same attention row computed
      with layer K's own input norm, projections and rotary tables on the hidden states entering
      it (PyramidDrop); available at every site, layer 0 included.
    - `normed_output()` [B, L, D] float32: the hidden states entering the site through the
      language model's final norm (DART's "outputs of layer K-1").
    - `attention_from(rows)` [B, L]: the attention each token receives at layer K-1 (with RoPE),
      averaged over heads and over the query rows `rows` [B, L] bool (SparseVLM's text raters);
      0 in a row without query rows.
    - `variation()` [B, L]: how much layer K-1 changed each token, the L2 norm of its output minus
      its input (V2Drop); needs no attention, so it exists under any backend (K >= 1).
    - `embeddings()` [B, L, D]: the language model's input embeddings of the current tokens
      (projector outputs for visual tokens, token embeddings for text), at every site.
    Every signal is on the device of `valid` (the hidden states the site meets).
    """
    captured = state.probe_inputs.get(layer, {})
    current, layout = state.current, state.layout  # the sequence before this stage reduces it
    device = valid.device

    def visual_keys(over: str) -> Tensor | None:
        if over not in ("all", "visual"):
            raise ValueError(f"signal option over={over!r}: expected 'all' or 'visual'")
        if over == "all":
            return None
        visual = layout.visual.to(device)
        return visual if current is None else gather_tokens(visual, current.index.to(device), 1)

    providers: dict[str, Callable[..., Tensor]] = {}
    before = captured.get("before")
    if before is not None:
        probe, inputs = before
        providers["attention"] = lambda query="last", rope=True, over="all": probe.received(
            inputs, valid, query, rope, visual_keys(over)
        )
        providers["keys"] = lambda rope=False, heads="mean": probe.keys(inputs, rope, heads).to(device)
        providers["attention_from"] = lambda rows: probe.received_from(inputs, valid, rows)
    if "crossed" in captured:
        received, returned = captured["crossed"]
        providers["variation"] = lambda: (returned.float() - received.float()).norm(dim=-1).to(device)
    if "embeddings" in captured:
        embedded = captured["embeddings"]
        providers["embeddings"] = lambda: (
            embedded if current is None else gather_tokens(embedded, current.index.to(embedded.device), 1)
        ).to(device)
    hidden, rotary = captured.get("entering", (None, None))
    norm = adapter.final_norm()
    if hidden is not None and norm is not None:

        def normed_output() -> Tensor:
            with torch.no_grad():
                return norm(on_module_device(hidden, norm)).float().to(device)

        providers["normed_output"] = normed_output
    if hidden is not None and rotary is not None:
        if before is not None and current is not None:  # the tables layer K-1 ran with: layer K's too
            rotary = before[1].rotary
        elif current is not None:
            rotary = tuple(gather_tokens(t, current.index.to(t.device), -2) for t in rotary)

        def next_attention(query: str = "last", rope: bool = True, over: str = "all") -> Tensor:
            probe, input_norm = adapter.probe(layer), adapter.input_norm(layer)
            with torch.no_grad():
                inputs = probe.project(input_norm(on_module_device(hidden, input_norm)), rotary)
            return probe.received(inputs, valid, query, rope, visual_keys(over))

        providers["next_attention"] = next_attention
    return Signals(providers)


def on_module_device(x: Tensor, module: nn.Module) -> Tensor:
    """`x` on the device of `module`'s weights, to call the module outside its layer's forward.

    Under a device map, a layer's pre-hooks see its inputs where the previous layer left them.
    Offloaded weights (on `meta`) are brought in by the module's own accelerate hook: `x` stays.
    """
    weight = next(module.parameters(), None)
    if weight is None or weight.device.type == "meta":
        return x
    return x.to(weight.device)
