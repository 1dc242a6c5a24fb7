// Launchers of the CUDA probe kernels; plain C++ types only, so that probe_kernel.cu needs no torch
// header and `nvcc -c` can compile-check it on a machine whose torch has no CUDA.
#pragma once
#include <cstdint>

namespace torchopt_ext {
namespace cuda {

// How many tensors one probe_move launch handles (they travel in the kernel's parameter block).
constexpr int kProbeChunk = 48;

// params[i] <- saved[i] - (*step) * direction[i] for i < count, one launch for all of them.
// dtype: 0 = float32, 1 = float64; step: a device pointer to one double. Returns the cudaError_t.
int probe_move_launch(int dtype, void* const* params, const void* const* saved, const void* const* direction,
                      const int64_t* numel, int count, const double* step, void* stream);

// One thread: eta_out/v_out <- the five-probe update of probe_math.h from 5 float64 losses.
int newton_lr_launch(const double* losses, const double* eta, const double* v, double eps, double delta, double beta,
                     double* eta_out, double* v_out, void* stream);

// One thread: *eta_out <- the guarded update of probe_math.h from 5 float64 losses.
int guarded_lr_launch(const double* losses, const double* eta, double eps, double delta, double growth, double fraction,
                      double shrink, double* eta_out, void* stream);

}  // namespace cuda
}  // namespace torchopt_ext
