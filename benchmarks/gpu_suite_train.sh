#!/usr/bin/env bash
# GPU suite for the trainer: stage-1 throughput (tokens/s, MFU) of two LM shapes, DDP and FSDP2.
#
#   bash benchmarks/gpu_suite_train.sh
#
# Four runs of benchmarks/train_throughput.py on one GPU, each under its own `timeout`:
#   smollm2-shaped (135M) x {ddp, fsdp}, 1b-shaped (Llama-3.2-1B, 1.24B) x {ddp, fsdp}.
# FSDP2 on a 1-GPU mesh shards nothing across devices. It still runs accelerate's FSDP2
# preparation, the DTensor parameters and the sharded checkpoint path, and measures what they cost.
# Designed to finish in under 6 minutes on one H200 (RUN_TIMEOUT per run, SUITE_BUDGET overall).
#
# Output, in $OUT (the device tool's output folder; ./gpu_suite_out when unset):
#   gpu_suite_train.json  every run's row (status, tokens/s, MFU, elapsed_s, error tail if any)
#   gpu_suite_train.md    the markdown table
#   gpu_suite_train.log   this script's whole console output
#
# Python: $PYTHON if set; else the repo's .venv when it has CUDA; else python3 (on the lent GPU
# machine, the image's python3 has torch, transformers, accelerate and tokenizers). webdataset
# and braceexpand are the only other packages the trainer imports. When they are missing, the
# script installs them from wheels in .whl/ (carry it along). Make the wheels on a machine with
# a package index:
#   python3 -m pip download --no-deps --only-binary=:all: -d .whl webdataset==1.0.2 braceexpand==0.1.7
# The script stops at once, with exit status 2, when torch sees no CUDA device or a package is
# missing. One failing run is recorded in the JSON, and the other runs still go ahead.
# Test hook: ALLOW_CPU=1 MODELS=tiny runs the same flow on a CPU (fp32; FSDP rows come out "skipped").
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
REPO=$(pwd)
OUT=${OUT:-$REPO/gpu_suite_out}
WORK=${WORK:-${TMPDIR:-/tmp}/gpu_suite_train_work}
RUN_TIMEOUT=${RUN_TIMEOUT:-85}      # seconds per run (model build + launch + steps + checkpoint)
SUITE_BUDGET=${SUITE_BUDGET:-330}   # no new run starts after this many seconds
STEPS=${STEPS:-30}
BATCH=${BATCH:-32}
MODELS=${MODELS:-"smollm2 1b"}
LAUNCHERS=${LAUNCHERS:-"ddp fsdp"}
mkdir -p "$WORK/rows"
rm -f "$WORK"/rows/*.json
source benchmarks/gpu_suite_lib.sh
suite_start gpu_suite_train

# ---------------------------------------------------------------- interpreter and packages
PY=$(pick_python)
echo "[suite] python: $PY"
require_cuda "python benchmarks/train_throughput.py --models tiny --num-processes 1 --steps 3"
install_missing_wheels webdataset braceexpand
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
require_modules torch transformers accelerate tokenizers safetensors yaml numpy webdataset braceexpand
"$PY" - <<'EOF'
import accelerate, torch, transformers
gpu = f"{torch.cuda.get_device_name(0)} x{torch.cuda.device_count()}" if torch.cuda.is_available() else "none"
print(f"[suite] torch {torch.__version__} (CUDA {torch.version.cuda}), transformers {transformers.__version__}, "
      f"accelerate {accelerate.__version__}, GPU {gpu}")
EOF

# ---------------------------------------------------------------- runs
declare -a SUMMARY=()
for model in $MODELS; do
    for launcher in $LAUNCHERS; do
        name="$model-$launcher"
        now=$(date +%s)
        if (( now - SUITE_START > SUITE_BUDGET )); then
            echo "[suite] $name: skipped, suite budget of ${SUITE_BUDGET}s used"
            printf '{"model": "%s", "launcher": "%s", "status": "skipped", "error": "suite budget used"}\n' \
                "$model" "$launcher" > "$WORK/rows/$name.status.json"
            continue
        fi
        echo "[suite] ==== $name (timeout ${RUN_TIMEOUT}s)"
        t0=$(date +%s)
        if timeout --signal=TERM --kill-after=15 "$RUN_TIMEOUT" "$PY" benchmarks/train_throughput.py \
                --models "$model" --launcher "$launcher" --num-processes 1 --steps "$STEPS" \
                --batch-size "$BATCH" --workdir "$WORK" --run-timeout $(( RUN_TIMEOUT - 10 )) \
                --out "$WORK/rows/$name.json"; then
            rc=0
        else
            rc=$?
        fi
        elapsed=$(( $(date +%s) - t0 ))
        printf '{"model": "%s", "launcher": "%s", "rc": %d, "elapsed_s": %d}\n' \
            "$model" "$launcher" "$rc" "$elapsed" > "$WORK/rows/$name.status.json"
        echo "[suite] $name: rc=$rc elapsed=${elapsed}s"
        SUMMARY+=("$name rc=$rc ${elapsed}s")
    done
done

# ---------------------------------------------------------------- merge
"$PY" - "$WORK/rows" "$OUT" "$(( $(date +%s) - SUITE_START ))" "$MODELS" "$LAUNCHERS" "$(cd "$(dirname "$0")" && pwd)" <<'EOF'
import json, sys
from pathlib import Path

rows_dir, out, total_s = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3])
models, launchers = sys.argv[4].split(), sys.argv[5].split()
rows, meta = [], {}
for m in models:
    for l in launchers:
        status = json.loads((rows_dir / f"{m}-{l}.status.json").read_text())
        res = rows_dir / f"{m}-{l}.json"
        if res.is_file():
            data = json.loads(res.read_text())
            meta = {k: data[k] for k in ("device", "torch")}
            row = data["rows"][0] | {"elapsed_s": status.get("elapsed_s"), "rc": status.get("rc")}
        else:  # killed by the outer timeout before writing, or skipped
            rc = status.get("rc")
            row = {"model": m, "launcher": l, "num_processes": 1, "elapsed_s": status.get("elapsed_s"), "rc": rc,
                   "status": status.get("status") or ("timeout" if rc in (124, 137) else "failed"),
                   "error": status.get("error", "no result written (see gpu_suite_train.log)")}
        rows.append(row)
result = {"suite": "gpu_suite_train", "total_s": total_s, **meta, "rows": rows}
(out / "gpu_suite_train.json").write_text(json.dumps(result, indent=1, default=float))

sys.path.insert(0, str(Path(sys.argv[6])))
from train_throughput import results_table  # noqa: E402

lines = [results_table(rows, elapsed=True).rstrip("\n")]
head = f"Device: {meta.get('device', {}).get('name', '?')}; torch {meta.get('torch', '?')}; suite {total_s} s.\n\n"
table = head + "\n".join(lines) + "\n"
(out / "gpu_suite_train.md").write_text(table)
print(table)
EOF

echo "[suite] runs: ${SUMMARY[*]:-none}"
echo "[suite] total $(( $(date +%s) - SUITE_START ))s; results in $OUT/gpu_suite_train.json and $OUT/gpu_suite_train.md"
