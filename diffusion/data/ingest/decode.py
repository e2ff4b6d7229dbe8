"""Turn untrusted image bytes and caption text into what a shard stores.

``process_image(data, cfg)`` decodes one image safely (size limits checked from the header before
any pixels are decoded), orients it, converts every Pillow mode to RGB over a defined background,
resizes it for ``cfg.resize_mode`` and encodes it. ``clean_caption(raw, cfg)`` decodes and normalises
one caption. Both raise ``Rejected`` (diffusion.data.ingest.core) for input that must not reach a shard;
no other exception escapes for bad input.
"""

from __future__ import annotations

import hashlib
import io
import threading
import unicodedata
import warnings
from functools import cache

import numpy as np
from PIL import ExifTags, Image, ImageOps

from diffusion.config import IngestConfig
from diffusion.data.buckets import bucket_set, cover_box, nearest_bucket
from diffusion.data.ingest.core import ProcessedImage, Rejected
from diffusion.data.shards import encode_image

# Raster formats found in image-text datasets. Opening only these keeps plugins that shell out
# (EPS runs Ghostscript) or parse exotic containers away from bytes downloaded from the web.
ALLOWED_FORMATS = ("JPEG", "MPO", "PNG", "WEBP", "GIF", "BMP", "TIFF", "PPM", "AVIF")

# EXIF orientations: 1 is as stored; 2-8 flip and/or rotate, and 5-8 (the 90-degree turns) make
# the stored width the displayed height.
_TRANSPOSED = {2, 3, 4, 5, 6, 7, 8}
_SWAPS_AXES = {5, 6, 7, 8}

# warnings.catch_warnings swaps the process-wide filter list and is not thread-safe (Python 3.11),
# so two of our threads doing it at once could restore each other's copies. The lock keeps them
# apart; it only covers Image.open, which parses the header and is cheap.
_OPEN_LOCK = threading.Lock()


# --------------------------------------------------------------------------------------------
# Images


@cache
def _formats() -> tuple[str, ...]:
    """ALLOWED_FORMATS that this Pillow build can open (Image.open fails on unknown names)."""
    Image.init()
    return tuple(f for f in ALLOWED_FORMATS if f in Image.OPEN)


def _rejected(e: Exception) -> Rejected:
    """The reject for an exception Pillow raised on bad input (corrupt data can raise anything)."""
    if isinstance(e, Image.DecompressionBombError):  # above 2x Pillow's limit, refused before our check
        return Rejected("too_large", str(e))
    if isinstance(e, OSError) and "truncated" in str(e).lower():
        return Rejected("truncated", str(e))
    return Rejected("decode_error", f"{type(e).__name__}: {e}")


def _open(data: bytes) -> Image.Image:
    """Image.open: reads the header only; no pixels are decoded yet."""
    try:
        with _OPEN_LOCK, warnings.catch_warnings():
            # Pillow warns above its MAX_IMAGE_PIXELS; we enforce cfg.max_pixels ourselves.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            return Image.open(io.BytesIO(data), formats=_formats())
    except Exception as e:
        raise _rejected(e) from None


def _check_size(w: int, h: int, cfg: IngestConfig) -> None:
    """Cheap rejects from the header size. Orientation only swaps w and h, so it changes nothing here."""
    if w * h > cfg.max_pixels:
        raise Rejected("too_large", f"{w}x{h} > {cfg.max_pixels} pixels")
    if min(w, h) < max(cfg.min_size, 1):
        raise Rejected("too_small", f"{w}x{h}, shorter side < {cfg.min_size}")
    if max(w, h) / min(w, h) > cfg.max_aspect_ratio:
        raise Rejected("aspect_ratio", f"{w}x{h}, ratio > {cfg.max_aspect_ratio}")


def draft_size(w: int, h: int, cfg: IngestConfig) -> tuple[int, int]:
    """The size to pass to JPEG ``draft`` for a stored ``w`` x ``h`` image.

    Draft picks the largest scale s in (1, 2, 4, 8) with s <= min(w // req_w, h // req_h), so the
    drafted image is ceil(w/s) x ceil(h/s). Asking for n x n (n = image_size) bounds s by
    shorter // n: the shorter side stays >= n, which center_crop needs. For pad and keep_ratio only
    the longer side must stay >= n: ask for n along it and 1 along the shorter side, which bounds s
    by longer // n (the shorter side then shrinks by the same factor as the final resize, or less).
    Both depend only on which side is shorter, so EXIF rotation does not matter. For bucket, ask for
    m x m (m: the largest side of any bucket): both sides stay >= what any bucket's cover needs.
    """
    n = cfg.image_size
    if cfg.resize_mode == "center_crop":
        return n, n
    if cfg.resize_mode == "bucket":  # the largest bucket side along both: covers any bucket either way round
        m = max(max(b) for b in bucket_set(cfg))
        return m, m
    return (n, 1) if w >= h else (1, n)


def _orientation(img: Image.Image) -> int:
    value = img.getexif().get(ExifTags.Base.Orientation, 1)
    return value if isinstance(value, int) else 1


def _to_8bit(img: Image.Image) -> Image.Image:
    """High-depth greyscale (I;16*, I, F) -> L, scaled by bit depth (Pillow's convert clips at 255)."""
    a = np.asarray(img).astype(np.float64)
    if img.mode == "F":
        a = np.nan_to_num(a, nan=0.0, posinf=255.0, neginf=0.0)
        # Float images are either normalised to [0, 1] or already on the 0..255 scale Pillow assumes.
        if a.size and a.min() >= 0.0 and a.max() <= 1.0:
            a = a * 255.0
    elif img.mode == "I":
        # Files give mode I for 16-bit samples (PGM, some TIFFs); only wider data is 32-bit.
        bits = 16 if a.size == 0 or a.max() <= 65535 else 31
        a = a / ((2**bits - 1) / 255.0)
    else:  # I;16, I;16B, I;16L, I;16N: unsigned 16-bit, 65535 -> 255
        a = a / 257.0
    return Image.fromarray(np.clip(np.rint(a), 0, 255).astype(np.uint8), "L")


def _has_alpha(img: Image.Image) -> bool:
    # "transparency" in info: a palette index (P), a grey level (L, 1) or a colour (RGB) that is see-through
    return img.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in img.info


def to_rgb(img: Image.Image, background: tuple[int, int, int] | list[int]) -> Image.Image:
    """Any Pillow mode -> RGB; transparent pixels are composited over ``background``."""
    return flatten(img, background)[0]


def flatten(img: Image.Image, background: tuple[int, int, int] | list[int]) -> tuple[Image.Image, bool]:
    """``to_rgb``, and whether any pixel was see-through (so the background shows in the result:
    the sample's ``alpha_flattened``). An alpha channel that is opaque everywhere flattens nothing."""
    if img.mode in ("I", "F") or img.mode.startswith("I;16"):
        img = _to_8bit(img)
    if not _has_alpha(img):
        return img.convert("RGB"), False
    if img.mode == "La":  # premultiplied; Pillow has no direct La -> RGBA conversion
        img = img.convert("LA")
    rgba = img.convert("RGBA")
    base = Image.new("RGBA", img.size, (*background, 255))
    return Image.alpha_composite(base, rgba).convert("RGB"), rgba.getchannel("A").getextrema()[0] < 255


def _decode(data: bytes, cfg: IngestConfig) -> tuple[Image.Image, tuple[int, int], dict]:
    """Bytes -> (oriented RGB image at or above the needed resolution, original oriented size, notes)."""
    img = _open(data)
    w, h = img.size
    _check_size(w, h, cfg)
    notes = {"format": img.format, "mode": img.mode}
    try:
        if img.format in ("JPEG", "MPO"):
            # Let libjpeg decode at 1/2, 1/4 or 1/8 scale: much faster on large photos.
            img.draft("RGB", draft_size(w, h, cfg))
        img.load()
        notes["decoded_size"] = list(img.size)
        orientation = _orientation(img)
        if orientation in _TRANSPOSED:  # exif_transpose would copy the image even when upright
            img = ImageOps.exif_transpose(img)
        rgb, notes["alpha_flattened"] = flatten(img, cfg.background)
    except Exception as e:
        raise _rejected(e) from None
    notes["exif_transposed"] = orientation in _TRANSPOSED
    # the header size, not rgb.size: draft may have decoded fewer pixels
    original = (h, w) if orientation in _SWAPS_AXES else (w, h)
    return rgb, original, notes


def resize(img: Image.Image, cfg: IngestConfig) -> Image.Image:
    """Scale an RGB image for cfg.resize_mode (center_crop | pad | keep_ratio | bucket); upscaling is allowed."""
    n = cfg.image_size
    w, h = img.size
    if cfg.resize_mode == "bucket":
        # the nearest bucket by aspect ratio, covered: only the aspect difference is cropped, centred
        bucket = nearest_bucket(w, h, bucket_set(cfg))
        return img.resize(bucket, Image.Resampling.LANCZOS, box=cover_box(w, h, bucket), reducing_gap=3.0)
    if cfg.resize_mode == "center_crop":
        # Resizing the centred square box in one step is scale-shorter-side-then-crop without
        # rounding the intermediate size.
        side = min(w, h)
        left, top = (w - side) / 2, (h - side) / 2
        box = (left, top, left + side, top + side)
        return img.resize((n, n), Image.Resampling.LANCZOS, box=box, reducing_gap=3.0)
    scale = n / max(w, h)
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    scaled = img.resize(size, Image.Resampling.LANCZOS, reducing_gap=3.0)
    if cfg.resize_mode == "keep_ratio":
        return scaled
    if cfg.resize_mode != "pad":
        raise ValueError(f"unknown resize_mode {cfg.resize_mode!r}")
    canvas = Image.new("RGB", (n, n), tuple(cfg.background))
    canvas.paste(scaled, ((n - size[0]) // 2, (n - size[1]) // 2))
    return canvas


def content_hash(img: Image.Image) -> str:
    """sha256 of the RGB pixels and the size: equal for equal pictures whatever the source format."""
    digest = hashlib.sha256(f"{img.width}x{img.height}:".encode())
    digest.update(img.convert("RGB").tobytes())
    return digest.hexdigest()


def process_image(data: bytes, cfg: IngestConfig) -> ProcessedImage:
    """Decode, check, orient, convert to RGB, resize and encode one image; raise Rejected if unusable."""
    if not data:
        raise Rejected("empty_file")
    rgb, (original_w, original_h), notes = _decode(data, cfg)
    out = resize(rgb, cfg)
    return ProcessedImage(
        data=encode_image(out, cfg.image_format, cfg.quality),
        ext=cfg.image_format,
        width=out.width,
        height=out.height,
        original_width=original_w,
        original_height=original_h,
        content_hash=content_hash(out),
        notes=notes,
    )


# --------------------------------------------------------------------------------------------
# Captions


def _decode_caption(raw: bytes | str, cfg: IngestConfig) -> tuple[str, bool]:
    """Bytes or str -> str without a BOM; (text, whether undecodable input was replaced by U+FFFD)."""
    if isinstance(raw, str):
        # A str can still carry undecodable bytes as lone surrogates (surrogateescape); they
        # could not be written as UTF-8 later, so they get the same policy as invalid bytes.
        if not any(unicodedata.category(c) == "Cs" for c in raw):
            return raw.removeprefix("\ufeff"), False
        if cfg.caption_errors == "reject":
            raise Rejected("bad_encoding", "lone surrogates in caption")
        text = "".join("\ufffd" if unicodedata.category(c) == "Cs" else c for c in raw)
        return text.removeprefix("\ufeff"), True
    try:
        return raw.decode("utf-8-sig"), False
    except UnicodeDecodeError as e:
        if cfg.caption_errors == "reject":
            raise Rejected("bad_encoding", str(e)) from None
        return raw.decode("utf-8-sig", errors="replace"), True


def _cap(text: str, max_chars: int) -> str:
    """Cut to max_chars, at the last space if that keeps at least 80% of the allowance."""
    if len(text) <= max_chars:
        return text
    # Searching up to max_chars inclusive: a space right after the cap means no word is cut.
    space = text.rfind(" ", 0, max_chars + 1)
    end = space if space > 0 and space >= 0.8 * max_chars else max_chars
    return text[:end].strip()


def clean_caption(raw: bytes | str | None, cfg: IngestConfig) -> tuple[str, bool]:
    """Decode and normalise a caption; returns (caption, replaced) or raises Rejected."""
    if raw is None:
        raise Rejected("missing_caption")
    text, replaced = _decode_caption(raw, cfg)
    text = unicodedata.normalize("NFC", text)
    # Control characters go; the whitespace ones (\t, \n, \r, ...) are collapsed with the rest.
    text = "".join(c for c in text if c.isspace() or unicodedata.category(c) != "Cc")
    text = " ".join(text.split())  # str.split() splits on every Unicode space, NBSP included
    text = _cap(text, cfg.caption_max_chars)
    if not text:
        if cfg.keep_empty_captions:
            return "", replaced
        raise Rejected("empty_caption")
    return text, replaced
