"""LoRA (Hu et al. 2021): low-rank adapters on chosen Linear / Conv2d layers of any raw network.

A wrapped layer computes ``base(x) + (alpha / rank) * B(A(drop(x)))``: ``A`` (rank x in) starts
random (Kaiming, as the paper and peft), ``B`` (out x rank) starts at zero, so at step 0 the network
is exactly its base. Training moves only ``A`` and ``B``; the base is frozen. ``merge`` folds the
adapter into plain layers: ``W' = W + (alpha / rank) B A`` (for a conv, ``B A`` over the flattened
kernel), the same network without the wrapper.

Our own ~150 lines instead of ``peft``: peft would pull transformers, accelerate, tokenizers and
kernels into the training environment for what is two matrices per layer here (docs/training.md).

Targets name modules the way peft's ``target_modules`` does: a target matches a module whose
qualified name is the target or ends with ``"." + target`` (``self_attn.q`` matches
``down.1.1.self_attn.q``). ``train.lora.target_modules: []`` takes ``DEFAULT_TARGETS`` of the
network (the attention projections). State-dict keys: a wrapped layer ``x.q`` holds ``x.q.base.*``
(its frozen weights) and ``x.q.lora_a`` / ``x.q.lora_b``; ``base_state_dict`` gives the base under
its own, unwrapped keys (what model.safetensors holds), ``adapter_state_dict`` the adapter alone.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from diffusion.errors import ConfigError

# train.denoiser -> the attention projections LoRA adapts when train.lora.target_modules is []
DEFAULT_TARGETS: dict[str, tuple[str, ...]] = {
    "unet": ("self_attn.q", "self_attn.kv", "self_attn.out", "cross_attn.q", "cross_attn.kv", "cross_attn.out"),
    "dit": ("self_attn.qkv", "self_attn.out", "cross_attn.q", "cross_attn.kv", "cross_attn.out"),
    "diffusers": ("to_q", "to_k", "to_v", "to_out.0"),
}
ADAPTER_KEYS = ("lora_a", "lora_b")  # the parameter names of a wrapped layer's adapter


class LoRALayer(nn.Module):
    """A frozen ``base`` (nn.Linear, or nn.Conv2d with groups 1) plus its low-rank update."""

    def __init__(self, base: nn.Module, rank: int, alpha: float, dropout: float):
        super().__init__()
        self.base = base.requires_grad_(False)
        self.rank, self.alpha, self.scale = rank, alpha, alpha / rank
        self.drop = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        w = base.weight
        if isinstance(base, nn.Conv2d):  # A: a conv like the base, in -> rank; B: a 1x1 conv rank -> out
            a_shape, b_shape = (rank, base.in_channels, *base.kernel_size), (base.out_channels, rank, 1, 1)
        else:
            a_shape, b_shape = (rank, base.in_features), (base.out_features, rank)
        self.lora_a = nn.Parameter(torch.empty(a_shape, dtype=w.dtype, device=w.device))
        self.lora_b = nn.Parameter(torch.zeros(b_shape, dtype=w.dtype, device=w.device))
        nn.init.kaiming_uniform_(self.lora_a, a=math.sqrt(5))

    def forward(self, x: Tensor) -> Tensor:
        base = self.base
        if isinstance(base, nn.Conv2d):
            h = F.conv2d(self.drop(x), self.lora_a, None, base.stride, base.padding, base.dilation)
            return base(x) + self.scale * F.conv2d(h, self.lora_b)
        return base(x) + self.scale * F.linear(F.linear(self.drop(x), self.lora_a), self.lora_b)

    def delta_weight(self) -> Tensor:
        """(alpha / rank) B A, shaped like the base's weight."""
        w = self.base.weight
        delta = self.lora_b.flatten(1) @ self.lora_a.flatten(1)  # (out, in * kh * kw)
        return (self.scale * delta).reshape(w.shape).to(w.dtype)


def targets_for(denoiser: str, target_modules: list[str] | tuple[str, ...]) -> tuple[str, ...]:
    """``target_modules``, or where it is empty the default of ``denoiser``."""
    if target_modules:
        return tuple(target_modules)
    if denoiser not in DEFAULT_TARGETS:
        raise ConfigError(f"train.lora.target_modules: there is no default for train.denoiser {denoiser!r}; "
                          "list the modules to adapt")
    return DEFAULT_TARGETS[denoiser]


def _matches(name: str, target: str) -> bool:
    return name == target or name.endswith("." + target)


def find_targets(net: nn.Module, targets: tuple[str, ...] | list[str]) -> list[str]:
    """The qualified names of the Linear / Conv2d modules of ``net`` that ``targets`` name, in module
    order. A target that matches no module, or only modules LoRA cannot adapt, is a ConfigError
    naming it and some names that exist."""
    modules = dict(net.named_modules())
    found: list[str] = []
    for target in targets:
        hits = [n for n in modules if n and _matches(n, target)]
        ok = [n for n in hits if _adaptable(modules[n])]
        if not ok:
            examples = ", ".join(list(dict.fromkeys(_short(n) for n, m in modules.items() if n and _adaptable(m)))[:12])
            what = (f"matches only {type(modules[hits[0]]).__name__} modules ({hits[0]}), not Linear or Conv2d"
                    if hits else "matches no module of the network")
            raise ConfigError(f"train.lora.target_modules: {target!r} {what}; names that exist: {examples}")
        found += [n for n in ok if n not in found]
    return [n for n in modules if n in set(found)]


def _short(name: str) -> str:
    """A module's name without the block indices before it (``down.1.1.self_attn.q`` -> ``self_attn.q``)."""
    parts = name.split(".")
    cut = max((i for i, p in enumerate(parts[:-1]) if p.isdigit()), default=-1)
    return ".".join(parts[cut + 1:])


def _adaptable(m: nn.Module) -> bool:
    return type(m) is nn.Linear or (type(m) is nn.Conv2d and m.groups == 1)


def inject(net: nn.Module, targets: tuple[str, ...] | list[str], rank: int, alpha: float | None = None,
           dropout: float = 0.0, *, exact: bool = False) -> list[str]:
    """Wrap the modules ``targets`` name in LoRA layers and freeze everything else of ``net``.
    ``exact``: ``targets`` are qualified names (from ``adapted_modules``), not suffixes.
    Returns the qualified names wrapped. The network's output is unchanged (B = 0)."""
    if rank < 1:
        raise ConfigError(f"train.lora.rank must be >= 1 to inject adapters, got {rank}")
    names = list(targets) if exact else find_targets(net, targets)
    net.requires_grad_(False)
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = net.get_submodule(parent_name) if parent_name else net
        setattr(parent, child, LoRALayer(getattr(parent, child), rank, rank if alpha is None else alpha, dropout))
    return names


def lora_layers(net: nn.Module) -> dict[str, LoRALayer]:
    return {n: m for n, m in net.named_modules() if isinstance(m, LoRALayer)}


def has_lora(net: nn.Module) -> bool:
    return any(isinstance(m, LoRALayer) for m in net.modules())


def describe(net: nn.Module) -> dict:
    """What model.json records to rebuild the adapter: {rank, alpha, dropout, modules}, and its size
    (``params``: the adapter's parameters, what trained)."""
    layers = lora_layers(net)
    first = next(iter(layers.values()))
    dropout = first.drop.p if isinstance(first.drop, nn.Dropout) else 0.0
    params = sum(m.lora_a.numel() + m.lora_b.numel() for m in layers.values())
    return {"rank": first.rank, "alpha": first.alpha, "dropout": dropout, "modules": list(layers), "params": params}


def _is_adapter_key(key: str) -> bool:
    return key.rpartition(".")[2] in ADAPTER_KEYS


def adapter_state_dict(module: nn.Module) -> dict[str, Tensor]:
    """The adapter tensors of ``module`` alone (``...lora_a`` / ``...lora_b``)."""
    return {k: v for k, v in module.state_dict().items() if _is_adapter_key(k)}


def base_state_dict(module: nn.Module) -> dict[str, Tensor]:
    """The base weights under the keys the network has without adapters (``x.q.base.weight`` ->
    ``x.q.weight``)."""
    return {k.replace(".base.", "."): v for k, v in module.state_dict().items() if not _is_adapter_key(k)}


def trainable_state_dict(module: nn.Module) -> dict[str, Tensor]:
    """What a checkpoint keeps of ``module``: the adapter alone where it has one (the base comes
    back from train.init_from or the seed), else the whole state dict."""
    return adapter_state_dict(module) if has_lora(module) else module.state_dict()


def load_trainable_state_dict(module: nn.Module, state: dict[str, Tensor]) -> None:
    """Load what ``trainable_state_dict`` gave; an adapter of another shape or other modules is an
    error (the run's settings decide them, so a resume that meets one has changed settings)."""
    if not has_lora(module):
        module.load_state_dict(state)
        return
    want = adapter_state_dict(module)
    if set(state) != set(want) or any(state[k].shape != want[k].shape for k in want):
        raise ConfigError("the checkpoint's LoRA adapter does not fit train.lora (rank or target_modules "
                          "changed): train into a new directory or restore the settings")
    module.load_state_dict(state, strict=False)


@torch.no_grad()
def merge(net: nn.Module) -> nn.Module:
    """Fold every adapter into its base (W + (alpha / rank) B A) and put the plain layer back: the
    network without adapters, whose state dict has the base's keys. In place; returns ``net``."""
    for name, layer in lora_layers(net).items():
        parent_name, _, child = name.rpartition(".")
        parent = net.get_submodule(parent_name) if parent_name else net
        base = layer.base
        base.weight += layer.delta_weight()
        setattr(parent, child, base)
    return net


@torch.no_grad()
def merged_state_dict(base: dict[str, Tensor], adapter: dict[str, Tensor], spec: dict) -> dict[str, Tensor]:
    """A saved LoRA model's weights with the adapter folded in, from its files alone (no network):
    ``base`` (model.safetensors), ``adapter`` (adapter.safetensors), ``spec`` (model.json's ``lora``).
    The plain network's state dict, as ``merge`` would leave it."""
    scale = spec["alpha"] / spec["rank"]
    out = dict(base)
    for name in spec["modules"]:
        w = base[f"{name}.weight"]
        a, b = adapter[f"{name}.lora_a"], adapter[f"{name}.lora_b"]
        out[f"{name}.weight"] = w + (scale * (b.flatten(1).float() @ a.flatten(1).float())).reshape(w.shape).to(w.dtype)
    return out
