"""Shared fixtures: tiny params, a tiny ingested dataset, isolated Prefect and MLflow homes."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import yaml

os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")

ROOT = Path(__file__).resolve().parents[1]

# Small enough for seconds on 2 CPU cores, big enough to exercise every code path.
TINY = {
    "dataset": {"n_train": 240, "n_val": 60},
    "ingest": {"samples_per_shard": 100},
    "judge": {"n_images": 600, "steps": 40, "batch_size": 64},
    "train": {"steps": 12, "batch_size": 16, "warmup_steps": 4, "checkpoint_every": 6, "log_every": 4,
              "shuffle_buffer": 50, "unet": {"channels": 16, "channel_mult": [1, 2], "attn_levels": [1], "heads": 2}},
    "sample": {"steps": 4, "per_combo": 1, "batch_size": 64, "grid_size": 6},
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
    from diffusion.ingest import ingest

    out = tmp_path_factory.mktemp("shards")
    ingest(tiny_params.ingest, tiny_params.dataset, out, progress=False)
    return out


@pytest.fixture(scope="session")
def text_encoder(tiny_params):
    from diffusion.text import load_text_encoder

    e = tiny_params.embed
    return load_text_encoder(e.model, e.pretrained, e.seed, e.layer, "cpu")


@pytest.fixture(scope="session")
def tiny_embeddings(tiny_shards, text_encoder, tmp_path_factory) -> Path:
    from diffusion.text import captions_from_index, embed_captions

    out = tmp_path_factory.mktemp("embeddings")
    embed_captions(text_encoder, captions_from_index(tiny_shards)).save(out)
    return out


def copy_project(dest: Path) -> Path:
    """The project's tracked pipeline files in a fresh directory (for DVC / Prefect tests)."""
    dest.mkdir(parents=True, exist_ok=True)
    for name in ("diffusion", "flows"):
        shutil.copytree(ROOT / name, dest / name, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("dvc.yaml", "prefect.yaml", "pyproject.toml"):
        shutil.copy(ROOT / name, dest / name)
    (dest / "params.yaml").write_text(yaml.safe_dump(tiny_params_dict(), sort_keys=False))
    return dest


@pytest.fixture(scope="session")
def prefect_server(tmp_path_factory):
    from e2e_helpers import PrefectServer

    server = PrefectServer(tmp_path_factory.mktemp("prefect-home"))
    yield server
    server.stop()
