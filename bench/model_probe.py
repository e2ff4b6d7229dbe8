"""A quick look at trained models between full evaluations: R-precision on seen captions and the
denoiser's x0 error at fixed noise levels.

    .venv/bin/python bench/model_probe.py --model data/model --shards data/shards \\
        --embeddings data/embeddings --evaluator data/judge --n 200
    .venv/bin/python bench/model_probe.py --model A --model B --raw ...   # several; raw weights too

For each ``--model`` (a train-stage folder), it samples one image for each of ``--n`` distinct
training captions (the seen evaluation set of bench/quality_bench.py: one real image each, the
distinct validation captions as the distractor pool), with the ``sample`` section of ``--params``
(``--sampler``, ``--steps``, ``--guidance`` override it), and scores them with each
``--evaluator`` (the judge stage's output folder, or its ``retrieval/``) beside the real images of
the same captions, as ``diffusion.evaluation.retrieval.r_precision`` does in the evaluate stage.
``--raw`` also scores the raw (not EMA) weights of the model's ``checkpoint.pt``.

It then reports the EMA's x0 error, mean squared over pixels, at each ``--sigmas`` level on
``--x0-images`` training images with their own captions (the same noise for every model), beside
two references: predicting the mean of those images, and a plain white image. A model that has
learnt its captions predicts x0 better than the mean image at high noise, where only the caption
says what to draw.

Nothing is written except ``--out`` (JSON), when given. Sampling uses the machine's threads
(``diffusion.threads``), so for timing-free numbers only; n = 200 prompts resolves about +-3
points of R-precision.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from machine import cpu_name  # noqa: E402
from quality_bench import seen_eval_set  # noqa: E402


def log(msg: str) -> None:
    print(f"[probe] {msg}", file=sys.stderr, flush=True)


def evaluator_dir(path: str) -> Path:
    """The retrieval evaluator's folder: ``path`` itself or its ``retrieval/``."""
    p = Path(path)
    return p / "retrieval" if (p / "retrieval").is_dir() else p


def sample_config(args):
    import dataclasses

    from diffusion.config import load_params

    cfg = load_params(args.params).sample
    changes = {k: v for k, v in (("sampler", args.sampler), ("steps", args.steps),
                                 ("guidance_scale", args.guidance)) if v is not None}
    return dataclasses.replace(cfg, **changes)


def x0_errors(denoiser, x0, cond, sigmas: list[float], seed: int = 0) -> dict[str, float]:
    """Mean squared x0 error of ``denoiser`` at each noise level, the same noise draws every call."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    out = {}
    with torch.no_grad():
        for s in sigmas:
            noise = torch.randn(x0.shape, generator=gen)
            pred = denoiser(x0 + s * noise, torch.tensor(float(s)), cond)
            out[f"{s:g}"] = round(float(((pred - x0) ** 2).mean()), 5)
    return out


def draw_seen(denoiser, ev: dict, scfg):
    """One image per seen prompt of ``ev``, prompt i with seed ``scfg.seed + i`` (as the evaluate
    stage and bench/quality_bench.py seed them)."""
    from diffusion.sampling.generate import generate, table_cond

    cond, uncond = table_cond(ev["table"], ev["prompts"])
    return generate(denoiser, cond, uncond, [scfg.seed + i for i in range(len(ev["prompts"]))],
                    ev["real"].shape[1], scfg)


def seen_r_precision(evaluator, ev: dict, images) -> float:
    """R-precision of ``images`` (one per seen prompt of ``ev``) with ``evaluator`` (a
    ``load_retrieval`` pair), against its distractors from the validation captions."""
    from diffusion.evaluation.retrieval import r_precision

    model, info = evaluator
    return r_precision(model, ev["table"], info["image_size"], images, ev["prompts"], ev["pool"],
                       info["distractors"], info["seed"])["all"]["mean"]


def probe_model(model_dir: str, raw: bool, ev: dict, evaluators: list, scfg, x0_set) -> dict:
    import torch

    from diffusion.models.store import load_model

    den, meta = load_model(model_dir)
    if raw:
        ckpt = torch.load(Path(model_dir) / "checkpoint.pt", map_location="cpu", weights_only=False)
        den.load_state_dict(ckpt["model"])
    t0 = time.perf_counter()
    images = draw_seen(den, ev, scfg)
    row = {"model": model_dir, "weights": "raw" if raw else "ema", "steps_done": meta.get("steps_done"),
           "sample_seconds": round(time.perf_counter() - t0, 1),
           "r_precision_seen": {name: seen_r_precision(e, ev, images) for name, e in evaluators}}
    if not raw:
        x0, x_cond, sigmas = x0_set
        row["x0_mse"] = x0_errors(den, x0, x_cond, sigmas)
    return row


def x0_inputs(shards: Path, table, n: int):
    """The first ``n`` training images with an embedded caption, in [-1, 1], and their conditioning;
    the mean-image and white-image references."""
    import numpy as np
    import torch

    from diffusion import artifacts as art
    from diffusion.data.shards import iter_samples
    from diffusion.sampling.generate import table_cond

    images, captions = [], []
    for s in iter_samples(art.shard_urls(shards, "train")):
        if len(images) >= n:
            break
        if s["caption"] in table.rows:
            images.append(s["image"])
            captions.append(s["caption"])
    x0 = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 127.5 - 1
    refs = {"mean_image": round(float(((x0.mean(0, keepdim=True) - x0) ** 2).mean()), 5),
            "white_image": round(float(((1 - x0) ** 2).mean()), 5)}
    return x0, table_cond(table, captions)[0], refs


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", action="append", required=True, help="a train-stage folder (repeatable)")
    ap.add_argument("--raw", action="store_true", help="also score each model's raw checkpoint weights")
    ap.add_argument("--evaluator", action="append", required=True,
                    help="the judge stage's folder or its retrieval/ (repeatable)")
    ap.add_argument("--shards", required=True)
    ap.add_argument("--embeddings", required=True)
    ap.add_argument("--params", default=str(ROOT / "params.yaml"), help="its sample section samples")
    ap.add_argument("--n", type=int, default=200, help="seen captions to sample")
    ap.add_argument("--sampler")
    ap.add_argument("--steps", type=int)
    ap.add_argument("--guidance", type=float)
    ap.add_argument("--sigmas", default="0.1,0.5,1,2,5,20,80,157")
    ap.add_argument("--x0-images", type=int, default=128)
    ap.add_argument("--out", help="write the rows as JSON here too")
    return ap.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    from diffusion.data.text import EmbeddingTable
    from diffusion.evaluation.retrieval import load_retrieval

    table = EmbeddingTable.load(args.embeddings)
    ev = {"table": table, **seen_eval_set(Path(args.shards), table, args.n)}
    evaluators = [(str(evaluator_dir(e)), load_retrieval(evaluator_dir(e))) for e in args.evaluator]
    sigmas = [float(s) for s in args.sigmas.split(",") if s.strip()]
    x0, x_cond, refs = x0_inputs(Path(args.shards), table, args.x0_images)
    scfg = sample_config(args)
    rows = []
    real = {name: seen_r_precision(e, ev, ev["real"]) for name, e in evaluators}
    print(f"cpu: {cpu_name()}; {len(ev['prompts'])} seen captions; sampler {scfg.sampler}, {scfg.steps} steps, "
          f"guidance {scfg.guidance_scale}; x0 references: {refs}")
    print("R-precision of the real images of these captions: "
          + ", ".join(f"{n}: {v:.3f}" for n, v in real.items()))
    for m in args.model:
        for raw in ([False, True] if args.raw else [False]):
            row = probe_model(m, raw, ev, evaluators, scfg, (x0, x_cond, sigmas))
            rows.append(row)
            rp = ", ".join(f"{v:.3f}" for v in row["r_precision_seen"].values())
            x0s = "" if raw else "  x0 MSE " + " ".join(f"{k}:{v}" for k, v in row["x0_mse"].items())
            print(f"{m} [{row['weights']}, {row['steps_done']} steps] R-precision seen {rp}{x0s}", flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps({"cpu": cpu_name(), "command": " ".join(sys.argv),
                                              "real": real, "x0_references": refs, "rows": rows}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
