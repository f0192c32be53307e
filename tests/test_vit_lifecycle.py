"""The ViT driver's lifecycle: an install that fails half-way leaves nothing behind, detaching puts
back what others placed (accelerate's dispatch included), gradient checkpointing is refused at the
first forward that would recompute blocks, and nothing a block's attention computed outlives the
forward.

Small timm models with random weights (no download), float32. Gradients of a reduction that removes
nothing match the bare model's within 1e-5 (max abs diff); a dispatched model's logits equal the
plain model's exactly.
"""

from __future__ import annotations

import gc
import weakref

import pytest
import timm
import torch
from accelerate import dispatch_model
from tokenprune.adapters.vit import VitAdapter

import tokenprune as tp
from tokenprune.core.encoder_session import EncoderSession
from tokenprune.registry import strategy_class

TOL = 1e-5
SIZE = {"img_size": 32, "patch_size": 8, "depth": 4, "embed_dim": 32, "num_heads": 2, "num_classes": 5}
TOME = tp.ReductionConfig(strategy="tome", params={"r": 3})


@pytest.fixture
def model() -> torch.nn.Module:
    torch.manual_seed(0)
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, **SIZE).eval()


def images(batch: int = 2) -> torch.Tensor:
    return torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(0))


def placed(model: torch.nn.Module) -> list[tuple[str, list, list, list, dict]]:
    """Every module's hooks and instance attributes: what attaching may change."""
    return [
        (
            name,
            list(module._forward_hooks.values()),
            list(module._forward_pre_hooks.values()),
            list(module._backward_hooks.values()),
            {key: value for key, value in vars(module).items() if not key.startswith("_")},
        )
        for name, module in model.named_modules()
    ]


class FailingAdapter(VitAdapter):
    """Fails while watching block 2, after blocks 0 and 1 got their hooks and forwards."""

    def watch(self, block, capture):
        if block is self.model.blocks[2]:
            raise RuntimeError("no q_norm output to watch")
        return super().watch(block, capture)


def test_an_install_failing_half_way_removes_everything_it_placed(model):
    before = placed(model)
    config = tp.ReductionConfig(strategy="tome", stages=[{"layer": i, "ratio": 0.2} for i in range(4)])
    reducer = strategy_class("tome")(strategy_class("tome").Params())
    session = EncoderSession(FailingAdapter(model), config, reducer)
    with pytest.raises(tp.AttachError, match="no q_norm output to watch"):
        session.install()
    assert placed(model) == before
    session.remove()  # safe again after a failed install
    assert placed(model) == before


def test_a_failing_attach_leaves_the_model_bare_and_attachable(model, monkeypatch):
    x, before = images(), placed(model)
    with torch.no_grad():
        expected = model(x)

    def broken(self, sizes):
        raise RuntimeError("this head cannot pool")

    monkeypatch.setattr(VitAdapter, "size_weighted_pooling", broken)
    with pytest.raises(tp.AttachError, match="cannot pool"):
        tp.attach(model, TOME)
    assert placed(model) == before
    monkeypatch.undo()
    with torch.no_grad(), tp.attach(model, tp.ReductionConfig(strategy="tome", params={"r": 0})):
        assert torch.equal(model(x), expected)


def test_detach_puts_back_forwards_and_pooling_placed_by_others(model):
    block, x = model.blocks[1], images()
    theirs = block.forward  # a bound method, set as an instance attribute as accelerate or a profiler does
    block.forward = theirs
    pool = model.pool
    model.pool = pool
    before = placed(model)
    with torch.no_grad(), tp.attach(model, TOME):
        model(x)
    assert placed(model) == before
    assert vars(block)["forward"] is theirs and vars(model)["pool"] is pool


def test_gradient_checkpointing_is_refused_at_the_first_forward_with_gradients(model):
    model.train().set_grad_checkpointing(True)
    x = images()
    with tp.attach(model, TOME) as handle:
        with pytest.raises(tp.AttachError, match="set_grad_checkpointing"):
            model(x).sum().backward()
        with torch.no_grad():  # nothing is recomputed without a backward pass
            checkpointed = model.eval()(x)
            assert [e.layer for e in handle.trace] == [0, 1, 2, 3]
        model.set_grad_checkpointing(False)
        with torch.no_grad():
            assert torch.equal(model(x), checkpointed)


def test_training_without_checkpointing_backpropagates_through_the_blocks(model):
    x = images().requires_grad_()
    model.train()
    model(x).square().sum().backward()
    expected = x.grad.clone()
    x.grad = None
    config = tp.ReductionConfig(strategy="tome", stages=[{"layer": i, "ratio": 0.0} for i in range(4)])
    with tp.attach(model, config) as handle:
        model(x).square().sum().backward()
        assert [e.layer for e in handle.trace] == [0, 1, 2, 3]  # one reduction per stage
    assert (x.grad - expected).abs().max() <= TOL


@pytest.mark.parametrize("grad", [False, True])
def test_captured_queries_and_keys_do_not_outlive_the_forward(model, grad):
    refs: list[weakref.ref] = []
    with tp.attach(model, TOME), torch.set_grad_enabled(grad):
        handles = [
            module.register_forward_hook(lambda m, a, out: refs.append(weakref.ref(out)))
            for block in model.blocks
            for module in (block.attn.q_norm, block.attn.k_norm)
        ]
        logits = model(images())
        for handle in handles:
            handle.remove()
        del logits
        gc.collect()
        assert len(refs) == 2 * len(model.blocks)
        assert all(ref() is None for ref in refs)


def test_a_dispatched_vit_reduces_as_the_plain_one_and_gets_its_own_hooks_back(model, tmp_path):
    """accelerate's dispatch (a block offloaded to disk) places hooks and forwards of its own."""
    x = images()
    with torch.no_grad(), tp.attach(model, TOME):
        expected = model(x)
    torch.manual_seed(0)
    other = timm.create_model("vit_tiny_patch16_224", pretrained=False, **SIZE).eval()
    placement = {name: "cpu" for name, _ in other.named_children()}
    placement |= {f"blocks.{i}": "disk" if i == 1 else "cpu" for i in range(len(other.blocks))}
    placement |= {"cls_token": "cpu", "pos_embed": "cpu"}
    del placement["blocks"]
    dispatched = dispatch_model(other, device_map=placement, offload_dir=str(tmp_path), main_device="cpu")
    assert dispatched.blocks[1].attn.qkv.weight.device.type == "meta"
    before, wrapper = placed(dispatched), vars(dispatched.blocks[1])["forward"]
    with torch.no_grad(), tp.attach(dispatched, TOME):
        assert vars(dispatched.blocks[1])["forward"] is wrapper  # inputs still moved to the block's device
        assert torch.equal(dispatched(x), expected)
    assert placed(dispatched) == before
