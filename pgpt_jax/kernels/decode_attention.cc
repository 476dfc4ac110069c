// Decode attention over the KV cache for XLA:CPU (a jax.ffi custom call).
//
// One query per row (T = 1) attends to entries 0..min(position, window - 1) of its own row
// of the cache, read where it lies ([S, N, L, H], float32): one pass over the keys for the
// scores, a float32 softmax, one pass over the values. The (row, head) pairs are split
// over XLA's intra-op thread pool; the calling thread takes its share too, so the call
// never waits on a pool that is busy.
#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <memory>
#include <thread>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

void attend_one(const float* q, const float* k, const float* v, int64_t last, int64_t H, float scale,
                float* out, float* scores) {
  float top = -INFINITY;
  for (int64_t j = 0; j <= last; ++j) {
    const float* kj = k + j * H;
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
    const float w = scores[j];
#pragma omp simd
    for (int64_t h = 0; h < H; ++h) out[h] += w * vj[h];
  }
  const float inv = 1.f / total;
  for (int64_t h = 0; h < H; ++h) out[h] *= inv;
}

struct Work {
  const float *q, *k, *v;
  const int32_t* pos;
  float* out;
  int64_t B, N, L, H, window, chunks, per_chunk;
  float scale;
  std::atomic<int64_t> next{0}, done{0};

  void run() {  // takes chunks until none is left
    std::vector<float> scores(static_cast<size_t>(std::min(L, window)));
    for (int64_t c = next.fetch_add(1); c < chunks; c = next.fetch_add(1)) {
      const int64_t end = std::min(B * N, (c + 1) * per_chunk);
      for (int64_t p = c * per_chunk; p < end; ++p) {
        const int64_t b = p / N, n = p % N;
        const int64_t last = std::clamp<int64_t>(pos[b], 0, std::min(L, window) - 1);
        const int64_t row = (b * N + n) * L * H;  // [b, n, 0, 0] of the cache
        attend_one(q + (b * N + n) * H, k + row, v + row, last, H, scale, out + (b * N + n) * H, scores.data());
      }
      done.fetch_add(1, std::memory_order_release);
    }
  }
};

ffi::Error DecodeAttention(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k_cache,
                           ffi::Buffer<ffi::F32> v_cache, ffi::Buffer<ffi::S32> positions,
                           ffi::ResultBuffer<ffi::F32> out, int64_t window, float scale) {
  auto qd = q.dimensions(), kd = k_cache.dimensions();
  if (qd.size() != 3 || kd.size() != 4 || v_cache.dimensions().size() != 4)
    return ffi::Error::InvalidArgument("decode attention: q [B, N, H], caches [S, N, L, H]");
  auto w = std::make_shared<Work>();
  w->B = qd[0]; w->N = qd[1]; w->H = qd[2]; w->L = kd[2]; w->window = window; w->scale = scale;
  if (kd[0] < w->B || kd[1] != w->N || kd[3] != w->H || positions.element_count() != w->B || window < 1)
    return ffi::Error::InvalidArgument("decode attention: shapes do not match");
  w->q = q.typed_data(); w->k = k_cache.typed_data(); w->v = v_cache.typed_data();
  w->pos = positions.typed_data(); w->out = out->typed_data();
  const int64_t pairs = w->B * w->N;
  if (pairs == 0 || w->H == 0) return ffi::Error::Success();
  const int64_t helpers = std::min<int64_t>(pool.num_threads(), 64);
  w->chunks = std::min<int64_t>(pairs, 4 * (helpers + 1));
  w->per_chunk = (pairs + w->chunks - 1) / w->chunks;
  w->chunks = (pairs + w->per_chunk - 1) / w->per_chunk;
  for (int64_t i = 0; i < helpers && i + 1 < w->chunks; ++i) pool.Schedule([w] { w->run(); });
  w->run();
  while (w->done.load(std::memory_order_acquire) < w->chunks) std::this_thread::yield();
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
