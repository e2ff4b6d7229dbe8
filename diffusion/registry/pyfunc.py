"""The MLflow model: prompts in, images out; logged as a pyfunc and registered as a new version.

The logged model is self-contained (``artifacts.write_bundle``): the EMA denoiser weights and
config, the text tower's weights (so a seeded random default needs no regeneration), the sampler
settings, the evaluation it was registered with, and this package's code.
``mlflow.pyfunc.load_model("models:/t2i-shapes@champion").predict(pd.DataFrame({"prompt": [...]}))``
returns one row per prompt with the PNG bytes of the image; ``mlflow models serve`` answers the
same rows as JSON, the image base64-encoded.

What users type (``models:/name@alias``, ``models:/name/3``, ``name``) is resolved into a registry
version by ``diffusion.registry.versions``.
"""

from __future__ import annotations

import io
import tempfile
from dataclasses import replace
from pathlib import Path

import mlflow
import pandas as pd
from PIL import Image

from diffusion import threads
from diffusion.registry.bundle import load_bundle, write_bundle
from diffusion.config import SampleConfig, sampler_problems
from diffusion.errors import T2IError
from diffusion.sampling.generate import encode_prompts, generate
from diffusion.registry.lineage import EVAL_TAG

PACKAGE_DIR = Path(__file__).resolve().parents[1]  # the whole diffusion package goes into the bundle
OVERRIDABLE = ("guidance_scale", "steps", "sampler", "spacing", "eta")


class T2IModel(mlflow.pyfunc.PythonModel):
    """pyfunc: DataFrame(prompt[, seed, negative_prompt]) -> DataFrame(prompt, seed, image).

    ``params`` (guidance_scale, steps, sampler, spacing, eta) override the registered sampler settings;
    ``width`` and ``height`` pick one of the model's aspect buckets (default: its square image_size).
    """

    def load_context(self, context) -> None:
        # serving workers and load_model users share the machine too (diffusion.threads): torch threads
        # from the usable CPUs; OMP_WAIT_POLICY only acts where it was set before torch was imported
        threads.apply()
        self.denoiser, self.meta, self.encoder, self.settings = load_bundle(context.artifacts)

    def predict(self, context, model_input: pd.DataFrame, params: dict | None = None) -> pd.DataFrame:
        if isinstance(model_input, dict):
            model_input = pd.DataFrame(model_input)
        if "prompt" not in model_input:
            raise T2IError("the model input needs a 'prompt' column")
        prompts = [str(p) for p in model_input["prompt"]]
        seeds = [int(s) for s in model_input["seed"]] if "seed" in model_input else list(range(len(prompts)))
        negatives = ([("" if n is None or n != n else str(n)) for n in model_input["negative_prompt"]]
                     if "negative_prompt" in model_input else None)
        settings = self._settings(params)
        cond, uncond = encode_prompts(self.encoder, prompts, negatives=negatives)
        images = generate(self.denoiser, cond, uncond, seeds, self._size(params), settings)
        return pd.DataFrame({"prompt": prompts, "seed": seeds, "image": [png_bytes(img) for img in images]})

    def _size(self, params: dict | None) -> int | tuple[int, int]:
        """The image size ``params`` ask for (width and height: one of the model's buckets), else the
        square image_size; a size it was not trained on is an INVALID_PARAMETER_VALUE error."""
        from mlflow.exceptions import MlflowException
        from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE

        from diffusion.data.buckets import requested_size

        params = params or {}
        try:
            size = requested_size(self.meta, params.get("width"), params.get("height"))
        except T2IError as e:
            raise MlflowException(f"bad params: {e}", error_code=INVALID_PARAMETER_VALUE) from None
        return self.meta["image_size"] if size is None else size

    def _settings(self, params: dict | None) -> SampleConfig:
        """The registered sampler settings with ``params`` applied; a bad value is an
        INVALID_PARAMETER_VALUE error (HTTP 400 with this message when served), not a silent
        fallback (an unknown sampler would otherwise sample as DDIM) or a bare stack trace."""
        from mlflow.exceptions import MlflowException
        from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE

        overrides = {k: v for k, v in (params or {}).items() if k in OVERRIDABLE and v is not None}
        if not overrides:
            return self.settings
        s = replace(self.settings, **overrides)
        problems = sampler_problems(s, len(self.denoiser.sigmas))
        if problems:
            raise MlflowException("bad params: " + "; ".join(problems), error_code=INVALID_PARAMETER_VALUE)
        return s


def png_bytes(image) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return buf.getvalue()


def log_and_register(model_dir: str | Path, encoder, settings: SampleConfig, metrics: dict[str, float],
                     model_name: str, run_id: str | None = None, *, evaluation: dict | None = None,
                     lineage: dict[str, str] | None = None, vae=None, merge_lora: bool = False) -> dict:
    """Log the pyfunc model to ``run_id`` (or a new run) and register it as a new version of
    ``model_name``, tagged with ``metrics`` and ``lineage``; a latent model's ``vae`` goes into the
    bundle; ``merge_lora``: a LoRA model is registered as its merged weights (``write_bundle``).
    Returns {name, version, uri, run_id}."""
    evaluation = evaluation or {}
    with tempfile.TemporaryDirectory() as tmp:
        artifacts = write_bundle(tmp, model_dir, encoder, settings, {"fingerprint": evaluation, "metrics": metrics},
                                 vae=vae, merge_lora=merge_lora)
        signature = model_signature(settings)
        with mlflow.start_run(run_id=run_id) as run:
            info = mlflow.pyfunc.log_model(
                name="model", python_model=T2IModel(), artifacts=artifacts, code_paths=[str(PACKAGE_DIR)],
                signature=signature, pip_requirements=_requirements(vae is not None or _diffusers_unet(artifacts)),
                input_example=None,
            )
            mlflow.log_metrics(metrics)
            run_id = run.info.run_id
    tags = {k: f"{v:.4f}" for k, v in metrics.items()}
    tags.update(lineage or {})
    if evaluation.get("id"):
        tags[EVAL_TAG] = evaluation["id"]
    version = mlflow.register_model(info.model_uri, model_name, tags=tags)
    client = mlflow.MlflowClient()
    client.update_model_version(model_name, version.version, description=(
        f"text-to-image denoiser, {metrics.get('adherence.seen.all', float('nan')):.1%} all-correct on seen "
        f"combinations, {metrics.get('adherence.held_out.all', float('nan')):.1%} on held-out ones"))
    return {"name": model_name, "version": int(version.version), "uri": f"models:/{model_name}/{version.version}",
            "run_id": run_id}


def model_signature(settings: SampleConfig):
    """prompt (required), seed and negative_prompt (optional) in; prompt, seed, PNG bytes out.

    Written out rather than inferred from an example: an inferred schema makes every example
    column required and drops (with only a server-log warning) any column it has not seen, so a
    served ``negative_prompt`` would be silently ignored. The params' defaults are the registered
    sampler settings (an override equal to them changes nothing)."""
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema

    return ModelSignature(
        inputs=Schema([ColSpec("string", "prompt"), ColSpec("long", "seed", required=False),
                       ColSpec("string", "negative_prompt", required=False)]),
        outputs=Schema([ColSpec("string", "prompt"), ColSpec("long", "seed"), ColSpec("binary", "image")]),
        params=ParamSchema([ParamSpec("guidance_scale", "double", float(settings.guidance_scale)),
                            ParamSpec("steps", "long", int(settings.steps)),
                            ParamSpec("sampler", "string", str(settings.sampler)),
                            ParamSpec("spacing", "string", str(settings.spacing)),
                            # null: the sampler's own default (so overriding the sampler alone works)
                            ParamSpec("eta", "double", settings.eta),
                            # an aspect bucket of the model (model.json buckets); null: its square image_size
                            ParamSpec("width", "long", None), ParamSpec("height", "long", None)]),
    )


def _diffusers_unet(artifacts: dict[str, str]) -> bool:
    """Whether the bundle's denoiser is a diffusers UNet (train.denoiser diffusers), which needs diffusers."""
    import json

    from diffusion.artifacts import MODEL_CONFIG

    return "diffusers_unet" in json.loads((Path(artifacts["denoiser"]) / MODEL_CONFIG).read_text())


def _requirements(latent: bool = False) -> list[str]:
    from importlib.metadata import version

    pkgs = ["torch", "open_clip_torch", "safetensors", "pandas", "pillow", "numpy", "pyarrow", "tqdm", "webdataset",
            "mlflow", "pyyaml"]
    if latent:
        pkgs.append("diffusers")
    return [f"{pkg}=={version(pkg)}" for pkg in pkgs]
