"""`t2i serve`: a registered model over HTTP, concurrent requests batched into one sampler call.

The HTTP face only: ``diffusion.registry.serving.Batcher`` queues, batches and draws. The routes
are ``mlflow models serve``'s, so clients do not change: POST /invocations (the same JSON body and
``{"predictions": [{prompt, seed, image: base64 PNG}]}`` answer), GET /ping and /health (200 once the model is loaded;
/health's body counts sampler calls and images drawn). A bad
request is HTTP 400 (413 for more records than ``serve.max_batch``) with a one-line ``message``.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json

from diffusion.config import MlflowConfig, ServeConfig
from diffusion.registry.serving import BadRequest, Batcher, parse_request


def load_batcher(cfg: ServeConfig, mlflow_cfg: MlflowConfig) -> Batcher:
    """The registered model of ``cfg.model_uri``, loaded once, behind a batching queue."""
    import mlflow

    from diffusion.registry import tracking
    from diffusion.registry.versions import parse_model_uri, resolve_version

    mlflow.set_tracking_uri(tracking.tracking_uri(mlflow_cfg))
    version = resolve_version(parse_model_uri(cfg.model_uri))  # one-line errors for a wrong name or alias
    model = mlflow.pyfunc.load_model(f"models:/{version.name}/{version.version}").unwrap_python_model()
    print(f"t2i serve: {version.name} version {version.version} ({cfg.model_uri}), max_batch {cfg.max_batch}, "
          f"max_wait_ms {cfg.max_wait_ms:g}, fixed_shape {cfg.fixed_shape}", flush=True)
    return Batcher(model, cfg.max_batch, cfg.max_wait_ms, cfg.fixed_shape)


def _error(status: int, message: str, code: str = "BAD_REQUEST"):
    from starlette.responses import JSONResponse

    return JSONResponse({"error_code": code, "message": message}, status_code=status)


def make_app(batcher: Batcher):
    """The Starlette app: /invocations, /ping, /health."""
    from starlette.applications import Starlette
    from starlette.responses import JSONResponse, PlainTextResponse
    from starlette.routing import Route

    async def ping(request):
        return PlainTextResponse("\n")

    async def health(request):  # 200 as mlflow's; the body says how the batching goes
        return JSONResponse({"status": "ok", "sampler_calls": batcher.calls, "images": batcher.images})

    async def invocations(request):
        try:
            records, params = parse_request(json.loads(await request.body() or b"null"))
            future = batcher.submit(records, params)
        except json.JSONDecodeError as e:
            return _error(400, f"the body is not JSON: {e}")
        except BadRequest as e:
            return _error(e.status, str(e))
        try:
            rows = await asyncio.wrap_future(future)
        except Exception as e:  # noqa: BLE001 (a failed sampler call: one line to the client, not a trace)
            return _error(500, f"{type(e).__name__}: {e}".splitlines()[0], "INTERNAL_ERROR")
        return JSONResponse({"predictions": [{**r, "image": base64.b64encode(r["image"]).decode()} for r in rows]})

    @contextlib.asynccontextmanager
    async def lifespan(app):
        yield
        batcher.close()  # the requests in flight are answered first (uvicorn's graceful shutdown)

    return Starlette(routes=[Route("/ping", ping), Route("/health", health),
                             Route("/invocations", invocations, methods=["POST"])], lifespan=lifespan)


def serve(cfg: ServeConfig, mlflow_cfg: MlflowConfig) -> None:
    """Load the model, then answer on ``cfg.host:cfg.port`` until SIGTERM or Ctrl-C."""
    import uvicorn

    app = make_app(load_batcher(cfg, mlflow_cfg))
    uvicorn.run(app, host=cfg.host, port=cfg.port, log_level="warning", timeout_graceful_shutdown=30)
