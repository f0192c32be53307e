"""Per-block reduction schedules of vision transformers (ToMe's r) and the stages they amount to."""

from __future__ import annotations

from tokenprune.config import Stage


def removals_per_layer(r: int | list[int], n_layers: int, inflect: float = 0.0) -> list[int]:
    """Tokens to merge or drop in each of `n_layers` blocks, as the ToMe reference's `parse_r`.

    An int: a linear schedule whose mean is r, constant for inflect 0 and decreasing for inflect < 0
    (`inflect=-1` goes from 2r down to 0). A list: one r per block, padded with 0 (inflect unused).
    """
    if isinstance(r, list):
        return [*r[:n_layers], *[0] * (n_layers - len(r))]
    low = int(r * (1.0 - inflect))
    high = 2 * r - low
    step = (high - low) / max(n_layers - 1, 1)
    return [int(low + step * i) for i in range(n_layers)]


def schedule_stages(removals: list[int], n_tokens: int, n_protected: int) -> tuple[Stage, ...]:
    """One `keep` stage per block with removals, as ToMe applies them to `n_tokens` (protected included).

    Each block removes min(r, (tokens - protected) // 2), the reference's cap of half the tokens;
    the stages keep the resulting number of unprotected tokens, so any strategy can run at ToMe's
    budgets (`ReductionConfig(strategy="random", stages=schedule_stages(...))`).
    """
    stages, tokens = [], n_tokens
    for layer, r in enumerate(removals):
        r = min(r, (tokens - n_protected) // 2)
        if r > 0:
            tokens -= r
            stages.append(Stage(layer=layer, keep=tokens - n_protected))
    return tuple(stages)
