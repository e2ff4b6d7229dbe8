import json

import numpy as np
import pyarrow.parquet as pq
import pytest
import webdataset as wds
from PIL import Image

from diffusion.shards import ShardSink, caption_id, iter_samples, list_shards


def _img(v):
    return Image.fromarray(np.full((8, 8, 3), v, np.uint8))


def test_sink_writes_bounded_shards_index_and_readable_samples(tmp_path):
    with ShardSink(tmp_path, "train", samples_per_shard=4, image_format="png") as sink:
        for i in range(10):
            sink.write(f"k{i:03d}", _img(i * 10), f"caption {i}", {"i": i})
    shards = list_shards(tmp_path / "train")
    assert [s.rsplit("/", 1)[1] for s in shards] == ["shard-000000.tar", "shard-000001.tar", "shard-000002.tar"]
    # read back with plain webdataset: exactly the written samples, in order, with all three members
    raw = list(wds.WebDataset(shards, shardshuffle=False, empty_check=False))
    assert [r["__key__"] for r in raw] == [f"k{i:03d}" for i in range(10)]
    assert all({"png", "txt", "json"} <= set(r) for r in raw)
    decoded = list(iter_samples(shards))
    assert decoded[3]["caption"] == "caption 3"
    assert decoded[3]["image"][0, 0].tolist() == [30, 30, 30]
    assert decoded[3]["meta"]["caption_id"] == caption_id("caption 3")
    index = pq.read_table(tmp_path / "index-train.parquet").to_pylist()
    assert len(index) == 10 and index[5]["shard"] == "train/shard-000001.tar"
    assert json.loads(index[5]["meta"])["i"] == 5


def test_failed_write_leaves_no_partial_shard(tmp_path):
    with pytest.raises(RuntimeError):
        with ShardSink(tmp_path, "train", samples_per_shard=4) as sink:
            for i in range(6):
                sink.write(f"k{i}", _img(i), "c", {})
            raise RuntimeError("killed")
    # the first shard was complete and stays; the half-written second leaves nothing behind
    assert [p.name for p in (tmp_path / "train").iterdir()] == ["shard-000000.tar"]


def test_ingest_builtin_stats_and_index(tiny_shards, tiny_params):
    stats = json.loads((tiny_shards / "stats.json").read_text())
    d = tiny_params.dataset
    assert stats["splits"]["train"]["accepted"] == d.n_train
    assert stats["splits"]["val"]["accepted"] == d.n_val
    assert stats["splits"]["train"]["held_out_samples"] == 0
    assert stats["splits"]["train"]["shards"] == -(-d.n_train // tiny_params.ingest.samples_per_shard)
    n = sum(1 for _ in iter_samples(list_shards(tiny_shards / "train")))
    assert n == d.n_train == pq.read_table(tiny_shards / "index-train.parquet").num_rows
