// Chapter gather / scatter on the CPU (at::parallel_for over rows, contiguous inner loops over t*d)
// and the pybind11 module moc_megatron._C; CUDA versions live in chapter_ops_cuda.cu.
//
// Summation orders are fixed and mirrored by moc_megatron/ops/torch_impl.py, so the two paths agree
// bitwise: scatter sums each table row in ascending flat (b * n + j) order; the weight gradient sums
// each row's t*d products by halving a zero-padded power-of-two buffer.
#include <torch/extension.h>

#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstring>
#include <vector>

#include "chapter_ops.h"

namespace moc {

void check_gather_args(const at::Tensor& table, const at::Tensor& index, const std::optional<at::Tensor>& weight) {
  TORCH_CHECK_VALUE(table.dim() == 3, "chapter_gather: table must be (u, t, d), got shape ", table.sizes());
  TORCH_CHECK_TYPE(at::isFloatingType(table.scalar_type()), "chapter_gather: table must be floating point, got ",
                   table.scalar_type());
  TORCH_CHECK_VALUE(index.dim() == 2, "chapter_gather: index must be (b, n), got shape ", index.sizes());
  TORCH_CHECK_TYPE(index.scalar_type() == at::kLong, "chapter_gather: index must be int64, got ",
                   index.scalar_type());
  if (!weight) return;
  TORCH_CHECK_VALUE(weight->sizes() == index.sizes(), "chapter_gather: weight shape ", weight->sizes(),
                    " must equal index shape ", index.sizes());
  TORCH_CHECK_TYPE(weight->scalar_type() == table.scalar_type(), "chapter_gather: weight dtype ",
                   weight->scalar_type(), " must equal table dtype ", table.scalar_type());
}

void check_scatter_args(const at::Tensor& grad, const at::Tensor& index, const std::optional<at::Tensor>& weight,
                        int64_t num_rows) {
  TORCH_CHECK_VALUE(grad.dim() == 4, "chapter_scatter: grad must be (b, n, t, d), got shape ", grad.sizes());
  TORCH_CHECK_TYPE(at::isFloatingType(grad.scalar_type()), "chapter_scatter: grad must be floating point, got ",
                   grad.scalar_type());
  TORCH_CHECK_VALUE(index.dim() == 2 && index.size(0) == grad.size(0) && index.size(1) == grad.size(1),
                    "chapter_scatter: index shape ", index.sizes(), " must be grad's leading (b, n) ",
                    grad.sizes());
  TORCH_CHECK_TYPE(index.scalar_type() == at::kLong, "chapter_scatter: index must be int64, got ",
                   index.scalar_type());
  TORCH_CHECK_VALUE(num_rows >= 0, "chapter_scatter: num_rows must be >= 0, got ", num_rows);
  if (!weight) return;
  TORCH_CHECK_VALUE(weight->sizes() == index.sizes(), "chapter_scatter: weight shape ", weight->sizes(),
                    " must equal index shape ", index.sizes());
  TORCH_CHECK_TYPE(weight->scalar_type() == grad.scalar_type(), "chapter_scatter: weight dtype ",
                   weight->scalar_type(), " must equal grad dtype ", grad.scalar_type());
}

void check_weight_grad_args(const at::Tensor& grad, const at::Tensor& table, const at::Tensor& index) {
  check_gather_args(table, index, std::nullopt);
  check_scatter_args(grad, index, std::nullopt, table.size(0));
  TORCH_CHECK_VALUE(grad.size(2) == table.size(1) && grad.size(3) == table.size(2), "chapter_weight_grad: grad ",
                    grad.sizes(), " does not match table ", table.sizes());
  TORCH_CHECK_TYPE(grad.scalar_type() == table.scalar_type(), "chapter_weight_grad: grad dtype ",
                   grad.scalar_type(), " must equal table dtype ", table.scalar_type());
}

void check_index_range(int64_t lo, int64_t hi, int64_t num_rows, const char* op) {
  const int64_t bad = lo < 0 ? lo : hi;
  TORCH_CHECK_INDEX(lo >= 0 && hi < num_rows, op, ": chapter id ", bad, " is out of range for a table of ",
                    num_rows, " rows (valid ids are 0..", num_rows - 1, ")");
}

namespace {

template <typename T>
using acc_t = at::opmath_type<T>;

constexpr int64_t kChunk = 1024;  // scatter task width: the float accumulators stay in L1

// Rows per parallel task, so each task moves at least ~32k elements.
int64_t grain_rows(int64_t row_elems) { return std::max<int64_t>(1, 32768 / std::max<int64_t>(row_elems, 1)); }

void check_index_cpu(const at::Tensor& index, int64_t num_rows, const char* op) {
  if (index.numel() == 0) return;
  const int64_t* p = index.const_data_ptr<int64_t>();
  const auto [lo, hi] = std::minmax_element(p, p + index.numel());
  check_index_range(*lo, *hi, num_rows, op);
}

// out (n_rows, e) = weight[i] * table[index[i]]; weight may be null (plain copy).
template <typename T>
void gather_rows(const T* table, const int64_t* index, const T* weight, T* out, int64_t n_rows, int64_t row_elems) {
  at::parallel_for(0, n_rows, grain_rows(row_elems), [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const T* src = table + index[i] * row_elems;
      T* dst = out + i * row_elems;
      if (weight == nullptr) {
        std::memcpy(dst, src, row_elems * sizeof(T));
        continue;
      }
      const acc_t<T> w = static_cast<acc_t<T>>(weight[i]);
      for (int64_t e = 0; e < row_elems; ++e) dst[e] = static_cast<T>(w * static_cast<acc_t<T>>(src[e]));
    }
  });
}

// Stable counting sort: order[offsets[u] .. offsets[u+1]) lists the flat rows selecting u, ascending.
void segment_rows(const int64_t* index, int64_t n_rows, int64_t num_rows, std::vector<int64_t>& offsets,
                  std::vector<int64_t>& order) {
  offsets.assign(num_rows + 1, 0);
  for (int64_t i = 0; i < n_rows; ++i) ++offsets[index[i] + 1];
  for (int64_t u = 0; u < num_rows; ++u) offsets[u + 1] += offsets[u];
  std::vector<int64_t> next(offsets.begin(), offsets.end() - 1);
  order.resize(n_rows);
  for (int64_t i = 0; i < n_rows; ++i) order[next[index[i]]++] = i;
}

// out (num_rows, e): each row sums weight[i] * grad[i] over its segment, one (row, chunk) per task.
template <typename T>
void scatter_rows(const T* grad, const T* weight, const std::vector<int64_t>& offsets,
                  const std::vector<int64_t>& order, T* out, int64_t num_rows, int64_t row_elems) {
  const int64_t chunks = (row_elems + kChunk - 1) / kChunk;
  at::parallel_for(0, num_rows * chunks, 1, [&](int64_t begin, int64_t end) {
    acc_t<T> acc[kChunk];
    for (int64_t task = begin; task < end; ++task) {
      const int64_t u = task / chunks, e0 = (task % chunks) * kChunk;
      const int64_t len = std::min(kChunk, row_elems - e0);
      T* dst = out + u * row_elems + e0;
      if (offsets[u] == offsets[u + 1]) {  // nobody selected u: zeros (bit pattern 0 in every dtype)
        std::memset(dst, 0, len * sizeof(T));
        continue;
      }
      std::fill(acc, acc + len, acc_t<T>(0));
      for (int64_t s = offsets[u]; s < offsets[u + 1]; ++s) {
        const int64_t i = order[s];
        const T* g = grad + i * row_elems + e0;
        if (weight == nullptr) {
          for (int64_t e = 0; e < len; ++e) acc[e] += static_cast<acc_t<T>>(g[e]);
        } else {
          const acc_t<T> w = static_cast<acc_t<T>>(weight[i]);
          for (int64_t e = 0; e < len; ++e) acc[e] += w * static_cast<acc_t<T>>(g[e]);
        }
      }
      for (int64_t e = 0; e < len; ++e) dst[e] = static_cast<T>(acc[e]);
    }
  });
}

int64_t next_pow2(int64_t x) {
  int64_t p = 1;
  while (p < x) p *= 2;
  return p;
}

// out[i] = sum_e grad[i, e] * table[index[i], e], summed by halving a zero-padded power-of-two buffer.
template <typename T>
void weight_grad_rows(const T* grad, const T* table, const int64_t* index, T* out, int64_t n_rows,
                      int64_t row_elems) {
  const int64_t padded = next_pow2(row_elems);
  at::parallel_for(0, n_rows, grain_rows(row_elems), [&](int64_t begin, int64_t end) {
    std::vector<acc_t<T>> buf(padded, acc_t<T>(0));
    for (int64_t i = begin; i < end; ++i) {
      const T* g = grad + i * row_elems;
      const T* x = table + index[i] * row_elems;
      for (int64_t e = 0; e < row_elems; ++e) buf[e] = static_cast<acc_t<T>>(g[e]) * static_cast<acc_t<T>>(x[e]);
      std::fill(buf.begin() + row_elems, buf.end(), acc_t<T>(0));
      for (int64_t h = padded / 2; h >= 1; h /= 2) {
        for (int64_t e = 0; e < h; ++e) buf[e] += buf[e + h];
      }
      out[i] = static_cast<T>(buf[0]);
    }
  });
}

template <typename T>
const T* ptr_or_null(const std::optional<at::Tensor>& t) {
  return t.has_value() ? t->const_data_ptr<T>() : nullptr;
}

std::optional<at::Tensor> contiguous_or_none(const std::optional<at::Tensor>& t) {
  if (!t) return std::nullopt;
  return t->contiguous();
}

// table (u, t, d), index (b, n), weight (b, n) -> out (b, n, t, d)
at::Tensor chapter_gather_cpu(const at::Tensor& table_in, const at::Tensor& index_in,
                              const std::optional<at::Tensor>& weight_in) {
  check_gather_args(table_in, index_in, weight_in);
  const auto table = table_in.contiguous();
  const auto index = index_in.contiguous();
  const auto weight = contiguous_or_none(weight_in);
  check_index_cpu(index, table.size(0), "chapter_gather");
  auto out = at::empty({index.size(0), index.size(1), table.size(1), table.size(2)}, table.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, table.scalar_type(), "chapter_gather_cpu", [&] {
    gather_rows<scalar_t>(table.const_data_ptr<scalar_t>(), index.const_data_ptr<int64_t>(),
                          ptr_or_null<scalar_t>(weight), out.mutable_data_ptr<scalar_t>(), index.numel(),
                          table.size(1) * table.size(2));
  });
  return out;
}

// grad (b, n, t, d), index (b, n), weight (b, n) -> grad_table (num_rows, t, d)
at::Tensor chapter_scatter_cpu(const at::Tensor& grad_in, const at::Tensor& index_in,
                               const std::optional<at::Tensor>& weight_in, int64_t num_rows) {
  check_scatter_args(grad_in, index_in, weight_in, num_rows);
  const auto grad = grad_in.contiguous();
  const auto index = index_in.contiguous();
  const auto weight = contiguous_or_none(weight_in);
  check_index_cpu(index, num_rows, "chapter_scatter");
  std::vector<int64_t> offsets, order;
  segment_rows(index.const_data_ptr<int64_t>(), index.numel(), num_rows, offsets, order);
  auto out = at::empty({num_rows, grad.size(2), grad.size(3)}, grad.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad.scalar_type(), "chapter_scatter_cpu", [&] {
    scatter_rows<scalar_t>(grad.const_data_ptr<scalar_t>(), ptr_or_null<scalar_t>(weight), offsets, order,
                           out.mutable_data_ptr<scalar_t>(), num_rows, grad.size(2) * grad.size(3));
  });
  return out;
}

// grad (b, n, t, d), table (u, t, d), index (b, n) -> grad_weight (b, n)
at::Tensor chapter_weight_grad_cpu(const at::Tensor& grad_in, const at::Tensor& table_in,
                                   const at::Tensor& index_in) {
  check_weight_grad_args(grad_in, table_in, index_in);
  const auto grad = grad_in.contiguous();
  const auto table = table_in.contiguous();
  const auto index = index_in.contiguous();
  check_index_cpu(index, table.size(0), "chapter_weight_grad");
  auto out = at::empty({index.size(0), index.size(1)}, table.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, table.scalar_type(), "chapter_weight_grad_cpu", [&] {
    weight_grad_rows<scalar_t>(grad.const_data_ptr<scalar_t>(), table.const_data_ptr<scalar_t>(),
                               index.const_data_ptr<int64_t>(), out.mutable_data_ptr<scalar_t>(), index.numel(),
                               table.size(1) * table.size(2));
  });
  return out;
}

// Ids span a small range (the usual case: chapter ids < C): mark, number in order, look up.
void unique_dense(const int64_t* c, int64_t n, int64_t lo, int64_t hi, std::vector<int64_t>& uniq, int64_t* inv) {
  std::vector<int64_t> slot(hi - lo + 1, -1);
  for (int64_t i = 0; i < n; ++i) slot[c[i] - lo] = 0;
  for (int64_t r = 0; r < hi - lo + 1; ++r) {
    if (slot[r] < 0) continue;
    slot[r] = static_cast<int64_t>(uniq.size());
    uniq.push_back(lo + r);
  }
  for (int64_t i = 0; i < n; ++i) inv[i] = slot[c[i] - lo];
}

// chapters (b, n) int64 -> unique sorted ids (u,), inverse (b, n) with unique[inverse] == chapters.
// Ids within a small range (chapter ids < C) use a lookup table, several times faster than
// torch.unique (benchmarks/bench_chapter_ops.py); widely spread ids go to torch's sort.
std::tuple<at::Tensor, at::Tensor> unique_chapters_cpu(const at::Tensor& chapters_in) {
  TORCH_CHECK_TYPE(chapters_in.scalar_type() == at::kLong, "unique_chapters: chapters must be int64, got ",
                   chapters_in.scalar_type());
  TORCH_CHECK_VALUE(chapters_in.device().is_cpu(), "unique_chapters: the kernel runs on CPU tensors only");
  const auto chapters = chapters_in.contiguous();
  const int64_t n = chapters.numel();
  const int64_t* c = chapters.const_data_ptr<int64_t>();
  const auto [lo, hi] = std::minmax_element(c, c + n);
  if (n > 0 && static_cast<uint64_t>(*hi) - static_cast<uint64_t>(*lo) >= static_cast<uint64_t>(4 * n + 65536)) {
    const auto [unique, inverse, counts] = at::_unique2(chapters, /*sorted=*/true, /*return_inverse=*/true);
    return {unique, inverse};
  }
  auto inverse = at::empty(chapters.sizes(), chapters.options());
  std::vector<int64_t> uniq;
  if (n > 0) unique_dense(c, n, *lo, *hi, uniq, inverse.mutable_data_ptr<int64_t>());
  auto unique = at::empty({static_cast<int64_t>(uniq.size())}, chapters.options());
  std::copy(uniq.begin(), uniq.end(), unique.mutable_data_ptr<int64_t>());
  return {unique, inverse};
}

}  // namespace

// Device dispatch: CUDA tensors go to the CUDA kernels when they were compiled in.
at::Tensor chapter_gather(const at::Tensor& table, const at::Tensor& index, const std::optional<at::Tensor>& weight) {
#ifdef MOC_WITH_CUDA
  if (table.is_cuda()) return chapter_gather_cuda(table, index, weight);
#endif
  TORCH_CHECK(table.device().is_cpu(), "chapter_gather: no compiled kernel for device ", table.device());
  return chapter_gather_cpu(table, index, weight);
}

at::Tensor chapter_scatter(const at::Tensor& grad, const at::Tensor& index, const std::optional<at::Tensor>& weight,
                           int64_t num_rows) {
#ifdef MOC_WITH_CUDA
  if (grad.is_cuda()) return chapter_scatter_cuda(grad, index, weight, num_rows);
#endif
  TORCH_CHECK(grad.device().is_cpu(), "chapter_scatter: no compiled kernel for device ", grad.device());
  return chapter_scatter_cpu(grad, index, weight, num_rows);
}

at::Tensor chapter_weight_grad(const at::Tensor& grad, const at::Tensor& table, const at::Tensor& index) {
#ifdef MOC_WITH_CUDA
  if (table.is_cuda()) return chapter_weight_grad_cuda(grad, table, index);
#endif
  TORCH_CHECK(table.device().is_cpu(), "chapter_weight_grad: no compiled kernel for device ", table.device());
  return chapter_weight_grad_cpu(grad, table, index);
}

}  // namespace moc

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "Chapter gather / scatter / attention kernels for moc_megatron (CPU, and CUDA when built with it)";
  m.def("chapter_gather", &moc::chapter_gather, "out[b, j] = weight[b, j] * table[index[b, j]]",
        py::arg("table"), py::arg("index"), py::arg("weight") = py::none());
  m.def("chapter_scatter", &moc::chapter_scatter, "grad_table[u] = sum_{index[b, j] == u} weight[b, j] * grad[b, j]",
        py::arg("grad"), py::arg("index"), py::arg("weight"), py::arg("num_rows"));
  m.def("chapter_weight_grad", &moc::chapter_weight_grad,
        "grad_weight[b, j] = sum_{t, d} grad[b, j] * table[index[b, j]]", py::arg("grad"), py::arg("table"),
        py::arg("index"));
  m.def("unique_chapters", &moc::unique_chapters_cpu, "sorted unique ids and inverse of a CPU int64 tensor",
        py::arg("chapters"));
  m.def("chapter_attention_fwd", &moc::chapter_attention_fwd,
        "CPU chapter attention: out, lse of q over the K/V table rows index selects, scaled by weight",
        py::arg("q"), py::arg("k"), py::arg("v"), py::arg("index"), py::arg("weight"), py::arg("scale"));
  m.def("chapter_attention_bwd", &moc::chapter_attention_bwd,
        "CPU chapter attention backward: dq, dk, dv, dweight (dk / dv reduced per table row, deterministic)",
        py::arg("dout"), py::arg("dlse"), py::arg("q"), py::arg("k"), py::arg("v"), py::arg("index"),
        py::arg("weight"), py::arg("out"), py::arg("lse"), py::arg("scale"));
#ifdef MOC_WITH_CUDA
  m.attr("with_cuda") = true;
#else
  m.attr("with_cuda") = false;
#endif
}
