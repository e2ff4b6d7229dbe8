"""``batch-generation``: draw a prompts file with a registered model (by default ``@champion``).

Deployed as ``batch-generation/nightly`` with a cron schedule (prefect.yaml); ``t2i generate`` runs
the same flow in-process. A retried or rerun flow run with the same run name resumes its batch.
With ``batch.task_runner: dask`` the chunks run as ``batch-chunk`` task runs on Dask workers (the
ingest's DaskTaskRunner: a LocalCluster of ``batch.workers``, or the scheduler at
``batch.dask_address``), in a ``batch-generation-workers`` subflow; this process commits them.
"""

from __future__ import annotations

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.runtime import flow_run

from diffusion.registry import tracking
from diffusion.pipeline.batch import run_batch
from diffusion.pipeline.batch_workers import check_scheduler, check_workers, render_on_worker, worker_engine
from diffusion.config import Params, load_params
from diffusion.errors import T2IError


def _retry_unless_user_error(task, task_run, state) -> bool:
    """Retry a crash (a killed worker, a blinking registry), not a problem the user must fix."""
    try:
        state.result()
    except T2IError:
        return False
    except Exception:  # noqa: BLE001
        return True
    return False


@task(name="generate-batch", cache_policy=NO_CACHE, retries=1, retry_delay_seconds=5,
      retry_condition_fn=_retry_unless_user_error)
def generate_task(prompts: str, model_uri: str, output_dir: str, run_name: str, date: str | None,
                  p: Params, overrides: dict) -> dict:
    if model_uri.startswith("models:/"):
        import mlflow

        mlflow.set_tracking_uri(tracking.tracking_uri(p.mlflow))
    logger = get_run_logger()
    return run_batch(prompts, model_uri, output_dir, run_name, date=date, cfg=p.batch, params=p,
                     overrides=overrides, log=logger.info)


@task(name="batch-chunk", task_run_name="chunk {chunk[0][index]}", cache_policy=NO_CACHE, persist_result=False,
      retries=1, retry_delay_seconds=2, retry_condition_fn=_retry_unless_user_error)
def chunk_task(ref, chunk: list[dict], size: int) -> list:
    """One chunk, drawn on a worker with its kept copy of the model; PNG bytes go back to the flow."""
    return render_on_worker(ref, chunk, size)


@flow(name="batch-generation-workers", log_prints=True)
def batch_on_workers_flow(prompts: str, model_uri: str, output_dir: str, run_name: str, date: str | None,
                          p: Params, overrides: dict) -> dict:
    """The batch with its chunks on this flow's task runner (Dask); the committer stays here."""
    uri = tracking.tracking_uri(p.mlflow) if model_uri.startswith("models:/") else None
    if uri:
        import mlflow

        mlflow.set_tracking_uri(uri)
    from prefect.context import FlowRunContext

    # a worker without the project would die on its first chunk and the batch wait for ever: fail here, in one line
    check_workers(FlowRunContext.get().task_runner.client)
    engine = worker_engine(lambda ref, chunk, size: chunk_task.submit(ref, chunk, size), p.batch.device, p, uri)
    return run_batch(prompts, model_uri, output_dir, run_name, date=date, cfg=p.batch, params=p,
                     overrides=overrides, log=get_run_logger().info, progress=False, engine=engine)


def _on_workers(prompts: str, model_uri: str, output_dir: str, run_name: str, date: str | None, p: Params,
                overrides: dict) -> dict:
    """batch_on_workers_flow on the ingest's Dask task runner, made from params.batch."""
    from flows.stages import _api_for_workers, ingest_task_runner

    if p.batch.dask_address:
        check_scheduler(p.batch.dask_address)
    runner = ingest_task_runner(p.batch)  # the same engine and settings as the ingest's
    with _api_for_workers(p.batch):
        return batch_on_workers_flow.with_options(task_runner=runner)(prompts, model_uri, output_dir, run_name,
                                                                       date, p, overrides)


@flow(name="batch-generation", log_prints=True)
def batch_generation_flow(prompts: str, model_uri: str | None = None, output_dir: str | None = None,
                          run_name: str | None = None, date: str | None = None, params_file: str = "params.yaml",
                          guidance_scale: float | None = None, steps: int | None = None,
                          sampler: str | None = None, params_overrides: list[str] | None = None,
                          task_runner: str | None = None, workers: int | None = None,
                          width: int | None = None, height: int | None = None) -> dict:
    """Generate one image per prompt into ``<output_dir>/<date>/<run_name>/``.

    ``model_uri`` and ``output_dir`` default to params ``batch``; ``run_name`` to this flow run's
    name (so a retry resumes); ``date`` to today (UTC). ``guidance_scale``/``steps``/``sampler``
    override the model's registered settings for rows that do not set their own;
    ``params_overrides`` are ``section.key=value`` strings, as ``t2i -s`` takes them;
    ``task_runner`` (local | dask) and ``workers`` override ``batch.task_runner`` and ``batch.workers``;
    ``width`` and ``height``: the size of rows that give none, one of the model's aspect buckets.
    """
    extra = [f"batch.{k}={v}" for k, v in (("task_runner", task_runner), ("workers", workers)) if v is not None]
    p = load_params(params_file, [*(params_overrides or []), *extra])
    name = run_name or flow_run.get_name() or "batch"
    overrides = {"guidance_scale": guidance_scale, "steps": steps, "sampler": sampler, "width": width,
                 "height": height}
    model_uri, output_dir = model_uri or p.batch.model_uri, output_dir or p.batch.output_dir
    if p.batch.task_runner == "dask":
        return _on_workers(prompts, model_uri, output_dir, name, date, p, overrides)
    return generate_task(prompts, model_uri, output_dir, name, date, p, overrides)
