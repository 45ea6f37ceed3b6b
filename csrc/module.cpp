// The Python module fastamp._C. The ops register themselves with the dispatcher when the library is
// loaded (TORCH_LIBRARY_IMPL blocks); the module only carries build facts for fastamp.build_info().
#include <Python.h>

#include "multi_tensor_plan.h"

#ifndef FASTAMP_CUDA_ARCHS
#define FASTAMP_CUDA_ARCHS ""
#endif
#ifndef FASTAMP_CUDA_VERSION
#define FASTAMP_CUDA_VERSION ""
#endif
#ifndef FASTAMP_TORCH_VERSION
#define FASTAMP_TORCH_VERSION ""
#endif
#ifndef FASTAMP_BLOCK_SHAPE
#define FASTAMP_BLOCK_SHAPE ""
#endif
#ifndef FASTAMP_SOURCE_HASH
#define FASTAMP_SOURCE_HASH ""
#endif

#if defined(_MSC_VER)
#define FASTAMP_KEEP extern "C" __declspec(dllexport)
#else
#define FASTAMP_KEEP extern "C" __attribute__((used, visibility("default")))
#endif

// Read from the file by fastamp/_build.py before the module is loaded, so that a module built for
// another torch is never loaded (loading it can crash or fail on missing libraries).
FASTAMP_KEEP const char fastamp_build_record[] =
    "FASTAMP_BUILD_RECORD{torch=" FASTAMP_TORCH_VERSION ";cuda=" FASTAMP_CUDA_VERSION ";archs=" FASTAMP_CUDA_ARCHS
    ";block=" FASTAMP_BLOCK_SHAPE ";source=" FASTAMP_SOURCE_HASH "}";

#if defined(FASTAMP_WITH_CUDA)
extern "C" int fastamp_cuda_driver_version();
#endif
#ifndef FASTAMP_LARGE_KERNEL_PARAMS
#define FASTAMP_LARGE_KERNEL_PARAMS 0
#endif

static PyModuleDef fastamp_module = {PyModuleDef_HEAD_INIT, "_C", "fastamp compiled kernels", -1, nullptr};

PyMODINIT_FUNC PyInit__C(void) {
  PyObject* module = PyModule_Create(&fastamp_module);
  if (module == nullptr) return nullptr;
  PyModule_AddStringConstant(module, "cuda_archs", FASTAMP_CUDA_ARCHS);
  PyModule_AddStringConstant(module, "cuda_version", FASTAMP_CUDA_VERSION);
  PyModule_AddStringConstant(module, "torch_version", FASTAMP_TORCH_VERSION);
  PyModule_AddStringConstant(module, "source_hash", FASTAMP_SOURCE_HASH);
  PyModule_AddIntConstant(module, "large_kernel_params", FASTAMP_LARGE_KERNEL_PARAMS);
  PyModule_AddIntConstant(module, "chunk_size", static_cast<long>(fastamp::kChunkSize));
#if defined(FASTAMP_WITH_CUDA)
  PyModule_AddIntConstant(module, "cuda_driver_version", fastamp_cuda_driver_version());
#else
  PyModule_AddIntConstant(module, "cuda_driver_version", 0);
#endif
#if defined(_OPENMP)
  PyModule_AddIntConstant(module, "openmp", 1);
#else
  PyModule_AddIntConstant(module, "openmp", 0);
#endif
  return module;
}
