// CPU kernel of torchopt_ext::ib_alpha: one parallel pass over (rows, m) through a row loop picked
// at run time from the tables of ib_alpha_cpu_{baseline,avx2,avx512}.cpp, and the switches and
// counters of that choice (torchopt_ext/debug.py documents them for users).
#include <ATen/Parallel.h>
#include <torch/extension.h>

#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <string>
#include <type_traits>
#include <vector>

#include "ib_alpha_dispatch.h"
#include "torchopt_ext/ib_alpha_check.h"
#include "torchopt_ext/ib_alpha_kinds.h"
#include "torchopt_ext/ib_alpha_math.h"

namespace torchopt_ext {
namespace cpu {
static_assert(kRowKinds == kNumKinds, "a row-loop table has one entry per activation kind");

// The instruction sets with a row-loop table, lowest first (an index into kIsaNames).
enum class Isa : int { kBaseline, kAvx2, kAvx512 };
constexpr const char* kIsaNames[] = {"baseline", "avx2", "avx512"};
constexpr const char* kIsaChoices = "'auto', 'avx512', 'avx2', 'baseline' or 'default'";
// Named after ATen's ATEN_CPU_CAPABILITY, which caps ATen's own kernels the same way.
constexpr const char* kCapabilityVar = "TORCHOPT_EXT_CPU_CAPABILITY";

static const AlphaRowKernels* compiled_kernels(Isa isa) {
  switch (isa) {
    case Isa::kAvx512: return avx512::row_kernels();
    case Isa::kAvx2: return avx2::row_kernels();
    default: return baseline::row_kernels();
  }
}

// AVX-512 means F, VL, DQ and BW (the target pragma of ib_alpha_cpu_avx512.cpp); AVX2 comes with FMA.
static bool cpu_runs(Isa isa) {
#if defined(__x86_64__) && defined(__GNUC__)
  switch (isa) {
    case Isa::kAvx512:
      return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl") &&
             __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512bw");
    case Isa::kAvx2: return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
    default: return true;
  }
#else
  return isa == Isa::kBaseline;
#endif
}

static bool available(Isa isa) { return compiled_kernels(isa) != nullptr && cpu_runs(isa); }

static Isa best_isa() {
  static const Isa best = available(Isa::kAvx512) ? Isa::kAvx512 : available(Isa::kAvx2) ? Isa::kAvx2 : Isa::kBaseline;
  return best;
}

// A name of set_isa or of TORCHOPT_EXT_CPU_CAPABILITY as the highest instruction set it allows;
// "default" is ATen's name for the baseline. False for any other name.
static bool parse_cap(const std::string& name, Isa* cap) {
  if (name == "auto" || name == "avx512")
    *cap = Isa::kAvx512;
  else if (name == "avx2")
    *cap = Isa::kAvx2;
  else if (name == "baseline" || name == "default")
    *cap = Isa::kBaseline;
  else
    return false;
  return true;
}

// The cap TORCHOPT_EXT_CPU_CAPABILITY sets (none when unset or empty), read at the first call.
static Isa env_cap() {
  static const Isa cap = [] {
    Isa isa = Isa::kAvx512;
    const char* value = std::getenv(kCapabilityVar);
    if (value != nullptr && *value != '\0')
      TORCH_CHECK(parse_cap(value, &isa), "ib_alpha: the environment variable ", kCapabilityVar, " must be ",
                  kIsaChoices, ", got '", value, "'");
    return isa;
  }();
  return cap;
}

// The cap set_isa chose, or kCapFromEnv until it is first called.
constexpr int kCapFromEnv = -1;
static std::atomic<int> g_cap{kCapFromEnv};

static Isa isa_in_use() {
  const int cap = g_cap.load(std::memory_order_relaxed);
  return std::min(best_isa(), cap == kCapFromEnv ? env_cap() : static_cast<Isa>(cap));
}

static const char* isa_name(Isa isa) { return kIsaNames[static_cast<int>(isa)]; }

std::string set_isa(const std::string& name) {
  Isa cap;
  TORCH_CHECK(parse_cap(name, &cap), "set_cpu_isa: isa must be ", kIsaChoices, ", got '", name, "'");
  g_cap = static_cast<int>(cap);
  return isa_name(isa_in_use());
}

std::string current_isa() { return isa_name(isa_in_use()); }

std::vector<std::string> available_isas() {
  std::vector<std::string> names;
  for (Isa isa : {Isa::kBaseline, Isa::kAvx2, Isa::kAvx512})
    if (available(isa)) names.push_back(isa_name(isa));
  return names;
}

// float32 input takes the float32 fast paths (ib_alpha_fast32.h) unless switched off; the counts
// of elements the first pass handed to the second and of those handed to the double solver let
// tests see each path taken
static std::atomic<bool> g_fast32{true};
static std::atomic<int64_t> g_fast32_second{0};
static std::atomic<int64_t> g_fast32_redone{0};

static bool fast32_enabled() { return g_fast32.load(std::memory_order_relaxed); }
void count_fast32_second(int64_t n) { g_fast32_second.fetch_add(n, std::memory_order_relaxed); }
void count_fast32_redone(int64_t n) { g_fast32_redone.fetch_add(n, std::memory_order_relaxed); }
bool set_fast32(bool on) { return g_fast32.exchange(on); }
int64_t fast32_redone(bool reset) { return reset ? g_fast32_redone.exchange(0) : g_fast32_redone.load(); }
int64_t fast32_second(bool reset) { return reset ? g_fast32_second.exchange(0) : g_fast32_second.load(); }

std::vector<std::string> fast32_activations() {
  std::vector<std::string> names;
  if (!fast32_enabled()) return names;
  const AlphaRowKernels& k = *compiled_kernels(isa_in_use());
  for (int64_t kind = 0; kind < kNumKinds; ++kind)
    if (k.f32_fast[kind] != nullptr) names.push_back(kKindNames[kind].name);
  return names;
}

// The row loop of one call: the instruction set in use and, for float32, the kind's fast path
// where it has one and the switch is on.
template <typename scalar_t>
static AlphaRowsFn<scalar_t> rows_for(int64_t kind) {
  const AlphaRowKernels& k = *compiled_kernels(isa_in_use());
  if constexpr (std::is_same<scalar_t, float>::value) {
    return fast32_enabled() && k.f32_fast[kind] != nullptr ? k.f32_fast[kind] : k.f32[kind];
  } else {
    return k.f64[kind];
  }
}
}  // namespace cpu

namespace {

template <typename scalar_t>
void alpha_kind(int64_t kind, const scalar_t* pre, const scalar_t* grad, const scalar_t* zsq, scalar_t* out,
                int64_t rows, int64_t m, double lr, double wd, int64_t M, const double* knots, const double* coef) {
  const cpu::AlphaRowsFn<scalar_t> rows_fn = cpu::rows_for<scalar_t>(kind);
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(m, 1));
  at::parallel_for(0, rows, grain,
                   [&](int64_t r0, int64_t r1) { rows_fn(pre, grad, zsq, out, r0, r1, m, lr, wd, M, knots, coef); });
}

at::Tensor ib_alpha_cpu(const at::Tensor& pre, const at::Tensor& grad_out, const at::Tensor& z_sqnorm, double lr,
                        double weight_decay, int64_t kind, const at::Tensor& knots, const at::Tensor& coefficients) {
  check_ib_alpha_args(pre, grad_out, z_sqnorm, lr, weight_decay, kind, knots, coefficients);
  TORCH_CHECK(pre.device().is_cpu(), "ib_alpha: the CPU kernel got a tensor on ", pre.device());
  const auto dtype = pre.scalar_type();
  // float16/bfloat16 are computed in float32
  const auto work = (dtype == at::kHalf || dtype == at::kBFloat16) ? at::kFloat : dtype;
  auto p = pre.to(work).contiguous();
  auto g = grad_out.to(work).contiguous();
  auto z = z_sqnorm.to(work).contiguous();
  auto out = at::empty_like(p, at::MemoryFormat::Contiguous);
  const int64_t m = pre.size(-1);
  const int64_t rows = m == 0 ? 0 : p.numel() / m;
  if (rows > 0) {
    auto k = knots.contiguous();
    auto co = coefficients.contiguous();
    const bool pw = kind == math::kPiecewise;
    AT_DISPATCH_FLOATING_TYPES(work, "ib_alpha_cpu", [&] {
      alpha_kind<scalar_t>(kind, p.data_ptr<scalar_t>(), g.data_ptr<scalar_t>(), z.data_ptr<scalar_t>(),
                           out.data_ptr<scalar_t>(), rows, m, lr, weight_decay, pw ? co.size(0) : 0,
                           pw ? k.data_ptr<double>() : nullptr, pw ? co.data_ptr<double>() : nullptr);
    });
  }
  return work == dtype ? out : out.to(dtype);
}

}  // namespace

TORCH_LIBRARY_IMPL(torchopt_ext, CPU, m) { m.impl("ib_alpha", &ib_alpha_cpu); }

}  // namespace torchopt_ext
