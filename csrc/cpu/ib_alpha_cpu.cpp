// CPU kernel of torchopt_ext::ib_alpha: one parallel pass over (rows, m), the solver inlined;
// the row loop is compiled three times (baseline x86-64, AVX2+FMA, AVX-512) and picked at run time.
#include <ATen/Parallel.h>
#include <torch/extension.h>

#include <atomic>

#include "torchopt_ext/ib_alpha_check.h"
#include "torchopt_ext/ib_alpha_math.h"
#include "ib_alpha_rows.h"

namespace torchopt_ext {
namespace cpu {
namespace tm = ::torchopt_ext::math;
TOX_DEFINE_ALPHA_ROWS(alpha_rows_base)

bool avx2_compiled();
bool avx512_compiled();

enum class Isa { kBaseline, kAvx2, kAvx512 };

// What this CPU and build can run: AVX-512 (F, VL, DQ, BW) over AVX2+FMA over baseline.
static Isa best_isa() {
#if defined(__x86_64__) && defined(__GNUC__)
  static const Isa best = [] {
    if (avx512_compiled() && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl") &&
        __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512bw"))
      return Isa::kAvx512;
    if (avx2_compiled() && __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return Isa::kAvx2;
    return Isa::kBaseline;
  }();
  return best;
#else
  return Isa::kBaseline;
#endif
}

// Which row loop runs: the best this CPU has, or a lower one asked for with set_isa.
static std::atomic<Isa> g_cap{Isa::kAvx512};

static Isa isa_in_use() { return std::min(best_isa(), g_cap.load(std::memory_order_relaxed)); }

static const char* isa_name(Isa isa) {
  return isa == Isa::kAvx512 ? "avx512" : isa == Isa::kAvx2 ? "avx2" : "baseline";
}

// float32 input takes the float32 fast paths (ib_alpha_fast32.h) unless switched off; the counts
// of elements the first pass handed to the second and of those handed to the double solver let
// tests see each path taken
static std::atomic<bool> g_fast32{true};
static std::atomic<int64_t> g_fast32_second{0};
static std::atomic<int64_t> g_fast32_redone{0};

bool fast32_enabled() { return g_fast32.load(std::memory_order_relaxed); }
void count_fast32_second(int64_t n) { g_fast32_second.fetch_add(n, std::memory_order_relaxed); }
void count_fast32_redone(int64_t n) { g_fast32_redone.fetch_add(n, std::memory_order_relaxed); }
bool set_fast32(bool on) { return g_fast32.exchange(on); }
int64_t fast32_redone(bool reset) { return reset ? g_fast32_redone.exchange(0) : g_fast32_redone.load(); }
int64_t fast32_second(bool reset) { return reset ? g_fast32_second.exchange(0) : g_fast32_second.load(); }

std::vector<std::string> fast32_activations() {
  if (!fast32_enabled()) return {};
  return {"hardtanh", "smoothstep", "arctan"};
}

std::string set_isa(const std::string& isa) {
  TORCH_CHECK(isa == "auto" || isa == "avx512" || isa == "avx2" || isa == "baseline",
              "set_cpu_isa: isa must be 'auto', 'avx512', 'avx2' or 'baseline', got '", isa, "'");
  g_cap = isa == "baseline" ? Isa::kBaseline : isa == "avx2" ? Isa::kAvx2 : Isa::kAvx512;
  return isa_name(isa_in_use());
}
}  // namespace cpu

namespace {

template <typename scalar_t>
void alpha_kind(int64_t kind, const scalar_t* pre, const scalar_t* grad, const scalar_t* zsq,
                scalar_t* out, int64_t rows, int64_t m, double lr, double wd,
                const math::RuntimePieces<double>& rp) {
  const auto rows_fn = [] {
    switch (cpu::isa_in_use()) {
      case cpu::Isa::kAvx512: return &cpu::alpha_rows_avx512<scalar_t>;
      case cpu::Isa::kAvx2: return &cpu::alpha_rows_avx2<scalar_t>;
      default: return &cpu::alpha_rows_base<scalar_t>;
    }
  }();
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(m, 1));
  at::parallel_for(0, rows, grain, [&](int64_t r0, int64_t r1) {
    rows_fn(kind, pre, grad, zsq, out, r0, r1, m, lr, wd, rp.M, rp.knots, rp.coef);
  });
}

at::Tensor ib_alpha_cpu(const at::Tensor& pre, const at::Tensor& grad_out, const at::Tensor& z_sqnorm,
                        double lr, double weight_decay, int64_t kind, const at::Tensor& knots,
                        const at::Tensor& coefficients) {
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
    math::RuntimePieces<double> rp{kind == math::kPiecewise ? co.size(0) : 0,
                                   kind == math::kPiecewise ? k.data_ptr<double>() : nullptr,
                                   kind == math::kPiecewise ? co.data_ptr<double>() : nullptr};
    AT_DISPATCH_FLOATING_TYPES(work, "ib_alpha_cpu", [&] {
      alpha_kind<scalar_t>(kind, p.data_ptr<scalar_t>(), g.data_ptr<scalar_t>(), z.data_ptr<scalar_t>(),
                           out.data_ptr<scalar_t>(), rows, m, lr, weight_decay, rp);
    });
  }
  return work == dtype ? out : out.to(dtype);
}

}  // namespace

TORCH_LIBRARY_IMPL(torchopt_ext, CPU, m) { m.impl("ib_alpha", &ib_alpha_cpu); }

}  // namespace torchopt_ext
