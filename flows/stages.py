"""One Prefect flow per pipeline stage, each a thin wrapper over ``diffusion.stages``.

Without ``PREFECT_API_URL`` a flow runs in-process against a temporary local API; with it set, it
reports to that server. ``dvc.yaml`` runs these through the ``t2i`` CLI.
"""

from __future__ import annotations

from prefect import flow, task

from diffusion import stages
from diffusion.config import Params


@task(name="ingest")
def ingest_task(p: Params, out_dir: str) -> dict:
    return stages.ingest(p, out_dir)


@task(name="embed")
def embed_task(p: Params, shards_dir: str, out_dir: str) -> dict:
    return stages.embed(p, shards_dir, out_dir)


@task(name="judge")
def judge_task(p: Params, shards_dir: str, out_dir: str, metrics_file: str) -> dict:
    return stages.judge(p, shards_dir, out_dir, metrics_file)


@task(name="train")
def train_task(p: Params, shards_dir: str, embeddings_dir: str, out_dir: str) -> dict:
    return stages.train(p, shards_dir, embeddings_dir, out_dir)


@task(name="sample")
def sample_task(p: Params, model_dir: str, out_dir: str) -> dict:
    return stages.sample(p, model_dir, out_dir)


@task(name="evaluate")
def evaluate_task(p: Params, samples_dir: str, judge_dir: str, model_dir: str, metrics_file: str) -> dict:
    return stages.evaluate(p, samples_dir, judge_dir, model_dir, metrics_file)


@task(name="register", retries=2, retry_delay_seconds=[5, 30])  # a remote registry may blink
def register_task(p: Params, model_dir: str, metrics_file: str, out_file: str) -> dict:
    return stages.register(p, model_dir, metrics_file, out_file)


@flow(name="stage-ingest", log_prints=True)
def ingest_flow(p: Params, out_dir: str) -> dict:
    return ingest_task(p, out_dir)


@flow(name="stage-embed", log_prints=True)
def embed_flow(p: Params, shards_dir: str, out_dir: str) -> dict:
    return embed_task(p, shards_dir, out_dir)


@flow(name="stage-judge", log_prints=True)
def judge_flow(p: Params, shards_dir: str, out_dir: str, metrics_file: str) -> dict:
    return judge_task(p, shards_dir, out_dir, metrics_file)


@flow(name="stage-train", log_prints=True)
def train_stage_flow(p: Params, shards_dir: str, embeddings_dir: str, out_dir: str) -> dict:
    return train_task(p, shards_dir, embeddings_dir, out_dir)


@flow(name="stage-sample", log_prints=True)
def sample_flow(p: Params, model_dir: str, out_dir: str) -> dict:
    return sample_task(p, model_dir, out_dir)


@flow(name="stage-evaluate", log_prints=True)
def evaluate_flow(p: Params, samples_dir: str, judge_dir: str, model_dir: str, metrics_file: str) -> dict:
    return evaluate_task(p, samples_dir, judge_dir, model_dir, metrics_file)


@flow(name="stage-register", log_prints=True)
def register_flow(p: Params, model_dir: str, metrics_file: str, out_file: str) -> dict:
    return register_task(p, model_dir, metrics_file, out_file)
