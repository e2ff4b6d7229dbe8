"""The logged MLflow model's files: lay a self-contained bundle out, and load one back.

A bundle holds the EMA denoiser (weights and config), the text tower's weights and spec, the
sampler settings and the evaluation it was registered with (and a latent model's autoencoder);
its file names are ``diffusion.artifacts``'. Used by the pyfunc model, batch generation and serving.
"""

from __future__ import annotations

import json
from pathlib import Path

from diffusion.artifacts import BUNDLE, BUNDLE_DENOISER, BUNDLE_EVAL, BUNDLE_SAMPLER, BUNDLE_TEXT_SPEC, BUNDLE_TEXT_WEIGHTS, BUNDLE_VAE, LORA_WEIGHTS, MODEL_CONFIG, MODEL_WEIGHTS, require_model, write_json
from diffusion.config import SAMPLER_KEYS, SampleConfig
from diffusion.errors import T2IError
from diffusion.models.store import load_model, merge_model

# the sampler settings a model is registered with (SampleConfig keys)
BUNDLE_SAMPLER_KEYS = (*SAMPLER_KEYS, "batch_size")


def write_bundle(dest: str | Path, model_dir: str | Path, encoder, settings, evaluation: dict,
                 vae=None, merge_lora: bool = False) -> dict[str, str]:
    """Lay out a self-contained model in ``dest`` (with ``vae``, a latent model's autoencoder);
    returns MLflow's {artifact name: path}. A LoRA model goes in as its base + adapter, or with
    ``merge_lora`` (register.merge_lora) as the merged weights, a plain model; ``load_model`` reads both."""
    import shutil

    from safetensors.torch import save_file

    dest = Path(dest)
    (dest / BUNDLE_DENOISER).mkdir(parents=True)
    src = require_model(model_dir)
    lora = "lora" in json.loads((src / MODEL_CONFIG).read_text())
    if lora and merge_lora:
        merge_model(src, dest / BUNDLE_DENOISER)
    else:
        for f in (MODEL_WEIGHTS, MODEL_CONFIG, *((LORA_WEIGHTS,) if lora else ())):
            shutil.copy(src / f, dest / BUNDLE_DENOISER / f)
    save_file({k: v.detach().cpu().contiguous() for k, v in encoder.model.state_dict().items()},
              str(dest / BUNDLE_TEXT_WEIGHTS))
    write_json(dest / BUNDLE_TEXT_SPEC, {"model": encoder.fingerprint["model"], "layer": encoder.layer,
                                         "fingerprint": encoder.fingerprint})
    write_json(dest / BUNDLE_SAMPLER, {k: getattr(settings, k) for k in BUNDLE_SAMPLER_KEYS})
    write_json(dest / BUNDLE_EVAL, evaluation)
    paths = {name: str(dest / f) for name, f in BUNDLE.items()}
    if vae is not None:
        vae.save_pretrained(str(dest / BUNDLE_VAE), safe_serialization=True)
        paths["vae"] = str(dest / BUNDLE_VAE)
    return paths


def load_bundle(artifacts: dict[str, str], device="cpu"):
    """(denoiser, meta, text encoder, sampler settings) from a bundle's artifact paths (as MLflow
    hands them to ``load_context``, or ``bundle_paths`` of a downloaded model)."""
    from diffusion.data.text import load_text_encoder

    spec = json.loads(Path(artifacts["text_encoder_spec"]).read_text())
    encoder = load_text_encoder(spec["model"], pretrained=artifacts["text_encoder"], layer=spec["layer"],
                                device=str(device), fingerprint=spec["fingerprint"])
    vae = None
    if artifacts.get("vae"):
        from diffusion.data.latents import load_vae

        vae = load_vae(artifacts["vae"], key="the model's vae artifact")
    denoiser, meta = load_model(artifacts["denoiser"], device, vae=vae)
    saved = json.loads(Path(artifacts["sampler"]).read_text())
    settings = SampleConfig(**{k: v for k, v in saved.items() if k in BUNDLE_SAMPLER_KEYS})
    return denoiser, meta, encoder, settings


def bundle_paths(model_root: str | Path) -> dict[str, str]:
    """Artifact paths of a downloaded MLflow model folder (the one holding ``MLmodel``)."""
    root = Path(model_root) / "artifacts"
    paths = {name: str(root / f) for name, f in BUNDLE.items() if name != "evaluation"}
    for p in paths.values():
        if not Path(p).exists():
            raise T2IError(f"{model_root} is not a t2i model: {p} is missing")
    if (root / BUNDLE_VAE).is_dir():
        paths["vae"] = str(root / BUNDLE_VAE)
    return paths
