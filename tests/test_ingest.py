"""Ingestion end to end over real files, tables, tars and a real HTTP server on loopback."""

from __future__ import annotations

import http.server
import io
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import webdataset as wds
from PIL import Image

from corpus import encode, good_images, picture, write_folder_corpus, write_tar
from diffusion.config import DownloadConfig, IngestConfig
from diffusion.data.ingest import ingest, split_of, stable_key
from diffusion.artifacts import list_shards

FAST_DL = DownloadConfig(timeout=0.5, retries=1, backoff=0.05, concurrency=8, max_bytes=2_000_000)


def cfg(source: str, path, **kw) -> IngestConfig:
    base = dict(source=source, path=str(path), image_size=64, image_format="jpg", samples_per_shard=8,
                val_fraction=0.25, workers=2, download=FAST_DL)
    base.update(kw)
    return IngestConfig(**base)


def read_back(out: Path) -> list[dict]:
    """Every sample of every shard, through plain webdataset (no project code)."""
    urls = list_shards(out / "train") + list_shards(out / "val")
    return list(wds.WebDataset(urls, shardshuffle=False, empty_check=False)) if urls else []


def check_consistent(out: Path, stats: dict, empty_captions: int = 0) -> list[dict]:
    samples = read_back(out)
    assert len(samples) == stats["accepted"]
    assert stats["accepted"] + stats["rejected_total"] == stats["items"]
    for s in samples:  # only valid samples reach a shard
        ext = next(e for e in ("jpg", "png", "webp") if e in s)
        with Image.open(io.BytesIO(s[ext])) as im:
            im.load()
            assert im.mode == "RGB"
        empty_captions -= not s["txt"].decode("utf-8").strip()
        meta = json.loads(s["json"])
        assert {"source_id", "original_width", "original_height", "sha256", "caption_id"} <= set(meta)
    assert empty_captions == 0, "empty captions only where kept on purpose"
    index = sum(pq.read_table(out / f"index-{sp}.parquet").num_rows for sp in ("train", "val"))
    assert index == stats["accepted"]
    return samples


def test_folder_corpus_every_case_counted(tmp_path):
    accepted, expected = write_folder_corpus(tmp_path / "in")
    stats = ingest(cfg("folder", tmp_path / "in"), None, tmp_path / "out", progress=False)
    assert stats["rejected"] == dict(expected)
    assert stats["accepted"] == accepted
    assert stats["captions_replaced"] == 1
    samples = check_consistent(tmp_path / "out", stats)
    captions = {s["txt"].decode() for s in samples}
    assert "caf\ufffd \ufffd caption" in captions and "caption from json" in captions
    assert "the original" in captions and "the same pixels again" not in captions  # first copy wins
    rotated = next(json.loads(s["json"]) for s in samples if b"rotated.jpg" in s["txt"])
    assert (rotated["original_width"], rotated["original_height"]) == (80, 120)  # EXIF applied


def test_reject_modes_for_captions(tmp_path):
    write_folder_corpus(tmp_path / "in")
    strict = ingest(cfg("folder", tmp_path / "in", caption_errors="reject", keep_empty_captions=True), None,
                    tmp_path / "out", progress=False)
    assert strict["rejected"]["bad_encoding"] == 1
    assert "empty_caption" not in strict["rejected"]
    check_consistent(tmp_path / "out", strict, empty_captions=1)


def test_keys_and_splits_are_stable(tmp_path):
    write_folder_corpus(tmp_path / "in")
    a = ingest(cfg("folder", tmp_path / "in"), None, tmp_path / "a", progress=False)
    b = ingest(cfg("folder", tmp_path / "in", workers=1, task_runner="processes"), None, tmp_path / "b",
               progress=False)
    ka = pq.read_table(tmp_path / "a/index-train.parquet").to_pylist()
    kb = pq.read_table(tmp_path / "b/index-train.parquet").to_pylist()
    assert [r["key"] for r in ka] == [r["key"] for r in kb]
    assert a["splits"] == b["splits"]
    for r in ka:
        assert r["key"] == stable_key(json.loads(r["meta"])["source_id"])
        assert split_of(r["key"], 0.25) == "train"
    shards_a = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*.tar"))
    for rel in shards_a:  # same bytes whatever the worker count or kind
        assert (tmp_path / "a" / rel).read_bytes() == (tmp_path / "b" / rel).read_bytes()


def test_table_sources_parquet_csv_jsonl(tmp_path):
    imgs = good_images()
    names = list(imgs)[:4]
    (tmp_path / "img").mkdir()
    for n in names:
        (tmp_path / "img" / n).write_bytes(imgs[n])
    # Hugging Face parquet export layout: a struct of bytes and path
    struct = pa.array([{"bytes": imgs[n], "path": n} for n in names] + [{"bytes": None, "path": None}],
                      type=pa.struct([("bytes", pa.binary()), ("path", pa.string())]))
    pq.write_table(pa.table({"image": struct, "text": [f"caption {n}" for n in names] + ["no image"]}),
                   tmp_path / "hf.parquet")
    stats = ingest(cfg("table", tmp_path / "hf.parquet", caption_column="text"), None, tmp_path / "o1",
                   progress=False)
    assert stats["accepted"] == 4 and stats["rejected"] == {"missing_image": 1}
    check_consistent(tmp_path / "o1", stats)
    # CSV with relative paths (one missing file), JSONL with paths
    lines = ["file,caption"] + [f"img/{n},\"caption, {n}\"" for n in names] + ["img/nope.png,gone"]
    (tmp_path / "t.csv").write_text("\n".join(lines) + "\n")
    stats = ingest(cfg("table", tmp_path / "t.csv", image_column="file"), None, tmp_path / "o2", progress=False)
    assert stats["accepted"] == 4 and stats["rejected"] == {"read_error": 1}
    (tmp_path / "t.jsonl").write_text("\n".join(json.dumps({"image": f"img/{n}", "caption": n}) for n in names))
    stats = ingest(cfg("table", tmp_path / "t.jsonl"), None, tmp_path / "o3", progress=False)
    assert stats["accepted"] == 4 and stats["rejected_total"] == 0


def test_table_row_groups_are_resized_and_keys_do_not_depend_on_them(tmp_path):
    imgs = [encode(picture(800 + i, (72, 72)), "PNG") for i in range(60)]
    table = pa.table({"image": imgs, "caption": [f"row {i}" for i in range(60)]})
    for name, group in (("one_group", 1000), ("small_groups", 5)):  # same table, same file name
        (tmp_path / name).mkdir()
        pq.write_table(table, tmp_path / name / "t.parquet", row_group_size=group)
    a = ingest(cfg("table", tmp_path / "one_group/t.parquet"), None, tmp_path / "a", progress=False)
    # the single 60-row group is rewritten once into groups of samples_per_shard (8) rows
    rewritten = list((tmp_path / "a/_work").glob("table-*.parquet"))
    assert len(rewritten) == 1 and pq.ParquetFile(rewritten[0]).metadata.num_row_groups == 8
    assert len(a["units"]) == 8 and a["accepted"] == 60
    b = ingest(cfg("table", tmp_path / "small_groups/t.parquet"), None, tmp_path / "b", progress=False)
    assert not (tmp_path / "b/_work").exists()  # small row groups are read in place
    assert len(b["units"]) == 12 and b["accepted"] == 60
    rows = {}
    for out in ("a", "b"):
        for split in ("train", "val"):
            for r in pq.read_table(tmp_path / out / f"index-{split}.parquet").to_pylist():
                rows.setdefault(out, {})[r["caption"]] = (r["key"], r["split"])
    assert rows["a"] == rows["b"]  # same key and split for every row, whatever the row grouping


def test_webdataset_source_img2dataset_layout_and_hostile_tar(tmp_path):
    members = []
    for i in range(5):
        key = f"{i:09d}"
        members += [(f"{key}.jpg", encode(picture(100 + i), "JPEG"), "file"),
                    (f"{key}.txt", f"img2dataset caption {i}".encode(), "file"),
                    (f"{key}.json", json.dumps({"url": f"http://x/{i}.jpg", "key": key, "status": "success"}).encode(),
                     "file")]
    write_tar(tmp_path / "00000.tar", members)
    hostile = [("../escape.jpg", encode(picture(200), "JPEG"), "file"),
               ("../escape.txt", b"escaped", "file"),
               ("/abs/path.jpg", encode(picture(201), "JPEG"), "file"),
               ("link.jpg", b"/etc/passwd", "symlink"),
               ("hard.jpg", b"00000.jpg", "hardlink"),
               ("ok.jpg", encode(picture(202), "JPEG"), "file"),
               ("ok.txt", b"fine", "file"),
               ("nocap.jpg", encode(picture(203), "JPEG"), "file"),
               ("onlytext.txt", b"no image here", "file")]
    write_tar(tmp_path / "00001.tar", hostile)
    stats = ingest(cfg("webdataset", str(tmp_path / "0000{0..1}.tar")), None, tmp_path / "out", progress=False)
    assert stats["rejected"] == {"unsafe_member": 5, "missing_caption": 1, "missing_image": 1}
    assert stats["accepted"] == 6
    samples = check_consistent(tmp_path / "out", stats)
    meta = [json.loads(s["json"]) for s in samples]
    assert {m["source_meta"]["url"] for m in meta if "source_meta" in m and "url" in m["source_meta"]} == \
        {f"http://x/{i}.jpg" for i in range(5)}
    assert not any(".." in m["source_id"] for m in meta)


class _Handler(http.server.BaseHTTPRequestHandler):
    images: dict[str, bytes] = {}

    def log_message(self, *args):
        pass

    def do_GET(self):
        path = self.path.lstrip("/")
        if path.startswith("img/") and path[4:] in self.images:
            self._send(200, self.images[path[4:]], "image/jpeg")
        elif path == "html":
            self._send(200, b"<html></html>", "text/html")
        elif path == "optout":
            self._send(200, encode(picture(300), "JPEG"), "image/jpeg", {"X-Robots-Tag": "noai"})
        elif path == "stall":
            time.sleep(2.0)
            self._send(200, b"", "image/jpeg")
        elif path == "huge":
            self._send(200, b"\xff" * 3_000_000, "image/jpeg")
        else:
            self._send(404, b"missing", "text/plain")

    def _send(self, code, body, ctype, headers=None):
        try:
            self.send_response(code)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            for k, v in (headers or {}).items():
                self.send_header(k, v)
            self.end_headers()
            self.wfile.write(body)
        except (BrokenPipeError, ConnectionResetError):
            pass


@pytest.fixture(scope="module")
def image_server():
    _Handler.images = {f"{i}.jpg": encode(picture(400 + i, (160, 120)), "JPEG", quality=90) for i in range(12)}
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_port}"
    server.shutdown()


def test_url_list_source(tmp_path, image_server):
    rows = [(f"{image_server}/img/{i}.jpg", f"picture {i}") for i in range(12)]
    rows += [(f"{image_server}/missing.jpg", "404"), (f"{image_server}/html", "not an image"),
             (f"{image_server}/optout", "opted out"), (f"{image_server}/stall", "stalls"),
             (f"{image_server}/huge", "too big"), ("http://127.0.0.1:1/refused.jpg", "refused"),
             ("not a url", "malformed"), (f"{image_server}/img/3.jpg", "duplicate of 3")]
    pq.write_table(pa.table({"url": [u for u, _ in rows], "caption": [c for _, c in rows]}), tmp_path / "urls.parquet")
    t0 = time.perf_counter()
    stats = ingest(cfg("urls", tmp_path / "urls.parquet"), None, tmp_path / "out", progress=False)
    assert time.perf_counter() - t0 < 30  # the stalling server cannot hang the run
    assert stats["accepted"] == 12
    assert stats["rejected"] == {"http_error": 1, "bad_content_type": 1, "opt_out": 1, "timeout": 1, "byte_cap": 1,
                                 "connection_error": 2, "duplicate": 1}
    samples = check_consistent(tmp_path / "out", stats)
    assert {json.loads(s["json"])["url"] for s in samples} == {u for u, _ in rows[:12]}


def _stat_snapshot(root: Path) -> dict:
    return {str(p.relative_to(root)): (p.stat().st_mtime_ns, p.stat().st_size) for p in root.rglob("*") if p.is_file()}


def test_completed_rerun_writes_nothing_and_changes_redo_only_what_changed(tmp_path):
    write_folder_corpus(tmp_path / "in")
    c = cfg("folder", tmp_path / "in")
    first = ingest(c, None, tmp_path / "out", progress=False)
    before = _stat_snapshot(tmp_path / "out")
    time.sleep(0.05)
    again = ingest(c, None, tmp_path / "out", progress=False)
    assert again == first
    assert _stat_snapshot(tmp_path / "out") == before  # nothing rewritten, not even touched
    # a new image at the end of the sorted listing: earlier units stay as they are
    (tmp_path / "in" / "zzz").mkdir()
    (tmp_path / "in" / "zzz" / "new.png").write_bytes(encode(picture(999), "PNG"))
    (tmp_path / "in" / "zzz" / "new.txt").write_text("a new one")
    third = ingest(c, None, tmp_path / "out", progress=False)
    assert third["accepted"] == first["accepted"] + 1
    after = _stat_snapshot(tmp_path / "out")
    last_unit = len(first["units"]) - 1  # the new item joins the last unit (or starts a new one)
    kept = [k for k in before if k.endswith(".tar") and int(k.split("shard-")[1][:6]) < last_unit]
    assert kept and all(after[k] == before[k] for k in kept), "earlier units' shards must be kept untouched"
    # a changed processing setting redoes everything
    fourth = ingest(cfg("folder", tmp_path / "in", image_size=48), None, tmp_path / "out", progress=False)
    assert fourth["image_size"] == 48
    for s in read_back(tmp_path / "out"):
        assert Image.open(io.BytesIO(s["jpg"])).size == (48, 48)


KILL_SCRIPT = """
import sys, time
from diffusion.config import IngestConfig
from diffusion.data.ingest import ingest
import diffusion.data.ingest as ing
slow = ing.process_unit
def process_unit(spec, unit):   # slow each unit down so the parent can kill mid-run
    time.sleep(0.3)
    return slow(spec, unit)
ing.process_unit = process_unit
cfg = IngestConfig(source="folder", path=sys.argv[1], image_size=64, image_format="jpg", samples_per_shard=4,
                   val_fraction=0.25, workers=2)
ingest(cfg, None, sys.argv[2], progress=False)
"""


def test_kill_9_then_rerun_gives_identical_shards(tmp_path):
    src = tmp_path / "in"
    for i in range(60):
        (src / f"d{i % 3}").mkdir(parents=True, exist_ok=True)
        (src / f"d{i % 3}" / f"{i:03d}.jpg").write_bytes(encode(picture(500 + i, (128, 96)), "JPEG", quality=90))
        (src / f"d{i % 3}" / f"{i:03d}.txt").write_text(f"image number {i}")
    script = tmp_path / "run.py"
    script.write_text(KILL_SCRIPT)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    # uninterrupted reference
    subprocess.run([sys.executable, str(script), str(src), str(tmp_path / "ref")], check=True, env=env, timeout=300)
    # killed run: wait until some units are committed, then SIGKILL
    proc = subprocess.Popen([sys.executable, str(script), str(src), str(tmp_path / "out")], env=env)
    units = tmp_path / "out" / "_units"
    deadline = time.time() + 120
    while time.time() < deadline and (not units.is_dir() or len(list(units.glob("*.json"))) < 3):
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = len(list(units.glob("*.json")))
    assert 3 <= done < 15, "the kill must land mid-run"
    subprocess.run([sys.executable, str(script), str(src), str(tmp_path / "out")], check=True, env=env, timeout=300)
    ref = {p.relative_to(tmp_path / "ref"): p.read_bytes() for p in (tmp_path / "ref").rglob("*") if p.is_file()}
    out = {p.relative_to(tmp_path / "out"): p.read_bytes() for p in (tmp_path / "out").rglob("*") if p.is_file()}
    assert set(out) == set(ref)
    assert [k for k in ref if ref[k] != out[k]] == []


def test_dropped_duplicates_name_the_kept_key_and_samples_say_when_alpha_was_flattened(tmp_path):
    """ingest.dedupe writes duplicates.parquet: each dropped sample and the key of the earlier one
    with the same pixels (across units, and after a resume); a sample whose see-through pixels were
    drawn over ingest.background says alpha_flattened, an opaque RGBA image does not."""
    src = tmp_path / "in"
    src.mkdir()
    see_through = picture(1, (64, 64), "RGBA")
    alpha = np.full((64, 64), 255, np.uint8)
    alpha[:, 32:] = 0  # the right half transparent
    see_through.putalpha(Image.fromarray(alpha))
    files = {"a_orig.png": encode(picture(2, (64, 64)), "PNG"), "b_alpha.png": encode(see_through, "PNG"),
             "c_opaque.png": encode(picture(3, (64, 64), "RGBA"), "PNG")}
    files["d_copy.png"] = files["a_orig.png"]  # the same bytes: unit 1 drops it for unit 0's sample
    for name, data in files.items():
        (src / name).write_bytes(data)
        (src / name).with_suffix(".txt").write_text(f"caption of {name}")
    conf = cfg("folder", src, image_format="png", samples_per_shard=2, dedupe=True)
    out = tmp_path / "out"
    stats = ingest(conf, None, out, progress=False)
    assert stats["rejected"] == {"duplicate": 1} and stats["accepted"] == 3
    index = pa.concat_tables([pq.read_table(out / f"index-{s}.parquet") for s in ("train", "val")]).to_pylist()
    meta = {json.loads(r["meta"])["source_id"]: (r["key"], json.loads(r["meta"])) for r in index}
    assert [m.get("alpha_flattened") for _, (_, m) in sorted(meta.items())] == [None, True, None]
    dups = pq.read_table(out / "duplicates.parquet").to_pylist()
    assert dups == [{"key": stable_key("d_copy.png"), "source_id": "d_copy.png", "kept_key": meta["a_orig.png"][0]}]
    # killed after unit 0: the resumed run reloads the kept keys and names the same one
    (out / "_units" / "000001.json").unlink()
    ingest(conf, None, out, progress=False)
    assert pq.read_table(out / "duplicates.parquet").to_pylist() == dups
