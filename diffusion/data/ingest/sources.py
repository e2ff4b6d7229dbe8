"""Where samples come from. Every source plans deterministic work units and reads them back.

A source is described by a small picklable ``SourceSpec`` (so a worker process can rebuild it);
``plan()`` runs once in the coordinating process and lists ``Unit``s in a fixed order, each holding
JSON-able item references (paths with sizes and mtimes, row ranges, shard URLs) that also serve as
its fingerprint; ``read(unit)`` runs in a worker and yields ``RawItem``s: undecoded bytes, a URL to
fetch, or a reason the item is already rejected.

Sources: ``builtin`` (the shapes generator), ``folder`` (images with .txt/.json sidecars, any
depth), ``table`` (parquet/CSV/JSONL with image bytes, paths or URLs), ``webdataset`` (existing
shards, img2dataset output included; local paths, globs, brace patterns or fsspec URLs) and
``urls`` (a parquet/CSV/JSONL list of URLs and captions) and ``openmoji`` (the OpenMoji npm
package's SVGs, rendered: the project's real reference set, diffusion.data.openmoji).
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import posixpath
import tarfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import pyarrow as pa
import pyarrow.parquet as pq

from diffusion.config import DatasetConfig, IngestConfig
from diffusion.errors import MissingInputError, T2IError

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
TAR_IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")


@dataclass(frozen=True)
class Unit:
    index: int
    items: tuple  # JSON-able references; with the processing settings, the unit's fingerprint

    def fingerprint(self, settings: str) -> str:
        blob = json.dumps([self.index, list(self.items), settings], sort_keys=True, default=str)
        return hashlib.sha256(blob.encode()).hexdigest()[:24]


@dataclass
class RawItem:
    source_id: str  # stable identity of the item (relative path, URL, file:row, shard:key)
    image: bytes | None = None  # undecoded image bytes
    url: str | None = None  # or a URL to download them from
    caption: bytes | str | None = None
    meta: dict = field(default_factory=dict)  # source-specific metadata kept in the sample's .json
    split: str | None = None  # forced split (the built-in set); else by key hash
    reject: str | None = None  # already rejected while reading (read_error, unsafe_member, ...)
    rendered: Any = None  # a ready PIL image at the output size (the built-in set, OpenMoji)
    alpha_flattened: bool = False  # rendered: see-through pixels were drawn over ingest.background


@dataclass(frozen=True)
class SourceSpec:
    kind: str
    ingest: IngestConfig
    dataset: DatasetConfig | None = None  # builtin only
    work_dir: str | None = None  # scratch space for converted tables


def _stat(path: Path) -> list:
    st = path.stat()
    return [st.st_size, st.st_mtime_ns]


def _chunks(n: int, size: int) -> list[tuple[int, int]]:
    return [(a, min(a + size, n)) for a in range(0, n, size)]


# --------------------------------------------------------------------------------------------
# builtin


def _plan_builtin(spec: SourceSpec) -> list[Unit]:
    d = spec.dataset
    units = []
    for split, n in (("train", d.n_train), ("val", d.n_val)):
        for a, b in _chunks(n, spec.ingest.samples_per_shard):
            units.append(Unit(len(units), (split, a, b)))
    return units


def _read_builtin(spec: SourceSpec, unit: Unit) -> Iterator[RawItem]:
    from diffusion.data.shapes import make_sample

    split, a, b = unit.items
    for i in range(a, b):
        s = make_sample(spec.dataset, split, i)
        yield RawItem(f"builtin/{split}/{i}", caption=s.caption, meta=s.meta, split=split, rendered=s.image)


# --------------------------------------------------------------------------------------------
# folder: x.jpg + x.txt (or x.json with a caption field), any depth


def _root(spec: SourceSpec) -> Path:
    if not spec.ingest.path:
        raise T2IError(f"ingest.path must name the input for source {spec.kind}")
    return Path(spec.ingest.path).expanduser()


def _plan_folder(spec: SourceSpec) -> list[Unit]:
    root = _root(spec)
    if not root.is_dir():
        raise MissingInputError(f"ingest.path: folder not found: {root}")
    stems: dict[str, dict[str, str]] = {}
    for dirpath, dirnames, filenames in os.walk(root):  # does not follow directory symlinks
        dirnames.sort()
        rel_dir = Path(dirpath).relative_to(root)
        for name in sorted(filenames):
            stem, ext = os.path.splitext(name)
            ext = ext.lower()
            kind = "image" if ext in IMAGE_EXTS else {".txt": "txt", ".json": "json"}.get(ext)
            if kind:
                stems.setdefault((rel_dir / stem).as_posix(), {})[kind] = (rel_dir / name).as_posix()
    items = []
    for stem in sorted(stems):
        files = stems[stem]
        if "image" not in files and "txt" not in files:
            continue  # a lone .json is metadata of something else, not an orphaned caption
        ref = {k: [v, *_stat(root / v)] for k, v in files.items()}
        items.append(ref)
    if not items:
        raise MissingInputError(f"ingest.path: no images ({', '.join(IMAGE_EXTS)}) under {root}")
    size = spec.ingest.samples_per_shard
    return [Unit(i, tuple(items[a:b])) for i, (a, b) in enumerate(_chunks(len(items), size))]


def _read_folder(spec: SourceSpec, unit: Unit) -> Iterator[RawItem]:
    root = _root(spec)
    field_name = spec.ingest.caption_column
    for ref in unit.items:
        rel = (ref.get("image") or ref.get("txt"))[0]
        item = RawItem(source_id=rel, meta={"path": rel})
        try:
            if "image" not in ref:
                item.reject = "missing_image"
                yield item
                continue
            item.image = (root / ref["image"][0]).read_bytes()
            if "txt" in ref:
                item.caption = (root / ref["txt"][0]).read_bytes()
            elif "json" in ref:
                side = json.loads((root / ref["json"][0]).read_bytes())
                item.caption = side.get(field_name) if isinstance(side, dict) else None
                if isinstance(side, dict):
                    item.meta["sidecar"] = {k: v for k, v in side.items() if k != field_name}
        except (OSError, ValueError) as e:
            item.reject, item.meta["error"] = "read_error", type(e).__name__
        yield item


# --------------------------------------------------------------------------------------------
# table and urls: parquet / CSV / JSONL


def _table_files(spec: SourceSpec) -> list[Path]:
    raw = spec.ingest.path
    if not raw:
        raise T2IError(f"ingest.path must name the input for source {spec.kind}")
    files = sorted(Path(p) for p in glob.glob(os.path.expanduser(raw))) or [Path(raw).expanduser()]
    for f in files:
        if not f.is_file():
            raise MissingInputError(f"ingest.path: table not found: {f}")
    return files


READ_BATCH = 256  # table rows decoded at a time while a unit is read: bounds raw image bytes in memory


def _table_batches(path: Path) -> Iterator[pa.RecordBatch]:
    """Stream any supported table as record batches (never the whole file in memory)."""
    import pyarrow.csv as pacsv
    import pyarrow.json as pajson

    suffix = path.suffix.lower()
    if suffix == ".parquet":
        yield from pq.ParquetFile(path).iter_batches(batch_size=4096)
    elif suffix in (".csv", ".tsv"):
        opts = pacsv.ParseOptions(delimiter="\t" if suffix == ".tsv" else ",", newlines_in_values=True)
        yield from pacsv.open_csv(path, parse_options=opts,
                                  convert_options=pacsv.ConvertOptions(strings_can_be_null=False))
    elif suffix in (".jsonl", ".json", ".ndjson"):
        yield from pajson.open_json(path)
    else:
        raise T2IError(f"ingest.path: unsupported table type {path.suffix} (parquet, csv, tsv, jsonl)")


def _as_parquet(path: Path, work_dir: Path, rows_per_group: int) -> Path:
    """A parquet file whose row groups hold ``rows_per_group`` rows, so that a unit reads only
    its own rows. CSV/TSV/JSONL tables are converted, and parquet files with much larger row
    groups rewritten, once, streaming, into the work dir; other parquet files are used as they are."""
    if path.suffix.lower() == ".parquet":
        meta = pq.ParquetFile(path).metadata
        if all(meta.row_group(g).num_rows <= 4 * rows_per_group for g in range(meta.num_row_groups)):
            return path
    key = hashlib.sha1(json.dumps([str(path.resolve()), *_stat(path), rows_per_group]).encode()).hexdigest()[:16]
    out = work_dir / f"table-{key}.parquet"
    if out.is_file():
        return out
    work_dir.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    writer, pending, n_pending = None, [], 0
    try:
        for batch in _table_batches(path):
            if writer is None:
                writer = pq.ParquetWriter(tmp, batch.schema)
            pending.append(batch)
            n_pending += batch.num_rows
            while n_pending >= rows_per_group:  # write exactly rows_per_group rows per group
                table = pa.Table.from_batches(pending)
                writer.write_table(table.slice(0, rows_per_group), row_group_size=rows_per_group)
                rest = table.slice(rows_per_group)
                pending, n_pending = rest.to_batches(), rest.num_rows
        if writer is None:
            raise T2IError(f"ingest.path: table {path} is empty")
        if n_pending:
            writer.write_table(pa.Table.from_batches(pending), row_group_size=rows_per_group)
    except pa.ArrowInvalid as e:
        raise T2IError(f"ingest.path: cannot read table {path}: {str(e).splitlines()[0]}") from None
    finally:
        if writer is not None:
            writer.close()
    os.replace(tmp, out)
    return out


def _plan_table(spec: SourceSpec) -> list[Unit]:
    """Units follow row groups: (table, parquet, group, group's first row, rows a..b of the group)."""
    cfg = spec.ingest
    work = Path(spec.work_dir or ".")
    column = cfg.url_column if spec.kind == "urls" else cfg.image_column
    units: list[Unit] = []
    for f in _table_files(spec):
        pf = _as_parquet(f, work, cfg.samples_per_shard)
        names = pq.read_schema(pf).names
        for col in (column, cfg.caption_column):
            if col not in names:
                raise T2IError(f"ingest: column {col!r} not in {f} (columns: {', '.join(names)})")
        meta = pq.ParquetFile(pf).metadata
        first_row = 0
        for g in range(meta.num_row_groups):
            n = meta.row_group(g).num_rows
            for a, b in _chunks(n, cfg.samples_per_shard):
                units.append(Unit(len(units), (str(f), str(pf), g, first_row, a, b, *_stat(f))))
            first_row += n
    return units


def _unit_rows(path: str, group: int, start: int, stop: int, columns: list[str]) -> Iterator[dict]:
    """Rows start..stop of one row group, READ_BATCH at a time."""
    seen = 0
    for batch in pq.ParquetFile(path).iter_batches(batch_size=READ_BATCH, row_groups=[group], columns=columns):
        lo, hi = max(start - seen, 0), min(stop - seen, batch.num_rows)
        if lo < hi:
            yield from batch.slice(lo, hi - lo).to_pylist()
        seen += batch.num_rows
        if seen >= stop:
            return


def _read_table(spec: SourceSpec, unit: Unit) -> Iterator[RawItem]:
    cfg = spec.ingest
    original, pf, group, first_row, a, b = unit.items[:6]
    column = cfg.url_column if spec.kind == "urls" else cfg.image_column
    base = Path(original).parent
    for i, row in enumerate(_unit_rows(pf, group, a, b, [column, cfg.caption_column]), start=first_row + a):
        value = row[column]
        item = RawItem(source_id=f"{Path(original).name}:{i}", caption=row[cfg.caption_column],
                       meta={"table": Path(original).name, "row": i})
        if isinstance(value, dict):  # Hugging Face image struct {bytes, path}
            value = value.get("bytes") or value.get("path")
        if value is None or value == "":
            item.reject = "missing_image"
        elif isinstance(value, (bytes, bytearray)):
            item.image = bytes(value)
        elif isinstance(value, str) and value.split("://", 1)[0].lower() in ("http", "https"):
            item.url, item.source_id = value, value
            item.meta["url"] = value
        elif spec.kind == "urls":
            item.url, item.meta["url"] = str(value), str(value)  # malformed: the downloader says so
        else:
            p = Path(str(value)).expanduser()
            p = p if p.is_absolute() else base / p
            item.meta["path"] = str(value)
            try:
                item.image = p.read_bytes()
            except OSError as e:
                item.reject, item.meta["error"] = "read_error", type(e).__name__
        yield item


# --------------------------------------------------------------------------------------------
# webdataset shards (img2dataset output included)


def _expand_urls(raw: str) -> list[str]:
    import braceexpand

    urls: list[str] = []
    for part in raw.split("::"):
        for u in braceexpand.braceexpand(part):
            if "://" in u or u.startswith("pipe:"):
                urls.append(u)
            else:
                matches = sorted(glob.glob(os.path.expanduser(u)))
                urls.extend(matches if any(ch in u for ch in "*?[") else [os.path.expanduser(u)])
    return urls


def _plan_webdataset(spec: SourceSpec) -> list[Unit]:
    if not spec.ingest.path:
        raise T2IError("ingest.path must name the input shards for source webdataset")
    urls = _expand_urls(spec.ingest.path)
    if not urls:
        raise MissingInputError(f"ingest.path: no shards match {spec.ingest.path}")
    units = []
    for i, u in enumerate(urls):
        local = Path(u)
        if "://" not in u and not u.startswith("pipe:"):
            if not local.is_file():
                raise MissingInputError(f"ingest.path: shard not found: {u}")
            units.append(Unit(i, (u, *_stat(local))))
        else:
            units.append(Unit(i, (u,)))
    return units


def _open_stream(url: str):
    if url.startswith("pipe:"):
        import webdataset as wds

        return wds.gopen(url, "rb")
    if "://" in url:
        import fsspec

        return fsspec.open(url, "rb").open()
    return open(url, "rb")


def _unsafe_name(name: str) -> bool:
    """Absolute names and any ``..`` component: what a careless extractor would write outside."""
    return name.startswith("/") or ".." in name.replace("\\", "/").split("/")


def _tar_groups(url: str) -> Iterator[tuple[str, dict[str, bytes] | None, str | None]]:
    """(key, {ext: bytes}, None) per sample, or (name, None, reason) for a member we refuse."""
    with _open_stream(url) as stream:
        tar = tarfile.open(fileobj=stream, mode="r|*")
        key, group = None, {}
        for m in tar:
            if m.isdir():
                continue
            if not m.isreg() or _unsafe_name(m.name):
                yield m.name, None, "unsafe_member"  # links, devices, absolute or ../ names
                continue
            base = posixpath.basename(m.name)
            if "." not in base:
                continue
            prefix = posixpath.dirname(m.name)
            stem, ext = base.split(".", 1)
            k = posixpath.join(prefix, stem) if prefix else stem
            if k != key:
                if key is not None:
                    yield key, group, None
                key, group = k, {}
            f = tar.extractfile(m)
            group[ext.lower()] = f.read() if f else b""
        if key is not None:
            yield key, group, None


def _read_webdataset(spec: SourceSpec, unit: Unit) -> Iterator[RawItem]:
    url = unit.items[0]
    shard = posixpath.basename(url)
    field_name = spec.ingest.caption_column
    try:
        for key, group, reason in _tar_groups(url):
            item = RawItem(source_id=f"{shard}/{key}", meta={"shard": shard, "source_key": key})
            if reason:
                item.reject = reason
                yield item
                continue
            ext = next((e for e in TAR_IMAGE_EXTS if e in group), None)
            side = {}
            if "json" in group:
                try:
                    side = json.loads(group["json"])
                except ValueError:
                    side = {}
            if isinstance(side, dict):
                item.meta["source_meta"] = {k: v for k, v in side.items() if k != field_name and not isinstance(v, (dict, list))}
            if ext is None:
                item.reject = "missing_image"
            else:
                item.image = group[ext]
                item.caption = group.get("txt")
                if item.caption is None and isinstance(side, dict):
                    item.caption = side.get(field_name)
            yield item
    except (OSError, tarfile.TarError, EOFError) as e:  # a truncated or unreadable shard
        yield RawItem(source_id=f"{shard}/<read>", reject="read_error", meta={"shard": shard, "error": type(e).__name__})


# --------------------------------------------------------------------------------------------
# openmoji: the npm package's colour SVGs, rendered (diffusion.data.openmoji)


def _plan_openmoji(spec: SourceSpec) -> list[Unit]:
    """Units of emoji in the package's order: (package folder, *records). A record holds the SVG's
    content hash, caption and split, so a changed SVG or caption redoes its unit."""
    from diffusion.data import openmoji

    openmoji.check_renderer()
    cfg = spec.ingest
    root = openmoji.package_root(cfg.path, cfg.openmoji)
    entries = openmoji.load_entries(root, cfg.openmoji, cfg.val_fraction)
    if not entries:
        raise MissingInputError(f"ingest.path: no emoji in {root / openmoji.METADATA}")
    version = openmoji.package_version(root)
    for e in entries:
        e["meta"]["package_version"] = version
    return [Unit(i, (str(root), *entries[a:b])) for i, (a, b) in enumerate(_chunks(len(entries), cfg.samples_per_shard))]


def _read_openmoji(spec: SourceSpec, unit: Unit) -> Iterator[RawItem]:
    """Each emoji rendered at ingest.image_size over ingest.background, with its forced split: the
    held-out annotations decide val for this source, not the key hash."""
    from diffusion.data import openmoji

    cfg = spec.ingest
    root = Path(unit.items[0])
    for e in unit.items[1:]:
        meta = {"source": "openmoji", "license": openmoji.LICENSE, "attribution": openmoji.ATTRIBUTION,
                "svg": e["svg"], **e["meta"]}
        item = RawItem(f"openmoji/{e['hexcode']}", caption=e["caption"], meta=meta, split=e["split"])
        try:
            item.rendered, item.alpha_flattened = openmoji.render((root / e["svg"]).read_bytes(), cfg.image_size,
                                                                  cfg.openmoji.supersample, cfg.background)
        except FileNotFoundError:
            item.reject = "missing_image"
        except OSError as err:
            item.reject, item.meta["error"] = "read_error", type(err).__name__
        except ValueError as err:
            item.reject, item.meta["error"] = "decode_error", str(err)[:200]
        yield item


# --------------------------------------------------------------------------------------------

PLANNERS = {"builtin": _plan_builtin, "folder": _plan_folder, "table": _plan_table, "urls": _plan_table,
            "webdataset": _plan_webdataset, "openmoji": _plan_openmoji}
READERS = {"builtin": _read_builtin, "folder": _read_folder, "table": _read_table, "urls": _read_table,
           "webdataset": _read_webdataset, "openmoji": _read_openmoji}


def plan(spec: SourceSpec) -> list[Unit]:
    return PLANNERS[spec.kind](spec)


def read(spec: SourceSpec, unit: Unit) -> Iterator[RawItem]:
    return READERS[spec.kind](spec, unit)
