"""OpenMoji (https://openmoji.org): the real reference dataset the project builds for itself.

The npm package ``openmoji`` holds the colour SVGs (``color/svg/<hexcode>.svg``) and their
metadata (``data/openmoji.json``: annotation, tags, group, skin tone, ...). This module finds or
fetches the package once (``package_root``: an ``openmoji-*.tgz`` tarball, an unpacked package
folder, or ``npm pack`` into the cache), lists the emoji with their caption and split
(``load_entries``), and renders one SVG at the output size (``render``). The ingest source
``openmoji`` (diffusion.data.ingest.sources) turns them into ordinary shard samples.

- **Split:** whole annotations are held out. An emoji goes to val when the hash of its base
  annotation (a skin-tone variant's is its base emoji's) falls below ``ingest.val_fraction``, so
  no val emoji, nor any variant of one, is seen in training.
- **Captions:** val uses the plain annotation ("red apple"); training uses the annotation or a
  variant built from it and its tags ("red apple, fruit", "an emoji of a red apple"), chosen by
  the hash of the hexcode, so every run picks the same one.
- **Licence:** the artwork is CC BY-SA 4.0; every sample's metadata carries it and the source.

Everything is deterministic: the same package gives the same list, captions, splits and pixels.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import subprocess
import tarfile
import tempfile
import zlib
from pathlib import Path

from diffusion.config import OpenmojiConfig
from diffusion.errors import MissingInputError, T2IError

LICENSE = "CC BY-SA 4.0"
ATTRIBUTION = "OpenMoji, the open-source emoji and icon project (https://openmoji.org), CC BY-SA 4.0"
METADATA = "data/openmoji.json"
SVG_DIR = "color/svg"
_KEEP = (METADATA, "package.json", "LICENSE.txt", "README.md")  # what is unpacked besides the SVGs


# --------------------------------------------------------------------------------------------
# Finding the package


def _is_package(folder: Path) -> bool:
    return (folder / METADATA).is_file()


def package_root(path: str | None, cfg: OpenmojiConfig) -> Path:
    """The unpacked package folder for ``ingest.path``: a folder (the package, or one holding
    ``package/``), an npm tarball (unpacked into the cache once), or null/``npm`` (fetched with
    ``npm pack`` into the cache once)."""
    if path in (None, "", "npm"):
        return unpack(fetch_npm(cfg.version, Path(cfg.cache)), Path(cfg.cache))
    p = Path(path).expanduser()
    if p.is_dir():
        for folder in (p, p / "package"):
            if _is_package(folder):
                return folder
        raise MissingInputError(f"ingest.path: {p} is not an OpenMoji package folder (no {METADATA}); "
                                "point it at the unpacked npm package or an openmoji-*.tgz")
    if not p.is_file():
        raise MissingInputError(f"ingest.path: OpenMoji tarball not found: {p}; set ingest.path to an "
                                "openmoji-*.tgz or package folder, or to null to fetch it with npm")
    return unpack(p, Path(cfg.cache))


def fetch_npm(version: str, cache: Path) -> Path:
    """``npm pack openmoji@<version>`` into ``cache``, once; returns the tarball."""
    tarball = cache / f"openmoji-{version}.tgz"
    if tarball.is_file():
        return tarball
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache, prefix=".npm-") as tmp:  # a killed pack leaves no tarball
        try:
            done = subprocess.run(["npm", "pack", f"openmoji@{version}"], cwd=tmp, capture_output=True,
                                  text=True, timeout=900)
        except FileNotFoundError:
            raise T2IError("ingest.path: npm is not installed, so OpenMoji cannot be fetched; install Node.js "
                           "and npm, or set ingest.path to an openmoji-*.tgz or unpacked package folder") from None
        except subprocess.TimeoutExpired:
            raise T2IError(f"ingest.path: npm pack openmoji@{version} timed out; retry, or set ingest.path "
                           "to an openmoji-*.tgz") from None
        packed = sorted(Path(tmp).glob("openmoji-*.tgz"))
        if done.returncode != 0 or not packed:
            lines = [ln for ln in (done.stderr or done.stdout or "").splitlines() if ln.strip()]
            why = lines[-1].strip() if lines else f"exit status {done.returncode}"
            raise T2IError(f"ingest.path: npm pack openmoji@{version} failed ({why}); check the network "
                           "and ingest.openmoji.version, or set ingest.path to an openmoji-*.tgz")
        os.replace(packed[0], tarball)
    return tarball


def _wanted(name: str) -> str | None:
    """A tar member's path inside the unpacked folder, or None for what is not needed or unsafe."""
    parts = name.replace("\\", "/").split("/")
    if name.startswith("/") or ".." in parts:
        return None
    rel = "/".join(parts[1:]) if parts[0] == "package" else "/".join(parts)
    if rel in _KEEP or (rel.startswith(SVG_DIR + "/") and rel.endswith(".svg") and rel.count("/") == 2):
        return rel
    return None


def unpack(tarball: Path, cache: Path) -> Path:
    """Unpack the metadata and colour SVGs of ``tarball`` into ``cache``, once (the folder is named
    after the tarball's content hash and renamed into place when complete)."""
    try:
        digest = hashlib.sha256(tarball.read_bytes()).hexdigest()[:12]
    except OSError as e:
        raise T2IError(f"ingest.path: cannot read the OpenMoji tarball {tarball} ({e.strerror or e})") from None
    out = cache / f"{tarball.name.removesuffix('.tgz').removesuffix('.tar.gz')}-{digest}"
    if _is_package(out):
        return out
    cache.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=cache, prefix=".unpack-"))
    try:
        with tarfile.open(tarball, "r:gz") as tar:  # npm packs gzip tarballs
            for m in tar:
                rel = _wanted(m.name)
                if rel is None or not m.isreg():  # links, devices, ../ names and unneeded files stay out
                    continue
                dest = tmp / rel
                dest.parent.mkdir(parents=True, exist_ok=True)
                dest.write_bytes(tar.extractfile(m).read())
        if not _is_package(tmp):
            raise T2IError(f"ingest.path: {tarball} is not an OpenMoji package (no package/{METADATA}); "
                           "use the openmoji npm tarball (npm pack openmoji@17.0.0)")
        shutil.rmtree(out, ignore_errors=True)
        os.replace(tmp, out)
    except (tarfile.TarError, EOFError, OSError, zlib.error) as e:
        why = " ".join(str(e).split()) or type(e).__name__
        raise T2IError(f"ingest.path: cannot read the OpenMoji tarball {tarball} ({why}); "
                       "download it again or set ingest.path to null to fetch it with npm") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def package_version(root: Path) -> str | None:
    try:
        return json.loads((root / "package.json").read_text()).get("version")
    except (OSError, ValueError, AttributeError):
        return None


# --------------------------------------------------------------------------------------------
# The emoji list: selection, split, captions


def _unit_hash(text: str, salt: str) -> float:
    """A number in [0, 1) from the sha1 of ``salt:text``: the same on every machine and run."""
    return int(hashlib.sha1(f"{salt}:{text}".encode()).hexdigest()[:8], 16) / 0x1_0000_0000


def held_out(annotation: str, fraction: float) -> bool:
    """Whether every emoji with this (base) annotation belongs to the val split."""
    return _unit_hash(annotation.strip().lower(), "openmoji-holdout") < fraction


def _tags(entry: dict) -> list[str]:
    """The entry's tags (OpenMoji's own first, then Unicode's), without words of the annotation."""
    words = set(str(entry.get("annotation", "")).lower().replace(":", " ").split())
    out: list[str] = []
    for field in ("openmoji_tags", "tags"):
        for tag in str(entry.get(field) or "").split(","):
            tag = " ".join(tag.lower().split())
            if any(c.isalpha() for c in tag) and tag not in out and not set(tag.split()) <= words:
                out.append(tag)
    return out


def caption_variants(entry: dict) -> list[str]:
    """The training captions of one emoji: the annotation, then variants with its tags and a phrase."""
    name = " ".join(str(entry.get("annotation", "")).split())
    if not name:
        return [""]
    tags = _tags(entry)
    article = "an" if name[0].lower() in "aeiou" else "a"
    out = [name, f"an emoji of {article} {name}"]
    if tags:
        out.append(f"{name}, {tags[0]}")
    if len(tags) > 1:
        out.append(f"{name}, {tags[0]}, {tags[1]}")
    return out


def training_caption(entry: dict, variants: bool) -> str:
    """One caption per emoji, chosen by the hash of its hexcode (the same on every run)."""
    options = caption_variants(entry) if variants else caption_variants(entry)[:1]
    return options[int(_unit_hash(str(entry["hexcode"]), "openmoji-caption") * len(options))]


def _read_metadata(root: Path) -> list[dict]:
    try:
        data = json.loads((root / METADATA).read_bytes())
    except (OSError, ValueError) as e:
        raise T2IError(f"ingest.path: cannot read {root / METADATA} ({type(e).__name__}); "
                       "the OpenMoji package is incomplete: fetch it again") from None
    if not isinstance(data, list):
        raise T2IError(f"ingest.path: {root / METADATA} is not a list of emoji")
    return [e for e in data if isinstance(e, dict) and e.get("hexcode")]


def load_entries(root: Path, cfg: OpenmojiConfig, val_fraction: float) -> list[dict]:
    """Every emoji that is ingested, in the package's order, as JSON-able records: hexcode, the
    SVG's relative path and content hash, split, caption and the metadata kept with the sample."""
    entries = _read_metadata(root)
    by_hex = {str(e["hexcode"]): e for e in entries}
    out = []
    for e in entries:
        if e.get("skintone") not in ("", None) and not cfg.skintones:
            continue  # a variant of a base emoji with the same picture in another skin colour
        base = by_hex.get(str(e.get("skintone_base_hexcode") or ""), e)
        split = "val" if held_out(str(base.get("annotation", "")), val_fraction) else "train"
        svg = f"{SVG_DIR}/{e['hexcode']}.svg"
        try:
            svg_hash = hashlib.sha1((root / svg).read_bytes()).hexdigest()[:16]
        except OSError:
            svg_hash = None  # the reader rejects it as missing_image
        caption = str(e.get("annotation", "")) if split == "val" else training_caption(e, cfg.caption_variants)
        meta = {k: e.get(k) for k in ("hexcode", "emoji", "annotation", "group", "subgroups", "skintone",
                                       "openmoji_author") if e.get(k) not in (None, "")}
        out.append({"hexcode": str(e["hexcode"]), "svg": svg, "svg_sha1": svg_hash, "split": split,
                    "caption": caption, "meta": meta})
    return out


# --------------------------------------------------------------------------------------------
# Rendering


def check_renderer() -> None:
    """Fail early, in one line, when cairosvg (or the cairo library under it) is missing."""
    try:
        import cairosvg  # noqa: F401
    except (ImportError, OSError) as e:
        raise T2IError(f"the openmoji source renders SVGs with cairosvg, which cannot be loaded ({e}); "
                       "pip install cairosvg (it needs the cairo library)") from None


def render(svg: bytes, size: int, supersample: int, background: list[int]):
    """One SVG -> (an RGB PIL image ``size`` x ``size``, whether any pixel was see-through): drawn
    at ``size * supersample`` with cairo, flattened onto ``background``, then area-averaged down
    (clean anti-aliased edges). Raises ValueError for an SVG that cannot be drawn."""
    import cairosvg
    from PIL import Image

    big = size * supersample
    try:
        png = cairosvg.svg2png(bytestring=svg, output_width=big, output_height=big, unsafe=False)
        img = Image.open(io.BytesIO(png))
        img.load()
    except Exception as e:  # corrupt XML or SVG can raise almost anything
        raise ValueError(f"{type(e).__name__}: {e}") from None
    rgba = img.convert("RGBA")
    flat = Image.alpha_composite(Image.new("RGBA", rgba.size, (*background, 255)), rgba).convert("RGB")
    if flat.size != (big, big):  # an SVG without a square viewBox: cairo keeps its aspect ratio
        flat = flat.resize((big, big), Image.Resampling.BOX)
    see_through = rgba.getchannel("A").getextrema()[0] < 255
    return (flat.reduce(supersample) if supersample > 1 else flat), see_through  # reduce: the mean of each block
