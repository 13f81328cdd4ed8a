#!/usr/bin/env bash
# Bit-identity check for a refactor: train every variant for a few seeded steps on the real
# activation cache, with the same command line as dvc.yaml's train@<variant>, and print the
# sha256 of each sae.safetensors and of its cfg.json minus the fields that differ per run
# (mlflow_run_id, the wall-clock seconds and tokens_per_s of train_summary). Run it on the old and on the new code into two directories and diff them:
#   bash scripts/refactor_check.sh /tmp/x/before  &&  (refactor)  &&
#   bash scripts/refactor_check.sh /tmp/x/after   &&  diff /tmp/x/before/sha256 /tmp/x/after/sha256
# Env: REPO (the pipeline whose data/activations and params.yaml are used; default /work/main),
# PY (python; default .venv/bin/python), N_TOKENS (train.n_tokens; default 32768),
# VARIANTS (default: the six of main's params.yaml), SRC (the saelab sources; default ./src). Writes only under OUTDIR.
set -euo pipefail
out=${1:?usage: refactor_check.sh OUTDIR}
repo=${REPO:-/work/main}
py=${PY:-.venv/bin/python}; [[ $py = /* ]] || py=$PWD/$py  # not realpath: a venv python is a symlink
n_tokens=${N_TOKENS:-32768}
variants=${VARIANTS:-topk batchtopk jumprelu relu sampled switch}
here=$(pwd)
src=${SRC:-$here/src}  # a snapshot of the old code lets you edit the checkout meanwhile
mkdir -p "$out"
out=$(cd "$out" && pwd)
: >"$out/sha256"
# params: the pipeline's, with a short run, no checkpoints and a private MLflow store
PYTHONPATH="$src" nice -n 19 "$py" - "$repo/params.yaml" "$out/params.yaml" "$n_tokens" \
  "sqlite:///$out/mlflow.db" <<'PYEOF'
import sys, yaml
src, dst, n, uri = sys.argv[1:]
p = yaml.safe_load(open(src))
p["train"]["n_tokens"] = int(n)
p["train"]["checkpoint_every"] = 0
p["tracking"]["tracking_uri"] = uri
yaml.safe_dump(p, open(dst, "w"), sort_keys=False)
PYEOF
for v in $variants; do
  # relative paths of params resolve against DVC_ROOT (the pipeline's root), as under dvc repro
  (cd "$repo" && DVC_ROOT="$repo" HF_HUB_OFFLINE=1 PYTHONPATH="$src" nice -n 19 \
    "$py" -m saelab.cli train --params "$out/params.yaml" --variant "$v" \
    --activations "$repo/data/activations" --out "$out/models/$v") >"$out/$v.log" 2>&1 \
    || { echo "train $v failed: see $out/$v.log" >&2; exit 1; }
  PYTHONPATH="$src" "$py" - "$out/models/$v/cfg.json" >"$out/models/$v/cfg.stable.json" <<'PYEOF'
import json, sys
cfg = json.load(open(sys.argv[1]))
meta = cfg.get("metadata", {})
meta.pop("mlflow_run_id", None)  # per run
for timing in ("seconds", "tokens_per_s"):  # wall clock
    meta.get("train_summary", {}).pop(timing, None)
print(json.dumps(cfg, indent=1, sort_keys=True))
PYEOF
  (cd "$out/models" && sha256sum "$v/sae.safetensors" "$v/cfg.stable.json") >>"$out/sha256"
done
cat "$out/sha256"
