"""Two jobs on one machine: what each gets beside the other, against one alone.

    .venv/bin/python bench/two_process_bench.py                       # makes a small model and data first
    .venv/bin/python bench/two_process_bench.py --model data/model --shards data/shards --embeddings data/embeddings

For (a) ``t2i generate`` on a model folder and (b) ``t2i train`` for a few steps, it runs one
process alone, then two at once, and prints each process's img/s (generate: the generation loop as
the command reports it; train: ``train_img_per_s`` of the exported model.json) and the share each of
the two gets against the one alone. The goal (docs/operations.md#sharing-a-machine): each of two at
once gets at least 40% of one alone.

``--policy`` picks the thread policy the commands run with; the default measures both side by side:
- ``new``: every ``t2i`` command as shipped (diffusion.threads: OMP_WAIT_POLICY=PASSIVE, torch
  threads from the usable CPUs);
- ``old``: the command with that policy switched off (OpenMP's default spin-then-sleep waits, torch's
  default thread count), as before issue 29;
- ``active``: ``old`` with OMP_WAIT_POLICY=ACTIVE (spin only), the worst case.

Without ``--model``/``--shards``/``--embeddings`` it ingests ``--n-train`` built-in images, embeds
them and trains ``--model-steps`` steps (default params) into a temporary folder first. A run that
passes ``--timeout`` seconds is stopped and reported as "<" the rate it would have needed to finish.
The machine's CPU and load average are printed beside the figures: the machine may be shared.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

from machine import cpu_name  # noqa: E402

# the t2i entry point, with or without the thread policy of diffusion.threads
ENTRY = {
    "new": "import sys; from flows import cli; sys.exit(cli.main())",
    "old": ("import sys; from flows import cli; cli.threads.set_wait_policy = lambda *a: True; "
            "cli.threads.apply = lambda *a: 0; sys.exit(cli.main())"),
}
ENTRY["active"] = ENTRY["old"]


def env_for(policy: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "T2I_THREADS", "OMP_NUM_THREADS")}
    env.update(DO_NOT_TRACK="1", PREFECT_SERVER_ANALYTICS_ENABLED="false",
               PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS="300")
    env.pop("PREFECT_API_URL", None)
    if policy == "active":
        env["OMP_WAIT_POLICY"] = "ACTIVE"
    return env


def t2i(args: list[str], cwd: Path, policy: str = "new") -> subprocess.Popen:
    cwd.mkdir(parents=True, exist_ok=True)  # its own folder: its own mlflow.db
    return subprocess.Popen([sys.executable, "-c", ENTRY[policy], *args], cwd=cwd, env=env_for(policy),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(procs: list[subprocess.Popen], timeout: float) -> list[str | None]:
    """Each process's stdout, or None where it ran past ``timeout`` (then it is stopped)."""
    deadline, outs = time.monotonic() + timeout, []
    for p in procs:
        try:
            out, err = p.communicate(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.terminate()
            p.communicate()
            outs.append(None)
            continue
        if p.returncode != 0:
            raise SystemExit(f"{' '.join(p.args[3:6])} failed ({p.returncode}):\n{err[-3000:]}")
        outs.append(out)
    return outs


def prepare(args, work: Path) -> tuple[Path, Path, Path]:
    """The shards, embeddings and model folder to measure with: given, or made here."""
    shards, embeddings = args.shards, args.embeddings
    small = args.small = ["-s", f"dataset.n_train={args.n_train}", "-s", "dataset.n_val=64"] if shards is None else []
    small = [*small, "--params", str(args.params)]
    if shards is None:
        shards = work / "shards"
        finish([t2i(["ingest", "--out", str(shards), *small], work)], 1800)
    if embeddings is None:
        embeddings = work / "embeddings"
        finish([t2i(["embed", "--shards", str(shards), "--out", str(embeddings), *small], work)], 1800)
    model = args.model
    if model is None:
        model = work / "model"
        finish([t2i(["train", "--shards", str(shards), "--embeddings", str(embeddings), "--out", str(model),
                     *small, "-s", f"train.steps={args.model_steps}"], work)], 3600)
    return Path(shards), Path(embeddings), Path(model)


def run_generate(args, work: Path, model: Path, policy: str, n: int) -> list[float | str]:
    prompts = work / "prompts.txt"
    if not prompts.exists():
        words = ["a red circle", "a blue square on the left", "two green triangles", "a small yellow star"]
        prompts.write_text("\n".join(words[i % len(words)] for i in range(args.images)) + "\n")
    procs = []
    for i in range(n):
        out = work / f"gen-{policy}-{n}-{i}"
        procs.append(t2i(["generate", "--prompts", str(prompts), "--model", str(model), "--output-dir", str(out),
                          "--run-name", "bench", "--date", "2000-01-01", "--params", str(args.params)], out, policy))
    return [float(json.loads(o[o.index("{"):])["images_per_s"]) if o else f"<{args.images / args.timeout:.2f}"
            for o in finish(procs, args.timeout)]


def run_train(args, work: Path, shards: Path, embeddings: Path, policy: str, n: int) -> list[float | str]:
    outs, procs = [], []
    for i in range(n):
        out = work / f"train-{policy}-{n}-{i}"
        outs.append(out)
        procs.append(t2i(["train", "--shards", str(shards), "--embeddings", str(embeddings), "--out", str(out),
                          "--params", str(args.params), "-s", f"train.steps={args.train_steps}",
                          "-s", f"train.checkpoint_every={args.train_steps}", *args.small], out, policy))
    done = finish(procs, args.timeout)
    bound = f"<{args.train_steps * 64 / args.timeout:.1f}"  # the default batch of 64
    return [round(json.loads((o / "model.json").read_text())["train_img_per_s"], 2) if d is not None else bound
            for o, d in zip(outs, done)]


def share(two: list, one: list) -> str:
    if not all(isinstance(x, float) for x in [*two, *one]):
        return "n/a (a run timed out)"
    return " / ".join(f"{x / one[0]:.0%}" for x in two)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, help="a model folder (default: train a small one first)")
    ap.add_argument("--shards", type=Path, help="training shards (default: ingest --n-train built-in images)")
    ap.add_argument("--embeddings", type=Path, help="their caption embeddings (default: embed them)")
    ap.add_argument("--params", type=Path, default=ROOT / "params.yaml")
    ap.add_argument("--policy", choices=["both", "new", "old", "active"], default="both",
                    help="both: new and old side by side (default)")
    ap.add_argument("--images", type=int, default=256, help="images per generate process (default: 256)")
    ap.add_argument("--train-steps", type=int, default=30, help="steps per train process (default: 30)")
    ap.add_argument("--n-train", type=int, default=512, help="built-in images to ingest (default: 512)")
    ap.add_argument("--model-steps", type=int, default=60, help="steps of the model made first (default: 60)")
    ap.add_argument("--timeout", type=float, default=240, help="seconds one measurement may take (default: 240)")
    ap.add_argument("--only", choices=["generate", "train"], help="measure only this")
    args = ap.parse_args()
    args.params = args.params.resolve()
    for name in ("model", "shards", "embeddings"):
        if getattr(args, name) is not None:
            setattr(args, name, getattr(args, name).resolve())

    work = Path(tempfile.mkdtemp(prefix="t2i-two-process-"))
    shards, embeddings, model = prepare(args, work)
    policies = ["new", "old"] if args.policy == "both" else [args.policy]
    print(f"CPU: {cpu_name()}, {len(os.sched_getaffinity(0))} usable CPUs | work: {work}")
    rows = []
    for job in ["generate", "train"]:
        if args.only and job != args.only:
            continue
        for policy in policies:
            load = os.getloadavg()[0]
            measure = ((lambda n: run_generate(args, work, model, policy, n)) if job == "generate" else
                       (lambda n: run_train(args, work, shards, embeddings, policy, n)))
            one, two = measure(1), measure(2)
            rows.append({"job": job, "policy": policy, "alone_img_s": one, "two_at_once_img_s": two,
                         "share_of_alone": share(two, one), "load_avg_1min_at_start": round(load, 2)})
            r = rows[-1]
            print(f"{job:8s} {policy:6s} alone {one[0]} img/s | two at once {two[0]} and {two[1]} img/s | "
                  f"each gets {r['share_of_alone']} of alone | load {load:.2f}", flush=True)
    print(json.dumps({"cpu": cpu_name(), "usable_cpus": len(os.sched_getaffinity(0)), "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
