// CUDA kernel of torchopt_ext::ib_alpha: a grid-stride loop over packs of V neighbouring neurons,
// the same inlined solvers as the CPU path (ib_alpha_math.h). No torch header on purpose.
#include <cuda_runtime.h>

#include <cstdint>

#include "ib_alpha_kernel.h"
#include "torchopt_ext/ib_alpha_math.h"

namespace torchopt_ext {
namespace cuda {
namespace {

namespace tm = torchopt_ext::math;

// V consecutive elements per thread through one 16-byte load of each input, so that the
// bandwidth-bound kinds (relu, identity) run near copy speed; a row's V elements share one z and
// one index division (m % V == 0). I is the index type: 32-bit where the tensor allows, since
// 64-bit integer division is emulated on the GPU.
template <typename T, int V>
struct alignas(sizeof(T) * V) Pack {
  T v[V];
};

// relu and identity run in the input precision (bandwidth-bound) on their row constants, computed
// in double, or in double where those do not fit the input precision (tm::linear_row_fits); the
// cubic solvers in double, where tau^2 and the cubic's coefficients cannot overflow (H100/H200
// have full-rate FP64).
template <int64_t KIND, typename A, typename T, int V>
__device__ __forceinline__ void linear_pack(const Pack<T, V>& q, const Pack<T, V>& b, A z, const tm::LinearRow<A>& row,
                                            Pack<T, V>& a) {
#pragma unroll
  for (int k = 0; k < V; ++k)
    a.v[k] = static_cast<T>(tm::alpha_linear<KIND, A>(static_cast<A>(q.v[k]), static_cast<A>(b.v[k]), z, row));
}

template <int64_t KIND, typename T, int V, typename I>
__global__ void ib_alpha_kernel(const T* __restrict__ pre, const T* __restrict__ grad, const T* __restrict__ zsq,
                                T* __restrict__ out, I packs, I m_packs, double lr, double wd,
                                const double* __restrict__ knots, const double* __restrict__ coef, int64_t M) {
  using P = Pack<T, V>;
  const tm::RuntimePieces<double> rp{M, knots, coef};
  const I stride = static_cast<I>(gridDim.x) * static_cast<I>(blockDim.x);
  for (I i = static_cast<I>(blockIdx.x) * static_cast<I>(blockDim.x) + threadIdx.x; i < packs; i += stride) {
    const P q = reinterpret_cast<const P*>(pre)[i];
    const P b = reinterpret_cast<const P*>(grad)[i];
    const T z = __ldg(zsq + i / m_packs);
    P a;
    if constexpr (KIND == tm::kRelu || KIND == tm::kIdentity) {
      const tm::LinearRow<double> row = tm::linear_row<double>(lr, wd, static_cast<double>(z));
      if (tm::linear_row_fits<T>(row))
        linear_pack<KIND, T>(q, b, z, tm::linear_row_as<T>(row), a);
      else
        linear_pack<KIND, double>(q, b, static_cast<double>(z), row, a);
    } else {
#pragma unroll
      for (int k = 0; k < V; ++k)
        a.v[k] = static_cast<T>(tm::alpha_dispatch<KIND, double>(
            static_cast<double>(q.v[k]), static_cast<double>(b.v[k]), static_cast<double>(z), lr, wd, rp));
    }
    reinterpret_cast<P*>(out)[i] = a;
  }
}

template <int64_t KIND, typename T, int V, typename I>
int launch_v(const void* pre, const void* grad, const void* zsq, void* out, int64_t rows, int64_t m, double lr,
             double wd, const double* knots, const double* coef, int64_t M, cudaStream_t stream) {
  const int64_t packs = rows * m / V;
  int device = 0, sms = 0;
  cudaGetDevice(&device);
  cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device);
  const int threads = 256;
  int64_t blocks = (packs + threads - 1) / threads;
  const int64_t cap = static_cast<int64_t>(sms) * 32;  // enough resident blocks to hide latency
  if (blocks > cap) blocks = cap;
  ib_alpha_kernel<KIND, T, V, I><<<static_cast<unsigned>(blocks), threads, 0, stream>>>(
      static_cast<const T*>(pre), static_cast<const T*>(grad), static_cast<const T*>(zsq), static_cast<T*>(out),
      static_cast<I>(packs), static_cast<I>(m / V), lr, wd, knots, coef, M);
  return static_cast<int>(cudaGetLastError());
}

inline bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15u) == 0; }

template <int64_t KIND, typename T>
int launch(const void* pre, const void* grad, const void* zsq, void* out, int64_t rows, int64_t m, double lr, double wd,
           const double* knots, const double* coef, int64_t M, cudaStream_t stream) {
  const int64_t n = rows * m;
  if (n == 0) return 0;
  constexpr int V = 16 / sizeof(T);
  const bool vec = m % V == 0 && aligned16(pre) && aligned16(grad) && aligned16(out);
  // the grid-stride index may pass n by one stride before the loop ends: keep headroom in 32 bits
  const bool small = n < (int64_t(1) << 30);
  if (vec && small) return launch_v<KIND, T, V, uint32_t>(pre, grad, zsq, out, rows, m, lr, wd, knots, coef, M, stream);
  if (vec) return launch_v<KIND, T, V, int64_t>(pre, grad, zsq, out, rows, m, lr, wd, knots, coef, M, stream);
  if (small) return launch_v<KIND, T, 1, uint32_t>(pre, grad, zsq, out, rows, m, lr, wd, knots, coef, M, stream);
  return launch_v<KIND, T, 1, int64_t>(pre, grad, zsq, out, rows, m, lr, wd, knots, coef, M, stream);
}

template <typename T>
int launch_kind(int64_t kind, const void* pre, const void* grad, const void* zsq, void* out, int64_t rows, int64_t m,
                double lr, double wd, const double* knots, const double* coef, int64_t M, cudaStream_t s) {
  switch (kind) {
    case tm::kRelu: return launch<tm::kRelu, T>(pre, grad, zsq, out, rows, m, lr, wd, knots, coef, M, s);
    case tm::kArctan: return launch<tm::kArctan, T>(pre, grad, zsq, out, rows, m, lr, wd, knots, coef, M, s);
    case tm::kHardtanh: return launch<tm::kHardtanh, T>(pre, grad, zsq, out, rows, m, lr, wd, knots, coef, M, s);
    case tm::kSmoothstep: return launch<tm::kSmoothstep, T>(pre, grad, zsq, out, rows, m, lr, wd, knots, coef, M, s);
    case tm::kIdentity: return launch<tm::kIdentity, T>(pre, grad, zsq, out, rows, m, lr, wd, knots, coef, M, s);
    default: return launch<tm::kPiecewise, T>(pre, grad, zsq, out, rows, m, lr, wd, knots, coef, M, s);
  }
}

}  // namespace

int ib_alpha_launch(int64_t kind, int dtype, const void* pre, const void* grad, const void* zsq, void* out,
                    int64_t rows, int64_t m, double lr, double weight_decay, const double* knots, const double* coef,
                    int64_t M, void* stream) {
  auto s = static_cast<cudaStream_t>(stream);
  if (dtype == 0) return launch_kind<float>(kind, pre, grad, zsq, out, rows, m, lr, weight_decay, knots, coef, M, s);
  return launch_kind<double>(kind, pre, grad, zsq, out, rows, m, lr, weight_decay, knots, coef, M, s);
}

}  // namespace cuda
}  // namespace torchopt_ext
