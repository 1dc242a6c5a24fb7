// A scalar that counts the floating-point operations done on it, so that the cost of one alpha
// solve (c_sigma in the paper's cost model) is counted from the solver's own code. Host only.
// Convention: +, -, *, /, comparisons, sqrt, cbrt, acos, cos, fabs, copysign each count 1;
// constants folded at compile time (T(1.0/3.0) and the like) count 0.
#pragma once

#include <cmath>
#include <cstdint>

#include "torchopt_ext/ib_alpha_math.h"

namespace torchopt_ext {
namespace math {

struct FlopCounter {
  double v;
  static int64_t& count() {
    static thread_local int64_t n = 0;
    return n;
  }
  FlopCounter() : v(0) {}
  FlopCounter(double x) : v(x) {}  // NOLINT: implicit, like a float literal
  FlopCounter operator-() const {
    ++count();
    return FlopCounter(-v);
  }
};

#define TOX_FC_BINOP(op)                                         \
  inline FlopCounter operator op(FlopCounter a, FlopCounter b) { \
    ++FlopCounter::count();                                      \
    return FlopCounter(a.v op b.v);                              \
  }
TOX_FC_BINOP(+)
TOX_FC_BINOP(-)
TOX_FC_BINOP(*)
TOX_FC_BINOP(/)
#undef TOX_FC_BINOP

#define TOX_FC_CMP(op)                                    \
  inline bool operator op(FlopCounter a, FlopCounter b) { \
    ++FlopCounter::count();                               \
    return a.v op b.v;                                    \
  }
TOX_FC_CMP(<)
TOX_FC_CMP(<=)
TOX_FC_CMP(>)
TOX_FC_CMP(>=)
TOX_FC_CMP(==)
TOX_FC_CMP(!=)
#undef TOX_FC_CMP

inline FlopCounter& operator+=(FlopCounter& a, FlopCounter b) {
  a = a + b;
  return a;
}

#define TOX_FC_FN1(name, fn)               \
  inline FlopCounter name(FlopCounter a) { \
    ++FlopCounter::count();                \
    return FlopCounter(fn(a.v));           \
  }
TOX_FC_FN1(m_sqrt, std::sqrt)
TOX_FC_FN1(m_cbrt, std::cbrt)
TOX_FC_FN1(m_acos, std::acos)
TOX_FC_FN1(m_cos, std::cos)
TOX_FC_FN1(m_abs, std::fabs)
#undef TOX_FC_FN1

inline FlopCounter m_copysign(FlopCounter a, FlopCounter b) {
  ++FlopCounter::count();
  return FlopCounter(std::copysign(a.v, b.v));
}
inline bool m_isfinite(FlopCounter a) {
  ++FlopCounter::count();
  return std::isfinite(a.v);
}

}  // namespace math
}  // namespace torchopt_ext
