"""The MLflow model: prompts in, images out; logged as a pyfunc and registered as a new version.

The logged model is self-contained: the EMA denoiser weights and config, the text tower's weights
(so a seeded random default needs no regeneration), the sampler settings, and this package's code.
``mlflow.pyfunc.load_model("models:/t2i-shapes@champion").predict(pd.DataFrame({"prompt": [...]}))``
returns one row per prompt with the PNG bytes of the image.
"""

from __future__ import annotations

import io
import json
import shutil
import tempfile
from dataclasses import asdict
from pathlib import Path

import mlflow
import pandas as pd
from PIL import Image
from safetensors.torch import save_file

from diffusion.generate import SamplerSettings, encode_prompts, generate
from diffusion.text import TextEncoder, load_text_encoder
from diffusion.train import MODEL_CONFIG, MODEL_WEIGHTS, load_model

PACKAGE_DIR = Path(__file__).resolve().parent


class T2IModel(mlflow.pyfunc.PythonModel):
    """pyfunc: DataFrame(prompt[, seed, guidance_scale, steps]) -> DataFrame(prompt, seed, image)."""

    def load_context(self, context) -> None:
        a = context.artifacts
        spec = json.loads(Path(a["text_encoder_spec"]).read_text())
        self.encoder = load_text_encoder(spec["model"], pretrained=a["text_encoder"], layer=spec["layer"],
                                         fingerprint=spec["fingerprint"])
        self.denoiser, self.meta = load_model(Path(a["denoiser"]))
        self.settings = SamplerSettings(**json.loads(Path(a["sampler"]).read_text()))

    def predict(self, context, model_input: pd.DataFrame, params: dict | None = None) -> pd.DataFrame:
        if isinstance(model_input, dict):
            model_input = pd.DataFrame(model_input)
        prompts = [str(p) for p in model_input["prompt"]]
        seeds = [int(s) for s in model_input["seed"]] if "seed" in model_input else list(range(len(prompts)))
        settings = self.settings
        overrides = {k: v for k, v in (params or {}).items() if k in ("guidance_scale", "steps", "sampler", "eta")}
        if overrides:
            settings = SamplerSettings(**{**asdict(settings), **overrides})
        cond, uncond = encode_prompts(self.encoder, prompts)
        images = generate(self.denoiser, cond, uncond, seeds, self.meta["image_size"], settings)
        pngs = []
        for img in images:
            buf = io.BytesIO()
            Image.fromarray(img).save(buf, format="PNG")
            pngs.append(buf.getvalue())
        return pd.DataFrame({"prompt": prompts, "seed": seeds, "image": pngs})


def log_and_register(model_dir: str | Path, encoder: TextEncoder, settings: SamplerSettings, metrics: dict[str, float],
                     model_name: str, run_id: str | None = None) -> dict:
    """Log the pyfunc model to ``run_id`` (or a new run) and register it as a new version of
    ``model_name``, tagged with ``metrics``. Returns {name, version, uri, run_id}."""
    model_dir = Path(model_dir)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        (tmp / "denoiser").mkdir()
        for f in (MODEL_WEIGHTS, MODEL_CONFIG):
            shutil.copy(model_dir / f, tmp / "denoiser" / f)
        save_file({k: v.detach().cpu().contiguous() for k, v in encoder.model.state_dict().items()},
                  str(tmp / "text_encoder.safetensors"))
        (tmp / "text_encoder.json").write_text(json.dumps(
            {"model": encoder.fingerprint["model"], "layer": encoder.layer, "fingerprint": encoder.fingerprint}))
        (tmp / "sampler.json").write_text(json.dumps(asdict(settings)))
        artifacts = {"denoiser": str(tmp / "denoiser"), "text_encoder": str(tmp / "text_encoder.safetensors"),
                     "text_encoder_spec": str(tmp / "text_encoder.json"), "sampler": str(tmp / "sampler.json")}
        example = pd.DataFrame({"prompt": ["a large red circle on the left"], "seed": [0]})
        signature = mlflow.models.infer_signature(
            example, pd.DataFrame({"prompt": ["p"], "seed": [0], "image": [b"png"]}),
            params={"guidance_scale": settings.guidance_scale, "steps": settings.steps},
        )
        with mlflow.start_run(run_id=run_id) as run:
            info = mlflow.pyfunc.log_model(
                name="model", python_model=T2IModel(), artifacts=artifacts, code_paths=[str(PACKAGE_DIR)],
                signature=signature, pip_requirements=_requirements(),
            )
            mlflow.log_metrics(metrics)
            run_id = run.info.run_id
    version = mlflow.register_model(info.model_uri, model_name, tags={k: f"{v:.4f}" for k, v in metrics.items()})
    client = mlflow.MlflowClient()
    client.update_model_version(model_name, version.version, description=(
        f"text-to-image denoiser, {metrics.get('adherence.seen.all', float('nan')):.1%} all-correct on seen "
        f"combinations, {metrics.get('adherence.held_out.all', float('nan')):.1%} on held-out ones"))
    return {"name": model_name, "version": int(version.version), "uri": f"models:/{model_name}/{version.version}",
            "run_id": run_id}


def _requirements() -> list[str]:
    from importlib.metadata import version

    return [f"{pkg}=={version(pkg)}" for pkg in ("torch", "open_clip_torch", "safetensors", "pandas", "pillow",
                                                    "numpy", "pyarrow", "tqdm", "webdataset", "mlflow", "pyyaml")]
