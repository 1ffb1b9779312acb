#pragma once
// The CPU kernel thread pool (internal). One pool may serve many backends (ranks) and many streams
// at once; a caller of parallel_for also works on its own job, so nested or concurrent calls from
// many threads never deadlock and never run more than `threads` kernel threads in total... plus
// the callers themselves, which are stream threads that would otherwise sit idle.
//
// Thread safety: parallel_for may be called from any number of threads at once, including from
// inside fn (nested). The pool must outlive every call in flight.
#include <cstddef>
#include <functional>

#include "shardopt/backend.hpp"

namespace shardopt {

class ThreadPool {
 public:
  explicit ThreadPool(unsigned threads);  // threads >= 1; threads-1 workers + the caller
  ~ThreadPool();
  ThreadPool(const ThreadPool&) = delete;
  ThreadPool& operator=(const ThreadPool&) = delete;

  unsigned threads() const noexcept;
  // Calls fn(begin, end) over [0, n) in chunks of `grain` elements (the last may be shorter).
  // Chunk boundaries depend only on n and grain, never on thread count. Returns when all chunks
  // are done; the first exception thrown by fn is rethrown here after the others finish (chunks
  // not yet started when it was thrown are skipped). n == 0 calls nothing; grain == 0 is an
  // invalid_argument Error.
  void parallel_for(std::size_t n, std::size_t grain,
                    const std::function<void(std::size_t, std::size_t)>& fn);

 private:
  struct Impl;
  Impl* impl_;
};

}  // namespace shardopt
