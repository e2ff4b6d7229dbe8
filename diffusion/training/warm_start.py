"""Warm start (``train.init_from``): a fresh run that begins from another model's weights.

``resolve(source)`` says what ``train.init_from`` names: a train-stage model folder
(model.safetensors + model.json), a downloaded MLflow model folder (with ``MLmodel``), or a
diffusers UNet (a folder with a UNet2DConditionModel's config.json, or one ``.safetensors`` file;
read by ``diffusion.models.diffusers_unet.read_diffusers_unet``). A registered version
(``models:/<name>@<alias>``, ``models:/<name>/<version>``) lives in the MLflow registry, a layer
above training: the train stage fetches it (``diffusion.registry.versions.fetch_denoiser``) and
hands the fetch in as ``registered``.

``apply(model, cfg, parent, table, latent)`` checks that the parent fits this run (denoiser kind,
pixel or latent space, text width; another text tower is a loud warning) and loads its weights
into the fresh network: the EMA weights a train-stage model exports, so the run starts from
what was sampled and registered. A tensor whose shape differs is named with both shapes.

Not resume: the step, optimizer, learning-rate schedule, EMA warm-up and data order start fresh
(``train.init_optimizer`` is not offered: a registered version carries no optimizer state, and a
folder's checkpoint.pt is the resume of that run). A run that finds its own checkpoint.pt
continues it (``diffusion.training.train.resume``, after this), and the parent is part of what
that checkpoint must match: a different parent is a different run.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from diffusion.artifacts import BUNDLE_DENOISER, LORA_WEIGHTS, MODEL_CONFIG, MODEL_WEIGHTS, model_weights_sha256
from diffusion.errors import ConfigError, T2IError

KEY = "train.init_from"
KINDS = "a train-stage model folder, models:/<name>@<alias>, models:/<name>/<version>, or a diffusers UNet"


@dataclass(frozen=True)
class Parent:
    """What ``train.init_from`` resolved to."""

    source: str  # as written in train.init_from
    resolved: str  # models:/<name>/<version> (an alias resolved once), or the absolute path read
    kind: str  # "t2i": a model this project trained | "diffusers": a diffusers UNet
    path: Path  # the model folder (t2i), or the diffusers folder / file
    meta: dict | None  # a t2i parent's model.json

    def read(self, cfg=None) -> tuple[dict | None, dict[str, torch.Tensor]]:
        """(a diffusers UNet's config or None, the parent's weights with the keys of this project's
        networks): a t2i model's EMA (a LoRA model's adapter folded into its base: the network it
        samples as), a diffusers UNet's under ``unet.``, as the diffusers denoiser names them (a
        single file's config comes from ``cfg.diffusers.config``)."""
        from safetensors.torch import load_file

        if self.kind == "t2i":
            state = load_file(str(self.path / MODEL_WEIGHTS))
            if "lora" in (self.meta or {}):
                from diffusion.models import lora

                if not (self.path / LORA_WEIGHTS).is_file():
                    raise ConfigError(f"{KEY} {self.source}: model.json names a LoRA adapter but "
                                      f"{self.path / LORA_WEIGHTS} is missing")
                state = lora.merged_state_dict(state, load_file(str(self.path / LORA_WEIGHTS)), self.meta["lora"])
            return None, state
        config, state = _read_diffusers(self, cfg)
        return config, {f"unet.{k}": v for k, v in state.items()}

    def record(self, state: dict[str, torch.Tensor] | None = None) -> dict[str, str]:
        """model.json's ``parent``: the source as written, what it resolved to, and the sha256 of the
        weights read (a t2i model's, as batch generation records them: ``artifacts.model_weights_sha256``;
        a diffusers UNet's tensors, ``state`` if already read)."""
        if self.kind == "t2i":
            digest = model_weights_sha256(self.path)
        else:
            digest = _tensors_sha256(state if state is not None else self.read()[1])
        return {"source": self.source, "resolved": self.resolved, "sha256": digest}


def tags(record: dict | None, prefix: str = "parent.") -> dict[str, str]:
    """A ``record`` (model.json's ``parent``) as MLflow tags: ``parent.source``, ``parent.resolved``,
    ``parent.sha256`` on the training run; the register stage writes them as ``lineage.parent.*``."""
    return {f"{prefix}{k}": str(v) for k, v in (record or {}).items()}


def resolve(source: str, registered: Callable[[str], tuple[str, Path]] | None = None) -> Parent:
    """The parent ``source`` names. ``registered(uri) -> (models:/<name>/<version>, its denoiser
    folder)`` fetches a registered version (``diffusion.registry.versions.fetch_denoiser``); a
    missing version, alias or folder is one line."""
    if source.startswith("models:/"):
        if registered is None:
            raise ConfigError(f"{KEY} {source}: a registered version is fetched by the train stage (t2i train, "
                              "dvc repro); a library call passes it in (warm_start.resolve(source, registered=...))")
        try:
            resolved, folder = registered(source)
        except T2IError as e:
            raise ConfigError(f"{KEY} {source}: {e}") from None
        return _t2i(source, resolved, Path(folder))
    path = Path(source).expanduser()
    if not path.exists():
        raise ConfigError(f"{KEY} {source}: no such file or folder (expected {KINDS})")
    path = path.resolve()
    if path.name == MODEL_WEIGHTS and (path.parent / MODEL_CONFIG).is_file():  # a model folder's weights file
        path = path.parent
    if path.is_dir() and (path / MODEL_WEIGHTS).is_file() and (path / MODEL_CONFIG).is_file():
        return _t2i(source, str(path), path)
    if path.is_dir() and (path / "MLmodel").is_file():  # a downloaded MLflow model
        return _t2i(source, str(path), path / "artifacts" / BUNDLE_DENOISER)
    if path.suffix == ".safetensors" or (path / "config.json").is_file() or (path / "unet" / "config.json").is_file():
        return Parent(source, str(path), "diffusers", path, None)
    raise ConfigError(f"{KEY} {source}: holds neither {MODEL_WEIGHTS} + {MODEL_CONFIG} nor a diffusers UNet "
                      f"(config.json, or a .safetensors file); expected {KINDS}")


def _t2i(source: str, resolved: str, folder: Path) -> Parent:
    for f in (MODEL_WEIGHTS, MODEL_CONFIG):
        if not (folder / f).is_file():
            raise ConfigError(f"{KEY} {source}: {folder / f} is missing (expected {KINDS})")
    return Parent(source, resolved, "t2i", folder, json.loads((folder / MODEL_CONFIG).read_text()))


def _read_diffusers(parent: Parent, cfg) -> tuple[dict, dict[str, torch.Tensor]]:
    """(config, state dict) of a diffusers UNet parent, through ``read_diffusers_unet``."""
    from diffusion.models.diffusers_unet import read_diffusers_unet

    path = parent.path
    config = cfg.diffusers.config if cfg is not None else None
    if path.is_file() and config is None:
        raise ConfigError(f"{KEY} {parent.source} is a single .safetensors file: set train.diffusers.config to "
                          "its UNet2DConditionModel config (a mapping, or a folder with config.json)")
    subfolder = "unet" if path.is_dir() and not (path / "config.json").is_file() else None
    return read_diffusers_unet(str(path), subfolder=subfolder, config=config if path.is_file() else None)


def _check_diffusers_config(parent: Parent, config: dict, net) -> None:
    """One line where a diffusers parent reads another text width or works in other channels than
    the UNet train.diffusers builds here (whose widths come from the data)."""
    own = net.config() if hasattr(net, "config") and callable(net.config) else {}
    if own and config.get("cross_attention_dim") != own.get("cross_attention_dim"):
        raise ConfigError(f"{KEY} {parent.source} reads {config.get('cross_attention_dim')}-wide text "
                          f"(cross_attention_dim); this run's caption embeddings are {own.get('cross_attention_dim')} "
                          "wide: embed with a text tower of its width (embed.model, embed.layer), or train from scratch")
    for k in ("in_channels", "out_channels"):
        if own and config.get(k) != own.get(k):
            raise ConfigError(f"{KEY} {parent.source} has {k} {config.get(k)}; this run's data has {own.get(k)} "
                              "(3: pixels; latents.vae's latent channels): a model of another space")


def _tensors_sha256(state: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for k in sorted(state):
        t = state[k].detach().cpu().contiguous().reshape(-1)
        h.update(f"{k}\0{t.dtype}\0{tuple(t.shape)}\0".encode() + t.view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


# --------------------------------------------------------------------------------------------
# Fit and load


def _space(latents: dict | None) -> str:
    if latents is None:
        return "pixel space (3 channels)"
    return f"the latent space of {latents.get('vae')} ({latents.get('channels')} channels)"


_SPACE_KEYS = ("channels", "vae_sha256", "scaling_factor", "shift_factor")


def check(parent: Parent, cfg, text_dim: int, pooled_dim: int, latents: dict | None,
          text_fingerprint: dict) -> None:
    """One line where ``parent`` cannot start this run (another denoiser kind, pixel or latent
    space, text width); a printed warning where it was trained on another text tower or
    prediction target. A diffusers UNet is checked tensor by tensor in ``load``."""
    src = parent.source
    if parent.kind == "diffusers":
        if cfg.denoiser != "diffusers":
            raise ConfigError(f"{KEY} {src} is a diffusers UNet: set train.denoiser diffusers "
                              f"(this run builds a {cfg.denoiser})")
        return
    pm = parent.meta or {}
    kind = pm.get("train", {}).get("denoiser", "unet")
    if kind != cfg.denoiser:
        raise ConfigError(f"{KEY} {src} is a {kind} model: set train.denoiser {kind} (this run builds a {cfg.denoiser})")
    theirs, ours = pm.get("latents"), latents
    if (theirs is None) != (ours is None) or (
            theirs is not None and any(theirs.get(k) != ours.get(k) for k in _SPACE_KEYS)):
        raise ConfigError(f"{KEY} {src} was trained in {_space(theirs)}; this run trains in {_space(ours)} "
                          "(latents.vae): warm start from a model of the same space, or train from scratch")
    for name, here in (("text_dim", text_dim), ("pooled_dim", pooled_dim)):
        if pm.get(name) != here:
            raise ConfigError(f"{KEY} {src} reads {pm.get(name)}-wide text ({name}); this run's caption embeddings "
                              f"are {here} wide: embed with the parent's text tower (embed.model), or train from scratch")
    if pm.get("text_fingerprint_id") != _fingerprint_id(text_fingerprint):
        print(f"WARNING: {KEY} {src} was trained on another text tower ({pm.get('text_fingerprint_id')}, this run: "
              f"{_fingerprint_id(text_fingerprint)}): its cross-attention learned to read other embeddings")
    if pm.get("train", {}).get("prediction", "eps") != cfg.prediction:
        print(f"WARNING: {KEY} {src} predicts {pm['train'].get('prediction')}, this run train.prediction "
              f"{cfg.prediction}: its output starts with the wrong meaning")


def _fingerprint_id(fingerprint: dict) -> str:
    from diffusion.data.text import fingerprint_id

    return fingerprint_id(fingerprint)


def load(net: torch.nn.Module, parent: Parent, cfg=None) -> dict[str, torch.Tensor]:
    """Copy the parent's weights into ``net`` (the raw network) and return them; one line naming
    the first tensor of ``net`` (in its own order) that the parent lacks or holds in another shape,
    or the first tensor the parent has that ``net`` lacks."""
    config, state = parent.read(cfg)
    if config is not None:
        _check_diffusers_config(parent, config, net)
    own = net.state_dict()
    hint = _config_hint(parent, cfg)
    for k, v in own.items():
        if k not in state:
            raise ConfigError(f"{KEY} {parent.source} does not fit this network: it has no tensor {k!r}{hint}")
        if tuple(state[k].shape) != tuple(v.shape):
            raise ConfigError(f"{KEY} {parent.source} does not fit this network: tensor {k!r} is "
                              f"{tuple(state[k].shape)} there, {tuple(v.shape)} here{hint}")
    extra = [k for k in state if k not in own]
    if extra:
        raise ConfigError(f"{KEY} {parent.source} does not fit this network: it has a tensor {extra[0]!r} "
                          f"this network lacks{hint}")
    net.load_state_dict({k: state[k].to(own[k].dtype) for k in own})
    return state


def _config_hint(parent: Parent, cfg) -> str:
    """`` (train.unet.channels: 16 there, 32 here)``: the network keys where the parent's
    model.json and this run differ; for a diffusers UNet, where its config is."""
    if parent.kind == "diffusers":
        return f" (set train.diffusers.config to {parent.path if parent.path.is_dir() else 'its config'} to build its UNet)"
    if cfg is None or parent.meta is None:
        return ""
    from diffusion.config import to_dict

    section = cfg.denoiser
    theirs, ours = parent.meta.get("train", {}).get(section) or {}, to_dict(cfg).get(section) or {}
    diff = [f"train.{section}.{k}: {theirs.get(k)} there, {ours.get(k)} here" for k in ours if theirs.get(k) != ours.get(k)]
    return f" ({'; '.join(diff)})" if diff else ""


def apply(model, cfg, parent: Parent | None, table, latent) -> dict | None:
    """build_state's warm start: with ``train.init_from`` set, check the parent (``parent``, or
    the one ``cfg.init_from`` names on disk) against this run and load its weights into
    ``model.net``. Returns model.json's ``parent`` record (None: from scratch)."""
    if not cfg.init_from:
        return None
    parent = parent or resolve(cfg.init_from)
    check(parent, cfg, table.tokens.shape[-1], table.pooled.shape[-1],
          latent.as_dict() if latent is not None else None, table.fingerprint)
    state = load(model.net, parent, cfg)
    print(f"{KEY}: starting from {parent.resolved}")
    return parent.record(state)
