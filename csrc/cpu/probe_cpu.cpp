// CPU kernels of torchopt_ext::probe_move_ and torchopt_ext::newton_lr.
#include <ATen/Parallel.h>
#include <torch/extension.h>

#include "torchopt_ext/probe_check.h"
#include "torchopt_ext/probe_math.h"

namespace torchopt_ext {
namespace {

// p = saved - d*h in the parameter's precision, h rounded to it once: the same two roundings as
// `saved - direction * h` in ATen (the reference). Rounding h to float32 moves a probe by ~6e-8*h,
// far below the spacing eps it must resolve. The extension's baseline is SSE2, so the loop also gets
// an AVX2 clone picked at load time (twice the lanes; ATen's own kernels dispatch the same way).
// AVX2 alone implies no FMA, so the product is still rounded before the subtraction.
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__)
#define TOX_MOVE_CLONES __attribute__((target_clones("avx2", "default")))
#else
#define TOX_MOVE_CLONES
#endif

TOX_MOVE_CLONES void move_rows(float* p, const float* s, const float* d, int64_t b, int64_t e, float h) {
  for (int64_t i = b; i < e; ++i) p[i] = s[i] - d[i] * h;
}

TOX_MOVE_CLONES void move_rows(double* p, const double* s, const double* d, int64_t b, int64_t e, double h) {
  for (int64_t i = b; i < e; ++i) p[i] = s[i] - d[i] * h;
}

template <typename scalar_t>
void move_one(scalar_t* p, const scalar_t* s, const scalar_t* d, int64_t n, double h) {
  const scalar_t hs = static_cast<scalar_t>(h);
  at::parallel_for(0, n, 65536, [&](int64_t b, int64_t e) { move_rows(p, s, d, b, e, hs); });
}

void move_all(at::TensorList params, at::TensorList saved, at::TensorList direction, double h) {
  for (size_t i = 0; i < params.size(); ++i) {
    const at::Tensor& p = params[i];
    TORCH_CHECK(p.device().is_cpu(), "probe_move_: the CPU kernel got params[", i, "] on ", p.device());
    const bool fast = p.is_contiguous() && saved[i].is_contiguous() && direction[i].is_contiguous() &&
                      (p.scalar_type() == at::kFloat || p.scalar_type() == at::kDouble);
    if (!fast) {                             // rare layouts and dtypes: same formula through ATen
      p.copy_(saved[i] - direction[i] * h);  // the reference's formula
      continue;
    }
    AT_DISPATCH_FLOATING_TYPES(p.scalar_type(), "probe_move_cpu", [&] {
      move_one<scalar_t>(p.data_ptr<scalar_t>(), saved[i].data_ptr<scalar_t>(), direction[i].data_ptr<scalar_t>(),
                         p.numel(), h);
    });
  }
}

void probe_move_cpu(at::TensorList params, at::TensorList saved, at::TensorList direction, const at::Tensor& step) {
  check_probe_move_args(params, saved, direction, step);
  move_all(params, saved, direction, step.item<double>());
}

std::tuple<at::Tensor, at::Tensor> newton_lr_cpu(const at::Tensor& losses, const at::Tensor& eta,
                                                 const at::Tensor& velocity, double eps, double delta, double beta) {
  check_newton_lr_args(losses, eta, velocity);
  auto f = losses.to(at::kDouble).contiguous();
  double eta_next = 0.0, v_next = 0.0;
  math::newton_lr_update(f.data_ptr<double>(), eta.item<double>(), velocity.item<double>(), eps, delta, beta, &eta_next,
                         &v_next);
  auto opts = losses.options().dtype(at::kDouble);
  return {at::scalar_tensor(eta_next, opts), at::scalar_tensor(v_next, opts)};
}

at::Tensor guarded_lr_cpu(const at::Tensor& losses, const at::Tensor& eta, double eps, double delta, double growth,
                          double fraction, double shrink) {
  check_guarded_lr_args(losses, eta, growth, fraction, shrink);
  auto f = losses.to(at::kDouble).contiguous();
  const double next =
      math::guarded_lr_update(f.data_ptr<double>(), eta.item<double>(), eps, delta, growth, fraction, shrink);
  return at::scalar_tensor(next, losses.options().dtype(at::kDouble));
}

}  // namespace

// probe_move_ with the step as a host number, for the CPU step that keeps eta as a Python float
// (exposed as _C.probe_move_host): no 0-dim step tensor to make, and no dispatcher on the way.
void probe_move_host(const std::vector<at::Tensor>& params, const std::vector<at::Tensor>& saved,
                     const std::vector<at::Tensor>& direction, double step) {
  check_probe_move_lists(params, saved, direction);
  move_all(params, saved, direction, step);
}

TORCH_LIBRARY_IMPL(torchopt_ext, CPU, m) {
  m.impl("probe_move_", &probe_move_cpu);
  m.impl("newton_lr", &newton_lr_cpu);
  m.impl("guarded_lr", &guarded_lr_cpu);
}

}  // namespace torchopt_ext
