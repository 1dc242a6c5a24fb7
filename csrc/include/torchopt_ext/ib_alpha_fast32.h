// Float32 fast paths of the hardtanh, smoothstep and arctan solvers, each with a certificate.
//
// The double solvers (ib_alpha_math.h) are compute-bound on a CPU, so float32 input first tries
// these closed forms in float32. Each bounds its own rounding error and returns NaN ("not certain")
// where a decision is closer than that bound or an input is outside the bounds' range; the caller
// then hands the element on: first pass (the common case), second pass (the general float32 form),
// the double solver. A certain result makes the exact minimiser's choice and is within about
// 3e-6 |alpha| + 1.5e-5 |b| of it; tests/ops/test_ib_alpha_fast32.py holds it to the float64 reference
// where a wrong choice would show.
// Derivation: docs/derivations.md#float32-certificates
//
// Notation as in ib_alpha_math.h, after the flip to b >= 0 (all three activations are odd):
//   c = q/d, f = c + 1, e = c - 1, T = tau*b, and tw = u - c = tau*omega, alpha = -tw/(eta*zsq).
// Where alpha jumps at a kink, f and e are computed as (q +- d)/d with d split into two floats,
// so that they keep full relative precision where c is near -1 or 1.
#pragma once

#include "torchopt_ext/ib_alpha_math.h"

namespace torchopt_ext {
namespace TOX_MATH_NS {

// Per-row constants, computed in double and rounded once. ok = false sends the whole row to the
// double solver (tau or d too large or small for the float32 bounds below, or not finite).
// Derivation: docs/derivations.md#row-constants-and-tolerances
template <typename T>
struct Fast32Row {
  T d_hi, d_lo;                   // d = d_hi + d_lo to about 2^-48
  T inv_d, tau, inv_tau, inv_ez;  // 1/d, eta*zsq/d, d/(eta*zsq), 1/(eta*zsq)
  T tau3;                         // 3 tau
  bool ok;
};

template <typename T>
inline Fast32Row<T> fast32_row(double eta, double mu, double zsq) {
  const double d = 1.0 + eta * mu;
  const double ez = eta * zsq;
  const double tau = ez / d;
  Fast32Row<T> r;
  r.d_hi = T(d);
  r.d_lo = T(d - double(r.d_hi));
  r.inv_d = T(1.0 / d);
  r.tau = T(tau);
  r.inv_tau = T(d / ez);
  r.inv_ez = T(1.0 / ez);
  r.tau3 = T(3.0 * tau);
  r.ok = tau >= 1e-12 && tau <= 1e8 && d <= 1e8;  // false for NaN too
  return r;
}

// Relative tolerance of a certain decision: 16 float32 eps (2^-19 = 1.9e-6), four times the
// rounding bound of each compared quantity, below the tests' float32 tolerance.
template <typename T>
TOX_HD T fast32_tol() { return T(1.9073486328125e-06); }

// Inputs the bounds hold for: |q| <= 1e4, 1e-20 <= |b| <= 1e8 (or b = 0); NaN or Inf input fails
// it too, and the double solver handles it.
template <typename T>
TOX_HD bool fast32_in_range(T qs, T bb) {
  return (m_abs(qs) <= T(1e4)) & (bb <= T(1e8)) & ((bb >= T(1e-20)) | (bb == T(0)));
}

template <typename T>
TOX_HD bool fast32_near(T x, T y, T scale) { return m_abs(x - y) <= fast32_tol<T>() * scale; }

// arctan's residual phi(v) = v (1 + w^2) - b, given w = c - tau v (its root is v = d alpha); the
// caller forms w, which it needs for phi' too
template <typename T>
TOX_HD T arctan_phi(T v, T w, T bb) { return v * (T(1) + w * w) - bb; }

// hardtanh, b >= 0: u* = c for c <= -1; else the middle piece's u = c - T when that is >= -1
// (T <= f) and beats staying at c (T > 2e); else u = -1 when that beats staying (f^2 < 4T).
// Ties go to staying (the smaller |alpha|), and one comparison decides.
// Derivation: docs/derivations.md#hardtanh-float32
template <typename T>
TOX_HD T alpha_hardtanh_fast32(T q, T b, const Fast32Row<T> r) {
  // every value computed unconditionally, then selected: GCC does not vectorise a conditional
  // load of a row constant
  const bool neg = b < T(0);
  const T sg = neg ? T(-1) : T(1);
  const T bb = sg * b, qs = sg * q;
  const T f = ((qs + r.d_hi) + r.d_lo) * r.inv_d;
  const T e = ((qs - r.d_hi) - r.d_lo) * r.inv_d;
  const T t = r.tau * bb;
  const T f2 = f * f, e2 = T(2) * e, t4 = T(4) * t;
  const T ie = r.inv_ez, nie = -ie;
  const T bd = b * r.inv_d, fl = f * (neg ? nie : ie);
  const bool middle_inside = t <= f;
  const T a_mid = t > e2 ? bd : T(0);
  const T a_low = f2 < t4 ? fl : T(0);
  const T a = f > T(0) ? (middle_inside ? a_mid : a_low) : T(0);
  // the one comparison that decides, (t, 2e) or (f^2, 4t), picked first and tested once
  const T x = middle_inside ? t : f2, y = middle_inside ? e2 : t4;
  const bool certain = fast32_in_range(qs, bb) & !fast32_near(x, y, x + m_abs(y));
  return certain ? a : T(NAN);
}

// smoothstep, b >= 0, first pass: the common case in one closed form, no comparison of candidates.
// With K2 = 3 tau b: alpha = 0 for c <= -1; for -1 < c < 1 the middle minimum is the only candidate,
// tw = K2 e f / (B + sqrt(disc)), certain when K2 c <= 1/2; for c >= 1, u stays when K2 < 1 or
// e^2 > 4 K2/3 (tested with margins). Large steps near or above the kink at 1 go to the general form.
// Derivation: docs/derivations.md#smoothstep-float32-first-pass
template <typename T>
TOX_HD T alpha_smoothstep_fast32(T q, T b, const Fast32Row<T> r) {
  const bool neg = b < T(0);
  const T sg = neg ? T(-1) : T(1);
  const T bb = sg * b, qs = sg * q;
  const T c = qs * r.inv_d;
  // c +- 1 plainly rounded (unlike the general form): alpha is continuous at both kinks, so a
  // misplaced side, or e f off by a few eps absolutely, moves alpha by about 10 eps |b|
  const T f = c + T(1), e = c - T(1);
  const T K2 = r.tau3 * bb;
  const T ef = e * f, kc = K2 * c;
  const T g = K2 - c;
  // outside the middle disc may be negative (sqrt gives NaN): those lanes are not selected
  const T tw_m = K2 * ef / ((T(1) - kc) + m_sqrt(g * g - ef));
  const bool left = e < T(0);  // c < 1
  const T tw = (f > T(0)) & left ? tw_m : T(0);
  // (c <= -1 passes the middle's test too: kc <= 0 there)
  const bool certain = fast32_in_range(qs, bb) &
                       ((left & (kc <= T(0.5))) | (!left & ((K2 <= T(0.99)) | (e * e >= T(1.34) * K2))));
  // alpha = -sg tw / (eta zsq), the sign picked rather than multiplied
  const T ie = r.inv_ez, nie = -ie;
  const T a = tw * (neg ? ie : nie);
  return certain ? a : T(NAN);
}

// smoothstep, b >= 0, general form (what the first pass leaves), s(u) = 1.5u - 0.5u^3 on [-1, 1].
// Candidates: stay at c (when c >= 1), u = -1, and the middle piece's local minimum
// (K = 1.5 T, B = 1 - 2Kc), compared by their costs as in alpha_piecewise, ties to the smaller |tw|.
// Derivation: docs/derivations.md#smoothstep-float32-general-form
template <typename T>
TOX_HD T alpha_smoothstep_fast32_general(T q, T b, const Fast32Row<T> r) {
  const T tol = fast32_tol<T>();
  const T eps = m_eps<T>();
  const T sg = b < T(0) ? T(-1) : T(1);
  const T bb = sg * b, qs = sg * q;
  const T c = qs * r.inv_d;
  const T f = ((qs + r.d_hi) + r.d_lo) * r.inv_d;
  const T e = ((qs - r.d_hi) - r.d_lo) * r.inv_d;
  const T ef = e * f;  // c^2 - 1
  const T K = T(1.5) * r.tau * bb;
  const T g = T(2) * K - c;
  // disc = 1 + 4K(K - c) = (2K - c)^2 + (1 - c^2) in the form that does not cancel for this c;
  // |error| <= 4 eps dscale
  const bool mid = ef <= T(0);
  const T disc = mid ? g * g - ef : T(1) + T(4) * K * (K - c);
  const T dscale = mid ? T(2) * m_abs(g) * (T(2) * K + m_abs(c)) + m_abs(ef) : T(1) + T(4) * K * (K + m_abs(c));
  const T B = T(1) - T(2) * K * c;
  const T errB = T(4) * eps * (T(1) + T(2) * K * m_abs(c));
  const T sq = m_sqrt(disc > T(0) ? disc : T(0));
  const bool bpos = B > T(0);
  const T tw_m = (bpos ? T(2) * K * ef : sq - B) / (bpos ? B + sq : T(-2) * K);
  // tw_m's relative error, (errB + 2 eps dscale / sq) / (|B| + sq), below 4 tol, multiplied out by
  // sq so that no division is needed
  const bool tw_certain = errB * sq + T(2) * eps * dscale <= T(4) * tol * (m_abs(B) + sq) * sq;
  const bool real = disc >= T(0);
  const bool m_inside = real & (tw_m >= -f) & (tw_m <= -e);
  // the ends need no margin: near u = -1 the choice does not change alpha, and near u = 1
  // (c > 1) staying wins by far
  const bool m_doubt = fast32_near(disc, T(0), dscale) | (real & !tw_certain);

  const bool above = e > T(0);  // c > 1: s(c) = 1 and the middle polynomial is off by `off`
  const T off = above ? T(-0.5) * bb * e * e * (f + T(1)) : T(0);  // bb (p(c) - 1)
  const T p1 = T(-1.5) * ef, h2 = T(-1.5) * c;
  const T half_it = T(0.5) * r.inv_tau;
  const T quad_m = half_it * tw_m * tw_m;
  const T inner = p1 + tw_m * (h2 - T(0.5) * tw_m);
  const T G_m = bb * tw_m * inner + off + quad_m;
  const T S_m = m_abs(bb * tw_m) * (m_abs(p1) + m_abs(tw_m) * (m_abs(h2) + T(0.5) * m_abs(tw_m))) +
                m_abs(off) + quad_m;
  // u = -1: b (s(-1) - s(c)) + f^2/(2 tau), with -1 - s(c) = -f^2 (2 - c)/2 on the middle piece
  const T quad_l = half_it * f * f;
  const T lin_l = above ? T(-2) * bb : T(-0.5) * bb * f * f * (T(1) - e);
  const T G_l = lin_l + quad_l;
  const T S_l = m_abs(lin_l) + quad_l;

  // the middle minimum, where it exists, always beats u = -1 (s'(-1) = 0), so only staying
  // competes; a near tie with staying matters only if the alphas differ
  const bool a_ok = e >= T(0);
  const T G_o = m_inside ? G_m : G_l, S_o = m_inside ? S_m : S_l, tw_o = m_inside ? tw_m : -f;
  const bool take_a = a_ok & (T(0) <= G_o);
  const T tw = take_a ? T(0) : tw_o;
  const bool o_is_a = fast32_near(tw_o, T(0), K);  // |alpha| <= 1.5 tol |b| / d
  const bool g_doubt = a_ok & !o_is_a & fast32_near(G_o, T(0), S_o);
  // c <= -1: no candidate needed (u stays); only the range test applies
  const bool certain = fast32_in_range(qs, bb) & ((f <= T(0)) | !(m_doubt | g_doubt));
  const T a_any = -sg * tw * r.inv_ez;
  const T a = f > T(0) ? a_any : T(0);
  return certain ? a : T(NAN);
}

// arctan, b >= 0, first pass: two Newton steps on phi(v) = v (1 + (c - tau v)^2) - b from
// v0 = b/(1 + c^2), certain when phi, with its rounding bound, changes sign within 4 tol of v (the
// iterates stay left of the smallest root, so that bracket holds the root wanted). No cbrt/acos/cos,
// so it vectorises with any libm; what it does not settle goes to the Cardano form below.
// Derivation: docs/derivations.md#arctan-float32-first-pass
template <typename T>
TOX_HD T alpha_arctan_fast32(T q, T b, const Fast32Row<T> r) {
  const T eps = m_eps<T>();
  const T tol = T(4) * fast32_tol<T>();
  const T sg = b < T(0) ? T(-1) : T(1);
  const T bb = sg * b, qs = sg * q;
  const T tau = r.tau;
  const T c = qs * r.inv_d;
  T v = bb / (T(1) + c * c);
  TOX_UNROLL for (int k = 0; k < 2; ++k) {
    const T w = c - tau * v;
    v = v - arctan_phi(v, w, bb) / (T(1) + w * (c - T(3) * tau * v));
  }
  const T lo = v * (T(1) - tol), hi = v * (T(1) + tol);
  const T wl = c - tau * lo, wh = c - tau * hi;
  // phi's rounding at either end, with |w| <= A = |c| + tau v
  const T A = m_abs(c) + tau * hi;
  const T err = eps * (hi * (T(10) * A * A + T(6)) + bb);
  const bool bracketed = (arctan_phi(lo, wl, bb) < -err) & (arctan_phi(hi, wh, bb) > err);
  const bool certain = fast32_in_range(qs, bb) & ((bb == T(0)) | bracketed);
  const T a = sg * v * r.inv_d;
  return certain ? a : T(NAN);  // (b = 0: v = 0 exactly)
}

// arctan, b >= 0, what the first pass leaves: alpha_arctan's cubic in float32 (both forms computed
// and selected, so that the loop vectorises with libmvec's cbrtf/acosf/cosf), one contraction, a
// Newton and a chord step; certain when the number of real roots, the convergence and phi's
// conditioning are each clear of rounding.
// Derivation: docs/derivations.md#arctan-float32-cardano
template <typename T>
TOX_HD T alpha_arctan_fast32_cardano(T q, T b, const Fast32Row<T> r) {
  const T eps = m_eps<T>();
  const T tol = T(4) * fast32_tol<T>();
  const T sg = b < T(0) ? T(-1) : T(1);
  const T bb = sg * b, qs = sg * q;
  const T tau = r.tau;
  const T c = qs * r.inv_d;
  const T c2 = c * c;
  const T p3 = T(1.0 / 3.0) - c2 * T(1.0 / 9.0);
  const T hc = c * (c2 * T(1.0 / 27.0) + T(1.0 / 3.0)), hb = T(0.5) * bb * tau;
  const T h = hc - hb;
  const T disc = h * h + p3 * p3 * p3;
  // h is known to about 3 eps (|hc| + hb), p3 to 2 eps (1/3 + c^2/9)
  const T ps = T(1.0 / 3.0) + c2 * T(1.0 / 9.0);
  const T err_disc = eps * (T(6) * m_abs(h) * (m_abs(hc) + hb) + T(6) * p3 * p3 * ps + T(2) * (h * h + ps * ps * ps));
  const bool one_root = disc >= T(0);
  const T t_one = cardano_one_root(h, one_root ? disc : T(0), p3);
  const T t_three = cardano_three_roots(one_root ? T(0) : h, one_root ? T(-1) : p3);
  const T x = (one_root ? t_one : t_three) + c * T(2.0 / 3.0);
  T w = c - x;
  T v = bb / (T(1) + w * w);
  // Newton, then a chord step with the same slope: one division fewer, as fast this close to the
  // root, and its own size is the convergence test
  w = c - tau * v;
  const T fp = T(1) + w * (c - T(3) * tau * v);
  const T inv_fp = T(1) / fp;
  v = v - arctan_phi(v, w, bb) * inv_fp;
  w = c - tau * v;
  const T step = arctan_phi(v, w, bb) * inv_fp;
  v = v - step;
  const bool converged = (fp > T(0)) & (m_abs(step) <= tol * v);
  const bool well_posed = T(4) * eps * (T(1) + w * w) <= tol * fp;
  const bool certain =
      fast32_in_range(qs, bb) & (m_abs(disc) > T(4) * err_disc) & converged & well_posed;
  const T a = sg * v * r.inv_d;
  return certain ? a : T(NAN);
}

// The first pass (every float32 element): hardtanh's closed form, or smoothstep's and arctan's
// common cases. What it leaves goes to the second pass where the kind has one, then to the double
// solver. arctan's second pass (Cardano) pays only where cbrtf/acosf/cosf come in vectors
// (libmvec, see csrc/cpu/); elsewhere the double solver takes what the first leaves.
#ifdef TOX_BRANCHLESS_CARDANO
constexpr bool kFast32ArctanCardano = true;
#else
constexpr bool kFast32ArctanCardano = false;
#endif

template <int64_t KIND>
constexpr bool has_fast32() {
  return KIND == kHardtanh || KIND == kSmoothstep || KIND == kArctan;
}

template <int64_t KIND>
constexpr bool has_fast32_second() {
  return KIND == kSmoothstep || (KIND == kArctan && kFast32ArctanCardano);
}

template <int64_t KIND, typename T>
TOX_HD T alpha_fast32(T q, T b, const Fast32Row<T> r) {
  if (KIND == kHardtanh) return alpha_hardtanh_fast32(q, b, r);
  if (KIND == kArctan) return alpha_arctan_fast32(q, b, r);
  return alpha_smoothstep_fast32(q, b, r);
}

template <int64_t KIND, typename T>
TOX_HD T alpha_fast32_second(T q, T b, const Fast32Row<T> r) {
  if (KIND == kArctan) return alpha_arctan_fast32_cardano(q, b, r);
  return alpha_smoothstep_fast32_general(q, b, r);
}

}  // namespace TOX_MATH_NS
}  // namespace torchopt_ext
