// Operator schemas of torchopt_ext (TORCH_LIBRARY) and the Python module torchopt_ext._C.
// Kernels register themselves per device in csrc/cpu/*.cpp and csrc/*_cuda.cpp; ib_alpha's
// Autograd kernel is here.
#include <torch/extension.h>

#include "torchopt_ext/flop_counter.h"
#include "torchopt_ext/ib_alpha_fast32.h"
#include "torchopt_ext/ib_alpha_kinds.h"
#include "torchopt_ext/ib_alpha_math.h"
#include "torchopt_ext/probe_check.h"
#include "torchopt_ext/probe_math.h"

namespace torchopt_ext {
namespace cpu {
std::string set_isa(const std::string& isa);
std::string current_isa();
std::vector<std::string> available_isas();
bool set_fast32(bool on);
int64_t fast32_redone(bool reset);
int64_t fast32_second(bool reset);
std::vector<std::string> fast32_activations();
}  // namespace cpu
void set_hyper_resolver(py::object resolver);
void probe_move_host(const std::vector<at::Tensor>& params, const std::vector<at::Tensor>& saved,
                     const std::vector<at::Tensor>& direction, double step);
at::Tensor implicit_linear(const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
                           int64_t kind, int64_t layer_id);

// name -> number of every activation kind, in the order of their numbers
py::dict activation_kinds() {
  py::dict kinds;
  for (const KindName& k : kKindNames) kinds[k.name] = k.kind;
  return kinds;
}

// Flops of one alpha solve, counted by running the solver on FlopCounter over inputs that take
// every branch; returns the largest count seen.
int64_t ib_alpha_flops(int64_t kind, const at::Tensor& knots, const at::Tensor& coefficients) {
  using math::FlopCounter;
  auto k = knots.to(at::kDouble).contiguous();
  auto co = coefficients.to(at::kDouble).contiguous();
  math::RuntimePieces<FlopCounter> rp{co.numel() / 4, k.data_ptr<double>(), co.data_ptr<double>()};
  const double qs[] = {-3.0, -0.7, -1e-3, 0.0, 0.4, 0.9, 1.0, 2.5, 40.0};
  const double bs[] = {-2.0, -0.3, 0.0, 0.3, 2.0};
  const double etas[] = {1e-6, 0.1, 1.0, 30.0};
  int64_t worst = 0;
  for (double q : qs)
    for (double b : bs)
      for (double eta : etas) {
        FlopCounter::count() = 0;
        FlopCounter Q(q), Bv(b), Z(3.0), E(eta), Mu(0.01);
        switch (kind) {
          case math::kRelu: math::alpha_dispatch<math::kRelu>(Q, Bv, Z, E, Mu, rp); break;
          case math::kArctan: math::alpha_dispatch<math::kArctan>(Q, Bv, Z, E, Mu, rp); break;
          case math::kHardtanh: math::alpha_dispatch<math::kHardtanh>(Q, Bv, Z, E, Mu, rp); break;
          case math::kSmoothstep: math::alpha_dispatch<math::kSmoothstep>(Q, Bv, Z, E, Mu, rp); break;
          case math::kIdentity: math::alpha_dispatch<math::kIdentity>(Q, Bv, Z, E, Mu, rp); break;
          case math::kPiecewise: math::alpha_dispatch<math::kPiecewise>(Q, Bv, Z, E, Mu, rp); break;
          default: TORCH_CHECK(false, "ib_alpha_flops: unknown activation kind ", kind);
        }
        worst = std::max(worst, FlopCounter::count());
      }
  return worst;
}

// The same count for the float32 fast path of hardtanh, smoothstep or arctan (ib_alpha_fast32.h;
// its first pass, which takes the common case), certificate included; -1 for a kind without one.
// Branch-free, so one input suffices.
int64_t ib_alpha_flops_float32(int64_t kind) {
  using math::FlopCounter;
  // d = 1, tau = 0.3: {d_hi, d_lo, inv_d, tau, inv_tau, inv_ez, tau3, ok}
  const math::Fast32Row<FlopCounter> row{1.0, 0.0, 1.0, 0.3, 1.0 / 0.3, 1.0 / 0.3, 0.9, true};
  FlopCounter::count() = 0;
  const FlopCounter q(0.4), b(0.7);
  switch (kind) {
    case math::kHardtanh: math::alpha_fast32<math::kHardtanh>(q, b, row); break;
    case math::kSmoothstep: math::alpha_fast32<math::kSmoothstep>(q, b, row); break;
    case math::kArctan: math::alpha_fast32<math::kArctan>(q, b, row); break;
    default: return -1;
  }
  return FlopCounter::count();
}

// ib_alpha's Autograd kernel: the op below autograd, so that its output does not require grad.
// alpha is not differentiable (a solver output used inside the layers' custom backward); with no
// Autograd kernel the output would claim to require grad and backward would leave every .grad None.
at::Tensor ib_alpha_autograd(const at::Tensor& pre, const at::Tensor& grad_out, const at::Tensor& z_sqnorm, double lr,
                             double weight_decay, int64_t kind, const at::Tensor& knots,
                             const at::Tensor& coefficients) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("torchopt_ext::ib_alpha", "")
                       .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, double, double,
                                         int64_t, const at::Tensor&, const at::Tensor&)>();
  const at::AutoDispatchBelowADInplaceOrView below_autograd;
  return op.call(pre, grad_out, z_sqnorm, lr, weight_decay, kind, knots, coefficients);
}

}  // namespace torchopt_ext

// The two learning-rate rules on host numbers, for a CPU step that keeps eta as a Python float: the
// same math as the guarded_lr and newton_lr ops without a tensor in or out, because each small tensor
// op is costly right after a training step has emptied the caches.
namespace torchopt_ext {

double guarded_lr_host(const std::vector<double>& f, double eta, double eps, double delta, double growth,
                       double fraction, double shrink) {
  TORCH_CHECK(f.size() == 5, "guarded_lr: losses must hold the 5 probe losses, got ", f.size());
  check_guarded_lr_constants(growth, fraction, shrink);
  return math::guarded_lr_update(f.data(), eta, eps, delta, growth, fraction, shrink);
}

std::tuple<double, double> newton_lr_host(const std::vector<double>& f, double eta, double velocity, double eps,
                                          double delta, double beta) {
  TORCH_CHECK(f.size() == 5, "newton_lr: losses must hold the 5 probe losses, got ", f.size());
  double eta_next = 0.0, v_next = 0.0;
  math::newton_lr_update(f.data(), eta, velocity, eps, delta, beta, &eta_next, &v_next);
  return {eta_next, v_next};
}

}  // namespace torchopt_ext

TORCH_LIBRARY(torchopt_ext, m) {
  // alpha of the implicit-backprop step for every (sample, neuron); see ib_alpha_math.h.
  // kind: torchopt_ext::math::Kind (by name: _C.activation_kinds()); knots/coefficients: float64
  // tables for kind == kPiecewise (ignored, and may be empty, for the built-in kinds).
  m.def(
      "ib_alpha(Tensor pre, Tensor grad_out, Tensor z_sqnorm, float lr, float weight_decay, int kind, "
      "Tensor knots, Tensor coefficients) -> Tensor");
  // input, weight and bias gradients of an implicit linear layer (csrc/implicit_linear.cpp); an
  // unneeded one comes back empty
  m.def(
      "implicit_linear_backward(Tensor x, Tensor weight, Tensor? bias, Tensor q, Tensor grad_y, float eta, "
      "float mu, bool maximize, int kind, bool need_x, bool need_w, bool need_b) -> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(torchopt_ext, Autograd, m) { m.impl("ib_alpha", &torchopt_ext::ib_alpha_autograd); }

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "torchopt_ext compiled kernels; the operators live in torch.ops.torchopt_ext";
  m.def("ib_alpha_flops", &torchopt_ext::ib_alpha_flops, "flops of one alpha solve, counted");
  m.def("ib_alpha_flops_float32", &torchopt_ext::ib_alpha_flops_float32,
        "flops of one solve on the float32 fast path (-1: the kind has none), counted");
  m.def("activation_kinds", &torchopt_ext::activation_kinds,
        "{name: number} of the activation kinds the ib_alpha op takes");
  m.def("set_cpu_isa", &torchopt_ext::cpu::set_isa,
        "the best row loop this CPU has ('auto': AVX-512, else AVX2+FMA, else baseline) or at most "
        "'avx2' or 'baseline' ('default'); overrides TORCHOPT_EXT_CPU_CAPABILITY; returns the one in use");
  m.def("cpu_isa", &torchopt_ext::cpu::current_isa, "the instruction set of the row loop in use");
  m.def("cpu_isas", &torchopt_ext::cpu::available_isas,
        "the instruction sets this CPU and build can run the row loop in, lowest first");
  m.def("set_cpu_fast_float32", &torchopt_ext::cpu::set_fast32, pybind11::arg("enabled"),
        "float32 hardtanh/smoothstep/arctan solved in float32 with a certificate (True, default) or "
        "in double (False); returns the previous setting");
  m.def("cpu_fast_float32_redone", &torchopt_ext::cpu::fast32_redone, pybind11::arg("reset") = false,
        "how many elements the float32 fast paths were not certain of and solved in double");
  m.def("cpu_fast_float32_second_pass", &torchopt_ext::cpu::fast32_second, pybind11::arg("reset") = false,
        "how many elements the first float32 pass (smoothstep's and arctan's common cases) left to "
        "the second (their general forms)");
  m.def("cpu_fast_float32_activations", &torchopt_ext::cpu::fast32_activations,
        "the activations whose float32 input takes a fast path on this CPU now");
  m.def("implicit_linear", &torchopt_ext::implicit_linear,
        "sigma(x W^T + b) with a C++ autograd node whose "
        "backward is implicit_linear_backward, eta/mu/maximize from the registered resolver");
  m.def("set_hyper_resolver", &torchopt_ext::set_hyper_resolver,
        "callable(layer_id) -> (eta, mu, maximize), called by implicit_linear's backward");
  m.def("probe_move_host", &torchopt_ext::probe_move_host,
        "the probe_move_ op on the CPU with a float step: every params[i] <- saved[i] - step * direction[i]");
  m.def("guarded_lr_host", &torchopt_ext::guarded_lr_host,
        "the guarded_lr op on Python floats: (five losses, eta, eps, delta, growth, fraction, shrink) -> eta");
  m.def("newton_lr_host", &torchopt_ext::newton_lr_host,
        "the newton_lr op on Python floats: (five losses, eta, velocity, eps, delta, beta) -> (eta, velocity)");
#ifdef TORCHOPT_EXT_WITH_CUDA
  m.attr("WITH_CUDA") = true;
#else
  m.attr("WITH_CUDA") = false;
#endif
}
