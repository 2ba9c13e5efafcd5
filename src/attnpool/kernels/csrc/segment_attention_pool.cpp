// Fused CPU kernel for attnpool.kernels.cpu.segment_attention_pool (forward and backward).
//
// Plain C++ with a C ABI, loaded with ctypes: it includes no PyTorch header, so a fresh machine compiles it in a few
// seconds instead of the minute that torch/extension.h costs, and it does not depend on PyTorch's C++ ABI. The
// caller (cpu.py) validates shapes and dtypes and passes raw pointers. Threads come from OpenMP: the library links
// libgomp.so.1, which resolves to the copy PyTorch has already loaded, so it shares PyTorch's thread pool.
//
// The hot loops are compiled twice, for baseline x86-64 (SSE2) and for AVX2+FMA+F16C, and the second is chosen at
// run time when the CPU has it; so the cached library is safe to share between machines (no -march=native).
// AP_PART selects what one compilation holds, so that cpu.py can compile the two halves in parallel and link them:
// 0 the baseline and the C entry points, 1 the AVX2 half; undefined, both (one translation unit).

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define AP_X86 1
#else
#define AP_X86 0
#endif

#if !defined(AP_PART) || AP_PART == 0
#define AP_VBYTES 16
#define AP_F16C 0
namespace ap_base {
#include "segment_attention_pool_impl.h"
#include "channel_softmax_pool_impl.h"
}  // namespace ap_base
#undef AP_VBYTES
#undef AP_F16C
#endif

#if AP_X86 && (!defined(AP_PART) || AP_PART == 1)
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")
#define AP_VBYTES 32
#define AP_F16C 1
namespace ap_avx2 {
#include "segment_attention_pool_impl.h"
#include "channel_softmax_pool_impl.h"
}  // namespace ap_avx2
#undef AP_VBYTES
#undef AP_F16C
#pragma GCC pop_options
#endif

#if !defined(AP_PART) || AP_PART == 0
#if AP_X86
namespace ap_avx2 {
int forward_any(int dtype, const void* x, int64_t ldx, int64_t N, int64_t D, const int64_t* off, int64_t B,
                const void* q, int64_t G, int64_t M, double scale, void* out, void* lse, int64_t P, int nthreads);
int backward_any(int dtype, const void* x, int64_t ldx, int64_t N, int64_t D, const int64_t* off, int64_t B,
                 const void* q, int64_t G, int64_t M, double scale, const void* out, const void* lse,
                 const void* gout, const void* glse, void* dx, void* dq, int64_t P, int nthreads);
int chan_forward_any(int dtype, const void* x, int64_t ldx, int64_t N, int64_t D, const int64_t* off, int64_t B,
                     const void* t, void* out, void* lse, int64_t P, int nthreads);
int chan_backward_any(int dtype, const void* x, int64_t ldx, int64_t N, int64_t D, const int64_t* off, int64_t B,
                      const void* t, const void* out, const void* lse, const void* gout, void* dx, void* dt,
                      int64_t P, int nthreads);
int scores_forward_any(int dtype, const void* x, int64_t ldx, int64_t N, int64_t D, const int64_t* off, int64_t B,
                       const void* s, int64_t M, void* out, void* lse, int64_t P, int nthreads);
int scores_backward_any(int dtype, const void* x, int64_t ldx, int64_t N, int64_t D, const int64_t* off, int64_t B,
                        const void* s, int64_t M, const void* out, const void* lse, const void* gout,
                        const void* glse, void* dx, void* ds, int64_t P, int nthreads);
}  // namespace ap_avx2
#endif

namespace {

int detect_isa() {
#if AP_X86
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c")) return 1;
#endif
  return 0;
}

std::atomic<int> isa_override(-1);  // set by ap_force_isa (tests of the baseline path on an AVX2 machine)

int isa() {
  static const int v = detect_isa();
  const int o = isa_override.load(std::memory_order_relaxed);
  return o >= 0 && o <= v ? o : v;
}

bool offsets_ok(const int64_t* off, int64_t B, int64_t N) {
  if (off[0] != 0 || off[B] != N) return false;
  for (int64_t b = 0; b < B; ++b)
    if (off[b + 1] < off[b]) return false;
  return true;
}

// Pieces of about 1024 rows or more, at most 256 of them, and at most ~2M elements of partial state.
int64_t num_pieces(int64_t N, int64_t M, int64_t D) {
  int64_t p = std::min<int64_t>(256, N / 1024);
  p = std::min<int64_t>(p, (int64_t(1) << 21) / std::max<int64_t>(1, M * (D + 2)));
  return std::max<int64_t>(1, p);
}

}  // namespace

extern "C" {

__attribute__((visibility("default"))) int ap_abi_version() { return 3; }

// 0: baseline (SSE2 on x86-64), 1: AVX2 + FMA + F16C.
__attribute__((visibility("default"))) int ap_isa() { return isa(); }

// Run the given instruction set's loops (when the CPU has it) instead of the best one; -1 restores the default.
__attribute__((visibility("default"))) void ap_force_isa(int v) { isa_override.store(v); }

// dtype: 0 float32, 1 float64, 2 float16, 3 bfloat16 (x, and dx in the backward; x rows ldx elements apart, dx
// contiguous). q, out, lse, gout, glse, dq are float64 for float64 input and float32 otherwise; glse, dx and dq may
// be null. Returns 0, or 1 for bad offsets, 2 for an allocation failure, 3 for an unknown dtype.
__attribute__((visibility("default"))) int ap_forward(int dtype, const void* x, int64_t ldx, int64_t N, int64_t D,
                                                      const int64_t* off, int64_t B, const void* q, int64_t G,
                                                      int64_t M, double scale, void* out, void* lse, int nthreads) {
  if (!offsets_ok(off, B, N)) return 1;
  const int64_t P = num_pieces(N, M, D);
#if AP_X86
  if (isa() == 1) return ap_avx2::forward_any(dtype, x, ldx, N, D, off, B, q, G, M, scale, out, lse, P, nthreads);
#endif
  return ap_base::forward_any(dtype, x, ldx, N, D, off, B, q, G, M, scale, out, lse, P, nthreads);
}

__attribute__((visibility("default"))) int ap_backward(int dtype, const void* x, int64_t ldx, int64_t N, int64_t D,
                                                       const int64_t* off, int64_t B, const void* q, int64_t G,
                                                       int64_t M, double scale, const void* out, const void* lse,
                                                       const void* gout, const void* glse, void* dx, void* dq,
                                                       int nthreads) {
  if (!offsets_ok(off, B, N)) return 1;
  const int64_t P = num_pieces(N, M, D);
#if AP_X86
  if (isa() == 1)
    return ap_avx2::backward_any(dtype, x, ldx, N, D, off, B, q, G, M, scale, out, lse, gout, glse, dx, dq, P,
                                 nthreads);
#endif
  return ap_base::backward_any(dtype, x, ldx, N, D, off, B, q, G, M, scale, out, lse, gout, glse, dx, dq, P,
                               nthreads);
}

// Per-channel softmax pooling (channel_softmax_pool_impl.h): t, out, lse, gout, dt in the compute type as above;
// t has D entries; dx and dt may be null (not both).
__attribute__((visibility("default"))) int ap_channel_forward(int dtype, const void* x, int64_t ldx, int64_t N,
                                                              int64_t D, const int64_t* off, int64_t B,
                                                              const void* t, void* out, void* lse, int nthreads) {
  if (!offsets_ok(off, B, N)) return 1;
  const int64_t P = num_pieces(N, 1, D);
#if AP_X86
  if (isa() == 1) return ap_avx2::chan_forward_any(dtype, x, ldx, N, D, off, B, t, out, lse, P, nthreads);
#endif
  return ap_base::chan_forward_any(dtype, x, ldx, N, D, off, B, t, out, lse, P, nthreads);
}

__attribute__((visibility("default"))) int ap_channel_backward(int dtype, const void* x, int64_t ldx, int64_t N,
                                                               int64_t D, const int64_t* off, int64_t B,
                                                               const void* t, const void* out, const void* lse,
                                                               const void* gout, void* dx, void* dt, int nthreads) {
  if (!offsets_ok(off, B, N)) return 1;
  const int64_t P = num_pieces(N, 1, D);
#if AP_X86
  if (isa() == 1)
    return ap_avx2::chan_backward_any(dtype, x, ldx, N, D, off, B, t, out, lse, gout, dx, dt, P, nthreads);
#endif
  return ap_base::chan_backward_any(dtype, x, ldx, N, D, off, B, t, out, lse, gout, dx, dt, P, nthreads);
}

// Softmax pooling with given logits s [N, M] (compute type, contiguous): out [B, M, D], lse [B, M] as ap_forward
// with x.q replaced by s; the backward writes dx (may be null) and ds [N, M] (may be null), with gout, glse as in
// ap_backward.
__attribute__((visibility("default"))) int ap_scores_forward(int dtype, const void* x, int64_t ldx, int64_t N,
                                                             int64_t D, const int64_t* off, int64_t B, const void* s,
                                                             int64_t M, void* out, void* lse, int nthreads) {
  if (!offsets_ok(off, B, N)) return 1;
  const int64_t P = num_pieces(N, M, D);
#if AP_X86
  if (isa() == 1) return ap_avx2::scores_forward_any(dtype, x, ldx, N, D, off, B, s, M, out, lse, P, nthreads);
#endif
  return ap_base::scores_forward_any(dtype, x, ldx, N, D, off, B, s, M, out, lse, P, nthreads);
}

__attribute__((visibility("default"))) int ap_scores_backward(int dtype, const void* x, int64_t ldx, int64_t N,
                                                              int64_t D, const int64_t* off, int64_t B,
                                                              const void* s, int64_t M, const void* out,
                                                              const void* lse, const void* gout, const void* glse,
                                                              void* dx, void* ds, int nthreads) {
  if (!offsets_ok(off, B, N)) return 1;
  const int64_t P = num_pieces(N, M, D);
#if AP_X86
  if (isa() == 1)
    return ap_avx2::scores_backward_any(dtype, x, ldx, N, D, off, B, s, M, out, lse, gout, glse, dx, ds, P,
                                        nthreads);
#endif
  return ap_base::scores_backward_any(dtype, x, ldx, N, D, off, B, s, M, out, lse, gout, glse, dx, ds, P,
                                      nthreads);
}

}  // extern "C"
#endif
