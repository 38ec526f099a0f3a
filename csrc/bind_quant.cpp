// Python bindings of the quant kernel layer (csrc/quant/kernels.h): quantize / dequantize GGUF rows and
// run one gemm, for tests, benchmarks and the Python operator's weight conversion. Every argument is
// checked here (the kernels trust their callers) and bad ones raise ValueError naming the argument.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <algorithm>
#include <stdexcept>
#include <string>
#include <vector>

#include "bind_args.h"
#include "quant/kernels.h"

namespace py = pybind11;

namespace ktinject {
namespace {

using namespace bind;

void check_cols(WeightType t, int64_t cols, const char* name) {
  const int be = col_granularity(t);
  if (cols <= 0 || cols % be != 0)
    bad_arg(name, "must be a positive multiple of " + std::to_string(be) + " for " + weight_type_name(t) + ", got " +
                      std::to_string(cols));
}

py::array_t<uint8_t> py_quantize(int type_id, const py::object& x_obj) {
  const WeightType t = checked_type(type_id);
  const py::array x = checked_array(x_obj, "x", py::dtype::of<float>(), "float32");
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
  py::array blocks = checked_array(obj, "blocks", py::dtype::of<uint8_t>(), "uint8");
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

// Aligned scratch for activation rows (kernels read them with vector loads).
struct ActRows {
  std::vector<uint8_t> storage;
  std::vector<const uint8_t*> ptrs;
  size_t stride = 0;
  uint8_t* row(int64_t i) { return const_cast<uint8_t*>(ptrs[i]); }
  ActRows(WeightType t, int64_t n, int64_t cols) : stride(act_row_bytes(t, cols)) {
    storage.assign(static_cast<size_t>(n) * stride + 64, 0);
    uint8_t* base = storage.data() + ((64 - reinterpret_cast<uintptr_t>(storage.data()) % 64) % 64);
    for (int64_t i = 0; i < n; ++i) ptrs.push_back(base + i * stride);
  }
};

py::array_t<uint8_t> py_pack(int type_id, const py::object& blocks_obj, int64_t cols) {
  const WeightType t = checked_type(type_id);
  const py::array blocks = check_blocks(t, blocks_obj, cols);
  const int64_t rows = blocks.shape(0);
  py::array_t<uint8_t> out(static_cast<py::ssize_t>(packed_bytes(t, rows, cols)));
  const uint8_t* src = static_cast<const uint8_t*>(blocks.data());
  uint8_t* dst = out.mutable_data();
  {
    py::gil_scoped_release release;
    pack_tiles(t, src, row_bytes(t, cols), rows, cols, 0, num_tiles(rows), dst);
  }
  return out;
}

py::array_t<uint8_t> py_unpack(int type_id, const py::array_t<uint8_t, py::array::c_style>& packed, int64_t rows,
                               int64_t cols) {
  const WeightType t = checked_type(type_id);
  check_cols(t, cols, "cols");
  if (rows < 0) bad_arg("rows", "must be >= 0");
  if (static_cast<size_t>(packed.size()) != packed_bytes(t, rows, cols))
    bad_arg("packed", "expected " + std::to_string(packed_bytes(t, rows, cols)) + " bytes for " + std::to_string(rows) +
                          " x " + std::to_string(cols) + " " + weight_type_name(t) + ", got " +
                          std::to_string(packed.size()));
  const size_t rb = row_bytes(t, cols);
  py::array_t<uint8_t> out({static_cast<py::ssize_t>(rows), static_cast<py::ssize_t>(rb)});
  for (int64_t r = 0; r < rows; ++r) unpack_row(t, packed.data(), cols, r, out.mutable_data() + r * rb);
  return out;
}

py::array_t<uint8_t> py_quantize_activation(int type_id, const std::string& isa_name, const py::object& x_obj) {
  const WeightType t = checked_type(type_id);
  const Isa isa = checked_isa(isa_name);
  const py::array x = checked_array(x_obj, "x", py::dtype::of<float>(), "float32");
  const int64_t n = x.shape(0), cols = x.shape(1);
  check_cols(t, cols, "x.shape[1]");
  const size_t stride = act_row_bytes(t, cols);
  py::array_t<uint8_t> out({static_cast<py::ssize_t>(n), static_cast<py::ssize_t>(stride)});
  std::fill(out.mutable_data(), out.mutable_data() + out.size(), 0);
  ActRows rows(t, n, cols);
  const float* xs = static_cast<const float*>(x.data());
  for (int64_t i = 0; i < n; ++i) {
    quantize_act_cols(isa, t, xs + i * cols, cols, 0, cols, rows.row(i));
    std::copy(rows.row(i), rows.row(i) + stride, out.mutable_data() + i * stride);
  }
  return out;
}

py::array_t<float> py_gemm(int type_id, const std::string& isa_name, const py::object& W_obj, const py::object& x_obj,
                           int64_t tile0, int64_t n_tiles, const py::object& out_obj, const py::object& scale_obj) {
  const WeightType t = checked_type(type_id);
  const Isa isa = checked_isa(isa_name);
  const py::array x = checked_array(x_obj, "x", py::dtype::of<float>(), "float32");
  const int64_t n_tokens = x.shape(0), cols = x.shape(1);
  check_cols(t, cols, "x.shape[1]");
  const py::array W = check_blocks(t, W_obj, cols);
  const int64_t rows = W.shape(0), tiles = num_tiles(rows);
  if (tile0 < 0 || tile0 > tiles)
    bad_arg("tile0", "must be in [0, " + std::to_string(tiles) + "], got " + std::to_string(tile0));
  if (n_tiles < 0) n_tiles = tiles - tile0;
  if (n_tiles > tiles - tile0)
    bad_arg("n_tiles", "tile0 + n_tiles exceeds the " + std::to_string(tiles) + " tiles of W");
  py::array_t<float> out;
  if (out_obj.is_none()) {
    out = py::array_t<float>({static_cast<py::ssize_t>(n_tokens), static_cast<py::ssize_t>(rows)});
    std::fill(out.mutable_data(), out.mutable_data() + out.size(), 0.0f);
  } else {
    out = py::reinterpret_borrow<py::array_t<float>>(checked_array(out_obj, "out", py::dtype::of<float>(), "float32"));
    if (out.shape(0) != n_tokens || out.shape(1) != rows) bad_arg("out", "must be [tokens, W rows]");
  }
  std::vector<float> scale;
  if (!scale_obj.is_none()) {
    scale = scale_obj.cast<std::vector<float>>();
    if (static_cast<int64_t>(scale.size()) != n_tokens) bad_arg("scale", "needs one value per token");
  }
  std::vector<uint8_t> packed_storage(packed_bytes(t, rows, cols) + 64);
  uint8_t* packed = packed_storage.data() + ((64 - reinterpret_cast<uintptr_t>(packed_storage.data()) % 64) % 64);
  const float* xs = static_cast<const float*>(x.data());
  const uint8_t* w = static_cast<const uint8_t*>(W.data());
  float* o = out.mutable_data();
  {
    py::gil_scoped_release release;
    pack_tiles(t, w, row_bytes(t, cols), rows, cols, 0, tiles, packed);
    ActRows act(t, n_tokens, cols);
    std::vector<float*> out_rows;
    for (int64_t i = 0; i < n_tokens; ++i) {
      quantize_act_cols(isa, t, xs + i * cols, cols, 0, cols, act.row(i));
      out_rows.push_back(o + i * rows);
    }
    const GemmOut go{out_rows.data(), tile0 * kTileRows, scale.empty() ? nullptr : scale.data()};
    gemm(isa, t, packed, rows, cols, tile0, n_tiles, act.ptrs.data(), n_tokens, go);
  }
  return out;
}

// Runs gemm on weights packed by py_pack and activations from py_quantize_activation (benchmarks time
// the kernel alone this way).
void py_gemm_packed(int type_id, const std::string& isa_name, const py::array_t<uint8_t, py::array::c_style>& packed,
                    int64_t rows, int64_t cols, const py::array_t<uint8_t, py::array::c_style>& act,
                    py::array_t<float, py::array::c_style>& out) {
  const WeightType t = checked_type(type_id);
  const Isa isa = checked_isa(isa_name);
  check_cols(t, cols, "cols");
  if (static_cast<size_t>(packed.size()) != packed_bytes(t, rows, cols))
    bad_arg("packed", "size does not match rows x cols");
  if (act.ndim() != 2 || static_cast<size_t>(act.shape(1)) != act_row_bytes(t, cols))
    bad_arg("act", "rows of the wrong size");
  const int64_t n = act.shape(0);
  if (out.ndim() != 2 || out.shape(0) != n || out.shape(1) != rows) bad_arg("out", "must be float32 [tokens, rows]");
  if (reinterpret_cast<uintptr_t>(act.data()) % 64 != 0) bad_arg("act", "must be 64-byte aligned");
  std::vector<const uint8_t*> a;
  std::vector<float*> o;
  for (int64_t i = 0; i < n; ++i) {
    a.push_back(act.data() + i * act.shape(1));
    o.push_back(out.mutable_data() + i * rows);
  }
  py::gil_scoped_release release;
  gemm(isa, t, packed.data(), rows, cols, 0, num_tiles(rows), a.data(), n, GemmOut{o.data(), 0, nullptr});
}

py::array_t<float> py_activate(const std::string& isa_name, const std::string& kind, const py::object& gate_obj,
                               const py::array_t<float, py::array::c_style>& up, float alpha, float limit,
                               float softcap_gate, float softcap_up) {
  const Isa isa = checked_isa(isa_name);
  const bool gated = !gate_obj.is_none();
  const ActParams p = checked_act_params(kind, gated, alpha, limit, softcap_gate, softcap_up);
  py::array_t<float> out(up.size());
  if (gated) {
    const auto gate = gate_obj.cast<py::array_t<float, py::array::c_style>>();
    if (gate.size() != up.size()) bad_arg("up", "must have as many elements as gate");
    std::copy(gate.data(), gate.data() + gate.size(), out.mutable_data());
    activate(isa, p, out.mutable_data(), up.data(), up.size());
  } else {
    std::copy(up.data(), up.data() + up.size(), out.mutable_data());
    activate(isa, p, out.mutable_data(), nullptr, up.size());
  }
  return out;
}

}  // namespace

void bind_quant(py::module_& m) {
  m.def("quantize", &py_quantize, py::arg("type_id"), py::arg("x"),
        "float32 [rows, cols] -> uint8 [rows, row_bytes] GGUF blocks of GGML type `type_id`.");
  m.def("dequantize", &py_dequantize, py::arg("type_id"), py::arg("blocks"), py::arg("cols"),
        "uint8 [rows, row_bytes] GGUF blocks -> float32 [rows, cols] (bit-exact with gguf-py).");
  m.def("pack", &py_pack, py::arg("type_id"), py::arg("blocks"), py::arg("cols"),
        "uint8 [rows, row_bytes] GGUF blocks -> the packed tile layout the kernels read (1-D uint8, same size "
        "up to padding the rows to a multiple of 16).");
  m.def("unpack", &py_unpack, py::arg("type_id"), py::arg("packed"), py::arg("rows"), py::arg("cols"),
        "Inverse of pack: the GGUF blocks back, uint8 [rows, row_bytes].");
  m.def("quantize_activation", &py_quantize_activation, py::arg("type_id"), py::arg("isa"), py::arg("x"),
        "float32 [T, cols] -> the activation rows the kernels of weight type `type_id` read (uint8 [T, bytes]).");
  m.def("gemm", &py_gemm, py::arg("type_id"), py::arg("isa"), py::arg("W"), py::arg("x"), py::kw_only(),
        py::arg("tile0") = 0, py::arg("n_tiles") = -1, py::arg("out") = py::none(), py::arg("scale") = py::none(),
        "x float32 [T, cols] . W.T -> float32 [T, rows] through the kernels (pack W, quantize x, gemm) on one "
        "thread of ISA `isa` ('scalar' | 'avx2' | 'avx512'). With tile0/n_tiles only those 16-row tiles are "
        "computed; with scale (one per token) the result is accumulated into out as out += scale * value.");
  m.def("gemm_packed", &py_gemm_packed, py::arg("type_id"), py::arg("isa"), py::arg("packed"), py::arg("rows"),
        py::arg("cols"), py::arg("act"), py::arg("out"),
        "The kernel alone: packed weights (from pack) . activation rows (from quantize_activation, 64-byte "
        "aligned) -> out float32 [tokens, rows]. For benchmarks.");
  m.def("activate", &py_activate, py::arg("isa"), py::arg("activation"), py::arg("gate"), py::arg("up"),
        py::arg("alpha") = 1.702f, py::arg("limit") = 7.0f, py::arg("softcap_gate") = 0.0f,
        py::arg("softcap_up") = 0.0f,
        "The experts' activation as the CPU operator computes it (float32, 1-D): gated with gate given, act(up) "
        "with gate=None.");
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
        for (const WeightTypeTraits& w : kWeightTypes) d[w.name] = static_cast<int>(w.type);
        return d;
      },
      "Weight types of the CPU kernels: name -> GGML type id.");
  m.def(
      "weight_type_traits",
      []() {
        py::dict d;
        for (const WeightTypeTraits& w : kWeightTypes) {
          py::dict row;
          row["id"] = static_cast<int>(w.type);
          row["block_elems"] = w.block_elems;
          row["block_bytes"] = w.block_bytes;
          row["col_granularity"] = w.col_granularity;
          row["act_block_elems"] = act_format_block_elems(w.act);
          d[w.name] = row;
        }
        return d;
      },
      "The CPU kernels' weight-type table (csrc/quant/weight_types.h): name -> {id, block_elems, block_bytes, "
      "col_granularity (a row's column count must be a multiple of it), act_block_elems}.");
}

}  // namespace ktinject
