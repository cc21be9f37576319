// Fused EMA / BEMA update of many tensors in one op call (CPU).
//
// Per element of the flat fp32 buffers (theta = the live parameter, in its own dtype), for each
// of the K EMA profiles k (ema is [K, P]; BEMA has K = 1):
//   reset:  ema[k] = theta; theta0 = theta; out = theta
//   update: ema[k]' = ema[k] + w[k] * (theta - ema[k])          (the lerp form)
//           out     = ema[0]' + alpha * (theta - theta0)        (BEMA, when theta0 is given)
//   teacher = (BEMA && !teacher_ema ? out : ema[teacher_profile]') cast to the teacher's dtype,
//             when teachers are given.
// w[k] is the weight of theta (EMA: 1 - d, BEMA: beta), computed in float64 by the caller and
// rounded to fp32 once. Unlike d * ema + (1 - d) * theta, whose two weights are rounded apart
// and need not sum to 1, the lerp form keeps a constant theta bit-equal: theta - ema is 0.
// Elements whose theta is not finite keep every state value and set flag[0] = 1.
// theta is read once for all K profiles: 4 + 8K bytes per fp32 element.
#include "common.h"

#include <ATen/Dispatch.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <atomic>
#include <cstring>
#include <type_traits>
#include <vector>

namespace emalora_fast {
namespace {

constexpr int64_t kMaxProfiles = 8;

struct Coeffs {
  float weight[kMaxProfiles], alpha;  // per profile, the weight w of theta
  int64_t profiles;         // K
  int64_t stride;           // P: elements between two profiles' shadows
  int64_t teacher_profile;  // the profile the teachers receive (EMA)
  bool reset;
  bool teacher_ema;  // BEMA: the teachers receive ema instead of out
};

// 1 when x is an infinity or a NaN (all exponent bits set), else 0; integer arithmetic, so that
// the loops below stay branch-free and vectorize.
inline uint32_t not_finite(float x) {
  uint32_t bits;
  std::memcpy(&bits, &x, sizeof bits);
  return (bits & 0x7f800000u) == 0x7f800000u;
}

// fresh where bad == 0, old where bad == 1, as a bit blend (a float select would be a branch).
inline float keep_if(uint32_t bad, float fresh, float old) {
  const uint32_t take_fresh = bad - 1u;  // all ones when bad == 0
  uint32_t f, o;
  std::memcpy(&f, &fresh, sizeof f);
  std::memcpy(&o, &old, sizeof o);
  const uint32_t r = (f & take_fresh) | (o & ~take_fresh);
  float out;
  std::memcpy(&out, &r, sizeof out);
  return out;
}

// The write-only streams of one element: BEMA's output (and theta_0 at a reset) and the teacher.
template <typename T, bool BEMA, bool TEACH, bool TEACH_EMA, bool RESET>
inline void write_outputs(float x, const float* __restrict e_teach, T* __restrict te,
                          float* __restrict t0, float* __restrict o, float e0, int64_t i,
                          float alpha) {
  float v = e0;
  if constexpr (BEMA) {
    if constexpr (RESET) {
      t0[i] = x;
      v = x;
    } else {
      v = e0 + alpha * (x - t0[i]);
    }
    o[i] = v;
  }
  if constexpr (TEACH) te[i] = static_cast<T>(TEACH_EMA || !BEMA ? e_teach[i] : v);
}

// One profile's shadow over a chunk: ep = ep + w * (theta - ep) (theta at a reset). With
// GUARD, an element whose theta is not finite keeps its old value (a bit blend) and the return
// value is 1 when the chunk holds one; without, the chunk is known to be clean.
template <typename P, bool RESET, bool GUARD>
inline uint32_t update_profile(const P* __restrict th, float* __restrict ep, int64_t m,
                               float w) {
  uint32_t bad = 0;
#pragma omp simd reduction(| : bad)
  for (int64_t i = 0; i < m; ++i) {
    const float x = static_cast<float>(th[i]);
    const float old = ep[i];
    const float fresh = RESET ? x : old + w * (x - old);
    if constexpr (GUARD) {
      const uint32_t nf = not_finite(x);
      ep[i] = keep_if(nf, fresh, old);
      bad |= nf;
    } else {
      ep[i] = fresh;
    }
  }
  return bad;
}

// The update of one chunk of m elements; returns 1 when one of its theta is not finite (that
// element keeps every state value). The switches are compile-time so that every variant is a
// branch-free vectorizable loop. The first profile's pass streams theta and its shadow from
// memory and learns whether the chunk is clean; the other profiles' passes find theta in L1
// (and skip the guard when the chunk is clean); a last pass writes the write-only streams from
// values in L1, element by element only in the rare chunk holding a non-finite theta. theta is
// read from memory once for all K profiles.
template <typename P, typename T, bool BEMA, bool TEACH, bool TEACH_EMA, bool RESET>
inline uint32_t update_chunk(const P* __restrict th, T* __restrict te, float* __restrict e,
                             float* __restrict t0, float* __restrict o, int64_t m,
                             const Coeffs& k) {
  const uint32_t bad = update_profile<P, RESET, true>(th, e, m, k.weight[0]);
  for (int64_t p = 1; p < (BEMA ? 1 : k.profiles); ++p) {
    float* ep = e + p * k.stride;
    if (bad) {
      update_profile<P, RESET, true>(th, ep, m, k.weight[p]);
    } else {
      update_profile<P, RESET, false>(th, ep, m, k.weight[p]);
    }
  }
  if constexpr (BEMA || TEACH) {
    const float* e_teach = e + (BEMA ? 0 : k.teacher_profile * k.stride);
    const float alpha = k.alpha;
    if (!bad) {
#pragma omp simd
      for (int64_t i = 0; i < m; ++i) {
        write_outputs<T, BEMA, TEACH, TEACH_EMA, RESET>(static_cast<float>(th[i]), e_teach, te,
                                                         t0, o, e[i], i, alpha);
      }
    } else {
      for (int64_t i = 0; i < m; ++i) {
        const float x = static_cast<float>(th[i]);
        if (!not_finite(x)) {
          write_outputs<T, BEMA, TEACH, TEACH_EMA, RESET>(x, e_teach, te, t0, o, e[i], i, alpha);
        }
      }
    }
  }
  return bad;
}

// One contiguous run of elements [0, n) of a tensor; state pointers already offset.
template <typename P, typename T, bool BEMA, bool TEACH, bool TEACH_EMA, bool RESET>
bool update_run(const P* theta, T* teacher, float* ema, float* theta0, float* out, int64_t n,
                const Coeffs& k) {
  uint32_t bad = 0;
  for (int64_t c0 = 0; c0 < n; c0 += kChunk) {
    bad |= update_chunk<P, T, BEMA, TEACH, TEACH_EMA, RESET>(
        theta + c0, TEACH ? teacher + c0 : nullptr, ema + c0, BEMA ? theta0 + c0 : nullptr,
        BEMA ? out + c0 : nullptr, std::min(kChunk, n - c0), k);
  }
  return bad != 0;
}

// Calls f with std::true_type or std::false_type for a runtime switch.
template <typename F>
auto with_bool(bool b, F&& f) {
  return b ? f(std::true_type{}) : f(std::false_type{});
}

// Picks the compile-time variant of update_run for the runtime switches.
template <typename P, typename T>
bool dispatch_run(const P* th, T* te, float* e, float* t0, float* o, int64_t n, const Coeffs& k) {
  return with_bool(t0 != nullptr, [&](auto bema) {
    return with_bool(te != nullptr, [&](auto teach) {
      return with_bool(k.teacher_ema, [&](auto teach_ema) {
        return with_bool(k.reset, [&](auto reset) {
          return update_run<P, T, bema.value, teach.value, teach_ema.value && bema.value,
                            reset.value>(th, te, e, t0, o, n, k);
        });
      });
    });
  });
}

template <typename P, typename T>
void update_all(const std::vector<at::Tensor>& params, const std::vector<at::Tensor>* teachers,
                const std::vector<int64_t>& starts, float* ema, float* theta0, float* out,
                int32_t* flag, const Coeffs& k) {
  const int64_t total = starts.back();
  std::atomic<bool> any_bad{false};
  at::parallel_for(0, total, kGrain, [&](int64_t begin, int64_t end) {
    // First tensor whose range holds `begin`.
    auto it = std::upper_bound(starts.begin(), starts.end(), begin);
    int64_t ti = static_cast<int64_t>(it - starts.begin()) - 1;
    int64_t pos = begin;
    bool bad = false;
    while (pos < end) {
      const int64_t t_start = starts[ti], t_end = starts[ti + 1];
      const int64_t stop = std::min(end, t_end);
      const int64_t off = pos - t_start;
      const int64_t n = stop - pos;
      if (n > 0) {
        const P* th = params[ti].const_data_ptr<P>() + off;
        T* te = teachers ? (*teachers)[ti].mutable_data_ptr<T>() + off : nullptr;
        float* t0 = theta0 ? theta0 + pos : nullptr;
        float* o = out ? out + pos : nullptr;
        bad |= dispatch_run<P, T>(th, te, ema + pos, t0, o, n, k);
      }
      pos = stop;
      ++ti;
    }
    if (bad) any_bad.store(true, std::memory_order_relaxed);
  });
  if (any_bad.load()) *flag = 1;
}

void check_state(const at::Tensor& t, int64_t total, const char* what) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == at::kFloat && t.is_contiguous() &&
                  t.numel() == total,
              "averager_update: ", what, " must be a contiguous CPU float32 tensor of ", total,
              " elements, got ", t.scalar_type(), " of ", t.numel(), " elements");
}

void averager_update(at::TensorList params, at::TensorList teachers, const at::Tensor& ema,
                     const std::optional<at::Tensor>& theta0, const std::optional<at::Tensor>& out,
                     const at::Tensor& flag, at::ArrayRef<double> weights, double alpha,
                     bool reset, bool teacher_ema, int64_t teacher_profile) {
  TORCH_CHECK(!params.empty(), "averager_update: no parameters");
  TORCH_CHECK(teachers.empty() || teachers.size() == params.size(),
              "averager_update: got ", teachers.size(), " teacher tensors for ", params.size(),
              " parameters");
  TORCH_CHECK(theta0.has_value() == out.has_value(),
              "averager_update: theta0 and out go together (BEMA) or are both absent (EMA)");
  const int64_t profiles = static_cast<int64_t>(weights.size());
  TORCH_CHECK(profiles >= 1 && profiles <= kMaxProfiles, "averager_update: 1 to ", kMaxProfiles,
              " profiles (one weight each), got ", profiles);
  TORCH_CHECK(!theta0 || profiles == 1, "averager_update: BEMA has one profile");
  TORCH_CHECK(teacher_profile >= 0 && teacher_profile < profiles,
              "averager_update: teacher_profile out of range");
  const auto p_type = params[0].scalar_type();
  const auto t_type = teachers.empty() ? p_type : teachers[0].scalar_type();
  std::vector<int64_t> starts(params.size() + 1, 0);
  for (size_t i = 0; i < params.size(); ++i) {
    const auto& p = params[i];
    TORCH_CHECK(p.device().is_cpu() && p.is_contiguous() && p.scalar_type() == p_type,
                "averager_update: parameter ", i,
                " must be a contiguous CPU tensor of the group's dtype ", p_type);
    if (!teachers.empty()) {
      const auto& t = teachers[i];
      TORCH_CHECK(t.device().is_cpu() && t.is_contiguous() && t.scalar_type() == t_type &&
                      t.numel() == p.numel(),
                  "averager_update: teacher ", i, " must match parameter ", i);
    }
    starts[i + 1] = starts[i] + p.numel();
  }
  const int64_t total = starts.back();
  check_state(ema, total * profiles, "ema");
  if (theta0) {
    check_state(*theta0, total, "theta0");
    check_state(*out, total, "out");
  }
  TORCH_CHECK(flag.device().is_cpu() && flag.scalar_type() == at::kInt && flag.numel() >= 1,
              "averager_update: flag must be a CPU int32 tensor");
  Coeffs k{};
  for (int64_t p = 0; p < profiles; ++p) {
    k.weight[p] = static_cast<float>(weights[p]);
  }
  k.alpha = static_cast<float>(alpha);
  k.profiles = profiles;
  k.stride = total;
  k.teacher_profile = teacher_profile;
  k.reset = reset;
  k.teacher_ema = teacher_ema;
  const std::vector<at::Tensor> p_vec(params.begin(), params.end());
  const std::vector<at::Tensor> t_vec(teachers.begin(), teachers.end());
  float* th0 = theta0 ? theta0->data_ptr<float>() : nullptr;
  float* o = out ? out->data_ptr<float>() : nullptr;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, p_type, "averager_update", [&] {
    using P = scalar_t;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, t_type, "averager_teacher", [&] {
      update_all<P, scalar_t>(p_vec, t_vec.empty() ? nullptr : &t_vec, starts,
                              ema.data_ptr<float>(), th0, o, flag.data_ptr<int32_t>(), k);
    });
  });
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(emalora_fast, m) {
  m.def(
      "averager_update(Tensor[] params, Tensor(a!)[] teachers, Tensor(b!) ema, "
      "Tensor(c!)? theta0, Tensor(d!)? out, Tensor(e!) flag, float[] weights, float alpha, "
      "bool reset, bool teacher_ema=False, int teacher_profile=0) -> ()");
}

TORCH_LIBRARY_IMPL(emalora_fast, CPU, m) { m.impl("averager_update", &averager_update); }

}  // namespace emalora_fast
