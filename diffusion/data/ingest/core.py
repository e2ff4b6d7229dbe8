"""Shared vocabulary of ingestion: reject reasons and the processed-sample record."""

from __future__ import annotations

from dataclasses import dataclass, field

# Every reason a sample can be turned away for. Stats count each one; nothing rejected reaches a shard.
REASONS = (
    "read_error",        # the file or tar member could not be read
    "empty_file",        # zero bytes
    "decode_error",      # not an image Pillow can decode
    "truncated",         # the image data ends early
    "too_large",         # width*height above max_pixels (decompression bomb)
    "too_small",         # shorter side below min_size
    "aspect_ratio",      # longer/shorter side above max_aspect_ratio
    "missing_image",     # a caption without an image (sidecar, tar key, table cell)
    "missing_caption",   # an image without a caption
    "empty_caption",     # caption empty after cleaning (unless keep_empty_captions)
    "bad_encoding",      # caption bytes not UTF-8 (with caption_errors: reject)
    "duplicate",         # same decoded, resized pixels as an earlier sample
    "http_error",        # HTTP status other than 2xx (after retries for 429/5xx)
    "timeout",           # connect or read timeout (after retries)
    "connection_error",  # DNS, refused, reset (after retries)
    "opt_out",           # X-Robots-Tag opts the image out of AI use
    "bad_content_type",  # response is not image/*
    "byte_cap",          # response larger than download.max_bytes
    "unsafe_member",     # tar member that is a link, a device, or has an absolute or ../ name
)


class Rejected(Exception):
    """A sample turned away for ``reason`` (one of REASONS); ``detail`` is for logs only."""

    def __init__(self, reason: str, detail: str = ""):
        if reason not in REASONS:
            raise ValueError(f"unknown reject reason {reason!r}")
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


@dataclass
class ProcessedImage:
    data: bytes                 # encoded output image (ext below)
    ext: str                    # "jpg" | "png" | "webp"
    width: int                  # output size
    height: int
    original_width: int         # after EXIF orientation, before resizing
    original_height: int
    content_hash: str           # sha256 hex of the decoded, resized RGB pixels (+ size): the dedupe key
    notes: dict = field(default_factory=dict)  # e.g. {"exif_transposed": True, "mode": "CMYK"}
