// Argument checks of the ib_alpha op shared by its CPU and CUDA registrations (torch header).
#pragma once
#include <torch/extension.h>

#include <cmath>

#include "torchopt_ext/ib_alpha_math.h"

namespace torchopt_ext {

inline void check_ib_alpha_args(const at::Tensor& pre, const at::Tensor& grad_out, const at::Tensor& z_sqnorm,
                                double lr, double weight_decay, int64_t kind, const at::Tensor& knots,
                                const at::Tensor& coefficients) {
  TORCH_CHECK(at::isFloatingType(pre.scalar_type()), "ib_alpha: pre must be a floating-point tensor, got ",
              pre.scalar_type());
  TORCH_CHECK(grad_out.scalar_type() == pre.scalar_type(), "ib_alpha: grad_out must have pre's dtype ",
              pre.scalar_type(), ", got ", grad_out.scalar_type());
  TORCH_CHECK(z_sqnorm.scalar_type() == pre.scalar_type(), "ib_alpha: z_sqnorm must have pre's dtype ",
              pre.scalar_type(), ", got ", z_sqnorm.scalar_type());
  TORCH_CHECK(pre.dim() >= 1, "ib_alpha: pre must have at least one dimension (..., m)");
  TORCH_CHECK(grad_out.sizes() == pre.sizes(), "ib_alpha: grad_out must have pre's shape ", pre.sizes(), ", got ",
              grad_out.sizes());
  TORCH_CHECK(z_sqnorm.sizes() == pre.sizes().slice(0, pre.dim() - 1),
              "ib_alpha: z_sqnorm must have shape pre.shape[:-1] = ", pre.sizes().slice(0, pre.dim() - 1), ", got ",
              z_sqnorm.sizes());
  TORCH_CHECK(grad_out.device() == pre.device() && z_sqnorm.device() == pre.device(),
              "ib_alpha: pre, grad_out and z_sqnorm must be on one device, got ", pre.device(), ", ", grad_out.device(),
              ", ", z_sqnorm.device());
  TORCH_CHECK(std::isfinite(lr) && lr > 0, "ib_alpha: lr must be finite and > 0, got ", lr);
  TORCH_CHECK(std::isfinite(weight_decay) && weight_decay >= 0, "ib_alpha: weight_decay must be finite and >= 0, got ",
              weight_decay);
  TORCH_CHECK(kind >= math::kRelu && kind <= math::kPiecewise, "ib_alpha: unknown activation kind ", kind);
  if (kind == math::kPiecewise) {
    TORCH_CHECK(coefficients.dim() == 2 && coefficients.size(1) == 4 && coefficients.size(0) >= 1,
                "ib_alpha: coefficients must have shape (M, 4), got ", coefficients.sizes());
    TORCH_CHECK(knots.dim() == 1 && knots.size(0) == coefficients.size(0) - 1,
                "ib_alpha: knots must have shape (M-1,) = (", coefficients.size(0) - 1, ",), got ", knots.sizes());
    TORCH_CHECK(knots.scalar_type() == at::kDouble && coefficients.scalar_type() == at::kDouble,
                "ib_alpha: knots and coefficients must be float64");
    TORCH_CHECK(knots.device() == pre.device() && coefficients.device() == pre.device(),
                "ib_alpha: knots and coefficients must be on pre's device ", pre.device());
  }
}

}  // namespace torchopt_ext
