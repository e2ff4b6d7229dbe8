"""The promotion policy against a real MLflow registry (SQLite), two promoters at once, rollback."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import yaml

from conftest import tiny_params_dict
from e2e_helpers import BIN, base_env
from diffusion.config import PromoteConfig
from diffusion.errors import T2IError
from diffusion.registry.promote import HISTORY_TAG, decide, promote, rollback

NAME = "t2i-shapes"


@pytest.fixture
def store(tmp_path):
    """A fresh SQLite registry with a run to point versions at."""
    import mlflow

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = mlflow.MlflowClient(tracking_uri=uri, registry_uri=uri)
    exp = client.create_experiment("e", artifact_location=(tmp_path / "art").as_uri())
    run = client.create_run(exp)
    client.create_registered_model(NAME)
    return uri, client, run


def add_version(store, value: float | None, fingerprint: str = "fp-1") -> int:
    """A registered version with the metric and evaluation-fingerprint tags the register stage sets."""
    uri, client, run = store
    tags = {"eval.fingerprint": fingerprint}
    if value is not None:
        tags["adherence.held_out.all"] = f"{value:.4f}"
    mv = client.create_model_version(NAME, f"{run.info.artifact_uri}/model", run_id=run.info.run_id, tags=tags)
    return int(mv.version)


def champion(client) -> int | None:
    aliases = client.get_registered_model(NAME).aliases
    return int(aliases["champion"]) if "champion" in aliases else None


CFG = PromoteConfig(min_margin=0.02, floor=0.5)


# ---------------------------------------------------------------------------------------------
# The policy


class V:  # the two fields of a ModelVersion the policy reads
    def __init__(self, version, **tags):
        self.version, self.tags = str(version), {k.replace("__", "."): v for k, v in tags.items()}


@pytest.mark.parametrize("cfg,cand,champ,outcome", [
    (CFG, V(1, adherence__held_out__all="0.6", eval__fingerprint="a"), None, "promoted"),
    (CFG, V(1, adherence__held_out__all="0.4", eval__fingerprint="a"), None, "kept"),  # under the floor
    (CFG, V(2, adherence__held_out__all="0.63", eval__fingerprint="a"),
     V(1, adherence__held_out__all="0.60", eval__fingerprint="a"), "promoted"),
    (CFG, V(2, adherence__held_out__all="0.61", eval__fingerprint="a"),
     V(1, adherence__held_out__all="0.60", eval__fingerprint="a"), "kept"),  # below the margin
    (CFG, V(2, adherence__held_out__all="0.99", eval__fingerprint="b"),
     V(1, adherence__held_out__all="0.60", eval__fingerprint="a"), "refused"),  # not comparable
    (CFG, V(2, eval__fingerprint="a"), V(1, adherence__held_out__all="0.6", eval__fingerprint="a"), "refused"),
    (PromoteConfig(metric="fid", direction="minimize", min_margin=1.0, floor=50.0),
     V(2, fid="20", eval__fingerprint="a"), V(1, fid="22", eval__fingerprint="a"), "promoted"),
    (PromoteConfig(metric="fid", direction="minimize", min_margin=1.0, floor=50.0),
     V(2, fid="21.5", eval__fingerprint="a"), V(1, fid="22", eval__fingerprint="a"), "kept"),
    (PromoteConfig(metric="fid", direction="minimize", min_margin=1.0, floor=50.0),
     V(1, fid="60", eval__fingerprint="a"), None, "kept"),
    (PromoteConfig(min_margin=0.0), V(2, adherence__held_out__all="0.6", eval__fingerprint="a"),
     V(1, adherence__held_out__all="0.6", eval__fingerprint="a"), "kept"),  # a tie never wins
])
def test_policy(cfg, cand, champ, outcome):
    assert decide(cfg, cand, champ)[0] == outcome


# ---------------------------------------------------------------------------------------------
# Against the registry


def test_first_champion_then_a_win_then_a_loss_each_recorded(store):
    uri, client, _ = store
    v1 = add_version(store, 0.60)
    d = promote(client, uri, NAME, CFG)
    assert (d.outcome, d.candidate, d.champion_after) == ("promoted", v1, v1) and champion(client) == v1

    v2 = add_version(store, 0.70)
    d = promote(client, uri, NAME, CFG)  # the newest by default
    assert (d.outcome, d.candidate, d.champion_before, d.champion_after) == ("promoted", v2, v1, v2)
    assert champion(client) == v2

    v3 = add_version(store, 0.71)
    d = promote(client, uri, NAME, CFG)
    assert d.outcome == "kept" and champion(client) == v2 and "below margin 0.02" in d.reason

    t3 = client.get_model_version(NAME, str(v3)).tags
    assert t3["promotion.decision"] == "kept" and t3["promotion.compared_with"] == str(v2)
    t2 = client.get_model_version(NAME, str(v2))
    assert t2.tags["promotion.decision"] == "promoted" and t2.tags["promotion.compared_with"] == str(v1)
    assert t2.tags[f"promotion.challenged_by.v{v3}"].startswith("kept")
    assert f"kept v{v3}" in t2.description and f"promoted v{v2}" in t2.description
    assert f"promoted v{v2}" in client.get_model_version(NAME, str(v1)).description
    assert client.get_registered_model(NAME).tags[HISTORY_TAG] == f"{v1},{v2}"

    # promoting the champion again changes nothing
    d = promote(client, uri, NAME, CFG, candidate=v2)
    assert d.outcome == "kept" and "already holds" in d.reason


def test_refuses_across_evaluation_fingerprints(store):
    uri, client, _ = store
    v1 = add_version(store, 0.60, "fp-1")
    promote(client, uri, NAME, CFG)
    v2 = add_version(store, 0.99, "fp-2")
    d = promote(client, uri, NAME, CFG)
    assert d.outcome == "refused" and champion(client) == v1 and "fingerprints differ" in d.reason
    assert client.get_model_version(NAME, str(v2)).tags["promotion.decision"] == "refused"


def test_rollback_walks_the_history_back(store):
    uri, client, _ = store
    v1 = add_version(store, 0.60)
    promote(client, uri, NAME, CFG)
    v2 = add_version(store, 0.70)
    promote(client, uri, NAME, CFG)
    v3 = add_version(store, 0.80)
    promote(client, uri, NAME, CFG)
    assert champion(client) == v3
    d = rollback(client, uri, NAME)
    assert (d.outcome, d.champion_before, d.champion_after) == ("rolled_back", v3, v2) and champion(client) == v2
    assert "replaced by v2" in client.get_model_version(NAME, str(v3)).tags["promotion.rolled_back"]
    rollback(client, uri, NAME)
    assert champion(client) == v1
    with pytest.raises(T2IError, match="nothing to roll back to"):
        rollback(client, uri, NAME)
    assert champion(client) == v1


def test_errors_without_versions_or_champion(store):
    uri, client, _ = store
    with pytest.raises(T2IError, match="no versions yet"):
        promote(client, uri, NAME, CFG)
    with pytest.raises(T2IError, match="no @champion yet"):
        rollback(client, uri, NAME)
    with pytest.raises(T2IError, match="no registered model named 'other'"):
        promote(client, uri, "other", CFG)
    with pytest.raises(T2IError, match="has no version 7"):
        promote(client, uri, NAME, CFG, candidate=7)


PROMOTER = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    import mlflow
    from diffusion.config import PromoteConfig
    from diffusion.registry.promote import promote
    uri, version, go = sys.argv[1], int(sys.argv[2]), Path(sys.argv[3])
    client = mlflow.MlflowClient(tracking_uri=uri, registry_uri=uri)
    # widen the window between reading the champion and moving the alias, as a slow registry would:
    # without the lock, both promoters then read the same champion and both move the alias
    move = client.set_registered_model_alias
    client.set_registered_model_alias = lambda *a: (time.sleep(0.5), move(*a))
    while not go.exists():
        time.sleep(0.005)
    d = promote(client, uri, "t2i-shapes", PromoteConfig(min_margin=0.02, floor=0.5), version)
    print(d.outcome, d.champion_before, d.champion_after)
""")


def test_two_promotions_at_once_leave_the_alias_on_one_valid_version(store, tmp_path):
    """v2 (0.70) and v3 (0.80) race against champion v1 (0.60): whichever runs first, the later one
    compares against what the first left, so @champion ends on v3 and the history is one line."""
    uri, client, _ = store
    v1 = add_version(store, 0.60)
    promote(client, uri, NAME, CFG)
    v2, v3 = add_version(store, 0.70), add_version(store, 0.80)
    go = tmp_path / "go"
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    procs = [subprocess.Popen([sys.executable, "-c", PROMOTER, uri, str(v), str(go)], env=env, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE) for v in (v2, v3)]
    time.sleep(3)  # both imported mlflow and wait at the line
    go.touch()
    outs = [p.communicate(timeout=120) for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    assert champion(client) == v3
    decisions = {v: client.get_model_version(NAME, str(v)).tags["promotion.decision"] for v in (v2, v3)}
    assert decisions[v3] == "promoted"
    history = [int(v) for v in client.get_registered_model(NAME).tags[HISTORY_TAG].split(",")]
    assert history[0] == v1 and history[-1] == v3 and len(history) == len(set(history))
    # the loser was compared with the alias as the winner left it (or won first and was replaced)
    if decisions[v2] == "kept":
        assert client.get_model_version(NAME, str(v2)).tags["promotion.compared_with"] == str(v3)
        assert history == [v1, v3]
    else:
        assert history == [v1, v2, v3]


# ---------------------------------------------------------------------------------------------
# The command line


@pytest.mark.e2e
def test_cli_promote_rollback_lineage(tmp_path, store, prefect_server):
    uri, client, _ = store
    v1 = add_version(store, 0.60)
    v2 = add_version(store, 0.90)
    params = tiny_params_dict()
    params["mlflow"]["tracking_uri"] = uri
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    t2i = str(Path(sys.executable).parent / "t2i")
    env = {**prefect_server.env}
    env.pop("MLFLOW_TRACKING_URI", None)

    def cli(*args):
        return subprocess.run([t2i, *args], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)

    r = cli("promote", "--version", str(v1), "--out", "decision.json")
    assert r.returncode == 0, r.stderr[-2000:]
    assert json.loads((tmp_path / "decision.json").read_text())["outcome"] == "promoted"
    r = cli("promote")  # newest: v2 beats v1
    assert r.returncode == 0 and champion(client) == v2
    r = cli("lineage", "models:/t2i-shapes@champion")
    assert r.returncode == 0 and f"t2i-shapes version {v2} @champion" in r.stdout
    assert "eval.fingerprint" in r.stdout and "promotion.decision" in r.stdout
    r = cli("rollback")
    assert r.returncode == 0 and champion(client) == v1 and f"v{v2} -> v{v1}" in r.stdout
    r = cli("rollback")
    assert r.returncode == 2 and r.stderr.startswith("t2i: error:") and "nothing to roll back" in r.stderr
    r = cli("lineage", "models:/t2i-shapes/9")
    assert r.returncode == 2 and "has no version 9" in r.stderr
    r = cli("pipeline", "--stage", "tran")
    assert r.returncode == 2 and "invalid choice: 'tran'" in r.stderr and "Traceback" not in r.stderr


def test_promotion_metric_must_exist_for_the_data_before_training(tmp_path):
    """promote.metric auto follows the data; a metric the evaluation cannot produce here is refused
    in one line by `t2i train` before anything is trained (and by train-flow before any stage)."""
    import subprocess

    from diffusion.config import parse_params
    from diffusion.errors import ConfigError
    from diffusion.evaluation.evaluate import check_promotion_metric

    data = tiny_params_dict()
    assert check_promotion_metric(parse_params(data, "t")) == "adherence.held_out.all"
    data["ingest"].update(source="folder", path=str(tmp_path))
    assert check_promotion_metric(parse_params(data, "t")) == "retrieval.r_precision.generated.all.mean"
    data["promote"]["metric"] = "adherence.held_out.all"
    with pytest.raises(ConfigError, match="only for the built-in set.*promote.metric to auto"):
        check_promotion_metric(parse_params(data, "t"))
    data["promote"]["metric"] = "image.fid"
    data["evaluate"]["inception_weights"] = str(tmp_path / "missing.pth")
    with pytest.raises(ConfigError, match="Inception weights file not found"):
        check_promotion_metric(parse_params(data, "t"))
    data["promote"]["metric"] = "loss.final"
    with pytest.raises(ConfigError, match="none of adherence"):
        check_promotion_metric(parse_params(data, "t"))
    # the CLI: one line, exit 2, nothing trained (the inputs need not even exist)
    data["promote"]["metric"] = "image.fid"
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(data))
    r = subprocess.run([str(BIN / "t2i"), "train", "--params", str(tmp_path / "params.yaml"), "--shards", "nowhere",
                        "--embeddings", "nowhere", "--out", str(tmp_path / "model")], capture_output=True, text=True,
                       timeout=300, env=base_env())
    assert r.returncode == 2 and "promote.metric 'image.fid' cannot be measured here" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and not (tmp_path / "model").exists()
