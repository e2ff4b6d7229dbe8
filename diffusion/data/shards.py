"""WebDataset shards: the one on-disk format every source is ingested into.

A sample is one key with three members:
    <key>.png|jpg|webp   the image (RGB)
    <key>.txt            the caption, UTF-8
    <key>.json           metadata: source, original size, content hash, caption id, ...

``ShardWriter`` writes them through ``webdataset.TarWriter``, each shard under a temporary name
renamed when complete, so a killed run never leaves a truncated shard that looks finished.
Reading (``raw_samples``, ``iter_samples``) parses the tar headers itself and groups members into
samples exactly as webdataset does; the training loader reads every sample of every epoch, and
Python's ``tarfile`` made it slower than training a small model.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import struct
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
from PIL import Image, UnidentifiedImageError

from diffusion.artifacts import shard_urls
from diffusion.errors import T2IError

IMAGE_EXTS = ("png", "jpg", "jpeg", "webp")
_PIL_FORMATS = {"png": ("PNG",), "jpg": ("JPEG",), "jpeg": ("JPEG",), "webp": ("WEBP",)}


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


class ShardReadError(T2IError):
    """A shard that is not a readable, uncompressed tar (truncated, corrupt, or compressed)."""


_BLOCK = 512
_END = bytes(_BLOCK)
_COMPRESSED = ((b"\x1f\x8b", "gzip"), (b"BZh", "bzip2"), (b"\xfd7zXZ\x00", "xz"), (b"\x28\xb5\x2f\xfd", "zstd"))
_REGULAR = (b"0", b"\0", b"7")  # regular and contiguous files: the members that carry a sample's bytes
_NO_DATA = (b"1", b"2", b"3", b"4", b"5", b"6")  # links, devices, directories, fifos: no data blocks follow
_SAMPLE_NAME = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")  # key: the path up to the last part's first dot
_META_NAME = re.compile(r"__[^/]*__($|/)")  # webdataset's metadata members: __x__ and __x__/...


def _tar_int(field: bytes, where: str) -> int:
    """A tar header number: octal text, or GNU base-256 for values past its width."""
    if field[:1] == b"\x80":
        return int.from_bytes(field[1:], "big")
    text = field.split(b"\0", 1)[0].strip()
    try:
        return int(text, 8) if text else 0
    except ValueError:
        raise ShardReadError(f"{where}: bad number {field!r} in a tar header (corrupt shard)") from None


def _pax(data: bytes, where: str) -> dict[str, str]:
    """Records of a pax extended header: ``<len> <key>=<value>\\n`` each."""
    out, pos = {}, 0
    try:
        while pos < len(data) and data[pos:pos + 1] != b"\0":
            space = data.index(b" ", pos)
            end = pos + int(data[pos:space])
            key, _, value = data[space + 1:end - 1].partition(b"=")
            out[key.decode("utf-8")] = value.decode("utf-8", "surrogateescape")
            pos = end
    except ValueError:
        raise ShardReadError(f"{where}: malformed pax header (corrupt shard)") from None
    return out


def _refuse_compressed(head: bytes, offset: int, where: str) -> None:
    """A shard's first bytes that are no tar header: say so if they are a compressor's magic."""
    kind = next((k for magic, k in _COMPRESSED if head.startswith(magic)), None) if offset == 0 else None
    if kind:
        raise ShardReadError(f"{where}: a {kind}-compressed tar; training shards are plain .tar files "
                             "(re-run ingest to write them)")


def tar_files(stream, where: str) -> Iterator[tuple[str, bytes]]:
    """(name, bytes) of each regular file of an uncompressed tar stream, in order.

    Reads the headers itself (ustar, pax and GNU long names; the checksum of each is checked):
    Python's ``tarfile`` spent more time building a TarInfo per member than decoding the image of
    a small training sample. Directories, links and devices are skipped; a truncated shard, a bad
    header or a compressed tar raises ``ShardReadError`` naming the shard and the byte.
    """
    read = stream.read
    offset = 0
    pending: dict[str, str] = {}  # a pax 'x' header's or a GNU long name's fields for the next member
    defaults: dict[str, str] = {}  # pax 'g' headers: for every following member
    while True:
        hdr = _tar_header(read, offset, where)
        if hdr is None:
            return
        type_ = hdr[156:157]
        size = _tar_int(hdr[124:136], where)
        fields = {**defaults, **pending} if (pending or defaults) else None
        if fields and type_ not in (b"x", b"g", b"L", b"K") and "size" in fields:
            size = int(fields["size"])
        if type_ in _NO_DATA:
            size = 0
        stored = size + (-size % _BLOCK)
        data = read(stored)
        if len(data) < stored:
            raise ShardReadError(f"{where}: truncated at byte {offset + _BLOCK + len(data)} "
                                 f"(a member needs {stored} bytes there)")
        offset += _BLOCK + stored
        if type_ == b"x":
            pending.update(_pax(data[:size], where))
            continue
        if type_ == b"g":
            defaults.update(_pax(data[:size], where))
            continue
        if type_ == b"L":
            pending["path"] = data[:size].split(b"\0", 1)[0].decode("utf-8", "surrogateescape")
            continue
        if type_ == b"K":  # GNU long link name: links are skipped anyway
            continue
        if type_ == b"S":
            raise ShardReadError(f"{where}: sparse file member at byte {offset - stored - _BLOCK} (not a shard member)")
        pending = {}
        name = _member_name(hdr, fields)
        if type_ in _REGULAR and not (type_ == b"\0" and name.endswith("/")):
            yield name, data[:size] if stored != size else data
        # anything else (links, directories, devices, unknown types) is skipped as tarfile skips it


def _tar_header(read, offset: int, where: str) -> bytes | None:
    """The tar header block at byte ``offset`` (``read`` is the stream's), its checksum checked;
    None at the end of the archive."""
    hdr = read(_BLOCK)
    if len(hdr) < _BLOCK:
        if not hdr:
            return None  # no end-of-archive blocks: the members before still count (as tarfile reads them)
        _refuse_compressed(hdr, offset, where)
        raise ShardReadError(f"{where}: truncated at byte {offset + len(hdr)} (a tar header needs {_BLOCK})")
    if hdr == _END:
        return None
    try:
        chksum = _tar_int(hdr[148:156], where)
    except ShardReadError:
        chksum = -1  # not even a number: reported as a bad checksum below
    if chksum != sum(hdr) - sum(hdr[148:156]) + 256 and chksum != sum(struct.unpack_from("148b8x356b", hdr)) + 256:
        _refuse_compressed(hdr, offset, where)
        raise ShardReadError(f"{where}: bad tar header checksum at byte {offset} (not a tar file, or corrupt)")
    return hdr


def _member_name(hdr: bytes, fields: dict[str, str] | None) -> str:
    """A member's name: the pax or GNU long name in ``fields`` where there is one, else the
    header's ustar prefix and name."""
    if fields and fields.get("path"):
        return fields["path"]
    name = hdr[:100].split(b"\0", 1)[0].decode("utf-8", "surrogateescape")
    prefix = hdr[345:500].split(b"\0", 1)[0]
    if prefix:
        name = prefix.decode("utf-8", "surrogateescape") + "/" + name
    return name


def _open_shard(url: str):
    if "://" in url or url.startswith("pipe:"):
        import webdataset as wds

        return wds.gopen(url)  # remote and piped shards, as webdataset opens them
    return open(url, "rb", buffering=1 << 20)


def raw_samples(urls: Iterable[str]) -> Iterator[dict]:
    """Undecoded samples from shards, in order: ``{"__key__", "__url__", <ext>: bytes, ...}``.

    A sample is the consecutive members that share a key (the path up to the first dot of the
    file name; the rest, lower-cased, is the member's ext), exactly as webdataset groups them
    (a test compares the two on the same shards), but read by ``tar_files``, several times faster.
    """
    for url in urls:
        sample: dict | None = None
        with _open_shard(url) as stream:
            for name, data in tar_files(stream, url):
                if _META_NAME.match(name):
                    continue
                m = _SAMPLE_NAME.match(name)
                if m is None:
                    continue
                key, ext = m.group(1), m.group(2).lower()
                if sample is None or key != sample["__key__"]:
                    if sample is not None:
                        yield sample
                    sample = {"__key__": key, "__url__": url}
                if ext in sample:
                    raise ShardReadError(f"{url}: {name}: a second {ext!r} member for key {key!r}")
                sample[ext] = data
        if sample is not None:
            yield sample


def decode_sample(sample: dict) -> dict:
    """Raw webdataset sample -> {key, image (HxWx3 uint8), caption, meta}, or for a latent shard
    (diffusion.data.latents) {key, mean, std (C x h x w float16), caption, meta}. No pickle involved."""
    out = {"key": sample["__key__"], "caption": sample["txt"].decode("utf-8"),
           "meta": json.loads(sample["json"]) if "json" in sample else {}}
    if "mean.npy" in sample:
        out["mean"] = np.load(io.BytesIO(sample["mean.npy"]), allow_pickle=False)
        out["std"] = np.load(io.BytesIO(sample["std.npy"]), allow_pickle=False)
        return out
    ext = next((e for e in IMAGE_EXTS if e in sample), None)
    if ext is None:
        raise ValueError(f"sample {sample.get('__key__')} has no image member")
    out["image"] = decode_image(sample[ext], ext)
    return out


def decode_image(data: bytes, ext: str) -> np.ndarray:
    """An image member -> HxWx3 uint8 RGB (alpha dropped, palette and grey expanded).

    PIL is told the format the member's ext names, so it does not try its other decoders first
    (a third faster on small images); a member whose bytes are another format is still read.
    """
    try:
        im = Image.open(io.BytesIO(data), formats=_PIL_FORMATS.get(ext))
    except UnidentifiedImageError:
        im = Image.open(io.BytesIO(data))
    with im:
        return np.asarray(im if im.mode == "RGB" else im.convert("RGB"))


def iter_samples(urls: Iterable[str]) -> Iterator[dict]:
    """Decoded samples from shards, in order."""
    for sample in raw_samples(urls):
        yield decode_sample(sample)


def val_images(shards_dir: str | Path, n: int) -> np.ndarray:
    """The first ``n`` real validation images (uint8, N x H x W x 3), in shard order."""
    import itertools

    images = [s["image"] for s in itertools.islice(iter_samples(shard_urls(shards_dir, "val")), n)]
    return np.stack([np.asarray(i) for i in images])
