import json
import time

import numpy as np
import pyarrow.parquet as pq
import webdataset as wds
from PIL import Image

from diffusion.shards import ShardWriter, encode_image, iter_samples, list_shards


def _img(v):
    return Image.fromarray(np.full((8, 8, 3), v, np.uint8))


def _png(v) -> bytes:
    return encode_image(_img(v), "png")


def test_writer_rolls_over_by_count_and_bytes_and_reads_back(tmp_path):
    w = ShardWriter(tmp_path / "train", "shard-000003", max_count=4)
    names = [w.write(f"k{i:03d}", "png", _png(i * 10), f"caption {i}", {"i": i}) for i in range(10)]
    parts = w.close()
    assert [p["name"] for p in parts] == ["shard-000003-00.tar", "shard-000003-01.tar", "shard-000003-02.tar"]
    assert [p["samples"] for p in parts] == [4, 4, 2] and names[4] == "shard-000003-01.tar"
    shards = list_shards(tmp_path / "train")
    # read back with plain webdataset: exactly the written samples, in order, with all three members
    raw = list(wds.WebDataset(shards, shardshuffle=False, empty_check=False))
    assert [r["__key__"] for r in raw] == [f"k{i:03d}" for i in range(10)]
    assert all({"png", "txt", "json"} <= set(r) for r in raw)
    decoded = list(iter_samples(shards))
    assert decoded[3]["caption"] == "caption 3" and decoded[3]["meta"] == {"i": 3}
    assert decoded[3]["image"][0, 0].tolist() == [30, 30, 30]
    big = ShardWriter(tmp_path / "big", "shard-000000", max_count=100, max_bytes=3000)
    for i in range(10):
        big.write(f"k{i}", "png", _png(i), "c", {})
    assert len(big.close()) > 1


def test_same_samples_give_byte_identical_shards(tmp_path):
    for d in ("a", "b"):
        w = ShardWriter(tmp_path / d, "shard-000000", max_count=10)
        for i in range(5):
            w.write(f"k{i}", "png", _png(i), "c", {"i": i})
        w.close()
        time.sleep(1.1)  # a later wall-clock second must not change the bytes
    assert (tmp_path / "a/shard-000000-00.tar").read_bytes() == (tmp_path / "b/shard-000000-00.tar").read_bytes()


def test_aborted_write_leaves_no_partial_shard(tmp_path):
    w = ShardWriter(tmp_path, "shard-000000", max_count=4)
    for i in range(6):
        w.write(f"k{i}", "png", _png(i), "c", {})
    w.abort()
    # the first part was complete and stays; the half-written second leaves nothing behind
    assert [p.name for p in tmp_path.iterdir()] == ["shard-000000-00.tar"]


def test_ingest_builtin_stats_and_index(tiny_shards, tiny_params):
    stats = json.loads((tiny_shards / "stats.json").read_text())
    d = tiny_params.dataset
    assert stats["source"] == "builtin" and stats["rejected"] == {}
    assert stats["splits"]["train"]["accepted"] == d.n_train
    assert stats["splits"]["val"]["accepted"] == d.n_val
    assert stats["image_size"] == d.image_size
    assert stats["splits"]["train"]["shards"] == -(-d.n_train // tiny_params.ingest.samples_per_shard)
    index = pq.read_table(tiny_shards / "index-train.parquet").to_pylist()
    assert not any(json.loads(r["meta"])["held_out"] for r in index)
    n = sum(1 for _ in iter_samples(list_shards(tiny_shards / "train")))
    assert n == d.n_train == pq.read_table(tiny_shards / "index-train.parquet").num_rows
