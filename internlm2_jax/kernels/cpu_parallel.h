// Shares the units of work of one FFI call over XLA's intra-op thread pool (header of the CPU kernels).
//
// Units are claimed from a shared counter by the calling thread and by helpers scheduled on the pool. The caller
// waits only for units already claimed, so a helper that starts late (or never, while the pool is busy with other
// work) finds nothing left to do: no deadlock, and the work stays with whoever is free.
#ifndef INTERNLM2_JAX_KERNELS_CPU_PARALLEL_H_
#define INTERNLM2_JAX_KERNELS_CPU_PARALLEL_H_

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <functional>
#include <memory>
#include <thread>

#include "xla/ffi/api/ffi.h"

namespace internlm2_jax {

// Calls run(first, last) over [0, units) in chunks; `helpers_wanted` false keeps it all on the calling thread
// (waking helpers costs more than a small call's work).
inline void ParallelFor(xla::ffi::ThreadPool& pool, int64_t units, bool helpers_wanted,
                        std::function<void(int64_t, int64_t)> run) {
  struct Work {
    std::function<void(int64_t, int64_t)> run;
    int64_t units, chunk;
    std::atomic<int64_t> next{0}, done{0};
    void Claim() {
      for (;;) {
        const int64_t first = next.fetch_add(chunk);
        if (first >= units) return;
        const int64_t last = std::min(units, first + chunk);
        run(first, last);
        done.fetch_add(last - first, std::memory_order_release);
      }
    }
  };
  auto work = std::make_shared<Work>();
  work->run = std::move(run);
  work->units = units;
  const int64_t threads = std::max<int64_t>(1, pool.num_threads());
  work->chunk = std::max<int64_t>(1, units / (8 * threads));
  const int64_t helpers = helpers_wanted ? std::min(threads, units) - 1 : 0;
  for (int64_t i = 0; i < helpers; ++i) pool.Schedule([work] { work->Claim(); });
  work->Claim();
  while (work->done.load(std::memory_order_acquire) < units) std::this_thread::yield();
}

}  // namespace internlm2_jax

#endif  // INTERNLM2_JAX_KERNELS_CPU_PARALLEL_H_
