"""diffusion.data.ingest.decode: safe decoding, mode conversion, resizing, caption cleaning.

Every input is generated here with Pillow/numpy; images are kept small except the one large JPEG
that exercises draft mode.
"""

from __future__ import annotations

import io
import struct
import time
import warnings
import zlib

import numpy as np
import pytest
from PIL import ExifTags, Image, ImageFile, PngImagePlugin

from diffusion.config import IngestConfig
from diffusion.data.ingest.core import ProcessedImage, Rejected
from diffusion.data.ingest.decode import clean_caption, draft_size, process_image, to_rgb

RED, GREEN, BLUE, WHITE, BLACK = (255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 255), (0, 0, 0)


def cfg(**kw) -> IngestConfig:
    return IngestConfig(**{"image_size": 64, "min_size": 8, **kw})


def encode(img: Image.Image, fmt: str = "PNG", **save_kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **save_kw)
    return buf.getvalue()


def pixels(result: ProcessedImage) -> np.ndarray:
    """The output image as an (H, W, 3) array, decoded from the bytes process_image returned."""
    img = Image.open(io.BytesIO(result.data))
    assert img.mode == "RGB"
    return np.asarray(img)


def stripes(w: int, h: int, colours: list[tuple[int, int, int]]) -> Image.Image:
    """Vertical stripes of equal width, left to right."""
    a = np.zeros((h, w, 3), np.uint8)
    for i, c in enumerate(colours):
        a[:, i * w // len(colours) : (i + 1) * w // len(colours)] = c
    return Image.fromarray(a)


def reason(data: bytes, c: IngestConfig) -> str:
    with pytest.raises(Rejected) as e:
        process_image(data, c)
    return e.value.reason


def png_header_only(w: int, h: int) -> bytes:
    """A PNG whose IHDR claims w x h but whose IDAT holds no pixels: decoding it would fail."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", w, h, 1, 0, 0, 0, 0)  # 1-bit greyscale
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")


# --------------------------------------------------------------------------------------------
# Modes -> RGB


def _pa_half_transparent() -> Image.Image:
    p = Image.new("P", (8, 8), 1)
    p.putpalette([0, 0, 0, 10, 200, 30])
    pa = p.convert("PA")
    alpha = np.full((8, 8), 255, np.uint8)
    alpha[:, 4:] = 0
    pa.putalpha(Image.fromarray(alpha))
    return pa


MODE_CASES = {
    # mode: (image, pixel at (0, 0) expected after to_rgb over a (0, 255, 0) background, tolerance)
    "1": (Image.new("1", (8, 8), 1), WHITE, 0),
    "L": (Image.new("L", (8, 8), 100), (100, 100, 100), 0),
    "P": (Image.new("RGB", (8, 8), (10, 200, 30)).convert("P", palette=Image.Palette.ADAPTIVE), (10, 200, 30), 0),
    "RGBA": (Image.new("RGBA", (8, 8), (10, 200, 30, 255)), (10, 200, 30), 0),
    "RGBA semi": (Image.new("RGBA", (8, 8), (255, 0, 0, 128)), (128, 127, 0), 1),  # half red over green
    "LA": (Image.new("LA", (8, 8), (100, 255)), (100, 100, 100), 0),
    "LA clear": (Image.new("LA", (8, 8), (100, 0)), GREEN, 0),
    "PA": (_pa_half_transparent(), (10, 200, 30), 0),
    "I;16 max": (Image.new("I;16", (8, 8), 65535), WHITE, 0),
    "I;16 mid": (Image.new("I;16", (8, 8), 32896), (128, 128, 128), 0),
    "I;16B": (Image.fromarray(np.full((8, 8), 32896, ">u2")), (128, 128, 128), 0),
    "I": (Image.new("I", (8, 8), 65535), WHITE, 0),  # 16-bit samples, as PGM and TIFF give them
    "F unit": (Image.new("F", (8, 8), 0.5), (128, 128, 128), 0),  # normalised float
    "F 255": (Image.new("F", (8, 8), 200.0), (200, 200, 200), 0),
    "CMYK": (Image.new("CMYK", (8, 8), (0, 255, 255, 0)), RED, 0),
    "YCbCr": (Image.new("RGB", (8, 8), (10, 200, 30)).convert("YCbCr"), (10, 200, 30), 3),
    "LAB": (Image.new("RGB", (8, 8), RED).convert("LAB"), RED, 8),
    "HSV": (Image.new("HSV", (8, 8), (85, 255, 255)), GREEN, 2),
}


@pytest.mark.parametrize("case", list(MODE_CASES))
def test_every_mode_converts_to_rgb_with_the_right_colour(case):
    img, expected, tol = MODE_CASES[case]
    out = to_rgb(img, [0, 255, 0])
    assert out.mode == "RGB" and out.size == img.size
    assert np.abs(np.array(out.getpixel((0, 0))) - expected).max() <= tol, out.getpixel((0, 0))


def test_pa_transparent_pixels_show_the_background():
    out = to_rgb(_pa_half_transparent(), [0, 255, 0])
    assert out.getpixel((7, 0)) == GREEN and out.getpixel((0, 0)) == (10, 200, 30)


def test_rgba_png_with_transparent_half_shows_background():
    a = np.zeros((64, 64, 4), np.uint8)
    a[:, :32] = (255, 0, 0, 0)  # red, but fully transparent: must not show
    a[:, 32:] = (0, 0, 255, 255)
    r = process_image(encode(Image.fromarray(a, "RGBA")), cfg(background=[0, 255, 0]))
    px = pixels(r)
    assert (px[:, :32] == GREEN).all() and (px[:, 32:] == BLUE).all()
    assert r.notes["mode"] == "RGBA" and r.notes["format"] == "PNG"


def test_palette_png_with_transparency_index():
    p = Image.new("P", (64, 64), 1)
    p.putpalette([255, 0, 0, 0, 0, 255])
    p.paste(0, (0, 0, 32, 64))  # left half: index 0, declared transparent
    px = pixels(process_image(encode(p, transparency=0), cfg(background=[10, 20, 30])))
    assert tuple(px[10, 5]) == (10, 20, 30) and tuple(px[10, 60]) == BLUE


def test_16bit_greyscale_png_is_scaled_not_clipped():
    a = np.zeros((64, 66), np.uint16)
    a[:, 22:44] = 32896
    a[:, 44:] = 65535
    data = encode(Image.fromarray(a))
    assert Image.open(io.BytesIO(data)).mode == "I;16"
    r = process_image(data, cfg(resize_mode="keep_ratio", image_size=66))
    px = pixels(r)
    assert tuple(px[5, 5]) == BLACK and tuple(px[5, 33]) == (128, 128, 128) and tuple(px[5, 60]) == WHITE


def test_cmyk_jpeg_decodes_to_rgb():
    data = encode(Image.new("CMYK", (64, 64), (0, 255, 255, 0)), "JPEG", quality=95)
    r = process_image(data, cfg())
    assert r.notes["mode"] == "CMYK"
    assert np.abs(pixels(r)[32, 32].astype(int) - RED).max() <= 8


# --------------------------------------------------------------------------------------------
# EXIF orientation


def _exif(orientation: int) -> Image.Exif:
    exif = Image.Exif()
    exif[ExifTags.Base.Orientation] = orientation
    return exif


def test_exif_orientation_6_reports_portrait_size_and_rotates_pixels():
    a = np.zeros((20, 40, 3), np.uint8)  # stored landscape, 40 wide
    a[:5, :5] = RED  # stored top-left corner
    data = encode(Image.fromarray(a), exif=_exif(6))
    r = process_image(data, cfg(min_size=8, resize_mode="keep_ratio", image_size=40))
    assert (r.original_width, r.original_height) == (20, 40)
    assert (r.width, r.height) == (20, 40)
    assert r.notes["exif_transposed"] is True
    # orientation 6 = rotate 90 degrees clockwise for display: top-left lands top-right
    px = pixels(r)
    assert tuple(px[2, 17]) == RED and tuple(px[2, 2]) == BLACK and tuple(px[37, 2]) == BLACK


def test_no_orientation_is_not_transposed():
    r = process_image(encode(Image.new("RGB", (40, 20))), cfg(resize_mode="keep_ratio", image_size=40))
    assert (r.original_width, r.original_height) == (40, 20) and r.notes["exif_transposed"] is False


# --------------------------------------------------------------------------------------------
# Rejects


def test_empty_and_garbage_bytes():
    assert reason(b"", cfg()) == "empty_file"
    assert reason(np.random.default_rng(0).bytes(5000), cfg()) == "decode_error"
    assert reason(b"\x89PNG\r\n\x1a\n" + b"\x00" * 40, cfg()) == "decode_error"


def test_formats_outside_the_allow_list_are_not_opened():
    # Pillow itself identifies this as EPS, whose loader runs Ghostscript on the bytes
    eps = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 100 100\n%%EndComments\nshowpage\n"
    assert Image.open(io.BytesIO(eps)).format == "EPS"
    with pytest.raises(Rejected) as e:
        process_image(eps, cfg())
    # refused at identification, not later when loading would have needed Ghostscript
    assert e.value.reason == "decode_error" and e.value.detail.startswith("UnidentifiedImageError")


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_file_cut_in_half_is_rejected(fmt):
    noise = (np.random.default_rng(1).random((64, 64, 3)) * 255).astype(np.uint8)
    data = encode(Image.fromarray(noise), fmt)
    # the contract allows decode_error when Pillow cannot tell; this Pillow says "truncated" for both
    assert reason(data[: len(data) // 2], cfg()) == "truncated"
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False


def test_huge_header_is_rejected_before_decoding_and_without_warning():
    max_pixels = Image.MAX_IMAGE_PIXELS
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        t0 = time.perf_counter()
        # beyond 2x Pillow's limit: Pillow's DecompressionBombError
        assert reason(png_header_only(20000, 20000), cfg()) == "too_large"
        # between 1x and 2x: Pillow only warns, our max_pixels (same default) rejects
        assert reason(png_header_only(10000, 10000), cfg()) == "too_large"
        # far below Pillow's limit but above ours; the IDAT is empty, so only a header check passes this
        assert reason(png_header_only(200, 200), cfg(max_pixels=10_000)) == "too_large"
        assert time.perf_counter() - t0 < 1.0
    assert not [w for w in caught if issubclass(w.category, Image.DecompressionBombWarning)]
    assert Image.MAX_IMAGE_PIXELS == max_pixels
    # the same 200x200 header with a generous limit gets as far as decoding, and fails there
    assert reason(png_header_only(200, 200), cfg()) in ("truncated", "decode_error")


def test_size_and_aspect_filters_use_the_original_size():
    assert reason(encode(Image.new("RGB", (30, 30))), cfg(min_size=64)) == "too_small"
    assert reason(encode(Image.new("RGB", (400, 100))), cfg(min_size=64, max_aspect_ratio=3.0)) == "aspect_ratio"
    assert reason(encode(Image.new("RGB", (100, 400))), cfg(min_size=64, max_aspect_ratio=3.0)) == "aspect_ratio"
    # exactly at the limits passes
    r = process_image(encode(Image.new("RGB", (192, 64))), cfg(min_size=64, max_aspect_ratio=3.0))
    assert (r.original_width, r.original_height) == (192, 64)


@pytest.mark.parametrize("where", ["before IDAT", "after IDAT"])
def test_png_text_chunk_bomb_is_a_decode_error(where):
    # A zTXt chunk that inflates past Pillow's MAX_TEXT_CHUNK makes Pillow raise ValueError, at open
    # when it precedes the pixels and at load when it follows them.
    png = encode(Image.new("RGB", (64, 64)))
    body = b"k\x00\x00" + zlib.compress(b"a" * (PngImagePlugin.MAX_TEXT_CHUNK + 1))
    bomb = struct.pack(">I", len(body)) + b"zTXt" + body + struct.pack(">I", zlib.crc32(b"zTXt" + body))
    at = 33 if where == "before IDAT" else len(png) - 12  # after the IHDR chunk / before IEND
    assert reason(png[:at] + bomb + png[at:], cfg()) == "decode_error"


def test_corrupted_files_only_ever_raise_rejected():
    rng = np.random.default_rng(2)
    img = Image.fromarray((rng.random((24, 24, 3)) * 255).astype(np.uint8))
    sources = [encode(img, f) for f in ("PNG", "JPEG", "WEBP", "GIF", "BMP", "TIFF")]
    outcomes = set()
    for data in sources:
        for _ in range(6):
            bad = bytearray(data)
            for pos in rng.integers(0, len(bad), size=4):
                bad[pos] = int(rng.integers(0, 256))
            try:
                process_image(bytes(bad), cfg(image_size=16))
                outcomes.add("ok")
            except Rejected as e:
                outcomes.add(e.reason)
    assert outcomes <= {"ok", "decode_error", "truncated", "too_large", "too_small", "aspect_ratio"}


# --------------------------------------------------------------------------------------------
# Resizing and encoding


def test_center_crop_keeps_the_centre():
    wide = stripes(128, 64, [RED, GREEN, GREEN, BLUE])  # the centre square is all green
    r = process_image(encode(wide), cfg(image_size=32, resize_mode="center_crop"))
    assert (r.width, r.height) == (32, 32) and (r.original_width, r.original_height) == (128, 64)
    inner = pixels(r)[:, 2:-2].astype(int)  # edge columns may take a little colour from outside the box
    assert np.abs(inner - GREEN).max() <= 2


def test_pad_has_background_bars():
    wide = stripes(128, 64, [RED, GREEN, GREEN, BLUE])
    r = process_image(encode(wide), cfg(image_size=32, resize_mode="pad", background=[7, 7, 7]))
    px = pixels(r)
    assert (r.width, r.height) == (32, 32)
    # scaled to 32x16 and centred: rows 0-7 and 24-31 are background
    assert (px[:8] == 7).all() and (px[24:] == 7).all()
    assert tuple(px[16, 2]) == RED and tuple(px[16, 16]) == GREEN and tuple(px[16, 29]) == BLUE


@pytest.mark.parametrize(
    "size,image_size,expected",
    [((128, 64), 32, (32, 16)), ((50, 100), 64, (32, 64)), ((20, 10), 64, (64, 32))],  # the last upscales
)
def test_keep_ratio_sets_the_longer_side(size, image_size, expected):
    r = process_image(encode(Image.new("RGB", size, RED)), cfg(image_size=image_size, min_size=8, resize_mode="keep_ratio"))
    assert (r.width, r.height) == expected
    assert np.abs(pixels(r).astype(int) - RED).max() <= 1


@pytest.mark.parametrize("fmt,pil_format", [("png", "PNG"), ("jpg", "JPEG"), ("webp", "WEBP")])
def test_output_format_and_extension(fmt, pil_format):
    r = process_image(encode(Image.new("RGB", (80, 80), BLUE)), cfg(image_format=fmt, quality=90))
    out = Image.open(io.BytesIO(r.data))
    assert r.ext == fmt and out.format == pil_format and out.size == (64, 64)


def test_content_hash_depends_on_pixels_not_on_source_format():
    a = (np.random.default_rng(3).random((64, 64, 3)) * 255).astype(np.uint8)
    img = Image.fromarray(a)
    from_png = process_image(encode(img, "PNG"), cfg())
    from_webp = process_image(encode(img, "WEBP", lossless=True), cfg())
    assert from_webp.notes["format"] == "WEBP"
    assert from_png.content_hash == from_webp.content_hash
    a[0, 0] = 255 - a[0, 0]
    assert process_image(encode(Image.fromarray(a)), cfg()).content_hash != from_png.content_hash
    # the same pixel bytes in another shape are another picture
    c = cfg(image_size=40, min_size=8, resize_mode="keep_ratio")
    wide, tall = (process_image(encode(Image.new("RGB", s, RED)), c) for s in ((40, 20), (20, 40)))
    assert Image.open(io.BytesIO(wide.data)).tobytes() == Image.open(io.BytesIO(tall.data)).tobytes()
    assert wide.content_hash != tall.content_hash


# --------------------------------------------------------------------------------------------
# JPEG draft mode


@pytest.mark.parametrize(
    "w,h,mode,expected",
    [
        (2048, 1536, "center_crop", (64, 64)),
        (1536, 2048, "center_crop", (64, 64)),
        (2048, 1536, "pad", (64, 1)),
        (1536, 2048, "pad", (1, 64)),
        (2048, 1536, "keep_ratio", (64, 1)),
    ],
)
def test_draft_size_arithmetic(w, h, mode, expected):
    assert draft_size(w, h, cfg(resize_mode=mode)) == expected


@pytest.mark.parametrize(
    "w,h,n,mode,drafted",
    [
        (2048, 1536, 64, "center_crop", (256, 192)),  # 1/8, the most draft does
        (2048, 1536, 512, "center_crop", (1024, 768)),  # 1/4 would make the shorter side 384 < 512
        (2048, 1536, 512, "pad", (512, 384)),  # only the longer side must stay >= 512
        (1536, 2048, 512, "keep_ratio", (384, 512)),
        (600, 500, 256, "center_crop", (600, 500)),  # 1/2 would make the shorter side 250 < 256
        (600, 500, 256, "pad", (300, 250)),
        (300, 200, 512, "pad", (300, 200)),  # smaller than the output: decoded in full, then upscaled
    ],
)
def test_draft_reduces_as_far_as_the_resize_mode_allows(w, h, n, mode, drafted):
    c = cfg(image_size=n, resize_mode=mode)
    img = Image.open(io.BytesIO(encode(Image.new("RGB", (w, h)), "JPEG")))
    img.draft("RGB", draft_size(w, h, c))
    assert img.size == drafted
    side = min if mode == "center_crop" else max
    assert side(img.size) >= min(n, side(w, h))  # enough pixels left for the final resize
    scale = w // img.size[0]
    assert scale == 8 or -(-side(w, h) // (2 * scale)) < n  # and the next power of two would be too far


def test_large_jpeg_is_decoded_at_reduced_size_and_correctly():
    big = stripes(2048, 1536, [RED, RED, BLUE, BLUE])
    r = process_image(encode(big, "JPEG", quality=90), cfg(image_size=64, min_size=64))
    assert r.notes["decoded_size"] == [256, 192]  # 1/8 scale; the shorter side 192 >= 64
    assert (r.original_width, r.original_height) == (2048, 1536)
    px = pixels(r).astype(int)
    assert (r.width, r.height) == (64, 64)
    assert np.abs(px[:, :28] - RED).max() <= 12 and np.abs(px[:, 36:] - BLUE).max() <= 12


def test_draft_with_exif_rotation_is_orientation_independent():
    # stored 2048x1024 landscape, displayed 1024x2048 portrait; pad needs the longer side >= 64
    stored = stripes(2048, 1024, [RED, BLUE])
    data = encode(stored, "JPEG", quality=90, exif=_exif(6))
    r = process_image(data, cfg(image_size=64, resize_mode="pad", max_aspect_ratio=3.0, background=[0, 0, 0]))
    assert r.notes["decoded_size"] == [256, 128]
    assert (r.original_width, r.original_height) == (1024, 2048)
    px = pixels(r).astype(int)
    # displayed 32x64 in the middle: background bars at the left and right
    assert px[:, :14].max() <= 10 and px[:, 50:].max() <= 10
    # rotated clockwise: stored left (red) is now on top
    assert np.abs(px[8, 32] - RED).max() <= 12 and np.abs(px[56, 32] - BLUE).max() <= 12


# --------------------------------------------------------------------------------------------
# Captions


def test_caption_nfc_whitespace_and_control_characters():
    c = cfg()
    assert clean_caption("caf\u0065\u0301", c) == ("caf\u00e9", False)
    assert clean_caption("  a\tred\n\n circle\u00a0on\r\nwhite  ", c) == ("a red circle on white", False)
    assert clean_caption("a\x00 b\x07c\x7f\u009f d", c) == ("a bc d", False)
    assert clean_caption("a\u3000b\u2028c", c) == ("a b c", False)


def test_caption_bytes_bom_and_invalid_utf8():
    assert clean_caption("\ufeffa cat".encode("utf-8"), cfg()) == ("a cat", False)
    assert clean_caption("\ufeffa cat", cfg()) == ("a cat", False)
    assert clean_caption("é".encode("utf-8"), cfg()) == ("é", False)
    bad = b"a caf\xe9 sign"  # latin-1 byte
    assert clean_caption(bad, cfg(caption_errors="replace")) == ("a caf\ufffd sign", True)
    with pytest.raises(Rejected) as e:
        clean_caption(bad, cfg(caption_errors="reject"))
    assert e.value.reason == "bad_encoding"
    # undecodable bytes smuggled into a str as lone surrogates follow the same policy
    smuggled = bad.decode("utf-8", errors="surrogateescape")
    assert clean_caption(smuggled, cfg(caption_errors="replace")) == ("a caf\ufffd sign", True)
    with pytest.raises(Rejected):
        clean_caption(smuggled, cfg(caption_errors="reject"))


def test_caption_cap_cuts_at_a_word_boundary():
    c = cfg(caption_max_chars=20)
    assert clean_caption("a small red circle on a white field", c) == ("a small red circle", False)
    # a space right after the cap: nothing to cut off
    assert clean_caption("abcdefghijklmnop qrs tuv", c) == ("abcdefghijklmnop qrs", False)
    # no space in the last 20%: hard cut
    assert clean_caption("ab abcdefghijklmnopqrstuvwxyz", c) == ("ab abcdefghijklmnopq", False)
    assert len(clean_caption("x" * 1000, cfg())[0]) == 512


def test_empty_and_missing_captions():
    for raw in ("", "   \n\t", b"\x00\x01", b"\xef\xbb\xbf"):
        with pytest.raises(Rejected) as e:
            clean_caption(raw, cfg())
        assert e.value.reason == "empty_caption"
        assert clean_caption(raw, cfg(keep_empty_captions=True)) == ("", False)
    assert clean_caption(b"\xff", cfg(keep_empty_captions=True)) == ("\ufffd", True)
    with pytest.raises(Rejected) as e:
        clean_caption(None, cfg(keep_empty_captions=True))
    assert e.value.reason == "missing_caption"
