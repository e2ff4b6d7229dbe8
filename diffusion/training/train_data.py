"""Training data: a resumable, seeded stream over the shards, split between ranks and workers,
joined to the caption embeddings and batched.

Every process of a torchrun job (rank r of W) and every DataLoader worker in it (w of K) reads its
own part of the shards, part ``r * K + w`` of ``W * K``, drawn anew each epoch from a shuffle that
all of them share, so the parts are disjoint and cover every shard. With fewer shards than parts
a part reads every shard. The stream never ends (epoch after epoch), so every rank runs exactly
``train.steps`` steps whatever the shard count or sizes: nobody waits for a rank that ran dry.

Each batch carries the worker it came from and that worker's stream position after it; the loop
keeps the latest position of every worker and a checkpoint stores them all, so a rerun restarts
each worker's stream where it stood (no sample repeated or skipped).

Shards ingested with aspect buckets (ingest.resize_mode bucket) are batched one bucket at a time
(``bucket_batches``, ``DataSpec.buckets``): every batch holds images of one size, per rank and per
worker, and the position still restores exactly.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import random
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import torch

from diffusion.errors import MissingInputError
from diffusion.data.latents import LatentSpec, scale_latents
from diffusion.data.shards import decode_sample, iter_samples, raw_samples
from diffusion.data.text import EmbeddingTable


@dataclass
class DataPosition:
    epoch: int = 0
    offset: int = 0  # samples of this epoch already consumed


class ShardStream:
    """Endless stream of decoded samples ({key, image uint8 HxWx3 or latent mean/std, caption,
    meta}) from part ``part`` of ``parts`` of the shards.

    Epoch e visits the shards in an order seeded by (seed, e) and shuffles samples through a
    buffer seeded the same way, so the stream is a pure function of (urls, seed, part) and a
    position (epoch, offset) can be restored by replaying the epoch without decoding the skipped
    samples.
    """

    def __init__(self, urls: list[str], seed: int, shuffle_buffer: int, part: int = 0, parts: int = 1):
        if not urls:
            raise MissingInputError("no training shards given")
        self.urls, self.seed, self.buffer = list(urls), seed, shuffle_buffer
        self.part, self.parts = part, parts
        self.position = DataPosition()

    def _epoch(self, epoch: int) -> Iterator[dict]:
        rng = random.Random(self.seed * 1_000_003 + epoch)
        urls = self.urls[:]
        rng.shuffle(urls)
        urls = urls[self.part::self.parts] or urls  # fewer shards than parts: every part reads all
        buf: list[dict] = []
        for sample in raw_samples(urls):
            buf.append(sample)
            if len(buf) >= self.buffer:
                j = rng.randrange(len(buf))
                buf[j], buf[-1] = buf[-1], buf[j]
                yield buf.pop()
        rng.shuffle(buf)
        yield from buf

    def __iter__(self) -> Iterator[dict]:
        while True:
            pos = self.position
            got = 0
            for i, raw in enumerate(self._epoch(pos.epoch)):
                if i < pos.offset:
                    continue
                s = decode_sample(raw)
                pos.offset = i + 1
                got += 1
                yield s
            if got == 0 and pos.offset == 0:
                raise MissingInputError(f"training shards hold no samples: {self.urls[:2]}...")
            self.position = DataPosition(pos.epoch + 1, 0)


@dataclass
class Batch:
    x0: torch.Tensor
    rows: torch.Tensor
    position: DataPosition  # where its worker's stream stands after this batch (saved in checkpoints)
    std: torch.Tensor | None = None  # latent batches: the posterior's std (x0 holds its mean)
    worker: int = 0

    def pin_memory(self) -> "Batch":  # DataLoader(pin_memory=True) calls this
        return dataclasses.replace(self, x0=self.x0.pin_memory(),
                                   std=self.std.pin_memory() if self.std is not None else None)


def batches(stream: ShardStream, table: EmbeddingTable, batch_size: int, latent: LatentSpec | None = None,
            worker: int = 0) -> Iterator[Batch]:
    """Batches of (images (B, 3, H, W) float in [-1, 1], embedding rows (B,), stream position after it);
    from latent shards (``latent`` given) the scaled posterior means and standard deviations."""
    it = iter(stream)
    while True:
        x, std, rows = stack_samples([next(it) for _ in range(batch_size)], table, latent)
        yield Batch(x, rows, dataclasses.replace(stream.position), std, worker)


def bucket_batches(stream: ShardStream, table: EmbeddingTable, batch_size: int, latent: LatentSpec | None = None,
                   worker: int = 0) -> Iterator[Batch]:
    """``batches`` for aspect-bucketed shards (ingest.resize_mode bucket): every batch holds
    ``batch_size`` samples of one bucket (one image size).

    The worker's stream fills a pending list per bucket, in stream order, and a batch leaves as
    soon as its bucket's list is full; the batch's position is the stream's (epoch, offset), the
    offset counting every input sample consumed, pending ones included. Partial lists left at the
    end of an epoch are dropped (a different few each epoch, as the shuffle moves them), so the
    pending lists at a position depend only on that epoch up to it: a resume replays the epoch
    from its start (reading only each sample's size from its metadata, decoding nothing) to
    rebuild them, then goes on exactly as the uninterrupted stream would.
    """
    while True:
        pos = stream.position
        pending: dict[tuple[int, int], list[dict]] = {}
        emitted = seen = 0
        for i, raw in enumerate(stream._epoch(pos.epoch)):
            seen += 1
            size = sample_size(raw)
            group = pending.setdefault(size, [])
            group.append(raw)
            if len(group) < batch_size:
                continue
            del pending[size]
            if i < pos.offset:  # replaying up to the resumed position: this batch was trained on
                continue
            stream.position = DataPosition(pos.epoch, i + 1)
            emitted += 1
            x, std, rows = stack_samples([decode_sample(r) for r in group], table, latent)
            yield Batch(x, rows, dataclasses.replace(stream.position), std, worker)
        if seen == 0:
            raise MissingInputError(f"training shards hold no samples: {stream.urls[:2]}...")
        if emitted == 0 and pos.offset == 0:
            counts = ", ".join(f"{w}x{h}: {len(g)}" for (w, h), g in sorted(pending.items()))
            raise MissingInputError(f"no bucket holds a batch of {batch_size} samples in this data part ({counts}): "
                                    "lower train.batch_size or train.data_workers, or ingest more images")
        stream.position = DataPosition(pos.epoch + 1, 0)


def sample_size(raw: dict) -> tuple[int, int]:
    """An undecoded sample's (width, height) as ingest recorded it in its metadata (no pixel decoded);
    a sample without them is decoded and its image's (or its latent's) own size is the key."""
    if "json" in raw:
        meta = json.loads(raw["json"])
        if "width" in meta and "height" in meta:
            return int(meta["width"]), int(meta["height"])
    s = decode_sample(raw)
    a = s["image"] if "image" in s else s["mean"].transpose(1, 2, 0)
    return int(a.shape[1]), int(a.shape[0])


def stack_samples(samples: list[dict], table: EmbeddingTable, latent: LatentSpec | None
                  ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """Decoded samples -> (x0 (B, C, H, W): images in [-1, 1] or scaled latent means, the latents'
    scaled std or None, embedding rows (B,))."""
    rows = torch.tensor([table.row(s["caption"]) for s in samples], dtype=torch.long)
    if latent is None:
        x = torch.from_numpy(np.stack([s["image"] for s in samples])).permute(0, 3, 1, 2).float().div_(127.5).sub_(1.0)
        return x, None, rows
    x, std = scale_latents(np.stack([s["mean"] for s in samples]), np.stack([s["std"] for s in samples]), latent)
    return x, std, rows


def first_samples(urls: list[str], table: EmbeddingTable, n: int, latent: LatentSpec | None = None
                  ) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The first ``n`` samples of the shards in shard order, no shuffle (a fixed held-out set), as
    (x0, embedding rows); latents as their means. None where the shards hold none."""
    samples = list(itertools.islice(iter_samples(urls), n))
    if not samples:
        return None
    # aspect buckets: the samples of the first one's size (a held-out batch has one image size)
    samples = [s for s in samples if _shape(s) == _shape(samples[0])]
    x, _, rows = stack_samples(samples, table, latent)
    return x, rows


def _shape(sample: dict) -> tuple[int, ...]:
    return sample["image"].shape if "image" in sample else sample["mean"].shape


@dataclass
class DataSpec:
    """What one rank reads: the shards, its part, the batch it feeds to one forward pass."""

    urls: list[str]
    seed: int
    shuffle_buffer: int
    batch_size: int
    rank: int = 0
    world: int = 1
    workers: int = 1  # DataLoader worker processes; 0: decode in the training process
    latent: LatentSpec | None = None
    buckets: bool = False  # aspect-bucketed shards: each batch from one bucket (``bucket_batches``)

    def batches(self, worker: int, position: DataPosition | None, table: EmbeddingTable) -> Iterator[Batch]:
        """Worker ``worker``'s batches from ``position`` on."""
        make = bucket_batches if self.buckets else batches
        return make(self.stream(worker, position), table, self.batch_size, self.latent, worker)

    def stream(self, worker: int, position: DataPosition | None) -> ShardStream:
        k = max(1, self.workers)
        s = ShardStream(self.urls, self.seed, self.shuffle_buffer, self.rank * k + worker, self.world * k)
        if position is not None:
            s.position = dataclasses.replace(position)
        return s


class BatchStream(torch.utils.data.IterableDataset):
    """One rank's batches as an IterableDataset: each DataLoader worker process streams its own
    part of the shards, so tar parsing and image decoding run beside the training step."""

    def __init__(self, spec: DataSpec, table: EmbeddingTable, positions: list[DataPosition]):
        super().__init__()
        self.spec, self.table, self.positions = spec, table, positions

    def __iter__(self) -> Iterator[Batch]:
        info = torch.utils.data.get_worker_info()
        w = info.id if info is not None else 0
        return self.spec.batches(w, self.positions[w], self.table)


def batch_loader(spec: DataSpec, table: EmbeddingTable, positions: list[DataPosition], *,
                 pin_memory: bool = False) -> Iterator[Batch]:
    """Endless batches for one rank, resumed at ``positions`` (one per worker)."""
    if spec.workers == 0:
        return spec.batches(0, positions[0], table)
    loader = torch.utils.data.DataLoader(BatchStream(spec, table, positions), batch_size=None,
                                         num_workers=spec.workers, prefetch_factor=4, persistent_workers=False,
                                         pin_memory=pin_memory, worker_init_fn=one_thread)
    return iter(loader)


def one_thread(worker_id: int) -> None:
    """A DataLoader worker decodes with one torch thread, so K workers beside the training step never
    ask for K times the machine's cores (torch's worker loop does this too; kept explicit so a custom
    loader or a torch change cannot lose it). They inherit OMP_WAIT_POLICY from the trainer."""
    torch.set_num_threads(1)
