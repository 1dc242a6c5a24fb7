// The backward of an implicit linear layer in one op (the math: torchopt_ext/nn/functional.py).
// At n = m = 100 the Python backward's dozen small ops cost more in dispatch than in arithmetic;
// here they are plain ATen calls. Composite: runs on every device ib_alpha has a kernel for, and
// decomposes under tracing (torch.compile, fake tensors).
#include <ATen/Parallel.h>
#include <torch/extension.h>

#include <algorithm>
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
      const double above_one =
          u.scalar_type() == at::kFloat ? double(std::nextafter(1.0f, 2.0f)) : std::nextafter(1.0, 2.0);
      return at::hardtanh_backward(b, u, -1.0, above_one);
    }
    case math::kSmoothstep: return (1.0 - u * u).clamp_min_(0.0).mul_(b).mul_(1.5);
    case math::kIdentity: return b;
    default: TORCH_CHECK(false, "implicit_linear_backward: kind must be a built-in activation (0..4), got ", kind);
  }
}

// ||x_i||^2 per row: one pass on the CPU (linalg_vecdot is a multiply and a reduction, two
// passes and an allocation, which is most of its cost at batch 256 x 100)
template <typename scalar_t>
void row_sqnorm_rows(const scalar_t* x, scalar_t* out, int64_t r0, int64_t r1, int64_t n) {
  for (int64_t r = r0; r < r1; ++r) {
    const scalar_t* row = x + r * n;
    scalar_t acc = 0;
#pragma omp simd reduction(+ : acc)
    for (int64_t j = 0; j < n; ++j) acc += row[j] * row[j];
    out[r] = acc;
  }
}

// A tensor whose memory the loop below may read: dense CPU data and nothing in front of it. A tracing
// wrapper (FakeTensor, FunctionalTensor, vmap's BatchedTensor) reports the CPU too but has no data.
bool plain_cpu(const at::Tensor& t) {
  return (t.key_set() - c10::autograd_dispatch_keyset_with_ADInplaceOrView) ==
         c10::DispatchKeySet(c10::DispatchKey::CPU);
}

at::Tensor row_sqnorm(const at::Tensor& x2) {
  if (!plain_cpu(x2) || !x2.is_contiguous()) return at::linalg_vecdot(x2, x2);
  at::Tensor out = at::empty({x2.size(0)}, x2.options());
  const int64_t n = x2.size(1);
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(n, 1));
  AT_DISPATCH_FLOATING_TYPES(x2.scalar_type(), "row_sqnorm", [&] {
    const scalar_t* x = x2.data_ptr<scalar_t>();
    scalar_t* o = out.data_ptr<scalar_t>();
    at::parallel_for(0, x2.size(0), grain, [&](int64_t r0, int64_t r1) { row_sqnorm_rows(x, o, r0, r1, n); });
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> implicit_linear_backward(const at::Tensor& x, const at::Tensor& weight,
                                                                        const c10::optional<at::Tensor>& bias,
                                                                        const at::Tensor& q, const at::Tensor& grad_y,
                                                                        double eta, double mu, bool maximize,
                                                                        int64_t kind, bool need_x, bool need_w,
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
      at::Tensor zsq = row_sqnorm(x2);  // ||z||^2 with the bias's trailing 1
      if (has_bias) zsq.add_(1.0);
      static auto op = c10::Dispatcher::singleton()
                           .findSchemaOrThrow("torchopt_ext::ib_alpha", "")
                           .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, double, double,
                                             int64_t, const at::Tensor&, const at::Tensor&)>();
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

// sigma(q) of the built-in kinds, as torchopt_ext/nn/activation_fns.py computes it
at::Tensor activate(int64_t kind, const at::Tensor& q) {
  switch (kind) {
    case math::kRelu: return at::relu(q);
    case math::kArctan: return at::atan(q);
    case math::kHardtanh: return at::hardtanh(q, -1.0, 1.0);
    case math::kSmoothstep: {
      const at::Tensor v = q.clamp(-1.0, 1.0);
      return 1.5 * v - 0.5 * v * v * v;
    }
    case math::kIdentity: return q;
    default: TORCH_CHECK(false, "implicit_linear: kind must be a built-in activation (0..4), got ", kind);
  }
}

// How the backward learns eta, mu and maximize: a Python callable (torchopt_ext.nn.hyper) given the
// layer's id, called at backward time, so schedulers and load_state_dict take effect as in the
// Python path. Held for the life of the process (never destroyed: no Python call at exit).
py::object* g_resolver = nullptr;

struct ImplicitLinearFunction : public torch::autograd::Function<ImplicitLinearFunction> {
  static at::Tensor forward(torch::autograd::AutogradContext* ctx, const at::Tensor& x, const at::Tensor& weight,
                            const c10::optional<at::Tensor>& bias, int64_t kind, int64_t layer_id) {
    const at::Tensor q = at::linear(x, weight, bias);
    ctx->save_for_backward({x, weight, bias.has_value() ? *bias : at::Tensor(), q});
    ctx->saved_data["kind"] = kind;
    ctx->saved_data["layer"] = layer_id;
    return activate(kind, q);
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const at::Tensor &x = saved[0], &weight = saved[1], &bias = saved[2], &q = saved[3];
    const int64_t kind = ctx->saved_data["kind"].toInt();
    const bool need_x = ctx->needs_input_grad(0), need_w = ctx->needs_input_grad(1);
    const bool need_b = bias.defined() && ctx->needs_input_grad(2);
    double eta = 0.0, mu = 0.0;
    bool maximize = false;
    if (need_w || need_b) {
      TORCH_CHECK(g_resolver != nullptr, "implicit_linear: no learning-rate resolver registered");
      py::gil_scoped_acquire gil;
      try {
        const py::tuple h = (*g_resolver)(ctx->saved_data["layer"].toInt());
        eta = h[0].cast<double>();
        mu = h[1].cast<double>();
        maximize = h[2].cast<bool>();
      } catch (py::error_already_set& e) {
        TORCH_CHECK(false, e.what());  // e.g. no ImplicitSGD manages the layer: its message, as RuntimeError
      }
    }
    auto g = implicit_linear_backward(x, weight, bias.defined() ? c10::optional<at::Tensor>(bias) : c10::nullopt, q,
                                      grads[0], eta, mu, maximize, kind, need_x, need_w, need_b);
    return {need_x ? std::get<0>(g) : at::Tensor(), need_w ? std::get<1>(g) : at::Tensor(),
            need_b ? std::get<2>(g) : at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

}  // namespace

void set_hyper_resolver(py::object resolver) {
  if (g_resolver == nullptr) g_resolver = new py::object();
  *g_resolver = std::move(resolver);
}

at::Tensor implicit_linear(const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
                           int64_t kind, int64_t layer_id) {
  return ImplicitLinearFunction::apply(x, weight, bias, kind, layer_id);
}

TORCH_LIBRARY_IMPL(torchopt_ext, CompositeImplicitAutograd, m) {
  m.impl("implicit_linear_backward", &implicit_linear_backward);
}

}  // namespace torchopt_ext
