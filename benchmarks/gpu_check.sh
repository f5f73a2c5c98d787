#!/usr/bin/env bash
# The one command for a CUDA machine that already has torch, triton and transformers installed
# and no network: builds the CUDA extension in place, runs the kernel tests on CUDA tensors, runs
# `regdrop-fast bench`, then the rest of the test suite, and writes everything into OUTDIR:
#   env.txt                       nvidia-smi, compiler and package versions
#   build.log, imports.log        extension build; import of every module without the interpreter
#   op_errors.log                 raw ops given bad arguments: raise or crash? (op_error_probe.py)
#   pytest_cuda.{log,xml}         the kernel tests on CUDA tensors (REGDROP_TEST_DEVICE=cuda,
#                                 TRITON_INTERPRET=0), the tests marked cuda among them
#   bench.log, results.{jsonl,md,png}   (rows written after each bench)
#   pytest_all.{log,xml}          the rest of the suite, likewise on CUDA
#   summary.txt                   one line per stage: ok / FAILED / SKIPPED, seconds
# Both pytest stages spread over pytest-xdist workers when it is installed.
# results.md is also copied to benchmarks/results/<device-name>-<date>.md.
#
# --playbook (issue 13): the one prepared command of a short GPU lease, 8 minutes on an H200
# with the build: env, liger (installs .whl/liger_kernel-*.whl when present, offline), build,
# pytest_cuda (kernel tests, fast subset), autotune (benchmarks/autotune_sweep.py: winning
# config per kernel at the benchmark shapes), bench (full sizes, eager + CUDA-graph times,
# roofline), goals (one row per performance goal of the open issues: goal, measured, met).
# results.md (+ goals and autotune tables) and results.jsonl are copied to
# benchmarks/results/<device>-<date>.{md,jsonl}. --remeasure "OP ..." re-measures those ops
# only (env, liger, build, bench, goals; 3 minutes). --dry-run stubs every GPU stage (a
# synthetic results.jsonl stands for the benches) and copies nothing: the plumbing, on CPU.
#   .whl/: `pip download liger-kernel --no-deps -d .whl/` on a machine with a registry; the
#   run tool carries it with the tree (`carry: [".whl"]`).
#
# Every stage runs even when an earlier one failed; the exit status is 1 if any failed.
# A time budget (default 480 s, ~8 min on an H100) bounds the whole run: each stage gets a
# timeout out of what is left, keeping a reserve for the stages after it.
set -uo pipefail

usage() {
    cat >&2 <<'EOF'
usage: bash benchmarks/gpu_check.sh OUTDIR [--quick] [--ops "OP ..."] [--with-slow] [--budget S]
                                   [--stages "STAGE ..."] [--kernel-tests "NAME ..."]
       bash benchmarks/gpu_check.sh OUTDIR --playbook [--dry-run]
       bash benchmarks/gpu_check.sh OUTDIR --remeasure "OP ..." [--dry-run]
  --quick          quick benchmark sizes (default: full sizes)
  --ops "OP ..."   only these benches (benchmarking/ops/<op>.py), e.g. --ops "philox masks"
  --with-slow      include tests marked slow in the whole-suite run
  --budget S       wall-clock budget for all stages in seconds (default 480)
  --stages "..."   only these stages (env build imports op_errors pytest_cuda bench pytest_all)
  --playbook       the 8-minute GPU playbook (see the header of this script)
  --remeasure "OP ..."  re-measure these benches only (3-minute budget), with the goals table
  --dry-run        with --playbook/--remeasure: stub the GPU stages, check the plumbing on CPU
  --kernel-tests "..."  the kernel test files of pytest_cuda, by the NAME of tests/test_NAME.py
                   (default: all of them); pytest_all still leaves out the default list
Environment: PYTHON (default python, else python3), MAX_JOBS, TORCH_CUDA_ARCH_LIST.
EOF
    exit 2
}

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
SELF="$ROOT/benchmarks/gpu_check.sh"

# ---------------------------------------------------------------- stages (run as `__stage NAME`)
stage_env() {
    {
        echo "# gpu_check.sh $(date -u +%Y-%m-%dT%H:%M:%SZ)"
        echo "## git"; git -C "$ROOT" rev-parse HEAD 2>&1; git -C "$ROOT" status --short 2>&1
        echo "## nvidia-smi"; nvidia-smi 2>&1
        echo "## nvcc"; nvcc --version 2>&1 || echo "nvcc not on PATH"
        echo "## c++"; c++ --version 2>&1 | head -1
        echo "## python packages"
        "$PY" - <<'PYEOF' 2>&1
import platform, sys
print("python", platform.python_version(), sys.executable)
import torch
print("torch", torch.__version__, "cuda", torch.version.cuda, "cudnn",
      torch.backends.cudnn.version())
print("cuda available", torch.cuda.is_available())
if torch.cuda.is_available():
    print("device", torch.cuda.get_device_name(0),
          "capability", torch.cuda.get_device_capability(0))
for name in ("triton", "transformers", "numpy", "matplotlib", "ninja", "setuptools", "pytest",
             "hypothesis"):
    try:
        module = __import__(name)
        print(name, getattr(module, "__version__", "?"))
    except Exception as exc:
        print(name, "NOT IMPORTABLE:", exc)
PYEOF
    } > "$OUT/env.txt"
    cat "$OUT/env.txt"
    "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'no CUDA device')"
}

stage_build() {
    export MAX_JOBS="${MAX_JOBS:-$(nproc)}"
    if [[ -z "${TORCH_CUDA_ARCH_LIST:-}" ]]; then
        # only this device's architecture: a fraction of the compile time of torch's default list
        local arch
        arch="$("$PY" -c 'import torch; print("%d.%d" % torch.cuda.get_device_capability(0))')" \
            && export TORCH_CUDA_ARCH_LIST="$arch"
    fi
    echo "MAX_JOBS=$MAX_JOBS TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-<torch default>}"
    cd "$ROOT" || return 1
    # editable install: builds regdrop_fast._C in place and maps regdrop_fast.triton_kernels;
    # --no-index: there is no network, never wait on it
    if "$PY" -m pip install --no-index --no-build-isolation --no-deps -v -e .; then
        :
    else
        echo "pip install -e . failed; building the extension in place with setup.py"
        "$PY" setup.py build_ext --inplace || return 1
    fi
    "$PY" - <<'PYEOF'
import sys
from regdrop_fast import backends
reason = backends.unavailable_reason("cuda", "cuda")
print("cuda backend:", "available" if reason is None else reason)
sys.exit(0 if reason is None else 1)
PYEOF
}

stage_imports() {
    # every module imported without TRITON_INTERPRET: the kernels must compile for the GPU
    cd "$ROOT" || return 1
    env -u TRITON_INTERPRET "$PY" - <<'PYEOF'
import importlib, pkgutil, sys
import torch
from regdrop_fast import backends
failed = []
# triton_kernels is mapped from another folder, so it is walked on its own
for package in ("regdrop_fast", "regdrop_fast.triton_kernels"):
    path = importlib.import_module(package).__path__
    for info in pkgutil.walk_packages(path, package + "."):
        if info.name.endswith("__main__"):  # runs the CLI on import
            continue
        try:
            importlib.import_module(info.name)
            print("ok  ", info.name)
        except Exception as exc:
            failed.append(info.name)
            print("FAIL", info.name, repr(exc))
print("available backends for cuda tensors:", backends.available(torch.device("cuda")))
sys.exit(1 if failed else 0)
PYEOF
}

stage_op_errors() {
    # raw extension ops given bad arguments: a Python exception, or a crash (the first H200 run
    # crashed on two CUDA cases; tools/op_error_probe.py runs each case in its own process)
    cd "$ROOT" || return 1
    "$PY" tools/op_error_probe.py --device cuda cpu
}

# the kernel tests (every backend against the reference, plus the tests marked cuda): run
# before the benchmarks; the rest of the suite (integrations, CLI, training) runs after them
KERNEL_TESTS=(philox masks backends rdrop rdrop_forward rdrop_fused_linear childtuning fisher
              addrop_mask masked_attention masked_linear)
SELECTED_KERNEL_TESTS=("${KERNEL_TESTS[@]}")
# shellcheck disable=SC2206  # a space separated list of names
[[ -n "${ONLY_KERNEL_TESTS:-}" ]] && SELECTED_KERNEL_TESTS=(${ONLY_KERNEL_TESTS})

pytest_args() {  # common arguments: workers (pytest-xdist), a per-test bound (pytest-timeout)
    local args=(-q -p no:cacheprovider)
    [[ "$WITH_SLOW" == 1 ]] || args+=(-m "not slow")
    # every kernel specialization is compiled for the GPU on first use: spread it over processes
    if "$PY" -c "import xdist" > /dev/null 2>&1; then
        args+=(-n "${PYTEST_WORKERS:-$(( $(nproc) < 8 ? $(nproc) : 8 ))}")
    fi
    if "$PY" -c "import pytest_timeout" > /dev/null 2>&1; then
        args+=(--timeout 180)
    fi
    printf '%s\n' "${args[@]}"
}

stage_pytest_cuda() {
    cd "$ROOT" || return 1
    local args files=() name
    mapfile -t args < <(pytest_args)
    for name in "${SELECTED_KERNEL_TESTS[@]}"; do
        [[ -f "tests/test_$name.py" ]] && files+=("tests/test_$name.py")
    done
    REGDROP_TEST_DEVICE=cuda TRITON_INTERPRET=0 "$PY" -m pytest "${args[@]}" \
        --junitxml="$OUT/pytest_cuda.xml" "${files[@]}"
}

stage_pytest_all() {
    cd "$ROOT" || return 1
    local args ignore=() name
    mapfile -t args < <(pytest_args)
    for name in "${KERNEL_TESTS[@]}"; do
        ignore+=(--ignore "tests/test_$name.py")
    done
    REGDROP_TEST_DEVICE=cuda TRITON_INTERPRET=0 "$PY" -m pytest "${args[@]}" \
        --junitxml="$OUT/pytest_all.xml" "${ignore[@]}" tests
}

stage_liger() {
    # Liger-Kernel, the R-Drop bench's named baseline: offline, from the wheel carried in .whl/
    cd "$ROOT" || return 1
    local wheels=(.whl/liger_kernel-*.whl)
    if [[ ! -e "${wheels[0]}" ]]; then
        echo "no .whl/liger_kernel-*.whl: the liger rows are skipped"
        return 0
    fi
    "$PY" -m pip install --no-index --no-deps "${wheels[@]}"
    "$PY" -c "import liger_kernel.transformers as t; print('liger ok', t.__name__)"
}

stage_autotune() {
    cd "$ROOT" || return 1
    env -u TRITON_INTERPRET "$PY" benchmarks/autotune_sweep.py "$OUT"
}

stage_goals() {
    cd "$ROOT" || return 1
    [[ -s "$OUT/results.jsonl" ]] || { echo "no results.jsonl: no goals table"; return 1; }
    "$PY" -m regdrop_fast.benchmarking.goals "$OUT/results.jsonl" --out "$OUT/goals.md"
}

# --dry-run: the GPU stages print what they stand for; bench writes synthetic rows (two goals
# met, one not) so that the goals stage runs on a real results.jsonl
dry_stage() {
    echo "dry run: stage $1 stubbed (the GPU part)"
    [[ "$1" == bench ]] || return 0
    "$PY" - "$OUT/results.jsonl" <<'PYEOF'
import json, sys
rows = [dict(op="rdrop_loss_fwd_bwd", case="N=8192,V=32000", dtype="bfloat16", impl=impl,
             baseline="eager", ms=ms, roofline_share=share, graph_ms=ms, host_ms=0.0)
        for impl, ms, share in (("eager", 4.0, 0.1), ("liger", 2.0, 0.2),
                                ("rdrop_loss[triton]", 1.0, 0.7))]
rows.append(dict(op="childtuning_step", case="bert-large-335M", dtype="float32",
                 impl="torch-fused", baseline="torch-fused", ms=2.0, roofline_share=0.8))
rows.append(dict(op="childtuning_step", case="bert-large-335M", dtype="float32",
                 impl="ours-F[cuda]", baseline="torch-fused", ms=1.9, roofline_share=0.86))
with open(sys.argv[1], "a", encoding="utf-8") as f:
    f.writelines(json.dumps(r) + "\n" for r in rows)
print(f"dry run: wrote {len(rows)} synthetic rows to {sys.argv[1]}")
PYEOF
}

stage_bench() {
    cd "$ROOT" || return 1
    local args=(bench --device cuda --out "$OUT")
    [[ "$QUICK" == 1 ]] && args+=(--quick)
    # shellcheck disable=SC2206  # OPS is a space/comma separated list of op names
    [[ -n "$OPS" ]] && args+=(--ops ${OPS//,/ })
    if command -v regdrop-fast > /dev/null; then
        env -u TRITON_INTERPRET regdrop-fast "${args[@]}"
    else
        env -u TRITON_INTERPRET "$PY" -m regdrop_fast "${args[@]}"
    fi
}

if [[ "${1:-}" == "__stage" ]]; then
    if [[ "${DRY_RUN:-0}" == 1 && " env liger build pytest_cuda autotune bench " == *" $2 "* ]]
    then
        dry_stage "$2"
    else
        "stage_$2"
    fi
    exit $?
fi

# ---------------------------------------------------------------- arguments
[[ $# -ge 1 && "$1" != -* ]] || usage
OUT="$1"; shift
QUICK=0; OPS=""; WITH_SLOW=0; BUDGET=""; STAGES=""; ONLY_KERNEL_TESTS=""
MODE=full; DRY_RUN=0
while [[ $# -gt 0 ]]; do
    case "$1" in
        --playbook) MODE=playbook ;;
        --remeasure) [[ $# -ge 2 && -n "$2" ]] || usage; MODE=remeasure; OPS="$2"; shift ;;
        --dry-run) DRY_RUN=1 ;;
        --quick) QUICK=1 ;;
        --ops) [[ $# -ge 2 ]] || usage; OPS="$2"; shift ;;
        --with-slow) WITH_SLOW=1 ;;
        --stages) [[ $# -ge 2 ]] || usage; STAGES="$2"; shift ;;
        --kernel-tests) [[ $# -ge 2 ]] || usage; ONLY_KERNEL_TESTS="$2"; shift ;;
        --budget) [[ $# -ge 2 && "$2" =~ ^[0-9]+$ ]] || usage; BUDGET="$2"; shift ;;
        *) echo "unknown argument: $1" >&2; usage ;;
    esac
    shift
done
if [[ "$DRY_RUN" == 1 && "$MODE" == full ]]; then
    echo "--dry-run goes with --playbook or --remeasure" >&2; usage
fi
BASE=480; [[ "$MODE" == remeasure ]] && BASE=180
BUDGET="${BUDGET:-$BASE}"
if [[ "$MODE" == playbook && -z "$OPS" ]]; then
    OPS="rdrop childtuning addrop sparse host_overhead philox masks"  # most wanted first
fi
mkdir -p "$OUT" || exit 2
OUT="$(cd "$OUT" && pwd)"
if [[ -z "${PYTHON:-}" ]]; then
    PYTHON="$(command -v python || command -v python3)"
fi
PY="$PYTHON"
unset TRITON_INTERPRET
export OUT PY QUICK OPS WITH_SLOW ONLY_KERNEL_TESTS DRY_RUN HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PIP_NO_INPUT=1

# ---------------------------------------------------------------- driver
START=$SECONDS
FAILED=0
: > "$OUT/summary.txt"

# run_stage NAME CAP_S RESERVE_S: run stage NAME with a timeout of at most CAP_S seconds, keeping
# RESERVE_S for the stages after it (both given for the default budget BASE, scaled with BUDGET);
# log to OUTDIR/NAME.log
run_stage() {
    local name=$1 cap=$(( $2 * BUDGET / BASE )) reserve=$(( $3 * BUDGET / BASE ))
    [[ -n "$STAGES" ]] && reserve=0  # a chosen subset: each stage gets its cap
    local left=$(( BUDGET - (SECONDS - START) - reserve ))
    local limit=$(( left < cap ? left : cap ))
    local status t0=$SECONDS rc
    if [[ -n "$STAGES" && " $STAGES " != *" $name "* ]]; then
        status="not selected (--stages)"
    elif (( limit < 15 )); then
        status="SKIPPED (time budget of ${BUDGET}s spent)"
        FAILED=1
    else
        echo "==== $name (timeout ${limit}s; $(( BUDGET - (SECONDS - START) ))s of the" \
             "${BUDGET}s budget left) ===="
        timeout --kill-after=15 "$limit" bash "$SELF" __stage "$name" 2>&1 | tee "$OUT/$name.log"
        rc=${PIPESTATUS[0]}
        if (( rc == 0 )); then
            status="ok"
        elif (( rc == 124 || rc == 137 )); then
            status="FAILED (timed out after ${limit}s)"
            FAILED=1
        else
            status="FAILED (exit $rc)"
            FAILED=1
        fi
    fi
    printf '%-12s %-40s %4ds  %s\n' "$name" "$status" $(( SECONDS - t0 )) "$OUT/$name.log" \
        | tee -a "$OUT/summary.txt"
}

# (cap, reserve) per stage for the mode's default budget BASE (480 s; remeasure 180 s), scaled
# with --budget. The benchmarks run before the whole suite: their numbers
# are what a short GPU lease is for, and the suite takes whatever is left.
if [[ "$MODE" == playbook ]]; then
    run_stage env 20 450
    run_stage liger 20 430
    run_stage build 200 230
    run_stage pytest_cuda 60 200
    run_stage autotune 50 150
    run_stage bench 290 30
    run_stage goals 30 0
elif [[ "$MODE" == remeasure ]]; then
    run_stage env 15 165
    run_stage liger 15 150
    run_stage build 90 85
    run_stage bench 145 20
    run_stage goals 20 0
else
    run_stage env 30 440
    run_stage build 200 240
    run_stage imports 45 210
    run_stage op_errors 60 200
    run_stage pytest_cuda 120 150
    run_stage bench 260 40
    run_stage pytest_all 480 5
fi

if [[ "$DRY_RUN" == 1 ]]; then
    echo "dry run: nothing copied to benchmarks/results/" | tee -a "$OUT/summary.txt"
elif [[ -s "$OUT/results.md" ]]; then
    device="$("$PY" -c 'import torch; print(torch.cuda.get_device_name(0))' 2>/dev/null \
        || echo unknown-gpu)"
    slug="$(echo "$device" | tr '[:upper:]' '[:lower:]' | sed -E 's/[^a-z0-9]+/-/g; s/^-|-$//g')"
    dest="$ROOT/benchmarks/results/${slug}-$(date -u +%Y-%m-%d).md"
    [[ -e "$dest" ]] && dest="${dest%.md}-$(date -u +%H%M%S).md"
    {
        cat "$OUT/results.md"
        [[ -s "$OUT/goals.md" ]] && printf '\n## Performance goals of the open issues\n\n' \
            && cat "$OUT/goals.md"
        [[ -s "$OUT/autotune.md" ]] && printf '\n' && cat "$OUT/autotune.md"
    } > "$dest" && cp "$OUT/results.jsonl" "${dest%.md}.jsonl" \
        && echo "copied results.md (+ goals, autotune) and results.jsonl to ${dest%.md}.*" \
        | tee -a "$OUT/summary.txt"
else
    echo "no results.md: nothing copied to benchmarks/results/" | tee -a "$OUT/summary.txt"
    [[ -z "$STAGES" || " $STAGES " == *" bench "* ]] && FAILED=1
fi

echo "==== summary ($(( SECONDS - START ))s, budget ${BUDGET}s) ===="
cat "$OUT/summary.txt"
if [[ -s "$OUT/goals.md" ]]; then
    echo "==== performance goals ===="
    cat "$OUT/goals.md"
fi
exit $FAILED
