"""``batch-generation``: draw a prompts file with a registered model (by default ``@champion``).

Deployed as ``batch-generation/nightly`` with a cron schedule (prefect.yaml); ``t2i generate`` runs
the same flow in-process. A retried or rerun flow run with the same run name resumes its batch.
"""

from __future__ import annotations

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.runtime import flow_run

from diffusion.registry import tracking
from diffusion.pipeline.batch import run_batch
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


@flow(name="batch-generation", log_prints=True)
def batch_generation_flow(prompts: str, model_uri: str | None = None, output_dir: str | None = None,
                          run_name: str | None = None, date: str | None = None, params_file: str = "params.yaml",
                          guidance_scale: float | None = None, steps: int | None = None,
                          sampler: str | None = None, params_overrides: list[str] | None = None) -> dict:
    """Generate one image per prompt into ``<output_dir>/<date>/<run_name>/``.

    ``model_uri`` and ``output_dir`` default to params ``batch``; ``run_name`` to this flow run's
    name (so a retry resumes); ``date`` to today (UTC). ``guidance_scale``/``steps``/``sampler``
    override the model's registered settings for rows that do not set their own;
    ``params_overrides`` are ``section.key=value`` strings, as ``t2i -s`` takes them.
    """
    p = load_params(params_file, params_overrides)
    name = run_name or flow_run.get_name() or "batch"
    overrides = {"guidance_scale": guidance_scale, "steps": steps, "sampler": sampler}
    return generate_task(prompts, model_uri or p.batch.model_uri, output_dir or p.batch.output_dir, name, date,
                         p, overrides)
