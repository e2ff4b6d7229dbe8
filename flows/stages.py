"""One Prefect flow per pipeline stage, each a thin wrapper over ``diffusion.pipeline.stages``.

Without ``PREFECT_API_URL`` a flow runs in-process against a temporary local API; with it set, it
reports to that server. ``dvc.yaml`` runs these through the ``t2i`` CLI.
"""

from __future__ import annotations

import contextlib

from prefect import flow, task
from prefect.cache_policies import NO_CACHE
from prefect.task_runners import ProcessPoolTaskRunner, ThreadPoolTaskRunner

from diffusion.pipeline import stages
from diffusion.config import IngestConfig, Params
from diffusion.errors import ConfigError
from diffusion.data.ingest import process_unit


@task(name="ingest-unit", task_run_name="unit {unit.index}", cache_policy=NO_CACHE, persist_result=False)
def ingest_unit_task(spec, unit):
    """One work unit: read, fetch, decode, resize, encode (results go back to the committer)."""
    return process_unit(spec, unit)


@task(name="latents")
def latents_task(p: Params, shards_dir: str, out_dir: str) -> dict:
    return stages.latents(p, shards_dir, out_dir)


@task(name="embed")
def embed_task(p: Params, shards_dir: str, out_dir: str) -> dict:
    return stages.embed(p, shards_dir, out_dir)


@task(name="judge")
def judge_task(p: Params, shards_dir: str, out_dir: str, metrics_file: str,
               embeddings_dir: str | None = None) -> dict:
    return stages.judge(p, shards_dir, out_dir, metrics_file, embeddings_dir)


@task(name="train")
def train_task(p: Params, shards_dir: str, embeddings_dir: str, out_dir: str, latents_dir: str | None = None) -> dict:
    return stages.train(p, shards_dir, embeddings_dir, out_dir, latents_dir=latents_dir)


@task(name="sample")
def sample_task(p: Params, shards_dir: str, model_dir: str, out_dir: str) -> dict:
    return stages.sample(p, shards_dir, model_dir, out_dir)


@task(name="evaluate")
def evaluate_task(p: Params, samples_dir: str, judge_dir: str, model_dir: str, metrics_file: str,
                  shards_dir: str | None = None, report_file: str | None = None,
                  embeddings_dir: str | None = None) -> dict:
    return stages.evaluate(p, samples_dir, judge_dir, model_dir, metrics_file, shards_dir, report_file,
                           embeddings_dir)


@task(name="sweep")
def sweep_task(p: Params, shards_dir: str, model_dir: str, judge_dir: str, out_dir: str) -> dict:
    return stages.sweep(p, shards_dir, model_dir, judge_dir, out_dir)


@task(name="register", retries=2, retry_delay_seconds=[5, 30])  # a remote registry may blink
def register_task(p: Params, model_dir: str, metrics_file: str, out_file: str) -> dict:
    return stages.register(p, model_dir, metrics_file, out_file)


@flow(name="stage-ingest", log_prints=True)
def ingest_flow(p: Params, out_dir: str) -> dict:
    """Units run on this flow's task runner; the committer writes them in order in the flow."""
    stats = stages.ingest(p, out_dir, submit=lambda spec, unit: ingest_unit_task.submit(spec, unit))
    print(f"ingest: accepted {stats['accepted']}, rejected {stats['rejected_total']} {stats['rejected']}")
    return {k: stats[k] for k in ("accepted", "rejected_total", "rejected", "splits")}


def ingest_task_runner(cfg: IngestConfig):
    """The Prefect task runner params.ingest asks for: threads or processes, ``workers`` wide, or
    Dask (``task_runner: dask``): the scheduler at ``dask_address``, or with it null a LocalCluster
    of ``workers`` single-threaded worker processes on loopback, started and stopped with the run.

    Units are plain picklable tasks and the committer stays in the flow, so any runner gives the
    same shards. Dask workers must see the source (a shared path or URLs); results come back to
    the flow, which writes the shards.
    """
    if cfg.dask_address and cfg.task_runner != "dask":
        raise ConfigError(f"ingest.dask_address is set ({cfg.dask_address}) but ingest.task_runner is "
                          f"{cfg.task_runner}: set ingest.task_runner=dask, or dask_address back to null")
    if cfg.task_runner == "dask":
        try:
            from prefect_dask import DaskTaskRunner
        except ImportError as e:
            raise ConfigError(f"ingest.task_runner=dask needs prefect-dask ({e}): pip install -e '.[cluster]'") from None
        if cfg.dask_address:
            return DaskTaskRunner(address=cfg.dask_address)
        return DaskTaskRunner(cluster_class="distributed.LocalCluster",
                              cluster_kwargs={"n_workers": cfg.workers, "threads_per_worker": 1, "processes": True,
                                              "host": "127.0.0.1", "dashboard_address": None})
    if cfg.task_runner == "processes":
        return ProcessPoolTaskRunner(max_workers=cfg.workers)
    return ThreadPoolTaskRunner(max_workers=cfg.workers)


@contextlib.contextmanager
def _api_for_workers(cfg: IngestConfig):
    """Dask workers and pool processes run each unit's Prefect task engine in their own processes
    and report to the API named in the settings the task carries. Without PREFECT_API_URL the flow
    would talk to a temporary server that only its own process knows, and every worker would start
    another one (tens of seconds each, the task runs land there, and a killed worker leaves its
    server behind): start that temporary server here and name it, so the workers report to the
    flow's server. It listens on loopback, so a cluster on other hosts needs PREFECT_API_URL set
    to a server they can reach."""
    from prefect.settings import PREFECT_API_URL, PREFECT_SERVER_EPHEMERAL_ENABLED, temporary_settings

    if cfg.task_runner == "threads" or PREFECT_API_URL.value() or not PREFECT_SERVER_EPHEMERAL_ENABLED.value():
        yield
        return
    from prefect.server.api.server import SubprocessASGIServer

    server = SubprocessASGIServer()  # the one get_client would start; stopped at exit
    server.start()
    with temporary_settings({PREFECT_API_URL: server.api_url}):
        yield


def run_ingest_flow(p: Params, out_dir: str) -> dict:
    """ingest_flow on the task runner params.ingest asks for (``ingest_task_runner``)."""
    runner = ingest_task_runner(p.ingest)
    with _api_for_workers(p.ingest):
        return ingest_flow.with_options(task_runner=runner)(p, out_dir)


@flow(name="stage-latents", log_prints=True)
def latents_flow(p: Params, shards_dir: str, out_dir: str) -> dict:
    """Encode the shards' images with params.latents.vae (a no-op record while it is null)."""
    from diffusion.data.latents import summary_line

    result = latents_task(p, shards_dir, out_dir)
    print(summary_line(result))
    return {k: result[k] for k in ("enabled", "encoded", "kept", "seconds") if k in result}


@flow(name="stage-embed", log_prints=True)
def embed_flow(p: Params, shards_dir: str, out_dir: str) -> dict:
    return embed_task(p, shards_dir, out_dir)


@flow(name="stage-judge", log_prints=True)
def judge_flow(p: Params, shards_dir: str, out_dir: str, metrics_file: str,
               embeddings_dir: str | None = None) -> dict:
    return judge_task(p, shards_dir, out_dir, metrics_file, embeddings_dir)


@flow(name="stage-train", log_prints=True)
def train_stage_flow(p: Params, shards_dir: str, embeddings_dir: str, out_dir: str, latents_dir: str | None = None) -> dict:
    return train_task(p, shards_dir, embeddings_dir, out_dir, latents_dir)


@flow(name="stage-sample", log_prints=True)
def sample_flow(p: Params, shards_dir: str, model_dir: str, out_dir: str) -> dict:
    return sample_task(p, shards_dir, model_dir, out_dir)


@flow(name="stage-evaluate", log_prints=True)
def evaluate_flow(p: Params, samples_dir: str, judge_dir: str, model_dir: str, metrics_file: str,
                  shards_dir: str | None = None, report_file: str | None = None,
                  embeddings_dir: str | None = None) -> dict:
    return evaluate_task(p, samples_dir, judge_dir, model_dir, metrics_file, shards_dir, report_file,
                         embeddings_dir)


@flow(name="stage-register", log_prints=True)
def register_flow(p: Params, model_dir: str, metrics_file: str, out_file: str) -> dict:
    return register_task(p, model_dir, metrics_file, out_file)


@flow(name="stage-sweep", log_prints=True)
def sweep_flow(p: Params, shards_dir: str, model_dir: str, judge_dir: str, out_dir: str) -> dict:
    result = sweep_task(p, shards_dir, model_dir, judge_dir, out_dir)
    best = result["recommended"]
    if best:
        print(f"sweep: recommended {best['sampler']} at {best['steps']} steps ({best['spacing']}): "
              f"all-correct {best['all']:.1%}, FD-judge {best['fd_judge']:.3g}, {best['seconds_per_image']:.4f} s/image")
    print(f"sweep: {result['points']} sampler points, {result['guidance']} guidance points -> {result['page']}")
    return result
