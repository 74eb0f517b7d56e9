// CUDA implementations of the dssn ops declared in csrc/ops.cpp: the thin torch layer over
// the raw-pointer launchers of expand.cu and vote.cu (see launchers.h). The argument
// checks are the CPU kernels' (csrc/op_checks.h: shapes, dtypes, ranges, the half q
// limits); this file adds the device check (check_devices), maps the tensors' dtypes to
// the launchers' instantiations (dispatch_dtype) and launches on the current stream
// (launch_on_stream), each written once for the three ops.
//
// Built only when torch is a CUDA build and a CUDA toolkit is found (setup.py).
//
// Only the light c10/cuda headers (not ATen/cuda/CUDAContext.h, which pulls in cuBLAS,
// cuSPARSE and cuSOLVER headers): at::cuda is c10::cuda (c10/macros/Macros.h), so
// at::cuda::getCurrentCUDAStream is declared by c10/cuda/CUDAStream.h.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cstddef>
#include <initializer_list>
#include <string>
#include <type_traits>

#include "../op_checks.h"
#include "launchers.h"

namespace {

// The torch dtype of each element type of launchers.h's type lists.
template <typename T>
struct ScalarTypeOf;
template <>
struct ScalarTypeOf<float> : std::integral_constant<at::ScalarType, at::kFloat> {};
template <>
struct ScalarTypeOf<double> : std::integral_constant<at::ScalarType, at::kDouble> {};
template <>
struct ScalarTypeOf<__half> : std::integral_constant<at::ScalarType, at::kHalf> {};
template <>
struct ScalarTypeOf<__nv_bfloat16> : std::integral_constant<at::ScalarType, at::kBFloat16> {
};
template <>
struct ScalarTypeOf<uint8_t> : std::integral_constant<at::ScalarType, at::kByte> {};
template <>
struct ScalarTypeOf<int32_t> : std::integral_constant<at::ScalarType, at::kInt> {};

template <typename T>
struct Tag {
  using type = T;
};

// The dtype dispatch of every op: calls f(Tag<T>{}) for the T of the list whose torch
// dtype is `type` and returns its cudaError_t. The argument checks (op_checks.h) admit
// only the list's dtypes, so the closing check cannot fire after them.
template <typename... Ts, typename F>
cudaError_t dispatch_dtype(dssn::TypeList<Ts...>, const char* op, at::ScalarType type,
                           F&& f) {
  cudaError_t err = cudaSuccess;
  const bool found =
      ((type == ScalarTypeOf<Ts>::value && ((err = f(Tag<Ts>{})), true)) || ...);
  TORCH_CHECK(found, op, ": no CUDA kernel for dtype ", type);
  return err;
}

// The device check of every op: the first tensor on a CUDA device and all the others on
// the same one. `names` lists the tensors in the order given, for the message.
void check_devices(const char* op, const char* names,
                   std::initializer_list<const at::Tensor*> tensors) {
  const at::Device device = (*tensors.begin())->device();
  bool same = device.is_cuda();
  for (const at::Tensor* t : tensors) same = same && t->device() == device;
  if (same) return;
  std::string got;
  std::size_t i = 0;
  for (const at::Tensor* t : tensors) {
    got += i == 0 ? "" : (i + 1 == tensors.size() ? " and " : ", ");
    got += t->device().str();
    ++i;
  }
  TORCH_CHECK(false, op, ": ", names, " must be on the same CUDA device, got ", got);
}

// The launch of every op, once its arguments are checked: on `device` and its current
// stream, calls run(stream) and checks the cudaError_t it returns.
template <typename Run>
void launch_on_stream(const char* op, const at::Device& device, Run&& run) {
  const c10::cuda::CUDAGuard guard(device);
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream().stream();
  const cudaError_t err = run(stream);
  TORCH_CHECK(err == cudaSuccess, op, ": CUDA kernel launch failed: ",
              cudaGetErrorName(err), ": ", cudaGetErrorString(err));
}

void expand_cuda(at::Tensor out, const at::Tensor& levels, const at::Tensor& offsets,
                 int64_t num_variants, int64_t q, int64_t start) {
  constexpr const char* op = "dssn::expand_";
  dssn::checks::expand_args(out, levels, offsets, num_variants, q, start);
  check_devices(op, "out, levels and offsets", {&out, &levels, &offsets});
  if (out.numel() == 0) return;
  const int64_t B = levels.size(0), d = levels.size(1), count = out.size(1);
  launch_on_stream(op, out.device(), [&](cudaStream_t stream) {
    return dispatch_dtype(dssn::ExpandOutputTypes{}, op, out.scalar_type(), [&](auto o) {
      using out_t = typename decltype(o)::type;
      return dispatch_dtype(dssn::ExpandLevelTypes{}, op, levels.scalar_type(), [&](auto k) {
        using level_t = typename decltype(k)::type;
        return dssn::launch_expand(static_cast<out_t*>(out.data_ptr()),
                                   static_cast<const level_t*>(levels.data_ptr()),
                                   offsets.data_ptr<int32_t>(), B, count, d,
                                   int(num_variants), int(q), start, stream);
      });
    });
  });
}

// vote_ / vote_margin_ (op) on the rows of logits, once the arguments are checked: nothing
// for no rows; otherwise, on counts' device and its current stream, calls
// run(p, R, K, stream) with p the data of logits made contiguous, a const logit_t* for the
// launchers' logit_t of logits' dtype.
template <typename Run>
void launch_vote_op(const char* op, const at::Tensor& counts, const at::Tensor& logits,
                    Run&& run) {
  const int64_t R = logits.size(0), K = logits.size(1);
  if (R == 0) return;
  launch_on_stream(op, counts.device(), [&](cudaStream_t stream) {
    const at::Tensor x = logits.contiguous();  // on the guarded device and its stream
    return dispatch_dtype(dssn::LogitTypes{}, op, x.scalar_type(), [&](auto tag) {
      using logit_t = typename decltype(tag)::type;
      return run(static_cast<const logit_t*>(x.data_ptr()), R, K, stream);
    });
  });
}

void vote_cuda(at::Tensor counts, at::Tensor nan_rows, const at::Tensor& logits,
               int64_t row0, int64_t rows_per_image) {
  constexpr const char* op = "dssn::vote_";
  dssn::checks::vote_args(counts, nan_rows, logits, row0, rows_per_image);
  check_devices(op, "counts, nan_rows and logits", {&counts, &nan_rows, &logits});
  launch_vote_op(op, counts, logits, [&](const auto* p, int64_t R, int64_t K,
                                         cudaStream_t stream) {
    // nan_rows: the single element, whatever its strides
    return dssn::launch_vote(counts.data_ptr<int64_t>(), nan_rows.data_ptr<int64_t>(), p, R,
                             K, row0, rows_per_image, stream);
  });
}

void vote_margin_cuda(at::Tensor counts, at::Tensor ambiguous, at::Tensor nan_rows,
                      const at::Tensor& logits, int64_t row0, int64_t rows_per_image,
                      double margin) {
  constexpr const char* op = "dssn::vote_margin_";
  dssn::checks::vote_margin_args(counts, ambiguous, nan_rows, logits, row0, rows_per_image,
                                 margin);
  check_devices(op, "counts, ambiguous, nan_rows and logits",
                {&counts, &ambiguous, &nan_rows, &logits});
  launch_vote_op(op, counts, logits, [&](const auto* p, int64_t R, int64_t K,
                                         cudaStream_t stream) {
    return dssn::launch_vote_margin(counts.data_ptr<int64_t>(),
                                    ambiguous.data_ptr<int64_t>(),
                                    nan_rows.data_ptr<int64_t>(), p, R, K, row0,
                                    rows_per_image, margin, stream);
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(dssn, CUDA, m) {
  m.impl("expand_", &expand_cuda);
  m.impl("vote_", &vote_cuda);
  m.impl("vote_margin_", &vote_margin_cuda);
}
