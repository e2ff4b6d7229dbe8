"""Pipeline: each stage's entry point, and the scheduled batch generation.

Owns: ``stages`` (one function a stage: paths and params in, files out; what ``flows/``, the CLI
and ``dvc.yaml`` call), ``batch`` (a prompts file drawn by a registered model into a dated
folder, resumable) and ``batch_workers`` (its chunks drawn on worker processes, a Dask cluster).

May import: anything in ``diffusion``; nothing in ``diffusion`` imports it.
"""
