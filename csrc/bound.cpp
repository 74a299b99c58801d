// swm_fused.BoundLists: tensor lists that cross from Python to C++ once, for ops repeated every
// step (an EMA update, its NaN check). A torch.ops call converts every tensor of every list on
// every call (about 0.35 us per tensor); a method of this class converts nothing. Each call still
// goes through the dispatcher, so csrc/validate.h checks the lists every time (tens of ns per
// tensor in C++) and torch picks the device's kernel.
//
// A bound step (bind_step_) goes further for the averaging engine's hot path: the counters, the
// non-floating tensors kept as their latest value and (for a flattened model) the sources' storage
// use counts at binding are bound too, and `swm_fused._C.bound_step(key, weight, check)` (a plain
// CPython function: no torchbind method lookup, no torch.ops argument conversion) runs a whole
// update in one call. On CPU it validates once and stages once for both the NaN check and the average
// (csrc/cpu/step.h); on other devices it calls any_nonfinite and lerp_ through the dispatcher.
#include <Python.h>

#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/core/grad_mode.h>
#include <ATen/ops/reciprocal.h>
#include <ATen/ops/rsub.h>
#include <ATen/ops/where.h>
#include <ATen/record_function.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <torch/custom_class.h>
#include <torch/library.h>

#include <atomic>
#include <mutex>
#include <optional>
#include <string>
#include <unordered_map>
#include <vector>

#include "cpu/step.h"
#include "validate.h"

namespace swm_fused {
namespace {

using OptTensor = std::optional<at::Tensor>;

template <typename Fn>
c10::TypedOperatorHandle<Fn> handle(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Fn>();
}

struct BoundLists;

// Bound steps by key, for bound_step(): weak, so a binding dropped in Python is freed as usual.
std::mutex registry_mutex;
std::unordered_map<int64_t, c10::weak_intrusive_ptr<BoundLists>>& registry() {
  static auto* map = new std::unordered_map<int64_t, c10::weak_intrusive_ptr<BoundLists>>();
  return *map;
}
std::atomic<int64_t> next_key{1};

// What run_step_ touches besides the two lists; set by bind_step_.
struct BoundStep {
  at::Tensor counts;               // int64, on the averages' device: += 1 - flag, every element
  std::optional<at::Tensor> skipped;  // int64, one element: += flag
  std::vector<at::Tensor> latest;  // non-floating tensors: latest[i] <- live[i] unless flagged
  std::vector<at::Tensor> live;
  std::vector<size_t> src_uses;    // storage use count of each source when bound (empty: not checked)
  bool swa = false;                // weight 1 / (counts[0] + 1) instead of the given one
  bool host_counters = false;      // CPU counters and flag: updated in place, no tensor ops
};

struct BoundLists : torch::CustomClassHolder {
  std::vector<at::Tensor> tensors;  // k-major: list k, position i is tensors[k * length + i]
  int64_t length;
  std::optional<BoundStep> bound_step;
  int64_t key = 0;

  BoundLists(std::vector<at::Tensor> tensors_, int64_t num_lists) : tensors(std::move(tensors_)) {
    TORCH_CHECK_VALUE(num_lists >= 1 && static_cast<int64_t>(tensors.size()) % num_lists == 0, "BoundLists: ",
                      tensors.size(), " tensors do not split into ", num_lists, " lists of one length");
    length = static_cast<int64_t>(tensors.size()) / num_lists;
  }

  ~BoundLists() override {
    if (key != 0) {
      std::lock_guard<std::mutex> lock(registry_mutex);
      registry().erase(key);
    }
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

  // Binds the rest of a whole update (see BoundStep) to lists 0 (avg) and 1 (src); returns the key
  // for swm_fused._C.bound_step. Binding again replaces the previous binding (same key).
  static int64_t bind_step(const c10::intrusive_ptr<BoundLists>& self, at::Tensor counts,
                            std::optional<at::Tensor> skipped, bool swa, std::vector<at::Tensor> latest,
                            std::vector<at::Tensor> live, bool pin_src_storages) {
    TORCH_CHECK_VALUE(self->num_lists() == 2, "bind_step_: needs 2 bound lists (avg, src), this binding has ",
                      self->num_lists());
    TORCH_CHECK_TYPE(counts.scalar_type() == at::kLong && counts.dim() == 1 && counts.numel() >= 1,
                     "bind_step_: counts must be a 1-D int64 tensor with at least one element");
    TORCH_CHECK_TYPE(!skipped.has_value() || (skipped->scalar_type() == at::kLong && skipped->numel() == 1),
                     "bind_step_: skipped must be a one-element int64 tensor");
    TORCH_CHECK_VALUE(latest.size() == live.size(), "bind_step_: latest has ", latest.size(),
                      " tensors but live has ", live.size());
    TORCH_CHECK_VALUE(!skipped.has_value() || skipped->device() == counts.device(),
                      "bind_step_: skipped and counts must be on one device");
    BoundStep step;
    step.host_counters = counts.device().is_cpu() && counts.is_contiguous() &&
                         (!skipped.has_value() || skipped->is_contiguous());
    step.counts = std::move(counts);
    step.skipped = std::move(skipped);
    step.latest = std::move(latest);
    step.live = std::move(live);
    if (pin_src_storages) {
      for (const at::Tensor& src : self->list(1)) step.src_uses.push_back(src.storage().use_count());
    }
    step.swa = swa;
    self->bound_step = std::move(step);
    if (self->key == 0) {
      self->key = next_key.fetch_add(1);
      std::lock_guard<std::mutex> lock(registry_mutex);
      registry().emplace(self->key, c10::weak_intrusive_ptr<BoundLists>(self));
    }
    return self->key;
  }

  // The bound step: 0 when done; 1 (nothing done, nothing read) when, with pin_src_storages, a source's
  // storage has gained or lost a reference since binding (a flattened model whose parameters moved
  // out, or a new view of it), or when the sources are not on the averages' device (the model moved):
  // the caller checks the model again (FlatParameters.intact, re-pairing) and binds again.
  int64_t run_step_(double weight, bool check) {
    TORCH_CHECK(bound_step.has_value(), "BoundLists: call bind_step_ before run_step_");
    const BoundStep& s = *bound_step;
    const at::TensorList srcs = list(1);
    if (!s.src_uses.empty()) {
      for (size_t i = 0; i < srcs.size(); ++i) {
        if (srcs[i].storage().use_count() != s.src_uses[i]) return 1;
      }
    }
    if (length > 0 && srcs[0].device() != s.counts.device()) return 1;
    RECORD_FUNCTION("swm_fused::bound_step", c10::ArrayRef<const c10::IValue>{});
    // No autograd: the averages never need it, and the boxed autograd fallback of a custom op would
    // copy every list into IValues on every call.
    at::NoGradGuard no_grad;
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    if (s.host_counters) {
      // CPU (the sources are on the counters' device, checked above): the validator of lerp_, which
      // covers every rule of any_nonfinite too, then the check and the average on operands staged
      // once (csrc/cpu/step.h); nothing waits for a device, so the counters change in place. (One pass
      // that validates and stages position by position was measured slower with 20,000 tensors: the
      // tight validation loop keeps more cache misses in flight, and staging then finds the tensors
      // in cache.)
      validate::lerp_args(list(0), srcs, std::nullopt, std::nullopt);
      int64_t* counts = s.counts.data_ptr<int64_t>();
      const double w = s.swa ? 1.0 / (static_cast<double>(counts[0]) + 1.0) : weight;
      if (cpu::lerp_step(list(0), srcs, w, check)) {
        if (s.skipped.has_value()) s.skipped->data_ptr<int64_t>()[0] += 1;
      } else {
        for (size_t i = 0; i < s.latest.size(); ++i) at::Tensor(s.latest[i]).copy_(s.live[i]);
        for (int64_t i = 0, n = s.counts.numel(); i < n; ++i) counts[i] += 1;
      }
      return 0;
    }
    // Other devices: the ops, with the flag and the counters on the device (no host sync).
    std::optional<at::Tensor> flag;
    if (check && length > 0) flag = any_nonfinite(1);
    std::optional<at::Tensor> weight_tensor;
    if (s.swa) weight_tensor = at::reciprocal(s.counts.select(0, 0).to(at::kDouble).add(1.0));
    if (length > 0) lerp_(weight, weight_tensor, flag);
    for (size_t i = 0; i < s.latest.size(); ++i) {
      at::Tensor dst = s.latest[i];
      const at::Tensor src = s.live[i].to(dst.device());
      dst.copy_(flag.has_value() ? at::where(flag->ne(0), dst, src) : src);
    }
    at::Tensor counts = s.counts;
    if (flag.has_value()) {
      counts.sub_(flag->to(counts.scalar_type())).add_(1);
      if (s.skipped.has_value()) at::Tensor(*s.skipped).add_(flag->to(at::kLong));
    } else {
      counts.add_(1);
    }
    return 0;
  }
};

// swm_fused._C.bound_step(key, weight, check) -> int: BoundLists.run_step_ of a bound step, called
// without torchbind's argument matching. Releases the GIL while it runs; c10 errors become the
// Python exceptions torch raises for them (ValueError, TypeError, IndexError, NotImplementedError,
// else RuntimeError), without the C++ backtrace.
PyObject* bound_step_py(PyObject* /*module*/, PyObject* const* args, Py_ssize_t nargs) {
  if (nargs != 3) {
    PyErr_Format(PyExc_TypeError, "bound_step() takes 3 arguments (key, weight, check), got %zd", nargs);
    return nullptr;
  }
  const long long key = PyLong_AsLongLong(args[0]);
  if (key == -1 && PyErr_Occurred()) return nullptr;
  const double weight = PyFloat_AsDouble(args[1]);
  if (weight == -1.0 && PyErr_Occurred()) return nullptr;
  const int check = PyObject_IsTrue(args[2]);
  if (check < 0) return nullptr;
  c10::intrusive_ptr<BoundLists> bound;
  {
    std::lock_guard<std::mutex> lock(registry_mutex);
    auto it = registry().find(key);
    if (it != registry().end()) bound = it->second.lock();
  }
  if (!bound) {
    PyErr_Format(PyExc_KeyError, "bound_step: no bound step with key %lld", key);
    return nullptr;
  }
  int64_t status = 0;
  PyObject* error_type = nullptr;
  std::string message;
  Py_BEGIN_ALLOW_THREADS
  try {
    status = bound->run_step_(weight, check != 0);
  } catch (const c10::ValueError& e) {
    error_type = PyExc_ValueError;
    message = e.what_without_backtrace();
  } catch (const c10::TypeError& e) {
    error_type = PyExc_TypeError;
    message = e.what_without_backtrace();
  } catch (const c10::IndexError& e) {
    error_type = PyExc_IndexError;
    message = e.what_without_backtrace();
  } catch (const c10::NotImplementedError& e) {
    error_type = PyExc_NotImplementedError;
    message = e.what_without_backtrace();
  } catch (const c10::Error& e) {
    error_type = PyExc_RuntimeError;
    message = e.what_without_backtrace();
  } catch (const std::exception& e) {
    error_type = PyExc_RuntimeError;
    message = e.what();
  }
  Py_END_ALLOW_THREADS
  bound.reset();
  if (error_type != nullptr) {
    PyErr_SetString(error_type, message.c_str());
    return nullptr;
  }
  return PyLong_FromLongLong(status);
}

PyMethodDef bound_methods[] = {
    {"bound_step", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(bound_step_py)), METH_FASTCALL,
     "bound_step(key, weight, check) -> int: run a step bound by BoundLists.bind_step_ (0: done, 1: stale)"},
    {nullptr, nullptr, 0, nullptr}};

}  // namespace

PyMethodDef* bound_python_methods() { return bound_methods; }

TORCH_LIBRARY_FRAGMENT(swm_fused, m) {
  m.class_<BoundLists>("BoundLists")
      .def(torch::init<std::vector<at::Tensor>, int64_t>())
      .def("lerp_", &BoundLists::lerp_)
      .def("swag_", &BoundLists::swag_)
      .def("any_nonfinite", &BoundLists::any_nonfinite)
      .def("step_", &BoundLists::step_)
      .def("step_multi_", &BoundLists::step_multi_)
      .def("bind_step_",
           [](const c10::intrusive_ptr<BoundLists>& self, at::Tensor counts, std::optional<at::Tensor> skipped,
              bool swa, std::vector<at::Tensor> latest, std::vector<at::Tensor> live, bool pin_src_storages) {
             return BoundLists::bind_step(self, std::move(counts), std::move(skipped), swa, std::move(latest),
                                          std::move(live), pin_src_storages);
           })
      .def("run_step_", &BoundLists::run_step_);
}

}  // namespace swm_fused
