// A persistent pool of worker threads running one parallel-for at a time.
// Between calls the workers spin briefly before sleeping (a step loop calls the pool every
// few milliseconds; a condition-variable wake-up costs tens of microseconds on a VM), then
// block on a condition variable. Items are handed out dynamically; every item's result is
// independent of the thread that ran it, so results never depend on the thread count.
#pragma once

#include <atomic>
#include <condition_variable>
#include <functional>
#include <mutex>
#include <thread>
#include <vector>

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define AIHF_CPU_RELAX() _mm_pause()
#else
#define AIHF_CPU_RELAX() std::this_thread::yield()
#endif

namespace aihf {

class ThreadPool {
 public:
  explicit ThreadPool(int num_threads) : size_(num_threads) {
    for (int t = 1; t < num_threads; ++t) workers_.emplace_back([this, t] { loop(t); });
  }
  ~ThreadPool() {
    {
      std::lock_guard<std::mutex> lock(mu_);
      stop_ = true;
      generation_.fetch_add(1);
    }
    cv_.notify_all();
    for (auto& w : workers_) w.join();
  }
  int size() const { return size_; }

  // Runs fn(i) for every i in [0, n) on the pool, items handed out in chunks of `chunk` from a
  // shared counter (load balancing: envs differ in cost); fn(i) must not depend on the thread.
  template <typename F>
  void for_each(int n, int chunk, F&& fn) {
    std::atomic<int> next{0};
    run([&](int) {
      for (;;) {
        int lo = next.fetch_add(chunk);
        if (lo >= n) return;
        int hi = lo + chunk < n ? lo + chunk : n;
        for (int i = lo; i < hi; ++i) fn(i);
      }
    });
  }

  // Runs fn(t) for t in [0, size()) on the pool (t = 0 on the calling thread) and waits.
  void run(const std::function<void(int)>& fn) {
    if (size_ == 1) {
      fn(0);
      return;
    }
    fn_ = &fn;
    pending_.store(size_ - 1);
    {
      std::lock_guard<std::mutex> lock(mu_);
      generation_.fetch_add(1);
    }
    cv_.notify_all();
    fn(0);
    for (int spin = 0; pending_.load() != 0 && spin < kSpin; ++spin) AIHF_CPU_RELAX();
    if (pending_.load() != 0) {
      std::unique_lock<std::mutex> lock(mu_);
      done_cv_.wait(lock, [this] { return pending_.load() == 0; });
    }
    fn_ = nullptr;
  }

 private:
  static constexpr int kSpin = 1 << 14;  // ~50-150 us of pause instructions

  void loop(int t) {
    long seen = 0;
    for (;;) {
      long g = generation_.load();
      for (int spin = 0; g == seen && spin < kSpin; ++spin) {
        AIHF_CPU_RELAX();
        g = generation_.load();
      }
      if (g == seen) {
        std::unique_lock<std::mutex> lock(mu_);
        cv_.wait(lock, [&] { return generation_.load() != seen; });
        g = generation_.load();
      }
      seen = g;
      if (stop_) return;
      (*fn_)(t);
      if (pending_.fetch_sub(1) == 1) {
        std::lock_guard<std::mutex> lock(mu_);
        done_cv_.notify_one();
      }
    }
  }

  std::vector<std::thread> workers_;
  std::mutex mu_;
  std::condition_variable cv_, done_cv_;
  const std::function<void(int)>* fn_ = nullptr;
  std::atomic<long> generation_{0};
  std::atomic<int> pending_{0};
  int size_ = 1;
  bool stop_ = false;
};

}  // namespace aihf
