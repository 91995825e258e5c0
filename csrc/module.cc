// aihf_fast._C: Python bindings of the batched MuJoCo environments (nanobind).
// Every input is checked here; stepping runs with the GIL released.
#include <nanobind/nanobind.h>
#include <nanobind/ndarray.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/vector.h>
#include <nanobind/stl/optional.h>
#include <nanobind/stl/pair.h>
#include <nanobind/stl/map.h>
#include <nanobind/stl/tuple.h>

#include <algorithm>

#include <optional>

#include <stdexcept>
#include <string>
#include <type_traits>

#include "batch_env.h"

namespace nb = nanobind;
using namespace nb::literals;
using aihf::BatchEnv;

namespace {

template <typename T>
nb::ndarray<nb::numpy, T> view(BatchEnv& env, std::vector<T>& buf, std::initializer_list<size_t> shape) {
  // a NumPy array over env-owned memory; nb::find(&env) keeps the env alive while it exists
  return nb::ndarray<nb::numpy, T>(buf.data(), shape, nb::find(&env));
}

nb::ndarray<nb::numpy, bool> bool_view(BatchEnv& env, std::vector<unsigned char>& buf) {
  return nb::ndarray<nb::numpy, bool>(reinterpret_cast<bool*>(buf.data()), {size_t(env.num_envs())}, nb::find(&env));
}

using F32 = nb::ndarray<const float, nb::c_contig, nb::device::cpu>;
template <typename T>
using Out = std::optional<nb::ndarray<T, nb::c_contig, nb::device::cpu>>;

template <typename A>
void check_out(const char* name, const A& a, std::initializer_list<size_t> shape) {
  if (!a) return;
  bool ok = a->ndim() == shape.size();
  size_t k = 0;
  for (size_t s : shape) ok = ok && a->shape(k++) == s;
  if (!ok) throw nb::value_error((std::string(name) + ": wrong shape for the rollout buffer").c_str());
}

template <typename T, typename A>
T* ptr(A& a) {
  return a ? a->data() : nullptr;
}

void check_actions_shape(const BatchEnv& env, size_t ndim, size_t d0, size_t d1) {
  if (ndim != 2 || d0 != size_t(env.num_envs()) || d1 != size_t(env.nu()))
    throw nb::value_error(("actions must have shape (" + std::to_string(env.num_envs()) + ", " +
                           std::to_string(env.nu()) + ")").c_str());
}

// One env step with float32 or float64 actions (numpy's control-cost dtype follows them).
// half: the float32 actions hold float16 values (control cost in half precision, as numpy).
template <typename T>
void step_with(BatchEnv& e, nb::ndarray<const T, nb::c_contig, nb::device::cpu> a, bool half) {
  check_actions_shape(e, a.ndim(), a.shape(0), a.ndim() > 1 ? a.shape(1) : 0);
  nb::gil_scoped_release release;
  if constexpr (std::is_same_v<T, float>)
    e.step(a.data(), nullptr, half);
  else
    e.step(nullptr, a.data(), false);
}

}  // namespace

NB_MODULE(_C, m) {
  m.doc() = "aihf_fast C++ core: batched gymnasium MuJoCo tasks on a thread pool";
  nb::exception<aihf::MujocoError>(m, "MujocoError", PyExc_RuntimeError);
  m.def("task_ids", &aihf::task_ids);
  m.def("set_norm_order", &aihf::set_norm_order, nb::arg("order"),
        "Sum a norm's squares as this process's numpy does: 0 plain multiply-add, 1 FMA chain, 2 even/odd pairs.");
  m.def("norm_order", &aihf::norm_order);
  m.attr("mujoco_version") = mj_versionString();

  nb::class_<aihf::MLPPolicy>(m, "MLPPolicy")
      .def(
          "__init__",
          [](aihf::MLPPolicy* p, std::vector<F32> weights, std::vector<F32> biases, int activation, int squash,
             bool gaussian, bool state_dependent_std, F32 log_std, float log_std_min, float log_std_max,
             std::vector<double> low, std::vector<double> high, std::vector<double> obs_low,
             std::vector<double> obs_high) {
            if (activation < 0 || activation > 1) throw nb::value_error("activation must be 0 (tanh) or 1 (relu)");
            if (squash < 0 || squash > 2) throw nb::value_error("squash must be 0 (tanh), 1 (clip) or 2 (none)");
            aihf::MLPPolicy built;  // constructed in full before *p, so a throw leaks nothing
            aihf::MLPPolicy* q = &built;
            if (weights.empty() || weights.size() != biases.size())
              throw nb::value_error("policy needs one bias per weight matrix and at least one layer");
            for (size_t l = 0; l < weights.size(); ++l) {
              const auto& w = weights[l];
              const auto& b = biases[l];
              if (w.ndim() != 2 || b.ndim() != 1 || b.shape(0) != w.shape(0))
                throw nb::value_error(("layer " + std::to_string(l) + ": weight must be (out, in) and bias (out,)").c_str());
              if (l > 0 && w.shape(1) != size_t(q->layers.back().out))
                throw nb::value_error(("layer " + std::to_string(l) + ": input size does not match the previous layer").c_str());
              aihf::Layer layer;
              layer.out = int(w.shape(0));
              layer.in = int(w.shape(1));
              layer.w.assign(w.data(), w.data() + w.size());
              layer.b.assign(b.data(), b.data() + b.size());
              q->layers.push_back(std::move(layer));
            }
            q->act = static_cast<aihf::Activation>(activation);
            q->squash = static_cast<aihf::Squash>(squash);
            q->gaussian = gaussian;
            q->state_dependent_std = state_dependent_std;
            q->log_std.assign(log_std.data(), log_std.data() + log_std.size());
            q->log_std_min = log_std_min;
            q->log_std_max = log_std_max;
            q->low = std::move(low);
            q->high = std::move(high);
            if (obs_low.size() != obs_high.size() ||
                (!obs_low.empty() && obs_low.size() != size_t(q->layers.front().in)))
              throw nb::value_error("obs_low and obs_high must both be empty or both have the first layer's input size");
            for (size_t k = 0; k < obs_low.size(); ++k)
              if (!(obs_low[k] <= obs_high[k])) throw nb::value_error("obs_low must be <= obs_high in every dimension");
            q->obs_low = std::move(obs_low);
            q->obs_high = std::move(obs_high);
            new (p) aihf::MLPPolicy(std::move(built));
          },
          "weights"_a, "biases"_a, "activation"_a, "squash"_a, "gaussian"_a, "state_dependent_std"_a, "log_std"_a,
          "log_std_min"_a, "log_std_max"_a, "low"_a, "high"_a,
          "obs_low"_a = std::vector<double>(), "obs_high"_a = std::vector<double>())
      .def_prop_ro("in_features", [](const aihf::MLPPolicy& p) { return p.layers.front().in; })
      .def_prop_ro("out_features", [](const aihf::MLPPolicy& p) { return p.layers.back().out; });

  nb::class_<BatchEnv>(m, "BatchEnv")
      .def(nb::init<const std::string&, const std::string&, const std::map<std::string, double>&, int, int, int, int,
                    int>(),
           "task_id"_a, "xml_path"_a, "options"_a, "num_envs"_a, "num_threads"_a, "autoreset_mode"_a, "max_episode_steps"_a, "reset_queue"_a,
           nb::call_guard<nb::gil_scoped_release>())
      .def_prop_ro("num_envs", &BatchEnv::num_envs)
      .def_prop_ro("num_threads", &BatchEnv::num_threads)
      .def_prop_ro("nq", &BatchEnv::nq)
      .def_prop_ro("nv", &BatchEnv::nv)
      .def_prop_ro("nu", &BatchEnv::nu)
      .def_prop_ro("obs_dim", &BatchEnv::obs_dim)
      .def_prop_ro("dt", &BatchEnv::dt)
      .def_prop_ro("max_episode_steps", &BatchEnv::max_episode_steps)
      .def_prop_ro("ctrl_range", [](BatchEnv& e) {
        std::vector<double> r(e.model()->actuator_ctrlrange, e.model()->actuator_ctrlrange + 2 * e.nu());
        return r;
      })
      .def_prop_ro("qpos0", [](BatchEnv& e) {
        return std::vector<double>(e.model()->qpos0, e.model()->qpos0 + e.nq());
      })
      .def_prop_ro("obs", [](BatchEnv& e) { return view(e, e.obs, {size_t(e.num_envs()), size_t(e.obs_dim())}); })
      .def_prop_ro("final_obs", [](BatchEnv& e) { return view(e, e.final_obs, {size_t(e.num_envs()), size_t(e.obs_dim())}); })
      .def_prop_ro("rewards", [](BatchEnv& e) { return view(e, e.rewards, {size_t(e.num_envs())}); })
      .def_prop_ro("reset_queue", &BatchEnv::reset_queue)
      .def_prop_ro("info_keys", [](BatchEnv& e) {  // (name, width, is_array) in buffer order
        std::vector<std::tuple<std::string, int, bool>> keys;
        for (const auto& k : e.task().info_keys()) keys.emplace_back(k.name, k.width, k.array);
        return keys;
      })
      .def_prop_ro("reset_info_keys", [](BatchEnv& e) {
        std::vector<std::tuple<std::string, int, bool>> keys;
        for (const auto& k : e.task().reset_info_keys()) keys.emplace_back(k.name, k.width, k.array);
        return keys;
      })
      .def_prop_ro("info", [](BatchEnv& e) {
        return view(e, e.info, {size_t(e.num_envs()), size_t(std::max(e.n_info(), 1))});
      })
      .def_prop_ro("reset_info", [](BatchEnv& e) {
        return view(e, e.reset_info, {size_t(e.num_envs()), size_t(std::max(e.n_reset_info(), 1))});
      })
      .def_prop_ro("queue_qpos", [](BatchEnv& e) {
        return view(e, e.queue_qpos, {size_t(e.num_envs()), size_t(e.reset_queue()), size_t(e.nq())});
      })
      .def_prop_ro("queue_qvel", [](BatchEnv& e) {
        return view(e, e.queue_qvel, {size_t(e.num_envs()), size_t(e.reset_queue()), size_t(e.nv())});
      })
      .def_prop_ro("queue_head", [](BatchEnv& e) { return view(e, e.queue_head, {size_t(e.num_envs())}); })
      .def_prop_ro("queue_count", [](BatchEnv& e) { return view(e, e.queue_count, {size_t(e.num_envs())}); })
      .def_prop_ro("terminated", [](BatchEnv& e) { return bool_view(e, e.terminated); })
      .def_prop_ro("truncated", [](BatchEnv& e) { return bool_view(e, e.truncated); })
      .def_prop_ro("reset_consumed", [](BatchEnv& e) { return bool_view(e, e.reset_consumed); })
      .def_prop_ro("diverged", [](BatchEnv& e) { return bool_view(e, e.diverged); })
      .def_prop_ro("failed", [](BatchEnv& e) { return bool_view(e, e.failed); })
      .def_prop_ro("final_valid", [](BatchEnv& e) { return bool_view(e, e.final_valid); })
      .def_prop_ro("needs_reset", [](BatchEnv& e) { return bool_view(e, e.needs_reset); })
      .def_prop_ro("elapsed_steps", [](BatchEnv& e) { return view(e, e.elapsed, {size_t(e.num_envs())}); })
      .def(
          "reset",
          [](BatchEnv& e, nb::ndarray<const bool, nb::ndim<1>, nb::c_contig, nb::device::cpu> mask) {
            if (mask.shape(0) != size_t(e.num_envs()))
              throw nb::value_error(("reset mask must have shape (" + std::to_string(e.num_envs()) + ",)").c_str());
            nb::gil_scoped_release release;
            e.reset(mask.data());
          },
          "mask"_a)
      .def("step", &step_with<float>, "actions"_a.noconvert(), "half"_a = false)
      .def("step", &step_with<double>, "actions"_a.noconvert(), "half"_a = false)
      .def("seed_policy_noise", &BatchEnv::seed_policy_noise, "seed"_a)
      .def(
          "copy_data",
          [](BatchEnv& e, int i, uintptr_t address) {
            // address: mujoco.MjData._address of an MjData of the same model (same libmujoco)
            nb::gil_scoped_release release;
            e.copy_data(i, reinterpret_cast<mjData*>(address));
          },
          "env"_a, "address"_a)
      .def(
          "set_state",
          [](BatchEnv& e, int i, nb::ndarray<const double, nb::ndim<1>, nb::c_contig, nb::device::cpu> qpos,
             nb::ndarray<const double, nb::ndim<1>, nb::c_contig, nb::device::cpu> qvel) {
            if (i < 0 || i >= e.num_envs()) throw nb::index_error("env index out of range");
            nb::gil_scoped_release release;
            if (qpos.shape(0) != size_t(e.nq()) || qvel.shape(0) != size_t(e.nv()))
              throw nb::value_error("qpos must be (nq,) and qvel (nv,)");
            e.set_state(i, qpos.data(), qvel.data());
          },
          "env"_a, "qpos"_a, "qvel"_a)
      .def(
          "rollout",
          [](BatchEnv& e, const aihf::MLPPolicy* policy, std::optional<F32> open_loop, int T,
             nb::ndarray<int, nb::ndim<1>, nb::c_contig, nb::device::cpu> progress, Out<double> obs,
             Out<float> actions, Out<double> rewards, Out<bool> terminated, Out<bool> truncated,
             Out<double> next_obs, Out<bool> diverged, Out<double> qpos, Out<double> qvel) {
            const size_t N = e.num_envs(), t = size_t(T), D = e.obs_dim(), nu = e.nu();
            if (T < 0) throw nb::value_error("T must be >= 0");
            if (progress.shape(0) != N) throw nb::value_error("progress must be (num_envs,)");
            if (!actions) throw nb::value_error("actions buffer is required");
            if (!policy && !open_loop) throw nb::value_error("give a policy or open-loop actions");
            if (policy && (policy->layers.front().in != int(D)))
              throw nb::value_error(("policy input size " + std::to_string(policy->layers.front().in) +
                                     " != observation size " + std::to_string(D)).c_str());
            if (policy) {
              int need = int(nu) * ((policy->gaussian && policy->state_dependent_std) ? 2 : 1);
              if (policy->layers.back().out != need)
                throw nb::value_error(("policy output size " + std::to_string(policy->layers.back().out) +
                                       " != " + std::to_string(need)).c_str());
              if (policy->gaussian && !policy->state_dependent_std && policy->log_std.size() != nu)
                throw nb::value_error("log_std must have one entry per action dim");
              if (policy->low.size() != nu || policy->high.size() != nu)
                throw nb::value_error("action bounds must have one entry per action dim");
            }
            if (open_loop && (open_loop->ndim() != 3 || open_loop->shape(0) != t || open_loop->shape(1) != N ||
                              open_loop->shape(2) != nu))
              throw nb::value_error("open-loop actions must be (T, num_envs, nu)");
            check_out("obs", obs, {t, N, D});
            check_out("actions", actions, {t, N, nu});
            check_out("rewards", rewards, {t, N});
            check_out("terminated", terminated, {t, N});
            check_out("truncated", truncated, {t, N});
            check_out("next_obs", next_obs, {t, N, D});
            check_out("diverged", diverged, {t, N});
            check_out("qpos", qpos, {t, N, size_t(e.nq())});
            check_out("qvel", qvel, {t, N, size_t(e.nv())});
            aihf::RolloutOut out;
            out.T = T;
            out.obs = ptr<double>(obs);
            out.actions = ptr<float>(actions);
            out.rewards = ptr<double>(rewards);
            out.terminated = ptr<bool>(terminated);
            out.truncated = ptr<bool>(truncated);
            out.next_obs = ptr<double>(next_obs);
            out.diverged = ptr<bool>(diverged);
            out.qpos = ptr<double>(qpos);
            out.qvel = ptr<double>(qvel);
            const float* ol = open_loop ? open_loop->data() : nullptr;
            nb::gil_scoped_release release;
            return e.rollout(policy, ol, out, progress.data());
          },
          // outputs must be the caller's own arrays: no implicit conversion to a temporary copy
          "policy"_a.none(), "open_loop"_a.none(), "T"_a, "progress"_a.noconvert(), "obs"_a.noconvert().none(),
          "actions"_a.noconvert().none(), "rewards"_a.noconvert().none(), "terminated"_a.noconvert().none(),
          "truncated"_a.noconvert().none(), "next_obs"_a.noconvert().none(), "diverged"_a.noconvert().none(),
          "qpos"_a.noconvert().none(), "qvel"_a.noconvert().none());
}
