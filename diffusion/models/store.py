"""A trained denoiser on disk: build the network params name, save its EMA weights, load it back.

The file names and must-exist checks are ``diffusion.artifacts``'; this module turns them into
networks. Used by training (build, save) and by everything that samples (load).
"""

from __future__ import annotations

import json
from pathlib import Path

from diffusion.artifacts import MODEL_CONFIG, MODEL_WEIGHTS, require_model, write_json


def build_denoiser(cfg, text_dim: int, pooled_dim: int, in_channels: int = 3):
    """The network ``cfg.denoiser`` names (the UNet or the DiT) behind its preconditioning, from a
    TrainConfig (``in_channels``: 3 for pixels, the VAE's latent channels for a latent model)."""
    from diffusion.models.precond import Denoiser

    if cfg.denoiser == "dit":
        from diffusion.models.dit import DiT

        net = DiT(cfg.dit, text_dim=text_dim, pooled_dim=pooled_dim, in_channels=in_channels)
    else:
        from diffusion.models.unet import UNet

        net = UNet(cfg.unet, text_dim=text_dim, pooled_dim=pooled_dim, in_channels=in_channels)
    return Denoiser(net, cfg.timesteps, cfg.beta_min, cfg.beta_max, cfg.prediction)


def save_model(ema, out_dir: str | Path, meta: dict) -> None:
    """The EMA weights (float32 safetensors) and everything needed to rebuild the network."""
    from safetensors.torch import save_file

    out = Path(out_dir)
    save_file({k: v.detach().float().cpu().contiguous() for k, v in ema.net.state_dict().items()},
              str(out / MODEL_WEIGHTS))
    write_json(out / MODEL_CONFIG, meta)


def load_model(model_dir: str | Path, device="cpu", latents=None, vae=None):
    """(denoiser in eval mode on ``device``, meta) from model.safetensors + model.json.

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
    channels = meta["latents"]["channels"] if "latents" in meta else 3
    den = build_denoiser(train_cfg, meta["text_dim"], meta["pooled_dim"], in_channels=channels)
    den.net.load_state_dict(load_file(str(d / MODEL_WEIGHTS)))
    from diffusion.data import latents as lat

    if vae is None:
        vae = lat.vae_for_model(meta, latents)
    if vae is not None:
        den.codec = lat.codec_for(vae, meta, device, latents)
    return den.to(device).eval(), meta
