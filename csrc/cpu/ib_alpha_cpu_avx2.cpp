// The ib_alpha row loops compiled for AVX2+FMA (4 doubles / 8 floats a vector); see ib_alpha_rows.h.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#pragma GCC target("avx2,fma")
#define TOX_CPU_CAPABILITY avx2
#define TOX_MATH_NS math_avx2
#include "ib_alpha_isa.h"
#include "ib_alpha_rows.h"

namespace torchopt_ext {
namespace cpu {
namespace avx2 {
const AlphaRowKernels* row_kernels() {
  static constexpr AlphaRowKernels kernels = make_row_kernels();
  return &kernels;
}
}  // namespace avx2
}  // namespace cpu
}  // namespace torchopt_ext

#else
#include "ib_alpha_dispatch.h"

namespace torchopt_ext {
namespace cpu {
namespace avx2 {
// this compiler takes no GCC target pragma, so the dispatcher never picks AVX2
const AlphaRowKernels* row_kernels() { return nullptr; }
}  // namespace avx2
}  // namespace cpu
}  // namespace torchopt_ext
#endif
