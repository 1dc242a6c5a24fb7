// Five-probe learning-rate update (DESIGN.md section 3), shared by the CPU and CUDA kernels.
#pragma once
#include <cmath>

#ifdef __CUDACC__
#define TORCHOPT_HD __host__ __device__
#else
#define TORCHOPT_HD
#endif

namespace torchopt_ext {
namespace math {

// f: the five probe losses f(eta + j*eps), j = -2..2, in that order. v: the momentum on eta
// (paper eq. 20-21); beta = 0 gives the plain Newton step (eq. 16/18) and v stays 0.
// The result is clamped to >= delta (eq. 19). A non-finite probe loss or update would poison eta
// for good, so then eta is halved instead (still clamped to delta) and the momentum is reset.
TORCHOPT_HD inline void newton_lr_update(const double* f, double eta, double v, double eps, double delta,
                                         double beta, double* eta_out, double* v_out) {
  const double num = f[3] - f[1];
  const double den = f[4] + f[0] - 2.0 * f[2] + delta;  // eq. 18: delta keeps den off 0
  const double inc = 2.0 * eps * num / den;
  const double v_new = beta * v - inc;
  const double cand = eta + v_new;
  bool ok = std::isfinite(cand) && std::isfinite(v_new);
  for (int j = 0; j < 5; ++j) ok = ok && std::isfinite(f[j]);
  double next = ok ? cand : 0.5 * eta;
  if (!(next >= delta)) next = delta;  // also catches NaN eta
  *eta_out = next;
  *v_out = ok ? v_new : 0.0;
}

}  // namespace math
}  // namespace torchopt_ext
