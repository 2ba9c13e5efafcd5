// Body of the fused CPU kernel for segment_attention_pool, included once per instruction set by
// segment_attention_pool.cpp inside its own namespace, with AP_VBYTES (the SIMD register width in bytes) and AP_F16C
// defined. Raw pointers only, no PyTorch header. See attnpool/kernels/cpu.py for the contract and the design.
//
// Work split. The N packed rows are cut into P pieces of about equal row counts (P depends on N, M and D only, so the
// results are bitwise reproducible whatever the thread count), and threads take pieces dynamically. A set that lies
// inside one piece is finished by that piece; a set cut by piece boundaries leaves one partial state per piece
// (running max, running sum, running weighted sum in the forward; a partial dq in the backward) that a short serial
// pass merges in row order. So one set of 1M rows beside 10k tiny sets costs what its rows cost, nothing more.
//
// Inner loops. Rows are taken in blocks of 16: the block's logits come first, then one max, at most one rescale and
// one vectorized exp per block, then the block's rows are added into the accumulators with the weights (from L1, the
// accumulators held in registers across the 16 rows). With one or two queries the logits are computed one row at a
// time, so that x streams from memory in address order, which the hardware prefetchers follow. With three or more
// the loop does several multiply-adds per element of x and memory and arithmetic must overlap: the logits are then
// computed on tiles of 3 or 4 rows (each load of x serves four queries and each load of a query three rows), and
// while a block's rows are being added up, the next block is prefetched, so that the tiles read it from the cache
// (tiles reading from memory ran up to 2.4x slower: interleaved row streams defeat the hardware prefetchers; the
// software prefetch alone, one row at a time, did not help). The backward does the same from 8 products per row (its
// 2 M dot products x.g_m and x.q_m), prefetching while it writes dx. See benchmarks/cpu_kernel_notes.md.
//
// Given logits (the scores kernel, s_in): the logits of a block are read from s [N, M] instead of computed, so the
// forward's one pass over x is the accumulation (with three or more softmaxes it still prefetches the next block; a
// prefetch for one or two, and accumulating row by row instead of in register tiles, measured no different from
// noise on a Zen 3 VM); the backward computes only the M products x.g_m and writes ds = a (x.g - c) beside
// dx = sum_m a_m g_m.

constexpr int kVB = AP_VBYTES;
constexpr int64_t kBlockRows = 16;  // also the stride of the per-block [K][kBlockRows] coefficient buffers
static_assert(kBlockRows % (kVB / 4) == 0, "exp_inplace works on whole vectors");
#define AP_INLINE inline __attribute__((always_inline))
// Software prefetch distance (bytes) in the one-row logits loop when it does 3 or more dot products per load of x
// (the backward); there the loop is slow enough for the hardware prefetcher to fall behind (measured: backward -12%
// at M=4; +20% at M=1).
constexpr int kPrefetch = 1024;
// From this many queries on, the forward computes its logits on row tiles and prefetches its next block; with fewer,
// x streamed one row at a time is as fast and the prefetch only costs (cpu_kernel_notes.md, 2026-11-25 afternoon).
constexpr int64_t kTiledFromQueries = 3;
// With fewer queries and rows of at most this many bytes, the forward's one-row logits loop prefetches (into the L2)
// the same bytes of the row one block on. On a Zen 3 VM, 2 threads: float32 D = 64 -8..16% time; D = 128 between
// -9% and +9% over repeated A/B runs (noise), D = 256 up to +10%. cpu_kernel_notes.md, 2026-12-02.
constexpr int64_t kPrefetchNextBlockMaxRowBytes = 256;
// From this many products per row (2 M: x.g_m and x.q_m) on, the backward computes them on row tiles and prefetches
// its next block while it writes dx. Zen 3 VM, A/B through the C entry point: M = 4 0.90-0.95x the time; M = 2
// (4 products) 1.02-1.08x, so not there. cpu_kernel_notes.md, 2026-12-02.
constexpr int64_t kTiledBackwardFrom = 8;

template <class A> struct VecT { typedef A type __attribute__((vector_size(kVB))); };
template <class A> using Vec = typename VecT<A>::type;
template <class A> constexpr int lanes() { return kVB / (int)sizeof(A); }

template <class A> static inline Vec<A> vload(const A* p) { Vec<A> v; __builtin_memcpy(&v, p, sizeof(v)); return v; }
template <class A> static inline void vstore(A* p, Vec<A> v) { __builtin_memcpy(p, &v, sizeof(v)); }
template <class A> static inline A hsum(Vec<A> v) {  // a tree, not a chain of lanes-1 dependent adds
  constexpr int L = lanes<A>();
  A t[L];
  __builtin_memcpy(t, &v, sizeof(v));
  for (int w = L / 2; w >= 1; w /= 2)
    for (int j = 0; j < w; ++j) t[j] += t[j + w];
  return t[0];
}

template <class A> static inline A dot(const A* __restrict a, const A* __restrict b, int64_t n) {
  constexpr int L = lanes<A>();
  Vec<A> s0{}, s1{}, s2{}, s3{};
  int64_t d = 0;
  for (; d + 4 * L <= n; d += 4 * L) {
    s0 += vload(a + d) * vload(b + d);
    s1 += vload(a + d + L) * vload(b + d + L);
    s2 += vload(a + d + 2 * L) * vload(b + d + 2 * L);
    s3 += vload(a + d + 3 * L) * vload(b + d + 3 * L);
  }
  for (; d + L <= n; d += L) s0 += vload(a + d) * vload(b + d);
  A r = hsum<A>((s0 + s1) + (s2 + s3));
  for (; d < n; ++d) r += a[d] * b[d];
  return r;
}

// ---- three small products on a block of rows, register-tiled to keep ~8 independent accumulators ----------------

// out[k*ld + r] = x_r . v_k for r < RT, k < KB: each load of x serves KB queries and each load of a query RT rows
// (RT * KB accumulators: 12 of the 16 vector registers of x86-64).
template <class A, int RT, int KB>
static AP_INLINE void dots_tile(const A* const* x, const A* const* v, int64_t D, A* out, int64_t ld) {
  constexpr int L = lanes<A>();
  Vec<A> acc[RT][KB];
  for (int r = 0; r < RT; ++r)
    for (int k = 0; k < KB; ++k) acc[r][k] = Vec<A>{};
  int64_t d = 0;
  for (; d + L <= D; d += L) {
    Vec<A> xv[RT];
    for (int r = 0; r < RT; ++r) xv[r] = vload(x[r] + d);
    for (int k = 0; k < KB; ++k) {
      const Vec<A> qv = vload(v[k] + d);
      for (int r = 0; r < RT; ++r) acc[r][k] += xv[r] * qv;
    }
  }
  for (int r = 0; r < RT; ++r)
    for (int k = 0; k < KB; ++k) {
      A s = hsum<A>(acc[r][k]);
      for (int64_t e = d; e < D; ++e) s += x[r][e] * v[k][e];
      out[k * ld + r] = s;
    }
}

// out[k*ld] = x . v_k for k < KB, one row, U vectors of D at a time (~8 independent accumulators). With PN, the
// row kBlockRows rows on is prefetched as this one is read (rows assumed contiguous: a prefetch never faults, so a
// wrong guess costs a load slot and nothing else).
template <class A, int KB, int U, bool PN = false>
static AP_INLINE void dots_row(const A* __restrict x, const A* const* v, int64_t D, A* out, int64_t ld) {
  constexpr int L = lanes<A>();
  Vec<A> acc[KB][U];
  for (int k = 0; k < KB; ++k)
    for (int u = 0; u < U; ++u) acc[k][u] = Vec<A>{};
  const char* next = (const char*)(x + kBlockRows * D);
  int64_t d = 0;
  for (; d + U * L <= D; d += U * L) {
    if (KB >= 3) __builtin_prefetch((const char*)(x + d) + kPrefetch);
    if (PN)
      for (int j = 0; j < U * L * (int)sizeof(A); j += 64) __builtin_prefetch(next + d * sizeof(A) + j, 0, 1);
    Vec<A> xv[U];
    for (int u = 0; u < U; ++u) xv[u] = vload(x + d + u * L);
    for (int k = 0; k < KB; ++k)
      for (int u = 0; u < U; ++u) acc[k][u] += xv[u] * vload(v[k] + d + u * L);
  }
  for (; d + L <= D; d += L) {
    const Vec<A> xv = vload(x + d);
    for (int k = 0; k < KB; ++k) acc[k][0] += xv * vload(v[k] + d);
  }
  for (int k = 0; k < KB; ++k) {
    Vec<A> t = acc[k][0];
    for (int u = 1; u < U; ++u) t += acc[k][u];
    A s = hsum<A>(t);
    for (int64_t e = d; e < D; ++e) s += x[e] * v[k][e];
    out[k * ld] = s;
  }
}

// Rows [0, rb) in tiles of RT rows, the rest one at a time.
template <class A, int RT, int KB>
static AP_INLINE void dots_tiles(const A* const* x, int64_t rb, const A* const* v, int64_t D, A* out, int64_t ld) {
  int64_t r = 0;
  for (; r + RT <= rb; r += RT) dots_tile<A, RT, KB>(x + r, v, D, out + r, ld);
  for (; r < rb; ++r) dots_row<A, KB, 2>(x[r], v, D, out + r, ld);
}

// out[k*ld + r] = x_r . v_k for r < rb, k < K, four queries at a time: on row tiles when `tiled` (the rows must then
// be in the cache already: see the header), else one row at a time, prefetching the next block when `prefetch_next`
// (K <= 2 only).
template <class A>
static inline void dots(const A* const* x, int64_t rb, const A* const* v, int64_t K, int64_t D, A* out, int64_t ld,
                        bool tiled, bool prefetch_next = false) {
  if (prefetch_next && K <= 2) {
    for (int64_t r = 0; r < rb; ++r) {
      if (K == 2) dots_row<A, 2, 4, true>(x[r], v, D, out + r, ld);
      else dots_row<A, 1, 4, true>(x[r], v, D, out + r, ld);
    }
    return;
  }
  for (int64_t k = 0; k < K; k += 4) {
    const int64_t kb = std::min<int64_t>(4, K - k);
    A* o = out + k * ld;
    if (tiled && kb == 4) {
      dots_tiles<A, 3, 4>(x, rb, v + k, D, o, ld);
    } else if (tiled && kb == 3) {
      dots_tiles<A, 4, 3>(x, rb, v + k, D, o, ld);
    } else {
      for (int64_t r = 0; r < rb; ++r) {
        switch (kb) {
          case 4: dots_row<A, 4, 2>(x[r], v + k, D, o + r, ld); break;
          case 3: dots_row<A, 3, 2>(x[r], v + k, D, o + r, ld); break;
          case 2: dots_row<A, 2, 4>(x[r], v + k, D, o + r, ld); break;
          default: dots_row<A, 1, 4>(x[r], v + k, D, o + r, ld); break;
        }
      }
    }
  }
}

// A software prefetch spread over a loop: `per` cache lines of [cur, end) at each step, into L2 (hint 1: the block
// being read stays in L1).
struct PrefetchCursor {
  const char* cur = nullptr;
  const char* end = nullptr;
  int64_t per = 0;
  AP_INLINE void step() {
    for (int64_t j = 0; j < per && cur < end; ++j, cur += 64) __builtin_prefetch(cur, 0, 1);
  }
};

// acc_k[0:D] += sum_r w[k*ld + r] x_r for k < KB (acc_k = acc + k*D); with PF, pc prefetches as it goes.
template <class A, int KB, int U, bool PF = false>
static AP_INLINE void accum_tile(A* acc, const A* const* x, int64_t rb, const A* w, int64_t ld, int64_t D,
                                PrefetchCursor* pc = nullptr) {
  constexpr int L = lanes<A>();
  int64_t d = 0;
  for (; d + U * L <= D; d += U * L) {
    Vec<A> a[KB][U];
    for (int k = 0; k < KB; ++k)
      for (int u = 0; u < U; ++u) a[k][u] = vload(acc + k * D + d + u * L);
    for (int64_t r = 0; r < rb; ++r) {
      if (PF) pc->step();
      Vec<A> xv[U];
      for (int u = 0; u < U; ++u) xv[u] = vload(x[r] + d + u * L);
      for (int k = 0; k < KB; ++k) {
        const A c = w[k * ld + r];
        for (int u = 0; u < U; ++u) a[k][u] += c * xv[u];
      }
    }
    for (int k = 0; k < KB; ++k)
      for (int u = 0; u < U; ++u) vstore(acc + k * D + d + u * L, a[k][u]);
  }
  for (; d + L <= D; d += L) {
    Vec<A> a[KB];
    for (int k = 0; k < KB; ++k) a[k] = vload(acc + k * D + d);
    for (int64_t r = 0; r < rb; ++r) {
      const Vec<A> xv = vload(x[r] + d);
      for (int k = 0; k < KB; ++k) a[k] += w[k * ld + r] * xv;
    }
    for (int k = 0; k < KB; ++k) vstore(acc + k * D + d, a[k]);
  }
  for (; d < D; ++d)
    for (int k = 0; k < KB; ++k) {
      A a = acc[k * D + d];
      for (int64_t r = 0; r < rb; ++r) a += w[k * ld + r] * x[r][d];
      acc[k * D + d] = a;
    }
}

template <class A>
static inline void accum(A* acc, const A* const* x, int64_t rb, const A* w, int64_t ld, int64_t K, int64_t D,
                         PrefetchCursor* pc = nullptr) {
  int64_t k = 0;
  if (pc && K >= 3) {  // the first four (or three) queries carry the prefetch
    if (K >= 4)
      accum_tile<A, 4, 2, true>(acc, x, rb, w, ld, D, pc);
    else
      accum_tile<A, 3, 2, true>(acc, x, rb, w, ld, D, pc);
    k = std::min<int64_t>(4, K);
  }
  for (; k < K; k += 4) {
    switch (std::min<int64_t>(4, K - k)) {
      case 4: accum_tile<A, 4, 2>(acc + k * D, x, rb, w + k * ld, ld, D); break;
      case 3: accum_tile<A, 3, 2>(acc + k * D, x, rb, w + k * ld, ld, D); break;
      case 2: accum_tile<A, 2, 4>(acc + k * D, x, rb, w + k * ld, ld, D); break;
      default: accum_tile<A, 1, 4>(acc + k * D, x, rb, w + k * ld, ld, D); break;
    }
  }
}

// dst[0:D] = sum_k c[k*ld] v_k.
template <class A>
static inline void combine(A* __restrict dst, const A* const* v, const A* c, int64_t ld, int64_t K, int64_t D) {
  constexpr int L = lanes<A>();
  constexpr int U = 4;
  int64_t d = 0;
  for (; d + U * L <= D; d += U * L) {
    Vec<A> a[U];
    for (int u = 0; u < U; ++u) a[u] = Vec<A>{};
    for (int64_t k = 0; k < K; ++k)
      for (int u = 0; u < U; ++u) a[u] += c[k * ld] * vload(v[k] + d + u * L);
    for (int u = 0; u < U; ++u) vstore(dst + d + u * L, a[u]);
  }
  for (; d < D; ++d) {
    A a = 0;
    for (int64_t k = 0; k < K; ++k) a += c[k * ld] * v[k][d];
    dst[d] = a;
  }
}

// v[i] = exp(v[i]) for i < n, n a multiple of the SIMD width (kBlockRows is). float: a vectorized Cephes-style
// polynomial (relative error below 1e-7 over [-87, 88], 0 below; exactly 0 at -inf, NaN stays NaN); double: libm.
constexpr float kExpLo = -87.3365447505531f, kExpHi = 88.3762626647949f;

// exp(xc) for xc in [kExpLo, kExpHi] (NaN gives NaN): the range reduction and the polynomial.
static inline Vec<float> vexp_core(Vec<float> xc) {
  typedef int32_t vi __attribute__((vector_size(kVB)));
  const Vec<float> magic = Vec<float>{} + 12582912.0f;  // 1.5 * 2^23: adding it rounds to an integer
  const Vec<float> fx = (xc * 1.44269504088896341f + magic) - magic;
  Vec<float> r = xc - fx * 0.693359375f;
  r = r - fx * -2.12194440e-4f;
  Vec<float> y = Vec<float>{} + 1.9875691500e-4f;
  y = y * r + 1.3981999507e-3f;
  y = y * r + 8.3334519073e-3f;
  y = y * r + 4.1665795894e-2f;
  y = y * r + 1.6666665459e-1f;
  y = y * r + 5.0000001201e-1f;
  y = y * (r * r) + r + 1.0f;
  const vi bits = (__builtin_convertvector(fx, vi) + 127) << 23;
  Vec<float> p2;
  __builtin_memcpy(&p2, &bits, sizeof(p2));
  return y * p2;
}

static inline Vec<float> vexp(Vec<float> x) {
  const Vec<float> hi = Vec<float>{} + kExpHi, lo = Vec<float>{} + kExpLo;
  Vec<float> xc = x > hi ? hi : x;
  xc = xc < lo ? lo : xc;
  Vec<float> y = vexp_core(xc);
  y = x < lo ? Vec<float>{} : y;
  y = x > hi ? Vec<float>{} + INFINITY : y;
  return x != x ? x : y;
}

static inline void exp_inplace(float* v, int64_t n) {
  for (int64_t i = 0; i < n; i += lanes<float>()) vstore(v + i, vexp(vload(v + i)));
}
static inline void exp_inplace(double* v, int64_t n) {
  for (int64_t i = 0; i < n; ++i) v[i] = std::exp(v[i]);
}

// ---- element types: x (and dx) may be float16 / bfloat16, widened to float a row at a time ------------------------

enum Kind { kSame = 0, kF16 = 1, kBF16 = 2 };  // x's element type: the compute type A, or a half type (A = float)

static inline float bf16_to_f32(uint16_t h) {
  const uint32_t u = (uint32_t)h << 16;
  float f;
  __builtin_memcpy(&f, &u, 4);
  return f;
}
static inline uint16_t f32_to_bf16(float f) {  // round to nearest even, NaN stays NaN
  uint32_t u;
  __builtin_memcpy(&u, &f, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40u);
  u += 0x7fffu + ((u >> 16) & 1u);
  return (uint16_t)(u >> 16);
}
// IEEE half <-> float without F16C (after Marat Dukhan's FP16 library, as PyTorch's c10 does).
static inline float fp32_from_bits(uint32_t u) { float f; __builtin_memcpy(&f, &u, 4); return f; }
static inline uint32_t fp32_to_bits(float f) { uint32_t u; __builtin_memcpy(&u, &f, 4); return u; }
static inline float f16_to_f32_soft(uint16_t h) {
  const uint32_t w = (uint32_t)h << 16;
  const uint32_t sign = w & 0x80000000u;
  const uint32_t two_w = w + w;
  const float normalized = fp32_from_bits((two_w >> 4) + (0xE0u << 23)) * 0x1.0p-112f;
  const float denormalized = fp32_from_bits((two_w >> 17) | (126u << 23)) - 0.5f;
  const uint32_t result = sign | (two_w < (1u << 27) ? fp32_to_bits(denormalized) : fp32_to_bits(normalized));
  return fp32_from_bits(result);
}
static inline uint16_t f32_to_f16_soft(float f) {
  float base = (__builtin_fabsf(f) * 0x1.0p+112f) * 0x1.0p-110f;
  const uint32_t w = fp32_to_bits(f);
  const uint32_t shl1_w = w + w;
  const uint32_t sign = w & 0x80000000u;
  uint32_t bias = shl1_w & 0xFF000000u;
  if (bias < 0x71000000u) bias = 0x71000000u;
  base = fp32_from_bits((bias >> 1) + 0x07800000u) + base;
  const uint32_t bits = fp32_to_bits(base);
  const uint32_t nonsign = ((bits >> 13) & 0x00007C00u) + (bits & 0x00000FFFu);
  return (uint16_t)((sign >> 16) | (shl1_w > 0xFF000000u ? 0x7E00u : nonsign));
}

static void widen(int kind, const void* src, float* dst, int64_t n) {
  const uint16_t* p = static_cast<const uint16_t*>(src);
  int64_t i = 0;
  if (kind == kBF16) {
    for (; i < n; ++i) dst[i] = bf16_to_f32(p[i]);
    return;
  }
#if AP_F16C
  for (; i + 8 <= n; i += 8) _mm256_storeu_ps(dst + i, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)(p + i))));
#endif
  for (; i < n; ++i) dst[i] = f16_to_f32_soft(p[i]);
}
static void widen(int, const void*, double*, int64_t) {}

static void narrow(int kind, const float* src, void* dst, int64_t n) {
  uint16_t* p = static_cast<uint16_t*>(dst);
  int64_t i = 0;
  if (kind == kBF16) {
    for (; i < n; ++i) p[i] = f32_to_bf16(src[i]);
    return;
  }
#if AP_F16C
  for (; i + 8 <= n; i += 8)
    _mm_storeu_si128((__m128i*)(p + i), _mm256_cvtps_ph(_mm256_loadu_ps(src + i), _MM_FROUND_TO_NEAREST_INT));
#endif
  for (; i < n; ++i) p[i] = f32_to_f16_soft(src[i]);
}
static void narrow(int, const double*, void*, int64_t) {}

static inline int64_t elem_size(int kind, int64_t a_size) { return kind == kSame ? a_size : 2; }

// ---- the work split ----------------------------------------------------------------------------------------------

struct Split {
  const int64_t* off;
  int64_t B, N, P;
  int64_t r0(int64_t p) const { return (int64_t)((__int128)N * p / P); }
};

struct PieceSets {
  int64_t bs, be;        // sets starting in [r0, r1) (plus trailing empty sets for the last piece)
  int64_t lead = -1;     // set started before r0 and reaching into this piece: rows [r0, lead_end)
  int64_t lead_end = 0;
  int64_t trail = -1;    // set starting in this piece and reaching past r1: rows [off[trail], r1)
};

static inline PieceSets piece_sets(const Split& s, int64_t p) {
  const int64_t r0 = s.r0(p), r1 = s.r0(p + 1);
  PieceSets ps;
  ps.bs = std::lower_bound(s.off, s.off + s.B, r0) - s.off;
  ps.be = (p == s.P - 1) ? s.B : std::lower_bound(s.off, s.off + s.B, r1) - s.off;
  if (ps.bs > 0 && s.off[ps.bs] > r0) {
    ps.lead = ps.bs - 1;
    ps.lead_end = std::min(s.off[ps.bs], r1);
  }
  if (ps.be > ps.bs && s.off[ps.be] > r1) {
    ps.trail = ps.be - 1;
    ps.be -= 1;
  }
  return ps;
}

// Runs fn(p) for p in [0, P) on up to nthreads threads, pieces taken dynamically; returns false if any fn failed.
template <class F> static bool for_pieces(int64_t P, int nthreads, F fn) {
  bool ok = true;
  if (P <= 1 || nthreads <= 1) {
    for (int64_t p = 0; p < P; ++p) ok = fn(p) && ok;
    return ok;
  }
  std::atomic<int64_t> next(0);
  std::atomic<bool> all_ok(true);
  const int nt = (int)std::min<int64_t>(nthreads, P);
#pragma omp parallel num_threads(nt)
  {
    for (int64_t p = next.fetch_add(1); p < P; p = next.fetch_add(1))
      if (!fn(p)) all_ok.store(false);
  }
  return all_ok.load();
}

template <class A> struct Scratch {  // per-piece buffers, freed on scope exit
  A* p = nullptr;
  explicit Scratch(size_t n) : p(n ? (A*)std::calloc(n, sizeof(A)) : nullptr) {}  // zeroed: no stale garbage
  ~Scratch() { std::free(p); }
  Scratch(const Scratch&) = delete;
  Scratch& operator=(const Scratch&) = delete;
};

// ---- forward -----------------------------------------------------------------------------------------------------

// Per-piece scratch for one block of rows: row pointers, logits / weights, widened rows for half types.
template <class A> struct Block {
  const A* rowp[kBlockRows];
  A* logits;  // [K][kBlockRows]
  A* wide;    // kBlockRows * D, half types only

  static int64_t size(int kind, int64_t K, int64_t D) { return kBlockRows * K + (kind == kSame ? 0 : kBlockRows * D); }
  void bind(A* p, int64_t K) { logits = p; wide = p + kBlockRows * K; }

  // Point rowp at rows [i0, i0 + rb) of x (row stride ldx elements), widening them first for half types.
  void load(int kind, const void* x, int64_t ldx, int64_t i0, int64_t rb, int64_t D) {
    const char* base = static_cast<const char*>(x);
    const int64_t es = elem_size(kind, sizeof(A));
    for (int64_t r = 0; r < rb; ++r) {
      const void* src = base + (i0 + r) * ldx * es;
      if (kind == kSame) {
        rowp[r] = static_cast<const A*>(src);
      } else {
        widen(kind, src, wide + r * D, D);
        rowp[r] = wide + r * D;
      }
    }
  }
};

template <class A> struct Fwd {
  int kind; const void* x; int64_t ldx, N, D;
  const A* q; int64_t G, M; A scale;
  const A* s_in = nullptr;  // given logits [N, M] (the scores kernel; q is then unused), else x.q

  // Fold rows [rs, re) of set b into the online-softmax state mx[M], sm[M], acc[M*D]. qp: M row pointers.
  void rows(int64_t b, int64_t rs, int64_t re, A* mx, A* sm, A* acc, Block<A>& blk, const A** qp) const {
    if (!s_in) {
      const A* qb = q + (G == 1 ? 0 : b) * M * D;
      for (int64_t m = 0; m < M; ++m) qp[m] = qb + m * D;
    }
    A* lg = blk.logits;
    const bool tiled = M >= kTiledFromQueries;
    const int64_t es = elem_size(kind, sizeof(A));
    // half types: the loop reads the widened copy, not x
    const bool prefetch_next = !tiled && kind == kSame && D * es <= kPrefetchNextBlockMaxRowBytes;
    const char* xb = static_cast<const char*>(x);
    for (int64_t i0 = rs; i0 < re; i0 += kBlockRows) {
      const int64_t rb = std::min(kBlockRows, re - i0);
      blk.load(kind, x, ldx, i0, rb, D);
      if (s_in) {
        for (int64_t r = 0; r < rb; ++r)
          for (int64_t m = 0; m < M; ++m) lg[m * kBlockRows + r] = s_in[(i0 + r) * M + m];
      } else {
        dots(blk.rowp, rb, qp, M, D, lg, kBlockRows, tiled, prefetch_next);
      }
      for (int64_t m = 0; m < M; ++m) {
        A* l = lg + m * kBlockRows;
        A bmax = -INFINITY;
        for (int64_t r = 0; r < rb; ++r) {
          l[r] *= scale;
          bmax = std::max(bmax, l[r]);
        }
        if (bmax > mx[m]) {
          if (mx[m] != -INFINITY) {  // a new running max: rescale what was summed so far
            const A c = std::exp(mx[m] - bmax);
            sm[m] *= c;
            A* am = acc + m * D;
            for (int64_t d = 0; d < D; ++d) am[d] *= c;
          }
          mx[m] = bmax;
        }
        // As the reference: a max that is not finite shifts by 0 (so all -inf logits give weights exactly 0).
        const A shift = std::isfinite(mx[m]) ? mx[m] : A(0);
        for (int64_t r = 0; r < kBlockRows; ++r) l[r] -= shift;
      }
      exp_inplace(lg, M * kBlockRows);
      for (int64_t m = 0; m < M; ++m) {
        A* l = lg + m * kBlockRows;
        for (int64_t r = rb; r < kBlockRows; ++r) l[r] = 0;  // rows past the block's end weigh nothing
        Vec<A> v = vload(l);
        for (int64_t r = lanes<A>(); r < kBlockRows; r += lanes<A>()) v += vload(l + r);
        sm[m] += hsum<A>(v);
      }
      PrefetchCursor pc;  // the next block of x (whichever set it belongs to), spread over the accumulation
      if (tiled) {
        pc.cur = xb + std::min(i0 + kBlockRows, N) * ldx * es;
        pc.end = xb + std::min(i0 + 2 * kBlockRows, N) * ldx * es;
        const int64_t steps = std::max<int64_t>(1, rb * (D / (2 * lanes<A>())));  // accum_tile<A, 4 or 3, 2>'s
        pc.per = ((pc.end - pc.cur) / 64 + steps - 1) / steps;
      }
      accum(acc, blk.rowp, rb, lg, kBlockRows, M, D, tiled ? &pc : nullptr);
    }
  }
};

// Fold one partial online-softmax state (pmx, psm [K], pacc [K][W]) into (mx, sm, acc): K softmaxes, each with a
// W-wide weighted sum (the attention kernel: K = M queries, W = D; the per-channel kernel: K = D channels, W = 1).
// Each state is relative to the shift of its max (0 when not finite, as in the row loops); an empty state (max -inf,
// no NaN) weighs exactly 0, even when exp(0 - shift) would overflow.
template <class A>
static inline void merge_state(int64_t K, int64_t W, A* mx, A* sm, A* acc, const A* pmx, const A* psm,
                               const A* pacc) {
  for (int64_t m = 0; m < K; ++m) {
    const A nm = std::max(mx[m], pmx[m]);
    const A sh = std::isfinite(nm) ? nm : A(0);
    auto factor = [&](A v, A s) -> A {
      if (v == -INFINITY && s == s) return 0;
      return std::exp((std::isfinite(v) ? v : A(0)) - sh);
    };
    const A ca = factor(mx[m], sm[m]);
    const A cb = factor(pmx[m], psm[m]);
    sm[m] = sm[m] * ca + psm[m] * cb;
    for (int64_t d = 0; d < W; ++d) acc[m * W + d] = acc[m * W + d] * ca + pacc[m * W + d] * cb;
    mx[m] = nm;
  }
}

// For each set cut across pieces, in row order (slot order is row order): begin(b), then fold(b, j) for each of
// its slots j, then end(b). slot_set [2P]: the set of each piece's lead and trail slot, or -1.
template <class Begin, class Fold, class End>
static void for_cut_sets(int64_t P, const int64_t* slot_set, Begin begin, Fold fold, End end) {
  int64_t k = 0;
  while (k < 2 * P) {
    const int64_t b = slot_set[k];
    if (b < 0) { ++k; continue; }
    int64_t e = k + 1;
    while (e < 2 * P && (slot_set[e] == b || slot_set[e] < 0)) ++e;
    begin(b);
    for (int64_t j = k; j < e; ++j)
      if (slot_set[j] == b) fold(b, j);
    end(b);
    k = e;
  }
}

template <class A> static inline void init_state(int64_t M, int64_t D, A* mx, A* sm, A* acc) {
  for (int64_t m = 0; m < M; ++m) { mx[m] = -INFINITY; sm[m] = 0; }
  std::memset(acc, 0, M * D * sizeof(A));
}

// out[m] = acc[m] / sm[m], lse[m] = shift(mx[m]) + log(sm[m]); an empty (or all -inf) group gives 0 and -inf.
template <class A>
static inline void finalize(int64_t M, int64_t D, const A* mx, const A* sm, const A* acc, A* out, A* lse) {
  for (int64_t m = 0; m < M; ++m) {
    if (sm[m] > 0 || sm[m] != sm[m]) {
      const A inv = A(1) / sm[m];
      for (int64_t d = 0; d < D; ++d) out[m * D + d] = acc[m * D + d] * inv;
      lse[m] = (std::isfinite(mx[m]) ? mx[m] : A(0)) + std::log(sm[m]);
    } else {
      for (int64_t d = 0; d < D; ++d) out[m * D + d] = 0;
      lse[m] = -INFINITY;
    }
  }
}

template <class A>
static int forward(int kind, const void* x, int64_t ldx, int64_t N, int64_t D, const int64_t* off, int64_t B,
                   const A* q, int64_t G, int64_t M, A scale, A* out, A* lse, int64_t P, int nthreads,
                   const A* s_in = nullptr) {
  const Split sp{off, B, N, P};
  const Fwd<A> f{kind, x, ldx, N, D, q, G, M, scale, s_in};
  const int64_t st = M * (D + 2);  // one partial state: acc[M*D], mx[M], sm[M]
  Scratch<A> slots((size_t)(2 * P * st));
  Scratch<int64_t> slot_set((size_t)(2 * P));
  if (!slots.p || !slot_set.p) return 2;
  const int64_t bsz = Block<A>::size(kind, M, D);

  const bool ok = for_pieces(P, nthreads, [&](int64_t p) -> bool {
    Scratch<A> s((size_t)(bsz + 2 * M));
    Scratch<const A*> qp((size_t)M);
    if (!s.p || !qp.p) return false;
    Block<A> blk;
    blk.bind(s.p, M);
    A* own = s.p + bsz;  // mx, sm of a whole set; its acc is out[b] itself
    const int64_t r1 = sp.r0(p + 1);
    const PieceSets ps = piece_sets(sp, p);
    slot_set.p[2 * p] = ps.lead;
    slot_set.p[2 * p + 1] = ps.trail;
    auto partial = [&](int64_t slot, int64_t b, int64_t rs, int64_t re) {
      A* acc = slots.p + slot * st;
      A* mx = acc + M * D;
      A* sm = mx + M;
      init_state(M, D, mx, sm, acc);
      f.rows(b, rs, re, mx, sm, acc, blk, qp.p);
    };
    if (ps.lead >= 0) partial(2 * p, ps.lead, sp.r0(p), ps.lead_end);
    for (int64_t b = ps.bs; b < ps.be; ++b) {
      A* acc = out + b * M * D;
      init_state(M, D, own, own + M, acc);
      f.rows(b, off[b], off[b + 1], own, own + M, acc, blk, qp.p);
      finalize(M, D, own, own + M, acc, acc, lse + b * M);
    }
    if (ps.trail >= 0) partial(2 * p + 1, ps.trail, off[ps.trail], r1);
    return true;
  });
  if (!ok) return 2;

  // Merge the partial states of cut sets, in row order (slot order is row order).
  Scratch<A> tot((size_t)(2 * M));
  if (!tot.p) return 2;
  A* mx = tot.p;
  A* sm = tot.p + M;
  for_cut_sets(P, slot_set.p,
               [&](int64_t b) { init_state(M, D, mx, sm, out + b * M * D); },
               [&](int64_t b, int64_t j) {
                 const A* pacc = slots.p + j * st;
                 merge_state(M, D, mx, sm, out + b * M * D, pacc + M * D, pacc + M * D + M, pacc);
               },
               [&](int64_t b) { finalize(M, D, mx, sm, out + b * M * D, out + b * M * D, lse + b * M); });
  return 0;
}

// ---- backward ----------------------------------------------------------------------------------------------------
// With a_i = exp(scale x_i.q - lse), c = g.out - glse and ds_i = a_i (g.x_i - c):
//   dx_i = sum_m a_im g_m + scale ds_im q_m,      dq_m = scale sum_i ds_im x_i.

template <class A> struct Bwd {
  int kind; const void* x; int64_t ldx, N, D;
  const A* q; int64_t G, M; A scale;
  const A* gout; void* dx;  // dx: [N, D] contiguous, in x's element type
  // The scores kernel: given logits s_in [N, M] instead of x.q (q unused, no dq); ds_out [N, M], if not null,
  // receives their gradient a (x.g - c), and dx has no q term.
  const A* s_in = nullptr;
  A* ds_out = nullptr;

  // Rows [rs, re) of set b. lse_b, c: [M]; dq_acc (M*D) accumulates scale ds x when not null. vp: 2M row pointers;
  // cf: 4 * kBlockRows * M coefficients; dxbuf: D (half types only).
  void rows(int64_t b, int64_t rs, int64_t re, const A* lse_b, const A* c, A* dq_acc, Block<A>& blk, const A** vp,
            A* cf, A* dxbuf) const {
    const A* gb = gout + b * M * D;
    const int64_t K = s_in ? M : 2 * M;  // the products per row, and the vectors dx combines
    for (int64_t m = 0; m < M; ++m) {  // [g_0 .. g_M-1, q_0 .. q_M-1]: dots give x.g, x.q; combine gives dx
      vp[m] = gb + m * D;
      if (!s_in) vp[M + m] = q + (G == 1 ? 0 : b) * M * D + m * D;
    }
    A* t = blk.logits;                // [2M][kBlockRows]: x.g then x.q
    A* dsq = cf;                      // [M][kBlockRows]: scale * ds
    A* ea = cf + kBlockRows * M;      // [M][kBlockRows]: a
    A* cx = cf + 2 * kBlockRows * M;  // [2M][kBlockRows]: a then scale * ds, the coefficients of dx
    constexpr int64_t ld = kBlockRows;
    // As the forward with several queries: the products on row tiles, the next block prefetched while dx is written
    const bool tiled = K >= kTiledBackwardFrom;
    const int64_t es = elem_size(kind, sizeof(A));
    const char* xb = static_cast<const char*>(x);
    for (int64_t i0 = rs; i0 < re; i0 += kBlockRows) {
      const int64_t rb = std::min(kBlockRows, re - i0);
      blk.load(kind, x, ldx, i0, rb, D);
      dots(blk.rowp, rb, vp, K, D, t, ld, tiled);
      PrefetchCursor pc;
      if (tiled) {
        pc.cur = xb + std::min(i0 + kBlockRows, N) * ldx * es;
        pc.end = xb + std::min(i0 + 2 * kBlockRows, N) * ldx * es;
        pc.per = ((pc.end - pc.cur) / 64 + rb - 1) / rb;
      }
      for (int64_t m = 0; m < M; ++m) {
        const A l = lse_b[m];
        if (s_in) {  // rows past the block's end weigh nothing
          for (int64_t r = 0; r < ld; ++r)
            ea[m * ld + r] = (l == -INFINITY || r >= rb) ? A(-INFINITY) : s_in[(i0 + r) * M + m] - l;
        } else {
          for (int64_t r = 0; r < ld; ++r)
            ea[m * ld + r] = l == -INFINITY ? A(-INFINITY) : scale * t[(M + m) * ld + r] - l;
        }
      }
      exp_inplace(ea, M * ld);
      for (int64_t m = 0; m < M; ++m)
        for (int64_t r = 0; r < ld; ++r) {
          const A a = ea[m * ld + r];
          const A ds = scale * a * (t[m * ld + r] - c[m]);
          dsq[m * ld + r] = ds;
          cx[m * ld + r] = a;
          cx[(M + m) * ld + r] = ds;
        }
      if (ds_out)
        for (int64_t r = 0; r < rb; ++r)
          for (int64_t m = 0; m < M; ++m) ds_out[(i0 + r) * M + m] = dsq[m * ld + r];
      if (dx) {
        for (int64_t r = 0; r < rb; ++r) {
          pc.step();
          if (kind == kSame) {
            combine(static_cast<A*>(dx) + (i0 + r) * D, vp, cx + r, ld, K, D);
          } else {
            combine(dxbuf, vp, cx + r, ld, K, D);
            narrow(kind, dxbuf, static_cast<uint16_t*>(dx) + (i0 + r) * D, D);
          }
        }
      }
      if (!dx) {  // no dx to spread it over: the whole next block now
        pc.per = (pc.end - pc.cur) / 64 + 1;
        pc.step();
      }
      if (dq_acc) accum(dq_acc, blk.rowp, rb, dsq, ld, M, D);
    }
  }
};

template <class A>
static int backward(int kind, const void* x, int64_t ldx, int64_t N, int64_t D, const int64_t* off, int64_t B,
                    const A* q, int64_t G, int64_t M, A scale, const A* out, const A* lse, const A* gout,
                    const A* glse, void* dx, A* dq, int64_t P, int nthreads, const A* s_in = nullptr,
                    A* ds_out = nullptr) {
  const Split sp{off, B, N, P};
  const Bwd<A> f{kind, x, ldx, N, D, q, G, M, scale, gout, dx, s_in, ds_out};
  const int64_t MD = M * D;
  // dq partials: with a shared query every piece sums into its own [M, D] (reduced in piece order below); with
  // per-set queries a whole set writes dq[b] directly and only cut sets use a slot.
  const bool shared = (G == 1);
  const int64_t nslots = dq ? (shared ? P : 2 * P) : 0;
  Scratch<A> slots((size_t)(nslots * MD));
  Scratch<int64_t> slot_set((size_t)(2 * P));
  if ((nslots && !slots.p) || !slot_set.p) return 2;
  if (nslots) std::memset(slots.p, 0, nslots * MD * sizeof(A));
  const int64_t bsz = Block<A>::size(kind, 2 * M, D);
  const int64_t scratch_n = bsz + 4 * kBlockRows * M + M + (kind == kSame ? 0 : D);

  const bool ok = for_pieces(P, nthreads, [&](int64_t p) -> bool {
    Scratch<A> s((size_t)scratch_n);
    Scratch<const A*> vp((size_t)(2 * M));
    if (!s.p || !vp.p) return false;
    Block<A> blk;
    blk.bind(s.p, 2 * M);
    A* cf = s.p + bsz;
    A* c = cf + 4 * kBlockRows * M;
    A* dxbuf = c + M;
    const int64_t r1 = sp.r0(p + 1);
    const PieceSets ps = piece_sets(sp, p);
    slot_set.p[2 * p] = ps.lead;
    slot_set.p[2 * p + 1] = ps.trail;
    auto run = [&](int64_t b, int64_t rs, int64_t re, A* dq_acc) {
      const A* gb = gout + b * MD;
      const A* ob = out + b * MD;
      for (int64_t m = 0; m < M; ++m) c[m] = dot(gb + m * D, ob + m * D, D) - (glse ? glse[b * M + m] : A(0));
      f.rows(b, rs, re, lse + b * M, c, dq_acc, blk, vp.p, cf, dxbuf);
    };
    A* piece_dq = (dq && shared) ? slots.p + p * MD : nullptr;
    if (ps.lead >= 0) run(ps.lead, sp.r0(p), ps.lead_end, dq ? (shared ? piece_dq : slots.p + 2 * p * MD) : nullptr);
    for (int64_t b = ps.bs; b < ps.be; ++b) {
      if (off[b] == off[b + 1]) continue;
      run(b, off[b], off[b + 1], dq ? (shared ? piece_dq : dq + b * MD) : nullptr);
    }
    if (ps.trail >= 0)
      run(ps.trail, off[ps.trail], r1, dq ? (shared ? piece_dq : slots.p + (2 * p + 1) * MD) : nullptr);
    return true;
  });
  if (!ok) return 2;
  if (dq) {
    if (shared) {
      for (int64_t p = 0; p < P; ++p)
        for (int64_t j = 0; j < MD; ++j) dq[j] += slots.p[p * MD + j];
    } else {
      for (int64_t k = 0; k < 2 * P; ++k) {
        const int64_t b = slot_set.p[k];
        if (b < 0) continue;
        for (int64_t j = 0; j < MD; ++j) dq[b * MD + j] += slots.p[k * MD + j];
      }
    }
  }
  return 0;
}

// ---- entry points for one instruction set (declared in segment_attention_pool.cpp) ---------------------------------
// dtype: 0 float32, 1 float64, 2 float16, 3 bfloat16.

int forward_any(int dtype, const void* x, int64_t ldx, int64_t N, int64_t D, const int64_t* off, int64_t B,
                       const void* q, int64_t G, int64_t M, double scale, void* out, void* lse, int64_t P,
                       int nthreads) {
  if (dtype == 1)
    return forward(kSame, x, ldx, N, D, off, B, (const double*)q, G, M, scale, (double*)out, (double*)lse, P,
                   nthreads);
  if (dtype < 0 || dtype > 3) return 3;
  const int kind = dtype == 0 ? kSame : dtype == 2 ? kF16 : kBF16;
  return forward(kind, x, ldx, N, D, off, B, (const float*)q, G, M, (float)scale, (float*)out, (float*)lse, P,
                 nthreads);
}

int backward_any(int dtype, const void* x, int64_t ldx, int64_t N, int64_t D, const int64_t* off, int64_t B,
                        const void* q, int64_t G, int64_t M, double scale, const void* out, const void* lse,
                        const void* gout, const void* glse, void* dx, void* dq, int64_t P, int nthreads) {
  if (dtype == 1)
    return backward(kSame, x, ldx, N, D, off, B, (const double*)q, G, M, scale, (const double*)out,
                    (const double*)lse, (const double*)gout, (const double*)glse, dx, (double*)dq, P, nthreads);
  if (dtype < 0 || dtype > 3) return 3;
  const int kind = dtype == 0 ? kSame : dtype == 2 ? kF16 : kBF16;
  return backward(kind, x, ldx, N, D, off, B, (const float*)q, G, M, (float)scale, (const float*)out,
                  (const float*)lse, (const float*)gout, (const float*)glse, dx, (float*)dq, P, nthreads);
}

// The scores kernel: the same online softmax and weighted sum, with the logits given (s [N, M], compute type)
// instead of computed as x.q; ds (may be null) receives the logits' gradient, dx (may be null) the rows'.
int scores_forward_any(int dtype, const void* x, int64_t ldx, int64_t N, int64_t D, const int64_t* off, int64_t B,
                       const void* s, int64_t M, void* out, void* lse, int64_t P, int nthreads) {
  if (dtype == 1)
    return forward(kSame, x, ldx, N, D, off, B, (const double*)nullptr, 1, M, 1.0, (double*)out, (double*)lse, P,
                   nthreads, (const double*)s);
  if (dtype < 0 || dtype > 3) return 3;
  const int kind = dtype == 0 ? kSame : dtype == 2 ? kF16 : kBF16;
  return forward(kind, x, ldx, N, D, off, B, (const float*)nullptr, 1, M, 1.0f, (float*)out, (float*)lse, P,
                 nthreads, (const float*)s);
}

int scores_backward_any(int dtype, const void* x, int64_t ldx, int64_t N, int64_t D, const int64_t* off, int64_t B,
                        const void* s, int64_t M, const void* out, const void* lse, const void* gout,
                        const void* glse, void* dx, void* ds, int64_t P, int nthreads) {
  if (dtype == 1)
    return backward(kSame, x, ldx, N, D, off, B, (const double*)nullptr, 1, M, 1.0, (const double*)out,
                    (const double*)lse, (const double*)gout, (const double*)glse, dx, (double*)nullptr, P, nthreads,
                    (const double*)s, (double*)ds);
  if (dtype < 0 || dtype > 3) return 3;
  const int kind = dtype == 0 ? kSame : dtype == 2 ? kF16 : kBF16;
  return backward(kind, x, ldx, N, D, off, B, (const float*)nullptr, 1, M, 1.0f, (const float*)out,
                  (const float*)lse, (const float*)gout, (const float*)glse, dx, (float*)nullptr, P, nthreads,
                  (const float*)s, (float*)ds);
}
