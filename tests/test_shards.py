import json
import time

import numpy as np
import pyarrow.parquet as pq
import webdataset as wds
from PIL import Image

from diffusion.artifacts import list_shards
from diffusion.data.shards import ShardWriter, encode_image, iter_samples


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


# --------------------------------------------------------------------------------------------
# The reader: our tar parser against webdataset's (tarfile) on every kind of member


def _add(tar, name, data=b"", type_=None, **kw):
    import io
    import tarfile

    info = tarfile.TarInfo(name)
    info.size = len(data)
    for k, v in kw.items():
        setattr(info, k, v)
    if type_ is not None:
        info.type = type_
        info.size = 0
    tar.addfile(info, io.BytesIO(data) if type_ is None else None)


def _odd_tar(path, fmt):
    """Samples in every shape a tar can carry them: long and non-ASCII names (pax records or GNU
    long-name members), ustar prefixes, sub-directories, upper-case and multi-dot exts, empty and
    block-sized members, plus what is not a sample's: directories, links, a FIFO, webdataset's
    __meta__ members and a name with no dot."""
    import tarfile

    long_dir = "d" * 120 + "/" + "e" * 60
    with tarfile.open(path, "w", format=fmt) as tar:
        _add(tar, "__meta__", b"{}")
        _add(tar, "sub", type_=tarfile.DIRTYPE)
        _add(tar, "sub/a.png", b"\x89PNG" * 300)
        _add(tar, "sub/a.TXT", b"")
        _add(tar, "sub/a.seg.json", b"x" * 512)
        _add(tar, "link.png", type_=tarfile.SYMTYPE, linkname="sub/a.png")
        _add(tar, "hard.txt", type_=tarfile.LNKTYPE, linkname="sub/a.TXT")
        _add(tar, "fifo", type_=tarfile.FIFOTYPE)
        _add(tar, "README", b"no dot: not a sample member")
        _add(tar, long_dir + "/k" + "x" * 150 + ".txt", b"a long name")
        _add(tar, long_dir + "/k" + "x" * 150 + ".jpg", b"\xff\xd8" + bytes(range(256)) * 5)
        _add(tar, "p" * 150 + "/short.txt", b"ustar prefix")
        _add(tar, "café-ünï.txt", "non-ascii".encode(), mtime=2 ** 40)
        _add(tar, "café-ünï.json", b"{\"big mtime\": 1}")
        _add(tar, "z.txt", b"last")


def test_reader_groups_members_exactly_as_webdataset(tmp_path):
    import tarfile

    from diffusion.data.shards import raw_samples

    urls = []
    for fmt in (tarfile.PAX_FORMAT, tarfile.GNU_FORMAT):
        _odd_tar(tmp_path / f"odd-{fmt}.tar", fmt)
        urls.append(str(tmp_path / f"odd-{fmt}.tar"))
    w = ShardWriter(tmp_path / "train", "shard-000000", max_count=3)
    for i in range(7):
        w.write(f"k{i:03d}", "png", _png(i), f"caption {i}", {"i": i})
    urls += [str(tmp_path / "train" / p["name"]) for p in w.close()]
    ours = list(raw_samples(urls))
    theirs = list(wds.DataPipeline(wds.SimpleShardList(urls), wds.tarfile_to_samples()))
    assert ours == theirs
    keys = [s["__key__"] for s in ours]
    assert "sub/a" in keys and "café-ünï" in keys and keys[-7:] == [f"k{i:03d}" for i in range(7)]
    assert ours[0]["txt"] == b"" and ours[0]["seg.json"] == b"x" * 512  # ext lower-cased, empty member kept


def test_reader_names_the_shard_and_byte_of_what_it_cannot_read(tmp_path):
    import gzip

    import pytest

    from diffusion.data.shards import ShardReadError, raw_samples

    w = ShardWriter(tmp_path / "train", "shard-000000", max_count=10)
    for i in range(4):
        w.write(f"k{i}", "png", _png(i), f"caption {i}", {})
    shard = tmp_path / "train" / w.close()[0]["name"]
    data = shard.read_bytes()
    cases = {
        "cut-in-member.tar": (data[:512 + 100], "truncated at byte 612"),
        "cut-in-header.tar": (data[:1024 + 300], "truncated at byte 1324"),
        "bad-header.tar": (data[:1024] + b"\x07" + data[1025:], "bad tar header checksum at byte 1024"),
        "gz.tar": (gzip.compress(data), "gzip-compressed"),
        "not-a-tar.tar": (b"hello" * 200, "bad tar header checksum at byte 0"),
    }
    for name, (blob, says) in cases.items():
        (tmp_path / name).write_bytes(blob)
        with pytest.raises(ShardReadError, match=f"{name}: .*{says}"):
            list(raw_samples([str(tmp_path / name)]))
    # a shard that stops exactly between members (no end blocks) still gives those members
    (tmp_path / "no-end.tar").write_bytes(data[:512 * 2 * 3])  # k0's png, txt, json: one block each
    assert [s["__key__"] for s in raw_samples([str(tmp_path / "no-end.tar")])] == ["k0"]


def test_decode_image_gives_pils_rgb_for_every_mode_and_format():
    import io

    from diffusion.data.shards import decode_image

    rng = np.random.default_rng(0)
    rgba = Image.fromarray(rng.integers(0, 256, (9, 7, 4), dtype=np.uint8), "RGBA")
    images = {"RGB": rgba.convert("RGB"), "RGBA": rgba, "L": rgba.convert("L"), "LA": rgba.convert("LA"),
              "P": rgba.convert("RGB").convert("P", palette=Image.Palette.ADAPTIVE, colors=7),
              "1": rgba.convert("1"), "I;16": Image.fromarray((rng.integers(0, 65536, (9, 7))).astype(np.uint16))}
    images["P+tRNS"] = images["P"].copy()
    images["P+tRNS"].info["transparency"] = 2
    for mode, im in images.items():
        for fmt, ext in (("PNG", "png"), ("WEBP", "webp"), ("JPEG", "jpg")):
            if fmt == "JPEG" and mode not in ("RGB", "L"):
                continue
            if fmt == "WEBP" and mode in ("1", "I;16", "P+tRNS"):
                continue
            buf = io.BytesIO()
            im.save(buf, format=fmt, **({"transparency": 2} if mode == "P+tRNS" else {}))
            want = np.asarray(Image.open(io.BytesIO(buf.getvalue())).convert("RGB"))
            got = decode_image(buf.getvalue(), ext)
            assert got.dtype == np.uint8 and got.shape == (9, 7, 3), (mode, fmt)
            assert np.array_equal(got, want), (mode, fmt)
    # a member whose ext names another format is still read by what its bytes are
    buf = io.BytesIO()
    images["RGB"].save(buf, format="PNG")
    assert np.array_equal(decode_image(buf.getvalue(), "jpg"), np.asarray(images["RGB"]))
