// Row loops of the CPU distillation loss (see distill_loss.cpp). Textually included twice by
// distill_loss.cpp, inside two namespaces: once for the baseline ISA and, on x86-64 with GCC, once
// under `#pragma GCC target("avx2,fma")`; the op picks one at run time. Not a standalone header:
// it has no include guard and relies on the includes and the Options type of distill_loss.cpp.

// ---------------------------------------------------------------------------------------------
// exp and log that GCC vectorizes inside `omp simd` loops (no libm calls). fp32: Cephes
// polynomials, about 1-2 ulp. exp returns exactly 0 below -87.3 (so exp(-inf) = 0), +inf above
// 88.7 and NaN for NaN. log is for positive normal inputs. fp64 uses libm.
// ---------------------------------------------------------------------------------------------
inline float bits_to_float(int32_t i) {
  float f;
  std::memcpy(&f, &i, sizeof f);
  return f;
}
inline int32_t float_to_bits(float f) {
  int32_t i;
  std::memcpy(&i, &f, sizeof i);
  return i;
}

// c ? a : b with both sides computed and no branch: a ternary whose sides are arithmetic is
// kept as a branch under the default -ftrapping-math, which stops the vectorizer.
inline float select(bool c, float a, float b) {
  const int32_t m = -static_cast<int32_t>(c);
  return bits_to_float((float_to_bits(a) & m) | (float_to_bits(b) & ~m));
}
inline double select(bool c, double a, double b) {
  int64_t ia, ib;
  std::memcpy(&ia, &a, sizeof ia);
  std::memcpy(&ib, &b, sizeof ib);
  const int64_t m = -static_cast<int64_t>(c);
  const int64_t r = (ia & m) | (ib & ~m);
  double d;
  std::memcpy(&d, &r, sizeof d);
  return d;
}

inline float vexp(float x) {
  const float hi = 88.7228f, lo = -87.3365f;
  const float xc = select(x > hi, hi, select(x < lo, lo, x));  // NaN stays NaN
  // n = round(x log2 e) by the 1.5 * 2^23 trick (no float-to-int conversion), r = x - n ln 2.
  const float magic = 12582912.0f;
  const float t = xc * 1.44269504088896341f + magic;
  const float n = t - magic;
  float r = xc - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  float y = 1.9875691500e-4f;
  y = y * r + 1.3981999507e-3f;
  y = y * r + 8.3334519073e-3f;
  y = y * r + 4.1665795894e-2f;
  y = y * r + 1.6666665459e-1f;
  y = y * r + 5.0000001201e-1f;
  y = y * r * r + r + 1.0f;
  const int32_t e = (float_to_bits(t) - float_to_bits(magic) + 127) << 23;
  y = y * bits_to_float(e);
  y = select(x < lo, 0.0f, y);
  return select(x > hi, std::numeric_limits<float>::infinity(), y);
}

inline float vlog(float x) {
  const int32_t bits = float_to_bits(x);
  float e = static_cast<float>(((bits >> 23) & 0xff) - 126);
  float m = bits_to_float((bits & 0x807fffff) | 0x3f000000);  // mantissa in [0.5, 1)
  const bool small = m < 0.707106781186547524f;
  e = select(small, e - 1.0f, e);
  m = select(small, m + m - 1.0f, m - 1.0f);
  const float z = m * m;
  float y = 7.0376836292e-2f;
  y = y * m - 1.1514610310e-1f;
  y = y * m + 1.1676998740e-1f;
  y = y * m - 1.2420140846e-1f;
  y = y * m + 1.4249322787e-1f;
  y = y * m - 1.6668057665e-1f;
  y = y * m + 2.0000714765e-1f;
  y = y * m - 2.4999993993e-1f;
  y = y * m + 3.3333331174e-1f;
  y = y * m * z;
  y += e * -2.12194440e-4f;
  y -= 0.5f * z;
  return m + y + e * 0.693359375f;
}

// log(1 + u) for u >= 0 without losing u's low bits to the rounding of 1 + u: with w = 1 + u
// rounded, log(w) * u / (w - 1) is accurate to a few ulp (Goldberg's correction).
inline float vlog1p(float u) {
  const float w = 1.0f + u;
  const float d = w - 1.0f;
  return select(d == 0.0f, u, vlog(w) * (u / select(d == 0.0f, 1.0f, d)));
}

inline double vexp(double x) { return std::exp(x); }
inline double vlog(double x) { return std::log(x); }
inline double vlog1p(double u) { return std::log1p(u); }

template <typename A>
constexpr A kNegInf = -std::numeric_limits<A>::infinity();

// Online-LSE shift: the running max, or 0 while every entry seen is -inf (no (-inf) - (-inf)).
template <typename A>
inline A shift_of(A m) {
  return m == kNegInf<A> ? A(0) : m;
}

// A row's log-normalizer kept as max + log(sum e^(x - max)) in two parts: log-probabilities are
// formed as (x - m) - ld, which is exact in x - m for the entries that matter (like
// log_softmax), where x - (m + ld) would round the sum at the magnitude of m.
template <typename A>
struct LogZ {
  A m, ld;
};

// log(exp(x) + exp(y)), -inf when both are -inf.
template <typename A>
inline A logaddexp(A x, A y) {
  const bool x_big = x > y;
  const A mx = select(x_big, x, y), mn = select(x_big, y, x);
  return select(mx == kNegInf<A>, mx, mx + vlog1p(vexp(mn - mx)));
}


// Converts one chunk to the accumulation type: r = s (raw student), b = t / T; returns maxima.
template <typename S, typename T, typename A>
inline void load_chunk(const S* s, const T* t, int64_t n, A inv_t, A* r, A* b, A& rmax,
                       A& bmax) {
  A mr = kNegInf<A>, mb = kNegInf<A>;
#pragma omp simd reduction(max : mr, mb)
  for (int64_t i = 0; i < n; ++i) {
    const A x = static_cast<A>(s[i]);
    const A y = static_cast<A>(t[i]) * inv_t;
    r[i] = x;
    b[i] = y;
    mr = std::max(mr, x);
    mb = std::max(mb, y);
  }
  rmax = mr;
  bmax = mb;
}

// Sums over a row are taken in blocks of kSub entries (vector lanes, each adding kSub / width
// terms in order), and the block sums are added in double: the sums then carry about the error of
// a pairwise sum, like torch's own reductions, at the cost of one horizontal add per block.
constexpr int64_t kSub = 128;

// Running (max, sum e^(x - max)) pairs of a row; the sums in double.
template <typename A>
struct Online {
  A ma = kNegInf<A>, mb = kNegInf<A>, mr = kNegInf<A>;  // a = s / T, b = t / T, raw s
  double da = 0, db = 0, dr = 0;
  // Forward KL: S = sum e^(b - m_b) ((b - m_b) - (a - m_a)); reverse KL: R = sum e^(a - m_a)
  // ((a - m_a) - (b - m_b)). Measured from the maxima, the terms are the size of log-probabilities
  // whatever the offset between teacher and student logits, and KL = S / d_b + ld_a - ld_b
  // (R / d_a - ld_a + ld_b) involves no m_a - m_b that would have to cancel.
  double x = 0;
};

// Pass 1 over one chunk: fold it into the running (max, sum) pairs and S / R.
template <typename A, int64_t DIV, bool RAW>
void stats_chunk(const A* r, const A* b, int64_t n, A inv_t, A rmax, A bmax, Online<A>& st) {
  const A ma = std::max(st.ma, rmax * inv_t), mb = std::max(st.mb, bmax);
  const A sa = shift_of(ma), sb = shift_of(mb);
  const A mr = std::max(st.mr, rmax), sr = shift_of(mr);
  double sum_a = 0, sum_b = 0, sum_x = 0, sum_r = 0;
  for (int64_t j = 0; j < n; j += kSub) {
    const int64_t e = std::min(n, j + kSub);
    A pa = 0, pb = 0, px = 0, pr = 0;
#pragma omp simd reduction(+ : pa, pb, px, pr)
    for (int64_t i = j; i < e; ++i) {
      const A a = r[i] * inv_t;
      const A ea = vexp(a - sa), eb = vexp(b[i] - sb);
      pa += ea;
      pb += eb;
      if constexpr (DIV == kForwardKL) {
        px += select(b[i] > kNegInf<A>, eb * ((b[i] - sb) - (a - sa)), A(0));
      }
      if constexpr (DIV == kReverseKL) {
        px += select(a > kNegInf<A>, ea * ((a - sa) - (b[i] - sb)), A(0));
      }
      if constexpr (RAW) pr += vexp(r[i] - sr);
    }
    sum_a += pa;
    sum_b += pb;
    sum_x += px;
    sum_r += pr;
  }
  // Rescale the running sums to the new maxima (exp(-inf) = 0 while nothing was finite), and
  // move S / R to the new shifts: each old term changes by -(delta_b - delta_a) (S) or
  // +(delta_b - delta_a) (R), times its weight.
  const double ca = std::exp(double(st.ma) - double(sa)), cb = std::exp(double(st.mb) - double(sb));
  const double delta =
      (double(sb) - double(shift_of(st.mb))) - (double(sa) - double(shift_of(st.ma)));
  if constexpr (DIV == kForwardKL) st.x = (st.x - delta * st.db) * cb + sum_x;
  if constexpr (DIV == kReverseKL) st.x = (st.x + delta * st.da) * ca + sum_x;
  st.da = st.da * ca + sum_a;
  st.db = st.db * cb + sum_b;
  if constexpr (RAW) st.dr = st.dr * std::exp(double(st.mr) - double(sr)) + sum_r;
  st.ma = ma;
  st.mb = mb;
  st.mr = mr;
}

// Pass 2 of JSD over one chunk: sum p (log p - log M) and sum q (log q - log M).
template <typename A>
void jsd_chunk(const A* r, const A* b, int64_t n, A inv_t, LogZ<A> za, LogZ<A> zb, A log_beta,
               A log_1mbeta, double& kl_pm, double& kl_qm) {
  for (int64_t j = 0; j < n; j += kSub) {
    const int64_t e = std::min(n, j + kSub);
    A s_pm = 0, s_qm = 0;
#pragma omp simd reduction(+ : s_pm, s_qm)
    for (int64_t i = j; i < e; ++i) {
      const A lq = (r[i] * inv_t - za.m) - za.ld, lp = (b[i] - zb.m) - zb.ld;
      const A q = vexp(lq), p = vexp(lp);
      const A lm = logaddexp(log_beta + lp, log_1mbeta + lq);
      s_pm += select(p > A(0), p * (lp - lm), A(0));
      s_qm += select(q > A(0), q * (lq - lm), A(0));
    }
    kl_pm += s_pm;
    kl_qm += s_qm;
  }
}

template <typename A>
struct RowGrad {
  A inv_t;
  LogZ<A> za, zb, zr;
  A aux;
  A div_coef;  // dL/drow * div_scale / T
  A ce_coef;   // dL/drow * ce_scale
  A one_m_beta, log_beta, log_1mbeta;
};

// Backward over one chunk: g = div_coef * dD/da + ce_coef * softmax(s) (label term added later).
template <typename A, int64_t DIV, bool CE>
void grad_chunk(const A* __restrict r, const A* __restrict b, int64_t n, const RowGrad<A>& k,
                A* __restrict g) {
  const A inv_t = k.inv_t, ma = k.za.m, lda = k.za.ld, mb = k.zb.m, ldb = k.zb.ld;
  const A mr = k.zr.m, ldr = k.zr.ld, aux = k.aux;
  const A div_coef = k.div_coef, ce_coef = k.ce_coef, one_m_beta = k.one_m_beta;
  const A log_beta = k.log_beta, log_1mbeta = k.log_1mbeta;
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    const A lq = (r[i] * inv_t - ma) - lda, lp = (b[i] - mb) - ldb;
    const A q = vexp(lq);
    A gd = 0;
    if constexpr (DIV == kForwardKL) {
      gd = q - vexp(lp);
    } else if constexpr (DIV == kReverseKL) {
      gd = select(q > A(0), q * ((lq - lp) - aux), A(0));
    } else {
      const A lm = logaddexp(log_beta + lp, log_1mbeta + lq);
      gd = select(q > A(0), one_m_beta * q * ((lq - lm) - aux), A(0));
    }
    A gi = div_coef * gd;
    if constexpr (CE) gi += ce_coef * vexp((r[i] - mr) - ldr);
    g[i] = gi;
  }
}

// The rows of a pass, in parallel: fn(row, s_row, t_row, label, ignored) for each row.
template <typename S, typename T, typename Fn>
void for_each_row(const at::Tensor& student, const at::Tensor& teacher, const int64_t* labels,
                  const Options& o, Fn fn) {
  const int64_t N = student.size(0), V = student.size(1);
  const int64_t s_stride = student.stride(0), t_stride = teacher.stride(0);
  const S* s_base = student.const_data_ptr<S>();
  const T* t_base = teacher.const_data_ptr<T>();
  at::parallel_for(0, N, std::max<int64_t>(1, kGrain / std::max<int64_t>(V, 1)),
                   [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      const int64_t label = labels ? labels[row] : 0;
      fn(row, s_base + row * s_stride, t_base + row * t_stride, label,
         labels != nullptr && label == o.ignore_index);
    }
  });
}

// The chunks of one row, each loaded into the L1 buffers r (raw s) and b (t / T) with their
// maxima, then fn(c0, n, rmax, bmax).
template <typename S, typename T, typename A, typename Fn>
void for_each_chunk(const S* s, const T* t, int64_t V, A inv_t, A* r, A* b, Fn fn) {
  for (int64_t c0 = 0; c0 < V; c0 += kChunk) {
    const int64_t n = std::min(kChunk, V - c0);
    A rmax, bmax;
    load_chunk<S, T, A>(s + c0, t + c0, n, inv_t, r, b, rmax, bmax);
    fn(c0, n, rmax, bmax);
  }
}

template <typename S, typename T, typename A, int64_t DIV, bool RAW>
void forward_rows(const at::Tensor& student, const at::Tensor& teacher, const int64_t* labels,
                  const Options& o, A* loss, A* stats) {
  const int64_t V = student.size(1);
  const A inv_t = static_cast<A>(o.inv_t);
  const A beta = static_cast<A>(o.beta);
  for_each_row<S, T>(student, teacher, labels, o, [&](int64_t row, const S* s, const T* t,
                                                      int64_t label, bool ignored) {
    A* st_out = stats + row * kStats;
    if (ignored) {
      loss[row] = 0;
      std::fill(st_out, st_out + kStats, A(0));
      return;
    }
    alignas(64) A r[kChunk];
    alignas(64) A b[kChunk];
    Online<A> on;
    for_each_chunk<S, T, A>(s, t, V, inv_t, r, b, [&](int64_t, int64_t n, A rmax, A bmax) {
      stats_chunk<A, DIV, RAW>(r, b, n, inv_t, rmax, bmax, on);
    });
    const double ld_a = std::log(on.da), ld_b = std::log(on.db);
    const LogZ<A> za{on.ma, A(ld_a)}, zb{on.mb, A(ld_b)};
    const LogZ<A> zr = RAW ? LogZ<A>{on.mr, A(std::log(on.dr))} : za;  // a == s when T == 1
    A div = 0, aux = 0;
    if constexpr (DIV == kForwardKL) {
      div = A(on.x / on.db + (ld_a - ld_b));
    } else if constexpr (DIV == kReverseKL) {
      div = A(on.x / on.da - (ld_a - ld_b));
      aux = div;
    } else {
      const A log_beta = std::log(beta), log_1mbeta = std::log1p(-beta);
      double kl_pm = 0, kl_qm = 0;
      for_each_chunk<S, T, A>(s, t, V, inv_t, r, b, [&](int64_t, int64_t n, A, A) {
        jsd_chunk<A>(r, b, n, inv_t, za, zb, log_beta, log_1mbeta, kl_pm, kl_qm);
      });
      div = A(double(beta) * kl_pm + (1.0 - double(beta)) * kl_qm);
      aux = A(kl_qm);
    }
    A out = static_cast<A>(o.div_scale) * div;
    if (o.ce) out += static_cast<A>(o.ce_scale) * ((zr.m - static_cast<A>(s[label])) + zr.ld);
    loss[row] = out;
    const A row_stats[kStats] = {za.m, za.ld, zb.m, zb.ld, zr.m, zr.ld, aux};
    std::copy(row_stats, row_stats + kStats, st_out);
  });
}

template <typename S, typename T, typename A, int64_t DIV, bool CE>
void backward_rows(const at::Tensor& student, const at::Tensor& teacher, const int64_t* labels,
                   const A* stats, const A* grad_rows, const Options& o, S* grad,
                   int64_t g_stride) {
  const int64_t V = student.size(1);
  const A inv_t = static_cast<A>(o.inv_t);
  const A beta = static_cast<A>(o.beta);
  for_each_row<S, T>(student, teacher, labels, o, [&](int64_t row, const S* s, const T* t,
                                                      int64_t label, bool ignored) {
    S* out = grad + row * g_stride;
    if (ignored) {
      std::fill(out, out + V, S(0));
      return;
    }
    const A* st = stats + row * kStats;
    const A go = grad_rows[row];
    RowGrad<A> k{inv_t,
                 {st[0], st[1]},
                 {st[2], st[3]},
                 {st[4], st[5]},
                 st[6],
                 go * static_cast<A>(o.div_scale) * inv_t,
                 go * static_cast<A>(o.ce_scale),
                 A(1) - beta,
                 DIV == kJSD ? std::log(beta) : A(0),
                 DIV == kJSD ? std::log1p(-beta) : A(0)};
    alignas(64) A r[kChunk];
    alignas(64) A b[kChunk];
    alignas(64) A g[kChunk];
    for_each_chunk<S, T, A>(s, t, V, inv_t, r, b, [&](int64_t c0, int64_t n, A, A) {
      grad_chunk<A, DIV, CE>(r, b, n, k, g);
      if (CE && label >= c0 && label < c0 + n) g[label - c0] -= k.ce_coef;
      S* o_chunk = out + c0;
#pragma omp simd
      for (int64_t i = 0; i < n; ++i) o_chunk[i] = static_cast<S>(g[i]);
    });
  });
}

// Runtime switches -> template arguments.
template <typename S, typename T, typename A>
void forward_dispatch(const at::Tensor& s, const at::Tensor& t, const int64_t* labels,
                      const Options& o, A* loss, A* stats) {
  switch (o.divergence) {
    case kForwardKL:
      return o.raw ? forward_rows<S, T, A, kForwardKL, true>(s, t, labels, o, loss, stats)
                   : forward_rows<S, T, A, kForwardKL, false>(s, t, labels, o, loss, stats);
    case kReverseKL:
      return o.raw ? forward_rows<S, T, A, kReverseKL, true>(s, t, labels, o, loss, stats)
                   : forward_rows<S, T, A, kReverseKL, false>(s, t, labels, o, loss, stats);
    default:
      return o.raw ? forward_rows<S, T, A, kJSD, true>(s, t, labels, o, loss, stats)
                   : forward_rows<S, T, A, kJSD, false>(s, t, labels, o, loss, stats);
  }
}

template <typename S, typename T, typename A>
void backward_dispatch(const at::Tensor& s, const at::Tensor& t, const int64_t* labels,
                       const A* stats, const A* go, const Options& o, S* grad, int64_t gs) {
  switch (o.divergence) {
    case kForwardKL:
      return o.ce ? backward_rows<S, T, A, kForwardKL, true>(s, t, labels, stats, go, o, grad, gs)
                  : backward_rows<S, T, A, kForwardKL, false>(s, t, labels, stats, go, o, grad,
                                                              gs);
    case kReverseKL:
      return o.ce ? backward_rows<S, T, A, kReverseKL, true>(s, t, labels, stats, go, o, grad, gs)
                  : backward_rows<S, T, A, kReverseKL, false>(s, t, labels, stats, go, o, grad,
                                                              gs);
    default:
      return o.ce ? backward_rows<S, T, A, kJSD, true>(s, t, labels, stats, go, o, grad, gs)
                  : backward_rows<S, T, A, kJSD, false>(s, t, labels, stats, go, o, grad, gs);
  }
}

