// The activation kinds of enum Kind (ib_alpha_math.h) by name, host code only: the one table
// torchopt_ext.activations reads (through _C.activation_kinds), so Python never writes a number.
#pragma once
#include <cstdint>

#include "torchopt_ext/ib_alpha_math.h"

namespace torchopt_ext {

struct KindName {
  const char* name;
  int64_t kind;
};

constexpr KindName kKindNames[] = {
    {"relu", math::kRelu},         {"arctan", math::kArctan},
    {"hardtanh", math::kHardtanh}, {"smoothstep", math::kSmoothstep},
    {"identity", math::kIdentity}, {"piecewise", math::kPiecewise},
};
constexpr int64_t kNumKinds = sizeof(kKindNames) / sizeof(kKindNames[0]);

// every kind listed once, at the index of its number, so that kKindNames[kind] is its name
constexpr bool kinds_listed_in_order() {
  for (int64_t i = 0; i < kNumKinds; ++i)
    if (kKindNames[i].kind != i) return false;
  return kNumKinds == math::kPiecewise + 1;
}
static_assert(kinds_listed_in_order(), "kKindNames must list every Kind once, in order");

}  // namespace torchopt_ext
