// Chapter gather / scatter: declarations shared by the CPU bindings (chapter_ops.cpp) and the CUDA
// glue (chapter_ops_cuda.cu). Letters: b batch, n selected per row, t tokens per chapter, d width,
// u table rows (unique chapters).
#pragma once

#include <optional>

#include <ATen/core/Tensor.h>

namespace moc {

// table (u, t, d) float, index (b, n) int64, weight (b, n) like table or none; throws on mismatch.
void check_gather_args(const at::Tensor& table, const at::Tensor& index, const std::optional<at::Tensor>& weight);

// grad (b, n, t, d), index (b, n), weight (b, n) or none, num_rows >= 0; throws on mismatch.
void check_scatter_args(const at::Tensor& grad, const at::Tensor& index, const std::optional<at::Tensor>& weight,
                        int64_t num_rows);

// grad (b, n, t, d) against table (u, t, d) and index (b, n); throws on mismatch.
void check_weight_grad_args(const at::Tensor& grad, const at::Tensor& table, const at::Tensor& index);

// Raises IndexError naming the first id outside [0, num_rows) (from min / max, one pass).
void check_index_range(int64_t lo, int64_t hi, int64_t num_rows, const char* op);

#ifdef MOC_WITH_CUDA
at::Tensor chapter_gather_cuda(const at::Tensor& table, const at::Tensor& index,
                               const std::optional<at::Tensor>& weight);
at::Tensor chapter_scatter_cuda(const at::Tensor& grad, const at::Tensor& index,
                                const std::optional<at::Tensor>& weight, int64_t num_rows);
at::Tensor chapter_weight_grad_cuda(const at::Tensor& grad, const at::Tensor& table, const at::Tensor& index);
#endif

}  // namespace moc
