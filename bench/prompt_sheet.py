"""A comparison sheet to judge by eye: for each prompt, a real image of it beside what a trained
model draws for it.

    .venv/bin/python bench/prompt_sheet.py --model data/model --shards data/shards \
        --params params/openmoji-32.yaml --out docs/images/openmoji-32-sheet.png
    .venv/bin/python bench/prompt_sheet.py ... --prompts "red apple" "green heart" --seeds 6

One row per prompt: first the real image whose OpenMoji annotation (its ``meta``), or else whose
caption, equals the prompt (train or val split; "no real image" where none does), then one image
per seed (0, 1, ...), drawn with the params' ``sample`` section (sampler, steps, guidance) and the
params' text tower, exactly as the sample stage draws. The default prompts are the ones issue 29
asks to recognise: red apple, green heart, grinning face, sun, pizza, banana.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

DEFAULT_PROMPTS = ["red apple", "green heart", "grinning face", "sun", "pizza", "banana"]


def real_images(shards_dir: Path, prompts: list[str]) -> dict[str, np.ndarray]:
    """The first real image of each prompt that has one: annotation match first, caption match second."""
    from diffusion.artifacts import list_shards
    from diffusion.data.shards import iter_samples

    by_annotation, by_caption = {}, {}
    urls = list_shards(shards_dir / "train") + list_shards(shards_dir / "val")
    for s in iter_samples(urls):
        meta = s.get("meta") or {}
        if isinstance(meta, (str, bytes)):
            meta = json.loads(meta)
        annotation = meta.get("annotation")
        if annotation in prompts and annotation not in by_annotation:
            by_annotation[annotation] = s["image"]
        if s["caption"] in prompts and s["caption"] not in by_caption:
            by_caption[s["caption"]] = s["image"]
    found = {**by_caption, **by_annotation}
    return {p: np.asarray(found[p]) for p in prompts if p in found}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="a train-stage folder (model.safetensors, model.json)")
    ap.add_argument("--shards", required=True, help="the ingest stage's folder (real images)")
    ap.add_argument("--params", default="params.yaml", help="sample and embed sections (default: params.yaml)")
    ap.add_argument("--prompts", nargs="+", default=DEFAULT_PROMPTS)
    ap.add_argument("--seeds", type=int, default=5, help="generated images per prompt (seeds 0..N-1)")
    ap.add_argument("--out", required=True, help="the sheet (PNG)")
    args = ap.parse_args()

    from diffusion import threads

    threads.set_wait_policy()
    threads.apply()
    from diffusion.config import load_params
    from diffusion.data.text import load_text_encoder, pick_device
    from diffusion.models import store
    from diffusion.sampling.generate import check_fingerprint, encode_prompts, generate, make_grid

    p = load_params(args.params)
    denoiser, meta = store.load_model(args.model, pick_device(p.sample.device), p.latents)
    e = p.embed
    encoder = load_text_encoder(e.model, e.pretrained, e.seed, e.layer, p.sample.device)
    check_fingerprint(encoder, meta)
    size = meta["image_size"]
    real = real_images(Path(args.shards), args.prompts)
    prompts = [q for q in args.prompts for _ in range(args.seeds)]
    seeds = [k for _ in args.prompts for k in range(args.seeds)]
    cond, uncond = encode_prompts(encoder, prompts)
    drawn = generate(denoiser, cond, uncond, seeds, size, p.sample, progress=False)
    images, captions = [], []
    for i, q in enumerate(args.prompts):
        images.append(real.get(q, np.full((size, size, 3), 255, np.uint8)))
        captions.append(f"real: {q}" if q in real else f"(no real image of: {q})")
        images += list(drawn[i * args.seeds:(i + 1) * args.seeds])
        captions += [f"{q} (seed {k})" for k in range(args.seeds)]
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    make_grid(images, captions, cols=1 + args.seeds).save(args.out)
    s = p.sample
    print(f"{args.out}: {len(args.prompts)} prompts x (1 real + {args.seeds} seeds), {s.sampler} {s.steps} steps "
          f"({s.spacing}), guidance {s.guidance_scale}, model {args.model} ({meta.get('steps_done')} steps)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
