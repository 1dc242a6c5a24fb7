// CUDA registration of torchopt_ext::ib_alpha: argument checks and dtype handling here (torch
// headers), the kernel itself in csrc/cuda/ib_alpha_kernel.cu (no torch headers).
#ifdef TORCHOPT_EXT_WITH_CUDA
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/extension.h>

#include "cuda/ib_alpha_kernel.h"
#include "torchopt_ext/ib_alpha_check.h"
#include "torchopt_ext/ib_alpha_math.h"

namespace torchopt_ext {
namespace {

at::Tensor ib_alpha_cuda(const at::Tensor& pre, const at::Tensor& grad_out, const at::Tensor& z_sqnorm, double lr,
                         double weight_decay, int64_t kind, const at::Tensor& knots, const at::Tensor& coefficients) {
  check_ib_alpha_args(pre, grad_out, z_sqnorm, lr, weight_decay, kind, knots, coefficients);
  TORCH_CHECK(pre.is_cuda(), "ib_alpha: the CUDA kernel got a tensor on ", pre.device());
  const c10::cuda::CUDAGuard guard(pre.device());
  const auto dtype = pre.scalar_type();
  const auto work = dtype == at::kDouble ? at::kDouble : at::kFloat;  // half/bf16 computed in float32
  auto p = pre.to(work).contiguous();
  auto g = grad_out.to(work).contiguous();
  auto z = z_sqnorm.to(work).contiguous();
  auto out = at::empty_like(p, at::MemoryFormat::Contiguous);
  const int64_t m = pre.size(-1);
  const int64_t rows = m == 0 ? 0 : p.numel() / m;
  auto k = knots.contiguous();
  auto co = coefficients.contiguous();
  const bool pw = kind == math::kPiecewise;
  const int err = cuda::ib_alpha_launch(kind, work == at::kDouble ? 1 : 0, p.data_ptr(), g.data_ptr(), z.data_ptr(),
                                        out.data_ptr(), rows, m, lr, weight_decay, pw ? k.data_ptr<double>() : nullptr,
                                        pw ? co.data_ptr<double>() : nullptr, pw ? co.size(0) : 0,
                                        at::cuda::getCurrentCUDAStream().stream());
  TORCH_CHECK(err == 0, "ib_alpha: CUDA launch failed with error ", err);
  return work == dtype ? out : out.to(dtype);
}

}  // namespace

TORCH_LIBRARY_IMPL(torchopt_ext, CUDA, m) { m.impl("ib_alpha", &ib_alpha_cuda); }

}  // namespace torchopt_ext
#endif  // TORCHOPT_EXT_WITH_CUDA
