// A persistent pool of worker threads running one parallel-for at a time.
// Work item i always covers the same env range, so results never depend on the thread count.
#pragma once

#include <atomic>
#include <condition_variable>
#include <functional>
#include <mutex>
#include <thread>
#include <vector>

namespace aihf {

class ThreadPool {
 public:
  explicit ThreadPool(int num_threads) {
    for (int t = 1; t < num_threads; ++t) workers_.emplace_back([this, t] { loop(t); });
    size_ = num_threads;
  }
  ~ThreadPool() {
    {
      std::lock_guard<std::mutex> lock(mu_);
      stop_.store(true, std::memory_order_release);
      generation_.fetch_add(1, std::memory_order_release);
    }
    cv_.notify_all();
    for (auto& w : workers_) w.join();
  }
  int size() const { return size_; }

  // Runs fn(i) for every i in [0, n) on the pool, items handed out in chunks of `chunk` from a
  // shared counter (load balancing: envs differ in cost); fn(i) must not depend on the thread.
  template <typename F>
  void for_each(int n, int chunk, F&& fn) {
    if (n <= chunk) {  // one item's worth: no need to wake the workers
      for (int i = 0; i < n; ++i) fn(i);
      return;
    }
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
  // Workers and the caller spin briefly (~100 us) before blocking on a condition variable, so a
  // step loop that calls run() back to back does not pay a wake-up per step.
  void run(const std::function<void(int)>& fn) {
    if (size_ == 1) {
      fn(0);
      return;
    }
    fn_ = &fn;
    pending_.store(size_ - 1, std::memory_order_relaxed);
    {
      std::lock_guard<std::mutex> lock(mu_);
      generation_.fetch_add(1, std::memory_order_release);
    }
    cv_.notify_all();
    fn(0);
    for (int k = 0; k < kSpin && pending_.load(std::memory_order_acquire) != 0; ++k) pause();
    if (pending_.load(std::memory_order_acquire) != 0) {
      std::unique_lock<std::mutex> lock(mu_);
      done_cv_.wait(lock, [this] { return pending_.load(std::memory_order_acquire) == 0; });
    }
    fn_ = nullptr;
  }

 private:
  static constexpr int kSpin = 4096;
  static void pause() {
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#endif
  }

  void loop(int t) {
    long seen = 0;
    for (;;) {
      long g = generation_.load(std::memory_order_acquire);
      for (int k = 0; g == seen && k < kSpin; ++k) {
        pause();
        g = generation_.load(std::memory_order_acquire);
      }
      if (g == seen) {
        std::unique_lock<std::mutex> lock(mu_);
        cv_.wait(lock, [&] { return generation_.load(std::memory_order_acquire) != seen; });
        g = generation_.load(std::memory_order_acquire);
      }
      seen = g;  // run() starts the next generation only after every worker finished this one
      if (stop_.load(std::memory_order_acquire)) return;
      (*fn_)(t);
      if (pending_.fetch_sub(1, std::memory_order_acq_rel) == 1) {
        std::lock_guard<std::mutex> lock(mu_);  // the caller checks pending_ under mu_: no lost wake-up
        done_cv_.notify_one();
      }
    }
  }

  std::vector<std::thread> workers_;
  std::mutex mu_;
  std::condition_variable cv_, done_cv_;
  const std::function<void(int)>* fn_ = nullptr;  // published by the generation_ increment
  std::atomic<long> generation_{0};
  std::atomic<int> pending_{0};
  std::atomic<bool> stop_{false};
  int size_ = 1;
};

}  // namespace aihf
