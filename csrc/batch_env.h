// N environments of one gymnasium MuJoCo task, stepped in parallel on a persistent thread pool.
// Buffers are owned here and exposed to Python without copies. Reset states (initial qpos,
// qvel) come from Python, which draws them with each env's own numpy Generator exactly as
// gymnasium's reset_model does; an env consumes its prepared state when it (auto)resets.
#pragma once

#include <map>
#include <memory>
#include <mutex>
#include <stdexcept>
#include <string>
#include <vector>

#include "mlp_policy.h"
#include "tasks.h"
#include "thread_pool.h"

namespace aihf {

// A MuJoCo error (mju_error) in one or more envs during a call; those envs were reset.
struct MujocoError : std::runtime_error {
  using std::runtime_error::runtime_error;
};

enum class Autoreset { kNextStep = 0, kSameStep = 1, kDisabled = 2 };

// Where rollout() writes: arrays of shape (T, num_envs, ...) row-major; optional ones may be null.
struct RolloutOut {
  int T = 0;
  double* obs = nullptr;       // (T, N, obs_dim) observation the action was chosen on
  float* actions = nullptr;    // (T, N, nu)
  double* rewards = nullptr;   // (T, N)
  bool* terminated = nullptr;  // (T, N)
  bool* truncated = nullptr;   // (T, N)
  double* next_obs = nullptr;  // (T, N, obs_dim) observation after the step (final one at episode end)
  bool* diverged = nullptr;    // (T, N)
  double* qpos = nullptr;      // (T, N, nq) state the action was chosen in (optional)
  double* qvel = nullptr;      // (T, N, nv) (optional)
};

class BatchEnv {
 public:
  BatchEnv(const std::string& task_id, const std::string& xml_path, const std::map<std::string, double>& options,
           int num_envs, int num_threads, int autoreset_mode, int max_episode_steps, int reset_queue);
  ~BatchEnv();

  // Reset the envs whose mask is set, each from the next state in its reset queue.
  void reset(const bool* mask);
  // One env step for all envs; actions (num_envs x nu) in float32 or float64 (one is null);
  // half: the float32 values are float16 actions (the control cost is computed in half).
  void step(const float* a32, const double* a64, bool half = false);
  // Advance every env i from progress[i] towards T steps, choosing actions with the policy
  // (or reading open_loop (T, N, nu)), resetting ended episodes at once (SAME_STEP semantics).
  // An env that needs a reset state while its queue is empty stops early; returns the number
  // of envs that reached T.
  int rollout(const MLPPolicy* policy, const float* open_loop, const RolloutOut& out, int* progress);
  // Seed the per-env action-noise generators (env i gets stream i).
  void seed_policy_noise(uint64_t seed);
  // Copy env i's whole mjData into dest, an mjData made for an identical model (mj_copyData).
  void copy_data(int i, mjData* dest);
  // Set env i's joint state (then mj_forward and observe), e.g. to start from a recorded state.
  void set_state(int i, const double* qpos, const double* qvel);

  int num_envs() const { return n_; }
  int num_threads() const { return pool_.size(); }
  int nq() const { return model_->nq; }
  int nv() const { return model_->nv; }
  int nu() const { return model_->nu; }
  int obs_dim() const { return obs_dim_; }
  int max_episode_steps() const { return max_steps_; }
  int reset_queue() const { return K_; }
  const Task& task() const { return *task_; }
  int n_info() const { return n_info_; }
  int n_reset_info() const { return n_reset_info_; }
  double dt() const { return model_->opt.timestep * task_->frame_skip(); }
  const mjModel* model() const { return model_; }

  // Buffers (row-major, one row per env).
  std::vector<double> obs, rewards, final_obs;
  std::vector<double> info, reset_info;  // (N, n_info) of the last step, (N, n_reset_info) of the last reset
  std::vector<unsigned char> terminated, truncated, needs_reset, reset_consumed, diverged, final_valid;
  std::vector<unsigned char> failed;  // env hit a MuJoCo error in the last call (then reset)
  std::vector<int> elapsed;
  // Reset queue: env i's states live in slots [i*K, (i+1)*K), a ring from queue_head[i] holding
  // queue_count[i] states; Python pushes, C++ pops.
  std::vector<double> queue_qpos, queue_qvel;
  std::vector<int> queue_head, queue_count;

 private:
  bool reset_one(int i);
  void physics_step(int i, const Action& a);
  void step_one(int i, const float* a32, const double* a64, bool half);
  void rollout_one(int i, const MLPPolicy* policy, const float* open_loop, const RolloutOut& out, int* progress,
                   float* scratch);
  template <typename F>
  void parallel(F&& f);

  std::unique_ptr<Task> task_;
  mjModel* model_ = nullptr;
  std::vector<mjData*> data_;
  void check_queues() const;
  void fail(int i, std::string error);
  void raise_mujoco_errors();  // throws MujocoError naming the envs that failed, if any
  std::vector<std::string> errors_;
  std::vector<NormalRng> noise_;
  std::mutex busy_;  // one call at a time: Python threads may share an env
  int n_, obs_dim_, max_steps_, K_, n_info_ = 0, n_reset_info_ = 0;
  Autoreset mode_;
  ThreadPool pool_;
};

}  // namespace aihf
