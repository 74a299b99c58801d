// swm_fused.BoundLists: tensor lists that cross from Python to C++ once, for ops repeated every
// step (an EMA update, its NaN check). A torch.ops call converts every tensor of every list on
// every call (about 0.35 us per tensor); a method of this class converts nothing. Each call still
// goes through the dispatcher, so csrc/validate.h checks the lists every time (tens of ns per
// tensor in C++) and torch picks the device's kernel.
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/ops/reciprocal.h>
#include <ATen/ops/rsub.h>
#include <torch/custom_class.h>
#include <torch/library.h>

#include <optional>
#include <vector>

namespace swm_fused {
namespace {

using OptTensor = std::optional<at::Tensor>;

template <typename Fn>
c10::TypedOperatorHandle<Fn> handle(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Fn>();
}

struct BoundLists : torch::CustomClassHolder {
  std::vector<at::Tensor> tensors;  // k-major: list k, position i is tensors[k * length + i]
  int64_t length;

  BoundLists(std::vector<at::Tensor> tensors_, int64_t num_lists) : tensors(std::move(tensors_)) {
    TORCH_CHECK_VALUE(num_lists >= 1 && static_cast<int64_t>(tensors.size()) % num_lists == 0, "BoundLists: ",
                      tensors.size(), " tensors do not split into ", num_lists, " lists of one length");
    length = static_cast<int64_t>(tensors.size()) / num_lists;
  }

  int64_t num_lists() const { return length == 0 ? 0 : static_cast<int64_t>(tensors.size()) / length; }

  at::TensorList list(int64_t k) const {
    TORCH_CHECK_VALUE(k >= 0 && (length == 0 || k < num_lists()), "BoundLists: no list ", k);
    return at::TensorList(tensors).slice(static_cast<size_t>(k * length), static_cast<size_t>(length));
  }

  // lists 0 and 1: avg <- lerp(avg, src, w).
  void lerp_(double weight, const OptTensor& weight_tensor, const OptTensor& found_inf) {
    static const auto op = handle<void(at::TensorList, at::TensorList, double, const OptTensor&, const OptTensor&)>(
        "swm_fused::lerp_");
    op.call(list(0), list(1), weight, weight_tensor, found_inf);
  }

  // lists 0, 1 and 2: mean, sq_mean, src.
  void swag_(double weight, const OptTensor& weight_tensor, const OptTensor& found_inf) {
    static const auto op = handle<void(at::TensorList, at::TensorList, at::TensorList, double, const OptTensor&,
                                       const OptTensor&)>("swm_fused::swag_");
    op.call(list(0), list(1), list(2), weight, weight_tensor, found_inf);
  }

  // 1.0 if list k holds a NaN or Inf; every tensor of it must be floating.
  at::Tensor any_nonfinite(int64_t k) {
    static const auto op = handle<at::Tensor(at::TensorList)>("swm_fused::any_nonfinite");
    return op.call(list(k));
  }

  // One whole averaging step over lists 0 (avg) and 1 (src) in one call from Python: with `check`,
  // flag = any_nonfinite(src) (every src tensor must be floating); then
  // avg <- lerp(avg, src, w) unless flagged, w = `weight`, or 1 / (counts[0] + 1) with `swa`; then
  // counts += 1 - flag, every element. Returns the flag (undefined without `check`). No host sync.
  std::optional<at::Tensor> step_(double weight, bool swa, bool check, at::Tensor counts) {
    std::optional<at::Tensor> flag;
    if (check) flag = any_nonfinite(1);
    std::optional<at::Tensor> weight_tensor;
    if (swa) weight_tensor = at::reciprocal(counts.select(0, 0).to(at::kDouble).add(1.0));
    lerp_(weight, weight_tensor, flag);
    if (flag.has_value()) {
      counts.sub_(flag->to(counts.scalar_type())).add_(1);
    } else {
      counts.add_(1);
    }
    return flag;
  }

  // One step of K EMA profiles of one source, in one call from Python: lists 0..K-1 are the K
  // averages, list K the source. With `check`, flag = any_nonfinite(src) (every src tensor must be
  // floating); then avgs[k] <- lerp(avgs[k], src, weights[k]) unless flagged (swm_fused::lerp_multi_,
  // validated there: its rules cover the weight count); then every tensor of `counts` += 1 - flag and
  // every tensor of `skipped` += flag (the engines' counters; without `check`, counts += 1). Returns
  // the flag (undefined without `check`). No host sync: the flag never leaves the device.
  std::optional<at::Tensor> step_multi_(std::vector<double> weights, bool check, std::vector<at::Tensor> counts,
                                        std::vector<at::Tensor> skipped) {
    static const auto op = handle<void(at::TensorList, at::TensorList, at::ArrayRef<double>, const OptTensor&)>(
        "swm_fused::lerp_multi_");
    const int64_t k = num_lists() - 1;
    TORCH_CHECK_VALUE(k >= 1, "BoundLists: step_multi_ needs K >= 1 average lists and the source list");
    std::optional<at::Tensor> flag;
    if (check) flag = any_nonfinite(k);
    op.call(at::TensorList(tensors).slice(0, static_cast<size_t>(k * length)), list(k), weights, flag);
    if (flag.has_value()) {
      // any_nonfinite gives exactly 0.0 or 1.0: one conversion serves every counter
      const at::Tensor skip = flag->to(at::kLong);
      if (!counts.empty()) {
        const at::Tensor applied = at::rsub(skip, 1);
        for (auto& c : counts) c.add_(applied);
      }
      for (auto& s : skipped) s.add_(skip);
    } else {
      for (auto& c : counts) c.add_(1);
    }
    return flag;
  }
};

}  // namespace

TORCH_LIBRARY_FRAGMENT(swm_fused, m) {
  m.class_<BoundLists>("BoundLists")
      .def(torch::init<std::vector<at::Tensor>, int64_t>())
      .def("lerp_", &BoundLists::lerp_)
      .def("swag_", &BoundLists::swag_)
      .def("any_nonfinite", &BoundLists::any_nonfinite)
      .def("step_", &BoundLists::step_)
      .def("step_multi_", &BoundLists::step_multi_);
}

}  // namespace swm_fused
