// Chapter gather / scatter CUDA kernels: plain CUDA C++, no torch dependency, so nvcc can compile
// and check them on a machine whose torch has no CUDA headers (tests/test_csrc_build.py).
//
// Letters: n_rows = b * n selected chapter rows, e = t * d elements per chapter, u = table rows.
// Summation orders match csrc/chapter_ops.cpp exactly so CUDA, C++ and torch agree bitwise in fp32
// (gather and scatter); __f*_rn intrinsics keep nvcc from fusing into FMAs under fast-math.
#pragma once

#include <cstdint>
#include <type_traits>

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

namespace moc_kernels {

constexpr int kThreads = 256;

// Accumulation type: float for 16-bit and 32-bit floats, double for double.
template <typename T> struct Acc { using type = float; };
template <> struct Acc<double> { using type = double; };

__device__ __forceinline__ float to_acc(float x) { return x; }
__device__ __forceinline__ double to_acc(double x) { return x; }
__device__ __forceinline__ float to_acc(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_acc(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T> __device__ __forceinline__ T from_acc(typename Acc<T>::type x);
template <> __device__ __forceinline__ float from_acc<float>(float x) { return x; }
template <> __device__ __forceinline__ double from_acc<double>(double x) { return x; }
template <> __device__ __forceinline__ __half from_acc<__half>(float x) { return __float2half_rn(x); }
template <> __device__ __forceinline__ __nv_bfloat16 from_acc<__nv_bfloat16>(float x) {
  return __float2bfloat16_rn(x);
}

// Correctly rounded, never contracted: the CPU kernels round every product and every sum.
__device__ __forceinline__ float mul_rn(float a, float b) { return __fmul_rn(a, b); }
__device__ __forceinline__ double mul_rn(double a, double b) { return __dmul_rn(a, b); }
__device__ __forceinline__ float add_rn(float a, float b) { return __fadd_rn(a, b); }
__device__ __forceinline__ double add_rn(double a, double b) { return __dadd_rn(a, b); }

// VEC consecutive elements moved as one aligned load/store (16 bytes when VEC * sizeof(T) == 16).
template <typename T, int VEC> struct alignas(sizeof(T) * VEC) Pack { T v[VEC]; };

// out[i, e] = weight[i] * table[index[i], e]; grid (n_rows, chunks of e); weight may be null.
template <typename T, int VEC>
__global__ void chapter_gather_kernel(const T* __restrict__ table, const int64_t* __restrict__ index,
                                      const T* __restrict__ weight, T* __restrict__ out,
                                      int64_t row_elems) {
  using P = Pack<T, VEC>;
  const int64_t i = blockIdx.x;
  const int64_t e = (static_cast<int64_t>(blockIdx.y) * blockDim.x + threadIdx.x) * VEC;
  if (e >= row_elems) return;
  const P x = *reinterpret_cast<const P*>(table + index[i] * row_elems + e);
  P y = x;
  if (weight != nullptr) {
    const auto w = to_acc(weight[i]);
#pragma unroll
    for (int k = 0; k < VEC; ++k) y.v[k] = from_acc<T>(mul_rn(w, to_acc(x.v[k])));
  }
  *reinterpret_cast<P*>(out + i * row_elems + e) = y;
}

// grad_table[u, e] = sum over k in [offsets[u], offsets[u+1]) of weight[order[k]] * grad[order[k], e],
// in ascending k (order is a stable sort of the flat index): deterministic, no atomics.
// One block row per table row u, so rows nobody selected are written as zeros.
template <typename T, int VEC>
__global__ void chapter_scatter_kernel(const T* __restrict__ grad, const T* __restrict__ weight,
                                       const int64_t* __restrict__ order,
                                       const int64_t* __restrict__ offsets, T* __restrict__ grad_table,
                                       int64_t row_elems) {
  using A = typename Acc<T>::type;
  using P = Pack<T, VEC>;
  const int64_t u = blockIdx.x;
  const int64_t e = (static_cast<int64_t>(blockIdx.y) * blockDim.x + threadIdx.x) * VEC;
  if (e >= row_elems) return;
  A acc[VEC];
#pragma unroll
  for (int k = 0; k < VEC; ++k) acc[k] = A(0);
  for (int64_t s = offsets[u]; s < offsets[u + 1]; ++s) {
    const int64_t i = order[s];
    const P g = *reinterpret_cast<const P*>(grad + i * row_elems + e);
    if (weight != nullptr) {
      const A w = to_acc(weight[i]);
#pragma unroll
      for (int k = 0; k < VEC; ++k) acc[k] = add_rn(acc[k], mul_rn(w, to_acc(g.v[k])));
    } else {
#pragma unroll
      for (int k = 0; k < VEC; ++k) acc[k] = add_rn(acc[k], to_acc(g.v[k]));
    }
  }
  P y;
#pragma unroll
  for (int k = 0; k < VEC; ++k) y.v[k] = from_acc<T>(acc[k]);
  *reinterpret_cast<P*>(grad_table + u * row_elems + e) = y;
}

// grad_weight[i] = sum_e grad[i, e] * table[index[i], e]; one block per row, fixed-shape tree
// reduction (deterministic run to run; not the CPU's order, so it matches CPU to round-off only).
template <typename T>
__global__ void chapter_weight_grad_kernel(const T* __restrict__ grad, const T* __restrict__ table,
                                           const int64_t* __restrict__ index, T* __restrict__ grad_weight,
                                           int64_t row_elems) {
  using A = typename Acc<T>::type;
  __shared__ A partial[kThreads];
  const int64_t i = blockIdx.x;
  const T* g = grad + i * row_elems;
  const T* x = table + index[i] * row_elems;
  A acc = A(0);
  for (int64_t e = threadIdx.x; e < row_elems; e += blockDim.x) {
    acc = add_rn(acc, mul_rn(to_acc(g[e]), to_acc(x[e])));
  }
  partial[threadIdx.x] = acc;
  __syncthreads();
  for (int stride = kThreads / 2; stride > 0; stride /= 2) {
    if (threadIdx.x < stride) {
      partial[threadIdx.x] = add_rn(partial[threadIdx.x], partial[threadIdx.x + stride]);
    }
    __syncthreads();
  }
  if (threadIdx.x == 0) grad_weight[i] = from_acc<T>(partial[0]);
}

// Widest pack (up to 16 bytes) that divides the row and keeps every row start aligned.
template <typename T>
inline int pick_vec(const void* a, const void* b, int64_t row_elems) {
  for (int vec = static_cast<int>(16 / sizeof(T)); vec > 1; vec /= 2) {
    const uintptr_t bytes = static_cast<uintptr_t>(vec) * sizeof(T);
    const bool aligned =
        reinterpret_cast<uintptr_t>(a) % bytes == 0 && reinterpret_cast<uintptr_t>(b) % bytes == 0;
    if (aligned && row_elems % vec == 0) return vec;
  }
  return 1;
}

inline dim3 grid_for(int64_t rows, int64_t row_elems, int vec) {
  const int64_t per_block = static_cast<int64_t>(kThreads) * vec;
  return dim3(static_cast<unsigned>(rows), static_cast<unsigned>((row_elems + per_block - 1) / per_block));
}

// Calls f(std::integral_constant<int, V>{}) for the pack width V = vec, so one launch site
// instantiates a kernel for every width pick_vec can return.
template <typename F>
inline void with_vec(int vec, F&& f) {
  switch (vec) {
    case 8: f(std::integral_constant<int, 8>{}); break;
    case 4: f(std::integral_constant<int, 4>{}); break;
    case 2: f(std::integral_constant<int, 2>{}); break;
    default: f(std::integral_constant<int, 1>{});
  }
}

// Launchers: raw device pointers, contiguous (n_rows, e) / (u, e) layouts; return the launch status.
template <typename T>
cudaError_t launch_chapter_gather(const T* table, const int64_t* index, const T* weight, T* out,
                                  int64_t n_rows, int64_t row_elems, cudaStream_t stream) {
  if (n_rows == 0 || row_elems == 0) return cudaSuccess;
  const int vec = pick_vec<T>(table, out, row_elems);
  const dim3 grid = grid_for(n_rows, row_elems, vec);
  with_vec(vec, [&](auto v) {
    chapter_gather_kernel<T, decltype(v)::value><<<grid, kThreads, 0, stream>>>(table, index, weight, out, row_elems);
  });
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_chapter_scatter(const T* grad, const T* weight, const int64_t* order, const int64_t* offsets,
                                   T* grad_table, int64_t num_rows, int64_t row_elems, cudaStream_t stream) {
  if (num_rows == 0 || row_elems == 0) return cudaSuccess;
  const int vec = pick_vec<T>(grad, grad_table, row_elems);
  const dim3 grid = grid_for(num_rows, row_elems, vec);
  with_vec(vec, [&](auto v) {
    chapter_scatter_kernel<T, decltype(v)::value><<<grid, kThreads, 0, stream>>>(grad, weight, order, offsets,
                                                                                 grad_table, row_elems);
  });
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_chapter_weight_grad(const T* grad, const T* table, const int64_t* index, T* grad_weight,
                                       int64_t n_rows, int64_t row_elems, cudaStream_t stream) {
  if (n_rows == 0) return cudaSuccess;
  chapter_weight_grad_kernel<T><<<static_cast<unsigned>(n_rows), kThreads, 0, stream>>>(grad, table, index,
                                                                                       grad_weight, row_elems);
  return cudaGetLastError();
}

}  // namespace moc_kernels
