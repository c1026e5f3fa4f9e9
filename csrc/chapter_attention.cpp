// Chapter attention on the CPU (SPEC 2.2): each unit's queries attend to the chapters it selected,
// reading K/V rows of the table by index, flash style. Letters: U units, c queries per unit, h query
// heads, kv K/V heads (G = h / kv query heads per group), e head dim, n slots per unit, t tokens per
// chapter, u table rows.
//
// Work goes in steps of a few whole chapters (kBlockKeys keys): a step's K / V rows of one kv head are
// copied into a small contiguous block, and blocks of kBlockQ queries meet them in BLAS GEMMs, so
// neither the gathered K/V of a unit nor its (c x n*t) score matrix exists. Forward: one task per
// (unit, head), an online softmax over the steps; the weights are folded into the copied K (scale w)
// and V (w). Backward: one task per (unit, kv head) recomputes p from lse and runs the five GEMMs of a
// flash backward per step and block of queries: dq and d(weight) accumulate in the task, each step's
// dk / dv are complete when the step ends. A table row read by one (unit, slot) gets them in place;
// rows read by several sum per-(unit, slot) buffers afterwards, in ascending unit * n + slot order (no
// atomics on the table). Every sum has an order fixed by the shapes, so results are bitwise
// independent of the thread count.
#include <torch/extension.h>

#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <climits>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

#include "chapter_ops.h"

// Fortran BLAS from libtorch_cpu (MKL on x86 wheels); weak, so a torch built without them still loads.
extern "C" {
void sgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k, const float* alpha,
            const float* a, const int* lda, const float* b, const int* ldb, const float* beta, float* c,
            const int* ldc) __attribute__((weak));
void dgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k, const double* alpha,
            const double* a, const int* lda, const double* b, const int* ldb, const double* beta, double* c,
            const int* ldc) __attribute__((weak));
}

// The elementwise loops are compiled for AVX-512, AVX2 and baseline x86-64, picked at load time. Each
// of the 16 lanes does the same scalar operations on every target, so the results do not depend on it.
#if defined(__x86_64__) && defined(__linux__) && defined(__has_attribute)
#if __has_attribute(target_clones)
#define MOC_VECTOR_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#endif
#endif
#ifndef MOC_VECTOR_CLONES
#define MOC_VECTOR_CLONES
#endif
#define MOC_INLINE inline __attribute__((always_inline))  // inlined into each clone, so compiled for its target

namespace moc {
namespace {

template <typename T>
using acc_t = at::opmath_type<T>;  // float for float / half / bfloat16, double for double

constexpr int64_t kBlockQ = 256;     // queries per GEMM block (a constant: the sums' order depends on it)
constexpr int64_t kBlockKeys = 256;  // keys per step (whole chapters)
constexpr int64_t kLanes = 16;       // independent partial sums in the row reductions

// ---- BLAS ----------------------------------------------------------------------------------------------

// Without Fortran BLAS symbols: the same product through at::addmm_ on views.
template <typename A>
void gemm_torch(bool ta, bool tb, int64_t m, int64_t n, int64_t k, A alpha, const A* a, int64_t lda, const A* b,
                int64_t ldb, A beta, A* c, int64_t ldc) {
  const auto opts = at::TensorOptions().dtype(c10::CppTypeToScalarType<A>::value);
  auto view = [&](const A* p, int64_t rows, int64_t cols, int64_t ld, bool trans) {
    auto x = at::from_blob(const_cast<A*>(p), {trans ? cols : rows, trans ? rows : cols}, {ld, 1}, opts);
    return trans ? x.t() : x;
  };
  at::from_blob(c, {m, n}, {ldc, 1}, opts).addmm_(view(a, m, k, lda, ta), view(b, k, n, ldb, tb), beta, alpha);
}

// Row-major C (m x n) = alpha op(A) op(B) + beta C, op(A) (m x k), op(B) (k x n); ta / tb: stored transposed.
// beta == 0 ignores C's old contents.
template <typename A>
void gemm(bool ta, bool tb, int64_t m, int64_t n, int64_t k, A alpha, const A* a, int64_t lda, const A* b,
          int64_t ldb, A beta, A* c, int64_t ldc) {
  if (m == 0 || n == 0 || k == 0) {
    if (k == 0) {
      for (int64_t r = 0; r < m; ++r) {
        for (int64_t j = 0; j < n; ++j) c[r * ldc + j] = beta == A(0) ? A(0) : beta * c[r * ldc + j];
      }
    }
    return;
  }
  // column-major BLAS sees the row-major C as C^T = op(B)^T op(A)^T
  const char op_a = ta ? 'T' : 'N', op_b = tb ? 'T' : 'N';
  const int im = static_cast<int>(m), in = static_cast<int>(n), ik = static_cast<int>(k);
  const int ilda = static_cast<int>(lda), ildb = static_cast<int>(ldb), ildc = static_cast<int>(ldc);
  if constexpr (std::is_same_v<A, float>) {
    if (sgemm_ != nullptr) return sgemm_(&op_b, &op_a, &in, &im, &ik, &alpha, b, &ildb, a, &ilda, &beta, c, &ildc);
  } else {
    if (dgemm_ != nullptr) return dgemm_(&op_b, &op_a, &in, &im, &ik, &alpha, b, &ildb, a, &ilda, &beta, c, &ildc);
  }
  gemm_torch(ta, tb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
}

// ---- elementwise ---------------------------------------------------------------------------------------

// exp(x) as in Cephes' expf (x = n ln2 + r, degree-6 polynomial in r, ~1 ulp), branch-free so it
// vectorises; 0 below -87.3 (so exp(-inf) = 0), NaN stays NaN. Doubles use std::exp.
MOC_INLINE float exp_fast(float x) {
  constexpr float kLo = -87.3f, kHi = 88.3f, kMagic = 12582912.0f;  // 1.5 * 2^23: adding it rounds to int
  const float xc = x < kLo ? kLo : (x > kHi ? kHi : x);
  const float shifted = xc * 1.44269504088896341f + kMagic;
  uint32_t bits;
  std::memcpy(&bits, &shifted, sizeof(bits));  // low mantissa bits hold n = round(x / ln2)
  const float fn = shifted - kMagic;
  const float r = (xc - fn * 0.693359375f) - fn * -2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * (r * r) + r + 1.0f;
  const uint32_t exponent = (bits - 0x4B400000u + 127u) << 23;  // 2^n
  float two_n;
  std::memcpy(&two_n, &exponent, sizeof(two_n));
  return x < kLo ? 0.0f : p * two_n;
}

inline double exp_fast(double x) { return std::exp(x); }

template <typename A>
MOC_INLINE A sum_lanes(const A* lane) {
  A s = lane[0];
  for (int64_t l = 1; l < kLanes; ++l) s += lane[l];
  return s;
}

template <typename A>
MOC_INLINE A row_max(const A* x, int64_t n) {
  A lane[kLanes];
  std::fill(lane, lane + kLanes, -std::numeric_limits<A>::infinity());
  int64_t j = 0;
  for (; j + kLanes <= n; j += kLanes) {
    for (int64_t l = 0; l < kLanes; ++l) lane[l] = lane[l] > x[j + l] ? lane[l] : x[j + l];
  }
  for (; j < n; ++j) lane[0] = lane[0] > x[j] ? lane[0] : x[j];
  A mx = lane[0];
  for (int64_t l = 1; l < kLanes; ++l) mx = mx > lane[l] ? mx : lane[l];
  return mx;
}

// f(i, lane) for i in [0, n), spread over kLanes accumulators.
template <typename A, typename F>
MOC_INLINE void lane_loop(int64_t n, A* lane, F f) {
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    for (int64_t q = 0; q < kLanes; ++q) f(i + q, lane[q]);
  }
  for (; i < n; ++i) f(i, lane[0]);
}

// One online-softmax step over scores s (rows x n, leading dim ld). With m / l the running max / sum
// of each row: s becomes exp(s - m_new), and l and the output accumulator o (rows x e) are rescaled by
// exp(m_old - m_new) (0 on the first step, where m_old = -inf).
template <typename A>
MOC_INLINE void softmax_step_impl(A* s, int64_t rows, int64_t n, int64_t ld, A* m, A* l, A* o, int64_t e) {
  for (int64_t r = 0; r < rows; ++r) {
    A* x = s + r * ld;
    const A mx = std::max(m[r], row_max(x, n));
    const A corr = exp_fast(m[r] - mx);
    A lane[kLanes] = {};
    lane_loop(n, lane, [&](int64_t z, A& acc) {
      x[z] = exp_fast(x[z] - mx);
      acc += x[z];
    });
    l[r] = l[r] * corr + sum_lanes(lane);
    m[r] = mx;
    for (int64_t z = 0; z < e; ++z) o[r * e + z] *= corr;
  }
}

// One block of the backward. s and dp (rows x nc t, leading dim ld) hold q.k and dO.v for nc chapters
// of t tokens with weights w; per row the saved lse and dm = dO.o - dlse. With p = exp(scale w q.k - lse)
// and ds = p (w dO.v - dm): adds each chapter's d(weight), the sum of scale ds q.k + p dO.v, to dw[j]
// (through kLanes accumulators per chapter in lanes), and leaves w p in s and scale w ds in dp, ready
// for the dv, dk and dq products.
template <typename A>
MOC_INLINE void backward_step_impl(A* s, A* dp, int64_t rows, int64_t nc, int64_t t, int64_t ld, const A* w,
                                   A scale, const A* lse, const A* dm, A* lanes, double* dw) {
  std::fill(lanes, lanes + nc * kLanes, A(0));
  for (int64_t r = 0; r < rows; ++r) {
    const A lse_r = lse[r], dm_r = dm[r];
    for (int64_t j = 0; j < nc; ++j) {
      A* x = s + r * ld + j * t;
      A* y = dp + r * ld + j * t;
      const A wj = w[j], sw = scale * w[j];
      lane_loop(t, lanes + j * kLanes, [&](int64_t z, A& acc) {
        const A qk = x[z], dpv = y[z];
        const A p = exp_fast(sw * qk - lse_r);
        const A ds = p * (wj * dpv - dm_r);
        acc += scale * ds * qk + p * dpv;
        x[z] = p * wj;
        y[z] = ds * sw;
      });
    }
  }
  for (int64_t j = 0; j < nc; ++j) dw[j] += static_cast<double>(sum_lanes(lanes + j * kLanes));
}

MOC_VECTOR_CLONES void softmax_step(float* s, int64_t rows, int64_t n, int64_t ld, float* m, float* l, float* o,
                                    int64_t e) {
  softmax_step_impl(s, rows, n, ld, m, l, o, e);
}

void softmax_step(double* s, int64_t rows, int64_t n, int64_t ld, double* m, double* l, double* o, int64_t e) {
  softmax_step_impl(s, rows, n, ld, m, l, o, e);
}

MOC_VECTOR_CLONES void backward_step(float* s, float* dp, int64_t rows, int64_t nc, int64_t t, int64_t ld,
                                     const float* w, float scale, const float* lse, const float* dm, float* lanes,
                                     double* dw) {
  backward_step_impl(s, dp, rows, nc, t, ld, w, scale, lse, dm, lanes, dw);
}

void backward_step(double* s, double* dp, int64_t rows, int64_t nc, int64_t t, int64_t ld, const double* w,
                   double scale, const double* lse, const double* dm, double* lanes, double* dw) {
  backward_step_impl(s, dp, rows, nc, t, ld, w, scale, lse, dm, lanes, dw);
}

// ---- layout helpers ------------------------------------------------------------------------------------

// A 64-byte aligned scratch buffer (torch's CPU allocator): BLAS results can depend on alignment.
template <typename A>
struct Scratch {
  at::Tensor storage;
  A* data(int64_t numel) {
    if (!storage.defined() || storage.numel() < numel) {
      storage = at::empty({std::max<int64_t>(numel, 1)}, at::TensorOptions().dtype(c10::CppTypeToScalarType<A>::value));
    }
    return storage.mutable_data_ptr<A>();
  }
};

// rows x cols of T at src (leading dim ld) as acc_t<T>: src itself when T is acc_t<T>, else converted into
// buf (leading dim cols).
template <typename T>
const acc_t<T>* load(const T* src, int64_t ld, int64_t rows, int64_t cols, Scratch<acc_t<T>>& buf, int64_t& ld_out) {
  if constexpr (std::is_same_v<T, acc_t<T>>) {
    ld_out = ld;
    return src;
  } else {
    acc_t<T>* dst = buf.data(rows * cols);
    for (int64_t r = 0; r < rows; ++r) {
      for (int64_t j = 0; j < cols; ++j) dst[r * cols + j] = static_cast<acc_t<T>>(src[r * ld + j]);
    }
    ld_out = cols;
    return dst;
  }
}

template <typename T, typename A>
void store(const A* src, int64_t ld_src, int64_t rows, int64_t cols, T* dst, int64_t ld) {
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t j = 0; j < cols; ++j) dst[r * ld + j] = static_cast<T>(src[r * ld_src + j]);
  }
}

struct Dims {
  int64_t U, c, h, e, u, t, kv, n;
  int64_t G() const { return h / kv; }
  int64_t q_row() const { return h * e; }  // stride of one query in q / out / dq
  int64_t k_row() const { return kv * e; }  // stride of one token in k / v
  int64_t chapter() const { return t * kv * e; }  // stride of one table row
};

// Valid slots (index >= 0) of unit b, ascending: slots[offsets[b] .. offsets[b + 1]).
struct UnitSlots {
  std::vector<int64_t> offsets, slots;
};

UnitSlots valid_slots(const int64_t* index, int64_t U, int64_t n) {
  UnitSlots us;
  us.offsets.assign(U + 1, 0);
  for (int64_t b = 0; b < U; ++b) {
    for (int64_t s = 0; s < n; ++s) {
      if (index[b * n + s] >= 0) us.slots.push_back(s);
    }
    us.offsets[b + 1] = static_cast<int64_t>(us.slots.size());
  }
  return us;
}

// The (unit, slot) pairs (flat unit * n + slot) reading each table row, ascending: pairs[offsets[row] ..
// offsets[row + 1]). buffer[pair] numbers the pairs of rows read more than once (-1 elsewhere).
struct Readers {
  std::vector<int64_t> offsets, pairs, buffer;
  int64_t n_buffered = 0;
};

Readers table_readers(const int64_t* index, int64_t n_pairs, int64_t num_rows) {
  Readers rd;
  rd.offsets.assign(num_rows + 1, 0);
  for (int64_t p = 0; p < n_pairs; ++p) {
    if (index[p] >= 0) ++rd.offsets[index[p] + 1];
  }
  for (int64_t row = 0; row < num_rows; ++row) rd.offsets[row + 1] += rd.offsets[row];
  std::vector<int64_t> next(rd.offsets.begin(), rd.offsets.end() - 1);
  rd.pairs.resize(rd.offsets[num_rows]);
  for (int64_t p = 0; p < n_pairs; ++p) {
    if (index[p] >= 0) rd.pairs[next[index[p]]++] = p;
  }
  rd.buffer.assign(n_pairs, -1);
  for (int64_t row = 0; row < num_rows; ++row) {
    if (rd.offsets[row + 1] - rd.offsets[row] < 2) continue;
    for (int64_t i = rd.offsets[row]; i < rd.offsets[row + 1]; ++i) rd.buffer[rd.pairs[i]] = rd.n_buffered++;
  }
  return rd;
}

// Runs worker(next) once on each of torch's threads; next(task) hands out the tasks 0 .. n-1, each to
// the first thread free for it (the machine may be shared). What a task computes does not depend on
// the thread that runs it, so results stay bitwise fixed. With several threads the BLAS calls always
// run inside the parallel region, hence single-threaded, even for a single task.
template <typename F>
void run_tasks(int64_t n, F worker) {
  std::atomic<int64_t> counter{0};
  auto next = [&](int64_t& task) { return (task = counter.fetch_add(1, std::memory_order_relaxed)) < n; };
  at::parallel_for(0, at::get_num_threads(), 1, [&](int64_t, int64_t) { worker(next); });
}

// Chapters per step: whole chapters, about kBlockKeys keys.
int64_t chapters_per_step(int64_t t) { return std::max<int64_t>(1, kBlockKeys / std::max<int64_t>(t, 1)); }

// The chapters of pairs[0 .. nc) (table rows index[pair]), kv head g, as one contiguous (nc t, e) matrix,
// chapter j times factor[j] (factor null: as they are).
template <typename T>
void gather_chapters(const T* table, const int64_t* index, const int64_t* pairs, const acc_t<T>* factor,
                     int64_t nc, int64_t g, const Dims& d, acc_t<T>* dst) {
  using A = acc_t<T>;
  for (int64_t j = 0; j < nc; ++j) {
    const T* src = table + index[pairs[j]] * d.chapter() + g * d.e;
    const A f = factor == nullptr ? A(1) : factor[j];
    for (int64_t z = 0; z < d.t; ++z) {
      A* row = dst + (j * d.t + z) * d.e;
      const T* from = src + z * d.k_row();
      if (factor == nullptr) {
        for (int64_t x = 0; x < d.e; ++x) row[x] = static_cast<A>(from[x]);
      } else {
        for (int64_t x = 0; x < d.e; ++x) row[x] = f * static_cast<A>(from[x]);
      }
    }
  }
}

// ---- forward -------------------------------------------------------------------------------------------

// One task per (unit, head): for each step of chapters, K (times scale w) and V (times w) of the step
// are gathered once and every block of queries takes an online-softmax step over them.
template <typename T>
void forward_kernel(const T* q, const T* k, const T* v, const int64_t* index, const acc_t<T>* weight, acc_t<T> scale,
                    const Dims& d, const UnitSlots& us, T* out, acc_t<T>* lse) {
  using A = acc_t<T>;
  const int64_t per_step = chapters_per_step(d.t), ld_s = per_step * d.t;
  run_tasks(d.U * d.h, [&](auto& next) {
    Scratch<A> s_buf, o_buf, m_buf, l_buf, q_buf, k_buf, v_buf;
    A* s = s_buf.data(kBlockQ * ld_s);
    A* kc = k_buf.data(ld_s * d.e);
    A* vc = v_buf.data(ld_s * d.e);
    A* o = o_buf.data(d.c * d.e);
    A* m = m_buf.data(d.c);
    A* l = l_buf.data(d.c);
    std::vector<int64_t> pairs(per_step);
    std::vector<A> w(per_step), sw(per_step);
    for (int64_t task; next(task);) {
      const int64_t b = task / d.h, i = task % d.h, g = i / d.G();
      int64_t ldq;
      const A* qa = load(q + b * d.c * d.q_row() + i * d.e, d.q_row(), d.c, d.e, q_buf, ldq);
      std::fill(m, m + d.c, -std::numeric_limits<A>::infinity());
      std::fill(l, l + d.c, A(0));
      std::fill(o, o + d.c * d.e, A(0));
      const int64_t* slots = us.slots.data() + us.offsets[b];
      const int64_t n_valid = us.offsets[b + 1] - us.offsets[b];
      for (int64_t j0 = 0; j0 < n_valid; j0 += per_step) {
        const int64_t nc = std::min(per_step, n_valid - j0), keys = nc * d.t;
        for (int64_t j = 0; j < nc; ++j) {
          pairs[j] = b * d.n + slots[j0 + j];
          w[j] = weight[pairs[j]];
          sw[j] = scale * w[j];
        }
        gather_chapters(k, index, pairs.data(), sw.data(), nc, g, d, kc);
        gather_chapters(v, index, pairs.data(), w.data(), nc, g, d, vc);
        for (int64_t r0 = 0; r0 < d.c; r0 += kBlockQ) {
          const int64_t rows = std::min(kBlockQ, d.c - r0);
          gemm<A>(false, true, rows, keys, d.e, A(1), qa + r0 * ldq, ldq, kc, d.e, A(0), s, ld_s);  // scale w q.k
          softmax_step(s, rows, keys, ld_s, m + r0, l + r0, o + r0 * d.e, d.e);
          gemm<A>(false, false, rows, d.e, keys, A(1), s, ld_s, vc, d.e, A(1), o + r0 * d.e, d.e);  // o += p w v
        }
      }
      for (int64_t r = 0; r < d.c; ++r) {
        T* dst = out + (b * d.c + r) * d.q_row() + i * d.e;
        const bool empty = l[r] == A(0);  // no valid slot (or no tokens): out 0, lse -inf
        for (int64_t x = 0; x < d.e; ++x) dst[x] = static_cast<T>(empty ? A(0) : o[r * d.e + x] / l[r]);
        lse[(b * d.c + r) * d.h + i] = empty ? -std::numeric_limits<A>::infinity() : m[r] + std::log(l[r]);
      }
    }
  });
}

// ---- backward ------------------------------------------------------------------------------------------

template <typename T>
struct BackwardArgs {
  const T *dout, *q, *k, *v, *out;
  const acc_t<T> *dlse, *weight, *lse;
  const int64_t* index;
  acc_t<T> scale;
  T *dq, *dk, *dv;
  acc_t<T>* dk_buffer;  // (n_buffered, t, kv, e): chapter grads of rows read more than once
  acc_t<T>* dv_buffer;
  double* dweight_part;  // (U * n, kv): d(weight) per (unit, slot) and kv head
};

// One (unit, kv head): dq of the group's heads, and per step of chapters their dk / dv and d(weight).
template <typename T>
void backward_task(const BackwardArgs<T>& a, const Dims& d, const UnitSlots& us, const Readers& rd, int64_t b,
                   int64_t g, std::vector<Scratch<acc_t<T>>>& buf) {
  using A = acc_t<T>;
  constexpr bool kConvert = !std::is_same_v<T, A>;
  const int64_t G = d.G(), c = d.c, e = d.e, t = d.t;
  const int64_t n_valid = us.offsets[b + 1] - us.offsets[b];
  const int64_t unit_q = b * c * d.q_row() + g * G * e;  // q[b, 0, g G, 0]
  for (int64_t r = 0; r < c; ++r) {
    std::fill(a.dq + unit_q + r * d.q_row(), a.dq + unit_q + r * d.q_row() + G * e, T(0));
  }
  if (n_valid == 0) return;
  // per (head in group, query): lse and dm = dO.o - dlse
  A* lse = buf[0].data(G * c);
  A* dm = buf[1].data(G * c);
  for (int64_t gi = 0; gi < G; ++gi) {
    for (int64_t r = 0; r < c; ++r) {
      const int64_t row = (b * c + r) * d.h + g * G + gi;
      const T* x = a.dout + unit_q + r * d.q_row() + gi * e;
      const T* y = a.out + unit_q + r * d.q_row() + gi * e;
      A dot = 0;
      for (int64_t z = 0; z < e; ++z) dot += static_cast<A>(x[z]) * static_cast<A>(y[z]);
      lse[gi * c + r] = a.lse[row];
      dm[gi * c + r] = dot - a.dlse[row];
    }
  }
  // q, dO and dq of the group: the tensors themselves, or float copies for half / bfloat16
  const A *qa, *doa;
  A* dqa;
  int64_t ldq = d.q_row();
  if constexpr (kConvert) {
    qa = load(a.q + unit_q, d.q_row(), c, G * e, buf[2], ldq);
    doa = load(a.dout + unit_q, d.q_row(), c, G * e, buf[3], ldq);
    dqa = buf[4].data(c * G * e);
    std::fill(dqa, dqa + c * G * e, A(0));
  } else {
    qa = a.q + unit_q;
    doa = a.dout + unit_q;
    dqa = a.dq + unit_q;
  }
  const int64_t per_step = chapters_per_step(t), ld_s = per_step * t;
  A* s = buf[5].data(kBlockQ * ld_s);
  A* dp = buf[6].data(kBlockQ * ld_s);
  A* kc = buf[7].data(ld_s * e);
  A* vc = buf[8].data(ld_s * e);
  A* dkc = buf[9].data(ld_s * e);
  A* dvc = buf[10].data(ld_s * e);
  A* lanes = buf[11].data(per_step * kLanes);
  std::vector<int64_t> pairs(per_step);
  std::vector<A> w(per_step);
  std::vector<double> dw(per_step);
  const int64_t* slots = us.slots.data() + us.offsets[b];
  for (int64_t j0 = 0; j0 < n_valid; j0 += per_step) {
    const int64_t nc = std::min(per_step, n_valid - j0), keys = nc * t;
    for (int64_t j = 0; j < nc; ++j) {
      pairs[j] = b * d.n + slots[j0 + j];
      w[j] = a.weight[pairs[j]];
    }
    gather_chapters(a.k, a.index, pairs.data(), nullptr, nc, g, d, kc);
    gather_chapters(a.v, a.index, pairs.data(), nullptr, nc, g, d, vc);
    std::fill(dkc, dkc + keys * e, A(0));
    std::fill(dvc, dvc + keys * e, A(0));
    std::fill(dw.begin(), dw.end(), 0.0);
    for (int64_t gi = 0; gi < G; ++gi) {
      for (int64_t r0 = 0; r0 < c; r0 += kBlockQ) {
        const int64_t rows = std::min(kBlockQ, c - r0), at = r0 * ldq + gi * e;
        gemm<A>(false, true, rows, keys, e, A(1), qa + at, ldq, kc, e, A(0), s, ld_s);    // q.k
        gemm<A>(false, true, rows, keys, e, A(1), doa + at, ldq, vc, e, A(0), dp, ld_s);  // dO.v
        backward_step(s, dp, rows, nc, t, ld_s, w.data(), a.scale, lse + gi * c + r0, dm + gi * c + r0, lanes,
                      dw.data());
        gemm<A>(true, false, keys, e, rows, A(1), s, ld_s, doa + at, ldq, A(1), dvc, e);   // dv += w p^T dO
        gemm<A>(true, false, keys, e, rows, A(1), dp, ld_s, qa + at, ldq, A(1), dkc, e);   // dk += scale w ds^T q
        gemm<A>(false, false, rows, e, keys, A(1), dp, ld_s, kc, e, A(1), dqa + at, ldq);  // dq += scale w ds k
      }
    }
    for (int64_t j = 0; j < nc; ++j) {
      const int64_t row = a.index[pairs[j]], slab = rd.buffer[pairs[j]], at = g * e;
      if (slab < 0) {  // the only reader of this row: write the table gradient in place
        store(dkc + j * t * e, e, t, e, a.dk + row * d.chapter() + at, d.k_row());
        store(dvc + j * t * e, e, t, e, a.dv + row * d.chapter() + at, d.k_row());
      } else {
        store(dkc + j * t * e, e, t, e, a.dk_buffer + slab * d.chapter() + at, d.k_row());
        store(dvc + j * t * e, e, t, e, a.dv_buffer + slab * d.chapter() + at, d.k_row());
      }
      a.dweight_part[pairs[j] * d.kv + g] = dw[j];
    }
  }
  if constexpr (kConvert) store(dqa, G * e, c, G * e, a.dq + unit_q, d.q_row());
}

// Table rows read by several pairs sum their buffers in ascending pair order; unread rows are 0.
template <typename T>
void reduce_table_grads(const BackwardArgs<T>& a, const Dims& d, const Readers& rd) {
  using A = acc_t<T>;
  const int64_t len = d.chapter();
  at::parallel_for(0, d.u, 1, [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      const int64_t first = rd.offsets[row], last = rd.offsets[row + 1];
      if (last - first == 1) continue;  // written in place
      for (auto [grad, buffer] : {std::pair{a.dk, a.dk_buffer}, std::pair{a.dv, a.dv_buffer}}) {
        T* dst = grad + row * len;
        if (first == last) {
          std::fill(dst, dst + len, T(0));
          continue;
        }
        for (int64_t x = 0; x < len; ++x) {
          A acc = buffer[rd.buffer[rd.pairs[first]] * len + x];
          for (int64_t i = first + 1; i < last; ++i) acc += buffer[rd.buffer[rd.pairs[i]] * len + x];
          dst[x] = static_cast<T>(acc);
        }
      }
    }
  });
}

template <typename T>
void backward_kernel(const BackwardArgs<T>& a, const Dims& d, const UnitSlots& us, const Readers& rd,
                     acc_t<T>* dweight) {
  run_tasks(d.U * d.kv, [&](auto& next) {
    std::vector<Scratch<acc_t<T>>> buf(12);
    for (int64_t task; next(task);) backward_task(a, d, us, rd, task / d.kv, task % d.kv, buf);
  });
  reduce_table_grads(a, d, rd);
  for (int64_t pair = 0; pair < d.U * d.n; ++pair) {
    double total = 0;
    for (int64_t g = 0; g < d.kv; ++g) total += a.dweight_part[pair * d.kv + g];
    dweight[pair] = a.index[pair] < 0 ? acc_t<T>(0) : static_cast<acc_t<T>>(total);
  }
}

// ---- argument checks -----------------------------------------------------------------------------------

at::ScalarType stats_dtype(at::ScalarType x) { return x == at::kDouble ? at::kDouble : at::kFloat; }

void check_attention_args(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& index,
                          const at::Tensor& weight, const char* op) {
  TORCH_CHECK_VALUE(q.dim() == 4, op, ": q must be (U, c, h, e), got shape ", q.sizes());
  TORCH_CHECK_VALUE(k.dim() == 4, op, ": k must be (u, t, kv, e), got shape ", k.sizes());
  TORCH_CHECK_VALUE(v.sizes() == k.sizes(), op, ": v shape ", v.sizes(), " must equal k shape ", k.sizes());
  const auto x = q.scalar_type();
  TORCH_CHECK_TYPE(x == at::kFloat || x == at::kDouble || x == at::kHalf || x == at::kBFloat16, op,
                   ": q must be float32, float64, float16 or bfloat16, got ", x);
  TORCH_CHECK_TYPE(k.scalar_type() == x && v.scalar_type() == x, op, ": k and v dtypes (", k.scalar_type(), ", ",
                   v.scalar_type(), ") must equal q dtype ", x);
  TORCH_CHECK_VALUE(k.size(3) == q.size(3), op, ": k / v head dim (shape ", k.sizes(), ") must equal q's (shape ",
                    q.sizes(), ")");
  TORCH_CHECK_VALUE(k.size(2) > 0 && q.size(2) % k.size(2) == 0, op, ": q heads (shape ", q.sizes(),
                    ") must be a multiple of k / v heads (shape ", k.sizes(), ")");
  TORCH_CHECK_VALUE(index.dim() == 2 && index.size(0) == q.size(0), op, ": index must be (U, n) with U = ",
                    q.size(0), ", got shape ", index.sizes());
  TORCH_CHECK_TYPE(index.scalar_type() == at::kLong, op, ": index must be int64, got ", index.scalar_type());
  TORCH_CHECK_VALUE(weight.sizes() == index.sizes(), op, ": weight shape ", weight.sizes(),
                    " must equal index shape ", index.sizes());
  TORCH_CHECK_TYPE(weight.scalar_type() == stats_dtype(x), op, ": weight must be ", stats_dtype(x), " for ", x,
                   " q, got ", weight.scalar_type());
  for (const at::Tensor* tensor : {&q, &k, &v, &index, &weight}) {
    TORCH_CHECK_VALUE(tensor->device().is_cpu(), op, ": the kernel runs on CPU tensors only, got a tensor on ",
                      tensor->device());
  }
  const int64_t widest = std::max({q.size(1), q.size(2) * q.size(3), k.size(1), k.size(2) * k.size(3)});
  TORCH_CHECK_VALUE(widest < INT_MAX, op, ": dimensions past 2^31 are not supported (q ", q.sizes(), ", k ",
                    k.sizes(), ")");
}

void check_like(const at::Tensor& x, at::IntArrayRef shape, at::ScalarType dtype, const char* name, const char* op) {
  TORCH_CHECK_VALUE(x.sizes() == shape, op, ": ", name, " must have shape ", shape, ", got ", x.sizes());
  TORCH_CHECK_TYPE(x.scalar_type() == dtype, op, ": ", name, " must be ", dtype, ", got ", x.scalar_type());
  TORCH_CHECK_VALUE(x.device().is_cpu(), op, ": the kernel runs on CPU tensors only, got ", name, " on ",
                    x.device());
}

// Entries are table rows in [0, num_rows) or -1 (unused slot); anything else raises IndexError.
void check_slots(const at::Tensor& index, int64_t num_rows, const char* op) {
  const int64_t* p = index.const_data_ptr<int64_t>();
  for (int64_t i = 0; i < index.numel(); ++i) {
    TORCH_CHECK_INDEX(p[i] >= -1 && p[i] < num_rows, op, ": chapter id ", p[i], " is out of range for a table of ",
                      num_rows, " rows (valid ids are 0..", num_rows - 1, ", or -1 for an unused slot)");
  }
}

Dims dims_of(const at::Tensor& q, const at::Tensor& k, const at::Tensor& index) {
  return {q.size(0), q.size(1), q.size(2), q.size(3), k.size(0), k.size(1), k.size(2), index.size(1)};
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> chapter_attention_fwd(const at::Tensor& q_in, const at::Tensor& k_in,
                                                         const at::Tensor& v_in, const at::Tensor& index_in,
                                                         const at::Tensor& weight_in, double scale) {
  constexpr const char* op = "chapter_attention_fwd";
  check_attention_args(q_in, k_in, v_in, index_in, weight_in, op);
  const auto q = q_in.contiguous(), k = k_in.contiguous(), v = v_in.contiguous();
  const auto index = index_in.contiguous(), weight = weight_in.contiguous();
  check_slots(index, k.size(0), op);
  const Dims d = dims_of(q, k, index);
  const UnitSlots us = valid_slots(index.const_data_ptr<int64_t>(), d.U, d.n);
  auto out = at::empty(q.sizes(), q.options());
  auto lse = at::empty({d.U, d.c, d.h}, q.options().dtype(stats_dtype(q.scalar_type())));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), op, [&] {
    using A = acc_t<scalar_t>;
    forward_kernel<scalar_t>(q.const_data_ptr<scalar_t>(), k.const_data_ptr<scalar_t>(), v.const_data_ptr<scalar_t>(),
                             index.const_data_ptr<int64_t>(), weight.const_data_ptr<A>(), static_cast<A>(scale), d, us,
                             out.mutable_data_ptr<scalar_t>(), lse.mutable_data_ptr<A>());
  });
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> chapter_attention_bwd(
    const at::Tensor& dout_in, const at::Tensor& dlse_in, const at::Tensor& q_in, const at::Tensor& k_in,
    const at::Tensor& v_in, const at::Tensor& index_in, const at::Tensor& weight_in, const at::Tensor& out_in,
    const at::Tensor& lse_in, double scale) {
  constexpr const char* op = "chapter_attention_bwd";
  check_attention_args(q_in, k_in, v_in, index_in, weight_in, op);
  const auto stats = stats_dtype(q_in.scalar_type());
  const std::vector<int64_t> stats_shape{q_in.size(0), q_in.size(1), q_in.size(2)};
  check_like(dout_in, q_in.sizes(), q_in.scalar_type(), "dout", op);
  check_like(out_in, q_in.sizes(), q_in.scalar_type(), "out", op);
  check_like(lse_in, stats_shape, stats, "lse", op);
  check_like(dlse_in, stats_shape, stats, "dlse", op);
  const auto q = q_in.contiguous(), k = k_in.contiguous(), v = v_in.contiguous();
  const auto index = index_in.contiguous(), weight = weight_in.contiguous();
  const auto dout = dout_in.contiguous(), dlse = dlse_in.contiguous();
  const auto out = out_in.contiguous(), lse = lse_in.contiguous();
  check_slots(index, k.size(0), op);
  const Dims d = dims_of(q, k, index);
  const int64_t* idx = index.const_data_ptr<int64_t>();
  const UnitSlots us = valid_slots(idx, d.U, d.n);
  const Readers rd = table_readers(idx, d.U * d.n, d.u);
  auto dq = at::empty(q.sizes(), q.options());
  auto dk = at::empty(k.sizes(), k.options());
  auto dv = at::empty(v.sizes(), v.options());
  auto dweight = at::empty(index.sizes(), weight.options());
  auto dk_buffer = at::empty({rd.n_buffered, d.t, d.kv, d.e}, weight.options());
  auto dv_buffer = at::empty({rd.n_buffered, d.t, d.kv, d.e}, weight.options());
  auto dweight_part = at::zeros({d.U * d.n, d.kv}, weight.options().dtype(at::kDouble));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), op, [&] {
    using A = acc_t<scalar_t>;
    const BackwardArgs<scalar_t> args{dout.const_data_ptr<scalar_t>(), q.const_data_ptr<scalar_t>(),
                                      k.const_data_ptr<scalar_t>(), v.const_data_ptr<scalar_t>(),
                                      out.const_data_ptr<scalar_t>(), dlse.const_data_ptr<A>(),
                                      weight.const_data_ptr<A>(), lse.const_data_ptr<A>(), idx, static_cast<A>(scale),
                                      dq.mutable_data_ptr<scalar_t>(), dk.mutable_data_ptr<scalar_t>(),
                                      dv.mutable_data_ptr<scalar_t>(), dk_buffer.mutable_data_ptr<A>(),
                                      dv_buffer.mutable_data_ptr<A>(), dweight_part.mutable_data_ptr<double>()};
    backward_kernel(args, d, us, rd, dweight.mutable_data_ptr<A>());
  });
  return {dq, dk, dv, dweight};
}

}  // namespace moc
