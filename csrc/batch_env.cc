#include "batch_env.h"

#include <cmath>
#include <cstring>
#include <stdexcept>

namespace aihf {

BatchEnv::BatchEnv(const std::string& task_id, const std::string& xml_path, int num_envs, int num_threads,
                   int autoreset_mode, int max_episode_steps)
    : n_(num_envs), max_steps_(max_episode_steps), mode_(static_cast<Autoreset>(autoreset_mode)),
      pool_(num_threads) {
  task_ = make_task(task_id);
  if (!task_) throw std::invalid_argument("unknown task " + task_id);
  char err[1000] = "";
  model_ = mj_loadXML(xml_path.c_str(), nullptr, err, sizeof(err));
  if (!model_) throw std::runtime_error("mj_loadXML(" + xml_path + "): " + err);
  task_->bind(model_);
  obs_dim_ = task_->obs_dim(model_);
  data_.resize(n_);
  for (auto& d : data_) {
    d = mj_makeData(model_);
    if (!d) throw std::runtime_error("mj_makeData failed");
  }
  obs.assign(size_t(n_) * obs_dim_, 0.0);
  final_obs.assign(size_t(n_) * obs_dim_, 0.0);
  rewards.assign(n_, 0.0);
  reset_qpos.assign(size_t(n_) * model_->nq, 0.0);
  reset_qvel.assign(size_t(n_) * model_->nv, 0.0);
  terminated.assign(n_, 0);
  truncated.assign(n_, 0);
  needs_reset.assign(n_, 0);
  reset_consumed.assign(n_, 0);
  diverged.assign(n_, 0);
  final_valid.assign(n_, 0);
  elapsed.assign(n_, 0);
}

BatchEnv::~BatchEnv() {
  for (auto* d : data_) mj_deleteData(d);
  mj_deleteModel(model_);
}

template <typename F>
void BatchEnv::parallel(F&& f) {
  int T = pool_.size();
  pool_.run([&](int t) {
    int lo = int((long long)n_ * t / T), hi = int((long long)n_ * (t + 1) / T);
    for (int i = lo; i < hi; ++i) f(i);
  });
}

// gymnasium: mj_resetData; set_state(qpos, qvel) -> mj_forward; observe; TimeLimit counter to 0.
void BatchEnv::reset_one(int i) {
  mjData* d = data_[i];
  mj_resetData(model_, d);
  std::memcpy(d->qpos, &reset_qpos[size_t(i) * model_->nq], sizeof(double) * model_->nq);
  std::memcpy(d->qvel, &reset_qvel[size_t(i) * model_->nv], sizeof(double) * model_->nv);
  mj_forward(model_, d);
  task_->observe(model_, d, &obs[size_t(i) * obs_dim_]);
  elapsed[i] = 0;
  needs_reset[i] = 0;
  reset_consumed[i] = 1;
}

void BatchEnv::reset(const bool* mask) {
  for (int i = 0; i < n_; ++i) reset_consumed[i] = 0;
  parallel([&](int i) {
    if (mask[i]) {
      reset_one(i);
      rewards[i] = 0.0;
      terminated[i] = truncated[i] = diverged[i] = final_valid[i] = 0;
    }
  });
}

void BatchEnv::step_one(int i, const float* a32, const double* a64) {
  reset_consumed[i] = 0;
  final_valid[i] = 0;
  diverged[i] = 0;
  if (mode_ == Autoreset::kNextStep && needs_reset[i]) {
    // gymnasium NEXT_STEP: this step only resets the env; reward 0, not done
    reset_one(i);
    rewards[i] = 0.0;
    terminated[i] = truncated[i] = 0;
    return;
  }
  mjData* d = data_[i];
  const int nu = model_->nu;
  const float* ai32 = a32 ? a32 + size_t(i) * nu : nullptr;
  const double* ai64 = a64 ? a64 + size_t(i) * nu : nullptr;
  PreStep pre = task_->before(d);
  for (int k = 0; k < nu; ++k) d->ctrl[k] = ai32 ? double(ai32[k]) : ai64[k];
  int bad_before = d->warning[mjWARN_BADQACC].number;
  for (int k = 0, n = task_->frame_skip(); k < n; ++k) mj_step(model_, d);
  mj_rnePostConstraint(model_, d);
  // MuJoCo resets the data itself on a bad qacc (as it does under gymnasium); flag it
  diverged[i] = d->warning[mjWARN_BADQACC].number != bad_before;
  double* o = &obs[size_t(i) * obs_dim_];
  task_->observe(model_, d, o);
  bool term = false;
  rewards[i] = task_->reward(model_, d, pre, ai32, ai64, &term);
  terminated[i] = term;
  elapsed[i] += 1;
  truncated[i] = max_steps_ > 0 && elapsed[i] >= max_steps_;
  bool done = terminated[i] || truncated[i];
  if (mode_ == Autoreset::kNextStep) {
    needs_reset[i] = done;
  } else if (mode_ == Autoreset::kSameStep && done) {
    std::memcpy(&final_obs[size_t(i) * obs_dim_], o, sizeof(double) * obs_dim_);
    final_valid[i] = 1;
    reset_one(i);
  }
}

void BatchEnv::step(const float* a32, const double* a64) {
  parallel([&](int i) { step_one(i, a32, a64); });
}

}  // namespace aihf
