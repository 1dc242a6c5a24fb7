// Prologue of a row-loop file compiled for a vector instruction set (ib_alpha_cpu_avx2.cpp,
// ib_alpha_cpu_avx512.cpp), included after its target pragma and before ib_alpha_rows.h.
#pragma once
#ifdef TOX_HAVE_LIBMVEC
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
