"""The whole pipeline through real DVC (a temporary git repo), real MLflow (SQLite) and real
Prefect (a local server), on tiny params."""

from __future__ import annotations

import io
import json
import re

import pandas as pd
import pytest
import yaml
from PIL import Image

from conftest import ROOT, copy_project
from e2e_helpers import BIN, init_repo, run

pytestmark = pytest.mark.e2e

ALL = {"ingest", "embed", "judge", "train", "sample", "evaluate", "register"}


def ran(stdout: str) -> set[str]:
    return set(re.findall(r"Running stage '(\w+)'", stdout))


def test_dvc_repro_whole_pipeline(tmp_path, prefect_server):
    import mlflow

    project = copy_project(tmp_path / "project")
    env = {**prefect_server.env}
    init_repo(project, env)
    dvc = str(BIN / "dvc")

    first = run([dvc, "repro"], project, env)
    assert ran(first.stdout) == ALL

    # outputs
    metrics = json.loads((project / "reports/metrics.json").read_text())
    for split in ("seen", "held_out"):
        assert set(metrics["adherence"][split]) == {"shape", "color", "size", "position", "all", "n"}
        assert metrics["adherence"][split]["n"] > 0
    assert metrics["judge"]["held_out"]["n"] > 0
    grid = Image.open(project / "data/samples/grid.png")
    assert grid.width > 200
    manifest = pd.read_parquet(project / "data/samples/manifest.parquet")
    assert len(manifest) == 108 and manifest["seed"].is_unique
    reg = json.loads((project / "reports/registered_model.json").read_text())
    assert reg["version"] == 1 and reg["uri"] == "models:/t2i-shapes/1"

    # MLflow: the run has params, the loss curve, the grid; the registry has a tagged version
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{project / 'mlflow.db'}")
    run_ = client.get_run(reg["run_id"])
    assert run_.data.params["train.lr"] == "0.001"
    history = client.get_metric_history(reg["run_id"], "loss")
    assert len(history) == 3  # 12 steps, logged every 4
    assert "adherence.seen.all" in run_.data.metrics
    artifacts = {a.path for a in client.list_artifacts(reg["run_id"])}
    assert {"sample_grid.png", "loss_curve.png", "samples"} <= artifacts
    version = client.get_model_version("t2i-shapes", "1")
    assert float(version.tags["adherence.seen.all"]) == pytest.approx(metrics["adherence"]["seen"]["all"], abs=1e-4)

    # the registered pyfunc: prompts in, PNG images out, seed-deterministic
    mlflow.set_tracking_uri(f"sqlite:///{project / 'mlflow.db'}")
    model = mlflow.pyfunc.load_model("models:/t2i-shapes/1")
    out = model.predict(pd.DataFrame({"prompt": ["a large red circle on the left", "a small blue square"],
                                      "seed": [1, 2]}))
    assert list(out.columns) == ["prompt", "seed", "image"]
    img = Image.open(io.BytesIO(out["image"][0]))
    assert img.size == (16, 16)
    again = model.predict(pd.DataFrame({"prompt": ["a large red circle on the left"], "seed": [1]}))
    assert again["image"][0] == out["image"][0]

    # each stage ran as a Prefect flow on the server
    assert {f"stage-{s}" for s in ALL} <= prefect_server.flow_names_with_runs()

    # nothing changed: nothing runs
    second = run([dvc, "repro"], project, env)
    assert ran(second.stdout) == set()

    # a train parameter: train and what follows rerun, not ingest/embed/judge
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["train"]["lr"] = 0.002
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    third = run([dvc, "repro"], project, env)
    assert ran(third.stdout) == {"train", "sample", "evaluate", "register"}
    assert json.loads((project / "reports/registered_model.json").read_text())["version"] == 2


@pytest.mark.parametrize("runner", ["threads", "processes"])
def test_t2i_ingest_runs_units_on_the_prefect_task_runner(tmp_path, prefect_server, runner):
    """`t2i ingest --source folder` on a real server: one task run per work unit, on threads or
    on worker processes, and the same shards either way."""
    from corpus import write_folder_corpus

    accepted, expected = write_folder_corpus(tmp_path / "photos")
    (tmp_path / "params.yaml").write_text((ROOT / "params.yaml").read_text())
    before = prefect_server.completed_task_runs("unit ")
    r = run([str(BIN / "t2i"), "ingest", "--out", "shards", "--source", "folder", "--input", str(tmp_path / "photos"),
             "-s", "ingest.image_size=64", "-s", "ingest.samples_per_shard=8", "-s", "ingest.dedupe=true",
             "-s", f"ingest.task_runner={runner}"], tmp_path, {**prefect_server.env})
    stats = json.loads((tmp_path / "shards/stats.json").read_text())
    assert stats["accepted"] == accepted and stats["rejected"] == dict(expected)
    units = len(stats["units"])
    assert f"accepted {accepted}" in r.stdout + r.stderr
    assert prefect_server.completed_task_runs("unit ") - before == units
