#include "batch_env.h"

#include <algorithm>
#include <atomic>
#include <csetjmp>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <stdexcept>

// MuJoCo's thread-local log handler (exported; used by its own Python bindings to turn errors
// into exceptions): set for the calling thread, returns the previous one.
extern "C" MJAPI mjfLogHandler _mjPRIVATE_setTlsLogHandler(mjfLogHandler handler);
extern "C" MJAPI mjfLogHandler _mjPRIVATE_getGlobalLogHandler(void);

namespace aihf {
namespace {

int checked_threads(int num_threads) {
  if (num_threads < 1 || num_threads > 1024) throw std::invalid_argument("num_threads must be in [1, 1024]");
  return num_threads;
}

// Fails a call made while another thread is inside one on the same env.
std::unique_lock<std::mutex> exclusive(std::mutex& mu) {
  std::unique_lock<std::mutex> lock(mu, std::try_to_lock);
  if (!lock) throw std::runtime_error("this env is busy: another thread is stepping, resetting or rolling it out");
  return lock;
}

// MuJoCo calls mjcb_time around each pipeline stage to fill mjData.timer; the mujoco Python
// package installs a clock there, which costs ~12% of a Hopper step (clock_gettime). The envs
// install a dispatcher in its place once: on a thread that is simulating a BatchEnv it returns 0
// (no clock; the envs' timers stay zero), on any other thread it calls the callback it replaced,
// so MuJoCo used elsewhere in the process keeps its timers.
thread_local bool tls_simulating = false;
std::atomic<mjfTime> replaced_timer{nullptr};

mjtNum dispatch_timer() {
  if (tls_simulating) return 0;
  mjfTime f = replaced_timer.load(std::memory_order_relaxed);
  return f ? f() : 0;
}

void install_timer_dispatch() {
  if (mjcb_time == &dispatch_timer) return;  // the common case, every call
  static std::mutex mu;
  std::lock_guard<std::mutex> lock(mu);
  mjfTime current = mjcb_time;
  if (current == nullptr || current == &dispatch_timer) return;  // no clock to skip, or installed
  replaced_timer.store(current);
  mjcb_time = &dispatch_timer;
}

// Marks the calling thread as simulating (see dispatch_timer) for the scope; (re)installs the
// dispatcher if the process's callback was replaced since (e.g. mujoco.set_mjcb_time).
struct Simulating {
  bool outer = tls_simulating;
  Simulating() {
    install_timer_dispatch();
    tls_simulating = true;
  }
  ~Simulating() { tls_simulating = outer; }
};

// MuJoCo errors (mju_error: e.g. its stack or arena out of memory) call a log handler and, if it
// returns, exit the process. Inside mj_guarded the calling thread's handler (MuJoCo's
// thread-local one, what its Python bindings use) jumps back with the message instead.
thread_local std::jmp_buf* tls_jump = nullptr;
thread_local mjfLogHandler tls_outer_handler = nullptr;
thread_local char tls_error[1024];

void on_mujoco_message(const mjLogMessage* msg) {
  if (msg->level == mjLOG_ERROR && tls_jump) {
    std::snprintf(tls_error, sizeof(tls_error), "%s", msg->subject);
    std::longjmp(*tls_jump, 1);
  }
  // warnings and info: to the handler that would have had them without us (calling it directly:
  // MuJoCo drops messages dispatched again from inside a handler)
  mjfLogHandler next = tls_outer_handler ? tls_outer_handler : _mjPRIVATE_getGlobalLogHandler();
  if (next) next(msg);
}

// Runs `body` (MuJoCo calls only: no C++ object with a destructor may be alive inside it when
// MuJoCo errs); returns false with MuJoCo's message in *error if MuJoCo raised an error.
template <typename F>
bool mj_guarded(F&& body, std::string* error) {
  std::jmp_buf buf;
  std::jmp_buf* outer_jump = tls_jump;
  mjfLogHandler outer = _mjPRIVATE_setTlsLogHandler(&on_mujoco_message);
  mjfLogHandler outer_saved = tls_outer_handler;
  tls_outer_handler = outer;
  if (setjmp(buf) != 0) {
    tls_jump = outer_jump;
    tls_outer_handler = outer_saved;
    _mjPRIVATE_setTlsLogHandler(outer);
    *error = tls_error;
    return false;
  }
  tls_jump = &buf;
  body();
  tls_jump = outer_jump;
  tls_outer_handler = outer_saved;
  _mjPRIVATE_setTlsLogHandler(outer);
  return true;
}

}  // namespace

BatchEnv::BatchEnv(const std::string& task_id, const std::string& xml_path,
                   const std::map<std::string, double>& options, int num_envs, int num_threads, int autoreset_mode,
                   int max_episode_steps, int reset_queue)
    : n_(num_envs), max_steps_(max_episode_steps), K_(reset_queue), mode_(static_cast<Autoreset>(autoreset_mode)),
      pool_(checked_threads(num_threads)) {
  if (num_envs < 1) throw std::invalid_argument("num_envs must be >= 1");
  if (reset_queue < 1) throw std::invalid_argument("reset_queue must be >= 1");
  if (autoreset_mode < 0 || autoreset_mode > 2) throw std::invalid_argument("autoreset_mode must be 0, 1 or 2");
  if (max_episode_steps < 0) throw std::invalid_argument("max_episode_steps must be >= 0 (0: no limit)");
  task_ = make_task(task_id, Params(options));
  char err[1000] = "";
  model_ = mj_loadXML(xml_path.c_str(), nullptr, err, sizeof(err));
  if (!model_) throw std::runtime_error("mj_loadXML(" + xml_path + "): " + err);
  try {
    task_->bind(model_);
  } catch (const std::invalid_argument& e) {
    mj_deleteModel(model_);
    throw std::invalid_argument(xml_path + ": " + e.what());
  } catch (...) {
    mj_deleteModel(model_);
    throw;
  }
  install_timer_dispatch();
  obs_dim_ = task_->obs_dim(model_);
  data_.resize(n_);
  for (auto& d : data_) {
    d = mj_makeData(model_);
    if (!d) throw std::runtime_error("mj_makeData failed");
  }
  for (const auto& k : task_->info_keys()) n_info_ += k.width;
  for (const auto& k : task_->reset_info_keys()) n_reset_info_ += k.width;
  info.assign(size_t(n_) * std::max(n_info_, 1), 0.0);
  reset_info.assign(size_t(n_) * std::max(n_reset_info_, 1), 0.0);
  obs.assign(size_t(n_) * obs_dim_, 0.0);
  final_obs.assign(size_t(n_) * obs_dim_, 0.0);
  rewards.assign(n_, 0.0);
  queue_qpos.assign(size_t(n_) * K_ * model_->nq, 0.0);
  queue_qvel.assign(size_t(n_) * K_ * model_->nv, 0.0);
  queue_head.assign(n_, 0);
  queue_count.assign(n_, 0);
  noise_.resize(n_);
  seed_policy_noise(0);
  terminated.assign(n_, 0);
  truncated.assign(n_, 0);
  needs_reset.assign(n_, 0);
  reset_consumed.assign(n_, 0);
  diverged.assign(n_, 0);
  failed.assign(n_, 0);
  errors_.assign(n_, std::string());
  final_valid.assign(n_, 0);
  elapsed.assign(n_, 0);
}

BatchEnv::~BatchEnv() {
  for (auto* d : data_) mj_deleteData(d);
  mj_deleteModel(model_);
}

template <typename F>
void BatchEnv::parallel(F&& f) {
  // one env per item from a shared counter: per-env costs differ (contacts, resets), and the step
  // waits for the slowest thread (one env at most of imbalance)
  pool_.for_each(n_, 1, [&](int i) {
    Simulating sim;
    f(i);
  });
  raise_mujoco_errors();
}

void BatchEnv::raise_mujoco_errors() {
  std::string msg;
  for (int i = 0; i < n_; ++i) {
    if (errors_[i].empty()) continue;
    if (msg.empty()) msg = "MuJoCo error";
    msg += " in env " + std::to_string(i) + ": " + errors_[i] + ";";
    errors_[i].clear();
  }
  if (!msg.empty())
    throw MujocoError(msg + " those envs were reset to the model's initial state");
}

// A MuJoCo error left env i's mjData mid-computation: reset it (its stack too) and record it.
void BatchEnv::fail(int i, std::string error) {
  mj_resetData(model_, data_[i]);
  errors_[i] = std::move(error);
  needs_reset[i] = 1;
  failed[i] = 1;
}

// gymnasium: mj_resetData; set_state(qpos, qvel) -> mj_forward; observe; TimeLimit counter to 0.
bool BatchEnv::reset_one(int i) {
  if (queue_count[i] == 0) return false;
  const int nq = model_->nq, nv = model_->nv, slot = i * K_ + queue_head[i];
  mjData* d = data_[i];
  mj_resetData(model_, d);
  std::memcpy(d->qpos, &queue_qpos[size_t(slot) * nq], sizeof(double) * nq);
  std::memcpy(d->qvel, &queue_qvel[size_t(slot) * nv], sizeof(double) * nv);
  queue_head[i] = (queue_head[i] + 1) % K_;
  queue_count[i] -= 1;
  std::string error;
  if (!mj_guarded([&] { mj_forward(model_, d); }, &error)) {
    fail(i, error);
    return true;  // the state was consumed
  }
  task_->observe(model_, d, &obs[size_t(i) * obs_dim_]);
  task_->reset_info(model_, d, &reset_info[size_t(i) * std::max(n_reset_info_, 1)]);
  elapsed[i] = 0;
  needs_reset[i] = 0;
  reset_consumed[i] = 1;
  return true;
}

void BatchEnv::check_queues() const {
  for (int i = 0; i < n_; ++i)
    if (queue_head[i] < 0 || queue_head[i] >= K_ || queue_count[i] < 0 || queue_count[i] > K_)
      throw std::out_of_range("reset queue of env " + std::to_string(i) + " is corrupt (head/count out of range)");
}

void BatchEnv::reset(const bool* mask) {
  auto lock = exclusive(busy_);
  check_queues();
  for (int i = 0; i < n_; ++i) {
    reset_consumed[i] = 0;
    if (mask[i] && queue_count[i] == 0) throw std::runtime_error("reset: empty reset queue for env " + std::to_string(i));
  }
  std::fill(failed.begin(), failed.end(), 0);
  parallel([&](int i) {
    if (mask[i]) {
      reset_one(i);
      rewards[i] = 0.0;
      terminated[i] = truncated[i] = diverged[i] = final_valid[i] = 0;
    }
  });
}

void BatchEnv::set_state(int i, const double* qpos, const double* qvel) {
  auto lock = exclusive(busy_);
  if (i < 0 || i >= n_) throw std::out_of_range("env index out of range");
  std::fill(failed.begin(), failed.end(), 0);
  mjData* d = data_[i];
  std::memcpy(d->qpos, qpos, sizeof(double) * model_->nq);
  std::memcpy(d->qvel, qvel, sizeof(double) * model_->nv);
  std::string error;
  {
    Simulating sim;
    if (!mj_guarded([&] { mj_forward(model_, d); }, &error)) fail(i, error);
  }
  raise_mujoco_errors();
  task_->observe(model_, d, &obs[size_t(i) * obs_dim_]);
  needs_reset[i] = 0;
}

void BatchEnv::copy_data(int i, mjData* dest) {
  auto lock = exclusive(busy_);
  if (i < 0 || i >= n_) throw std::out_of_range("env index out of range");
  const mjData* src = data_[i];
  if (!dest || dest->nbuffer != src->nbuffer || dest->narena != src->narena)
    throw std::invalid_argument("copy_data: the destination mjData was not made for this model (sizes differ)");
  mj_copyData(dest, model_, src);
}

void BatchEnv::seed_policy_noise(uint64_t seed) {
  for (int i = 0; i < n_; ++i) noise_[i].seed(seed, uint64_t(i));
}

// gymnasium's MujocoEnv.step for one env, plus the TimeLimit wrapper's counter.
void BatchEnv::physics_step(int i, const Action& a) {
  mjData* d = data_[i];
  const int nu = model_->nu;
  PreStep pre = task_->before(d);
  for (int k = 0; k < nu; ++k) d->ctrl[k] = a[k];
  // On a NaN / huge qpos, qvel or qacc MuJoCo resets the data itself (mj_resetData, as it does
  // under gymnasium) and counts a warning. The reset zeroes the counts and counts 1, so a count
  // already at 1 stays 1: a reset also shows as time not advancing by the step's frame_skip
  // timesteps (it restarts from 0). The counts are left exactly as under gymnasium.
  const int kinds[3] = {mjWARN_BADQPOS, mjWARN_BADQVEL, mjWARN_BADQACC};
  int before[3];
  for (int k = 0; k < 3; ++k) before[k] = d->warning[kinds[k]].number;
  const double time_before = d->time, ts = model_->opt.timestep;
  std::string error;
  if (!mj_guarded([&] {
        for (int k = 0, n = task_->frame_skip(); k < n; ++k) mj_step(model_, d);
        mj_rnePostConstraint(model_, d);
      }, &error)) {
    fail(i, error);
    rewards[i] = 0.0;
    terminated[i] = truncated[i] = 0;
    return;
  }
  bool div = d->time < time_before + (task_->frame_skip() - 0.5) * ts;
  for (int k = 0; k < 3; ++k) div = div || d->warning[kinds[k]].number > before[k];
  diverged[i] = div;
  task_->observe(model_, d, &obs[size_t(i) * obs_dim_]);
  bool term = false;
  rewards[i] = task_->reward(model_, d, pre, a, &term, &info[size_t(i) * std::max(n_info_, 1)]);
  terminated[i] = term;
  elapsed[i] += 1;
  truncated[i] = max_steps_ > 0 && elapsed[i] >= max_steps_;
}

void BatchEnv::step_one(int i, const float* a32, const double* a64, bool half) {
  failed[i] = 0;
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
  const int nu = model_->nu;
  Action a;
  a.f32 = a32 ? a32 + size_t(i) * nu : nullptr;
  a.f64 = a64 ? a64 + size_t(i) * nu : nullptr;
  a.half = half;
  physics_step(i, a);
  if (failed[i]) return;
  bool done = terminated[i] || truncated[i];
  if (mode_ == Autoreset::kNextStep) {
    needs_reset[i] = done;
  } else if (mode_ == Autoreset::kSameStep && done) {
    std::memcpy(&final_obs[size_t(i) * obs_dim_], &obs[size_t(i) * obs_dim_], sizeof(double) * obs_dim_);
    final_valid[i] = 1;
    reset_one(i);
  } else if (mode_ == Autoreset::kDisabled) {
    needs_reset[i] = done;
  }
}

void BatchEnv::step(const float* a32, const double* a64, bool half) {
  auto lock = exclusive(busy_);
  check_queues();
  parallel([&](int i) { step_one(i, a32, a64, half); });
}

void BatchEnv::rollout_one(int i, const MLPPolicy* policy, const float* open_loop, const RolloutOut& out,
                           int* progress, float* scratch) {
  const int nu = model_->nu, nq = model_->nq, nv = model_->nv, D = obs_dim_;
  const size_t N = size_t(n_);
  reset_consumed[i] = 0;
  failed[i] = 0;
  // the policy acts on the state itself, not on an observation buffer the caller may have edited
  if (!needs_reset[i]) task_->observe(model_, data_[i], &obs[size_t(i) * D]);
  while (progress[i] < out.T) {
    if (needs_reset[i] && !reset_one(i)) return;  // blocked: Python refills the queue
    if (failed[i]) return;
    const size_t ti = size_t(progress[i]) * N + i;
    double* o = &obs[size_t(i) * D];
    if (out.obs) std::memcpy(out.obs + ti * D, o, sizeof(double) * D);
    if (out.qpos) std::memcpy(out.qpos + ti * nq, data_[i]->qpos, sizeof(double) * nq);
    if (out.qvel) std::memcpy(out.qvel + ti * nv, data_[i]->qvel, sizeof(double) * nv);
    float* a = out.actions + ti * nu;
    if (policy) {
      int w = policy->max_width();
      mlp_act(*policy, o, nu, &noise_[i], a, scratch, scratch + w);
    } else {
      std::memcpy(a, open_loop + ti * nu, sizeof(float) * nu);
    }
    Action act;
    act.f32 = a;
    physics_step(i, act);
    if (failed[i]) return;
    if (out.rewards) out.rewards[ti] = rewards[i];
    if (out.terminated) out.terminated[ti] = terminated[i];
    if (out.truncated) out.truncated[ti] = truncated[i];
    if (out.diverged) out.diverged[ti] = diverged[i];
    if (out.next_obs) std::memcpy(out.next_obs + ti * D, o, sizeof(double) * D);
    progress[i] += 1;
    if (terminated[i] || truncated[i]) needs_reset[i] = 1;
  }
}

int BatchEnv::rollout(const MLPPolicy* policy, const float* open_loop, const RolloutOut& out, int* progress) {
  auto lock = exclusive(busy_);
  check_queues();
  for (int i = 0; i < n_; ++i)
    if (progress[i] < 0 || progress[i] > out.T) throw std::out_of_range("progress values must be in [0, T]");
  const int width = policy ? 2 * policy->max_width() : 1;
  // one env's whole trajectory per work item, handed out dynamically
  pool_.for_each(n_, 1, [&](int i) {
    Simulating sim;
    thread_local std::vector<float> scratch;
    if (int(scratch.size()) < width) scratch.resize(width);
    rollout_one(i, policy, open_loop, out, progress, scratch.data());
  });
  raise_mujoco_errors();
  int finished = 0;
  for (int i = 0; i < n_; ++i) finished += progress[i] >= out.T;
  return finished;
}

}  // namespace aihf
