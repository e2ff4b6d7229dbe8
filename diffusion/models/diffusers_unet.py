"""A diffusers ``UNet2DConditionModel`` as the raw network F(x_in, c_noise, cond) (train.denoiser diffusers).

Nothing changes around it: ``diffusion.models.precond.Denoiser`` scales the input by c_in, which makes
it the VP sample x_t that Stable-Diffusion-family UNets read, and passes c_noise, the DDPM timestep of
sigma, as their ``timestep``; the UNet predicts eps or v as train.prediction says. The caption's token
states are ``encoder_hidden_states`` and their padding mask ``encoder_attention_mask``. The pooled
caption vector is used only by a config whose ``class_embed_type`` is ``projection`` (as
``class_labels``); otherwise the network does not read it (an SD 1.x/2.x UNet has no such input).

The module's state_dict keys are ``"unet." + diffusers' keys``, so diffusers' weights load into it by
prefix (``read_diffusers_unet``, the warm start) and leave it by prefix (``export_diffusers``).
Everything here is offline: a hub id is looked up in the local Hugging Face cache only.
"""

from __future__ import annotations

import json
from pathlib import Path

from torch import Tensor, nn

from diffusion.artifacts import MODEL_CONFIG, MODEL_WEIGHTS, require_model
from diffusion.config import DIFFUSERS_SMALL_UNET, DiffusersConfig
from diffusion.errors import ConfigError, T2IError
from diffusion.models.unet import Cond

PREFIX = "unet."
# model.json's key for the full UNet2DConditionModel config (written by store.save_model), so that
# load_model rebuilds the network without the folder, file or hub id it first came from
CONFIG_KEY = "diffusers_unet"
# addition embeddings that need inputs this pipeline does not have (SDXL's time ids, images, hints)
UNSUPPORTED_ADDITIONS = ("text_time", "text_image", "image", "image_hint")


def _unet_class():
    try:
        from diffusers import UNet2DConditionModel
    except ImportError:
        raise T2IError("train.denoiser diffusers needs the diffusers package: pip install diffusers") from None
    return UNet2DConditionModel


def _plain(config) -> dict:
    """A UNet config as JSON-ready data, without diffusers' bookkeeping keys (``_class_name`` ...)."""
    return json.loads(json.dumps({k: v for k, v in dict(config).items() if not k.startswith("_")}))


def load_unet_config(source: str, subfolder: str | None = None) -> dict:
    """The config.json of a diffusers UNet: a folder, or a hub id already in the local cache."""
    try:
        return _plain(_unet_class().load_config(source, subfolder=subfolder, local_files_only=True))
    except (OSError, ValueError, EnvironmentError) as e:
        where = f"{source}" + (f" (subfolder {subfolder})" if subfolder else "")
        raise ConfigError(f"train.diffusers: no UNet config.json at {where} (a diffusers folder, or a hub id "
                          f"already in the local Hugging Face cache): {str(e).splitlines()[0]}") from None


def read_diffusers_unet(source: str, subfolder: str | None = None, config: dict | str | None = None
                        ) -> tuple[dict, dict[str, Tensor]]:
    """(UNet2DConditionModel config, state_dict in diffusers' key names) of a diffusers folder, a cached
    hub id, or a single ``.safetensors`` file. A single file carries no config: ``config`` gives it (a
    mapping or a folder); the file may hold diffusers' keys or the original Stable Diffusion (LDM)
    layout (``model.diffusion_model.*``, converted with diffusers' own converter)."""
    if str(source).endswith(".safetensors"):
        from safetensors.torch import load_file

        if config is None:
            raise ConfigError(f"train.diffusers.pretrained {source} is a single file: set train.diffusers.config "
                              "to its UNet2DConditionModel config (a mapping or a folder with config.json)")
        if not Path(source).is_file():
            raise ConfigError(f"train.diffusers.pretrained: no such file {source}")
        cfg = dict(config) if isinstance(config, dict) else load_unet_config(config, subfolder)
        state = load_file(str(source))
        if any(k.startswith("model.diffusion_model.") for k in state):
            from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

            state = convert_ldm_unet_checkpoint(state, cfg)
        return cfg, state
    cfg = load_unet_config(source, subfolder)
    try:
        unet = _unet_class().from_pretrained(source, subfolder=subfolder, local_files_only=True)
    except (OSError, ValueError, EnvironmentError) as e:
        raise ConfigError(f"train.diffusers.pretrained: cannot load UNet weights from {source}: "
                          f"{str(e).splitlines()[0]}") from None
    return cfg, unet.state_dict()


def unet_config(dc: DiffusersConfig, text_dim: int, in_channels: int) -> dict:
    """The full UNet2DConditionModel config train.diffusers names, with the data's widths filled in
    (in/out channels, cross_attention_dim) where it leaves them out and checked where it gives them."""
    if isinstance(dc.config, dict):
        cfg = dict(dc.config)
    elif isinstance(dc.config, str):
        cfg = load_unet_config(dc.config, dc.subfolder)
    elif dc.pretrained and not dc.pretrained.endswith(".safetensors"):
        cfg = load_unet_config(dc.pretrained, dc.subfolder)
    else:
        cfg = dict(DIFFUSERS_SMALL_UNET)
    cfg.setdefault("in_channels", in_channels)
    cfg.setdefault("out_channels", cfg["in_channels"])
    cfg.setdefault("cross_attention_dim", text_dim)
    if cfg["cross_attention_dim"] != text_dim:
        raise ConfigError(f"train.diffusers: the UNet's cross_attention_dim {cfg['cross_attention_dim']} must equal "
                          f"the text embeddings' width {text_dim} (embed.model/embed.layer, or the UNet's config)")
    if cfg["in_channels"] != in_channels or cfg["out_channels"] != in_channels:
        raise ConfigError(f"train.diffusers: the UNet's in/out_channels {cfg['in_channels']}/{cfg['out_channels']} "
                          f"must equal the data's channels {in_channels} (3: pixels; latents.vae's latent channels)")
    if cfg.get("addition_embed_type") in UNSUPPORTED_ADDITIONS:
        raise ConfigError(f"train.diffusers: addition_embed_type {cfg['addition_embed_type']} needs inputs this "
                          "pipeline does not make (SDXL's time ids, images); use a UNet without it")
    return cfg


class DiffusersUNet(nn.Module):
    """F(x_in, c_noise, cond) over a diffusers UNet2DConditionModel (``self.unet``)."""

    def __init__(self, config: dict, pooled_dim: int):
        super().__init__()
        try:
            self.unet = _unet_class().from_config(config)
        except (ValueError, TypeError, AssertionError) as e:
            raise ConfigError(f"train.diffusers.config cannot build a UNet2DConditionModel: "
                              f"{str(e).splitlines()[0]}") from None
        # the pooled caption vector feeds a projection class embedding, when the config has one
        self.pooled_as_class = self.unet.config.class_embed_type == "projection"
        if self.pooled_as_class and self.unet.config.projection_class_embeddings_input_dim != pooled_dim:
            raise ConfigError(f"train.diffusers: projection_class_embeddings_input_dim "
                              f"{self.unet.config.projection_class_embeddings_input_dim} must equal the pooled "
                              f"caption width {pooled_dim}")

    def config(self) -> dict:
        """The full UNet2DConditionModel config (what model.json keeps)."""
        return _plain(self.unet.config)

    def set_grad_checkpointing(self, enabled: bool) -> None:
        if enabled:
            self.unet.enable_gradient_checkpointing()
        else:
            self.unet.disable_gradient_checkpointing()

    def forward(self, x: Tensor, c_noise: Tensor, cond: Cond) -> Tensor:
        """x: (B, C, H, W), the VP sample x_t; c_noise: (B,) DDPM timesteps; returns eps or v (B, C, H, W)."""
        return self.unet(x, c_noise, encoder_hidden_states=cond.tokens, encoder_attention_mask=cond.mask,
                         class_labels=cond.pooled if self.pooled_as_class else None, return_dict=False)[0]


def build(dc: DiffusersConfig, text_dim: int, pooled_dim: int, in_channels: int) -> DiffusersUNet:
    """The network train.diffusers names: its config, and its pretrained weights if any."""
    net = DiffusersUNet(unet_config(dc, text_dim, in_channels), pooled_dim)
    if dc.pretrained:
        _, state = read_diffusers_unet(dc.pretrained, dc.subfolder, dc.config)
        missing, unexpected = net.unet.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise ConfigError(f"train.diffusers.pretrained {dc.pretrained} does not fit the UNet's config: "
                              f"{len(missing)} missing keys (e.g. {missing[:1]}), {len(unexpected)} unexpected "
                              f"(e.g. {unexpected[:1]})")
    return net


def export_diffusers(model_dir: str | Path, out: str | Path) -> Path:
    """A trained diffusers-denoiser folder (model.json + model.safetensors, the EMA weights) as a diffusers
    folder: config.json + diffusion_pytorch_model.safetensors, which ``UNet2DConditionModel.from_pretrained``
    loads, plus scheduler_config.json (the DDPMScheduler of the training schedule and prediction)."""
    from safetensors.torch import load_file

    d = require_model(model_dir)
    meta = json.loads((d / MODEL_CONFIG).read_text())
    if meta["train"].get("denoiser") != "diffusers" or CONFIG_KEY not in meta:
        raise T2IError(f"{d} is a train.denoiser {meta['train'].get('denoiser', 'unet')} model: only a diffusers "
                       "denoiser (train.denoiser diffusers) exports as a diffusers UNet")
    if "lora" in meta:  # model.safetensors is then the base alone
        raise T2IError(f"{d} holds a LoRA adapter beside its base: merge it first (register.merge_lora, "
                       "diffusion.models.store.merge_model), then export the merged folder")
    weights = load_file(str(d / MODEL_WEIGHTS))
    unet = _unet_class().from_config(meta[CONFIG_KEY])
    unet.load_state_dict({k.removeprefix(PREFIX): v for k, v in weights.items()})
    out = Path(out)
    unet.save_pretrained(out, safe_serialization=True)
    _scheduler(meta["train"]).save_pretrained(out)
    return out


def _scheduler(train: dict):
    """diffusers' DDPMScheduler with the noise table the model was trained on."""
    from diffusers import DDPMScheduler

    return DDPMScheduler(num_train_timesteps=train["timesteps"], beta_start=train["beta_min"],
                         beta_end=train["beta_max"], beta_schedule=train.get("beta_schedule", "linear"),
                         prediction_type={"eps": "epsilon", "v": "v_prediction"}[train["prediction"]],
                         rescale_betas_zero_snr=bool(train.get("zero_terminal_snr", False)), clip_sample=False)
