// Python bindings of the quant kernel layer (csrc/quant/kernels.h): quantize / dequantize GGUF rows and
// run one gemm, for tests, benchmarks and the Python operator's weight conversion. Every argument is
// checked here (the kernels trust their callers) and bad ones raise ValueError naming the argument.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <algorithm>
#include <stdexcept>
#include <string>
#include <vector>

#include "quant/kernels.h"

namespace py = pybind11;

namespace ktinject {
namespace {

[[noreturn]] void bad_arg(const std::string& name, const std::string& msg) {
  throw py::value_error("argument '" + name + "': " + msg);
}

WeightType checked_type(int type_id) {
  if (!weight_type_supported(type_id))
    bad_arg("type_id", "unsupported GGML type id " + std::to_string(type_id) +
                           " (expected one of f32=0, f16=1, q8_0=8, q4_k=12, q5_k=13, q6_k=14, bf16=30)");
  return static_cast<WeightType>(type_id);
}

void check_cols(WeightType t, int64_t cols, const char* name) {
  const int be = block_elems(t);
  if (cols <= 0 || cols % be != 0)
    bad_arg(name, "must be a positive multiple of " + std::to_string(be) + " for " + weight_type_name(t) +
                      ", got " + std::to_string(cols));
}

// Checks dtype, ndim and C-contiguity of an array passed as py::array (no implicit conversion, so a
// wrong dtype is an error rather than a silent copy).
py::array check_array(const py::object& obj, const char* name, const py::dtype& dtype, const char* dtype_name) {
  if (!py::isinstance<py::array>(obj))
    bad_arg(name, std::string("expected a numpy array, got ") + py::str(py::type::of(obj).attr("__name__")).cast<std::string>());
  py::array a = py::reinterpret_borrow<py::array>(obj);
  if (!a.dtype().is(dtype)) bad_arg(name, std::string("expected dtype ") + dtype_name + ", got " + py::str(a.dtype()).cast<std::string>());
  if (a.ndim() != 2) bad_arg(name, "expected a 2-D array, got " + std::to_string(a.ndim()) + "-D");
  if (!(a.flags() & py::array::c_style)) bad_arg(name, "must be C-contiguous");
  return a;
}

Isa checked_isa(const std::string& name) {
  try {
    return parse_isa(name);
  } catch (const std::invalid_argument& e) {
    bad_arg("isa", e.what());
  }
}

py::array_t<uint8_t> py_quantize(int type_id, const py::object& x_obj) {
  const WeightType t = checked_type(type_id);
  const py::array x = check_array(x_obj, "x", py::dtype::of<float>(), "float32");
  const int64_t rows = x.shape(0), cols = x.shape(1);
  check_cols(t, cols, "x.shape[1]");
  const size_t rb = row_bytes(t, cols);
  py::array_t<uint8_t> out({static_cast<py::ssize_t>(rows), static_cast<py::ssize_t>(rb)});
  const float* src = static_cast<const float*>(x.data());
  uint8_t* dst = out.mutable_data();
  {
    py::gil_scoped_release release;
    quantize_weights(t, src, rows, cols, dst);
  }
  return out;
}

py::array check_blocks(WeightType t, const py::object& obj, int64_t cols) {
  py::array blocks = check_array(obj, "blocks", py::dtype::of<uint8_t>(), "uint8");
  check_cols(t, cols, "cols");
  const size_t rb = row_bytes(t, cols);
  if (static_cast<size_t>(blocks.shape(1)) != rb)
    bad_arg("blocks", "expected " + std::to_string(rb) + " bytes per row (" + std::to_string(cols) + " " +
                          weight_type_name(t) + " columns), got " + std::to_string(blocks.shape(1)));
  return blocks;
}

py::array_t<float> py_dequantize(int type_id, const py::object& blocks_obj, int64_t cols) {
  const WeightType t = checked_type(type_id);
  const py::array blocks = check_blocks(t, blocks_obj, cols);
  const int64_t rows = blocks.shape(0);
  const size_t rb = row_bytes(t, cols);
  py::array_t<float> out({static_cast<py::ssize_t>(rows), static_cast<py::ssize_t>(cols)});
  const uint8_t* src = static_cast<const uint8_t*>(blocks.data());
  float* dst = out.mutable_data();
  {
    py::gil_scoped_release release;
    for (int64_t r = 0; r < rows; ++r) dequantize_row(t, src + r * rb, cols, dst + r * cols);
  }
  return out;
}

py::array_t<float> py_gemm_reference(int type_id, const std::string& isa_name, const py::object& W_obj,
                                     const py::object& x_obj, int64_t row0, int64_t n_rows) {
  const WeightType t = checked_type(type_id);
  const Isa isa = checked_isa(isa_name);
  const py::array x = check_array(x_obj, "x", py::dtype::of<float>(), "float32");
  const int64_t n_tokens = x.shape(0), cols = x.shape(1);
  check_cols(t, cols, "x.shape[1]");
  const py::array W = check_array(W_obj, "W", py::dtype::of<uint8_t>(), "uint8");
  const size_t rb = row_bytes(t, cols);
  if (static_cast<size_t>(W.shape(1)) != rb)
    bad_arg("W", "expected " + std::to_string(rb) + " bytes per row to match x.shape[1]=" + std::to_string(cols) +
                     " for " + weight_type_name(t) + ", got " + std::to_string(W.shape(1)));
  const int64_t rows = W.shape(0);
  if (row0 < 0 || row0 > rows) bad_arg("row0", "must be in [0, " + std::to_string(rows) + "], got " + std::to_string(row0));
  if (n_rows < 0) n_rows = rows - row0;
  if (n_rows > rows - row0)
    bad_arg("n_rows", "row0 + n_rows = " + std::to_string(row0 + n_rows) + " exceeds W's " + std::to_string(rows) + " rows");
  py::array_t<float> out({static_cast<py::ssize_t>(n_tokens), static_cast<py::ssize_t>(rows)});
  std::fill(out.mutable_data(), out.mutable_data() + out.size(), 0.0f);
  const float* xs = static_cast<const float*>(x.data());
  const uint8_t* w = static_cast<const uint8_t*>(W.data());
  float* o = out.mutable_data();
  {
    py::gil_scoped_release release;
    const size_t ab = act_row_bytes(t, cols);
    std::vector<uint8_t> storage(static_cast<size_t>(n_tokens) * ab + 64);
    uint8_t* act = storage.data() + ((64 - reinterpret_cast<uintptr_t>(storage.data()) % 64) % 64);
    quantize_act(isa, t, xs, n_tokens, cols, act);
    gemm(isa, t, w, row0, n_rows, cols, act, n_tokens, o + row0, rows);
  }
  return out;
}

}  // namespace

void bind_quant(py::module_& m) {
  m.def("quantize", &py_quantize, py::arg("type_id"), py::arg("x"),
        "float32 [rows, cols] -> uint8 [rows, row_bytes] GGUF blocks of GGML type `type_id`.");
  m.def("dequantize", &py_dequantize, py::arg("type_id"), py::arg("blocks"), py::arg("cols"),
        "uint8 [rows, row_bytes] GGUF blocks -> float32 [rows, cols] (bit-exact with gguf-py).");
  m.def("gemm_reference", &py_gemm_reference, py::arg("type_id"), py::arg("isa"), py::arg("W"), py::arg("x"),
        py::kw_only(), py::arg("row0") = 0, py::arg("n_rows") = -1,
        "x float32 [T, cols] @ W.T -> float32 [T, rows] through the kernels: quantize_act + gemm on one "
        "thread of ISA `isa` ('scalar' | 'avx2' | 'avx512'). GIL released. With row0/n_rows only those W "
        "rows are computed (the other output columns stay 0), exercising the row offset and output stride.");
  m.def(
      "row_bytes",
      [](int type_id, int64_t cols) {
        const WeightType t = checked_type(type_id);
        check_cols(t, cols, "cols");
        return row_bytes(t, cols);
      },
      py::arg("type_id"), py::arg("cols"), "Bytes of one row of `cols` weights of GGML type `type_id`.");
  m.def(
      "best_isa",
      []() {
        try {
          return std::string(isa_name(best_isa()));
        } catch (const std::invalid_argument& e) {
          throw py::value_error(std::string("KTINJECT_ISA: ") + e.what());
        }
      },
      "Kernel family used by default: 'avx512' | 'avx2' | 'scalar' (KTINJECT_ISA forces a lower one).");
  m.def(
      "available_isas",
      []() {
        py::list l;
        for (Isa i : {Isa::Scalar, Isa::Avx2, Isa::Avx512})
          if (isa_available(i)) l.append(isa_name(i));
        return l;
      },
      "Kernel families this CPU and build can run, lowest first.");
  m.def(
      "supported_weight_types",
      []() {
        py::dict d;
        for (WeightType t : {WeightType::F32, WeightType::F16, WeightType::BF16, WeightType::Q8_0, WeightType::Q4_K,
                             WeightType::Q5_K, WeightType::Q6_K})
          d[weight_type_name(t)] = static_cast<int>(t);
        return d;
      },
      "Weight types of the CPU kernels: name -> GGML type id.");
}

}  // namespace ktinject
