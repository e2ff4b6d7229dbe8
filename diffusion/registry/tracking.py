"""MLflow wiring: where runs go, and a ``TrainLogger`` that writes to an MLflow run.

The default store is a SQLite file in the project (``sqlite:///mlflow.db``) with artifacts in
``mlartifacts/`` beside it; ``MLFLOW_TRACKING_URI`` in the environment replaces the store (a
tracking server, for example) without any other change.
"""

from __future__ import annotations

import io
import os
from pathlib import Path

from PIL import Image

from diffusion.config import MlflowConfig


def tracking_uri(cfg: MlflowConfig) -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or cfg.tracking_uri


def setup(cfg: MlflowConfig) -> str:
    """Point MLflow at the store and experiment; returns the experiment id."""
    import mlflow

    uri = tracking_uri(cfg)
    mlflow.set_tracking_uri(uri)
    exp = mlflow.get_experiment_by_name(cfg.experiment)
    if exp is not None:
        experiment_id = exp.experiment_id
    else:
        artifact_location = None
        if uri.startswith("sqlite:///"):
            # keep artifacts next to the database, as an absolute URI any later process can open
            db = Path(uri.removeprefix("sqlite:///")).resolve()
            artifact_location = (db.parent / "mlartifacts").as_uri()
        experiment_id = mlflow.create_experiment(cfg.experiment, artifact_location=artifact_location)
    mlflow.set_experiment(experiment_id=experiment_id)  # runs started after this land in it
    return experiment_id


class MlflowLogger:
    """TrainLogger that logs metrics and images to the active MLflow run."""

    def __init__(self) -> None:
        import mlflow

        self.mlflow = mlflow
        self.history: dict[str, list[tuple[int, float]]] = {}

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        self.mlflow.log_metrics({k: float(v) for k, v in metrics.items()}, step=step)
        for k, v in metrics.items():
            self.history.setdefault(k, []).append((step, float(v)))

    def log_image(self, image: Image.Image, name: str) -> None:
        self.mlflow.log_image(image, name)

    def loss_curve(self) -> Image.Image | None:
        """The loss curve as a PNG image (matplotlib, no display needed): the training loss, and the
        validation loss where the run logged one."""
        points = self.history.get("loss")
        if not points:
            return None
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
        steps, values = zip(*points)
        ax.plot(steps, values, label="training loss (per batch)")
        if self.history.get("val_loss"):
            val_steps, val_values = zip(*self.history["val_loss"])
            ax.plot(val_steps, val_values, marker=".", label="val_loss (EMA, fixed val samples)")
            ax.legend()
        ax.set_xlabel("step")
        ax.set_ylabel("loss")
        ax.set_yscale("log")
        ax.grid(alpha=0.3)
        fig.tight_layout()
        buf = io.BytesIO()
        fig.savefig(buf, format="png")
        plt.close(fig)
        return Image.open(io.BytesIO(buf.getvalue()))


def flat_metrics(metrics: dict, prefix: str = "") -> dict[str, float]:
    """Nested metrics -> {'adherence.seen.all': 0.9, ...}, dropping NaNs and non-numbers."""
    out: dict[str, float] = {}
    for k, v in metrics.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flat_metrics(v, key + "."))
        elif isinstance(v, (int, float)) and v == v:
            out[key] = float(v)
    return out


def evaluation_metrics(metrics: dict) -> dict[str, float]:
    """The numbers of reports/metrics.json worth logging: adherence.*, judge.*, fd_judge.*,
    fidelity.*, image.{fid,kid,clip_score} and retrieval.{r_precision,fd,evaluator}.* (each absent
    where it does not apply)."""
    image = {k: v for k, v in (metrics.get("image") or {}).items() if k in ("fid", "kid", "clip_score")}
    retrieval = {k: v for k, v in (metrics.get("retrieval") or {}).items() if k in ("r_precision", "fd", "evaluator")}
    parts = {k: metrics.get(k) or {} for k in ("adherence", "judge", "fd_judge", "fidelity")}
    return flat_metrics({**parts, "image": image, "retrieval": retrieval})
