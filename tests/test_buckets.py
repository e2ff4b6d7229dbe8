"""Aspect-ratio buckets (ingest.resize_mode bucket): mixed-aspect images rendered here, ingested
into buckets without squaring them, batched one bucket at a time with an exact resume, trained on
by a tiny UNet, and generated at two aspect ratios."""

from __future__ import annotations

import io
import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import webdataset as wds
from PIL import Image, ImageDraw

from diffusion.artifacts import list_shards, shard_buckets
from diffusion.config import IngestConfig, parse_params
from diffusion.data.buckets import bucket_set, compute_buckets, cover_box, nearest_bucket
from diffusion.data.ingest import ingest
from diffusion.errors import ConfigError, T2IError

SIDE, STEP = 32, 16  # buckets 16x48, 32x32, 48x16
BUCKETS = [(16, 48), (32, 32), (48, 16)]
# (width, height, how many, what): wide and tall banners, squares, and a 3:2 photo shape whose
# nearest bucket is the square (cropped only by the aspect difference)
KINDS = [(120, 40, 14, "wide"), (40, 120, 14, "tall"), (64, 64, 10, "square"), (90, 60, 6, "landscape")]
COLOURS = [(220, 30, 30), (30, 200, 30), (30, 30, 220)]


def bucket_cfg(path, **kw) -> IngestConfig:
    base = dict(source="folder", path=str(path), image_size=SIDE, resize_mode="bucket", bucket_step=STEP,
                min_size=8, image_format="png", samples_per_shard=16, val_fraction=0.1, workers=1)
    base.update(kw)
    return IngestConfig(**base)


def render_corpus(root: Path) -> dict[str, str]:
    """Folder source of striped rectangles: red, green, blue thirds along the longer side, each
    image shifted a little so none is a duplicate. Returns {file stem: kind}."""
    root.mkdir(parents=True, exist_ok=True)
    kinds = {}
    for w, h, n, kind in KINDS:
        for i in range(n):
            img = Image.new("RGB", (w, h))
            d = ImageDraw.Draw(img)
            long_side = max(w, h)
            for k, c in enumerate(COLOURS):
                a, b = k * long_side // 3, (k + 1) * long_side // 3
                d.rectangle((a, 0, b - 1, h) if w >= h else (0, a, w, b - 1), fill=c)
            x, y = (w // 2 - 20 + 3 * i, h // 2) if w >= h else (w // 2, h // 2 - 20 + 3 * i)
            d.rectangle((x, y, x + 3, y + 3), fill=(255, 255, 255))  # unique pixels per image, kept by any crop
            stem = f"{kind}-{i:02d}"
            img.save(root / f"{stem}.png")
            (root / f"{stem}.txt").write_text(f"a {kind} banner red green blue number {i}")
            kinds[stem] = kind
    return kinds


@pytest.fixture(scope="module")
def bucket_shards(tmp_path_factory) -> Path:
    src = tmp_path_factory.mktemp("bucket_src")
    render_corpus(src)
    out = tmp_path_factory.mktemp("bucket_shards")
    ingest(bucket_cfg(src), None, out, progress=False)
    return out


@pytest.fixture(scope="module")
def bucket_table(bucket_shards, text_encoder):
    from diffusion.data.text import captions_from_index, embed_captions

    return embed_captions(text_encoder, captions_from_index(bucket_shards), progress=False)


# --------------------------------------------------------------------------------------------
# The bucket set


def test_bucket_set_is_computed_from_the_budget():
    assert compute_buckets(SIDE, STEP, 3.0) == BUCKETS
    for side, step in [(64, 16), (256, 64), (512, 64)]:
        got = compute_buckets(side, step, 3.0)
        assert (side, side) in got
        assert all(w % step == 0 and h % step == 0 and w * h <= side * side for w, h in got)
        assert all(max(w, h) <= 3 * min(w, h) for w, h in got)
        assert sorted((h, w) for w, h in got) == sorted(got)  # tall and wide alike
    assert nearest_bucket(120, 40, BUCKETS) == (48, 16)
    assert nearest_bucket(90, 60, BUCKETS) == (32, 32)
    assert cover_box(90, 60, (32, 32)) == (15.0, 0.0, 75.0, 60.0)  # only the aspect difference is cut


def test_bad_bucket_settings_are_one_line():
    with pytest.raises(ConfigError, match=r"ingest.buckets\[1\] 40x24 is not a multiple of ingest.bucket_step 16"):
        bucket_set(bucket_cfg(".", buckets=[[32, 32], [40, 24]]))
    with pytest.raises(ConfigError, match="ingest.bucket_step 64 leaves no bucket"):
        bucket_set(bucket_cfg(".", bucket_step=64))
    data = {"ingest": {"resize_mode": "bucket", "image_size": 32, "bucket_step": 64}}
    with pytest.raises(ConfigError) as e:
        parse_params(data, "test")
    assert "\n" not in str(e.value)
    assert bucket_set(bucket_cfg(".", buckets=[[48, 16], [32, 32]])) == [(32, 32), (48, 16)]


# --------------------------------------------------------------------------------------------
# Ingest


def test_ingest_keeps_each_aspect_in_its_bucket(bucket_shards):
    stats = json.loads((bucket_shards / "stats.json").read_text())
    assert stats["resize_mode"] == "bucket" and stats["buckets"] == [list(b) for b in BUCKETS]
    total = sum(n for *_, n, _ in KINDS)
    assert stats["accepted"] == total
    for split in ("train", "val"):
        assert sum(stats["bucket_counts"][split].values()) == stats["splits"][split]["accepted"]
    expected = {"wide": (48, 16), "tall": (16, 48), "square": (32, 32), "landscape": (32, 32)}
    samples = list(wds.WebDataset(list_shards(bucket_shards / "train") + list_shards(bucket_shards / "val"),
                                  shardshuffle=False, empty_check=False))
    assert len(samples) == total
    index = {}
    for split in ("train", "val"):
        for row in pq.read_table(bucket_shards / f"index-{split}.parquet").to_pylist():
            index[row["key"]] = json.loads(row["meta"])
    for s in samples:
        meta = json.loads(s["json"])
        kind = s["txt"].decode().split()[1]
        with Image.open(io.BytesIO(s["png"])) as im:
            a = np.asarray(im.convert("RGB"))
        assert (meta["width"], meta["height"]) == (a.shape[1], a.shape[0]) == expected[kind]
        assert (index[s["__key__"]]["width"], index[s["__key__"]]["height"]) == expected[kind]
        if kind in ("wide", "tall"):  # the whole banner is kept: red at one end, blue at the other
            first, last = (a[8, 1], a[8, -2]) if kind == "wide" else (a[1, 8], a[-2, 8])
            assert first[0] > 150 and first[2] < 100 and last[2] > 150 and last[0] < 100
    trained = shard_buckets(bucket_shards)
    assert set(trained) <= set(BUCKETS) and (48, 16) in trained and (16, 48) in trained


def test_training_refuses_keep_ratio_but_takes_buckets(bucket_shards, tmp_path):
    from diffusion.artifacts import square_image_size

    assert square_image_size(bucket_shards) == SIDE
    stats = json.loads((bucket_shards / "stats.json").read_text())
    (tmp_path / "stats.json").write_text(json.dumps({**stats, "resize_mode": "keep_ratio"}))
    with pytest.raises(T2IError, match="resize_mode center_crop, pad or bucket"):
        square_image_size(tmp_path)


# --------------------------------------------------------------------------------------------
# Loader


def _spec(urls, **kw):
    from diffusion.training.train_data import DataSpec

    return DataSpec(urls, seed=5, shuffle_buffer=8, batch_size=4, workers=0, buckets=True, **kw)


def _take(spec, table, position, n):
    from diffusion.training.train_data import batch_loader

    it = batch_loader(spec, table, [position])
    return [next(it) for _ in range(n)]


def test_batches_hold_one_bucket_and_resume_exactly(bucket_shards, bucket_table):
    from diffusion.training.train_data import DataPosition

    urls = list_shards(bucket_shards / "train")
    spec = _spec(urls)
    run = _take(spec, bucket_table, DataPosition(), 30)  # several epochs (about 9 batches each)
    shapes = {tuple(b.x0.shape[2:]) for b in run}
    assert shapes == {(16, 48), (48, 16), (32, 32)}  # (H, W): every bucket, each batch one of them
    assert len({b.position.epoch for b in run}) >= 3
    seen_keys = [b.rows.tolist() for b in run]
    assert len(seen_keys) == 30
    for k in (1, 7, 9, 10, 17):  # mid-epoch and right at epoch boundaries
        resumed = _take(spec, bucket_table, run[k - 1].position, 30 - k)
        for a, b in zip(run[k:], resumed):
            assert a.position == b.position
            assert a.rows.tolist() == b.rows.tolist()
            assert a.x0.shape == b.x0.shape and np.array_equal(a.x0.numpy(), b.x0.numpy())
    # two ranks read disjoint parts, each batched within its own part
    for rank in (0, 1):
        part = _take(_spec(urls, rank=rank, world=2), bucket_table, DataPosition(), 3)
        assert all(b.x0.shape[0] == 4 for b in part)


def test_worker_processes_batch_within_their_part_and_resume_exactly(bucket_shards, bucket_table):
    """Two DataLoader workers: each batches its own part; the positions the loop keeps (the
    latest of each worker) resume both exactly."""
    from diffusion.training.train_data import DataPosition, DataSpec, batch_loader

    spec = DataSpec(list_shards(bucket_shards / "train"), seed=5, shuffle_buffer=8, batch_size=2, workers=2,
                    buckets=True)
    it = batch_loader(spec, bucket_table, [DataPosition(), DataPosition()])
    run = [next(it) for _ in range(12)]
    assert {b.worker for b in run} == {0, 1}
    positions = [DataPosition(), DataPosition()]
    for b in run[:5]:
        positions[b.worker] = b.position
    it = batch_loader(spec, bucket_table, positions)
    resumed = [next(it) for _ in range(6)]
    for w in (0, 1):
        want = [b.rows.tolist() for b in run[5:] if b.worker == w][:3]
        assert [b.rows.tolist() for b in resumed if b.worker == w][:3] == want


def test_a_bucket_never_filled_is_one_line(bucket_shards, bucket_table):
    from diffusion.errors import MissingInputError
    from diffusion.training.train_data import DataPosition, DataSpec

    spec = DataSpec(list_shards(bucket_shards / "train"), seed=5, shuffle_buffer=8, batch_size=64, workers=0,
                    buckets=True)
    with pytest.raises(MissingInputError, match="no bucket holds a batch of 64 samples"):
        _take(spec, bucket_table, DataPosition(), 1)


# --------------------------------------------------------------------------------------------
# Training and generation


@pytest.fixture(scope="module")
def bucket_model(bucket_shards, bucket_table, tiny_params, tmp_path_factory) -> Path:
    from diffusion.training.train import train

    out = tmp_path_factory.mktemp("bucket_model")
    cfg = replace(tiny_params.train, steps=4, batch_size=4, warmup_steps=1, checkpoint_every=2, log_every=2,
                  shuffle_buffer=8, data_workers=0)
    train(cfg, list_shards(bucket_shards / "train"), bucket_table, out, image_size=SIDE,
          buckets=shard_buckets(bucket_shards), progress=False)
    return out


def test_a_tiny_unet_trains_on_buckets(bucket_model, bucket_shards):
    meta = json.loads((bucket_model / "model.json").read_text())
    assert meta["steps_done"] == 4
    assert [tuple(b) for b in meta["buckets"]] == shard_buckets(bucket_shards)
    assert meta["image_size"] == SIDE


def test_a_bucket_the_denoiser_cannot_tile_is_one_line(bucket_shards, bucket_table, tiny_params, tmp_path):
    from diffusion.training.train import train

    cfg = replace(tiny_params.train, steps=1, batch_size=4, data_workers=0,
                  unet=replace(tiny_params.train.unet, channel_mult=[1, 2, 2, 2]))  # factor 2 * 8 = 16: 48 is fine
    with pytest.raises(ConfigError, match=r"does not fit bucket 24x40.*ingest.bucket_step"):
        train(cfg, list_shards(bucket_shards / "train"), bucket_table, tmp_path, image_size=SIDE,
              buckets=[(24, 40), (32, 32)], progress=False)


def test_generate_draws_at_two_aspect_ratios(bucket_model, tiny_params, tmp_path):
    from diffusion.pipeline.batch import run_batch

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("\n".join(json.dumps(r) for r in [
        {"prompt": "a wide banner red green blue", "width": 48, "height": 16},
        {"prompt": "a tall banner red green blue", "width": 16, "height": 48},
        {"prompt": "a square banner red green blue"},
    ]) + "\n")
    params = replace(tiny_params, sample=replace(tiny_params.sample, steps=2))
    summary = run_batch(prompts, str(bucket_model), tmp_path / "out", "r", date="2026-01-02", params=params,
                        overrides={"width": 48, "height": 16}, progress=False, log=lambda *_: None)
    manifest = pq.read_table(summary["manifest"]).to_pylist()
    sizes = []
    for row in manifest:
        with Image.open(Path(summary["out"]) / row["file"]) as im:
            sizes.append(im.size)
    assert sizes == [(48, 16), (16, 48), (48, 16)]  # the last row takes the command line's size
    with Image.open(summary["contact_sheet"]) as im:
        assert im.size[0] > 0


def test_a_size_the_model_did_not_train_on_is_refused_in_one_line(bucket_model, tiny_params, tmp_path):
    from diffusion.pipeline.batch import run_batch

    prompts = tmp_path / "prompts.csv"
    prompts.write_text("prompt,width,height\na wide banner,64,16\n")
    with pytest.raises(T2IError) as e:
        run_batch(prompts, str(bucket_model), tmp_path / "out", "r", date="2026-01-02", params=tiny_params,
                  progress=False, log=lambda *_: None)
    assert str(e.value) == "prompt 0: 64x16 is not a size this model was trained on (its sizes: 16x48, 32x32, 48x16)"
    assert "\n" not in str(e.value)
    (tmp_path / "plain.txt").write_text("a wide banner\n")
    with pytest.raises(T2IError, match="give both width and height"):
        run_batch(tmp_path / "plain.txt", str(bucket_model), tmp_path / "out", "r2", date="2026-01-02", params=tiny_params,
                  overrides={"width": 48}, progress=False, log=lambda *_: None)


def test_serving_draws_a_bucket_and_refuses_others(bucket_model, text_encoder, tiny_params):
    from diffusion.models.store import load_model
    from diffusion.registry.pyfunc import T2IModel
    from diffusion.registry.serving import BadRequest, Batcher

    model = T2IModel()  # what load_context sets, from the train-stage folder
    model.denoiser, model.meta = load_model(bucket_model)
    model.encoder, model.settings = text_encoder, replace(tiny_params.sample, steps=2)
    batcher = Batcher(model, max_batch=2, max_wait_ms=0)
    try:
        wide = batcher.submit([{"prompt": "a wide banner", "seed": 1}], {"width": 48, "height": 16})
        plain = batcher.submit([{"prompt": "a banner", "seed": 1}])
        for future, size in ((wide, (48, 16)), (plain, (SIDE, SIDE))):
            with Image.open(io.BytesIO(future.result(timeout=120)[0]["image"])) as im:
                assert im.size == size
        with pytest.raises(BadRequest, match=r"^bad params: 40x24 is not a size this model was trained on"):
            batcher.submit([{"prompt": "a banner"}], {"width": 40, "height": 24})
    finally:
        batcher.close()


# --------------------------------------------------------------------------------------------
# Latents per bucket


def test_latents_per_bucket_train_and_decode_at_their_size(bucket_shards, bucket_table, tiny_params, tmp_path):
    pytest.importorskip("diffusers")
    from test_latents import make_vae

    from diffusion.config import LatentsConfig, SampleConfig
    from diffusion.data.latents import encode_shards, latent_training_data
    from diffusion.data.shards import iter_samples
    from diffusion.models.store import load_model
    from diffusion.sampling.generate import generate, table_cond
    from diffusion.training.train import train

    vae = make_vae(tmp_path / "vae")  # downsampling 4: 48x16 -> 12x4 latents
    encode_shards(LatentsConfig(vae=str(vae), batch_size=4), bucket_shards, tmp_path / "latents", progress=False)
    urls, latent = latent_training_data(tmp_path / "latents", bucket_shards)
    for s in iter_samples(urls):
        assert s["mean"].shape == (4, s["meta"]["height"] // 4, s["meta"]["width"] // 4)
    cfg = replace(tiny_params.train, steps=2, batch_size=4, warmup_steps=1, data_workers=0, shuffle_buffer=8,
                  unet=replace(tiny_params.train.unet, patch=1))
    train(cfg, urls, bucket_table, tmp_path / "model", image_size=SIDE, latent=latent,
          buckets=shard_buckets(bucket_shards), progress=False)
    den, meta = load_model(tmp_path / "model")
    cond, uncond = table_cond(bucket_table, ["a wide banner red green blue number 1"])
    images = generate(den, cond, uncond, [0], (48, 16), SampleConfig(steps=2))
    assert images.shape == (1, 16, 48, 3)

    coarse = make_vae(tmp_path / "vae32", levels=6)  # downsampling 32: no bucket side of 16 or 48 is a multiple
    with pytest.raises(ConfigError) as e:
        encode_shards(LatentsConfig(vae=str(coarse)), bucket_shards, tmp_path / "latents32", progress=False)
    assert str(e.value).startswith("bucket 16x48 is not a multiple of the VAE's downsampling factor 32: set "
                                   "ingest.bucket_step")


@pytest.mark.parametrize("denoiser", ["unet", "dit"])
def test_both_denoisers_take_every_bucket(denoiser, tiny_params):
    """The UNet is convolutional and the DiT computes its sin-cos positions for the actual grid, so
    both draw any bucket whose sides they tile (a wide and a tall input give outputs of their shape)."""
    import torch

    from diffusion.config import DiTConfig
    from diffusion.config import check_denoiser_fits
    from diffusion.models.store import build_denoiser
    from diffusion.models.unet import Cond

    cfg = replace(tiny_params.train, denoiser=denoiser, dit=DiTConfig(width=32, depth=1, heads=2, patch=2))
    check_denoiser_fits(cfg, BUCKETS)
    net = build_denoiser(cfg, 8, 8).net.eval()
    cond = Cond(torch.randn(2, 3, 8), torch.ones(2, 3, dtype=torch.bool), torch.randn(2, 8))
    for w, h in BUCKETS:
        with torch.no_grad():
            assert net(torch.randn(2, 3, h, w), torch.zeros(2), cond).shape == (2, 3, h, w)
