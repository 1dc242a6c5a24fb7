// The ib_alpha row loop compiled for AVX-512 (8 doubles / 16 floats a vector); see ib_alpha_isa.h.
// prefer-vector-width=512: GCC otherwise keeps to 256-bit vectors on AVX-512 targets. Measured on
// an AMD EPYC (Zen 4, 512-bit ops in two halves), 1 thread, 4096 x 1024 float32: hardtanh 3.3 ->
// 2.4 ms, smoothstep 8.8 -> 4.7 ms, arctan 22 -> 13 ms against the AVX2 build.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && __GNUC__ >= 10  // (prefer-vector-width as a target option)
#pragma GCC target("avx512f,avx512vl,avx512dq,avx512bw,fma,prefer-vector-width=512")
#define TOX_HAVE_ISA_TU 1
#endif
#define TOX_ISA avx512
#define TOX_MATH_NS math_avx512
#include "ib_alpha_isa.h"
