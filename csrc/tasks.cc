#include "tasks.h"

#include <algorithm>
#include <atomic>
#include <cmath>
#include <math.h>
#include <stdexcept>
#include <string>

namespace aihf {

namespace {
std::atomic<int> g_norm_order{kNormFma};
}  // namespace
void set_norm_order(int order) {
  if (order < kNormPlain || order > kNormPairs)
    throw std::invalid_argument("norm order must be 0 (plain), 1 (fma) or 2 (pairs), got " + std::to_string(order));
  g_norm_order.store(order, std::memory_order_relaxed);
}
int norm_order() { return g_norm_order.load(std::memory_order_relaxed); }

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

// numpy's float16 arithmetic: each operation in float, rounded to half (round to nearest even).
float to_half(float x) { return float(static_cast<_Float16>(x)); }

}  // namespace

void Params::check_all_read(const std::string& task) const {
  for (const auto& kv : values_)
    if (!read_.count(kv.first)) throw std::invalid_argument(task + ": unknown option " + kv.first);
}

CtrlCost CtrlCost::from(Params& p, const std::string& name, double dflt) {
  CtrlCost c;
  c.weight = p.get(name, dflt);
  c.bits16 = int(p.get(name + "_bits16", 16));
  c.bits32 = int(p.get(name + "_bits32", 32));
  return c;
}

// per-thread scratch for the squares (any number of actuators, no allocation per step)
template <typename T>
T* squares_buffer(int n) {
  thread_local std::vector<T> buf;
  if (int(buf.size()) < n) buf.resize(n);
  return buf.data();
}

double CtrlCost::of_float64(const double* x, int n) const {
  double* sq = squares_buffer<double>(n);
  for (int i = 0; i < n; ++i) sq[i] = x[i] * x[i];
  return weight * pairwise_sum(sq, n);
}

// weight * np.sum(np.square(action)) as numpy computes it for the action's dtype (NEP 50: a
// Python float weight takes the action's dtype; a numpy float64 one makes the product float64).
double CtrlCost::operator()(const Action& a, int n) const {
  if (a.f64) return of_float64(a.f64, n);
  float* sq = squares_buffer<float>(n);
  if (a.half) {  // np.square in half; np.sum accumulates halves in float, then rounds to half
    for (int i = 0; i < n; ++i) sq[i] = to_half(a.f32[i] * a.f32[i]);
    float s = to_half(pairwise_sum(sq, n));
    if (bits16 == 16) return to_half(float(static_cast<_Float16>(weight)) * s);
    if (bits16 == 32) return float(weight) * s;
    return weight * double(s);
  }
  for (int i = 0; i < n; ++i) sq[i] = a.f32[i] * a.f32[i];
  float s = pairwise_sum(sq, n);
  if (bits32 == 32) return float(weight) * s;
  return weight * double(s);
}

namespace {

double clip(double v, double lo, double hi) { return std::min(std::max(v, lo), hi); }

// np.linalg.norm of a short float64 vector is sqrt(x.dot(x)), and x.dot(x) is OpenBLAS's ddot,
// whose kernel (picked by CPU) sums fewer than 16 squares from 0 as s = fma(x[i], x[i], s), as
// s += x[i] * x[i], or (SSE2 kernels) in two accumulators, even and odd elements, added at the
// end. Python measures which (set_norm_order, at first use) so that infos and rewards stay
// bitwise numpy's; this file is built with -ffp-contract=off, so no product is fused unasked.
double blas_norm(const double* x, int n) {
  double s = 0.0;
  switch (norm_order()) {
    case kNormFma:
      for (int i = 0; i < n; ++i) s = std::fma(x[i], x[i], s);
      break;
    case kNormPairs: {
      double odd = 0.0;
      for (int i = 0; i < n; ++i) (i % 2 ? odd : s) += x[i] * x[i];
      s += odd;
      break;
    }
    default:
      for (int i = 0; i < n; ++i) s += x[i] * x[i];
  }
  return std::sqrt(s);
}
double norm2(double x, double y) {
  double v[2] = {x, y};
  return blas_norm(v, 2);
}

// A numpy float64 scalar's x**2 is libm's pow(x, 2.0), which is not always x * x; called through
// a volatile pointer so the compiler cannot fold it into x * x.
double (*volatile libm_pow)(double, double) = ::pow;
double npy_square_scalar(double x) { return libm_pow(x, 2.0); }

void require(bool ok, const char* task, const std::string& what) {
  if (!ok) throw std::invalid_argument(std::string(task) + ": the model does not fit the task (" + what + ")");
}

// is_healthy * healthy_reward as numpy gives it (False * h is 0.0 * h: -0.0 for h < 0, nan for inf)
double survive_reward(bool healthy, double h) { return healthy ? h : 0.0 * h; }

// Hopper-v5 / Walker2d-v5: planar walkers, obs = qpos[1:] (or qpos), clip(qvel, -10, 10).
class PlanarWalker : public Task {
 public:
  PlanarWalker(Params& p, double z_lo, double z_hi, double angle) {
    frame_skip_ = int(p.get("frame_skip", 4));
    forward_w_ = p.get("forward_reward_weight", 1.0);
    ctrl_ = CtrlCost::from(p, "ctrl_cost_weight", 1e-3);
    healthy_reward_ = p.get("healthy_reward", 1.0);
    terminate_ = p.get("terminate_when_unhealthy", 1) != 0;
    z_lo_ = p.get("healthy_z_range_min", z_lo);
    z_hi_ = p.get("healthy_z_range_max", z_hi);
    angle_lo_ = p.get("healthy_angle_range_min", -angle);
    angle_hi_ = p.get("healthy_angle_range_max", angle);
    skip_ = p.get("exclude_current_positions_from_observation", 1) != 0 ? 1 : 0;
  }
  void bind(const mjModel* m) override { require(m->nq >= 3 && m->nv >= 1, name(), "needs nq >= 3, nv >= 1"); }
  int obs_dim(const mjModel* m) const override { return m->nq - skip_ + m->nv; }
  PreStep before(const mjData* d) const override { return {d->qpos[0], 0}; }
  void observe(const mjModel* m, const mjData* d, double* obs) const override {
    for (int i = skip_; i < m->nq; ++i) *obs++ = d->qpos[i];
    for (int i = 0; i < m->nv; ++i) *obs++ = clip(d->qvel[i], -10, 10);
  }
  double reward(const mjModel* m, const mjData* d, const PreStep& pre, const Action& a, bool* terminated,
                double* info) const override {
    double dt = m->opt.timestep * frame_skip_;
    double x_velocity = (d->qpos[0] - pre.x) / dt;
    bool healthy = is_healthy(m, d);
    double forward = forward_w_ * x_velocity;
    double survive = survive_reward(healthy, healthy_reward_);
    double rewards = forward + survive;
    double costs = ctrl_(a, m->nu);
    *terminated = !healthy && terminate_;
    double v[] = {d->qpos[0], d->qpos[1] - m->qpos0[1], x_velocity, forward, -costs, survive};
    std::copy(v, v + 6, info);
    return rewards - costs;
  }
  std::vector<InfoKey> info_keys() const override {
    return {"x_position", "z_distance_from_origin", "x_velocity", "reward_forward", "reward_ctrl", "reward_survive"};
  }
  std::vector<InfoKey> reset_info_keys() const override { return {"x_position", "z_distance_from_origin"}; }
  void reset_info(const mjModel* m, const mjData* d, double* info) const override {
    info[0] = d->qpos[0];
    info[1] = d->qpos[1] - m->qpos0[1];
  }

 protected:
  bool z_and_angle_ok(const mjData* d) const {
    double z = d->qpos[1], angle = d->qpos[2];
    return z_lo_ < z && z < z_hi_ && angle_lo_ < angle && angle < angle_hi_;
  }
  virtual bool is_healthy(const mjModel* m, const mjData* d) const = 0;

 private:
  double forward_w_, healthy_reward_, z_lo_, z_hi_, angle_lo_, angle_hi_;
  CtrlCost ctrl_;
  bool terminate_;
  int skip_;
};

class Hopper : public PlanarWalker {
 public:
  explicit Hopper(Params& p) : PlanarWalker(p, 0.7, INFINITY, 0.2) {
    state_lo_ = p.get("healthy_state_range_min", -100.0);
    state_hi_ = p.get("healthy_state_range_max", 100.0);
  }
  const char* name() const override { return "Hopper-v5"; }
  bool is_healthy(const mjModel* m, const mjData* d) const override {
    // state_vector()[2:] = qpos[2:], qvel strictly inside the state range
    for (int i = 2; i < m->nq; ++i)
      if (!(state_lo_ < d->qpos[i] && d->qpos[i] < state_hi_)) return false;
    for (int i = 0; i < m->nv; ++i)
      if (!(state_lo_ < d->qvel[i] && d->qvel[i] < state_hi_)) return false;
    return z_and_angle_ok(d);
  }

 private:
  double state_lo_, state_hi_;
};

class Walker2d : public PlanarWalker {
 public:
  explicit Walker2d(Params& p) : PlanarWalker(p, 0.8, 2.0, 1.0) {}
  const char* name() const override { return "Walker2d-v5"; }
  bool is_healthy(const mjModel*, const mjData* d) const override { return z_and_angle_ok(d); }
};

// HalfCheetah-v5 (frame_skip 5, ctrl weight 0.1, never terminates, obs drops qpos[0]) and
// Swimmer-v5 (frame_skip 4, ctrl weight 1e-4, obs drops qpos[0:2]).
class Runner : public Task {
 public:
  Runner(Params& p, const char* name, int frame_skip, double ctrl_w, int skip) : name_(name), swimmer_(skip == 2) {
    frame_skip_ = int(p.get("frame_skip", frame_skip));
    forward_w_ = p.get("forward_reward_weight", 1.0);
    ctrl_ = CtrlCost::from(p, "ctrl_cost_weight", ctrl_w);
    skip_ = p.get("exclude_current_positions_from_observation", 1) != 0 ? skip : 0;
  }
  void bind(const mjModel* m) override { require(m->nq >= 2 && m->nq >= skip_, name_, "needs nq >= 2"); }
  const char* name() const override { return name_; }
  int obs_dim(const mjModel* m) const override { return m->nq - skip_ + m->nv; }
  PreStep before(const mjData* d) const override { return {d->qpos[0], d->qpos[1]}; }
  void observe(const mjModel* m, const mjData* d, double* obs) const override {
    for (int i = skip_; i < m->nq; ++i) *obs++ = d->qpos[i];
    for (int i = 0; i < m->nv; ++i) *obs++ = d->qvel[i];
  }
  double reward(const mjModel* m, const mjData* d, const PreStep& pre, const Action& a, bool* terminated,
                double* info) const override {
    double dt = m->opt.timestep * frame_skip_;
    double x_velocity = (d->qpos[0] - pre.x) / dt;
    double forward = forward_w_ * x_velocity, ctrl = ctrl_(a, m->nu);
    *terminated = false;
    if (!swimmer_) {
      double v[] = {d->qpos[0], x_velocity, forward, -ctrl};
      std::copy(v, v + 4, info);
    } else {
      double y_velocity = (d->qpos[1] - pre.y) / dt;
      double v[] = {d->qpos[0], d->qpos[1], norm2(d->qpos[0], d->qpos[1]), x_velocity, y_velocity, forward, -ctrl};
      std::copy(v, v + 7, info);
    }
    return forward - ctrl;
  }
  std::vector<InfoKey> info_keys() const override {
    if (!swimmer_) return {"x_position", "x_velocity", "reward_forward", "reward_ctrl"};
    return {"x_position", "y_position", "distance_from_origin", "x_velocity", "y_velocity", "reward_forward",
            "reward_ctrl"};
  }
  std::vector<InfoKey> reset_info_keys() const override {
    if (!swimmer_) return {"x_position"};
    return {"x_position", "y_position", "distance_from_origin"};
  }
  void reset_info(const mjModel*, const mjData* d, double* info) const override {
    info[0] = d->qpos[0];
    if (swimmer_) {
      info[1] = d->qpos[1];
      info[2] = norm2(d->qpos[0], d->qpos[1]);
    }
  }

 private:
  const char* name_;
  bool swimmer_;
  double forward_w_;
  CtrlCost ctrl_;
  int skip_;
};

class InvertedPendulum : public Task {
 public:
  explicit InvertedPendulum(Params& p) { frame_skip_ = int(p.get("frame_skip", 2)); }
  void bind(const mjModel* m) override { require(m->nq >= 2, name(), "needs nq >= 2"); }
  const char* name() const override { return "InvertedPendulum-v5"; }
  int obs_dim(const mjModel* m) const override { return m->nq + m->nv; }
  void observe(const mjModel* m, const mjData* d, double* obs) const override {
    for (int i = 0; i < m->nq; ++i) *obs++ = d->qpos[i];
    for (int i = 0; i < m->nv; ++i) *obs++ = d->qvel[i];
  }
  double reward(const mjModel* m, const mjData* d, const PreStep&, const Action&, bool* terminated,
                double* info) const override {
    bool finite = true;
    for (int i = 0; i < m->nq; ++i) finite = finite && std::isfinite(d->qpos[i]);
    for (int i = 0; i < m->nv; ++i) finite = finite && std::isfinite(d->qvel[i]);
    *terminated = !finite || std::fabs(d->qpos[1]) > 0.2;
    info[0] = *terminated ? 0.0 : 1.0;
    return info[0];
  }
  std::vector<InfoKey> info_keys() const override { return {"reward_survive"}; }
};

class Reacher : public Task {
 public:
  explicit Reacher(Params& p) {
    frame_skip_ = int(p.get("frame_skip", 2));
    dist_w_ = p.get("reward_dist_weight", 1.0);
    ctrl_ = CtrlCost::from(p, "reward_control_weight", 1.0);
  }
  const char* name() const override { return "Reacher-v5"; }
  int obs_dim(const mjModel* m) const override { return 2 + 2 + (m->nq - 2) + 2 + 2; }
  void bind(const mjModel* m) override {
    require(m->nq >= 2 && m->nv >= 2, name(), "needs nq, nv >= 2");
    fingertip_ = mj_name2id(m, mjOBJ_BODY, "fingertip");
    target_ = mj_name2id(m, mjOBJ_BODY, "target");
    require(fingertip_ >= 0 && target_ >= 0, name(), "needs bodies named fingertip and target");
  }
  void observe(const mjModel* m, const mjData* d, double* obs) const override {
    for (int i = 0; i < 2; ++i) *obs++ = std::cos(d->qpos[i]);
    for (int i = 0; i < 2; ++i) *obs++ = std::sin(d->qpos[i]);
    for (int i = 2; i < m->nq; ++i) *obs++ = d->qpos[i];
    for (int i = 0; i < 2; ++i) *obs++ = d->qvel[i];
    for (int i = 0; i < 2; ++i) *obs++ = d->xpos[3 * fingertip_ + i] - d->xpos[3 * target_ + i];
  }
  double reward(const mjModel* m, const mjData* d, const PreStep&, const Action& a, bool* terminated,
                double* info) const override {
    double v[3];
    for (int i = 0; i < 3; ++i) v[i] = d->xpos[3 * fingertip_ + i] - d->xpos[3 * target_ + i];
    double reward_dist = -blas_norm(v, 3) * dist_w_;
    double reward_ctrl = -ctrl_(a, m->nu);  // -(s) * w: the same magnitude as -(w * s)
    *terminated = false;
    info[0] = reward_dist;
    info[1] = reward_ctrl;
    return reward_dist + reward_ctrl;
  }
  std::vector<InfoKey> info_keys() const override { return {"reward_dist", "reward_ctrl"}; }

 private:
  int fingertip_ = -1, target_ = -1;
  double dist_w_;
  CtrlCost ctrl_;
};

class Ant : public Task {
 public:
  explicit Ant(Params& p) {
    frame_skip_ = int(p.get("frame_skip", 5));
    forward_w_ = p.get("forward_reward_weight", 1.0);
    ctrl_ = CtrlCost::from(p, "ctrl_cost_weight", 0.5);
    contact_w_ = p.get("contact_cost_weight", 5e-4);
    healthy_reward_ = p.get("healthy_reward", 1.0);
    terminate_ = p.get("terminate_when_unhealthy", 1) != 0;
    z_lo_ = p.get("healthy_z_range_min", 0.2);
    z_hi_ = p.get("healthy_z_range_max", 1.0);
    force_lo_ = p.get("contact_force_range_min", -1.0);
    force_hi_ = p.get("contact_force_range_max", 1.0);
    main_body_ = int(p.get("main_body", 1));
    skip_ = p.get("exclude_current_positions_from_observation", 1) != 0 ? 2 : 0;
    cfrc_ = p.get("include_cfrc_ext_in_observation", 1) != 0;
  }
  void bind(const mjModel* m) override {
    require(m->nq >= 3, name(), "needs nq >= 3");
    require(main_body_ >= 0 && main_body_ < m->nbody, name(), "main_body is not a body of the model");
  }
  const char* name() const override { return "Ant-v5"; }
  int obs_dim(const mjModel* m) const override { return m->nq - skip_ + m->nv + (cfrc_ ? (m->nbody - 1) * 6 : 0); }
  PreStep before(const mjData* d) const override { return {d->xpos[3 * main_body_ + 0], d->xpos[3 * main_body_ + 1]}; }
  void observe(const mjModel* m, const mjData* d, double* obs) const override {
    for (int i = skip_; i < m->nq; ++i) *obs++ = d->qpos[i];
    for (int i = 0; i < m->nv; ++i) *obs++ = d->qvel[i];
    if (cfrc_)
      for (int i = 6; i < 6 * m->nbody; ++i) *obs++ = clip(d->cfrc_ext[i], force_lo_, force_hi_);
  }
  double reward(const mjModel* m, const mjData* d, const PreStep& pre, const Action& a, bool* terminated,
                double* info) const override {
    double dt = m->opt.timestep * frame_skip_;
    double x_velocity = (d->xpos[3 * main_body_ + 0] - pre.x) / dt;
    double y_velocity = (d->xpos[3 * main_body_ + 1] - pre.y) / dt;
    bool finite = true;
    for (int i = 0; i < m->nq; ++i) finite = finite && std::isfinite(d->qpos[i]);
    for (int i = 0; i < m->nv; ++i) finite = finite && std::isfinite(d->qvel[i]);
    double z = d->qpos[2];
    bool healthy = finite && z_lo_ <= z && z <= z_hi_;
    double forward = x_velocity * forward_w_;
    double survive = survive_reward(healthy, healthy_reward_);
    double rewards = forward + survive;
    std::vector<double> sq(6 * m->nbody);
    for (int i = 0; i < 6 * m->nbody; ++i) {
      double c = clip(d->cfrc_ext[i], force_lo_, force_hi_);
      sq[i] = c * c;
    }
    double contact_cost = contact_w_ * pairwise_sum(sq.data(), 6 * m->nbody);
    double ctrl = ctrl_(a, m->nu);
    double costs = ctrl + contact_cost;
    *terminated = !healthy && terminate_;
    double v[] = {d->qpos[0], d->qpos[1], norm2(d->qpos[0], d->qpos[1]), x_velocity, y_velocity,
                  forward, -ctrl, -contact_cost, survive};
    std::copy(v, v + 9, info);
    return rewards - costs;
  }
  std::vector<InfoKey> info_keys() const override {
    return {"x_position", "y_position", "distance_from_origin", "x_velocity", "y_velocity", "reward_forward",
            "reward_ctrl", "reward_contact", "reward_survive"};
  }
  std::vector<InfoKey> reset_info_keys() const override { return {"x_position", "y_position", "distance_from_origin"}; }
  void reset_info(const mjModel*, const mjData* d, double* info) const override {
    info[0] = d->qpos[0];
    info[1] = d->qpos[1];
    info[2] = norm2(d->qpos[0], d->qpos[1]);
  }

 private:
  double forward_w_, contact_w_, healthy_reward_, z_lo_, z_hi_, force_lo_, force_hi_;
  CtrlCost ctrl_;
  bool terminate_, cfrc_;
  int main_body_, skip_;
};


// Humanoid-v5 and HumanoidStandup-v5: obs = qpos[2:] (or qpos), qvel, then optionally
// cinert[1:], cvel[1:], qfrc_actuator[6:], cfrc_ext[1:]; infos carry the tendon lengths and
// velocities as arrays.
class HumanoidBase : public Task {
 public:
  explicit HumanoidBase(Params& p) {
    frame_skip_ = int(p.get("frame_skip", 5));
    skip_ = p.get("exclude_current_positions_from_observation", 1) != 0 ? 2 : 0;
    cinert_ = p.get("include_cinert_in_observation", 1) != 0;
    cvel_ = p.get("include_cvel_in_observation", 1) != 0;
    qfrc_ = p.get("include_qfrc_actuator_in_observation", 1) != 0;
    cfrc_ = p.get("include_cfrc_ext_in_observation", 1) != 0;
  }
  void bind(const mjModel* m) override {
    require(m->nq >= 3 && m->nv >= 6, name(), "needs a free joint: nq >= 3, nv >= 6");
    ntendon_ = m->ntendon;
  }
  int obs_dim(const mjModel* m) const override {
    int b = m->nbody - 1;
    return m->nq - skip_ + m->nv + (cinert_ ? 10 * b : 0) + (cvel_ ? 6 * b : 0) + (qfrc_ ? m->nv - 6 : 0) +
           (cfrc_ ? 6 * b : 0);
  }
  void observe(const mjModel* m, const mjData* d, double* obs) const override {
    for (int i = skip_; i < m->nq; ++i) *obs++ = d->qpos[i];
    for (int i = 0; i < m->nv; ++i) *obs++ = d->qvel[i];
    if (cinert_) obs = std::copy(d->cinert + 10, d->cinert + 10 * m->nbody, obs);
    if (cvel_) obs = std::copy(d->cvel + 6, d->cvel + 6 * m->nbody, obs);
    if (qfrc_) obs = std::copy(d->qfrc_actuator + 6, d->qfrc_actuator + m->nv, obs);
    if (cfrc_) obs = std::copy(d->cfrc_ext + 6, d->cfrc_ext + 6 * m->nbody, obs);
  }

 protected:
  // weight * np.sum(np.square(cfrc_ext)) over every body (the world's row included)
  static double cfrc_square_sum(const mjModel* m, const mjData* d) {
    std::vector<double> sq(6 * m->nbody);
    for (int i = 0; i < 6 * m->nbody; ++i) sq[i] = d->cfrc_ext[i] * d->cfrc_ext[i];
    return pairwise_sum(sq.data(), 6 * m->nbody);
  }
  double* tendons(const mjData* d, double* info) const {
    info = std::copy(d->ten_length, d->ten_length + ntendon_, info);
    return std::copy(d->ten_velocity, d->ten_velocity + ntendon_, info);
  }
  int ntendon_ = 0, skip_;
  bool cinert_, cvel_, qfrc_, cfrc_;
};

class Humanoid : public HumanoidBase {
 public:
  explicit Humanoid(Params& p) : HumanoidBase(p) {
    forward_w_ = p.get("forward_reward_weight", 1.25);
    ctrl_ = CtrlCost::from(p, "ctrl_cost_weight", 0.1);
    contact_w_ = p.get("contact_cost_weight", 5e-7);
    contact_lo_ = p.get("contact_cost_range_min", -INFINITY);
    contact_hi_ = p.get("contact_cost_range_max", 10.0);
    healthy_reward_ = p.get("healthy_reward", 5.0);
    terminate_ = p.get("terminate_when_unhealthy", 1) != 0;
    z_lo_ = p.get("healthy_z_range_min", 1.0);
    z_hi_ = p.get("healthy_z_range_max", 2.0);
  }
  const char* name() const override { return "Humanoid-v5"; }
  // gymnasium's mass_center: einsum("b,bj->j", body_mass, xipos) (a plain loop over bodies)
  // / body_mass.sum() (pairwise)
  PreStep before(const mjData* d) const override { return mass_center(model_, d); }
  void bind(const mjModel* m) override {
    HumanoidBase::bind(m);
    model_ = m;
  }
  double reward(const mjModel* m, const mjData* d, const PreStep& pre, const Action&, bool* terminated,
                double* info) const override {
    double dt = m->opt.timestep * frame_skip_;
    PreStep after = mass_center(m, d);
    double x_velocity = (after.x - pre.x) / dt, y_velocity = (after.y - pre.y) / dt;
    double forward = forward_w_ * x_velocity;
    double z = d->qpos[2];
    bool healthy = z_lo_ < z && z < z_hi_;
    double survive = survive_reward(healthy, healthy_reward_);
    double rewards = forward + survive;
    double ctrl = ctrl_.of_float64(d->ctrl, m->nu);  // gymnasium uses data.ctrl (float64)
    double contact = clip(contact_w_ * cfrc_square_sum(m, d), contact_lo_, contact_hi_);
    double costs = ctrl + contact;
    *terminated = !healthy && terminate_;
    *info++ = d->qpos[0];
    *info++ = d->qpos[1];
    info = tendons(d, info);
    double v[] = {norm2(d->qpos[0], d->qpos[1]), x_velocity, y_velocity, survive, forward, -ctrl, -contact};
    std::copy(v, v + 7, info);
    return rewards - costs;
  }
  std::vector<InfoKey> info_keys() const override {
    return {"x_position", "y_position", {"tendon_length", ntendon_}, {"tendon_velocity", ntendon_},
            "distance_from_origin", "x_velocity", "y_velocity", "reward_survive", "reward_forward", "reward_ctrl",
            "reward_contact"};
  }
  std::vector<InfoKey> reset_info_keys() const override {
    return {"x_position", "y_position", {"tendon_length", ntendon_}, {"tendon_velocity", ntendon_},
            "distance_from_origin"};
  }
  void reset_info(const mjModel*, const mjData* d, double* info) const override {
    *info++ = d->qpos[0];
    *info++ = d->qpos[1];
    info = tendons(d, info);
    *info = norm2(d->qpos[0], d->qpos[1]);
  }

 private:
  static PreStep mass_center(const mjModel* m, const mjData* d) {
    double num[2] = {0.0, 0.0};
    for (int b = 0; b < m->nbody; ++b)
      for (int j = 0; j < 2; ++j) num[j] += m->body_mass[b] * d->xipos[3 * b + j];
    double denom = pairwise_sum(m->body_mass, m->nbody);
    return {num[0] / denom, num[1] / denom};
  }
  const mjModel* model_ = nullptr;
  double forward_w_, contact_w_, contact_lo_, contact_hi_, healthy_reward_, z_lo_, z_hi_;
  CtrlCost ctrl_;
  bool terminate_;
};

class HumanoidStandup : public HumanoidBase {
 public:
  explicit HumanoidStandup(Params& p) : HumanoidBase(p) {
    ctrl_ = CtrlCost::from(p, "ctrl_cost_weight", 0.1);
    impact_w_ = p.get("impact_cost_weight", 0.5e-6);
    impact_lo_ = p.get("impact_cost_range_min", -INFINITY);
    impact_hi_ = p.get("impact_cost_range_max", 10.0);
  }
  const char* name() const override { return "HumanoidStandup-v5"; }
  double reward(const mjModel* m, const mjData* d, const PreStep&, const Action&, bool* terminated,
                double* info) const override {
    double uph = (d->qpos[2] - 0) / m->opt.timestep;  // gymnasium ignores uph_cost_weight here
    double quad_ctrl = ctrl_.of_float64(d->ctrl, m->nu);
    double impact = clip(impact_w_ * cfrc_square_sum(m, d), impact_lo_, impact_hi_);
    *terminated = false;
    reset_info(m, d, info);
    info += 3 + 2 * ntendon_;
    info[0] = uph;
    info[1] = -quad_ctrl;
    info[2] = -impact;
    return uph - quad_ctrl - impact + 1;
  }
  std::vector<InfoKey> info_keys() const override {
    return {"x_position", "y_position", "z_distance_from_origin", {"tendon_length", ntendon_},
            {"tendon_velocity", ntendon_}, "reward_linup", "reward_quadctrl", "reward_impact"};
  }
  std::vector<InfoKey> reset_info_keys() const override {
    return {"x_position", "y_position", "z_distance_from_origin", {"tendon_length", ntendon_},
            {"tendon_velocity", ntendon_}};
  }
  void reset_info(const mjModel* m, const mjData* d, double* info) const override {
    *info++ = d->qpos[0];
    *info++ = d->qpos[1];
    *info++ = d->qpos[2] - m->qpos0[2];
    tendons(d, info);
  }

 private:
  double impact_w_, impact_lo_, impact_hi_;
  CtrlCost ctrl_;
};

class InvertedDoublePendulum : public Task {
 public:
  explicit InvertedDoublePendulum(Params& p) {
    frame_skip_ = int(p.get("frame_skip", 5));
    healthy_reward_ = p.get("healthy_reward", 10.0);
  }
  void bind(const mjModel* m) override {
    require(m->nq >= 2 && m->nv >= 3 && m->nsite >= 1, name(), "needs nq >= 2, nv >= 3 and a site (the tip)");
  }
  const char* name() const override { return "InvertedDoublePendulum-v5"; }
  int obs_dim(const mjModel* m) const override { return 1 + 2 * (m->nq - 1) + m->nv + 1; }
  void observe(const mjModel* m, const mjData* d, double* obs) const override {
    *obs++ = d->qpos[0];
    for (int i = 1; i < m->nq; ++i) *obs++ = std::sin(d->qpos[i]);
    for (int i = 1; i < m->nq; ++i) *obs++ = std::cos(d->qpos[i]);
    for (int i = 0; i < m->nv; ++i) *obs++ = clip(d->qvel[i], -10, 10);
    *obs = clip(d->qfrc_constraint[0], -10, 10);
  }
  double reward(const mjModel*, const mjData* d, const PreStep&, const Action&, bool* terminated,
                double* info) const override {
    double x = d->site_xpos[0], y = d->site_xpos[2];
    *terminated = y <= 1;
    double v1 = d->qvel[1], v2 = d->qvel[2];
    double dist = 0.01 * npy_square_scalar(x) + npy_square_scalar(y - 2);
    double vel = 1e-3 * npy_square_scalar(v1) + 5e-3 * npy_square_scalar(v2);
    double alive = *terminated ? 0.0 * healthy_reward_ : healthy_reward_;
    info[0] = alive;
    info[1] = -dist;
    info[2] = -vel;
    return alive - dist - vel;
  }
  std::vector<InfoKey> info_keys() const override { return {"reward_survive", "distance_penalty", "velocity_penalty"}; }

 private:
  double healthy_reward_;
};

class Pusher : public Task {
 public:
  explicit Pusher(Params& p) {
    frame_skip_ = int(p.get("frame_skip", 5));
    near_w_ = p.get("reward_near_weight", 0.5);
    dist_w_ = p.get("reward_dist_weight", 1.0);
    ctrl_ = CtrlCost::from(p, "reward_control_weight", 0.1);
  }
  const char* name() const override { return "Pusher-v5"; }
  void bind(const mjModel* m) override {
    require(m->nq >= 7 && m->nv >= 7, name(), "needs nq, nv >= 7");
    tips_ = mj_name2id(m, mjOBJ_BODY, "tips_arm");
    object_ = mj_name2id(m, mjOBJ_BODY, "object");
    goal_ = mj_name2id(m, mjOBJ_BODY, "goal");
    require(tips_ >= 0 && object_ >= 0 && goal_ >= 0, name(), "needs bodies named tips_arm, object and goal");
  }
  int obs_dim(const mjModel*) const override { return 7 + 7 + 9; }
  void observe(const mjModel*, const mjData* d, double* obs) const override {
    obs = std::copy(d->qpos, d->qpos + 7, obs);
    obs = std::copy(d->qvel, d->qvel + 7, obs);
    for (int b : {tips_, object_, goal_}) obs = std::copy(d->xpos + 3 * b, d->xpos + 3 * b + 3, obs);
  }
  double reward(const mjModel* m, const mjData* d, const PreStep&, const Action& a, bool* terminated,
                double* info) const override {
    double v1[3], v2[3];
    for (int i = 0; i < 3; ++i) {
      v1[i] = d->xpos[3 * object_ + i] - d->xpos[3 * tips_ + i];
      v2[i] = d->xpos[3 * object_ + i] - d->xpos[3 * goal_ + i];
    }
    double near = -blas_norm(v1, 3) * near_w_;
    double dist = -blas_norm(v2, 3) * dist_w_;
    double ctrl = -ctrl_(a, m->nu);
    *terminated = false;
    info[0] = dist;
    info[1] = ctrl;
    info[2] = near;
    return dist + ctrl + near;
  }
  std::vector<InfoKey> info_keys() const override { return {"reward_dist", "reward_ctrl", "reward_near"}; }

 private:
  int tips_ = -1, object_ = -1, goal_ = -1;
  double near_w_, dist_w_;
  CtrlCost ctrl_;
};

}  // namespace

std::vector<std::string> task_ids() {
  return {"Ant-v5",    "HalfCheetah-v5",          "Hopper-v5",  "Humanoid-v5",  "HumanoidStandup-v5",
          "InvertedDoublePendulum-v5", "InvertedPendulum-v5", "Pusher-v5", "Reacher-v5", "Swimmer-v5",
          "Walker2d-v5"};
}

std::unique_ptr<Task> make_task(const std::string& id, Params p) {
  std::unique_ptr<Task> t;
  if (id == "Hopper-v5") t = std::make_unique<Hopper>(p);
  else if (id == "Walker2d-v5") t = std::make_unique<Walker2d>(p);
  else if (id == "HalfCheetah-v5") t = std::make_unique<Runner>(p, "HalfCheetah-v5", 5, 0.1, 1);
  else if (id == "Swimmer-v5") t = std::make_unique<Runner>(p, "Swimmer-v5", 4, 1e-4, 2);
  else if (id == "InvertedPendulum-v5") t = std::make_unique<InvertedPendulum>(p);
  else if (id == "Reacher-v5") t = std::make_unique<Reacher>(p);
  else if (id == "Ant-v5") t = std::make_unique<Ant>(p);
  else if (id == "Humanoid-v5") t = std::make_unique<Humanoid>(p);
  else if (id == "HumanoidStandup-v5") t = std::make_unique<HumanoidStandup>(p);
  else if (id == "InvertedDoublePendulum-v5") t = std::make_unique<InvertedDoublePendulum>(p);
  else if (id == "Pusher-v5") t = std::make_unique<Pusher>(p);
  else throw std::invalid_argument("unknown task " + id);
  p.check_all_read(id);
  if (t->frame_skip() < 1) throw std::invalid_argument(id + ": frame_skip must be >= 1");
  return t;
}

}  // namespace aihf
