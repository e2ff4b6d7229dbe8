"""Batched serving: concurrent requests share one sampler call, each answered as if it came alone.

``Batcher`` wraps a loaded registered model (``pyfunc.T2IModel``). Each request is queued; one
worker thread takes the oldest, gathers the requests queued behind it that use the same sampler
settings, until ``max_batch`` images are gathered or ``max_wait_ms`` has passed since the oldest
arrived, draws them all in one ``generate`` call and hands each request its own rows.

Why a request's images do not depend on its neighbours, bit for bit:

- each image's noise comes from its own ``torch.Generator(seed)`` (``generate``);
- each prompt is encoded alone (and cached), so its text states never share a batch;
- with ``fixed_shape`` (the default) every sampler call has one fixed shape: ``max_batch`` rows (the
  gathered ones, then copies of the first) and the text tower's full context length. CPU kernels
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

    def __init__(self, model, max_batch: int = 16, max_wait_ms: float = 10.0, fixed_shape: bool = True,
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
        except MlflowException as e:
            raise BadRequest(e.message) from None
        request = Request(prompts, seeds, negatives, settings)
        with self._cv:
            if self._closed:
                raise T2IError("the batcher is closed")
            self._queue.append(request)
            self._cv.notify()
        return request.future

    def close(self) -> None:
        with self._cv:
            self._closed = True
            self._cv.notify()
        self._thread.join(timeout=60)

    def _loop(self) -> None:
        while True:
            batch = self._gather()
            if batch is None:
                return
            try:
                images = self.draw([p for r in batch for p in r.prompts], [s for r in batch for s in r.seeds],
                                   [n for r in batch for n in r.negatives], batch[0].settings)
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
                    if r.settings == first.settings and rows + len(r.prompts) <= self.max_batch:
                        batch.append(r)
                        rows += len(r.prompts)
                left = first.arrived + self.max_wait - time.monotonic()
                if rows >= self.max_batch or left <= 0:
                    self._queue = [r for r in self._queue if r not in batch]
                    return batch
                self._cv.wait(left)

    def draw(self, prompts: list[str], seeds: list[int], negatives: list[str], settings: SampleConfig) -> list[bytes]:
        """PNG bytes of one image per row, in one sampler call (padded to the fixed shape with ``fixed_shape``)."""
        from diffusion.registry.pyfunc import png_bytes

        n = len(prompts)
        if self.fixed_shape and n < self.max_batch:
            extra = self.max_batch - n
            prompts, seeds, negatives = prompts + [prompts[0]] * extra, seeds + [seeds[0]] * extra, \
                negatives + [negatives[0]] * extra
        cond, uncond = self._cond(prompts), self._cond(negatives)
        images = generate(self.model.denoiser, cond, uncond, seeds, self.image_size,
                          replace(settings, batch_size=len(prompts)))
        self.calls += 1
        self.images += n
        return [png_bytes(img) for img in images[:n]]

    def _cond(self, texts: list[str]) -> Cond:
        """One row per text, each encoded alone and cached; tokens padded to a fixed length with ``fixed_shape``."""
        for t in dict.fromkeys(texts):
            if t not in self._texts:
                if len(self._texts) >= self._text_cache:
                    self._texts.pop(next(iter(self._texts)))
                # the embed stage's path (float16 as the table stores it), as T2IModel.predict encodes
                self._texts[t] = table_cond(embed_captions(self.model.encoder, [t], progress=False), [t])[0]
        length = self.token_length if self.fixed_shape else max(self._texts[t].tokens.shape[1] for t in texts)
        rows = [self._texts[t].padded(length) for t in texts]
        return Cond(torch.cat([r.tokens for r in rows]), torch.cat([r.mask for r in rows]),
                    torch.cat([r.pooled for r in rows]))

