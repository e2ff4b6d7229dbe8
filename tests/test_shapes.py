import numpy as np

from diffusion.config import DatasetConfig
from diffusion.data.shapes import all_combos, eval_prompts, is_held_out, make_sample, split_combos

CFG = DatasetConfig()


def test_dataset_spans_required_attribute_counts():
    assert len(CFG.shapes) >= 3 and len(CFG.colors) >= 6 and len(CFG.sizes) >= 2 and len(CFG.positions) >= 3
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


def test_captions_name_exactly_the_attributes_their_meta_says():
    """Every caption names the attributes listed in its meta (by one of their phrasings) and no
    value of an attribute it leaves out."""
    from diffusion.data.captions import TRAIN

    def says(caption: str, attr: str, value: str) -> bool:
        words = {"shape": TRAIN.shape.get(value, (value,)), "color": (value,),
                 "size": TRAIN.size.get(value, (value,)), "position": TRAIN.position.get(value, (value,))}[attr]
        return any(f" {w} " in f" {caption} ".replace(",", " ").replace(":", " ") for w in words)

    left_out = 0
    for i in range(400):
        s = make_sample(CFG, "train", i)
        named = s.meta["named"].split(",")
        assert named and set(named) <= {"shape", "color", "size", "position"}
        for attr, value in s.attrs.items():
            if attr in named:
                assert says(s.caption, attr, value), (s.caption, attr, value)
            else:
                others = {"shape": CFG.shapes, "color": CFG.colors, "size": CFG.sizes, "position": CFG.positions}[attr]
                assert not any(says(s.caption, attr, v) for v in others), (s.caption, attr)
                left_out += 1
    assert 0.05 < left_out / (4 * 400) < 0.2  # caption_omit: 0.1 per attribute


def test_captions_use_many_wordings():
    captions = [make_sample(CFG, "train", i).caption for i in range(2000)]
    assert len(set(captions)) > 1500
    starts = {c.split()[0] for c in captions}
    assert {"a", "there", "on", "in", "we"} <= starts  # the noun phrase, a frame or the position first


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


def test_eval_prompts_cover_every_combination_in_each_wording():
    rows = eval_prompts(CFG, 2, new_wording_per_combo=1, partial_per_combo=1)
    n = len(all_combos(CFG))
    assert len(rows) == 4 * n
    train = [r for r in rows if r["wording"] == "train" and all(r[a] for a in ("shape", "color", "size", "position"))]
    new = [r for r in rows if r["wording"] == "new"]
    assert len(train) == 2 * n and len(new) == n
    assert sum(r["held_out"] for r in train) == 2 * 3 * 2 * 3 and sum(r["held_out"] for r in new) == 3 * 2 * 3
    for group in (train, new):
        assert {tuple(r[a] for a in ("shape", "color", "size", "position")) for r in group} >= \
            {tuple(c.values()) for c in all_combos(CFG)}
    assert eval_prompts(CFG, 2, 1, 1) == rows  # a pure function of the dataset seed


def test_partial_prompts_name_only_some_attributes():
    rows = eval_prompts(CFG, 0, partial_per_combo=2)
    assert len(rows) == 2 * len(all_combos(CFG))
    counts = [sum(bool(r[a]) for a in ("shape", "color", "size", "position")) for r in rows]
    assert set(counts) == {1, 2, 3}
    for r in rows:
        for a, v in ((a, r[a]) for a in ("color", "size") if r[a]):
            assert v in r["prompt"] or a == "size"  # sizes may be said by a synonym


def test_held_out_wording_never_occurs_among_training_captions(tiny_params, tiny_shards):
    """Held-out wording is only for evaluation: no held-out prompt is any training caption (exact
    strings, over every caption in real shards and 20 000 more the generator writes), and every
    held-out frame has a word that no training caption contains."""
    from diffusion.data.captions import HELD_OUT, TRAIN
    from diffusion.data.text import captions_from_index

    new = {r["prompt"] for r in eval_prompts(tiny_params.dataset, 0, new_wording_per_combo=20)}
    new |= {r["prompt"] for r in eval_prompts(CFG, 0, new_wording_per_combo=4)}
    assert len(new) > 2000
    shard_captions = set(captions_from_index(tiny_shards))
    assert len(shard_captions) > 50 and not shard_captions & new
    generated = {make_sample(CFG, "train", i).caption for i in range(20000)}
    assert not generated & new
    train_words = {w for c in generated for w in c.replace(",", " ").replace(":", " ").split()}
    for frame in HELD_OUT.frames:
        words = set(frame.replace("{np}", "").replace("{where}", "").replace(",", " ").replace(":", " ").split())
        assert words - train_words, frame
    # the training wording is a different lexicon altogether
    assert not set(HELD_OUT.frames) & set(TRAIN.frames)


def test_the_sample_grid_shows_every_evaluation_group():
    from diffusion.evaluation.judge import groups_of
    from diffusion.evaluation.sample import grid_rows

    rows = eval_prompts(CFG, 4, new_wording_per_combo=2, partial_per_combo=1)
    pick = grid_rows(rows, 24)
    assert len(pick) == 24 == len(set(pick))
    groups = groups_of(rows)
    for name in ("seen", "held_out", "new_wording", "new_wording_held_out", "partial"):
        assert sum(groups[name][i] for i in pick) >= 4, name
    plain = [{"prompt": f"p{i}"} for i in range(100)]  # other data: spread over all rows
    assert grid_rows(plain, 10) == [0, 11, 22, 33, 44, 55, 66, 77, 88, 99]
