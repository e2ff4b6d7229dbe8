"""The t2i CLI: user mistakes end in one line on stderr and exit status 2, never a traceback."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]


def t2i(*args, cwd):
    env = {**os.environ, "DO_NOT_TRACK": "1"}
    return subprocess.run([sys.executable, "-m", "flows.cli", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=300)


@pytest.fixture
def project(tmp_path):
    (tmp_path / "params.yaml").write_text((ROOT / "params.yaml").read_text())
    (tmp_path / "dvc.yaml").write_text((ROOT / "dvc.yaml").read_text())
    return tmp_path


def one_line_error(r, *fragments):
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith("t2i: error: ")
    for f in fragments:
        assert f in lines[0], lines[0]
    assert "Traceback" not in r.stderr


def test_missing_stage_input(project):
    r = t2i("train", "--shards", "data/shards", "--embeddings", "data/embeddings", "--out", "data/model", cwd=project)
    one_line_error(r, "shards not found at data/shards", "run the ingest stage first")


def test_malformed_params_key(project):
    data = yaml.safe_load((project / "params.yaml").read_text())
    data["train"]["lr"] = "fast"
    del data["train"]["steps"]
    data["train"]["stepz"] = 3
    (project / "params.yaml").write_text(yaml.safe_dump(data))
    r = t2i("ingest", "--out", "data/shards", cwd=project)
    one_line_error(r, "unknown key train.stepz")


def test_wrong_type_override(project):
    one_line_error(t2i("ingest", "--out", "x", "-s", "train.lr=fast", cwd=project), "train.lr must be a number")


def test_unknown_open_clip_model(project):
    (project / "data" / "shards").mkdir(parents=True)
    r = t2i("embed", "--shards", "data/shards", "--out", "data/embeddings", "-s", "embed.model=ViT-Q-99", cwd=project)
    one_line_error(r, "unknown open_clip model 'ViT-Q-99'")


def test_summary_before_any_run(project):
    r = t2i("summary", cwd=project)
    assert r.returncode == 0, r.stderr
    assert "not produced yet" in r.stdout and "mlflow ui --backend-store-uri sqlite:///mlflow.db" in r.stdout


def test_a_refusal_inside_a_stage_is_logged_without_a_traceback(tmp_path):
    """A T2IError raised inside a Prefect task (here: a resume refused) is logged by Prefect as a
    failed task and flow; those log lines carry no traceback, while another exception keeps its own."""
    code = r'''
import logging, sys
from flows.cli import quiet_expected_errors
from diffusion.errors import T2IError
from prefect import flow, task

quiet_expected_errors()

@task
def refuse():
    raise T2IError("checkpoint.pt was written with other settings: train.batch_size 16 -> 8")

@flow
def stage():
    refuse()

try:
    stage()
except T2IError:
    pass
try:
    raise ValueError("not ours")
except ValueError:
    logging.getLogger("other").exception("boom")
'''
    env = {**os.environ, "DO_NOT_TRACK": "1", "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300,
                       cwd=str(Path(__file__).resolve().parents[1]))
    assert r.returncode == 0, r.stderr
    err = r.stderr
    assert "train.batch_size 16 -> 8" in err and "Failed" in err  # Prefect did log the failure
    assert err.count("Traceback") == 1 and "ValueError: not ours" in err  # only the other exception's
