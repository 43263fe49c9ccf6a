// lowbit's CPU kernels for weight-only linears: int4 / int8 weights x int8 activations.
//
// Activations are quantized here, per row, in blocks of A = 32 or 64 values along K, symmetric
// (d = absmax / 127, q = round(x / d)), as llama.cpp's Q8_0 does. Integer dot products per block,
// then one float multiply-add per block with (weight scale * activation scale).
//
// int4 weights (codes 0..15, scale s and zero point z per group of G along K):
//   y = sum_g s_g * sum_{k in g} (q_k - z_g) * x_k = sum_blocks s d (q . xq) - sum_g (s z)_g X_g,
//   X_g = sum_{blocks b in g} d_b * (sum xq in b). Signed int4 is stored as q + 8 with z = 8.
//   Per row, per block of A: A / 2 bytes, byte j = code j | code (j + A/2) << 4; rows are
//   stored in block-interleaved quads (see kRowTile).
// int8 weights (symmetric, one scale per output row): y = s_n * sum_blocks d_b (w . xq).
//
// Paths, chosen at run time: AVX512-VNNI (vpdpbusd, u8 x s8 -> s32), AVX2 (vpmaddubsw then
// vpmaddwd: 4-bit x 7-bit pair sums cannot saturate 16 bits; int8 uses |w| x sign(x, w)),
// plain C++ otherwise. Each function carries its own target attribute, so the file builds with
// default flags on any x86-64 (and without the SIMD paths elsewhere).
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#define LOWBIT_X86 1
#else
#define LOWBIT_X86 0
#endif

namespace {

constexpr int kMaxTile = 8;  // activation rows sharing one decoded weight chunk
// Weights are stored in quads of output rows, block-interleaved: quad q, block b holds the four
// rows' blocks side by side. The decode path reads four rows at once; with plain row-major rows
// those were four streams a row apart, which the hardware prefetcher did not follow (the 32000-row
// head ran at a third of the one-row speed from DRAM). Interleaved, every path reads one stream.
// A last quad with fewer rows is padded (its codes are never used).
constexpr int64_t kRowTile = 4;

struct Act {
  std::vector<int8_t> q;     // [M, K]
  std::vector<float> d;      // [M, K / A]
  std::vector<int32_t> sum;  // [M, K / A]
};

// ---- int4 -------------------------------------------------------------------------------------

struct Q4Args {
  const uint8_t* w;    // [N, K / 2]
  const float* s;      // [N, K / G]
  const uint8_t* z;    // [N, K / G]: zero point - qmin (the scale * zero product is formed here,
                       // in float32 as torch would: 3 bytes fewer per group to read)
  const int8_t* xq;    // [M, K]
  const float* dx;     // [M, K / A]
  const float* xg;     // [M, K / G]: sum over the group's blocks of d * sum(xq)
  float* y;            // [M, N]
  int64_t M, N, K, G, A;
};

// Row n's block b: A / 2 bytes.
inline const uint8_t* q4_block(const Q4Args& a, int64_t n, int64_t b) {
  const int64_t half = a.A / 2, nb = a.K / a.A;
  return a.w + ((n / kRowTile) * nb + b) * (kRowTile * half) + (n % kRowTile) * half;
}

inline float zero_term(const Q4Args& a, int64_t n, int64_t m) {
  const int64_t ng = a.K / a.G;
  const float* s = a.s + n * ng;
  const uint8_t* z = a.z + n * ng;
  const float* xg = a.xg + m * ng;
  float t = 0.f;
  for (int64_t g = 0; g < ng; ++g) t += (s[g] * static_cast<float>(z[g])) * xg[g];
  return t;
}

void q4_rows_scalar(const Q4Args& a, int64_t n0, int64_t n1) {
  const int64_t nb = a.K / a.A, half = a.A / 2, ng = a.K / a.G;
  for (int64_t n = n0; n < n1; ++n) {
    for (int64_t m = 0; m < a.M; ++m) {
      const int8_t* xr = a.xq + m * a.K;
      float acc = 0.f;
      for (int64_t b = 0; b < nb; ++b) {
        int32_t dot = 0;
        const uint8_t* wb = q4_block(a, n, b);
        const int8_t* xb = xr + b * a.A;
        for (int64_t j = 0; j < half; ++j) {
          dot += (wb[j] & 15) * xb[j] + (wb[j] >> 4) * xb[j + half];
        }
        acc += a.s[n * ng + b * a.A / a.G] * a.dx[m * nb + b] * static_cast<float>(dot);
      }
      a.y[m * a.N + n] = acc - zero_term(a, n, m);
    }
  }
}

#if LOWBIT_X86
#define LOWBIT_VNNI __attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni,fma")))
#define LOWBIT_AVX2 __attribute__((target("avx2,fma")))

LOWBIT_VNNI inline float hsum512(__m512 v) { return _mm512_reduce_add_ps(v); }

// sum_g (s_g * z_g) * x_g, 16 groups at a time
LOWBIT_VNNI inline float zero_dot(const float* s, const uint8_t* z, const float* x, int64_t n) {
  __m512 acc = _mm512_setzero_ps();
  for (int64_t i = 0; i < n; i += 16) {
    const __mmask16 k = n - i >= 16 ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>((1u << (n - i)) - 1);
    const __m512 zf = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_maskz_loadu_epi8(k, z + i)));
    const __m512 sz = _mm512_mul_ps(_mm512_maskz_loadu_ps(k, s + i), zf);
    acc = _mm512_fmadd_ps(sz, _mm512_maskz_loadu_ps(k, x + i), acc);
  }
  return _mm512_reduce_add_ps(acc);
}

LOWBIT_AVX2 inline float hsum256(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// Blocks of 64: one zmm of codes (32 bytes of nibbles), T activation rows per decoded chunk.
template <int T>
LOWBIT_VNNI void q4_tile_vnni64(const Q4Args& a, int64_t n, int64_t m0) {
  const int64_t nb = a.K / 64, ng = a.K / a.G, per_group = a.G / 64;
  const float* sr = a.s + n * ng;
  const __m256i low = _mm256_set1_epi8(15);
  __m512 acc[T];
  for (int t = 0; t < T; ++t) acc[t] = _mm512_setzero_ps();
  for (int64_t b = 0; b < nb; ++b) {
    const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q4_block(a, n, b)));
    const __m256i lo = _mm256_and_si256(v, low);
    const __m256i hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), low);
    const __m512i w = _mm512_inserti64x4(_mm512_castsi256_si512(lo), hi, 1);
    const float s = sr[b / per_group];
    for (int t = 0; t < T; ++t) {
      const int64_t m = m0 + t;
      const __m512i x = _mm512_loadu_si512(a.xq + m * a.K + b * 64);
      const __m512i dot = _mm512_dpbusd_epi32(_mm512_setzero_si512(), w, x);
      acc[t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), _mm512_set1_ps(s * a.dx[m * nb + b]), acc[t]);
    }
  }
  const float* s = a.s + n * ng;  // the zero term vectorised: scalar, it was half the time at 32 rows
  const uint8_t* z = a.z + n * ng;
  for (int t = 0; t < T; ++t) a.y[(m0 + t) * a.N + n] = hsum512(acc[t]) - zero_dot(s, z, a.xg + (m0 + t) * ng, ng);
}

// Blocks of 32 (groups of 32): one ymm of codes per block.
template <int T>
LOWBIT_VNNI void q4_tile_vnni32(const Q4Args& a, int64_t n, int64_t m0) {
  const int64_t nb = a.K / 32, ng = a.K / a.G, per_group = a.G / 32;
  const float* sr = a.s + n * ng;
  const __m128i low = _mm_set1_epi8(15);
  __m256 acc[T];
  for (int t = 0; t < T; ++t) acc[t] = _mm256_setzero_ps();
  for (int64_t b = 0; b < nb; ++b) {
    const __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(q4_block(a, n, b)));
    const __m256i w = _mm256_set_m128i(_mm_and_si128(_mm_srli_epi16(v, 4), low), _mm_and_si128(v, low));
    const float s = sr[b / per_group];
    for (int t = 0; t < T; ++t) {
      const int64_t m = m0 + t;
      const __m256i x = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(a.xq + m * a.K + b * 32));
      const __m256i dot = _mm256_dpbusd_epi32(_mm256_setzero_si256(), w, x);
      acc[t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot), _mm256_set1_ps(s * a.dx[m * nb + b]), acc[t]);
    }
  }
  const float* s = a.s + n * ng;
  const uint8_t* z = a.z + n * ng;
  for (int t = 0; t < T; ++t) a.y[(m0 + t) * a.N + n] = hsum256(acc[t]) - zero_dot(s, z, a.xg + (m0 + t) * ng, ng);
}

// AVX2: u8 x s8 pair sums via vpmaddubsw (15 * 127 * 2 fits in int16), widened by vpmaddwd.
LOWBIT_AVX2 inline __m256i dot_u8s8_avx2(__m256i w, __m256i x) {
  return _mm256_madd_epi16(_mm256_maddubs_epi16(w, x), _mm256_set1_epi16(1));
}

template <int T>
LOWBIT_AVX2 void q4_tile_avx2(const Q4Args& a, int64_t n, int64_t m0) {
  const int64_t nb = a.K / a.A, ng = a.K / a.G, half = a.A / 2, per_group = a.G / a.A;
  const float* sr = a.s + n * ng;
  __m256 acc[T];
  for (int t = 0; t < T; ++t) acc[t] = _mm256_setzero_ps();
  const __m256i low = _mm256_set1_epi8(15);
  const __m128i low128 = _mm_set1_epi8(15);
  for (int64_t b = 0; b < nb; ++b) {
    const float s = sr[b / per_group];
    if (a.A == 64) {
      const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q4_block(a, n, b)));
      const __m256i lo = _mm256_and_si256(v, low);
      const __m256i hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), low);
      for (int t = 0; t < T; ++t) {
        const int64_t m = m0 + t;
        const int8_t* xb = a.xq + m * a.K + b * 64;
        const __m256i x0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xb));
        const __m256i x1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xb + 32));
        const __m256i dot = _mm256_add_epi32(dot_u8s8_avx2(lo, x0), dot_u8s8_avx2(hi, x1));
        acc[t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot), _mm256_set1_ps(s * a.dx[m * nb + b]), acc[t]);
      }
    } else {
      const __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(q4_block(a, n, b)));
      const __m256i w =
          _mm256_set_m128i(_mm_and_si128(_mm_srli_epi16(v, 4), low128), _mm_and_si128(v, low128));
      for (int t = 0; t < T; ++t) {
        const int64_t m = m0 + t;
        const __m256i x = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(a.xq + m * a.K + b * 32));
        const __m256i dot = dot_u8s8_avx2(w, x);
        acc[t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot), _mm256_set1_ps(s * a.dx[m * nb + b]), acc[t]);
      }
    }
  }
  for (int t = 0; t < T; ++t) a.y[(m0 + t) * a.N + n] = hsum256(acc[t]) - zero_term(a, n, m0 + t);
}

// ---- decode: at most kDecodeRows activation rows (VNNI, blocks of 64) -------------------------
// The tiles above take one output row at a time: at batch 1 that is one fma chain, a division
// per block (b / per_group) and a scalar zero-point sum per row, which left the kernel bound by
// latency at ~12 GB/s of weights. Here R output rows share each activation block (R independent
// chains), groups are walked without a division, and the zero term is one vector dot per row.
constexpr int64_t kDecodeRows = 4;  // M at or below this takes the decode path


template <int R, int M>
LOWBIT_VNNI void q4_decode_vnni64(const Q4Args& a, int64_t n0) {
  const int64_t ng = a.K / a.G, per_group = a.G / 64, nb = a.K / 64;
  const uint8_t* quad = a.w + (n0 / kRowTile) * nb * (kRowTile * 32);  // this quad's blocks, in order
  const __m512i low = _mm512_set1_epi8(15);
  const __m512i nibble_shift = _mm512_inserti64x4(_mm512_setzero_si512(), _mm256_set1_epi16(4), 1);
  __m512 acc[R][M];
  for (int r = 0; r < R; ++r)
    for (int m = 0; m < M; ++m) acc[r][m] = _mm512_setzero_ps();
  for (int64_t g = 0, b = 0; g < ng; ++g) {
    // sum over the group's blocks of dx * dot, then one multiply by the group's scale per row
    __m512 part[R][M];
    for (int r = 0; r < R; ++r)
      for (int m = 0; m < M; ++m) part[r][m] = _mm512_setzero_ps();
    for (int64_t j = 0; j < per_group; ++j, ++b) {
      __m512i x[M];
      __m512 dx[M];
      for (int m = 0; m < M; ++m) {
        x[m] = _mm512_loadu_si512(a.xq + m * a.K + b * 64);
        dx[m] = _mm512_set1_ps(a.dx[m * nb + b]);
      }
      const uint8_t* wb = quad + b * (kRowTile * 32);
      for (int r = 0; r < R; ++r) {
        // the 32 bytes in both halves, the upper half shifted down a nibble: 64 codes in 3 uops
        const __m512i v = _mm512_broadcast_i64x4(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(wb + r * 32)));
        const __m512i w = _mm512_and_si512(_mm512_srlv_epi16(v, nibble_shift), low);
        for (int m = 0; m < M; ++m) {
          const __m512i dot = _mm512_dpbusd_epi32(_mm512_setzero_si512(), w, x[m]);
          part[r][m] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), dx[m], part[r][m]);
        }
      }
    }
    for (int r = 0; r < R; ++r) {
      const __m512 sv = _mm512_set1_ps(a.s[(n0 + r) * ng + g]);
      for (int m = 0; m < M; ++m) acc[r][m] = _mm512_fmadd_ps(part[r][m], sv, acc[r][m]);
    }
  }
  for (int r = 0; r < R; ++r) {
    const float* s = a.s + (n0 + r) * ng;
    const uint8_t* z = a.z + (n0 + r) * ng;
    for (int m = 0; m < M; ++m) a.y[m * a.N + n0 + r] = hsum512(acc[r][m]) - zero_dot(s, z, a.xg + m * ng, ng);
  }
}
#endif  // LOWBIT_X86

enum class Isa { kScalar = 0, kAvx2 = 1, kVnni = 2 };

Isa detect() {
#if LOWBIT_X86
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512vnni") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512vl")) {
    return Isa::kVnni;
  }
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return Isa::kAvx2;
#endif
  return Isa::kScalar;
}

int g_forced = -1;  // tests force a slower path to check it against the same reference

Isa isa() {
  static const Isa found = detect();
  if (g_forced >= 0 && g_forced <= static_cast<int>(found)) return static_cast<Isa>(g_forced);
  return found;
}

// One block of A activations -> int8 codes, scale d and code sum (see the file's header).
void quantize_block_scalar(const float* xb, int64_t A, int8_t* qb, float* d_out, int32_t* sum_out) {
  float amax = 0.f;
  for (int64_t j = 0; j < A; ++j) amax = std::fmax(amax, std::fabs(xb[j]));
  const float d = amax / 127.f;
  int32_t s = 0;
  for (int64_t j = 0; j < A; ++j) {
    // x / d (not x * (1 / d)): the same rounding as the torch reference in the tests
    const int32_t v = d == 0.f ? 0 : static_cast<int32_t>(std::nearbyint(xb[j] / d));
    qb[j] = static_cast<int8_t>(v);
    s += v;
  }
  *d_out = d;
  *sum_out = s;
}

#if LOWBIT_X86
// The same arithmetic 16 lanes at a time: IEEE division and round-to-nearest-even conversion
// (the default rounding mode, as std::nearbyint uses) give the scalar path's codes bit for bit.
LOWBIT_VNNI void quantize_block_vnni(const float* xb, int64_t A, int8_t* qb, float* d_out, int32_t* sum_out) {
  __m512 amax = _mm512_setzero_ps();
  for (int64_t j = 0; j < A; j += 16) amax = _mm512_max_ps(amax, _mm512_abs_ps(_mm512_loadu_ps(xb + j)));
  const float d = _mm512_reduce_max_ps(amax) / 127.f;
  if (d == 0.f) {
    std::memset(qb, 0, A);
    *d_out = 0.f;
    *sum_out = 0;
    return;
  }
  const __m512 dv = _mm512_set1_ps(d);
  __m512i sum = _mm512_setzero_si512();
  for (int64_t j = 0; j < A; j += 16) {
    const __m512i v = _mm512_cvtps_epi32(_mm512_div_ps(_mm512_loadu_ps(xb + j), dv));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(qb + j), _mm512_cvtepi32_epi8(v));
    sum = _mm512_add_epi32(sum, v);
  }
  *d_out = d;
  *sum_out = _mm512_reduce_add_epi32(sum);
}
#endif

void quantize_rows(const float* x, int64_t M, int64_t K, int64_t A, Act& act, Isa which) {
  const int64_t nb = K / A;
  act.q.resize(M * K);
  act.d.resize(M * nb);
  act.sum.resize(M * nb);
  at::parallel_for(0, M * nb, 64, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {  // row-major [M, K]: block i of the flattened rows
#if LOWBIT_X86
      if (which == Isa::kVnni) {
        quantize_block_vnni(x + i * A, A, act.q.data() + i * A, &act.d[i], &act.sum[i]);
        continue;
      }
#endif
      quantize_block_scalar(x + i * A, A, act.q.data() + i * A, &act.d[i], &act.sum[i]);
    }
  });
}

template <typename Fn>
void for_tiles(int64_t M, Fn fn) {
  for (int64_t m0 = 0; m0 < M;) {
    const int64_t t = std::min<int64_t>(kMaxTile, M - m0);
    fn(m0, t);
    m0 += t;
  }
}

#define LOWBIT_TILE_SWITCH(FN, ...)         \
  switch (t) {                              \
    case 1: FN<1>(__VA_ARGS__); break;      \
    case 2: FN<2>(__VA_ARGS__); break;      \
    case 3: FN<3>(__VA_ARGS__); break;      \
    case 4: FN<4>(__VA_ARGS__); break;      \
    case 5: FN<5>(__VA_ARGS__); break;      \
    case 6: FN<6>(__VA_ARGS__); break;      \
    case 7: FN<7>(__VA_ARGS__); break;      \
    default: FN<8>(__VA_ARGS__); break;     \
  }

// FN<R, M>(args..., n) over output rows n0..n1 in steps of kRowTile (the last one shorter),
// M = the activation rows (at most kDecodeRows).
#define LOWBIT_DECODE_M(FN, R, M, ...)        \
  switch (M) {                                \
    case 1: FN<R, 1>(__VA_ARGS__); break;     \
    case 2: FN<R, 2>(__VA_ARGS__); break;     \
    case 3: FN<R, 3>(__VA_ARGS__); break;     \
    default: FN<R, 4>(__VA_ARGS__); break;    \
  }
#define LOWBIT_DECODE(FN, M, n0, n1, ...)                                    \
  for (int64_t n = n0; n < n1; n += kRowTile) {                              \
    switch (std::min<int64_t>(kRowTile, n1 - n)) {                           \
      case 1: LOWBIT_DECODE_M(FN, 1, M, __VA_ARGS__, n) break;                  \
      case 2: LOWBIT_DECODE_M(FN, 2, M, __VA_ARGS__, n) break;                  \
      case 3: LOWBIT_DECODE_M(FN, 3, M, __VA_ARGS__, n) break;                  \
      default: LOWBIT_DECODE_M(FN, 4, M, __VA_ARGS__, n) break;                 \
    }                                                                        \
  }

void q4_rows(const Q4Args& a, int64_t n0, int64_t n1, Isa which) {
#if LOWBIT_X86
  if (which == Isa::kVnni && a.A == 64 && a.M <= kDecodeRows) {
    LOWBIT_DECODE(q4_decode_vnni64, a.M, n0, n1, a)
    return;
  }
  if (which == Isa::kVnni) {
    for (int64_t n = n0; n < n1; ++n) {
      for_tiles(a.M, [&](int64_t m0, int64_t t) {
        if (a.A == 64) {
          LOWBIT_TILE_SWITCH(q4_tile_vnni64, a, n, m0)
        } else {
          LOWBIT_TILE_SWITCH(q4_tile_vnni32, a, n, m0)
        }
      });
    }
    return;
  }
  if (which == Isa::kAvx2) {
    for (int64_t n = n0; n < n1; ++n) {
      for_tiles(a.M, [&](int64_t m0, int64_t t) { LOWBIT_TILE_SWITCH(q4_tile_avx2, a, n, m0) });
    }
    return;
  }
#endif
  q4_rows_scalar(a, n0, n1);
}

void check_cpu_float(const torch::Tensor& t, const char* what) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == torch::kFloat32 && t.is_contiguous(),
              "lowbit q-cpu kernel: ", what, " must be a contiguous float32 CPU tensor");
}

}  // namespace

// Output rows n0..n1 as quads q0..q1 in parallel (a quad is never split between threads).
template <typename Fn>
void parallel_rows(int64_t N, Fn fn) {
  const int64_t quads = (N + kRowTile - 1) / kRowTile;
  at::parallel_for(0, quads, 4, [&](int64_t q0, int64_t q1) {
    fn(q0 * kRowTile, std::min(N, q1 * kRowTile));
  });
}

inline int64_t padded_rows(int64_t n) { return (n + kRowTile - 1) / kRowTile * kRowTile; }

// x [M, K] float32; w [N rounded up to 4, K/2] uint8 (packed as above); s [N, K/G] float32;
// z [N, K/G] uint8 (zero point - qmin).
torch::Tensor q4_linear(torch::Tensor x, torch::Tensor w, torch::Tensor s, torch::Tensor z, int64_t group,
                        int64_t block) {
  check_cpu_float(x, "x");
  check_cpu_float(s, "scale");
  TORCH_CHECK(z.scalar_type() == torch::kUInt8 && z.is_contiguous(), "zero points must be contiguous uint8");
  TORCH_CHECK(w.scalar_type() == torch::kUInt8 && w.is_contiguous() && w.dim() == 2, "packed weight");
  const int64_t M = x.size(0), K = x.size(1), N = s.size(0);
  TORCH_CHECK(block == 32 || block == 64, "block must be 32 or 64");
  TORCH_CHECK(K % group == 0 && group % block == 0 && w.size(1) * 2 == K, "shape mismatch");
  TORCH_CHECK(w.size(0) == padded_rows(N), "packed weight rows must be a multiple of 4");
  TORCH_CHECK(s.size(0) == N && s.size(1) == K / group && z.sizes() == s.sizes(), "scale shape");
  Act act;
  quantize_rows(x.data_ptr<float>(), M, K, block, act, isa());
  const int64_t ng = K / group, nb = K / block, per_group = group / block;
  std::vector<float> xg(M * ng, 0.f);
  for (int64_t m = 0; m < M; ++m) {
    for (int64_t b = 0; b < nb; ++b) {
      xg[m * ng + b / per_group] += act.d[m * nb + b] * static_cast<float>(act.sum[m * nb + b]);
    }
  }
  auto y = torch::empty({M, N}, x.options());
  Q4Args a{w.data_ptr<uint8_t>(), s.data_ptr<float>(), z.data_ptr<uint8_t>(), act.q.data(), act.d.data(),
           xg.data(), y.data_ptr<float>(), M, N, K, group, block};
  const Isa which = isa();
  parallel_rows(N, [&](int64_t n0, int64_t n1) { q4_rows(a, n0, n1, which); });
  return y;
}

// ---- int8 -------------------------------------------------------------------------------------

namespace {

struct Q8Args {
  const int8_t* w;   // [N, K]
  const float* s;    // [N]
  const int8_t* xq;  // [M, K]
  const float* dx;   // [M, K / A]
  const int32_t* xs;  // [M, K / A]: sum of each block's codes
  float* y;
  int64_t M, N, K, A;
};

// Row n's block b: A bytes (the quads of the int4 layout).
inline const int8_t* q8_block(const Q8Args& a, int64_t n, int64_t b) {
  const int64_t nb = a.K / a.A;
  return a.w + ((n / kRowTile) * nb + b) * (kRowTile * a.A) + (n % kRowTile) * a.A;
}

void q8_rows_scalar(const Q8Args& a, int64_t n0, int64_t n1) {
  const int64_t nb = a.K / a.A;
  for (int64_t n = n0; n < n1; ++n) {
    for (int64_t m = 0; m < a.M; ++m) {
      float acc = 0.f;
      for (int64_t b = 0; b < nb; ++b) {
        int32_t dot = 0;
        for (int64_t j = 0; j < a.A; ++j) dot += q8_block(a, n, b)[j] * a.xq[m * a.K + b * a.A + j];
        acc += a.dx[m * nb + b] * static_cast<float>(dot);
      }
      a.y[m * a.N + n] = a.s[n] * acc;
    }
  }
}

#if LOWBIT_X86
// vpdpbusd multiplies u8 x s8: feed |w| and x with w's sign (w = -128 reads as u8 128: still right).
template <int T>
LOWBIT_VNNI void q8_tile_vnni(const Q8Args& a, int64_t n, int64_t m0) {
  const int64_t nb = a.K / a.A;
  __m512 acc[T];
  for (int t = 0; t < T; ++t) acc[t] = _mm512_setzero_ps();
  const __m512i zero = _mm512_setzero_si512();
  if (a.A == 64) {
    for (int64_t b = 0; b < nb; ++b) {
      const __m512i w = _mm512_loadu_si512(q8_block(a, n, b));
      const __m512i aw = _mm512_abs_epi8(w);
      const __mmask64 neg = _mm512_movepi8_mask(w);
      for (int t = 0; t < T; ++t) {
        const int64_t m = m0 + t;
        const __m512i x = _mm512_loadu_si512(a.xq + m * a.K + b * 64);
        const __m512i sx = _mm512_mask_sub_epi8(x, neg, zero, x);
        const __m512i dot = _mm512_dpbusd_epi32(zero, aw, sx);
        acc[t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), _mm512_set1_ps(a.dx[m * nb + b]), acc[t]);
      }
    }
  } else {
    const __m256i zero256 = _mm256_setzero_si256();
    __m256 acc2[T];
    for (int t = 0; t < T; ++t) acc2[t] = _mm256_setzero_ps();
    for (int64_t b = 0; b < nb; ++b) {
      const __m256i w = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q8_block(a, n, b)));
      const __m256i aw = _mm256_abs_epi8(w);
      const __mmask32 neg = _mm256_movepi8_mask(w);
      for (int t = 0; t < T; ++t) {
        const int64_t m = m0 + t;
        const __m256i x = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(a.xq + m * a.K + b * 32));
        const __m256i sx = _mm256_mask_sub_epi8(x, neg, zero256, x);
        const __m256i dot = _mm256_dpbusd_epi32(zero256, aw, sx);
        acc2[t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot), _mm256_set1_ps(a.dx[m * nb + b]), acc2[t]);
      }
    }
    for (int t = 0; t < T; ++t) a.y[(m0 + t) * a.N + n] = a.s[n] * hsum256(acc2[t]);
    return;
  }
  for (int t = 0; t < T; ++t) a.y[(m0 + t) * a.N + n] = a.s[n] * hsum512(acc[t]);
}

// AVX2: vpsignb + vpmaddubsw; |w| <= 128 and |x| <= 127 keep pair sums under 32767.
template <int T>
LOWBIT_AVX2 void q8_tile_avx2(const Q8Args& a, int64_t n, int64_t m0) {
  const int64_t nb = a.K / a.A, steps = a.A / 32;
  __m256 acc[T];
  for (int t = 0; t < T; ++t) acc[t] = _mm256_setzero_ps();
  for (int64_t b = 0; b < nb; ++b) {
    __m256i dot[T];
    for (int t = 0; t < T; ++t) dot[t] = _mm256_setzero_si256();
    for (int64_t j = 0; j < steps; ++j) {
      const __m256i w = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q8_block(a, n, b) + j * 32));
      const __m256i aw = _mm256_sign_epi8(w, w);
      for (int t = 0; t < T; ++t) {
        const int8_t* xb = a.xq + (m0 + t) * a.K + b * a.A + j * 32;
        const __m256i x = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xb));
        dot[t] = _mm256_add_epi32(dot[t], dot_u8s8_avx2(aw, _mm256_sign_epi8(x, w)));
      }
    }
    for (int t = 0; t < T; ++t) {
      acc[t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot[t]), _mm256_set1_ps(a.dx[(m0 + t) * nb + b]), acc[t]);
    }
  }
  for (int t = 0; t < T; ++t) a.y[(m0 + t) * a.N + n] = a.s[n] * hsum256(acc[t]);
}

// Decode (at most kDecodeRows activation rows): vpdpbusd multiplies u8 x s8, so the weight is
// read as w ^ 0x80 = w + 128 (u8) and each block's accumulator starts at -128 * sum(x codes) in
// one lane: the block's integer dot stays exact, with two instructions fewer per row than the
// |w| x sign(x, w) form, and R output rows share each activation block (R fma chains).
template <int R, int M>
LOWBIT_VNNI void q8_decode_vnni(const Q8Args& a, int64_t n0) {
  const int64_t nb = a.K / a.A;
  float out[R][M];
  if (a.A == 64) {
    const __m512i flip = _mm512_set1_epi8(static_cast<char>(0x80));
    __m512 acc[R][M];
    for (int r = 0; r < R; ++r)
      for (int m = 0; m < M; ++m) acc[r][m] = _mm512_setzero_ps();
    for (int64_t b = 0; b < nb; ++b) {
      __m512i x[M], init[M];
      __m512 dx[M];
      for (int m = 0; m < M; ++m) {
        x[m] = _mm512_loadu_si512(a.xq + m * a.K + b * 64);
        init[m] = _mm512_maskz_set1_epi32(1, -128 * a.xs[m * nb + b]);
        dx[m] = _mm512_set1_ps(a.dx[m * nb + b]);
      }
      for (int r = 0; r < R; ++r) {
        const __m512i w = _mm512_xor_si512(_mm512_loadu_si512(q8_block(a, n0 + r, b)), flip);
        for (int m = 0; m < M; ++m) {
          const __m512i dot = _mm512_dpbusd_epi32(init[m], w, x[m]);
          acc[r][m] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), dx[m], acc[r][m]);
        }
      }
    }
    for (int r = 0; r < R; ++r)
      for (int m = 0; m < M; ++m) out[r][m] = hsum512(acc[r][m]);
  } else {
    const __m256i flip = _mm256_set1_epi8(static_cast<char>(0x80));
    __m256 acc[R][M];
    for (int r = 0; r < R; ++r)
      for (int m = 0; m < M; ++m) acc[r][m] = _mm256_setzero_ps();
    for (int64_t b = 0; b < nb; ++b) {
      __m256i x[M], init[M];
      __m256 dx[M];
      for (int m = 0; m < M; ++m) {
        x[m] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(a.xq + m * a.K + b * 32));
        init[m] = _mm256_maskz_set1_epi32(1, -128 * a.xs[m * nb + b]);
        dx[m] = _mm256_set1_ps(a.dx[m * nb + b]);
      }
      for (int r = 0; r < R; ++r) {
        const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q8_block(a, n0 + r, b)));
        const __m256i w = _mm256_xor_si256(v, flip);
        for (int m = 0; m < M; ++m) {
          const __m256i dot = _mm256_dpbusd_epi32(init[m], w, x[m]);
          acc[r][m] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot), dx[m], acc[r][m]);
        }
      }
    }
    for (int r = 0; r < R; ++r)
      for (int m = 0; m < M; ++m) out[r][m] = hsum256(acc[r][m]);
  }
  for (int r = 0; r < R; ++r)
    for (int m = 0; m < M; ++m) a.y[m * a.N + n0 + r] = a.s[n0 + r] * out[r][m];
}
#endif

void q8_rows(const Q8Args& a, int64_t n0, int64_t n1, Isa which) {
#if LOWBIT_X86
  if (which == Isa::kVnni && a.M <= kDecodeRows) {
    LOWBIT_DECODE(q8_decode_vnni, a.M, n0, n1, a)
    return;
  }
  if (which == Isa::kVnni || which == Isa::kAvx2) {
    for (int64_t n = n0; n < n1; ++n) {
      for_tiles(a.M, [&](int64_t m0, int64_t t) {
        if (which == Isa::kVnni) {
          LOWBIT_TILE_SWITCH(q8_tile_vnni, a, n, m0)
        } else {
          LOWBIT_TILE_SWITCH(q8_tile_avx2, a, n, m0)
        }
      });
    }
    return;
  }
#endif
  q8_rows_scalar(a, n0, n1);
}

}  // namespace

// x [M, K] float32; w [N rounded up to 4, K] int8 codes in quads of rows; s [N] float32 row scales.
torch::Tensor q8_linear(torch::Tensor x, torch::Tensor w, torch::Tensor s, int64_t block) {
  check_cpu_float(x, "x");
  check_cpu_float(s, "scale");
  TORCH_CHECK(w.scalar_type() == torch::kInt8 && w.is_contiguous() && w.dim() == 2, "int8 weight");
  const int64_t M = x.size(0), K = x.size(1), N = s.numel();
  TORCH_CHECK(block == 32 || block == 64, "block must be 32 or 64");
  TORCH_CHECK(K % block == 0 && w.size(1) == K && w.size(0) == padded_rows(N), "shape mismatch");
  Act act;
  quantize_rows(x.data_ptr<float>(), M, K, block, act, isa());
  auto y = torch::empty({M, N}, x.options());
  Q8Args a{w.data_ptr<int8_t>(), s.data_ptr<float>(), act.q.data(), act.d.data(), act.sum.data(),
           y.data_ptr<float>(), M, N, K, block};
  const Isa which = isa();
  parallel_rows(N, [&](int64_t n0, int64_t n1) { q8_rows(a, n0, n1, which); });
  return y;
}

// The instruction set the kernels run with here: "avx512-vnni", "avx2" or "scalar".
std::string isa_name() {
  switch (isa()) {
    case Isa::kVnni: return "avx512-vnni";
    case Isa::kAvx2: return "avx2";
    default: return "scalar";
  }
}

// Tests: run a slower path (0 scalar, 1 avx2; -1 the best one) to check it on this machine.
void force_isa(int64_t level) { g_forced = static_cast<int>(level); }

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("q4_linear", &q4_linear, "int4 weights x int8 activations (see the file's header)");
  m.def("q8_linear", &q8_linear, "int8 weights x int8 activations (see the file's header)");
  m.def("isa", &isa_name, "the instruction set in use");
  m.def("force_isa", &force_isa, "tests: force a slower path");
}
