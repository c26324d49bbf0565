// generic instantiation of the fused kernels (see kernel_impl.hpp).
#define PYFK_ISA generic
#define PYFK_ISA_NAME "generic"
#define PYFK_VW 4
#define PYFK_MR 6
#define PYFK_NRV 2
#include "kernel_impl.hpp"
