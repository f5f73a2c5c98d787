"""Triton kernels of regdrop_fast, installed as `regdrop_fast.triton_kernels`.

Import these modules lazily (through the dispatch in regdrop_fast): importing triton decides
whether the interpreter is used, so TRITON_INTERPRET must be set before the first import."""
