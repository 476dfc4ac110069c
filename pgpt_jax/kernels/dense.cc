// Dense layers for XLA:CPU (a jax.ffi custom call): y[M, N] = x[M, K] @ w, float32, with w
// packed once, at load, in column panels of 32: [N / 32, K, 32], panel p holding columns
// 32p..32p+31 of every row k, so one panel is one contiguous read (dense.py packs them).
//
// XLA:CPU's dots repack the weights on every call and stream them at about half the memory
// speed a one-row product gets (docs/benchmarks.md, "Packed dense layers"); decode reads
// every weight once a step, so that was most of a step. Here each panel is read once, from
// where it lies: up to kRows rows of x at a time against two vectors of its columns, the
// accumulators in registers, and the panel stays in cache while further blocks of rows
// take it. Row m's sums run over k in order, whatever M is, so a row's result does not
// depend on its neighbours. Panels are split over XLA's intra-op thread pool (parallel.h).
#include <algorithm>
#include <cstdint>
#include <cstring>

#include "parallel.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

#ifdef __AVX512F__
#define PGPT_ROWS 8  // rows a block: 2 x 8 zmm accumulators of the 32
constexpr int kLanes = 16;
#else
#define PGPT_ROWS 6  // AVX2: 2 x 6 ymm accumulators of the 16
constexpr int kLanes = 8;
#endif
constexpr int kRows = PGPT_ROWS;
constexpr int kPanel = 32;
// Rows of a panel to prefetch ahead of the one multiplied (8 KiB): on a Zen 1 the hardware
// prefetcher alone does not keep up with a panel, and at 1 to 8 rows this reads it 1.15 to
// 1.6 times as fast (docs/benchmarks.md, "The native kernels on a Zen 1").
constexpr int kAhead = 64;
typedef float vec __attribute__((vector_size(kLanes * 4)));

// R rows of x [R, K] against columns c0..c0 + 2 * kLanes of one panel -> out [R, kPanel].
template <int R>
void block(const float* x, int64_t K, const float* panel, int c0, float* out) {
  vec a0[R], a1[R];
  for (int r = 0; r < R; ++r) a0[r] = a1[r] = vec{};
  const float* w = panel + c0;
  for (int64_t k = 0; k < K; ++k, w += kPanel) {
    __builtin_prefetch(w + kAhead * kPanel);  // a hint: no arithmetic changes, and it never faults
    vec w0, w1;
    std::memcpy(&w0, w, sizeof(vec));
    std::memcpy(&w1, w + kLanes, sizeof(vec));
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      const float xr = x[r * K + k];
      a0[r] += xr * w0;
      a1[r] += xr * w1;
    }
  }
  for (int r = 0; r < R; ++r) {
    std::memcpy(out + r * kPanel + c0, &a0[r], sizeof(vec));
    std::memcpy(out + r * kPanel + c0 + kLanes, &a1[r], sizeof(vec));
  }
}

void rows(int R, const float* x, int64_t K, const float* panel, int c0, float* out) {
  switch (R) {
    case 1: return block<1>(x, K, panel, c0, out);
    case 2: return block<2>(x, K, panel, c0, out);
    case 3: return block<3>(x, K, panel, c0, out);
    case 4: return block<4>(x, K, panel, c0, out);
    case 5: return block<5>(x, K, panel, c0, out);
    case 6: return block<6>(x, K, panel, c0, out);
#if PGPT_ROWS > 6
    case 7: return block<7>(x, K, panel, c0, out);
    case 8: return block<8>(x, K, panel, c0, out);
#endif
  }
}

ffi::Error Dense(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> w,
                 ffi::ResultBuffer<ffi::F32> y) {
  auto xd = x.dimensions(), wd = w.dimensions(), yd = y->dimensions();
  if (xd.size() != 2 || wd.size() != 3 || yd.size() != 2 || wd[2] != kPanel || wd[1] != xd[1] ||
      yd[0] != xd[0] || (yd[1] + kPanel - 1) / kPanel != wd[0])
    return ffi::Error::InvalidArgument("packed dense: x [M, K], w [ceil(N / 32), K, 32], y [M, N]");
  const int64_t M = xd[0], K = xd[1], N = yd[1];
  const float* xs = x.typed_data();
  const float* ws = w.typed_data();
  float* ys = y->typed_data();
  if (M == 0 || N == 0) return ffi::Error::Success();
  if (K == 0) {
    std::memset(ys, 0, M * N * sizeof(float));
    return ffi::Error::Success();
  }
  pgpt::ParallelChunks(pool, wd[0], 8, [=](int64_t first, int64_t end) {  // panels first..end-1
    alignas(64) float out[kRows * kPanel];
    for (int64_t p = first; p < end; ++p) {
      const float* panel = ws + p * K * kPanel;
      const int64_t n0 = p * kPanel, cols = std::min<int64_t>(kPanel, N - n0);
      for (int64_t m0 = 0; m0 < M; m0 += kRows) {
        const int R = static_cast<int>(std::min<int64_t>(kRows, M - m0));
        for (int c0 = 0; c0 < kPanel; c0 += 2 * kLanes) rows(R, xs + m0 * K, K, panel, c0, out);
        for (int r = 0; r < R; ++r) std::memcpy(ys + (m0 + r) * N + n0, out + r * kPanel, cols * sizeof(float));
      }
    }
  });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(PgptDense, Dense,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
