// CPU kernel of torchopt_ext::ib_alpha: one parallel pass over (rows, m), the solver inlined;
// the row loop is compiled twice (baseline x86-64 and AVX2+FMA) and picked at run time.
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
bool avx2_fast32_arctan();

// Which row loop runs: the AVX2+FMA build when this CPU has it, unless set_isa("baseline").
static bool g_use_avx2 = true;

bool use_avx2() {
#if defined(__x86_64__) && defined(__GNUC__)
  static const bool cpu_has = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
#else
  static const bool cpu_has = false;
#endif
  return g_use_avx2 && cpu_has && avx2_compiled();
}

// float32 input takes the float32 fast paths (ib_alpha_fast32.h) unless switched off; the count
// of elements they handed back to the double solver lets tests see that path taken
static std::atomic<bool> g_fast32{true};
static std::atomic<int64_t> g_fast32_redone{0};

bool fast32_enabled() { return g_fast32.load(std::memory_order_relaxed); }
void count_fast32_redone(int64_t n) { g_fast32_redone.fetch_add(n, std::memory_order_relaxed); }
bool set_fast32(bool on) { return g_fast32.exchange(on); }
int64_t fast32_redone(bool reset) { return reset ? g_fast32_redone.exchange(0) : g_fast32_redone.load(); }

std::vector<std::string> fast32_activations() {
  if (!fast32_enabled()) return {};
  const bool arctan = use_avx2() ? avx2_fast32_arctan() : tm::kFast32Arctan;
  std::vector<std::string> names{"hardtanh", "smoothstep"};
  if (arctan) names.push_back("arctan");
  return names;
}

std::string set_isa(const std::string& isa) {
  TORCH_CHECK(isa == "auto" || isa == "baseline", "set_cpu_isa: isa must be 'auto' or 'baseline', got '", isa, "'");
  g_use_avx2 = isa == "auto";
  return use_avx2() ? "avx2" : "baseline";
}
}  // namespace cpu

namespace {

template <typename scalar_t>
void alpha_kind(int64_t kind, const scalar_t* pre, const scalar_t* grad, const scalar_t* zsq,
                scalar_t* out, int64_t rows, int64_t m, double lr, double wd,
                const math::RuntimePieces<double>& rp) {
  const bool avx2 = cpu::use_avx2();
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(m, 1));
  at::parallel_for(0, rows, grain, [&](int64_t r0, int64_t r1) {
    if (avx2)
      cpu::alpha_rows_avx2<scalar_t>(kind, pre, grad, zsq, out, r0, r1, m, lr, wd, rp.M, rp.knots, rp.coef);
    else
      cpu::alpha_rows_base<scalar_t>(kind, pre, grad, zsq, out, r0, r1, m, lr, wd, rp.M, rp.knots, rp.coef);
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
