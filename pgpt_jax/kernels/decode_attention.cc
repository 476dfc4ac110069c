// Decode attention over the KV cache for XLA:CPU (a jax.ffi custom call).
//
// One query per row (T = 1) attends to entries 0..min(position, window - 1) of its own row
// of the cache, read where it lies ([S, N, L, H], float32): one pass over the keys for the
// scores, a float32 softmax, one pass over the values. The (row, head) pairs are split
// over XLA's intra-op thread pool (parallel.h).
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include "parallel.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

// Cache entries to prefetch ahead of the key or value read, a 64-byte line (16 floats) at a
// time; a hint, no arithmetic changes: 8-13% off the kernel's time on a Zen 1
// (docs/benchmarks.md, "The native kernels on a Zen 1").
constexpr int64_t kAhead = 8;

void attend_one(const float* q, const float* k, const float* v, int64_t last, int64_t H, float scale,
                float* out, float* scores) {
  float top = -INFINITY;
  for (int64_t j = 0; j <= last; ++j) {
    const float* kj = k + j * H;
    for (int64_t h = 0; h < H; h += 16) __builtin_prefetch(kj + kAhead * H + h);
    float s = 0.f;
#pragma omp simd reduction(+ : s)
    for (int64_t h = 0; h < H; ++h) s += q[h] * kj[h];
    s *= scale;
    scores[j] = s;
    top = std::max(top, s);
  }
  float total = 0.f;
  for (int64_t j = 0; j <= last; ++j) {
    scores[j] = std::exp(scores[j] - top);
    total += scores[j];
  }
  for (int64_t h = 0; h < H; ++h) out[h] = 0.f;
  for (int64_t j = 0; j <= last; ++j) {
    const float* vj = v + j * H;
    for (int64_t h = 0; h < H; h += 16) __builtin_prefetch(vj + kAhead * H + h);
    const float w = scores[j];
#pragma omp simd
    for (int64_t h = 0; h < H; ++h) out[h] += w * vj[h];
  }
  const float inv = 1.f / total;
  for (int64_t h = 0; h < H; ++h) out[h] *= inv;
}

ffi::Error DecodeAttention(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k_cache,
                           ffi::Buffer<ffi::F32> v_cache, ffi::Buffer<ffi::S32> positions,
                           ffi::ResultBuffer<ffi::F32> out, int64_t window, float scale) {
  auto qd = q.dimensions(), kd = k_cache.dimensions();
  if (qd.size() != 3 || kd.size() != 4 || v_cache.dimensions().size() != 4)
    return ffi::Error::InvalidArgument("decode attention: q [B, N, H], caches [S, N, L, H]");
  const int64_t B = qd[0], N = qd[1], H = qd[2], L = kd[2];
  if (kd[0] < B || kd[1] != N || kd[3] != H || positions.element_count() != B || window < 1)
    return ffi::Error::InvalidArgument("decode attention: shapes do not match");
  const float *qs = q.typed_data(), *ks = k_cache.typed_data(), *vs = v_cache.typed_data();
  const int32_t* pos = positions.typed_data();
  float* ys = out->typed_data();
  if (H == 0) return ffi::Error::Success();
  const int64_t seen = std::min(L, window);  // entries a row may read
  pgpt::ParallelChunks(pool, B * N, 4, [=](int64_t first, int64_t end) {  // (row, head) pairs
    std::vector<float> scores(static_cast<size_t>(seen));
    for (int64_t p = first; p < end; ++p) {
      const int64_t b = p / N;
      const int64_t last = std::clamp<int64_t>(pos[b], 0, seen - 1);
      const int64_t row = p * L * H;  // [b, n, 0, 0] of the cache
      attend_one(qs + p * H, ks + row, vs + row, last, H, scale, ys + p * H, scores.data());
    }
  });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(PgptDecodeAttention, DecodeAttention,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("window")
                                  .Attr<float>("scale"));
