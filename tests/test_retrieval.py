"""The retrieval evaluator (diffusion.evaluation.retrieval) trained for a few dozen steps on the tiny
built-in set: it retrieves real pairs far above chance, ranks real images' captions above shuffled
ones and noise, separates noise from real images in its FD, and is deterministic and round-trips
through its files."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from diffusion.artifacts import shard_urls
from diffusion.data.text import EmbeddingTable
from diffusion.evaluation import retrieval as R

STEPS = 40


@pytest.fixture(scope="module")
def table(tiny_embeddings) -> EmbeddingTable:
    return EmbeddingTable.load(tiny_embeddings)


@pytest.fixture(scope="module")
def cfg(tiny_params):
    return dataclasses.replace(tiny_params.retrieval, steps=STEPS, batch_size=64, width=16, dim=64, device="cpu")


@pytest.fixture(scope="module")
def pairs(tiny_shards, table):
    return {split: R.read_pairs(shard_urls(tiny_shards, split), table, 10_000, 64) for split in ("train", "val")}


@pytest.fixture(scope="module")
def built(cfg, tiny_shards, table, tmp_path_factory):
    out = tmp_path_factory.mktemp("retrieval")
    metrics = R.build_retrieval(cfg, shard_urls(tiny_shards, "train"), shard_urls(tiny_shards, "val"), table, out,
                                progress=False)
    model, info = R.load_retrieval(out)
    return {"dir": out, "metrics": metrics, "model": model, "info": info}


def test_it_retrieves_real_validation_pairs_far_above_chance(built):
    m = built["metrics"]
    assert m["n"] == 60 and m["chance"] == pytest.approx(1 / 60)  # the tiny set has 60 validation pairs
    assert m["image_to_text"] > 10 * m["chance"] and m["text_to_image"] > 10 * m["chance"]
    assert m["r_precision"]["n"] == 60 and m["r_precision"]["mean"] > 10 * m["r_precision"]["chance"]
    assert built["info"]["val"] == m and built["info"]["image_size"] == 16


def test_r_precision_real_captions_beat_shuffled_captions_and_noise(built, pairs, table):
    model, size = built["model"], built["info"]["image_size"]
    (train_img, train_cap), (val_img, val_cap) = pairs["train"], pairs["val"]
    pool = val_cap + train_cap  # the tiny set has only 60 validation captions: rank among 99 of 299
    images, prompts = np.concatenate([train_img[:60], val_img]), train_cap[:60] + val_cap
    seen = np.arange(120) < 60
    real = R.r_precision(model, table, size, images, prompts, pool, 99, 0, {"seen": seen, "held_out": ~seen})
    assert real["all"]["chance"] == pytest.approx(0.01) and real["all"]["n"] == 120
    assert real["seen"]["n"] == real["held_out"]["n"] == 60
    assert real["held_out"]["mean"] > 0.2 and real["seen"]["mean"] > 0.2  # chance: 0.01
    shuffled = list(np.random.default_rng(0).permutation(prompts))
    noise = np.random.default_rng(1).integers(0, 256, images.shape, dtype=np.uint8)
    assert R.r_precision(model, table, size, images, shuffled, pool)["all"]["mean"] < real["all"]["mean"] / 2
    assert R.r_precision(model, table, size, noise, prompts, pool)["all"]["mean"] < real["all"]["mean"] / 2
    # the same prompt meets the same distractors whatever set it is in, and never itself
    d = R.distractors_for(val_cap[0], pool, 99, 0)
    assert d == R.distractors_for(val_cap[0], pool[::-1][::-1], 99, 0) and val_cap[0] not in d and len(set(d)) == 99


def test_fd_of_real_images_is_at_the_floor_and_noise_far_above(built, pairs):
    model, size = built["model"], built["info"]["image_size"]
    (train_img, _), (val_img, _) = pairs["train"], pairs["val"]
    real = np.concatenate([val_img, train_img[:180]])  # 240 real images; the floor: real[:60] vs real[60:]
    other_real = train_img[180:]  # 60 real images in neither set
    noise = np.random.default_rng(0).integers(0, 256, val_img.shape, dtype=np.uint8)
    fd_real = R.fd_images(model, size, other_real, real)
    fd_noise = R.fd_images(model, size, noise, real)
    assert fd_real["n_generated"] == 60 and fd_real["n_real"] == 240
    assert fd_noise["real_floor"] == fd_real["real_floor"]
    assert fd_real["generated"] < 3 * fd_real["real_floor"] < fd_noise["generated"]
    assert fd_noise["generated"] > 5 * fd_real["generated"]


def test_training_is_deterministic(cfg, pairs, table):
    images, captions = pairs["train"]
    short = dataclasses.replace(cfg, steps=2, batch_size=32)
    a, b = (R.train_retrieval(short, images, captions, table, progress=False) for _ in range(2))
    for (k, va), vb in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(va, vb), k


def test_save_load_round_trip_gives_identical_scores(built, pairs, table, cfg, tmp_path):
    model, size = built["model"], built["info"]["image_size"]
    R.save_retrieval(model, cfg, size, built["metrics"], tmp_path)
    again, info = R.load_retrieval(tmp_path)
    assert info == built["info"]
    val_img, val_cap = pairs["val"]
    scores = [R.validate(m, table, size, val_img, val_cap, cfg) for m in (again, model)]
    assert scores[0] == scores[1]
    assert np.array_equal(R.embed_images(again, val_img, size), R.embed_images(model, val_img, size))


def test_the_evaluation_block_splits_seen_and_held_out_and_counts_prompts_without_embeddings(built, pairs, table):
    (train_img, train_cap), (val_img, val_cap) = pairs["train"], pairs["val"]
    generated = np.concatenate([train_img[:30], val_img[:30], val_img[:1]])  # real images stand in for generated
    prompts = train_cap[:30] + val_cap[:30] + ["a caption the embed stage never saw"]
    out = R.evaluate_retrieval(built["dir"], table, generated, prompts, val_img, val_cap, val_cap + train_cap,
                               set(train_cap))
    gen, real = out["r_precision"]["generated"], out["r_precision"]["real"]
    assert out["no_embedding"] == 1 and gen["all"]["n"] == 60
    assert (gen["seen"]["n"], gen["held_out"]["n"]) == (30, 30)
    assert (real["seen"]["n"], real["held_out"]["n"]) == (0, 60)  # no tiny validation caption is a training one
    assert real["held_out"]["mean"] > 10 * real["held_out"]["chance"]
    assert out["fd"]["n_generated"] == 61 and out["fd"]["n_real"] == 60 and "real_floor" not in out["fd"]
    assert out["evaluator"] == built["metrics"]
