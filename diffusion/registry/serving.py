"""Batched serving: concurrent requests share one sampler call, each answered as if it came alone.

``Batcher`` wraps a loaded registered model (``pyfunc.T2IModel``). Each request is queued; one
worker thread takes the oldest, gathers the requests queued behind it that use the same sampler
settings, until ``max_batch`` images are gathered or ``max_wait_ms`` has passed since the oldest
arrived, draws them all in one ``generate`` call and hands each request its own rows.

Why a request's images do not depend on its neighbours, bit for bit:

- each image's noise comes from its own ``torch.Generator(seed)`` (``generate``);
- each prompt is encoded alone (and cached), so its text states never share a batch;
- with ``fixed_shape`` (the default) every call that holds a request has one shape: ``max_batch``
  rows (the gathered ones, then copies of the first) and the request's text length rounded up to a
  multiple of ``TOKEN_BUCKET`` (only requests of one such bucket share a call). CPU kernels
  may round differently by batch shape, never by the other rows' values, so a request gets the
  same bytes alone or in any crowd. Without ``fixed_shape`` only the gathered rows are computed (cheaper
  for a lone request), and identity rests on the kernels being shape-invariant, as they were on
  the 2-core EPYC (docs/operations.md#serving).

The request format is ``mlflow models serve``'s (``parse_request``), so clients do not change.
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field, replace

import torch

from diffusion.config import SampleConfig
from diffusion.data.text import embed_captions
from diffusion.errors import T2IError
from diffusion.models.unet import Cond
from diffusion.sampling.generate import generate, table_cond


TOKEN_BUCKET = 16  # fixed_shape: text lengths are padded to a multiple of this (the tower's context at most)


class BadRequest(T2IError):
    """A request refused before it is queued; ``status`` is its HTTP status (4xx)."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


@dataclass
class Request:
    """One client request: rows to draw with one set of sampler settings."""

    prompts: list[str]
    seeds: list[int]
    negatives: list[str]  # "" where a row has none
    settings: SampleConfig
    tokens: int = 0  # the token length its text is drawn at (fixed_shape: its prompts' bucket)
    size: int | tuple[int, int] = 0  # the image size (params width and height: an aspect bucket); 0: the model's
    arrived: float = field(default_factory=time.monotonic)
    future: Future = field(default_factory=Future)


def parse_request(body: object) -> tuple[list[dict], dict]:
    """(records, params) from an ``mlflow models serve`` JSON body: ``dataframe_records``,
    ``dataframe_split`` ({columns, data}), or ``inputs``/``instances`` (records or columns)."""
    if not isinstance(body, dict):
        raise BadRequest("the body must be a JSON object with dataframe_records, dataframe_split or inputs")
    params = body.get("params") or {}
    if not isinstance(params, dict):
        raise BadRequest("params must be a JSON object")
    keys = [k for k in ("dataframe_records", "dataframe_split", "inputs", "instances") if k in body]
    if len(keys) != 1:
        raise BadRequest("the body needs exactly one of dataframe_records, dataframe_split, inputs, instances")
    data = body[keys[0]]
    if keys[0] == "dataframe_split" and isinstance(data, dict):
        data = [dict(zip(data.get("columns", []), row)) for row in data.get("data", [])]
    elif isinstance(data, dict):  # columns: {"prompt": [...], "seed": [...]}
        n = max((len(v) for v in data.values() if isinstance(v, list)), default=0)
        data = [{k: (v[i] if isinstance(v, list) else v) for k, v in data.items()} for i in range(n)]
    if not isinstance(data, list) or not all(isinstance(r, dict) for r in data):
        raise BadRequest(f"{keys[0]} must be a list of records")
    return data, params


def rows_of(records: list[dict]) -> tuple[list[str], list[int], list[str]]:
    """Prompts, seeds (0, 1, ... where no record has one, as ``T2IModel.predict``) and negative
    prompts of ``records``; a missing prompt or a bad seed is a ``BadRequest``."""
    if not records:
        raise BadRequest("the request has no records")
    if any("prompt" not in r or r["prompt"] is None for r in records):
        raise BadRequest("missing inputs ['prompt']: every record needs a prompt")
    prompts = [str(r["prompt"]) for r in records]
    seeded = ["seed" in r and r["seed"] is not None for r in records]
    if any(seeded) and not all(seeded):
        raise BadRequest("give a seed to every record of a request or to none")
    try:
        seeds = [int(r["seed"]) for r in records] if all(seeded) else list(range(len(records)))
    except (TypeError, ValueError):
        raise BadRequest("seed must be an integer") from None
    if any(not 0 <= s < 2 ** 63 for s in seeds):
        raise BadRequest("seed must be in 0..2**63-1")
    negatives = [str(r.get("negative_prompt") or "") for r in records]
    return prompts, seeds, negatives


class Batcher:
    """One worker thread drawing the queued requests of ``model`` (a loaded ``T2IModel``) in
    batches of at most ``max_batch`` images, waiting at most ``max_wait_ms`` to fill one."""

    def __init__(self, model, max_batch: int = 16, max_wait_ms: float = 60.0, fixed_shape: bool = True,
                 text_cache: int = 4096):
        self.model, self.max_batch, self.max_wait = model, max_batch, max_wait_ms / 1000
        self.fixed_shape = fixed_shape
        self.image_size = model.meta["image_size"]
        self.token_length = int(model.encoder.tokenizer([""]).shape[1])  # the tower's context length
        self._texts: dict[str, Cond] = {}
        self._text_cache = text_cache
        self._queue: list[Request] = []
        self._cv = threading.Condition()
        self._closed = False
        self.calls = self.images = 0  # sampler calls made and images answered (GET /health shows them)
        self._thread = threading.Thread(target=self._loop, name="t2i-batcher", daemon=True)
        self._thread.start()

    def submit(self, records: list[dict], params: dict | None = None) -> Future:
        """Queue ``records``; the future resolves to one {prompt, seed, image: PNG bytes} per record."""
        from mlflow.exceptions import MlflowException

        prompts, seeds, negatives = rows_of(records)
        if len(prompts) > self.max_batch:
            raise BadRequest(f"{len(prompts)} records in one request; this server draws at most "
                             f"{self.max_batch} (serve.max_batch): split the request", status=413)
        try:
            settings = self.model._settings(params)
            size = self.model._size(params)
        except MlflowException as e:
            raise BadRequest(e.message) from None
        request = Request(prompts, seeds, negatives, settings, self._bucket(prompts + negatives), size)
        with self._cv:
            if self._closed:
                raise T2IError("the batcher is closed")
            self._queue.append(request)
            self._cv.notify()
        return request.future

    def close(self) -> None:
        """Stop after the call in progress; requests still queued get an error, not a hang."""
        with self._cv:
            self._closed = True
            left, self._queue = self._queue, []
            self._cv.notify()
        for r in left:
            r.future.set_exception(T2IError("the server is shutting down"))
        self._thread.join(timeout=60)

    def _loop(self) -> None:
        while True:
            batch = self._gather()
            if batch is None:
                return
            try:
                images = self.draw([p for r in batch for p in r.prompts], [s for r in batch for s in r.seeds],
                                   [n for r in batch for n in r.negatives], batch[0].settings, batch[0].tokens,
                                   batch[0].size)
            except Exception as e:  # noqa: BLE001 (handed to every waiting request, the worker lives on)
                for r in batch:
                    r.future.set_exception(e)
                continue
            start = 0
            for r in batch:
                rows = images[start:start + len(r.prompts)]
                start += len(r.prompts)
                r.future.set_result([{"prompt": p, "seed": s, "image": png}
                                     for p, s, png in zip(r.prompts, r.seeds, rows)])

    def _gather(self) -> list[Request] | None:
        """The oldest request and those behind it with the same settings that fit in ``max_batch``,
        once the batch is full or the oldest has waited ``max_wait``; None once closed."""
        with self._cv:
            while True:
                if self._closed:
                    return None
                if not self._queue:
                    self._cv.wait()
                    continue
                first = self._queue[0]
                batch, rows = [], 0
                for r in self._queue:
                    same = r.settings == first.settings and r.tokens == first.tokens and r.size == first.size
                    if same and rows + len(r.prompts) <= self.max_batch:
                        batch.append(r)
                        rows += len(r.prompts)
                left = first.arrived + self.max_wait - time.monotonic()
                if rows >= self.max_batch or left <= 0:
                    taken = {id(r) for r in batch}
                    self._queue = [r for r in self._queue if id(r) not in taken]
                    return batch
                self._cv.wait(left)

    def _bucket(self, texts: list[str]) -> int:
        """fixed_shape: the token length a request's texts are drawn at, its longest text's rounded up
        to a multiple of TOKEN_BUCKET (only requests of one bucket share a call); else 0 (the batch's longest)."""
        if not self.fixed_shape:
            return 0
        longest = int((self.model.encoder.tokenizer(texts).argmax(dim=-1) + 1).max())  # as TextEncoder.encode
        return min(self.token_length, -(-longest // TOKEN_BUCKET) * TOKEN_BUCKET)

    def draw(self, prompts: list[str], seeds: list[int], negatives: list[str], settings: SampleConfig,
             tokens: int = 0, size: int | tuple[int, int] = 0) -> list[bytes]:
        """PNG bytes of one image per row, in one sampler call; with ``fixed_shape`` at max_batch rows
        and ``tokens`` text positions, at ``size`` (0: the model's image_size)."""
        from diffusion.registry.pyfunc import png_bytes

        n = len(prompts)
        if self.fixed_shape and n < self.max_batch:
            extra = self.max_batch - n
            prompts, seeds, negatives = prompts + [prompts[0]] * extra, seeds + [seeds[0]] * extra, \
                negatives + [negatives[0]] * extra
        length = tokens or max(self._encoded(t).tokens.shape[1] for t in prompts + negatives)
        cond, uncond = self._cond(prompts, length), self._cond(negatives, length)
        images = generate(self.model.denoiser, cond, uncond, seeds, size or self.image_size,
                          replace(settings, batch_size=len(prompts)))
        self.calls += 1
        self.images += n
        return [png_bytes(img) for img in images[:n]]

    def _encoded(self, text: str) -> Cond:
        """``text`` encoded alone (cached), through the embed stage's path as T2IModel.predict encodes."""
        if text not in self._texts:
            if len(self._texts) >= self._text_cache:
                self._texts.pop(next(iter(self._texts)))
            self._texts[text] = table_cond(embed_captions(self.model.encoder, [text], progress=False), [text])[0]
        return self._texts[text]

    def _cond(self, texts: list[str], length: int) -> Cond:
        """One row per text, token axis padded to ``length``."""
        rows = [self._encoded(t).padded(length) for t in texts]
        return Cond(torch.cat([r.tokens for r in rows]), torch.cat([r.mask for r in rows]),
                    torch.cat([r.pooled for r in rows]))

