"""train.grad_checkpointing and the peak_memory_mb metric: the same loss and gradients with and
without recomputation, fewer activations kept for the backward pass, and a run that logs its peak."""

from __future__ import annotations

import copy
import json
from dataclasses import replace

import pytest
import torch
from torch import nn

from diffusion.artifacts import list_shards
from diffusion.config import DiTConfig, UNetConfig
from diffusion.data.text import EmbeddingTable
from diffusion.errors import ConfigError
from diffusion.models.dit import DiT, DiTBlock
from diffusion.models.precond import Denoiser
from diffusion.models.loss import diffusion_loss
from diffusion.models.unet import Cond, ResBlock, TransformerBlock, UNet
from diffusion.training.train import peak_memory_mb, set_grad_checkpointing, train

TEXT_DIM, POOLED_DIM = 24, 20


def tiny_unet() -> UNet:
    # two blocks a level (skips taken from inside a level), dropout (the recomputation must draw the same mask)
    cfg = UNetConfig(channels=16, channel_mult=[1, 2], blocks_per_level=2, attn_levels=[1], heads=2, dropout=0.2)
    return UNet(cfg, TEXT_DIM, POOLED_DIM)


def tiny_dit() -> DiT:
    return DiT(DiTConfig(width=32, depth=2, heads=2, patch=2), TEXT_DIM, POOLED_DIM)


def batch(seed: int = 0) -> tuple[torch.Tensor, Cond]:
    g = torch.Generator().manual_seed(seed)
    x0 = torch.rand(4, 3, 16, 16, generator=g) * 2 - 1
    mask = torch.arange(6)[None] < torch.tensor([[6], [3], [1], [0]])  # a full, two short and an empty caption
    cond = Cond(torch.randn(4, 6, TEXT_DIM, generator=g), mask, torch.randn(4, POOLED_DIM, generator=g))
    return x0, cond


def randomised(net: nn.Module) -> nn.Module:
    """Every weight moved off its initialisation (the zero-initialised output layers would leave most
    gradients zero, and a comparison of zeros proves nothing)."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g))
    return net


def loss_and_grads(net: nn.Module, x0: torch.Tensor, cond: Cond) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    den = Denoiser(net).train()
    g = torch.Generator().manual_seed(2)
    t = torch.randint(0, 1000, (x0.shape[0],), generator=g)
    noise = torch.randn(x0.shape, generator=g)
    net.zero_grad(set_to_none=True)
    torch.manual_seed(3)  # dropout's draws
    loss = diffusion_loss(den, x0, cond, t=t, noise=noise).mean()
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in net.named_parameters()}


def block_calls(net: nn.Module, kinds: tuple[type, ...]) -> list[int]:
    """A counter of the calls of the blocks of ``kinds`` (pre-hooks: a recomputation stops as soon
    as it has what the backward pass needs, often inside a block's last operation)."""
    calls = [0]
    for m in net.modules():
        if isinstance(m, kinds):
            m.register_forward_pre_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    return calls


def saved_bytes(net: nn.Module, x0: torch.Tensor, cond: Cond) -> int:
    """Bytes of the activations autograd keeps for the backward pass of one training forward (each
    storage once; the weights, which are kept anyway, left out)."""
    weights = {p.untyped_storage().data_ptr() for p in net.parameters()}
    seen: dict[int, int] = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in weights:
            seen[ptr] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        torch.manual_seed(3)
        loss = diffusion_loss(Denoiser(net).train(), x0, cond).mean()
    loss.backward()
    return sum(seen.values())


@pytest.mark.parametrize("make, blocks", [(tiny_unet, (ResBlock, TransformerBlock)), (tiny_dit, (DiTBlock,))],
                         ids=["unet", "dit"])
def test_checkpointing_gives_the_same_loss_and_gradients(make, blocks):
    torch.manual_seed(0)
    plain = randomised(make())
    ckpt = copy.deepcopy(plain)
    ckpt.set_grad_checkpointing(True)
    x0, cond = batch()

    calls_plain, calls_ckpt = block_calls(plain, blocks), block_calls(ckpt, blocks)
    loss_a, grads_a = loss_and_grads(plain, x0, cond)
    loss_b, grads_b = loss_and_grads(ckpt, x0, cond)
    # recomputed: every block ran again in the backward pass
    assert calls_ckpt[0] == 2 * calls_plain[0] > 0
    torch.testing.assert_close(loss_b, loss_a, rtol=0, atol=0)
    assert set(grads_a) == set(grads_b)
    assert all(g.abs().sum() > 0 for g in grads_a.values())
    for name in grads_a:
        torch.testing.assert_close(grads_b[name], grads_a[name], rtol=1e-5, atol=1e-6, msg=name)

    # without gradients (sampling, the held-out loss) nothing is recomputed and the output is the same
    calls_ckpt[0] = calls_plain[0] = 0
    c_noise = torch.full((4,), 500.0)
    with torch.no_grad():
        torch.manual_seed(4)
        out_a = plain.eval()(x0, c_noise, cond)
        torch.manual_seed(4)
        out_b = ckpt.eval()(x0, c_noise, cond)
    assert calls_ckpt[0] == calls_plain[0] > 0
    assert torch.equal(out_a, out_b)

    # and switched off again it is the plain network
    ckpt.set_grad_checkpointing(False)
    calls_ckpt[0] = calls_plain[0] = 0
    loss_c, _ = loss_and_grads(ckpt.train(), x0, cond)
    loss_and_grads(plain.train(), x0, cond)
    assert calls_ckpt[0] == calls_plain[0] and torch.equal(loss_c, loss_a)


@pytest.mark.parametrize("make", [tiny_unet, tiny_dit], ids=["unet", "dit"])
def test_checkpointing_keeps_fewer_activations(make):
    torch.manual_seed(0)
    plain = make()
    ckpt = copy.deepcopy(plain)
    ckpt.set_grad_checkpointing(True)
    x0, cond = batch()
    kept_plain, kept_ckpt = saved_bytes(plain, x0, cond), saved_bytes(ckpt, x0, cond)
    assert kept_ckpt < 0.5 * kept_plain, (kept_ckpt, kept_plain)


def test_a_network_without_it_is_one_clear_error(tiny_params):
    cfg = replace(tiny_params.train, grad_checkpointing=True)
    with pytest.raises(ConfigError, match="train.grad_checkpointing: the unet network .Linear. cannot recompute"):
        set_grad_checkpointing(nn.Linear(2, 2), cfg)
    set_grad_checkpointing(nn.Linear(2, 2), tiny_params.train)  # off: nothing to ask of it
    net = tiny_unet()
    set_grad_checkpointing(net, cfg)
    assert net.grad_checkpointing


class Recorder:
    def __init__(self):
        self.metrics = []

    def log_metrics(self, metrics, step):
        self.metrics.append((step, metrics))

    def log_image(self, image, name):
        pass


def test_a_checkpointed_run_trains_and_logs_its_peak_memory(tiny_params, tiny_shards, tiny_embeddings, tmp_path):
    cfg = replace(tiny_params.train, grad_checkpointing=True, val_every=0)
    rec = Recorder()
    train(cfg, list_shards(tiny_shards / "train"), EmbeddingTable.load(tiny_embeddings), tmp_path, image_size=16,
          logger=rec, progress=False)
    meta = json.loads((tmp_path / "model.json").read_text())
    assert meta["steps_done"] == cfg.steps and meta["train"]["grad_checkpointing"] is True
    logged = [m["peak_memory_mb"] for _, m in rec.metrics if "loss" in m]
    assert len(logged) == cfg.steps // cfg.log_every
    # this process' peak resident set: more than the tensors of the model it holds, no more than the
    # peak now, and a peak only grows (the kernel's RSS counters lag by a few pages: a little slack)
    slack = 8.0
    now = peak_memory_mb(torch.device("cpu"))
    assert all(50 < p <= now + slack for p in logged), (logged, now)
    assert all(b >= a - slack for a, b in zip(logged, logged[1:])), logged
    summary = [m for _, m in rec.metrics if "train_seconds" in m]
    assert len(summary) == 1 and summary[0]["peak_memory_mb"] == meta["peak_memory_mb"] >= logged[-1] - slack
