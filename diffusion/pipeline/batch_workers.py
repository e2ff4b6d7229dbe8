"""Batch generation on worker processes (a Dask cluster): each worker loads the model once, keeps it,
and draws the chunks it is given; the flow's process commits them in order (``batch.generate_batch``).

    ref = model_ref(gen, cfg, params, tracking_uri)        # in the flow: what every worker must load
    rendered = render_on_worker(ref, chunk, image_size)     # on a worker: records and PNG bytes

A worker writes nothing: the PNG bytes go back to the flow, which alone writes the batch folder, so
the output is the same whichever worker drew a chunk, and a worker killed mid-chunk loses nothing
but that chunk, which the scheduler gives to another worker.

Devices: with ``batch.device`` ``auto`` or ``cuda`` and GPUs visible, a worker takes one GPU,
``cuda:<worker name mod GPU count>``. A LocalCluster names its workers 0..n-1, so n workers on an
n-GPU machine take one GPU each; a worker started with ``CUDA_VISIBLE_DEVICES=i`` (or by dask-cuda)
sees one GPU and takes it. On the CPU a worker runs ``diffusion.threads``'s count: a Dask nanny
exports ``OMP_NUM_THREADS=1`` to it, so one thread each unless ``T2I_THREADS`` says otherwise.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass

from diffusion.errors import T2IError
from diffusion.pipeline.batch import Generator, load_generator, render_chunk


@dataclass(frozen=True)
class ModelRef:
    """What a worker needs to load the very model the flow planned the batch with."""

    model: str  # models:/<name>/<version> (an alias resolved once, so it cannot move mid-batch), or a folder
    device: str  # batch.device: auto | cpu | cuda
    weights_sha256: str  # a worker that loads other weights refuses to draw
    tracking_uri: str | None = None  # the MLflow store a models:/ reference is read from
    params: object = None  # Params, for a train-stage folder (its text encoder and sampler settings)


def model_ref(gen: Generator, device: str, params=None, tracking_uri: str | None = None) -> ModelRef:
    return ModelRef(gen.source, device, gen.weights_sha256, tracking_uri, params)


def worker_device(device: str, worker_name, gpu_count: int) -> str:
    """The device one worker draws on: ``cpu`` when asked or without GPUs (``auto``); with GPUs,
    ``cuda:<name mod gpu_count>`` for a numbered worker (a LocalCluster's 0..n-1), else ``cuda:0``."""
    if device == "cpu" or (device == "auto" and gpu_count == 0):
        return "cpu"
    if gpu_count == 0:
        raise T2IError(f"batch.device is {device} but worker {worker_name} sees no CUDA GPU (use auto or cpu)")
    index = int(worker_name) if str(worker_name).isdigit() else 0
    return f"cuda:{index % gpu_count}"


def _worker_name():
    """This Dask worker's name (None outside one). Imported here: the library needs no Dask."""
    try:
        from distributed import Worker, get_worker
    except ImportError:
        return None
    try:
        return get_worker().name
    except ValueError:  # not in a task's thread (Prefect's engine may use its own): the process's worker
        workers = list(Worker._instances)
        return workers[0].name if len(workers) == 1 else None


def _malloc_for_torch() -> bool:
    """Undo a Dask nanny's ``MALLOC_TRIM_THRESHOLD_=65536`` in this process (glibc only). Any such
    setting freezes glibc's mmap threshold at 128 KiB, so every large tensor is a fresh mmap and its
    pages are faulted in again on each use: the sampler ran 2.7x slower on the EPYC. Keep the heap
    (and freed tensor memory) instead, as a process without the variable does."""
    if not os.environ.get("MALLOC_TRIM_THRESHOLD_") or not sys.platform.startswith("linux"):
        return False
    import ctypes

    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3  # mallopt parameter numbers (malloc.h)
    return bool(libc.mallopt(m_trim_threshold, 256 << 20) and libc.mallopt(m_mmap_threshold, 32 << 20))


_LOADED: dict[tuple, Generator] = {}  # per worker process: the model it loaded, kept for every chunk


def worker_generator(ref: ModelRef) -> Generator:
    """The model ``ref`` names, loaded once per process on its device with the thread policy applied.
    One-line errors for a model the worker cannot read or whose weights differ from the flow's."""
    key = (ref.model, ref.device, ref.weights_sha256, ref.tracking_uri)
    if key in _LOADED:
        return _LOADED[key]
    import torch

    from diffusion import threads

    threads.apply()
    _malloc_for_torch()
    name = _worker_name()
    device = worker_device(ref.device, name, torch.cuda.device_count())
    where = f"worker {name if name is not None else os.getpid()} on {os.uname().nodename}"
    if ref.tracking_uri and ref.model.startswith("models:/"):
        import mlflow

        mlflow.set_tracking_uri(ref.tracking_uri)
    try:
        gen = load_generator(ref.model, device=device, params=ref.params)
    except T2IError as e:
        raise T2IError(f"{where} cannot read the model: {e}") from None
    except Exception as e:  # noqa: BLE001 - an unreadable store or file raises many types
        raise T2IError(f"{where} cannot read the model {ref.model}: {type(e).__name__}: {e}") from None
    if gen.weights_sha256 != ref.weights_sha256:
        raise T2IError(f"{where} loaded other weights for {ref.model} ({gen.weights_sha256[:12]}, the flow has "
                       f"{ref.weights_sha256[:12]}): the workers must read the flow's model store")
    _LOADED.clear()  # one model a worker: a new batch's model replaces the last one
    _LOADED[key] = gen
    return gen


def render_on_worker(ref: ModelRef, chunk: list[dict], size: int) -> list[tuple[dict, bytes]]:
    """Draw ``chunk`` with the worker's copy of the model (``batch.render_chunk``)."""
    return render_chunk(worker_generator(ref), chunk, size)


def worker_engine(submit_chunk, device: str, params=None, tracking_uri: str | None = None):
    """``run_batch``'s ``engine`` for workers: ``submit_chunk(ref, chunk, size)`` sends one chunk to
    ``render_on_worker`` (a Prefect task on a Dask cluster) and returns its future."""
    def engine(gen: Generator, size: int):
        ref = model_ref(gen, device, params, tracking_uri)
        return lambda chunk: submit_chunk(ref, chunk, size)
    return engine


def check_scheduler(address: str, timeout: float = 5.0) -> None:
    """A one-line error, within ``timeout`` seconds, when no Dask scheduler listens at ``address``
    (``tcp://host:port``); Dask's own client would wait 30 s and raise a traceback."""
    import socket
    from urllib.parse import urlsplit

    parts = urlsplit(address if "://" in address else f"tcp://{address}")
    try:
        host, port = parts.hostname, parts.port or 8786
    except ValueError:
        host = None
    if not host:
        raise T2IError(f"batch.dask_address must be tcp://host:port, got {address!r}")
    try:
        socket.create_connection((host, port), timeout=timeout).close()
    except OSError as e:
        raise T2IError(f"batch.dask_address {address}: no Dask scheduler answers there ({e.strerror or e}); "
                       "start one (`dask scheduler`) or set batch.dask_address to null for a LocalCluster") from None


# evaluated on each worker (``eval`` is a builtin, so it travels by name even to a worker without the project)
_CAN_IMPORT = "__import__('importlib.util').util.find_spec('diffusion') is not None"


def check_workers(client) -> int:
    """A one-line error naming the workers of ``client`` (a ``distributed.Client``) that cannot
    import this project: such a worker dies unpickling its first chunk and the batch would wait for
    ever. Returns the number of workers."""
    found = client.run(eval, _CAN_IMPORT)
    missing = sorted(address for address, ok in found.items() if not ok)
    if missing:
        raise T2IError(f"{len(missing)} of {len(found)} Dask workers cannot import the project ({', '.join(missing)}): "
                       "install this package (pip install -e '.[cluster]') where every worker runs")
    return len(found)
