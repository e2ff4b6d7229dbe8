"""The built-in dataset: coloured shapes on a plain background, with captions.

Every image has four attributes (shape, colour, size, position) drawn from the lists in
``DatasetConfig``. Sample ``i`` of a split is a pure function of ``(seed, split, i)``, so the dataset
is identical on every machine and any slice can be regenerated on its own. Combinations listed in
``holdout`` never appear in the training split; the validation split draws from all combinations,
so evaluation can report seen and held-out combinations separately. Captions come from the
grammar in ``diffusion.data.captions`` (many wordings, attributes sometimes left out).

Shapes are drawn at ``image_size * supersample`` and area-downsampled, which gives clean
anti-aliased edges even at 16 px.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Iterator

import numpy as np
from PIL import Image, ImageDraw

from diffusion.data.captions import ATTRIBUTES, LEXICONS, describe, training_caption
from diffusion.config import DatasetConfig

# "judge": images for training the evaluation judge, drawn from every combination
SPLITS = {"train": 0, "val": 1, "judge": 2}

# seed offsets of the evaluation prompt sets (sample i of a split uses [seed, split, i])
_PROMPT_STREAMS = {"train": 100, "new": 101, "partial": 102}


@dataclass(frozen=True)
class ShapeSample:
    key: str
    image: Image.Image
    caption: str
    attrs: dict[str, str]
    meta: dict


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
    image, geometry = render(cfg, attrs, rng)
    # the caption has its own random stream: changing the grammar never moves a picture
    caption, named = training_caption(attrs, np.random.default_rng([cfg.seed, SPLITS[split], index, 1]),
                                      cfg.caption_omit)
    meta = {
        "source": "builtin",
        "split": split,
        "index": index,
        **attrs,
        "named": ",".join(named),
        "held_out": is_held_out(attrs, cfg.holdout),
        **geometry,
    }
    return ShapeSample(f"{split}-{index:08d}", image, caption, dict(attrs), meta)


def generate(cfg: DatasetConfig, split: str) -> Iterator[ShapeSample]:
    n = cfg.n_train if split == "train" else cfg.n_val
    for i in range(n):
        yield make_sample(cfg, split, i)


def eval_prompts(cfg: DatasetConfig, per_combo: int, new_wording_per_combo: int = 0,
                 partial_per_combo: int = 0) -> list[dict]:
    """The evaluation prompt set, each row a dict with the prompt, its attributes, whether the
    combination was held out and the wording (``captions.LEXICONS``):

    - every combination ``per_combo`` times in the training wording, every attribute named;
    - every combination ``new_wording_per_combo`` times in held-out wording (``captions.HELD_OUT``:
      frames and phrasings no training caption uses), every attribute named;
    - every combination ``partial_per_combo`` times in the training wording naming only some of its
      attributes (one to three); an attribute the prompt does not name is ``""`` in the row, and
      the judge does not score it.

    Each prompt is a pure function of (dataset seed, set, combination, k).
    """
    rows = []
    # (prompt set, its wording, prompts per combination, whether it names only some attributes)
    sets = (("train", "train", per_combo, False), ("new", "new", new_wording_per_combo, False),
            ("partial", "train", partial_per_combo, True))
    for stream, wording, n, partial in sets:
        for c_idx, attrs in enumerate(all_combos(cfg)):
            for k in range(n):
                rng = np.random.default_rng([cfg.seed, _PROMPT_STREAMS[stream], c_idx, k])
                named = ATTRIBUTES
                if partial:
                    pick = rng.permutation(len(ATTRIBUTES))[: int(rng.integers(1, len(ATTRIBUTES)))]
                    named = tuple(a for i, a in enumerate(ATTRIBUTES) if i in pick)
                said = {a: (v if a in named else "") for a, v in attrs.items()}
                rows.append({"prompt": describe(attrs, rng, LEXICONS[wording], named), **said,
                             "held_out": is_held_out(said, cfg.holdout), "wording": wording})
    return rows
