#!/usr/bin/env bash
# Warm start against from scratch on new data (issue 30's figure): the built-in set drawn again
# with another seed, trained for N steps from the default model (train.init_from) and from scratch,
# each sampled and scored by the pipeline's judge. Needs the default pipeline's data/model and
# data/judge (make run). Usage: bench/warm_start_figure.sh [OUT] [PARENT]
#   OUT     working folder (default /tmp/warm_start_figure); finished runs are skipped on a rerun
#   PARENT  what init_from names (default data/model; or models:/t2i-shapes@champion)
# RUNS="warm:100 lora:300 scratch:300 ..." picks the runs: warm = all weights from PARENT, lora =
# train.lora.rank 8 on PARENT (the adapter alone trains), scratch = from the seed.
# Prints one line per run: start, steps, train seconds, adherence all / seen / held_out.
set -euo pipefail
cd "$(dirname "$0")/.."
T=${T2I:-.venv/bin/t2i}
O=${1:-/tmp/warm_start_figure}
PARENT=${2:-$PWD/data/model}
RUNS=${RUNS:-"warm:100 warm:300 scratch:300 warm:600 scratch:600"}
export DO_NOT_TRACK=1
P=(-s "mlflow.tracking_uri=sqlite:///$O/mlflow.db" -s dataset.seed=1)
mkdir -p "$O"
[ -d "$O/shards" ] || $T ingest --out "$O/shards" "${P[@]}"
[ -d "$O/emb" ] || $T embed --shards "$O/shards" --out "$O/emb" "${P[@]}"
for run in $RUNS; do
  kind=${run%%:*}; n=${run##*:}; d="$O/$kind-$n"
  init=null; extra=(); [ "$kind" != scratch ] && init=$PARENT
  [ "$kind" = lora ] && extra=(-s train.lora.rank=8)
  if [ ! -f "$d/metrics.json" ]; then
    $T train --shards "$O/shards" --embeddings "$O/emb" --out "$d/model" "${P[@]}" -s train.steps="$n" -s train.init_from="$init" "${extra[@]}"
    $T sample --shards "$O/shards" --model "$d/model" --out "$d/samples" "${P[@]}"
    $T evaluate --samples "$d/samples" --judge data/judge --model "$d/model" --shards "$O/shards" --metrics "$d/metrics.json" "${P[@]}"
  fi
  .venv/bin/python - "$kind" "$n" "$d" <<'PY'
import json, sys
kind, n, d = sys.argv[1:]
m = json.load(open(f"{d}/metrics.json"))
a = m["adherence"]
secs = json.load(open(f"{d}/model/model.json")).get("train_seconds", float("nan"))
print(f"{kind:8s} {int(n):5d} steps  train {secs:7.1f} s  adherence all {a['overall']['all']:.1%}  seen {a['seen']['all']:.1%}  held_out {a['held_out']['all']:.1%}")
PY
done
