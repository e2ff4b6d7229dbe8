import json
from dataclasses import replace

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from diffusion.config import SampleConfig
from diffusion.generate import generate, table_cond
from diffusion.shards import list_shards
from diffusion.text import EmbeddingTable
from diffusion.artifacts import load_model
from diffusion.train import DataPosition, ShardStream, train


class Recorder:
    def __init__(self, stop_at=None):
        self.metrics, self.images, self.stop_at = [], [], stop_at

    def log_metrics(self, metrics, step):
        self.metrics.append((step, metrics))
        if self.stop_at is not None and step >= self.stop_at:
            raise KeyboardInterrupt("simulated kill")

    def log_image(self, image, name):
        self.images.append(name)


def test_stream_is_seeded_and_resumable(tiny_shards, tiny_params):
    urls = list_shards(tiny_shards / "train")
    n = tiny_params.dataset.n_train
    a = ShardStream(urls, seed=3, shuffle_buffer=20)
    it = iter(a)
    first = [next(it)["key"] for _ in range(n + 60)]  # crosses an epoch boundary
    assert a.position == DataPosition(1, 60)
    assert len(set(first[:n])) == n  # every sample exactly once per epoch
    assert first[n:] != first[:60]  # the next epoch is shuffled anew
    b = ShardStream(urls, seed=3, shuffle_buffer=20)
    b.position = DataPosition(0, 100)
    it_b = iter(b)
    assert [next(it_b)["key"] for _ in range(n - 40)] == first[100:]
    it_c = iter(ShardStream(urls, seed=4, shuffle_buffer=20))
    assert [next(it_c)["key"] for _ in range(50)] != first[:50]


def test_train_exports_model_and_logs(tiny_params, tiny_shards, tiny_embeddings, tmp_path):
    table = EmbeddingTable.load(tiny_embeddings)
    rec = Recorder()
    grids = []
    train(tiny_params.train, list_shards(tiny_shards / "train"), table, tmp_path, image_size=16, logger=rec,
          grid_fn=lambda d, step: grids.append(step) or __import__("PIL.Image").Image.new("RGB", (4, 4)),
          progress=False)
    meta = json.loads((tmp_path / "model.json").read_text())
    assert meta["steps_done"] == tiny_params.train.steps
    assert meta["text_fingerprint_id"]
    losses = [m["loss"] for _, m in rec.metrics if "loss" in m]
    assert len(losses) == tiny_params.train.steps // tiny_params.train.log_every
    assert all(np.isfinite(losses))
    assert rec.images == ["sample_grid.png"] and grids == [tiny_params.train.steps]
    den, meta2 = load_model(tmp_path)
    weights = load_file(str(tmp_path / "model.safetensors"))
    assert set(weights) == set(den.net.state_dict())
    ckpt = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    assert ckpt["step"] == tiny_params.train.steps and {"model", "ema", "optimizer", "scheduler", "rng", "data"} <= set(ckpt)


def test_killed_run_resumes_to_the_same_weights(tiny_params, tiny_shards, tiny_embeddings, tmp_path):
    """Kill after the step-6 checkpoint, rerun: the result equals an uninterrupted run, bit for bit."""
    table = EmbeddingTable.load(tiny_embeddings)
    urls = list_shards(tiny_shards / "train")
    cfg = tiny_params.train
    train(cfg, urls, table, tmp_path / "straight", image_size=16, progress=False)
    with pytest.raises(KeyboardInterrupt):
        train(cfg, urls, table, tmp_path / "killed", image_size=16, logger=Recorder(stop_at=8), progress=False)
    assert torch.load(tmp_path / "killed" / "checkpoint.pt", weights_only=True)["step"] == 6
    train(cfg, urls, table, tmp_path / "killed", image_size=16, progress=False)
    a = load_file(str(tmp_path / "straight" / "model.safetensors"))
    b = load_file(str(tmp_path / "killed" / "model.safetensors"))
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_generation_depends_on_seed_not_batch(tiny_params, tiny_shards, tiny_embeddings, tmp_path):
    table = EmbeddingTable.load(tiny_embeddings)
    train(tiny_params.train, list_shards(tiny_shards / "train"), table, tmp_path, image_size=16, progress=False)
    den, _ = load_model(tmp_path)
    captions = sorted(c for c in table.rows if c)[:4]
    cond, uncond = table_cond(table, captions)
    for sampler in ("ddim", "ddpm", "heun", "dpmpp_2m", "dpmpp_2m_sde"):
        s = SampleConfig(sampler=sampler, steps=5, guidance_scale=3.0, batch_size=4)
        together = generate(den, cond, uncond, [10, 11, 12, 13], 16, s)
        alone = generate(den, cond, uncond, [10, 11, 12, 13], 16, replace(s, batch_size=1))
        assert together.shape == (4, 16, 16, 3) and together.dtype == np.uint8
        assert np.array_equal(together, alone)
    other_seed = generate(den, cond, uncond, [99, 11, 12, 13], 16, s)  # the stochastic SDE sampler
    assert not np.array_equal(other_seed[0], together[0]) and np.array_equal(other_seed[1:], together[1:])
