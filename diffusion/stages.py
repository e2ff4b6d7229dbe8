"""One function per pipeline stage: check the inputs, call the library, write the outputs.

These are what the Prefect flows (``flows/stages.py``) wrap and what ``dvc.yaml`` runs through the
``t2i`` CLI; they take the typed ``Params`` and explicit paths, import no Prefect, and also run in
a notebook. Each checks its inputs first and raises one-line ``T2IError``s.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from diffusion.config import Params, flatten, to_dict
from diffusion.errors import MissingInputError, T2IError, require_path
from diffusion.shards import list_shards

TRAIN_GRID_SIZE = 24  # captions in the sample grid logged at the end of training


def _shards(root: str | Path, split: str) -> list[str]:
    split_dir = require_path(Path(root) / split, f"{split} shards", "run the ingest stage first")
    urls = list_shards(split_dir)
    if not urls:
        raise MissingInputError(f"no {split} shards (shard-*.tar) in {split_dir} (run the ingest stage first)")
    return urls


def _square_image_size(shards_dir: str | Path) -> int:
    """The image side the shards were written at (from stats.json); training needs square images."""
    stats = json.loads(require_path(Path(shards_dir) / "stats.json", "shard stats", "run the ingest stage first").read_text())
    if stats.get("resize_mode") == "keep_ratio":
        raise T2IError("training needs square images: ingest with ingest.resize_mode center_crop or pad")
    return int(stats["image_size"])


def ingest(p: Params, out_dir: str | Path, submit=None) -> dict:
    """``submit(spec, unit) -> future`` runs work units (a Prefect task runner in the flow)."""
    from diffusion.ingest import ingest as run

    return run(p.ingest, p.dataset, out_dir, submit)


def embed(p: Params, shards_dir: str | Path, out_dir: str | Path) -> dict:
    from diffusion.text import captions_from_index, embed_captions, load_text_encoder

    captions = captions_from_index(require_path(shards_dir, "shards", "run the ingest stage first"))
    e = p.embed
    encoder = load_text_encoder(e.model, e.pretrained, e.seed, e.layer, e.device)
    table = embed_captions(encoder, captions, e.batch_size)
    shutil.rmtree(out_dir, ignore_errors=True)
    table.save(out_dir)
    return {"captions": len(table.rows), "tokens": list(table.tokens.shape), "fingerprint": table.fingerprint}


def judge(p: Params, shards_dir: str | Path, out_dir: str | Path, metrics_file: str | Path) -> dict | None:
    """Train the attribute judge (built-in set only; other data gets a "not applicable" record)."""
    from diffusion.judge import build_judge, save_not_applicable

    if p.ingest.source != "builtin":
        save_not_applicable(out_dir, f"the judge reads the built-in dataset's attributes; source is {p.ingest.source}")
        metrics = None
    else:
        metrics = build_judge(p.dataset, p.judge, _shards(shards_dir, "val"), out_dir)
    Path(metrics_file).parent.mkdir(parents=True, exist_ok=True)
    Path(metrics_file).write_text(json.dumps({"judge": metrics}, indent=2) + "\n")
    return metrics


def train(p: Params, shards_dir: str | Path, embeddings_dir: str | Path, out_dir: str | Path,
          progress: bool = True) -> dict:
    import mlflow

    from diffusion import tracking
    from diffusion.generate import SamplerSettings, generate, make_grid, table_cond
    from diffusion.text import EmbeddingTable
    from diffusion.train import train as train_loop

    urls = _shards(shards_dir, "train")
    image_size = _square_image_size(shards_dir)
    table = EmbeddingTable.load(require_path(embeddings_dir, "embeddings", "run the embed stage first"))
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)

    # the grid shows a fixed spread of captions the table holds (val captions included), sampled
    # with default settings: the sample section is the sample stage's, not train's
    captions = sorted(c for c in table.rows if c)
    grid_captions = captions[:: max(1, len(captions) // TRAIN_GRID_SIZE)][:TRAIN_GRID_SIZE]

    def grid_fn(denoiser, step):
        cond, uncond = table_cond(table, grid_captions)
        images = generate(denoiser, cond, uncond, list(range(len(grid_captions))), image_size, SamplerSettings())
        grid = make_grid(images, grid_captions)
        grid.save(out / "train_grid.png")
        return grid

    tracking.setup(p.mlflow)
    uri = tracking.tracking_uri(p.mlflow)
    with mlflow.start_run(run_name=f"train-{p.train.steps}steps") as run:
        tracking.write_run_file(out, run, uri)
        mlflow.log_params({f"train.{k}": v for k, v in flatten(to_dict(p.train)).items()})
        mlflow.log_params({"image_size": image_size, "source": p.ingest.source,
                           "embed.model": p.embed.model, "embed.pretrained": str(p.embed.pretrained),
                           "embed.layer": p.embed.layer})
        mlflow.set_tags({"text_fingerprint": table.fingerprint["weights"], "stage": "train"})
        logger = tracking.MlflowLogger()
        train_loop(p.train, urls, table, out, image_size=image_size, logger=logger, grid_fn=grid_fn,
                   progress=progress)
        curve = logger.loss_curve()
        if curve is not None:
            curve.save(out / "loss_curve.png")
            mlflow.log_image(curve, "loss_curve.png")
    meta = json.loads((out / "model.json").read_text())
    return {"run_id": run.info.run_id, "steps": meta["steps_done"], "train_img_per_s": meta["train_img_per_s"],
            "train_seconds": meta["train_seconds"], "device": meta["device"]}


def _encoder_for(p: Params, meta: dict):
    from diffusion.generate import check_fingerprint
    from diffusion.text import load_text_encoder

    e = p.embed
    encoder = load_text_encoder(e.model, e.pretrained, e.seed, e.layer, p.sample.device)
    check_fingerprint(encoder, meta)
    return encoder


def sample(p: Params, shards_dir: str | Path, model_dir: str | Path, out_dir: str | Path,
           progress: bool = True) -> dict:
    import mlflow
    import pyarrow.parquet as pq

    from diffusion import tracking
    from diffusion.sample import GRID, eval_rows, sample_eval_set
    from diffusion.text import pick_device
    from diffusion.train import load_model

    denoiser, meta = load_model(require_path(model_dir, "trained model", "run the train stage first"),
                                pick_device(p.sample.device))
    encoder = _encoder_for(p, meta)
    builtin = p.ingest.source == "builtin"
    captions = [] if builtin else pq.read_table(
        require_path(Path(shards_dir) / "index-val.parquet", "val index", "run the ingest stage first"),
        columns=["caption"]).column("caption").to_pylist()
    rows = eval_rows(p.dataset if builtin else None, p.sample, captions)
    out = sample_eval_set(denoiser, meta, encoder, rows, p.sample, out_dir, progress=progress)
    run = tracking.read_run_file(model_dir)
    if run:
        tracking.setup(p.mlflow)
        with mlflow.start_run(run_id=run["run_id"]):
            mlflow.log_params({f"sample.{k}": v for k, v in to_dict(p.sample).items()})
            mlflow.log_artifact(str(out / GRID), "samples")
    return {"images": len(list((out / "images").glob("*.png"))), "grid": str(out / GRID)}


def evaluate(p: Params, samples_dir: str | Path, judge_dir: str | Path, model_dir: str | Path,
             metrics_file: str | Path) -> dict:
    import mlflow

    from diffusion import tracking
    from diffusion.evaluate import evaluate_samples

    metrics = evaluate_samples(samples_dir, require_path(judge_dir, "judge", "run the judge stage first"))
    Path(metrics_file).parent.mkdir(parents=True, exist_ok=True)
    Path(metrics_file).write_text(json.dumps(metrics, indent=2) + "\n")
    run = tracking.read_run_file(model_dir)
    if run:
        tracking.setup(p.mlflow)
        with mlflow.start_run(run_id=run["run_id"]):
            mlflow.log_metrics(tracking.evaluation_metrics(metrics))
            mlflow.log_dict(metrics, "metrics.json")
    return metrics


def register(p: Params, model_dir: str | Path, metrics_file: str | Path, out_file: str | Path) -> dict:
    from diffusion import tracking
    from diffusion.registry import log_and_register
    from diffusion.sample import settings_of
    from diffusion.train import load_model

    _, meta = load_model(require_path(model_dir, "trained model", "run the train stage first"))
    metrics = json.loads(require_path(metrics_file, "metrics", "run the evaluate stage first").read_text())
    encoder = _encoder_for(p, meta)
    tracking.setup(p.mlflow)
    run = tracking.read_run_file(model_dir)
    flat = tracking.evaluation_metrics(metrics)
    keep = {k: v for k, v in flat.items() if k.endswith((".all", ".shape", ".color", ".size", ".position"))}
    info = log_and_register(model_dir, encoder, settings_of(p.sample), keep, p.register.model_name,
                            run.get("run_id"))
    info["tracking_uri"] = tracking.tracking_uri(p.mlflow)
    Path(out_file).parent.mkdir(parents=True, exist_ok=True)
    Path(out_file).write_text(json.dumps(info, indent=2) + "\n")
    return info
