// One FOAM step (ALGORITHM.md) for a list of CPU parameters, in place: a single pass over each
// element. Pure C++ with GCC/Clang vector extensions and OpenMP; no torch headers, a C ABI
// (foam_cpu_step) that Python calls through ctypes. Built once per machine by build.py.
//
// Layout of the work. Each parameter is a [rows, n] matrix (level 0: one row of numel elements)
// whose moments are [rows, nb], nb = ceil(n / B), B = 2**level. The OpenMP threads split the
// whole list by estimated bytes into contiguous ranges, cut at row starts or at multiples of
// max(B, W) inside a row (W = lanes per vector), so every range is whole vectors and whole
// blocks but for a row's last, partial, vector.
//
// * B <= W (levels 0..3 with AVX2 floats): a vector holds W/B whole blocks. The block sums of g
//   and g*g are a butterfly of log2(B) lane swaps and adds, which leaves every lane holding its
//   own block's sum: the block means never leave the registers and need no per-lane gather.
//   The moments of the W/B blocks are loaded once, expanded to lanes by one shuffle, updated
//   lane-wise and compressed back by one shuffle.
// * B > W: a block is B/W vectors: one pass sums them (pairwise: a binary counter of partial
//   sums, so the rounding error grows with log2(B), as the reference's reduction), the block's
//   moments are updated as scalars, and a second pass over the same B elements, still in L1/L2,
//   writes p. Memory sees each element once.
//
// Extension points (issue 12: quantized moments in groups; issue 13: bf16 weights with
// correction bits): the parameter's storage is the `Param` policy (load W lanes as the compute
// type, store them rounded), the moments' storage is the `State` policy (hand out a float tile
// of a row's blocks, and commit it afterwards). The loops only see those two.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <utility>
#if defined(__AVX2__) || defined(__F16C__) || defined(__AVX512F__)
#include <immintrin.h>
#endif
#if defined(_OPENMP)
#include <omp.h>
#endif

#define FOAM_CPU_ABI 2
#define FOAM_API __attribute__((visibility("default")))

namespace {

#if defined(__AVX512F__)
constexpr int VBYTES = 64;
#elif defined(__AVX__)
constexpr int VBYTES = 32;
#else
constexpr int VBYTES = 16;
#endif

// Software prefetch distance in bytes: each iteration is a long dependency chain (butterfly,
// moments, sqrt, divide), so few iterations fit the out-of-order window and the hardware
// prefetcher alone leaves DRAM idle; measured on a loaded 2-core EPYC: ~10-20% faster.
constexpr int64_t PREFETCH = 1024;

template <class T>
struct Vec {
  typedef T type __attribute__((vector_size(VBYTES)));
  static constexpr int W = VBYTES / int(sizeof(T));
};

typedef uint16_t vu16 __attribute__((vector_size(VBYTES / 2)));
typedef uint32_t vu32 __attribute__((vector_size(VBYTES)));
typedef int32_t vi32 __attribute__((vector_size(VBYTES)));

template <class V, class T>
inline V splat(T x) {
  V r;
  for (int i = 0; i < int(sizeof(V) / sizeof(T)); ++i) r[i] = x;
  return r;
}
template <class V>
inline V load_raw(const void* p) {
  V v;
  std::memcpy(&v, p, sizeof v);
  return v;
}
template <class V>
inline void store_raw(void* p, const V& v) {
  std::memcpy(p, &v, sizeof v);
}

// ------------------------------------------------------------------ parameter storage policies
// `Param<S>`: S is the storage type of p and g; T the compute type. load/store move W lanes.
struct bf16 {
  uint16_t bits;
};
struct f16 {
  uint16_t bits;
};

template <class S>
struct Param;

template <>
struct Param<float> {
  using T = float;
  using V = Vec<float>::type;
  static V load(const float* p) { return load_raw<V>(p); }
  static void store(float* p, V x) { store_raw(p, x); }
};

template <>
struct Param<double> {
  using T = double;
  using V = Vec<double>::type;
  static V load(const double* p) { return load_raw<V>(p); }
  static void store(double* p, V x) { store_raw(p, x); }
};

template <>
struct Param<bf16> {
  using T = float;
  using V = Vec<float>::type;
  static V load(const bf16* p) {
#if defined(__AVX2__) && !defined(__AVX512F__)
    // One widening load (GCC splits __builtin_convertvector of 16 bytes into two halves).
    return (V)_mm256_slli_epi32(_mm256_cvtepu16_epi32(load_raw<__m128i>(p)), 16);
#else
    vu32 w = __builtin_convertvector(load_raw<vu16>(p), vu32) << 16;
    V x;
    std::memcpy(&x, &w, sizeof x);
    return x;
#endif
  }
  // Round to nearest even, NaN kept quiet: what torch's float -> bfloat16 conversion does
  // (c10/util/BFloat16.h, round_to_nearest_even).
  static void store(bf16* p, V x) {
    vu32 u;
    std::memcpy(&u, &x, sizeof u);
    vu32 r = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
    vi32 nan = x != x;
    r = nan ? splat<vu32>(0x7fc0u) : r;
#if defined(__AVX2__) && !defined(__AVX512F__)
    // r < 2**16: a saturating pack is a plain narrowing; the permute puts both halves low.
    __m256i packed = _mm256_packus_epi32((__m256i)r, (__m256i)r);
    store_raw(p, _mm256_castsi256_si128(_mm256_permute4x64_epi64(packed, 0x08)));
#else
    store_raw(p, __builtin_convertvector(r, vu16));
#endif
  }
};

template <>
struct Param<f16> {
  using T = float;
  using V = Vec<float>::type;
#if defined(__AVX512F__)
  static V load(const f16* p) { return (V)_mm512_cvtph_ps(load_raw<__m256i>(p)); }
  static void store(f16* p, V x) {
    store_raw(p, _mm512_cvtps_ph((__m512)x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
  }
#elif defined(__F16C__) && defined(__AVX__)
  static V load(const f16* p) { return (V)_mm256_cvtph_ps(load_raw<__m128i>(p)); }
  static void store(f16* p, V x) {
    store_raw(p, _mm256_cvtps_ph((__m256)x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
  }
#else
  static constexpr bool missing = true;  // foam_cpu_supports_dtype says no
  static V load(const f16*) { return V{}; }
  static void store(f16*, V) {}
#endif
};

// ---------------------------------------------------------------------- moment storage policy
// `PlainState<T>`: the moment is a contiguous [rows, nb] tensor of the compute type; a tile of a
// row's blocks is a pointer into it. A quantized format would decode the tile's group(s) into
// `scratch` in open() and encode them back in commit(); GROUP would then align the threads'
// ranges to its groups.
template <class T>
struct PlainState {
  static constexpr int64_t GROUP = 1;  // blocks that must stay together
  T* base;
  int64_t nb;
  T* open(int64_t row, int64_t b0, int64_t /*count*/, T* /*scratch*/) const {
    return base + row * nb + b0;
  }
  void commit(int64_t, int64_t, int64_t, const T*) const {}
};

// ----------------------------------------------------------------------------------- shuffles
template <int S, class V, std::size_t... I>
inline V swap_lanes(V x, std::index_sequence<I...>) {
  return __builtin_shufflevector(x, x, (I ^ S)...);
}

// Each lane gets the sum of its aligned group of B lanes (a butterfly: lane i adds lane i^s).
template <int B, class V, int W>
inline V group_sum(V x) {
  if constexpr (B > 1) {
    x = group_sum<B / 2, V, W>(x);
    x += swap_lanes<B / 2>(x, std::make_index_sequence<W>{});
  }
  return x;
}

// K = W/B block values -> W lanes (lane i holds value i / B), and back (lanes 0, B, 2B, ...).
// The K values are loaded into a register of at least 16 bytes through an integer of their
// size (GCC otherwise widens an 8-byte vector through the stack, and a 32-byte load of two
// smaller stores stalls store forwarding), then spread by one permute.
template <int B, class T, int W>
struct Lanes {
  static constexpr int K = W / B;
  static constexpr int BYTES = K * int(sizeof(T));
  static constexpr int CARRIER = BYTES < 16 ? 16 : BYTES;
  typedef T small __attribute__((vector_size(BYTES)));
  typedef T carrier __attribute__((vector_size(CARRIER)));
  typedef typename Vec<T>::type V;
  template <std::size_t... J>
  static V expand_(carrier c, std::index_sequence<J...>) {
    return __builtin_shufflevector(c, c, (J / B)...);
  }
  template <std::size_t... J>
  static small compress_(V x, std::index_sequence<J...>) {
    return __builtin_shufflevector(x, x, (J * B)...);
  }
  template <class U>
  static carrier widen(const T* p) {
    typedef U wide __attribute__((vector_size(16)));
    U bits;
    std::memcpy(&bits, p, sizeof bits);
    wide w{};
    w[0] = bits;
    carrier c;
    std::memcpy(&c, &w, sizeof c);
    return c;
  }
  static V load(const T* p) {
    if constexpr (B == 1) {
      return load_raw<V>(p);
    } else if constexpr (BYTES == 4) {
      return expand_(widen<uint32_t>(p), std::make_index_sequence<W>{});
    } else if constexpr (BYTES == 8) {
      return expand_(widen<uint64_t>(p), std::make_index_sequence<W>{});
    } else {
      return expand_(load_raw<carrier>(p), std::make_index_sequence<W>{});
    }
  }
  static void store(T* p, V x) {
    if constexpr (B == 1) {
      store_raw(p, x);
    } else {
      store_raw(p, compress_(x, std::make_index_sequence<K>{}));
    }
  }
};

template <class V>
inline V vsqrt(V x) {
  V r;
  for (int i = 0; i < int(sizeof(V) / sizeof(x[0])); ++i) r[i] = __builtin_sqrt(x[i]);
  return r;
}
template <>
inline Vec<float>::type vsqrt(Vec<float>::type x) {
  Vec<float>::type r;
  for (int i = 0; i < Vec<float>::W; ++i) r[i] = __builtin_sqrtf(x[i]);
  return r;
}

// ------------------------------------------------------------------------------- descriptors
// One parameter, as Python's launcher writes it: 12 int64 per parameter.
struct Desc {
  int64_t p, g, m, v, vmax, step;  // addresses (vmax: 0 without amsgrad)
  int64_t rows, n, g_stride;       // [rows, n]; g's row stride in elements
  int64_t level, dtype, step_dtype;
};
enum DType { F32 = 0, BF16 = 1, F16 = 2, F64 = 3 };

struct HyperIn {  // the group's hyperparameters, as given
  double lr, beta1, beta2, eps, weight_decay, scale, res_scale;
  int decoupled, amsgrad, maximize;
};

// The per-parameter scalars, computed once per parameter (in double) and rounded once.
template <class T>
struct Scalars {
  T b1, omb1, b2, omb2, eps, rho, rho2, cwd, gsign, decay, step_size, inv_sqrt_bc2;
};

template <class T>
Scalars<T> scalars(const HyperIn& h, const Desc& d) {
  double t = d.step_dtype == 1 ? *reinterpret_cast<const double*>(d.step)
                               : double(*reinterpret_cast<const float*>(d.step));
  double bc1 = 1.0 - std::pow(h.beta1, t), bc2 = 1.0 - std::pow(h.beta2, t);
  double alpha = d.level > 0 ? h.scale : 1.0;  // alpha scales folded parameters only
  Scalars<T> s;
  s.b1 = T(h.beta1);
  s.omb1 = T(1.0 - h.beta1);
  s.b2 = T(h.beta2);
  s.omb2 = T(1.0 - h.beta2);
  s.eps = T(h.eps);
  s.rho = T(h.res_scale);
  s.rho2 = T(h.res_scale * h.res_scale);
  s.cwd = T(h.decoupled ? 0.0 : h.weight_decay);
  s.gsign = h.maximize ? T(-1) : T(1);
  s.decay = T(h.decoupled ? 1.0 - h.lr * h.weight_decay : 1.0);
  s.step_size = T(h.lr * alpha / bc1);
  s.inv_sqrt_bc2 = T(1.0 / std::sqrt(bc2));
  return s;
}

// ------------------------------------------------------------------------------- the kernel
template <class S, bool AMS, bool COUPLED>
struct Kernel {
  using PIO = Param<S>;
  using T = typename PIO::T;
  using V = typename Vec<T>::type;
  using St = PlainState<T>;
  static constexpr int W = Vec<T>::W;


  // The gradient the moments see: maximize's sign, Adam's coupled decay.
  static V grad(const S* g, const S* p, const Scalars<T>& c) {
    V x = PIO::load(g) * c.gsign;
    if constexpr (COUPLED) x += c.cwd * PIO::load(p);
    return x;
  }

  static V new_param(V p, V big_m, V big_v, const Scalars<T>& c) {
    return p * c.decay - c.step_size * big_m / (vsqrt(big_v) * c.inv_sqrt_bc2 + c.eps);
  }

  // ---- B <= W: one vector of W elements = W/B whole blocks (those past n are padding).
  template <int B>
  static void small_vec(S* p, const S* g, T* m, T* v, T* vm, V inv_count, const Scalars<T>& c) {
    using L = Lanes<B, T, W>;
    V x = grad(g, p, c);
    V pv = PIO::load(p);
    V gb, qb;
    if constexpr (B == 1) {
      gb = x;
      qb = x * x;
    } else {
      gb = group_sum<B, V, W>(x) * inv_count;
      qb = group_sum<B, V, W>(x * x) * inv_count;
    }
    V mn = c.b1 * L::load(m) + c.omb1 * gb;
    V vn = c.b2 * L::load(v) + c.omb2 * qb;
    L::store(m, mn);
    L::store(v, vn);
    V vu = vn;
    if constexpr (AMS) {
      V old = L::load(vm);
      vu = old > vn ? old : vn;
      L::store(vm, vu);
    }
    if constexpr (B == 1) {
      PIO::store(p, new_param(pv, mn, vu, c));
    } else {
      V r = x - gb;
      PIO::store(p, new_param(pv, mn + c.rho * r, vu + c.rho2 * (r * r), c));
    }
  }

  template <int B>
  static void small_row(const Desc& d, const St* st, int64_t row, int64_t c0, int64_t c1,
                        const Scalars<T>& c) {
    constexpr int K = W / B;
    S* p = reinterpret_cast<S*>(d.p) + row * d.n;
    const S* g = reinterpret_cast<const S*>(d.g) + row * d.g_stride;
    int64_t full_end = c0 + (c1 - c0) / W * W;
    const int64_t b0 = c0 / B, nblk = (c1 - c0 + B - 1) / B;
    T* m = st[0].open(row, b0, nblk, nullptr);
    T* v = st[1].open(row, b0, nblk, nullptr);
    T* vm = AMS ? st[2].open(row, b0, nblk, nullptr) : nullptr;
    const V inv_b = splat<V>(T(1) / T(B));
    int64_t e = c0;
    for (; e < full_end; e += W) {
      int64_t b = (e - c0) / B;
      __builtin_prefetch(p + e + PREFETCH / sizeof(S), 1);
      __builtin_prefetch(g + e + PREFETCH / sizeof(S), 0);
      __builtin_prefetch(m + b + PREFETCH / sizeof(S) / B, 1);
      __builtin_prefetch(v + b + PREFETCH / sizeof(S) / B, 1);
      small_vec<B>(p + e, g + e, m + b, v + b, AMS ? vm + b : nullptr, inv_b, c);
    }
    if (e < c1) {  // the row's last vector: through zero-padded copies
      const int t = int(c1 - e), nt = (t + B - 1) / B;
      const int64_t b = (e - c0) / B;
      S pb[W], gb[W];
      T mb[K], vb[K], vmb[K];
      std::memset(pb, 0, sizeof pb);
      std::memset(gb, 0, sizeof gb);
      std::memset(mb, 0, sizeof mb);
      std::memset(vb, 0, sizeof vb);
      std::memset(vmb, 0, sizeof vmb);
      std::memcpy(pb, p + e, t * sizeof(S));
      std::memcpy(gb, g + e, t * sizeof(S));
      std::memcpy(mb, m + b, nt * sizeof(T));
      std::memcpy(vb, v + b, nt * sizeof(T));
      if (AMS) std::memcpy(vmb, vm + b, nt * sizeof(T));
      V inv_c;
      for (int i = 0; i < W; ++i) {
        int count = std::min(B, t - (i / B) * B);
        inv_c[i] = count > 0 ? T(1) / T(count) : T(0);
      }
      small_vec<B>(pb, gb, mb, vb, vmb, inv_c, c);
      std::memcpy(p + e, pb, t * sizeof(S));
      std::memcpy(m + b, mb, nt * sizeof(T));
      std::memcpy(v + b, vb, nt * sizeof(T));
      if (AMS) std::memcpy(vm + b, vmb, nt * sizeof(T));
    }
    st[0].commit(row, b0, nblk, m);
    st[1].commit(row, b0, nblk, v);
    if (AMS) st[2].commit(row, b0, nblk, vm);
  }

  // ---- B > W: a block is several vectors; sum them pairwise, then write p in a second pass.
  struct Pairwise {  // binary-counter cascade: partial sums of 1, 2, 4, ... vectors
    V s[40], q[40];
    uint64_t k = 0;
    void add(V x) {
      V a = x, b = x * x;
      int j = 0;
      for (uint64_t bits = k; bits & 1; bits >>= 1, ++j) {
        a += s[j];
        b += q[j];
      }
      s[j] = a;
      q[j] = b;
      ++k;
    }
    void total(T& gs, T& qs) const {
      V a{}, b{};
      bool first = true;
      for (int j = 0; j < 40; ++j) {
        if (!((k >> j) & 1)) continue;
        a = first ? s[j] : a + s[j];
        b = first ? q[j] : b + q[j];
        first = false;
      }
      gs = group_sum<W, V, W>(a)[0];
      qs = group_sum<W, V, W>(b)[0];
    }
  };

  static void large_block(S* p, const S* g, int64_t count, T& m, T& v, T* vm,
                          const Scalars<T>& c) {
    const int64_t full = count / W * W;
    const int t = int(count - full);
    S pb[W], gb[W];
    if (t) {
      std::memset(pb, 0, sizeof pb);
      std::memset(gb, 0, sizeof gb);
      std::memcpy(pb, p + full, t * sizeof(S));
      std::memcpy(gb, g + full, t * sizeof(S));
    }
    Pairwise acc;
    for (int64_t e = 0; e < full; e += W) acc.add(grad(g + e, p + e, c));
    if (t) acc.add(grad(gb, pb, c));
    T gs, qs;
    acc.total(gs, qs);
    const T inv = T(1) / T(count);
    const T gmean = gs * inv, qmean = qs * inv;
    const T mn = c.b1 * m + c.omb1 * gmean;
    const T vn = c.b2 * v + c.omb2 * qmean;
    m = mn;
    v = vn;
    T vu = vn;
    if constexpr (AMS) {
      vu = *vm > vn ? *vm : vn;
      *vm = vu;
    }
    const V gbv = splat<V>(gmean), mv = splat<V>(mn), vuv = splat<V>(vu);
    auto one = [&](S* pp, const S* gg) {
      V x = grad(gg, pp, c);
      V r = x - gbv;
      PIO::store(pp, new_param(PIO::load(pp), mv + c.rho * r, vuv + c.rho2 * (r * r), c));
    };
    for (int64_t e = 0; e < full; e += W) one(p + e, g + e);
    if (t) {
      one(pb, gb);
      std::memcpy(p + full, pb, t * sizeof(S));
    }
  }

  static void large_row(const Desc& d, const St* st, int64_t row, int64_t c0, int64_t c1,
                        const Scalars<T>& c) {
    const int64_t B = int64_t(1) << d.level;
    S* p = reinterpret_cast<S*>(d.p) + row * d.n;
    const S* g = reinterpret_cast<const S*>(d.g) + row * d.g_stride;
    const int64_t b0 = c0 / B, nblk = (c1 - c0 + B - 1) / B;
    T* m = st[0].open(row, b0, nblk, nullptr);
    T* v = st[1].open(row, b0, nblk, nullptr);
    T* vm = AMS ? st[2].open(row, b0, nblk, nullptr) : nullptr;
    for (int64_t j = 0; j < nblk; ++j) {
      const int64_t e = c0 + j * B;
      large_block(p + e, g + e, std::min(B, c1 - e), m[j], v[j], AMS ? vm + j : nullptr, c);
    }
    st[0].commit(row, b0, nblk, m);
    st[1].commit(row, b0, nblk, v);
    if (AMS) st[2].commit(row, b0, nblk, vm);
  }

  // Elements [e0, e1) of the flattened [rows, n] parameter (cut where partition() cuts).
  template <int B>
  static void range(const Desc& d, const HyperIn& h, int64_t e0, int64_t e1) {
    const Scalars<T> c = scalars<T>(h, d);
    const int64_t bsize = int64_t(1) << d.level, nb = (d.n + bsize - 1) / bsize;
    const St st[3] = {{reinterpret_cast<T*>(d.m), nb},
                      {reinterpret_cast<T*>(d.v), nb},
                      {reinterpret_cast<T*>(d.vmax), nb}};
    for (int64_t e = e0; e < e1;) {
      const int64_t row = e / d.n, c0 = e % d.n, c1 = std::min(d.n, c0 + (e1 - e));
      if constexpr (B > 0) {
        small_row<B>(d, st, row, c0, c1, c);
      } else {
        large_row(d, st, row, c0, c1, c);
      }
      e += c1 - c0;
    }
  }
};

// ---------------------------------------------------------------------------------- dispatch
typedef void (*RangeFn)(const Desc&, const HyperIn&, int64_t, int64_t);

template <class S, bool AMS, bool COUPLED>
RangeFn pick_level(int64_t level) {
  using K = Kernel<S, AMS, COUPLED>;
  constexpr int W = K::W;
  switch (level) {
    case 0:
      return &K::template range<1>;
    case 1:
      if constexpr (W >= 2) return &K::template range<2>;
      break;
    case 2:
      if constexpr (W >= 4) return &K::template range<4>;
      break;
    case 3:
      if constexpr (W >= 8) return &K::template range<8>;
      break;
    case 4:
      if constexpr (W >= 16) return &K::template range<16>;
      break;
    default:
      break;
  }
  return &K::template range<0>;  // B > W
}

template <class S>
RangeFn pick_options(int64_t level, bool ams, bool coupled) {
  if (ams) {
    return coupled ? pick_level<S, true, true>(level) : pick_level<S, true, false>(level);
  }
  return coupled ? pick_level<S, false, true>(level) : pick_level<S, false, false>(level);
}

RangeFn pick(const Desc& d, bool ams, bool coupled) {
  switch (d.dtype) {
    case F32:
      return pick_options<float>(d.level, ams, coupled);
    case BF16:
      return pick_options<bf16>(d.level, ams, coupled);
#if defined(__AVX512F__) || (defined(__F16C__) && defined(__AVX__))
    case F16:
      return pick_options<f16>(d.level, ams, coupled);
#endif
    case F64:
      return pick_options<double>(d.level, ams, coupled);
    default:
      return nullptr;
  }
}

int lanes(const Desc& d) { return d.dtype == F64 ? Vec<double>::W : Vec<float>::W; }

// Where a range may be cut inside parameter d: row starts, and multiples of max(B, W) inside a
// row (level 0 is one row: multiples of W).
int64_t align_down(const Desc& d, int64_t e) {
  const int64_t a = std::max<int64_t>(int64_t(1) << d.level, lanes(d));
  const int64_t row = e / d.n, col = e % d.n;
  return row * d.n + col / a * a;
}

// Estimated bytes moved per element: p read and written, g read, each moment read and written
// once per block.
double weight(const Desc& d, bool ams) {
  const double ps = d.dtype == F32 ? 4 : d.dtype == F64 ? 8 : 2;
  const double ss = d.dtype == F64 ? 8 : 4;
  return 3 * ps + 2 * ss * (ams ? 3 : 2) / double(int64_t(1) << d.level);
}

struct Cut {
  int64_t tensor, elem;
};

// The k-th of `parts` cuts of the list by weight: (tensor, aligned element).
Cut cut(const Desc* ds, int64_t count, bool ams, double total, int k, int parts) {
  if (k <= 0) return {0, 0};
  if (k >= parts) return {count, 0};
  double target = total * k / parts, acc = 0;
  for (int64_t i = 0; i < count; ++i) {
    const int64_t numel = ds[i].rows * ds[i].n;
    const double w = weight(ds[i], ams) * double(numel);
    if (acc + w > target) {
      int64_t e = int64_t((target - acc) / weight(ds[i], ams));
      return {i, align_down(ds[i], std::min(e, numel))};
    }
    acc += w;
  }
  return {count, 0};
}

void run_part(const Desc* ds, const RangeFn* fns, int64_t count, const HyperIn& h, Cut lo,
              Cut hi) {
  for (int64_t i = lo.tensor; i <= hi.tensor && i < count; ++i) {
    const int64_t numel = ds[i].rows * ds[i].n;
    const int64_t e0 = i == lo.tensor ? lo.elem : 0;
    const int64_t e1 = i == hi.tensor ? hi.elem : numel;
    if (e0 < e1) fns[i](ds[i], h, e0, e1);
  }
}

}  // namespace

extern "C" {

FOAM_API int foam_cpu_abi(void) { return FOAM_CPU_ABI; }

FOAM_API int foam_cpu_lanes(int dtype) {
  Desc d{};
  d.dtype = dtype;
  return lanes(d);
}

FOAM_API int foam_cpu_supports_dtype(int dtype) {
  Desc d{};
  d.dtype = dtype;
  return pick(d, false, false) != nullptr;
}

// Steps `count` parameters described by `descs` (12 int64 each, see Desc); with `increment`, adds
// 1 to each step count first (once, before the threads start). Returns 0, or 1 + the index of
// the first parameter it cannot take (nothing is written then).
FOAM_API int foam_cpu_step(const int64_t* descs, int64_t count, double lr, double beta1, double beta2,
                  double eps, double weight_decay, double scale, double res_scale, int decoupled,
                  int amsgrad, int maximize, int increment, int threads) {
  static_assert(sizeof(Desc) == 12 * sizeof(int64_t), "descriptor layout");
  const Desc* ds = reinterpret_cast<const Desc*>(descs);
  const HyperIn h{lr, beta1, beta2, eps, weight_decay, scale, res_scale,
                  decoupled, amsgrad, maximize};
  const bool coupled = !decoupled && weight_decay != 0.0;
  RangeFn stack_fns[64];
  RangeFn* fns = count <= 64 ? stack_fns : new RangeFn[count];
  double total = 0;
  int64_t elements = 0;
  for (int64_t i = 0; i < count; ++i) {
    fns[i] = pick(ds[i], amsgrad != 0, coupled);
    if (!fns[i] || ds[i].n <= 0 || ds[i].rows < 0 || ds[i].level < 0 || ds[i].level > 30) {
      if (fns != stack_fns) delete[] fns;
      return int(i) + 1;
    }
    elements += ds[i].rows * ds[i].n;
    total += weight(ds[i], amsgrad != 0) * double(ds[i].rows * ds[i].n);
  }
  for (int64_t i = 0; increment && i < count; ++i) {
    if (ds[i].step_dtype == 1) {
      *reinterpret_cast<double*>(ds[i].step) += 1;
    } else {
      *reinterpret_cast<float*>(ds[i].step) += 1;
    }
  }
  // Waking a thread costs microseconds: only for ranges worth it.
  const int64_t min_per_thread = 1 << 15;
  int parts = int(std::max<int64_t>(1, std::min<int64_t>(threads, elements / min_per_thread)));
#if defined(_OPENMP)
  if (parts > 1) {
#pragma omp parallel num_threads(parts)
    {
      const int k = omp_get_thread_num(), nt = omp_get_num_threads();
      run_part(ds, fns, count, h, cut(ds, count, amsgrad != 0, total, k, nt),
               cut(ds, count, amsgrad != 0, total, k + 1, nt));
    }
  } else
#endif
  {
    run_part(ds, fns, count, h, Cut{0, 0}, Cut{count, 0});
  }
  if (fns != stack_fns) delete[] fns;
  return 0;
}

}  // extern "C"
