// Argument checking shared by the Python bindings: every bad argument becomes a ValueError that names it.
// The C++ layers below trust their inputs, so this is the one place where Python input is validated.
#pragma once

#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

#include "quant/kernels.h"

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

// dtype, shape (-1: any size; an empty shape: any 2-D array) and C-contiguity, with no implicit
// conversion: a wrong dtype is an error, not a silent copy.
inline py::array checked_array(const py::object& obj, const char* name, const py::dtype& dtype, const char* dtype_name,
                               std::vector<int64_t> shape = {-1, -1}) {
  if (!py::isinstance<py::array>(obj))
    bad_arg(name, std::string("expected a numpy array, got ") + py::str(py::type::of(obj).attr("__name__")).cast<std::string>());
  py::array a = py::reinterpret_borrow<py::array>(obj);
  if (!same_dtype(a.dtype(), dtype))
    bad_arg(name, std::string("expected dtype ") + dtype_name + ", got " + py::str(a.dtype()).cast<std::string>());
  bool ok = a.ndim() == static_cast<py::ssize_t>(shape.size());
  for (size_t i = 0; ok && i < shape.size(); ++i) ok = shape[i] < 0 || a.shape(i) == shape[i];
  if (!ok) {
    std::string want = "[", got = "[";
    for (size_t i = 0; i < shape.size(); ++i) want += (i ? ", " : "") + (shape[i] < 0 ? std::string("*") : std::to_string(shape[i]));
    for (py::ssize_t i = 0; i < a.ndim(); ++i) got += (i ? ", " : "") + std::to_string(a.shape(i));
    bad_arg(name, "expected shape " + want + "], got " + got + "] (" + std::to_string(a.ndim()) + "-D)");
  }
  if (!(a.flags() & py::array::c_style)) bad_arg(name, "must be C-contiguous");
  return a;
}

inline WeightType checked_type(int type_id, const char* name = "type_id") {
  if (!weight_type_supported(type_id))
    bad_arg(name, "unsupported GGML type id " + std::to_string(type_id) +
                      " (expected one of f32=0, f16=1, q8_0=8, q4_k=12, q5_k=13, q6_k=14, bf16=30)");
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

inline Activation checked_activation(const std::string& name) {
  if (name == "silu") return Activation::Silu;
  if (name == "gelu") return Activation::Gelu;
  if (name == "gelu_tanh") return Activation::GeluTanh;
  if (name == "relu") return Activation::Relu;
  if (name == "gptoss_swiglu") return Activation::GptOssSwiglu;
  bad_arg("activation", "unknown activation '" + name + "' (expected silu, gelu, gelu_tanh, relu, gptoss_swiglu)");
}

}  // namespace bind
}  // namespace ktinject
