"""A trained denoiser on disk: build the network params name, save its EMA weights, load it back.

The file names and must-exist checks are ``diffusion.artifacts``'; this module turns them into
networks. Used by training (build, save) and by everything that samples (load).
"""

from __future__ import annotations

import json
from pathlib import Path

from diffusion.artifacts import LORA_WEIGHTS, MODEL_CONFIG, MODEL_WEIGHTS, require_model, write_json


def build_denoiser(cfg, text_dim: int, pooled_dim: int, in_channels: int = 3):
    """The network ``cfg.denoiser`` names (the UNet, the DiT or a diffusers UNet) behind its preconditioning, from a
    TrainConfig (``in_channels``: 3 for pixels, the VAE's latent channels for a latent model)."""
    from diffusion.models.precond import Denoiser

    if cfg.denoiser == "diffusers":
        from diffusion.models import diffusers_unet

        net = diffusers_unet.build(cfg.diffusers, text_dim, pooled_dim, in_channels)
    elif cfg.denoiser == "dit":
        from diffusion.models.dit import DiT

        net = DiT(cfg.dit, text_dim=text_dim, pooled_dim=pooled_dim, in_channels=in_channels)
    else:
        from diffusion.models.unet import UNet

        net = UNet(cfg.unet, text_dim=text_dim, pooled_dim=pooled_dim, in_channels=in_channels)
    return Denoiser(net, cfg.timesteps, cfg.beta_min, cfg.beta_max, cfg.prediction,
                    beta_schedule=cfg.beta_schedule, zero_terminal_snr=cfg.zero_terminal_snr)


def save_model(ema, out_dir: str | Path, meta: dict) -> None:
    """The EMA weights (float32 safetensors) and everything needed to rebuild the network. A network
    with LoRA adapters is written as its base (model.safetensors, the keys of the plain network),
    its adapter (adapter.safetensors) and model.json's ``lora`` (rank, alpha, the modules adapted)."""
    from safetensors.torch import save_file

    from diffusion.models import lora

    out = Path(out_dir)

    def save(tensors: dict, name: str) -> None:
        save_file({k: v.detach().float().cpu().contiguous() for k, v in tensors.items()}, str(out / name))

    (out / LORA_WEIGHTS).unlink(missing_ok=True)  # never a stale adapter beside new weights
    if lora.has_lora(ema.net):
        save(lora.base_state_dict(ema.net), MODEL_WEIGHTS)
        save(lora.adapter_state_dict(ema.net), LORA_WEIGHTS)
        meta = {**meta, "lora": lora.describe(ema.net)}
    else:
        save(ema.net.state_dict(), MODEL_WEIGHTS)
        meta = {k: v for k, v in meta.items() if k != "lora"}
    from diffusion.models.diffusers_unet import CONFIG_KEY, DiffusersUNet

    if isinstance(ema.net, DiffusersUNet):  # its full config: load_model needs no folder, file or hub id
        meta = {**meta, CONFIG_KEY: ema.net.config()}
    write_json(out / MODEL_CONFIG, meta)


def merge_model(model_dir: str | Path, out_dir: str | Path) -> dict:
    """A LoRA model (base + adapter) written to ``out_dir`` as a plain model with the adapter folded
    into its weights (register.merge_lora); what it was merged from is model.json's ``lora_merged``.
    Works on the files alone (no network, no autoencoder). Returns the new meta."""
    from safetensors.torch import load_file, save_file

    from diffusion.models import lora

    d = require_model(model_dir)
    meta = json.loads((d / MODEL_CONFIG).read_text())
    if "lora" not in meta:
        raise ValueError(f"{d} has no LoRA adapter to merge")
    merged = lora.merged_state_dict(load_file(str(d / MODEL_WEIGHTS)), load_file(str(d / LORA_WEIGHTS)), meta["lora"])
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in merged.items()}, str(out / MODEL_WEIGHTS))
    meta = {**{k: v for k, v in meta.items() if k != "lora"}, "lora_merged": meta["lora"]}
    write_json(out / MODEL_CONFIG, meta)
    return meta


def load_model(model_dir: str | Path, device="cpu", latents=None, vae=None):
    """(denoiser in eval mode on ``device``, meta) from model.safetensors + model.json (and a LoRA
    model's adapter.safetensors, applied unmerged).

    A latent model also gets its decoder (``denoiser.codec``): ``vae`` if given, else the one
    params ``latents`` (a LatentsConfig) name, else the one recorded in model.json; each is
    checked against the latent space the model was trained on (``diffusion.data.latents.check_vae``).
    """
    from safetensors.torch import load_file

    from diffusion.config import TrainConfig, parse_section

    d = require_model(model_dir)
    meta = json.loads((d / MODEL_CONFIG).read_text())
    # params.yaml's parser: keys added since the model was written take their defaults
    train_cfg = parse_section(TrainConfig, meta["train"], "train", source=str(d / MODEL_CONFIG))
    if "diffusers_unet" in meta:  # a diffusers UNet from the config it was saved with, weights below
        from dataclasses import replace

        from diffusion.config import DiffusersConfig

        train_cfg = replace(train_cfg, diffusers=DiffusersConfig(config=meta["diffusers_unet"]))
    channels = meta["latents"]["channels"] if "latents" in meta else 3
    den = build_denoiser(train_cfg, meta["text_dim"], meta["pooled_dim"], in_channels=channels)
    den.net.load_state_dict(load_file(str(d / MODEL_WEIGHTS)))
    if "lora" in meta:  # the base above, then its adapter on the modules it was trained on
        from diffusion.models import lora

        spec = meta["lora"]
        lora.inject(den.net, spec["modules"], spec["rank"], spec["alpha"], spec["dropout"], exact=True)
        lora.load_trainable_state_dict(den.net, load_file(str(d / LORA_WEIGHTS)))
    from diffusion.data import latents as lat

    if vae is None:
        vae = lat.vae_for_model(meta, latents)
    if vae is not None:
        den.codec = lat.codec_for(vae, meta, device, latents)
    return den.to(device).eval(), meta
