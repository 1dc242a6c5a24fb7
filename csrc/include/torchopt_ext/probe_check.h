// Argument checks of the probe ops shared by the CPU and CUDA registrations.
#pragma once
#include <torch/extension.h>

namespace torchopt_ext {

inline void check_probe_move_lists(const at::TensorList& params, const at::TensorList& saved,
                                   const at::TensorList& direction) {
  TORCH_CHECK(saved.size() == params.size() && direction.size() == params.size(),
              "probe_move_: params, saved and direction must have one length, got ", params.size(), ", ", saved.size(),
              ", ", direction.size());
  for (size_t i = 0; i < params.size(); ++i) {
    TORCH_CHECK(saved[i].sizes() == params[i].sizes() && direction[i].sizes() == params[i].sizes(),
                "probe_move_: saved[", i, "] and direction[", i, "] must have params[", i, "]'s shape ",
                params[i].sizes());
    TORCH_CHECK(
        saved[i].scalar_type() == params[i].scalar_type() && direction[i].scalar_type() == params[i].scalar_type(),
        "probe_move_: saved[", i, "] and direction[", i, "] must have params[", i, "]'s dtype ",
        params[i].scalar_type());
    TORCH_CHECK(saved[i].device() == params[i].device() && direction[i].device() == params[i].device(),
                "probe_move_: saved[", i, "] and direction[", i, "] must be on params[", i, "]'s device ",
                params[i].device());
  }
}

inline void check_probe_move_args(const at::TensorList& params, const at::TensorList& saved,
                                  const at::TensorList& direction, const at::Tensor& step) {
  TORCH_CHECK(step.numel() == 1, "probe_move_: step must be a 0-dim tensor, got shape ", step.sizes());
  check_probe_move_lists(params, saved, direction);
}

inline void check_newton_lr_args(const at::Tensor& losses, const at::Tensor& eta, const at::Tensor& velocity) {
  TORCH_CHECK(losses.numel() == 5, "newton_lr: losses must hold the 5 probe losses, got ", losses.numel());
  TORCH_CHECK(eta.numel() == 1, "newton_lr: eta must be a 0-dim tensor, got shape ", eta.sizes());
  TORCH_CHECK(velocity.numel() == 1, "newton_lr: velocity must be a 0-dim tensor, got shape ", velocity.sizes());
  TORCH_CHECK(eta.device() == losses.device() && velocity.device() == losses.device(),
              "newton_lr: losses, eta and velocity must be on one device, got ", losses.device(), ", ", eta.device(),
              ", ", velocity.device());
}

inline void check_guarded_lr_constants(double growth, double fraction, double shrink) {
  TORCH_CHECK(growth > 1.0 && std::isfinite(growth), "guarded_lr: growth must be finite and > 1, got ", growth);
  TORCH_CHECK(fraction > 0.0 && fraction <= 1.0, "guarded_lr: fraction must be in (0, 1], got ", fraction);
  TORCH_CHECK(shrink > 1.0 && std::isfinite(shrink), "guarded_lr: shrink must be finite and > 1, got ", shrink);
}

inline void check_guarded_lr_args(const at::Tensor& losses, const at::Tensor& eta, double growth, double fraction,
                                  double shrink) {
  TORCH_CHECK(losses.numel() == 5, "guarded_lr: losses must hold the 5 probe losses, got ", losses.numel());
  TORCH_CHECK(eta.numel() == 1, "guarded_lr: eta must be a 0-dim tensor, got shape ", eta.sizes());
  TORCH_CHECK(eta.device() == losses.device(), "guarded_lr: losses and eta must be on one device, got ",
              losses.device(), ", ", eta.device());
  check_guarded_lr_constants(growth, fraction, shrink);
}

}  // namespace torchopt_ext
