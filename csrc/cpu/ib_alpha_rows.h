// The row loops of the CPU ib_alpha kernel as ordinary templates, with no torch header, so that
// each csrc/cpu/ib_alpha_cpu_<isa>.cpp can compile them under its own target flags and fill its
// table with make_row_kernels(). The including file defines
//   TOX_CPU_CAPABILITY  the namespace its loops live in (baseline, avx2 or avx512)
//   TOX_MATH_NS         for a vector instruction set, a namespace of its own for the inline solvers
//                       (ib_alpha_math.h), so that the linker never mixes copies compiled for
//                       different instruction sets
// and includes this file once.
#pragma once
#ifndef TOX_CPU_CAPABILITY
#error "define TOX_CPU_CAPABILITY (baseline, avx2 or avx512) before including ib_alpha_rows.h"
#endif

#include <algorithm>
#include <cstdint>

#include "ib_alpha_dispatch.h"
#include "torchopt_ext/ib_alpha_fast32.h"
#include "torchopt_ext/ib_alpha_math.h"

namespace torchopt_ext {
namespace cpu {
namespace TOX_CPU_CAPABILITY {
namespace tm = ::torchopt_ext::TOX_MATH_NS;
static_assert(tm::kPiecewise + 1 == kRowKinds, "AlphaRowKernels needs one entry per activation kind");

// Internal linkage: each instruction set's copy stays its own, and the compiler may inline a
// helper into its one caller without keeping an out-of-line body.
namespace {

// relu and identity stay in the input precision (and vectorise) on their row constants, computed
// in double (in double too, for a row whose constants do not fit the input precision).
template <int64_t KIND, typename acc_t, typename scalar_t>
void linear_row_loop(const scalar_t* p, const scalar_t* g, scalar_t* o, int64_t m, acc_t z,
                     const tm::LinearRow<acc_t> row) {
#pragma omp simd
  for (int64_t j = 0; j < m; ++j) {
    o[j] = static_cast<scalar_t>(
        tm::alpha_linear<KIND, acc_t>(static_cast<acc_t>(p[j]), static_cast<acc_t>(g[j]), z, row));
  }
}

template <int64_t KIND, typename scalar_t>
void linear_rows(const scalar_t* pre, const scalar_t* grad, const scalar_t* zsq, scalar_t* out, int64_t r0, int64_t r1,
                 int64_t m, double lr, double wd) {
  for (int64_t r = r0; r < r1; ++r) {
    const tm::LinearRow<double> row = tm::linear_row<double>(lr, wd, static_cast<double>(zsq[r]));
    if (tm::linear_row_fits<scalar_t>(row))
      linear_row_loop<KIND, scalar_t>(pre + r * m, grad + r * m, out + r * m, m, zsq[r],
                                      tm::linear_row_as<scalar_t>(row));
    else
      linear_row_loop<KIND, double>(pre + r * m, grad + r * m, out + r * m, m, static_cast<double>(zsq[r]), row);
  }
}

// Every kind in its exact form: relu and identity as above, the cubic solvers in double, where
// tau^2 and the cubic's coefficients cannot overflow.
template <int64_t KIND, typename scalar_t>
void exact_rows(const scalar_t* pre, const scalar_t* grad, const scalar_t* zsq, scalar_t* out, int64_t r0, int64_t r1,
                int64_t m, double lr, double wd, int64_t M, const double* knots, const double* coef) {
  if constexpr (KIND == tm::kRelu || KIND == tm::kIdentity) {
    linear_rows<KIND, scalar_t>(pre, grad, zsq, out, r0, r1, m, lr, wd);
  } else {
    const tm::RuntimePieces<double> rp{M, knots, coef};
    for (int64_t r = r0; r < r1; ++r) {
      const double z = static_cast<double>(zsq[r]);
      const scalar_t* p = pre + r * m;
      const scalar_t* g = grad + r * m;
      scalar_t* o = out + r * m;
#pragma omp simd
      for (int64_t j = 0; j < m; ++j) {
        o[j] = static_cast<scalar_t>(
            tm::alpha_dispatch<KIND, double>(static_cast<double>(p[j]), static_cast<double>(g[j]), z, lr, wd, rp));
      }
    }
  }
}

int64_t count_nan(const float* o, int64_t n) {
  int64_t unsure = 0;
  for (int64_t j = 0; j < n; ++j) unsure += o[j] != o[j];
  return unsure;
}

// float32 closed forms over a block; returns how many elements they were not certain of (NaN)
template <int64_t KIND>
int64_t fast32_block(const float* p, const float* g, float* o, int64_t n, const tm::Fast32Row<float> row) {
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) o[j] = tm::alpha_fast32<KIND, float>(p[j], g[j], row);
  return count_nan(o, n);
}

// The second pass over the `unsure` elements the first left NaN: a vector pass over the block when
// they are many, one at a time when few; returns how many it left NaN in turn.
template <int64_t KIND>
int64_t fast32_second(const float* p, const float* g, float* o, int64_t n, const tm::Fast32Row<float> row,
                      int64_t unsure) {
  if (8 * unsure >= n) {
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) {
      const float a = tm::alpha_fast32_second<KIND, float>(p[j], g[j], row);
      o[j] = o[j] != o[j] ? a : o[j];
    }
  } else {
    for (int64_t j = 0; j < n; ++j)
      if (o[j] != o[j]) o[j] = tm::alpha_fast32_second<KIND, float>(p[j], g[j], row);
  }
  count_fast32_second(unsure);
  return count_nan(o, n);
}

// The float32 fast path of hardtanh, smoothstep or arctan: blocks of a row through the first pass,
// the second where the kind has one, and the elements both left NaN solved again in double (and
// counted); a row whose constants are outside the float32 bounds goes to exact_rows whole.
template <int64_t KIND>
void fast32_rows(const float* pre, const float* grad, const float* zsq, float* out, int64_t r0, int64_t r1, int64_t m,
                 double lr, double wd, int64_t M, const double* knots, const double* coef) {
  constexpr int64_t kBlock = 2048;
  const tm::RuntimePieces<double> rp{M, knots, coef};
  int64_t redone = 0;
  for (int64_t r = r0; r < r1; ++r) {
    const double z = static_cast<double>(zsq[r]);
    const tm::Fast32Row<float> row = tm::fast32_row<float>(lr, wd, z);
    if (!row.ok) {
      exact_rows<KIND, float>(pre, grad, zsq, out, r, r + 1, m, lr, wd, M, knots, coef);
      continue;
    }
    const float* p = pre + r * m;
    const float* g = grad + r * m;
    float* o = out + r * m;
    for (int64_t j0 = 0; j0 < m; j0 += kBlock) {
      const int64_t n = std::min(kBlock, m - j0);
      int64_t unsure = fast32_block<KIND>(p + j0, g + j0, o + j0, n, row);
      if (unsure == 0) continue;
      if constexpr (tm::has_fast32_second<KIND>()) {
        unsure = fast32_second<KIND>(p + j0, g + j0, o + j0, n, row, unsure);
        if (unsure == 0) continue;
      }
      redone += unsure;
      for (int64_t j = j0; j < j0 + n; ++j)
        if (o[j] != o[j]) o[j] = static_cast<float>(tm::alpha_dispatch<KIND, double>(p[j], g[j], z, lr, wd, rp));
    }
  }
  if (redone) count_fast32_redone(redone);
}

template <int64_t KIND>
constexpr void add_kind(AlphaRowKernels& k) {
  k.f32[KIND] = &exact_rows<KIND, float>;
  k.f64[KIND] = &exact_rows<KIND, double>;
  if constexpr (tm::has_fast32<KIND>()) k.f32_fast[KIND] = &fast32_rows<KIND>;
}

}  // namespace

// This instruction set's table: every kind's loops instantiated here, under the including file's flags.
constexpr AlphaRowKernels make_row_kernels() {
  AlphaRowKernels k{};
  add_kind<tm::kRelu>(k);
  add_kind<tm::kArctan>(k);
  add_kind<tm::kHardtanh>(k);
  add_kind<tm::kSmoothstep>(k);
  add_kind<tm::kIdentity>(k);
  add_kind<tm::kPiecewise>(k);
  return k;
}

}  // namespace TOX_CPU_CAPABILITY
}  // namespace cpu
}  // namespace torchopt_ext
