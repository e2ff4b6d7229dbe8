"""Batch generation: a prompts file and a model in, a folder of images, a manifest and a contact sheet out.

    rows = read_prompts("prompts.csv")                       # .txt, .csv, .jsonl or .parquet
    model = load_generator("models:/t2i-shapes@champion")    # or models:/name/3, or a local model folder
    summary = generate_batch(model, rows, batch_dir("data/batches", "nightly-1"))

A batch folder holds ``batch.json`` (what was asked: model identity, prompts hash, settings),
``images/NNNNNN.png``, ``parts/part-NNNNNN.parquet`` (one per committed chunk),
``manifest.parquet`` and ``contact_sheet.png``.

Resumable and crash-safe: images are written under a temporary name and renamed, then the chunk's
part file (its manifest rows, each with the image's sha256) is written the same way. A rerun with
the same arguments keeps every row whose part exists and whose image still has the recorded hash,
and regenerates the rest, so a kill loses at most the chunk in flight and no reader ever sees a
half-written image or manifest. Each image's noise comes from its own seed, so an image depends on
(prompt, negative prompt, seed, settings, model) only, never on the chunk it was drawn in: a resumed
batch ends with the same images and manifest as an uninterrupted one (only ``time`` differs).
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import math
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from tqdm.auto import tqdm

from diffusion import artifacts as art
from diffusion.models import store
from diffusion.registry import bundle
from diffusion.errors import MissingInputError, T2IError

PROMPT_FORMATS = (".txt", ".csv", ".jsonl", ".parquet")
OPTIONAL_COLUMNS = ("seed", "negative_prompt", "guidance_scale", "steps", "width", "height")
BATCH_FILE = "batch.json"
PARTS = "parts"
CONTACT_SHEET = "contact_sheet.png"

MANIFEST_SCHEMA = pa.schema([
    ("index", pa.int64()), ("prompt", pa.string()), ("negative_prompt", pa.string()), ("seed", pa.int64()),
    ("sampler", pa.string()), ("spacing", pa.string()), ("steps", pa.int64()), ("guidance_scale", pa.float64()),
    ("eta", pa.float64()),
    ("model_name", pa.string()), ("model_version", pa.string()), ("run_id", pa.string()),
    ("file", pa.string()), ("sha256", pa.string()), ("time", pa.string()),
])


# ---------------------------------------------------------------------------------------------
# Prompts


@dataclass
class Prompts:
    rows: list[dict]  # prompt, and any of seed, negative_prompt, guidance_scale, steps, width, height (None: default)
    skipped: dict[str, int] = field(default_factory=dict)  # reason -> count (blank lines, empty prompts)
    sha256: str = ""  # of the file's bytes


def _cell(value, kind, column: str, where: str):
    if value is None or (isinstance(value, float) and math.isnan(value)) or (isinstance(value, str) and not value.strip()):
        return None
    try:
        return kind(float(value)) if kind is int else kind(value)
    except (TypeError, ValueError):
        raise T2IError(f"{where}: {column} must be a {kind.__name__}, got {value!r}") from None


def read_prompts(path: str | Path) -> Prompts:
    """Prompts from a text file (one a line), CSV, JSONL or parquet (a ``prompt`` column, optional
    ``seed``, ``negative_prompt``, ``guidance_scale``, ``steps``, ``width`` and ``height``: a size
    the model was trained on, one of its aspect buckets).

    Blank lines and empty prompts are skipped and counted. Non-UTF-8 bytes reject the file (with
    the line), since a mangled prompt would silently draw the wrong picture.
    """
    path = Path(path)
    if not path.is_file():
        raise MissingInputError(f"prompts file not found: {path}")
    suffix = path.suffix.lower()
    if suffix not in PROMPT_FORMATS:
        raise T2IError(f"{path}: prompts must be {', '.join(PROMPT_FORMATS)}, got {suffix or 'no extension'}")
    data = path.read_bytes()
    records, columns = _records(path, suffix, data)
    if "prompt" not in columns:
        raise T2IError(f"{path}: no 'prompt' column (columns: {', '.join(sorted(columns)) or 'none'})")
    rows, skipped = [], {}
    for n, rec in enumerate(records, 1):
        prompt = rec.get("prompt")
        if prompt is None or not str(prompt).strip():
            reason = "blank_line" if suffix in (".txt", ".jsonl") else "empty_prompt"
            skipped[reason] = skipped.get(reason, 0) + 1
            continue
        where = f"{path}: row {n}"
        rows.append({"prompt": str(prompt).strip(),
                     "seed": _cell(rec.get("seed"), int, "seed", where),
                     "negative_prompt": _cell(rec.get("negative_prompt"), str, "negative_prompt", where),
                     "guidance_scale": _cell(rec.get("guidance_scale"), float, "guidance_scale", where),
                     "steps": _cell(rec.get("steps"), int, "steps", where)})
        for side in ("width", "height"):  # only where given: an aspect bucket of the model
            if (v := _cell(rec.get(side), int, side, where)) is not None:
                rows[-1][side] = v
    if not rows:
        raise T2IError(f"{path}: no prompts (empty file{', ' + str(skipped) if skipped else ''})")
    return Prompts(rows, skipped, hashlib.sha256(data).hexdigest())


def _records(path: Path, suffix: str, data: bytes) -> tuple[list[dict], list[str] | set[str]]:
    """(records, columns) of a prompts file's bytes in the format its ``suffix`` names: a dict per
    line or row (a blank JSONL line gives ``{"prompt": None}``) and the column names found."""
    if suffix == ".parquet":
        try:
            table = pq.read_table(io.BytesIO(data))
        except Exception as e:  # noqa: BLE001 - pyarrow raises several types for a bad file
            raise T2IError(f"{path}: not a readable parquet file ({e})") from None
        return table.to_pylist(), table.column_names
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise T2IError(f"{path}: line {line} is not UTF-8 (byte {data[e.start]:#04x}); save the file as UTF-8") from None
    if suffix == ".txt":
        return [{"prompt": line} for line in text.splitlines()], ["prompt"]
    if suffix == ".csv":
        reader = csv.DictReader(io.StringIO(text))
        columns = [c.strip() for c in reader.fieldnames or []]
        return [{(k or "").strip(): v for k, v in r.items()} for r in reader], columns
    return _jsonl_records(path, text)


def _jsonl_records(path: Path, text: str) -> tuple[list[dict], set[str]]:
    """(records, columns) of a JSONL file: one JSON object a line, ``{"prompt": None}`` for a blank
    one; the columns are every key any object has."""
    records: list[dict] = []
    columns = set()
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            records.append({"prompt": None})
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise T2IError(f"{path}: line {n} is not JSON ({e.msg})") from None
        if not isinstance(obj, dict):
            raise T2IError(f"{path}: line {n} is not a JSON object")
        records.append(obj)
        columns |= set(obj)
    return records, columns


# ---------------------------------------------------------------------------------------------
# The model


@dataclass
class Generator:
    """A loaded model and where it came from."""

    denoiser: object
    meta: dict
    encoder: object
    settings: object  # SampleConfig registered with the model (or params' sample section)
    name: str
    version: str  # registry version, or "local"
    run_id: str
    weights_sha256: str
    source: str  # the URI or folder it was loaded from

    @property
    def identity(self) -> dict:
        return {"model_name": self.name, "model_version": self.version, "run_id": self.run_id,
                "weights_sha256": self.weights_sha256}


def registry_version(model: str):
    """The registry's ModelVersion that ``model`` names, or None for an existing local folder.
    One-line errors for a missing folder, an unknown name, version or alias."""
    if not model.startswith("models:/"):
        if Path(model).exists():
            return None
        if "/" in model and "@" not in model:
            raise MissingInputError(f"model folder not found: {model}")
    from diffusion.registry.versions import parse_model_uri, resolve_version

    return resolve_version(parse_model_uri(model))


def load_generator(model: str, *, device: str = "auto", params=None) -> Generator:
    """Load ``model``: ``models:/<name>@<alias>`` / ``models:/<name>/<version>`` from the MLflow
    registry (the tracking URI must be set), a downloaded MLflow model folder (with ``MLmodel``),
    or a train-stage output folder (model.safetensors + model.json; the text encoder then comes
    from ``params.embed`` and the sampler settings from ``params.sample``)."""
    from diffusion.data.text import pick_device

    dev = pick_device(device)
    mv = registry_version(model)
    if mv is not None:
        import mlflow

        root = Path(mlflow.artifacts.download_artifacts(f"models:/{mv.name}/{mv.version}"))
        return _from_bundle(root, dev, mv.name, str(mv.version), mv.run_id or "", f"models:/{mv.name}/{mv.version}")
    local = Path(model).resolve()
    if (local / "MLmodel").is_file():
        return _from_bundle(local, dev, local.name, "local", "", str(local))
    if params is None:
        raise T2IError(f"{local}: a train-stage model folder needs params (for its text encoder)")
    from diffusion.sampling.generate import check_fingerprint
    from diffusion.data.text import load_text_encoder

    den, meta = store.load_model(local, dev)
    e = params.embed
    enc = load_text_encoder(e.model, e.pretrained, e.seed, e.layer, str(dev))
    check_fingerprint(enc, meta)
    return Generator(den, meta, enc, params.sample, local.name, "local", "",
                     art.model_weights_sha256(local), str(local))


def _from_bundle(root: Path, dev, name: str, version: str, run_id: str, source: str) -> Generator:
    """A logged MLflow model folder (the one holding MLmodel)."""
    den, meta, enc, settings = bundle.load_bundle(bundle.bundle_paths(root), dev)
    weights = art.model_weights_sha256(root / "artifacts" / art.BUNDLE_DENOISER)
    return Generator(den, meta, enc, settings, name, version, run_id, weights, source)


# ---------------------------------------------------------------------------------------------
# The batch


def batch_dir(output_root: str | Path, run_name: str, date: str | None = None) -> Path:
    """``<output_root>/<YYYY-MM-DD>/<run_name>`` (date: today, UTC)."""
    if not run_name or "/" in run_name or run_name in (".", ".."):
        raise T2IError(f"run name must be a plain folder name, got {run_name!r}")
    date = date or datetime.now(timezone.utc).strftime("%Y-%m-%d")
    try:
        datetime.strptime(date, "%Y-%m-%d")
    except ValueError:
        raise T2IError(f"date must be YYYY-MM-DD, got {date!r}") from None
    return Path(output_root) / date / run_name


def plan_rows(gen: Generator, prompts: Prompts, base_seed: int = 0, overrides: dict | None = None) -> list[dict]:
    """Every image to draw, with its settings resolved: the row's own values, else ``overrides``
    (command line), else the model's registered sampler settings."""
    from diffusion.sampling.generate import effective_eta

    s = gen.settings
    overrides = {k: v for k, v in (overrides or {}).items() if v is not None}
    sampler = overrides.get("sampler", s.sampler)
    eta = effective_eta(replace(s, sampler=sampler, eta=overrides.get("eta", s.eta)))
    planned = []
    for i, r in enumerate(prompts.rows):
        planned.append({
            "index": i, "prompt": r["prompt"], "negative_prompt": r["negative_prompt"] or "",
            "seed": r["seed"] if r["seed"] is not None else base_seed + i,
            "sampler": sampler, "spacing": s.spacing,
            "steps": r["steps"] if r["steps"] is not None else overrides.get("steps", s.steps),
            "guidance_scale": r["guidance_scale"] if r["guidance_scale"] is not None
            else overrides.get("guidance_scale", s.guidance_scale),
            "eta": eta,
        })
    from diffusion.data.buckets import requested_size

    for r, row in zip(prompts.rows, planned):  # a size (an aspect bucket): the row's, else the command line's
        w, h = (r.get("width"), r.get("height")) if r.get("width") or r.get("height") else \
            (overrides.get("width"), overrides.get("height"))
        size = requested_size(gen.meta, w, h, f"prompt {row['index']}")
        if size is not None:  # only then: the rows (and so batch.json's rows_sha256) of square requests stay as they were
            row["width"], row["height"] = size
    max_steps = len(gen.denoiser.sigmas)
    for row in planned:
        if not 1 <= row["steps"] <= max_steps:
            raise T2IError(f"prompt {row['index']}: steps must be in 1..{max_steps}, got {row['steps']}")
    return planned


def _settings_key(row: dict) -> tuple:
    return (row["sampler"], row["spacing"], row["steps"], row["guidance_scale"], row["eta"], row.get("width"),
            row.get("height"))


def _check_or_write_request(out: Path, request: dict) -> None:
    """A batch folder belongs to one request: refuse to mix models or prompt sets in it."""
    path = out / BATCH_FILE
    if path.is_file():
        old = json.loads(path.read_text())
        _refuse_other_model(out, old.get("model", {}), request["model"], ("model_name", "model_version", "run_id",
                                                                         "weights_sha256"))
        if old.get("rows_sha256") != request["rows_sha256"]:
            raise T2IError(f"{out} holds a batch of other prompts or settings: refusing to mix; "
                           "use another run name or output folder")
        return
    art.write_json(path, request)


def _refuse_other_model(out: Path, old: dict, new: dict, keys: tuple[str, ...]) -> None:
    if any(str(old.get(k)) != str(new.get(k)) for k in keys):
        raise T2IError(f"{out} holds images from {old.get('model_name')} version {old.get('model_version')}, "
                       f"not {new.get('model_name')} version {new.get('model_version')}"
                       + ("" if old.get("model_version") != new.get("model_version") else " (other weights)")
                       + ": refusing to mix; use another run name or output folder")


def _verified_parts(out: Path) -> dict[int, dict]:
    """Manifest rows of every committed chunk whose images still match their hashes."""
    done: dict[int, dict] = {}
    for part in sorted((out / PARTS).glob("part-*.parquet")):
        try:
            rows = pq.read_table(part).to_pylist()
        except Exception:  # noqa: BLE001 - a damaged part is simply redone
            part.unlink()
            continue
        if all((out / r["file"]).is_file() and art.sha256_file(out / r["file"]) == r["sha256"] for r in rows):
            done.update({r["index"]: r for r in rows})
        else:
            part.unlink()
    return done


def generate_batch(gen: Generator, rows: list[dict], out_dir: str | Path, *, batch_size: int = 64,
                   contact_sheet_size: int = 48, progress: bool = True, log=print,
                   submit: Callable[[list[dict]], object] | None = None, window: int = 2) -> dict:
    """Draw every row of ``rows`` (from ``plan_rows``) into ``out_dir``, resuming what is there.
    Returns a summary: counts, images/s, the model, the paths.

    ``submit(chunk)`` chooses where chunks are drawn: it returns a future whose ``result()`` is
    ``render_chunk``'s (a Prefect task on a Dask cluster, see ``batch_workers``); ``window`` chunks
    are in flight at once. Without it, this process draws them one after another. Either way this
    process alone writes the folder, committing chunks in order, so the output is the same."""
    out = Path(out_dir)
    (out / art.IMAGES).mkdir(parents=True, exist_ok=True)
    (out / PARTS).mkdir(exist_ok=True)
    rows_sha = hashlib.sha256(json.dumps(rows, sort_keys=True).encode()).hexdigest()
    _check_or_write_request(out, {"model": gen.identity, "source": gen.source, "rows": len(rows),
                                  "rows_sha256": rows_sha})
    done = _verified_parts(out)
    todo = [r for r in rows if r["index"] not in done]
    log(f"batch {out}: {len(rows)} images from {gen.name} version {gen.version} "
        f"({len(done)} already written, {len(todo)} to draw)")
    # chunks of one setting each (a chunk shares one sampler call); order stays the file's order
    groups: dict[tuple, list[dict]] = {}
    for r in todo:
        groups.setdefault(_settings_key(r), []).append(r)
    chunks = [g[i:i + batch_size] for g in groups.values() for i in range(0, len(g), batch_size)]
    size = gen.meta["image_size"]
    bar = tqdm(total=len(todo), desc="generate", unit="img", disable=not progress, mininterval=1.0)
    t0, drawn = time.perf_counter(), 0
    for chunk, rendered in _rendered_in_order(gen, chunks, size, submit, window):
        records = _commit_chunk(out, rendered)
        done.update({r["index"]: r for r in records})
        drawn += len(chunk)
        bar.update(len(chunk))
        bar.set_postfix(img_s=f"{drawn / (time.perf_counter() - t0):.1f}")
    bar.close()
    seconds = time.perf_counter() - t0
    final = [done[r["index"]] for r in rows]
    art.write_manifest(final, out / art.MANIFEST, MANIFEST_SCHEMA)
    _write_contact_sheet(out, final, contact_sheet_size)
    summary = {"out": str(out), "images": len(final), "drawn": drawn, "resumed": len(final) - drawn,
               "seconds": round(seconds, 3), "images_per_s": round(drawn / seconds, 3) if drawn and seconds else None,
               **gen.identity, "manifest": str(out / art.MANIFEST), "contact_sheet": str(out / CONTACT_SHEET)}
    log(f"batch done: {len(final)} images ({drawn} drawn, {len(final) - drawn} kept) from {gen.name} "
        f"version {gen.version} in {seconds:.1f} s -> {out}")
    return summary


def _rendered_in_order(gen: Generator, chunks: list[list[dict]], size: int, submit, window: int):
    """(chunk, render_chunk's result) for every chunk, in order: drawn here, or through ``submit``
    with at most ``window`` chunks in flight (bounds memory whatever the batch size)."""
    if submit is None:
        for chunk in chunks:
            yield chunk, render_chunk(gen, chunk, size)
        return
    pending: deque = deque()
    upcoming = iter(chunks)
    for chunk in upcoming:
        pending.append((chunk, submit(chunk)))
        if len(pending) >= max(1, window):
            break
    while pending:
        chunk, future = pending.popleft()
        rendered = future.result()
        nxt = next(upcoming, None)
        if nxt is not None:
            pending.append((nxt, submit(nxt)))
        yield chunk, rendered


def render_chunk(gen: Generator, chunk: list[dict], size: int) -> list[tuple[dict, bytes]]:
    """Draw one chunk of rows that share their settings (one sampler call), ``size`` pixels square
    or the rows' width x height:
    each row's manifest record (the row, the model, the file, its sha256, the time) and PNG bytes.
    Writes nothing, so it runs anywhere (a Dask worker); ``_commit_chunk`` writes the result."""
    from diffusion.sampling.generate import encode_prompts, generate
    from diffusion.registry.pyfunc import png_bytes

    first = chunk[0]
    settings = replace(gen.settings, sampler=first["sampler"], spacing=first["spacing"], steps=first["steps"],
                       guidance_scale=first["guidance_scale"], eta=first["eta"], batch_size=len(chunk))
    negatives = [r["negative_prompt"] for r in chunk]
    cond, uncond = encode_prompts(gen.encoder, [r["prompt"] for r in chunk], negatives=negatives)
    if first.get("width"):
        size = (first["width"], first["height"])
    images = generate(gen.denoiser, cond, uncond, [r["seed"] for r in chunk], size, settings)
    stamp = datetime.now(timezone.utc).isoformat(timespec="seconds")
    rendered = []
    for r, img in zip(chunk, images):
        data = png_bytes(img)
        rendered.append(({**r, "model_name": gen.name, "model_version": gen.version, "run_id": gen.run_id,
                          "file": f"{art.IMAGES}/{r['index']:06d}.png", "sha256": hashlib.sha256(data).hexdigest(),
                          "time": stamp}, data))
    return rendered


def _commit_chunk(out: Path, rendered: list[tuple[dict, bytes]]) -> list[dict]:
    """Write a rendered chunk's images, then its part file (each atomically): the chunk is committed
    once its part exists. Returns its manifest rows."""
    for record, data in rendered:
        art.atomic_write_bytes(out / record["file"], data)
    records = [record for record, _ in rendered]
    art.write_manifest(records, out / PARTS / f"part-{records[0]['index']:06d}.parquet", MANIFEST_SCHEMA)
    return records


def _write_contact_sheet(out: Path, final: list[dict], contact_sheet_size: int) -> None:
    """A grid of at most ``contact_sheet_size`` of the batch's images, evenly spread, with their prompts."""
    from PIL import Image

    from diffusion.sampling.generate import make_grid

    pick = list(range(0, len(final), max(1, math.ceil(len(final) / contact_sheet_size))))[:contact_sheet_size]
    sheet = make_grid([np.asarray(Image.open(out / final[i]["file"]).convert("RGB")) for i in pick],
                      [final[i]["prompt"] for i in pick], cols=8)
    art.atomic_write_bytes(out / CONTACT_SHEET, _png(sheet))


def _png(image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def check_request(prompts_file: str | Path, model: str, output_root: str | Path, run_name: str,
                  date: str | None = None) -> Prompts:
    """The cheap checks, before any model is loaded: the prompts file reads, the model reference
    resolves (registry name, version or alias; or the folder exists), and the batch folder, if it
    exists, was drawn by that registry version. Raises one-line T2IErrors."""
    prompts = read_prompts(prompts_file)
    out = batch_dir(output_root, run_name, date)
    mv = registry_version(model)
    if mv is not None and (out / BATCH_FILE).is_file():
        old = json.loads((out / BATCH_FILE).read_text()).get("model", {})
        _refuse_other_model(out, old, {"model_name": mv.name, "model_version": str(mv.version)},
                            ("model_name", "model_version"))
    return prompts


def run_batch(prompts_file: str | Path, model: str, output_root: str | Path, run_name: str, *, date: str | None = None,
              cfg=None, params=None, overrides: dict | None = None, progress: bool = True, log=print,
              engine: Callable[[Generator, int], Callable] | None = None) -> dict:
    """The whole thing, as the CLI and the flow call it: read, load, plan, generate.

    ``engine(gen, image_size)`` returns ``generate_batch``'s ``submit`` (chunks drawn elsewhere,
    ``batch_workers.worker_engine``); this process then loads the model on the CPU, to plan and
    commit only, and keeps ``2 x batch.workers`` chunks in flight."""
    from diffusion.config import BatchConfig

    cfg = cfg or BatchConfig()
    prompts = read_prompts(prompts_file)
    if prompts.skipped:
        log(f"{prompts_file}: skipped {sum(prompts.skipped.values())} rows {prompts.skipped}")
    gen = load_generator(model, device="cpu" if engine else cfg.device, params=params)
    rows = plan_rows(gen, prompts, cfg.seed, overrides)
    out = batch_dir(output_root, run_name, date)
    submit = engine(gen, gen.meta["image_size"]) if engine else None
    summary = generate_batch(gen, rows, out, batch_size=cfg.batch_size, contact_sheet_size=cfg.contact_sheet_size,
                             progress=progress, log=log, submit=submit, window=2 * cfg.workers)
    return {**summary, "skipped": prompts.skipped, "prompts_file": str(prompts_file)}
