// The pybind11 module regdrop_fast._C. Ops register themselves with the dispatcher from their
// own files (TORCH_LIBRARY_FRAGMENT(regdrop_fast, m) for schemas and CPU kernels,
// TORCH_LIBRARY_IMPL(regdrop_fast, CUDA, m) in the .cu files) and are called as
// torch.ops.regdrop_fast.<op>; importing this module loads them, and then imports their fake
// (meta) implementations, regdrop_fast/_fake_ops.py, which torch.compile and meta tensors use.
// This file also reports how the module was built.
#include <torch/extension.h>

namespace {

bool compiled_with_cuda() {
#ifdef REGDROP_WITH_CUDA
  return true;
#else
  return false;
#endif
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "regdrop_fast C++/CUDA kernels (ops are registered under torch.ops.regdrop_fast)";
  pybind11::module_::import("regdrop_fast._fake_ops");
  m.def("compiled_with_cuda", &compiled_with_cuda,
        "True if the CUDA kernels (csrc/*.cu) were compiled into this module");
}
