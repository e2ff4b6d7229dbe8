import json
from dataclasses import replace

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from conftest import assert_same_weights
from diffusion.config import SampleConfig
from diffusion.sampling.generate import generate, make_grid, table_cond
from diffusion.artifacts import list_shards
from diffusion.data.text import EmbeddingTable
from diffusion.models.store import load_model
from diffusion.training.train import train
from diffusion.training.train_data import DataPosition, ShardStream


class Recorder:
    def __init__(self, stop_at=None):
        self.metrics, self.images, self.stop_at = [], [], stop_at
        self.pictures = {}

    def log_metrics(self, metrics, step):
        self.metrics.append((step, metrics))
        if self.stop_at is not None and step >= self.stop_at:
            raise KeyboardInterrupt("simulated kill")

    def log_image(self, image, name):
        self.images.append(name)
        self.pictures[name] = np.asarray(image)


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
    # every log: throughput, and the share of the interval's time spent waiting for data
    for _, m in rec.metrics:
        if "loss" in m:
            assert m["img_per_s"] > 0 and 0.0 <= m["data_wait_fraction"] < 1.0 and m["grad_norm"] > 0
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
    assert_same_weights(tmp_path / "straight", tmp_path / "killed")


def test_sample_previews_are_logged_and_change_nothing_else(tiny_params, tiny_shards, tiny_embeddings, tmp_path,
                                                             capsys):
    """train.sample_every draws the EMA's grid with the real sampler every N steps, logged under
    train_samples/; the weights come out bit for bit those of a run without previews (sampling
    draws from its own generators), and a run killed without previews resumes with them on."""
    table = EmbeddingTable.load(tiny_embeddings)
    urls = list_shards(tiny_shards / "train")
    captions = sorted(c for c in table.rows if c)[:2]
    cond, uncond = table_cond(table, captions)
    drawn = []

    def grid_fn(den, step):
        drawn.append(step)
        return make_grid(generate(den, cond, uncond, [0, 1], 16, SampleConfig(steps=3, batch_size=2)), captions)

    cfg = tiny_params.train  # 12 steps, a checkpoint every 6, logs every 4
    assert cfg.steps == 12 and cfg.checkpoint_every == 6 and cfg.sample_every == 0
    train(cfg, urls, table, tmp_path / "plain", image_size=16, progress=False)
    rec = Recorder()
    train(replace(cfg, sample_every=5), urls, table, tmp_path / "previews", image_size=16, logger=rec,
          grid_fn=grid_fn, progress=False)
    assert rec.images == ["train_samples/step_0000005.png", "train_samples/step_0000010.png", "sample_grid.png"]
    assert drawn == [5, 10, 12]
    early, late = rec.pictures["train_samples/step_0000005.png"], rec.pictures["train_samples/step_0000010.png"]
    assert early.shape == late.shape and not np.array_equal(early, late)  # the same seeds, a later EMA
    assert_same_weights(tmp_path / "plain", tmp_path / "previews")  # and no sampler or VAE state left in it

    # killed at step 8 (checkpoint at 6) without previews, resumed with them: previews are
    # bookkeeping, so the checkpoint is taken and the weights are still the plain run's
    with pytest.raises(KeyboardInterrupt):
        train(cfg, urls, table, tmp_path / "resumed", image_size=16, logger=Recorder(stop_at=8), progress=False)
    drawn.clear()
    capsys.readouterr()
    train(replace(cfg, sample_every=5, log_every=3), urls, table, tmp_path / "resumed", image_size=16,
          logger=Recorder(), grid_fn=grid_fn, progress=False)
    assert "resuming from" in capsys.readouterr().out and drawn == [10, 12]
    assert_same_weights(tmp_path / "plain", tmp_path / "resumed")


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


def test_non_finite_values_stop_the_run_naming_the_step_and_keep_the_last_good_checkpoint(
        tiny_params, tiny_shards, tiny_embeddings, tmp_path):
    """Captions whose embeddings hold NaN (real shards, a real table with some rows poisoned) make
    the loss non-finite at the first step that draws one: the run stops there, naming the step,
    before writing a checkpoint from poisoned weights; the checkpoint before it stays."""
    import re

    from diffusion.errors import T2IError

    table = EmbeddingTable.load(tiny_embeddings)
    cfg = replace(tiny_params.train, log_every=1, checkpoint_every=1, keep_checkpoints=1)
    stream = iter(ShardStream(list_shards(tiny_shards / "train"), cfg.seed, cfg.shuffle_buffer))
    third_batch = [next(stream)["caption"] for _ in range(3 * cfg.batch_size)][-cfg.batch_size:]
    table.tokens[[table.row(c) for c in third_batch[:4]]] = float("nan")  # four captions of step 3
    with pytest.raises(T2IError, match=r"non-finite loss or gradient at step (\d+); the last good checkpoint") as e:
        train(cfg, list_shards(tiny_shards / "train"), table, tmp_path, image_size=16, progress=False)
    bad = int(re.search(r"at step (\d+)", str(e.value)).group(1))
    assert bad == 3
    ckpt = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    assert ckpt["step"] == bad - 1 and all(torch.isfinite(v).all() for v in ckpt["model"].values())
    assert not (tmp_path / "model.safetensors").exists()


def test_keeps_the_last_k_checkpoints(tiny_params, tiny_shards, tiny_embeddings, tmp_path):
    cfg = replace(tiny_params.train, steps=12, checkpoint_every=2, keep_checkpoints=3)
    train(cfg, list_shards(tiny_shards / "train"), EmbeddingTable.load(tiny_embeddings), tmp_path, image_size=16,
          progress=False)
    assert sorted(p.name for p in tmp_path.glob("checkpoint*")) == \
        ["checkpoint-00000008.pt", "checkpoint-00000010.pt", "checkpoint.pt"]
    steps = [torch.load(tmp_path / n, weights_only=True)["step"] for n in ("checkpoint-00000008.pt", "checkpoint.pt")]
    assert steps == [8, 12] and not list(tmp_path.glob("*.tmp"))


def test_gradient_accumulation_is_the_mean_over_micro_batches(tiny_params, tiny_shards, tiny_embeddings):
    """grad_accum 2: the gradient of one optimizer step is that of the mean loss of its two
    micro-batches (each micro-batch's own caption dropout and noise draws, in order)."""
    from diffusion.training.distributed import Dist
    from diffusion.training.train import TextTable, build_state, micro_loss, train_step
    from diffusion.training.train_data import DataSpec, batch_loader

    table = EmbeddingTable.load(tiny_embeddings)
    cfg = replace(tiny_params.train, grad_accum=2, grad_clip=1e9, data_workers=0)
    state = build_state(cfg, table, 16, None, torch.device("cpu"), Dist())
    spec = DataSpec(list_shards(tiny_shards / "train"), cfg.seed, cfg.shuffle_buffer, 8)
    data = batch_loader(spec, table, state.positions)
    micro = [next(data), next(data)]
    text = TextTable.of(table, torch.device("cpu"))
    gen_state = state.gen.get_state()
    loss, _ = train_step(state, micro, text, False)
    accumulated = [p.grad.clone() for p in state.model.parameters()]
    # by hand, from the weights before the step: both micro-losses in one graph
    fresh = build_state(cfg, table, 16, None, torch.device("cpu"), Dist())
    fresh.gen.set_state(gen_state)
    total = (micro_loss(fresh, micro[0], text, False) + micro_loss(fresh, micro[1], text, False)) / 2
    total.backward()
    assert torch.allclose(loss, total.detach(), rtol=1e-5)
    for a, p in zip(accumulated, fresh.model.parameters()):
        assert torch.allclose(a, p.grad, rtol=1e-4, atol=1e-7)
    assert state.step == 1 and state.positions[0] == micro[1].position


def test_the_transformer_denoiser_trains_exports_and_samples_behind_the_same_contract(
        tiny_params, tiny_shards, tiny_embeddings, tmp_path):
    from diffusion.config import DiTConfig

    cfg = replace(tiny_params.train, denoiser="dit", dit=DiTConfig(width=32, depth=2, heads=2, patch=2), steps=4,
                  checkpoint_every=2, lr=3e-4)
    table = EmbeddingTable.load(tiny_embeddings)
    rec = Recorder()
    train(cfg, list_shards(tiny_shards / "train"), table, tmp_path, image_size=16, logger=rec, progress=False)
    den, meta = load_model(tmp_path)
    assert type(den.net).__name__ == "DiT" and meta["train"]["denoiser"] == "dit"
    assert all(np.isfinite(m["loss"]) for _, m in rec.metrics if "loss" in m)
    cond, uncond = table_cond(table, sorted(c for c in table.rows if c)[:2])
    images = generate(den, cond, uncond, [0, 1], 16, SampleConfig(steps=3, batch_size=2))
    assert images.shape == (2, 16, 16, 3)


def test_unseen_words_extend_kept_captions_with_word_vectors_and_keep_pooled_their_mean():
    import torch.nn.functional as F

    from diffusion.models.unet import Cond
    from diffusion.training.train import add_unseen_words

    b, length, d = 64, 5, 32
    g = torch.Generator().manual_seed(0)
    mask = torch.arange(length)[None] < torch.randint(2, length + 1, (b,), generator=g)[:, None]
    tokens = F.layer_norm(torch.randn(b, length, d, generator=g), (d,)) * mask[..., None]
    pooled = tokens.sum(1) / mask.sum(1, keepdim=True)
    keep = torch.arange(b) % 4 != 0  # the rows caption dropout left alone
    out = add_unseen_words(Cond(tokens, mask, pooled), keep, 0.5, 3, g)
    assert out.tokens.shape == (b, length + 3, d) and out.mask.shape == (b, length + 3)
    assert torch.equal(out.tokens[:, :length], tokens) and torch.equal(out.mask[:, :length], mask)
    added = out.mask[:, length:].sum(1)
    assert not added[~keep].any() and set(added[keep].tolist()) == {0, 1, 2, 3}
    assert torch.equal(out.mask[:, length:], torch.arange(3)[None] < added[:, None])  # packed behind the caption
    new = out.tokens[:, length:][out.mask[:, length:]]  # like the random tower's words: LayerNorm-ed
    assert torch.allclose(new.mean(-1), torch.zeros(len(new)), atol=1e-5)
    assert torch.allclose(new.pow(2).mean(-1), torch.ones(len(new)), atol=1e-3)
    assert not out.tokens[:, length:][~out.mask[:, length:]].any()
    mean = (out.tokens * out.mask[..., None]).sum(1) / out.mask.sum(1, keepdim=True)
    assert torch.allclose(out.pooled, mean, atol=1e-5)
    assert torch.allclose(out.pooled[~keep], pooled[~keep], rtol=1e-6, atol=0)
    none = add_unseen_words(Cond(tokens, mask, pooled), keep, 0.0, 3, g)
    assert not none.mask[:, length:].any() and torch.equal(none.pooled, pooled)


def test_unseen_words_change_the_loss_on_word_vectors_and_are_off_for_contextual_states(
        tiny_params, tiny_shards, tiny_embeddings):
    from diffusion.training.distributed import Dist
    from diffusion.training.train import TextTable, build_state, micro_loss
    from diffusion.training.train_data import DataSpec, batch_loader

    table = EmbeddingTable.load(tiny_embeddings)
    assert table.fingerprint["layer"] == "token_embedding"  # the random tower's default
    cfg = replace(tiny_params.train, data_workers=0)
    state = build_state(cfg, table, 16, None, torch.device("cpu"), Dist())
    batch = next(batch_loader(DataSpec(list_shards(tiny_shards / "train"), cfg.seed, cfg.shuffle_buffer, 16),
                              table, state.positions))
    start = state.gen.get_state()

    def loss(unseen: float, tbl) -> float:
        state.gen.set_state(start)
        with torch.no_grad():
            return micro_loss(replace(state, cfg=replace(cfg, unseen_words=unseen)), batch,
                              TextTable.of(tbl, torch.device("cpu")), False).item()

    contextual = replace(table, fingerprint={**table.fingerprint, "layer": "last"})
    assert loss(1.0, table) != loss(0.0, table)
    assert loss(1.0, contextual) == loss(0.0, table) == loss(0.0, contextual)


def test_fp16_resumes_with_its_grad_scaler_and_bf16_trains_on_the_cpu(tiny_params, tiny_shards, tiny_embeddings,
                                                                       tmp_path):
    """train.precision fp16: autocast with a gradient scaler, whose scale the checkpoint keeps, so a
    killed run resumes to the weights of one never killed; bf16: autocast alone. Both keep float32
    weights and export them."""
    table = EmbeddingTable.load(tiny_embeddings)
    urls = list_shards(tiny_shards / "train")
    fp16 = replace(tiny_params.train, precision="fp16")
    rec = Recorder()
    train(fp16, urls, table, tmp_path / "straight", image_size=16, logger=rec, progress=False)
    assert torch.load(tmp_path / "straight" / "checkpoint.pt", weights_only=True)["scaler"]["scale"] > 0
    assert all(np.isfinite(m["loss"]) for _, m in rec.metrics if "loss" in m)
    with pytest.raises(KeyboardInterrupt):
        train(fp16, urls, table, tmp_path / "killed", image_size=16, logger=Recorder(stop_at=8), progress=False)
    train(fp16, urls, table, tmp_path / "killed", image_size=16, progress=False)
    assert_same_weights(tmp_path / "straight", tmp_path / "killed")
    # the scale comes back from the checkpoint, not from a fresh scaler (2**16): one set by hand in
    # the step-6 checkpoint is the one the run ends with (no overflow, and it grows only every 2000)
    with pytest.raises(KeyboardInterrupt):
        train(fp16, urls, table, tmp_path / "rescaled", image_size=16, logger=Recorder(stop_at=8), progress=False)
    ckpt = torch.load(tmp_path / "rescaled" / "checkpoint.pt", weights_only=True)
    ckpt["scaler"]["scale"] = 2.0**10
    torch.save(ckpt, tmp_path / "rescaled" / "checkpoint.pt")
    train(fp16, urls, table, tmp_path / "rescaled", image_size=16, progress=False)
    assert torch.load(tmp_path / "rescaled" / "checkpoint.pt", weights_only=True)["scaler"]["scale"] == 2.0**10

    bf16 = replace(tiny_params.train, precision="bf16")
    rec = Recorder()
    train(bf16, urls, table, tmp_path / "bf16", image_size=16, logger=rec, progress=False)
    assert torch.load(tmp_path / "bf16" / "checkpoint.pt", weights_only=True)["scaler"] is None
    losses = [m["loss"] for _, m in rec.metrics if "loss" in m]
    assert losses and all(np.isfinite(losses))
    a = load_file(str(tmp_path / "bf16" / "model.safetensors"))
    for name, w in {**a, **load_file(str(tmp_path / "straight" / "model.safetensors"))}.items():
        assert w.dtype == torch.float32, name
    # autocast changed the arithmetic, so the weights differ from fp32's
    train(tiny_params.train, urls, table, tmp_path / "fp32", image_size=16, progress=False)
    b = load_file(str(tmp_path / "fp32" / "model.safetensors"))
    assert any(not torch.equal(a[k], b[k]) for k in a)


def test_val_loss_is_the_ema_on_fixed_val_inputs_and_changes_no_weight(tiny_params, tiny_shards, tiny_embeddings,
                                                                        tiny_model, tmp_path, capsys):
    """train.val_every logs val_loss (every N steps and at the last) from the val split at noise and
    timesteps drawn once from their own seed; the weights are bit for bit those of a run without it,
    and the value is the exported EMA's loss on those inputs, the same however often it is taken."""
    from diffusion.artifacts import write_loss_history
    from diffusion.training.train import Validation, build_state, TextTable
    from diffusion.training.distributed import Dist

    table = EmbeddingTable.load(tiny_embeddings)
    urls, val_urls = list_shards(tiny_shards / "train"), list_shards(tiny_shards / "val")
    cfg = replace(tiny_params.train, val_every=5, val_samples=40, data_workers=0)  # the same batches, no worker
    rec = Recorder()
    train(cfg, urls, table, tmp_path / "val", image_size=16, logger=rec, progress=False, val_urls=val_urls)
    # the same settings without val_urls, trained here: the session's tiny_model may have been trained
    # under another thread count (an earlier test's), which moves the last bit of a float sum
    train(cfg, urls, table, tmp_path / "plain", image_size=16, progress=False)
    assert_same_weights(tmp_path / "plain", tmp_path / "val")
    assert "fewer than train.batch_size" not in capsys.readouterr().out  # 240 samples, batches of 16
    val = [(s, m["val_loss"]) for s, m in rec.metrics if "val_loss" in m]
    assert [s for s, _ in val] == [5, 10, 12] and len({v for _, v in val}) == 3 and all(np.isfinite(v) for _, v in val)
    assert json.loads((tmp_path / "val" / "model.json").read_text())["val_seconds"] > 0

    # the last value is the exported EMA's loss on the same 40 val samples, noise and timesteps
    state = build_state(cfg, table, 16, None, torch.device("cpu"), Dist())
    state.ema.net.load_state_dict(load_file(str(tmp_path / "val" / "model.safetensors")))
    fixed = Validation.build(state, val_urls, table, TextTable.of(table, state.device), None)
    again = Validation.build(state, val_urls, table, TextTable.of(table, state.device), None)
    assert len(fixed.rows) == 40 and torch.equal(fixed.noise, again.noise) and torch.equal(fixed.t, again.t)
    assert fixed.loss(state) == pytest.approx(val[-1][1], rel=1e-5) == again.loss(state)
    assert Validation.build(replace(state, cfg=replace(cfg, val_samples=0)), val_urls, table, fixed.text, None) is None

    # loss.csv: one row per logged step, val_loss empty where it was not taken
    train_points = [(s, m["loss"]) for s, m in rec.metrics if "loss" in m]
    text = write_loss_history(tmp_path, train_points, val).read_text().splitlines()
    assert text[0] == "step,loss,val_loss" and [r.split(",")[0] for r in text[1:]] == ["4", "5", "8", "10", "12"]
    assert text[2].startswith("5,,") and text[1].endswith(",") and float(text[-1].split(",")[2]) == pytest.approx(val[-1][1], rel=1e-5)


def test_a_split_smaller_than_a_batch_trains_and_says_so_in_one_line(tiny_params, tiny_shards, tiny_embeddings,
                                                                      tmp_path, capsys):
    """A split with fewer samples than train.batch_size still trains: each batch repeats them
    (the stream runs epoch after epoch), and the train stage says so once, at the start."""
    import pyarrow.parquet as pq

    table = EmbeddingTable.load(tiny_embeddings)
    n = pq.read_table(tiny_shards / "index-val.parquet").num_rows  # the small split, trained on here
    cfg = replace(tiny_params.train, steps=2, batch_size=64, data_workers=0, checkpoint_every=2)
    assert n < cfg.batch_size
    train(cfg, list_shards(tiny_shards / "val"), table, tmp_path, image_size=16, progress=False)
    lines = [ln for ln in capsys.readouterr().out.splitlines() if "fewer than train.batch_size" in ln]
    assert lines == [f"train: the training shards hold {n} samples, fewer than train.batch_size 64: each batch "
                     f"repeats them (about {64 / n:.1f} times, each with its own noise and timestep), so a step "
                     f"sees {n} distinct images; set train.batch_size to {n} or less for shorter steps"]
    assert json.loads((tmp_path / "model.json").read_text())["steps_done"] == 2
