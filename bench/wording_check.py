"""Prompts a user might type: the trained model on sentence frames that neither caption lexicon has.

The evaluate stage measures held-out wording with ``captions.HELD_OUT``, which was written next
to the training grammar. This script asks the model and the judge about wordings written apart
from both (``FRAMES`` below, or your own with ``--frames``), one random subset of frames per
attribute combination, and prints all-correct per frame and for seen / held-out combinations.

    .venv/bin/python bench/wording_check.py                       # after `make run`
    .venv/bin/python bench/wording_check.py --frames my_frames.txt --per-combo 4

A frame is a line with ``{shape}``, ``{color}``, ``{size}`` and ``{where}`` (the position phrase).
Not a test: its numbers depend on the trained model.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from machine import cpu_name  # noqa: E402
from diffusion.models import store  # noqa: E402
from diffusion.config import load_params  # noqa: E402
from diffusion.sampling.generate import encode_prompts, generate  # noqa: E402
from diffusion.evaluation.judge import load_judge, predict  # noqa: E402
from diffusion.data.shapes import all_combos, is_held_out  # noqa: E402
from diffusion.data.text import load_text_encoder  # noqa: E402

ATTRS = ("shape", "color", "size", "position")
FRAMES = (
    "{color} {shape} ({size}) placed {where}",
    "{where} there is a {shape} that is {color} and {size}",
    "one {shape}, coloured {color}, {size}, {where}",
    "an image showing a {color} {shape} of {size} size {where}",
    "please draw a {size} {color} {shape} {where}",
    "{shape}: {color}, {size}, {where}",
    "I want a {color} {shape}, make it {size}, put it {where}",
    "{size} {shape} in {color}, {where}",
    "generate a {shape} {where}, {color}, {size}",
    "the {shape} is {color}, it is {size} and sits {where}",
    "A {size} {color} {shape} {where}.",
    "{where} - a {size} {color} {shape}",
)
WHERE = {"left": ("on the left", "to the left", "left side"), "right": ("on the right", "at the right side", "right side"),
         "center": ("in the center", "in the middle", "centered")}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--model", default="data/model", help="a train-stage folder")
    ap.add_argument("--judge", default="data/judge")
    ap.add_argument("--frames", help="a file of frames, one per line (default: FRAMES in this script)")
    ap.add_argument("--per-combo", type=int, default=3, help="frames drawn per attribute combination")
    ap.add_argument("--seed", type=int, default=7)
    args = ap.parse_args()

    p = load_params(args.params)
    frames = [f for f in Path(args.frames).read_text().splitlines() if f.strip()] if args.frames else list(FRAMES)
    rng = np.random.default_rng(args.seed)
    rows = []
    for combo in all_combos(p.dataset):
        for f in rng.choice(len(frames), size=min(args.per_combo, len(frames)), replace=False):
            where = WHERE.get(combo["position"], (f"on the {combo['position']}",))
            rows.append({"prompt": frames[f].format(where=where[rng.integers(len(where))], **combo), "frame": int(f),
                         **combo, "held_out": is_held_out(combo, p.dataset.holdout)})
    denoiser, meta = store.load_model(args.model, "cpu")
    e = p.embed
    encoder = load_text_encoder(e.model, e.pretrained, e.seed, e.layer, "cpu")
    t0 = time.perf_counter()
    cond, uncond = encode_prompts(encoder, [r["prompt"] for r in rows])
    images = generate(denoiser, cond, uncond, [p.sample.seed + i for i in range(len(rows))], meta["image_size"],
                      p.sample)
    seconds = time.perf_counter() - t0
    judge, info = load_judge(args.judge)
    if judge is None:
        print(f"no judge: {info.get('reason')}")
        return 1
    pred = predict(judge, images)
    ok = np.stack([pred[a] == np.array([info["vocab"][a].index(r[a]) for r in rows]) for a in ATTRS], 1).all(1)
    held = np.array([r["held_out"] for r in rows])
    frame = np.array([r["frame"] for r in rows])
    print(f"{len(rows)} prompts, {p.sample.sampler} {p.sample.steps} steps, guidance {p.sample.guidance_scale}; "
          f"{seconds:.1f} s on {cpu_name()}")
    print(f"all-correct: seen combinations {ok[~held].mean():.1%} (n={int((~held).sum())}), "
          f"held-out combinations {ok[held].mean():.1%} (n={int(held.sum())})")
    for i, f in enumerate(frames):
        if (frame == i).any():
            print(f"  {ok[frame == i].mean():6.1%}  n={int((frame == i).sum()):3d}  {f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
