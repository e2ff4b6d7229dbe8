"""Resume: the counts continue exactly, changed settings are refused in one line, and a damaged
checkpoint falls back to the newest intact one (real tiny runs on the fixture shards, real
checkpoints on disk)."""

from dataclasses import replace

import pytest
import torch

from conftest import assert_same_weights
from diffusion.artifacts import list_shards
from diffusion.data.text import EmbeddingTable
from diffusion.errors import T2IError
from diffusion.training.train import lr_factor, train


class Recorder:
    def __init__(self, stop_at=None):
        self.metrics, self.stop_at = {}, stop_at

    def log_metrics(self, metrics, step):
        if "loss" in metrics:
            self.metrics[step] = metrics
        if self.stop_at is not None and step >= self.stop_at:
            raise KeyboardInterrupt("simulated kill")

    def log_image(self, image, name):
        pass


@pytest.fixture
def data(tiny_shards, tiny_embeddings):
    return list_shards(tiny_shards / "train"), EmbeddingTable.load(tiny_embeddings)


def run(cfg, data, out, **kw):
    urls, table = data
    return train(cfg, urls, table, out, image_size=16, progress=False, **kw)


def killed(cfg, data, out, stop_at):
    with pytest.raises(KeyboardInterrupt):
        run(cfg, data, out, logger=Recorder(stop_at=stop_at))


def files(folder):
    """Every file in ``folder`` by name, with its bytes."""
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


def test_resume_continues_step_epoch_images_seen_and_lr_exactly(tiny_params, data, tmp_path, capsys):
    """20 steps of 16 images over 240 training samples cross an epoch (at image 240, in step 15).
    Killed at step 20's log (the step-16 checkpoint on disk), rerun: the resumed run logs the
    uninterrupted run's step, epoch, images_seen and lr, and says where it resumes in one line."""
    cfg = replace(tiny_params.train, steps=20, checkpoint_every=8, log_every=4)
    straight = Recorder()
    run(cfg, data, tmp_path / "straight", logger=straight)
    assert sorted(straight.metrics) == [4, 8, 12, 16, 20]
    for step, m in straight.metrics.items():  # the numbers themselves, from the maths
        assert m["images_seen"] == step * cfg.batch_size
        assert m["epoch"] == (1 if step * cfg.batch_size > 240 else 0)
        assert m["lr"] == pytest.approx(cfg.lr * lr_factor(step, cfg), rel=1e-12)

    killed(cfg, data, tmp_path / "killed", stop_at=20)
    ckpt = torch.load(tmp_path / "killed" / "checkpoint.pt", weights_only=True)
    assert (ckpt["step"], ckpt["images_seen"], ckpt["epoch"]) == (16, 256, 1)
    capsys.readouterr()
    resumed = Recorder()
    run(cfg, data, tmp_path / "killed", logger=resumed)
    said = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("resuming from")]
    assert said == [f"resuming from {tmp_path / 'killed' / 'checkpoint.pt'} at step 16 (epoch 1, 256 images seen, "
                    f"lr {cfg.lr * lr_factor(16, cfg):.6g})"]
    assert sorted(resumed.metrics) == [20]
    for key in ("images_seen", "epoch", "lr"):
        assert resumed.metrics[20][key] == straight.metrics[20][key], key
    assert_same_weights(tmp_path / "straight", tmp_path / "killed")
    end = torch.load(tmp_path / "killed" / "checkpoint.pt", weights_only=True)
    assert (end["step"], end["images_seen"], end["epoch"]) == (20, 320, 1)


def test_changed_settings_are_refused_in_one_line_naming_each_change(tiny_params, data, tmp_path):
    """A run killed at step 8 (checkpoint at 6 of 12) rerun with other settings: one T2IError
    line naming each key old -> new and what to do; nothing in the folder changes. The GPU count
    and LoRA rank are emulated by editing the real checkpoint's meta (world, train.lora.rank)."""
    cfg = tiny_params.train
    out = tmp_path / "run"
    killed(cfg, data, out, stop_at=8)
    before = files(out)

    def refused(other, *expected):
        with pytest.raises(T2IError) as e:
            run(other, data, out)
        line = str(e.value)
        assert "\n" not in line and "was written with other settings" in line and "another --out" in line
        for text in expected:
            assert text in line, (text, line)
        assert files(out) == before  # nothing overwritten, nothing deleted, nothing new
        return line

    line = refused(replace(cfg, batch_size=8, lr=cfg.lr * 2), "train.batch_size 16 -> 8",
                   f"train.lr {cfg.lr} -> {cfg.lr * 2}", "step 6 of 12")
    assert "world size" not in line and "code of" not in line  # only what changed
    refused(replace(cfg, steps=20), "train.steps 12 -> 20", "cosine LR schedule")

    path, written = out / "checkpoint.pt", before["checkpoint.pt"]
    for edit, expected in ((lambda m: m.update(world=2), "world size 2 -> 1"),
                           (lambda m: m["train"]["lora"].update(rank=4), "train.lora.rank 4 -> 0"),
                           (lambda m: m.update(code="0123456789abcdef"),
                            "code of the train stage 0123456789abcdef ->")):
        ckpt = torch.load(path, weights_only=True)
        edit(ckpt["meta"])
        torch.save(ckpt, path)
        before = files(out)
        refused(cfg, expected)
        path.write_bytes(written)

    # a checkpoint written before train keys existed held their defaults: it still resumes (these
    # keys at their defaults; a key at another value would be a change)
    ckpt = torch.load(path, weights_only=True)
    for key in ("lora", "offset_noise", "zero_terminal_snr", "init_from"):
        ckpt["meta"]["train"].pop(key)
    ckpt["meta"]["train"]["unet"].pop("ctx_dim")
    torch.save(ckpt, path)
    before = files(out)
    refused(replace(cfg, offset_noise=0.1), "train.offset_noise 0.0 -> 0.1")

    # bookkeeping keys still resume (and so does the checkpoint, untouched by the refusals)
    run(replace(cfg, log_every=3, keep_checkpoints=1), data, out)
    assert torch.load(path, weights_only=True)["step"] == 12


def test_finished_runs_train_anew_and_a_constant_schedule_extends_exactly(tiny_params, data, tmp_path, capsys):
    """A finished run is trained anew, also with more train.steps under the cosine schedule (it is
    laid out over train.steps: no exact continuation, and the line says so). Under
    train.lr_schedule constant the LR does not depend on train.steps: a finished 12-step run
    extended to 20 ends with the weights of a straight 20-step run."""
    cfg = replace(tiny_params.train, lr_schedule="constant")
    run(replace(cfg, steps=20), data, tmp_path / "straight")
    run(cfg, data, tmp_path / "extended")
    capsys.readouterr()
    run(replace(cfg, steps=20), data, tmp_path / "extended")
    assert "resuming from" in capsys.readouterr().out
    assert_same_weights(tmp_path / "straight", tmp_path / "extended")

    # the finished 6-step run leaves checkpoint-00000004.pt; the 8-step run that trains anew drops it at
    # its first save, so when killed after its step-4 checkpoint it keeps only its own
    cosine = replace(tiny_params.train, steps=6, checkpoint_every=2, log_every=2)
    folder = tmp_path / "cosine"
    run(cosine, data, folder)
    assert sorted(p.name for p in folder.glob("checkpoint*")) == ["checkpoint-00000004.pt", "checkpoint.pt"]
    capsys.readouterr()
    longer = replace(cosine, steps=8)
    killed(longer, data, folder, stop_at=6)
    out = capsys.readouterr().out
    assert ("is a finished run (6 steps): training anew (train.steps 6 -> 8 cannot continue it exactly: "
            "the cosine LR schedule") in out
    assert "resuming from" not in out
    kept = {p.name: torch.load(p, weights_only=True) for p in folder.glob("checkpoint*")}
    assert sorted(kept) == ["checkpoint-00000002.pt", "checkpoint.pt"]
    assert all(c["meta"]["train"]["steps"] == 8 for c in kept.values()) and kept["checkpoint.pt"]["step"] == 4
    run(longer, data, folder)
    assert f"resuming from {folder / 'checkpoint.pt'} at step 4" in capsys.readouterr().out
    assert torch.load(folder / "checkpoint.pt", weights_only=True)["images_seen"] == 8 * cosine.batch_size


def test_a_truncated_checkpoint_falls_back_to_the_newest_intact_one(tiny_params, data, tmp_path, capsys):
    """checkpoint.pt cut to half its size (checkpoint-00000003.pt intact beside it): the rerun names
    the damaged file in one line, resumes from step 3 saying so, ends with the weights of an
    uninterrupted run, and moves the damaged file aside (never rotating it over a kept one)."""
    cfg = replace(tiny_params.train, checkpoint_every=3, keep_checkpoints=10)
    run(tiny_params.train, data, tmp_path / "straight")  # checkpoint_every and keep_checkpoints are bookkeeping
    out = tmp_path / "run"
    killed(cfg, data, out, stop_at=8)  # checkpoints at 3 and 6
    assert sorted(files(out)) == ["checkpoint-00000003.pt", "checkpoint.pt"]
    path = out / "checkpoint.pt"
    cut = path.read_bytes()[: path.stat().st_size // 2]
    path.write_bytes(cut)
    intact = (out / "checkpoint-00000003.pt").read_bytes()
    capsys.readouterr()
    run(cfg, data, out)
    said = capsys.readouterr().out.splitlines()
    damaged = [ln for ln in said if "damaged" in ln]
    assert damaged[0].startswith(f"{path} is damaged, skipping it: ") and "zip archive" in damaged[0]
    assert [ln for ln in said if ln.startswith("resuming from")] == [
        f"resuming from {out / 'checkpoint-00000003.pt'} at step 3 (epoch 0, 48 images seen, "
        f"lr {cfg.lr * lr_factor(3, cfg):.6g})"]
    assert_same_weights(tmp_path / "straight", out)
    now = files(out)
    assert now["checkpoint.pt.damaged"] == cut and now["checkpoint-00000003.pt"] == intact
    for name, step in (("checkpoint-00000006.pt", 6), ("checkpoint-00000009.pt", 9), ("checkpoint.pt", 12)):
        assert torch.load(out / name, weights_only=True)["step"] == step


def test_with_no_intact_checkpoint_the_run_is_refused_and_nothing_is_touched(tiny_params, data, tmp_path):
    """A truncated checkpoint.pt, a checkpoint-<step>.pt of garbage bytes and one without its keys:
    one line naming all three, and the folder is as it was."""
    cfg = replace(tiny_params.train, steps=4, checkpoint_every=2)
    out = tmp_path / "run"
    killed(cfg, data, out, stop_at=4)  # the step-2 checkpoint
    path = out / "checkpoint.pt"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    (out / "checkpoint-00000001.pt").write_bytes(b"not a checkpoint at all")
    torch.save({"step": 1}, out / "checkpoint-00000002.pt")  # a real file, but no model, optimizer, ...
    before = files(out)
    with pytest.raises(T2IError) as e:
        run(cfg, data, out)
    line = str(e.value)
    assert "\n" not in line and line.startswith(f"no intact checkpoint in {out}, damaged: checkpoint.pt (")
    assert "checkpoint-00000002.pt (missing meta, model, ema, optimizer, scheduler, data, rng)" in line
    assert "checkpoint-00000001.pt (" in line and "Nothing was deleted" in line
    assert files(out) == before
