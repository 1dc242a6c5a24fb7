// The ib_alpha row loop compiled for AVX2+FMA (4 doubles / 8 floats a vector). No torch header
// here: everything this file emits lives in its own namespace (TOX_MATH_NS), so no inline
// function compiled for AVX2 can be picked by the linker for the baseline path.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#pragma GCC target("avx2,fma")
#define TOX_HAVE_AVX2_TU 1
#endif
#define TOX_MATH_NS math_avx2
#if defined(TOX_HAVE_AVX2_TU) && defined(TOX_HAVE_LIBMVEC)
// glibc >= 2.35 ships AVX2 versions of cbrt, acos and cos in libmvec (_ZGVdN4v_cbrt, ...; at most
// 4 ulp, which the arctan solver's polishing steps absorb). Declaring the scalar functions as
// simd lets the arctan loop call them four doubles at a time; setup.py defines TOX_HAVE_LIBMVEC
// and links -lmvec only where the library is there.
#include <cmath>
extern "C" {
__attribute__((simd("notinbranch"))) double cbrt(double) noexcept;
__attribute__((simd("notinbranch"))) double acos(double) noexcept;
__attribute__((simd("notinbranch"))) double cos(double) noexcept;
__attribute__((simd("notinbranch"))) float cbrtf(float) noexcept;
__attribute__((simd("notinbranch"))) float acosf(float) noexcept;
__attribute__((simd("notinbranch"))) float cosf(float) noexcept;
}
#define TOX_BRANCHLESS_CARDANO 1
// without these two GCC sinks the libm calls of the branch-free Cardano back into branches,
// which stops the loop from vectorising
#pragma GCC optimize("no-tree-sink", "no-tree-pre")
#endif
#include "torchopt_ext/ib_alpha_math.h"
#include "ib_alpha_rows.h"

namespace torchopt_ext {
namespace cpu {
namespace tm = ::torchopt_ext::math_avx2;
#ifdef TOX_HAVE_AVX2_TU
TOX_DEFINE_ALPHA_ROWS(alpha_rows_avx2)
bool avx2_compiled() { return true; }
bool avx2_fast32_arctan() { return tm::kFast32Arctan; }
#else
template <typename scalar_t>
void alpha_rows_avx2(int64_t, const scalar_t*, const scalar_t*, const scalar_t*, scalar_t*, int64_t, int64_t,
                     int64_t, double, double, int64_t, const double*, const double*) {}
template void alpha_rows_avx2<float>(int64_t, const float*, const float*, const float*, float*, int64_t, int64_t,
                                     int64_t, double, double, int64_t, const double*, const double*);
template void alpha_rows_avx2<double>(int64_t, const double*, const double*, const double*, double*, int64_t,
                                      int64_t, int64_t, double, double, int64_t, const double*, const double*);
bool avx2_compiled() { return false; }
bool avx2_fast32_arctan() { return false; }
#endif
}  // namespace cpu
}  // namespace torchopt_ext
