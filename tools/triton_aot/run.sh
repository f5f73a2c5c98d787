#!/usr/bin/env bash
# sm_90 compile check of every Triton kernel the tests launch (see record.py, compile.py):
# runs the kernel tests under the interpreter with the launch recorder on, adds the launches
# the library makes on a GPU (gpu_launches.py, a dry run on meta tensors), then compiles each
# recorded kernel specialization for an H100 with the real compiler (no GPU needed), prints
# registers, spills, shared memory and wgmma use per specialization, and fails on a bf16/fp16
# GPU specialization that spills or has a dot without wgmma (unless allowlist.py names it).
#   tools/triton_aot/run.sh [extra compile.py args]     PYTHON=... to pick the interpreter
# Exit status: the tests' if they fail, else compile.py's (1 on any kernel that fails).
set -euo pipefail
cd "$(dirname "$0")/../.."
PY="${PYTHON:-.venv/bin/python}"

status=0
"$PY" tools/triton_aot/compile.py --check-backend || status=$?
if [ "$status" -eq 3 ]; then exit 0; fi  # no NVIDIA backend/ptxas: compile.py said why
if [ "$status" -ne 0 ]; then exit "$status"; fi

# REGDROP_AOT_RECORDS=file: launches already recorded by a test run (`make test` records them
# during its pytest pass, so the kernel tests do not run twice); otherwise run them here.
if [ -n "${REGDROP_AOT_RECORDS:-}" ] && [ -s "$REGDROP_AOT_RECORDS" ]; then
    records="$(mktemp -t regdrop-triton-launches.XXXXXX.jsonl)"
    trap 'rm -f "$records"' EXIT
    # only the library's kernels: a whole-suite run also records kernels the tests define
    # (tests/test_triton_aot.py launches one the compiler must reject)
    grep '"module": "regdrop_fast\.' "$REGDROP_AOT_RECORDS" > "$records" || true
else
    records="$(mktemp -t regdrop-triton-launches.XXXXXX.jsonl)"
    trap 'rm -f "$records"' EXIT
    # The kernel tests, whole files: between them they launch every kernel in triton_kernels/
    # with the specializations the library uses (dtypes, flags, block sizes, int widths).
    tests=()
    for f in philox masks rdrop rdrop_fused_linear addrop_mask masked_attention masked_linear \
             childtuning masked_adamw; do
        if [ -f "tests/test_$f.py" ]; then tests+=("tests/test_$f.py"); fi
    done
    # Their own sm_90 compile tests are deselected: they launch nothing.
    REGDROP_AOT_RECORD="$records" TRITON_INTERPRET=1 HF_HUB_OFFLINE=1 "$PY" -m pytest -q \
        -m "not slow" -k "not kernels_compile_for_sm90" -p no:cacheprovider "${tests[@]}"
fi

# The launches a GPU would make (its tile sizes, bf16, the benchmarks' shapes), dry-run on
# meta tensors; compile.py holds their bf16/fp16 specializations to the rules of policy.py
# (no spills, wgmma for dots) unless allowlist.py names them.
gpu_records="$(mktemp -t regdrop-triton-gpu-launches.XXXXXX.jsonl)"
trap 'rm -f "$records" "$gpu_records"' EXIT
"$PY" tools/triton_aot/gpu_launches.py "$gpu_records"

# "main": launches that differ only in Triton's value specializations (an int == 1, a
# divisibility-by-16 hint) compile once, which keeps this within a few minutes on 2 cores.
"$PY" tools/triton_aot/compile.py --specializations main --jobs 2 \
    --expect-kernels regdrop_fast.triton_kernels --gpu-records "$gpu_records" "$@" "$records"
