"""The pipeline stages on a user's own data (a folder source), run by hand: ingest -> embed ->
judge -> train -> sample -> evaluate -> register -> promote. The attribute judge only applies to the
built-in set, so evaluation says so; the retrieval evaluator measures this data, promotion uses its
R-precision, and lineage names the data the model saw."""

import json
import shutil

import mlflow
import pyarrow.parquet as pq
import pytest

from conftest import ROOT, tiny_params_dict
from corpus import encode, picture
from diffusion.pipeline import stages
from diffusion.artifacts import dvc_md5
from diffusion.config import parse_params


def test_folder_source_runs_through_every_stage(tmp_path, monkeypatch, inception_weights):
    src = tmp_path / "photos"
    src.mkdir()
    for i in range(40):
        (src / f"{i:03d}.jpg").write_bytes(encode(picture(700 + i, (80, 64)), "JPEG", quality=90))
        (src / f"{i:03d}.txt").write_text(f"a photo of pattern number {i % 7}")
    data = tiny_params_dict()
    data["ingest"].update(source="folder", path=str(src), image_size=16, image_format="jpg", min_size=32,
                          val_fraction=0.2, dedupe=True)
    data["mlflow"]["tracking_uri"] = f"sqlite:///{tmp_path / 'mlflow.db'}"
    # FID/KID through the real loading path, with randomly initialised Inception weights in a file
    data["evaluate"].update(inception_weights=str(inception_weights), cache_dir=str(tmp_path / "eval-cache"))
    p = parse_params(data, "test")
    monkeypatch.chdir(tmp_path)
    # this test's own store, whatever a session fixture left in MLFLOW_TRACKING_URI (which wins over params)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", data["mlflow"]["tracking_uri"])
    stats = stages.ingest(p, tmp_path / "shards")
    assert stats["accepted"] == 40 and stats["image_size"] == 16
    assert 0 < stats["splits"]["val"]["accepted"] < 20
    stages.embed(p, tmp_path / "shards", tmp_path / "emb")
    judge = stages.judge(p, tmp_path / "shards", tmp_path / "judge", tmp_path / "reports/judge.json", tmp_path / "emb")
    assert judge["judge"] is None  # the attribute judge reads the built-in set's attributes
    # the retrieval evaluator, trained on these pairs, scored on the real validation pairs
    assert judge["retrieval"]["r_precision"] == judge["retrieval"]["r_precision"]
    assert json.loads((tmp_path / "reports/judge.json").read_text()) == judge
    info = stages.train(p, tmp_path / "shards", tmp_path / "emb", tmp_path / "model", progress=False)
    assert info["steps"] == p.train.steps
    stages.sample(p, tmp_path / "shards", tmp_path / "model", tmp_path / "samples", progress=False)
    manifest = pq.read_table(tmp_path / "samples/manifest.parquet").to_pylist()
    val_captions = set(pq.read_table(tmp_path / "shards/index-val.parquet").column("caption").to_pylist())
    train_captions = set(pq.read_table(tmp_path / "shards/index-train.parquet").column("caption").to_pylist())
    prompts = {r["prompt"] for r in manifest}  # the validation captions, then training ones not among them
    assert manifest and val_captions <= prompts <= val_captions | train_captions
    metrics = stages.evaluate(p, tmp_path / "samples", tmp_path / "judge", tmp_path / "model",
                              tmp_path / "reports/metrics.json", tmp_path / "shards", tmp_path / "reports/evaluation.md",
                              tmp_path / "emb")
    assert metrics["adherence"] is None and "built-in" in metrics["note"] and metrics["fd_judge"] is None
    # a prompt-adherence number for any data: R-precision of generated and real images, seen / held-out
    rp = metrics["retrieval"]["r_precision"]
    assert rp["generated"]["all"]["n"] == len(manifest) and rp["real"]["all"]["n"] > 0
    assert rp["generated"]["all"]["n"] == rp["generated"]["seen"]["n"] + rp["generated"]["held_out"]["n"]
    assert rp["generated"]["seen"]["n"] > 0 and rp["real"]["seen"]["n"] > 0
    assert 0 <= rp["generated"]["all"]["mean"] <= 1 and rp["generated"]["all"]["chance"] > 0
    assert metrics["retrieval"]["fd"]["generated"] > 0
    from diffusion.artifacts import write_adherence_plot

    plot = write_adherence_plot(metrics, tmp_path / "reports/adherence.csv").read_text().splitlines()
    assert plot[0] == "metric,value" and "r_precision.generated.all" in {line.split(",")[0] for line in plot}
    assert json.loads((tmp_path / "reports/metrics.json").read_text())["samples"] == len(manifest)
    # metrics on any data: FID and KID against the real validation images, fidelity; CLIP skipped (no weights)
    image = metrics["image"]
    assert image["fid"] > 0 and image["kid"]["mean"] == image["kid"]["mean"] and image["n_real"] > 0
    assert image["clip_score"] is None and "clip_pretrained" in image["skipped"]["clip_score"]
    assert metrics["fidelity"]["generated"]["grain"] >= 0 and metrics["fidelity"]["real"] is not None
    assert len(list((tmp_path / "eval-cache").glob("*.npz"))) == 1  # the real set's features, cached
    page = (tmp_path / "reports/evaluation.md").read_text()
    assert "Adherence: not applicable" in page and "| FID |" in page and "R-precision" in page
    # lineage names the data this model saw, not the project's dvc.lock: here a dvc.lock from the
    # built-in pipeline lies in the project folder, as when a user runs the stages by hand on new data
    shutil.copy(ROOT / "dvc.lock", tmp_path / "dvc.lock")
    reg = stages.register(p, tmp_path / "model", tmp_path / "reports/metrics.json",
                          tmp_path / "reports/registered.json", tmp_path)
    tags = mlflow.MlflowClient().get_model_version(reg["name"], reg["version"]).tags
    assert {k: v for k, v in tags.items() if k.startswith("lineage.data")} == {
        "lineage.data_from": "train stage", "lineage.data.shards": dvc_md5(tmp_path / "shards"),
        "lineage.data.emb": dvc_md5(tmp_path / "emb")}
    # promotion on a metric that exists for this data: promote.metric auto is the R-precision
    decision = stages.promote(p, tmp_path / "reports/registered.json", tmp_path / "reports/promotion.json")
    assert decision["metric"] == "retrieval.r_precision.generated.all.mean"
    assert decision["outcome"] == "promoted", decision["reason"]
    assert decision["candidate_value"] == pytest.approx(rp["generated"]["all"]["mean"], abs=1e-4)  # tags: 4 digits


def test_lineage_without_a_record_vouches_only_for_what_is_on_disk(tmp_path):
    """A model trained before the train stage recorded its data: dvc.lock's train deps are tagged only
    where the folder on disk still has that hash; the rest are left out, and the tags say so."""
    import yaml

    from diffusion.registry.lineage import collect

    for name, text in (("shards", "same"), ("embeddings", "changed since")):
        (tmp_path / "data" / name).mkdir(parents=True)
        (tmp_path / "data" / name / "a.txt").write_text(text)
    lock = {"stages": {"train": {"deps": [
        {"path": "data/shards", "hash": "md5", "md5": dvc_md5(tmp_path / "data/shards")},
        {"path": "data/embeddings", "hash": "md5", "md5": "0" * 32 + ".dir"},
        {"path": "data/latents", "hash": "md5", "md5": "1" * 32 + ".dir"}]}}}
    (tmp_path / "dvc.lock").write_text(yaml.safe_dump(lock))
    tags = collect(tmp_path, {}, "none")
    assert {k: v for k, v in tags.items() if k.startswith("lineage.data")} == {
        "lineage.data_from": "dvc.lock (matches the data on disk)",
        "lineage.data.data/shards": dvc_md5(tmp_path / "data/shards")}
    (tmp_path / "data/shards/a.txt").write_text("changed too")
    assert collect(tmp_path, {}, "none")["lineage.data_from"] == "unknown"
