"""train.lora: low-rank adapters on a frozen base (diffusion.models.lora), trained, checkpointed,
exported, registered as base + adapter or merged, and loaded back through the one load_model."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch
from safetensors.torch import load_file

from diffusion.artifacts import list_shards
from diffusion.config import DiTConfig, LoRAConfig
from diffusion.data.text import EmbeddingTable
from diffusion.errors import ConfigError, T2IError
from diffusion.models import lora
from diffusion.models.store import build_denoiser, load_model, merge_model
from diffusion.models.unet import Cond
from diffusion.training.train import train

TEXT_DIM, POOLED_DIM = 32, 24


def tiny_cfg(tiny_params, denoiser: str):
    cfg = replace(tiny_params.train, denoiser=denoiser)
    if denoiser == "dit":
        cfg = replace(cfg, denoiser="dit", dit=DiTConfig(width=32, depth=2, heads=2, patch=2), lr=3e-4)
    return cfg


def inputs(seed: int = 0, b: int = 3):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, 3, 16, 16, generator=g)
    sigma = torch.rand(b, generator=g) * 5 + 0.1
    mask = torch.ones(b, 5, dtype=torch.bool)
    mask[0, 3:] = False
    cond = Cond(torch.randn(b, 5, TEXT_DIM, generator=g), mask, torch.randn(b, POOLED_DIM, generator=g))
    return x, sigma, cond


def randomize_adapters(net: torch.nn.Module, seed: int = 1) -> None:
    """B starts at zero; give it values, as training would."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in lora.lora_layers(net).values():
            layer.lora_b.copy_(torch.randn(layer.lora_b.shape, generator=g) * 0.05)


@pytest.mark.parametrize("denoiser", ["unet", "dit", "diffusers"])
def test_adapters_start_as_the_base_and_merge_into_the_same_network(tiny_params, denoiser):
    torch.manual_seed(0)
    den = build_denoiser(tiny_cfg(tiny_params, denoiser), TEXT_DIM, POOLED_DIM).eval()
    with torch.no_grad():  # the attention's zero-initialised output projections would hide a wrong adapter
        for p in den.net.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    x, sigma, cond = inputs()
    with torch.no_grad():
        before = den(x, sigma, cond)
    base = {k: v.clone() for k, v in den.net.state_dict().items()}
    targets = lora.targets_for(denoiser, [])
    names = lora.inject(den.net, targets, rank=4, alpha=8.0)
    # every default target is an attention projection of this network, and each was wrapped
    assert names and all(any(n.endswith(t) for t in targets) for n in names)
    assert all("attn" in n for n in names)
    assert lora.base_state_dict(den.net).keys() == base.keys()
    assert all(torch.equal(lora.base_state_dict(den.net)[k], base[k]) for k in base)
    # only the adapter trains
    trainable = {n for n, p in den.net.named_parameters() if p.requires_grad}
    assert trainable and all(n.rpartition(".")[2] in lora.ADAPTER_KEYS for n in trainable)
    with torch.no_grad():
        assert torch.equal(den(x, sigma, cond), before)  # B = 0: exactly the base at step 0
        randomize_adapters(den.net)
        adapted = den(x, sigma, cond)
        assert not torch.allclose(adapted, before, atol=1e-4)
        lora.merge(den.net)
        assert not lora.has_lora(den.net) and den.net.state_dict().keys() == base.keys()
        torch.testing.assert_close(den(x, sigma, cond), adapted, atol=1e-5, rtol=1e-5)


def test_a_conv_layer_takes_an_adapter_and_merges_exactly(tiny_params):
    """Conv2d targets (3x3 with padding, and the UNet's stem): B A over the flattened kernel."""
    torch.manual_seed(0)
    den = build_denoiser(tiny_cfg(tiny_params, "unet"), TEXT_DIM, POOLED_DIM).eval()
    names = lora.inject(den.net, ["stem", "conv1"], rank=2, alpha=2.0)
    assert "stem" in names and any(n.endswith(".conv1") for n in names)
    x, sigma, cond = inputs()
    randomize_adapters(den.net, seed=3)
    with torch.no_grad():
        adapted = den(x, sigma, cond)
        lora.merge(den.net)
        torch.testing.assert_close(den(x, sigma, cond), adapted, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("target, says", [("to_q", "matches no module"), ("ln1", "LayerNorm")])
def test_a_target_that_names_no_adaptable_module_is_one_line_naming_it(tiny_params, target, says):
    den = build_denoiser(tiny_cfg(tiny_params, "unet"), TEXT_DIM, POOLED_DIM)
    with pytest.raises(ConfigError) as e:
        lora.inject(den.net, ["self_attn.q", target], rank=4)
    msg = str(e.value)
    assert "\n" not in msg and f"{target!r}" in msg and says in msg and "train.lora.target_modules" in msg
    assert "names that exist" in msg and "self_attn.q" in msg
    assert not lora.has_lora(den.net)  # checked before anything is wrapped


def test_lora_settings_are_checked_where_params_are_read():
    from diffusion.config import TrainConfig, parse_section

    for bad, key in (({"rank": -1}, "train.lora.rank"), ({"rank": 4, "alpha": 0}, "train.lora.alpha"),
                     ({"rank": 4, "dropout": 1.0}, "train.lora.dropout")):
        with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
            parse_section(TrainConfig, {"lora": bad}, "train")
    assert parse_section(TrainConfig, {}, "train").lora == LoRAConfig()  # rank 0: off


def lora_train_cfg(tiny_params, denoiser: str = "unet", **kw):
    # a freshly initialised network's output layer is zero, so no gradient reaches an attention adapter
    # before it moves: adapt it too (the UNet's "out" also matches every attention's output projection)
    targets = ["out", "self_attn.q"] if denoiser == "unet" else ["final.linear", "self_attn.qkv"]
    return replace(tiny_cfg(tiny_params, denoiser), lora=LoRAConfig(rank=4, alpha=4.0, target_modules=targets),
                   lr=1e-2, **kw)


def initial_net(cfg, table):
    """The network build_state starts from (the seed's weights): LoRA's base."""
    torch.manual_seed(cfg.seed)
    return build_denoiser(cfg, table.tokens.shape[-1], table.pooled.shape[-1]).net


@pytest.mark.parametrize("denoiser", ["unet", "dit"])
def test_training_moves_only_the_adapter_and_checkpoints_only_it(tiny_params, tiny_shards, tiny_embeddings,
                                                                 tmp_path, denoiser):
    table = EmbeddingTable.load(tiny_embeddings)
    cfg = lora_train_cfg(tiny_params, denoiser, steps=6 if denoiser == "unet" else 3, checkpoint_every=6,
                         log_every=3)
    train(cfg, list_shards(tiny_shards / "train"), table, tmp_path, image_size=16, progress=False)

    # the exported base is the initial network, bit for bit; the adapter moved away from B = 0
    base = load_file(str(tmp_path / "model.safetensors"))
    start = initial_net(cfg, table).state_dict()
    assert base.keys() == start.keys() and all(torch.equal(base[k], start[k]) for k in start)
    adapter = load_file(str(tmp_path / "adapter.safetensors"))
    assert adapter and all(k.rpartition(".")[2] in lora.ADAPTER_KEYS for k in adapter)
    assert any(k.endswith("lora_b") and v.abs().max() > 0 for k, v in adapter.items())
    meta = json.loads((tmp_path / "model.json").read_text())
    assert meta["lora"]["rank"] == 4 and meta["lora"]["modules"]
    assert meta["lora"]["params"] == sum(v.numel() for v in adapter.values())

    # the checkpoint holds the adapter (model and EMA) and its optimizer state, nothing of the base
    ckpt = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    for part in ("model", "ema"):
        assert ckpt[part] and all(k.rpartition(".")[2] in lora.ADAPTER_KEYS for k in ckpt[part])
    assert len(ckpt["optimizer"]["state"]) == len(ckpt["model"])
    assert sum(v.numel() for v in ckpt["model"].values()) < sum(v.numel() for v in base.values()) / 5

    # load_model rebuilds base + adapter; the merged copy is a plain model giving the same outputs
    den, _ = load_model(tmp_path)
    assert lora.has_lora(den.net)
    merge_model(tmp_path, tmp_path / "merged")
    assert not (tmp_path / "merged" / "adapter.safetensors").exists()
    merged, merged_meta = load_model(tmp_path / "merged")
    assert not lora.has_lora(merged.net) and "lora" not in merged_meta and merged_meta["lora_merged"]["rank"] == 4
    x, sigma, _ = inputs()
    cond = Cond(table.tokens[:3].float(), table.mask[:3], table.pooled[:3].float())
    torch.manual_seed(cfg.seed)
    plain = build_denoiser(cfg, table.tokens.shape[-1], table.pooled.shape[-1]).eval()
    with torch.no_grad():
        a, m, p = den(x, sigma, cond), merged(x, sigma, cond), plain(x, sigma, cond)
    torch.testing.assert_close(m, a, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(a, p, atol=1e-4)  # the adapter changed what the base computes


def test_a_killed_lora_run_resumes_to_the_same_adapter_and_a_changed_rank_is_refused_naming_it(
        tiny_params, tiny_shards, tiny_embeddings, tmp_path, capsys):
    from test_train import Recorder

    table = EmbeddingTable.load(tiny_embeddings)
    urls = list_shards(tiny_shards / "train")
    cfg = lora_train_cfg(tiny_params, steps=8, checkpoint_every=4, log_every=4)
    train(cfg, urls, table, tmp_path / "straight", image_size=16, progress=False)
    with pytest.raises(KeyboardInterrupt):  # killed at the step-8 log, after the step-4 checkpoint
        train(cfg, urls, table, tmp_path / "killed", image_size=16, logger=Recorder(stop_at=8), progress=False)
    assert torch.load(tmp_path / "killed" / "checkpoint.pt", weights_only=True)["step"] == 4
    capsys.readouterr()
    train(cfg, urls, table, tmp_path / "killed", image_size=16, progress=False)
    assert "resuming" in capsys.readouterr().out
    for f in ("model.safetensors", "adapter.safetensors"):
        a, b = load_file(str(tmp_path / "straight" / f)), load_file(str(tmp_path / "killed" / f))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    # the unfinished run's folder with another rank: one line naming the change, nothing overwritten
    with pytest.raises(KeyboardInterrupt):
        train(cfg, urls, table, tmp_path / "changed", image_size=16, logger=Recorder(stop_at=8), progress=False)
    before = (tmp_path / "changed" / "checkpoint.pt").read_bytes()
    changed = replace(cfg, lora=replace(cfg.lora, rank=2))
    with pytest.raises(T2IError) as e:
        train(changed, urls, table, tmp_path / "changed", image_size=16, progress=False)
    assert "\n" not in str(e.value) and "train.lora.rank 4 -> 2" in str(e.value)
    assert (tmp_path / "changed" / "checkpoint.pt").read_bytes() == before


def test_an_adapter_of_another_shape_is_refused_in_one_line(tiny_params):
    den = build_denoiser(tiny_cfg(tiny_params, "unet"), TEXT_DIM, POOLED_DIM)
    lora.inject(den.net, lora.targets_for("unet", []), rank=4)
    other = build_denoiser(tiny_cfg(tiny_params, "unet"), TEXT_DIM, POOLED_DIM)
    lora.inject(other.net, lora.targets_for("unet", []), rank=2)
    with pytest.raises(ConfigError, match="rank or target_modules"):
        lora.load_trainable_state_dict(den, lora.trainable_state_dict(other))


def test_the_registered_bundle_holds_base_and_adapter_or_the_merged_weights_and_both_generate_alike(
        tiny_params, tiny_shards, tiny_embeddings, text_encoder, tmp_path):
    from diffusion.config import SampleConfig
    from diffusion.registry.bundle import load_bundle, write_bundle
    from diffusion.sampling.generate import generate, table_cond

    table = EmbeddingTable.load(tiny_embeddings)
    cfg = lora_train_cfg(tiny_params, steps=4, checkpoint_every=4, log_every=4)
    train(cfg, list_shards(tiny_shards / "train"), table, tmp_path / "model", image_size=16, progress=False)
    got = {}
    for merge in (False, True):
        dest = tmp_path / f"bundle-{merge}"
        paths = write_bundle(dest, tmp_path / "model", text_encoder, tiny_params.sample, {}, merge_lora=merge)
        files = {p.name for p in (dest / "denoiser").iterdir()}
        assert ("adapter.safetensors" in files) is not merge
        # batch generation's identity of the weights: another adapter on the same base is other weights
        from diffusion.artifacts import model_weights_sha256, sha256_file

        base_only = sha256_file(dest / "denoiser" / "model.safetensors")
        assert (model_weights_sha256(dest / "denoiser") == base_only) is merge
        den, meta, _, _ = load_bundle(paths)
        assert lora.has_lora(den.net) is not merge and ("lora" in meta) is not merge
        got[merge] = den
    x, sigma, _ = inputs()
    cond = Cond(table.tokens[:3].float(), table.mask[:3], table.pooled[:3].float())
    with torch.no_grad():
        torch.testing.assert_close(got[True](x, sigma, cond), got[False](x, sigma, cond), atol=1e-5, rtol=1e-5)
    c, u = table_cond(table, sorted(k for k in table.rows if k)[:2])
    images = [generate(got[m], c, u, [0, 1], 16, SampleConfig(steps=3, batch_size=2)) for m in (False, True)]
    assert images[0].shape == (2, 16, 16, 3)
    assert abs(images[0].astype(int) - images[1].astype(int)).max() <= 1  # uint8 rounding at most


def test_lora_fine_tunes_a_warm_started_parent_whose_weights_stay_the_base(tiny_params, tiny_shards,
                                                                          tiny_embeddings, tiny_model, tmp_path):
    """The use LoRA is for: train.init_from names a trained model; the default targets (attention
    projections) learn, and the exported base is the parent's weights, bit for bit."""
    table = EmbeddingTable.load(tiny_embeddings)
    cfg = replace(tiny_params.train, init_from=str(tiny_model), lora=LoRAConfig(rank=4), steps=4,
                  checkpoint_every=4, log_every=4)
    train(cfg, list_shards(tiny_shards / "train"), table, tmp_path, image_size=16, progress=False)
    parent, base = load_file(str(tiny_model / "model.safetensors")), load_file(str(tmp_path / "model.safetensors"))
    assert base.keys() == parent.keys() and all(torch.equal(base[k], parent[k]) for k in parent)
    adapter = load_file(str(tmp_path / "adapter.safetensors"))
    moved = {k.rsplit(".", 2)[0] for k, v in adapter.items() if k.endswith("lora_b") and v.abs().max() > 0}
    assert moved and all("attn" in k for k in moved)
