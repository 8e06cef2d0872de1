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
// Storage policies: the loops only see these. The parameter's storage is `Weights` (`Param`:
// load W lanes as the compute type, store them rounded; with correction bits, issue 13, load
// theta = p16 + rho/Q * s and store p16 = round(theta) plus the new rho, master_weights.py's
// codec bit for bit). The moments' storage is a `State` (hand out a float tile of a row's
// blocks, commit it afterwards): `PlainState` points into a float tensor; `QuantState` (issue
// 12: formats/int8.py, int4.py) decodes one group of 32 blocks into registers/stack, and
// encodes it back (absmax scale, compander, nearest or stochastic rounding with codec.uniform's
// counter-based hash), formats/codec.py's float32 arithmetic operation for operation.
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

#define FOAM_CPU_ABI 3
#define FOAM_API __attribute__((visibility("default")))
#define FOAM_INLINE inline __attribute__((always_inline))

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

// ------------------------------------------------------------------------ lane-wise math
// Correctly rounded sqrt, round-half-even and floor of float vectors, as the scalar libm calls.
// Where the ISA has the instruction, the intrinsic: GCC writes a loop over the lanes of a 64-byte
// vector as two 32-byte halves joined through the stack (a store-forwarding stall per vector),
// or as one scalar instruction per lane (vrndscaless).
using VF = Vec<float>::type;
constexpr int WF = Vec<float>::W;
typedef uint32_t vu32 __attribute__((vector_size(VBYTES)));
typedef int32_t vi32 __attribute__((vector_size(VBYTES)));

template <class V>
inline V vsqrt(V x) {  // float64 (not a fast path)
  V r;
  for (int i = 0; i < int(sizeof(V) / sizeof(x[0])); ++i) r[i] = __builtin_sqrt(x[i]);
  return r;
}
#if !defined(_MM_FROUND_TO_NEAREST_INT)
#define _MM_FROUND_TO_NEAREST_INT 0
#define _MM_FROUND_TO_NEG_INF 1
#endif
template <int MODE>
inline VF round_as(VF x) {  // MODE: _MM_FROUND_TO_NEAREST_INT or _MM_FROUND_TO_NEG_INF
#if defined(__AVX512F__)
  return (VF)_mm512_roundscale_ps((__m512)x, MODE | _MM_FROUND_NO_EXC);
#elif defined(__AVX__)
  return (VF)_mm256_round_ps((__m256)x, MODE | _MM_FROUND_NO_EXC);
#else
  for (int i = 0; i < WF; ++i) x[i] = MODE == 0 ? __builtin_rintf(x[i]) : __builtin_floorf(x[i]);
  return x;
#endif
}
template <>
inline VF vsqrt(VF x) {
#if defined(__AVX512F__)
  return (VF)_mm512_sqrt_ps((__m512)x);
#elif defined(__AVX__)
  return (VF)_mm256_sqrt_ps((__m256)x);
#else
  for (int i = 0; i < WF; ++i) x[i] = __builtin_sqrtf(x[i]);
  return x;
#endif
}
inline VF vrint(VF x) { return round_as<_MM_FROUND_TO_NEAREST_INT>(x); }  // as torch.round
inline VF vfloor(VF x) { return round_as<_MM_FROUND_TO_NEG_INF>(x); }
inline VF vabs(VF x) {
  vu32 u;
  std::memcpy(&u, &x, sizeof u);
  u &= 0x7fffffffu;
  std::memcpy(&x, &u, sizeof x);
  return x;
}

// WF integers of 1 or 2 bytes <-> int32 lanes (zero- or sign-extended by R's signedness; narrowed
// by truncation: callers pass values that fit). GCC lowers these vector conversions a lane at a
// time (a byte extract and an insert each) where the ISA has one instruction for the whole.
template <class R>
struct Ints {
  typedef R vr __attribute__((vector_size(WF * sizeof(R))));
  static vi32 widen(const R* p) {
#if defined(__AVX512F__)
    if constexpr (sizeof(R) == 1) {
      const __m128i b = _mm_loadu_si128((const __m128i*)p);
      return (vi32)(std::is_signed<R>::value ? _mm512_cvtepi8_epi32(b) : _mm512_cvtepu8_epi32(b));
    } else {
      const __m256i h = _mm256_loadu_si256((const __m256i*)p);
      return (vi32)(std::is_signed<R>::value ? _mm512_cvtepi16_epi32(h) : _mm512_cvtepu16_epi32(h));
    }
#else
    return __builtin_convertvector(load_raw<vr>(p), vi32);
#endif
  }
  static void narrow(R* p, vi32 x) {
#if defined(__AVX512F__)
    if constexpr (sizeof(R) == 1) {
      _mm_storeu_si128((__m128i*)p, _mm512_cvtepi32_epi8((__m512i)x));
    } else {
      _mm256_storeu_si256((__m256i*)p, _mm512_cvtepi32_epi16((__m512i)x));
    }
#else
    store_raw(p, __builtin_convertvector(x, vr));
#endif
  }
};

// ------------------------------------------------------------------ parameter storage policies
// `Param<S>`: S is the storage type of p and g; T the compute type. load/store move W lanes.
struct bf16 {
  uint16_t bits;
};
struct f16 {
  uint16_t bits;
};

// float and double: stored as computed, plain vector loads and stores.
template <class S>
struct Param {
  using T = S;
  using V = typename Vec<S>::type;
  static V load(const S* p) { return load_raw<V>(p); }
  static void store(S* p, V x) { store_raw(p, x); }
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
    vu32 w = (vu32)Ints<uint16_t>::widen(reinterpret_cast<const uint16_t*>(p)) << 16;
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
    Ints<uint16_t>::narrow(reinterpret_cast<uint16_t*>(p), (vi32)r);
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

// ------------------------------------------------------------------- master weights (issue 13)
// `Weights<S, R>`: the float32 weight the update reads and writes. R = NoCorr: the parameter
// itself (Param<S>). R = int8_t / int16_t: a bfloat16/float16 p16 plus its correction rho, with
// master_weights.py's arithmetic (join: theta = float32(p16) + (float32(rho) * INV_Q) * s(p16);
// split: p16 = round(theta), rho = clamp(rint(((theta - p16) * 2**a * 2**b) * Q), -Q, Q) with
// 2**(a + b) = 1 / s(p16), a = floor(-k / 2); 0 where p16 is inf or nan).
struct NoCorr {};

template <class S>
struct Format16;  // (mantissa bits, exponent bias, largest finite value) of the 16-bit dtypes
template <>
struct Format16<bf16> {
  static constexpr int M = 7, BIAS = 127;
  static constexpr float MAX = 3.3895313892515355e38f;
};
template <>
struct Format16<f16> {
  static constexpr int M = 10, BIAS = 15;
  static constexpr float MAX = 65504.0f;
};

template <class S, class R>
struct Weights {  // with a correction
  using PIO = Param<S>;
  using V = typename PIO::V;
  static constexpr int W = Vec<float>::W;
  static constexpr int M = Format16<S>::M;
  static constexpr int LOW = 128 - Format16<S>::BIAS > 1 ? 128 - Format16<S>::BIAS : 1;
  static constexpr float Q = sizeof(R) == 1 ? 127.0f : 32767.0f;
  static constexpr float INV_Q = 1.0f / Q;  // float32(1 / Q), as master_weights.INV_Q

  // 2**k for k in [-149, 127], from its bits (master_weights._pow2)
  static V pow2(vi32 k) {
    vi32 e = k + 127;
    vi32 normal = (e < 1 ? splat<vi32>(1) : e) << 23;
    vi32 sh = k + 149;
    sh = sh < 0 ? splat<vi32>(0) : sh;
    sh = sh > 22 ? splat<vi32>(22) : sh;
    vi32 sub = splat<vi32>(1) << sh;
    vi32 bits = k >= -126 ? normal : sub;
    V out;
    std::memcpy(&out, &bits, sizeof out);
    return out;
  }
  // E - M - 1 of master_weights._exponent / _half_ulp32: the exponent of s = half an ulp
  static vi32 half_ulp_exp(V x) {
    vi32 bits;
    std::memcpy(&bits, &x, sizeof bits);
    vi32 field = (bits >> 23) & 0xFF;
    field = field < LOW ? splat<vi32>(LOW) : field;
    return field - 127 - (M + 1);
  }
  static V load(const S* p, const R* rho) {
    const V x = PIO::load(p);
    vi32 k = half_ulp_exp(x);
    k = k > 127 ? splat<vi32>(127) : k;
    const V c = __builtin_convertvector(Ints<R>::widen(rho), V) * INV_Q;
    return x + c * pow2(k);
  }
  static void store(S* p, R* rho, V theta) {
    PIO::store(p, theta);
    const V r = PIO::load(p);  // the stored value, exactly
    const vi32 k = -half_ulp_exp(r);
    const vi32 half = k >> 1;  // floor(k / 2)
    V t = (((theta - r) * pow2(half)) * pow2(k - half)) * Q;
    t = vrint(t);
    t = t < -Q ? splat<V>(-Q) : t;
    t = t > Q ? splat<V>(Q) : t;
    const vi32 finite = vabs(r) <= Format16<S>::MAX;  // p16 is neither inf nor nan
    t = finite ? t : splat<V>(0.0f);
    Ints<R>::narrow(rho, __builtin_convertvector(t, vi32));
  }
};

template <class S>
struct Weights<S, NoCorr> {  // no correction: the parameter is the weight
  using PIO = Param<S>;
  using V = typename PIO::V;
  static V load(const S* p, const NoCorr*) { return PIO::load(p); }
  static void store(S* p, NoCorr*, V x) { PIO::store(p, x); }
};

// ---------------------------------------------------------------------- moment storage policy
// `PlainState<T>`: the moment is a contiguous [rows, nb] tensor of the compute type; a tile of a
// row's blocks is a pointer into it (one tile: the whole range).
template <class T>
struct PlainState {
  static constexpr int64_t TILE = int64_t(1) << 60;  // blocks per open/commit
  static constexpr int64_t SCRATCH = 1;
  T* base;
  int64_t nb;
  T* open(int64_t row, int64_t b0, int64_t /*count*/, T* /*scratch*/) const {
    return base + row * nb + b0;
  }
  void commit(int64_t, int64_t, int64_t, const T*, const float* = nullptr) const {}
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
#if defined(__AVX512F__)
  // AVX-512 floats: GCC lowers the widening shuffle below through the stack (a 64-byte reload
  // of a smaller store, a store-forwarding stall a vector); load the K floats into the low
  // lanes of a register and spread them with one vpermps.
  static __m512 low_lanes(const float* p) {
    if constexpr (K == 8) {
      return _mm512_castps256_ps512(_mm256_loadu_ps(p));
    } else if constexpr (K == 4) {
      return _mm512_castps128_ps512(_mm_loadu_ps(p));
    } else if constexpr (K == 2) {
      return _mm512_castps128_ps512(_mm_castsi128_ps(_mm_loadl_epi64((const __m128i*)p)));
    } else {
      return _mm512_set1_ps(*p);
    }
  }
  template <std::size_t... J>
  static V spread(const float* p, std::index_sequence<J...>) {
    const vi32 lane_of = {int(J / B)...};
    return (V)_mm512_permutexvar_ps((__m512i)lane_of, low_lanes(p));
  }
#endif
  static V load(const T* p) {
#if defined(__AVX512F__)
    if constexpr (B > 1 && std::is_same<T, float>::value) {
      return spread(p, std::make_index_sequence<W>{});
    }
#endif
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

// ------------------------------------------------------------------ quantized moment storage
// formats/int8.py and int4.py: per row of the folded moment, groups of G = 32 blocks, each with a
// float32 absmax scale and 8-bit codes (int8 signed / uint8 square) or 4-bit codes packed two a
// byte (element 2j low nibble; signed nibbles hold q + 8; an odd row ends in the zero code). A
// group is GROUP / W float vectors; every line below is one float32 operation of codec.py's, in
// its order (-ffp-contract=off: no fused multiply-add), lane by lane.
constexpr int GROUP = 32;
constexpr int NV = GROUP / WF;  // vectors per group
typedef uint8_t vu8h __attribute__((vector_size(WF / 2)));
typedef uint8_t vgroup8 __attribute__((vector_size(GROUP)));
typedef uint8_t vhalf8 __attribute__((vector_size(GROUP / 2)));

// codec.hash32 (Chris Wellons' hash-prospector constants, as the codec cites): U is uint32_t or
// vu32 (lane-wise).
template <class U>
inline U hash32(U x) {
  x ^= x >> 16;
  x *= 0x21F0AAADu;
  x ^= x >> 15;
  x *= 0x735A2D97u;
  return x ^ (x >> 15);
}

inline vi32 iota() {
  vi32 r;
  for (int i = 0; i < WF; ++i) r[i] = i;
  return r;
}

template <int BITS, bool SIGNED>
struct Code {
  static constexpr int L = SIGNED ? (BITS == 8 ? 127 : 7) : (BITS == 8 ? 255 : 15);
  static constexpr int ZERO = (BITS == 4 && SIGNED) ? 8 : 0;  // stored code of 0 (nibble)
  // The decoded value before the scale of (float) codes q: codec._signed_t (y = q / L,
  // t = y / (2 - |y|)) or the square's q / L.
  static VF unit(VF q) {
    const VF y = q / float(L);
    if constexpr (SIGNED) {
      return y / (2.0f - vabs(y));
    } else {
      return y;
    }
  }
  // unit() of every stored code (a byte, or a nibble), computed once by unit() itself: decoding
  // is a table lookup, the same float32 values without unit()'s one or two divides an element.
  static constexpr int CODES = BITS == 8 ? 256 : 16;
  struct Table {
    alignas(64) float v[CODES];
    Table() {
      for (int b = 0; b < CODES; b += WF) {
        VF q;
        for (int i = 0; i < WF; ++i) {
          const int c = b + i;
          q[i] = BITS == 8 && SIGNED ? float(int8_t(uint8_t(c))) : float(c - ZERO);
        }
        store_raw(v + b, unit(q));
      }
    }
  };
  static const float* table() {
    static const Table t;  // built once, thread-safely, on first use
    return t.v;
  }
#if defined(__AVX512F__)
  // unit() of 16 codes (int32 lanes: the stored byte, or nibble), in registers: a table read
  // through scalar stores and a vector reload stalls store forwarding at every vector.
  FOAM_INLINE static VF lookup(vi32 code, const float* table) {
    if constexpr (BITS == 4) {  // 16 codes: one permute
      return (VF)_mm512_permutexvar_ps((__m512i)code, _mm512_load_ps(table));
    } else if constexpr (!SIGNED) {  // q / 255: unit() itself, one divide
      return unit(__builtin_convertvector(code, VF));
    } else {
      // int8: unit(-q) == -unit(q) exactly (each division rounds symmetrically), so |q| < 128
      // indexes the 128 entries of the non-negative codes: four 32-entry permutes, then bits 5
      // and 6 of |q| choose. -128 (never written by the encoder) is read from the table.
      const vi32 q = (code ^ 0x80) - 0x80;  // the byte as an int8
      const __m512i mag = (__m512i)(q < 0 ? -q : q);
      __m512 r[4];
      for (int j = 0; j < 4; ++j) {
        r[j] = _mm512_permutex2var_ps(_mm512_load_ps(table + 32 * j), mag,
                                      _mm512_load_ps(table + 32 * j + 16));
      }
      const __mmask16 b5 = _mm512_test_epi32_mask(mag, _mm512_set1_epi32(32));
      const __mmask16 b6 = _mm512_test_epi32_mask(mag, _mm512_set1_epi32(64));
      const __m512 lo = _mm512_mask_blend_ps(b5, r[0], r[1]);
      const __m512 hi = _mm512_mask_blend_ps(b5, r[2], r[3]);
      VF u = (VF)_mm512_mask_blend_ps(b6, lo, hi);
      u = q < 0 ? -u : u;
      // (a register broadcast: splat() of a table entry is one masked load per lane)
      return (VF)_mm512_mask_blend_ps(_mm512_cmpeq_epi32_mask((__m512i)q, _mm512_set1_epi32(-128)),
                                      (__m512)u, _mm512_set1_ps(table[128]));
    }
  }
#endif
  // Stored codes of a group (its first byte at c) -> their unit() values, NV vectors. `count` <
  // GROUP (a row's last group) reads through a zero-padded copy, never past the row.
  FOAM_INLINE static void units(const uint8_t* c, int64_t count, const float* table, VF* u) {
    uint8_t bytes[GROUP] = {};
    constexpr int64_t FULL = BITS == 8 ? GROUP : GROUP / 2;
    if (count == GROUP) {  // a whole group: one fixed-size copy (a vector load)
      std::memcpy(bytes, c, FULL);
    } else {
      std::memcpy(bytes, c, BITS == 8 ? count : (count + 1) / 2);
    }
    uint8_t codes[GROUP];  // one code a byte
    if constexpr (BITS == 8) {
      std::memcpy(codes, bytes, GROUP);
    } else {  // nibbles: element 2j the low one of byte j
      const vhalf8 b = load_raw<vhalf8>(bytes);
      const vhalf8 lo = b & 15, hi = b >> 4;
      const vgroup8 all = __builtin_shufflevector(lo, hi, 0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5,
                                                  21, 6, 22, 7, 23, 8, 24, 9, 25, 10, 26, 11, 27,
                                                  12, 28, 13, 29, 14, 30, 15, 31);
      store_raw(codes, all);
    }
#if defined(__AVX512F__)
    for (int k = 0; k < NV; ++k) {
      u[k] = lookup(Ints<uint8_t>::widen(codes + k * WF), table);
    }
#else
    for (int k = 0; k < NV; ++k) {
      for (int i = 0; i < WF; ++i) u[k][i] = table[codes[k * WF + i]];
    }
#endif
  }
  // Integer codes of NV vectors (lanes past `count` hold 0) -> the stored bytes at c. Built in
  // registers and stored a vector at a time (a byte buffer written by vectors and copied out by
  // a wider load stalls store forwarding); a row's last, partial group through a buffer.
  static constexpr int PER = BITS == 8 ? WF : WF / 2;  // bytes a vector of codes fills
  FOAM_INLINE static void store(uint8_t* c, int64_t count, const vi32* q) {
    uint8_t buffer[GROUP];
    uint8_t* out = count == GROUP ? c : buffer;
    for (int k = 0; k < NV; ++k) {
      const vi32 x = q[k] + ZERO;
      if constexpr (BITS == 8) {
        Ints<uint8_t>::narrow(out + k * PER, x);
      } else {  // element 2j the low nibble of byte j: even lanes gather their odd neighbour
        const vi32 pair = x | (swap_lanes<1>(x, std::make_index_sequence<WF>{}) << 4);
#if defined(__AVX512F__) && defined(__AVX512VL__)
        _mm_storel_epi64((__m128i*)(out + k * PER), _mm256_cvtepi32_epi8((__m256i)evens(pair)));
#else
        store_raw(out + k * PER, __builtin_convertvector(evens(pair), vu8h));
#endif
      }
    }
    if (count != GROUP) std::memcpy(c, buffer, BITS == 8 ? count : (count + 1) / 2);
  }
  template <std::size_t... J>
  static auto evens_(vi32 x, std::index_sequence<J...>) {
    return __builtin_shufflevector(x, x, (2 * J)...);
  }
  static auto evens(vi32 x) { return evens_(x, std::make_index_sequence<WF / 2>{}); }
};

// Every lane gets the largest lane (no lane NaN) / the OR of all lanes: butterflies, as group_sum.
// Lanes that hold equal values in aligned runs of B need only the steps across runs.
template <int B = 1, int S = WF / 2>
inline VF lanes_max(VF x) {
  if constexpr (S >= B) {
    const VF y = swap_lanes<S>(x, std::make_index_sequence<WF>{});
    return lanes_max<B, S / 2>(y > x ? y : x);
  }
  return x;
}
template <int S = WF / 2>
inline vi32 lanes_or(vi32 x) {
  if constexpr (S >= 1) {
    return lanes_or<S / 2>(x | swap_lanes<S>(x, std::make_index_sequence<WF>{}));
  }
  return x;
}
inline bool any_lane(vi32 x) {  // one mask test where the ISA has it, not lanes_or's butterfly
#if defined(__AVX512F__)
  if constexpr (WF == 16) return _mm512_test_epi32_mask((__m512i)x, (__m512i)x) != 0;
#endif
  return lanes_or(x)[0] != 0;
}

// codec.encode_signed / encode_square of one group, in two passes: the scale (absmax of x, or
// of sqrt(clamp_min(x, 0)) for the square) and the codes. x[0..count) (lanes past it read as 0,
// which raises no absmax and codes to 0).
FOAM_INLINE VF group_vector(const float* x, int64_t count, int k) {  // vector k, lanes past count 0
  const VF xv = load_raw<VF>(x + k * WF);
  return iota() + k * WF < int32_t(count) ? xv : splat<VF>(0.0f);
}

template <bool SIGNED>
FOAM_INLINE float group_scale(const float* x, int64_t count) {
  VF smax = splat<VF>(0.0f);
  vi32 nan = splat<vi32>(0);
  for (int k = 0; k < NV; ++k) {
    const VF xv = group_vector(x, count, k);
    // square: sqrt(clamp_min(x, 0)), NaN kept (a NaN moment must decode to NaN)
    const VF base = SIGNED ? vabs(xv) : vsqrt(xv < 0.0f ? splat<VF>(0.0f) : xv);
    smax = base > smax ? base : smax;
    nan |= base != base;
  }
  const float s = lanes_max(smax)[0];  // >= +0: smax's lanes start at +0 and hold no NaN
  return any_lane(nan) ? __builtin_nanf("") : s;  // torch.amax propagates NaN
}

// The codes of x under scale s -> q (NV vectors). Returns whether a code came from NaN (a NaN
// element, or inf * 0 where s is inf), which a scale gathered without NaN checks must recheck.
// Stochastic rounding (`seed`, with `idx` the group's first flat index in the moment) draws
// codec.uniform's numbers: (hash32(idx + j + seed) >> 8) * 2**-24.
template <int BITS, bool SIGNED>
FOAM_INLINE bool group_codes(const float* x, int64_t count, float s, vi32* q, bool stochastic,
                             uint32_t seed, int64_t idx) {
  using C = Code<BITS, SIGNED>;
  constexpr float L = float(C::L);
  const float inv = s > 0.0f ? 1.0f / s : 0.0f;
  vi32 nan = splat<vi32>(0);
  for (int k = 0; k < NV; ++k) {
    const VF xv = group_vector(x, count, k);
    const VF base = SIGNED ? xv : vsqrt(xv < 0.0f ? splat<VF>(0.0f) : xv);
    VF t, z;
    if constexpr (SIGNED) {
      t = xv * inv;
      const VF y = (t + t) / (1.0f + vabs(t));
      z = y * L;
    } else {
      t = base * inv;
      z = t * L;
    }
    VF r;
    if (!stochastic) {
      r = vrint(z);
    } else {
      VF q0 = vfloor(z);  // NaN stays NaN through the clamps, and codes to 0 below
      q0 = q0 < (SIGNED ? -L : 0.0f) ? splat<VF>(SIGNED ? -L : 0.0f) : q0;
      q0 = q0 > L - 1.0f ? splat<VF>(L - 1.0f) : q0;
      const VF a0 = C::unit(q0), a1 = C::unit(q0 + 1.0f);
      VF p;
      if constexpr (SIGNED) {
        p = (t - a0) / (a1 - a0);
      } else {
        p = (t * t - a0 * a0) / (a1 * a1 - a0 * a0);
      }
      vu32 i = (vu32)(iota() + k * WF) + uint32_t(idx) + seed;
      const VF rand = __builtin_convertvector(hash32(i) >> 8, VF) * 0x1p-24f;
      r = rand < p ? q0 + 1.0f : q0;
    }
    const vi32 not_a_number = r != r;
    nan |= not_a_number;
    r = not_a_number ? splat<VF>(0.0f) : r;  // NaN (a non-finite group): its scale decodes NaN
    vi32 qi = __builtin_convertvector(r, vi32);
    if constexpr (!SIGNED) {  // a positive v never decodes to 0
      qi = (qi == 0) & (base > 0.0f) ? splat<vi32>(1) : qi;
    }
    q[k] = qi;
  }
  return any_lane(nan);
}

template <int BITS, bool SIGNED>
struct QuantState {
  using C = Code<BITS, SIGNED>;
  // Groups per open/commit. Each group's encode is a chain of dependent steps (absmax, 1 / s,
  // compander, rounding) that the out-of-order core can overlap only with work near it in
  // program order, and a tile's update loop fills the reorder buffer: with GROUPS groups a
  // tile the chains of one commit run side by side (int8, LLaMA-60M blocks, 1 thread: 51.8 ->
  // 46.3 ms; 8 or 16 groups were no faster, nor 2 or 8 once the update gathers the absmax).
  static constexpr int64_t GROUPS = 4;
  static constexpr int64_t TILE = GROUPS * GROUP;
  static constexpr int64_t SCRATCH = TILE;
  uint8_t* codes;
  float* scales;
  int64_t nb, ng, row_bytes;  // blocks, groups and code bytes per row
  uint32_t seed;              // stochastic rounding: hash32(4 * step + salt)
  bool stochastic;
  const float* table = C::table();

  static constexpr int64_t code_offset(int64_t b) { return BITS == 8 ? b : b / 2; }

  // b0 is a multiple of GROUP: the groups from b0 / GROUP of `row`, count <= TILE blocks.
  FOAM_INLINE float* open(int64_t row, int64_t b0, int64_t count, float* scratch) const {
    for (int64_t j = 0; j < count; j += GROUP) {
      const float s = scales[row * ng + (b0 + j) / GROUP];
      VF units[NV];
      C::units(codes + row * row_bytes + code_offset(b0 + j), std::min<int64_t>(GROUP, count - j),
               table, units);
      for (int k = 0; k < NV; ++k) {
        const VF u = units[k] * s;
        store_raw(scratch + j + k * WF, SIGNED ? u : u * u);
      }
    }
    return scratch;
  }

  // `amax`, where the caller gathered it while writing x: each group's largest |x| (signed) or
  // largest clamp_min(x, 0) (square), NaN not seen. sqrt is monotone and correctly rounded, so
  // sqrt(amax) is the scan's scale; a group whose codes met NaN is scanned after all.
  FOAM_INLINE void commit(int64_t row, int64_t b0, int64_t count, const float* x,
                          const float* amax = nullptr) const {
    for (int64_t j = 0; j < count; j += GROUP) {
      const int64_t n = std::min<int64_t>(GROUP, count - j), idx = row * nb + b0 + j;
      vi32 q[NV];
      float s;
      if (amax) {
        const float a = amax[j / GROUP];
        s = SIGNED ? a : std::sqrt(a);
      } else {
        s = group_scale<SIGNED>(x + j, n);
      }
      if (group_codes<BITS, SIGNED>(x + j, n, s, q, stochastic, seed, idx) && amax) {
        s = group_scale<SIGNED>(x + j, n);
        group_codes<BITS, SIGNED>(x + j, n, s, q, stochastic, seed, idx);
      }
      scales[row * ng + (b0 + j) / GROUP] = s;
      C::store(codes + row * row_bytes + code_offset(b0 + j), n, q);
    }
  }
};

// ------------------------------------------------------------------------------- descriptors
// One parameter, as Python's launcher writes it: 20 int64 per parameter.
struct Desc {
  int64_t p, g, m, v, vmax, step;  // addresses (vmax: 0 without amsgrad)
  int64_t rows, n, g_stride;       // [rows, n]; g's row stride in elements
  int64_t level, dtype, step_dtype;
  int64_t format;                        // 0 float moments, 8 / 4: grouped codes (bits)
  int64_t stochastic;                    // grouped codes: 1 = stochastic rounding
  int64_t m_scale, v_scale, vmax_scale;  // grouped codes: float32 scales (0 otherwise)
  int64_t corr, corr_bits;               // correction bits: address, 8 / 16 (0: none)
  int64_t reserved;
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
  int64_t t;  // the step count, as an integer (stochastic rounding's counter)
  // Run-time options: a branch the loops hoist, where template parameters would multiply the
  // library's instances (and its build time) by four.
  bool ams, coupled;
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
  s.t = int64_t(t);  // torch's float -> int64 cast truncates too
  s.ams = h.amsgrad != 0;
  s.coupled = !h.decoupled && h.weight_decay != 0.0;
  return s;
}

// The three moments' storages of one parameter, for format FMT (0: float, 8 / 4: grouped).
template <int FMT, class T>
struct States {
  using M = PlainState<T>;
  using Q = PlainState<T>;
  M m;
  Q v, vm;
  States(const Desc& d, int64_t nb, int64_t)
      : m{reinterpret_cast<T*>(d.m), nb},
        v{reinterpret_cast<T*>(d.v), nb},
        vm{reinterpret_cast<T*>(d.vmax), nb} {}
};

template <int FMT>
struct GroupedStates {
  using M = QuantState<FMT, true>;
  using Q = QuantState<FMT, false>;
  M m;
  Q v, vm;
  static uint32_t seed(int64_t t, int salt) { return hash32(uint32_t(t * 4 + salt)); }
  // formats.grouped.SALTS: 1 exp_avg, 2 exp_avg_sq, 3 max_exp_avg_sq
  GroupedStates(const Desc& d, int64_t nb, int64_t t)
      : m{reinterpret_cast<uint8_t*>(d.m), reinterpret_cast<float*>(d.m_scale), nb, ng(nb),
          bytes(nb), seed(t, 1), d.stochastic != 0},
        v{reinterpret_cast<uint8_t*>(d.v), reinterpret_cast<float*>(d.v_scale), nb, ng(nb),
          bytes(nb), seed(t, 2), d.stochastic != 0},
        vm{reinterpret_cast<uint8_t*>(d.vmax), reinterpret_cast<float*>(d.vmax_scale), nb,
           ng(nb), bytes(nb), seed(t, 3), d.stochastic != 0} {}
  static int64_t ng(int64_t nb) { return (nb + GROUP - 1) / GROUP; }
  static int64_t bytes(int64_t nb) { return FMT == 8 ? nb : (nb + 1) / 2; }
};
template <>
struct States<8, float> : GroupedStates<8> {
  using GroupedStates<8>::GroupedStates;
};
template <>
struct States<4, float> : GroupedStates<4> {
  using GroupedStates<4>::GroupedStates;
};

// ------------------------------------------------------------------------------- the kernel
// S: the parameter's storage; FMT: the moments' (0, 8, 4); R: the correction's (NoCorr, int8_t,
// int16_t). Amsgrad and coupled decay are run-time flags (Scalars).
template <class S, int FMT, class R>
struct Kernel {
  using PIO = Param<S>;
  using WIO = Weights<S, R>;
  using T = typename PIO::T;
  using V = typename Vec<T>::type;
  using St = States<FMT, T>;
  static constexpr int W = Vec<T>::W;
  static constexpr bool CORR = !std::is_same<R, NoCorr>::value;

  // The gradient the moments see: maximize's sign, Adam's coupled decay.
  static V grad(const S* g, const S* p, const R* corr, const Scalars<T>& c) {
    V x = PIO::load(g) * c.gsign;
    if (c.coupled) x += c.cwd * WIO::load(p, corr);
    return x;
  }

  static V new_param(V p, V big_m, V big_v, const Scalars<T>& c) {
    return p * c.decay - c.step_size * big_m / (vsqrt(big_v) * c.inv_sqrt_bc2 + c.eps);
  }

  // A row's last t < W elements as whole vectors: p, g and the correction copied into
  // zero-padded buffers, p and the correction copied back after the update. With t = 0 (a
  // block of whole vectors, the common case of large_block) it does nothing.
  struct Tail {
    S p[W], g[W];
    R corr[W];
    int t;
    Tail(const S* p0, const S* g0, const R* c0, int count) : t(count) {
      if (t == 0) return;
      std::memset(p, 0, sizeof p);
      std::memset(g, 0, sizeof g);
      std::memset(corr, 0, sizeof corr);
      std::memcpy(p, p0, t * sizeof(S));
      std::memcpy(g, g0, t * sizeof(S));
      if constexpr (CORR) std::memcpy(corr, c0, t * sizeof(R));
    }
    void write_back(S* p0, R* c0) const {
      std::memcpy(p0, p, t * sizeof(S));
      if constexpr (CORR) std::memcpy(c0, corr, t * sizeof(R));
    }
  };

  // Grouped moments: each group's largest |m| and v, gathered as the update writes them (a few
  // vector max a vector, where the update waits on its divide) so that commit's encoder need not
  // scan the moments again. A block's B lanes hold one value; padding blocks hold 0.
  struct NoMax {
    void add(V, V) {}
    void next() {}
    void finish() {}
    const float* m() const { return nullptr; }
    const float* v() const { return nullptr; }
  };
  template <int B>
  struct GroupMax {
    static constexpr int PER_GROUP = GROUP * B / W;  // vectors a group
    V mx = splat<V>(T(0)), vx = splat<V>(T(0));
    int k = 0, j = 0;
    float ms[St::M::GROUPS], vs[St::M::GROUPS];
    void add(V mn, V vn) {
      const V a = vabs(mn);
      mx = a > mx ? a : mx;  // NaN raises nothing: commit rechecks groups whose codes meet it
      vx = vn > vx ? vn : vx;
    }
    void next() {
      if (++k == PER_GROUP) finish();
    }
    void finish() {  // the group so far, if any
      if (k == 0) return;
      ms[j] = lanes_max<B>(mx)[0];
      vs[j] = lanes_max<B>(vx)[0];
      ++j;
      k = 0;
      mx = vx = splat<V>(T(0));
    }
    const float* m() const { return ms; }
    const float* v() const { return vs; }
  };
  template <int B>
  using Max = typename std::conditional<FMT == 0, NoMax, GroupMax<B>>::type;

  // ---- B <= W: one vector of W elements = W/B whole blocks (those past n are padding).
  template <int B, class Acc>
  static void small_vec(S* p, const S* g, R* corr, T* m, T* v, T* vm, V inv_count,
                        const Scalars<T>& c, Acc& amax) {
    using L = Lanes<B, T, W>;
    V x = grad(g, p, corr, c);
    V pv = WIO::load(p, corr);
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
    amax.add(mn, vn);
    V vu = vn;
    if (c.ams) {
      V old = L::load(vm);
      vu = old > vn ? old : vn;
      L::store(vm, vu);
    }
    if constexpr (B == 1) {
      WIO::store(p, corr, new_param(pv, mn, vu, c));
    } else {
      V r = x - gb;
      WIO::store(p, corr, new_param(pv, mn + c.rho * r, vu + c.rho2 * (r * r), c));
    }
  }

  template <int B>
  static void small_row(const Desc& d, const St& st, int64_t row, int64_t c0, int64_t c1,
                        const Scalars<T>& c) {
    constexpr int K = W / B;
    S* p = reinterpret_cast<S*>(d.p) + row * d.n;
    const S* g = reinterpret_cast<const S*>(d.g) + row * d.g_stride;
    R* corr = CORR ? reinterpret_cast<R*>(d.corr) + row * d.n : nullptr;
    int64_t full_end = c0 + (c1 - c0) / W * W;
    const int64_t b0 = c0 / B, nblk = (c1 - c0 + B - 1) / B;
    T scratch[3][St::M::SCRATCH];
    T* m = st.m.open(row, b0, nblk, scratch[0]);
    T* v = st.v.open(row, b0, nblk, scratch[1]);
    T* vm = c.ams ? st.vm.open(row, b0, nblk, scratch[2]) : nullptr;
    const V inv_b = splat<V>(T(1) / T(B));
    Max<B> amax;
    int64_t e = c0;
    for (; e < full_end; e += W) {
      int64_t b = (e - c0) / B;
      __builtin_prefetch(p + e + PREFETCH / sizeof(S), 1);
      __builtin_prefetch(g + e + PREFETCH / sizeof(S), 0);
      if constexpr (FMT == 0) {
        __builtin_prefetch(m + b + PREFETCH / sizeof(S) / B, 1);
        __builtin_prefetch(v + b + PREFETCH / sizeof(S) / B, 1);
      }
      small_vec<B>(p + e, g + e, CORR ? corr + e : nullptr, m + b, v + b,
                   c.ams ? vm + b : nullptr, inv_b, c, amax);
      amax.next();
    }
    if (e < c1) {  // the row's last vector: through zero-padded copies
      const int t = int(c1 - e), nt = (t + B - 1) / B;
      const int64_t b = (e - c0) / B;
      Tail tl(p + e, g + e, CORR ? corr + e : nullptr, t);
      T mb[K] = {}, vb[K] = {}, vmb[K] = {};
      std::memcpy(mb, m + b, nt * sizeof(T));
      std::memcpy(vb, v + b, nt * sizeof(T));
      if (c.ams) std::memcpy(vmb, vm + b, nt * sizeof(T));
      V inv_c;
      for (int i = 0; i < W; ++i) {
        int count = std::min(B, t - (i / B) * B);
        inv_c[i] = count > 0 ? T(1) / T(count) : T(0);
      }
      small_vec<B>(tl.p, tl.g, tl.corr, mb, vb, vmb, inv_c, c, amax);
      amax.next();
      tl.write_back(p + e, CORR ? corr + e : nullptr);
      std::memcpy(m + b, mb, nt * sizeof(T));
      std::memcpy(v + b, vb, nt * sizeof(T));
      if (c.ams) std::memcpy(vm + b, vmb, nt * sizeof(T));
    }
    amax.finish();
    st.m.commit(row, b0, nblk, m, amax.m());
    st.v.commit(row, b0, nblk, v, amax.v());
    if (c.ams) st.vm.commit(row, b0, nblk, vm);
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

  static void large_block(S* p, const S* g, R* corr, int64_t count, T& m, T& v, T* vm,
                          const Scalars<T>& c) {
    const int64_t full = count / W * W;
    const int t = int(count - full);
    Tail tl(p + full, g + full, CORR ? corr + full : nullptr, t);
    Pairwise acc;
    for (int64_t e = 0; e < full; e += W) acc.add(grad(g + e, p + e, CORR ? corr + e : nullptr, c));
    if (t) acc.add(grad(tl.g, tl.p, tl.corr, c));
    T gs, qs;
    acc.total(gs, qs);
    const T inv = T(1) / T(count);
    const T gmean = gs * inv, qmean = qs * inv;
    const T mn = c.b1 * m + c.omb1 * gmean;
    const T vn = c.b2 * v + c.omb2 * qmean;
    m = mn;
    v = vn;
    T vu = vn;
    if (c.ams) {
      vu = *vm > vn ? *vm : vn;
      *vm = vu;
    }
    const V gbv = splat<V>(gmean), mv = splat<V>(mn), vuv = splat<V>(vu);
    auto one = [&](S* pp, const S* gg, R* cc) {
      V x = grad(gg, pp, cc, c);
      V r = x - gbv;
      WIO::store(pp, cc, new_param(WIO::load(pp, cc), mv + c.rho * r, vuv + c.rho2 * (r * r), c));
    };
    for (int64_t e = 0; e < full; e += W) one(p + e, g + e, CORR ? corr + e : nullptr);
    if (t) {
      one(tl.p, tl.g, tl.corr);
      tl.write_back(p + full, CORR ? corr + full : nullptr);
    }
  }

  static void large_row(const Desc& d, const St& st, int64_t row, int64_t c0, int64_t c1,
                        const Scalars<T>& c) {
    const int64_t B = int64_t(1) << d.level;
    S* p = reinterpret_cast<S*>(d.p) + row * d.n;
    const S* g = reinterpret_cast<const S*>(d.g) + row * d.g_stride;
    R* corr = CORR ? reinterpret_cast<R*>(d.corr) + row * d.n : nullptr;
    const int64_t b0 = c0 / B, nblk = (c1 - c0 + B - 1) / B;
    T scratch[3][St::M::SCRATCH];
    T* m = st.m.open(row, b0, nblk, scratch[0]);
    T* v = st.v.open(row, b0, nblk, scratch[1]);
    T* vm = c.ams ? st.vm.open(row, b0, nblk, scratch[2]) : nullptr;
    for (int64_t j = 0; j < nblk; ++j) {
      const int64_t e = c0 + j * B;
      large_block(p + e, g + e, CORR ? corr + e : nullptr, std::min(B, c1 - e), m[j], v[j],
                  c.ams ? vm + j : nullptr, c);
    }
    st.m.commit(row, b0, nblk, m);
    st.v.commit(row, b0, nblk, v);
    if (c.ams) st.vm.commit(row, b0, nblk, vm);
  }

  // Elements [e0, e1) of the flattened [rows, n] parameter (cut where partition() cuts: at row
  // starts and at multiples of max(B * TILE, W) inside a row), in tiles of TILE blocks.
  template <int B>
  static void range(const Desc& d, const HyperIn& h, int64_t e0, int64_t e1) {
    const Scalars<T> c = scalars<T>(h, d);
    const int64_t bsize = int64_t(1) << d.level, nb = (d.n + bsize - 1) / bsize;
    const St st(d, nb, c.t);
    const int64_t tile = St::M::TILE >= (int64_t(1) << 40) ? d.n : St::M::TILE * bsize;
    for (int64_t e = e0; e < e1;) {
      const int64_t row = e / d.n, c0 = e % d.n, c1 = std::min(d.n, c0 + (e1 - e));
      for (int64_t t0 = c0; t0 < c1; t0 += tile) {
        const int64_t t1 = std::min(c1, t0 + tile);
        if constexpr (B > 0) {
          small_row<B>(d, st, row, t0, t1, c);
        } else {
          large_row(d, st, row, t0, t1, c);
        }
      }
      e += c1 - c0;
    }
  }
};

// ---------------------------------------------------------------------------------- dispatch
typedef void (*RangeFn)(const Desc&, const HyperIn&, int64_t, int64_t);

// range<B> for B = 2**level while a vector holds whole blocks (B <= W); range<0> (B > W) above.
template <class K, int L = 0>
RangeFn by_level(int64_t level) {
  if constexpr ((1 << L) <= K::W) {
    return level == L ? &K::template range<(1 << L)> : by_level<K, L + 1>(level);
  } else {
    return &K::template range<0>;
  }
}

template <class S, int FMT, class R>
RangeFn pick_level(int64_t level) {
  return by_level<Kernel<S, FMT, R>>(level);
}

// float compute: every format; the 16-bit storages also with correction bits
template <class S, class R>
RangeFn pick_format(const Desc& d) {
  switch (d.format) {
    case 0:
      return pick_level<S, 0, R>(d.level);
    case 8:
      return pick_level<S, 8, R>(d.level);
    case 4:
      return pick_level<S, 4, R>(d.level);
    default:
      return nullptr;
  }
}

template <class S>
RangeFn pick_corr(const Desc& d) {
  switch (d.corr_bits) {
    case 0:
      return pick_format<S, NoCorr>(d);
    case 8:
      return pick_format<S, int8_t>(d);
    case 16:
      return pick_format<S, int16_t>(d);
    default:
      return nullptr;
  }
}

RangeFn pick(const Desc& d) {
  if (d.format != 0 && (d.format != 8 && d.format != 4)) return nullptr;
  switch (d.dtype) {
    case F32:
      return d.corr_bits ? nullptr : pick_format<float, NoCorr>(d);
    case BF16:
      return pick_corr<bf16>(d);
#if defined(__AVX512F__) || (defined(__F16C__) && defined(__AVX__))
    case F16:
      return pick_corr<f16>(d);
#endif
    case F64:  // float64 moments only (the grouped formats' arithmetic is float32)
      return d.corr_bits || d.format ? nullptr : pick_level<double, 0, NoCorr>(d.level);
    default:
      return nullptr;
  }
}

int lanes(const Desc& d) { return d.dtype == F64 ? Vec<double>::W : Vec<float>::W; }

// Where a range may be cut inside parameter d: row starts, and multiples of max(B * G, W) inside
// a row (G = 32 blocks for grouped moments: a group is encoded whole by one thread).
int64_t align_down(const Desc& d, int64_t e) {
  const int64_t tile = (int64_t(1) << d.level) * (d.format ? GROUP : 1);
  const int64_t a = std::max<int64_t>(tile, lanes(d));
  const int64_t row = e / d.n, col = e % d.n;
  return row * d.n + col / a * a;
}

// Estimated bytes moved per element: p read and written (and its correction), g read, each
// moment read and written once per block.
double weight(const Desc& d, bool ams) {
  const double ps = d.dtype == F32 ? 4 : d.dtype == F64 ? 8 : 2;
  const double ss = d.dtype == F64 ? 8 : d.format == 8 ? 1.125 : d.format == 4 ? 0.625 : 4;
  return 3 * ps + 2.0 * double(d.corr_bits) / 8 +
         2 * ss * (ams ? 3 : 2) / double(int64_t(1) << d.level);
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
  return pick(d) != nullptr;
}

// Steps `count` parameters described by `descs` (20 int64 each, see Desc); with `increment`, adds
// 1 to each step count first (once, before the threads start). Returns 0, or 1 + the index of
// the first parameter it cannot take (nothing is written then).
FOAM_API int foam_cpu_step(const int64_t* descs, int64_t count, double lr, double beta1, double beta2,
                  double eps, double weight_decay, double scale, double res_scale, int decoupled,
                  int amsgrad, int maximize, int increment, int threads) {
  static_assert(sizeof(Desc) == 20 * sizeof(int64_t), "descriptor layout");
  const Desc* ds = reinterpret_cast<const Desc*>(descs);
  const HyperIn h{lr, beta1, beta2, eps, weight_decay, scale, res_scale,
                  decoupled, amsgrad, maximize};
  RangeFn stack_fns[64];
  RangeFn* fns = count <= 64 ? stack_fns : new RangeFn[count];
  double total = 0;
  int64_t elements = 0;
  for (int64_t i = 0; i < count; ++i) {
    fns[i] = pick(ds[i]);
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
