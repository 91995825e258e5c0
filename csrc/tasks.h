// Gymnasium 1.4 MuJoCo *-v5 task semantics (observation, reward, termination) in C++.
// Each task reproduces gymnasium's Python arithmetic operation for operation, including the
// float32 control cost numpy computes for float32 actions, so results match to round-off.
#pragma once

#include <mujoco/mujoco.h>

#include <map>
#include <memory>
#include <set>
#include <string>
#include <vector>

namespace aihf {

// The action of one env as the user gave it: float32, float64 or float16 (passed as the float32
// values it converts to exactly; the control cost is then computed in half precision, as numpy).
struct Action {
  const float* f32 = nullptr;
  const double* f64 = nullptr;
  bool half = false;
  double operator[](int k) const { return f32 ? double(f32[k]) : f64[k]; }
};

// A task's options: gymnasium's constructor keywords, resolved in Python (a range (lo, hi) as
// name_min / name_max, a bool as 0/1, a body name as its id). Each task reads what it knows with
// gymnasium's default; a name no task read is an error (check_all_read).
class Params {
 public:
  Params() = default;
  explicit Params(std::map<std::string, double> values) : values_(std::move(values)) {}
  double get(const std::string& name, double dflt) {
    read_.insert(name);
    auto it = values_.find(name);
    return it == values_.end() ? dflt : it->second;
  }
  void check_all_read(const std::string& task) const;

 private:
  std::map<std::string, double> values_;
  std::set<std::string> read_;
};

// weight * sum(square(action)) with numpy's dtype rules: the product's precision in bits for
// float16 and float32 actions (16/32/64: np.result_type(weight, action dtype)), float64 otherwise.
struct CtrlCost {
  double weight = 0;
  int bits16 = 16, bits32 = 32;
  double operator()(const Action& a, int n) const;
  double of_float64(const double* x, int n) const;  // of a float64 vector (e.g. mjData.ctrl)
  static CtrlCost from(Params& p, const std::string& name, double dflt);
};

// An info entry: a scalar, or an array of `width` float64 values (e.g. tendon lengths).
struct InfoKey {
  InfoKey(const char* n) : name(n) {}  // NOLINT: a plain name is a scalar entry
  InfoKey(const char* n, int w) : name(n), width(w), array(true) {}
  const char* name;
  int width = 1;
  bool array = false;
};

// Per-env values a task saves before the physics step (e.g. x position before).
struct PreStep {
  double x = 0, y = 0;
};

class Task {
 public:
  virtual ~Task() = default;
  virtual const char* name() const = 0;
  int frame_skip() const { return frame_skip_; }
  virtual int obs_dim(const mjModel* m) const = 0;
  // Called once after the model loads (name lookups).
  virtual void bind(const mjModel* m) {}
  virtual PreStep before(const mjData* d) const { return {}; }
  virtual void observe(const mjModel* m, const mjData* d, double* obs) const = 0;
  // Reward and termination after the step, computed as gymnasium's step does (values as float64;
  // the Python face gives each the type gymnasium's returns). Writes the step info values
  // (info_keys() order) into info.
  virtual double reward(const mjModel* m, const mjData* d, const PreStep& pre, const Action& a, bool* terminated,
                        double* info) const = 0;
  virtual std::vector<InfoKey> info_keys() const = 0;
  // gymnasium's _get_reset_info.
  virtual std::vector<InfoKey> reset_info_keys() const { return {}; }
  virtual void reset_info(const mjModel* m, const mjData* d, double* info) const {}

 protected:
  int frame_skip_ = 1;
};

// The task `id` with its options (throws std::invalid_argument on an unknown id or option).
std::unique_ptr<Task> make_task(const std::string& id, Params params);
std::vector<std::string> task_ids();
// How np.linalg.norm sums a short vector's squares in this process (OpenBLAS's ddot, by CPU
// kernel): plain multiply-add, an FMA chain, or two accumulators (even/odd elements); the tasks'
// norms follow it. Default: FMA. set_norm_order throws std::invalid_argument on another value.
enum NormOrder { kNormPlain = 0, kNormFma = 1, kNormPairs = 2 };
void set_norm_order(int order);
int norm_order();

}  // namespace aihf
