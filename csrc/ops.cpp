// The swm_fused operator library: schemas only. Kernels register per device with
// TORCH_LIBRARY_IMPL (csrc/cpu/ for CPU, csrc/cuda/ for CUDA); csrc/checks.cpp registers the
// validator in front of them and the check_* ops; fake kernels live in swm_fused/_fake.py.
// Importing swm_fused._C loads this library.
#include <Python.h>
#include <torch/library.h>

namespace swm_fused {
PyMethodDef* bound_python_methods();  // csrc/bound.cpp: bound_step
}

extern "C" {
// The Python module: importing it runs the static registrations below. Its one function,
// bound_step, is the averaging engine's hot path (csrc/bound.cpp).
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1,
                                          swm_fused::bound_python_methods()};
  return PyModule_Create(&module_def);
}
}

TORCH_LIBRARY(swm_fused, m) {
  m.def("lerp_(Tensor(a!)[] avg, Tensor[] src, float weight, Tensor? weight_tensor, Tensor? found_inf) -> ()");
  m.def("swag_(Tensor(a!)[] mean, Tensor(b!)[] sq_mean, Tensor[] src, float weight, Tensor? weight_tensor, "
        "Tensor? found_inf) -> ()");
  m.def("merge_(Tensor(a!)[] out, Tensor[] inputs, float[] weights) -> ()");
  // avgs holds the K = len(weights) lists back to back (k-major: avgs[k * len(src) + i]).
  m.def("lerp_multi_(Tensor(a!)[] avgs, Tensor[] src, float[] weights, Tensor? found_inf) -> ()");
  m.def("any_nonfinite(Tensor[] tensors) -> Tensor");
  // SAM: sum of (scale * t)^2 over every tensor (scale empty: no scale), one 0-dim tensor (float64 when
  // a tensor is float64, else float32);
  // saved <- params and params <- params + scale * (params^2 if adaptive else 1) * grads, one pass.
  m.def("sq_norm(Tensor[] tensors, Tensor[] scale) -> Tensor");
  m.def("sam_ascent_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] saved, Tensor scale, bool adaptive, "
        "Tensor? found_inf) -> ()");
  // The sparsifying merges (docs/design.md has the element-wise contracts). ties_merge_: inputs holds
  // K = len(weights) lists back to back (k-major), base is empty or one list, thresholds (K, N, 2) holds each
  // input's band [lo, hi) of kept task-vector magnitudes; out <- base + scale * (elected, masked, weighted sum).
  // dare_drop_: deltas <- [u < p] * (deltas / p if rescale else deltas), p = keep_prob[i] or, when keep_prob is
  // empty, the number p.
  m.def("ties_merge_(Tensor(a!)[] out, Tensor[] inputs, float[] weights, Tensor[] base, Tensor? thresholds, "
        "str majority_sign, bool normalize, float scale, bool task_vectors) -> ()");
  m.def("dare_drop_(Tensor(a!)[] deltas, Tensor[] u, Tensor[] keep_prob, float p, bool rescale) -> ()");
  // The validator alone, with the list arguments of the op above of the same name: the Python
  // backends (reference, triton) call these before running, so every backend checks the same rules.
  m.def("check_lerp_(Tensor[] avg, Tensor[] src, Tensor? weight_tensor, Tensor? found_inf) -> ()");
  m.def("check_swag_(Tensor[] mean, Tensor[] sq_mean, Tensor[] src, Tensor? weight_tensor, Tensor? found_inf) -> ()");
  m.def("check_merge_(Tensor[] out, Tensor[] inputs, int num_weights) -> ()");
  m.def("check_lerp_multi_(Tensor[] avgs, Tensor[] src, int num_weights, Tensor? found_inf) -> ()");
  m.def("check_any_nonfinite(Tensor[] tensors) -> ()");
  m.def("check_sq_norm(Tensor[] tensors, Tensor[] scale) -> ()");
  m.def("check_sam_ascent_(Tensor[] params, Tensor[] grads, Tensor[] saved, Tensor scale, Tensor? found_inf) -> ()");
  m.def("check_ties_merge_(Tensor[] out, Tensor[] inputs, int num_weights, Tensor[] base, Tensor? thresholds, "
        "str majority_sign) -> ()");
  m.def("check_dare_drop_(Tensor[] deltas, Tensor[] u, Tensor[] keep_prob) -> ()");
}
