// Five-probe learning-rate updates, shared by the CPU and CUDA kernels.
// Derivation: docs/derivations.md#five-probe-learning-rate
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
// Derivation: docs/derivations.md#newton-rule
TORCHOPT_HD inline void newton_lr_update(const double* f, double eta, double v, double eps, double delta, double beta,
                                         double* eta_out, double* v_out) {
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

// The guarded rule (docs/ADAPTIVE_LR.md, "The guarded rule"). From the probes' slope s = f'(eta) and
// curvature c = f''(eta) along the step direction, eta moves to fraction * e*, e* = eta - s/c the
// minimum of the line's quadratic model (the largest cut when e* <= 0); without a minimum (c <= 0) eta
// holds while the line falls and shrinks otherwise, as for a non-finite probe. The result lies in
// [eta/shrink, eta*growth], lopsided because growing is what destabilises training, and is >= delta.
// Derivation: docs/derivations.md#guarded-rule
TORCHOPT_HD inline double guarded_lr_update(const double* f, double eta, double eps, double delta, double growth,
                                            double fraction, double shrink) {
  bool finite = true;
  for (int j = 0; j < 5; ++j) finite = finite && std::isfinite(f[j]);
  const double s = (f[3] - f[1]) / (2.0 * eps);
  const double c = (f[4] + f[0] - 2.0 * f[2]) / (4.0 * eps * eps);
  const double lo = eta / shrink;
  const double hi = eta * growth;
  double target = eta / growth;
  if (finite && c > 0.0) {
    const double e_star = eta - s / c;
    target = e_star > 0.0 ? fraction * e_star : lo;
  } else if (finite && !(s > 0.0)) {
    target = eta;
  }
  double next = target < lo ? lo : (target > hi ? hi : target);
  if (!(next >= delta)) next = delta;  // also catches NaN eta and a NaN target
  return next;
}

}  // namespace math
}  // namespace torchopt_ext
