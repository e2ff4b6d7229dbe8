"""train.denoiser diffusers: a diffusers UNet2DConditionModel behind the denoiser contract, trained by the
real loop, resumed, loaded, sampled, bundled for the registry, batch-generated, and exported as a folder that diffusers itself loads and runs
to the same numbers."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import pytest
import torch
from diffusers import DDPMScheduler, UNet2DConditionModel
from safetensors.torch import load_file, save_file

from conftest import ROOT, tiny_params_dict
from diffusion.config import DiffusersConfig, parse_params, to_dict
from diffusion.data.text import EmbeddingTable
from diffusion.errors import ConfigError
from diffusion.models.diffusers_unet import DiffusersUNet, export_diffusers, read_diffusers_unet
from diffusion.models.store import build_denoiser, load_model, save_model
from diffusion.models.schedules import sigma_to_t
from diffusion.models.unet import Cond

# a tiny SD-shaped UNet: 16/32 wide, cross-attention at the lower level, 2 heads (sample_size 16);
# cross_attention_dim is the test table's text width (the tower's token embeddings)
TINY_UNET = {"block_out_channels": [16, 32], "layers_per_block": 1, "attention_head_dim": 2, "sample_size": 16,
             "norm_num_groups": 8, "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D"],
             "up_block_types": ["CrossAttnUpBlock2D", "UpBlock2D"]}


def diffusers_train(tiny_params, text_dim: int, **train):
    unet = {**TINY_UNET, "cross_attention_dim": text_dim}
    cfg = dataclasses.replace(tiny_params.train, denoiser="diffusers", diffusers=DiffusersConfig(config=unet),
                              **{"steps": 6, "checkpoint_every": 6, "val_every": 0, **train})
    cfg.check("train")
    return cfg


def random_cond(table: EmbeddingTable, n: int, seed: int = 0) -> Cond:
    g = torch.Generator().manual_seed(seed)
    rows = torch.randint(0, len(table.tokens), (n,), generator=g)
    return Cond(table.tokens[rows].float(), table.mask[rows], table.pooled[rows].float())


@pytest.fixture(scope="module")
def table(tiny_embeddings) -> EmbeddingTable:
    return EmbeddingTable.load(tiny_embeddings)


@pytest.fixture(scope="module")
def diffusers_model(tiny_params, tiny_shards, table, tmp_path_factory) -> Path:
    """A diffusers-denoiser train folder written by the real train() on the fixtures' shards (v prediction)."""
    from diffusion.artifacts import shard_urls
    from diffusion.training.train import train

    out = tmp_path_factory.mktemp("diffusers-model")
    cfg = diffusers_train(tiny_params, table.tokens.shape[-1], prediction="v")
    train(cfg, shard_urls(tiny_shards, "train"), table, out, image_size=16, progress=False)
    return out


def test_trains_loads_and_samples(diffusers_model, table, tiny_params):
    from diffusion.sampling.generate import generate, table_cond

    meta = json.loads((diffusers_model / "model.json").read_text())
    assert meta["steps_done"] == 6 and meta["train"]["denoiser"] == "diffusers"
    # the full diffusers config is in model.json, so loading needs no folder or hub
    assert meta["diffusers_unet"]["block_out_channels"] == [16, 32]
    assert meta["diffusers_unet"]["cross_attention_dim"] == table.tokens.shape[-1]
    den, _ = load_model(diffusers_model)
    assert isinstance(den.net, DiffusersUNet) and den.prediction == "v"
    saved = load_file(str(diffusers_model / "model.safetensors"))
    assert set(saved) == set(den.net.state_dict()) and all(k.startswith("unet.") for k in saved)
    for k, v in den.net.state_dict().items():
        assert torch.equal(v, saved[k]), k
    fresh = build_denoiser(diffusers_train(tiny_params, table.tokens.shape[-1]), table.tokens.shape[-1],
                           table.pooled.shape[-1])
    assert any(not torch.equal(v, fresh.net.state_dict()[k]) for k, v in saved.items())  # training moved them
    cond, uncond = table_cond(table, sorted(c for c in table.rows if c)[:3])
    images = generate(den, cond, uncond, [0, 1, 2], 16, tiny_params.sample)
    assert images.shape == (3, 16, 16, 3) and images.dtype.name == "uint8" and images.std() > 0


def test_export_loads_in_diffusers_and_gives_our_numbers(diffusers_model, table, tmp_path):
    out = export_diffusers(diffusers_model, tmp_path / "unet")
    unet = UNet2DConditionModel.from_pretrained(out).eval()
    den, _ = load_model(diffusers_model)
    x = torch.randn(3, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    sigma = torch.tensor([0.05, 1.0, 20.0])
    cond = random_cond(table, 3)
    with torch.no_grad():
        ours = den(x, sigma, cond)
        # the denoiser contract by hand around diffusers' own module: VP input, DDPM timestep, v prediction
        c_skip, c_out, c_in = (s[:, None, None, None] for s in den.scalings(sigma))
        t = sigma_to_t(sigma, den.sigmas)  # the fractional DDPM timestep of sigma
        v = unet(c_in * x, t, encoder_hidden_states=cond.tokens, encoder_attention_mask=cond.mask).sample
    torch.testing.assert_close(ours, c_skip * x + c_out * v, rtol=1e-5, atol=1e-5)
    sched = DDPMScheduler.from_pretrained(out)
    assert sched.config.prediction_type == "v_prediction" and sched.config.num_train_timesteps == 1000
    # diffusers' noise table is ours: sigma_t = sqrt((1 - abar) / abar)
    abar = sched.alphas_cumprod.double()
    torch.testing.assert_close(((1 - abar) / abar).sqrt().float(), den.sigmas.float(), rtol=1e-4, atol=1e-6)


class StopAt:
    """A TrainLogger that kills the run (as Ctrl-C would) at the first metrics logged at ``step`` or later."""

    def __init__(self, step: int):
        self.step = step

    def log_metrics(self, metrics, step):
        if step >= self.step:
            raise KeyboardInterrupt("simulated kill")

    def log_image(self, image, name):
        pass


def test_killed_run_resumes_to_the_same_weights(tiny_params, tiny_shards, table, tmp_path):
    """Checkpoints hold the diffusers UNet, its EMA and optimizer: killed after the step-3 checkpoint and
    rerun, the run ends bit for bit where an uninterrupted one does."""
    from conftest import assert_same_weights
    from diffusion.artifacts import shard_urls
    from diffusion.training.train import train

    cfg = diffusers_train(tiny_params, table.tokens.shape[-1], steps=6, checkpoint_every=3, log_every=4)
    urls = shard_urls(tiny_shards, "train")
    train(cfg, urls, table, tmp_path / "straight", image_size=16, progress=False)
    with pytest.raises(KeyboardInterrupt):
        train(cfg, urls, table, tmp_path / "killed", image_size=16, logger=StopAt(4), progress=False)
    assert torch.load(tmp_path / "killed" / "checkpoint.pt", weights_only=True)["step"] == 3
    train(cfg, urls, table, tmp_path / "killed", image_size=16, progress=False)
    assert_same_weights(tmp_path / "straight", tmp_path / "killed")


def test_grad_checkpointing_gives_the_same_gradients(table):
    text_dim = table.tokens.shape[-1]
    torch.manual_seed(0)
    net = DiffusersUNet({**TINY_UNET, "cross_attention_dim": text_dim, "in_channels": 3, "out_channels": 3}, 8)
    x, t, cond = torch.randn(2, 3, 16, 16), torch.tensor([3.0, 700.0]), random_cond(table, 2)

    def grads():
        net.zero_grad()
        net(x, t, cond).square().mean().backward()
        return [p.grad.clone() for p in net.parameters()]

    plain = grads()
    net.set_grad_checkpointing(True)
    assert net.unet.is_gradient_checkpointing
    for a, b in zip(plain, grads()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    net.set_grad_checkpointing(False)
    assert not net.unet.is_gradient_checkpointing


def test_caption_mask_and_timestep_reach_the_unet(table):
    text_dim = table.tokens.shape[-1]
    torch.manual_seed(0)
    net = DiffusersUNet({**TINY_UNET, "cross_attention_dim": text_dim, "in_channels": 3, "out_channels": 3},
                        table.pooled.shape[-1]).eval()
    x = torch.randn(2, 3, 16, 16)
    cond = Cond(torch.randn(2, 4, text_dim), torch.tensor([[True, True, False, False]] * 2), torch.randn(2, 8))
    with torch.no_grad():
        base = net(x, torch.tensor([10.0, 10.0]), cond)
        padded = cond.tokens.clone()
        padded[:, 2:] += 5.0  # masked-out tokens: no effect
        assert torch.allclose(net(x, torch.tensor([10.0, 10.0]), Cond(padded, cond.mask, cond.pooled)), base, atol=1e-5)
        real = cond.tokens.clone()
        real[:, 0] += 5.0  # a real token: an effect
        assert not torch.allclose(net(x, torch.tensor([10.0, 10.0]), Cond(real, cond.mask, cond.pooled)), base, atol=1e-3)
        assert not torch.allclose(net(x, torch.tensor([500.0, 500.0]), cond), base, atol=1e-3)


def test_cross_attention_width_must_match_the_text(table, tiny_params):
    cfg = dataclasses.replace(tiny_params.train, denoiser="diffusers",
                              diffusers=DiffusersConfig(config={**TINY_UNET, "cross_attention_dim": 768}))
    with pytest.raises(ConfigError) as e:
        build_denoiser(cfg, table.tokens.shape[-1], table.pooled.shape[-1])
    msg = str(e.value)
    assert "\n" not in msg and "cross_attention_dim 768" in msg and f"width {table.tokens.shape[-1]}" in msg


def test_pretrained_folder_and_single_file(tmp_path, tiny_params):
    """Weights from a diffusers folder (config read from it) and from one .safetensors file (config given)."""
    unet = UNet2DConditionModel(**{**TINY_UNET, "cross_attention_dim": 32, "in_channels": 3, "out_channels": 3})
    unet.save_pretrained(tmp_path / "folder")
    cfg = dataclasses.replace(tiny_params.train, denoiser="diffusers",
                              diffusers=DiffusersConfig(pretrained=str(tmp_path / "folder")))
    den = build_denoiser(cfg, 32, 8)
    for k, v in unet.state_dict().items():
        assert torch.equal(den.net.state_dict()["unet." + k], v), k
    # saved, it loads back without the folder it came from (model.json holds the whole UNet config)
    (tmp_path / "model").mkdir()
    save_model(den, tmp_path / "model", {"train": to_dict(cfg), "text_dim": 32, "pooled_dim": 8})
    shutil.move(tmp_path / "folder", tmp_path / "gone")
    back, _ = load_model(tmp_path / "model")
    assert all(torch.equal(v, back.net.state_dict()[k]) for k, v in den.net.state_dict().items())
    shutil.move(tmp_path / "gone", tmp_path / "folder")
    save_file(unet.state_dict(), str(tmp_path / "unet.safetensors"))
    config, state = read_diffusers_unet(str(tmp_path / "unet.safetensors"), config=str(tmp_path / "folder"))
    assert config["block_out_channels"] == [16, 32] and set(state) == set(unet.state_dict())
    with pytest.raises(ConfigError, match="single file: set train.diffusers.config"):
        read_diffusers_unet(str(tmp_path / "unet.safetensors"))
    with pytest.raises(ConfigError, match="no UNet config.json at"):
        read_diffusers_unet(str(tmp_path / "missing"))


def test_params_keys_are_checked():
    data = tiny_params_dict()
    data["train"].update(denoiser="diffusers", diffusers={"config": {"block_out_channels": [32, 64, 64, 64, 64, 64]}})
    with pytest.raises(ConfigError, match="dataset.image_size 16 must be divisible by 2\\^.* = 32"):
        parse_params(data, "p")
    data["train"]["diffusers"] = {"config": 3}
    with pytest.raises(ConfigError, match="train.diffusers.config must be null, a mapping"):
        parse_params(data, "p")
    data["train"]["diffusers"] = {"pretrained": "unet.safetensors"}
    with pytest.raises(ConfigError, match="single file: set train.diffusers.config"):
        parse_params(data, "p")
    data["train"]["diffusers"] = {}
    assert parse_params(data, "p").train.diffusers == DiffusersConfig()


def test_export_cli_and_refusal(diffusers_model, tiny_model, tmp_path, capsys):
    from flows.cli import main

    params = str(ROOT / "params.yaml")
    assert main(["export-diffusers", "--params", params, "--model", str(diffusers_model), "--out", str(tmp_path / "u")]) == 0
    assert (tmp_path / "u" / "config.json").is_file() and (tmp_path / "u" / "diffusion_pytorch_model.safetensors").is_file()
    assert main(["export-diffusers", "--params", params, "--model", str(tiny_model), "--out", str(tmp_path / "no")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "only a diffusers denoiser" in err
    assert not (tmp_path / "no").exists()


def test_bundle_and_batch_generation(diffusers_model, text_encoder, tiny_params, table, tmp_path):
    """The registry's bundle (what the pyfunc model and serving load) and batch generation take a
    diffusers model as they take the UNet."""
    import pandas as pd

    from diffusion.pipeline.batch import generate_batch, load_generator, plan_rows, read_prompts
    from diffusion.registry.bundle import load_bundle, write_bundle
    from diffusion.registry.pyfunc import _diffusers_unet

    paths = write_bundle(tmp_path / "bundle", diffusers_model, text_encoder, tiny_params.sample, {"id": "x"})
    assert _diffusers_unet(paths)  # the registered model's pip requirements then include diffusers
    den, meta, _, _ = load_bundle(paths)
    ref, _ = load_model(diffusers_model)
    x, sigma, cond = torch.randn(2, 3, 16, 16), torch.tensor([0.5, 5.0]), random_cond(table, 2)
    with torch.no_grad():
        assert isinstance(den.net, DiffusersUNet) and torch.equal(den(x, sigma, cond), ref(x, sigma, cond))
    prompts = tmp_path / "p.txt"
    prompts.write_text("a large red circle on the left\na small blue square in the center\n")
    gen = load_generator(str(diffusers_model), device="cpu", params=tiny_params)
    summary = generate_batch(gen, plan_rows(gen, read_prompts(prompts)), tmp_path / "out", progress=False,
                             log=lambda *_: None)
    m = pd.read_parquet(Path(summary["out"]) / "manifest.parquet")
    assert summary["drawn"] == 2 and len(set(m["sha256"])) == 2
