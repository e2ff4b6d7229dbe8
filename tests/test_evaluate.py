"""Evaluation beyond adherence: the fidelity measures, FD-judge, the new-wording and partial groups, the
evaluation page and the quality-vs-cost sweep, on real shards, a real (tiny) judge and model."""

import json
from dataclasses import replace

import numpy as np
import pandas as pd
import pytest

from diffusion import artifacts as art
from diffusion.data.shards import val_images
from diffusion.pipeline import stages
from diffusion.config import JudgeConfig
from diffusion.evaluation.evaluate import SPECKLE_LEVELS, fd_judge, fidelity
from diffusion.evaluation.judge import build_judge, load_judge
from diffusion.evaluation.report import recommend


@pytest.fixture(scope="module")
def tiny_judge(tiny_params, tiny_shards, tmp_path_factory):
    out = tmp_path_factory.mktemp("judge")
    build_judge(tiny_params.dataset, JudgeConfig(n_images=600, steps=60, batch_size=64), art.shard_urls(tiny_shards, "val"),
                out, progress=False)
    return out


def test_fidelity_counts_background_specks_and_grain_and_real_images_have_none(tiny_shards):
    flat = np.full((4, 16, 16, 3), 245, np.uint8)
    flat[:, 5:11, 5:11] = (220, 38, 38)  # the object: a red square
    assert fidelity(flat) == {"speckle": 0.0, "grain": 0.0}
    specked = flat.copy()
    for y, x in [(1, 1), (1, 13), (14, 2), (13, 13), (2, 7)]:  # away from the object and each other
        specked[0, y, x] = (40, 80, 220)
    background = 16 * 16 - 8 * 8  # the object grown by its one-pixel rim
    f = fidelity(specked)
    assert f["speckle"] == pytest.approx(5 / background / 4)
    assert f["grain"] > 0
    # a shift below the threshold is grain, not speckle
    rng = np.random.default_rng(0)
    noise = rng.integers(-SPECKLE_LEVELS // 2, SPECKLE_LEVELS // 2 + 1, flat.shape)
    g = fidelity(np.clip(flat.astype(int) + noise, 0, 255).astype(np.uint8))
    assert g["speckle"] == 0 and 3 < g["grain"] < SPECKLE_LEVELS
    # the built-in images: a flat background around an anti-aliased shape
    real = val_images(tiny_shards, 60)
    assert fidelity(real) == {"speckle": 0.0, "grain": 0.0}


def test_fd_judge_separates_real_from_noisy_images(tiny_params, tiny_judge):
    from diffusion.data.shapes import make_sample

    judge, _ = load_judge(tiny_judge)
    real = np.stack([np.asarray(make_sample(tiny_params.dataset, "val", i).image) for i in range(400)])
    same = fd_judge(judge, real[:150], real[150:])
    noisy = np.clip(real[:150].astype(int) + np.random.default_rng(0).normal(0, 30, real[:150].shape), 0, 255)
    worse = fd_judge(judge, noisy.astype(np.uint8), real[150:])
    assert same["n_generated"] == 150 and same["n_real"] == 250
    assert worse["generated"] > 2 * same["generated"] > 0, (worse, same)
    assert 0 < same["real_floor"] < worse["generated"]


def test_evaluate_stage_reports_groups_fidelity_and_skips_with_reasons(tiny_params, tiny_shards, tiny_model,
                                                                         tiny_judge, text_encoder, tmp_path,
                                                                         monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))  # no Inception weights: FID/KID skipped
    monkeypatch.setenv("T2I_WEIGHTS_DIR", str(tmp_path / "none"))
    p = replace(tiny_params, sample=replace(tiny_params.sample, new_wording_per_combo=1, partial_per_combo=1))
    stages.sample(p, tiny_shards, tiny_model, tmp_path / "samples", progress=False)
    manifest = pd.read_parquet(tmp_path / "samples" / art.MANIFEST)
    assert (manifest["wording"] == "new").sum() == 108 and (manifest["wording"] == "train").sum() == 216
    assert (manifest["color"] == "").sum() > 0  # partial prompts leave attributes out
    page = tmp_path / "reports" / art.EVAL_PAGE
    m = stages.evaluate(p, tmp_path / "samples", tiny_judge, tiny_model, tmp_path / "reports/metrics.json",
                        tiny_shards, page)
    assert set(m["adherence"]) == {"overall", "seen", "held_out", "new_wording", "new_wording_held_out", "partial"}
    assert m["adherence"]["new_wording"]["n"] == 90 and m["adherence"]["new_wording_held_out"]["n"] == 18
    assert m["adherence"]["overall"]["n"] == 108 and m["adherence"]["partial"]["n"] == 108
    assert m["fd_judge"]["generated"] > 0 and m["fd_judge"]["n_generated"] == 108
    assert 0 <= m["fidelity"]["generated"]["speckle"] <= 1 and m["fidelity"]["real"]["speckle"] < 0.005
    assert m["image"]["fid"] is None and "weights-inception" in m["image"]["skipped"]["fid"]
    assert m["image"]["clip_score"] is None and m["image"]["skipped"]["clip_score"]
    assert m["sampling"]["spacing"] == "karras" and m["sampling"]["sampler"] == "ddpm"
    assert json.loads((tmp_path / "reports/metrics.json").read_text())["fd_judge"] == m["fd_judge"]
    text = page.read_text()
    assert "| new_wording_held_out | 18 |" in text and "| partial | 108 |" in text and "FD-judge" in text and "FID skipped" in text
    assert "![sample grid](../samples/grid.png)" in text


def test_recommend_picks_the_cheapest_point_near_the_best():
    def pt(name, evals, all_, fd, secs):
        return {"sampler": name, "evals": evals, "all": all_, "fd_judge": fd, "seconds_per_image": secs}

    points = [pt("ddim", 10, 0.90, 9.0, 0.01), pt("ddim", 50, 0.95, 3.0, 0.05), pt("heun", 19, 0.94, 3.5, 0.02),
              pt("dpm", 20, 0.95, 3.6, 0.015), pt("ddpm", 1000, 0.95, 2.9, 1.0), pt("x", 5, float("nan"), 1.0, 0.001)]
    assert recommend(points) == points[2]  # fewest evaluations among the good ones, whatever the clock said
    assert recommend([]) is None


def test_sweep_stage_writes_points_curves_plots_and_page(tiny_params, tiny_shards, tiny_model, tiny_judge, tmp_path):
    p = replace(tiny_params, sweep=replace(tiny_params.sweep, samplers=["ddim", "dpmpp_2m"], steps=[2, 4],
                                          reference_steps=8, guidance_scales=[1.0, 3.0]))
    out = tmp_path / "sweep"
    result = stages.sweep(p, tiny_shards, tiny_model, tiny_judge, out, progress=False)
    points = pd.read_csv(out / "points.csv")
    assert len(points) == 2 * 2 + 1 == result["points"]
    assert points.iloc[-1][["sampler", "steps", "spacing"]].tolist() == ["ddpm", 8, "uniform"]
    assert (points["evals"] == points["steps"]).all() and (points["seconds_per_image"] > 0).all()
    assert points[["all", "fd_judge", "speckle", "grain"]].notna().all().all()
    assert sorted(f.name for f in (out / "curves").iterdir()) == ["ddim-karras.csv", "ddpm-uniform.csv",
                                                                   "dpmpp_2m-karras.csv"]
    guidance = pd.read_csv(out / "guidance.csv")
    assert guidance["guidance_scale"].tolist() == [1.0, 3.0]
    assert (out / "quality_vs_cost.png").stat().st_size > 1000 and (out / "guidance.png").is_file()
    page = (out / art.SWEEP_PAGE).read_text()
    assert "| dpmpp_2m | karras | 4 |" in page and "![quality against cost](quality_vs_cost.png)" in page


def test_sampling_again_with_other_settings_logs_to_the_same_training_run(tiny_params, tiny_shards, tiny_embeddings,
                                                                         tmp_path):
    """Changing a sample key reruns sample (not train) against the training run: that must not
    trip MLflow's rule that a logged param never changes."""
    import mlflow

    p = replace(tiny_params, mlflow=replace(tiny_params.mlflow, tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}"))
    info = stages.train(p, tiny_shards, tiny_embeddings, tmp_path / "model", progress=False)
    for sampler, steps in (("ddpm", 4), ("dpmpp_2m", 3)):
        q = replace(p, sample=replace(p.sample, sampler=sampler, steps=steps, new_wording_per_combo=0, partial_per_combo=0))
        stages.sample(q, tiny_shards, tmp_path / "model", tmp_path / "samples", progress=False)
    run = mlflow.MlflowClient(tracking_uri=p.mlflow.tracking_uri).get_run(info["run_id"])
    assert run.data.tags["sample.sampler"] == "dpmpp_2m" and run.data.tags["sample.steps"] == "3"


def test_eval_rows_on_other_data_hold_validation_and_training_captions():
    """Off the built-in set the sample stage draws the first distinct validation captions, then
    training captions spread over the index (not drawn already): R-precision has seen and held-out."""
    from diffusion.config import SampleConfig
    from diffusion.evaluation.sample import eval_rows

    val = ["a", "b", "b", "c"]
    train = ["a", "d", "e", "f", "g", "h", "i", "d"]
    rows = eval_rows(None, SampleConfig(n_prompts=2, n_seen_prompts=3), val, train)
    assert [r["prompt"] for r in rows] == ["a", "b", "d", "f", "h"]
    assert [r["prompt"] for r in eval_rows(None, SampleConfig(n_prompts=2, n_seen_prompts=0), val, train)] == ["a", "b"]
