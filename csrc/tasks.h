// Gymnasium 1.4 MuJoCo *-v5 task semantics (observation, reward, termination) in C++.
// Each task reproduces gymnasium's Python arithmetic operation for operation, including the
// float32 control cost numpy computes for float32 actions, so results match to round-off.
#pragma once

#include <mujoco/mujoco.h>

#include <memory>
#include <string>
#include <vector>

namespace aihf {

// Per-env values a task saves before the physics step (e.g. x position before).
struct PreStep {
  double x = 0, y = 0;
};

// An info entry gymnasium puts in the step / reset info dict, and the dtype numpy gives it.
enum class InfoType { kFloat64 = 0, kActionDtype = 1, kInt64 = 2 };
struct InfoKey {
  const char* name;
  InfoType type;
};

class Task {
 public:
  virtual ~Task() = default;
  virtual const char* name() const = 0;
  virtual const char* xml_file() const = 0;  // file name in gymnasium/envs/mujoco/assets
  virtual int frame_skip() const = 0;
  virtual int max_episode_steps() const = 0;
  virtual int obs_dim(const mjModel* m) const = 0;
  // Called once after the model loads (name lookups).
  virtual void bind(const mjModel* m) {}
  virtual PreStep before(const mjData* d) const { return {}; }
  virtual void observe(const mjModel* m, const mjData* d, double* obs) const = 0;
  // Reward and termination after the step; action is float32 or float64 as given by the user.
  // Writes the step info values (info_keys() order) into info.
  virtual double reward(const mjModel* m, const mjData* d, const PreStep& pre, const float* a32,
                        const double* a64, bool* terminated, double* info) const = 0;
  virtual std::vector<InfoKey> info_keys() const = 0;
  // gymnasium's _get_reset_info (all float64).
  virtual std::vector<const char*> reset_info_keys() const { return {}; }
  virtual void reset_info(const mjModel* m, const mjData* d, double* info) const {}
};

std::unique_ptr<Task> make_task(const std::string& id);
std::vector<std::string> task_ids();

}  // namespace aihf
