// aihf_fast._C: Python bindings of the batched MuJoCo environments (nanobind).
// Every input is checked here; stepping runs with the GIL released.
#include <nanobind/nanobind.h>
#include <nanobind/ndarray.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/vector.h>

#include <stdexcept>
#include <string>

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

void check_actions_shape(const BatchEnv& env, size_t ndim, size_t d0, size_t d1) {
  if (ndim != 2 || d0 != size_t(env.num_envs()) || d1 != size_t(env.nu()))
    throw nb::value_error(("actions must have shape (" + std::to_string(env.num_envs()) + ", " +
                           std::to_string(env.nu()) + ")").c_str());
}

}  // namespace

NB_MODULE(_C, m) {
  m.doc() = "aihf_fast C++ core: batched gymnasium MuJoCo tasks on a thread pool";
  m.def("task_ids", &aihf::task_ids);
  m.attr("mujoco_version") = mj_versionString();

  nb::class_<BatchEnv>(m, "BatchEnv")
      .def(nb::init<const std::string&, const std::string&, int, int, int, int>(), "task_id"_a, "xml_path"_a,
           "num_envs"_a, "num_threads"_a, "autoreset_mode"_a, "max_episode_steps"_a,
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
      .def_prop_ro("reset_qpos", [](BatchEnv& e) { return view(e, e.reset_qpos, {size_t(e.num_envs()), size_t(e.nq())}); })
      .def_prop_ro("reset_qvel", [](BatchEnv& e) { return view(e, e.reset_qvel, {size_t(e.num_envs()), size_t(e.nv())}); })
      .def_prop_ro("terminated", [](BatchEnv& e) { return bool_view(e, e.terminated); })
      .def_prop_ro("truncated", [](BatchEnv& e) { return bool_view(e, e.truncated); })
      .def_prop_ro("reset_consumed", [](BatchEnv& e) { return bool_view(e, e.reset_consumed); })
      .def_prop_ro("diverged", [](BatchEnv& e) { return bool_view(e, e.diverged); })
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
      .def(
          "step",
          [](BatchEnv& e, nb::ndarray<const float, nb::c_contig, nb::device::cpu> a) {
            check_actions_shape(e, a.ndim(), a.shape(0), a.ndim() > 1 ? a.shape(1) : 0);
            nb::gil_scoped_release release;
            e.step(a.data(), nullptr);
          },
          "actions"_a)
      .def(
          "step",
          [](BatchEnv& e, nb::ndarray<const double, nb::c_contig, nb::device::cpu> a) {
            check_actions_shape(e, a.ndim(), a.shape(0), a.ndim() > 1 ? a.shape(1) : 0);
            nb::gil_scoped_release release;
            e.step(nullptr, a.data());
          },
          "actions"_a);
}
