"""Aspect-ratio buckets (``ingest.resize_mode: bucket``).

Instead of cropping every image to a square, ingest puts each image in the bucket whose aspect
ratio is nearest its own (in log ratio) and resizes it to cover that bucket, centre-cropping only
the small difference between the two aspect ratios. A bucket is a (width, height) in pixels, both
multiples of ``ingest.bucket_step``, with width * height at most the pixel budget
``ingest.image_size ** 2`` and neither side more than ``ingest.max_aspect_ratio`` times the other.

Training then batches within a bucket (diffusion.training.train_data), and generation accepts a
width and height from the buckets the model was trained on (``model.json``'s ``buckets``).

Every function here is pure: the same settings give the same bucket set on every machine.
"""

from __future__ import annotations

import math
from typing import Iterable

from diffusion.config import bucket_set, compute_buckets  # noqa: F401  (the set is a function of the settings alone)
from diffusion.errors import ConfigError, T2IError

Bucket = tuple[int, int]  # (width, height) in pixels


def nearest_bucket(width: int, height: int, buckets: Iterable[Bucket]) -> Bucket:
    """The bucket whose aspect ratio is nearest ``width / height`` in log ratio (the first of a tie)."""
    target = math.log(width / height)
    return min(buckets, key=lambda b: abs(math.log(b[0] / b[1]) - target))


def cover_box(width: int, height: int, bucket: Bucket) -> tuple[float, float, float, float]:
    """The centred box of a ``width`` x ``height`` image with the bucket's aspect ratio: the part
    that resized to the bucket covers it exactly (only the aspect difference is cut off)."""
    bw, bh = bucket
    if width * bh > height * bw:  # wider than the bucket: cut left and right
        cw, ch = height * bw / bh, float(height)
    else:
        cw, ch = float(width), width * bh / bw
    left, top = (width - cw) / 2, (height - ch) / 2
    return left, top, left + cw, top + ch


def name(bucket: Bucket) -> str:
    """"<width>x<height>": the bucket's name in stats.json and error messages."""
    return f"{bucket[0]}x{bucket[1]}"


def check_divisible(buckets: Iterable[Bucket], factor: int, what: str, fix: str) -> None:
    """Every bucket side must be a multiple of ``factor`` (a VAE's downsampling factor); else one line."""
    for b in buckets:
        if b[0] % factor or b[1] % factor:
            raise ConfigError(f"bucket {name(b)} is not a multiple of {what} {factor}: {fix}")


def parse(value) -> Bucket:
    """A bucket from "WxH" or [W, H]."""
    if isinstance(value, str):
        w, _, h = value.lower().partition("x")
        return int(w), int(h)
    return int(value[0]), int(value[1])


def model_sizes(meta: dict) -> list[Bucket]:
    """The (width, height) sizes a model draws: its buckets (model.json ``buckets``), else its square."""
    n = int(meta["image_size"])
    return [(int(w), int(h)) for w, h in meta.get("buckets") or [(n, n)]]


def requested_size(meta: dict, width: int | None, height: int | None, where: str = "") -> Bucket | None:
    """The (width, height) asked for, checked against the sizes the model was trained on (one line
    where it is not one of them, or only one side is given); None when neither is given (the
    model's square ``image_size``)."""
    if width is None and height is None:
        return None
    at = f"{where}: " if where else ""
    if width is None or height is None:
        raise T2IError(f"{at}give both width and height (or neither), got width {width}, height {height}")
    sizes = model_sizes(meta)
    if (width, height) not in sizes:
        raise T2IError(f"{at}{width}x{height} is not a size this model was trained on "
                       f"(its sizes: {', '.join(name(b) for b in sizes)})")
    return int(width), int(height)
