"""Every file passed between stages: its name, how it is written (atomically) and read, and the
check that it exists (with the stage that makes it, for the one-line error).

The low level of the house: it imports nothing of the project but ``diffusion.errors``, so any
module may import it. What builds objects from these files lives above it: the denoiser in
``diffusion.models.store``, the logged MLflow model in ``diffusion.registry.bundle``.

Stages, the registry, evaluation, batch generation, the flows and the CLI import names and
loaders from here instead of reaching into the module of the stage that wrote them, so each file
name is spelled once::

    shards/      train/shard-*.tar  val/shard-*.tar  index-{split}.parquet  stats.json     (ingest)
    model/       model.safetensors  [adapter.safetensors]  model.json  checkpoint.pt  run.json  *.png  loss.csv  (train)
    samples/     images/NNNNNN.png  manifest.parquet  grid.png                           (sample)
    judge/       judge.safetensors  judge.json                                            (judge)
    latents/     train/shard-*.tar  val/shard-*.tar  latents.json                     (latents)
    bundle/      denoiser/  text_encoder.safetensors  text_encoder.json  sampler.json  [vae/]  (register)
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any

from diffusion.errors import MissingInputError, T2IError, require_path

# ---------------------------------------------------------------------------------------------
# Generic: atomic writes and must-exist checks


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    """Write ``data`` under a temporary name in the same folder, then rename: a reader (or a
    killed writer) never sees a half-written file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _file_hash(path: Path, algorithm: str) -> str:
    h = hashlib.new(algorithm)
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def dvc_md5(path: str | Path) -> str:
    """The hash DVC 3 records for a file or folder in dvc.lock (``md5``): a file's md5; a folder's is
    the md5 of the JSON list of its files' {md5, relpath}, sorted by relpath, with ".dir" appended.
    So a hash computed from the data on disk can be compared with dvc.lock's."""
    p = Path(path)
    if p.is_file():
        return _file_hash(p, "md5")
    entries = [{"md5": _file_hash(f, "md5"), "relpath": f.relative_to(p).as_posix()}
               for f in p.rglob("*") if f.is_file()]
    listing = json.dumps(sorted(entries, key=lambda e: e["relpath"]), sort_keys=True).encode()
    return hashlib.md5(listing).hexdigest() + ".dir"


def write_json(path: str | Path, obj: Any) -> Path:
    return atomic_write_bytes(path, (json.dumps(obj, indent=2) + "\n").encode())


def read_json(path: str | Path, what: str, maker: str) -> Any:
    """Load a JSON file a stage wrote; missing: a one-line error naming the stage that makes it."""
    return json.loads(require_path(path, what, f"run the {maker} stage first").read_text())


def require(path: str | Path, what: str, maker: str) -> Path:
    return require_path(path, what, f"run the {maker} stage first")


# ---------------------------------------------------------------------------------------------
# Shards (ingest)

SPLITS = ("train", "val")
SHARD_GLOB = "shard-*.tar"
STATS = "stats.json"
DUPLICATES = "duplicates.parquet"  # ingest.dedupe: each dropped sample and the kept key it matched


def index_file(shards_dir: str | Path, split: str) -> Path:
    return Path(shards_dir) / f"index-{split}.parquet"


def index_files(shards_dir: str | Path) -> list[Path]:
    """Every split's index (at least one), for the captions of all splits."""
    root = require(shards_dir, "shards", "ingest")
    found = [index_file(root, s) for s in SPLITS if index_file(root, s).is_file()]
    if not found:
        raise MissingInputError(f"no shard index (index-*.parquet) in {root} (run the ingest stage first)")
    return found


def shard_urls(shards_dir: str | Path, split: str) -> list[str]:
    """The split's shard files (at least one), sorted."""
    split_dir = require(Path(shards_dir) / split, f"{split} shards", "ingest")
    urls = list_shards(split_dir)
    if not urls:
        raise MissingInputError(f"no {split} shards ({SHARD_GLOB}) in {split_dir} (run the ingest stage first)")
    return urls


def list_shards(split_dir: str | Path) -> list[str]:
    """Sorted shard paths of one split directory (only finished shards, never temp files)."""
    return sorted(str(p) for p in Path(split_dir).glob(SHARD_GLOB))


def shard_stats(shards_dir: str | Path) -> dict:
    return read_json(Path(shards_dir) / STATS, "shard stats", "ingest")


def square_image_size(shards_dir: str | Path) -> int:
    """The image side the shards were written at (with resize_mode bucket: the side of the pixel
    budget, see ``shard_buckets``); training needs square images or aspect buckets."""
    stats = shard_stats(shards_dir)
    if stats.get("resize_mode") == "keep_ratio":
        raise T2IError("training needs square images or buckets: ingest with ingest.resize_mode center_crop, "
                       "pad or bucket")
    return int(stats["image_size"])


def shard_buckets(shards_dir: str | Path) -> list[tuple[int, int]] | None:
    """The (width, height) buckets the train split holds samples of (resize_mode bucket), else None."""
    stats = shard_stats(shards_dir)
    if stats.get("resize_mode") != "bucket":
        return None
    counts = stats.get("bucket_counts", {}).get("train", {})
    return [(int(w), int(h)) for w, h in stats["buckets"] if counts.get(f"{w}x{h}")]


def val_identity(shards_dir: str | Path) -> dict:
    """What identifies the real validation set (for caches of its statistics)."""
    return {"val_index_sha256": sha256_file(require(index_file(shards_dir, "val"), "val index", "ingest"))}


def split_captions(shards_dir: str | Path, split: str) -> list[str]:
    import pyarrow.parquet as pq

    path = require(index_file(shards_dir, split), f"{split} index", "ingest")
    return pq.read_table(path, columns=["caption"]).column("caption").to_pylist()


# ---------------------------------------------------------------------------------------------
# Trained model (train)

MODEL_WEIGHTS = "model.safetensors"
MODEL_CONFIG = "model.json"
LORA_WEIGHTS = "adapter.safetensors"  # a LoRA model's adapter (model.json "lora"); model.safetensors is its base
CHECKPOINT = "checkpoint.pt"
RUN_FILE = "run.json"  # the MLflow run the model was trained in
TRAIN_GRID = "train_grid.png"
LOSS_CURVE = "loss_curve.png"
TRAINED_ON = "trained_on.json"  # {folder: DVC md5} of the data the train stage read (lineage)
LOSS_HISTORY = "loss.csv"  # step,loss,val_loss: a DVC plot


def read_trained_on(model_dir: str | Path) -> dict[str, str] | None:
    """{folder: DVC md5} the train stage recorded in ``model_dir``; None for a model trained before
    it recorded them."""
    path = Path(model_dir) / TRAINED_ON
    return json.loads(path.read_text()) if path.is_file() else None


def require_model(model_dir: str | Path) -> Path:
    d = Path(model_dir)
    for f in (MODEL_WEIGHTS, MODEL_CONFIG):
        if not (d / f).is_file():
            raise MissingInputError(f"trained model not found: {d / f} (run the train stage first)")
    return d


def model_weights_sha256(model_dir: str | Path) -> str:
    """The identity of a model folder's weights: model.safetensors' sha256, or for a LoRA model
    (base + adapter.safetensors) the sha256 of both files' hashes, so another adapter is other weights."""
    d = Path(model_dir)
    digest = sha256_file(d / MODEL_WEIGHTS)
    if (d / LORA_WEIGHTS).is_file():
        digest = hashlib.sha256(f"{digest}\0{sha256_file(d / LORA_WEIGHTS)}".encode()).hexdigest()
    return digest


def model_meta(model_dir: str | Path) -> dict:
    return json.loads((require_model(model_dir) / MODEL_CONFIG).read_text())


def write_run_file(model_dir: str | Path, run_id: str, experiment_id: str, uri: str) -> None:
    write_json(Path(model_dir) / RUN_FILE, {"run_id": run_id, "experiment_id": experiment_id, "tracking_uri": uri})


def read_run_file(model_dir: str | Path) -> dict:
    path = Path(model_dir) / RUN_FILE
    return json.loads(path.read_text()) if path.is_file() else {}


def write_loss_history(model_dir: str | Path, points: list[tuple[int, float]],
                       val_points: list[tuple[int, float]] = ()) -> Path:
    """One row per step that logged either loss; a cell is empty where that loss was not logged
    (train.log_every and train.val_every differ, or val_loss is off)."""
    loss, val = dict(points), dict(val_points)
    cell = lambda d, s: f"{d[s]:.6g}" if s in d else ""  # noqa: E731
    lines = ["step,loss,val_loss"] + [f"{s},{cell(loss, s)},{cell(val, s)}" for s in sorted(loss.keys() | val.keys())]
    return atomic_write_bytes(Path(model_dir) / LOSS_HISTORY, ("\n".join(lines) + "\n").encode())


# ---------------------------------------------------------------------------------------------
# Generated images (sample, batch generation)

MANIFEST = "manifest.parquet"
GRID = "grid.png"
IMAGES = "images"


def write_manifest(rows: list[dict], path: str | Path, schema=None) -> Path:
    """A parquet manifest, written atomically."""
    import io

    import pyarrow as pa
    import pyarrow.parquet as pq

    buf = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), buf)
    return atomic_write_bytes(path, buf.getvalue())


def read_manifest(samples_dir: str | Path) -> list[dict]:
    import pyarrow.parquet as pq

    return pq.read_table(require(Path(samples_dir) / MANIFEST, "sample manifest", "sample")).to_pylist()


# ---------------------------------------------------------------------------------------------
# Judge (judge)

JUDGE_WEIGHTS = "judge.safetensors"
JUDGE_INFO = "judge.json"
RETRIEVAL_DIR = "retrieval"  # the retrieval evaluator, inside the judge stage's folder


# ---------------------------------------------------------------------------------------------
# Reports (evaluate, register, promote)


def read_metrics(metrics_file: str | Path) -> dict:
    return read_json(metrics_file, "metrics", "evaluate")


EVAL_PAGE = "evaluation.md"  # reports/: the evaluate stage's readable page
SWEEP_DIR = "sweep"  # reports/sweep/: the sweep stage's output
SWEEP_PAGE = "sweep.md"  # the sweep's page, beside its CSVs and plots


def write_adherence_plot(metrics: dict, path: str | Path) -> Path:
    """The prompt-adherence numbers that exist for the data as a table (metric, value): a DVC bar
    plot. The judge's scores per group (``held_out.all,0.9``; built-in set) and the retrieval
    evaluator's R-precision of generated and real images (``r_precision.generated.seen,0.4``; any data)."""
    lines = ["metric,value"]
    for group, scores in (metrics.get("adherence") or {}).items():
        lines += [f"{group}.{k},{v:.6g}" for k, v in scores.items() if k != "n"]
    for kind, groups in ((metrics.get("retrieval") or {}).get("r_precision") or {}).items():
        lines += [f"r_precision.{kind}.{g},{s['mean']:.6g}" for g, s in groups.items() if s["mean"] == s["mean"]]
    return atomic_write_bytes(path, ("\n".join(lines) + "\n").encode())


def read_registered(registered_file: str | Path) -> dict:
    """The record the register stage wrote: {name, version, uri, run_id, tracking_uri}."""
    return read_json(registered_file, "registered model record", "register")


# ---------------------------------------------------------------------------------------------
# The logged MLflow model (register -> pyfunc, batch generation, serving)

BUNDLE_DENOISER = "denoiser"
BUNDLE_TEXT_WEIGHTS = "text_encoder.safetensors"
BUNDLE_TEXT_SPEC = "text_encoder.json"
BUNDLE_SAMPLER = "sampler.json"
BUNDLE_EVAL = "evaluation.json"  # the evaluation fingerprint and metrics the version was registered with
BUNDLE_VAE = "vae"  # latent models: the autoencoder (diffusers folder), so the model decodes on its own
# MLflow artifact name -> file or folder in the bundle
BUNDLE = {"denoiser": BUNDLE_DENOISER, "text_encoder": BUNDLE_TEXT_WEIGHTS, "text_encoder_spec": BUNDLE_TEXT_SPEC,
          "sampler": BUNDLE_SAMPLER, "evaluation": BUNDLE_EVAL}
