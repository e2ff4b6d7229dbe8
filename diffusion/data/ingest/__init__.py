"""Ingest: any source of image-caption pairs -> WebDataset shards + parquet index + stats JSON.

How a run goes:

1. The source plans work units in a fixed order (``sources.plan``); each unit is a few thousand
   input items and writes one shard per split (``<split>/shard-<unit>-<part>.tar``).
2. Workers process units in parallel (``process_unit``): read, fetch, decode safely, filter,
   resize, encode, clean the caption, key and split each item. Rejected items become counts by
   reason, never samples. ``submit`` chooses the workers: a Prefect task runner in the flow
   (threads or processes; Dask or Ray on a cluster), a thread or process pool otherwise.
3. One committer takes finished units strictly in plan order, drops exact duplicates of earlier
   samples (so the result does not depend on which worker finished first), writes the shards
   atomically, then a per-unit record. A rerun (incremental mode) keeps the longest prefix of
   units whose records and shards match the plan and settings, and redoes only the rest; a rerun
   with nothing changed writes nothing at all.

Output layout (``out_dir``)::

    train/shard-000000-00.tar ...   val/shard-000000-00.tar ...
    index-train.parquet  index-val.parquet      every accepted sample: key, shard, caption, meta
    stats.json                                  accepted / rejected by reason, per unit and total
    _units/000000.json  _index/000000.parquet   per-unit records (what makes reruns incremental)
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import json
import os
import threading
import time
from concurrent.futures import Executor, ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import pyarrow as pa
import pyarrow.parquet as pq
from tqdm.auto import tqdm

from diffusion.artifacts import DUPLICATES, SPLITS, STATS, index_file
from diffusion.config import DatasetConfig, IngestConfig
from diffusion.data.buckets import bucket_set
from diffusion.data.ingest.core import REASONS, ProcessedImage, Rejected
from diffusion.data.ingest.decode import clean_caption, content_hash, process_image
from diffusion.data.ingest.sources import RawItem, SourceSpec, Unit, plan, read
from diffusion.data.shards import ShardWriter, caption_id, encode_image


INDEX_SCHEMA = pa.schema([("key", pa.string()), ("split", pa.string()), ("shard", pa.string()),
                          ("caption", pa.string()), ("caption_id", pa.string()), ("sha256", pa.string()),
                          ("meta", pa.string())])
# ingest.dedupe's drops: the dropped sample (its key, where it came from) and the key of the kept
# sample with the same pixels (an earlier one in input order)
DUPLICATES_SCHEMA = pa.schema([("key", pa.string()), ("source_id", pa.string()), ("kept_key", pa.string())])


@dataclass
class Sample:
    key: str
    split: str
    ext: str
    image: bytes
    caption: str
    meta: dict


@dataclass
class UnitResult:
    index: int
    items: int
    samples: list[Sample]
    rejected: dict[str, int]
    captions_replaced: int = 0


# --------------------------------------------------------------------------------------------
# Per item


def stable_key(source_id: str) -> str:
    """A sample's key: a hash of where it came from, so reruns and resumes give the same keys."""
    return hashlib.sha1(source_id.encode("utf-8")).hexdigest()[:20]


def split_of(key: str, val_fraction: float) -> str:
    """Deterministic train/val assignment by key hash: the same sample always lands in the same split."""
    return "val" if int(key[:8], 16) / 0x1_0000_0000 < val_fraction else "train"


def _rendered(item: RawItem, cfg: IngestConfig) -> ProcessedImage:
    """The built-in set hands over images already drawn at their final size."""
    img = item.rendered
    data = encode_image(img, cfg.image_format, cfg.quality)
    return ProcessedImage(data, cfg.image_format, img.width, img.height, img.width, img.height, content_hash(img),
                          {"alpha_flattened": item.alpha_flattened})


def process_item(item: RawItem, cfg: IngestConfig, fetched: bytes | Rejected | None = None) -> tuple[Sample, bool]:
    """One raw item -> (sample, caption_replaced); raises Rejected."""
    if item.reject:
        raise Rejected(item.reject, item.source_id)
    caption, replaced = clean_caption(item.caption, cfg)
    if item.rendered is not None:
        img = _rendered(item, cfg)
    else:
        data = fetched if item.url is not None else item.image
        if isinstance(data, Rejected):
            raise data
        img = process_image(data, cfg)
    key = stable_key(item.source_id)
    split = item.split or split_of(key, cfg.val_fraction)
    meta = {
        "source_id": item.source_id,
        **item.meta,
        "original_width": img.original_width,
        "original_height": img.original_height,
        "width": img.width,
        "height": img.height,
        "sha256": img.content_hash,
        "caption_id": caption_id(caption),
    }
    if replaced:
        meta["caption_replaced"] = True
    if img.notes.get("alpha_flattened"):  # see-through pixels now show ingest.background
        meta["alpha_flattened"] = True
    return Sample(key, split, img.ext, img.data, caption, meta), replaced


def process_unit(spec: SourceSpec, unit: Unit) -> UnitResult:
    """Read, fetch and process every item of a unit (runs in a worker thread or process).

    Local items are processed as they are read. Each URL item is downloaded *and* processed in its
    own slot of a ``download.concurrency``-wide pool, so a slow or dead URL holds one slot, not a
    batch, and raw downloads are dropped as soon as they are encoded. Results keep input order.
    """
    cfg = spec.ingest
    outcomes: list = []  # per item, in input order: (Sample, replaced) | Rejected | Future of either
    slots = threading.BoundedSemaphore(cfg.download.concurrency)
    pool = None
    try:
        for item in read(spec, unit):
            if item.url is None or item.reject:
                outcomes.append(_outcome(item, cfg))
                continue
            if pool is None:
                pool = ThreadPoolExecutor(cfg.download.concurrency, thread_name_prefix="fetch")
            slots.acquire()  # bounds the raw downloads held at once, whatever the unit size
            fut = pool.submit(_fetch_and_process, item, cfg)
            fut.add_done_callback(lambda _: slots.release())
            outcomes.append(fut)
    finally:
        if pool is not None:
            pool.shutdown(wait=True)
    rejected: collections.Counter = collections.Counter()
    samples: list[Sample] = []
    replaced = 0
    for o in outcomes:
        o = o.result() if hasattr(o, "result") else o
        if isinstance(o, Rejected):
            rejected[o.reason] += 1
        else:
            samples.append(o[0])
            replaced += o[1]
    return UnitResult(unit.index, len(outcomes), samples, dict(rejected), replaced)


def _outcome(item: RawItem, cfg: IngestConfig, fetched: bytes | Rejected | None = None):
    try:
        return process_item(item, cfg, fetched)
    except Rejected as r:
        return r


def _fetch_and_process(item: RawItem, cfg: IngestConfig):
    try:
        fetched: bytes | Rejected = downloader_for(cfg.download).fetch(item.url)
    except Rejected as r:
        fetched = r
    return _outcome(item, cfg, fetched)


_DOWNLOADERS: dict[str, object] = {}
_DOWNLOADERS_LOCK = threading.Lock()


def downloader_for(cfg):
    """One pooled HTTP client per process and settings, reused across units (keep-alive)."""
    from diffusion.data.ingest.download import Downloader

    key = repr(cfg)
    with _DOWNLOADERS_LOCK:
        if key not in _DOWNLOADERS:
            _DOWNLOADERS[key] = Downloader(cfg).__enter__()
        return _DOWNLOADERS[key]


# --------------------------------------------------------------------------------------------
# Committing, in plan order


def settings_fingerprint(spec: SourceSpec) -> str:
    """Everything that changes what a unit's output is (not how fast it is made)."""
    cfg = dataclasses.asdict(spec.ingest)
    for k in ("workers", "task_runner", "dask_address"):
        cfg.pop(k)
    cfg["download"].pop("concurrency")
    if cfg["resize_mode"] != "bucket":  # unused then: outputs ingested before these keys existed stay current
        cfg.pop("buckets")
        cfg.pop("bucket_step")
    extra = dataclasses.asdict(spec.dataset) if spec.kind == "builtin" and spec.dataset else None
    # version 2: unit records list their dropped duplicates, samples record alpha_flattened
    return json.dumps({"kind": spec.kind, "ingest": cfg, "dataset": extra, "version": 2}, sort_keys=True)


def _write_if_changed(path: Path, data: bytes) -> bool:
    if path.is_file() and path.read_bytes() == data:
        return False
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)
    return True


def _dedupe_key(sha256_hex: str) -> bytes:
    """What the dedupe set holds per sample: the first 8 bytes of its content hash. Resume and
    commit must agree on it, or a resumed run would let duplicates through."""
    return bytes.fromhex(sha256_hex[:16])


class Committer:
    """Writes finished units in plan order; owns dedupe state, shards, per-unit records."""

    def __init__(self, out_dir: Path, spec: SourceSpec, units: list[Unit]):
        self.out = out_dir
        self.cfg = spec.ingest
        self.units = units
        self.settings = settings_fingerprint(spec)
        self.seen: dict[bytes, str] = {}  # 8-byte prefixes of content hashes committed so far -> their key
        (out_dir / "_units").mkdir(parents=True, exist_ok=True)
        (out_dir / "_index").mkdir(parents=True, exist_ok=True)

    def _record_path(self, index: int) -> Path:
        return self.out / "_units" / f"{index:06d}.json"

    def _fragment_path(self, index: int) -> Path:
        return self.out / "_index" / f"{index:06d}.parquet"

    def resume(self) -> int:
        """Number of leading units already committed with matching inputs and settings. Their
        content hashes are reloaded for dedupe; everything from later units is deleted."""
        done = 0
        for unit in self.units:
            rec_path = self._record_path(unit.index)
            if not rec_path.is_file():
                break
            rec = json.loads(rec_path.read_text())
            shards_ok = all((self.out / s["shard"]).is_file() for s in rec["shards"])
            if rec["fingerprint"] != unit.fingerprint(self.settings) or not shards_ok \
                    or not self._fragment_path(unit.index).is_file():
                break
            kept = pq.read_table(self._fragment_path(unit.index), columns=["sha256", "key"]).to_pydict()
            for h, key in zip(kept["sha256"], kept["key"]):
                self.seen.setdefault(_dedupe_key(h), key)
            done += 1
        self._clear_from(done)
        return done

    def _clear_from(self, first: int) -> None:
        """Remove every output of units >= first (and temp files of interrupted writes)."""
        for split in SPLITS:
            d = self.out / split
            if not d.is_dir():
                continue
            for p in d.iterdir():
                name = p.name
                if name.endswith(".tmp"):
                    p.unlink()
                elif name.startswith("shard-") and name.endswith(".tar"):
                    try:
                        unit = int(name.split("-")[1])
                    except (IndexError, ValueError):
                        continue
                    if unit >= first:
                        p.unlink()
        for sub in ("_units", "_index"):
            for p in (self.out / sub).iterdir():
                stem = p.name.split(".")[0]
                if not stem.isdigit() or int(stem) >= first or p.name.endswith(".tmp"):
                    p.unlink()

    def commit(self, result: UnitResult, unit: Unit) -> dict:
        rejected = collections.Counter(result.rejected)
        writers = {s: ShardWriter(self.out / s, f"shard-{result.index:06d}", self.cfg.samples_per_shard,
                                  self.cfg.max_shard_bytes) for s in SPLITS}
        rows, duplicates = [], []
        try:
            for s in result.samples:
                if self.cfg.dedupe:
                    h = _dedupe_key(s.meta["sha256"])
                    if h in self.seen:
                        rejected["duplicate"] += 1
                        duplicates.append({"key": s.key, "source_id": s.meta["source_id"], "kept_key": self.seen[h]})
                        continue
                    self.seen[h] = s.key
                shard = writers[s.split].write(s.key, s.ext, s.image, s.caption, s.meta)
                rows.append({"key": s.key, "split": s.split, "shard": f"{s.split}/{shard}", "caption": s.caption,
                             "caption_id": s.meta["caption_id"], "sha256": s.meta["sha256"],
                             "meta": json.dumps(s.meta, sort_keys=True)})
            shards = [{"shard": f"{split}/{p['name']}", "samples": p["samples"], "bytes": p["bytes"]}
                      for split, w in writers.items() for p in w.close()]
        except BaseException:
            for w in writers.values():
                w.abort()
            raise
        frag = self._fragment_path(result.index)
        tmp = frag.with_name(f".{frag.name}.tmp")
        pq.write_table(pa.Table.from_pylist(rows, schema=INDEX_SCHEMA), tmp)
        os.replace(tmp, frag)
        accepted = collections.Counter(r["split"] for r in rows)
        record = {"unit": result.index, "fingerprint": unit.fingerprint(self.settings), "items": result.items,
                  "accepted": {s: accepted.get(s, 0) for s in SPLITS},
                  "rejected": {k: rejected[k] for k in REASONS if rejected.get(k)},
                  "captions_replaced": result.captions_replaced, "shards": shards, "duplicates": duplicates}
        if self.cfg.resize_mode == "bucket":  # samples per split and bucket ("<width>x<height>")
            record["buckets"] = _bucket_counts(rows)
        _write_if_changed(self._record_path(result.index), json.dumps(record, indent=1).encode())  # last: commits
        return record

    def finalize(self, source: str, extra: dict) -> dict:
        """Merge unit records and index fragments; files are rewritten only if their content changed."""
        records = [json.loads(self._record_path(u.index).read_text()) for u in self.units]
        rejected: collections.Counter = collections.Counter()
        for r in records:
            rejected.update(r["rejected"])
        splits = {s: {"accepted": sum(r["accepted"][s] for r in records),
                      "shards": sum(1 for r in records for sh in r["shards"] if sh["shard"].startswith(s + "/"))}
                  for s in SPLITS}
        stats = {
            "source": source,
            **extra,
            "items": sum(r["items"] for r in records),
            "accepted": sum(v["accepted"] for v in splits.values()),
            "rejected_total": sum(rejected.values()),
            "rejected": {k: rejected[k] for k in REASONS if rejected.get(k)},
            "captions_replaced": sum(r["captions_replaced"] for r in records),
            "splits": splits,
            "units": [{k: r[k] for k in ("unit", "items", "accepted", "rejected", "shards")} for r in records],
        }
        if extra.get("resize_mode") == "bucket":  # not the built-in set, drawn square
            stats["buckets"] = [list(b) for b in bucket_set(self.cfg)]
            stats["bucket_counts"] = {s: dict(sorted(sum((collections.Counter(r.get("buckets", {}).get(s, {}))
                                                          for r in records), collections.Counter()).items()))
                                      for s in SPLITS}
        for split in SPLITS:
            self._merge_index(split)
        self._write_duplicates([d for r in records for d in r["duplicates"]])
        _write_if_changed(self.out / STATS, (json.dumps(stats, indent=2) + "\n").encode())
        return stats

    def _write_duplicates(self, rows: list[dict]) -> None:
        """duplicates.parquet (``DUPLICATES_SCHEMA``), in input order; written if changed, and
        only where ingest.dedupe is on."""
        path = self.out / DUPLICATES
        if not self.cfg.dedupe:
            path.unlink(missing_ok=True)
            return
        table = pa.Table.from_pylist(rows, schema=DUPLICATES_SCHEMA)
        if not (path.is_file() and pq.read_table(path).equals(table)):
            tmp = path.with_name(f".{path.name}.tmp")
            pq.write_table(table, tmp)
            os.replace(tmp, path)

    def _merge_index(self, split: str) -> None:
        """index-<split>.parquet from the unit fragments, streamed (flat memory), written if changed."""
        path = index_file(self.out, split)
        tmp = path.with_name(f".{path.name}.tmp")
        with pq.ParquetWriter(tmp, INDEX_SCHEMA) as w:
            for u in self.units:
                t = pq.read_table(self._fragment_path(u.index))
                w.write_table(t.filter(pa.compute.equal(t["split"], split)))
        if path.is_file() and pq.read_table(path).equals(pq.read_table(tmp)):
            tmp.unlink()
        else:
            os.replace(tmp, path)


def _bucket_counts(rows: list[dict]) -> dict[str, dict[str, int]]:
    """Index rows -> {split: {"<width>x<height>": samples}}, from each row's meta."""
    counts: dict[str, collections.Counter] = {s: collections.Counter() for s in SPLITS}
    for r in rows:
        meta = json.loads(r["meta"])
        counts[r["split"]][f"{meta['width']}x{meta['height']}"] += 1
    return {s: dict(c) for s, c in counts.items()}


# --------------------------------------------------------------------------------------------
# The run

Submit = Callable[[SourceSpec, Unit], Any]  # returns a future with .result()


def default_executor(cfg: IngestConfig) -> Executor:
    if cfg.task_runner == "processes":
        return ProcessPoolExecutor(max_workers=cfg.workers)
    return ThreadPoolExecutor(max_workers=cfg.workers)


def make_spec(ingest: IngestConfig, dataset: DatasetConfig | None, out_dir: str | Path) -> SourceSpec:
    return SourceSpec(ingest.source, ingest, dataset if ingest.source == "builtin" else None,
                      str(Path(out_dir) / "_work"))


def run_ingest(spec: SourceSpec, out_dir: str | Path, submit: Submit | None = None, progress: bool = True) -> dict:
    """Ingest ``spec`` into ``out_dir`` (incrementally). Returns the stats written to stats.json."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    units = plan(spec)
    committer = Committer(out, spec, units)
    start = committer.resume()
    executor = None
    if submit is None:
        executor = default_executor(spec.ingest)
        submit = lambda s, u: executor.submit(process_unit, s, u)  # noqa: E731
    window = max(2, 2 * spec.ingest.workers)  # units in flight: bounds memory whatever the dataset size
    bar = tqdm(total=len(units), initial=start, desc=f"ingest {spec.kind}", unit="unit", disable=not progress)
    totals: collections.Counter = collections.Counter()
    t0 = time.perf_counter()
    try:
        pending: collections.deque = collections.deque()
        todo = iter(units[start:])
        for unit in todo:
            pending.append((unit, submit(spec, unit)))
            if len(pending) >= window:
                break
        while pending:
            unit, fut = pending.popleft()
            rec = committer.commit(fut.result(), unit)
            nxt = next(todo, None)
            if nxt is not None:
                pending.append((nxt, submit(spec, nxt)))
            totals["accepted"] += sum(rec["accepted"].values())
            totals["rejected"] += sum(rec["rejected"].values())
            totals.update({f"r:{k}": v for k, v in rec["rejected"].items()})
            rate = (totals["accepted"] + totals["rejected"]) / max(1e-9, time.perf_counter() - t0)
            top = sorted(((v, k[2:]) for k, v in totals.items() if k.startswith("r:")), reverse=True)[:3]
            bar.set_postfix_str(f"{rate:.0f} samples/s, accepted {totals['accepted']}, rejected {totals['rejected']}"
                                + (f" ({', '.join(f'{k} {v}' for v, k in top)})" if top else ""))
            bar.update(1)
    finally:
        bar.close()
        if executor is not None:
            executor.shutdown(cancel_futures=True)
    extra = {"image_format": spec.ingest.image_format,
             "image_size": spec.dataset.image_size if spec.kind == "builtin" else spec.ingest.image_size,
             "resize_mode": "none" if spec.kind == "builtin" else spec.ingest.resize_mode}
    return committer.finalize(spec.kind, extra)


def ingest(ingest_cfg: IngestConfig, dataset: DatasetConfig | None, out_dir: str | Path,
           submit: Submit | None = None, progress: bool = True) -> dict:
    """The ingest stage: ``params.ingest`` (and ``params.dataset`` for the built-in set) -> shards."""
    return run_ingest(make_spec(ingest_cfg, dataset, out_dir), out_dir, submit, progress)
