// Launcher of the CUDA ib_alpha kernel; plain C++ types only, so that ib_alpha_kernel.cu needs
// no torch header and `nvcc -c` can compile it on a machine whose torch has no CUDA.
#pragma once
#include <cstdint>

namespace torchopt_ext {
namespace cuda {

// dtype: 0 = float32, 1 = float64. Pointers are device pointers to contiguous arrays:
// pre/grad/out (rows, m), zsq (rows); knots (M-1) and coef (M, 4) float64 when kind == kPiecewise.
// Returns the cudaError_t of the launch as an int (0 = success).
int ib_alpha_launch(int64_t kind, int dtype, const void* pre, const void* grad, const void* zsq, void* out,
                    int64_t rows, int64_t m, double lr, double weight_decay, const double* knots, const double* coef,
                    int64_t M, void* stream);

}  // namespace cuda
}  // namespace torchopt_ext
