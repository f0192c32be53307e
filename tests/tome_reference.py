"""An independent oracle: the ToMe reference algorithm (arXiv:2210.09461, `tome/merge.py` and its timm
patch) written out for a plain timm ViT, sharing no code with tokenprune.

Explicit softmax attention with log(size) added to the logits, bipartite soft matching on the
head-averaged keys with the class token protected, size-weighted averages, output order
[unmerged A (sorted when a class token exists), B]. Valid for models without LayerScale, q/k
norm, distillation or register tokens (the patch ignores those; tokenprune does not).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn


def bipartite_soft_matching(metric: Tensor, r: int, class_token: bool):
    """The reference's matching: returns `merge(x, mode)` for [B, N, C] tensors."""
    t = metric.shape[1]
    r = min(r, (t - int(class_token)) // 2)
    if r <= 0:
        return lambda x, mode="mean": x
    metric = metric / metric.norm(dim=-1, keepdim=True)
    a, b = metric[..., ::2, :], metric[..., 1::2, :]
    scores = a @ b.transpose(-1, -2)
    if class_token:
        scores[..., 0, :] = -math.inf
    node_max, node_idx = scores.max(dim=-1)
    edge_idx = node_max.argsort(dim=-1, descending=True)[..., None]
    unm_idx, src_idx = edge_idx[..., r:, :], edge_idx[..., :r, :]
    dst_idx = node_idx[..., None].gather(dim=-2, index=src_idx)
    if class_token:
        unm_idx = unm_idx.sort(dim=1)[0]

    def merge(x: Tensor, mode: str = "mean") -> Tensor:
        src, dst = x[..., ::2, :], x[..., 1::2, :]
        n, t1, c = src.shape
        unm = src.gather(dim=-2, index=unm_idx.expand(n, t1 - r, c))
        src = src.gather(dim=-2, index=src_idx.expand(n, r, c))
        dst = dst.scatter_reduce(-2, dst_idx.expand(n, r, c), src, reduce=mode)
        return torch.cat([unm, dst], dim=1)

    return merge


def merge_wavg(merge, x: Tensor, size: Tensor | None) -> tuple[Tensor, Tensor]:
    size = torch.ones_like(x[..., 0, None]) if size is None else size
    x = merge(x * size, mode="sum")
    size = merge(size, mode="sum")
    return x / size, size


def attention(attn: nn.Module, x: Tensor, size: Tensor | None) -> tuple[Tensor, Tensor]:
    """The patched attention: explicit softmax, proportional attention, and the head-averaged keys."""
    batch, n, c = x.shape
    qkv = attn.qkv(x).reshape(batch, n, 3, attn.num_heads, c // attn.num_heads).permute(2, 0, 3, 1, 4)
    q, k, v = qkv[0], qkv[1], qkv[2]
    logits = (q @ k.transpose(-2, -1)) * attn.scale
    if size is not None:
        logits = logits + size.log()[:, None, None, :, 0]
    out = (logits.softmax(dim=-1) @ v).transpose(1, 2).reshape(batch, n, c)
    return attn.proj(out), k.mean(1)


@torch.no_grad()
def reference_forward(model: nn.Module, x: Tensor, schedule: list[int]) -> tuple[Tensor, Tensor]:
    """(logits, final sizes) of a plain timm ViT patched as the ToMe reference does."""
    x = model.norm_pre(model.patch_drop(model._pos_embed(model.patch_embed(x))))
    size = None
    for block, r in zip(model.blocks, schedule, strict=True):
        x_attn, metric = attention(block.attn, block.norm1(x), size)
        x = x + x_attn
        if r > 0:
            merge = bipartite_soft_matching(metric, r, class_token=True)
            x, size = merge_wavg(merge, x, size)
        x = x + block.mlp(block.norm2(x))
    return model.forward_head(model.norm(x)), size
