"""``t2i``: the command line. Each stage command runs that stage's Prefect flow; dvc.yaml calls them.

    t2i ingest   --out DIR [--source folder --input PATH]
    t2i embed    --shards DIR --out DIR
    t2i judge    --shards DIR --out DIR --metrics FILE
    t2i train    --shards DIR --embeddings DIR --out DIR
    t2i sample   --shards DIR --model DIR --out DIR
    t2i evaluate --samples DIR --judge DIR --model DIR --metrics FILE
    t2i register --model DIR --metrics FILE --out FILE
    t2i pipeline [--stage S ...] [--force]     the whole pipeline (train-flow) via dvc repro
    t2i summary                                 where the outputs are, how to open the UIs

Every command takes ``--params params.yaml`` and ``-s section.key=value`` overrides. Problems the
user can fix (a params key, a missing input, an unknown model) print one line and exit with 2.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from diffusion.errors import T2IError, require_path

# What each stage needs to exist before it starts: (argument, what it is, stage that makes it)
INPUTS = {
    "embed": [("shards", "shards", "ingest")],
    "judge": [("shards", "shards", "ingest")],
    "train": [("shards", "shards", "ingest"), ("embeddings", "embeddings", "embed")],
    "sample": [("shards", "shards", "ingest"), ("model", "trained model", "train")],
    "evaluate": [("samples", "samples", "sample"), ("judge", "judge", "judge"), ("model", "trained model", "train")],
    "register": [("model", "trained model", "train"), ("metrics", "metrics", "evaluate")],
}


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="t2i", description="Text-to-image diffusion pipeline")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--params", default="params.yaml", help="params file (default: params.yaml)")
    common.add_argument("-s", "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a param, e.g. -s train.steps=100 (repeatable)")
    sub = ap.add_subparsers(dest="command", required=True)

    def add(name: str, help: str, *args: str):
        p = sub.add_parser(name, parents=[common], help=help)
        for a in args:
            p.add_argument(f"--{a}", required=True)
        return p

    p = add("ingest", "write a source (built-in, folder, table, webdataset, urls) as WebDataset shards", "out")
    p.add_argument("--source", choices=["builtin", "folder", "table", "webdataset", "urls"],
                   help="overrides ingest.source")
    p.add_argument("--input", help="overrides ingest.path: folder, table file, shard URLs or URL list")
    add("embed", "precompute caption embeddings with the open_clip text tower", "shards", "out")
    add("judge", "train the evaluation judge on real images", "shards", "out", "metrics")
    add("train", "train the denoiser", "shards", "embeddings", "out")
    add("sample", "generate the evaluation images", "shards", "model", "out")
    add("evaluate", "score generated images with the judge", "samples", "judge", "model", "metrics")
    add("register", "log the model to MLflow and register a new version", "model", "metrics", "out")
    p = sub.add_parser("pipeline", parents=[common], help="run the whole pipeline (train-flow, dvc repro)")
    p.add_argument("--stage", action="append", dest="stages", help="only this stage (repeatable)")
    p.add_argument("--force", action="store_true", help="rerun even if DVC finds nothing changed")
    sub.add_parser("summary", parents=[common], help="where the outputs are and how to open the UIs")
    return ap


def _run(args: argparse.Namespace) -> None:
    from diffusion.config import load_params

    overrides = list(args.overrides)
    if getattr(args, "source", None):
        overrides.append(f"ingest.source={args.source}")
    if getattr(args, "input", None):
        overrides.append(f"ingest.path={json.dumps(args.input)}")
    p = load_params(args.params, overrides)
    cmd = args.command
    for arg, what, maker in INPUTS.get(cmd, []):
        require_path(getattr(args, arg), what, f"run the {maker} stage first")
    if cmd in ("embed", "sample", "register"):
        from diffusion.text import model_config

        model_config(p.embed.model)  # unknown model names fail here, in one line

    if cmd == "summary":
        from diffusion import tracking
        from flows.project import summary

        print(summary(".", tracking.tracking_uri(p.mlflow)))
        return
    if cmd == "pipeline":
        if args.params != "params.yaml" or args.overrides:
            raise T2IError("t2i pipeline runs dvc repro, which reads params.yaml: edit it instead of --params/-s")
        from flows.pipeline import train_flow

        train_flow(project_dir=".", stages=args.stages, force=args.force)
        return

    from flows import stages as f

    if cmd == "ingest":
        f.run_ingest_flow(p, args.out)
    elif cmd == "embed":
        f.embed_flow(p, args.shards, args.out)
    elif cmd == "judge":
        f.judge_flow(p, args.shards, args.out, args.metrics)
    elif cmd == "train":
        f.train_stage_flow(p, args.shards, args.embeddings, args.out)
    elif cmd == "sample":
        f.sample_flow(p, args.shards, args.model, args.out)
    elif cmd == "evaluate":
        f.evaluate_flow(p, args.samples, args.judge, args.model, args.metrics)
    elif cmd == "register":
        f.register_flow(p, args.model, args.metrics, args.out)


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("DO_NOT_TRACK", "1")
    # the temporary Prefect API would otherwise try to phone home (and log an error offline)
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    args = _parser().parse_args(argv)
    try:
        _run(args)
    except T2IError as e:
        print(f"t2i: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
