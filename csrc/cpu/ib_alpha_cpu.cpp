// CPU kernel of torchopt_ext::ib_alpha: one parallel pass over (rows, m), the solver inlined.
#include <ATen/Parallel.h>
#include <torch/extension.h>

#include "torchopt_ext/ib_alpha_check.h"
#include "torchopt_ext/ib_alpha_math.h"

namespace torchopt_ext {
namespace {

// relu and identity are cheap enough to stay in the input precision (and vectorise); the cubic
// solvers run in double, where tau^2 and the cubic's coefficients cannot overflow.
template <int64_t KIND, typename scalar_t>
using acc_type_t = std::conditional_t<KIND == math::kRelu || KIND == math::kIdentity, scalar_t, double>;

template <int64_t KIND, typename scalar_t>
void alpha_loop(const scalar_t* pre, const scalar_t* grad, const scalar_t* zsq, scalar_t* out,
                int64_t rows, int64_t m, double lr, double wd, const math::RuntimePieces<double>& rp64) {
  using acc_t = acc_type_t<KIND, scalar_t>;
  const acc_t eta = static_cast<acc_t>(lr), mu = static_cast<acc_t>(wd);
  const math::RuntimePieces<acc_t> rp{rp64.M, rp64.knots, rp64.coef};
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(m, 1));
  at::parallel_for(0, rows, grain, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const acc_t z = static_cast<acc_t>(zsq[r]);
      const scalar_t* p = pre + r * m;
      const scalar_t* g = grad + r * m;
      scalar_t* o = out + r * m;
#pragma omp simd
      for (int64_t j = 0; j < m; ++j) {
        o[j] = static_cast<scalar_t>(math::alpha_dispatch<KIND, acc_t>(
            static_cast<acc_t>(p[j]), static_cast<acc_t>(g[j]), z, eta, mu, rp));
      }
    }
  });
}

template <typename scalar_t>
void alpha_kind(int64_t kind, const scalar_t* pre, const scalar_t* grad, const scalar_t* zsq,
                scalar_t* out, int64_t rows, int64_t m, double lr, double wd,
                const math::RuntimePieces<double>& rp) {
  switch (kind) {
    case math::kRelu: return alpha_loop<math::kRelu>(pre, grad, zsq, out, rows, m, lr, wd, rp);
    case math::kArctan: return alpha_loop<math::kArctan>(pre, grad, zsq, out, rows, m, lr, wd, rp);
    case math::kHardtanh: return alpha_loop<math::kHardtanh>(pre, grad, zsq, out, rows, m, lr, wd, rp);
    case math::kSmoothstep: return alpha_loop<math::kSmoothstep>(pre, grad, zsq, out, rows, m, lr, wd, rp);
    case math::kIdentity: return alpha_loop<math::kIdentity>(pre, grad, zsq, out, rows, m, lr, wd, rp);
    default: return alpha_loop<math::kPiecewise>(pre, grad, zsq, out, rows, m, lr, wd, rp);
  }
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
