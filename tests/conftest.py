"""Shared fixtures: tiny params, a tiny ingested dataset, isolated Prefect and MLflow homes."""

from __future__ import annotations

import contextlib
import os
import shutil
import sys
from pathlib import Path

import pytest
import yaml

os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
# Hugging Face (the VAE loader): never reach for the hub, a name that is not a local path fails at once
os.environ.setdefault("HF_HUB_OFFLINE", "1")

ROOT = Path(__file__).resolve().parents[1]

# Small enough for seconds on 2 CPU cores, big enough to exercise every code path.
TINY = {
    "dataset": {"n_train": 240, "n_val": 60},
    "ingest": {"samples_per_shard": 100},
    "judge": {"n_images": 600, "steps": 40, "batch_size": 64},
    "retrieval": {"steps": 40, "batch_size": 64, "width": 16, "dim": 64},
    "train": {"steps": 12, "batch_size": 16, "warmup_steps": 4, "checkpoint_every": 6, "log_every": 4,
              "shuffle_buffer": 50, "data_workers": 0,  # a worker process costs more than 12 tiny steps; the worker
              # path has its own tests (test_distributed: ranks with workers, killed and resumed under torchrun; test_clean_stop)
              "unet": {"channels": 16, "channel_mult": [1, 2], "attn_levels": [1], "heads": 2}},
    "sample": {"steps": 4, "per_combo": 1, "new_wording_per_combo": 1, "partial_per_combo": 0, "batch_size": 64,
               "grid_size": 6},
    "promote": {"floor": 0.0},  # a 12-step model draws few right pictures: let its first version be champion
    "evaluate": {"real_images": 60},
    "sweep": {"steps": [2, 4], "reference_steps": 10, "guidance_scales": [1.0, 4.0]},
}


def tiny_params_dict() -> dict:
    data = yaml.safe_load((ROOT / "params.yaml").read_text())
    for section, values in TINY.items():
        for k, v in values.items():
            if isinstance(v, dict):
                data[section][k].update(v)
            else:
                data[section][k] = v
    return data


@pytest.fixture(scope="session")
def tiny_params():
    from diffusion.config import parse_params

    return parse_params(tiny_params_dict(), "tiny")


@pytest.fixture(scope="session")
def tiny_shards(tiny_params, tmp_path_factory) -> Path:
    from diffusion.data.ingest import ingest

    out = tmp_path_factory.mktemp("shards")
    ingest(tiny_params.ingest, tiny_params.dataset, out, progress=False)
    return out


@pytest.fixture(scope="session")
def text_encoder(tiny_params):
    from diffusion.data.text import load_text_encoder

    e = tiny_params.embed
    return load_text_encoder(e.model, e.pretrained, e.seed, e.layer, "cpu")


@pytest.fixture(scope="session")
def tiny_embeddings(tiny_shards, text_encoder, tmp_path_factory) -> Path:
    from diffusion.data.text import captions_from_index, embed_captions

    out = tmp_path_factory.mktemp("embeddings")
    embed_captions(text_encoder, captions_from_index(tiny_shards)).save(out)
    return out


def assert_same_weights(a: Path, b: Path) -> None:
    """The networks exported to folders ``a`` and ``b`` hold the same tensors, bit for bit."""
    import torch
    from safetensors.torch import load_file

    wa, wb = load_file(str(a / "model.safetensors")), load_file(str(b / "model.safetensors"))
    assert set(wa) == set(wb)
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k


def copy_project(dest: Path) -> Path:
    """The project's tracked pipeline files in a fresh directory (for DVC / Prefect tests)."""
    dest.mkdir(parents=True, exist_ok=True)
    for name in ("diffusion", "flows"):
        shutil.copytree(ROOT / name, dest / name, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("dvc.yaml", "prefect.yaml", "pyproject.toml"):
        shutil.copy(ROOT / name, dest / name)
    shutil.copytree(ROOT / "prompts", dest / "prompts")
    shutil.copytree(ROOT / "analysis", dest / "analysis")
    (dest / "params.yaml").write_text(yaml.safe_dump(tiny_params_dict(), sort_keys=False))
    return dest


@pytest.fixture(scope="session")
def prefect_server(tmp_path_factory):
    from e2e_helpers import PrefectServer

    server = PrefectServer(tmp_path_factory.mktemp("prefect-home"))
    yield server
    server.stop()


@contextlib.contextmanager
def tracking_store(uri: str):
    """MLflow pointed at ``uri`` for the block. mlflow.set_tracking_uri also exports
    MLFLOW_TRACKING_URI to child processes, so the previous value (or its absence) is restored."""
    import mlflow

    before = os.environ.get("MLFLOW_TRACKING_URI")
    mlflow.set_tracking_uri(uri)
    try:
        yield uri
    finally:
        mlflow.set_tracking_uri(before)


@pytest.fixture(autouse=True)
def _restore_mlflow_tracking_uri():
    """A test that points MLflow somewhere must not leak it into later tests' subprocesses."""
    before = os.environ.get("MLFLOW_TRACKING_URI")
    yield
    if os.environ.get("MLFLOW_TRACKING_URI") != before and "mlflow" in sys.modules:
        sys.modules["mlflow"].set_tracking_uri(before)


@pytest.fixture(scope="session")
def tiny_model(tiny_params, tiny_shards, tiny_embeddings, tmp_path_factory) -> Path:
    """A tiny trained model folder (model.safetensors + model.json), as the train stage writes it."""
    from diffusion.artifacts import shard_urls
    from diffusion.data.text import EmbeddingTable
    from diffusion.training.train import train

    out = tmp_path_factory.mktemp("model")
    train(tiny_params.train, shard_urls(tiny_shards, "train"), EmbeddingTable.load(tiny_embeddings), out,
          image_size=16, progress=False)
    return out


@pytest.fixture(scope="session")
def registered_model(tiny_params, tiny_model, text_encoder, tmp_path_factory) -> dict:
    """A real MLflow SQLite store (in a temporary folder) holding t2i-shapes version 1 of the tiny
    model as the pipeline registers it, with @champion on it. Returns {tracking_uri, name, version, dir}."""
    import mlflow

    from diffusion.registry.pyfunc import log_and_register

    root = tmp_path_factory.mktemp("mlflow")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    with tracking_store(uri):
        mlflow.set_experiment(experiment_id=mlflow.create_experiment("t2i-test", artifact_location=(root / "art").as_uri()))
        info = log_and_register(tiny_model, text_encoder, tiny_params.sample,
                                {"adherence.held_out.all": 0.6}, "t2i-shapes",
                                evaluation={"id": "fp-test"}, lineage={"lineage.git_commit": "test"})
        mlflow.MlflowClient().set_registered_model_alias("t2i-shapes", "champion", str(info["version"]))
    return {"tracking_uri": uri, "name": "t2i-shapes", "version": info["version"], "dir": root}


@pytest.fixture(scope="session")
def inception_weights(tmp_path_factory) -> Path:
    """A random state dict that torch-fidelity's FeatureExtractorInceptionV3 loads like the real file."""
    import torch
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    from diffusion.evaluation.metrics import INCEPTION_FILE

    class Unloaded(FeatureExtractorInceptionV3):  # its constructor insists on loading a file: skip that
        def load_state_dict(self, state_dict, strict=True):
            pass

    d = tmp_path_factory.mktemp("inception")
    torch.save({}, d / "empty.pth")
    torch.manual_seed(0)
    net = Unloaded("inception-v3-compat", ["2048"], feature_extractor_weights_path=str(d / "empty.pth"))
    for m in net.modules():  # He init keeps activations O(1) through 94 conv layers (PyTorch's default shrinks them)
        if isinstance(m, torch.nn.Conv2d):
            torch.nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
    torch.save(net.state_dict(), d / INCEPTION_FILE)
    return d / INCEPTION_FILE
