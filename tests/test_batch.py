"""Batch generation: prompts files, models from a folder or the registry, resumable batches."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from PIL import Image

from conftest import tiny_params_dict
from diffusion.pipeline.batch import (CONTACT_SHEET, PARTS, batch_dir, generate_batch, load_generator, plan_rows,
                             read_prompts)
from diffusion.errors import T2IError

PROMPTS = ["a large red circle on the left", "a small blue square in the center", "a large green triangle on the right",
           "a small yellow circle on the left", "a large purple square on the right"]


# ---------------------------------------------------------------------------------------------
# Prompts files


def test_txt_skips_blank_lines_and_counts_them(tmp_path):
    f = tmp_path / "p.txt"
    f.write_text("a red circle\n\n   \nsmall blue square\n")
    p = read_prompts(f)
    assert [r["prompt"] for r in p.rows] == ["a red circle", "small blue square"]
    assert p.skipped == {"blank_line": 2}
    assert all(r["seed"] is None and r["negative_prompt"] is None for r in p.rows)


def test_csv_jsonl_parquet_read_optional_columns(tmp_path):
    rows = [{"prompt": "a red circle", "seed": 7, "negative_prompt": "blue", "guidance_scale": 2.5, "steps": 3},
            {"prompt": "a green square", "seed": None, "negative_prompt": None, "guidance_scale": None, "steps": None}]
    pd.DataFrame(rows).to_csv(tmp_path / "p.csv", index=False)
    (tmp_path / "p.jsonl").write_text("\n".join(json.dumps({k: v for k, v in r.items() if v is not None})
                                                for r in rows) + "\n")
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "p.parquet")
    for name in ("p.csv", "p.jsonl", "p.parquet"):
        got = read_prompts(tmp_path / name).rows
        assert got[0] == rows[0], name
        assert got[1] == {"prompt": "a green square", "seed": None, "negative_prompt": None,
                          "guidance_scale": None, "steps": None}, name


@pytest.mark.parametrize("name,content,message", [
    ("empty.txt", b"", "no prompts"),
    ("blank.txt", b"\n\n  \n", "no prompts"),
    ("nocol.csv", b"text,seed\na red circle,1\n", "no 'prompt' column"),
    ("latin1.txt", b"a red circle\ncaf\xe9 square\n", "line 2 is not UTF-8"),
    ("bad.jsonl", b'{"prompt": "a"}\nnot json\n', "line 2 is not JSON"),
    ("seed.csv", b"prompt,seed\na red circle,abc\n", "seed must be a int"),
    ("p.md", b"a red circle\n", "prompts must be"),
])
def test_bad_prompt_files_fail_in_one_line(tmp_path, name, content, message):
    (tmp_path / name).write_bytes(content)
    with pytest.raises(T2IError, match=message):
        read_prompts(tmp_path / name)


def test_missing_prompts_file(tmp_path):
    with pytest.raises(T2IError, match="prompts file not found"):
        read_prompts(tmp_path / "nope.txt")


# ---------------------------------------------------------------------------------------------
# Generating


@pytest.fixture(scope="module")
def local_gen(tiny_model, tiny_params):
    return load_generator(str(tiny_model), device="cpu", params=tiny_params)


def _prompts_file(tmp_path: Path, prompts=PROMPTS) -> Path:
    f = tmp_path / "prompts.txt"
    f.write_text("\n".join(prompts) + "\n")
    return f


def _frame(out: Path) -> pd.DataFrame:
    return pd.read_parquet(out / "manifest.parquet")


def test_batch_writes_images_manifest_and_contact_sheet(tmp_path, local_gen, tiny_model):
    rows = plan_rows(local_gen, read_prompts(_prompts_file(tmp_path)), base_seed=10)
    out = batch_dir(tmp_path / "batches", "run-a", "2026-11-27")
    summary = generate_batch(local_gen, rows, out, batch_size=2, progress=False, log=lambda *_: None)
    assert out == tmp_path / "batches/2026-11-27/run-a"
    m = _frame(out)
    assert list(m.columns) == ["index", "prompt", "negative_prompt", "seed", "sampler", "spacing", "steps",
                               "guidance_scale", "eta", "model_name", "model_version", "run_id", "file", "sha256",
                               "time"]
    assert list(m["prompt"]) == PROMPTS and list(m["seed"]) == [10, 11, 12, 13, 14]
    assert set(m["model_version"]) == {"local"} and set(m["model_name"]) == {tiny_model.name}
    for r in m.itertuples():
        data = (out / r.file).read_bytes()
        assert hashlib.sha256(data).hexdigest() == r.sha256
        assert Image.open(out / r.file).size == (16, 16)
    assert Image.open(out / CONTACT_SHEET).width > 100
    assert summary["images"] == summary["drawn"] == 5 and summary["resumed"] == 0
    assert not list(out.rglob("*.tmp"))

    # a rerun with the same arguments draws nothing and leaves the same manifest
    again = generate_batch(local_gen, rows, out, batch_size=2, progress=False, log=lambda *_: None)
    assert again["drawn"] == 0 and again["resumed"] == 5
    pd.testing.assert_frame_equal(_frame(out), m)


def test_image_depends_on_its_row_not_on_the_batch_it_was_drawn_in(tmp_path, local_gen):
    """Each image has its own noise generator, so neighbours and chunking do not change what is
    drawn; only float rounding does (CPU kernels pick their blocking by batch shape): at most one
    8-bit level in a few pixels. The same chunk size gives the same bytes."""
    rows = plan_rows(local_gen, read_prompts(_prompts_file(tmp_path)))
    a = generate_batch(local_gen, rows, tmp_path / "a", batch_size=1, progress=False, log=lambda *_: None)
    b = generate_batch(local_gen, rows, tmp_path / "b", batch_size=5, progress=False, log=lambda *_: None)
    again = generate_batch(local_gen, rows, tmp_path / "c", batch_size=5, progress=False, log=lambda *_: None)
    assert list(_frame(Path(b["out"]))["sha256"]) == list(_frame(Path(again["out"]))["sha256"])

    def pixels(out):
        return np.stack([np.asarray(Image.open(Path(out) / f)).astype(int) for f in _frame(Path(out))["file"]])

    diff = np.abs(pixels(a["out"]) - pixels(b["out"]))
    assert diff.max() <= 1 and (diff > 0).mean() < 0.01, (diff.max(), (diff > 0).mean())
    # different seeds are different pictures: the tolerance above is far below that
    other = generate_batch(local_gen, [{**r, "seed": r["seed"] + 100} for r in rows], tmp_path / "d", batch_size=5,
                           progress=False, log=lambda *_: None)
    assert np.abs(pixels(other["out"]) - pixels(b["out"])).max() > 20


def test_per_row_settings_and_negative_prompts(tmp_path, local_gen):
    f = tmp_path / "p.jsonl"
    f.write_text("\n".join(json.dumps(r) for r in [
        {"prompt": PROMPTS[0], "seed": 3},
        {"prompt": PROMPTS[0], "seed": 3, "steps": 2},
        {"prompt": PROMPTS[0], "seed": 3, "guidance_scale": 1.0},
        {"prompt": PROMPTS[0], "seed": 3, "negative_prompt": "a large blue square"},
    ]) + "\n")
    rows = plan_rows(local_gen, read_prompts(f))
    assert [r["steps"] for r in rows] == [local_gen.settings.steps, 2, local_gen.settings.steps,
                                         local_gen.settings.steps]
    out = Path(generate_batch(local_gen, rows, tmp_path / "out", progress=False, log=lambda *_: None)["out"])
    m = _frame(out)
    assert list(m["negative_prompt"]) == ["", "", "", "a large blue square"]
    assert m["sha256"].nunique() == 4  # each setting changes the picture
    with pytest.raises(T2IError, match="steps must be in"):
        plan_rows(local_gen, read_prompts(f), overrides={"steps": 10_000})


def test_refuses_to_mix_models_or_prompts_in_one_folder(tmp_path, local_gen, registered_model):
    import mlflow

    rows = plan_rows(local_gen, read_prompts(_prompts_file(tmp_path)))
    out = tmp_path / "out"
    generate_batch(local_gen, rows[:2], out, progress=False, log=lambda *_: None)
    with pytest.raises(T2IError, match="holds a batch of other prompts"):
        generate_batch(local_gen, rows, out, progress=False, log=lambda *_: None)
    mlflow.set_tracking_uri(registered_model["tracking_uri"])
    other = load_generator("models:/t2i-shapes@champion", device="cpu")
    with pytest.raises(T2IError, match=r"holds images from .* version local, not t2i-shapes version 1: refusing to mix"):
        generate_batch(other, plan_rows(other, read_prompts(_prompts_file(tmp_path)))[:2], out, progress=False,
                       log=lambda *_: None)


def test_registry_model_gives_the_same_images_as_its_folder(tmp_path, local_gen, registered_model):
    """models:/t2i-shapes@champion is the tiny model registered: same weights, encoder and settings."""
    import mlflow

    mlflow.set_tracking_uri(registered_model["tracking_uri"])
    gen = load_generator("models:/t2i-shapes@champion", device="cpu")
    assert (gen.name, gen.version) == ("t2i-shapes", "1") and gen.run_id
    assert gen.weights_sha256 == local_gen.weights_sha256
    prompts = read_prompts(_prompts_file(tmp_path))
    a = generate_batch(gen, plan_rows(gen, prompts), tmp_path / "reg", progress=False, log=lambda *_: None)
    b = generate_batch(local_gen, plan_rows(local_gen, prompts), tmp_path / "dir", progress=False, log=lambda *_: None)
    ma, mb = _frame(Path(a["out"])), _frame(Path(b["out"]))
    assert list(ma["sha256"]) == list(mb["sha256"])
    assert set(ma["model_version"]) == {"1"} and set(ma["run_id"]) == {gen.run_id}


@pytest.mark.parametrize("uri,message", [
    ("models:/nope@champion", "no registered model named 'nope'"),
    ("models:/t2i-shapes/99", "has no version 99"),
    ("models:/t2i-shapes@nightly", "has no @nightly yet"),
    ("models:/t2i-shapes/x/y", "not a model URI"),
    ("some/missing/folder", "model folder not found"),
])
def test_unknown_models_fail_in_one_line(registered_model, uri, message):
    import mlflow

    mlflow.set_tracking_uri(registered_model["tracking_uri"])
    with pytest.raises(T2IError, match=message):
        load_generator(uri, device="cpu")


def test_no_champion_yet(registered_model):
    import mlflow

    mlflow.set_tracking_uri(registered_model["tracking_uri"])
    client = mlflow.MlflowClient()
    client.create_registered_model("fresh-model")
    with pytest.raises(T2IError, match=r"'fresh-model' has no @champion yet .*t2i promote"):
        load_generator("models:/fresh-model@champion", device="cpu")


# ---------------------------------------------------------------------------------------------
# The command line: a kill mid-batch, then a rerun


def _cli_env(tmp_path: Path, api_url: str | None = None) -> dict:
    env = dict(os.environ, DO_NOT_TRACK="1", PREFECT_SERVER_ANALYTICS_ENABLED="false",
               PREFECT_HOME=str(tmp_path / "prefect-home"))
    env.pop("PREFECT_API_URL", None)
    if api_url:
        env["PREFECT_API_URL"] = api_url
    return env


@pytest.mark.e2e
def test_cli_kill_mid_batch_then_rerun_gives_the_uninterrupted_result(tmp_path, tiny_model, tiny_params,
                                                                      prefect_server):
    params = tiny_params_dict()
    params["sample"]["steps"] = 10
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(48)]
    _prompts_file(tmp_path, prompts)
    t2i = str(Path(sys.executable).parent / "t2i")
    cmd = [t2i, "generate", "--prompts", "prompts.txt", "--model", str(tiny_model), "--output-dir", "out",
           "--date", "2026-11-27", "--run-name", "nightly", "-s", "batch.batch_size=4", "-s", "batch.device=cpu"]
    out = tmp_path / "out/2026-11-27/nightly"
    env = _cli_env(tmp_path, prefect_server.url)
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=open(tmp_path / "first.log", "w"),
                            stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.time() + 120
    while time.time() < deadline and len(list((out / PARTS).glob("part-*.parquet"))) < 2:
        assert proc.poll() is None, f"generate ended before it could be killed: {(tmp_path / 'first.log').read_text()}"
        time.sleep(0.01)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (out / "manifest.parquet").exists(), "killed too late: the batch had finished"
    parts = len(list((out / PARTS).glob("part-*.parquet")))
    assert 2 <= parts < 12

    r = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    summary = json.loads(r.stdout[r.stdout.index("{"):])
    assert summary["resumed"] >= parts * 4 and summary["images"] == 48
    assert not [p for p in out.rglob("*") if p.name.startswith(".") or p.suffix == ".tmp"]

    # the same batch, uninterrupted (the library call the flow makes)
    gen = load_generator(str(tiny_model), device="cpu", params=tiny_params)
    gen.settings = dataclasses.replace(gen.settings, steps=10)
    clean = generate_batch(gen, plan_rows(gen, read_prompts(tmp_path / "prompts.txt")), tmp_path / "clean",
                           batch_size=4, progress=False, log=lambda *_: None)
    a, b = _frame(out), _frame(Path(clean["out"]))
    assert len(a) == 48
    pd.testing.assert_frame_equal(a.drop(columns="time"), b.drop(columns="time"))


def test_cli_errors_are_one_line(tmp_path, tiny_model):
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(tiny_params_dict()))
    (tmp_path / "empty.txt").write_text("\n")
    t2i = str(Path(sys.executable).parent / "t2i")
    r = subprocess.run([t2i, "generate", "--prompts", "empty.txt", "--model", str(tiny_model)], cwd=tmp_path,
                       env=_cli_env(tmp_path), capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and r.stderr.strip().startswith("t2i: error:") and "no prompts" in r.stderr
    assert "Traceback" not in r.stderr
