// The Python module oneref._C. Importing it runs the static registrations of the ops
// (torch.ops.oneref.*); the module itself only reports how it was built.
#include <Python.h>

#ifdef ONEREF_WITH_CUDA
#include <cuda_runtime_api.h>
#endif

namespace {

PyObject* built_with_cuda(PyObject*, PyObject*) {
#ifdef ONEREF_WITH_CUDA
  Py_RETURN_TRUE;
#else
  Py_RETURN_FALSE;
#endif
}

PyObject* cuda_version(PyObject*, PyObject*) {
#ifdef ONEREF_WITH_CUDA
  return PyUnicode_FromFormat("%d.%d", CUDART_VERSION / 1000, (CUDART_VERSION % 1000) / 10);
#else
  Py_RETURN_NONE;
#endif
}

PyMethodDef kMethods[] = {
    {"built_with_cuda", built_with_cuda, METH_NOARGS,
     "True when the CUDA kernels were compiled into the extension."},
    {"cuda_version", cuda_version, METH_NOARGS,
     "CUDA runtime version the kernels were compiled against (None without CUDA)."},
    {nullptr, nullptr, 0, nullptr}};

PyModuleDef kModule = {PyModuleDef_HEAD_INIT, "_C",
                       "Native ops of oneref (registered as torch.ops.oneref.*).", -1, kMethods};

}  // namespace

PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&kModule); }
