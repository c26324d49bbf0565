// avx512 instantiation of the fused kernels (see kernel_impl.hpp).
#define PYFK_ISA avx512
#define PYFK_ISA_NAME "avx512"
#define PYFK_VW 16
#define PYFK_MR 8
#define PYFK_NRV 3
#include "kernel_impl.hpp"
