// Argument checking shared by the Python bindings: every bad argument becomes a ValueError that names it.
// The C++ layers below trust their inputs, so this is the one place where Python input is validated.
#pragma once

#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <cstdint>
#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

#include "quant/kernels.h"
#include "runtime/thread_pool.h"

namespace ktinject {
namespace bind {

namespace py = pybind11;

[[noreturn]] inline void bad_arg(const std::string& name, const std::string& msg) {
  throw py::value_error("argument '" + name + "': " + msg);
}

// numpy dtype equality (not identity): gguf-py hands out byte-order-tagged dtypes ('|u1') that equal ours.
inline bool same_dtype(const py::dtype& a, const py::dtype& b) {
  return PyObject_RichCompareBool(a.ptr(), b.ptr(), Py_EQ) == 1;
}

// obj as a numpy array (no conversion), else a ValueError naming the argument.
inline py::array as_array(const py::object& obj, const char* name) {
  if (!py::isinstance<py::array>(obj))
    bad_arg(name, std::string("expected a numpy array, got ") +
                      py::str(py::type::of(obj).attr("__name__")).cast<std::string>());
  return py::reinterpret_borrow<py::array>(obj);
}

// a's shape is `shape` (-1: any size), else a ValueError naming the argument and both shapes.
inline void check_shape(const py::array& a, const char* name, const std::vector<int64_t>& shape) {
  bool ok = a.ndim() == static_cast<py::ssize_t>(shape.size());
  for (size_t i = 0; ok && i < shape.size(); ++i) ok = shape[i] < 0 || a.shape(i) == shape[i];
  if (ok) return;
  std::string want = "[", got = "[";
  for (size_t i = 0; i < shape.size(); ++i)
    want += (i ? ", " : "") + (shape[i] < 0 ? std::string("*") : std::to_string(shape[i]));
  for (py::ssize_t i = 0; i < a.ndim(); ++i) got += (i ? ", " : "") + std::to_string(a.shape(i));
  bad_arg(name, "expected shape " + want + "], got " + got + "] (" + std::to_string(a.ndim()) + "-D)");
}

// dtype, shape (-1: any size; an empty shape: any 2-D array) and C-contiguity, with no implicit
// conversion: a wrong dtype is an error, not a silent copy.
inline py::array checked_array(const py::object& obj, const char* name, const py::dtype& dtype, const char* dtype_name,
                               std::vector<int64_t> shape = {-1, -1}) {
  py::array a = as_array(obj, name);
  if (!same_dtype(a.dtype(), dtype))
    bad_arg(name, std::string("expected dtype ") + dtype_name + ", got " + py::str(a.dtype()).cast<std::string>());
  check_shape(a, name, shape);
  if (!(a.flags() & py::array::c_style)) bad_arg(name, "must be C-contiguous");
  return a;
}

inline WeightType checked_type(int type_id, const char* name = "type_id") {
  if (!weight_type_supported(type_id)) {
    std::string known;
    for (const WeightTypeTraits& w : kWeightTypes)
      known += (known.empty() ? "" : ", ") + std::string(w.name) + "=" + std::to_string(static_cast<int>(w.type));
    bad_arg(name, "unsupported GGML type id " + std::to_string(type_id) + " (expected one of " + known + ")");
  }
  return static_cast<WeightType>(type_id);
}

// "auto" is the best ISA (or KTINJECT_ISA); otherwise a name this CPU and build can run.
inline Isa checked_isa(const std::string& name) {
  try {
    return name == "auto" ? best_isa() : parse_isa(name);
  } catch (const std::invalid_argument& e) {
    bad_arg("isa", e.what());
  }
}

// The shared pool for `threads` workers on `numa_nodes` node groups (0 = all); an impossible request is a
// ValueError.
inline std::shared_ptr<ThreadPool> checked_pool(int threads, int numa_nodes) {
  PoolLayout layout;
  try {
    layout = choose_layout(threads, numa_nodes);
  } catch (const std::invalid_argument& e) {
    throw py::value_error(e.what());
  }
  return ThreadPool::get(layout);
}

inline Activation checked_activation(const std::string& name) {
  static const std::pair<const char*, Activation> kNames[] = {
      {"silu", Activation::Silu},
      {"gelu", Activation::Gelu},
      {"gelu_tanh", Activation::GeluTanh},
      {"relu", Activation::Relu},
      {"relu2", Activation::Relu2},
      {"quick_gelu", Activation::QuickGelu},
      {"gptoss_swiglu", Activation::GptOssSwiglu},
      {"clamped_swiglu", Activation::ClampedSwiglu},
      {"swiglu_clamp_after", Activation::SwigluClampAfter},
      {"softcapped_swiglu", Activation::SoftcappedSwiglu},
  };
  std::string known;
  for (const auto& entry : kNames) {
    if (name == entry.first) return entry.second;
    known += (known.empty() ? "" : ", ") + std::string(entry.first);
  }
  bad_arg("activation", "unknown activation '" + name + "' (expected " + known + ")");
}

// The activation and its parameters, checked: a kind without a gate form must be gated, limits and caps
// finite and positive where the kind uses them.
inline ActParams checked_act_params(const std::string& activation, bool gated, float alpha, float limit,
                                    float softcap_gate, float softcap_up) {
  ActParams p;
  p.kind = checked_activation(activation);
  p.gated = gated;
  p.alpha = alpha;
  p.limit = limit;
  p.softcap_gate = softcap_gate;
  p.softcap_up = softcap_up;
  if (!gated && !activation_is_elementwise(p.kind))
    bad_arg("activation", "'" + activation + "' needs a gate (gated=True)");
  const auto positive = [](float v) { return v > 0.0f && v < 3.0e38f; };
  if ((p.kind == Activation::GptOssSwiglu || p.kind == Activation::ClampedSwiglu ||
       p.kind == Activation::SwigluClampAfter) &&
      !positive(limit))
    bad_arg("limit", "must be finite and > 0 for '" + activation + "', got " + std::to_string(limit));
  if (p.kind == Activation::GptOssSwiglu && !(alpha == alpha && alpha > -3.0e38f && alpha < 3.0e38f))
    bad_arg("alpha", "must be finite, got " + std::to_string(alpha));
  if (p.kind == Activation::SoftcappedSwiglu && !(positive(softcap_gate) && positive(softcap_up)))
    bad_arg("softcap_gate", "softcap_gate and softcap_up must be finite and > 0 for 'softcapped_swiglu'");
  return p;
}

}  // namespace bind
}  // namespace ktinject
