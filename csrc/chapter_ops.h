// Chapter gather / scatter and chapter attention: declarations shared by the CPU bindings
// (chapter_ops.cpp, chapter_attention.cpp) and the CUDA glue (chapter_ops_cuda.cu). Letters: b batch,
// n selected per row, t tokens per chapter, d width, u table rows (unique chapters); for attention
// U units, c queries per unit, h query heads, kv K/V heads, e head dim.
#pragma once

#include <optional>
#include <tuple>

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

// Chapter attention on CPU tensors (chapter_attention.cpp). q (U, c, h, e), k / v (u, t, kv, e),
// index (U, n) table rows or -1 for an unused slot, weight (U, n) float32 (float64 for float64 q)
// -> out (U, c, h, e), lse (U, c, h) in weight's dtype.
std::tuple<at::Tensor, at::Tensor> chapter_attention_fwd(const at::Tensor& q, const at::Tensor& k,
                                                         const at::Tensor& v, const at::Tensor& index,
                                                         const at::Tensor& weight, double scale);

// Gradients dout (U, c, h, e) and dlse (U, c, h) -> dq, dk, dv, dweight; dk / dv deterministic.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> chapter_attention_bwd(
    const at::Tensor& dout, const at::Tensor& dlse, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& index, const at::Tensor& weight, const at::Tensor& out, const at::Tensor& lse, double scale);

#ifdef MOC_WITH_CUDA
at::Tensor chapter_gather_cuda(const at::Tensor& table, const at::Tensor& index,
                               const std::optional<at::Tensor>& weight);
at::Tensor chapter_scatter_cuda(const at::Tensor& grad, const at::Tensor& index,
                                const std::optional<at::Tensor>& weight, int64_t num_rows);
at::Tensor chapter_weight_grad_cuda(const at::Tensor& grad, const at::Tensor& table, const at::Tensor& index);
#endif

}  // namespace moc
