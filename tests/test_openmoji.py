"""The openmoji source on a small fake npm tarball built here (never a download): the real ingest
writes shards and index, captions come from annotations, held-out annotations are only in val,
bad SVGs and bad tarballs are reported, and a rerun gives the same bytes."""

from __future__ import annotations

import io
import json
import os
import stat
import tarfile
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from diffusion.config import IngestConfig, OpenmojiConfig, load_params
from diffusion.data import openmoji
from diffusion.data.ingest import ingest
from diffusion.errors import MissingInputError, T2IError

ROOT = Path(__file__).resolve().parents[1]
VAL_FRACTION = 0.3

SVG = ('<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 72 72">'
       '<{shape} fill="{fill}" stroke="#000" stroke-width="2"/></svg>')
CIRCLE, SQUARE = 'circle cx="36" cy="36" r="28"', 'rect x="10" y="10" width="52" height="52"'

# hexcode, annotation, tags, openmoji_tags, group, skintone, base hexcode, (shape, fill) or raw SVG text
EMOJI = [
    ("1F600", "grinning face", "face, grin, happy", "smile", "smileys-emotion", "", "", (CIRCLE, "#fcea2b")),
    ("1F34E", "red apple", "apple, fruit, red", "", "food-drink", "", "", (CIRCLE, "#d22f27")),
    ("1F34F", "green apple", "apple, fruit, green", "", "food-drink", "", "", (CIRCLE, "#5c9e31")),
    ("1F7E6", "blue square", "blue, square", "", "symbols", "", "", (SQUARE, "#1e50a0")),
    ("1F7E7", "orange square", "orange, square", "", "symbols", "", "", (SQUARE, "#f4aa41")),
    ("1F7EA", "purple square", "purple, square", "", "symbols", "", "", (SQUARE, "#b399c8")),
    ("1F44B", "waving hand", "hand, wave, waving", "", "people-body", "", "", (CIRCLE, "#ffffff")),
    ("1F44B-1F3FB", "waving hand: light skin tone", "", "", "people-body", 1, "1F44B", (CIRCLE, "#fadcbc")),
    ("1F1E9-1F1EA", "flag: Germany", "flag", "", "flags", "", "", (SQUARE, "#000000")),
    ("E0FF0", "flag: Germany (old)", "flag", "", "extras-openmoji", "", "", (SQUARE, "#000000")),  # same picture
    ("1F95D", "kiwi fruit", "fruit, kiwi", "", "food-drink", "", "", '<svg xmlns="http://www.w3.org/2000/svg"><circ'),
    ("E0FF1", "atom symbol", "science", "atom", "extras-openmoji", "", "", (CIRCLE, "#92d3f5")),
    ("1F9FF", "nazar amulet", "amulet, charm", "", "activities", "", "", None),  # listed, but no SVG
]


def _entry(hexcode, annotation, tags, om_tags, group, skintone, base) -> dict:
    return {"emoji": "?", "hexcode": hexcode, "group": group, "subgroups": "test", "annotation": annotation,
            "tags": tags, "openmoji_tags": om_tags, "openmoji_author": "Test", "skintone": skintone,
            "skintone_base_hexcode": base}


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime = len(data), 0
    tar.addfile(info, io.BytesIO(data))


@pytest.fixture(scope="module")
def tarball(tmp_path_factory) -> Path:
    """An npm-style openmoji-*.tgz: package/data/openmoji.json and package/color/svg/*.svg."""
    path = tmp_path_factory.mktemp("npm") / "openmoji-0.0.1.tgz"
    with tarfile.open(path, "w:gz") as tar:
        _add(tar, "package/package.json", b'{"name": "openmoji", "version": "0.0.1"}')
        _add(tar, "package/data/openmoji.json", json.dumps([_entry(*e[:7]) for e in EMOJI]).encode())
        for e in EMOJI:
            if e[7] is None:
                continue
            svg = e[7] if isinstance(e[7], str) else SVG.format(shape=e[7][0], fill=e[7][1])
            _add(tar, f"package/color/svg/{e[0]}.svg", svg.encode())
        _add(tar, "package/black/svg/1F600.svg", b"<svg/>")  # not needed: not unpacked
    return path


def config(path, tmp: Path, **kw) -> IngestConfig:
    om = OpenmojiConfig(cache=str(tmp / "cache"), **kw.pop("openmoji", {}))
    return IngestConfig(source="openmoji", path=str(path), image_size=16, val_fraction=VAL_FRACTION,
                        dedupe=True, samples_per_shard=5, workers=2, openmoji=om, **kw)


def rows(out: Path, split: str) -> list[dict]:
    return pq.read_table(out / f"index-{split}.parquet").to_pylist()


def shard_bytes(out: Path) -> dict[str, bytes]:
    return {p.relative_to(out).as_posix(): p.read_bytes() for p in sorted(out.glob("*/shard-*.tar"))}


def test_ingest_renders_captions_splits_and_counts(tarball, tmp_path):
    out = tmp_path / "shards"
    stats = ingest(config(tarball, tmp_path), None, out, progress=False)
    # 13 entries - 1 skin-tone variant = 12 items; the kiwi's SVG is corrupt, the second flag a
    # duplicate, the amulet's SVG missing
    assert stats["items"] == 12
    assert stats["rejected"] == {"decode_error": 1, "missing_image": 1, "duplicate": 1}
    train, val = rows(out, "train"), rows(out, "val")
    assert len(train) + len(val) == stats["accepted"] == 9
    assert all((out / r["shard"]).is_file() for r in train + val)
    held = {e[1] for e in EMOJI if openmoji.held_out(e[1], VAL_FRACTION)}
    assert held - {"kiwi fruit", "flag: Germany (old)", "nazar amulet"}  # the fixture exercises both splits
    for r in val:  # whole annotations, captioned plainly
        meta = json.loads(r["meta"])
        assert r["caption"] == meta["annotation"] and meta["annotation"] in held
        assert meta["license"] == "CC BY-SA 4.0" and meta["source"] == "openmoji"
    for r in train:  # the annotation, or a variant built from it and its tags
        meta = json.loads(r["meta"])
        assert meta["annotation"] not in held and r["caption"] in openmoji.caption_variants(
            {"annotation": meta["annotation"], **_tags_of(meta["hexcode"])})
    assert any(r["caption"] != json.loads(r["meta"])["annotation"] for r in train)
    assert not any("skin tone" in r["caption"] for r in train + val)
    assert stats["image_size"] == 16
    # every emoji is drawn on a transparent canvas, flattened over ingest.background; the dropped
    # flag names the kept one it repeats
    assert all(json.loads(r["meta"]).get("alpha_flattened") for r in train + val)
    [dup] = pq.read_table(out / "duplicates.parquet").to_pylist()
    kept = next(json.loads(r["meta"]) for r in train + val if r["key"] == dup["kept_key"])
    assert dup["source_id"] != kept["source_id"] and kept["group"] == "flags"


def _tags_of(hexcode: str) -> dict:
    e = next(e for e in EMOJI if e[0] == hexcode)
    return {"tags": e[2], "openmoji_tags": e[3]}


def test_rerun_is_byte_identical_and_a_package_folder_gives_the_same_shards(tarball, tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    ingest(config(tarball, tmp_path), None, a, progress=False)
    first = shard_bytes(a)
    mtimes = {p: p.stat().st_mtime_ns for p in a.rglob("*") if p.is_file()}
    ingest(config(tarball, tmp_path), None, a, progress=False)
    assert {p: p.stat().st_mtime_ns for p in a.rglob("*") if p.is_file()} == mtimes  # nothing rewritten
    unpacked = next(p for p in (tmp_path / "cache").iterdir() if p.is_dir() and not p.name.startswith("."))
    ingest(config(unpacked, tmp_path), None, b, progress=False)
    assert shard_bytes(b) == first


def test_skin_tones_on_request_follow_their_base_emoji(tarball, tmp_path):
    out = tmp_path / "shards"
    stats = ingest(config(tarball, tmp_path, openmoji={"skintones": True}), None, out, progress=False)
    assert stats["items"] == 13
    split = {json.loads(r["meta"])["hexcode"]: sp for sp in ("train", "val") for r in rows(out, sp)}
    assert split["1F44B-1F3FB"] == split["1F44B"]


def test_plain_annotations_only_when_variants_are_off(tarball, tmp_path):
    out = tmp_path / "shards"
    ingest(config(tarball, tmp_path, openmoji={"caption_variants": False}), None, out, progress=False)
    assert all(r["caption"] == json.loads(r["meta"])["annotation"] for r in rows(out, "train"))


def test_a_missing_or_unreadable_tarball_is_one_line(tmp_path):
    missing = tmp_path / "openmoji-17.0.0.tgz"
    with pytest.raises(MissingInputError, match=f"OpenMoji tarball not found: {missing}.*null to fetch it"):
        ingest(config(missing, tmp_path), None, tmp_path / "out", progress=False)
    missing.write_bytes(b"\x1f\x8b not really gzip")
    with pytest.raises(T2IError, match=f"cannot read the OpenMoji tarball {missing}") as e:
        ingest(config(missing, tmp_path), None, tmp_path / "out", progress=False)
    assert "\n" not in str(e.value)
    with pytest.raises(MissingInputError, match="not an OpenMoji package folder"):
        ingest(config(tmp_path, tmp_path), None, tmp_path / "out", progress=False)


def test_npm_missing_or_failing_is_one_line(tmp_path, monkeypatch):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    monkeypatch.setenv("PATH", str(bin_dir))
    with pytest.raises(T2IError, match="npm is not installed"):
        openmoji.package_root("npm", OpenmojiConfig(cache=str(tmp_path / "cache")))
    npm = bin_dir / "npm"
    npm.write_text("#!/bin/sh\necho 'npm error code E404' >&2\necho 'npm error 404 Not Found' >&2\nexit 1\n")
    npm.chmod(npm.stat().st_mode | stat.S_IEXEC)
    with pytest.raises(T2IError, match=r"npm pack openmoji@17.0.0 failed \(npm error 404 Not Found\)") as e:
        openmoji.package_root(None, OpenmojiConfig(cache=str(tmp_path / "cache")))
    assert "\n" not in str(e.value) and not list((tmp_path / "cache").glob("*.tgz"))


def test_npm_pack_is_run_once_into_the_cache(tarball, tmp_path, monkeypatch):
    bin_dir, log = tmp_path / "bin", tmp_path / "calls"
    bin_dir.mkdir()
    npm = bin_dir / "npm"
    npm.write_text(f"#!/bin/sh\necho \"$@\" >> {log}\ncp {tarball} ./openmoji-17.0.0.tgz\n")
    npm.chmod(npm.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    cfg = OpenmojiConfig(cache=str(tmp_path / "cache"))
    first = openmoji.package_root(None, cfg)
    assert openmoji.package_root("npm", cfg) == first and (first / openmoji.METADATA).is_file()
    assert log.read_text().split("\n")[:-1] == ["pack openmoji@17.0.0"]
    assert not (first / "black").exists()  # only the metadata and the colour SVGs are unpacked


def test_the_presets_load_and_set_the_source():
    for size in (32, 64):
        p = load_params(ROOT / "params" / f"openmoji-{size}.yaml")
        assert (p.ingest.source, p.ingest.image_size, p.ingest.path) == ("openmoji", size, None)
        # the recipe chosen by measurement (docs/results.md, "OpenMoji at 32 px")
        assert p.ingest.dedupe and p.train.prediction == "v" and p.train.loss_weighting == "none"
        assert p.train.timestep_sampling == "logit_normal" and p.train.unseen_words == 0 and not p.train.unet.zero_init
        assert p.train.unet.qk_norm  # SD3's QK-norm (docs/results.md, "OpenMoji at 32 px")
        assert p.train.unet.text_layers == 1  # the caption refiner (docs/results.md, "OpenMoji at 32 px")
