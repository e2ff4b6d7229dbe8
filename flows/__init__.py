"""Prefect flows: thin wrappers over diffusion.stages (orchestration, retries, logging only)."""
