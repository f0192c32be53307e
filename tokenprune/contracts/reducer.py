"""The strategy contract: a Reducer sees the candidate tokens of one site and says which to keep.

A strategy never sees a model. It receives a `TokenView` (hidden states, which tokens are
visual, which image/frame and grid cell each belongs to, original positions, the budget) and
may ask `view.signals` for model-derived signals, computed by the core only when asked.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import torch
from pydantic import BaseModel, ConfigDict
from torch import Tensor

from tokenprune.contracts.layout import SEGMENT_KINDS
from tokenprune.errors import StrategyError, TokenPruneError

QueryRows = Literal["last", "mean", "class"]
Site = Literal["language", "vision", "cache"]
PositionPolicy = Literal["original", "renumbered"]


class SignalUnavailable(TokenPruneError):
    """A strategy asked for a signal this site cannot provide (e.g. attention before the first layer)."""


class NoParams(BaseModel):
    """Parameters of a strategy that takes none."""

    model_config = ConfigDict(extra="forbid")


class Signals:
    """Model-derived signals for one site, computed lazily and at most once per forward and options.

    A site offers named providers; a strategy asks `get(name, **options)` or a named shortcut:
    - `attention(query)`: [B, L] float32 head-averaged attention each token of the current sequence
      receives, from the last real query token (`"last"`, FastV's reference code), averaged over all
      real query tokens (`"mean"`, FastV's paper text) or from the class token (`"class"`, ViT sites).
    - `keys()`: [B, L, d] float32 keys of the site's attention layer averaged over heads (ToMe's metric).
    Every signal is float32 whatever the model's dtype: `get` casts a provider's result once, so
    scores and similarities never round in bfloat16 or float16 and no strategy casts them itself.
    """

    def __init__(self, providers: Mapping[str, Callable[..., Tensor]] | None = None) -> None:
        self._providers = dict(providers or {})
        self._cache: dict[tuple[str, tuple[tuple[str, Any], ...]], Tensor] = {}

    @property
    def available(self) -> frozenset[str]:
        """The names of the signals this site can compute."""
        return frozenset(self._providers)

    def get(self, name: str, **options: Any) -> Tensor:
        """Signal `name` computed with `options` (once per forward; later calls reuse it)."""
        if name not in self._providers:
            offered = ", ".join(sorted(self._providers)) or "none"
            raise SignalUnavailable(f"signal {name!r} is not available at this site (available: {offered})")
        key = (name, tuple(sorted(options.items())))
        if key not in self._cache:
            self._cache[key] = self._providers[name](**options).float()
        return self._cache[key]

    def attention(self, query: QueryRows = "last") -> Tensor:
        return self.get("attention", query=query)

    def keys(self) -> Tensor:
        return self.get("keys")


@dataclass
class TokenView:
    """The tokens entering one reduction site, batch-first, in current sequence order.

    Shapes: B samples, L tokens (left-filled with invalid slots when samples differ in length).
    - hidden    [B, L, D]  hidden states entering the site, in the model's dtype (`features()`: float32)
    - candidates[B, L] bool  visual tokens that may be removed
    - valid     [B, L] bool  real tokens (False: padding or filler)
    - segment   [B, L] long  image/frame index of a visual token within its sample, -1 otherwise
    - coords    [B, L, 3] long  (t, row, col) of a visual token in its segment's grid, -1 otherwise
    - extent    [B, L, 3] long  (T, H, W) of that grid, 0 for non-visual tokens
    - positions [B, L] long  original sequence position (index into the input ids), -1 for filler
    - budget    [B] long   how many candidates to keep in each sample
    - frame     [B, L] long  index of a candidate's frame in its sample: one per (segment, t) pair,
                so a video frame, an image, a sub-grid; -1 otherwise
    - frame_budget [B, F] long or None  with `budget: per_frame`, how many to keep in each frame
                (`budget` is then their sum per sample)
    - sizes     [B, L] float or None  original tokens each token stands for after earlier merges
                (None: all 1; read it through `token_sizes()`)
    - site      "language" (a decoder layer's input), "vision" (a vision encoder's tokens) or "cache"
                (the visual entries of a KV cache between decode steps: `docs/cache-site.md`)
    - kind      [B, L] long or None  a candidate's segment kind, an index into `SEGMENT_KINDS`
                ("grid"; "thumbnail": InternVL's whole-image tile; "base": LLaVA-NeXT's low-resolution
                grid), -1 otherwise; read it through `of_kind(name)` (None: every segment a "grid")
    - frame_size int or None  at least the candidates of any one frame of the batch, and max_budget at
                least every entry of `budget`: Python ints (the core counts both on the host with the
                budgets), so a strategy sizes per-frame or per-kept-token tables without reading the view
                back to the host (FastVID's frame blocks); None: not known (a view built by hand), read as L
    """

    hidden: Tensor
    candidates: Tensor
    valid: Tensor
    segment: Tensor
    coords: Tensor
    extent: Tensor
    positions: Tensor
    budget: Tensor
    layer: int
    signals: Signals = field(default_factory=Signals)
    frame: Tensor | None = None
    frame_budget: Tensor | None = None
    sizes: Tensor | None = None
    site: Site = "language"
    kind: Tensor | None = None
    frame_size: int | None = None
    max_budget: int | None = None
    _features: Tensor | None = field(default=None, init=False, repr=False, compare=False)

    def features(self) -> Tensor:
        """[B, L, D] float32 `hidden`, cast once per view: similarities between hidden states are
        computed in float32 whatever the model's dtype (`hidden` itself stays in the compute dtype)."""
        if self._features is None:
            self._features = self.hidden.float()
        return self._features

    def token_sizes(self) -> Tensor:
        """[B, L] float32: how many original tokens each token stands for (1 until something merges)."""
        if self.sizes is None:
            return torch.ones(self.candidates.shape, dtype=torch.float32, device=self.candidates.device)
        return self.sizes

    def of_kind(self, name: str) -> Tensor:
        """[B, L] bool: the candidates in segments of kind `name` (one of `SEGMENT_KINDS`)."""
        if name not in SEGMENT_KINDS:
            raise ValueError(f"segment kind {name!r}: expected one of {', '.join(SEGMENT_KINDS)}")
        if self.kind is None:
            return self.candidates & (name == "grid")
        return self.candidates & (self.kind == SEGMENT_KINDS.index(name))

    def quota(self) -> tuple[Tensor, Tensor]:
        """(budget [B, G] long, group [B, L] long) for `top_k_mask`, always of these shapes.

        One budget per sample (G = 1, every candidate in group 0), or one per frame with
        `budget: per_frame` (G frames, a candidate's group is its `frame`). Non-candidates: group -1.
        """
        if self.frame_budget is None:
            return self.budget[:, None], torch.where(self.candidates, 0, -1)
        return self.frame_budget, self.frame.masked_fill(~self.candidates, -1)


@dataclass
class Merge:
    """A selection that merges instead of only dropping.

    - keep  [B, L] bool  the candidates that survive, exactly the budget (as `Reducer.select`)
    - into  [B, L] long  for a candidate that does not survive, the slot of the kept candidate it
            merges into (many may join one); -1 for a token dropped outright or kept
    - rank  [B, L] long or None  where token order is free (a ViT), survivors are laid out by
            increasing rank, ties by slot; sequence order is kept where it carries meaning
    - proportional_attention  add log(size) to each merged key's attention logits later on
    - combine  how a survivor takes in its members: `"average"`, the size-weighted average of it and
            them (ToMe); `"target_plus_mean"`, itself plus their size-weighted mean (VisionZip's code)
    - weights [B, L, L] float or None  where a token feeds several survivors (area interpolation):
            row i of a kept slot weighs each token j it takes in, itself included; the survivor becomes
            `sum_j w_ij size_j x_j / sum_j w_ij size_j` (with `combine="average"`), `into` still names
            each removed token's main survivor (for source tracking); None: `into` alone says it all

    The core does the rest once for every merging strategy: the merged features, sizes carried
    through later stages, proportional attention masks and source tracking.
    """

    keep: Tensor
    into: Tensor
    rank: Tensor | None = None
    proportional_attention: bool = True
    combine: Literal["average", "target_plus_mean"] = "average"
    weights: Tensor | None = None


class Reducer(ABC):
    """Base class of every strategy: fill in `select`.

    Class attributes: `Params`, the pydantic model of the strategy's parameters (validated from
    the config's `params`); `name`, the name it is registered under (set by the registry);
    `requires`, the signals it asks for (a site that cannot provide them
    is refused when attaching); `merges`, whether it returns `Merge` results; `sites`, where it
    acts: `"language"` (a language model's decoder layers) and/or `"vision"` (a vision encoder: a
    ViT's blocks, a VLM's vision tower); `positions`, the position policy its paper's reference code
    uses (`"original"`: kept tokens keep their positions, FastV; `"renumbered"`: the shortened sequence
    is numbered contiguously), the default a config may override.
    """

    Params: ClassVar[type[BaseModel]] = NoParams
    name: ClassVar[str | None] = None  # the registered name: the registry sets it on the class it loads
    requires: ClassVar[frozenset[str]] = frozenset()
    merges: ClassVar[bool] = False  # select may return a Merge: removed tokens live on in survivors
    sites: ClassVar[frozenset[Site]] = frozenset({"language", "vision"})  # where the method can act
    positions: ClassVar[PositionPolicy] = "original"  # the position policy of the paper's reference code

    def __init__(self, params: BaseModel | None = None) -> None:
        self.params = params if params is not None else self.Params()

    @abstractmethod
    def select(self, view: TokenView) -> Tensor | Merge:
        """Bool [B, L]: the candidates to keep, exactly `view.budget[b]` of them in row b (or a `Merge`)."""

    def removals(self, n_layers: int) -> list[int] | None:
        """Tokens to remove in each of `n_layers` blocks when the config gives no budget (ToMe's r).

        None (the default): the strategy has no schedule of its own and needs `ratio`/`keep`/`stages`.
        """
        return None

    def signal_layers(self, layer: int) -> frozenset[int]:
        """The layers before `layer` whose attention a stage on `layer`'s output also reads.

        A vision tower keeps those layers' queries and keys for `signals.attention(query, layer=i)`
        (HiPrune's object layer); it asks before any forward. None by default.
        """
        return frozenset()


class ScoreReducer(Reducer):
    """A strategy that ranks candidates: fill in `score`; the highest `budget` candidates are kept."""

    @abstractmethod
    def score(self, view: TokenView) -> Tensor:
        """Float [B, L]: higher is kept first; ties go to the earlier position."""

    def select(self, view: TokenView) -> Tensor:
        """The `budget` best-scoring candidates of each sample (or frame); a misshapen score is refused."""
        scores = self.score(view)
        expected = tuple(view.candidates.shape)
        if not isinstance(scores, Tensor) or tuple(scores.shape) != expected:
            got = tuple(scores.shape) if isinstance(scores, Tensor) else type(scores).__name__
            raise StrategyError(
                f"{strategy_label(self)}: score returned {got}, expected one score per token of the view: "
                f"[B, L] = {expected} (batch, tokens entering the site)"
            )
        return top_k_mask(scores, view.candidates, *view.quota())


def strategy_label(reducer: Reducer) -> str:
    """How errors name a strategy: its registered name and class, or its class alone if unregistered."""
    cls = type(reducer)
    registered = vars(cls).get("name")
    return f"strategy {registered!r} ({cls.__qualname__})" if registered else f"strategy {cls.__qualname__}"


def top_k_mask(scores: Tensor, candidates: Tensor, budget: Tensor, groups: Tensor | None = None) -> Tensor:
    """Bool [B, L]: the best-scoring candidates, `budget[b]` per row, or `budget[b, g]` per group.

    `groups` [B, L] gives each candidate's group (e.g. its segment) when `budget` is [B, G].
    Sorting is stable, so among equal scores the earlier token wins.
    """
    if groups is None:
        budget, groups = budget[:, None], torch.zeros_like(candidates, dtype=torch.long)
    n_groups = budget.shape[1]
    groups = groups.masked_fill(~candidates, n_groups)  # non-candidates: an extra group with no budget
    budget = torch.nn.functional.pad(budget, (0, 1))
    ranked = scores.float().masked_fill(~candidates, float("-inf"))
    order = torch.sort(ranked, dim=1, descending=True, stable=True).indices
    in_order = torch.nn.functional.one_hot(groups.gather(1, order), n_groups + 1)
    rank = (in_order.cumsum(dim=1) * in_order).sum(-1) - 1  # rank within its group, best first
    keep_in_order = rank < budget.gather(1, groups.gather(1, order))
    return torch.zeros_like(candidates).scatter(1, order, keep_in_order) & candidates


def group_counts(mask: Tensor, groups: Tensor, n_groups: int) -> Tensor:
    """[B, G] number of True entries of `mask` [B, L] in each group (`groups` [B, L], -1: none)."""
    slot = groups.clamp(min=0).masked_fill(~mask | (groups < 0), n_groups)
    counts = torch.zeros(mask.shape[0], n_groups + 1, dtype=torch.long, device=mask.device)
    return counts.scatter_add_(1, slot, torch.ones_like(slot))[:, :n_groups]


def proportional_shares(total: Tensor, weights: Tensor) -> Tensor:
    """[B, G] long: `total` [B] shared over groups in proportion to `weights` [B, G] in exact integer
    arithmetic (largest remainder, ties to the earlier group); a group of weight 0 gets nothing."""
    whole = weights.sum(dim=1, keepdim=True).clamp(min=1)
    exact = total[:, None] * weights
    floor, remainder = exact // whole, exact % whole
    order = torch.sort(remainder, dim=1, descending=True, stable=True).indices
    extra = torch.arange(weights.shape[1], device=weights.device) < (total - floor.sum(dim=1))[:, None]
    return floor + torch.zeros_like(floor).scatter(1, order, extra.long()) * (weights > 0)


def split_budget(budget: int, sizes: list[int]) -> list[int]:
    """Share `budget` over groups proportionally to `sizes`: `proportional_shares` of one sample."""
    return proportional_shares(torch.tensor([budget]), torch.tensor([sizes], dtype=torch.long))[0].tolist()
