// CUDA kernel of torchopt_ext::ib_alpha: a grid-stride loop, one thread per (sample, neuron),
// the same inlined solvers as the CPU path (ib_alpha_math.h). No torch header on purpose.
#include <cuda_runtime.h>

#include "ib_alpha_kernel.h"
#include "torchopt_ext/ib_alpha_math.h"

namespace torchopt_ext {
namespace cuda {
namespace {

namespace tm = torchopt_ext::math;

// relu and identity run in the input precision (bandwidth-bound); the cubic solvers in double,
// where tau^2 and the cubic's coefficients cannot overflow (H100/H200 have full-rate FP64).
template <int64_t KIND, typename T>
struct Acc {
  using type = double;
};
template <typename T>
struct Acc<tm::kRelu, T> {
  using type = T;
};
template <typename T>
struct Acc<tm::kIdentity, T> {
  using type = T;
};

template <int64_t KIND, typename T>
__global__ void ib_alpha_kernel(const T* __restrict__ pre, const T* __restrict__ grad,
                                const T* __restrict__ zsq, T* __restrict__ out, int64_t n, int64_t m,
                                double lr, double wd, const double* __restrict__ knots,
                                const double* __restrict__ coef, int64_t M) {
  using A = typename Acc<KIND, T>::type;
  const tm::RuntimePieces<A> rp{M, knots, coef};
  const A eta = static_cast<A>(lr), mu = static_cast<A>(wd);
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n;
       i += (int64_t)gridDim.x * blockDim.x) {
    const A z = static_cast<A>(__ldg(zsq + i / m));
    out[i] = static_cast<T>(tm::alpha_dispatch<KIND, A>(static_cast<A>(__ldg(pre + i)),
                                                         static_cast<A>(__ldg(grad + i)), z, eta, mu, rp));
  }
}

template <int64_t KIND, typename T>
int launch(const void* pre, const void* grad, const void* zsq, void* out, int64_t rows, int64_t m, double lr,
           double wd, const double* knots, const double* coef, int64_t M, cudaStream_t stream) {
  const int64_t n = rows * m;
  if (n == 0) return 0;
  int device = 0, sms = 0;
  cudaGetDevice(&device);
  cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device);
  const int threads = 256;
  int64_t blocks = (n + threads - 1) / threads;
  const int64_t cap = static_cast<int64_t>(sms) * 32;  // enough resident blocks to hide latency
  if (blocks > cap) blocks = cap;
  ib_alpha_kernel<KIND, T><<<static_cast<unsigned>(blocks), threads, 0, stream>>>(
      static_cast<const T*>(pre), static_cast<const T*>(grad), static_cast<const T*>(zsq), static_cast<T*>(out),
      n, m, lr, wd, knots, coef, M);
  return static_cast<int>(cudaGetLastError());
}

template <typename T>
int launch_kind(int64_t kind, const void* pre, const void* grad, const void* zsq, void* out, int64_t rows,
                int64_t m, double lr, double wd, const double* knots, const double* coef, int64_t M,
                cudaStream_t s) {
  switch (kind) {
    case tm::kRelu: return launch<tm::kRelu, T>(pre, grad, zsq, out, rows, m, lr, wd, knots, coef, M, s);
    case tm::kArctan: return launch<tm::kArctan, T>(pre, grad, zsq, out, rows, m, lr, wd, knots, coef, M, s);
    case tm::kHardtanh: return launch<tm::kHardtanh, T>(pre, grad, zsq, out, rows, m, lr, wd, knots, coef, M, s);
    case tm::kSmoothstep:
      return launch<tm::kSmoothstep, T>(pre, grad, zsq, out, rows, m, lr, wd, knots, coef, M, s);
    case tm::kIdentity: return launch<tm::kIdentity, T>(pre, grad, zsq, out, rows, m, lr, wd, knots, coef, M, s);
    default: return launch<tm::kPiecewise, T>(pre, grad, zsq, out, rows, m, lr, wd, knots, coef, M, s);
  }
}

}  // namespace

int ib_alpha_launch(int64_t kind, int dtype, const void* pre, const void* grad, const void* zsq, void* out,
                    int64_t rows, int64_t m, double lr, double weight_decay, const double* knots,
                    const double* coef, int64_t M, void* stream) {
  auto s = static_cast<cudaStream_t>(stream);
  if (dtype == 0)
    return launch_kind<float>(kind, pre, grad, zsq, out, rows, m, lr, weight_decay, knots, coef, M, s);
  return launch_kind<double>(kind, pre, grad, zsq, out, rows, m, lr, weight_decay, knots, coef, M, s);
}

}  // namespace cuda
}  // namespace torchopt_ext
