"""Prefect flows: thin wrappers over diffusion.pipeline.stages (orchestration, retries, logging only)."""
