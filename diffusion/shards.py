"""WebDataset shards: the one on-disk format every source is ingested into.

A sample is one key with three members:
    <key>.png|jpg|webp   the image (RGB)
    <key>.txt            the caption, UTF-8
    <key>.json           metadata: source, original size, content hash, caption id, attributes

``ShardSink`` writes ``<split>/shard-000000.tar, ...`` through ``webdataset.TarWriter``. Each shard is
written under a temporary name and renamed when complete, so a killed run never leaves a
truncated shard that looks finished. Reading goes through ``webdataset`` too (``iter_samples``).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import webdataset as wds
from PIL import Image

IMAGE_EXTS = ("png", "jpg", "jpeg", "webp")
SHARD_GLOB = "shard-*.tar"


def caption_id(caption: str) -> str:
    """Stable id of a caption string (joins samples to their embeddings)."""
    return hashlib.sha1(caption.encode("utf-8")).hexdigest()[:16]


def encode_image(image: Image.Image, fmt: str, quality: int = 95) -> bytes:
    buf = io.BytesIO()
    if fmt == "png":
        image.save(buf, format="PNG", compress_level=6)
    elif fmt in ("jpg", "jpeg"):
        image.save(buf, format="JPEG", quality=quality)
    elif fmt == "webp":
        image.save(buf, format="WEBP", quality=quality)
    else:
        raise ValueError(f"unknown image format {fmt!r}")
    return buf.getvalue()


class ShardSink:
    """Writes samples of one split into size-bounded tar shards, atomically, and indexes them.

    Use as a context manager; ``close()`` finishes the last shard and writes
    ``index-<split>.parquet`` next to the split's directory.
    """

    def __init__(self, root: str | Path, split: str, samples_per_shard: int, image_format: str = "png"):
        self.root = Path(root)
        self.split = split
        self.dir = self.root / split
        self.dir.mkdir(parents=True, exist_ok=True)
        self.samples_per_shard = samples_per_shard
        self.image_format = image_format
        self.rows: list[dict] = []
        self.shards: list[str] = []
        self._writer: wds.TarWriter | None = None
        self._tmp: Path | None = None
        self._final: Path | None = None
        self._count = 0

    def _open(self) -> None:
        name = f"shard-{len(self.shards):06d}.tar"
        self._final = self.dir / name
        self._tmp = self.dir / f".{name}.tmp"
        self._writer = wds.TarWriter(str(self._tmp))
        self._count = 0

    def _finish(self) -> None:
        if self._writer is None:
            return
        self._writer.close()
        os.replace(self._tmp, self._final)  # atomic: a shard is either complete or absent
        self.shards.append(self._final.name)
        self._writer = None

    def write(self, key: str, image: Image.Image, caption: str, meta: dict) -> None:
        if self._writer is None:
            self._open()
        data = encode_image(image, self.image_format)
        meta = {
            **meta,
            "width": image.width,
            "height": image.height,
            "sha256": hashlib.sha256(image.tobytes()).hexdigest(),
            "caption_id": caption_id(caption),
        }
        self._writer.write({"__key__": key, self.image_format: data, "txt": caption, "json": meta})
        self.rows.append(
            {"key": key, "shard": f"{self.split}/{self._final.name}", "caption": caption,
             "caption_id": meta["caption_id"], "meta": json.dumps(meta, sort_keys=True)}
        )
        self._count += 1
        if self._count >= self.samples_per_shard:
            self._finish()

    def close(self) -> Path:
        self._finish()
        index = self.root / f"index-{self.split}.parquet"
        table = pa.Table.from_pylist(
            self.rows,
            schema=pa.schema([("key", pa.string()), ("shard", pa.string()), ("caption", pa.string()),
                              ("caption_id", pa.string()), ("meta", pa.string())]),
        )
        tmp = index.with_suffix(".parquet.tmp")
        pq.write_table(table, tmp)
        os.replace(tmp, index)
        return index

    def __enter__(self) -> "ShardSink":
        return self

    def __exit__(self, exc_type, *_):
        if exc_type is None:
            self.close()
        elif self._writer is not None:  # leave no half-written shard behind
            self._writer.close()
            self._tmp.unlink(missing_ok=True)


# --------------------------------------------------------------------------------------------
# Reading


def list_shards(split_dir: str | Path) -> list[str]:
    """Sorted shard paths of one split directory (only finished shards, never temp files)."""
    return sorted(str(p) for p in Path(split_dir).glob(SHARD_GLOB))


def decode_sample(sample: dict) -> dict:
    """Raw webdataset sample -> {key, image (HxWx3 uint8), caption, meta}. No pickle involved."""
    ext = next((e for e in IMAGE_EXTS if e in sample), None)
    if ext is None:
        raise ValueError(f"sample {sample.get('__key__')} has no image member")
    with Image.open(io.BytesIO(sample[ext])) as im:
        image = np.asarray(im.convert("RGB"))
    return {
        "key": sample["__key__"],
        "image": image,
        "caption": sample["txt"].decode("utf-8"),
        "meta": json.loads(sample["json"]) if "json" in sample else {},
    }


def raw_samples(urls: Iterable[str]) -> Iterator[dict]:
    """Undecoded samples from shards, in order (webdataset's tar reader)."""
    pipeline = wds.DataPipeline(wds.SimpleShardList(list(urls)), wds.tarfile_to_samples())
    yield from pipeline


def iter_samples(urls: Iterable[str]) -> Iterator[dict]:
    """Decoded samples from shards, in order."""
    for sample in raw_samples(urls):
        yield decode_sample(sample)


def read_index(root: str | Path, split: str) -> pa.Table:
    return pq.read_table(Path(root) / f"index-{split}.parquet")


def load_split_arrays(root: str | Path, split: str) -> tuple[np.ndarray, list[str], list[dict]]:
    """A whole split in memory: images (N, H, W, 3) uint8, captions, metas. For small splits."""
    images, captions, metas = [], [], []
    for s in iter_samples(list_shards(Path(root) / split)):
        images.append(s["image"])
        captions.append(s["caption"])
        metas.append(s["meta"])
    if not images:
        raise ValueError(f"no samples in {Path(root) / split}")
    return np.stack(images), captions, metas
