"""The built-in dataset: coloured shapes on a plain background, with captions.

Every image has four attributes (shape, colour, size, position) drawn from the lists in
``DatasetConfig``. Sample ``i`` of a split is a pure function of ``(seed, split, i)``, so the dataset
is identical on every machine and any slice can be regenerated on its own. Combinations listed in
``holdout`` never appear in the training split; the validation split draws from all combinations,
so evaluation can report seen and held-out combinations separately.

Shapes are drawn at ``image_size * supersample`` and area-downsampled, which gives clean
anti-aliased edges even at 16 px.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Iterator

import numpy as np
from PIL import Image, ImageDraw

from diffusion.config import DatasetConfig

ATTRIBUTES = ("shape", "color", "size", "position")
# "judge": images for training the evaluation judge, drawn from every combination
SPLITS = {"train": 0, "val": 1, "judge": 2}

TEMPLATES = (
    "a {size} {color} {shape} {where}",
    "{size} {color} {shape}, {where}",
    "a picture of a {size} {color} {shape} {where}",
    "{where}: a {color} {shape}, {size}",
    "there is a {size} {color} {shape} {where}",
)

# New wording for evaluation only (the "paraphrased" group): the same attributes in sentence
# patterns and word orders that no training caption uses, to show what the text conditioning
# generalises to. Never used to make training captions.
PARAPHRASES = (
    "{color} {shape} ({size}) placed {where}",
    "{where} there is a {shape} that is {color} and {size}",
    "one {shape}, coloured {color}, {size}, {where}",
    "an image showing a {color} {shape} of {size} size {where}",
)


@dataclass(frozen=True)
class ShapeSample:
    key: str
    image: Image.Image
    caption: str
    attrs: dict[str, str]
    meta: dict


def where_phrase(position: str) -> str:
    return {"center": "in the center", "middle": "in the middle"}.get(position, f"on the {position}")


def caption_for(attrs: dict[str, str], template: int, templates: tuple[str, ...] = TEMPLATES) -> str:
    t = templates[template % len(templates)]
    return t.format(where=where_phrase(attrs["position"]), **attrs)


def all_combos(cfg: DatasetConfig) -> list[dict[str, str]]:
    """Every attribute combination, in a fixed order."""
    return [
        dict(zip(ATTRIBUTES, values))
        for values in itertools.product(cfg.shapes, list(cfg.colors), list(cfg.sizes), list(cfg.positions))
    ]


def is_held_out(attrs: dict[str, str], holdout: list[dict[str, str]]) -> bool:
    return any(all(attrs[k] == v for k, v in combo.items()) for combo in holdout)


def split_combos(cfg: DatasetConfig, split: str) -> list[dict[str, str]]:
    combos = all_combos(cfg)
    if split == "train":
        combos = [c for c in combos if not is_held_out(c, cfg.holdout)]
    if not combos:
        raise ValueError(f"dataset.holdout removes every combination from the {split} split")
    return combos


def _shape_polygon(shape: str, cx: float, cy: float, s: float) -> list[tuple[float, float]] | None:
    h = s / 2
    if shape == "square":
        a = 0.44 * s  # a square of side 0.88 s has about the area of the circle of diameter s
        return [(cx - a, cy - a), (cx + a, cy - a), (cx + a, cy + a), (cx - a, cy + a)]
    if shape == "triangle":  # pointing up, centred on its bounding box
        return [(cx, cy - h), (cx + h, cy + h * 0.9), (cx - h, cy + h * 0.9)]
    if shape == "diamond":
        return [(cx, cy - h), (cx + h, cy), (cx, cy + h), (cx - h, cy)]
    if shape == "cross":
        t = s / 6
        return [
            (cx - t, cy - h), (cx + t, cy - h), (cx + t, cy - t), (cx + h, cy - t), (cx + h, cy + t),
            (cx + t, cy + t), (cx + t, cy + h), (cx - t, cy + h), (cx - t, cy + t), (cx - h, cy + t),
            (cx - h, cy - t), (cx - t, cy - t),
        ]
    return None  # circle


def render(cfg: DatasetConfig, attrs: dict[str, str], rng: np.random.Generator) -> tuple[Image.Image, dict]:
    """Draw one image; returns it with the exact geometry used (fractions of the side)."""
    big = cfg.image_size * cfg.supersample
    img = Image.new("RGB", (big, big), tuple(cfg.background))
    draw = ImageDraw.Draw(img)
    jx, jy = rng.uniform(-cfg.jitter, cfg.jitter, size=2)
    scale = cfg.sizes[attrs["size"]] * rng.uniform(0.95, 1.05)
    cx, cy = cfg.positions[attrs["position"]] + jx, 0.5 + jy
    fill = tuple(cfg.colors[attrs["color"]])
    poly = _shape_polygon(attrs["shape"], cx * big, cy * big, scale * big)
    if poly is None:
        r = scale * big / 2
        draw.ellipse((cx * big - r, cy * big - r, cx * big + r, cy * big + r), fill=fill)
    else:
        draw.polygon(poly, fill=fill)
    small = img.resize((cfg.image_size, cfg.image_size), Image.Resampling.BOX)
    return small, {"cx": round(cx, 4), "cy": round(cy, 4), "scale": round(scale, 4)}


def make_sample(cfg: DatasetConfig, split: str, index: int) -> ShapeSample:
    """Sample ``index`` of ``split``: a pure function of (cfg, split, index)."""
    rng = np.random.default_rng([cfg.seed, SPLITS[split], index])
    combos = split_combos(cfg, split)
    attrs = combos[int(rng.integers(len(combos)))]
    template = int(rng.integers(len(TEMPLATES)))
    image, geometry = render(cfg, attrs, rng)
    meta = {
        "source": "builtin",
        "split": split,
        "index": index,
        **attrs,
        "template": template,
        "held_out": is_held_out(attrs, cfg.holdout),
        **geometry,
    }
    return ShapeSample(f"{split}-{index:08d}", image, caption_for(attrs, template), dict(attrs), meta)


def generate(cfg: DatasetConfig, split: str) -> Iterator[ShapeSample]:
    n = cfg.n_train if split == "train" else cfg.n_val
    for i in range(n):
        yield make_sample(cfg, split, i)


def eval_prompts(cfg: DatasetConfig, per_combo: int, paraphrase_per_combo: int = 0) -> list[dict]:
    """The evaluation prompt set: every combination ``per_combo`` times in the training wording
    (templates cycled), then every combination ``paraphrase_per_combo`` times in new wording
    (``PARAPHRASES``, cycled).

    Returns dicts with the prompt, its attributes, whether the combination was held out, and the
    wording ("train" or "paraphrase").
    """
    rows = []
    for wording, templates, n in (("train", TEMPLATES, per_combo), ("paraphrase", PARAPHRASES, paraphrase_per_combo)):
        for c_idx, attrs in enumerate(all_combos(cfg)):
            for k in range(n):
                rows.append({"prompt": caption_for(attrs, c_idx + k, templates), **attrs,
                             "held_out": is_held_out(attrs, cfg.holdout), "wording": wording})
    return rows
