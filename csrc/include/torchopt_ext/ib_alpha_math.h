// Per-neuron implicit-backprop solvers, shared by the CPU and CUDA kernels (no torch header here).
//
// Notation (docs/derivations.md#notation). For one sample and one neuron:
//   q    pre-activation theta_j^T z          b    upstream gradient dL/dsigma(q)
//   zsq  ||z||^2 including the bias's 1      eta  learning rate       mu  weight decay (ridge)
//   d = 1 + eta*mu,  c = q/d,  s = eta*zsq,  tau = s/d.
// The implicit step solves u* = argmin_u b*sigma(u) + (u - c)^2/(2 tau) and returns
// alpha = (c - u*)/s. Every solver works with the scaled offset omega instead (u = c + tau*omega,
// alpha = -omega/d), since c - u* is rounding noise as eta -> 0.
//
// Every function is templated on the scalar type so that the same code runs as float/double on
// the host and the device, and as FlopCounter (flop_counter.h) to count the cost of one solve.
#pragma once

#include <cfloat>
#include <cmath>
#include <cstdint>

#if defined(__CUDACC__) || defined(__HIPCC__)
#define TOX_HD __host__ __device__ __forceinline__
#elif defined(__GNUC__)
// always inlined: a solver left as a call inside the CPU's `omp simd` loop stops the loop
// vectorising, and GCC's own heuristics do not reliably inline the larger solvers
#define TOX_HD inline __attribute__((always_inline))
#else
#define TOX_HD inline
#endif

#if defined(__CUDACC__) || defined(__HIPCC__)
#define TOX_UNROLL _Pragma("unroll")
#elif defined(__GNUC__) && !defined(__clang__)
#define TOX_UNROLL _Pragma("GCC unroll 16")
#else
#define TOX_UNROLL
#endif

// TOX_MATH_NS lets a translation unit compiled for another instruction set (csrc/cpu/*_avx2.cpp)
// give its copy of these inline templates a name of its own, so the linker never mixes them up.
#ifndef TOX_MATH_NS
#define TOX_MATH_NS math
#endif

namespace torchopt_ext {
namespace TOX_MATH_NS {

// Activation kinds understood by the op (the Python side maps names to these numbers).
enum Kind : int64_t {
  kRelu = 0,
  kArctan = 1,
  kHardtanh = 2,
  kSmoothstep = 3,
  kIdentity = 4,
  kPiecewise = 5,  // a user PiecewiseCubic passed as knots + coefficients
};

// Overloads the solvers call unqualified, so that ADL picks FlopCounter's versions for counting.
TOX_HD float m_sqrt(float x) { return ::sqrtf(x); }
TOX_HD double m_sqrt(double x) { return ::sqrt(x); }
TOX_HD float m_cbrt(float x) { return ::cbrtf(x); }
TOX_HD double m_cbrt(double x) { return ::cbrt(x); }
TOX_HD float m_acos(float x) { return ::acosf(x); }
TOX_HD double m_acos(double x) { return ::acos(x); }
TOX_HD float m_cos(float x) { return ::cosf(x); }
TOX_HD double m_cos(double x) { return ::cos(x); }
TOX_HD float m_abs(float x) { return ::fabsf(x); }
TOX_HD double m_abs(double x) { return ::fabs(x); }
TOX_HD float m_copysign(float x, float y) { return ::copysignf(x, y); }
TOX_HD double m_copysign(double x, double y) { return ::copysign(x, y); }
TOX_HD bool m_isfinite(float x) { return x - x == 0.0f; }
TOX_HD bool m_isfinite(double x) { return x - x == 0.0; }

template <typename T>
TOX_HD T m_eps() { return T(2.220446049250313e-16); }
template <>
TOX_HD float m_eps<float>() { return 1.1920929e-07f; }

// NaN in q, b or zsq makes alpha NaN for that element only; finite input never does.
// (x*0 is 0 for finite x and NaN for NaN or Inf.)
template <typename T>
TOX_HD T nan_guard(T q, T b, T zsq) { return q * T(0) + b * T(0) + zsq * T(0); }

// ---------------------------------------------------------------------------------------------
// relu and identity need three numbers per sample, the same for its whole row: d, s and d s. The
// CPU and CUDA loops form them in double and round them once to the input precision where all three
// fit (linear_row_fits), since in float32 eta alone may be inf and d = 1 + inf*0 NaN.
// Derivation: docs/derivations.md#relu-and-identity
template <typename T>
struct LinearRow {
  T d, s, ds;
};

template <typename T>
TOX_HD LinearRow<T> linear_row(T eta, T mu, T zsq) {
  const T d = T(1) + eta * mu;
  const T s = eta * zsq;
  return {d, s, d * s};
}

// Whether relu's and identity's arithmetic in T on the rounded row stays within a few roundings of
// the double row's: d, s and d s normal numbers of T (a double row always; false for NaN).
template <typename T>
TOX_HD bool linear_row_fits(const LinearRow<double>& r) {
  if (sizeof(T) >= sizeof(double)) return true;
  const double lo = FLT_MIN, hi = FLT_MAX;
  return (r.d <= hi) & (r.s >= lo) & (r.s <= hi) & (r.ds >= lo) & (r.ds <= hi);
}

template <typename T>
TOX_HD LinearRow<T> linear_row_as(const LinearRow<double>& r) {
  return {T(r.d), T(r.s), T(r.ds)};
}

// relu: the closed form of the paper's Table 1 (T = s*b), branch-free so that the CPU loop vectorises.
//   b > 0: alpha = 0 if q <= 0;  c/s if 0 < q <= T;  b/d if q > T.
//   b < 0: alpha = 0 if q <= T/2 (ties go to the smaller |alpha|);  b/d if q > T/2.
// Derivation: docs/derivations.md#relu-and-identity
template <typename T>
TOX_HD T alpha_relu_row(T q, T b, T zsq, const LinearRow<T>& r) {
  const T sb = r.s * b;
  const T full = b / r.d;
  const T mid = q / r.ds;  // = c/s: the step that lands exactly on the kink u = 0
  const T pos = q <= T(0) ? T(0) : (q <= sb ? mid : full);
  const T neg = q <= T(0.5) * sb ? T(0) : full;
  const T a = b > T(0) ? pos : (b < T(0) ? neg : T(0));
  return a + nan_guard(q, b, zsq);
}

template <typename T>
TOX_HD T alpha_relu(T q, T b, T zsq, T eta, T mu) {
  return alpha_relu_row(q, b, zsq, linear_row(eta, mu, zsq));
}

// identity: sigma(u) = u is linear, the implicit step equals the explicit one up to the decay.
// Derivation: docs/derivations.md#relu-and-identity
template <typename T>
TOX_HD T alpha_identity_row(T q, T b, T zsq, const LinearRow<T>& r) {
  return b / r.d + nan_guard(q, b, zsq);
}

template <typename T>
TOX_HD T alpha_identity(T q, T b, T zsq, T eta, T mu) {
  const LinearRow<T> r{T(1) + eta * mu, T(0), T(0)};  // identity reads d alone
  return alpha_identity_row(q, b, zsq, r);
}

// relu or identity (KIND) from their row constants
template <int64_t KIND, typename T>
TOX_HD T alpha_linear(T q, T b, T zsq, const LinearRow<T>& r) {
  if (KIND == kRelu) return alpha_relu_row(q, b, zsq, r);
  return alpha_identity_row(q, b, zsq, r);
}

// ---------------------------------------------------------------------------------------------
// arctan's depressed cubic t^3 + 3 p3 t + 2 h = 0 (disc = h^2 + p3^3): its one real root when
// disc >= 0 (Cardano), or its smallest root when there are three (disc < 0, so p3 < 0; trigonometric).
template <typename T>
TOX_HD T cardano_one_root(T h, T disc, T p3) {
  const T a = -m_copysign(m_cbrt(m_abs(h) + m_sqrt(disc)), h);
  return a != T(0) ? a - p3 / a : T(0);
}

template <typename T>
TOX_HD T cardano_three_roots(T h, T p3) {
  const T kTwoPi = T(6.283185307179586476925286766559);
  const T rt = m_sqrt(-p3);
  T arg = -h / (rt * rt * rt);
  arg = arg > T(1) ? T(1) : (arg < T(-1) ? T(-1) : arg);
  return T(2) * rt * m_cos((m_acos(arg) + kTwoPi) * T(1.0 / 3.0));
}

// arctan: v = d*alpha solves v*(1 + (c - tau v)^2) = b, and we want the root nearest 0 (the paper's
// rule): the monic cubic in x = tau*v by Cardano or the trigonometric form, then one contraction
// step and one guarded Newton step, because x alone is exact only to eps*|c|, noise as tau -> 0.
// Derivation: docs/derivations.md#arctan
template <typename T>
TOX_HD T alpha_arctan(T q, T b, T zsq, T eta, T mu) {
  const T d = T(1) + eta * mu;
  const T inv_d = T(1) / d;  // row-invariant: hoisted out of the CPU loop, a multiply per element
  const T tau = eta * zsq * inv_d;
  const T sg = b < T(0) ? T(-1) : T(1);
  const T bb = sg * b;
  const T c = sg * (q * inv_d);
  const T c2 = c * c;
  // depressed cubic t^3 + p t + r = 0 with x = t + 2c/3
  const T p3 = T(1.0 / 3.0) - c2 * T(1.0 / 9.0);                    // p/3
  const T h = c * (c2 * T(1.0 / 27.0) + T(1.0 / 3.0)) - T(0.5) * bb * tau;  // r/2
  const T disc = h * h + p3 * p3 * p3;
  // c <= 0 has one real root, and beyond |c| ~ 1e8 the computed disc is rounding noise of either sign
  const bool one_root = (disc >= T(0)) | (c <= T(0));
  T t;
#ifdef TOX_BRANCHLESS_CARDANO
  // Both forms for every element, then a select, so that the loop vectorises with vector
  // cbrt/acos/cos (glibc's libmvec); the unused form gets arguments on libmvec's fast path.
  const T t_one = cardano_one_root(h, disc >= T(0) ? disc : T(0), p3);
  const T t_three = cardano_three_roots(one_root ? T(0) : h, one_root ? T(-1) : p3);
  t = one_root ? t_one : t_three;
#else
  if (one_root)
    t = cardano_one_root(h, disc >= T(0) ? disc : T(0), p3);
  else
    t = cardano_three_roots(h, p3);
#endif
  const T x = t + c * T(2.0 / 3.0);
  T w = c - x;
  T v = bb / (T(1) + w * w);
  w = c - tau * v;
  const T f = v * (T(1) + w * w) - bb;
  const T fp = T(1) + w * (c - T(3) * tau * v);
  const T vn = v - f / fp;
  // the root we want is a crossing from f < 0 to f > 0, so f' >= 0 there; refuse wild steps
  const bool ok = fp > T(0) && m_abs(vn - v) < T(0.5) * v;
  v = ok ? vn : v;
  return sg * v * inv_d + nan_guard(q, b, zsq);
}

// ---------------------------------------------------------------------------------------------
// Piecewise cubics: the candidate search (Best, consider, offer), the piece tables, the solver.
// The best candidate so far: its score g, the scale of g's rounding, and its w.
template <typename T>
struct Best {
  T g, scale, w;
};

template <typename T>
TOX_HD void consider(Best<T>& best, bool valid, T w, T g, T scale) {
  // an invalid candidate becomes +inf, which never wins (best.w starts at 0, so no tie either)
  const T gv = valid ? g : T(HUGE_VAL);
  const T tol = T(8) * m_eps<T>() * (scale > best.scale ? scale : best.scale);
  const bool better = (gv < best.g - tol) | ((gv <= best.g + tol) & (m_abs(w) < m_abs(best.w)));
  best.g = better ? gv : best.g;
  best.scale = better ? scale : best.scale;
  best.w = better ? w : best.w;
}

// Scores candidate w on a piece by G(w) - b sigma(c), expanded in powers of tau*w so that nothing
// cancels, and offers it; a mask instead of a branch, so that the CPU loop vectorises.
template <typename T>
TOX_HD void offer(Best<T>& best, bool valid, T w, T b, T tau, T p1, T h2, T a3, T off) {
  const T tw = tau * w;
  const T inner = p1 + tw * (h2 + a3 * tw);
  const T quad = T(0.5) * tau * w * w;
  const T g = b * tw * inner + off + quad;
  const T scale = m_abs(b * tw) * (m_abs(p1) + m_abs(tw) * (m_abs(h2) + m_abs(a3 * tw))) +
                  m_abs(off) + quad;
  consider(best, valid, w, g, scale);
}

// Pieces given at run time (a user PiecewiseCubic): knots[M-1], coef[M*4] row-major (a0..a3).
template <typename T>
struct RuntimePieces {
  int64_t M;
  const double* knots;
  const double* coef;
  TOX_HD int64_t size() const { return M; }
  TOX_HD T knot(int64_t i) const { return T(knots[i]); }
  TOX_HD T a(int64_t m, int j) const { return T(coef[m * 4 + j]); }
};

// Built-in tables, known at compile time so the compiler folds the zero coefficients away.
template <typename T>
struct HardtanhPieces {  // -1 | u on [-1, 1] | 1
  TOX_HD int64_t size() const { return 3; }
  TOX_HD T knot(int64_t i) const { return i == 0 ? T(-1) : T(1); }
  TOX_HD T a(int64_t m, int j) const {
    return m == 0 ? (j == 0 ? T(-1) : T(0)) : m == 1 ? (j == 1 ? T(1) : T(0)) : (j == 0 ? T(1) : T(0));
  }
};

template <typename T>
struct SmoothstepPieces {  // -1 | 1.5u - 0.5u^3 on [-1, 1] | 1
  TOX_HD int64_t size() const { return 3; }
  TOX_HD T knot(int64_t i) const { return i == 0 ? T(-1) : T(1); }
  TOX_HD T a(int64_t m, int j) const {
    return m == 0 ? (j == 0 ? T(-1) : T(0))
         : m == 1 ? (j == 1 ? T(1.5) : j == 3 ? T(-0.5) : T(0))
                  : (j == 0 ? T(1) : T(0));
  }
};

template <typename T, typename Pieces>
TOX_HD T poly_at(const Pieces& P, int64_t m, T u) {
  return P.a(m, 0) + u * (P.a(m, 1) + u * (P.a(m, 2) + u * P.a(m, 3)));
}

// Piecewise cubic sigma(u) = p_m(u) = a0 + a1 u + a2 u^2 + a3 u^3 on [k_{m-1}, k_m], M pieces with
// M-1 sorted interior knots (the outer pieces are unbounded and must be linear). Candidates: on each
// piece the roots inside it of A w^2 + B w + C = 0 (A = 3 b a3 tau^2, B = 1 + 2 b tau (a2 + 3 a3 c),
// C = b p_m'(c)) and its finite ends; the global minimum wins, ties within rounding going to the
// smaller |alpha|.
// Derivation: docs/derivations.md#piecewise-cubics
template <typename T, typename Pieces>
TOX_HD T alpha_piecewise(T q, T b, T zsq, T eta, T mu, const Pieces& P) {
  const T inf = T(HUGE_VAL);
  const T d = T(1) + eta * mu;
  const T c = q / d;
  const T tau = eta * zsq / d;
  const int64_t M = P.size();
  // sigma(c) on the piece that holds c, found without branches
  T sig_c = poly_at<T>(P, 0, c);
  TOX_UNROLL
  for (int64_t i = 0; i + 1 < M; ++i) sig_c = c > P.knot(i) ? poly_at<T>(P, i + 1, c) : sig_c;

  Best<T> best{inf, T(0), T(0)};
  TOX_UNROLL
  for (int64_t m = 0; m < M; ++m) {
    const T a1 = P.a(m, 1), a2 = P.a(m, 2), a3 = P.a(m, 3);
    const T lo = m == 0 ? -inf : P.knot(m - 1);
    const T hi = m == M - 1 ? inf : P.knot(m);
    const T h2 = a2 + T(3) * a3 * c;             // p_m''(c)/2
    const T p1 = a1 + c * (T(2) * a2 + T(3) * a3 * c);  // p_m'(c)
    const T off = b * (poly_at<T>(P, m, c) - sig_c);
    const T A = T(3) * b * a3 * tau * tau;
    const T B = T(1) + T(2) * b * tau * h2;
    const T C = b * p1;
    // the two roots, cancellation-free (one that does not exist comes out non-finite), and disc/B^2
    // without squaring B, which overflows for huge tau
    const T lin = -C / B;
    const T bs = m_abs(B) > T(1) ? B : T(1);
    const T disc = (B / bs) * (B / bs) - T(4) * (A / bs) * (C / bs);
    const T sq = m_sqrt(disc >= T(0) ? disc : T(0)) * bs;
    const T Q = T(-0.5) * (B + m_copysign(sq, B));
    const bool quadratic = A != T(0);
    const T r1 = quadratic ? Q / A : lin;
    const T r2 = quadratic & (Q != T(0)) ? C / Q : r1;
    const bool real = (!quadratic) | (disc >= T(0));
    const T u1 = c + tau * r1, u2 = c + tau * r2;
    offer(best, real & m_isfinite(r1) & (u1 >= lo) & (u1 <= hi), r1, b, tau, p1, h2, a3, off);
    offer(best, real & m_isfinite(r2) & (u2 >= lo) & (u2 <= hi), r2, b, tau, p1, h2, a3, off);
    offer(best, m > 0, (lo - c) / tau, b, tau, p1, h2, a3, off);
    offer(best, m < M - 1, (hi - c) / tau, b, tau, p1, h2, a3, off);
  }
  return -best.w / d + nan_guard(q, b, zsq);
}

// The two flat pieces of hardtanh/smoothstep: offer() with p1 = h2 = a3 = 0, the zero terms folded
// by hand because the compiler may not (0*x is not 0 for x = inf).
template <typename T>
TOX_HD void flat_offers(Best<T>& best, T wr, T wl, T bb, T tau, T sig_c) {
  const T half_tau = T(0.5) * tau;
  const T off_r = bb * (T(1) - sig_c), quad_r = half_tau * wr * wr;
  const T off_l = bb * (T(-1) - sig_c), quad_l = half_tau * wl * wl;
  consider(best, true, wr, off_r + quad_r, m_abs(off_r) + quad_r);
  consider(best, true, wl, off_l + quad_l, m_abs(off_l) + quad_l);
}

// hardtanh and smoothstep (odd, flat at -1 below u = -1 and at 1 above u = 1, a1 u + a3 u^3 between):
// alpha_piecewise's candidates for that shape after the flip to b >= 0, branch-free so that the CPU
// loop vectorises, with 1/d and 1/tau formed once per row since a vector division costs a dozen
// multiplies.
// Derivation: docs/derivations.md#hardtanh-and-smoothstep
template <typename T>
TOX_HD T alpha_odd3(T q, T b, T zsq, T eta, T mu, T a1, T a3) {
  const T inf = T(HUGE_VAL);
  const T d = T(1) + eta * mu;
  const T inv_d = T(1) / d;
  const T tau = eta * zsq * inv_d;
  const T inv_tau = T(1) / tau;
  const T sg = b < T(0) ? T(-1) : T(1);
  const T bb = sg * b;
  const T c = sg * (q * inv_d);
  const bool inside = (c >= T(-1)) & (c <= T(1));
  const T sig_c = inside ? c * (a1 + a3 * c * c) : (c > T(0) ? T(1) : T(-1));
  Best<T> best{inf, T(0), T(0)};
  // flat pieces: u stays at c if c is on them, else moves to their end
  const T wr = c >= T(1) ? T(0) : (T(1) - c) * inv_tau;
  const T wl = c <= T(-1) ? T(0) : (T(-1) - c) * inv_tau;
  flat_offers(best, wr, wl, bb, tau, sig_c);
  // middle piece: A w^2 + B w + C = 0 (see alpha_piecewise)
  const T h2 = T(3) * a3 * c;
  const T p1 = a1 + T(3) * a3 * c * c;
  const T off = bb * (c * (a1 + a3 * c * c) - sig_c);
  const T A = T(3) * bb * a3 * tau * tau;
  const T B = T(1) + T(2) * bb * tau * h2;
  const T C = bb * p1;
  const T bs = m_abs(B) > T(1) ? B : T(1);
  const T inv_bs = T(1) / bs;
  const T disc = (B * inv_bs) * (B * inv_bs) - T(4) * (A * inv_bs) * (C * inv_bs);
  const T sq = m_sqrt(disc >= T(0) ? disc : T(0)) * bs;
  const T Q = T(-0.5) * (B + m_copysign(sq, B));
  // r2 stays finite as A -> 0 and r1 then fails the finiteness test, so no branch on A is needed
  const T r1 = Q / A;
  const T r2 = C / Q;
  const bool real = disc >= T(0);
  const T u1 = c + tau * r1, u2 = c + tau * r2;
  offer(best, real & m_isfinite(r1) & (u1 >= T(-1)) & (u1 <= T(1)), r1, bb, tau, p1, h2, a3, off);
  offer(best, real & m_isfinite(r2) & (u2 >= T(-1)) & (u2 <= T(1)), r2, bb, tau, p1, h2, a3, off);
  return -sg * best.w * inv_d + nan_guard(q, b, zsq);
}

// hardtanh: alpha_odd3 with a1 = 1, a3 = 0, whose linear middle piece has the one candidate
// w = -|b|; the zero terms folded by hand, so that it needs no square root and no per-element division.
// Derivation: docs/derivations.md#hardtanh-and-smoothstep
template <typename T>
TOX_HD T alpha_hardtanh(T q, T b, T zsq, T eta, T mu) {
  const T inf = T(HUGE_VAL);
  const T d = T(1) + eta * mu;
  const T inv_d = T(1) / d;
  const T tau = eta * zsq * inv_d;
  const T inv_tau = T(1) / tau;
  const T sg = b < T(0) ? T(-1) : T(1);
  const T bb = sg * b;
  const T c = sg * (q * inv_d);
  const T sig_c = c >= T(1) ? T(1) : (c <= T(-1) ? T(-1) : c);
  Best<T> best{inf, T(0), T(0)};
  const T wr = c >= T(1) ? T(0) : (T(1) - c) * inv_tau;
  const T wl = c <= T(-1) ? T(0) : (T(-1) - c) * inv_tau;
  flat_offers(best, wr, wl, bb, tau, sig_c);
  const T um = c - tau * bb;
  const T off_m = bb * (c - sig_c), quad_m = T(0.5) * tau * bb * bb;
  consider(best, (um >= T(-1)) & (um <= T(1)), -bb, off_m - quad_m, T(3) * quad_m + m_abs(off_m));
  return -sg * best.w * inv_d + nan_guard(q, b, zsq);
}

// One entry point for every kind; the CPU and CUDA loops call this with a compile-time KIND.
template <int64_t KIND, typename T>
TOX_HD T alpha_dispatch(T q, T b, T zsq, T eta, T mu, const RuntimePieces<T>& rp) {
  if (KIND == kRelu) return alpha_relu(q, b, zsq, eta, mu);
  if (KIND == kArctan) return alpha_arctan(q, b, zsq, eta, mu);
  if (KIND == kIdentity) return alpha_identity(q, b, zsq, eta, mu);
  if (KIND == kHardtanh) return alpha_hardtanh(q, b, zsq, eta, mu);
  if (KIND == kSmoothstep) return alpha_odd3(q, b, zsq, eta, mu, T(1.5), T(-0.5));
  return alpha_piecewise(q, b, zsq, eta, mu, rp);
}

}  // namespace TOX_MATH_NS
}  // namespace torchopt_ext
