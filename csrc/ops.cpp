// Declares the dssn ops once; the CPU kernels (csrc/cpu) and, when built, the CUDA
// kernels (csrc/cuda) register implementations for them.
#include <Python.h>
#include <torch/library.h>

TORCH_LIBRARY(dssn, m) {
  // Writes variants start .. start + out.size(1) - 1 of every image into `out`.
  // out: float32/float16/bfloat16 [B, count, d] contiguous (the value of that type nearest
  // m/(4q)); levels: uint8/int32 [B, d] (pixel = level/q);
  // offsets: int32 [d] in 0..num_variants-1.
  m.def(
      "expand_(Tensor(a!) out, Tensor levels, Tensor offsets, int num_variants, int q, "
      "int start) -> ()");
  // Adds the argmax (first index on ties) of every logits row into counts: row r votes
  // for image (row0 + r) // rows_per_image. nan_rows [1] counts rows holding a NaN
  // (those rows do not vote). counts: int64 [B, K]; logits: float [R, K].
  m.def(
      "vote_(Tensor(a!) counts, Tensor(b!) nan_rows, Tensor logits, int row0, "
      "int rows_per_image) -> ()");
}

// A Python module with no methods: importing dssn_kernels._C runs the registrations.
extern "C" PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module);
}
