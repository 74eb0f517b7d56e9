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
  // vote_ with a margin tau >= 0 (README, "What 'exact' means under floating point"): a
  // NaN-free row whose top logit T beats the runner-up U by less than tau (exactly, as
  // reals; a tie counts as gap 0) is ambiguous: it does not vote and adds 1 to
  // ambiguous[image, c] for every class c with T - logit_c < tau. Every other row votes
  // as in vote_. ambiguous: int64 [B, K] like counts; logits need K >= 2.
  m.def(
      "vote_margin_(Tensor(a!) counts, Tensor(b!) ambiguous, Tensor(c!) nan_rows, "
      "Tensor logits, int row0, int rows_per_image, float margin) -> ()");
}

// A Python module with no methods: importing dssn_kernels._C runs the registrations.
extern "C" PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module);
}
