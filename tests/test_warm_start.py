"""train.init_from: a run that starts from another model's EMA weights (diffusion.training.warm_start).

Real parents only: the session's tiny trained model folder, the same model registered in a real
MLflow SQLite store (by alias and by version), and networks of another shape or text width built
and saved here. Each bad parent is one line that names the key and what differs.
"""

from __future__ import annotations

import json
import re
import shutil
from dataclasses import replace

import pytest
import torch
from safetensors.torch import load_file

from conftest import tracking_store
from diffusion.artifacts import MODEL_CONFIG, MODEL_WEIGHTS, sha256_file
from diffusion.data.text import EmbeddingTable
from diffusion.errors import ConfigError
from diffusion.training import warm_start
from diffusion.training.distributed import Dist
from diffusion.training.train import build_state

CPU = torch.device("cpu")


def state_for(cfg, table, init=None):
    return build_state(cfg, table, 16, None, CPU, Dist(), init)


def assert_net_holds(net: torch.nn.Module, weights: dict[str, torch.Tensor]) -> None:
    own = net.state_dict()
    assert set(own) == set(weights)
    for k, v in own.items():
        assert torch.equal(v, weights[k]), k


def one_line(e: pytest.ExceptionInfo) -> str:
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith("train.init_from "), msg
    return msg


def test_a_folder_parent_starts_the_network_and_its_ema_at_the_parents_ema_weights(tiny_params, tiny_model,
                                                                                   tiny_embeddings):
    table = EmbeddingTable.load(tiny_embeddings)
    parent_weights = load_file(str(tiny_model / MODEL_WEIGHTS))  # what the parent exported: its EMA
    scratch = state_for(tiny_params.train, table)
    assert any(not torch.equal(v, parent_weights[k]) for k, v in scratch.model.net.state_dict().items())
    assert "parent" not in scratch.meta and scratch.meta["train"]["init_from"] is None

    cfg = replace(tiny_params.train, init_from=str(tiny_model))
    state = state_for(cfg, table)
    # before the first optimizer step: the trained network and the EMA both hold the parent's EMA
    assert_net_holds(state.model.net, parent_weights)
    assert_net_holds(state.ema.net, parent_weights)
    # not resume: step, optimizer and schedule start fresh
    assert state.step == 0 and not state.opt.state and state.sched.last_epoch == 0
    assert state.meta["train"]["init_from"] == str(tiny_model)  # part of the trajectory resume compares
    assert state.meta["parent"] == {"source": str(tiny_model), "resolved": str(tiny_model.resolve()),
                                    "sha256": sha256_file(tiny_model / MODEL_WEIGHTS)}
    # the weights file itself names the same folder
    again = state_for(replace(cfg, init_from=str(tiny_model / MODEL_WEIGHTS)), table)
    assert again.meta["parent"]["resolved"] == str(tiny_model.resolve())


def test_a_warm_started_run_trains_and_its_model_json_records_the_parent(tiny_params, tiny_shards, tiny_model,
                                                                          tiny_embeddings, tmp_path):
    from diffusion.artifacts import shard_urls
    from diffusion.training.train import train

    cfg = replace(tiny_params.train, init_from=str(tiny_model), steps=2, checkpoint_every=2, val_every=0)
    out = train(cfg, shard_urls(tiny_shards, "train"), EmbeddingTable.load(tiny_embeddings), tmp_path / "child",
                image_size=16, progress=False)
    meta = json.loads((out / MODEL_CONFIG).read_text())
    assert meta["parent"]["resolved"] == str(tiny_model.resolve())
    assert meta["parent"]["sha256"] == sha256_file(tiny_model / MODEL_WEIGHTS)
    assert meta["steps_done"] == 2 and meta["train"]["init_from"] == str(tiny_model)
    # it trained from the parent: close to it after two small steps, not equal
    parent, child = load_file(str(tiny_model / MODEL_WEIGHTS)), load_file(str(out / MODEL_WEIGHTS))
    assert any(not torch.equal(parent[k], child[k]) for k in parent)
    drift = max(float((parent[k] - child[k]).abs().max()) for k in parent)
    scale = max(float(parent[k].abs().max()) for k in parent)
    assert drift < 0.1 * scale


@pytest.mark.parametrize("uri", ["models:/t2i-shapes@champion", "models:/t2i-shapes/1"])
def test_a_registered_version_by_alias_or_by_version(uri, tiny_params, tiny_model, tiny_embeddings,
                                                     registered_model):
    from diffusion.registry.versions import fetch_denoiser

    assert registered_model["version"] == 1
    with tracking_store(registered_model["tracking_uri"]):
        parent = warm_start.resolve(uri, registered=fetch_denoiser)
    assert parent.kind == "t2i" and parent.resolved == "models:/t2i-shapes/1" and parent.source == uri
    state = state_for(replace(tiny_params.train, init_from=uri), EmbeddingTable.load(tiny_embeddings), parent)
    assert_net_holds(state.model.net, load_file(str(tiny_model / MODEL_WEIGHTS)))  # the registered EMA weights
    assert state.meta["parent"] == {"source": uri, "resolved": "models:/t2i-shapes/1",
                                    "sha256": sha256_file(tiny_model / MODEL_WEIGHTS)}


def test_a_missing_version_alias_or_folder_is_one_line(registered_model, tmp_path):
    from diffusion.registry.versions import fetch_denoiser

    with tracking_store(registered_model["tracking_uri"]):
        with pytest.raises(ConfigError) as e:
            warm_start.resolve("models:/t2i-shapes/7", registered=fetch_denoiser)
        assert "has no version 7 (versions: 1)" in one_line(e)
        with pytest.raises(ConfigError) as e:
            warm_start.resolve("models:/t2i-shapes@staging", registered=fetch_denoiser)
        assert "no @staging" in one_line(e)
    with pytest.raises(ConfigError) as e:
        warm_start.resolve(str(tmp_path / "nowhere"))
    assert "no such file or folder" in one_line(e)
    with pytest.raises(ConfigError) as e:  # the library alone cannot reach the registry
        warm_start.resolve("models:/t2i-shapes@champion")
    assert "train stage" in one_line(e)


def test_the_train_stage_fetches_the_champion_and_records_the_parent_in_mlflow_and_lineage(
        tiny_params, tiny_shards, tiny_embeddings, tiny_model, registered_model, tmp_path):
    import mlflow

    from diffusion.pipeline import stages
    from diffusion.registry import lineage

    p = replace(tiny_params, train=replace(tiny_params.train, init_from="models:/t2i-shapes@champion", steps=2,
                                           checkpoint_every=2, val_every=0),
                mlflow=replace(tiny_params.mlflow, tracking_uri=registered_model["tracking_uri"]))
    with tracking_store(registered_model["tracking_uri"]):
        info = stages.train(p, tiny_shards, tiny_embeddings, tmp_path / "child", progress=False)
        tags = mlflow.get_run(info["run_id"]).data.tags
    want = {"source": "models:/t2i-shapes@champion", "resolved": "models:/t2i-shapes/1",
            "sha256": sha256_file(tiny_model / MODEL_WEIGHTS)}
    assert json.loads((tmp_path / "child" / MODEL_CONFIG).read_text())["parent"] == want
    assert {k: tags.get(f"parent.{k}") for k in want} == want
    # the register stage tags the new version with the same record (t2i lineage prints it)
    got = lineage.collect(tmp_path, {}, "fp", {}, parent=want)
    assert {k: got[f"lineage.parent.{k}"] for k in want} == want
    assert not any(k.startswith("lineage.parent.") for k in lineage.collect(tmp_path, {}, "fp", {}))


def save_parent(tmp_path, cfg, text_dim: int, pooled_dim: int, like_meta: dict):
    """A real network of ``cfg``'s shape and the given text width, exported as the train stage does."""
    from diffusion.models.store import build_denoiser, save_model

    torch.manual_seed(1)
    den = build_denoiser(cfg, text_dim, pooled_dim)
    out = tmp_path / "parent"
    out.mkdir()
    save_model(den, out, {**like_meta, "text_dim": text_dim, "pooled_dim": pooled_dim,
                          "train": {**like_meta["train"], "unet": dict(vars(cfg.unet))}})
    return out


def test_another_text_width_is_one_line(tiny_params, tiny_model, tiny_embeddings, tmp_path):
    table = EmbeddingTable.load(tiny_embeddings)
    meta = json.loads((tiny_model / MODEL_CONFIG).read_text())
    width = table.tokens.shape[-1]
    parent = save_parent(tmp_path, tiny_params.train, width + 8, table.pooled.shape[-1] + 8, meta)
    with pytest.raises(ConfigError) as e:
        state_for(replace(tiny_params.train, init_from=str(parent)), table)
    msg = one_line(e)
    assert f"reads {width + 8}-wide text (text_dim)" in msg and f"are {width} wide" in msg


def test_a_shape_mismatch_names_the_first_differing_tensor_and_both_shapes(tiny_params, tiny_model,
                                                                           tiny_embeddings):
    table = EmbeddingTable.load(tiny_embeddings)
    wider = replace(tiny_params.train, init_from=str(tiny_model), unet=replace(tiny_params.train.unet, channels=24))
    with pytest.raises(ConfigError) as e:
        state_for(wider, table)
    msg = one_line(e)
    fresh = state_for(replace(wider, init_from=None), table).model.net.state_dict()
    parent = load_file(str(tiny_model / MODEL_WEIGHTS))
    first = next(k for k, v in fresh.items() if tuple(v.shape) != tuple(parent[k].shape))
    assert f"tensor {first!r} is {tuple(parent[first].shape)} there, {tuple(fresh[first].shape)} here" in msg
    assert "train.unet.channels: 16 there, 24 here" in msg


def test_another_denoiser_kind_or_space_is_one_line(tiny_params, tiny_model, tiny_embeddings, tmp_path):
    table = EmbeddingTable.load(tiny_embeddings)
    with pytest.raises(ConfigError) as e:
        state_for(replace(tiny_params.train, init_from=str(tiny_model), denoiser="dit"), table)
    assert "is a unet model: set train.denoiser unet" in one_line(e)
    # a pixel-space parent for a run on VAE latents (the spec the latents stage records)
    from diffusion.data.latents import LatentSpec

    latent = LatentSpec(channels=4, size=4, image_size=16, scaling_factor=0.18215, shift_factor=0.0, abs_max=4.0,
                        vae="stabilityai/sd-vae-ft-mse", vae_subfolder=None, vae_config=None, vae_sha256="ab" * 32,
                        fingerprint_id="lat-1")
    with pytest.raises(ConfigError) as e:
        warm_start.check(warm_start.resolve(str(tiny_model)), tiny_params.train, table.tokens.shape[-1],
                         table.pooled.shape[-1], latent.as_dict(), table.fingerprint)
    assert ("was trained in pixel space (3 channels); this run trains in the latent space of "
            "stabilityai/sd-vae-ft-mse (4 channels)") in one_line(e)
    # a folder that is no model at all
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError) as e:
        warm_start.resolve(str(tmp_path / "empty"))
    assert "holds neither model.safetensors" in one_line(e)


def test_another_text_tower_of_the_same_width_is_a_loud_warning(tiny_params, tiny_model, tiny_embeddings,
                                                                tmp_path, capsys):
    table = EmbeddingTable.load(tiny_embeddings)
    other = tmp_path / "other-tower"
    shutil.copytree(tiny_model, other)
    meta = json.loads((other / MODEL_CONFIG).read_text())
    meta["text_fingerprint_id"] = "another-tower"
    (other / MODEL_CONFIG).write_text(json.dumps(meta))
    state_for(replace(tiny_params.train, init_from=str(other)), table)
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("WARNING: train.init_from")]
    assert len(lines) == 1 and "another text tower (another-tower" in lines[0]


class StopAt:
    """A logger that kills the run (as a KeyboardInterrupt would) when step ``stop_at`` is logged."""

    def __init__(self, stop_at):
        self.stop_at = stop_at

    def log_metrics(self, metrics, step):
        if step >= self.stop_at:
            raise KeyboardInterrupt("simulated kill")

    def log_image(self, image, name):
        pass


def test_resume_wins_over_init_from_and_a_different_parent_is_a_different_run(tiny_params, tiny_shards, tiny_model,
                                                                             tiny_embeddings, tmp_path, capsys):
    from diffusion.artifacts import shard_urls
    from diffusion.errors import T2IError
    from diffusion.training.train import train

    urls, table = shard_urls(tiny_shards, "train"), EmbeddingTable.load(tiny_embeddings)
    cfg = replace(tiny_params.train, init_from=str(tiny_model), steps=4, checkpoint_every=2, log_every=1, val_every=0)
    out = tmp_path / "child"
    with pytest.raises(KeyboardInterrupt):
        train(cfg, urls, table, out, image_size=16, progress=False, logger=StopAt(3))
    twin = tmp_path / "twin"  # the same weights in another folder: another parent record
    shutil.copytree(tiny_model, twin)
    with pytest.raises(T2IError, match=re.escape(f"parent.resolved {tiny_model.resolve()} -> {twin.resolve()}")) as e:
        train(replace(cfg, init_from=str(twin)), urls, table, out, image_size=16, progress=False)
    assert f"train.init_from {tiny_model} -> {twin}" in str(e.value)
    capsys.readouterr()
    train(cfg, urls, table, out, image_size=16, progress=False)
    assert "at step 2" in capsys.readouterr().out  # the same parent: the run continues its checkpoint
    assert json.loads((out / MODEL_CONFIG).read_text())["steps_done"] == 4


# a tiny SD-shaped diffusers UNet (as tests/test_diffusers_unet.py builds it)
TINY_DIFFUSERS = {"block_out_channels": [16, 32], "layers_per_block": 1, "attention_head_dim": 2, "sample_size": 16,
                  "norm_num_groups": 8, "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D"],
                  "up_block_types": ["CrossAttnUpBlock2D", "UpBlock2D"], "in_channels": 3, "out_channels": 3}


def test_a_diffusers_unet_folder_or_file_starts_the_diffusers_denoiser(tiny_params, tiny_embeddings,
                                                                       tmp_path):
    from diffusers import UNet2DConditionModel
    from safetensors.torch import save_file

    from diffusion.config import DiffusersConfig

    table = EmbeddingTable.load(tiny_embeddings)
    width = table.tokens.shape[-1]
    torch.manual_seed(3)
    unet = UNet2DConditionModel(**TINY_DIFFUSERS, cross_attention_dim=width)
    unet.save_pretrained(tmp_path / "sd-unet", safe_serialization=True)
    save_file({k: v.contiguous() for k, v in unet.state_dict().items()}, str(tmp_path / "unet.safetensors"))
    want = {f"unet.{k}": v for k, v in unet.state_dict().items()}
    cfg = replace(tiny_params.train, denoiser="diffusers",
                  diffusers=DiffusersConfig(config={**TINY_DIFFUSERS, "cross_attention_dim": width}))

    folder = state_for(replace(cfg, init_from=str(tmp_path / "sd-unet")), table)
    assert_net_holds(folder.model.net, want)
    assert folder.meta["parent"]["resolved"] == str((tmp_path / "sd-unet").resolve())
    single = state_for(replace(cfg, init_from=str(tmp_path / "unet.safetensors")), table)
    assert_net_holds(single.ema.net, want)
    assert single.meta["parent"]["sha256"] == folder.meta["parent"]["sha256"]  # the same tensors

    with pytest.raises(ConfigError) as e:  # a diffusers UNet into the project's own UNet
        state_for(replace(tiny_params.train, init_from=str(tmp_path / "sd-unet")), table)
    assert "is a diffusers UNet: set train.denoiser diffusers" in one_line(e)
    wider = UNet2DConditionModel(**TINY_DIFFUSERS, cross_attention_dim=width * 2)
    wider.save_pretrained(tmp_path / "wide-unet", safe_serialization=True)
    with pytest.raises(ConfigError) as e:  # another text width
        state_for(replace(cfg, init_from=str(tmp_path / "wide-unet")), table)
    assert f"reads {width * 2}-wide text (cross_attention_dim)" in one_line(e)


def test_a_lora_parent_starts_as_the_network_it_samples_as(tiny_params, tiny_model, tiny_embeddings, tmp_path):
    """A LoRA model folder holds its base and its adapter apart: the child starts from both folded."""
    import copy

    from diffusion.models import lora
    from diffusion.models.store import build_denoiser, save_model

    table = EmbeddingTable.load(tiny_embeddings)
    cfg = tiny_params.train
    meta = json.loads((tiny_model / MODEL_CONFIG).read_text())
    den = build_denoiser(cfg, meta["text_dim"], meta["pooled_dim"])
    den.net.load_state_dict(load_file(str(tiny_model / MODEL_WEIGHTS)))
    lora.inject(den.net, lora.targets_for("unet", cfg.lora.target_modules), rank=2, alpha=2)
    torch.manual_seed(4)
    for layer in lora.lora_layers(den.net).values():
        torch.nn.init.normal_(layer.lora_b, std=0.1)  # a trained adapter: B != 0
    parent = tmp_path / "lora-parent"
    parent.mkdir()
    save_model(den, parent, meta)
    merged = lora.merge(copy.deepcopy(den.net)).state_dict()
    base = load_file(str(parent / MODEL_WEIGHTS))
    assert any(not torch.equal(base[k], merged[k]) for k in merged)

    state = state_for(replace(cfg, init_from=str(parent)), table)
    assert_net_holds(state.model.net, merged)
