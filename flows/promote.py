"""``promote-model``: apply the promotion policy (params ``promote``) to a registered version.

``train-flow`` ends with it (through the pipeline's ``promote`` stage); ``t2i promote`` runs it
in-process for any version.
"""

from __future__ import annotations

from prefect import flow, task

from diffusion.pipeline import stages
from diffusion.config import Params


@task(name="promote", retries=2, retry_delay_seconds=[5, 30])  # a remote registry may blink
def promote_task(p: Params, registered_file: str | None, out_file: str | None, version: int | None,
                 model_name: str | None) -> dict:
    return stages.promote(p, registered_file, out_file, version, model_name)


@flow(name="promote-model", log_prints=True)
def promote_model_flow(p: Params, registered_file: str | None = None, out_file: str | None = None,
                       version: int | None = None, model_name: str | None = None) -> dict:
    result = promote_task(p, registered_file, out_file, version, model_name)
    print(f"promotion: {result['outcome']}: {result['reason']}")
    return result
