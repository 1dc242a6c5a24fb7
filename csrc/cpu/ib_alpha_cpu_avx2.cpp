// The ib_alpha row loop compiled for AVX2+FMA (4 doubles / 8 floats a vector). No torch header
// here: everything this file emits lives in its own namespace (TOX_MATH_NS), so no inline
// function compiled for AVX2 can be picked by the linker for the baseline path.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#pragma GCC target("avx2,fma")
#define TOX_HAVE_AVX2_TU 1
#endif
#define TOX_MATH_NS math_avx2
#include "torchopt_ext/ib_alpha_math.h"
#include "ib_alpha_rows.h"

namespace torchopt_ext {
namespace cpu {
namespace tm = ::torchopt_ext::math_avx2;
#ifdef TOX_HAVE_AVX2_TU
TOX_DEFINE_ALPHA_ROWS(alpha_rows_avx2)
bool avx2_compiled() { return true; }
#else
template <typename scalar_t>
void alpha_rows_avx2(int64_t, const scalar_t*, const scalar_t*, const scalar_t*, scalar_t*, int64_t, int64_t,
                     int64_t, double, double, int64_t, const double*, const double*) {}
template void alpha_rows_avx2<float>(int64_t, const float*, const float*, const float*, float*, int64_t, int64_t,
                                     int64_t, double, double, int64_t, const double*, const double*);
template void alpha_rows_avx2<double>(int64_t, const double*, const double*, const double*, double*, int64_t,
                                      int64_t, int64_t, double, double, int64_t, const double*, const double*);
bool avx2_compiled() { return false; }
#endif
}  // namespace cpu
}  // namespace torchopt_ext
