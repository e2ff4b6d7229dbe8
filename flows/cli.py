"""``t2i``: the command line. Each stage command runs that stage's Prefect flow; dvc.yaml calls them.

    t2i ingest   --out DIR [--source folder --input PATH]
    t2i latents  --shards DIR --out DIR          encode the images with latents.vae (off while null)
    t2i embed    --shards DIR --out DIR
    t2i judge    --shards DIR --out DIR --metrics FILE [--embeddings DIR]
    t2i train    --shards DIR --embeddings DIR --out DIR [--latents DIR]
    t2i sample   --shards DIR --model DIR --out DIR
    t2i evaluate --samples DIR --judge DIR --model DIR --metrics FILE [--shards DIR --embeddings DIR
                 --report FILE --plots FILE]
    t2i sweep    --shards DIR --model DIR --judge DIR --out DIR   quality against cost (samplers, steps, guidance)
    t2i register --model DIR --metrics FILE --out FILE
    t2i export-diffusers --model DIR --out DIR  a train.denoiser diffusers model as a diffusers UNet folder
    t2i promote  [--registered FILE --out FILE | --version N] [--model-name NAME]
    t2i pipeline [--stage S ...] [--force]     the whole pipeline (train-flow) via dvc repro
    t2i summary                                 where the outputs are, how to open the UIs

    t2i generate --prompts FILE [--model URI|DIR] [--output-dir DIR] [--run-name NAME] [--date YYYY-MM-DD]
    t2i rollback [--model-name NAME]           move @champion back to the previous champion
    t2i lineage  [URI]                          git commit, data hashes, params, evaluation of a version
    t2i serve    [--model URI] [--port N]       HTTP like mlflow models serve, concurrent requests batched

    t2i params   [SECTION] [--markdown]         every params.yaml key: type, default, meaning

Every command but ``params`` takes ``--params params.yaml`` and ``-s section.key=value`` overrides.
Problems the user can fix (a params key, a missing input, an unknown model) print one line and exit with 2.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import sys
from typing import Callable

from diffusion import threads
from diffusion.config import CHOICES
from diffusion.errors import T2IError
from flows.project import OPTIONAL_STAGES, STAGES



def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="t2i", description="Text-to-image diffusion pipeline")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--params", default="params.yaml", help="params file (default: params.yaml)")
    common.add_argument("-s", "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a param, e.g. -s train.steps=100 (repeatable)")
    sub = ap.add_subparsers(dest="command", required=True)

    def add(name: str, help: str, *required: str):
        p = sub.add_parser(name, parents=[common], help=help)
        for a in required:
            p.add_argument(f"--{a}", required=True)
        return p

    p = add("ingest", "write a source (built-in, folder, table, webdataset, urls) as WebDataset shards", "out")
    p.add_argument("--source", choices=["builtin", "folder", "table", "webdataset", "urls"],
                   help="overrides ingest.source")
    p.add_argument("--input", help="overrides ingest.path: folder, table file, shard URLs or URL list")
    add("latents", "encode every image once with the autoencoder of latents.vae (off while it is null)",
        "shards", "out")
    add("embed", "precompute caption embeddings with the open_clip text tower", "shards", "out")
    p = add("judge", "train the evaluators: the judge (built-in set) and the retrieval evaluator (any data)",
            "shards", "out", "metrics")
    p.add_argument("--embeddings", help="the embed stage's folder: also train the retrieval evaluator "
                                        "(R-precision and FD on any data)")
    p = add("train", "train the denoiser", "shards", "embeddings", "out")
    p.add_argument("--latents", help="the latents stage's folder: train on its latents when latents.vae is set")
    add("sample", "generate the evaluation images", "shards", "model", "out")
    p = add("evaluate", "score generated images (judge, retrieval evaluator, fidelity, FID/KID/CLIP)", "samples", "judge", "model", "metrics")
    p.add_argument("--plots", help="also write the adherence table (CSV) for dvc plots")
    p.add_argument("--shards", help="real validation images for FD-judge, fidelity and FID/KID (default: none)")
    p.add_argument("--report", help="also write the readable evaluation page (markdown) here")
    p.add_argument("--embeddings", help="the embed stage's folder: with --shards, the retrieval metrics "
                                        "(where the judge stage trained the retrieval evaluator)")
    add("sweep", "quality against cost: every sampler and step count, then guidance scales",
        "shards", "model", "judge", "out")
    add("register", "log the model to MLflow and register a new version", "model", "metrics", "out")
    add("export-diffusers", "write a train.denoiser diffusers model (its EMA weights) as a diffusers UNet "
        "folder (UNet2DConditionModel.from_pretrained)", "model", "out")
    _add_registry_commands(add)
    p = sub.add_parser("pipeline", parents=[common], help="run the whole pipeline (train-flow, dvc repro)")
    p.add_argument("--stage", action="append", dest="stages", choices=STAGES + OPTIONAL_STAGES,
                   help="only this stage (repeatable)")
    p.add_argument("--force", action="store_true", help="rerun even if DVC finds nothing changed")
    sub.add_parser("summary", parents=[common], help="where the outputs are and how to open the UIs")
    p = sub.add_parser("params", help="every params.yaml key with its type, default and meaning")
    p.add_argument("section", nargs="?", help="only this section and the ones inside it, e.g. train")
    p.add_argument("--markdown", action="store_true", help="the docs page (docs/configuration.md)")
    return ap


def _add_registry_commands(add: Callable) -> None:
    """promote, rollback, lineage and generate: the commands that work on registered versions."""
    p = add("promote", "apply the promotion policy: move @champion to a version if it wins")
    p.add_argument("--registered", help="the register stage's record (the pipeline's candidate)")
    p.add_argument("--out", help="write the decision here (JSON)")
    p.add_argument("--version", type=int, help="the candidate version (default: the newest)")
    p.add_argument("--model-name", help="registered model (default: params register.model_name)")
    p = add("rollback", "move @champion back to the version that held it before")
    p.add_argument("--model-name", help="registered model (default: params register.model_name)")
    p = add("lineage", "print where a registered version came from")
    p.add_argument("model", nargs="?", help="models:/<name>@<alias> or models:/<name>/<version> "
                                            "(default: params batch.model_uri)")
    p.add_argument("--json", action="store_true", help="print JSON")
    p = add("generate", "batch generation: one image per prompt of a file, from a registered model")
    p.add_argument("--prompts", required=True, help="a .txt (one prompt a line), .csv, .jsonl or .parquet file")
    p.add_argument("--model", help="models:/<name>@champion (default: params batch.model_uri), "
                                   "models:/<name>/<version>, or a local model folder")
    p.add_argument("--output-dir", help="default: params batch.output_dir")
    p.add_argument("--run-name", default="manual", help="batch folder name under the date (default: manual); "
                                                        "rerun with the same name to resume")
    p.add_argument("--date", help="YYYY-MM-DD folder (default: today, UTC)")
    p.add_argument("--guidance-scale", type=float, help="override the model's guidance scale")
    p.add_argument("--steps", type=int, help="override the model's sampling steps")
    p.add_argument("--sampler", choices=CHOICES["sample.sampler"], help="override the model's sampler")
    p.add_argument("--width", type=int, help="image width, with --height: one of the model's aspect buckets "
                                             "(model.json buckets; default: its square image_size)")
    p.add_argument("--height", type=int, help="image height (see --width)")
    p = add("serve", "serve a registered model over HTTP (mlflow models serve's API), batching concurrent requests")
    p.add_argument("--model", help="models:/<name>@<alias> or models:/<name>/<version> (default: serve.model_uri)")
    p.add_argument("--host", help="default: serve.host")
    p.add_argument("--port", type=int, help="default: serve.port")
    p.add_argument("--max-batch", type=int, help="images per sampler call (default: serve.max_batch)")
    p.add_argument("--max-wait-ms", type=float, help="longest wait to fill a batch (default: serve.max_wait_ms)")


# What each stage needs to exist before it starts: (argument, what it is, stage that makes it)
INPUTS = {
    "latents": [("shards", "shards", "ingest")],
    "embed": [("shards", "shards", "ingest")],
    "judge": [("shards", "shards", "ingest")],
    "train": [("shards", "shards", "ingest"), ("embeddings", "embeddings", "embed")],
    "sample": [("shards", "shards", "ingest"), ("model", "trained model", "train")],
    "evaluate": [("samples", "samples", "sample"), ("judge", "judge", "judge"), ("model", "trained model", "train")],
    "register": [("model", "trained model", "train"), ("metrics", "metrics", "evaluate")],
    "sweep": [("shards", "shards", "ingest"), ("model", "trained model", "train"), ("judge", "judge", "judge")],
    "promote": [("registered", "registered model record", "register")],
    "export-diffusers": [("model", "trained model", "train")],
}
NEEDS_TEXT_MODEL = ("embed", "sample", "register", "sweep")


def _ingest(p, a):
    from flows.stages import run_ingest_flow

    run_ingest_flow(p, a.out)


def _stage(name: str, *args: str) -> Callable:
    """A stage command: its Prefect flow from flows.stages, called with the named arguments."""
    def run(p, a):
        from flows import stages

        getattr(stages, f"{name}_flow")(p, *(getattr(a, x) for x in args))
    return run


def _train(p, a):
    """The train stage's flow; with train.nproc_per_node (or nnodes) above 1, first relaunched under
    torchrun, one process per GPU. Rank 0 runs the Prefect flow (and logs); the others train only."""
    from diffusion.training import distributed

    t = p.train
    if (t.nproc_per_node > 1 or t.nnodes > 1) and not distributed.launched():
        import subprocess

        cmd = distributed.torchrun_command(a.argv, t.nproc_per_node, t.nnodes, t.rdzv_endpoint, t.rdzv_id)
        print("t2i train: " + " ".join(cmd[1:]), flush=True)
        code = subprocess.run(cmd).returncode
        if code:
            raise T2IError(f"torchrun exited with code {code} (the ranks' errors are above)")
        return
    if distributed.launched_rank():
        from diffusion.pipeline import stages

        stages.train(p, a.shards, a.embeddings, a.out, progress=False, latents_dir=a.latents)
        return
    from flows.stages import train_stage_flow

    train_stage_flow(p, a.shards, a.embeddings, a.out, a.latents)


def _export_diffusers(p, a):
    from diffusion.models.diffusers_unet import export_diffusers

    print(f"wrote {export_diffusers(a.model, a.out)} (UNet2DConditionModel.from_pretrained, DDPMScheduler)")


def _evaluate(p, a):
    from diffusion.artifacts import write_adherence_plot
    from flows.stages import evaluate_flow

    metrics = evaluate_flow(p, a.samples, a.judge, a.model, a.metrics, a.shards, a.report, a.embeddings)
    if a.plots:
        write_adherence_plot(metrics, a.plots)


def _promote(p, a):
    from flows.promote import promote_model_flow

    promote_model_flow(p, a.registered, a.out, a.version, a.model_name)


def _rollback(p, a):
    import mlflow

    from diffusion.registry import tracking
    from diffusion.registry.promote import rollback

    tracking.setup(p.mlflow)
    d = rollback(mlflow.MlflowClient(), tracking.tracking_uri(p.mlflow), a.model_name or p.register.model_name,
                 p.promote.alias)
    print(d.line())


def _lineage(p, a):
    import mlflow

    from diffusion.registry import tracking
    from diffusion.registry.versions import parse_model_uri, resolve_version

    tracking.setup(p.mlflow)
    mv = resolve_version(parse_model_uri(a.model or p.batch.model_uri, p.promote.alias))
    tags = dict(sorted((mv.tags or {}).items()))
    info = {"name": mv.name, "version": mv.version, "run_id": mv.run_id, "aliases": list(mv.aliases or []),
            "tags": tags}
    if a.json:
        print(json.dumps(info, indent=2))
        return
    aliases = " ".join(f"@{x}" for x in info["aliases"])
    print(f"{mv.name} version {mv.version} {aliases}".rstrip() + f"  (run {mv.run_id}, {mlflow.get_tracking_uri()})")
    width = max(len(k) for k in tags) if tags else 0
    for k, v in tags.items():
        print(f"  {k:<{width}}  {v}")


def _generate(p, a):
    import mlflow

    from diffusion.registry import tracking
    from diffusion.pipeline.batch import check_request
    from flows.batch import batch_generation_flow

    mlflow.set_tracking_uri(tracking.tracking_uri(p.mlflow))
    check_request(a.prompts, a.model or p.batch.model_uri, a.output_dir or p.batch.output_dir, a.run_name, a.date)

    summary = batch_generation_flow(a.prompts, a.model or p.batch.model_uri, a.output_dir or p.batch.output_dir,
                                    a.run_name, a.date, a.params, a.guidance_scale, a.steps, a.sampler,
                                    a.overrides, width=a.width, height=a.height)
    print(json.dumps(summary, indent=2))


def _serve(p, a):
    from dataclasses import replace

    from flows.serve import serve

    given = {"model_uri": a.model, "host": a.host, "port": a.port, "max_batch": a.max_batch,
             "max_wait_ms": a.max_wait_ms}
    cfg = replace(p.serve, **{k: v for k, v in given.items() if v is not None})
    cfg.check("serve")
    serve(cfg, p.mlflow)


def _pipeline(p, a):
    if a.params != "params.yaml" or a.overrides:
        raise T2IError("t2i pipeline runs dvc repro, which reads params.yaml: edit it instead of --params/-s")
    from flows.pipeline import train_flow

    train_flow(project_dir=".", stages=a.stages, force=a.force)


def _summary(p, a):
    from diffusion.registry import tracking
    from flows.project import summary

    print(summary(".", tracking.tracking_uri(p.mlflow)))


COMMANDS: dict[str, Callable] = {
    "ingest": _ingest,
    "embed": _stage("embed", "shards", "out"),
    "judge": _stage("judge", "shards", "out", "metrics", "embeddings"),
    "latents": _stage("latents", "shards", "out"),
    "train": _train,
    "sample": _stage("sample", "shards", "model", "out"),
    "evaluate": _evaluate,
    "register": _stage("register", "model", "metrics", "out"),
    "sweep": _stage("sweep", "shards", "model", "judge", "out"),
    "promote": _promote,
    "rollback": _rollback,
    "lineage": _lineage,
    "generate": _generate,
    "serve": _serve,
    "pipeline": _pipeline,
    "summary": _summary,
    "export-diffusers": _export_diffusers,
}


def _params(args: argparse.Namespace) -> None:
    """The configuration reference, from the dataclasses of diffusion.config (no params file read)."""
    from diffusion.config import params_reference, reference_markdown, reference_text

    sections = params_reference(args.section)
    print((reference_markdown if args.markdown else reference_text)(sections), end="")


def _run(args: argparse.Namespace) -> None:
    from diffusion.artifacts import require
    from diffusion.config import load_params

    if args.command == "params":
        _params(args)
        return

    overrides = list(args.overrides)
    if getattr(args, "source", None):
        overrides.append(f"ingest.source={args.source}")
    if getattr(args, "input", None):
        overrides.append(f"ingest.path={json.dumps(args.input)}")
    p = load_params(args.params, overrides)
    if args.command == "train" and os.environ.get("RANK", "0") == "0":
        from diffusion.evaluation.evaluate import check_promotion_metric

        check_promotion_metric(p)  # a policy that could never decide is refused before training, not after
    for arg, what, maker in INPUTS.get(args.command, []):
        if getattr(args, arg) is not None:
            require(getattr(args, arg), what, maker)
    if args.command in NEEDS_TEXT_MODEL:
        from diffusion.data.text import model_config

        model_config(p.embed.model)  # unknown model names fail here, in one line
    COMMANDS[args.command](p, args)


class _Stop:
    """SIGTERM and SIGINT end a command the way Ctrl-C ends Python: as an exception that unwinds
    Prefect's context managers and runs the atexit hooks, which stop the temporary Prefect API
    server (a uvicorn child that the default SIGTERM action left running). The children alive at
    the signal (server, DataLoader workers, torchrun and its ranks, dvc's stage commands) are
    recorded then; whatever of them is still alive when the process exits is terminated."""

    children: list = []

    @classmethod
    def install(cls) -> None:
        import atexit
        import signal
        import threading

        if threading.current_thread() is not threading.main_thread():
            return  # signals reach the main thread only (main() called from a worker thread)
        signal.signal(signal.SIGTERM, cls.on_signal)
        signal.signal(signal.SIGINT, cls.on_signal)
        atexit.register(cls.end_children)  # registered first, so it runs after Prefect's own hooks

    @classmethod
    def on_signal(cls, signum, frame) -> None:
        import signal

        if not cls.children:
            try:
                import psutil  # a dependency of dvc, so normally installed; without it the hooks alone
            except ImportError:
                psutil = None
            cls.children = psutil.Process().children(recursive=True) if psutil else []
        if signum == signal.SIGINT:
            raise KeyboardInterrupt
        raise SystemExit(128 + signum)

    @classmethod
    def end_children(cls, timeout: float = 5.0) -> None:
        if not cls.children:
            return
        import psutil

        alive = [c for c in cls.children if c.is_running()]
        for c in alive:
            with contextlib.suppress(psutil.Error):
                c.terminate()
        _, alive = psutil.wait_procs(alive, timeout=timeout)
        for c in alive:
            with contextlib.suppress(psutil.Error):
                c.kill()


def _threads() -> None:
    """Torch threads from the CPUs this process may use (diffusion.threads); a bad T2I_THREADS is one line."""
    try:
        threads.apply()
    except ValueError as e:
        raise T2IError(str(e)) from None


def quiet_expected_errors() -> None:
    """Log records of a ``T2IError`` lose their traceback. Prefect logs a failed task's and flow's
    exception with its traceback; ours are the user's mistakes or refusals, already said in one
    line (and printed once more as ``t2i: error: ...``), so the console shows those lines only.
    Any other exception keeps its traceback. Done at record creation, so it holds whatever
    handlers Prefect sets up later."""
    make = logging.getLogRecordFactory()

    def factory(*args, **kwargs):
        record = make(*args, **kwargs)
        if record.exc_info and isinstance(record.exc_info[1], T2IError):
            record.exc_info = None
        return record

    logging.setLogRecordFactory(factory)


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("DO_NOT_TRACK", "1")
    # the temporary Prefect API would otherwise try to phone home (and log an error offline)
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    threads.set_wait_policy()  # before anything imports torch (diffusion.threads)
    _Stop.install()
    quiet_expected_errors()
    argv = list(sys.argv[1:] if argv is None else argv)
    args = _parser().parse_args(argv)
    args.argv = argv
    try:
        if args.command != "params":
            _threads()
        _run(args)
    except T2IError as e:
        print(f"t2i: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("t2i: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
