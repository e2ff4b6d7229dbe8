import numpy as np

from diffusion.config import DatasetConfig
from diffusion.shapes import (TEMPLATES, all_combos, caption_for, eval_prompts, is_held_out, make_sample,
                              split_combos)

CFG = DatasetConfig()


def test_dataset_spans_required_attribute_counts():
    assert len(CFG.shapes) >= 3 and len(CFG.colors) >= 6 and len(CFG.sizes) >= 2 and len(CFG.positions) >= 3
    assert len(TEMPLATES) >= 3
    assert len(all_combos(CFG)) == 3 * 6 * 2 * 3


def test_samples_are_deterministic_and_independent_of_order():
    a = make_sample(CFG, "train", 17)
    b = make_sample(CFG, "train", 17)
    assert a.caption == b.caption and a.meta == b.meta
    assert np.array_equal(np.asarray(a.image), np.asarray(b.image))
    other_seed = make_sample(DatasetConfig(seed=1), "train", 17)
    assert other_seed.meta != a.meta


def test_held_out_combinations_never_reach_train_but_appear_in_val():
    train = [make_sample(CFG, "train", i) for i in range(600)]
    val = [make_sample(CFG, "val", i) for i in range(600)]
    assert not any(s.meta["held_out"] for s in train)
    assert not any(is_held_out(s.attrs, CFG.holdout) for s in train)
    assert any(s.meta["held_out"] for s in val)
    held = {(s.attrs["color"], s.attrs["shape"]) for s in val if s.meta["held_out"]}
    assert held == {(h["color"], h["shape"]) for h in CFG.holdout}
    assert len(split_combos(CFG, "train")) == len(all_combos(CFG)) - 3 * 2 * 3


def test_captions_name_every_attribute():
    s = make_sample(CFG, "val", 3)
    for value in s.attrs.values():
        assert value in s.caption
    assert caption_for({"shape": "circle", "color": "red", "size": "large", "position": "left"}, 0) == \
        "a large red circle on the left"


def test_pixels_show_the_colour_and_position_the_caption_names():
    """The drawn shape has the named colour, and its centroid is where the caption says."""
    bg = np.array(CFG.background)
    for i in range(40):
        s = make_sample(CFG, "val", i)
        img = np.asarray(s.image).astype(float)
        diff = np.abs(img - bg).sum(-1)
        ink = diff > 60
        assert ink.any()
        target = np.array(CFG.colors[s.attrs["color"]])
        # the most saturated pixel of the shape is (close to) the pure colour
        core = img[diff == diff.max()][0]
        assert np.abs(core - target).max() < 40
        cx = (np.nonzero(ink)[1].mean() + 0.5) / CFG.image_size
        assert abs(cx - CFG.positions[s.attrs["position"]]) < 0.09
        area = ink.mean()
        assert area > (0.12 if s.attrs["size"] == "large" else 0.03)


def test_eval_prompts_cover_every_combination():
    rows = eval_prompts(CFG, 2)
    assert len(rows) == 2 * len(all_combos(CFG))
    assert sum(r["held_out"] for r in rows) == 2 * 3 * 2 * 3
    assert {tuple(r[a] for a in ("shape", "color", "size", "position")) for r in rows} == \
        {tuple(c.values()) for c in all_combos(CFG)}


def test_paraphrased_prompts_are_new_wording_of_every_combination(tiny_params, tiny_shards):
    from diffusion.shapes import PARAPHRASES
    from diffusion.text import captions_from_index

    rows = eval_prompts(CFG, 1, paraphrase_per_combo=2)
    para = [r for r in rows if r["wording"] == "paraphrase"]
    assert len(para) == 2 * len(all_combos(CFG)) and len(rows) == 3 * len(all_combos(CFG))
    assert len({r["prompt"] for r in para}) == len(para)
    # no caption the generator can write is a paraphrased prompt ...
    possible = {caption_for(c, t) for c in all_combos(CFG) for t in range(len(TEMPLATES))}
    assert not possible & {r["prompt"] for r in para}
    # ... and none of the captions in real shards (exact strings, every template of every combination)
    every = eval_prompts(tiny_params.dataset, 0, paraphrase_per_combo=len(PARAPHRASES))
    shard_captions = set(captions_from_index(tiny_shards))
    assert len(shard_captions) > 50 and not shard_captions & {r["prompt"] for r in every}
