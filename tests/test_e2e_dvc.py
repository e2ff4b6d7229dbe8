"""The whole pipeline through real DVC (a temporary git repo), real MLflow (SQLite) and real
Prefect (a local server), on tiny params: one `dvc repro` reused for the outputs, the registry
(lineage tags, @champion), `dvc plots show`, push / fresh clone / pull, and `dvc exp run`."""

from __future__ import annotations

import io
import json
import re

import pandas as pd
import pytest
import yaml
from PIL import Image

from conftest import ROOT, copy_project
from e2e_helpers import (BIN, DVC_REMOTE, base_env, dvc_experiments, git_commit, init_repo, run, set_dvc_remote,
                         use_project_dvc_config)

pytestmark = pytest.mark.e2e

ALL = {"ingest", "latents", "embed", "judge", "train", "sample", "evaluate", "register", "promote"}
AFTER_TRAIN = {"train", "sample", "evaluate", "register", "promote"}
# each stage's Prefect flow (promote runs the same flow as `t2i promote`)
FLOWS = {f"stage-{s}" for s in ALL - {"promote"}} | {"promote-model"}
LINEAGE_TAGS = ("lineage.git_commit", "lineage.git_dirty", "lineage.data.data/shards",
                "lineage.data.data/embeddings", "lineage.params_sha256", "eval.fingerprint")


def ran(stdout: str) -> set[str]:
    return set(re.findall(r"Running stage '([\w/.:]+)'", stdout))


def test_committed_dvc_remote_is_per_user_and_overridable(tmp_path):
    """The committed .dvc/config names a default local remote under the user's home (`~` is expanded
    by DVC when it reads the config, and kept as `~` in the file), and `dvc remote modify --local`
    moves it for one checkout without touching the committed file."""
    home = tmp_path / "home"
    home.mkdir()
    env = base_env(HOME=str(home), XDG_CONFIG_HOME=str(home / ".config"))
    project = tmp_path / "repo"
    project.mkdir()
    init_repo(project, env)
    dvc = str(BIN / "dvc")
    (project / ".dvc/config").write_text((ROOT / ".dvc/config").read_text())
    assert run([dvc, "remote", "default"], project, env).stdout.strip() == DVC_REMOTE
    assert "url = ~/.cache/t2i-diffusion/dvc-remote" in (project / ".dvc/config").read_text()
    default_dir = home / ".cache/t2i-diffusion/dvc-remote"
    url = [dvc, "config", f"remote.{DVC_REMOTE}.url"]  # the URL DVC uses (`dvc remote list` wraps it)
    assert run(url, project, env).stdout.strip() == str(default_dir)
    (project / "x.txt").write_text("hello\n")
    run([dvc, "add", "-q", "x.txt"], project, env)
    run([dvc, "push"], project, env)
    assert [p for p in default_dir.rglob("*") if p.is_file()]

    elsewhere = tmp_path / "elsewhere"
    set_dvc_remote(project, elsewhere, env)
    assert (project / ".dvc/config").read_text() == (ROOT / ".dvc/config").read_text()
    assert str(elsewhere) in (project / ".dvc/config.local").read_text()
    assert run(url, project, env).stdout.strip() == str(elsewhere)
    run([dvc, "push"], project, env)
    assert [p for p in elsewhere.rglob("*") if p.is_file()]


def test_dvc_repro_whole_pipeline(tmp_path, prefect_server):
    import mlflow

    from diffusion.config import parse_params, to_dict
    from diffusion.registry.lineage import params_hash

    project = copy_project(tmp_path / "project")
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["promote"]["floor"] = 0.0  # the tiny model's numbers are whatever they are: a first champion always
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    env = {**prefect_server.env}
    init_repo(project, env)
    remote = tmp_path / "dvc-remote"
    use_project_dvc_config(project, remote, env)
    head = run(["git", "rev-parse", "HEAD"], project, env).stdout.strip()
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
    assert len(manifest) == 108 + 108 and manifest["seed"].is_unique  # training wording + held-out wording
    reg = json.loads((project / "reports/registered_model.json").read_text())
    assert reg["version"] == 1 and reg["uri"] == "models:/t2i-shapes/1"
    loss = pd.read_csv(project / "data/model/loss.csv")
    assert list(loss.columns) == ["step", "loss", "val_loss"] and list(loss["step"]) == [4, 8, 12]
    assert loss["val_loss"].notna().tolist() == [False, False, True]  # train.val_every 50: at the last step only
    adherence = pd.read_csv(project / "reports/adherence.csv")
    assert {"seen.all", "held_out.all"} <= set(adherence["metric"])
    assert metrics["fd_judge"]["generated"] > 0 and "speckle" in metrics["fidelity"]["generated"]
    assert {"new_wording", "new_wording_held_out"} <= set(metrics["adherence"]) and "FD-judge" in (project / "reports/evaluation.md").read_text()

    # MLflow: the run has params, the loss curve, the grid; the registry has a tagged version
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{project / 'mlflow.db'}")
    run_ = client.get_run(reg["run_id"])
    assert run_.data.params["train.lr"] == "0.002"
    history = client.get_metric_history(reg["run_id"], "loss")
    assert len(history) == 3  # 12 steps, logged every 4
    assert "adherence.seen.all" in run_.data.metrics
    artifacts = {a.path for a in client.list_artifacts(reg["run_id"])}
    assert {"sample_grid.png", "loss_curve.png", "samples"} <= artifacts
    version = client.get_model_version("t2i-shapes", "1")
    assert float(version.tags["adherence.seen.all"]) == pytest.approx(metrics["adherence"]["seen"]["all"], abs=1e-4)

    # lineage: the commit, clean tree, the data hashes dvc.lock recorded for train, params, evaluation
    tags = version.tags
    for key in LINEAGE_TAGS:
        assert tags.get(key), f"version 1 lacks the tag {key}: {sorted(tags)}"
    lock = yaml.safe_load((project / "dvc.lock").read_text())
    train_deps = {d["path"]: d["md5"] for d in lock["stages"]["train"]["deps"]}
    assert tags["lineage.data.data/shards"] == train_deps["data/shards"]
    assert tags["lineage.data.data/embeddings"] == train_deps["data/embeddings"]
    assert tags["lineage.git_commit"] == head
    assert tags["lineage.git_dirty"] == "false"
    assert tags["lineage.params_sha256"] == params_hash(to_dict(parse_params(params, "params.yaml")))
    assert tags["eval.fingerprint"] == metrics["fingerprint"]["id"]

    # promotion: the first version becomes @champion
    promotion = json.loads((project / "reports/promotion.json").read_text())
    assert promotion["outcome"] == "promoted" and promotion["champion_after"] == 1, promotion
    assert int(client.get_model_version_by_alias("t2i-shapes", "champion").version) == 1

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
    assert FLOWS <= prefect_server.flow_names_with_runs()

    # nothing changed: nothing runs
    second = run([dvc, "repro"], project, env)
    assert ran(second.stdout) == set()

    # the sweep, on request: its own pipeline file, not part of `dvc repro`
    sweep = run([dvc, "repro", "analysis/dvc.yaml:sweep"], project, env)
    assert ran(sweep.stdout) == {"analysis/dvc.yaml:sweep"}
    points = pd.read_csv(project / "reports/sweep/points.csv")
    assert len(points) == 5 * 2 + 1 and set(points["sampler"]) == {"ddim", "heun", "dpmpp_2m", "dpmpp_2m_sde", "ddpm"}

    # `dvc plots show`: the loss curve and the adherence bars, with their data
    run([dvc, "plots", "show", "-o", str(tmp_path / "plots")], project, env)
    html = (tmp_path / "plots/index.html").read_text()
    assert "training loss (raw model, per batch) and val_loss" in html and "prompt adherence (the judge" in html
    assert f"{loss['loss'].iloc[-1]:.6g}" in html and "held_out.all" in html
    plots = json.loads(run([dvc, "plots", "show", "--json"], project, env).stdout)["data"]
    loss_plot = plots["loss"][0]["content"]
    # one series per y column: the training loss and val_loss, each record naming its field
    series = {f: [float(r["dvc_inferred_y_value"]) for r in loss_plot["data"]["values"]
                  if r.get("field") == f and r["dvc_inferred_y_value"] != ""]  # val_loss: empty where not measured
              for f in ("loss", "val_loss")}
    assert series["loss"] == pytest.approx(list(loss["loss"]), abs=1e-5)
    assert series["val_loss"] == pytest.approx(list(loss["val_loss"].dropna()), abs=1e-5) and series["val_loss"]
    bars = {r["metric"]: float(r["value"]) for r in plots["adherence"][0]["content"]["data"]["values"]}
    fd = {(r["filename"], r["steps"]): float(r["fd_judge"]) for r in plots["sweep_fd_judge"][0]["content"]["data"]["values"]}
    assert len(fd) == 5 * 2 + 1 and fd[("heun-karras.csv", "4")] == pytest.approx(
        points.query("sampler == 'heun' and steps == 4")["fd_judge"].item(), rel=1e-5)
    assert bars["held_out.all"] == pytest.approx(metrics["adherence"]["held_out"]["all"], abs=1e-5)
    # R-precision bars where it was measured (real images always; generated ones where a prompt is an
    # embedded caption, which the tiny set's evaluation prompts may not be)
    rp = metrics["retrieval"]["r_precision"]
    assert bars["r_precision.real.all"] == pytest.approx(rp["real"]["all"]["mean"], abs=1e-5)
    assert ("r_precision.generated.all" in bars) == (rp["generated"]["all"]["n"] > 0)

    # push, a fresh clone, pull: everything is up to date and nothing reruns
    git_commit(project, env, "pipeline run", "dvc.lock", "analysis/dvc.lock", "data/.gitignore", "reports")
    run([dvc, "push"], project, env)
    assert f"Cache and remote '{DVC_REMOTE}' are in sync" in run([dvc, "status", "--cloud"], project, env).stdout
    clone = tmp_path / "clone"
    run(["git", "clone", "-q", str(project), str(clone)], tmp_path, env)
    assert not (clone / "data/model").exists()
    set_dvc_remote(clone, remote, env)
    run([dvc, "pull"], clone, env)
    assert (clone / "data/model/loss.csv").read_bytes() == (project / "data/model/loss.csv").read_bytes()
    assert "Data and pipelines are up to date" in run([dvc, "status"], clone, env).stdout
    nothing = run([dvc, "repro"], clone, env)
    assert ran(nothing.stdout) == set() and "Data and pipelines are up to date" in nothing.stdout

    # an experiment on a train parameter: train and what follows rerun, not ingest/embed/judge
    exp = run([dvc, "exp", "run", "-S", "train.lr=0.001"], project, env)
    assert ran(exp.stdout) == AFTER_TRAIN
    reg2 = json.loads((project / "reports/registered_model.json").read_text())
    assert reg2["version"] == 2
    promotion = json.loads((project / "reports/promotion.json").read_text())
    assert promotion["candidate"] == 2 and promotion["champion_before"] == 1
    assert int(client.get_model_version_by_alias("t2i-shapes", "champion").version) == promotion["champion_after"]
    assert client.get_run(reg2["run_id"]).data.params["train.lr"] == "0.001"

    # `dvc exp show` lists it with its lr and its adherence metrics
    experiments = dvc_experiments(project, env)
    assert len(experiments) == 1, experiments
    shown = experiments[0]
    assert shown["params"]["params.yaml"]["train"]["lr"] == 0.001
    exp_metrics = shown["metrics"]["reports/metrics.json"]
    new_metrics = json.loads((project / "reports/metrics.json").read_text())
    for split in ("seen", "held_out"):
        assert exp_metrics["adherence"][split]["all"] == pytest.approx(new_metrics["adherence"][split]["all"])


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
