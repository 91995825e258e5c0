// N environments of one gymnasium MuJoCo task, stepped in parallel on a persistent thread pool.
// Buffers are owned here and exposed to Python without copies. Reset states (initial qpos,
// qvel) come from Python, which draws them with each env's own numpy Generator exactly as
// gymnasium's reset_model does; an env consumes its prepared state when it (auto)resets.
#pragma once

#include <memory>
#include <string>
#include <vector>

#include "tasks.h"
#include "thread_pool.h"

namespace aihf {

enum class Autoreset { kNextStep = 0, kSameStep = 1, kDisabled = 2 };

class BatchEnv {
 public:
  BatchEnv(const std::string& task_id, const std::string& xml_path, int num_envs, int num_threads,
           int autoreset_mode, int max_episode_steps);
  ~BatchEnv();

  // Reset the envs whose mask is set, from their prepared reset states.
  void reset(const bool* mask);
  // One env step for all envs; actions (num_envs x nu) in float32 or float64 (one is null).
  void step(const float* a32, const double* a64);

  int num_envs() const { return n_; }
  int num_threads() const { return pool_.size(); }
  int nq() const { return model_->nq; }
  int nv() const { return model_->nv; }
  int nu() const { return model_->nu; }
  int obs_dim() const { return obs_dim_; }
  int max_episode_steps() const { return max_steps_; }
  double dt() const { return model_->opt.timestep * task_->frame_skip(); }
  const mjModel* model() const { return model_; }

  // Buffers (row-major, one row per env).
  std::vector<double> obs, rewards, final_obs, reset_qpos, reset_qvel;
  std::vector<unsigned char> terminated, truncated, needs_reset, reset_consumed, diverged, final_valid;
  std::vector<int> elapsed;

 private:
  void reset_one(int i);
  void step_one(int i, const float* a32, const double* a64);
  template <typename F>
  void parallel(F&& f);

  std::unique_ptr<Task> task_;
  mjModel* model_ = nullptr;
  std::vector<mjData*> data_;
  int n_, obs_dim_, max_steps_;
  Autoreset mode_;
  ThreadPool pool_;
};

}  // namespace aihf
