// The extension module structure_ops._C. Importing it runs the TORCH_LIBRARY_IMPL registrations of the
// kernels compiled into it; the op schemas themselves are defined in Python (structure_ops/_ops.py), so
// the package works, on the reference backend, even where no extension was built.
#include <Python.h>

extern "C" {
PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", "structure_ops compiled kernels", -1,
                                          nullptr, nullptr, nullptr, nullptr, nullptr};
  return PyModule_Create(&module_def);
}
}
