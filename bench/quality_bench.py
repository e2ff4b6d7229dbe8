"""Time to quality: our UNet against diffusers' UNet2DConditionModel, matched in parameters, trained
with the same loop, data and recipe, in turns; the training wall time each needs to reach the
R-precision goal (issue 29, part 5; goal: ours at least 1.5x faster).

    .venv/bin/python bench/quality_bench.py --shards data/shards --embeddings data/embeddings \\
        --judge data/judge --params params/openmoji-32.yaml --out bench/results/quality.json
    .venv/bin/python bench/quality_bench.py --smoke      # tiny data built in a temp folder, about a minute

Inputs are what the pipeline's stages write: ``--shards`` (``t2i ingest``: train/ and val/ shards
and their indexes), ``--embeddings`` (``t2i embed``: the EmbeddingTable), ``--judge`` (``t2i judge
--embeddings``: the retrieval evaluator in DIR/retrieval) and ``--params``, whose ``train`` section
is the recipe and whose ``sample`` section the sampler. ``--smoke`` makes tiny shards, embeddings
and evaluators with ``diffusion.pipeline.stages`` (ingest, embed, judge) from params.yaml with
the small overrides of ``SMOKE`` and runs a few steps.

The goal (issue 29, part 4): generated R-precision on seen captions at least ``--goal-fraction``
(0.5) of the real images' figure. The evaluation prompts are ``--n-prompts`` distinct training
captions (seen), each with one real image: first those validation images whose caption is a
training caption, then training images (the JSON says how many of each: OpenMoji's val split holds
held-out annotations only, so its seen captions' real images come from the train split). Both
are scored by ``diffusion.evaluation.retrieval.r_precision`` against the same distractors (the
evaluator's ``distractors`` distinct validation captions per prompt, seeded per prompt, as the
evaluate stage draws them). The real images' R-precision is measured once; the goal is that
fraction of it.

What runs, in one process, in turns: each model trains ``--chunk`` steps, then the other, so a slow
spell of a shared machine hits both alike; after each chunk the model's EMA samples the prompts
(seed ``sample.seed`` + i per prompt, the same noise for both) and is scored. A model stops once
it reaches the goal or ``--max-steps``. Its time to goal is its training wall seconds (the steps,
the batches' loading and decoding; sampling and scoring excluded) at the end of the first chunk
whose evaluation met the goal, so it is resolved to a chunk. Before the clock each model runs one
untimed forward and backward (no optimizer step; on the CPU its random draws are restored, so
the weights and draws are those of a run without it), so first-call costs fall on neither.

Matched (the same for both): the data (each model its own ``diffusion.training.train_data``
stream over the train shards, same seed and shuffle buffer, decoded in the training process
(workers 0), so both see the same batches in the same order), the caption table, caption dropout
and ``train.unseen_words`` (the loop's ``TextTable.training_cond``), the timestep draw (train.timestep_sampling:
U{0..T-1}, or the logit-normal, ``diffusion.models.loss.draw_timesteps`` for both) and
the linear betas, the prediction target (train.prediction: diffusers' DDPMScheduler with
``prediction_type`` epsilon or v_prediction, target ``noise`` or ``get_velocity``) and the loss
weighting (train.loss_weighting min_snr: diffusers' ``compute_snr``, weights min(SNR, gamma)/SNR
for eps, /(SNR + 1) for v, as diffusers' train_text_to_image.py; our loss uses the same), AdamW
(``adamw_kwargs``), gradient clipping, the LR schedule (warmup and cosine over the recipe's
train.steps, whatever ``--max-steps`` is), the EMA and its warmup, batch size, precision, and
the sampler: ours samples its EMA ``Denoiser`` with ``diffusion.sampling.generate`` (sample.sampler,
steps, spacing, guidance, clipping); the diffusers UNet's EMA is put behind the same denoiser
contract (``diffusion.models.precond.Denoiser`` around it: c_in x is exactly DDPMScheduler's x_t,
and it reads the fractional timestep the sampler asks for) and sampled by the same call.

Different: the networks (ours ``diffusion.models.unet.UNet``, with its own blocks: QK-norm and
``train.unet.text_layers``' caption refiner where the params set them; diffusers' matched as
bench/train_bench.py matches it, ``match_diffusers``: same levels, multipliers, attention levels,
the 2x2-folded input, a base width whose parameter count is within 10%), and each side's step code
(ours ``diffusion.training.train.train_step``; diffusers' the step of its training scripts, the
``DiffusersTrainer`` of bench/train_bench.py with the target and weighting above).

Writes (``--out``) a JSON report (machine, command, matching, real R-precision, goal, per model
its curve and time to goal, the ratio) and the curves as CSV beside it (``<out>.csv``).
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import os
import shlex
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from machine import cpu_name  # noqa: E402
from train_bench import TOLERANCE, DiffusersTrainer, LoopTrainer, match_diffusers, sync  # noqa: E402

GOAL_SPEEDUP = 1.5  # issue 29, part 5: ours at least this much faster to the goal
MODELS = ("ours-unet", "diffusers-unet")
# --smoke: params.yaml made tiny (about the test suite's sizes; a UNet diffusers can match within 10%:
# at 16 wide its smallest counterpart is 15% larger)
SMOKE = {
    "dataset": {"n_train": 240, "n_val": 60},
    "ingest": {"samples_per_shard": 100},
    "judge": {"n_images": 128, "steps": 4, "batch_size": 64},  # the attribute judge: unused here
    "retrieval": {"steps": 40, "batch_size": 64, "width": 16, "dim": 64},
    "train": {"steps": 20, "batch_size": 16, "warmup_steps": 4, "shuffle_buffer": 50,
              "unet": {"channels": 32, "channel_mult": [1, 2], "attn_levels": [1], "heads": 2}},
    "sample": {"steps": 4, "batch_size": 64},
}


def log(msg: str) -> None:
    print(f"[bench] {msg}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------------------------
# Inputs


def smoke_inputs(tmp: Path) -> dict:
    """Tiny shards, embeddings, evaluators and params, made by the pipeline's own stages."""
    import yaml

    from diffusion.config import parse_params
    from diffusion.pipeline import stages

    data = yaml.safe_load((ROOT / "params.yaml").read_text())
    for section, values in SMOKE.items():
        for k, v in values.items():
            data[section][k] = {**data[section][k], **v} if isinstance(v, dict) else v
    params = tmp / "params.yaml"
    params.write_text(yaml.safe_dump(data, sort_keys=False))
    p = parse_params(data, str(params))
    paths = {"shards": tmp / "shards", "embeddings": tmp / "emb", "judge": tmp / "judge", "params": params}
    t0 = time.perf_counter()
    stages.ingest(p, paths["shards"])
    stages.embed(p, paths["shards"], paths["embeddings"])
    stages.judge(p, paths["shards"], paths["judge"], tmp / "judge.json", paths["embeddings"])
    log(f"smoke inputs (ingest, embed, judge) in {time.perf_counter() - t0:.1f} s under {tmp}")
    return paths


def seen_eval_set(shards: Path, table, n: int) -> dict:
    """``n`` distinct training captions with one real image each: validation images first (of
    captions the training split also holds), then training images; the distinct validation
    captions are the distractor pool."""
    import numpy as np

    from diffusion import artifacts as art
    from diffusion.data.shards import iter_samples

    train_caps = set(art.split_captions(shards, "train"))
    picked: dict[str, object] = {}
    counts = {}
    for split in ("val", "train"):
        before = len(picked)
        for s in iter_samples(art.shard_urls(shards, split)):
            if len(picked) >= n:
                break
            c = s["caption"]
            if c and c in train_caps and c in table.rows and c not in picked:
                picked[c] = s["image"]
        counts[split] = len(picked) - before
    if not picked:
        raise SystemExit(f"no training caption with an embedding in {shards}")
    pool = sorted({c for c in art.split_captions(shards, "val") if c and c in table.rows})
    return {"prompts": list(picked), "real": np.stack(list(picked.values())), "pool": pool,
            "real_from": counts}


# --------------------------------------------------------------------------------------------
# The diffusers side: the recipe's target and weighting


class RecipeDiffusersTrainer(DiffusersTrainer):
    """bench/train_bench.py's diffusers step with the recipe's prediction target and loss weighting
    (diffusers' DDPMScheduler prediction_type and compute_snr, as its train_text_to_image.py)."""

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        from diffusers import DDPMScheduler

        c = self.cfg
        self.scheduler = DDPMScheduler(num_train_timesteps=c.timesteps, beta_start=c.beta_min, beta_end=c.beta_max,
                                       beta_schedule="linear",
                                       prediction_type="v_prediction" if c.prediction == "v" else "epsilon")

    def loss(self, batch, forward):
        import torch.nn.functional as F
        from diffusers.training_utils import compute_snr

        x0, noise, t, pred = self.predict(batch, forward)  # train_bench's draws and forward pass
        target = noise if self.cfg.prediction == "eps" else self.scheduler.get_velocity(x0, noise, t)
        mse = F.mse_loss(pred.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))
        if self.cfg.loss_weighting == "min_snr":
            snr = compute_snr(self.scheduler, t)
            w = snr.clamp(max=self.cfg.min_snr_gamma)
            mse = mse * w / (snr if self.cfg.prediction == "eps" else snr + 1)
        return mse.mean()

    def ema_denoiser(self):
        """The EMA network behind our denoiser contract: D(x, sigma) from its eps or v."""
        from diffusion.models.precond import Denoiser

        c = self.cfg
        return Denoiser(self.ema, c.timesteps, c.beta_min, c.beta_max, c.prediction).to(self.device).eval()


# --------------------------------------------------------------------------------------------
# Turns


@dataclasses.dataclass
class Run:
    name: str
    trainer: object
    data: object  # the batch iterator
    denoiser: object  # what samples: the EMA behind the denoiser contract
    steps: int = 0
    train_s: float = 0.0
    curve: list = dataclasses.field(default_factory=list)
    reached: dict | None = None
    warmup_s: float = 0.0  # the untimed forward and backward before the clock


def warm_up(run: Run, batch, device) -> float:
    """One untimed forward and backward (no optimizer step, gradients dropped, the trainer's CPU
    generator restored; on CUDA t and noise come from the global CUDA generator), so one-time costs (first-call kernels and allocations) fall on neither clock
    and the weights and draws are those of a run without it. Returns its seconds."""
    from diffusion.training.train import micro_loss

    tr = run.trainer
    gen = tr.state.gen if isinstance(tr, LoopTrainer) else tr.gen
    saved = gen.get_state()
    t0 = time.perf_counter()
    if isinstance(tr, LoopTrainer):
        loss = micro_loss(tr.state, batch, tr.text, False)
    else:
        loss = tr.loss(batch, tr.forward)
    loss.backward()
    tr.opt.zero_grad(set_to_none=True)
    sync(device)
    gen.set_state(saved)
    return time.perf_counter() - t0


def train_chunk(run: Run, steps: int, device) -> float:
    """``steps`` training steps; returns the last loss. Only this is on the training clock."""
    sync(device)
    t0 = time.perf_counter()
    loss = None
    for _ in range(steps):
        loss = run.trainer.step(next(run.data))
    sync(device)
    run.train_s += time.perf_counter() - t0
    run.steps += steps
    return float(loss)


def evaluate(run: Run, ev: dict, sample_cfg, image_size: int) -> tuple[float, float]:
    """R-precision of the EMA's images of the seen prompts; (value, seconds it took)."""
    from diffusion.evaluation.retrieval import r_precision
    from diffusion.sampling.generate import generate, table_cond

    t0 = time.perf_counter()
    cond, uncond = table_cond(ev["table"], ev["prompts"])
    seeds = [sample_cfg.seed + i for i in range(len(ev["prompts"]))]
    images = generate(run.denoiser, cond, uncond, seeds, image_size, sample_cfg)
    rp = r_precision(ev["model"], ev["table"], ev["size"], images, ev["prompts"], ev["pool"], ev["k"], ev["seed"])
    return rp["all"]["mean"], time.perf_counter() - t0


def take_turns(runs: list[Run], ev: dict, args, sample_cfg, image_size: int, device) -> None:
    """Chunks in turns until every model reached the goal or --max-steps."""
    while True:
        live = [r for r in runs if r.reached is None and r.steps < args.max_steps]
        if not live:
            return
        for run in live:
            n = min(args.chunk, args.max_steps - run.steps)
            loss = train_chunk(run, n, device)
            rp, eval_s = evaluate(run, ev, sample_cfg, image_size)
            point = {"model": run.name, "steps": run.steps, "train_s": round(run.train_s, 3), "r_precision": rp,
                     "loss": loss, "eval_s": round(eval_s, 3), "load_average": round(os.getloadavg()[0], 2)}
            run.curve.append(point)
            log(f"{run.name}: step {run.steps}, {run.train_s:.1f} s training, R-precision {rp:.3f} "
                f"(goal {ev['goal']:.3f}), loss {loss:.4f}, evaluation {eval_s:.1f} s")
            if rp >= ev["goal"]:
                run.reached = point


# --------------------------------------------------------------------------------------------
# Setting up


def recipe(p, args):
    """The train section as both models train it (one process, no accumulation, the unet)."""
    t = p.train
    if t.denoiser != "unet":
        raise SystemExit(f"train.denoiser is {t.denoiser}: this compares the UNet with diffusers' UNet")
    if p.latents.vae:
        raise SystemExit("latents.vae is set: this bench trains in pixel space")
    notes = []
    if t.grad_accum != 1:
        notes.append(f"train.grad_accum {t.grad_accum} -> 1 (the diffusers step takes one batch)")
    cfg = dataclasses.replace(t, grad_accum=1, nproc_per_node=1, nnodes=1, seed=args.seed if args.seed is not None
                              else t.seed, data_workers=0)
    return cfg, notes


def build_runs(cfg, table, shards: Path, image_size: int, device, m: dict, models=MODELS) -> list[Run]:
    from diffusion.training.train import adamw_kwargs
    from diffusion.training.train_data import DataPosition, DataSpec, batch_loader
    from diffusion import artifacts as art

    urls = art.shard_urls(shards, "train")

    def data():  # the same stream for both: same shards, seed, buffer
        spec = DataSpec(urls, cfg.seed, cfg.shuffle_buffer, cfg.batch_size, workers=0)
        return batch_loader(spec, table, [DataPosition()])

    runs = []
    if "ours-unet" in models:
        ours = LoopTrainer(cfg, table, image_size, device)
        ours.state.ema.eval()
        runs.append(Run("ours-unet", ours, data(), ours.state.ema))
    if "diffusers-unet" in models:
        channels_last = device.type == "cuda" and cfg.channels_last
        theirs = RecipeDiffusersTrainer(m, cfg.unet.patch, cfg, table, device, adamw_kwargs(cfg, device),
                                        channels_last, cfg.compile)
        runs.append(Run("diffusers-unet", theirs, data(), theirs.ema_denoiser()))
    first = next(data())  # a batch of the same stream, from its own iterator: the runs' streams are untouched
    for run in runs:
        run.warmup_s = warm_up(run, first, device)
    return runs


def match(cfg, table, cuda: bool) -> dict:
    import torch

    from diffusion.models.unet import UNet, count_params

    u = cfg.unet
    text_dim, pooled_dim = table.tokens.shape[-1], table.pooled.shape[-1]
    with torch.device("meta"):
        ours = count_params(UNet(u, text_dim=text_dim, pooled_dim=pooled_dim, in_channels=3))
    m = match_diffusers(u, ours, text_dim, pooled_dim, 3 * u.patch**2, cuda)
    m["ours_params"] = ours
    return m


def outcome(runs: list[Run], max_steps: int) -> dict:
    """Per model its time to goal; the ratio diffusers / ours (a bound where one did not reach it)."""
    per = {}
    for r in runs:
        per[r.name] = {"reached": r.reached is not None, "steps": r.steps, "train_s": round(r.train_s, 3),
                       "steps_to_goal": r.reached["steps"] if r.reached else None,
                       "train_s_to_goal": r.reached["train_s"] if r.reached else None,
                       "best_r_precision": max((p["r_precision"] for p in r.curve), default=None),
                       "warmup_s": round(r.warmup_s, 3)}
    if len(per) < len(MODELS):  # one model alone: its curve, no ratio
        return {"models": per, "speedup": None, "speedup_kind": "one_model", "meets_goal": None,
                "goal_speedup": GOAL_SPEEDUP, "max_steps": max_steps}
    o, d = per["ours-unet"], per["diffusers-unet"]
    if o["reached"] and d["reached"]:
        ratio, kind = d["train_s_to_goal"] / o["train_s_to_goal"], "exact"
    elif o["reached"]:  # diffusers needs more than all it trained
        ratio, kind = d["train_s"] / o["train_s_to_goal"], "lower_bound"
    elif d["reached"]:
        ratio, kind = d["train_s_to_goal"] / o["train_s"], "upper_bound"
    else:
        ratio, kind = None, "neither_reached"
    meets = ratio is not None and kind in ("exact", "lower_bound") and ratio >= GOAL_SPEEDUP
    return {"models": per, "speedup": ratio, "speedup_kind": kind, "meets_goal": meets, "goal_speedup": GOAL_SPEEDUP,
            "max_steps": max_steps}


def verdict_line(name: str, m: dict) -> str:
    if m["reached"]:
        return f"{name}: goal reached at step {m['steps_to_goal']} after {m['train_s_to_goal']:.1f} s of training"
    return (f"{name}: not reached in {m['steps']} steps ({m['train_s']:.1f} s of training; best R-precision "
            f"{m['best_r_precision']:.3f})")


# --------------------------------------------------------------------------------------------
# Main


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shards", help="the ingest stage's folder (train/ and val/)")
    ap.add_argument("--embeddings", help="the embed stage's folder (EmbeddingTable)")
    ap.add_argument("--judge", help="the judge stage's folder (the retrieval evaluator in DIR/retrieval)")
    ap.add_argument("--params", help="params file: its train section is the recipe, its sample section the sampler")
    ap.add_argument("-s", "--set", action="append", default=[], metavar="KEY=VALUE",
                    help="a params override, as t2i's -s (repeatable): train.* is both models' recipe, "
                         "train.unet.* also sizes ours (and so the matched diffusers UNet)")
    ap.add_argument("--models", nargs="+", choices=MODELS, default=list(MODELS),
                    help="the models to train (default both); one alone probes a variant against an earlier "
                         "run's curve of the other (the same seed draws the same data and timesteps)")
    ap.add_argument("--smoke", action="store_true", help="tiny inputs made in a temp folder, a few steps (~1 min)")
    ap.add_argument("--chunk", type=int, default=None, help="steps a model trains per turn (default 100; smoke 4)")
    ap.add_argument("--max-steps", type=int, default=None, help="steps at most per model (default train.steps)")
    ap.add_argument("--n-prompts", type=int, default=None, help="seen captions evaluated (default sample.n_prompts)")
    ap.add_argument("--goal-fraction", type=float, default=0.5, help="the goal: this fraction of the real R-precision")
    ap.add_argument("--seed", type=int, default=None, help="training seed (default train.seed)")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda", "auto"])
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--out", help="JSON report; the curves go to the same path with .csv")
    args = ap.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # the exact command, in the report
    args.models = [m for m in MODELS if m in args.models]  # the fixed order, once each
    if args.smoke:
        args.chunk = args.chunk or 4
        args.max_steps = args.max_steps or 8
        args.n_prompts = args.n_prompts or 24
    elif not all((args.shards, args.embeddings, args.judge, args.params)):
        ap.error("--shards, --embeddings, --judge and --params are needed (or --smoke)")
    args.chunk = args.chunk or 100
    if args.chunk < 1 or (args.max_steps is not None and args.max_steps < 1):
        ap.error("--chunk and --max-steps must be at least 1")
    return args


def setup(args, paths: dict, device) -> dict:
    """Params, recipe, table, evaluator, evaluation set, the real R-precision and the goal."""
    from diffusion import artifacts as art
    from diffusion.config import load_params
    from diffusion.data.text import EmbeddingTable
    from diffusion.evaluation.retrieval import load_retrieval, r_precision

    p = load_params(paths["params"], args.set)
    cfg, notes = recipe(p, args)
    args.max_steps = args.max_steps or cfg.steps
    table = EmbeddingTable.load(art.require(paths["embeddings"], "embeddings", "embed"))
    model, info = load_retrieval(Path(paths["judge"]) / art.RETRIEVAL_DIR)
    ev = seen_eval_set(Path(paths["shards"]), table, args.n_prompts or p.sample.n_prompts)
    ev.update(table=table, model=model, size=info["image_size"], k=info["distractors"], seed=info["seed"])
    real = r_precision(model, table, ev["size"], ev["real"], ev["prompts"], ev["pool"], ev["k"], ev["seed"])["all"]
    ev["real_rp"], ev["goal"] = real, args.goal_fraction * real["mean"]
    return {"p": p, "cfg": cfg, "notes": notes, "table": table, "ev": ev, "image_size": int(ev["real"].shape[1])}


def report(args, paths, machine, s: dict, m: dict, runs: list[Run], res: dict) -> dict:
    ev, cfg = s["ev"], s["cfg"]
    return {
        "machine": machine, "command": machine["command"], "args": vars(args),
        "inputs": {k: str(v) for k, v in paths.items()},
        "recipe": dataclasses.asdict(cfg), "sample": dataclasses.asdict(s["p"].sample),
        "matching": {"ours_params": m["ours_params"], "diffusers_params": m["params"], "ratio": m["ratio"],
                     "diffusers_kwargs": {k: (list(v) if isinstance(v, tuple) else v) for k, v in m["kwargs"].items()},
                     "diffusers_heads": m["heads"], "head_dims": m["head_dims"], "ours_head_dims": m["ours_head_dims"]},
        "evaluation": {"prompts": len(ev["prompts"]), "real_from": ev["real_from"], "pool": len(ev["pool"]),
                       "distractors": ev["k"], "real_r_precision": ev["real_rp"], "goal_fraction": args.goal_fraction,
                       "goal": ev["goal"]},
        "curves": {r.name: r.curve for r in runs}, "result": res, "notes": s["notes"],
    }


def write(out: Path, rep: dict) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(rep, indent=2, default=str) + "\n")
    with out.with_suffix(".csv").open("w", newline="") as f:
        w = csv.DictWriter(f, ["model", "steps", "train_s", "r_precision", "loss", "eval_s", "load_average"])
        w.writeheader()
        for curve in rep["curves"].values():
            w.writerows(curve)
    print(f"wrote {out} and {out.with_suffix('.csv')}")


def run(args, paths: dict) -> int:
    import diffusers
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda" if args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
                          else "cpu")
    machine = {"cpu": cpu_name(), "cores": os.cpu_count(), "torch": torch.__version__, "diffusers": diffusers.__version__,
               "threads": torch.get_num_threads(), "device": torch.cuda.get_device_name() if device.type == "cuda"
               else "cpu", "load_average_at_start": round(os.getloadavg()[0], 2),
               "command": shlex.join([sys.executable, str(Path(__file__).relative_to(ROOT)), *args.argv])}
    print(f"machine: {machine['cpu']}, {machine['cores']} cores; torch {torch.__version__} ({machine['threads']} "
          f"threads); diffusers {diffusers.__version__}; {machine['device']}; load average {machine['load_average_at_start']}")
    s = setup(args, paths, device)
    cfg, ev = s["cfg"], s["ev"]
    m = match(cfg, s["table"], device.type == "cuda")
    print(f"ours: UNet {cfg.unet.channels} x {cfg.unet.channel_mult}, {m['ours_params']:,} params; diffusers: "
          f"block_out_channels {m['kwargs']['block_out_channels']}, {m['heads']} heads, {m['params']:,} params "
          f"(ratio {m['ratio']:.3f})")
    if abs(m["ratio"] - 1) > TOLERANCE:
        print(f"ERROR: the parameter counts differ by more than {TOLERANCE:.0%}", file=sys.stderr)
        return 2
    print(f"recipe: batch {cfg.batch_size}, lr {cfg.lr} ({cfg.lr_schedule}, warmup {cfg.warmup_steps}, over "
          f"{cfg.steps} steps), prediction {cfg.prediction}, weighting {cfg.loss_weighting}, EMA {cfg.ema_decay}; "
          f"turns of {args.chunk} steps up to {args.max_steps} each; sampler {s['p'].sample.sampler} "
          f"{s['p'].sample.steps} steps, guidance {s['p'].sample.guidance_scale}")
    print(f"evaluation: {len(ev['prompts'])} seen captions (real images from {ev['real_from']}), {ev['k']} distractors "
          f"from {len(ev['pool'])} val captions; real R-precision {ev['real_rp']['mean']:.3f} (chance "
          f"{ev['real_rp']['chance']:.3f}); goal {ev['goal']:.3f} ({args.goal_fraction:g} x real)")
    sys.stdout.flush()
    runs = build_runs(cfg, s["table"], Path(paths["shards"]), s["image_size"], device, m, args.models)
    take_turns(runs, ev, args, s["p"].sample, s["image_size"], device)
    res = outcome(runs, args.max_steps)
    print()
    for name in args.models:
        print(verdict_line(name, res["models"][name]))
    if res["speedup_kind"] == "one_model":
        print(f"time to goal, diffusers / ours: not measured (--models {args.models[0]} alone)")
    elif res["speedup"] is None:
        print(f"time to goal, diffusers / ours: neither reached the goal in {args.max_steps} steps")
    else:
        bound = {"exact": "", "lower_bound": "at least ", "upper_bound": "at most "}[res["speedup_kind"]]
        print(f"time to goal, diffusers / ours: {bound}{res['speedup']:.2f}x "
              f"({'meets' if res['meets_goal'] else 'does not meet'} the {GOAL_SPEEDUP}x goal)")
    print(f"{machine['cpu']} | torch {torch.__version__} | {machine['threads']} threads | {machine['command']}")
    for n in s["notes"]:
        print(f"note: {n}")
    if args.out:
        write(Path(args.out), report(args, paths, machine, s, m, runs, res))
    return 0


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():  # before the smoke inputs are made
        raise SystemExit("--device cuda: no CUDA GPU is available")
    if not args.smoke:
        return run(args, {"shards": args.shards, "embeddings": args.embeddings, "judge": args.judge,
                          "params": args.params})
    with tempfile.TemporaryDirectory(prefix="t2i-quality-bench-") as tmp:
        paths = smoke_inputs(Path(tmp))
        return run(args, paths)


if __name__ == "__main__":
    sys.exit(main())
