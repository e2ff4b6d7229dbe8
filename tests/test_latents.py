"""The latent path (diffusion.data.latents): a tiny randomly initialised AutoencoderKL saved to a folder
(and as a single file) goes through the same loading code a hub id uses; photos are real JPEGs
ingested from a folder; shards and latents are real tars."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from conftest import tiny_params_dict
from corpus import encode, picture
from diffusion import artifacts as art
from diffusion.models import store
from diffusion.registry import bundle
from diffusion.pipeline import stages
from diffusion.config import parse_params
from diffusion.errors import T2IError

pytest.importorskip("diffusers")

IMAGE_SIZE = 32  # -> 8x8x4 latents through a 4x VAE


def make_vae(folder: Path, latent_channels: int = 4, levels: int = 3, scaling_factor: float = 1.0, seed: int = 0):
    """A tiny random AutoencoderKL (``levels`` resolutions: downsampling 2^(levels-1)) saved as a
    diffusers folder, as `save_pretrained` writes a hub model."""
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * levels,
                        up_block_types=("UpDecoderBlock2D",) * levels, block_out_channels=(8,) * levels,
                        layers_per_block=1, latent_channels=latent_channels, norm_num_groups=4,
                        sample_size=IMAGE_SIZE, scaling_factor=scaling_factor)
    vae.save_pretrained(str(folder))
    return folder


@pytest.fixture(scope="module")
def vae_dir(tmp_path_factory) -> Path:
    return make_vae(tmp_path_factory.mktemp("tiny-vae"))


def photo_params(tmp_path: Path, vae: Path | None, n: int = 48, **latents) -> "Params":
    src = tmp_path / "photos"
    if not src.is_dir():
        src.mkdir()
        for i in range(n):
            (src / f"{i:03d}.jpg").write_bytes(encode(picture(900 + i, (80, 64)), "JPEG", quality=90))
            (src / f"{i:03d}.txt").write_text(f"a photo of pattern number {i % 5}")
    data = tiny_params_dict()
    data["ingest"].update(source="folder", path=str(src), image_size=IMAGE_SIZE, image_format="jpg", min_size=32,
                          val_fraction=0.2, samples_per_shard=20)
    data["latents"].update(vae=str(vae) if vae else None, batch_size=8, **latents)
    data["train"]["unet"].update(patch=1)
    data["mlflow"]["tracking_uri"] = f"sqlite:///{tmp_path / 'mlflow.db'}"
    data["evaluate"].update(inception_weights=None, cache_dir=str(tmp_path / "eval-cache"))
    return parse_params(data, "test")


def shard_bytes(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("shard-*.tar"))}


@pytest.fixture(scope="module")
def ingested(tmp_path_factory, vae_dir):
    tmp = tmp_path_factory.mktemp("photos")
    p = photo_params(tmp, vae_dir)
    stages.ingest(p, tmp / "shards")
    return tmp, p


def test_latents_stage_encodes_every_image_once_and_reruns_only_what_is_missing(ingested, tmp_path, vae_dir):
    from diffusion.data.latents import LATENTS_INFO, load_vae
    from diffusion.data.shards import iter_samples

    root, p = ingested
    out = tmp_path / "latents"
    first = stages.latents(p, root / "shards", out, progress=False)
    n_train = first["latent"]["samples"]["train"]
    n_val = first["latent"]["samples"]["val"]
    assert first["enabled"] and first["encoded"] == n_train + n_val == 48 and first["kept"] == 0
    assert first["latent"]["channels"] == 4 and first["latent"]["size"] == IMAGE_SIZE // 4
    fp = first["fingerprint"]
    assert fp["image_size"] == IMAGE_SIZE and fp["store_dtype"] == "float16" and len(fp["weights_sha256"]) == 64
    # one latent shard per image shard, same names; keyed by the image's key; mean/std as encoded
    images = {s["key"]: s for s in iter_samples(art.shard_urls(root / "shards", "train"))}
    latents = {s["key"]: s for s in iter_samples(sorted(str(f) for f in (out / "train").glob("shard-*.tar")))}
    assert set(latents) == set(images)
    assert sorted(f.name for f in (out / "train").glob("*.tar")) == \
        sorted(Path(u).name for u in art.shard_urls(root / "shards", "train"))
    key = sorted(images)[0]
    vae = load_vae(str(vae_dir))
    x = torch.from_numpy(images[key]["image"]).permute(2, 0, 1)[None].float() / 127.5 - 1
    dist = vae.encode(x).latent_dist
    got = latents[key]
    assert got["mean"].dtype == np.float16 and got["mean"].shape == (4, 8, 8)
    np.testing.assert_allclose(got["mean"], dist.mean[0].numpy(), atol=2e-3, rtol=2e-3)
    np.testing.assert_allclose(got["std"], dist.std[0].numpy(), atol=2e-3, rtol=2e-3)
    assert got["caption"] == images[key]["caption"]

    # a rerun encodes nothing and changes no byte
    before = shard_bytes(out)
    again = stages.latents(p, root / "shards", out, progress=False)
    assert again["encoded"] == 0 and again["kept"] == len(before) and shard_bytes(out) == before
    # a lost latent shard: only it is encoded again, to the same bytes
    lost = sorted(before)[0]
    (out / lost).unlink()
    third = stages.latents(p, root / "shards", out, progress=False)
    assert third["encoded"] == json.loads((out / LATENTS_INFO).read_text())["shards"][lost]["samples"] > 0
    assert shard_bytes(out) == before
    # another VAE (other weights): the fingerprint changes and everything is encoded again
    other = make_vae(tmp_path / "other-vae", seed=1)
    p2 = parse_params({**_as_dict(p), "latents": {**_as_dict(p)["latents"], "vae": str(other)}}, "test")
    fourth = stages.latents(p2, root / "shards", out, progress=False)
    assert fourth["encoded"] == 48 and fourth["fingerprint_id"] != first["fingerprint_id"]
    assert shard_bytes(out).keys() == before.keys() and shard_bytes(out) != before


def _as_dict(p) -> dict:
    from diffusion.config import to_dict

    return to_dict(p)


def test_a_failing_shard_keeps_the_finished_ones(ingested, tmp_path):
    """A shard holding an image of the wrong size is refused before the VAE sees it; the shards
    finished before it stay (complete, recorded), no temporary file is left, and once the bad shard
    is gone the rerun encodes only what is missing."""
    import webdataset as wds

    from diffusion.data.latents import LATENTS_INFO

    root, p = ingested
    shards = tmp_path / "shards"
    shutil.copytree(root / "shards", shards)
    bad = shards / "train" / "shard-999999-00.tar"  # sorts last: the others are encoded first
    with wds.TarWriter(str(bad)) as w:
        w.write({"__key__": "odd-one", "jpg": encode(picture(5, (48, 48)), "JPEG"), "txt": b"a photo",
                 "json": b"{}"})
    out = tmp_path / "latents"
    with pytest.raises(T2IError, match=r"odd-one is 48x48.*32x32"):
        stages.latents(p, shards, out, progress=False)
    done = json.loads((out / LATENTS_INFO).read_text())["shards"]
    assert done and "train/shard-999999-00.tar" not in done
    assert sorted(f.relative_to(out).as_posix() for f in out.rglob("*.tar")) == sorted(done)
    assert not list(out.rglob("*.tmp"))
    bad.unlink()
    rerun = stages.latents(p, shards, out, progress=False)
    assert rerun["kept"] == len(done) and rerun["encoded"] == 48 - sum(r["samples"] for r in done.values())


def test_single_file_vae_loads_through_the_same_code(vae_dir, tmp_path):
    from safetensors.torch import save_file

    from diffusion.data.latents import load_vae, weights_sha256

    folder = load_vae(str(vae_dir))
    single = tmp_path / "vae.safetensors"
    save_file(folder.state_dict(), str(single))
    assert weights_sha256(load_vae(str(single), config=str(vae_dir))) == weights_sha256(folder)


def test_bad_vae_settings_fail_in_one_line(ingested, tmp_path):
    from diffusion.data.latents import load_vae

    root, p = ingested
    with pytest.raises(T2IError, match=r"latents\.vae: no such file or folder: /nowhere/vae"):
        load_vae("/nowhere/vae")
    with pytest.raises(T2IError, match=r"latents\.vae: could not load an AutoencoderKL from 'nobody/no-such-vae'"):
        load_vae("nobody/no-such-vae")
    # a VAE whose downsampling does not divide the image size: refused before encoding
    deep = make_vae(tmp_path / "deep", levels=7)  # 64x: 32px images have no 64x latents
    p2 = parse_params({**_as_dict(p), "latents": {**_as_dict(p)["latents"], "vae": str(deep)}}, "test")
    with pytest.raises(T2IError, match=r"ingest.image_size 32 is not a multiple of the VAE's downsampling factor 64"):
        stages.latents(p2, root / "shards", tmp_path / "latents", progress=False)
    # train with latents.vae set but no latents written
    stages.embed(p, root / "shards", tmp_path / "emb")
    with pytest.raises(T2IError, match=r"latents.vae is set but .* holds no latents: run the latents stage"):
        stages.train(p, root / "shards", tmp_path / "emb", tmp_path / "model", progress=False,
                     latents_dir=tmp_path / "empty")


def test_latents_off_is_a_record_and_pixel_training(ingested, tmp_path):
    root, p = ingested
    off = parse_params({**_as_dict(p), "latents": {**_as_dict(p)["latents"], "vae": None}}, "test")
    info = stages.latents(off, root / "shards", tmp_path / "latents", progress=False)
    assert info["enabled"] is False and not list((tmp_path / "latents").rglob("*.tar"))
    from diffusion.data.latents import latent_training_data

    assert latent_training_data(tmp_path / "latents", root / "shards") is None


def test_train_sample_register_in_latent_space(ingested, tmp_path, vae_dir):
    """train on latents -> sample decodes through the VAE -> the registered model carries the VAE
    and predicts on a machine without the original VAE folder; a mismatched VAE is refused."""
    import io

    import mlflow
    import pandas as pd
    from PIL import Image

    from conftest import tracking_store

    root, p = ingested
    stages.latents(p, root / "shards", tmp_path / "latents", progress=False)
    stages.embed(p, root / "shards", tmp_path / "emb")
    # train.sample_every: a preview grid mid-run, decoded through the VAE like the final one
    p_previews = parse_params({**_as_dict(p), "train": {**_as_dict(p)["train"], "sample_every": 6}}, "test")
    info = stages.train(p_previews, root / "shards", tmp_path / "emb", tmp_path / "model", progress=False,
                        latents_dir=tmp_path / "latents")
    assert info["steps"] == p.train.steps == 12
    meta = art.model_meta(tmp_path / "model")
    assert meta["latents"]["channels"] == 4 and meta["latents"]["size"] == 8 and meta["image_size"] == IMAGE_SIZE
    den, _ = store.load_model(tmp_path / "model")
    assert den.net.stem.in_channels == 4 * p.train.unet.patch ** 2 and den.codec is not None
    assert set(load_file(str(tmp_path / "model" / "model.safetensors"))) == set(den.net.state_dict())  # no VAE in it
    assert Image.open(tmp_path / "model" / art.TRAIN_GRID).width > 100
    run = art.read_run_file(tmp_path / "model")
    client = mlflow.MlflowClient(tracking_uri=run["tracking_uri"])
    previews = [a.path for a in client.list_artifacts(run["run_id"], "train_samples")]
    assert previews == ["train_samples/step_0000006.png"]
    grid = Image.open(client.download_artifacts(run["run_id"], previews[0], str(tmp_path)))
    assert grid.size == Image.open(tmp_path / "model" / art.TRAIN_GRID).size
    # val_loss (train.val_every) on the val split's latents, at the last step: MLflow and loss.csv
    assert [m.step for m in client.get_metric_history(run["run_id"], "val_loss")] == [12]
    assert pd.read_csv(tmp_path / "model" / art.LOSS_HISTORY)["val_loss"].notna().sum() == 1

    stages.sample(p, root / "shards", tmp_path / "model", tmp_path / "samples", progress=False)
    manifest = art.read_manifest(tmp_path / "samples")
    img = Image.open(tmp_path / "samples" / manifest[0]["file"])
    assert img.size == (IMAGE_SIZE, IMAGE_SIZE) and len(manifest) > 0
    stages.judge(p, root / "shards", tmp_path / "judge", tmp_path / "reports/judge.json")
    metrics = stages.evaluate(p, tmp_path / "samples", tmp_path / "judge", tmp_path / "model",
                              tmp_path / "reports/metrics.json", root / "shards")
    assert metrics["samples"] == len(manifest) and metrics["fidelity"]["generated"] is not None

    # a VAE with other latent channels, or another scale, is refused at sampling
    for bad, match in [(make_vae(tmp_path / "vae8", latent_channels=8), "8 latent channels, the model was trained on 4"),
                       (make_vae(tmp_path / "vae-scaled", scaling_factor=0.5), "scaling factor 0.5")]:
        p_bad = parse_params({**_as_dict(p), "latents": {**_as_dict(p)["latents"], "vae": str(bad)}}, "test")
        with pytest.raises(T2IError, match=match):
            stages.sample(p_bad, root / "shards", tmp_path / "model", tmp_path / "samples-bad", progress=False)

    with tracking_store(p.mlflow.tracking_uri):
        reg = stages.register(p, tmp_path / "model", tmp_path / "reports/metrics.json", tmp_path / "reports/reg.json")
        # the VAE folder disappears: the registered model still decodes, from its own copy
        moved = tmp_path / "vae-elsewhere"
        shutil.move(str(vae_dir), moved)
        try:
            model = mlflow.pyfunc.load_model(reg["uri"])
            out = model.predict(pd.DataFrame({"prompt": ["a photo of pattern number 1"], "seed": [3]}))
        finally:
            shutil.move(str(moved), vae_dir)
    png = Image.open(io.BytesIO(out["image"][0]))
    assert png.size == (IMAGE_SIZE, IMAGE_SIZE)
    direct = store.load_model(tmp_path / "model")[0]
    from diffusion.config import SampleConfig
    from diffusion.sampling.generate import encode_prompts, generate
    from diffusion.data.text import load_text_encoder

    e = p.embed
    cond, uncond = encode_prompts(load_text_encoder(e.model, e.pretrained, e.seed, e.layer, "cpu"),
                                  ["a photo of pattern number 1"])
    settings = SampleConfig(**{k: getattr(p.sample, k) for k in bundle.BUNDLE_SAMPLER_KEYS})
    same = generate(direct, cond, uncond, [3], IMAGE_SIZE, settings)
    assert np.array_equal(np.asarray(png.convert("RGB")), same[0])


@pytest.mark.e2e
def test_dvc_repro_latent_pipeline_on_a_folder_of_photos(tmp_path, prefect_server, vae_dir, inception_weights):
    """ingest (a folder of photos) -> latents -> embed -> train -> sample -> evaluate -> register ->
    promote, through real `dvc repro`, Prefect flows on a server and an MLflow SQLite store."""
    import io

    import mlflow
    import pandas as pd
    import yaml
    from PIL import Image

    from conftest import copy_project
    from e2e_helpers import BIN, init_repo, run
    from test_e2e_dvc import ran

    project = copy_project(tmp_path / "project")
    data = _as_dict(photo_params(tmp_path, vae_dir, n=40))
    data["mlflow"]["tracking_uri"] = "sqlite:///mlflow.db"
    # the photos preset's policy: FID (here through randomly initialised Inception weights in a file)
    data["evaluate"].update(inception_weights=str(inception_weights))
    data["promote"].update(metric="image.fid", direction="minimize", floor=1e9)
    (project / "params.yaml").write_text(yaml.safe_dump(data, sort_keys=False))
    env = {**prefect_server.env}
    init_repo(project, env)
    dvc = str(BIN / "dvc")

    first = run([dvc, "repro"], project, env)
    assert ran(first.stdout) == {"ingest", "latents", "embed", "judge", "train", "sample", "evaluate",
                                 "register", "promote"}
    info = json.loads((project / "data/latents/latents.json").read_text())
    assert info["enabled"] and info["latent"]["samples"]["train"] + info["latent"]["samples"]["val"] == 40
    meta = json.loads((project / "data/model/model.json").read_text())
    assert meta["latents"]["fingerprint_id"] == info["fingerprint_id"]
    manifest = pd.read_parquet(project / "data/samples/manifest.parquet")
    assert len(manifest) > 0
    assert Image.open(project / "data/samples" / manifest["file"][0]).size == (IMAGE_SIZE, IMAGE_SIZE)
    metrics = json.loads((project / "reports/metrics.json").read_text())
    assert metrics["adherence"] is None and metrics["fidelity"]["generated"] is not None
    assert metrics["image"]["fid"] > 0
    reg = json.loads((project / "reports/registered_model.json").read_text())
    promotion = json.loads((project / "reports/promotion.json").read_text())
    assert promotion["outcome"] == "promoted", promotion
    assert "stage-latents" in prefect_server.flow_names_with_runs()

    mlflow.set_tracking_uri(f"sqlite:///{project / 'mlflow.db'}")
    try:
        client = mlflow.MlflowClient()
        assert client.get_run(reg["run_id"]).data.params["latents.channels"] == "4"
        model = mlflow.pyfunc.load_model(reg["uri"])
        out = model.predict(pd.DataFrame({"prompt": ["a photo of pattern number 2"], "seed": [0]}))
    finally:
        mlflow.set_tracking_uri(None)
    assert Image.open(io.BytesIO(out["image"][0])).size == (IMAGE_SIZE, IMAGE_SIZE)

    # nothing changed: nothing runs
    assert ran(run([dvc, "repro"], project, env).stdout) == set()
