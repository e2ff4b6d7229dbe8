"""Training under torchrun on the CPU (gloo): real processes, real shards.

2 processes at the same global batch follow the loss of 1 process; a 2-process run killed after
a checkpoint resumes to the same weights as one never killed; 3 shards on 2 ranks x 2 DataLoader
workers finish; and `t2i train -s train.nproc_per_node=2` launches torchrun itself, rank 0 alone
logging to MLflow, while `t2i train -s train.nnodes=2` started twice (two nodes on loopback) meets
at the rendezvous and trains to the same weights.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from conftest import ROOT, assert_same_weights, tiny_params_dict
from e2e_helpers import BIN, base_env, free_port

pytestmark = pytest.mark.e2e

TRAIN = {"steps": 12, "batch_size": 16, "warmup_steps": 4, "checkpoint_every": 6, "log_every": 1,
         "shuffle_buffer": 50, "data_workers": 0, "val_every": 5, "val_samples": 24,
         "unet": {"channels": 16, "channel_mult": [1, 2], "attn_levels": [1], "heads": 2}}


def run_training(tmp: Path, name: str, shards: Path, embeddings: Path, nproc: int, kill_at: int | None = None,
                 out: Path | None = None, **train) -> tuple[subprocess.CompletedProcess, Path, list[dict]]:
    out = out or tmp / name
    log = tmp / f"{name}.jsonl"
    spec = {"train": {**TRAIN, **train}, "shards": str(shards), "embeddings": str(embeddings), "out": str(out),
            "log": str(log), "kill_at": kill_at}
    config = tmp / f"{name}.json"
    config.write_text(json.dumps(spec))
    script = str(ROOT / "tests" / "dist_train.py")
    cmd = ([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", script]
           if nproc > 1 else [sys.executable, script])
    env = base_env(PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd + [str(config)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    records = [json.loads(line) for line in log.read_text().splitlines()] if log.is_file() else []
    return proc, out, records


def losses(records: list[dict]) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in records if "loss" in r}


def test_two_processes_follow_one_and_a_killed_run_resumes(tiny_shards, tiny_embeddings, tmp_path):
    one, out1, rec1 = run_training(tmp_path, "one", tiny_shards, tiny_embeddings, nproc=1)
    assert one.returncode == 0, one.stderr[-3000:]
    two, out2, rec2 = run_training(tmp_path, "two", tiny_shards, tiny_embeddings, nproc=2)
    assert two.returncode == 0, two.stderr[-3000:]
    l1, l2 = losses(rec1), losses(rec2)
    assert sorted(l1) == sorted(l2) == list(range(1, 13))  # rank 0 alone logs: one record a step
    # the same global batch (16 = 1 x 16 = 2 x 8), other samples: the trajectories agree within
    # 10% on average over the run, and both fall from their start
    a, b = np.array([l1[s] for s in sorted(l1)]), np.array([l2[s] for s in sorted(l2)])
    assert abs(b.mean() - a.mean()) / a.mean() < 0.10, (a, b)
    assert b[-4:].mean() < b[:4].mean() and a[-4:].mean() < a[:4].mean()
    assert json.loads((out2 / "model.json").read_text())["world"] == 2
    # the held-out loss: rank 0 alone evaluates (no collective), at steps 5, 10 and the last
    for rec in (rec1, rec2):
        assert [r["step"] for r in rec if "val_loss" in r] == [5, 10, 12]
        assert all(np.isfinite(r["val_loss"]) for r in rec if "val_loss" in r)

    # killed at step 8 (after the step-6 checkpoint), rerun: the same weights as the run above
    killed, out3, _ = run_training(tmp_path, "killed", tiny_shards, tiny_embeddings, nproc=2, kill_at=8)
    assert killed.returncode != 0 and not (out3 / "model.safetensors").exists()
    import torch

    assert torch.load(out3 / "checkpoint.pt", weights_only=True)["step"] == 6
    again, _, rec4 = run_training(tmp_path, "again", tiny_shards, tiny_embeddings, nproc=2, out=out3)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "resuming from" in again.stdout + again.stderr and min(losses(rec4)) == 7
    assert_same_weights(out2, out3)


def test_fewer_shards_than_ranks_times_workers_finishes(tiny_shards, tiny_embeddings, tmp_path):
    n_shards = len(list((tiny_shards / "train").glob("shard-*.tar")))
    assert n_shards == 3  # 2 ranks x 2 workers = 4 parts > 3 shards (and the shards are uneven)
    proc, out, rec = run_training(tmp_path, "workers", tiny_shards, tiny_embeddings, nproc=2, data_workers=2,
                                  steps=8, checkpoint_every=4)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads((out / "model.json").read_text())["steps_done"] == 8 and sorted(losses(rec)) == list(range(1, 9))


def t2i_train(cwd: Path, name: str, shards: Path, embeddings: Path, tracking: str, env: dict,
              **train) -> subprocess.Popen:
    """`t2i train` with the tiny params and ``train`` overrides, started in ``cwd`` (not waited
    for); its output goes to files (``name``.out/.err), so a process never blocks on a full pipe
    while another waits for it at a collective."""
    data = tiny_params_dict()
    data["train"].update(steps=8, batch_size=16, log_every=2, checkpoint_every=4, data_workers=1, **train)
    data["mlflow"]["tracking_uri"] = tracking
    cwd.mkdir(parents=True, exist_ok=True)
    (cwd / "params.yaml").write_text(yaml.safe_dump(data, sort_keys=False))
    with open(cwd / f"{name}.out", "w") as out, open(cwd / f"{name}.err", "w") as err:
        proc = subprocess.Popen([str(BIN / "t2i"), "train", "--shards", str(shards), "--embeddings", str(embeddings),
                                 "--out", "model"], cwd=cwd, env=env, stdout=out, stderr=err, text=True,
                                start_new_session=True)  # its torchrun and ranks: one process group to kill
    proc.logs = (cwd / f"{name}.out", cwd / f"{name}.err")
    return proc


def finished(*procs: subprocess.Popen, timeout: int = 600) -> list[tuple[int, str, str]]:
    """Wait for every process (killing all of them, torchrun and its ranks included, if one is
    still running at the timeout): [(exit code, stdout, stderr)]."""
    try:
        for p in procs:
            p.wait(timeout=timeout)
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
    return [(p.returncode, p.logs[0].read_text(), p.logs[1].read_text()) for p in procs]


def logged_once(tracking: str, out: Path) -> None:
    """One MLflow run, its loss logged once every log_every (2) steps: by rank 0 alone."""
    import mlflow

    run_id = json.loads((out / "run.json").read_text())["run_id"]
    client = mlflow.MlflowClient(tracking_uri=tracking)
    assert [m.step for m in client.get_metric_history(run_id, "loss")] == [2, 4, 6, 8]
    assert len(client.search_runs([client.get_run(run_id).info.experiment_id])) == 1


def test_t2i_train_launches_torchrun_on_one_node_and_on_two(tiny_shards, tiny_embeddings, tmp_path):
    env = base_env(OMP_NUM_THREADS="1")
    one = tmp_path / "one-node"
    tracking = f"sqlite:///{one / 'mlflow.db'}"
    [(code, out, err)] = finished(t2i_train(one, "node", tiny_shards, tiny_embeddings, tracking, env, nproc_per_node=2))
    assert code == 0, err[-3000:]
    assert "torch.distributed.run --nproc_per_node=2 --standalone" in out
    meta = json.loads((one / "model/model.json").read_text())
    assert meta["world"] == 2 and meta["steps_done"] == 8
    logged_once(tracking, one / "model")

    # train.nnodes=2: the same command started twice (two nodes, here both on loopback) meets at
    # train.rdzv_endpoint through torchrun's c10d rendezvous and trains as the 2 processes above
    # did, to the same weights bit for bit: ranks read their shards by rank, and the average of
    # two gradients does not depend on which process holds which
    two = tmp_path / "two-nodes"
    tracking = f"sqlite:///{two / 'mlflow.db'}"
    nodes = dict(nproc_per_node=1, nnodes=2, rdzv_endpoint=f"127.0.0.1:{free_port()}", rdzv_id="t2i-test")
    first = t2i_train(two, "node0", tiny_shards, tiny_embeddings, tracking, env, **nodes)
    second = t2i_train(two, "node1", tiny_shards, tiny_embeddings, tracking, env, **nodes)
    results = finished(first, second, timeout=400)
    for code, out, err in results:
        assert code == 0, err[-3000:]
        assert f"--nnodes=2 --rdzv_backend=c10d --rdzv_endpoint={nodes['rdzv_endpoint']}" in out
    meta = json.loads((two / "model/model.json").read_text())
    assert meta["world"] == 2 and meta["steps_done"] == 8
    logged_once(tracking, two / "model")
    assert_same_weights(one / "model", two / "model")
