"""timm Vision Transformers: `vit_*`, `deit_*` (distilled too), `deit3_*` (LayerScale), q/k-norm and
`*_reg4` register-token models.

Each block runs in its two halves from the block's own modules (norms, attention with its q/k
norms and fused SDPA, LayerScale, drop-path, MLP), so nothing a timm 1.0.x block does is lost;
the reduction sits between them. Class, distillation and register tokens are the protected
prefix. Average pooling weighs each token by its size. Gradient checkpointing (`checkpoint_seq`) would
run each block again in the backward pass and reduce twice: forwards with gradients are refused while
it is on (`recomputes_blocks`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from tokenprune.contracts.adapter import Capture, EncoderAdapter, replace_attribute
from tokenprune.errors import AttachError

BLOCK_PARTS = ("norm1", "attn", "ls1", "drop_path1", "norm2", "mlp", "ls2", "drop_path2")
ATTENTION_PARTS = ("q_norm", "k_norm", "scale")
WEIGHTED_POOLS = ("avg", "avgmax")


class VitAdapter(EncoderAdapter):
    """timm `VisionTransformer` (and subclasses) with pre-norm `Block`s."""

    name = "vit"

    def __init__(self, model: nn.Module) -> None:
        super().__init__(model)
        for index, block in enumerate(model.blocks):
            missing = [p for p in BLOCK_PARTS if not hasattr(block, p)]
            missing += [f"attn.{p}" for p in ATTENTION_PARTS if not hasattr(getattr(block, "attn", None), p)]
            if missing:
                kind, parts = type(block).__name__, ", ".join(missing)
                raise AttachError(f"block {index} ({kind}) is not a pre-norm timm Block: no {parts}")
        if getattr(model, "attn_pool", None) is not None:
            raise AttachError("attention-pool heads (global_pool='map') cannot weigh merged tokens")
        if getattr(model, "dynamic_img_size", False):
            raise AttachError("dynamic image sizes are not supported: the patch grid must be fixed")

    @classmethod
    def supports(cls, model: nn.Module) -> bool:
        from timm.models.vision_transformer import VisionTransformer

        return isinstance(model, VisionTransformer)

    def entry_module(self) -> nn.Module:
        return self.model.patch_embed

    def blocks(self) -> Sequence[nn.Module]:
        return list(self.model.blocks)

    def prefix_tokens(self) -> int:
        return self.model.num_prefix_tokens

    def has_class_token(self) -> bool:
        return getattr(self.model, "cls_token", None) is not None

    def grid(self) -> tuple[int, int]:
        return tuple(self.model.patch_embed.grid_size)

    def attend(self, block: nn.Module, x: Tensor, bias: Tensor | None) -> Tensor:
        return x + block.drop_path1(block.ls1(block.attn(block.norm1(x), attn_mask=bias)))

    def feed_forward(self, block: nn.Module, x: Tensor) -> Tensor:
        return x + block.drop_path2(block.ls2(block.mlp(block.norm2(x))))

    def watch(self, block: nn.Module, capture: Capture) -> list[RemovableHandle]:
        return [
            block.attn.q_norm.register_forward_hook(lambda m, args, out: capture("queries", out)),
            block.attn.k_norm.register_forward_hook(lambda m, args, out: capture("keys", out)),
        ]

    def attention_scale(self, block: nn.Module) -> float:
        return block.attn.scale

    def size_weighted_pooling(self, sizes: Callable[[], Tensor | None]) -> Callable[[], None]:
        model = self.model
        unweighted = model.pool

        def pool(x: Tensor, pool_type: str | None = None) -> Tensor:
            kind = model.global_pool if pool_type is None else pool_type
            weights = sizes()
            if weights is None or kind not in WEIGHTED_POOLS:
                return unweighted(x, pool_type)
            start = 0 if model.pool_include_prefix else model.num_prefix_tokens
            tokens, weights = x[:, start:], weights[:, start:, None].to(x.dtype)
            average = (tokens * weights).sum(dim=1) / weights.sum(dim=1)
            return average if kind == "avg" else 0.5 * (average + tokens.amax(dim=1))

        return replace_attribute(model, "pool", pool)

    def recomputes_blocks(self) -> bool:
        """timm's `set_grad_checkpointing(True)` runs the blocks through `checkpoint_seq`."""
        return bool(getattr(self.model, "grad_checkpointing", False))
