// Torch glue for the CUDA chapter kernels (csrc/chapter_kernels.cuh): argument checks, the stable
// sort that makes the scatter deterministic, dtype dispatch and launches on the current stream.
// Built only with -DMOC_WITH_CUDA (setup.py adds it where torch has CUDA).
#ifdef MOC_WITH_CUDA

#include <ATen/ops/_assert_async.h>
#include <ATen/ops/arange.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/searchsorted.h>
#include <ATen/ops/sort.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <optional>
#include <string>
#include <type_traits>

#include "chapter_kernels.cuh"
#include "chapter_ops.h"

namespace moc {
namespace {

// Calls fn(T*) with the CUDA element type matching the tensor's dtype.
template <typename Fn>
void dispatch_cuda_float(at::ScalarType dtype, const char* op, Fn&& fn) {
  switch (dtype) {
    case at::kFloat: fn(static_cast<float*>(nullptr)); break;
    case at::kDouble: fn(static_cast<double*>(nullptr)); break;
    case at::kHalf: fn(static_cast<__half*>(nullptr)); break;
    case at::kBFloat16: fn(static_cast<__nv_bfloat16*>(nullptr)); break;
    default: TORCH_CHECK(false, op, ": unsupported dtype ", dtype, " (use float32, float64, float16 or bfloat16)");
  }
}

template <typename T>
const T* ptr_or_null(const std::optional<at::Tensor>& t) {
  return t.has_value() ? reinterpret_cast<const T*>(t->const_data_ptr()) : nullptr;
}

void check_on_cuda(const at::Tensor& t, const at::Tensor& like, const char* op) {
  TORCH_CHECK(t.device() == like.device(), op, ": tensors must be on one device, got ", t.device(), " and ",
              like.device());
}

// An asynchronous device assert: the host never waits on the check (a bad id surfaces as a CUDA error
// at the next sync, as an out-of-range index does in torch's own indexing).
void check_index_on_device(const at::Tensor& index, int64_t num_rows, const char* op) {
  if (index.numel() == 0) return;
  const std::string msg = std::string(op) + ": a chapter id is out of range for a table of " +
                          std::to_string(num_rows) + " rows";
  at::_assert_async(index.ge(0).logical_and(index.lt(num_rows)).all(), msg);
}

void check_launch(cudaError_t err, const char* op) {
  TORCH_CHECK(err == cudaSuccess, op, ": CUDA launch failed: ", cudaGetErrorString(err));
}

}  // namespace

// table (u, t, d), index (b, n), weight (b, n) -> out (b, n, t, d)
at::Tensor chapter_gather_cuda(const at::Tensor& table_in, const at::Tensor& index_in,
                               const std::optional<at::Tensor>& weight_in) {
  check_gather_args(table_in, index_in, weight_in);
  check_on_cuda(index_in, table_in, "chapter_gather");
  if (weight_in) check_on_cuda(*weight_in, table_in, "chapter_gather");
  const c10::cuda::CUDAGuard guard(table_in.device());
  const auto table = table_in.contiguous();
  const auto index = index_in.contiguous();
  std::optional<at::Tensor> weight;
  if (weight_in) weight = weight_in->contiguous();
  const int64_t u = table.size(0), row_elems = table.size(1) * table.size(2);
  check_index_on_device(index, u, "chapter_gather");
  auto out = at::empty({index.size(0), index.size(1), table.size(1), table.size(2)}, table.options());
  const auto stream = c10::cuda::getCurrentCUDAStream().stream();
  dispatch_cuda_float(table.scalar_type(), "chapter_gather", [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    check_launch(moc_kernels::launch_chapter_gather<T>(
                     reinterpret_cast<const T*>(table.const_data_ptr()), index.const_data_ptr<int64_t>(),
                     ptr_or_null<T>(weight), reinterpret_cast<T*>(out.mutable_data_ptr()), index.numel(),
                     row_elems, stream),
                 "chapter_gather");
  });
  return out;
}

// grad (b, n, t, d), index (b, n), weight (b, n) -> grad_table (num_rows, t, d)
at::Tensor chapter_scatter_cuda(const at::Tensor& grad_in, const at::Tensor& index_in,
                                const std::optional<at::Tensor>& weight_in, int64_t num_rows) {
  check_scatter_args(grad_in, index_in, weight_in, num_rows);
  check_on_cuda(index_in, grad_in, "chapter_scatter");
  if (weight_in) check_on_cuda(*weight_in, grad_in, "chapter_scatter");
  const c10::cuda::CUDAGuard guard(grad_in.device());
  const auto grad = grad_in.contiguous();
  const auto flat = index_in.reshape({-1}).contiguous();
  std::optional<at::Tensor> weight;
  if (weight_in) weight = weight_in->contiguous();
  check_index_on_device(flat, num_rows, "chapter_scatter");
  // Stable sort: equal ids keep ascending flat position, the CPU kernel's summation order.
  const auto sorted_order = at::sort(flat, /*stable=*/true, /*dim=*/0, /*descending=*/false);
  const at::Tensor& order = std::get<1>(sorted_order);
  // offsets (u + 1,): row u's entries are order[offsets[u] .. offsets[u + 1])
  const auto offsets = at::searchsorted(std::get<0>(sorted_order), at::arange(num_rows + 1, flat.options()));
  const int64_t row_elems = grad.size(2) * grad.size(3);
  auto grad_table = at::empty({num_rows, grad.size(2), grad.size(3)}, grad.options());
  const auto stream = c10::cuda::getCurrentCUDAStream().stream();
  dispatch_cuda_float(grad.scalar_type(), "chapter_scatter", [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    check_launch(moc_kernels::launch_chapter_scatter<T>(
                     reinterpret_cast<const T*>(grad.const_data_ptr()), ptr_or_null<T>(weight),
                     order.const_data_ptr<int64_t>(), offsets.const_data_ptr<int64_t>(),
                     reinterpret_cast<T*>(grad_table.mutable_data_ptr()), num_rows, row_elems, stream),
                 "chapter_scatter");
  });
  return grad_table;
}

// grad (b, n, t, d), table (u, t, d), index (b, n) -> grad_weight (b, n)
at::Tensor chapter_weight_grad_cuda(const at::Tensor& grad_in, const at::Tensor& table_in,
                                    const at::Tensor& index_in) {
  check_weight_grad_args(grad_in, table_in, index_in);
  check_on_cuda(grad_in, table_in, "chapter_weight_grad");
  check_on_cuda(index_in, table_in, "chapter_weight_grad");
  const c10::cuda::CUDAGuard guard(table_in.device());
  const auto grad = grad_in.contiguous();
  const auto table = table_in.contiguous();
  const auto index = index_in.contiguous();
  check_index_on_device(index, table.size(0), "chapter_weight_grad");
  auto grad_weight = at::empty({index.size(0), index.size(1)}, table.options());
  const int64_t row_elems = table.size(1) * table.size(2);
  const auto stream = c10::cuda::getCurrentCUDAStream().stream();
  dispatch_cuda_float(table.scalar_type(), "chapter_weight_grad", [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    check_launch(moc_kernels::launch_chapter_weight_grad<T>(
                     reinterpret_cast<const T*>(grad.const_data_ptr()),
                     reinterpret_cast<const T*>(table.const_data_ptr()), index.const_data_ptr<int64_t>(),
                     reinterpret_cast<T*>(grad_weight.mutable_data_ptr()), index.numel(), row_elems, stream),
                 "chapter_weight_grad");
  });
  return grad_weight;
}

}  // namespace moc

#endif  // MOC_WITH_CUDA
