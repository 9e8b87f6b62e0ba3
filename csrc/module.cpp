// The Python extension module pydistill_ext._C. Importing it runs the static
// TORCH_LIBRARY registrations of csrc/registration.cpp and the backend kernels; the ops
// themselves are reached through torch.ops.pydistill_ext.
#include <torch/extension.h>

PYBIND11_MODULE(_C, m) {
  m.doc() = "pydistill_ext native kernels (registered under torch.ops.pydistill_ext)";
#ifdef PYDISTILL_WITH_CUDA
  m.attr("with_cuda") = true;
#else
  m.attr("with_cuda") = false;
#endif
}
