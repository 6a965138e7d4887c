// The extension module structure_ops._C_cuda (built by setup.py when torch has CUDA and nvcc is found).
// Importing it runs the TORCH_LIBRARY_IMPL(structure_ops, CUDA, ...) registrations of structure_cuda.cu,
// clip_cuda.cu and knn_cuda.cu; the op schemas are defined in Python (structure_ops/_ops.py).
#include <Python.h>

extern "C" {
PyMODINIT_FUNC PyInit__C_cuda(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C_cuda", "structure_ops CUDA kernels", -1,
                                          nullptr, nullptr, nullptr, nullptr, nullptr};
  return PyModule_Create(&module_def);
}
}
