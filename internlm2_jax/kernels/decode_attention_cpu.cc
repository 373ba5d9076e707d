// One query token per sequence against a KV cache, for XLA:CPU (XLA FFI custom calls): grouped-query attention in
// fp32, over the static cache with a precomputed boolean mask (DecodeAttention) or over one layer of the paged
// cache through each row's page table (PagedDecodeAttention, or PagedDecodeAttentionQuantized for int8 / int4
// pages: model/kv_quant.py); a row that attends to nothing gives zeros.
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
#include <utility>
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

// scores[g * stride + j] = q_g . k_j * scale for the attended keys j < S (mask nullptr: all), -inf for the others.
void Scores(const float* q, const Rows& k, const bool* mask, float scale, int64_t G, int64_t S, int64_t D,
            int64_t stride, float* scores) {
  constexpr float kNone = -std::numeric_limits<float>::infinity();
#if defined(__AVX512F__)
  if (D % 16 == 0) {
    for (int64_t j = 0; j < S; ++j) {
      if (mask != nullptr && !mask[j]) {
        for (int64_t g = 0; g < G; ++g) scores[g * stride + j] = kNone;
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
        for (int64_t g = 0; g < heads; ++g) scores[(g0 + g) * stride + j] = _mm512_reduce_add_ps(acc[g]) * scale;
      }
    }
    return;
  }
#endif
  for (int64_t j = 0; j < S; ++j)
    for (int64_t g = 0; g < G; ++g)
      scores[g * stride + j] = mask == nullptr || mask[j] ? Dot(q + g * D, k[j], D) * scale : kNone;
}

// out[g] += sum_j p[g * stride + j] v_j over S keys, for probabilities p (0 at masked keys).
void WeightedValues(const float* p, const Rows& v, int64_t G, int64_t S, int64_t D, int64_t stride, float* out) {
#if defined(__AVX512F__)
  if (D % 64 == 0) {
    for (int64_t d = 0; d < D; d += 64)  // 4 vectors of head_dim x up to 4 query heads of accumulators
      for (int64_t g0 = 0; g0 < G; g0 += 4) {
        const int64_t heads = std::min<int64_t>(4, G - g0);
        __m512 acc[4][4];
        for (int64_t g = 0; g < heads; ++g)
          for (int c = 0; c < 4; ++c) acc[g][c] = _mm512_loadu_ps(out + (g0 + g) * D + d + 16 * c);
        for (int64_t j = 0; j < S; ++j) {
          const float* vj = v[j] + d;
          const __m512 v0 = _mm512_loadu_ps(vj), v1 = _mm512_loadu_ps(vj + 16), v2 = _mm512_loadu_ps(vj + 32),
                       v3 = _mm512_loadu_ps(vj + 48);
          for (int64_t g = 0; g < heads; ++g) {
            const __m512 pg = _mm512_set1_ps(p[(g0 + g) * stride + j]);
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
  for (int64_t g = 0; g < G; ++g)
    for (int64_t j = 0; j < S; ++j) {
      const float pg = p[g * stride + j];
      for (int64_t d = 0; d < D; ++d) out[g * D + d] += pg * v[j][d];
    }
}

// Float keys or values: one block, the rows themselves.
struct FloatRows {
  static constexpr int64_t kBlock = std::numeric_limits<int64_t>::max();
  Rows rows;
  Rows Block(int64_t, int64_t, float*) const { return rows; }
};

// Quantized keys or values of one kv head through a page table (model/kv_quant.py): uint8 codes, one per element
// (int8) or two per byte (int4: element 2i in the high nibble), and an fp32 (scale, zero) pair per row; a row is
// (code - zero) * scale, as the XLA reference dequantizes it. Blocks of kBlock rows are decoded into fp32 scratch
// (L1-resident), which the float products then read.
struct QuantizedRows {
  static constexpr int64_t kBlock = 64;
  const uint8_t* codes;       // row 0 of page 0 of this kv head
  const float* scale_zero;    // its (scale, zero) pair
  const int32_t* pages;       // page ids of the sequence
  int64_t page_size, D;
  bool int4;
  // Rows [first, first + n) decoded into scratch [n, D].
  Rows Block(int64_t first, int64_t n, float* scratch) const {
    const int64_t row_bytes = int4 ? D / 2 : D;
    for (int64_t j = 0; j < n; ++j) {
      const int64_t slot = pages[(first + j) / page_size] * page_size + (first + j) % page_size;
      const uint8_t* c = codes + slot * row_bytes;
      const float scale = scale_zero[2 * slot], zero = scale_zero[2 * slot + 1];
      float* row = scratch + j * D;
      if (int4) {
        for (int64_t i = 0; i < D / 2; ++i) {
          row[2 * i] = (static_cast<float>(c[i] >> 4) - zero) * scale;
          row[2 * i + 1] = (static_cast<float>(c[i] & 0xF) - zero) * scale;
        }
      } else {
        for (int64_t d = 0; d < D; ++d) row[d] = (static_cast<float>(c[d]) - zero) * scale;
      }
    }
    return Rows{scratch, nullptr, 0, D};
  }
};

// Query heads [kh * G, kh * G + G) of one row: q [G, D] over S keys and values (Source: FloatRows or QuantizedRows),
// scores [G, S] scratch, block [Source::kBlock, D] scratch for decoded rows.
template <typename Source>
void AttendOneHead(const float* q, const Source& k, const Source& v, const bool* mask, float* out, float scale,
                   int64_t G, int64_t S, int64_t D, float* scores, float* block) {
  std::fill(out, out + G * D, 0.0f);
  if (S == 0) return;
  constexpr float kNone = -std::numeric_limits<float>::infinity();
  for (int64_t first = 0, n; first < S; first += n) {
    n = std::min(S - first, Source::kBlock);
    Scores(q, k.Block(first, n, block), mask == nullptr ? nullptr : mask + first, scale, G, n, D, S, scores + first);
  }
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
  for (int64_t first = 0, n; first < S; first += n) {
    n = std::min(S - first, Source::kBlock);
    WeightedValues(scores + first, v.Block(first, n, block), G, n, D, S, out);
  }
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
      AttendOneHead(qp + (b * H + kh * G) * D, FloatRows{Rows{kp + unit * S * D, nullptr, 0, D}},
                    FloatRows{Rows{vp + unit * S * D, nullptr, 0, D}}, mp + b * S, op + (b * H + kh * G) * D, scale,
                    G, S, D, scores.data(), nullptr);
    }
  });
  return ffi::Error::Success();
}

// The page tables of a paged call, checked up front (an unchecked page id would read outside the cache); sets the
// longest row's keys. Row b's query (at position lengths[b] - 1, or padding when q_lengths[b] is 0) attends to its
// first lengths[b] tokens.
ffi::Error CheckPageTables(const int32_t* table, const int32_t* length, const int32_t* queries, int64_t B, int64_t W,
                           int64_t page, int64_t P, int64_t* longest) {
  *longest = 0;
  for (int64_t b = 0; b < B; ++b) {
    const int64_t keys = queries[b] > 0 ? length[b] : 0;
    if (keys < 0 || keys > W * page)
      return ffi::Error::InvalidArgument("a row's length exceeds its page table");
    for (int64_t i = 0; i < (keys + page - 1) / page; ++i)
      if (table[b * W + i] < 0 || table[b * W + i] >= P) return ffi::Error::InvalidArgument("page id out of range");
    *longest = std::max(*longest, keys);
  }
  return ffi::Error::Success();
}

// Every (row, kv head) of a paged call; rows(kv head, row) gives the Source of its keys and of its values.
template <typename MakeRows>
void AttendPaged(ffi::ThreadPool& pool, const float* qp, float* op, const int32_t* length, const int32_t* queries,
                 float scale, int64_t B, int64_t H, int64_t KV, int64_t D, int64_t longest, int64_t block_rows,
                 MakeRows rows) {
  const int64_t G = H / KV;
  internlm2_jax::ParallelFor(pool, B * KV, B * KV * longest * D >= (1 << 15), [=](int64_t first, int64_t last) {
    std::vector<float> scores(G * longest), block(block_rows * D);
    for (int64_t unit = first; unit < last; ++unit) {
      const int64_t b = unit / KV, kh = unit % KV;
      const auto [k, v] = rows(kh, b);
      AttendOneHead(qp + (b * H + kh * G) * D, k, v, nullptr, op + (b * H + kh * G) * D, scale, G,
                    queries[b] > 0 ? length[b] : 0, D, scores.data(), block.data());
    }
  });
}

constexpr char kPagedShapes[] =
    "paged decode attention expects q [B, H, D], k and v pages [KV, P, page, D], page_table [B, W] and lengths, "
    "q_lengths [B], H a multiple of KV";

// One layer of the paged cache in fp32, read in place through each row's page table.
ffi::Error PagedDecodeAttentionImpl(ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k, ffi::Buffer<ffi::F32> v,
                                    ffi::Buffer<ffi::S32> page_table, ffi::Buffer<ffi::S32> lengths,
                                    ffi::Buffer<ffi::S32> q_lengths, ffi::ResultBuffer<ffi::F32> out, float scale,
                                    ffi::ThreadPool pool) {
  const auto qd = q.dimensions(), kd = k.dimensions(), vd = v.dimensions(), td = page_table.dimensions();
  if (qd.size() != 3 || kd.size() != 4 || !std::equal(kd.begin(), kd.end(), vd.begin(), vd.end()) ||
      td.size() != 2 || td[0] != qd[0] || kd[3] != qd[2] || qd[1] % kd[0] != 0 ||
      lengths.element_count() != qd[0] || q_lengths.element_count() != qd[0])
    return ffi::Error::InvalidArgument(kPagedShapes);
  const int64_t B = qd[0], H = qd[1], D = qd[2], KV = kd[0], P = kd[1], page = kd[2], W = td[1];
  const int32_t* table = page_table.typed_data();
  int64_t longest;
  if (auto error = CheckPageTables(table, lengths.typed_data(), q_lengths.typed_data(), B, W, page, P, &longest);
      error.failure())
    return error;
  const float* kp = k.typed_data();
  const float* vp = v.typed_data();
  AttendPaged(pool, q.typed_data(), out->typed_data(), lengths.typed_data(), q_lengths.typed_data(), scale, B, H, KV,
              D, longest, 0, [=](int64_t kh, int64_t b) {
                return std::pair{FloatRows{Rows{kp + kh * P * page * D, table + b * W, page, D}},
                                 FloatRows{Rows{vp + kh * P * page * D, table + b * W, page, D}}};
              });
  return ffi::Error::Success();
}

// One layer of the quantized paged cache: codes [KV, P, page, D] (int8) or [KV, P, page, D / 2] (int4, bits 4)
// and fp32 (scale, zero) pairs [KV, P, page, 2] for K and for V.
ffi::Error PagedDecodeAttentionQuantizedImpl(ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::U8> k_codes,
                                             ffi::Buffer<ffi::F32> k_scale_zero, ffi::Buffer<ffi::U8> v_codes,
                                             ffi::Buffer<ffi::F32> v_scale_zero, ffi::Buffer<ffi::S32> page_table,
                                             ffi::Buffer<ffi::S32> lengths, ffi::Buffer<ffi::S32> q_lengths,
                                             ffi::ResultBuffer<ffi::F32> out, float scale, int32_t bits,
                                             ffi::ThreadPool pool) {
  const auto qd = q.dimensions(), kd = k_codes.dimensions(), vd = v_codes.dimensions(),
             ksd = k_scale_zero.dimensions(), vsd = v_scale_zero.dimensions(), td = page_table.dimensions();
  if (bits != 8 && bits != 4) return ffi::Error::InvalidArgument("quantized pages have 8 or 4 bits per code");
  const bool int4 = bits == 4;
  if (qd.size() != 3 || kd.size() != 4 || !std::equal(kd.begin(), kd.end(), vd.begin(), vd.end()) ||
      ksd.size() != 4 || !std::equal(ksd.begin(), ksd.end(), vsd.begin(), vsd.end()) ||
      !std::equal(kd.begin(), kd.end() - 1, ksd.begin()) || ksd[3] != 2 || td.size() != 2 || td[0] != qd[0] ||
      kd[3] * (int4 ? 2 : 1) != qd[2] || qd[1] % kd[0] != 0 || lengths.element_count() != qd[0] ||
      q_lengths.element_count() != qd[0])
    return ffi::Error::InvalidArgument(
        "quantized paged decode attention expects q [B, H, D], k and v codes [KV, P, page, D] (int8) or "
        "[KV, P, page, D / 2] (int4) with scale_zero [KV, P, page, 2], page_table [B, W] and lengths, "
        "q_lengths [B], H a multiple of KV");
  const int64_t B = qd[0], H = qd[1], D = qd[2], KV = kd[0], P = kd[1], page = kd[2], W = td[1];
  const int32_t* table = page_table.typed_data();
  int64_t longest;
  if (auto error = CheckPageTables(table, lengths.typed_data(), q_lengths.typed_data(), B, W, page, P, &longest);
      error.failure())
    return error;
  const uint8_t* kc = k_codes.typed_data();
  const uint8_t* vc = v_codes.typed_data();
  const float* ks = k_scale_zero.typed_data();
  const float* vs = v_scale_zero.typed_data();
  const int64_t head_codes = P * page * kd[3], head_pairs = P * page * 2;
  AttendPaged(pool, q.typed_data(), out->typed_data(), lengths.typed_data(), q_lengths.typed_data(), scale, B, H, KV,
              D, longest, QuantizedRows::kBlock, [=](int64_t kh, int64_t b) {
                return std::pair{
                    QuantizedRows{kc + kh * head_codes, ks + kh * head_pairs, table + b * W, page, D, int4},
                    QuantizedRows{vc + kh * head_codes, vs + kh * head_pairs, table + b * W, page, D, int4}};
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

XLA_FFI_DEFINE_HANDLER_SYMBOL(PagedDecodeAttentionQuantized, PagedDecodeAttentionQuantizedImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::U8>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::U8>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<float>("scale")
                                  .Attr<int32_t>("bits")
                                  .Ctx<ffi::ThreadPool>());
