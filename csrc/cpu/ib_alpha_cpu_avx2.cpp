// The ib_alpha row loop compiled for AVX2+FMA (4 doubles / 8 floats a vector); see ib_alpha_isa.h.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#pragma GCC target("avx2,fma")
#define TOX_HAVE_ISA_TU 1
#endif
#define TOX_ISA avx2
#define TOX_MATH_NS math_avx2
#include "ib_alpha_isa.h"
