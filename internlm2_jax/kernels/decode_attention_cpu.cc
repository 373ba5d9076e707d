// One query token per sequence against a static KV cache, for XLA:CPU (an XLA FFI custom call): grouped-query
// attention with a precomputed boolean mask, fp32 throughout, the softmax normalised after the PV sum as the XLA
// reference does, and a fully masked row giving zeros.
//
// Why a hand-written kernel: XLA:CPU runs a decode step's two attention products as batched library matmuls of
// [query heads per kv head, head_dim] x [head_dim, keys], about 9 us per (row, kv head) whatever their size: at
// 16 rows x 2 kv heads x 256 keys, 0.9 ms per layer for 4 MB of K/V, half of an int8 decode step. Here each
// (row, kv head) reads its keys and values once, for all its query heads.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

#include "cpu_parallel.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr int64_t kLanes = 16;  // independent partial results: vectorisable reductions without reassociation

float Dot(const float* a, const float* b, int64_t n) {
  float part[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes)
    for (int64_t l = 0; l < kLanes; ++l) part[l] += a[i + l] * b[i + l];
  float sum = 0.0f;
  for (; i < n; ++i) sum += a[i] * b[i];
  for (float p : part) sum += p;
  return sum;
}

float Max(const float* a, int64_t n) {
  float part[kLanes];
  std::fill(part, part + kLanes, -std::numeric_limits<float>::infinity());
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes)
    for (int64_t l = 0; l < kLanes; ++l) part[l] = part[l] > a[i + l] ? part[l] : a[i + l];
  float top = -std::numeric_limits<float>::infinity();
  for (; i < n; ++i) top = std::max(top, a[i]);
  for (float p : part) top = std::max(top, p);
  return top;
}

// e^x for x <= 0 to about 1e-7 relative (x below -87 gives ~1e-38): 2^n times a degree-6 polynomial on
// [-ln2/2, ln2/2], in plain arithmetic the compiler vectorises (a libm call per score cost 0.6 ms a layer).
inline float ExpNonPositive(float x) {
  x = std::max(x, -87.0f);
  const float n = std::floor(x * 1.44269504f + 0.5f);
  const float r = x - n * 0.693145751953125f - n * 1.428606765330187e-06f;
  const float p = 1.0f + r * (1.0f + r * (0.5f + r * (1.0f / 6 + r * (1.0f / 24 + r * (1.0f / 120 + r / 720)))));
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float two_n;
  std::memcpy(&two_n, &bits, sizeof two_n);
  return p * two_n;
}

// scores[g, j] = q_g . k_j * scale for the attended keys j, -inf for the others.
void Scores(const float* q, const float* k, const bool* mask, float scale, int64_t G, int64_t S, int64_t D,
            float* scores) {
  constexpr float kNone = -std::numeric_limits<float>::infinity();
#if defined(__AVX512F__)
  if (D % 16 == 0) {
    for (int64_t j = 0; j < S; ++j) {
      if (!mask[j]) {
        for (int64_t g = 0; g < G; ++g) scores[g * S + j] = kNone;
        continue;
      }
      const float* kj = k + j * D;
      for (int64_t g0 = 0; g0 < G; g0 += 4) {  // each key row loaded once for up to 4 query heads
        const int64_t heads = std::min<int64_t>(4, G - g0);
        __m512 acc[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps()};
        for (int64_t d = 0; d < D; d += 16) {
          const __m512 kv = _mm512_loadu_ps(kj + d);
          for (int64_t g = 0; g < heads; ++g)
            acc[g] = _mm512_fmadd_ps(_mm512_loadu_ps(q + (g0 + g) * D + d), kv, acc[g]);
        }
        for (int64_t g = 0; g < heads; ++g) scores[(g0 + g) * S + j] = _mm512_reduce_add_ps(acc[g]) * scale;
      }
    }
    return;
  }
#endif
  for (int64_t j = 0; j < S; ++j)
    for (int64_t g = 0; g < G; ++g) scores[g * S + j] = mask[j] ? Dot(q + g * D, k + j * D, D) * scale : kNone;
}

// out[g] = sum_j p[g, j] v_j for probabilities p [G, S] (0 at masked keys).
void WeightedValues(const float* p, const float* v, int64_t G, int64_t S, int64_t D, float* out) {
#if defined(__AVX512F__)
  if (D % 64 == 0) {
    for (int64_t d = 0; d < D; d += 64)  // 4 vectors of head_dim x up to 4 query heads of accumulators
      for (int64_t g0 = 0; g0 < G; g0 += 4) {
        const int64_t heads = std::min<int64_t>(4, G - g0);
        __m512 acc[4][4];
        for (auto& row : acc)
          for (auto& a : row) a = _mm512_setzero_ps();
        for (int64_t j = 0; j < S; ++j) {
          const float* vj = v + j * D + d;
          const __m512 v0 = _mm512_loadu_ps(vj), v1 = _mm512_loadu_ps(vj + 16), v2 = _mm512_loadu_ps(vj + 32),
                       v3 = _mm512_loadu_ps(vj + 48);
          for (int64_t g = 0; g < heads; ++g) {
            const __m512 pg = _mm512_set1_ps(p[(g0 + g) * S + j]);
            acc[g][0] = _mm512_fmadd_ps(pg, v0, acc[g][0]);
            acc[g][1] = _mm512_fmadd_ps(pg, v1, acc[g][1]);
            acc[g][2] = _mm512_fmadd_ps(pg, v2, acc[g][2]);
            acc[g][3] = _mm512_fmadd_ps(pg, v3, acc[g][3]);
          }
        }
        for (int64_t g = 0; g < heads; ++g)
          for (int c = 0; c < 4; ++c) _mm512_storeu_ps(out + (g0 + g) * D + d + 16 * c, acc[g][c]);
      }
    return;
  }
#endif
  std::fill(out, out + G * D, 0.0f);
  for (int64_t g = 0; g < G; ++g)
    for (int64_t j = 0; j < S; ++j) {
      const float pg = p[g * S + j];
      for (int64_t d = 0; d < D; ++d) out[g * D + d] += pg * v[j * D + d];
    }
}

// Query heads [kh * G, kh * G + G) of row b: q [G, D], k and v [S, D], scores [G, S] scratch.
void AttendOneHead(const float* q, const float* k, const float* v, const bool* mask, float* out, float scale,
                   int64_t G, int64_t S, int64_t D, float* scores) {
  constexpr float kNone = -std::numeric_limits<float>::infinity();
  Scores(q, k, mask, scale, G, S, D, scores);
  for (int64_t g = 0; g < G; ++g) {
    float* s = scores + g * S;
    const float top = Max(s, S);
    if (top == kNone) {  // no key attended: zeros, as the reference
      std::fill(s, s + S, 0.0f);
      continue;
    }
    float total[kLanes] = {};
    for (int64_t j = 0; j < S; ++j) {  // masked keys (-inf) give exactly 0
      s[j] = mask[j] ? ExpNonPositive(s[j] - top) : 0.0f;
      total[j % kLanes] += s[j];
    }
    float sum = 0.0f;
    for (float t : total) sum += t;
    const float inverse = 1.0f / sum;
    for (int64_t j = 0; j < S; ++j) s[j] *= inverse;
  }
  WeightedValues(scores, v, G, S, D, out);
}

ffi::Error DecodeAttentionImpl(ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k, ffi::Buffer<ffi::F32> v,
                               ffi::Buffer<ffi::PRED> mask, ffi::ResultBuffer<ffi::F32> out, float scale,
                               ffi::ThreadPool pool) {
  const auto qd = q.dimensions(), kd = k.dimensions(), vd = v.dimensions(), md = mask.dimensions();
  if (qd.size() != 3 || kd.size() != 4 || !std::equal(kd.begin(), kd.end(), vd.begin(), vd.end()) ||
      md.size() != 2 || kd[0] != qd[0] ||
      kd[3] != qd[2] || qd[1] % kd[1] != 0 || md[0] != qd[0] || md[1] != kd[2])
    return ffi::Error::InvalidArgument(
        "decode_attention expects q [B, H, D], k and v [B, KV, S, D] and mask [B, S], H a multiple of KV");
  const int64_t B = qd[0], H = qd[1], D = qd[2], KV = kd[1], S = kd[2], G = H / KV;
  const float* qp = q.typed_data();
  const float* kp = k.typed_data();
  const float* vp = v.typed_data();
  const bool* mp = mask.typed_data();
  float* op = out->typed_data();
  internlm2_jax::ParallelFor(pool, B * KV, B * KV * S * D >= (1 << 15), [=](int64_t first, int64_t last) {
    std::vector<float> scores(G * S);
    for (int64_t unit = first; unit < last; ++unit) {
      const int64_t b = unit / KV, kh = unit % KV;
      AttendOneHead(qp + (b * H + kh * G) * D, kp + unit * S * D, vp + unit * S * D, mp + b * S,
                    op + (b * H + kh * G) * D, scale, G, S, D, scores.data());
    }
  });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(DecodeAttention, DecodeAttentionImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::PRED>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<float>("scale")
                                  .Ctx<ffi::ThreadPool>());
