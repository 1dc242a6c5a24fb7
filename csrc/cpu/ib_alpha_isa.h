// Body of the ib_alpha row loop compiled for one vector instruction set (ib_alpha_cpu_avx2.cpp,
// ib_alpha_cpu_avx512.cpp). The including file sets the target pragma and defines
//   TOX_ISA           the suffix of what it defines (alpha_rows_<ISA>, <ISA>_compiled, ...)
//   TOX_MATH_NS       a namespace of its own for the inline solvers, so that the linker never
//                     mixes copies compiled for different instruction sets
//   TOX_HAVE_ISA_TU   when the compiler took the target pragma (else stubs are defined)
// No torch header here.
#if defined(TOX_HAVE_ISA_TU) && defined(TOX_HAVE_LIBMVEC)
// glibc >= 2.35 ships vector cbrt, acos and cos (and their float versions) in libmvec, 4/8 lanes
// for AVX2, 8/16 for AVX-512 (at most 4 ulp, which the arctan solvers' polishing steps absorb).
// Declaring the scalar functions as simd lets the arctan loops call them a vector at a time;
// setup.py defines TOX_HAVE_LIBMVEC and links -lmvec only where the library is there.
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

#define TOX_CAT2(a, b) a##b
#define TOX_CAT(a, b) TOX_CAT2(a, b)
// one more level, so that FN reaches the ## inside TOX_DEFINE_ALPHA_ROWS already expanded
#define TOX_DEFINE_ALPHA_ROWS_EXPANDED(FN) TOX_DEFINE_ALPHA_ROWS(FN)

namespace torchopt_ext {
namespace cpu {
namespace tm = ::torchopt_ext::TOX_MATH_NS;
#ifdef TOX_HAVE_ISA_TU
TOX_DEFINE_ALPHA_ROWS_EXPANDED(TOX_CAT(alpha_rows_, TOX_ISA))
bool TOX_CAT(TOX_ISA, _compiled)() { return true; }
#else
template <typename scalar_t>
void TOX_CAT(alpha_rows_, TOX_ISA)(int64_t, const scalar_t*, const scalar_t*, const scalar_t*, scalar_t*, int64_t,
                                   int64_t, int64_t, double, double, int64_t, const double*, const double*) {}
template void TOX_CAT(alpha_rows_, TOX_ISA)<float>(int64_t, const float*, const float*, const float*, float*, int64_t,
                                                   int64_t, int64_t, double, double, int64_t, const double*,
                                                   const double*);
template void TOX_CAT(alpha_rows_, TOX_ISA)<double>(int64_t, const double*, const double*, const double*, double*,
                                                    int64_t, int64_t, int64_t, double, double, int64_t,
                                                    const double*, const double*);
bool TOX_CAT(TOX_ISA, _compiled)() { return false; }
#endif
}  // namespace cpu
}  // namespace torchopt_ext
