// CUDA kernels of the five-probe ops. probe_move: a multi-tensor launch, blockIdx.y picks the tensor,
// a grid-stride loop over its elements; the step is read from device memory (no host sync).
#include <cuda_runtime.h>

#include "probe_kernel.h"
#include "torchopt_ext/probe_math.h"

namespace torchopt_ext {
namespace cuda {
namespace {

struct MoveChunk {
  void* p[kProbeChunk];
  const void* s[kProbeChunk];
  const void* d[kProbeChunk];
  int64_t n[kProbeChunk];
};

// products rounded on their own (no fused multiply-add), so CUDA matches the CPU kernel bitwise
__device__ __forceinline__ float mul_rn(float a, float b) { return __fmul_rn(a, b); }
__device__ __forceinline__ double mul_rn(double a, double b) { return __dmul_rn(a, b); }

template <typename T>
__global__ void probe_move_kernel(MoveChunk c, const double* __restrict__ step) {
  const int t = blockIdx.y;
  T* __restrict__ p = static_cast<T*>(c.p[t]);
  const T* __restrict__ s = static_cast<const T*>(c.s[t]);
  const T* __restrict__ d = static_cast<const T*>(c.d[t]);
  const T h = static_cast<T>(*step);  // rounded to T once, as on the CPU
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < c.n[t]; i += (int64_t)gridDim.x * blockDim.x)
    p[i] = s[i] - mul_rn(d[i], h);
}

__global__ void newton_lr_kernel(const double* f, const double* eta, const double* v, double eps, double delta,
                                 double beta, double* eta_out, double* v_out) {
  torchopt_ext::math::newton_lr_update(f, *eta, *v, eps, delta, beta, eta_out, v_out);
}

__global__ void guarded_lr_kernel(const double* f, const double* eta, double eps, double delta, double growth,
                                  double fraction, double shrink, double* eta_out) {
  *eta_out = torchopt_ext::math::guarded_lr_update(f, *eta, eps, delta, growth, fraction, shrink);
}

}  // namespace

int probe_move_launch(int dtype, void* const* params, const void* const* saved, const void* const* direction,
                      const int64_t* numel, int count, const double* step, void* stream) {
  const int threads = 256;
  for (int b = 0; b < count; b += kProbeChunk) {
    MoveChunk c{};
    const int k = (count - b) < kProbeChunk ? (count - b) : kProbeChunk;
    int64_t largest = 0;
    for (int i = 0; i < k; ++i) {
      c.p[i] = params[b + i];
      c.s[i] = saved[b + i];
      c.d[i] = direction[b + i];
      c.n[i] = numel[b + i];
      if (numel[b + i] > largest) largest = numel[b + i];
    }
    if (largest == 0) continue;
    int64_t bx = (largest + threads - 1) / threads;
    if (bx > 1024) bx = 1024;  // grid-stride beyond that; k tensors share the grid's y
    const dim3 grid(static_cast<unsigned>(bx), static_cast<unsigned>(k));
    auto st = static_cast<cudaStream_t>(stream);
    if (dtype == 1)
      probe_move_kernel<double><<<grid, threads, 0, st>>>(c, step);
    else
      probe_move_kernel<float><<<grid, threads, 0, st>>>(c, step);
    const cudaError_t err = cudaGetLastError();
    if (err != cudaSuccess) return static_cast<int>(err);
  }
  return 0;
}

int newton_lr_launch(const double* losses, const double* eta, const double* v, double eps, double delta, double beta,
                     double* eta_out, double* v_out, void* stream) {
  newton_lr_kernel<<<1, 1, 0, static_cast<cudaStream_t>(stream)>>>(losses, eta, v, eps, delta, beta, eta_out, v_out);
  return static_cast<int>(cudaGetLastError());
}

int guarded_lr_launch(const double* losses, const double* eta, double eps, double delta, double growth, double fraction,
                      double shrink, double* eta_out, void* stream) {
  guarded_lr_kernel<<<1, 1, 0, static_cast<cudaStream_t>(stream)>>>(losses, eta, eps, delta, growth, fraction, shrink,
                                                                    eta_out);
  return static_cast<int>(cudaGetLastError());
}

}  // namespace cuda
}  // namespace torchopt_ext
