// The row loop of the CPU ib_alpha kernel, with no torch header, so that it can be compiled for
// baseline x86-64 (ib_alpha_cpu.cpp), AVX2+FMA and AVX-512 (ib_alpha_cpu_avx2/avx512.cpp); the
// caller picks one at run time. Expects namespace alias `tm` for the solver namespace.
#pragma once
#include <algorithm>
#include <cstdint>
#include <type_traits>

#include "torchopt_ext/ib_alpha_fast32.h"

// relu and identity stay in the input precision (and vectorise) on their row constants, computed
// in double (in double too, for a row whose constants do not fit the input precision); the cubic
// solvers run in double, where tau^2 and the cubic's coefficients cannot overflow.
#define TOX_DEFINE_ALPHA_ROWS(FN)                                                                      \
  template <int64_t KIND, typename acc_t, typename scalar_t>                                           \
  static void FN##_linear_row(const scalar_t* p, const scalar_t* g, scalar_t* o, int64_t m, acc_t z,   \
                              const tm::LinearRow<acc_t> row) {                                        \
    _Pragma("omp simd") for (int64_t j = 0; j < m; ++j) {                                              \
      o[j] = static_cast<scalar_t>(                                                                    \
          tm::alpha_linear<KIND, acc_t>(static_cast<acc_t>(p[j]), static_cast<acc_t>(g[j]), z, row));  \
    }                                                                                                  \
  }                                                                                                    \
  template <int64_t KIND, typename scalar_t>                                                           \
  static void FN##_linear(const scalar_t* pre, const scalar_t* grad, const scalar_t* zsq, scalar_t* out, \
                          int64_t r0, int64_t r1, int64_t m, double lr, double wd) {                   \
    for (int64_t r = r0; r < r1; ++r) {                                                                \
      const tm::LinearRow<double> row = tm::linear_row<double>(lr, wd, static_cast<double>(zsq[r]));   \
      if (tm::linear_row_fits<scalar_t>(row))                                                          \
        FN##_linear_row<KIND, scalar_t>(pre + r * m, grad + r * m, out + r * m, m, zsq[r],             \
                                        tm::linear_row_as<scalar_t>(row));                             \
      else                                                                                             \
        FN##_linear_row<KIND, double>(pre + r * m, grad + r * m, out + r * m, m,                       \
                                      static_cast<double>(zsq[r]), row);                               \
    }                                                                                                  \
  }                                                                                                    \
  template <int64_t KIND, typename scalar_t>                                                           \
  static void FN##_exact(const scalar_t* pre, const scalar_t* grad, const scalar_t* zsq, scalar_t* out, \
                        int64_t r0, int64_t r1, int64_t m, double lr, double wd, int64_t M,            \
                        const double* knots, const double* coef) {                                     \
    if constexpr (KIND == tm::kRelu || KIND == tm::kIdentity) {                                        \
      FN##_linear<KIND, scalar_t>(pre, grad, zsq, out, r0, r1, m, lr, wd);                             \
    } else {                                                                                           \
      const tm::RuntimePieces<double> rp{M, knots, coef};                                              \
      for (int64_t r = r0; r < r1; ++r) {                                                              \
        const double z = static_cast<double>(zsq[r]);                                                  \
        const scalar_t* p = pre + r * m;                                                               \
        const scalar_t* g = grad + r * m;                                                              \
        scalar_t* o = out + r * m;                                                                     \
        _Pragma("omp simd") for (int64_t j = 0; j < m; ++j) {                                          \
          o[j] = static_cast<scalar_t>(tm::alpha_dispatch<KIND, double>(                               \
              static_cast<double>(p[j]), static_cast<double>(g[j]), z, lr, wd, rp));                   \
        }                                                                                              \
      }                                                                                                \
    }                                                                                                  \
  }                                                                                                    \
  static int64_t FN##_count_nan(const float* o, int64_t n) {                                           \
    int64_t unsure = 0;                                                                                \
    for (int64_t j = 0; j < n; ++j) unsure += o[j] != o[j];                                            \
    return unsure;                                                                                     \
  }                                                                                                    \
  /* float32 closed forms over a block; returns how many elements they were not certain of (NaN) */   \
  template <int64_t KIND>                                                                              \
  static int64_t FN##_fast32_block(const float* p, const float* g, float* o, int64_t n,                \
                                   const tm::Fast32Row<float> row) {                                   \
    _Pragma("omp simd") for (int64_t j = 0; j < n; ++j) o[j] = tm::alpha_fast32<KIND, float>(p[j], g[j], row); \
    return FN##_count_nan(o, n);                                                                       \
  }                                                                                                    \
  /* the second pass over the `unsure` elements the first left NaN: a vector pass over the block */  \
  /* when they are many, one at a time when few; returns how many it left NaN in turn */             \
  template <int64_t KIND>                                                                              \
  static int64_t FN##_fast32_second(const float* p, const float* g, float* o, int64_t n,               \
                                    const tm::Fast32Row<float> row, int64_t unsure) {                  \
    if (8 * unsure >= n) {                                                                             \
      _Pragma("omp simd") for (int64_t j = 0; j < n; ++j) {                                            \
        const float a = tm::alpha_fast32_second<KIND, float>(p[j], g[j], row);                         \
        o[j] = o[j] != o[j] ? a : o[j];                                                                \
      }                                                                                                \
    } else {                                                                                           \
      for (int64_t j = 0; j < n; ++j)                                                                  \
        if (o[j] != o[j]) o[j] = tm::alpha_fast32_second<KIND, float>(p[j], g[j], row);                \
    }                                                                                                  \
    count_fast32_second(unsure);                                                                       \
    return FN##_count_nan(o, n);                                                                       \
  }                                                                                                    \
  /* ... and the elements left NaN solved again by the double solver, and counted */                  \
  template <int64_t KIND>                                                                              \
  static void FN##_fast32(const float* pre, const float* grad, const float* zsq, float* out, int64_t r0, \
                          int64_t r1, int64_t m, double lr, double wd, int64_t M, const double* knots,  \
                          const double* coef) {                                                        \
    constexpr int64_t kBlock = 2048;                                                                   \
    const tm::RuntimePieces<double> rp{M, knots, coef};                                                \
    int64_t redone = 0;                                                                                \
    for (int64_t r = r0; r < r1; ++r) {                                                                \
      const double z = static_cast<double>(zsq[r]);                                                    \
      const tm::Fast32Row<float> row = tm::fast32_row<float>(lr, wd, z);                               \
      if (!row.ok) {                                                                                   \
        FN##_exact<KIND, float>(pre, grad, zsq, out, r, r + 1, m, lr, wd, M, knots, coef);             \
        continue;                                                                                      \
      }                                                                                                \
      const float* p = pre + r * m;                                                                    \
      const float* g = grad + r * m;                                                                   \
      float* o = out + r * m;                                                                          \
      for (int64_t j0 = 0; j0 < m; j0 += kBlock) {                                                     \
        const int64_t n = std::min(kBlock, m - j0);                                                    \
        int64_t unsure = FN##_fast32_block<KIND>(p + j0, g + j0, o + j0, n, row);                      \
        if (unsure == 0) continue;                                                                     \
        if constexpr (tm::has_fast32_second<KIND>()) {                                                 \
          unsure = FN##_fast32_second<KIND>(p + j0, g + j0, o + j0, n, row, unsure);                   \
          if (unsure == 0) continue;                                                                   \
        }                                                                                              \
        redone += unsure;                                                                              \
        for (int64_t j = j0; j < j0 + n; ++j)                                                          \
          if (o[j] != o[j])                                                                            \
            o[j] = static_cast<float>(tm::alpha_dispatch<KIND, double>(p[j], g[j], z, lr, wd, rp));    \
      }                                                                                                \
    }                                                                                                  \
    if (redone) count_fast32_redone(redone);                                                           \
  }                                                                                                    \
  template <int64_t KIND, typename scalar_t>                                                           \
  static void FN##_kind(const scalar_t* pre, const scalar_t* grad, const scalar_t* zsq, scalar_t* out, \
                        int64_t r0, int64_t r1, int64_t m, double lr, double wd, int64_t M,            \
                        const double* knots, const double* coef) {                                     \
    if constexpr (std::is_same<scalar_t, float>::value && tm::has_fast32<KIND>()) {                    \
      if (fast32_enabled()) return FN##_fast32<KIND>(pre, grad, zsq, out, r0, r1, m, lr, wd, M, knots, coef); \
    }                                                                                                  \
    FN##_exact<KIND, scalar_t>(pre, grad, zsq, out, r0, r1, m, lr, wd, M, knots, coef);                \
  }                                                                                                    \
  template <typename scalar_t>                                                                         \
  void FN(int64_t kind, const scalar_t* pre, const scalar_t* grad, const scalar_t* zsq, scalar_t* out, \
          int64_t r0, int64_t r1, int64_t m, double lr, double wd, int64_t M, const double* knots,     \
          const double* coef) {                                                                        \
    switch (kind) {                                                                                    \
      case tm::kRelu: return FN##_kind<tm::kRelu>(pre, grad, zsq, out, r0, r1, m, lr, wd, M, knots, coef); \
      case tm::kArctan: return FN##_kind<tm::kArctan>(pre, grad, zsq, out, r0, r1, m, lr, wd, M, knots, coef); \
      case tm::kHardtanh:                                                                              \
        return FN##_kind<tm::kHardtanh>(pre, grad, zsq, out, r0, r1, m, lr, wd, M, knots, coef);       \
      case tm::kSmoothstep:                                                                            \
        return FN##_kind<tm::kSmoothstep>(pre, grad, zsq, out, r0, r1, m, lr, wd, M, knots, coef);     \
      case tm::kIdentity:                                                                              \
        return FN##_kind<tm::kIdentity>(pre, grad, zsq, out, r0, r1, m, lr, wd, M, knots, coef);       \
      default: return FN##_kind<tm::kPiecewise>(pre, grad, zsq, out, r0, r1, m, lr, wd, M, knots, coef); \
    }                                                                                                  \
  }                                                                                                    \
  template void FN<float>(int64_t, const float*, const float*, const float*, float*, int64_t, int64_t, \
                          int64_t, double, double, int64_t, const double*, const double*);             \
  template void FN<double>(int64_t, const double*, const double*, const double*, double*, int64_t,     \
                           int64_t, int64_t, double, double, int64_t, const double*, const double*);

namespace torchopt_ext {
namespace cpu {
// the float32 fast paths' switch, their count of elements the first pass left to the second, and
// of elements solved again in double (ib_alpha_cpu.cpp)
bool fast32_enabled();
void count_fast32_second(int64_t n);
void count_fast32_redone(int64_t n);
// declarations of the variants (definitions in ib_alpha_cpu.cpp and ib_alpha_cpu_<isa>.cpp)
template <typename scalar_t>
void alpha_rows_base(int64_t kind, const scalar_t* pre, const scalar_t* grad, const scalar_t* zsq,
                     scalar_t* out, int64_t r0, int64_t r1, int64_t m, double lr, double wd, int64_t M,
                     const double* knots, const double* coef);
template <typename scalar_t>
void alpha_rows_avx2(int64_t kind, const scalar_t* pre, const scalar_t* grad, const scalar_t* zsq,
                     scalar_t* out, int64_t r0, int64_t r1, int64_t m, double lr, double wd, int64_t M,
                     const double* knots, const double* coef);
template <typename scalar_t>
void alpha_rows_avx512(int64_t kind, const scalar_t* pre, const scalar_t* grad, const scalar_t* zsq,
                       scalar_t* out, int64_t r0, int64_t r1, int64_t m, double lr, double wd, int64_t M,
                       const double* knots, const double* coef);
}  // namespace cpu
}  // namespace torchopt_ext
