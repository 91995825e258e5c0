// A small MLP policy evaluated in C++ (float32), as SAC/PPO actors are laid out:
//   h_0 = clamp(obs, obs_low, obs_high) (per dimension; no clamp when the bounds are empty),
//   h = act(W_k h + b_k) for the hidden layers, out = W_L h + b_L, then one of
//   - "deterministic": a = squash(mean)
//   - "gaussian":      a = squash(mean + exp(log_std) * eps), eps ~ N(0, 1) from a per-env RNG
// where mean = out[:nu] and log_std is out[nu:2nu] (state-dependent, clamped to
// [log_std_min, log_std_max], as SAC) or a fixed vector (PPO); squash is "tanh" (then scaled
// to [low, high], as SAC), "clip" (to [low, high], as PPO evaluation) or "none".
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

namespace aihf {

struct Layer {
  int in = 0, out = 0;
  std::vector<float> w;  // (out, in) row-major, as torch.nn.Linear.weight
  std::vector<float> b;  // (out,)
};

enum class Activation { kTanh = 0, kReLU = 1 };
enum class Squash { kTanh = 0, kClip = 1, kNone = 2 };

struct MLPPolicy {
  std::vector<Layer> layers;
  Activation act = Activation::kTanh;
  Squash squash = Squash::kTanh;
  bool gaussian = false;
  bool state_dependent_std = false;  // log_std from out[nu:2nu]
  std::vector<float> log_std;         // fixed log std (nu,) when not state dependent
  float log_std_min = -20.f, log_std_max = 2.f;
  std::vector<double> low, high;      // action bounds (nu,)
  std::vector<double> obs_low, obs_high;  // observation bounds (obs_dim,) or empty (no clamp)
  int max_width() const {
    int m = 0;
    for (const auto& l : layers) m = std::max(m, std::max(l.in, l.out));
    return m;
  }
};

// Per-env normal draws: splitmix64-seeded xoshiro256++, Box-Muller (both values used).
class NormalRng {
 public:
  void seed(uint64_t seed, uint64_t stream) {
    uint64_t x = seed * 0x9E3779B97F4A7C15ull ^ (stream + 0x632BE59BD9B4E019ull);
    for (auto& s : s_) s = splitmix(x);
    has_spare_ = false;
  }
  double normal() {
    if (has_spare_) {
      has_spare_ = false;
      return spare_;
    }
    double u1 = ((next() >> 11) + 1) * 0x1.0p-53;  // (0, 1]
    double u2 = (next() >> 11) * 0x1.0p-53;
    double r = std::sqrt(-2.0 * std::log(u1));
    spare_ = r * std::sin(2 * M_PI * u2);
    has_spare_ = true;
    return r * std::cos(2 * M_PI * u2);
  }

 private:
  static uint64_t splitmix(uint64_t& x) {
    uint64_t z = (x += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
  }
  static uint64_t rotl(uint64_t x, int k) { return (x << k) | (x >> (64 - k)); }
  uint64_t next() {
    uint64_t r = rotl(s_[0] + s_[3], 23) + s_[0];
    uint64_t t = s_[1] << 17;
    s_[2] ^= s_[0];
    s_[3] ^= s_[1];
    s_[1] ^= s_[2];
    s_[0] ^= s_[3];
    s_[2] ^= t;
    s_[3] = rotl(s_[3], 45);
    return r;
  }
  uint64_t s_[4] = {1, 2, 3, 4};
  bool has_spare_ = false;
  double spare_ = 0;
};

// obs (obs_dim doubles) -> action (nu floats); buf0/buf1 scratch of max_width floats.
inline void mlp_act(const MLPPolicy& p, const double* obs, int nu, NormalRng* rng, float* action, float* buf0,
                    float* buf1) {
  const int L = int(p.layers.size());
  if (p.obs_low.empty()) {
    for (int k = 0; k < p.layers[0].in; ++k) buf0[k] = float(obs[k]);
  } else {
    for (int k = 0; k < p.layers[0].in; ++k) buf0[k] = float(std::min(std::max(obs[k], p.obs_low[k]), p.obs_high[k]));
  }
  float *x = buf0, *y = buf1;
  for (int l = 0; l < L; ++l) {
    const Layer& layer = p.layers[l];
    for (int o = 0; o < layer.out; ++o) {
      const float* w = &layer.w[size_t(o) * layer.in];
      float s = 0.f;
#pragma omp simd reduction(+ : s)
      for (int k = 0; k < layer.in; ++k) s += w[k] * x[k];
      s += layer.b[o];
      if (l + 1 < L) s = p.act == Activation::kTanh ? std::tanh(s) : (s > 0.f ? s : 0.f);
      y[o] = s;
    }
    std::swap(x, y);
  }
  for (int j = 0; j < nu; ++j) {
    double u = x[j];
    if (p.gaussian) {
      double ls = p.state_dependent_std ? double(x[nu + j]) : double(p.log_std[j]);
      ls = std::min(std::max(ls, double(p.log_std_min)), double(p.log_std_max));
      u += std::exp(ls) * rng->normal();
    }
    double lo = p.low[j], hi = p.high[j];
    if (p.squash == Squash::kTanh) u = lo + (std::tanh(u) + 1.0) * 0.5 * (hi - lo);
    else if (p.squash == Squash::kClip) u = std::min(std::max(u, lo), hi);
    action[j] = float(u);
  }
}

}  // namespace aihf
