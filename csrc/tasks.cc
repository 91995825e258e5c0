#include "tasks.h"

#include <algorithm>
#include <cmath>
#include <stdexcept>
#include <string>

namespace aihf {
namespace {

// numpy's pairwise summation (npy pairwise_sum): what np.sum does on a contiguous 1-D array.
template <typename T>
T pairwise_sum(const T* a, int n) {
  if (n < 8) {
    T res = 0;
    for (int i = 0; i < n; ++i) res += a[i];
    return res;
  }
  if (n <= 128) {
    T r[8];
    for (int j = 0; j < 8; ++j) r[j] = a[j];
    int i = 8;
    for (; i < n - (n % 8); i += 8)
      for (int j = 0; j < 8; ++j) r[j] += a[i + j];
    T res = ((r[0] + r[1]) + (r[2] + r[3])) + ((r[4] + r[5]) + (r[6] + r[7]));
    for (; i < n; ++i) res += a[i];
    return res;
  }
  int n2 = n / 2;
  n2 -= n2 % 8;
  return pairwise_sum(a, n2) + pairwise_sum(a + n2, n - n2);
}

// weight * np.sum(np.square(action)) with numpy's dtype rules (NEP 50: the Python float
// weight takes the action's dtype).
template <typename T>
double square_sum_times(const T* a, int n, double weight) {
  T sq[64];
  for (int i = 0; i < n; ++i) sq[i] = a[i] * a[i];
  T s = pairwise_sum(sq, n);
  return static_cast<double>(static_cast<T>(weight) * s);
}

double ctrl_cost(const float* a32, const double* a64, int n, double weight) {
  return a32 ? square_sum_times(a32, n, weight) : square_sum_times(a64, n, weight);
}

double clip(double v, double lo, double hi) { return std::min(std::max(v, lo), hi); }

// np.linalg.norm of a 2-vector: sqrt(x.dot(x))
double norm2(double x, double y) { return std::sqrt(x * x + y * y); }

// Hopper-v5 / Walker2d-v5: planar walkers, obs = qpos[1:], clip(qvel, -10, 10).
void require(bool ok, const char* task, const char* what) {
  if (!ok) throw std::invalid_argument(std::string(task) + ": the model does not fit the task (" + what + ")");
}

class PlanarWalker : public Task {
 public:
  void bind(const mjModel* m) override { require(m->nq >= 3 && m->nv >= 1, name(), "needs nq >= 3"); }
  int obs_dim(const mjModel* m) const override { return m->nq - 1 + m->nv; }
  int max_episode_steps() const override { return 1000; }
  int frame_skip() const override { return 4; }
  PreStep before(const mjData* d) const override { return {d->qpos[0], 0}; }
  void observe(const mjModel* m, const mjData* d, double* obs) const override {
    for (int i = 1; i < m->nq; ++i) *obs++ = d->qpos[i];
    for (int i = 0; i < m->nv; ++i) *obs++ = clip(d->qvel[i], -10, 10);
  }
  double reward(const mjModel* m, const mjData* d, const PreStep& pre, const float* a32,
                const double* a64, bool* terminated, double* info) const override {
    double dt = m->opt.timestep * frame_skip();
    double x_velocity = (d->qpos[0] - pre.x) / dt;
    bool healthy = is_healthy(m, d);
    double forward = 1.0 * x_velocity;
    double survive = healthy ? 1.0 : 0.0;
    double rewards = forward + survive;
    double costs = ctrl_cost(a32, a64, m->nu, 1e-3);
    *terminated = !healthy;
    double v[] = {d->qpos[0], d->qpos[1] - m->qpos0[1], x_velocity, forward, -costs, survive};
    std::copy(v, v + 6, info);
    return rewards - costs;
  }
  std::vector<InfoKey> info_keys() const override {
    return {{"x_position", InfoType::kFloat64}, {"z_distance_from_origin", InfoType::kFloat64},
            {"x_velocity", InfoType::kFloat64}, {"reward_forward", InfoType::kFloat64},
            {"reward_ctrl", InfoType::kActionDtype}, {"reward_survive", InfoType::kFloat64}};
  }
  std::vector<const char*> reset_info_keys() const override { return {"x_position", "z_distance_from_origin"}; }
  void reset_info(const mjModel* m, const mjData* d, double* info) const override {
    info[0] = d->qpos[0];
    info[1] = d->qpos[1] - m->qpos0[1];
  }
  virtual bool is_healthy(const mjModel* m, const mjData* d) const = 0;
};

class Hopper : public PlanarWalker {
 public:
  const char* name() const override { return "Hopper-v5"; }
  const char* xml_file() const override { return "hopper.xml"; }
  bool is_healthy(const mjModel* m, const mjData* d) const override {
    double z = d->qpos[1], angle = d->qpos[2];
    // state_vector()[2:] = qpos[2:], qvel strictly inside (-100, 100)
    for (int i = 2; i < m->nq; ++i)
      if (!(-100.0 < d->qpos[i] && d->qpos[i] < 100.0)) return false;
    for (int i = 0; i < m->nv; ++i)
      if (!(-100.0 < d->qvel[i] && d->qvel[i] < 100.0)) return false;
    return 0.7 < z && z < INFINITY && -0.2 < angle && angle < 0.2;
  }
};

class Walker2d : public PlanarWalker {
 public:
  const char* name() const override { return "Walker2d-v5"; }
  const char* xml_file() const override { return "walker2d_v5.xml"; }
  bool is_healthy(const mjModel*, const mjData* d) const override {
    double z = d->qpos[1], angle = d->qpos[2];
    return 0.8 < z && z < 2.0 && -1.0 < angle && angle < 1.0;
  }
};

// HalfCheetah-v5 (frame_skip 5, ctrl weight 0.1, never terminates) and Swimmer-v5
// (frame_skip 4, ctrl weight 1e-4, obs drops qpos[0:2]).
class Runner : public Task {
 public:
  Runner(const char* name, const char* xml, int frame_skip, double ctrl_w, int skip)
      : name_(name), xml_(xml), frame_skip_(frame_skip), ctrl_w_(ctrl_w), skip_(skip) {}
  void bind(const mjModel* m) override { require(m->nq >= 2 && m->nq > skip_, name_, "needs nq >= 2"); }
  const char* name() const override { return name_; }
  const char* xml_file() const override { return xml_; }
  int frame_skip() const override { return frame_skip_; }
  int max_episode_steps() const override { return 1000; }
  int obs_dim(const mjModel* m) const override { return m->nq - skip_ + m->nv; }
  PreStep before(const mjData* d) const override { return {d->qpos[0], d->qpos[1]}; }
  void observe(const mjModel* m, const mjData* d, double* obs) const override {
    for (int i = skip_; i < m->nq; ++i) *obs++ = d->qpos[i];
    for (int i = 0; i < m->nv; ++i) *obs++ = d->qvel[i];
  }
  double reward(const mjModel* m, const mjData* d, const PreStep& pre, const float* a32,
                const double* a64, bool* terminated, double* info) const override {
    double dt = m->opt.timestep * frame_skip_;
    double x_velocity = (d->qpos[0] - pre.x) / dt;
    double forward = 1.0 * x_velocity, ctrl = ctrl_cost(a32, a64, m->nu, ctrl_w_);
    *terminated = false;
    if (skip_ == 1) {  // HalfCheetah
      double v[] = {d->qpos[0], x_velocity, forward, -ctrl};
      std::copy(v, v + 4, info);
    } else {  // Swimmer
      double y_velocity = (d->qpos[1] - pre.y) / dt;
      double v[] = {d->qpos[0], d->qpos[1], norm2(d->qpos[0], d->qpos[1]), x_velocity, y_velocity, forward, -ctrl};
      std::copy(v, v + 7, info);
    }
    return forward - ctrl;
  }
  std::vector<InfoKey> info_keys() const override {
    if (skip_ == 1)
      return {{"x_position", InfoType::kFloat64}, {"x_velocity", InfoType::kFloat64},
              {"reward_forward", InfoType::kFloat64}, {"reward_ctrl", InfoType::kActionDtype}};
    return {{"x_position", InfoType::kFloat64}, {"y_position", InfoType::kFloat64},
            {"distance_from_origin", InfoType::kFloat64}, {"x_velocity", InfoType::kFloat64},
            {"y_velocity", InfoType::kFloat64}, {"reward_forward", InfoType::kFloat64},
            {"reward_ctrl", InfoType::kActionDtype}};
  }
  std::vector<const char*> reset_info_keys() const override {
    if (skip_ == 1) return {"x_position"};
    return {"x_position", "y_position", "distance_from_origin"};
  }
  void reset_info(const mjModel*, const mjData* d, double* info) const override {
    info[0] = d->qpos[0];
    if (skip_ == 2) {
      info[1] = d->qpos[1];
      info[2] = norm2(d->qpos[0], d->qpos[1]);
    }
  }

 private:
  const char *name_, *xml_;
  int frame_skip_;
  double ctrl_w_;
  int skip_;
};

class InvertedPendulum : public Task {
 public:
  void bind(const mjModel* m) override { require(m->nq >= 2, name(), "needs nq >= 2"); }
  const char* name() const override { return "InvertedPendulum-v5"; }
  const char* xml_file() const override { return "inverted_pendulum.xml"; }
  int frame_skip() const override { return 2; }
  int max_episode_steps() const override { return 1000; }
  int obs_dim(const mjModel* m) const override { return m->nq + m->nv; }
  void observe(const mjModel* m, const mjData* d, double* obs) const override {
    for (int i = 0; i < m->nq; ++i) *obs++ = d->qpos[i];
    for (int i = 0; i < m->nv; ++i) *obs++ = d->qvel[i];
  }
  double reward(const mjModel* m, const mjData* d, const PreStep&, const float*, const double*,
                bool* terminated, double* info) const override {
    bool finite = true;
    for (int i = 0; i < m->nq; ++i) finite = finite && std::isfinite(d->qpos[i]);
    for (int i = 0; i < m->nv; ++i) finite = finite && std::isfinite(d->qvel[i]);
    *terminated = !finite || std::fabs(d->qpos[1]) > 0.2;
    info[0] = *terminated ? 0.0 : 1.0;
    return info[0];
  }
  std::vector<InfoKey> info_keys() const override { return {{"reward_survive", InfoType::kInt64}}; }
};

class Reacher : public Task {
 public:
  const char* name() const override { return "Reacher-v5"; }
  const char* xml_file() const override { return "reacher.xml"; }
  int frame_skip() const override { return 2; }
  int max_episode_steps() const override { return 50; }
  int obs_dim(const mjModel* m) const override { return 2 + 2 + (m->nq - 2) + 2 + 2; }
  void bind(const mjModel* m) override {
    require(m->nq >= 2 && m->nv >= 2, name(), "needs nq, nv >= 2");
    fingertip_ = mj_name2id(m, mjOBJ_BODY, "fingertip");
    target_ = mj_name2id(m, mjOBJ_BODY, "target");
    if (fingertip_ < 0 || target_ < 0) throw std::runtime_error("reacher.xml: missing fingertip/target body");
  }
  void observe(const mjModel* m, const mjData* d, double* obs) const override {
    for (int i = 0; i < 2; ++i) *obs++ = std::cos(d->qpos[i]);
    for (int i = 0; i < 2; ++i) *obs++ = std::sin(d->qpos[i]);
    for (int i = 2; i < m->nq; ++i) *obs++ = d->qpos[i];
    for (int i = 0; i < 2; ++i) *obs++ = d->qvel[i];
    for (int i = 0; i < 2; ++i) *obs++ = d->xpos[3 * fingertip_ + i] - d->xpos[3 * target_ + i];
  }
  double reward(const mjModel* m, const mjData* d, const PreStep&, const float* a32,
                const double* a64, bool* terminated, double* info) const override {
    double v[3];
    for (int i = 0; i < 3; ++i) v[i] = d->xpos[3 * fingertip_ + i] - d->xpos[3 * target_ + i];
    double reward_dist = -std::sqrt(v[0] * v[0] + v[1] * v[1] + v[2] * v[2]) * 1.0;
    double reward_ctrl = -ctrl_cost(a32, a64, m->nu, 1.0);
    *terminated = false;
    info[0] = reward_dist;
    info[1] = reward_ctrl;
    return reward_dist + reward_ctrl;
  }
  std::vector<InfoKey> info_keys() const override {
    return {{"reward_dist", InfoType::kFloat64}, {"reward_ctrl", InfoType::kActionDtype}};
  }

 private:
  int fingertip_ = -1, target_ = -1;
};

class Ant : public Task {
 public:
  void bind(const mjModel* m) override { require(m->nq >= 3 && m->nbody >= 2, name(), "needs nq >= 3, a torso body"); }
  const char* name() const override { return "Ant-v5"; }
  const char* xml_file() const override { return "ant.xml"; }
  int frame_skip() const override { return 5; }
  int max_episode_steps() const override { return 1000; }
  int obs_dim(const mjModel* m) const override { return m->nq - 2 + m->nv + (m->nbody - 1) * 6; }
  PreStep before(const mjData* d) const override { return {d->xpos[3 * 1 + 0], d->xpos[3 * 1 + 1]}; }
  void observe(const mjModel* m, const mjData* d, double* obs) const override {
    for (int i = 2; i < m->nq; ++i) *obs++ = d->qpos[i];
    for (int i = 0; i < m->nv; ++i) *obs++ = d->qvel[i];
    for (int i = 6; i < 6 * m->nbody; ++i) *obs++ = clip(d->cfrc_ext[i], -1.0, 1.0);
  }
  double reward(const mjModel* m, const mjData* d, const PreStep& pre, const float* a32,
                const double* a64, bool* terminated, double* info) const override {
    double dt = m->opt.timestep * frame_skip();
    double x_velocity = (d->xpos[3 * 1 + 0] - pre.x) / dt;
    double y_velocity = (d->xpos[3 * 1 + 1] - pre.y) / dt;
    bool finite = true;
    for (int i = 0; i < m->nq; ++i) finite = finite && std::isfinite(d->qpos[i]);
    for (int i = 0; i < m->nv; ++i) finite = finite && std::isfinite(d->qvel[i]);
    double z = d->qpos[2];
    bool healthy = finite && 0.2 <= z && z <= 1.0;
    double rewards = x_velocity * 1.0 + (healthy ? 1.0 : 0.0);
    std::vector<double> sq(6 * m->nbody);
    for (int i = 0; i < 6 * m->nbody; ++i) {
      double c = clip(d->cfrc_ext[i], -1.0, 1.0);
      sq[i] = c * c;
    }
    double contact_cost = 5e-4 * pairwise_sum(sq.data(), 6 * m->nbody);
    double ctrl = ctrl_cost(a32, a64, m->nu, 0.5);
    double costs = ctrl + contact_cost;
    *terminated = !healthy;
    double v[] = {d->qpos[0], d->qpos[1], norm2(d->qpos[0], d->qpos[1]), x_velocity, y_velocity,
                  x_velocity * 1.0, -ctrl, -contact_cost, healthy ? 1.0 : 0.0};
    std::copy(v, v + 9, info);
    return rewards - costs;
  }
  std::vector<InfoKey> info_keys() const override {
    return {{"x_position", InfoType::kFloat64}, {"y_position", InfoType::kFloat64},
            {"distance_from_origin", InfoType::kFloat64}, {"x_velocity", InfoType::kFloat64},
            {"y_velocity", InfoType::kFloat64}, {"reward_forward", InfoType::kFloat64},
            {"reward_ctrl", InfoType::kActionDtype}, {"reward_contact", InfoType::kFloat64},
            {"reward_survive", InfoType::kFloat64}};
  }
  std::vector<const char*> reset_info_keys() const override { return {"x_position", "y_position", "distance_from_origin"}; }
  void reset_info(const mjModel*, const mjData* d, double* info) const override {
    info[0] = d->qpos[0];
    info[1] = d->qpos[1];
    info[2] = norm2(d->qpos[0], d->qpos[1]);
  }
};

}  // namespace

std::vector<std::string> task_ids() {
  return {"Ant-v5", "HalfCheetah-v5", "Hopper-v5", "InvertedPendulum-v5", "Reacher-v5", "Swimmer-v5", "Walker2d-v5"};
}

std::unique_ptr<Task> make_task(const std::string& id) {
  if (id == "Hopper-v5") return std::make_unique<Hopper>();
  if (id == "Walker2d-v5") return std::make_unique<Walker2d>();
  if (id == "HalfCheetah-v5") return std::make_unique<Runner>("HalfCheetah-v5", "half_cheetah.xml", 5, 0.1, 1);
  if (id == "Swimmer-v5") return std::make_unique<Runner>("Swimmer-v5", "swimmer.xml", 4, 1e-4, 2);
  if (id == "InvertedPendulum-v5") return std::make_unique<InvertedPendulum>();
  if (id == "Reacher-v5") return std::make_unique<Reacher>();
  if (id == "Ant-v5") return std::make_unique<Ant>();
  return nullptr;
}

}  // namespace aihf
