"""WebDataset shards: the one on-disk format every source is ingested into.

A sample is one key with three members:
    <key>.png|jpg|webp   the image (RGB)
    <key>.txt            the caption, UTF-8
    <key>.json           metadata: source, original size, content hash, caption id, ...

``ShardWriter`` writes them through ``webdataset.TarWriter``, each shard under a temporary name
renamed when complete, so a killed run never leaves a truncated shard that looks finished.
Reading goes through ``webdataset`` too (``iter_samples``).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
from PIL import Image

from diffusion.artifacts import SHARD_GLOB

IMAGE_EXTS = ("png", "jpg", "jpeg", "webp")


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


# Fixed tar member mtime: the same samples always make byte-identical shards (a resumed run
# reproduces an uninterrupted one exactly).
SHARD_MTIME = 946684800  # 2000-01-01T00:00:00Z


class ShardWriter:
    """Writes samples into ``<dir>/<prefix>-00.tar``, ``-01.tar``, ... atomically.

    A part rolls over after ``max_count`` samples or once it holds ``max_bytes``. Each part is
    written as ``.<name>.tmp`` and renamed when complete, so a killed run never leaves a
    truncated shard under a shard's name.
    """

    def __init__(self, directory: str | Path, prefix: str, max_count: int, max_bytes: int = 1 << 62):
        self.dir = Path(directory)
        self.prefix, self.max_count, self.max_bytes = prefix, max_count, max_bytes
        self.parts: list[dict] = []  # {"name", "samples", "bytes"} of finished parts
        self._writer = None  # webdataset.TarWriter of the part being written
        self._tmp: Path | None = None
        self._name = ""
        self._count = self._bytes = 0

    def _open(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        self._name = f"{self.prefix}-{len(self.parts):02d}.tar"
        self._tmp = self.dir / f".{self._name}.tmp"
        import webdataset as wds  # here, not at import: webdataset imports torch, ingest workers need neither

        self._writer = wds.TarWriter(str(self._tmp), mtime=SHARD_MTIME, user="t2i", group="t2i")
        self._count = self._bytes = 0

    def _finish(self) -> None:
        if self._writer is None:
            return
        self._writer.close()
        os.replace(self._tmp, self.dir / self._name)  # atomic: complete or absent
        self.parts.append({"name": self._name, "samples": self._count, "bytes": (self.dir / self._name).stat().st_size})
        self._writer = None

    def write(self, key: str, ext: str, image: bytes, caption: str, meta: dict) -> str:
        """Add one sample; returns the name of the shard it went into."""
        if self._writer is None:
            self._open()
        members = {ext: image, "txt": caption.encode("utf-8"), "json": json.dumps(meta).encode("utf-8")}
        self._writer.write({"__key__": key, **members})
        # bytes on disk: a 512-byte header per member, data padded to 512-byte blocks
        self._bytes += sum(512 + -(-len(v) // 512) * 512 for v in members.values())
        self._count += 1
        name = self._name
        if self._count >= self.max_count or self._bytes >= self.max_bytes:
            self._finish()
        return name

    def close(self) -> list[dict]:
        self._finish()
        return self.parts

    def abort(self) -> None:
        """Drop the part being written (after an error)."""
        if self._writer is not None:
            self._writer.close()
            self._tmp.unlink(missing_ok=True)
            self._writer = None


# --------------------------------------------------------------------------------------------
# Reading


def list_shards(split_dir: str | Path) -> list[str]:
    """Sorted shard paths of one split directory (only finished shards, never temp files)."""
    return sorted(str(p) for p in Path(split_dir).glob(SHARD_GLOB))


def decode_sample(sample: dict) -> dict:
    """Raw webdataset sample -> {key, image (HxWx3 uint8), caption, meta}, or for a latent shard
    (diffusion.latents) {key, mean, std (C x h x w float16), caption, meta}. No pickle involved."""
    out = {"key": sample["__key__"], "caption": sample["txt"].decode("utf-8"),
           "meta": json.loads(sample["json"]) if "json" in sample else {}}
    if "mean.npy" in sample:
        out["mean"] = np.load(io.BytesIO(sample["mean.npy"]), allow_pickle=False)
        out["std"] = np.load(io.BytesIO(sample["std.npy"]), allow_pickle=False)
        return out
    ext = next((e for e in IMAGE_EXTS if e in sample), None)
    if ext is None:
        raise ValueError(f"sample {sample.get('__key__')} has no image member")
    with Image.open(io.BytesIO(sample[ext])) as im:
        out["image"] = np.asarray(im.convert("RGB"))
    return out


def raw_samples(urls: Iterable[str]) -> Iterator[dict]:
    """Undecoded samples from shards, in order (webdataset's tar reader)."""
    import webdataset as wds

    pipeline = wds.DataPipeline(wds.SimpleShardList(list(urls)), wds.tarfile_to_samples())
    yield from pipeline


def iter_samples(urls: Iterable[str]) -> Iterator[dict]:
    """Decoded samples from shards, in order."""
    for sample in raw_samples(urls):
        yield decode_sample(sample)
