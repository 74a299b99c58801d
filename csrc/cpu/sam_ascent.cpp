// swm_fused::sam_ascent_ on CPU: saved <- w and w <- w + ((w*w if adaptive) * g) * scale, one pass.
// Products and the sum are rounded separately (no fma), in the order of the per-parameter torch code
// (davda54/sam: e_w = p^2 * grad * scale; p += e_w), in the params' compute type.
#include <torch/library.h>

#include "cpu/multi_tensor.h"

namespace swm_fused::cpu {
namespace {

template <typename C>
void ascent_range(const Operand& param, const Operand& grad, const Operand& saved, int64_t lo, int64_t hi, C scale,
                  bool adaptive, bool perturb) {
  alignas(64) C w_buf[kBlock];
  alignas(64) C g_buf[kBlock];
  alignas(64) C out[kBlock];
  for (int64_t b = lo; b < hi; b += kBlock) {
    const int64_t n = std::min(kBlock, hi - b);
    const C* w = as_compute<C>(param, b, n, w_buf);
    store_any<C>(saved, b, n, w);  // before params are written: `w` may be their memory
    if (!perturb) continue;
    const C* g = as_compute<C>(grad, b, n, g_buf);
    if (adaptive) {
      for (int64_t i = 0; i < n; ++i) out[i] = w[i] + ((w[i] * w[i]) * g[i]) * scale;
    } else {
      for (int64_t i = 0; i < n; ++i) out[i] = w[i] + g[i] * scale;
    }
    store<C>(param, b, n, out);
  }
}

void sam_ascent_cpu(at::TensorList params, at::TensorList grads, at::TensorList saved, const at::Tensor& scale,
                    bool adaptive, const std::optional<at::Tensor>& found_inf) {
  Staging staging;
  const std::vector<Operand> ps = stage_list(staging, params, true);
  const std::vector<Operand> gs = stage_list(staging, grads, false);
  const std::vector<Operand> ss = stage_list(staging, saved, true);
  const bool perturb = !step_is_skipped(found_inf);  // a flagged step still saves, so the restore stays exact
  const double s = scale.item<double>();
  parallel_over_tensors(ps, 2, [&](size_t i, int64_t lo, int64_t hi) {
    if (ps[i].dtype == at::kDouble) {
      ascent_range<double>(ps[i], gs[i], ss[i], lo, hi, s, adaptive, perturb);
    } else {
      ascent_range<float>(ps[i], gs[i], ss[i], lo, hi, static_cast<float>(s), adaptive, perturb);
    }
  });
  staging.write_back();
}

}  // namespace

TORCH_LIBRARY_IMPL(swm_fused, CPU, m) { m.impl("sam_ascent_", &sam_ascent_cpu); }

}  // namespace swm_fused::cpu
