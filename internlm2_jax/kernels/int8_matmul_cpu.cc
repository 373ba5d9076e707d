// Weight-only int8 matmul for XLA:CPU, an XLA FFI custom call: out[M, N] = (x[M, K] @ w[K, N]) * scale[N], with x
// and out fp32, w int8 in strips of 64 columns ([N / 64, K, 64], see int8_matmul.py's `pack`), one fp32 scale per
// output column.
//
// Why a hand-written kernel: XLA:CPU converts int8 weights to fp32 in a slow generic loop before its matmul
// (about 11x slower than the fp32 matmul at one row), so int8 decoding was slower than fp32 although it reads a
// quarter of the bytes. Here each strip is read front to back (one cache line per row of K: the hardware
// prefetcher's best case; row-major w, a stride apart, was 1.5-2x slower at one row), converted in registers, and
// the strips are shared out over XLA's own intra-op thread pool (cpu_parallel.h). Built by int8_matmul.py with -march=native.
#include <algorithm>
#include <cstdint>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

#include "cpu_parallel.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr int64_t kStrip = 64;  // output columns per unit of work: one cache line of int8 weights per row of w
constexpr int64_t kRows = 4;    // rows of x sharing each converted strip (4 rows x 4 vectors of accumulators)

// Output columns [64 s, 64 s + 64) of rows [0, M), from strip s of w ([K, 64], contiguous).
void Strip(const float* x, const int8_t* w, const float* scale, float* out, int64_t M, int64_t K, int64_t N,
           int64_t s) {
  const int8_t* strip = w + s * K * kStrip;
  const float* strip_scale = scale + s * kStrip;
  float* strip_out = out + s * kStrip;
#if defined(__AVX512F__)
  for (int64_t r0 = 0; r0 < M; r0 += kRows) {
    const int64_t rows = std::min(kRows, M - r0);
    __m512 acc[kRows][4];
    for (auto& row : acc)
      for (auto& v : row) v = _mm512_setzero_ps();
    const float* xr = x + r0 * K;
    for (int64_t k = 0; k < K; ++k) {
      const int8_t* p = strip + k * kStrip;
      __m512 wv[4];
      for (int j = 0; j < 4; ++j)
        wv[j] = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p + 16 * j))));
      for (int64_t r = 0; r < rows; ++r) {
        const __m512 xv = _mm512_set1_ps(xr[r * K + k]);
        for (int j = 0; j < 4; ++j) acc[r][j] = _mm512_fmadd_ps(xv, wv[j], acc[r][j]);
      }
    }
    for (int64_t r = 0; r < rows; ++r)
      for (int j = 0; j < 4; ++j)
        _mm512_storeu_ps(strip_out + (r0 + r) * N + 16 * j,
                         _mm512_mul_ps(acc[r][j], _mm512_loadu_ps(strip_scale + 16 * j)));
  }
#else
  // Portable path: plain loops the compiler vectorizes for the native ISA.
  for (int64_t r = 0; r < M; ++r) {
    float acc[kStrip] = {};
    for (int64_t k = 0; k < K; ++k) {
      const float xv = x[r * K + k];
      const int8_t* p = strip + k * kStrip;
      for (int64_t j = 0; j < kStrip; ++j) acc[j] += xv * static_cast<float>(p[j]);
    }
    for (int64_t j = 0; j < kStrip; ++j) strip_out[r * N + j] = acc[j] * strip_scale[j];
  }
#endif
}

ffi::Error Int8MatmulImpl(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::S8> w, ffi::Buffer<ffi::F32> scale,
                          ffi::ResultBuffer<ffi::F32> out, ffi::ThreadPool pool) {
  const auto xd = x.dimensions(), wd = w.dimensions();
  if (xd.size() != 2 || wd.size() != 3 || wd[1] != xd[1] || wd[2] != kStrip || scale.element_count() != wd[0] * kStrip)
    return ffi::Error::InvalidArgument("int8_matmul expects x [M, K], w [N / 64, K, 64] and scale [N]");
  const float* xp = x.typed_data();
  const int8_t* wp = w.typed_data();
  const float* sp = scale.typed_data();
  float* op = out->typed_data();
  const int64_t M = xd[0], K = xd[1], N = wd[0] * kStrip;
  // Helpers only when there is enough work to pay for waking them (a few hundred KB of weights).
  internlm2_jax::ParallelFor(pool, wd[0], K * N >= (1 << 18), [=](int64_t first, int64_t last) {
    for (int64_t s = first; s < last; ++s) Strip(xp, wp, sp, op, M, K, N, s);
  });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(Int8Matmul, Int8MatmulImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S8>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ctx<ffi::ThreadPool>());
