// One query token per sequence against a KV cache, for XLA:CPU (XLA FFI custom calls): grouped-query attention in
// fp32, over the static cache with a precomputed boolean mask (DecodeAttention) or over one layer of the paged
// cache through each row's page table (PagedDecodeAttention); a row that attends to nothing gives zeros.
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

// The key (or value) rows of one (sequence, kv head): contiguous [S, D], or spread over the pages of a page table.
struct Rows {
  const float* base;     // the first row; with pages, row 0 of page 0
  const int32_t* pages;  // page ids of the sequence, or nullptr for contiguous rows
  int64_t page_size, D;
  const float* operator[](int64_t j) const {
    return pages == nullptr ? base + j * D : base + (pages[j / page_size] * page_size + j % page_size) * D;
  }
};

// scores[g, j] = q_g . k_j * scale for the attended keys j (mask nullptr: all), -inf for the others.
void Scores(const float* q, const Rows& k, const bool* mask, float scale, int64_t G, int64_t S, int64_t D,
            float* scores) {
  constexpr float kNone = -std::numeric_limits<float>::infinity();
#if defined(__AVX512F__)
  if (D % 16 == 0) {
    for (int64_t j = 0; j < S; ++j) {
      if (mask != nullptr && !mask[j]) {
        for (int64_t g = 0; g < G; ++g) scores[g * S + j] = kNone;
        continue;
      }
      const float* kj = k[j];
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
    for (int64_t g = 0; g < G; ++g)
      scores[g * S + j] = mask == nullptr || mask[j] ? Dot(q + g * D, k[j], D) * scale : kNone;
}

// out[g] = sum_j p[g, j] v_j for probabilities p [G, S] (0 at masked keys).
void WeightedValues(const float* p, const Rows& v, int64_t G, int64_t S, int64_t D, float* out) {
#if defined(__AVX512F__)
  if (D % 64 == 0) {
    for (int64_t d = 0; d < D; d += 64)  // 4 vectors of head_dim x up to 4 query heads of accumulators
      for (int64_t g0 = 0; g0 < G; g0 += 4) {
        const int64_t heads = std::min<int64_t>(4, G - g0);
        __m512 acc[4][4];
        for (auto& row : acc)
          for (auto& a : row) a = _mm512_setzero_ps();
        for (int64_t j = 0; j < S; ++j) {
          const float* vj = v[j] + d;
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
      for (int64_t d = 0; d < D; ++d) out[g * D + d] += pg * v[j][d];
    }
}

// Query heads [kh * G, kh * G + G) of one row: q [G, D] over S keys and values, scores [G, S] scratch.
void AttendOneHead(const float* q, const Rows& k, const Rows& v, const bool* mask, float* out, float scale,
                   int64_t G, int64_t S, int64_t D, float* scores) {
  if (S == 0) {
    std::fill(out, out + G * D, 0.0f);
    return;
  }
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
      s[j] = mask == nullptr || mask[j] ? ExpNonPositive(s[j] - top) : 0.0f;
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
      AttendOneHead(qp + (b * H + kh * G) * D, Rows{kp + unit * S * D, nullptr, 0, D},
                    Rows{vp + unit * S * D, nullptr, 0, D}, mp + b * S, op + (b * H + kh * G) * D, scale, G, S, D,
                    scores.data());
    }
  });
  return ffi::Error::Success();
}

// The paged cache of one layer: row b's query (at position lengths[b] - 1, or padding when q_lengths[b] is 0)
// attends to its first lengths[b] tokens, read in place through its page table.
ffi::Error PagedDecodeAttentionImpl(ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k, ffi::Buffer<ffi::F32> v,
                                    ffi::Buffer<ffi::S32> page_table, ffi::Buffer<ffi::S32> lengths,
                                    ffi::Buffer<ffi::S32> q_lengths, ffi::ResultBuffer<ffi::F32> out, float scale,
                                    ffi::ThreadPool pool) {
  const auto qd = q.dimensions(), kd = k.dimensions(), vd = v.dimensions(), td = page_table.dimensions();
  if (qd.size() != 3 || kd.size() != 4 || !std::equal(kd.begin(), kd.end(), vd.begin(), vd.end()) ||
      td.size() != 2 || td[0] != qd[0] || kd[3] != qd[2] || qd[1] % kd[0] != 0 ||
      lengths.element_count() != qd[0] || q_lengths.element_count() != qd[0])
    return ffi::Error::InvalidArgument(
        "paged decode attention expects q [B, H, D], k and v pages [KV, P, page, D], page_table [B, W] and "
        "lengths, q_lengths [B], H a multiple of KV");
  const int64_t B = qd[0], H = qd[1], D = qd[2], KV = kd[0], P = kd[1], page = kd[2], W = td[1], G = H / KV;
  const int32_t* table = page_table.typed_data();
  const int32_t* length = lengths.typed_data();
  const int32_t* queries = q_lengths.typed_data();
  int64_t longest = 0;
  for (int64_t b = 0; b < B; ++b) {  // checked up front: an unchecked page id would read outside the cache
    const int64_t keys = queries[b] > 0 ? length[b] : 0;
    if (keys < 0 || keys > W * page)
      return ffi::Error::InvalidArgument("a row's length exceeds its page table");
    for (int64_t i = 0; i < (keys + page - 1) / page; ++i)
      if (table[b * W + i] < 0 || table[b * W + i] >= P) return ffi::Error::InvalidArgument("page id out of range");
    longest = std::max(longest, keys);
  }
  const float* qp = q.typed_data();
  const float* kp = k.typed_data();
  const float* vp = v.typed_data();
  float* op = out->typed_data();
  internlm2_jax::ParallelFor(pool, B * KV, B * KV * longest * D >= (1 << 15), [=](int64_t first, int64_t last) {
    std::vector<float> scores(G * longest);
    for (int64_t unit = first; unit < last; ++unit) {
      const int64_t b = unit / KV, kh = unit % KV;
      const int64_t keys = queries[b] > 0 ? length[b] : 0;
      AttendOneHead(qp + (b * H + kh * G) * D, Rows{kp + kh * P * page * D, table + b * W, page, D},
                    Rows{vp + kh * P * page * D, table + b * W, page, D}, nullptr, op + (b * H + kh * G) * D, scale,
                    G, keys, D, scores.data());
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

XLA_FFI_DEFINE_HANDLER_SYMBOL(PagedDecodeAttention, PagedDecodeAttentionImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<float>("scale")
                                  .Ctx<ffi::ThreadPool>());
