"""Variants of the retrieval evaluator (the judge stage's R-precision model): does a gentler one
read generated images better?

    .venv/bin/python bench/retrieval_variants.py --shards data/shards --embeddings data/embeddings \\
        --model data/model --params params/openmoji-32.yaml --out-dir /tmp/retrieval-variants \\
        --variant steps=1000 --variant steps=1000,aug=1 --variant steps=300 --variant steps=300,aug=1

Each ``--variant`` (``key=value`` pairs: ``steps``, ``width``, ``dim``, ``lr``, and ``aug`` 0/1) trains
an evaluator as ``diffusion.evaluation.retrieval.build_retrieval`` does with the params'
``retrieval`` section so changed, into ``--out-dir/<variant>``, and prints its R-precision on the
real validation pairs (held-out captions: does it generalise?), on the real images of ``--n``
seen captions (has it memorised its training pairs?) and, with ``--model``, on that model's
draws of the same seen captions (bench/model_probe.py's set, the params' sampler).

``aug=1`` trains on augmented images: a random scale of +-``--scale`` and shift of +-``--shift``
of the side (bilinear, borders repeated), a 3x3 binomial blur on half the batch, then the light
noise every evaluator gets (``diffusion.evaluation.judge.light_noise``). It swaps that noise
function of the retrieval module for the run; the stage itself trains with light noise only.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from machine import cpu_name  # noqa: E402

KEYS = {"steps": int, "width": int, "dim": int, "lr": float, "aug": int}


def parse_variant(text: str) -> dict:
    out = {}
    for part in filter(None, text.split(",")):
        key, sep, value = part.partition("=")
        if not sep or key not in KEYS:
            raise SystemExit(f"--variant {text!r}: want key=value pairs of {', '.join(KEYS)}")
        out[key] = KEYS[key](value)
    return out


def augmenter(scale: float, shift: float, blur: float):
    """A drop-in for ``light_noise(x, gen)``: random scale, shift and blur, then the light noise."""
    import torch
    import torch.nn.functional as F

    from diffusion.evaluation.judge import light_noise

    kernel = torch.tensor([1.0, 2.0, 1.0])
    kernel = (kernel[:, None] * kernel[None, :] / 16).expand(3, 1, 3, 3).contiguous()

    def augment(x, gen):
        b = x.shape[0]
        s = 1 + scale * (2 * torch.rand(b, generator=gen) - 1)
        theta = torch.zeros(b, 2, 3)
        theta[:, 0, 0] = theta[:, 1, 1] = 1 / s
        theta[:, :, 2] = shift * (2 * torch.rand(b, 2, generator=gen) - 1)
        grid = F.affine_grid(theta, list(x.shape), align_corners=False)
        x = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
        blurred = F.conv2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), kernel, groups=3)
        pick = (torch.rand(b, 1, 1, 1, generator=gen) < blur).float()
        return light_noise(pick * blurred + (1 - pick) * x, gen)

    return augment


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shards", required=True)
    ap.add_argument("--embeddings", required=True)
    ap.add_argument("--params", default=str(ROOT / "params.yaml"))
    ap.add_argument("--model", help="a train-stage folder whose draws of the seen captions are scored too")
    ap.add_argument("--variant", action="append", required=True)
    ap.add_argument("--out-dir", required=True)
    ap.add_argument("--n", type=int, default=200)
    ap.add_argument("--scale", type=float, default=0.1)
    ap.add_argument("--shift", type=float, default=0.1)
    ap.add_argument("--blur", type=float, default=0.5)
    args = ap.parse_args(argv)

    from diffusion import artifacts as art
    from diffusion.config import load_params
    from diffusion.data.text import EmbeddingTable
    from diffusion.evaluation import retrieval
    from model_probe import draw_seen, seen_r_precision
    from quality_bench import seen_eval_set

    params = load_params(args.params)
    table = EmbeddingTable.load(args.embeddings)
    ev = {"table": table, **seen_eval_set(Path(args.shards), table, args.n)}
    drawn = None
    if args.model:
        from diffusion.models.store import load_model

        drawn = draw_seen(load_model(args.model)[0], ev, params.sample)
    print(f"cpu: {cpu_name()}; {len(ev['prompts'])} seen captions" + (f"; draws of {args.model}" if args.model else ""))
    plain = retrieval.light_noise
    for text in args.variant:
        v = parse_variant(text)
        cfg = dataclasses.replace(params.retrieval, **{k: x for k, x in v.items() if k != "aug"})
        retrieval.light_noise = augmenter(args.scale, args.shift, args.blur) if v.get("aug") else plain
        out = Path(args.out_dir) / text.replace(",", "_").replace("=", "")
        t0 = time.perf_counter()
        try:
            val = retrieval.build_retrieval(cfg, art.shard_urls(args.shards, "train"), art.shard_urls(args.shards, "val"),
                                            table, out, progress=False)
        finally:
            retrieval.light_noise = plain
        evaluator = retrieval.load_retrieval(out)
        line = (f"{text}: val R-precision {val['r_precision']['mean']:.3f}, "
                f"real seen {seen_r_precision(evaluator, ev, ev['real']):.3f}"
                + (f", generated seen {seen_r_precision(evaluator, ev, drawn):.3f}" if drawn is not None else "")
                + f" ({time.perf_counter() - t0:.0f} s)")
        print(line, flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
