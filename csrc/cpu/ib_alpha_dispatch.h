// What the CPU ib_alpha kernel (ib_alpha_cpu.cpp) and its per-instruction-set row loops
// (ib_alpha_cpu_<isa>.cpp) share: the table of row loops each instruction set fills, and the
// fast paths' counters the loops report to. No torch header here.
#pragma once
#include <cstdint>

namespace torchopt_ext {
namespace cpu {

// One entry per value of enum Kind (ib_alpha_math.h); ib_alpha_rows.h asserts that they agree.
constexpr int64_t kRowKinds = 6;

// Rows [r0, r1) of the (rows, m) inputs; M, knots and coef describe a kPiecewise activation.
template <typename T>
using AlphaRowsFn = void (*)(const T* pre, const T* grad, const T* zsq, T* out, int64_t r0, int64_t r1, int64_t m,
                             double lr, double wd, int64_t M, const double* knots, const double* coef);

// The row loops of one instruction set, indexed by kind.
struct AlphaRowKernels {
  AlphaRowsFn<float> f32[kRowKinds];       // float32 input, solved in float32 or double as the kind needs
  AlphaRowsFn<double> f64[kRowKinds];      // float64 input
  AlphaRowsFn<float> f32_fast[kRowKinds];  // the float32 fast paths (ib_alpha_fast32.h); nullptr: none
};

// Each instruction set's table; nullptr where the compiler could not target that instruction set.
namespace baseline {
const AlphaRowKernels* row_kernels();
}
namespace avx2 {
const AlphaRowKernels* row_kernels();
}
namespace avx512 {
const AlphaRowKernels* row_kernels();
}

// How many float32 elements the fast paths' first pass left to the second, and how many both
// left to the double solver; the loops add to them, torchopt_ext.debug reads them.
void count_fast32_second(int64_t n);
void count_fast32_redone(int64_t n);

}  // namespace cpu
}  // namespace torchopt_ext
