// metricops' operator library: every schema lives here, in one TORCH_LIBRARY
// block. Kernels register themselves from cpu/ and cuda/; fake kernels and
// autograd are registered from Python (metricops/_registrations.py).
#include <Python.h>
#include <torch/library.h>

#include <string>

// `import metricops._C` only needs to run the static registrations below, so
// the module has no pybind11 bindings (and builds against the limited API).
extern "C" {
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {
      PyModuleDef_HEAD_INIT, "_C", "metricops native operators (registered under torch.ops.metricops)", -1,
      nullptr,
  };
  return PyModule_Create(&module_def);
}
}

namespace metricops {

std::string build_info() {
  std::string info = "cpu";
#ifdef METRICOPS_WITH_CUDA
  info += "|cuda";
#ifdef METRICOPS_CUDA_ARCHS
  info += std::string("|archs=") + METRICOPS_CUDA_ARCHS;
#endif
#endif
#ifdef __SANITIZE_ADDRESS__
  info += "|asan";
#endif
  return info;
}

TORCH_LIBRARY(metricops, m) {
  // "cpu|cuda|archs=8.0;9.0": which backends this binary was compiled with.
  m.def("_build_info() -> str", &build_info);

  // Distances. y=None means y=x (then the euclidean diagonal is exactly 0).
  m.def("pairwise_distance(Tensor x, Tensor? y, str metric) -> Tensor");
  // grad_y is an empty (0, D) tensor when y is None.
  m.def(
      "pairwise_distance_backward(Tensor grad, Tensor x, Tensor? y, Tensor dist, str metric) "
      "-> (Tensor grad_x, Tensor grad_y)");

  // Retrieval. database=None searches the queries against themselves, each
  // query leaving itself out. Sorted by (distance, index), NaN last; not
  // differentiable. chunk_size > 0 overrides the block sizes (tests use it to
  // cross chunk boundaries); 0 picks them per device.
  m.def(
      "knn(Tensor queries, Tensor? database, int k, str metric, int chunk_size=0) "
      "-> (Tensor distances, Tensor indices)");
}

}  // namespace metricops
