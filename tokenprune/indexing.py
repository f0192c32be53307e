"""Index tensors of a shortened sequence: [B, L] positions into a longer one, -1 for filler slots.

A row keeping fewer tokens than the longest row is left-filled, so the last token of every row
stays at the end, as generation expects. Pure tensor functions, shared by the adapter contracts
(the attention probe) and the core mechanics.
"""

from __future__ import annotations

import torch
from torch import Tensor

FILLER = -1


def gather_tokens(x: Tensor, index: Tensor, seq_dim: int) -> Tensor:
    """Take tokens of `x` along `seq_dim` at `index` [B, L'] (filler slots read token 0).

    The batch dimension is the one just before `seq_dim` and may be 1 (broadcast), so this covers
    hidden states [B, N, D], rotary tables [B|1, N, d], position ids [B|1, N] and 3-D M-RoPE
    position ids [3, B|1, N] alike: positions of any rank travel with their tokens.
    """
    seq_dim = seq_dim % x.ndim
    batch_dim = seq_dim - 1
    idx = index.clamp(min=0)
    shape = list(x.shape)
    shape[batch_dim] = idx.shape[0]
    x = x.expand(shape)
    view = [1] * x.ndim
    view[batch_dim], view[seq_dim] = idx.shape
    shape[seq_dim] = idx.shape[1]
    return x.gather(seq_dim, idx.view(view).expand(shape))


def left_aligned_index(keep: Tensor) -> Tensor:
    """[B, L'] positions of the True entries of `keep` [B, L], in order, left-filled with -1.

    L' is the largest row count, so the last kept token of every row lands in the last column.
    """
    counts = keep.sum(dim=1)
    width = int(counts.max().item()) if keep.numel() else 0
    order = torch.sort(keep.to(torch.int8), dim=1, stable=True).indices  # dropped first, kept last, in order
    index = order[:, keep.shape[1] - width :]
    filler = torch.arange(width, device=keep.device)[None, :] < (width - counts)[:, None]
    return index.masked_fill(filler, FILLER)


def compose(outer: Tensor, inner: Tensor) -> Tensor:
    """Index into the original sequence of a selection `inner` made on a sequence indexed by `outer`."""
    picked = outer.gather(1, inner.clamp(min=0))
    return picked.masked_fill(inner < 0, FILLER)


def scatter_tokens(full: Tensor, index: Tensor, tokens: Tensor, in_place: bool = False) -> Tensor:
    """Write `tokens` [B, L', D] into `full` [B, N + 1, D] at `index` (fillers go to the spare slot N);
    `in_place` writes into `full` itself, sparing a copy of it when the caller owns it."""
    slot = index.masked_fill(index < 0, full.shape[1] - 1)
    scatter = full.scatter_ if in_place else full.scatter
    return scatter(1, slot[..., None].expand(-1, -1, full.shape[-1]), tokens.to(full.dtype))
