"""Real-data metrics: the distances against independent computations, and the Inception and CLIP
paths end to end with randomly initialised weights saved as local files (nothing is downloaded)."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import numpy as np
import pytest
import torch

from diffusion.errors import T2IError
from diffusion.evaluation.metrics import (
    INCEPTION_FILE,
    INCEPTION_URL,
    ClipScorer,
    InceptionFeatures,
    cached_reference,
    feature_stats,
    frechet_distance,
    frechet_distance_features,
    kernel_inception_distance,
    real_data_metrics,
    resolve_clip,
    resolve_inception_weights,
)

CLIP_MODEL = "ViT-S-32-alt"  # the smallest open_clip CLIP to build on CPU (43M parameters)


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    """Any connection attempt fails the test: the metrics must work offline."""
    def refuse(*args, **kwargs):
        raise AssertionError("network access attempted")

    monkeypatch.setattr(socket.socket, "connect", refuse)


def images(n: int, seed: int, size: int = 16) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


# ---------------------------------------------------------------------------------------------
# Fréchet distance


def fd_by_eigen(mu1, s1, mu2, s2) -> float:
    """Independent reference: Tr sqrt(S1 S2) = sum of sqrt(eig(sqrt(S1) S2 sqrt(S1))), all symmetric."""
    w, v = np.linalg.eigh(s1)
    root = (v * np.sqrt(w.clip(min=0))) @ v.T
    lam = np.linalg.eigvalsh(root @ s2 @ root).clip(min=0)
    return float((mu1 - mu2) @ (mu1 - mu2) + np.trace(s1) + np.trace(s2) - 2 * np.sqrt(lam).sum())


def test_frechet_distance_diagonal_closed_form():
    rng = np.random.default_rng(0)
    mu1, mu2 = rng.normal(size=8), rng.normal(size=8)
    a, b = rng.uniform(0.1, 3, 8), rng.uniform(0.1, 3, 8)
    expected = ((mu1 - mu2) ** 2).sum() + ((np.sqrt(a) - np.sqrt(b)) ** 2).sum()
    assert frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(expected, rel=1e-10)


def test_frechet_distance_full_covariance_matches_eigen_reference():
    rng = np.random.default_rng(1)
    d = 24
    x, y = rng.normal(size=(d, 3 * d)), rng.normal(size=(d, 3 * d))
    s1, s2 = x @ x.T / (3 * d), y @ y.T / (3 * d) + 0.5 * np.eye(d)
    mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(fd_by_eigen(mu1, s1, mu2, s2), rel=1e-9)


def test_frechet_distance_of_a_set_with_itself_and_singular_covariances():
    rng = np.random.default_rng(2)
    f1, f2 = rng.normal(size=(10, 32)), 1.3 * rng.normal(size=(12, 32)) + 0.2  # rank 9 and 11 in 32 dims
    assert frechet_distance(*feature_stats(f1), *feature_stats(f1)) == pytest.approx(0, abs=1e-5)
    singular = frechet_distance(*feature_stats(f1), *feature_stats(f2))
    assert np.isfinite(singular)
    assert singular == pytest.approx(fd_by_eigen(*feature_stats(f1), *feature_stats(f2)), rel=1e-6)


def test_frechet_distance_refuses_a_large_imaginary_part():
    with pytest.raises(ValueError, match="imaginary"):
        frechet_distance(np.zeros(3), np.eye(3), np.zeros(3), -np.eye(3))


@pytest.mark.parametrize("n1, n2", [(10, 12), (10, 200), (300, 400)])  # both singular, one singular, neither
def test_frechet_distance_features_matches_the_covariance_formula(n1, n2):
    rng = np.random.default_rng(3)
    f1, f2 = rng.normal(size=(n1, 32)), 1.3 * rng.normal(size=(n2, 32)) + 0.2
    expected = fd_by_eigen(*feature_stats(f1), *feature_stats(f2))
    assert frechet_distance_features(f1, f2) == pytest.approx(expected, rel=1e-7)  # the reference's sqrt of ~0
    assert frechet_distance_features(f1, f1) == pytest.approx(0, abs=1e-9)


# ---------------------------------------------------------------------------------------------
# KID


def test_kid_near_zero_for_one_distribution_and_positive_for_a_shift():
    rng = np.random.default_rng(4)
    f1, f2 = rng.normal(size=(200, 16)), rng.normal(size=(200, 16))
    same, _ = kernel_inception_distance(f1, f2, subsets=50, subset_size=100)
    shifted, _ = kernel_inception_distance(f1, f2 + 1.0, subsets=50, subset_size=100)
    assert abs(same) < 0.05
    assert shifted > 2.0


def test_kid_with_one_full_subset_is_the_unbiased_mmd():
    rng = np.random.default_rng(5)
    x, y = rng.normal(size=(6, 4)), rng.normal(size=(6, 4)) + 0.3
    n = len(x)

    def k(a, b):
        return (a @ b / 4 + 1) ** 3

    within = sum(k(x[i], x[j]) + k(y[i], y[j]) for i in range(n) for j in range(n) if i != j) / (n * (n - 1))
    across = sum(k(x[i], y[j]) for i in range(n) for j in range(n)) / n ** 2
    mean, std = kernel_inception_distance(x, y, subsets=1, subset_size=n)
    assert mean == pytest.approx(within - 2 * across, rel=1e-12)
    assert std == 0
    # subset_size is capped at the smaller set
    assert kernel_inception_distance(x, y, subsets=1, subset_size=1000)[0] == pytest.approx(mean, rel=1e-12)


def test_kid_matches_torch_fidelity():
    from torch_fidelity.metric_kid import kid_features_to_metric

    rng = np.random.default_rng(6)
    f1, f2 = rng.normal(size=(30, 8)), rng.normal(size=(40, 8)) + 0.2
    mean, std = kernel_inception_distance(f1, f2, subsets=10, subset_size=20, seed=3)
    ref = kid_features_to_metric(torch.from_numpy(f1), torch.from_numpy(f2), kid_subsets=10, kid_subset_size=20,
                                 rng_seed=3, verbose=False)
    assert mean == pytest.approx(ref["kernel_inception_distance_mean"], rel=1e-9)
    assert std == pytest.approx(ref["kernel_inception_distance_std"], rel=1e-9)


def test_kid_needs_two_samples_per_set():
    with pytest.raises(ValueError, match="at least 2 samples"):
        kernel_inception_distance(np.zeros((1, 4)), np.zeros((5, 4)))


# ---------------------------------------------------------------------------------------------
# Reference cache


def test_cached_reference_computes_once_per_key(tmp_path):
    calls = []

    def compute():
        calls.append(1)
        return np.arange(6.0).reshape(3, 2)

    key = {"real": "val", "weights": "sha256:abc", "n": 3}
    first = cached_reference(tmp_path, key, compute)
    again = cached_reference(tmp_path, dict(reversed(key.items())), compute)  # same key, other order
    np.testing.assert_array_equal(first, again)
    assert len(calls) == 1
    cached_reference(tmp_path, {**key, "n": 4}, compute)
    assert len(calls) == 2
    files = sorted(tmp_path.iterdir())
    assert [f.suffix for f in files] == [".npz", ".npz"]  # no temporary files left behind
    stored = {json.loads(str(np.load(f)["key"]))["n"] for f in files}
    assert stored == {3, 4}


# ---------------------------------------------------------------------------------------------
# Inception (FID, KID) with random weights in torch-fidelity's file format


def test_inception_url_is_torch_fidelitys():
    from torch_fidelity.feature_extractor_inceptionv3 import URL_INCEPTION_V3

    assert INCEPTION_URL == URL_INCEPTION_V3


def test_inception_features_shape_and_determinism(inception_weights):
    path, reason = resolve_inception_weights(str(inception_weights))
    assert path == inception_weights, reason
    extract = InceptionFeatures(path, progress=False)
    x = images(2, seed=0, size=20)
    f = extract(x)
    assert f.shape == (2, 2048) and f.dtype == np.float64
    assert np.isfinite(f).all() and f.std() > 1e-3
    np.testing.assert_array_equal(f, extract(x))
    np.testing.assert_allclose(extract(x[1:]), f[1:], rtol=1e-4, atol=1e-6)  # independent of the batch
    assert extract.weights_id.startswith("sha256:")


def test_auto_finds_the_weights_in_t2i_weights_dir(inception_weights, monkeypatch, tmp_path):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.setenv("T2I_WEIGHTS_DIR", str(inception_weights.parent))
    assert resolve_inception_weights("auto")[0] == inception_weights


def test_real_data_metrics_with_inception_and_the_cache(inception_weights, tmp_path):
    generated, real = images(8, seed=1), images(10, seed=2)
    kwargs = {"inception_weights": str(inception_weights), "clip_pretrained": None, "cache_dir": tmp_path,
              "real_key": {"set": "val", "n": 10}, "kid_subset_size": 6, "progress": False}
    first = real_data_metrics(generated, ["a red circle"] * 8, lambda: real, **kwargs)
    assert np.isfinite(first["fid"]) and first["fid"] > 0
    assert np.isfinite(first["kid"]["mean"]) and np.isfinite(first["kid"]["std"])
    assert first["clip_score"] is None and set(first["skipped"]) == {"clip_score"}
    assert (first["n_generated"], first["n_real"]) == (8, 10)
    assert first["extractors"]["inception"].startswith("sha256:")

    def must_not_run():
        raise AssertionError("the real set's features should come from the cache")

    second = real_data_metrics(generated, ["a red circle"] * 8, must_not_run, **kwargs)
    assert second == first


def test_unreadable_inception_weights_are_skipped(tmp_path):
    bad = tmp_path / "wrong.pth"
    torch.save({"fc.weight": torch.zeros(3)}, bad)
    pickled = tmp_path / "code.pth"
    torch.save({"not_a_tensor": Path("x")}, pickled)  # unpickling would run code: refused
    for path in (bad, pickled):
        with pytest.raises(T2IError, match="cannot load Inception weights"):
            InceptionFeatures(path)
        out = real_data_metrics(images(2, 0), ["x", "y"], images(2, 1), inception_weights=str(path),
                                real_key={}, cache_dir=tmp_path, progress=False)
        assert out["fid"] is None and str(path) in out["skipped"]["fid"]


# ---------------------------------------------------------------------------------------------
# CLIP score with a random open_clip model saved to a file


@pytest.fixture(scope="module")
def clip_weights(tmp_path_factory) -> Path:
    import open_clip

    torch.manual_seed(0)
    model = open_clip.create_model(CLIP_MODEL)
    path = tmp_path_factory.mktemp("clip") / "clip.pt"
    torch.save(model.state_dict(), path)
    return path


def test_clip_scores_from_a_local_file(clip_weights):
    spec, reason = resolve_clip(CLIP_MODEL, str(clip_weights))
    assert spec is not None and spec.checkpoint == clip_weights, reason
    score = ClipScorer(CLIP_MODEL, str(clip_weights), batch_size=2, progress=False)
    prompts = ["a red circle", "a blue square", "a green triangle"]
    s = score(images(3, seed=3), prompts)
    assert s.shape == (3,) and np.isfinite(s).all()
    assert ((s >= 0) & (s <= 100)).all()
    np.testing.assert_allclose(score(images(3, seed=3)[1:], prompts[1:]), s[1:], rtol=1e-4)  # batch-independent
    assert score.weights_id.startswith(f"{CLIP_MODEL}:sha256:")


def test_real_data_metrics_clip_only(clip_weights, tmp_path):
    out = real_data_metrics(images(2, 4), ["a", "b"], images(2, 5), inception_weights="off", clip_model=CLIP_MODEL,
                            clip_pretrained=str(clip_weights), real_key={}, cache_dir=tmp_path, progress=False)
    assert 0 <= out["clip_score"] <= 100
    assert out["skipped"] == {"fid": "disabled", "kid": "disabled"}
    assert out["extractors"]["clip"].startswith(CLIP_MODEL)


def test_clip_tag_is_used_only_from_the_local_cache(monkeypatch, tmp_path):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setenv("HOME", str(tmp_path))  # open_clip's URL cache is ~/.cache/clip
    spec, reason = resolve_clip("RN50", "openai")
    assert spec is None and "not in the local cache" in reason

    snapshot = tmp_path / "hf" / "models--timm--resnet50_clip.openai" / "snapshots" / "0123abc"
    snapshot.mkdir(parents=True)
    (snapshot / "open_clip_model.safetensors").write_bytes(b"weights")
    (snapshot.parent.parent / "refs").mkdir()
    (snapshot.parent.parent / "refs" / "main").write_text("0123abc")
    spec, reason = resolve_clip("RN50", "openai")
    assert spec.checkpoint == snapshot / "open_clip_model.safetensors", reason
    assert spec.quick_gelu  # OpenAI's weights were trained with QuickGELU
    assert spec.preprocess["image_interpolation"] == "bicubic"


# ---------------------------------------------------------------------------------------------
# Skips: missing weights are reasons, never exceptions


def test_everything_skipped_without_weights(monkeypatch, tmp_path):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setenv("T2I_WEIGHTS_DIR", str(tmp_path / "weights"))

    def must_not_run():
        raise AssertionError("no real images are needed when FID and KID are skipped")

    out = real_data_metrics(images(4, 0), ["a"] * 4, must_not_run, inception_weights="auto", clip_pretrained=None,
                            real_key={}, cache_dir=tmp_path, progress=False)
    assert (out["fid"], out["kid"], out["clip_score"]) == (None, None, None)
    assert INCEPTION_FILE in out["skipped"]["fid"] and str(tmp_path / "weights") in out["skipped"]["fid"]
    assert "clip_pretrained" in out["skipped"]["clip_score"]
    assert out["extractors"] == {"inception": None, "clip": None}


@pytest.mark.parametrize("setting", [None, "none", "off", "OFF"])
def test_inception_disabled(setting):
    assert resolve_inception_weights(setting) == (None, "disabled")


def test_missing_weights_paths_name_the_path(tmp_path):
    missing = tmp_path / "nowhere" / "inception.pth"
    out = real_data_metrics(images(2, 0), ["a", "b"], images(2, 1), inception_weights=str(missing),
                            clip_model=CLIP_MODEL, clip_pretrained=str(tmp_path / "clip.pt"), real_key={},
                            cache_dir=tmp_path, progress=False)
    assert str(missing) in out["skipped"]["fid"] and str(missing) in out["skipped"]["kid"]
    assert str(tmp_path / "clip.pt") in out["skipped"]["clip_score"]
    assert "neither a file nor an open_clip tag" in resolve_clip(CLIP_MODEL, "no-such-tag")[1]
    with pytest.raises(T2IError, match="clip_pretrained"):
        ClipScorer(CLIP_MODEL, None)
