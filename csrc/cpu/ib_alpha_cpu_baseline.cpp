// The ib_alpha row loops compiled for the compiler's default target (on x86-64, SSE2), which every
// CPU of the architecture runs; see ib_alpha_rows.h. Compiled with the flags of every other file,
// so its solvers may share the default namespace `math` with them.
#define TOX_CPU_CAPABILITY baseline
#include "ib_alpha_rows.h"

namespace torchopt_ext {
namespace cpu {
namespace baseline {
const AlphaRowKernels* row_kernels() {
  static constexpr AlphaRowKernels kernels = make_row_kernels();
  return &kernels;
}
}  // namespace baseline
}  // namespace cpu
}  // namespace torchopt_ext
