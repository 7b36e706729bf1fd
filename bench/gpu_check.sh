#!/usr/bin/env bash
# GPU check of the three GPU targets on the bundled all-MiniLM-L6-v2: install the GPU stack, build cuda-fp16,
# tensorrt-fp16 and tensorrt-int8 (each validated against PyTorch on its own provider inside `optpipe run`),
# then time batch 1/8/32 at sequence 128. Figures go to a results file; nothing is claimed that did not run.
#
#   bench/gpu_check.sh               on a GPU machine: installs into the current python3 environment
#   bench/gpu_check.sh --dry-run     (or CPU_ONLY=1) without a GPU: no install; builds and validates on CPU,
#                                    checks the missing-provider message, times on CPU (not GPU figures)
#
# Environment:
#   WHEELHOUSE=DIR   install offline from wheels in DIR (pip --no-index --find-links DIR). It must hold
#                    onnxruntime-gpu, tensorrt-cu<CUDA major> + _libs + _bindings (the real wheels from
#                    pypi.nvidia.com: PyPI has only stubs), the project's dependencies, setuptools>=77 and wheel.
#                    Without it, PyPI and pypi.nvidia.com must be reachable.
#   RESULTS=DIR      where results go (default: $OUT when set, else bench/results; dry runs: /tmp/optpipe-gpu-check)
#   SKIP_INSTALL=1   the GPU stack is already installed
#   PYTHON=python3   interpreter to use
# Exit codes: 0 all three built and timed on their providers; 1 a target failed; 2 a GPU provider is missing;
# 4 no GPU, or the GPU stack cannot be installed (no package index and no WHEELHOUSE).
set -uo pipefail
cd "$(dirname "$0")/.."

DRY=${CPU_ONLY:-0}
[[ "${1:-}" == "--dry-run" ]] && DRY=1
PY=${PYTHON:-python3}
TARGETS=(cuda-fp16 tensorrt-fp16 tensorrt-int8)
STAMP=$(date -u +%Y%m%dT%H%M%SZ)
if [[ $DRY == 1 ]]; then RESULTS=${RESULTS:-/tmp/optpipe-gpu-check}; else RESULTS=${RESULTS:-${OUT:-bench/results}}; fi
WORK=${WORK:-/tmp/optpipe-gpu-check-work}
mkdir -p "$RESULTS" "$WORK"
export OPTPIPE_CACHE=${OPTPIPE_CACHE:-$WORK/cache} HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONUNBUFFERED=1 \
       TOKENIZERS_PARALLELISM=false
PREFIX="$RESULTS/gpu_check-$STAMP$([[ $DRY == 1 ]] && echo -cpu-dry-run)"
exec > >(tee -a "$PREFIX.log") 2>&1
say() { echo "== $(date -u +%H:%M:%S) $*"; }
started=$SECONDS

say "optpipe GPU check ($([[ $DRY == 1 ]] && echo 'CPU dry run' || echo GPU)), results: $PREFIX.*"
git log -1 --format='commit %H %s' 2>/dev/null || true

if [[ $DRY != 1 ]]; then
    if ! nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader; then
        say "no NVIDIA GPU visible (nvidia-smi failed): run with --dry-run on CPU machines"; exit 4
    fi
fi

gpu_stack_works() {
    "$PY" - <<'EOF' 2>/dev/null
import sys
from optpipe.session import provider_works
sys.exit(0 if provider_works("CUDAExecutionProvider") else 1)
EOF
}

install_gpu_stack() {
    local pip=("$PY" -m pip install -q --disable-pip-version-check)
    if [[ -n "${WHEELHOUSE:-}" ]]; then
        pip+=(--no-index --find-links "$WHEELHOUSE")
    elif ! timeout 30 "$PY" -m pip index versions onnxruntime-gpu >/dev/null 2>&1; then
        say "cannot install the GPU stack: no package index reachable and no WHEELHOUSE given"
        say "needed: onnxruntime-gpu (~256 MB wheel), tensorrt-cu13 10.x libs, this project's dependencies"
        return 4
    fi
    # The machine's own CUDA build of torch stays: the project's constraints pin the CPU torch of dev machines.
    grep -v '^torch' constraints.txt > "$WORK/constraints-gpu.txt"
    say "installing optpipe (-e .) with its dependencies"
    "${pip[@]}" -c "$WORK/constraints-gpu.txt" -e . || return 4
    # onnxruntime and onnxruntime-gpu unpack into the same onnxruntime/ folder: never both at once.
    say "replacing onnxruntime with onnxruntime-gpu[cuda,cudnn]"
    "$PY" -m pip uninstall -y -q onnxruntime || true
    "${pip[@]}" "onnxruntime-gpu[cuda,cudnn]" || return 4
    local cuda
    cuda=$("$PY" -c "import onnxruntime.capi.build_and_package_info as b; print(b.cuda_version.split('.')[0])")
    # onnxruntime's TensorRT EP links libnvinfer.so.10: TensorRT 10, built for the same CUDA major.
    say "installing tensorrt-cu$cuda 10.x (onnxruntime-gpu is built on CUDA $cuda)"
    # TensorRT's PyPI packages are stubs that download the real wheels from NVIDIA's index at install time.
    local nvidia=()
    [[ -z "${WHEELHOUSE:-}" ]] && nvidia=(--extra-index-url https://pypi.nvidia.com)
    "${pip[@]}" "${nvidia[@]}" "tensorrt-cu$cuda>=10,<11" || say "TensorRT did not install: the tensorrt targets will say so"
}

if [[ $DRY != 1 && ${SKIP_INSTALL:-0} != 1 ]]; then
    if gpu_stack_works; then
        say "CUDAExecutionProvider already works in $PY: skipping the install"
    else
        install_gpu_stack || exit $?
    fi
fi

say "versions and providers"
"$PY" - <<'EOF'
import onnxruntime as ort
from optpipe.session import provider_problem
print("onnxruntime", ort.__version__, ort.get_device(), ort.get_available_providers())
for provider in ("CUDAExecutionProvider", "TensorrtExecutionProvider"):
    print(f"{provider}: {provider_problem(provider) or 'works'}")
EOF
if [[ $DRY != 1 ]] && ! gpu_stack_works; then
    say "CUDAExecutionProvider does not start: see the line above"; exit 2
fi

status=0
built=()
for target in "${TARGETS[@]}"; do
    say "building $target (validation runs on its provider, or on CPU with the GPU run deferred)"
    if timeout 900 "$PY" -m optpipe run --target "$target" --output "$WORK/artifacts/$target" --overwrite; then
        built+=("$WORK/artifacts/$target")
    else
        say "$target FAILED (exit $?)"; status=1
    fi
done

if [[ ${#built[@]} -gt 0 ]]; then
    if [[ $DRY == 1 ]]; then
        say "GPU timing path: must refuse in one line with exit 4 (no GPU provider here)"
        "$PY" bench/gpu_latency.py "${built[@]}" --iters 1 --warmup 0
        rc=$?; [[ $rc == 4 ]] || { say "expected exit 4, got $rc"; status=1; }
        say "timing on CPU (exercises the harness; these are NOT GPU figures)"
        "$PY" bench/gpu_latency.py "${built[@]}" --cpu --batch-sizes 1,8,32 --seq 128 --iters 5 --warmup 1 \
            --json "$PREFIX.json" --markdown "$PREFIX.md" || status=1
    else
        say "timing bs 1/8/32, seq 128 on each target's provider"
        "$PY" bench/gpu_latency.py "${built[@]}" --batch-sizes 1,8,32 --seq 128 --iters 100 --warmup 20 \
            --json "$PREFIX.json" --markdown "$PREFIX.md" || status=$?
        if "$PY" -c "import optpipe.perf.harness" 2>/dev/null; then
            say "optpipe's harness: the three interleaved, ratios to cuda-fp16 with confidence intervals"
            "$PY" - "$PREFIX-harness.json" "${built[@]}" <<'EOF' || status=1
import sys
from pathlib import Path
from optpipe.perf.harness import bench, bench_json
result = bench(sys.argv[2:], batches=[1, 8, 32], seqs=[128], seconds=5.0, progress=print)
Path(sys.argv[1]).write_text(bench_json(result))
EOF
        fi
        nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem,temperature.gpu --format=csv >> "$PREFIX.md"
    fi
    for art in "${built[@]}"; do cp "$art/manifest.json" "$PREFIX-$(basename "$art")-manifest.json"; done
fi
say "done in $((SECONDS - started)) s, status $status; results: $PREFIX*"
exit $status
