#include "cpu/thread_pool.hpp"

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <deque>
#include <exception>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "shardopt/error.hpp"

namespace shardopt {

namespace {

// One parallel_for call. Shared with the workers so that a worker still holding it after the
// caller returned (it lost the race for the last chunk) touches live memory; fn itself is only
// ever called for a claimed chunk, and the caller does not return before every claimed chunk is
// finished, so fn (owned by the caller) is never used after it is gone.
struct Job {
  const std::function<void(std::size_t, std::size_t)>* fn = nullptr;
  std::size_t n = 0;
  std::size_t grain = 0;
  std::size_t chunks = 0;
  std::atomic<std::size_t> next{0};
  std::atomic<std::size_t> done{0};
  std::atomic<bool> failed{false};
  std::mutex mutex;
  std::condition_variable finished;
  std::exception_ptr error;  // guarded by mutex

  bool exhausted() const noexcept { return next.load(std::memory_order_relaxed) >= chunks; }

  // Claims and runs chunks until none is left. Returns once this thread can claim no more.
  void work() noexcept {
    for (;;) {
      const std::size_t c = next.fetch_add(1, std::memory_order_relaxed);
      if (c >= chunks) return;
      // After a failure the remaining chunks are counted but not run: the result is discarded
      // anyway, and stopping early keeps a failing kernel from burning the whole pool.
      if (!failed.load(std::memory_order_relaxed)) {
        const std::size_t begin = c * grain;
        const std::size_t end = std::min(n, begin + grain);
        try {
          (*fn)(begin, end);
        } catch (...) {
          std::lock_guard<std::mutex> lock(mutex);
          if (!error) error = std::current_exception();
          failed.store(true, std::memory_order_relaxed);
        }
      }
      if (done.fetch_add(1, std::memory_order_acq_rel) + 1 == chunks) {
        // Taking the mutex orders this notify after the caller's predicate check, so the wake-up
        // cannot be lost.
        std::lock_guard<std::mutex> lock(mutex);
        finished.notify_all();
      }
    }
  }
};

}  // namespace

struct ThreadPool::Impl {
  unsigned threads = 1;
  std::mutex mutex;
  std::condition_variable wake;
  std::deque<std::shared_ptr<Job>> jobs;  // jobs that may still have unclaimed chunks
  bool stopping = false;
  std::vector<std::thread> workers;

  void worker_loop() {
    for (;;) {
      std::shared_ptr<Job> job;
      {
        std::unique_lock<std::mutex> lock(mutex);
        for (;;) {
          while (!jobs.empty() && jobs.front()->exhausted()) jobs.pop_front();
          if (!jobs.empty() || stopping) break;
          wake.wait(lock);
        }
        if (jobs.empty()) return;  // stopping and nothing left
        // Round-robin over concurrent jobs: rotating the front spreads the workers across all
        // callers instead of letting the oldest job take every worker.
        job = jobs.front();
        if (jobs.size() > 1) {
          jobs.pop_front();
          jobs.push_back(job);
        }
      }
      job->work();
    }
  }
};

ThreadPool::ThreadPool(unsigned threads) : impl_(new Impl) {
  if (threads == 0) {
    delete impl_;
    throw Error(ErrorCode::invalid_argument, "ThreadPool: threads must be >= 1 (got 0)");
  }
  impl_->threads = threads;
  try {
    impl_->workers.reserve(threads - 1);
    for (unsigned i = 0; i + 1 < threads; ++i) impl_->workers.emplace_back([this] { impl_->worker_loop(); });
  } catch (const std::exception& e) {
    {
      std::lock_guard<std::mutex> lock(impl_->mutex);
      impl_->stopping = true;
    }
    impl_->wake.notify_all();
    for (auto& w : impl_->workers) w.join();
    delete impl_;
    throw Error(ErrorCode::internal,
                "ThreadPool: cannot start " + std::to_string(threads - 1) + " worker threads: " + e.what());
  }
}

ThreadPool::~ThreadPool() {
  {
    std::lock_guard<std::mutex> lock(impl_->mutex);
    impl_->stopping = true;
  }
  impl_->wake.notify_all();
  for (auto& w : impl_->workers) w.join();
  delete impl_;
}

unsigned ThreadPool::threads() const noexcept { return impl_->threads; }

void ThreadPool::parallel_for(std::size_t n, std::size_t grain,
                              const std::function<void(std::size_t, std::size_t)>& fn) {
  require(grain != 0, ErrorCode::invalid_argument, "ThreadPool::parallel_for: grain must be > 0");
  if (n == 0) return;
  const std::size_t chunks = n / grain + (n % grain != 0 ? 1 : 0);
  if (chunks == 1 || impl_->workers.empty()) {
    // Nothing to share: skip the queue. Same chunk boundaries as the parallel path.
    for (std::size_t c = 0; c < chunks; ++c) fn(c * grain, std::min(n, c * grain + grain));
    return;
  }

  auto job = std::make_shared<Job>();
  job->fn = &fn;
  job->n = n;
  job->grain = grain;
  job->chunks = chunks;
  {
    std::lock_guard<std::mutex> lock(impl_->mutex);
    impl_->jobs.push_back(job);
  }
  // The caller takes one chunk itself; wake only as many workers as could get one.
  if (chunks - 1 >= impl_->workers.size()) {
    impl_->wake.notify_all();
  } else {
    for (std::size_t i = 0; i + 1 < chunks; ++i) impl_->wake.notify_one();
  }

  job->work();

  {
    std::unique_lock<std::mutex> lock(job->mutex);
    job->finished.wait(lock, [&] { return job->done.load(std::memory_order_acquire) == job->chunks; });
  }
  // Workers drop exhausted jobs lazily; drop ours now so the queue does not grow while idle.
  {
    std::lock_guard<std::mutex> lock(impl_->mutex);
    auto it = std::find(impl_->jobs.begin(), impl_->jobs.end(), job);
    if (it != impl_->jobs.end()) impl_->jobs.erase(it);
  }
  std::exception_ptr error;
  {
    // Moved out, not copied: a worker may still hold the job and drop it last, and the exception
    // must then not go with it. (The exception's reference count lives in the uninstrumented
    // C++ runtime, so ThreadSanitizer cannot see that release as ordered after our reads of it.)
    std::lock_guard<std::mutex> lock(job->mutex);
    error = std::exchange(job->error, nullptr);
  }
  if (error) std::rethrow_exception(error);
}

std::shared_ptr<ThreadPool> make_thread_pool(unsigned threads) {
  if (threads == 0) threads = std::max(1u, std::thread::hardware_concurrency());
  return std::make_shared<ThreadPool>(threads);
}

unsigned thread_count(const ThreadPool& pool) noexcept { return pool.threads(); }

std::shared_ptr<ThreadPool> default_thread_pool() {
  // Held weakly: the pool lives while a backend or an offload engine uses it and its threads end
  // with the last of them, instead of at process exit (after main, where joining them is unsafe).
  static std::mutex m;
  static std::weak_ptr<ThreadPool> cached;
  std::lock_guard<std::mutex> lock(m);
  if (auto p = cached.lock()) return p;
  auto p = make_thread_pool(0);
  cached = p;
  return p;
}

}  // namespace shardopt
