# Shared by the GPU suites (sourced, not run): interpreter choice and offline wheel installs.
#
#   source benchmarks/gpu_suite_lib.sh
#   PY=$(pick_python)                        # $PYTHON, else the repo's .venv when it has CUDA, else python3
#   require_cuda "hint for CPU users"        # exit 2 unless torch sees a CUDA device (ALLOW_CPU=1 skips)
#   install_missing_wheels MOD...            # pip-install .whl/<MOD>-*.whl for modules not importable
#   require_modules MOD...                   # exit 2 naming the modules still missing
#   suite_start NAME                         # log everything to $OUT/NAME.log, start the clock, offline env
# Needs REPO (the repository root, also the working directory) and OUT.

suite_start() {
    mkdir -p "$OUT"
    exec > >(tee "$OUT/$1.log") 2>&1
    SUITE_START=$(date +%s)
    export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
}

HAS_CUDA='import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)'

pick_python() {
    if [[ -n "${PYTHON:-}" ]]; then echo "$PYTHON"; return; fi
    if [[ -x .venv/bin/python ]] && .venv/bin/python -c "$HAS_CUDA" 2>/dev/null; then
        echo "$REPO/.venv/bin/python"; return
    fi
    command -v python3
}

require_cuda() {
    if [[ "${ALLOW_CPU:-0}" != 1 ]] && ! "$PY" -c "$HAS_CUDA"; then
        TORCH=$("$PY" -c 'import torch; print(torch.__version__)' 2>&1 | tail -1)
        echo "[suite] ERROR: $PY lacks torch or torch sees no CUDA device (torch: $TORCH)." >&2
        echo "[suite] This suite needs a GPU. On a CPU, run instead:" >&2
        echo "[suite]   $1" >&2
        exit 2
    fi
}

missing() { "$PY" - "$@" <<'PYEOF'
import importlib.util, sys
print(" ".join(m for m in sys.argv[1:] if importlib.util.find_spec(m) is None))
PYEOF
}

install_missing_wheels() {
    local need w m
    need=$(missing "$@")
    [[ -z "$need" ]] && return 0
    SITE=${TMPDIR:-/tmp}/anisogen_site
    local wheels=()
    for m in $need; do
        for w in .whl/"$m"-*.whl .whl/"$m"_*.whl; do  # open_clip -> open_clip_torch-*.whl
            if [[ -f "$w" ]]; then wheels+=("$w"); fi
        done
    done
    if [[ ${#wheels[@]} -gt 0 ]]; then
        echo "[suite] installing ${wheels[*]} into $SITE"
        "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" "${wheels[@]}"
        export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
    fi
}

require_modules() {
    local need
    need=$(missing "$@")
    if [[ -n "$need" ]]; then
        echo "[suite] ERROR: missing Python packages: $need" >&2
        echo "[suite] carry wheels in .whl/ (see the header of the suite script), or set PYTHON to an interpreter that has them" >&2
        exit 2
    fi
}
