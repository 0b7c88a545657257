#!/usr/bin/env bash
# GPU suite for the generator: encoder-only vs whole-pipeline texts/s, ViT-B-32 and ViT-L-14.
#
#   bash benchmarks/gpu_suite_generate.sh
#
# One run of benchmarks/gpu_generate.py per model, each under its own `timeout` (random weights, bf16):
#   ViT-B-32 on 1,000,000 texts and ViT-L-14 on 250,000 texts, each with ~16-token and ~40-token captions,
#   the encoder alone, and the pipeline (read, tokenise in 8 workers, encode, align on the GPU with ReAlign
#   and with AnisoAlign, one async copy per shard, background writer).
# Designed to finish in under 6 minutes on one H100/H200 (RUN_TIMEOUT per model, SUITE_BUDGET overall).
# Targets (issue 15): >= 150k texts/s for ViT-B-32 on ~16-token captions; pipeline / encoder >= 0.85 with
# AnisoAlign.
#
# Output, in $OUT (the device tool's output folder; ./gpu_suite_out when unset):
#   gpu_generate_<model>.json   the rows of each model
#   gpu_suite_generate.log      this script's whole console output (the markdown tables)
#
# Python: $PYTHON if set; else the repo's .venv when it has CUDA; else python3. The generator needs
# open_clip_torch, ftfy, regex, datasets, safetensors, tokenizers, numpy and tqdm; missing pure-Python
# packages are installed from wheels in .whl/ when present (carry it along). Make the wheels on a machine
# with a package index:
#   python3 -m pip download --no-deps --only-binary=:all: -d .whl open_clip_torch ftfy regex datasets
# The script stops at once, with exit status 2, when torch sees no CUDA device or a package is missing.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
REPO=$(pwd)
OUT=${OUT:-$REPO/gpu_suite_out}
RUN_TIMEOUT=${RUN_TIMEOUT:-170}
SUITE_BUDGET=${SUITE_BUDGET:-330}
MODELS=${MODELS:-"ViT-B-32:1000000 ViT-L-14:250000"}
WORKERS=${WORKERS:-8}
source benchmarks/gpu_suite_lib.sh
suite_start gpu_suite_generate
PY=$(pick_python)
echo "[suite] python: $PY"
ALLOW_CPU=0 require_cuda "python benchmarks/bench_generate_ceiling.py (the CPU-side ceiling)"
install_missing_wheels open_clip ftfy regex datasets
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
require_modules torch open_clip ftfy regex datasets safetensors tokenizers numpy tqdm

for spec in $MODELS; do
    model=${spec%%:*}; n=${spec##*:}
    if (( $(date +%s) - SUITE_START > SUITE_BUDGET )); then
        echo "[suite] $model: skipped, suite budget of ${SUITE_BUDGET}s used"; continue
    fi
    echo "[suite] ==== $model, $n texts (timeout ${RUN_TIMEOUT}s)"
    timeout --signal=TERM --kill-after=15 "$RUN_TIMEOUT" "$PY" benchmarks/gpu_generate.py --models "$model" \
        --texts "$n" --workers "$WORKERS" --out "$OUT/gpu_generate_$model.json" || echo "[suite] $model: rc $?"
done
echo "[suite] done in $(( $(date +%s) - SUITE_START ))s"
