"""One function per pipeline stage: check the inputs, call the library, write the outputs.

These are what the Prefect flows (``flows/stages.py``) wrap and what ``dvc.yaml`` runs through the
``t2i`` CLI; they take the typed ``Params`` and explicit paths, import no Prefect, and also run in
a notebook. Each checks its inputs first and raises one-line ``T2IError``s.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

from diffusion import artifacts as art
from diffusion.config import Params, flatten, to_dict
from diffusion.errors import MissingInputError

TRAIN_GRID_SIZE = 24  # captions in the sample grid logged at the end of training


def ingest(p: Params, out_dir: str | Path, submit=None) -> dict:
    """``submit(spec, unit) -> future`` runs work units (a Prefect task runner in the flow)."""
    from diffusion.data.ingest import ingest as run

    return run(p.ingest, p.dataset, out_dir, submit)


def latents(p: Params, shards_dir: str | Path, out_dir: str | Path, progress: bool = True) -> dict:
    """Encode every image once with the autoencoder of ``latents.vae`` (off while it is null)."""
    from diffusion.data.latents import encode_shards

    return encode_shards(p.latents, shards_dir, out_dir, progress=progress)


def embed(p: Params, shards_dir: str | Path, out_dir: str | Path) -> dict:
    from diffusion.data.text import captions_from_index, embed_captions, load_text_encoder

    captions = captions_from_index(shards_dir)
    e = p.embed
    encoder = load_text_encoder(e.model, e.pretrained, e.seed, e.layer, e.device)
    table = embed_captions(encoder, captions, e.batch_size)
    import shutil

    shutil.rmtree(out_dir, ignore_errors=True)
    table.save(out_dir)
    return {"captions": len(table.rows), "tokens": list(table.tokens.shape), "fingerprint": table.fingerprint}


def judge(p: Params, shards_dir: str | Path, out_dir: str | Path, metrics_file: str | Path,
          embeddings_dir: str | Path | None = None) -> dict:
    """Train the evaluators: the attribute judge (built-in set only; other data gets a "not
    applicable" record) and, with ``embeddings_dir``, the retrieval evaluator on the real train
    pairs of any data (in ``out_dir``/retrieval). Returns and writes {judge, retrieval}: each
    one's scores on the real validation pairs (None where it does not apply)."""
    from diffusion.evaluation.judge import build_judge, save_not_applicable

    if p.ingest.source != "builtin":
        save_not_applicable(out_dir, f"the judge reads the built-in dataset's attributes; source is {p.ingest.source}")
        metrics = None
    else:
        metrics = build_judge(p.dataset, p.judge, art.shard_urls(shards_dir, "val"), out_dir)
    record = {"judge": metrics, "retrieval": None}
    if embeddings_dir is not None:
        from diffusion.data.text import EmbeddingTable
        from diffusion.evaluation.retrieval import build_retrieval

        table = EmbeddingTable.load(art.require(embeddings_dir, "embeddings", "embed"))
        record["retrieval"] = build_retrieval(p.retrieval, art.shard_urls(shards_dir, "train"),
                                              art.shard_urls(shards_dir, "val"), table,
                                              Path(out_dir) / art.RETRIEVAL_DIR)
    art.write_json(metrics_file, record)
    return record


def train(p: Params, shards_dir: str | Path, embeddings_dir: str | Path, out_dir: str | Path,
          progress: bool = True, latents_dir: str | Path | None = None) -> dict:
    """Train on the image shards, or on their latents where the latents stage wrote them
    (``latents_dir`` with latents.vae set)."""
    from diffusion.data.latents import latent_training_data
    from diffusion.data.text import EmbeddingTable
    from diffusion.training.train import train as train_loop

    image_size = art.square_image_size(shards_dir)
    buckets = art.shard_buckets(shards_dir)  # ingest.resize_mode bucket: batches of one bucket each
    found = latent_training_data(latents_dir, shards_dir)
    if p.latents.vae and found is None:
        raise MissingInputError(f"latents.vae is set but {latents_dir or '(no --latents folder)'} holds no latents: "
                                "run the latents stage first")
    urls, latent = found if found else (art.shard_urls(shards_dir, "train"), None)
    val_urls = art.list_shards(Path(latents_dir if latent else shards_dir) / "val")  # train.val_every's
    table = EmbeddingTable.load(art.require(embeddings_dir, "embeddings", "embed"))
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    grid_fn = _train_grid_fn(p, table, latent, image_size, out)
    init = _init_from(p)

    from diffusion.training import distributed

    rank = distributed.launched_rank()
    if rank:  # another torchrun process: it trains its share; rank 0 logs, checkpoints and exports
        train_loop(p.train, urls, table, out, image_size=image_size, latent=latent, progress=False, val_urls=val_urls,
                   init=init, buckets=buckets)
        return {"rank": rank}
    read = {_as_given(d): art.dvc_md5(d) for d in (latents_dir if latent else shards_dir, embeddings_dir)}
    with _train_run(p, out, table, image_size, latent) as (run, logger):
        train_loop(p.train, urls, table, out, image_size=image_size, latent=latent, logger=logger, grid_fn=grid_fn,
                   buckets=buckets,
                   progress=progress, val_urls=val_urls, init=init)
    art.write_json(out / art.TRAINED_ON, read)  # what this model saw, for its lineage (not dvc.lock's say-so)
    meta = art.model_meta(out)
    return {"run_id": run.info.run_id, "steps": meta["steps_done"], "train_img_per_s": meta["train_img_per_s"],
            "train_seconds": meta["train_seconds"], "device": meta["device"]}


def _init_from(p: Params):
    """train.init_from resolved (``diffusion.training.warm_start.Parent``; a registered version
    fetched from the registry of params ``mlflow``), or None: from scratch."""
    if not p.train.init_from:
        return None
    import mlflow

    from diffusion.registry import tracking, versions
    from diffusion.training import warm_start

    mlflow.set_tracking_uri(tracking.tracking_uri(p.mlflow))
    return warm_start.resolve(p.train.init_from, registered=versions.fetch_denoiser)


def _as_given(folder: str | Path) -> str:
    """A folder as the stage commands name it: relative to the working directory (the project, as
    dvc.yaml runs them: ``data/shards``) where it lies inside it, else absolute."""
    import os

    path = Path(folder).resolve()
    return os.path.relpath(path) if path.is_relative_to(Path.cwd().resolve()) else str(path)


def _train_grid_fn(p: Params, table, latent, image_size: int, out: Path):
    """The train stage's preview grid, as the training loop's ``grid_fn(denoiser, step)``: a fixed
    spread of the table's captions, decoded through the VAE of ``latent`` (a LatentSpec; None in
    pixel space); the grid at train.steps is also saved to ``out``."""
    from diffusion.config import SampleConfig
    from diffusion.sampling.generate import generate, make_grid, table_cond
    from diffusion.data.latents import codec_for, load_vae

    # the grid shows a fixed spread of captions the table holds (val captions included), sampled
    # with default settings: the sample section is the sample stage's, not train's
    captions = sorted(c for c in table.rows if c)
    grid_captions = captions[:: max(1, len(captions) // TRAIN_GRID_SIZE)][:TRAIN_GRID_SIZE]

    codecs = []  # the VAE, loaded once for every grid of the run

    def grid_fn(denoiser, step):
        """The grid of the same captions and seeds at every call (train.sample_every, and the end)."""
        if latent is not None:  # decode through the VAE the latents came from
            if not codecs:
                vae = load_vae(latent.vae, subfolder=latent.vae_subfolder, config=latent.vae_config)
                codecs.append(codec_for(vae, {"latents": latent.as_dict()}, next(denoiser.net.parameters()).device,
                                        p.latents))
            denoiser.codec = codecs[0]
        try:
            cond, uncond = table_cond(table, grid_captions)
            images = generate(denoiser, cond, uncond, list(range(len(grid_captions))), image_size, SampleConfig())
        finally:
            denoiser.codec = None  # the EMA being trained must not carry the VAE's weights
        grid = make_grid(images, grid_captions)
        if step >= p.train.steps:
            grid.save(out / art.TRAIN_GRID)
        return grid

    return grid_fn


@contextmanager
def _train_run(p: Params, out: Path, table, image_size: int, latent):
    """The MLflow run that rank 0 trains in: yields (run, logger) once the run file is written and
    the params and tags are logged; after training, writes the loss history and logs the loss curve."""
    import mlflow

    from diffusion.registry import tracking
    from diffusion.training import warm_start

    tracking.setup(p.mlflow)
    uri = tracking.tracking_uri(p.mlflow)
    with mlflow.start_run(run_name=f"train-{p.train.steps}steps") as run:
        art.write_run_file(out, run.info.run_id, run.info.experiment_id, uri)
        mlflow.log_params({f"train.{k}": v for k, v in flatten(to_dict(p.train)).items()})
        if latent is not None:
            mlflow.log_params({f"latents.{k}": v for k, v in latent.as_dict().items()})
        mlflow.log_params({"image_size": image_size, "source": p.ingest.source,
                           "embed.model": p.embed.model, "embed.pretrained": str(p.embed.pretrained),
                           "embed.layer": table.fingerprint["layer"]})
        mlflow.set_tags({"text_fingerprint": table.fingerprint["weights"], "stage": "train"})
        logger = tracking.MlflowLogger()
        yield run, logger
        # train.init_from: the parent the exported model.json records (parent.source, .resolved, .sha256)
        mlflow.set_tags(warm_start.tags(art.model_meta(out).get("parent")))
        curve = logger.loss_curve()
        art.write_loss_history(out, logger.history.get("loss", []), logger.history.get("val_loss", []))
        if curve is not None:
            curve.save(out / art.LOSS_CURVE)
            mlflow.log_image(curve, art.LOSS_CURVE)


def _encoder_for(p: Params, meta: dict):
    from diffusion.sampling.generate import check_fingerprint
    from diffusion.data.text import load_text_encoder

    e = p.embed
    encoder = load_text_encoder(e.model, e.pretrained, e.seed, e.layer, p.sample.device)
    check_fingerprint(encoder, meta)
    return encoder


def sample(p: Params, shards_dir: str | Path, model_dir: str | Path, out_dir: str | Path,
           progress: bool = True) -> dict:
    import mlflow

    from diffusion.registry import tracking
    from diffusion.data.text import pick_device
    from diffusion.evaluation.sample import eval_rows, sample_eval_set
    from diffusion.models import store

    denoiser, meta = store.load_model(model_dir, pick_device(p.sample.device), p.latents)
    encoder = _encoder_for(p, meta)
    builtin = p.ingest.source == "builtin"
    captions = [] if builtin else art.split_captions(shards_dir, "val")
    rows = eval_rows(p.dataset if builtin else None, p.sample, captions,
                     [] if builtin else art.split_captions(shards_dir, "train"))
    out = sample_eval_set(denoiser, meta, encoder, rows, p.sample, out_dir, progress=progress)
    run = art.read_run_file(model_dir)
    if run:
        tracking.setup(p.mlflow)
        with mlflow.start_run(run_id=run["run_id"]):
            # tags, not params: a rerun with other sampler settings (dvc repro after a `sample` change)
            # logs to the same training run, and MLflow refuses to change a logged param
            mlflow.set_tags({f"sample.{k}": str(v) for k, v in to_dict(p.sample).items()})
            mlflow.log_artifact(str(out / art.GRID), "samples")
    return {"images": len(list((out / art.IMAGES).glob("*.png"))), "grid": str(out / art.GRID)}


def evaluate(p: Params, samples_dir: str | Path, judge_dir: str | Path, model_dir: str | Path,
             metrics_file: str | Path, shards_dir: str | Path | None = None,
             report_file: str | Path | None = None, embeddings_dir: str | Path | None = None) -> dict:
    """Score the sample stage's images (``diffusion.evaluation.evaluate``): against real validation images
    from ``shards_dir`` where given, with the retrieval evaluator where the judge stage trained one
    and ``embeddings_dir`` and ``shards_dir`` are given; the readable page goes to ``report_file``."""
    import mlflow

    from diffusion.registry import tracking
    from diffusion.data.shards import val_images
    from diffusion.evaluation.evaluate import evaluate_samples
    from diffusion.evaluation.report import evaluation_page

    real = (lambda n: val_images(shards_dir, n)) if shards_dir else None
    metrics = evaluate_samples(samples_dir, art.require(judge_dir, "judge", "judge"), real, p.evaluate,
                               art.val_identity(shards_dir) if shards_dir else None,
                               retrieval=_retrieval_inputs(judge_dir, embeddings_dir, shards_dir))
    art.write_json(metrics_file, metrics)
    grid = Path(samples_dir) / art.GRID
    if report_file:
        evaluation_page(metrics, report_file, grid, Path(report_file).parent / art.SWEEP_DIR / art.SWEEP_PAGE)
    run = art.read_run_file(model_dir)
    if run:
        tracking.setup(p.mlflow)
        with mlflow.start_run(run_id=run["run_id"]):
            mlflow.log_metrics(tracking.evaluation_metrics(metrics))
            mlflow.log_dict(metrics, "metrics.json")
            if report_file:
                mlflow.log_artifact(str(report_file), "evaluation")
    return metrics


def _retrieval_inputs(judge_dir, embeddings_dir, shards_dir) -> dict | None:
    """What ``evaluate_samples`` needs for the retrieval metrics, or None where the judge stage
    trained no retrieval evaluator or the embeddings or real shards are not given."""
    directory = Path(judge_dir) / art.RETRIEVAL_DIR
    if embeddings_dir is None or shards_dir is None or not directory.is_dir():
        return None
    from diffusion.data.text import EmbeddingTable

    return {"directory": directory, "table": EmbeddingTable.load(art.require(embeddings_dir, "embeddings", "embed")),
            "val_urls": art.shard_urls(shards_dir, "val"), "train_urls": art.shard_urls(shards_dir, "train"),
            "val_captions": art.split_captions(shards_dir, "val"),
            "train_captions": set(art.split_captions(shards_dir, "train"))}


def sweep(p: Params, shards_dir: str | Path, model_dir: str | Path, judge_dir: str | Path,
          out_dir: str | Path, progress: bool = True) -> dict:
    """The quality-vs-cost map (``diffusion.evaluation.sweep``): the built-in set draws ``sweep.per_combo``
    images of every combination per point; other data ``sweep.n_prompts`` validation captions."""
    import mlflow

    from diffusion.registry import tracking
    from diffusion.evaluation.judge import load_judge
    from diffusion.evaluation.report import recommend
    from diffusion.evaluation.sample import eval_rows
    from diffusion.evaluation.sweep import run_points, sweep_settings, write_sweep
    from diffusion.data.shards import val_images
    from diffusion.data.text import pick_device
    from diffusion.models import store

    denoiser, meta = store.load_model(model_dir, pick_device(p.sample.device), p.latents)
    encoder = _encoder_for(p, meta)
    judge, info = load_judge(art.require(judge_dir, "judge", "judge"))
    builtin = p.ingest.source == "builtin"
    w = p.sweep
    rows = eval_rows(p.dataset if builtin else None,
                     replace(p.sample, per_combo=w.per_combo, new_wording_per_combo=0, partial_per_combo=0, n_prompts=w.n_prompts),
                     [] if builtin else art.split_captions(shards_dir, "val"))
    seeds = [w.seed + i for i in range(len(rows))]
    real = val_images(shards_dir, p.evaluate.real_images)
    points, guidance = sweep_settings(w, p.sample)
    args = (denoiser, encoder, meta["image_size"], rows, seeds, judge, info, real, progress)
    point_records, guidance_records = run_points(points, *args), run_points(guidance, *args)
    page = write_sweep(point_records, guidance_records, out_dir)
    run = art.read_run_file(model_dir)
    if run:
        tracking.setup(p.mlflow)
        with mlflow.start_run(run_id=run["run_id"]):
            for r in point_records:  # one metric per sampler, its step count on MLflow's step axis
                for key in ("fd_judge", "all", "speckle", "seconds_per_image"):
                    if r[key] == r[key]:
                        mlflow.log_metric(f"sweep.{r['sampler']}.{r['spacing']}.{key}", r[key], step=r["steps"])
            for r in guidance_records:
                for key in ("fd_judge", "all", "speckle"):
                    if r[key] == r[key]:
                        mlflow.log_metric(f"sweep.guidance.{key}", r[key], step=int(round(r["guidance_scale"] * 10)))
            mlflow.log_artifacts(str(out_dir), "sweep")
    return {"points": len(point_records), "guidance": len(guidance_records), "page": str(page),
            "recommended": recommend(point_records)}


def register(p: Params, model_dir: str | Path, metrics_file: str | Path, out_file: str | Path,
             project_dir: str | Path = ".") -> dict:
    """Register a new version, tagged with its metrics, its evaluation fingerprint and its lineage
    (git commit of ``project_dir``, the data the train stage read, the params hash)."""
    from diffusion.registry import lineage, tracking
    from diffusion.data.latents import vae_for_model
    from diffusion.registry.pyfunc import log_and_register

    meta = art.model_meta(model_dir)
    metrics = art.read_metrics(metrics_file)
    encoder = _encoder_for(p, meta)
    vae = vae_for_model(meta, p.latents)  # a latent model's autoencoder travels with it
    tracking.setup(p.mlflow)
    run = art.read_run_file(model_dir)
    flat = tracking.evaluation_metrics(metrics)
    keep = {k: v for k, v in flat.items() if k.endswith((".all", ".shape", ".color", ".size", ".position"))
            or (k.startswith("retrieval.r_precision.") and k.endswith(".mean"))
            or k in ("fd_judge.generated", "fidelity.generated.speckle", "image.fid", "image.clip_score",
                     "retrieval.fd.generated", "retrieval.fd.real_floor")}
    evaluation = metrics.get("fingerprint") or {}
    tags = lineage.collect(project_dir, to_dict(p), evaluation.get("id", "none"), art.read_trained_on(model_dir),
                           parent=meta.get("parent"))
    info = log_and_register(model_dir, encoder, p.sample, keep, p.register.model_name,
                            run.get("run_id"), evaluation=evaluation, lineage=tags, vae=vae,
                            merge_lora=p.register.merge_lora)
    info["tracking_uri"] = tracking.tracking_uri(p.mlflow)
    art.write_json(out_file, info)
    return info


def promote(p: Params, registered_file: str | Path | None, out_file: str | Path | None,
            version: int | None = None, model_name: str | None = None) -> dict:
    """Apply the promotion policy (params ``promote``) to a version: the one the register stage
    recorded in ``registered_file``, else ``version``, else the newest. With ``promote.auto`` off
    and a registered file (the pipeline), records that it skipped."""
    import mlflow

    from diffusion.registry import tracking
    from diffusion.registry.promote import promote as run_policy

    name = model_name or p.register.model_name
    if registered_file is not None:
        reg = art.read_registered(registered_file)
        name, version = reg["name"], reg["version"]
        if not p.promote.auto:
            result = {"outcome": "skipped", "reason": "promote.auto is false", "model": name, "candidate": version}
            if out_file is not None:
                art.write_json(out_file, result)
            return result
    from diffusion.evaluation.evaluate import promotion_metric

    tracking.setup(p.mlflow)
    policy = replace(p.promote, metric=promotion_metric(p))
    decision = run_policy(mlflow.MlflowClient(), tracking.tracking_uri(p.mlflow), name, policy, version)
    result = decision.as_dict()
    if out_file is not None:
        art.write_json(out_file, result)
    return result
