// The ib_alpha row loops compiled for AVX-512 (8 doubles / 16 floats a vector); see ib_alpha_rows.h.
// prefer-vector-width=512: GCC otherwise keeps to 256-bit vectors on AVX-512 targets, and the
// compute-bound solvers run faster at the full width.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && \
    __GNUC__ >= 10  // (prefer-vector-width as a target option)
#pragma GCC target("avx512f,avx512vl,avx512dq,avx512bw,fma,prefer-vector-width=512")
#define TOX_CPU_CAPABILITY avx512
#define TOX_MATH_NS math_avx512
#include "ib_alpha_isa.h"
#include "ib_alpha_rows.h"

namespace torchopt_ext {
namespace cpu {
namespace avx512 {
const AlphaRowKernels* row_kernels() {
  static constexpr AlphaRowKernels kernels = make_row_kernels();
  return &kernels;
}
}  // namespace avx512
}  // namespace cpu
}  // namespace torchopt_ext

#else
#include "ib_alpha_dispatch.h"

namespace torchopt_ext {
namespace cpu {
namespace avx512 {
// this compiler cannot take the AVX-512 target pragma, so the dispatcher never picks AVX-512
const AlphaRowKernels* row_kernels() { return nullptr; }
}  // namespace avx512
}  // namespace cpu
}  // namespace torchopt_ext
#endif
