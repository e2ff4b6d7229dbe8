"""A bad-input corpus, generated: every way an image-caption pair can be broken, plus good ones.

``write_folder_corpus(root)`` lays out a folder source and returns the counts a correct ingest must
report (accepted, and rejected by reason). The same pictures feed the table, webdataset and URL
corpora in the tests.
"""

from __future__ import annotations

import io
import json
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
from PIL import Image


def picture(seed: int, size=(96, 80), mode="RGB") -> Image.Image:
    """A distinct, deterministic picture (so no two seeds are duplicates)."""
    rng = np.random.default_rng(seed)
    w, h = size
    yy, xx = np.mgrid[0:h, 0:w]
    base = np.stack([(xx * (1 + seed % 5) + yy) % 256, (yy * 3 + seed * 17) % 256,
                     (xx + yy * (2 + seed % 3)) % 256], -1).astype(np.uint8)
    base = np.clip(base.astype(int) + rng.integers(-20, 20, base.shape), 0, 255).astype(np.uint8)
    img = Image.fromarray(base, "RGB")
    return img if mode == "RGB" else img.convert(mode)


def encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def png_bomb(side: int = 20000) -> bytes:
    """A real, valid side x side 1-bit PNG (400 Mpx at 20000) that compresses to a few tens of KB.

    Written scanline by scanline through zlib, so making it never holds the pixels in memory.
    """
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    comp = zlib.compressobj(9)
    row = b"\x00" + b"\x00" * ((side + 7) // 8)  # filter byte + packed bits
    idat = b"".join(comp.compress(row) for _ in range(side)) + comp.flush()
    ihdr = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)  # 1-bit greyscale
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def exif_rotated_jpeg(seed: int) -> bytes:
    img = picture(seed, (120, 80))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise on display
    return encode(img, "JPEG", quality=90, exif=exif.tobytes())


def good_images() -> dict[str, bytes]:
    """Valid images in every mode the decoder must convert, keyed by a file name."""
    rgba = np.array(picture(1).convert("RGBA"))
    rgba[:, :40, 3] = 0
    p_img = picture(2).convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    p_img.info["transparency"] = 0
    i16 = Image.fromarray((np.arange(96 * 80).reshape(80, 96) * 8).astype(np.uint16))  # mode I;16
    return {
        "rgb.jpg": encode(picture(0), "JPEG", quality=92),
        "rgba.png": encode(Image.fromarray(rgba, "RGBA"), "PNG"),
        "palette.png": encode(p_img, "PNG", transparency=0),
        "grey.png": encode(picture(3, mode="L"), "PNG"),
        "greyalpha.png": encode(picture(4).convert("LA"), "PNG"),
        "cmyk.jpg": encode(picture(5).convert("CMYK"), "JPEG", quality=92),
        "i16.png": encode(i16, "PNG"),
        "rotated.jpg": exif_rotated_jpeg(6),
        "lossless.webp": encode(picture(7), "WEBP", lossless=True),
        "bitmap.bmp": encode(picture(8), "BMP"),
    }


def write_folder_corpus(root: Path) -> tuple[int, Counter]:
    """Lay out a folder source with every case; returns (accepted, rejected-by-reason) expected
    with default processing settings (min_size 64, max_aspect_ratio 3, caption_errors replace)."""
    root.mkdir(parents=True, exist_ok=True)
    expected: Counter = Counter()
    accepted = 0

    def put(rel: str, data: bytes, caption: bytes | str | None = "a caption", sidecar: str = "txt"):
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        if caption is not None:
            stem = path.with_suffix("")
            if sidecar == "txt":
                Path(f"{stem}.txt").write_bytes(caption if isinstance(caption, bytes) else caption.encode())
            else:
                Path(f"{stem}.json").write_text(json.dumps({"caption": caption, "source": "test"}))

    for i, (name, data) in enumerate(good_images().items()):
        put(f"good/{'deep/' * (i % 3)}{name}", data, f"good image {name}")
        accepted += 1
    put("good/json_sidecar.png", encode(picture(20), "PNG"), "caption from json", sidecar="json")
    accepted += 1
    put("good/non_utf8.png", encode(picture(21), "PNG"), b"caf\xe9 \xff caption")  # replaced, kept
    accepted += 1
    jpeg = encode(picture(30), "JPEG", quality=90)
    put("bad/zero.jpg", b"")
    expected["empty_file"] += 1
    put("bad/garbage.jpg", b"this is not an image at all" * 10)
    expected["decode_error"] += 1
    put("bad/truncated.jpg", jpeg[: len(jpeg) // 2])
    expected["truncated"] += 1
    put("bad/bomb.png", png_bomb())
    expected["too_large"] += 1
    put("bad/tiny.png", encode(picture(31, (30, 30)), "PNG"))
    expected["too_small"] += 1
    put("bad/strip.png", encode(picture(32, (400, 100)), "PNG"))
    expected["aspect_ratio"] += 1
    put("bad/empty_caption.png", encode(picture(33), "PNG"), "   \n\t ")
    expected["empty_caption"] += 1
    put("bad/no_caption.png", encode(picture(34), "PNG"), None)
    expected["missing_caption"] += 1
    (root / "bad" / "orphan.txt").write_text("a caption without its image")
    expected["missing_image"] += 1
    dup = encode(picture(35), "PNG")
    put("dup/a_first.png", dup, "the original")
    put("dup/b_copy.png", dup, "the same pixels again")
    put("dup/c_copy.webp", encode(picture(35), "WEBP", lossless=True), "same pixels, other format")
    accepted += 1
    expected["duplicate"] += 2
    return accepted, expected


def write_tar(path: Path, members: list[tuple[str, bytes | None, str]]) -> None:
    """members: (name, data, kind) with kind 'file', 'symlink' (data = target) or 'hardlink'."""
    with tarfile.open(path, "w") as tar:
        for name, data, kind in members:
            info = tarfile.TarInfo(name)
            if kind == "symlink":
                info.type, info.linkname = tarfile.SYMTYPE, data.decode()
                tar.addfile(info)
            elif kind == "hardlink":
                info.type, info.linkname = tarfile.LNKTYPE, data.decode()
                tar.addfile(info)
            else:
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
