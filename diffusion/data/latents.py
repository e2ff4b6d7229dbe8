"""Latent diffusion: encode every image once with a pretrained autoencoder, train and sample in its
latent space, decode through the same autoencoder.

The latents stage (``encode_shards``) mirrors the image shards: for ``shards/train/shard-X.tar``
it writes ``latents/train/shard-X.tar`` holding, per sample key,

    <key>.mean.npy   the posterior mean, float16, C x h x w, in the VAE's own (unscaled) space
    <key>.std.npy    the posterior standard deviation, the same shape
    <key>.txt        the caption (copied, so training never opens the image shards)
    <key>.json       the image shard's metadata

and ``latents.json``: the fingerprint (VAE identity and weights hash, image size, scaling and
shift factors, dtypes), one record per latent shard (its source shard's hash, samples, and the
running sums that give per-channel statistics), and the latent space the trainer reads (channels,
size, scaling factor, the largest scaled value). Storing mean and std lets training draw a fresh
sample of the posterior each time it sees an image (``train.latent_sampling: posterior``, as
diffusers' training scripts do) or use the mean.

Each latent shard is written under a temporary name and renamed when complete, and latents.json
is rewritten after each one, so a killed run keeps what it finished and a rerun encodes only the
shards that are missing or whose source changed; a different fingerprint re-encodes everything.

The autoencoder is diffusers' ``AutoencoderKL`` (the ``latents`` extra), loaded by ``load_vae``
from a hub id (``stabilityai/sd-vae-ft-mse``), a diffusers folder, or a single checkpoint file
(original or diffusers key layout; ``latents.config`` names its architecture when offline).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from diffusion import artifacts as art
from diffusion.config import LatentsConfig
from diffusion.errors import ConfigError, MissingInputError, T2IError

LATENTS_INFO = "latents.json"
STORE_DTYPE = "float16"
SINGLE_FILE_EXTS = (".safetensors", ".ckpt", ".pt", ".pth", ".bin")
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


# --------------------------------------------------------------------------------------------
# Loading the autoencoder


def _autoencoder_class():
    try:
        from diffusers import AutoencoderKL
    except ImportError:
        raise T2IError("latents.vae needs diffusers: pip install 't2i-diffusion[latents]'") from None
    return AutoencoderKL


def _looks_like_path(ref: str) -> bool:
    """A hub id is ``owner/name``; anything with a file extension, several slashes, or a leading
    ``.``/``/``/``~`` is meant as a path."""
    return (ref.startswith((".", "/", "~")) or ref.lower().endswith(SINGLE_FILE_EXTS) or ref.count("/") > 1
            or os.sep != "/" and os.sep in ref)


def load_vae(ref: str, *, subfolder: str | None = None, config: str | None = None, key: str = "latents.vae"):
    """``AutoencoderKL`` in float32 on the CPU, in eval mode, from a hub id, a diffusers folder or a
    single checkpoint file. ``key`` names the setting in errors."""
    AutoencoderKL = _autoencoder_class()
    path = Path(ref).expanduser()
    try:
        if path.is_file():
            kwargs = {"config": config} if config else {}
            vae = AutoencoderKL.from_single_file(str(path), **kwargs)
        elif path.is_dir():
            vae = AutoencoderKL.from_pretrained(str(path), subfolder=subfolder)
        elif _looks_like_path(ref):
            raise MissingInputError(f"{key}: no such file or folder: {ref}")
        else:
            vae = AutoencoderKL.from_pretrained(ref, subfolder=subfolder)
    except T2IError:
        raise
    except Exception as e:  # diffusers / huggingface_hub: not cached offline, bad file, wrong layout
        hint = (" (a single file needs its architecture offline: set latents.config to a diffusers folder or hub id)"
                if path.is_file() and not config else
                " (offline? put it in the Hugging Face cache or give a local folder or file)" if not path.exists() else "")
        raise T2IError(f"{key}: could not load an AutoencoderKL from {ref!r}: {type(e).__name__}: "
                       f"{str(e).splitlines()[0] if str(e) else ''}{hint}") from None
    return vae.float().eval().requires_grad_(False)


def weights_sha256(module: nn.Module) -> str:
    """Hash of a module's float32 weights (names, shapes and values), whatever file they came from."""
    h = hashlib.sha256()
    for name, t in sorted(module.state_dict().items()):
        h.update(name.encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def downsampling(vae) -> int:
    """Pixels per latent position along a side (8 for the Stable Diffusion VAE)."""
    return 2 ** (len(vae.config.block_out_channels) - 1)


def scaling_of(vae, cfg: LatentsConfig) -> tuple[float, float]:
    """(scaling_factor, shift_factor): latents.scaling_factor where set, else the VAE config's."""
    scale = cfg.scaling_factor if cfg.scaling_factor is not None else float(vae.config.scaling_factor)
    return float(scale), float(getattr(vae.config, "shift_factor", None) or 0.0)


def compute_dtype(cfg: LatentsConfig, vae, device: torch.device) -> torch.dtype:
    """``auto``: float32 on the CPU; float16 on CUDA unless the VAE's config asks for float32
    (``force_upcast``, e.g. the SDXL VAE, which overflows in float16), then bfloat16."""
    if cfg.dtype != "auto":
        return DTYPES[cfg.dtype]
    if device.type != "cuda":
        return torch.float32
    return torch.bfloat16 if getattr(vae.config, "force_upcast", False) else torch.float16


# --------------------------------------------------------------------------------------------
# The latent space a model lives in


@dataclass(frozen=True)
class LatentSpec:
    """What a latent model was trained on; saved in model.json under ``latents``."""

    channels: int
    size: int  # latent side
    image_size: int  # decoded side
    scaling_factor: float
    shift_factor: float
    abs_max: float  # largest |scaled mean| in the training latents: the sampler's x0 clamp
    vae: str  # the reference it was encoded with (hub id, folder or file)
    vae_subfolder: str | None
    vae_config: str | None
    vae_sha256: str
    fingerprint_id: str

    def as_dict(self) -> dict:
        import dataclasses

        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "LatentSpec":
        return cls(**d)


class LatentCodec(nn.Module):
    """The decoder side at sampling time: latents (scaled, as the model sees them) -> images."""

    def __init__(self, vae, spec: LatentSpec, dtype: torch.dtype = torch.float32, batch_size: int = 16):
        super().__init__()
        self.vae, self.spec, self.dtype, self.batch_size = vae, spec, dtype, batch_size
        if dtype != torch.float32:
            self.vae.to(dtype)

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        return (self.spec.channels, self.spec.size, self.spec.size)

    @torch.no_grad()
    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """(B, C, h, w) scaled latents -> (B, 3, H, W) float32 images in [-1, 1]."""
        out = []
        for chunk in z.split(self.batch_size):
            x = self.vae.decode((chunk / self.spec.scaling_factor + self.spec.shift_factor).to(self.dtype)).sample
            out.append(x.float().clamp_(-1, 1))
        return torch.cat(out) if out else z.new_zeros((0, 3, self.spec.image_size, self.spec.image_size))


def check_vae(vae, spec: LatentSpec, cfg: LatentsConfig | None, ref: str) -> None:
    """Refuse a VAE that does not fit a model trained on ``spec``: other latent channels, another
    scaling or shift, another downsampling factor. Other weights of the same shape (a fine-tuned
    decoder, say) are allowed, with a note."""
    problems = []
    channels = int(vae.config.latent_channels)
    if channels != spec.channels:
        problems.append(f"it has {channels} latent channels, the model was trained on {spec.channels}")
    scale, shift = scaling_of(vae, cfg or LatentsConfig())
    if not np.isclose(scale, spec.scaling_factor, rtol=1e-6) or not np.isclose(shift, spec.shift_factor, atol=1e-9):
        problems.append(f"its scaling factor {scale:g} (shift {shift:g}) differs from the model's "
                        f"{spec.scaling_factor:g} (shift {spec.shift_factor:g}); set latents.scaling_factor")
    if spec.image_size // spec.size != downsampling(vae):
        problems.append(f"it downsamples by {downsampling(vae)}, the model's latents by {spec.image_size // spec.size}")
    if problems:
        raise T2IError(f"VAE {ref!r} does not match the trained model: " + "; ".join(problems))
    if weights_sha256(vae) != spec.vae_sha256:
        print(f"note: VAE {ref!r} has other weights than the one the model was trained with ({spec.vae}); "
              "decoding with it")


def vae_for_model(meta: dict, cfg: LatentsConfig | None = None):
    """The VAE that decodes a latent model's samples (float32, CPU): ``cfg.vae`` where set (checked
    against the model), else the one recorded in the model. None for a pixel-space model."""
    if "latents" not in meta:
        if cfg is not None and cfg.vae:
            raise T2IError(f"latents.vae is set ({cfg.vae}) but the model was trained in pixel space: "
                           "unset latents.vae or train a latent model")
        return None
    spec = LatentSpec.from_dict(meta["latents"])
    if cfg is not None and cfg.vae:
        vae = load_vae(cfg.vae, subfolder=cfg.subfolder, config=cfg.config)
        check_vae(vae, spec, cfg, cfg.vae)
        return vae
    vae = load_vae(spec.vae, subfolder=spec.vae_subfolder, config=spec.vae_config,
                   key="the model's VAE (model.json latents.vae; set latents.vae to point elsewhere)")
    check_vae(vae, spec, LatentsConfig(scaling_factor=spec.scaling_factor), spec.vae)
    return vae


def codec_for(vae, meta: dict, device, cfg: LatentsConfig | None = None) -> LatentCodec:
    cfg = cfg or LatentsConfig()
    dev = torch.device(device)
    return LatentCodec(vae, LatentSpec.from_dict(meta["latents"]), compute_dtype(cfg, vae, dev), cfg.batch_size).to(dev)


# --------------------------------------------------------------------------------------------
# The latents stage


def _write_tar(path: Path, samples: list[dict[str, bytes]]) -> None:
    """A tar of samples ({"__key__", ext: bytes}) written under a temporary name, then renamed."""
    import webdataset as wds

    from diffusion.data.shards import SHARD_MTIME

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    with wds.TarWriter(str(tmp), mtime=SHARD_MTIME, user="t2i", group="t2i") as w:
        for s in samples:
            w.write(s)
    os.replace(tmp, path)


def _npy(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, a, allow_pickle=False)
    return buf.getvalue()


def read_info(latents_dir: str | Path) -> dict:
    return art.read_json(Path(latents_dir) / LATENTS_INFO, "latents info", "latents")


def _source_id(path: Path, old: dict | None) -> dict:
    """A source shard's identity: its sha256, recomputed only when its size or mtime moved."""
    st = path.stat()
    if old and old.get("source_size") == st.st_size and old.get("source_mtime_ns") == st.st_mtime_ns:
        return {k: old[k] for k in ("source_sha256", "source_size", "source_mtime_ns")}
    return {"source_sha256": art.sha256_file(path), "source_size": st.st_size, "source_mtime_ns": st.st_mtime_ns}


def fingerprint(cfg: LatentsConfig, vae, vae_sha: str, image_size: int, dtype: torch.dtype) -> dict:
    scale, shift = scaling_of(vae, cfg)
    return {"vae": cfg.vae, "subfolder": cfg.subfolder, "class": type(vae).__name__, "weights_sha256": vae_sha,
            "image_size": image_size, "latent_channels": int(vae.config.latent_channels),
            "latent_size": image_size // downsampling(vae), "scaling_factor": scale, "shift_factor": shift,
            "store_dtype": STORE_DTYPE, "encode_dtype": str(dtype).removeprefix("torch.")}


def _fp_id(fp: dict) -> str:
    return hashlib.sha256(json.dumps(fp, sort_keys=True).encode()).hexdigest()[:16]


def encode_shards(cfg: LatentsConfig, shards_dir: str | Path, out_dir: str | Path, progress: bool = True) -> dict:
    """Encode every train and val image of ``shards_dir`` into ``out_dir`` (see the module doc).

    With ``cfg.vae`` null the stage is off: ``latents.json`` says so and training stays in pixels.
    Returns latents.json's content plus what this run did (``encoded``, ``kept``, ``seconds``).
    """
    out = Path(out_dir)
    if not cfg.vae:
        for split in art.SPLITS:
            for f in (out / split).glob(art.SHARD_GLOB):
                f.unlink()
        info = {"enabled": False, "reason": "latents.vae is null: training runs in pixel space"}
        art.write_json(out / LATENTS_INFO, info)
        return {**info, "encoded": 0, "kept": 0, "seconds": 0.0}

    image_size = art.square_image_size(shards_dir)
    art.shard_urls(shards_dir, "train")  # at least one training shard
    sources = {split: [Path(u) for u in art.list_shards(Path(shards_dir) / split)] for split in art.SPLITS}
    vae, device, dtype, fp = _encoder(cfg, image_size)
    stats_of_shards = art.shard_stats(shards_dir)
    if stats_of_shards.get("resize_mode") == "bucket":  # each image is encoded at its own bucket's size
        from diffusion.data.buckets import check_divisible

        sizes = {tuple(b) for b in stats_of_shards["buckets"]}
        check_divisible(sizes, downsampling(vae), "the VAE's downsampling factor",
                        "set ingest.bucket_step (or ingest.buckets) to a multiple of it and re-ingest")
    else:
        sizes = {(image_size, image_size)}
    fp_id = _fp_id(fp)
    records, wanted, todo = _plan(out, fp_id, sources)
    counts = _index_counts(shards_dir)

    _save_info(out, cfg, fp, fp_id, records)
    t0, encoded = time.perf_counter(), 0
    bar = tqdm(total=sum(counts.get(n, 0) for n, _, _ in todo) or None, desc="latents", unit="img",
               disable=not progress, mininterval=2.0)
    for name, path, ident in todo:
        samples, stats = _encode_shard(vae, name, path, cfg.batch_size, sizes, device, dtype, fp, bar)
        _write_tar(out / name, samples)
        encoded += len(samples)
        records[name] = {**ident, "samples": len(samples), **stats.as_dict()}
        _save_info(out, cfg, fp, fp_id, records)
    bar.close()
    seconds = time.perf_counter() - t0
    info = _save_info(out, cfg, fp, fp_id, records)
    std = info["latent"]["channel_std"]
    if std and not 0.5 < float(np.sqrt(np.mean(np.square(std)))) < 2.0:
        rms = float(np.sqrt(np.mean(np.square(std))))
        print(f"latents: scaled latents have std {rms:.3g}, far from 1: consider latents.scaling_factor "
              f"{fp['scaling_factor'] / rms:.4g} (the VAE config says {fp['scaling_factor']:g})")
    return {**info, "encoded": encoded, "kept": len(wanted) - len(todo), "seconds": seconds,
            "img_per_s": encoded / seconds if seconds > 0 and encoded else 0.0}


def _encoder(cfg: LatentsConfig, image_size: int) -> tuple[nn.Module, torch.device, torch.dtype, dict]:
    """The VAE that ``cfg`` names, on its device in its compute dtype, and the fingerprint of the
    latents it writes. Refuses an image size its downsampling factor does not divide."""
    from diffusion.data.text import pick_device

    vae = load_vae(cfg.vae, subfolder=cfg.subfolder, config=cfg.config)
    vae_sha = weights_sha256(vae)
    factor = downsampling(vae)
    if image_size % factor:
        raise ConfigError(f"ingest.image_size {image_size} is not a multiple of the VAE's downsampling factor "
                          f"{factor}: re-ingest at a multiple (e.g. {image_size // factor * factor or factor})")
    device = pick_device(cfg.device)
    dtype = compute_dtype(cfg, vae, device)
    vae.to(device)
    if dtype != torch.float32:  # (diffusers warns on any dtype cast, even to float32)
        vae.to(dtype)
    return vae, device, dtype, fingerprint(cfg, vae, vae_sha, image_size, dtype)


def _plan(out: Path, fp_id: str, sources: dict[str, list[Path]]) -> tuple[dict[str, dict], dict[str, Path], list]:
    """(records, wanted, todo): the records of ``out``'s latents.json still good for fingerprint
    ``fp_id`` and their sources, every source shard by latent name (``train/shard-X.tar``), and the
    (name, source path, source identity) of each shard to encode. Deletes the latent files no
    record vouches for."""
    old = {}
    if (out / LATENTS_INFO).is_file():
        old = json.loads((out / LATENTS_INFO).read_text())
    records: dict[str, dict] = {}
    if old.get("enabled") and old.get("fingerprint_id") == fp_id:
        records = dict(old.get("shards", {}))
    elif old.get("enabled"):
        print(f"latents: the fingerprint changed (was {old.get('fingerprint_id')}, now {fp_id}): re-encoding everything")
    wanted = {f"{split}/{p.name}": p for split, paths in sources.items() for p in paths}
    for name in list(records):  # source shard gone, or the latent file lost: forget it
        if name not in wanted or not (out / name).is_file():
            records.pop(name)
    for split in art.SPLITS:  # latent files no record vouches for (stale, or from another fingerprint)
        for f in (out / split).glob(art.SHARD_GLOB):
            if f"{split}/{f.name}" not in records:
                f.unlink()

    todo = []
    for name, path in wanted.items():
        ident = _source_id(path, records.get(name))
        if name in records and records[name]["source_sha256"] == ident["source_sha256"]:
            records[name].update(ident)
        else:
            records.pop(name, None)
            todo.append((name, path, ident))
    return records, wanted, todo


def _save_info(out: Path, cfg: LatentsConfig, fp: dict, fp_id: str, records: dict[str, dict]) -> dict:
    """Write latents.json for the latent shards ``records`` describes; returns what it wrote."""
    info = {"enabled": True, "fingerprint_id": fp_id, "fingerprint": fp,
            "vae": {"ref": cfg.vae, "subfolder": cfg.subfolder, "config": cfg.config},
            "latent": _latent_summary(fp, records), "shards": dict(sorted(records.items()))}
    art.write_json(out / LATENTS_INFO, info)
    return info


def _encode_shard(vae, name: str, path: Path, batch_size: int, sizes: set[tuple[int, int]], device: torch.device,
                  dtype: torch.dtype, fp: dict, bar) -> tuple[list[dict[str, bytes]], "_Stats"]:
    """One image shard through the VAE, ``batch_size`` images of one size at a time: its latent
    samples in the shard's order, ready for the tar, and their statistics. ``sizes``: the (width,
    height) the shards hold (the square image size, or the aspect buckets); an image of another
    size is refused before the VAE sees it."""
    from diffusion.data.shards import decode_sample, raw_samples

    stats = _Stats(fp["latent_channels"])
    order: list[str] = []
    done: dict[str, dict[str, bytes]] = {}
    batches: dict[tuple[int, int], list[dict]] = {}  # per image size (one bucket each)
    for raw in raw_samples([str(path)]):
        s = decode_sample(raw)
        h, w = s["image"].shape[:2]
        if (w, h) not in sizes:  # before the VAE sees it
            want = ", ".join(f"{a}x{b}" for a, b in sorted(sizes))
            raise T2IError(f"{name}: sample {s['key']} is {w}x{h}, but the shards' image sizes (and the latents "
                           f"fingerprint) are {want}: re-run ingest")
        order.append(s["key"])
        batch = batches.setdefault((w, h), [])
        batch.append(s)
        if len(batch) == batch_size:
            done.update((o["__key__"], o) for o in _encode_batch(vae, batch, device, dtype, fp, stats, bar))
            batch.clear()
    for batch in batches.values():
        if batch:
            done.update((o["__key__"], o) for o in _encode_batch(vae, batch, device, dtype, fp, stats, bar))
    return [done[k] for k in order], stats


def _encode_batch(vae, batch: list[dict], device: torch.device, dtype: torch.dtype, fp: dict,
                  stats: "_Stats", bar) -> list[dict[str, bytes]]:
    """Decoded image samples -> latent samples (float16 posterior mean and std, caption, metadata);
    adds the scaled means to ``stats`` and the images to the progress bar."""
    x = torch.from_numpy(np.stack([s["image"] for s in batch])).to(device)
    x = x.permute(0, 3, 1, 2).to(dtype).div_(127.5).sub_(1.0)
    with torch.no_grad():
        dist = vae.encode(x).latent_dist
    mean = dist.mean.float().cpu().numpy().astype(np.float16)
    std = dist.std.float().cpu().numpy().astype(np.float16)
    stats.add((mean.astype(np.float32) - fp["shift_factor"]) * fp["scaling_factor"])
    samples = [{"__key__": s["key"], "mean.npy": _npy(m), "std.npy": _npy(sd),
                "txt": s["caption"].encode("utf-8"), "json": json.dumps(s["meta"]).encode("utf-8")}
               for s, m, sd in zip(batch, mean, std)]
    bar.update(len(batch))
    return samples


def _index_counts(shards_dir: str | Path) -> dict[str, int]:
    """Samples per shard from the ingest index (for the progress bar)."""
    import pyarrow.parquet as pq

    counts: dict[str, int] = {}
    for split in art.SPLITS:
        path = art.index_file(shards_dir, split)
        if path.is_file():
            for shard in pq.read_table(path, columns=["shard"]).column("shard").to_pylist():
                counts[shard] = counts.get(shard, 0) + 1
    return counts


class _Stats:
    """Per-channel running sums of scaled latent means, and the largest |value|."""

    def __init__(self, channels: int):
        self.n, self.sum, self.sumsq, self.abs_max = 0, np.zeros(channels), np.zeros(channels), 0.0

    def add(self, z: np.ndarray) -> None:  # (B, C, h, w)
        self.n += z.shape[0] * z.shape[2] * z.shape[3]
        self.sum += z.sum(axis=(0, 2, 3), dtype=np.float64)
        self.sumsq += np.square(z, dtype=np.float64).sum(axis=(0, 2, 3))
        self.abs_max = max(self.abs_max, float(np.abs(z).max()))

    def as_dict(self) -> dict:
        return {"values": self.n, "sum": self.sum.tolist(), "sumsq": self.sumsq.tolist(), "abs_max": self.abs_max}


def _latent_summary(fp: dict, records: dict[str, dict]) -> dict:
    train = [r for name, r in records.items() if name.startswith("train/")]
    n = sum(r["values"] for r in train)
    mean = np.sum([r["sum"] for r in train], axis=0) / n if n else None
    var = np.sum([r["sumsq"] for r in train], axis=0) / n - mean ** 2 if n else None
    return {"channels": fp["latent_channels"], "size": fp["latent_size"], "image_size": fp["image_size"],
            "scaling_factor": fp["scaling_factor"], "shift_factor": fp["shift_factor"],
            "abs_max": max((r["abs_max"] for r in train), default=0.0),
            "channel_mean": mean.tolist() if n else [], "channel_std": np.sqrt(np.maximum(var, 0)).tolist() if n else [],
            "samples": {split: sum(r["samples"] for name, r in records.items() if name.startswith(split + "/"))
                        for split in art.SPLITS}}


# --------------------------------------------------------------------------------------------
# What the trainer reads


def latent_training_data(latents_dir: str | Path | None, shards_dir: str | Path) -> tuple[list[str], LatentSpec] | None:
    """(train latent shard paths, the latent space) when the latents stage is on, else None.

    Refuses latents that no longer match the image shards (re-ingested since): run the latents stage.
    """
    if latents_dir is None or not (Path(latents_dir) / LATENTS_INFO).is_file():
        return None
    info = read_info(latents_dir)
    if not info.get("enabled"):
        return None
    have = {name for name in info["shards"]}
    now = {f"{split}/{Path(u).name}" for split in art.SPLITS for u in art.list_shards(Path(shards_dir) / split)}
    stale = [n for n in now if n not in have or info["shards"][n]["source_size"] != (Path(shards_dir) / n).stat().st_size]
    if stale or have - now:
        raise T2IError(f"the latents in {latents_dir} do not match the shards in {shards_dir} "
                       f"({len(stale)} shard(s) new or changed, {len(have - now)} gone): run the latents stage")
    urls = sorted(str(Path(latents_dir) / n) for n in have if n.startswith("train/"))
    if not urls:
        raise MissingInputError(f"no train latents in {latents_dir} (run the latents stage first)")
    fp, lat = info["fingerprint"], info["latent"]
    vae = info["vae"]
    spec = LatentSpec(channels=lat["channels"], size=lat["size"], image_size=lat["image_size"],
                      scaling_factor=lat["scaling_factor"], shift_factor=lat["shift_factor"],
                      abs_max=float(lat["abs_max"]), vae=vae["ref"], vae_subfolder=vae["subfolder"],
                      vae_config=vae["config"], vae_sha256=fp["weights_sha256"], fingerprint_id=info["fingerprint_id"])
    return urls, spec


def scale_latents(mean: np.ndarray, std: np.ndarray, spec: LatentSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """Stored (unscaled float16) mean and std -> the model's space: (mean - shift) * scale, std * scale."""
    m = torch.from_numpy(mean).float().sub_(spec.shift_factor).mul_(spec.scaling_factor)
    s = torch.from_numpy(std).float().mul_(spec.scaling_factor)
    return m, s


def summary_line(info: dict) -> str:
    if not info.get("enabled"):
        return f"latents: off ({info.get('reason')})"
    lat = info["latent"]
    return (f"latents: {lat['samples']} images as {lat['channels']}x{lat['size']}x{lat['size']} "
            f"(from {lat['image_size']}px, scaling {lat['scaling_factor']:g}); encoded {info.get('encoded', 0)}, "
            f"kept {info.get('kept', 0)} shard(s)")
