// Work split over XLA's intra-op thread pool, shared by the kernels in this directory.
#pragma once

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <memory>
#include <thread>

#include "xla/ffi/api/ffi.h"

namespace pgpt {

// Runs body(begin, end) over items 0..items-1 in about `per_thread` chunks per thread. Chunks
// are taken by whichever thread is free, the calling thread included, so a call never waits
// on a pool that is busy; returns when every chunk is done. The state is shared with the
// pool's tasks, which may start after the call has returned and then find nothing to take.
template <class Body>
void ParallelChunks(xla::ffi::ThreadPool& pool, int64_t items, int64_t per_thread, Body body) {
  struct State {
    Body body;
    int64_t items, chunks, per_chunk;
    std::atomic<int64_t> next{0}, done{0};
    explicit State(Body b) : body(std::move(b)) {}
    void run() {
      for (int64_t c = next.fetch_add(1); c < chunks; c = next.fetch_add(1)) {
        body(c * per_chunk, std::min(items, (c + 1) * per_chunk));
        done.fetch_add(1, std::memory_order_release);
      }
    }
  };
  if (items <= 0) return;
  auto state = std::make_shared<State>(std::move(body));
  const int64_t helpers = std::min<int64_t>(pool.num_threads(), 64);
  state->items = items;
  state->chunks = std::min<int64_t>(items, per_thread * (helpers + 1));
  state->per_chunk = (items + state->chunks - 1) / state->chunks;
  state->chunks = (items + state->per_chunk - 1) / state->per_chunk;
  for (int64_t i = 0; i < helpers && i + 1 < state->chunks; ++i) pool.Schedule([state] { state->run(); });
  state->run();
  while (state->done.load(std::memory_order_acquire) < state->chunks) std::this_thread::yield();
}

}  // namespace pgpt
