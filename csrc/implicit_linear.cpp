// The backward of an implicit linear layer in one op (the math: torchopt_ext/nn/functional.py).
// At n = m = 100 the Python backward's dozen small ops cost more in dispatch than in arithmetic;
// here they are plain ATen calls. Composite: runs on every device ib_alpha has a kernel for, and
// decomposes under tracing (torch.compile, fake tensors).
#include <torch/extension.h>

#include <cmath>

#include "torchopt_ext/ib_alpha_math.h"

namespace torchopt_ext {
namespace {

// b * sigma'(u), the conventions of torchopt_ext/nn/activation_fns.py (eb_signal)
at::Tensor eb_signal(int64_t kind, const at::Tensor& b, const at::Tensor& u) {
  switch (kind) {
    case math::kRelu: return at::threshold_backward(b, u, 0);
    case math::kArctan: return b / (u * u + 1.0);
    case math::kHardtanh: {
      // the left piece owns the knot u = 1, so the open interval's top is the next number above 1
      const double above_one = u.scalar_type() == at::kFloat ? double(std::nextafter(1.0f, 2.0f))
                                                             : std::nextafter(1.0, 2.0);
      return at::hardtanh_backward(b, u, -1.0, above_one);
    }
    case math::kSmoothstep: return (1.0 - u * u).clamp_min_(0.0).mul_(b).mul_(1.5);
    case math::kIdentity: return b;
    default: TORCH_CHECK(false, "implicit_linear_backward: kind must be a built-in activation (0..4), got ", kind);
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> implicit_linear_backward(
    const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias, const at::Tensor& q,
    const at::Tensor& grad_y, double eta, double mu, bool maximize, int64_t kind, bool need_x, bool need_w,
    bool need_b) {
  TORCH_CHECK(weight.dim() == 2, "implicit_linear_backward: weight must be 2-D, got ", weight.sizes());
  const int64_t m = weight.size(0), n = weight.size(1);
  const bool has_bias = bias.has_value() && bias->defined();
  at::Tensor gx, gw, gb;
  if (need_x) gx = at::matmul(eb_signal(kind, grad_y, q), weight);
  if (need_w || (need_b && has_bias)) {
    const at::Tensor x2 = x.reshape({-1, n});
    const at::Tensor q2 = q.reshape({-1, m});
    at::Tensor b2 = grad_y.reshape({-1, m});
    if (maximize) b2 = -b2;  // maximizing L is minimizing -L: solve with -b, hand back -grad
    at::Tensor a;
    if (eta == 0.0) {
      a = eb_signal(kind, b2, q2);  // the explicit limit; the kernels need eta > 0
    } else if (kind == math::kIdentity) {
      a = mu == 0.0 ? b2 : b2 * (1.0 / (1.0 + eta * mu));
    } else {
      at::Tensor zsq = at::linalg_vecdot(x2, x2);  // ||z||^2 with the bias's trailing 1
      if (has_bias) zsq.add_(1.0);
      static auto op = c10::Dispatcher::singleton()
                           .findSchemaOrThrow("torchopt_ext::ib_alpha", "")
                           .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, double,
                                             double, int64_t, const at::Tensor&, const at::Tensor&)>();
      const at::Tensor none = at::empty({0}, q2.options().dtype(at::kDouble));
      a = op.call(q2, b2, zsq, eta, mu, kind, none, none);
    }
    if (maximize) a = -a;
    const double shrink = mu / (1.0 + eta * mu);  // the decay part of theta/(1+eta mu), as a gradient
    const double signed_shrink = maximize ? -shrink : shrink;
    if (need_w) gw = shrink != 0.0 ? at::addmm(weight, a.t(), x2, signed_shrink, 1.0) : at::mm(a.t(), x2);
    if (need_b && has_bias) {
      gb = a.sum(0);
      if (shrink != 0.0) gb.add_(*bias, signed_shrink);
    }
  }
  // the schema returns three tensors: an unneeded gradient comes back empty
  const auto empty = [&] { return at::empty({0}, weight.options()); };
  return {gx.defined() ? gx : empty(), gw.defined() ? gw : empty(), gb.defined() ? gb : empty()};
}

}  // namespace

TORCH_LIBRARY_IMPL(torchopt_ext, CompositeImplicitAutograd, m) {
  m.impl("implicit_linear_backward", &implicit_linear_backward);
}

}  // namespace torchopt_ext
