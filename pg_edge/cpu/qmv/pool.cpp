// A fixed pool of worker threads for pg_edge's CPU matvec primitives (see pool.h).
//
// MLX runs a CPU primitive on its stream's single thread; these kernels are bound by reading
// the weights, which one core does not saturate, so one product's output rows are split over
// one thread per core here. One job at a time: a caller that finds the pool busy (a task of
// another MLX stream) runs its job alone on its own thread.
//
// A decode step calls the pool a hundred times a token, a few MLX ops apart, and a worker put
// to sleep on a futex woke too late to share a small product (docs/performance.md, "Workers that
// wait awake between products"). So after a job a worker polls for the next one for a while
// (PG_EDGE_QMV_SPIN_US, default 200 microseconds; 0: sleep at once) before it sleeps, and the
// caller polls the same way for the workers to finish before it sleeps.
#include "pool.h"

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdlib>
#include <mutex>
#include <thread>
#include <vector>

#if defined(__linux__)
#include <sched.h>
#endif
#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#endif

namespace pg_edge {

namespace {

int default_threads() {
  if (const char* env = std::getenv("PG_EDGE_QMV_THREADS")) {
    int n = std::atoi(env);
    if (n > 0) return std::min(n, 64);
  }
#if defined(__linux__)
  cpu_set_t set;
  if (sched_getaffinity(0, sizeof(set), &set) == 0) {
    return std::max(1, std::min(CPU_COUNT(&set), 8));
  }
#endif
  return std::max(1u, std::min(std::thread::hardware_concurrency(), 8u));
}

int default_spin_us() {
  if (const char* env = std::getenv("PG_EDGE_QMV_SPIN_US")) return std::max(0, std::min(std::atoi(env), 100000));
  return 200;
}

std::atomic<int> spin_us{default_spin_us()};

inline void pause() {
#if defined(__x86_64__) || defined(_M_X64)
  _mm_pause();
#endif
}

// Polls done() for up to spin_us microseconds, yielding the core between rounds of checks;
// whether it came true.
template <class F>
bool spin(F done) {
  const int us = spin_us.load(std::memory_order_relaxed);
  if (us == 0) return done();
  const auto end = std::chrono::steady_clock::now() + std::chrono::microseconds(us);
  while (true) {
    for (int i = 0; i < 32; ++i) {
      if (done()) return true;
      pause();
    }
    // a thread that waits for a core (Python building the next step's graph) gets this one
    std::this_thread::yield();
    if (std::chrono::steady_clock::now() >= end) return done();
  }
}

// run(n, f) calls f(0) .. f(n - 1), spread over the workers and the caller.
class Pool {
 public:
  explicit Pool(int threads) {
    for (int i = 1; i < threads; ++i) {
      workers_.emplace_back([this] { loop(); });
    }
  }
  ~Pool() {
    {
      std::lock_guard<std::mutex> lk(m_);
      stop_ = true;
    }
    cv_.notify_all();
    for (auto& t : workers_) t.join();
  }
  int size() const { return static_cast<int>(workers_.size()) + 1; }

  void run(int n, const std::function<void(int)>& f) {
    std::unique_lock<std::mutex> busy(job_, std::try_to_lock);
    if (!busy.owns_lock() || workers_.empty() || n <= 1) {
      for (int i = 0; i < n; ++i) f(i);
      return;
    }
    {
      std::lock_guard<std::mutex> lk(m_);
      fn_ = &f;
      n_ = n;
      next_.store(0);
      open_ = true;
      joined_.store(0);
      published_.store(++generation_, std::memory_order_release);
    }
    cv_.notify_all();  // no system call when every worker is polling
    work();
    // Every chunk is taken. Wait only for the workers that joined (they are finishing theirs):
    // one the OS has not scheduled yet (a core busy with another process) skips this job when
    // it wakes, instead of the caller waiting a time slice for it.
    {
      std::lock_guard<std::mutex> lk(m_);
      open_ = false;
    }
    spin([this] { return joined_.load(std::memory_order_acquire) == 0; });
    std::unique_lock<std::mutex> lk(m_);
    done_cv_.wait(lk, [this] { return joined_.load() == 0; });
    fn_ = nullptr;
  }

 private:
  void work() {
    for (int i = next_.fetch_add(1); i < n_; i = next_.fetch_add(1)) (*fn_)(i);
  }
  void loop() {
    unsigned long seen = 0;
    while (true) {
      spin([&] { return published_.load(std::memory_order_acquire) != seen; });
      {
        std::unique_lock<std::mutex> lk(m_);
        cv_.wait(lk, [&] { return stop_ || generation_ != seen; });
        if (stop_) return;
        seen = generation_;
        if (!open_) continue;  // woke after the caller finished the job alone
        ++joined_;
      }
      work();
      std::lock_guard<std::mutex> lk(m_);
      if (joined_.fetch_sub(1, std::memory_order_release) == 1) done_cv_.notify_one();
    }
  }

  std::vector<std::thread> workers_;
  std::mutex job_, m_;
  std::condition_variable cv_, done_cv_;
  const std::function<void(int)>* fn_ = nullptr;
  int n_ = 0;
  std::atomic<int> next_{0}, joined_{0};  // joined_: workers inside the open job
  unsigned long generation_ = 0;               // jobs started (under m_)
  std::atomic<unsigned long> published_{0};    // generation_, for polling workers
  bool stop_ = false, open_ = false;
};

Pool& pool() {
  static Pool* p = new Pool(default_threads());  // never destroyed: workers outlive exit paths
  return *p;
}

}  // namespace

int threads() {
  return pool().size();
}

int spin_microseconds(int us) {
  const int old = spin_us.load();
  if (us >= 0) spin_us.store(std::min(us, 100000));
  return old;
}

void split_rows(int N, int64_t work, int align, const std::function<void(int, int)>& rows) {
  Pool& p = pool();
  int chunks = 1;
  if (p.size() > 1 && work >= (1 << 19)) {
    // a few chunks per thread: a core busy with other work takes fewer of them
    chunks = std::max(1, std::min(N / 8, 4 * p.size()));
  }
  int step = (N + chunks - 1) / chunks;
  step = (step + align - 1) / align * align;
  chunks = (N + step - 1) / step;
  p.run(chunks, [&](int c) {
    const int lo = c * step, hi = std::min(N, lo + step);
    if (lo < hi) rows(lo, hi);
  });
}

void split_units(int n, int64_t work, const std::function<void(int, int)>& units) {
  Pool& p = pool();
  if (p.size() == 1 || work < (1 << 16) || n < 2) {
    units(0, n);
    return;
  }
  p.run(n, [&](int u) { units(u, u + 1); });
}

}  // namespace pg_edge
