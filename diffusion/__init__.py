"""t2i-diffusion: the library behind the pipeline (no Prefect in here; see flows/ for that).

The layers, each importing only those before it (a test checks there is no cycle)::

    errors, config, artifacts    exceptions; params.yaml's dataclasses; file names and atomic I/O
    data                         ingest, shards, the built-in shapes, text embeddings, VAE latents
    models                       UNet, DiT, schedules, preconditioning, loss; build/save/load
    training | sampling          the training loop; the samplers and the one generate path
    evaluation                   the sample stage, the judge, metrics, the evaluation page, sweeps
    registry                     the MLflow model and bundle, promotion, lineage, tracking
    pipeline                     each stage's entry point (flows/, the CLI, dvc.yaml), batch generation
"""

__version__ = "0.1.0"
