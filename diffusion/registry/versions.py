"""Registered versions: what users type (``models:/name@alias``, ``models:/name/3``, ``name``)
resolved into a registry version, with one-line errors for the usual mistakes, and a version's
denoiser fetched to a local folder (``train.init_from``).

Imports MLflow and nothing of the package's heavier modules, so the train stage can resolve a
parent without the pyfunc model's code among its dependencies.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import mlflow

from diffusion.artifacts import BUNDLE_DENOISER, require_model
from diffusion.errors import T2IError


@dataclass(frozen=True)
class ModelRef:
    name: str
    version: str | None = None  # a number
    alias: str | None = None

    @property
    def uri(self) -> str:
        return f"models:/{self.name}@{self.alias}" if self.alias else f"models:/{self.name}/{self.version}"


def parse_model_uri(uri: str, default_alias: str = "champion") -> ModelRef:
    """``models:/name@alias``, ``models:/name/3``, ``models:/name`` (the default alias), ``name@alias``."""
    body = uri.removeprefix("models:/").strip("/")
    m = re.fullmatch(r"([^/@]+)(?:@([\w-]+)|/(\d+))?", body)
    if not m:
        raise T2IError(f"not a model URI: {uri!r} (expected models:/<name>@<alias> or models:/<name>/<version>)")
    name, alias, version = m.groups()
    return ModelRef(name, version, alias if alias or version else default_alias)


def resolve_version(ref: ModelRef, client=None):
    """The registry's ModelVersion for ``ref``; one-line errors for an unknown name, version or alias."""
    from mlflow.exceptions import MlflowException

    client = client or mlflow.MlflowClient()
    model = registered_model(client, ref.name)
    if ref.alias:
        if ref.alias not in (model.aliases or {}):
            have = ", ".join(f"@{a} -> v{v}" for a, v in sorted((model.aliases or {}).items())) or "no aliases"
            hint = " (promote a version first: t2i promote)" if ref.alias == "champion" else ""
            raise T2IError(f"model {ref.name!r} has no @{ref.alias} yet ({have}){hint}")
        return client.get_model_version(ref.name, model.aliases[ref.alias])
    try:
        return client.get_model_version(ref.name, ref.version)
    except MlflowException:
        versions = sorted(int(v.version) for v in client.search_model_versions(f"name='{ref.name}'"))
        raise T2IError(f"model {ref.name!r} has no version {ref.version} "
                       f"(versions: {', '.join(map(str, versions)) or 'none'})") from None


def registered_model(client, name: str):
    """The registry's RegisteredModel ``name``; one line naming the ones there are if it is unknown."""
    from mlflow.exceptions import MlflowException

    try:
        return client.get_registered_model(name)
    except MlflowException:
        known = sorted(m.name for m in client.search_registered_models())
        raise T2IError(f"no registered model named {name!r} in {client.tracking_uri} "
                       f"(registered: {', '.join(known) or 'none'}; run the pipeline first)") from None


def fetch_denoiser(uri: str, default_alias: str = "champion") -> tuple[str, Path]:
    """(``models:/<name>/<version>``, the local folder of its denoiser: model.safetensors and
    model.json, the EMA weights it was registered with) for the version ``uri`` names; an alias
    is resolved once, so the answer names the version actually read."""
    mv = resolve_version(parse_model_uri(uri, default_alias))
    root = Path(mlflow.artifacts.download_artifacts(f"models:/{mv.name}/{mv.version}"))
    return f"models:/{mv.name}/{mv.version}", require_model(root / "artifacts" / BUNDLE_DENOISER)
