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
      stop_ = true;
      ++generation_;
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
  void run(const std::function<void(int)>& fn) {
    if (size_ == 1) {
      fn(0);
      return;
    }
    {
      std::lock_guard<std::mutex> lock(mu_);
      fn_ = &fn;
      pending_ = size_ - 1;
      ++generation_;
    }
    cv_.notify_all();
    fn(0);
    std::unique_lock<std::mutex> lock(mu_);
    done_cv_.wait(lock, [this] { return pending_ == 0; });
    fn_ = nullptr;
  }

 private:
  void loop(int t) {
    long seen = 0;
    for (;;) {
      const std::function<void(int)>* fn;
      {
        std::unique_lock<std::mutex> lock(mu_);
        cv_.wait(lock, [&] { return generation_ != seen; });
        seen = generation_;
        if (stop_) return;
        fn = fn_;
      }
      (*fn)(t);
      {
        std::lock_guard<std::mutex> lock(mu_);
        if (--pending_ == 0) done_cv_.notify_one();
      }
    }
  }

  std::vector<std::thread> workers_;
  std::mutex mu_;
  std::condition_variable cv_, done_cv_;
  const std::function<void(int)>* fn_ = nullptr;
  long generation_ = 0;
  int pending_ = 0, size_ = 1;
  bool stop_ = false;
};

}  // namespace aihf
