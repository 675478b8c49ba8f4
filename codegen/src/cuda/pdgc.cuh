// pdgc's CUDA helpers: the scalar semantics the kernel IR defines, for every generated
// module. Self-contained (no #include), so NVRTC needs no headers to compile a module.

// Max and min propagate NaN (IEEE 754-2019 maximum/minimum, as the IR's Binary::Max and
// Binary::Min): max(NaN, x) is NaN, and max(-0, +0) is +0. CUDA's fmaxf returns the
// non-NaN operand instead, so it is not used.
static __device__ __forceinline__ float pdgc_max(float a, float b) {
    if (a != a || b != b) return a + b;
    if (a == b) return __int_as_float(__float_as_int(a) & __float_as_int(b));
    return a > b ? a : b;
}

static __device__ __forceinline__ float pdgc_min(float a, float b) {
    if (a != a || b != b) return a + b;
    if (a == b) return __int_as_float(__float_as_int(a) | __float_as_int(b));
    return a < b ? a : b;
}

#define PDGC_NAN __int_as_float(0x7fc00000)
#define PDGC_INF __int_as_float(0x7f800000)
