// Schemas of the five-probe learning-rate ops; kernels in csrc/cpu/probe_cpu.cpp and
// csrc/probe_cuda.cpp. A FRAGMENT, so that csrc/ops.cpp keeps its own TORCH_LIBRARY block.
#include <torch/library.h>

TORCH_LIBRARY_FRAGMENT(torchopt_ext, m) {
  // params[i] <- saved[i] - step * direction[i] for every i; step is a 0-dim tensor (read on the
  // device on CUDA, so moving to a probe point needs no host synchronisation).
  m.def("probe_move_(Tensor(a!)[] params, Tensor[] saved, Tensor[] direction, Tensor step) -> ()");
  // (eta_next, velocity_next), both 0-dim float64 on losses' device, from the five probe losses
  // f(eta + j*eps), j = -2..2 (see probe_math.h).
  m.def(
      "newton_lr(Tensor losses, Tensor eta, Tensor velocity, float eps, float delta, float beta) -> "
      "(Tensor, Tensor)");
  // the next eta, 0-dim float64 on losses' device, by the guarded rule of probe_math.h
  m.def(
      "guarded_lr(Tensor losses, Tensor eta, float eps, float delta, float growth, float fraction, float shrink) -> "
      "Tensor");
}
