// Names the vector ISA that this CPU kernel library was compiled for. setup.py builds csrc/*/*_cpu.cpp once per ISA
// (kdkernels/_cpu_<isa>*.so, ATen's CPU_CAPABILITY macros and -m flags); kdkernels/_extension.py loads one and
// reads this name back, so build_info() reports what runs rather than what was asked for.
#include <c10/macros/Export.h>

// ATen's macros pick at::vec's implementation, the -m flags what the compiler may emit: they must agree.
#if defined(CPU_CAPABILITY_AVX512)
#if !defined(__AVX512F__) || !defined(__AVX512BW__) || !defined(__AVX512VL__) || !defined(__AVX512DQ__) || \
    !defined(__FMA__)
#error "CPU_CAPABILITY_AVX512 needs -mavx512f -mavx512bw -mavx512vl -mavx512dq -mfma"
#endif
#elif defined(CPU_CAPABILITY_AVX2)
#if !defined(__AVX2__) || !defined(__FMA__)
#error "CPU_CAPABILITY_AVX2 needs -mavx2 -mfma"
#endif
#elif !defined(CPU_CAPABILITY_DEFAULT)
#error "compile the CPU kernels with CPU_CAPABILITY=<ISA> and CPU_CAPABILITY_<ISA>, ISA one of DEFAULT, AVX2, AVX512"
#endif

#define KDKERNELS_STRINGIFY_VALUE(x) #x
#define KDKERNELS_STRINGIFY(x) KDKERNELS_STRINGIFY_VALUE(x)

extern "C" C10_EXPORT const char* kdkernels_cpu_capability() { return KDKERNELS_STRINGIFY(CPU_CAPABILITY); }
