// CUDA registration of the probe ops: checks and dtype handling here (torch headers), the kernels
// in csrc/cuda/probe_kernel.cu (no torch headers).
#ifdef TORCHOPT_EXT_WITH_CUDA
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/extension.h>

#include <vector>

#include "cuda/probe_kernel.h"
#include "torchopt_ext/probe_check.h"

namespace torchopt_ext {
namespace {

void probe_move_cuda(at::TensorList params, at::TensorList saved, at::TensorList direction, const at::Tensor& step) {
  check_probe_move_args(params, saved, direction, step);
  if (params.empty()) return;
  const c10::cuda::CUDAGuard guard(params[0].device());
  TORCH_CHECK(step.device() == params[0].device(), "probe_move_: step must be on params' device ", params[0].device(),
              ", got ", step.device());
  auto h = step.to(at::kDouble).reshape({});
  // group the fast tensors by dtype; anything else takes the ATen formula
  for (int dtype = 0; dtype < 2; ++dtype) {
    const auto want = dtype == 1 ? at::kDouble : at::kFloat;
    std::vector<void*> p;
    std::vector<const void*> s, d;
    std::vector<int64_t> n;
    for (size_t i = 0; i < params.size(); ++i) {
      TORCH_CHECK(params[i].is_cuda() && params[i].device() == params[0].device(),
                  "probe_move_: params must all be on one CUDA device, params[", i, "] is on ", params[i].device());
      const bool fast = params[i].is_contiguous() && saved[i].is_contiguous() && direction[i].is_contiguous();
      if (params[i].scalar_type() != want || !fast) continue;
      p.push_back(params[i].data_ptr());
      s.push_back(saved[i].data_ptr());
      d.push_back(direction[i].data_ptr());
      n.push_back(params[i].numel());
    }
    const int err = cuda::probe_move_launch(dtype, p.data(), s.data(), d.data(), n.data(), static_cast<int>(p.size()),
                                            h.data_ptr<double>(), at::cuda::getCurrentCUDAStream().stream());
    TORCH_CHECK(err == 0, "probe_move_: CUDA launch failed with error ", err);
  }
  for (size_t i = 0; i < params.size(); ++i) {
    const auto t = params[i].scalar_type();
    const bool fast = params[i].is_contiguous() && saved[i].is_contiguous() && direction[i].is_contiguous() &&
                      (t == at::kFloat || t == at::kDouble);
    if (!fast) params[i].copy_(saved[i] - direction[i] * h);  // the reference's formula
  }
}

std::tuple<at::Tensor, at::Tensor> newton_lr_cuda(const at::Tensor& losses, const at::Tensor& eta,
                                                  const at::Tensor& velocity, double eps, double delta, double beta) {
  check_newton_lr_args(losses, eta, velocity);
  TORCH_CHECK(losses.is_cuda(), "newton_lr: the CUDA kernel got losses on ", losses.device());
  const c10::cuda::CUDAGuard guard(losses.device());
  auto f = losses.to(at::kDouble).contiguous();
  auto e = eta.to(at::kDouble).contiguous();
  auto v = velocity.to(at::kDouble).contiguous();
  auto opts = losses.options().dtype(at::kDouble);
  auto eta_out = at::empty({}, opts);
  auto v_out = at::empty({}, opts);
  const int err = cuda::newton_lr_launch(f.data_ptr<double>(), e.data_ptr<double>(), v.data_ptr<double>(), eps, delta,
                                         beta, eta_out.data_ptr<double>(), v_out.data_ptr<double>(),
                                         at::cuda::getCurrentCUDAStream().stream());
  TORCH_CHECK(err == 0, "newton_lr: CUDA launch failed with error ", err);
  return {eta_out, v_out};
}

at::Tensor guarded_lr_cuda(const at::Tensor& losses, const at::Tensor& eta, double eps, double delta, double growth,
                           double fraction, double shrink) {
  check_guarded_lr_args(losses, eta, growth, fraction, shrink);
  TORCH_CHECK(losses.is_cuda(), "guarded_lr: the CUDA kernel got losses on ", losses.device());
  const c10::cuda::CUDAGuard guard(losses.device());
  auto f = losses.to(at::kDouble).contiguous();
  auto e = eta.to(at::kDouble).contiguous();
  auto eta_out = at::empty({}, losses.options().dtype(at::kDouble));
  const int err =
      cuda::guarded_lr_launch(f.data_ptr<double>(), e.data_ptr<double>(), eps, delta, growth, fraction, shrink,
                              eta_out.data_ptr<double>(), at::cuda::getCurrentCUDAStream().stream());
  TORCH_CHECK(err == 0, "guarded_lr: CUDA launch failed with error ", err);
  return eta_out;
}

}  // namespace

TORCH_LIBRARY_IMPL(torchopt_ext, CUDA, m) {
  m.impl("probe_move_", &probe_move_cuda);
  m.impl("newton_lr", &newton_lr_cuda);
  m.impl("guarded_lr", &guarded_lr_cuda);
}

}  // namespace torchopt_ext
#endif  // TORCHOPT_EXT_WITH_CUDA
