// Per-channel softmax pooling (PyG's SoftmaxAggregation), included by segment_attention_pool.cpp after
// segment_attention_pool_impl.h, inside the same per-instruction-set namespace; it reuses that file's vectors, exp,
// half-type widening and work split. See attnpool/kernels/cpu.py (segment_channel_softmax_pool) for the contract:
//
//   out[b, c] = sum_{i in set b} a_ic x_ic,  a_ic = softmax_i(t_c x_ic),  lse[b, c] = log sum_i exp(t_c x_ic)
//
// Forward: one pass over x, an online softmax per channel, a block of 16 rows at a time (one max and one rescale
// per block and channel, then exp and accumulate from L1). Backward, with g = dL/dout:
//
//   dx_ic = g_bc a_ic (1 + t_c (x_ic - out_bc)),    dt_c = sum_b g_bc sum_i a_ic x_ic (x_ic - out_bc)
//
// in one more pass (a_ic recomputed from lse). dt is summed per piece, then over the pieces in order, so the result
// does not depend on the thread count.

// vexp for arguments <= 0 (every exponent here is t x - max): without vexp's upper clamp and its +inf and NaN
// selects; NaN still propagates through the polynomial, -inf and anything below -87.3 still give exactly 0. The
// arguments can only be positive when a set's max is not finite, and such a set's result is NaN either way.
static inline Vec<float> vexp_nonpos(Vec<float> x) {
  const Vec<float> lo = Vec<float>{} + kExpLo;
  return x < lo ? Vec<float>{} : vexp_core(x < lo ? lo : x);
}

// Channels [d0, D) of one block, one at a time (the double type, and the float loop's tail).
template <class A>
static inline void chan_block_scalar(const A* const* rowp, int64_t rb, const A* t, int64_t d0, int64_t D, A* mx,
                                     A* sm, A* acc) {
  for (int64_t d = d0; d < D; ++d) {
    A bm = -INFINITY;
    for (int64_t r = 0; r < rb; ++r) bm = std::max(bm, t[d] * rowp[r][d]);
    const A nm = std::max(mx[d], bm);
    const A shift = std::isfinite(nm) ? nm : A(0);
    const A c = mx[d] == -INFINITY ? A(0) : std::exp((std::isfinite(mx[d]) ? mx[d] : A(0)) - shift);
    A s = sm[d] * c, a = acc[d] * c;
    for (int64_t r = 0; r < rb; ++r) {
      const A e = std::exp(t[d] * rowp[r][d] - shift);
      s += e;
      a += e * rowp[r][d];
    }
    mx[d] = nm;
    sm[d] = s;
    acc[d] = a;
  }
}

// Fold one block of rows (rowp[0..rb)) into the per-channel state mx, sm, acc [D].
static inline void chan_block(const float* const* rowp, int64_t rb, const float* t, int64_t D, float* mx, float* sm,
                              float* acc) {
  constexpr int L = lanes<float>();
  const Vec<float> zero{}, ninf = Vec<float>{} - INFINITY;
  int64_t d = 0;
  for (; d + L <= D; d += L) {
    const Vec<float> tv = vload(t + d);
    const Vec<float> m = vload(mx + d);
    Vec<float> bm = ninf;
    for (int64_t r = 0; r < rb; ++r) {
      const Vec<float> s = tv * vload(rowp[r] + d);
      bm = s > bm ? s : bm;
    }
    const Vec<float> nm = bm > m ? bm : m;
    // as the attention kernel: a max that is not finite shifts by 0; an empty state (max -inf) weighs 0
    const Vec<float> shift = (nm - nm) == zero ? nm : zero;
    const Vec<float> old_shift = (m - m) == zero ? m : zero;
    Vec<float> c = vexp(old_shift - shift);
    c = m == ninf ? zero : c;
    Vec<float> s = vload(sm + d) * c, a = vload(acc + d) * c;
    for (int64_t r = 0; r < rb; ++r) {
      const Vec<float> xv = vload(rowp[r] + d);
      const Vec<float> e = vexp_nonpos(tv * xv - shift);
      s += e;
      a += e * xv;
    }
    vstore(mx + d, nm);
    vstore(sm + d, s);
    vstore(acc + d, a);
  }
  chan_block_scalar(rowp, rb, t, d, D, mx, sm, acc);
}

static inline void chan_block(const double* const* rowp, int64_t rb, const double* t, int64_t D, double* mx,
                              double* sm, double* acc) {
  chan_block_scalar(rowp, rb, t, 0, D, mx, sm, acc);
}

// Channels [d0, D) of chan_block_backward, one at a time.
template <class A>
static inline void chan_block_backward_scalar(const A* const* rowp, int64_t rb, const A* t, int64_t d0, int64_t D,
                                              const A* g, const A* out, const A* lse, A* dxrows, A* dt) {
  for (int64_t d = d0; d < D; ++d)
    for (int64_t r = 0; r < rb; ++r) {
      const A x = rowp[r][d];
      const A ga = g[d] * std::exp(t[d] * x - lse[d]);
      dxrows[r * D + d] = ga + ga * t[d] * (x - out[d]);
      dt[d] += ga * x * (x - out[d]);
    }
}

// dx rows and the dt partial of one block: rowp[r] is row i0 + r of set b.
static inline void chan_block_backward(const float* const* rowp, int64_t rb, const float* t, int64_t D,
                                       const float* g, const float* out, const float* lse, float* dxrows,
                                       float* dt) {
  constexpr int L = lanes<float>();
  int64_t d = 0;
  for (; d + L <= D; d += L) {
    const Vec<float> tv = vload(t + d), gv = vload(g + d), ov = vload(out + d), lv = vload(lse + d);
    Vec<float> dtv = vload(dt + d);
    for (int64_t r = 0; r < rb; ++r) {
      const Vec<float> xv = vload(rowp[r] + d);
      const Vec<float> ga = gv * vexp_nonpos(tv * xv - lv);
      const Vec<float> dev = xv - ov;
      vstore(dxrows + r * D + d, ga + ga * tv * dev);
      dtv += ga * xv * dev;
    }
    vstore(dt + d, dtv);
  }
  chan_block_backward_scalar(rowp, rb, t, d, D, g, out, lse, dxrows, dt);
}

static inline void chan_block_backward(const double* const* rowp, int64_t rb, const double* t, int64_t D,
                                       const double* g, const double* out, const double* lse, double* dxrows,
                                       double* dt) {
  chan_block_backward_scalar(rowp, rb, t, 0, D, g, out, lse, dxrows, dt);
}

template <class A>
static void chan_rows(int kind, const void* x, int64_t ldx, int64_t rs, int64_t re, int64_t D, const A* t, A* mx,
                      A* sm, A* acc, Block<A>& blk) {
  for (int64_t i0 = rs; i0 < re; i0 += kBlockRows) {
    const int64_t rb = std::min(kBlockRows, re - i0);
    blk.load(kind, x, ldx, i0, rb, D);
    chan_block(blk.rowp, rb, t, D, mx, sm, acc);
  }
}

template <class A> static inline void chan_init(int64_t D, A* mx, A* sm, A* acc) {
  for (int64_t d = 0; d < D; ++d) { mx[d] = -INFINITY; sm[d] = 0; acc[d] = 0; }
}

// out = acc / sm and lse = shift + log(sm) per channel; an empty set gives 0 and -inf.
template <class A> static inline void chan_finalize(int64_t D, const A* mx, const A* sm, const A* acc, A* out, A* lse) {
  for (int64_t d = 0; d < D; ++d) {
    if (sm[d] > 0 || sm[d] != sm[d]) {
      out[d] = acc[d] / sm[d];
      lse[d] = (std::isfinite(mx[d]) ? mx[d] : A(0)) + std::log(sm[d]);
    } else {
      out[d] = 0;
      lse[d] = -INFINITY;
    }
  }
}

template <class A>
static int chan_forward(int kind, const void* x, int64_t ldx, int64_t N, int64_t D, const int64_t* off, int64_t B,
                        const A* t, A* out, A* lse, int64_t P, int nthreads) {
  const Split sp{off, B, N, P};
  const int64_t st = 3 * D;  // one partial state: acc[D], mx[D], sm[D]
  Scratch<A> slots((size_t)(2 * P * st));
  Scratch<int64_t> slot_set((size_t)(2 * P));
  if (!slots.p || !slot_set.p) return 2;
  const int64_t bsz = Block<A>::size(kind, 0, D);

  const bool ok = for_pieces(P, nthreads, [&](int64_t p) -> bool {
    Scratch<A> s((size_t)(bsz + 2 * D));
    if (!s.p) return false;
    Block<A> blk;
    blk.bind(s.p, 0);
    A* own = s.p + bsz;  // mx, sm of a whole set; its acc is out[b] itself
    const int64_t r1 = sp.r0(p + 1);
    const PieceSets ps = piece_sets(sp, p);
    slot_set.p[2 * p] = ps.lead;
    slot_set.p[2 * p + 1] = ps.trail;
    auto partial = [&](int64_t slot, int64_t rs, int64_t re) {
      A* acc = slots.p + slot * st;
      chan_init(D, acc + D, acc + 2 * D, acc);
      chan_rows(kind, x, ldx, rs, re, D, t, acc + D, acc + 2 * D, acc, blk);
    };
    if (ps.lead >= 0) partial(2 * p, sp.r0(p), ps.lead_end);
    for (int64_t b = ps.bs; b < ps.be; ++b) {
      A* acc = out + b * D;
      chan_init(D, own, own + D, acc);
      chan_rows(kind, x, ldx, off[b], off[b + 1], D, t, own, own + D, acc, blk);
      chan_finalize(D, own, own + D, acc, acc, lse + b * D);
    }
    if (ps.trail >= 0) partial(2 * p + 1, off[ps.trail], r1);
    return true;
  });
  if (!ok) return 2;

  // Merge the partial states of cut sets, in row order (slot order is row order).
  Scratch<A> tot((size_t)(2 * D));
  if (!tot.p) return 2;
  A* mx = tot.p;
  A* sm = tot.p + D;
  for_cut_sets(P, slot_set.p,
               [&](int64_t b) { chan_init(D, mx, sm, out + b * D); },
               [&](int64_t b, int64_t j) {
                 const A* pacc = slots.p + j * st;
                 merge_state(D, 1, mx, sm, out + b * D, pacc + D, pacc + 2 * D, pacc);
               },
               [&](int64_t b) { chan_finalize(D, mx, sm, out + b * D, out + b * D, lse + b * D); });
  return 0;
}

template <class A>
static int chan_backward(int kind, const void* x, int64_t ldx, int64_t N, int64_t D, const int64_t* off, int64_t B,
                         const A* t, const A* out, const A* lse, const A* gout, void* dx, A* dt, int64_t P,
                         int nthreads) {
  const Split sp{off, B, N, P};
  Scratch<A> slots((size_t)(dt ? P * D : 0));
  if (dt && !slots.p) return 2;
  const int64_t bsz = Block<A>::size(kind, 0, D);
  Scratch<A> none((size_t)D);  // dt sink when dt is not wanted
  if (!none.p) return 2;

  const bool ok = for_pieces(P, nthreads, [&](int64_t p) -> bool {
    // dx rows go to dx directly for the compute type, through a buffer to be narrowed for half types (or to be
    // dropped when only dt is wanted)
    Scratch<A> s((size_t)(bsz + kBlockRows * D));
    if (!s.p) return false;
    Block<A> blk;
    blk.bind(s.p, 0);
    A* dxbuf = s.p + bsz;
    A* dtp = dt ? slots.p + p * D : none.p;
    const int64_t r1 = sp.r0(p + 1);
    const PieceSets ps = piece_sets(sp, p);
    auto run = [&](int64_t b, int64_t rs, int64_t re) {
      for (int64_t i0 = rs; i0 < re; i0 += kBlockRows) {
        const int64_t rb = std::min(kBlockRows, re - i0);
        blk.load(kind, x, ldx, i0, rb, D);
        A* dst = (kind == kSame && dx) ? static_cast<A*>(dx) + i0 * D : dxbuf;
        chan_block_backward(blk.rowp, rb, t, D, gout + b * D, out + b * D, lse + b * D, dst, dtp);
        if (kind != kSame && dx)
          for (int64_t r = 0; r < rb; ++r) narrow(kind, dxbuf + r * D, static_cast<uint16_t*>(dx) + (i0 + r) * D, D);
      }
    };
    if (ps.lead >= 0) run(ps.lead, sp.r0(p), ps.lead_end);
    for (int64_t b = ps.bs; b < ps.be; ++b) run(b, off[b], off[b + 1]);
    if (ps.trail >= 0) run(ps.trail, off[ps.trail], r1);
    return true;
  });
  if (!ok) return 2;
  if (dt)
    for (int64_t p = 0; p < P; ++p)
      for (int64_t d = 0; d < D; ++d) dt[d] += slots.p[p * D + d];
  return 0;
}

// ---- entry points for one instruction set (declared in segment_attention_pool.cpp) ---------------------------------

int chan_forward_any(int dtype, const void* x, int64_t ldx, int64_t N, int64_t D, const int64_t* off, int64_t B,
                     const void* t, void* out, void* lse, int64_t P, int nthreads) {
  if (dtype == 1)
    return chan_forward(kSame, x, ldx, N, D, off, B, (const double*)t, (double*)out, (double*)lse, P, nthreads);
  if (dtype < 0 || dtype > 3) return 3;
  const int kind = dtype == 0 ? kSame : dtype == 2 ? kF16 : kBF16;
  return chan_forward(kind, x, ldx, N, D, off, B, (const float*)t, (float*)out, (float*)lse, P, nthreads);
}

int chan_backward_any(int dtype, const void* x, int64_t ldx, int64_t N, int64_t D, const int64_t* off, int64_t B,
                      const void* t, const void* out, const void* lse, const void* gout, void* dx, void* dt,
                      int64_t P, int nthreads) {
  if (dtype == 1)
    return chan_backward(kSame, x, ldx, N, D, off, B, (const double*)t, (const double*)out, (const double*)lse,
                         (const double*)gout, dx, (double*)dt, P, nthreads);
  if (dtype < 0 || dtype > 3) return 3;
  const int kind = dtype == 0 ? kSame : dtype == 2 ? kF16 : kBF16;
  return chan_backward(kind, x, ldx, N, D, off, B, (const float*)t, (const float*)out, (const float*)lse,
                       (const float*)gout, dx, (float*)dt, P, nthreads);
}
