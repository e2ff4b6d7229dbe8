"""The benchmark tools' own logic: bench/step_profile.py on the CPU, bench/train_bench.py's DiT overrides
and its rounds."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

from step_profile import kind_of, parse_variant  # noqa: E402
from train_bench import TOLERANCE, block_params, dit_overrides, finish, match_diffusers, match_dits, vs_reference  # noqa: E402

from diffusion.config import DiTConfig, UNetConfig  # noqa: E402


def test_kernel_kinds_put_attention_before_its_fprop_and_keep_annotations_apart():
    # cuDNN's attention kernels are named ..._sdpa_..._flash_fprop_...: attention, not convolution
    assert kind_of("cudnn_generated_fort_native_sdpa_sm90_flash_fprop_wgmma_f16_knob_7") == "attention"
    assert kind_of("sm90_xmma_fprop_implicit_gemm_bf16bf16_bf16f32") == "conv"
    assert kind_of("nvjet_sm90_tst_256x128_64x4_1x2_h_bz_coopA_NNT") == "matmul"
    assert kind_of("triton_red_fused__to_copy_add_mul_native_layer_norm_21") == "norm"
    assert kind_of("triton_poi_fused_gelu_gelu_backward_view_12") == "triton (compiled)"
    assert kind_of("void at::native::direct_copy_kernel_cuda(at::TensorIteratorBase&)") == "layout/copy"
    assert kind_of("aten::addmm") == "matmul"
    assert kind_of("something_new") == "other"


def test_variants_parse_and_refuse_what_is_not_key_value():
    assert parse_variant("dit4=train.denoiser=dit,train.dit.patch=4") == (
        "dit4", ["train.denoiser=dit", "train.dit.patch=4"])
    assert parse_variant("plain=") == ("plain", [])
    with pytest.raises(SystemExit, match="not KEY=VALUE"):
        parse_variant("bad=train.compile")


def test_rounds_report_the_median_round_and_the_median_per_round_ratio():
    import torch

    # the machine slowed down in round 2 for both: the median per-round ratio sees through it
    ours = finish({"batch": 64, "flops_per_step": 64e9, "rounds_img_per_s": [300.0, 150.0, 280.0]},
                  torch.device("cpu"), None)
    ref = finish({"batch": 64, "flops_per_step": 60e9, "rounds_img_per_s": [250.0, 140.0, 200.0]},
                 torch.device("cpu"), None)
    assert ours["img_per_s"] == 280.0 and ours["ms_per_step"] == pytest.approx(1e3 * 64 / 280)
    assert ours["tflop_per_s"] == pytest.approx(64e9 * 280 / 64 / 1e12)
    assert vs_reference(ours, ref) == pytest.approx(300 / 250)  # ratios 1.2, 1.07, 1.4
    assert vs_reference(ours, ref) != pytest.approx(ours["img_per_s"] / ref["img_per_s"])
    one = finish({"batch": 64, "flops_per_step": 1e9, "rounds_img_per_s": [100.0]}, torch.device("cpu"), 1.0)
    assert vs_reference(one, ref) == pytest.approx(100 / 200) and one["mfu"] == pytest.approx(one["tflop_per_s"])


def test_dit_overrides_read_each_field_as_its_type_and_refuse_unknown_keys():
    cfg = dit_overrides(DiTConfig(), "patch=4, heads=12,mlp_ratio=3.5")
    assert (cfg.patch, cfg.heads, cfg.mlp_ratio, cfg.width) == (4, 12, 3.5, DiTConfig().width)
    assert dit_overrides(DiTConfig(), "") == DiTConfig()
    with pytest.raises(SystemExit, match="KEY one of"):
        dit_overrides(DiTConfig(), "widht=512")
    with pytest.raises(SystemExit, match="takes a number"):
        dit_overrides(DiTConfig(), "patch=four")


def test_several_dits_are_each_matched_and_named_by_their_shape():
    target = 3_581_420  # the default UNet's parameters
    one = match_dits(DiTConfig(), ["patch=4"], target, 384, 384, cuda=False)
    assert list(one) == ["ours-dit"] and one["ours-dit"][1].patch == 4
    two = match_dits(DiTConfig(), ["patch=2", "patch=4,heads=4,depth=6"], target, 384, 384, cuda=False)
    assert len(two) == 2
    for name, (spec, cfg, n) in two.items():
        assert name == f"ours-dit-p{cfg.patch}-w{cfg.width}-d{cfg.depth}" and abs(n / target - 1) <= TOLERANCE
    (_, deep, _), (_, shallow, _) = two.values()
    assert (deep.patch, shallow.patch, shallow.heads, shallow.depth) == (2, 4, 4, 6)
    assert shallow.width > deep.width and shallow.width % 4 == 0  # fewer blocks, so wider for the same count
    with pytest.raises(SystemExit, match="matches the same DiT"):
        match_dits(DiTConfig(), ["patch=4", "patch=4,heads=6"], target, 384, 384, cuda=False)


def test_block_params_splits_both_unets_between_resnet_and_transformer_blocks():
    """At the matched count diffusers' transformer blocks (GEGLU feed-forward, proj_in/out) hold a
    larger share than ours, so its ResNet blocks (the convolutions) hold a smaller one."""
    from diffusion.models.unet import UNet, count_params

    u = UNetConfig(channels=32, channel_mult=[1, 2, 2], attn_levels=[1, 2], heads=4)
    ours = count_params(UNet(u, text_dim=256, pooled_dim=256))
    m = match_diffusers(u, ours, 256, 256, 12, cuda=False)
    (o_res, o_attn), (d_res, d_attn) = block_params(u, m["kwargs"], 256, 256)
    assert 0 < o_res + o_attn < ours and 0 < d_res + d_attn < m["params"]
    assert d_attn / m["params"] > o_attn / ours and d_res < o_res
    # no transformer blocks at all: everything but the stem, head and embeddings is in ResNet blocks
    flat = UNetConfig(channels=32, channel_mult=[1, 2, 2], attn_levels=[], heads=4)
    (f_res, f_attn), _ = block_params(flat, m["kwargs"], 256, 256)
    assert f_res == o_res and 0 < f_attn < o_attn  # the middle block still attends


def test_diffusers_projects_the_caption_once_where_ours_does():
    """train.unet.ctx_dim: the matched diffusers UNet gets text_proj (encoder_hid_proj) to the same
    width, so both read the caption through one projection; without it both read the text width."""
    from diffusers import UNet2DConditionModel
    from torch import nn

    from diffusion.models.unet import UNet, count_params

    for ctx_dim in (None, 64):
        u = UNetConfig(channels=32, channel_mult=[1, 2, 2], attn_levels=[1, 2], heads=4, ctx_dim=ctx_dim)
        ours = count_params(UNet(u, text_dim=256, pooled_dim=256))
        m = match_diffusers(u, ours, 256, 256, 12, cuda=False)
        assert abs(m["ratio"] - 1) <= TOLERANCE
        net = UNet2DConditionModel(**m["kwargs"])
        keys = {mod.to_k.in_features for mod in net.modules() if hasattr(mod, "to_k") and mod.is_cross_attention}
        assert keys == {ctx_dim or 256}
        proj = net.encoder_hid_proj
        assert (proj is None) == (ctx_dim is None)
        if ctx_dim:
            assert isinstance(proj, nn.Linear) and (proj.in_features, proj.out_features) == (256, 64)


def test_train_flops_counts_the_loops_own_loss_on_real_batches(tiny_shards, tiny_embeddings, tmp_path):
    import argparse

    import yaml
    from conftest import tiny_params_dict
    from train_flops import count_variant

    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump(tiny_params_dict(), sort_keys=False))
    args = argparse.Namespace(params=str(params), shards=str(tiny_shards), embeddings=str(tiny_embeddings), batches=2)
    plain = count_variant("plain", ["train.unseen_words=0"], args)
    words = count_variant("words", ["train.unseen_words=1"], args)
    narrow = count_variant("narrow", ["train.unseen_words=0", "train.unet.channels=8"], args)
    assert plain["word_vectors"] and plain["batches_counted"] == 2 and plain["image_size"] == 16
    # every caption 1-3 words longer: more cross-attention work, nothing else changes
    assert plain["gflop_per_img"] < words["gflop_per_img"] < 1.2 * plain["gflop_per_img"]
    assert narrow["params"] < plain["params"] and narrow["gflop_per_img"] < 0.5 * plain["gflop_per_img"]
    assert plain["run_pflop"] == pytest.approx(plain["gflop_per_img"] * 1e9 * plain["steps"] * plain["batch_size"] / 1e15)


def test_step_profile_splits_and_profiles_the_loops_step_on_the_cpu(tmp_path):
    out = tmp_path / "profile.json"
    cmd = [sys.executable, str(ROOT / "bench/step_profile.py"), "--device", "cpu", "--params", "params.yaml",
           "--size", "16", "--batch", "8", "--steps", "5", "--warmup", "2", "--profile", "--profile-steps", "1",
           "--top", "3", "--out", str(out), "--diffusers",
           "--variant", "unet=",
           "--variant", "dit=train.denoiser=dit,train.dit.width=48,train.dit.depth=2,train.dit.heads=2",
           "--variant", "typo=train.unet.chanels=8"]
    res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    # the misspelt key fails its own variant (exit 1) and leaves the others' rows
    assert res.returncode == 1, res.stdout + res.stderr
    rows = {r["variant"]: r for r in json.loads(out.read_text())["rows"]}
    assert "chanels" in rows["typo"]["error"]
    unet, dit, dif = rows["unet"], rows["dit"], rows["diffusers-unet"]
    assert (unet["denoiser"], dit["denoiser"], dif["denoiser"]) == ("unet", "dit", "diffusers-unet")
    # --diffusers: matched to the first variant's UNet, as bench/train_bench.py matches it
    assert dif["net"]["matched_to_params"] == unet["params"]
    assert abs(dif["params"] / unet["params"] - 1) <= TOLERANCE
    assert dit["net"]["width"] == 48 and dit["params"] < unet["params"]
    for r in (unet, dit, dif):
        assert r["img_per_s"] > 0 and r["gflop_per_img"] > 0
        assert sum(r["gflop_per_img_by_kind"].values()) == pytest.approx(r["gflop_per_img"])
        assert 0 < r["fwd_ms"] < r["fwd_bwd_ms"]  # the backward pass costs more than nothing
        prof = r["profile"]
        assert prof["kernel_ms_per_step"] > 0 and len(prof["top"]) == 3
        assert abs(sum(prof["by_kind_ms_per_step"].values()) - prof["kernel_ms_per_step"]) < 1e-6
    # the UNet's time goes to its convolutions, the DiT's to its matrix products
    assert "conv" in unet["profile"]["by_kind_ms_per_step"]
    assert unet["gflop_per_img_by_kind"]["conv"] > unet["gflop_per_img_by_kind"]["attention"] > 0
    assert "conv" not in dit["gflop_per_img_by_kind"] or \
        dit["gflop_per_img_by_kind"]["conv"] < dit["gflop_per_img_by_kind"]["matmul"]  # its patch embedding
    assert dit["profile"]["by_kind_ms_per_step"].get("matmul", 0) > dit["profile"]["by_kind_ms_per_step"].get("conv", 0)
    assert "typo" in res.stdout and "failed" in res.stdout
    # the kernels side by side: both UNets run the same convolution operators, each its own count
    for r in (unet, dif):
        assert r["profile"]["kernels"]["aten::convolution_backward"]["calls_per_step"] > 0
    table = res.stdout.split("per kernel, ms a step")[1]
    assert "aten::convolution_backward" in table and "diffusers-unet" in table


def _quality_params(tmp_path: Path) -> Path:
    """The tiny params with a UNet diffusers can match within 10% and the OpenMoji recipe's v target
    and min-SNR weighting, so the diffusers side's own target and weighting run."""
    import yaml
    from conftest import tiny_params_dict

    data = tiny_params_dict()
    data["train"].update(prediction="v", loss_weighting="min_snr", batch_size=8)
    data["train"]["unet"].update(channels=32, channel_mult=[1, 2], attn_levels=[1], heads=2)
    data["sample"].update(steps=2)
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


@pytest.mark.parametrize("prediction,weighting", [("eps", "none"), ("v", "min_snr")])
def test_quality_bench_diffusers_loss_is_ours_on_the_same_draws(tiny_embeddings, prediction, weighting):
    """The diffusers step's loss (DDPMScheduler target, compute_snr weights) equals our
    diffusion_loss over the same network behind our Denoiser, for the same caption dropout, t and noise."""
    import dataclasses

    import torch
    from quality_bench import RecipeDiffusersTrainer
    from train_bench import match_diffusers

    from diffusion.config import load_params
    from diffusion.data.text import EmbeddingTable
    from diffusion.models.loss import diffusion_loss
    from diffusion.models.unet import UNet, count_params
    from diffusion.training.train import adamw_kwargs
    from diffusion.training.train_data import Batch, DataPosition

    t = load_params(ROOT / "params.yaml").train
    u = dataclasses.replace(t.unet, channels=32, channel_mult=[1, 2], attn_levels=[1], heads=2)
    cfg = dataclasses.replace(t, unet=u, prediction=prediction, loss_weighting=weighting)
    table = EmbeddingTable.load(tiny_embeddings)
    d, p = table.tokens.shape[-1], table.pooled.shape[-1]
    with torch.device("meta"):
        n = count_params(UNet(u, text_dim=d, pooled_dim=p, in_channels=3))
    dev = torch.device("cpu")
    tr = RecipeDiffusersTrainer(match_diffusers(u, n, d, p, 12, False), 2, cfg, table, dev, adamw_kwargs(cfg, dev), False, False)
    batch = Batch(x0=torch.rand(6, 3, 16, 16) * 2 - 1, rows=torch.arange(1, 7), position=DataPosition())
    tr.gen.manual_seed(5)
    theirs = tr.loss(batch, tr.model)
    den = tr.ema_denoiser()
    den.net = tr.model  # the trained network, not its EMA
    tr.gen.manual_seed(5)  # the same draws, in the same order: caption dropout, t, noise
    cond = tr.text.training_cond(batch.rows, cfg, tr.gen)
    ours = diffusion_loss(den, batch.x0, cond, weighting=weighting, gamma=cfg.min_snr_gamma, generator=tr.gen).mean()
    assert float(theirs.detach()) == pytest.approx(float(ours.detach()), rel=1e-4)


def test_quality_bench_trains_both_in_turns_and_reports_time_to_goal(tiny_shards, tiny_embeddings, tmp_path):
    import csv
    import dataclasses

    from conftest import tiny_params_dict
    from quality_bench import main

    from diffusion.config import parse_params
    from diffusion.data.text import EmbeddingTable
    from diffusion.evaluation.retrieval import build_retrieval
    from diffusion import artifacts as art

    params = _quality_params(tmp_path)
    p = parse_params(tiny_params_dict(), "tiny")
    retrieval = dataclasses.replace(p.retrieval, steps=8)  # its scores need not be good here
    build_retrieval(retrieval, art.shard_urls(tiny_shards, "train"), art.shard_urls(tiny_shards, "val"),
                    EmbeddingTable.load(tiny_embeddings), tmp_path / "judge" / art.RETRIEVAL_DIR, progress=False)
    out = tmp_path / "q.json"
    base = ["--shards", str(tiny_shards), "--embeddings", str(tiny_embeddings), "--judge", str(tmp_path / "judge"),
            "--params", str(params), "--n-prompts", "8"]
    # an unreachable goal: both train every step, in turns of 2
    assert main([*base, "--chunk", "2", "--max-steps", "3", "--goal-fraction", "2", "--out", str(out)]) == 0
    rep = json.loads(out.read_text())
    assert set(rep["curves"]) == {"ours-unet", "diffusers-unet"}
    for name, curve in rep["curves"].items():
        assert [pt["steps"] for pt in curve] == [2, 3]  # the last turn is cut at --max-steps
        assert 0 < curve[0]["train_s"] < curve[1]["train_s"] and all(0 <= pt["r_precision"] <= 1 for pt in curve)
        m = rep["result"]["models"][name]
        assert not m["reached"] and m["steps"] == 3 and m["train_s_to_goal"] is None and m["warmup_s"] > 0
    assert rep["result"]["speedup_kind"] == "neither_reached" and rep["result"]["meets_goal"] is False
    ev = rep["evaluation"]
    assert ev["prompts"] == 8 and sum(ev["real_from"].values()) == 8 and ev["goal"] == pytest.approx(2 * ev["real_r_precision"]["mean"])
    assert abs(rep["matching"]["ratio"] - 1) <= TOLERANCE and rep["recipe"]["prediction"] == "v"
    assert rep["machine"]["cpu"] and rep["command"].endswith("--out " + str(out)) and "bench/quality_bench.py" in rep["command"]
    with out.with_suffix(".csv").open() as f:
        assert len(list(csv.DictReader(f))) == 4
    # a goal of 0: each model stops after its first turn, and the ratio is of the times to goal
    assert main([*base, "--chunk", "1", "--max-steps", "2", "--goal-fraction", "0", "--out", str(out)]) == 0
    res = json.loads(out.read_text())["result"]
    assert all(m["reached"] and m["steps_to_goal"] == m["steps"] == 1 for m in res["models"].values())
    o, d = res["models"]["ours-unet"], res["models"]["diffusers-unet"]
    assert res["speedup_kind"] == "exact" and res["speedup"] == pytest.approx(d["train_s_to_goal"] / o["train_s_to_goal"])
    # --models: one alone trains (its curve is the one it has beside the other: the same draws), no ratio
    assert main([*base, "--chunk", "2", "--max-steps", "2", "--goal-fraction", "2", "--models", "ours-unet",
                 "--out", str(out)]) == 0
    alone = json.loads(out.read_text())
    assert set(alone["curves"]) == {"ours-unet"} and alone["result"]["speedup_kind"] == "one_model"
    assert alone["curves"]["ours-unet"][0]["loss"] == pytest.approx(rep["curves"]["ours-unet"][0]["loss"], rel=1e-5)


def test_prompt_sheet_puts_each_prompts_real_image_beside_its_draws(tiny_params, tiny_model, tiny_shards, tmp_path):
    """bench/prompt_sheet.py: one row per prompt, the real image whose caption is the prompt (or a
    blank cell saying there is none), then one draw per seed."""
    import pyarrow.parquet as pq
    import yaml
    from PIL import Image

    from conftest import tiny_params_dict

    caption = pq.read_table(tiny_shards / "index-val.parquet").column("caption")[0].as_py()
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump(tiny_params_dict()))
    out = tmp_path / "sheet.png"
    r = subprocess.run([sys.executable, str(ROOT / "bench/prompt_sheet.py"), "--model", str(tiny_model),
                        "--shards", str(tiny_shards), "--params", str(params), "--prompts", caption, "no such caption",
                        "--seeds", "2", "--out", str(out)], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "2 prompts x (1 real + 2 seeds)" in r.stdout
    sheet = np.asarray(Image.open(out).convert("L"))
    cell = 96 + 8  # make_grid: 96-px cells, 8-px gaps, 3 columns, 2 rows
    assert sheet.shape[1] == 3 * cell + 8
    real, missing = sheet[8:8 + 96, 8:8 + 96], sheet[8 + 96 + 52 + 8:8 + 96 + 52 + 8 + 96, 8:8 + 96]
    assert real.std() > 0 and (missing == 255).all()  # a real image, then a blank cell for the caption nobody has


def test_model_probe_scores_seen_captions_and_x0_error_by_noise_level(tiny_params, tiny_model, tiny_shards,
                                                                      tiny_embeddings, tmp_path):
    """bench/model_probe.py: R-precision of the EMA's and the raw weights' draws of seen captions beside
    the real images', and the EMA's x0 error at each noise level, growing with the noise."""
    import yaml

    from conftest import tiny_params_dict
    from diffusion.artifacts import shard_urls
    from diffusion.data.text import EmbeddingTable
    from diffusion.evaluation.retrieval import build_retrieval

    build_retrieval(tiny_params.retrieval, shard_urls(tiny_shards, "train"), shard_urls(tiny_shards, "val"),
                    EmbeddingTable.load(tiny_embeddings), tmp_path / "judge" / "retrieval", progress=False)
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump(tiny_params_dict()))
    out = tmp_path / "probe.json"
    r = subprocess.run([sys.executable, str(ROOT / "bench/model_probe.py"), "--model", str(tiny_model), "--raw",
                        "--evaluator", str(tmp_path / "judge"), "--shards", str(tiny_shards), "--embeddings",
                        str(tiny_embeddings), "--params", str(params), "--n", "12", "--x0-images", "8",
                        "--sigmas", "0.05,2,80", "--out", str(out)], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-2000:]
    rep = json.loads(out.read_text())
    assert [row["weights"] for row in rep["rows"]] == ["ema", "raw"]
    assert all(0 <= v <= 1 for row in rep["rows"] for v in row["r_precision_seen"].values())
    assert list(rep["real"]) == [str(tmp_path / "judge" / "retrieval")]
    x0 = rep["rows"][0]["x0_mse"]
    assert list(x0) == ["0.05", "2", "80"] and x0["0.05"] < x0["2"] < x0["80"]
    assert "12 seen captions" in r.stdout and "R-precision seen" in r.stdout
