"""Captions for the built-in set: one small grammar that says the same attributes in many ways.

A caption names an image's shape, colour, size and position, each said with one of several
phrasings (synonyms, adjective or clause, before or after the noun), inside one of many sentence
frames; any attribute may be left out (``dataset.caption_omit``). The model therefore has to learn
what the attribute *words* mean, wherever they stand, instead of where five fixed sentence patterns
put them.

There are two lexicons with the same shape. ``TRAIN`` writes every training caption. ``HELD_OUT``
holds sentence frames, connective words and attribute phrasings that no training caption uses; it
only writes evaluation prompts (the ``new_wording`` groups), so they measure whether the model reads
language it was never shown. Held-out phrasings are built from the same attribute words ("towards
the left", "large-sized"): with the default randomly initialised text tower, a word that never
occurs in training (say "crimson") carries no meaning the model could have learned. A pretrained
open_clip tower (``embed.pretrained``) brings such knowledge with it.

Every caption is a pure function of the attributes, the lexicon, which attributes are named and a
random generator, so datasets and prompt sets are identical on every machine.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

ATTRIBUTES = ("shape", "color", "size", "position")


@dataclass(frozen=True)
class Lexicon:
    """How to say each attribute. ``{x}`` stands for the attribute's word."""

    frames: tuple[str, ...]  # sentences around "{np}" (the noun phrase) and "{where}" (the position)
    frames_no_where: tuple[str, ...]  # the same without a position
    shape: dict[str, tuple[str, ...]]  # shape value -> nouns
    no_shape: tuple[str, ...]  # nouns when the shape is not named
    color_pre: tuple[str, ...]  # colour before the noun ("red circle")
    color_post: tuple[str, ...]  # colour after it ("circle that is red")
    size: dict[str, tuple[str, ...]]  # size value -> words
    size_pre: tuple[str, ...]
    size_post: tuple[str, ...]
    position: dict[str, tuple[str, ...]]  # position value -> phrases
    joiners: tuple[str, ...]  # between two clauses after the noun ("that is red and large")


TRAIN = Lexicon(
    frames=(
        "{np} {where}",
        "{np}, {where}",
        "{where}, {np}",
        "{where}: {np}",
        "a picture of {np} {where}",
        "a photo of {np} {where}",
        "there is {np} {where}",
        "{where} there is {np}",
        "{where} is {np}",
        "{np} is {where}",
        "we see {np} {where}",
        "{where} we see {np}",
        "a drawing of {np} {where}",
        "{np} sitting {where}",
    ),
    frames_no_where=("{np}", "a picture of {np}", "a photo of {np}", "there is {np}", "we see {np}",
                     "a drawing of {np}"),
    shape={"circle": ("circle", "disc"), "square": ("square", "box"), "triangle": ("triangle",),
           "diamond": ("diamond", "rhombus"), "cross": ("cross", "plus sign")},
    no_shape=("shape", "object", "thing"),
    color_pre=("{x}",),
    color_post=("that is {x}", "which is {x}", "in {x}", "{x} in colour", "coloured {x}"),
    size={"small": ("small", "little", "tiny"), "large": ("large", "big", "huge")},
    size_pre=("{x}",),
    size_post=("that is {x}", "which is {x}", "{x} in size"),
    position={"left": ("on the left", "to the left", "on the left side", "at the left"),
              "right": ("on the right", "to the right", "on the right side", "at the right"),
              "center": ("in the center", "in the middle", "at the center", "centered"),
              "middle": ("in the middle", "in the center", "at the middle", "centered")},
    joiners=(" and ", ", "),
)

# Evaluation only: every frame has a word that no training frame has (the test suite checks that
# no held-out prompt is a training caption).
HELD_OUT = Lexicon(
    frames=(
        "{np} placed {where}",
        "{where} you can find {np}",
        "an image showing {np} {where}",
        "look: {np} located {where}",
        "this illustration has {np} {where}",
        "{where} of the canvas, {np}",
        "only {np}, positioned {where}",
    ),
    frames_no_where=("an image showing {np}", "this illustration has {np}", "only {np}"),
    shape={"circle": ("circle",), "square": ("square",), "triangle": ("triangle",), "diamond": ("diamond",),
           "cross": ("cross",)},
    no_shape=("figure", "form"),
    color_pre=("{x}-coloured", "{x}-colored"),
    color_post=("colored {x}", "painted {x}", "of {x} colour", "with a {x} fill"),
    size={"small": ("small",), "large": ("large", "big")},
    size_pre=("{x}-sized",),
    size_post=("of {x} size", "({x})", "quite {x}"),
    position={"left": ("towards the left", "on the left-hand side", "over on the left"),
              "right": ("towards the right", "on the right-hand side", "over on the right"),
              "center": ("in the very center", "dead center", "in the exact middle"),
              "middle": ("in the very middle", "dead center", "in the exact middle")},
    joiners=(" and also ", " plus "),
)

LEXICONS = {"train": TRAIN, "new": HELD_OUT}


def _pick(rng: np.random.Generator, options: tuple[str, ...]) -> str:
    return options[int(rng.integers(len(options)))]


def _words(table: dict[str, tuple[str, ...]], value: str, unknown: str = "{}") -> tuple[str, ...]:
    """The phrasings of ``value``; a value the lexicon does not know (a user's own shape, size or
    position in params.yaml) is said as ``unknown`` filled with it (by default, itself)."""
    return table.get(value, (unknown.format(value),))


def describe(attrs: dict[str, str], rng: np.random.Generator, lexicon: Lexicon = TRAIN,
             named: tuple[str, ...] = ATTRIBUTES) -> str:
    """A caption that names the attributes in ``named`` (in some order and wording) and no others."""
    pre, post = [], []
    if "size" in named:
        word = _pick(rng, _words(lexicon.size, attrs["size"]))
        if rng.random() < 0.6:
            pre.append(_pick(rng, lexicon.size_pre).format(x=word))
        else:
            post.append(_pick(rng, lexicon.size_post).format(x=word))
    if "color" in named:
        if rng.random() < 0.6:
            pre.append(_pick(rng, lexicon.color_pre).format(x=attrs["color"]))
        else:
            post.append(_pick(rng, lexicon.color_post).format(x=attrs["color"]))
    if len(pre) == 2 and rng.random() < 0.3:  # "red big circle" as well as "big red circle"
        pre.reverse()
    noun = _pick(rng, _words(lexicon.shape, attrs["shape"]) if "shape" in named else lexicon.no_shape)
    rng.shuffle(post)
    np_ = " ".join([*pre, noun])
    np_ = ("an " if np_[0] in "aeiou" else "a ") + np_
    if post:
        np_ += " " + _pick(rng, lexicon.joiners).join(post)
    if "position" in named:
        where = _pick(rng, _words(lexicon.position, attrs["position"], "on the {}"))
        return _pick(rng, lexicon.frames).format(np=np_, where=where)
    return _pick(rng, lexicon.frames_no_where).format(np=np_)


def training_caption(attrs: dict[str, str], rng: np.random.Generator, omit: dict[str, float]) -> tuple[str, tuple[str, ...]]:
    """A training caption: each attribute left out with probability ``omit[attribute]`` (at least
    one is always named). Returns the caption and the attributes it names."""
    named = tuple(a for a in ATTRIBUTES if rng.random() >= omit.get(a, 0.0))
    if not named:
        named = (ATTRIBUTES[int(rng.integers(len(ATTRIBUTES)))],)
    return describe(attrs, rng, TRAIN, named), named
