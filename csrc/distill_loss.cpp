// Teacher-student distillation loss on logits (CPU), streamed over the vocabulary.
//
// Per row: student logits s, teacher logits t over V entries, temperature T, a = s/T, b = t/T,
// log q = a - LSE(a), log p = b - LSE(b). Forward KL(p||q), reverse KL(q||p) and the generalized
// JSD_beta = beta KL(p||M) + (1-beta) KL(q||M), M = beta p + (1-beta) q (interior beta only; the
// caller maps beta = 0 and 1 to the two KLs). Optional cross-entropy on raw logits,
// CE = LSE(s) - s[label]. Row loss = div_scale * D + ce_scale * CE; rows labelled ignore_index
// give 0 and a zero gradient.
//
// Passes over each row, in chunks of kChunk entries held in L1 as accumulation-type buffers:
//   forward:  1. online LSE of a, b (and raw s), LSE(x) = m_x + log d_x, plus
//                S = sum e^(b-m_b)((b-m_b) - (a-m_a)) (forward KL: loss = S/d_b + log d_a - log d_b)
//                or R = sum e^(a-m_a)((a-m_a) - (b-m_b)) (reverse KL: R/d_a - log d_a + log d_b).
//             2. (JSD only) KL(p||M) and KL(q||M) with log M = logaddexp(log beta + log p,
//                log(1-beta) + log q).
//   backward: one pass writing dL/ds (optionally over the student buffer itself).
// stats[row] = {m_a, ld_a, m_b, ld_b, m_s, ld_s, aux}, LSE(x) = m_x + ld_x kept in two parts (see
// LogZ); aux = KL(q||p) (reverse KL) or KL(q||M) (JSD).
#include "common.h"

#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <string>

namespace emalora_fast {
namespace {

enum Divergence : int64_t { kForwardKL = 0, kReverseKL = 1, kJSD = 2 };
// Per row: the log-normalizers of a, b and s as (max, log sum e^(x - max)) pairs, then aux.
constexpr int64_t kStats = 7;  // m_a, ld_a, m_b, ld_b, m_s, ld_s, aux

struct Options {
  int64_t divergence;
  double inv_t, beta, div_scale, ce_scale;
  int64_t ignore_index;
  bool ce;   // cross-entropy term present (ce_scale != 0 and labels given)
  bool raw;  // CE needs LSE of the raw logits (T != 1)
};

namespace isa_base {
#include "distill_loss_rows.h"
}  // namespace isa_base

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define EMALORA_HAVE_AVX2_ROWS 1
#pragma GCC push_options
#pragma GCC target("avx2,fma")
namespace isa_avx2 {
#include "distill_loss_rows.h"
}  // namespace isa_avx2
#pragma GCC pop_options
#endif

// The AVX2 + FMA build of the row loops where the CPU has them, decided once per process at run
// time; EMALORA_DISABLE_AVX2 (set to anything) forces the baseline build, e.g. to test it.
bool use_avx2() {
#ifdef EMALORA_HAVE_AVX2_ROWS
  static const bool ok = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                        std::getenv("EMALORA_DISABLE_AVX2") == nullptr;
  return ok;
#else
  return false;
#endif
}

// Which build of the row loops runs here: "avx2" or "baseline" (for tests and benchmark notes).
std::string distill_loss_cpu_isa() { return use_avx2() ? "avx2" : "baseline"; }

template <typename S, typename T, typename A>
void forward_dispatch(const at::Tensor& s, const at::Tensor& t, const int64_t* labels,
                      const Options& o, A* loss, A* stats) {
#ifdef EMALORA_HAVE_AVX2_ROWS
  if (use_avx2()) return isa_avx2::forward_dispatch<S, T, A>(s, t, labels, o, loss, stats);
#endif
  isa_base::forward_dispatch<S, T, A>(s, t, labels, o, loss, stats);
}

template <typename S, typename T, typename A>
void backward_dispatch(const at::Tensor& s, const at::Tensor& t, const int64_t* labels,
                       const A* stats, const A* go, const Options& o, S* grad, int64_t gs) {
#ifdef EMALORA_HAVE_AVX2_ROWS
  if (use_avx2()) {
    return isa_avx2::backward_dispatch<S, T, A>(s, t, labels, stats, go, o, grad, gs);
  }
#endif
  isa_base::backward_dispatch<S, T, A>(s, t, labels, stats, go, o, grad, gs);
}

at::ScalarType acc_type(const at::Tensor& student) {
  return student.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

// Checks shared by both ops; returns the options and the labels pointer (or nullptr).
Options check_inputs(const char* op, const at::Tensor& student, const at::Tensor& teacher,
                     const std::optional<at::Tensor>& labels, int64_t divergence, double beta,
                     double temperature, double div_scale, double ce_scale,
                     int64_t ignore_index) {
  for (const at::Tensor* x : {&student, &teacher}) {
    TORCH_CHECK(x->device().is_cpu(), op, ": logits must be CPU tensors");
    TORCH_CHECK(x->dim() == 2, op, ": logits must be 2-D [N, V], got ", x->sizes());
    TORCH_CHECK(at::isFloatingType(x->scalar_type()), op, ": logits must be floating point, got ",
                x->scalar_type());
    TORCH_CHECK(x->size(1) <= 1 || x->stride(1) == 1, op,
                ": logits must be contiguous along the vocabulary");
  }
  TORCH_CHECK(student.sizes() == teacher.sizes(), op, ": student ", student.sizes(),
              " and teacher ", teacher.sizes(), " shapes differ");
  TORCH_CHECK(divergence >= kForwardKL && divergence <= kJSD, op, ": bad divergence ",
              divergence);
  TORCH_CHECK(temperature > 0, op, ": temperature must be > 0, got ", temperature);
  TORCH_CHECK(divergence != kJSD || (beta > 0 && beta < 1), op,
              ": jsd needs 0 < beta < 1, got ", beta);
  const int64_t N = student.size(0), V = student.size(1);
  bool ce = false;
  if (labels) {
    TORCH_CHECK(labels->device().is_cpu() && labels->scalar_type() == at::kLong &&
                    labels->dim() == 1 && labels->size(0) == N && labels->is_contiguous(),
                op, ": labels must be a contiguous CPU int64 tensor of shape [", N, "]");
    ce = ce_scale != 0;
    if (ce) {
      const int64_t* l = labels->const_data_ptr<int64_t>();
      for (int64_t i = 0; i < N; ++i) {
        TORCH_CHECK(l[i] == ignore_index || (l[i] >= 0 && l[i] < V), op, ": label ", l[i],
                    " of row ", i, " is outside [0, ", V, ")");
      }
    }
  } else {
    TORCH_CHECK(ce_scale == 0, op, ": the cross-entropy term needs labels");
  }
  return Options{divergence, 1.0 / temperature, beta,         div_scale,
                 ce_scale,   ignore_index,      ce,           ce && temperature != 1.0};
}

std::tuple<at::Tensor, at::Tensor> distill_loss_fwd(const at::Tensor& student,
                                                    const at::Tensor& teacher,
                                                    const std::optional<at::Tensor>& labels,
                                                    int64_t divergence, double beta,
                                                    double temperature, double div_scale,
                                                    double ce_scale, int64_t ignore_index) {
  const Options o = check_inputs("distill_loss_fwd", student, teacher, labels, divergence, beta,
                                 temperature, div_scale, ce_scale, ignore_index);
  const int64_t N = student.size(0);
  const auto acc = acc_type(student);
  at::Tensor loss = at::empty({N}, student.options().dtype(acc));
  at::Tensor stats = at::empty({N, kStats}, student.options().dtype(acc));
  const int64_t* lab = labels ? labels->const_data_ptr<int64_t>() : nullptr;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, student.scalar_type(), "fwd_s", [&] {
    using S = scalar_t;
    using A = std::conditional_t<std::is_same_v<S, double>, double, float>;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, teacher.scalar_type(), "fwd_t", [&] {
      forward_dispatch<S, scalar_t, A>(student, teacher, lab, o, loss.data_ptr<A>(),
                                       stats.data_ptr<A>());
    });
  });
  return {loss, stats};
}

void check_backward_state(const at::Tensor& student, const at::Tensor& stats,
                          const at::Tensor& grad_rows) {
  const int64_t N = student.size(0);
  const auto acc = acc_type(student);
  TORCH_CHECK(stats.scalar_type() == acc && stats.is_contiguous() && stats.dim() == 2 &&
                  stats.size(0) == N && stats.size(1) == kStats,
              "distill_loss_bwd: stats must be a contiguous [", N, ", ", kStats, "] ", acc,
              " tensor from distill_loss_fwd");
  TORCH_CHECK(grad_rows.scalar_type() == acc && grad_rows.is_contiguous() &&
                  grad_rows.dim() == 1 && grad_rows.size(0) == N,
              "distill_loss_bwd: grad_rows must be a contiguous [", N, "] ", acc, " tensor");
}

void backward_into(const at::Tensor& student, const at::Tensor& teacher,
                   const std::optional<at::Tensor>& labels, const at::Tensor& stats,
                   const at::Tensor& grad_rows, const Options& o, const at::Tensor& grad) {
  const int64_t* lab = labels ? labels->const_data_ptr<int64_t>() : nullptr;
  void* g_ptr = grad.data_ptr();
  const int64_t g_stride = grad.stride(0);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, student.scalar_type(), "bwd_s", [&] {
    using S = scalar_t;
    using A = std::conditional_t<std::is_same_v<S, double>, double, float>;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, teacher.scalar_type(), "bwd_t", [&] {
      backward_dispatch<S, scalar_t, A>(student, teacher, lab, stats.const_data_ptr<A>(),
                                        grad_rows.const_data_ptr<A>(), o, static_cast<S*>(g_ptr),
                                        g_stride);
    });
  });
}

at::Tensor distill_loss_bwd(const at::Tensor& student, const at::Tensor& teacher,
                            const std::optional<at::Tensor>& labels, const at::Tensor& stats,
                            const at::Tensor& grad_rows, int64_t divergence, double beta,
                            double temperature, double div_scale, double ce_scale,
                            int64_t ignore_index) {
  const Options o = check_inputs("distill_loss_bwd", student, teacher, labels, divergence, beta,
                                 temperature, div_scale, ce_scale, ignore_index);
  check_backward_state(student, stats, grad_rows);
  at::Tensor grad = at::empty(student.sizes(), student.options());
  backward_into(student, teacher, labels, stats, grad_rows, o, grad);
  return grad;
}

void distill_loss_bwd_(const at::Tensor& student, const at::Tensor& teacher,
                       const std::optional<at::Tensor>& labels, const at::Tensor& stats,
                       const at::Tensor& grad_rows, int64_t divergence, double beta,
                       double temperature, double div_scale, double ce_scale,
                       int64_t ignore_index) {
  const Options o = check_inputs("distill_loss_bwd_", student, teacher, labels, divergence, beta,
                                 temperature, div_scale, ce_scale, ignore_index);
  check_backward_state(student, stats, grad_rows);
  // Each chunk is read into the L1 buffers before its gradient is written over it.
  backward_into(student, teacher, labels, stats, grad_rows, o, student);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(emalora_fast, m) {
  m.def(
      "distill_loss_fwd(Tensor student, Tensor teacher, Tensor? labels, int divergence, "
      "float beta, float temperature, float div_scale, float ce_scale, int ignore_index) "
      "-> (Tensor, Tensor)");
  m.def(
      "distill_loss_bwd(Tensor student, Tensor teacher, Tensor? labels, Tensor stats, "
      "Tensor grad_rows, int divergence, float beta, float temperature, float div_scale, "
      "float ce_scale, int ignore_index) -> Tensor");
  m.def(
      "distill_loss_bwd_(Tensor(a!) student, Tensor teacher, Tensor? labels, Tensor stats, "
      "Tensor grad_rows, int divergence, float beta, float temperature, float div_scale, "
      "float ce_scale, int ignore_index) -> ()");
  m.def("distill_loss_cpu_isa() -> str", &distill_loss_cpu_isa);
}

TORCH_LIBRARY_IMPL(emalora_fast, CPU, m) {
  m.impl("distill_loss_fwd", &distill_loss_fwd);
  m.impl("distill_loss_bwd", &distill_loss_bwd);
  m.impl("distill_loss_bwd_", &distill_loss_bwd_);
}

}  // namespace emalora_fast
