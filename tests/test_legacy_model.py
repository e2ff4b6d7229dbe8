"""A model registered before the library was split into subpackages still loads, predicts, serves
and feeds batch generation.

``fixtures/legacy_model_51187d2.tar.gz`` is the MLflow model folder that ``log_and_register`` wrote
at commit 51187d2 (the flat ``diffusion/`` package, the tiny test recipe at 8 channels), downloaded
with ``mlflow.artifacts.download_artifacts``. Its bundle carries that commit's code under ``code/``
and pickles its pyfunc class as ``diffusion.registry.T2IModel``. The one file left out is the
80 MB text tower, a seeded random initialisation: the test draws it again from the seed its spec
records and checks it against the sha256 the bundle was made with. ``expected/`` holds the two
images the old code drew from that version (pyfunc ``predict``, in the process that registered it).
"""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import tracking_store
from PIL import Image

FIXTURE = Path(__file__).parent / "fixtures" / "legacy_model_51187d2.tar.gz"
NAME = "t2i-legacy"


def pixels(png: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB"), dtype=np.int16)


def assert_drawn_alike(png: bytes, expected: bytes) -> None:
    """The same picture: equal pixels here; across CPUs, float rounding may move a pixel by a level."""
    a, b = pixels(png), pixels(expected)
    assert a.shape == b.shape
    assert np.abs(a - b).max() <= 2, f"max pixel difference {np.abs(a - b).max()}"


def rebuild_text_tower(model_dir: Path, expected_sha256: str) -> None:
    """The bundle's text_encoder.safetensors, drawn again from its recorded seed."""
    from safetensors.torch import save_file

    from diffusion.data.text import load_text_encoder

    spec = json.loads((model_dir / "artifacts" / "text_encoder.json").read_text())
    weights = spec["fingerprint"]["weights"]  # e.g. random:seed=0:torch=2.14.1+cu130
    seed = int(weights.split("seed=")[1].split(":")[0])
    encoder = load_text_encoder(spec["model"], None, seed, spec["layer"], "cpu")
    out = model_dir / "artifacts" / "text_encoder.safetensors"
    save_file({k: v.detach().cpu().contiguous() for k, v in encoder.model.state_dict().items()}, str(out))
    got = hashlib.sha256(out.read_bytes()).hexdigest()
    assert got == expected_sha256, f"the text tower drawn from {weights} is not the one the bundle was made with"


@pytest.fixture(scope="module")
def legacy(tmp_path_factory) -> dict:
    """The old bundle registered as t2i-legacy version 1 (@champion) in a fresh SQLite store."""
    import mlflow

    root = tmp_path_factory.mktemp("legacy")
    with tarfile.open(FIXTURE) as tar:
        tar.extractall(root, filter="data")
    expected = json.loads((root / "expected" / "expected.json").read_text())
    rebuild_text_tower(root / "model", (root / "expected" / "text_encoder.sha256").read_text().strip())
    uri = f"sqlite:///{root / 'mlflow.db'}"
    with tracking_store(uri):
        mlflow.set_experiment(experiment_id=mlflow.create_experiment("legacy", artifact_location=(root / "art").as_uri()))
        with mlflow.start_run() as run:
            mlflow.log_artifacts(str(root / "model"), "model")
        version = mlflow.register_model(f"runs:/{run.info.run_id}/model", NAME)
        mlflow.MlflowClient().set_registered_model_alias(NAME, "champion", version.version)
    images = [(root / "expected" / f"expected-{i}.png").read_bytes() for i in range(len(expected))]
    return {"tracking_uri": uri, "name": NAME, "version": int(version.version), "dir": root,
            "records": [{"prompt": e["prompt"], "seed": e["seed"]} for e in expected], "images": images}


@pytest.fixture(scope="module")
def predicted(legacy) -> pd.DataFrame:
    import mlflow

    with tracking_store(legacy["tracking_uri"]):
        model = mlflow.pyfunc.load_model(f"models:/{NAME}@champion")
    return model.predict(pd.DataFrame(legacy["records"]))


def test_the_fixture_was_made_by_the_flat_package():
    with tarfile.open(FIXTURE) as tar:
        names = tar.getnames()
        pickled = tar.extractfile("model/python_model.pkl").read()
    assert "model/code/diffusion/registry.py" in names and "model/code/diffusion/artifacts.py" in names
    assert not any(n.startswith("model/code/diffusion/registry/") for n in names)
    assert b"diffusion.registry" in pickled and b"T2IModel" in pickled


def test_loads_and_predicts_in_this_process(legacy, predicted):
    """Unpickled in a process that imported today's package: diffusion.registry.T2IModel resolves
    to today's class, which reads the old bundle's files."""
    assert list(predicted["prompt"]) == [r["prompt"] for r in legacy["records"]]
    for png, expected in zip(predicted["image"], legacy["images"]):
        assert_drawn_alike(png, expected)


def test_feeds_batch_generation(legacy, predicted, tmp_path):
    """The nightly batch reads the old version from the registry and draws the same images."""
    from diffusion.pipeline.batch import generate_batch, load_generator, plan_rows, read_prompts

    with tracking_store(legacy["tracking_uri"]):
        gen = load_generator(f"models:/{NAME}@champion", device="cpu")
    assert (gen.name, gen.version) == (NAME, "1")
    prompts_file = tmp_path / "prompts.csv"
    pd.DataFrame(legacy["records"]).to_csv(prompts_file, index=False)
    prompts = read_prompts(prompts_file)
    summary = generate_batch(gen, plan_rows(gen, prompts), tmp_path / "batch", progress=False,
                             log=lambda *_: None)
    manifest = pd.read_parquet(Path(summary["out"]) / "manifest.parquet")
    assert list(manifest["seed"]) == [r["seed"] for r in legacy["records"]]
    for row, png in zip(manifest.itertuples(), predicted["image"]):
        assert (Path(summary["out"]) / row.file).read_bytes() == png


@pytest.mark.e2e
def test_serves(legacy, predicted, tmp_path):
    """``mlflow models serve`` of the old version: a fresh process, the bundle's code first on its path."""
    import base64

    from test_serving import ModelServer

    server = ModelServer(legacy, tmp_path / "serve.log")
    try:
        rows = server.predictions({"dataframe_records": legacy["records"]})
    finally:
        server.stop()
    assert [(r["prompt"], r["seed"]) for r in rows] == [(r["prompt"], r["seed"]) for r in legacy["records"]]
    for row, expected in zip(rows, legacy["images"]):
        assert_drawn_alike(base64.b64decode(row["image"]), expected)
