"""t2i-diffusion: the library behind the pipeline (no Prefect in here; see flows/ for that)."""

__version__ = "0.1.0"
