"""The latent path's two figures, measured through the project's own stages on this machine:

1. encoding throughput of the latents stage (``stages.latents``: shards -> latent shards), images/s,
   with a tiny random AutoencoderKL (the test suite's kind, 8x downsampling) and with the Stable
   Diffusion VAE's architecture (random weights: the cost is the architecture's, not the weights');
2. training throughput of the train loop (``diffusion.training.train.train``, as the train stage calls it,
   without the end-of-run sample grid) at 256px, through latents (32x32x4, read from the latent
   shards) against pixel space (256x256x3, decoded from the JPEG shards), with the same denoiser
   config (params.yaml's train.unet), one after the other.

    .venv/bin/python bench/latents_bench.py                 # 256px, CPU (or CUDA when present)
    .venv/bin/python bench/latents_bench.py --images 256 --sd-images 64 --train-steps 30 --batch 16

Photos are synthetic (smooth gradients with noise, 320x256 JPEGs), ingested from a folder at 256px
center crop by the ingest stage. Nothing is downloaded. Prints a table and writes JSON (--out).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from machine import cpu_name  # noqa: E402


def photos(folder: Path, n: int, size=(320, 256)) -> None:
    import numpy as np
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    w, h = size
    yy, xx = np.mgrid[0:h, 0:w]
    for i in range(n):
        a, b, c = rng.uniform(0.2, 3.0, 3)
        img = np.stack([(xx * a + yy) % 256, (yy * b + i * 7) % 256, (xx + yy * c) % 256], -1)
        img = np.clip(img + rng.normal(0, 12, img.shape), 0, 255).astype(np.uint8)
        Image.fromarray(img).save(folder / f"{i:05d}.jpg", quality=92)
        (folder / f"{i:05d}.txt").write_text(f"a photo of gradient number {i % 17}")


def tiny_vae(folder: Path) -> Path:
    """4 levels (8x downsampling, like SD), 4 latent channels, 16-32 channels wide."""
    from diffusers import AutoencoderKL

    import torch

    torch.manual_seed(0)
    AutoencoderKL(down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                  block_out_channels=(16, 32, 32, 32), layers_per_block=1, latent_channels=4, norm_num_groups=16,
                  sample_size=256).save_pretrained(str(folder))
    return folder


def sd_vae(folder: Path) -> Path:
    """The Stable Diffusion VAE's architecture (AutoencoderKL's defaults are SD's but for these)."""
    from diffusers import AutoencoderKL

    import torch

    torch.manual_seed(0)
    vae = AutoencoderKL(down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                        block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4,
                        norm_num_groups=32, sample_size=256)
    vae.save_pretrained(str(folder))
    return folder


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=256, help="photos for the tiny-VAE encode and the training runs")
    ap.add_argument("--sd-images", type=int, default=32, help="photos for the SD-architecture encode")
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--train-steps", type=int, default=20, help="training steps in pixel space")
    ap.add_argument("--latent-train-steps", type=int, default=100,
                    help="training steps through latents (more: each is much shorter, and the first ones warm up)")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--encode-batch", type=int, default=16)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    ap.add_argument("--keep", action="store_true", help="keep the temporary folder (photos, shards, latents, models)")
    args = ap.parse_args()

    import yaml

    base = yaml.safe_load((ROOT / "params.yaml").read_text())
    tmp = Path(tempfile.mkdtemp(prefix="t2i-latents-bench-"))
    try:
        return run(args, base, tmp)
    finally:  # about 0.5 GB of photos, shards, latents and models
        if args.keep:
            print(f"kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)


def run(args, base: dict, tmp: Path) -> int:
    import torch

    from diffusion.pipeline import stages
    from diffusion.artifacts import model_meta, shard_urls
    from diffusion.config import parse_params, to_dict
    from diffusion.data.latents import latent_training_data
    from diffusion.data.text import EmbeddingTable
    from diffusion.training.train import train

    results: dict = {"cpu": cpu_name(), "torch": torch.__version__, "threads": torch.get_num_threads(),
                     "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
                     "size": args.size, "encode": {}, "train": {}}

    def params(src: Path, vae: Path | None, batch_size: int = args.encode_batch):
        data = json.loads(json.dumps(base))
        data["ingest"].update(source="folder", path=str(src), image_size=args.size, image_format="jpg",
                              min_size=args.size, val_fraction=0.0, samples_per_shard=10_000, dedupe=False)
        data["latents"].update(vae=str(vae) if vae else None, batch_size=batch_size, device=args.device)
        data["train"].update(steps=args.train_steps, batch_size=args.batch, warmup_steps=2, log_every=5,
                             checkpoint_every=10_000, shuffle_buffer=64, device=args.device)
        data["embed"].update(device=args.device)
        data["mlflow"].update(tracking_uri=f"sqlite:///{tmp / 'mlflow.db'}")
        return parse_params(data, "bench")

    print(f"machine: {results['cpu']}, torch {results['torch']}, {results['threads']} threads"
          + (f", {results['cuda']}" if results["cuda"] else ", no GPU"))
    photos(tmp / "photos", args.images)
    photos(tmp / "photos-sd", args.sd_images)
    vaes = {"tiny (8x, 16-32 wide)": (tiny_vae(tmp / "vae-tiny"), tmp / "photos", args.images),
            "SD architecture (random weights)": (sd_vae(tmp / "vae-sd"), tmp / "photos-sd", args.sd_images)}

    # 1. encoding
    for name, (vae, src, n) in vaes.items():
        p = params(src, vae)
        shards = tmp / f"shards-{src.name}"
        if not shards.exists():
            stages.ingest(p, shards)
        out = tmp / f"latents-{vae.name}"
        t0 = time.perf_counter()
        info = stages.latents(p, shards, out, progress=False)
        wall = time.perf_counter() - t0
        results["encode"][name] = {"images": info["encoded"], "img_per_s": info["img_per_s"],
                                   "stage_seconds": wall, "latent": f"{info['latent']['channels']}x{info['latent']['size']}x{info['latent']['size']}"}
        print(f"encode  {name:<34} {info['encoded']:>5} images  {info['img_per_s']:8.2f} img/s "
              f"(stage wall {wall:.1f} s incl. VAE load and hashing) -> {results['encode'][name]['latent']}")

    # 2. training at the same denoiser config: latents (tiny VAE's 32x32x4) vs pixels (256x256x3)
    vae, src, _ = vaes["tiny (8x, 16-32 wide)"]
    p = params(src, vae)
    shards, latents = tmp / f"shards-{src.name}", tmp / f"latents-{vae.name}"
    stages.embed(p, shards, tmp / "emb")
    table = EmbeddingTable.load(tmp / "emb")
    spec = latent_training_data(latents, shards)
    for name, (urls, latent), steps in [("latent 32x32x4", spec, args.latent_train_steps),
                                        ("pixel 256x256x3", (shard_urls(shards, "train"), None), args.train_steps)]:
        out = tmp / f"model-{name.split()[0]}"
        train(replace(p.train, steps=steps), urls, table, out, image_size=args.size, latent=latent, progress=False)
        meta = model_meta(out)
        results["train"][name] = {"img_per_s": meta["train_img_per_s"], "loop_seconds": meta["train_seconds"],
                                  "params": meta["params"], "steps": meta["steps_done"], "batch": args.batch}
        print(f"train   {name:<34} {meta['train_img_per_s']:8.2f} img/s  ({meta['steps_done']} steps x {args.batch}, "
              f"{meta['params'] / 1e6:.2f}M params, loop {meta['train_seconds']:.1f} s)")
    lat, pix = results["train"]["latent 32x32x4"]["img_per_s"], results["train"]["pixel 256x256x3"]["img_per_s"]
    results["train_speedup"] = lat / pix
    unet = to_dict(p.train.unet)
    results["unet"] = unet
    print(f"latent / pixel training throughput: {lat / pix:.1f}x  (train.unet {unet})")
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
