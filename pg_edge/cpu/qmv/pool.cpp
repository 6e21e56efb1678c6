// A fixed pool of worker threads for pg_edge's CPU matvec primitives (see pool.h).
//
// MLX runs a CPU primitive on its stream's single thread; these kernels are bound by reading
// the weights, which one core does not saturate, so one product's output rows are split over
// one thread per core here. One job at a time: a caller that finds the pool busy (a task of
// another MLX stream) runs its job alone on its own thread.
#include "pool.h"

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdlib>
#include <mutex>
#include <thread>
#include <vector>

#if defined(__linux__)
#include <sched.h>
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
      joined_ = 0;
      ++generation_;
    }
    cv_.notify_all();
    work();
    // Every chunk is taken. Wait only for the workers that joined (they are finishing theirs):
    // one the OS has not scheduled yet (a core busy with another process) skips this job when
    // it wakes, instead of the caller waiting a time slice for it.
    std::unique_lock<std::mutex> lk(m_);
    open_ = false;
    done_cv_.wait(lk, [this] { return joined_ == 0; });
    fn_ = nullptr;
  }

 private:
  void work() {
    for (int i = next_.fetch_add(1); i < n_; i = next_.fetch_add(1)) (*fn_)(i);
  }
  void loop() {
    unsigned long seen = 0;
    while (true) {
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
      if (--joined_ == 0) done_cv_.notify_one();
    }
  }

  std::vector<std::thread> workers_;
  std::mutex job_, m_;
  std::condition_variable cv_, done_cv_;
  const std::function<void(int)>* fn_ = nullptr;
  int n_ = 0, joined_ = 0;
  std::atomic<int> next_{0};
  unsigned long generation_ = 0;
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
