// avx512 instantiation of the fused kernels (see kernel_impl.hpp).
#define PYFK_ISA avx512
#define PYFK_ISA_NAME "avx512"
#if defined(__x86_64__) || defined(__i386__)  // elsewhere: portable code, never selected
#define PYFK_TARGET "avx512f,avx512vl,avx512bw,avx512dq,avx2,fma,f16c"
#define PYFK_F16C 1  // fp16 rows converted with vcvtph2ps (cpu_has requires f16c)
#endif
#define PYFK_VW 16
#define PYFK_MR 8
#define PYFK_NRV 3
#include "kernel_impl.hpp"
