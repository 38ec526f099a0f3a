// The Python-facing CPU attention (bind_attention.cpp binds it as _native.Attention) and the checks of its
// strided cache and mask arguments; shared with the decoder-layer binding.
#pragma once

#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

#include "attention/attention.h"
#include "bind_args.h"
#include "bind_call.h"
#include "bind_linear.h"

namespace ktinject {
namespace bind {

// A possibly strided array (a transformers cache view) of `shape` (-1: any), the last dimension contiguous.
// Returns element strides.
inline std::vector<int64_t> strided_array(const py::array& a, const char* name, const std::vector<int64_t>& shape) {
  check_shape(a, name, shape);
  const py::ssize_t item = a.itemsize();
  std::vector<int64_t> strides;
  for (py::ssize_t i = 0; i < a.ndim(); ++i) {
    if (a.strides(i) < 0 || a.strides(i) % item != 0) bad_arg(name, "strides must be non-negative whole elements");
    strides.push_back(a.strides(i) / item);
  }
  if (a.shape(a.ndim() - 1) > 1 && strides.back() != 1) bad_arg(name, "the last dimension must be contiguous");
  return strides;
}

// Keys or values: float32, or int16 holding bfloat16 bits (numpy has no bfloat16), [B, kv_heads, S, hd].
inline KvView kv_view(const py::object& obj, const char* name, int64_t batch, int64_t kv_heads, int64_t head_dim,
                      int64_t* n_keys) {
  const py::array a = as_array(obj, name);
  const bool f32 = same_dtype(a.dtype(), py::dtype::of<float>());
  const bool bf16 = same_dtype(a.dtype(), py::dtype::of<int16_t>()) || same_dtype(a.dtype(), py::dtype::of<uint16_t>());
  if (!f32 && !bf16)
    bad_arg(name, "expected dtype float32 or int16 (bfloat16 bits), got " + py::str(a.dtype()).cast<std::string>());
  const auto st = strided_array(a, name, {batch, kv_heads, *n_keys < 0 ? -1 : *n_keys, head_dim});
  *n_keys = a.shape(2);
  KvView v;
  v.data = a.data();
  v.bf16 = bf16;
  v.stride_b = st[0];
  v.stride_h = st[1];
  v.stride_s = st[2];
  return v;
}

// A transformers mask as [B or 1, T, S] rows: None (causal), bool (True: attend) or float32 (added).
inline MaskView mask_view(const py::object& mask_obj, int64_t B, int64_t T, int64_t S) {
  MaskView mask;
  if (mask_obj.is_none()) return mask;
  const py::array m = as_array(mask_obj, "mask");
  const bool is_bool = same_dtype(m.dtype(), py::dtype::of<bool>());
  if (!is_bool && !same_dtype(m.dtype(), py::dtype::of<float>()))
    bad_arg("mask", "expected dtype bool or float32, got " + py::str(m.dtype()).cast<std::string>());
  if (m.ndim() != 3 || (m.shape(0) != B && m.shape(0) != 1))
    bad_arg("mask", "expected shape [batch or 1, tokens, keys]");
  const auto st = strided_array(m, "mask", {m.shape(0), T, S});
  mask.stride_b = m.shape(0) == 1 ? 0 : st[0];
  mask.stride_t = st[1];
  if (is_bool)
    mask.allow = static_cast<const uint8_t*>(m.data());
  else
    mask.add = static_cast<const float*>(m.data());
  return mask;
}

// Keys and values of the cache for q [B, T, heads * head_dim]; checks that the cache holds the new tokens.
inline int64_t cache_views(const py::object& k_obj, const py::object& v_obj, int64_t B, int64_t T, int64_t kv_heads,
                           int64_t head_dim, KvView* keys, KvView* values) {
  int64_t S = -1;
  *keys = kv_view(k_obj, "keys", B, kv_heads, head_dim, &S);
  *values = kv_view(v_obj, "values", B, kv_heads, head_dim, &S);
  if (S < T)
    bad_arg("keys",
            "the cache holds " + std::to_string(S) + " keys, fewer than the " + std::to_string(T) + " new tokens");
  return S;
}

// The whole cache buffers a step appends to ([B, kv_heads, capacity, head_dim], writeable), with room for T
// new tokens after n_past.
inline void step_buffers(const py::object& k_obj, const py::object& v_obj, int64_t B, int64_t T, int64_t kv_heads,
                         int64_t head_dim, int64_t n_past, KvView* keys, KvView* values) {
  int64_t capacity = -1;
  *keys = kv_view(k_obj, "keys", B, kv_heads, head_dim, &capacity);
  *values = kv_view(v_obj, "values", B, kv_heads, head_dim, &capacity);
  if (!as_array(k_obj, "keys").writeable()) bad_arg("keys", "must be writeable");
  if (!as_array(v_obj, "values").writeable()) bad_arg("values", "must be writeable");
  if (n_past < 0 || n_past > capacity - T)
    bad_arg("n_past", "the cache buffers hold " + std::to_string(capacity) + " positions: no room for " +
                          std::to_string(T) + " new tokens after " + std::to_string(n_past));
}

inline std::vector<float> norm_weights(const py::object& obj, const char* name, int64_t head_dim) {
  if (obj.is_none()) return {};
  const py::array w = checked_array(obj, name, py::dtype::of<float>(), "float32", {head_dim});
  const auto* p = static_cast<const float*>(w.data());
  return std::vector<float>(p, p + head_dim);
}

inline py::array out_array(const py::object& obj, const char* name, std::vector<int64_t> shape) {
  py::array a = checked_array(obj, name, py::dtype::of<float>(), "float32", std::move(shape));
  if (!a.writeable()) bad_arg(name, "must be writeable");
  return a;
}

// Starts a composite call (ValueError if its layers are not ready), waits interruptibly, ends it.
template <typename Call, typename Submit>
void run_call(Call& call, Submit submit) {
  try {
    py::gil_scoped_release release;  // start() waits for the pool's job in flight
    submit();
  } catch (const std::invalid_argument& e) {
    throw py::value_error(e.what());
  }
  finish_interruptibly(call);
  py::gil_scoped_release release;
  call.finish_all();
}

// cos/sin [T, rot] float32 (both None: no rotary embedding); rot even and <= head_dim.
struct Rotary {
  py::array c, s;
  const float* cos = nullptr;
  const float* sin = nullptr;
  int64_t rot = 0;
  Rotary(const py::object& cos_obj, const py::object& sin_obj, int64_t T, int64_t head_dim) {
    if (cos_obj.is_none() && sin_obj.is_none()) return;
    c = checked_array(cos_obj, "cos", py::dtype::of<float>(), "float32", {T, -1});
    rot = c.shape(1);
    s = checked_array(sin_obj, "sin", py::dtype::of<float>(), "float32", {T, rot});
    if (rot % 2 != 0 || rot > head_dim)
      bad_arg("cos",
              "rotary width " + std::to_string(rot) + " must be even and <= head_dim " + std::to_string(head_dim));
    cos = static_cast<const float*>(c.data());
    sin = static_cast<const float*>(s.data());
  }
};

// The q/k/v outputs of a projection: float32 [T, heads * head_dim] and [T, kv_heads * head_dim].
struct QkvOut {
  py::array qa, ka, va;
  float *q, *k, *v;
  QkvOut(const py::object& q_obj, const py::object& k_obj, const py::object& v_obj, int64_t T, const AttentionSpec& s)
      : qa(out_array(q_obj, "q", {T, s.heads * s.head_dim})),
        ka(out_array(k_obj, "k", {T, s.kv_heads * s.head_dim})),
        va(out_array(v_obj, "v", {T, s.kv_heads * s.head_dim})),
        q(static_cast<float*>(qa.mutable_data())),
        k(static_cast<float*>(ka.mutable_data())),
        v(static_cast<float*>(va.mutable_data())) {}
};

class PyAttention {
 public:
  PyAttention(py::object q, py::object k, py::object v, py::object o, int64_t hidden, int64_t heads, int64_t kv_heads,
              int64_t head_dim, float scale, const py::object& q_norm, const py::object& k_norm, float norm_eps)
      : projections_{q, k, v, o} {
    const char* names[] = {"q_proj", "k_proj", "v_proj", "o_proj"};
    LinearLayer* layers[4];
    for (int i = 0; i < 4; ++i) {
      if (!py::isinstance<PyLinear>(projections_[i])) bad_arg(names[i], "expected a _native.Linear");
      layers[i] = &projections_[i].cast<PyLinear&>().layer();
    }
    AttentionSpec spec;
    spec.hidden = hidden;
    spec.heads = heads;
    spec.kv_heads = kv_heads;
    spec.head_dim = head_dim;
    spec.scale = scale;
    spec.norm_eps = norm_eps;
    auto qn = norm_weights(q_norm, "q_norm", head_dim), kn = norm_weights(k_norm, "k_norm", head_dim);
    try {
      layer_ = std::make_unique<AttentionLayer>(spec, *layers[0], *layers[1], *layers[2], *layers[3], std::move(qn),
                                                std::move(kn));
    } catch (const std::invalid_argument& e) {
      throw py::value_error(e.what());
    }
  }

  void project(const py::object& x_obj, const py::object& cos_obj, const py::object& sin_obj, const py::object& q_obj,
               const py::object& k_obj, const py::object& v_obj) {
    const AttentionSpec& s = layer_->spec();
    const py::array x = checked_array(x_obj, "x", py::dtype::of<float>(), "float32", {-1, s.hidden});
    const int64_t T = x.shape(0);
    const Rotary r(cos_obj, sin_obj, T, s.head_dim);
    const QkvOut o(q_obj, k_obj, v_obj, T, s);
    ProjectCall call(*layer_, static_cast<const float*>(x.data()), T, r.cos, r.sin, r.rot, o.q, o.k, o.v);
    run_call(call, [&] { layer_->submit(call); });
  }

  void attend(const py::object& q_obj, const py::object& k_obj, const py::object& v_obj, const py::object& mask_obj,
              const py::object& out_obj) {
    const AttentionSpec& s = layer_->spec();
    const int64_t width = s.heads * s.head_dim;
    const py::array q = checked_array(q_obj, "q", py::dtype::of<float>(), "float32", {-1, -1, width});
    const int64_t B = q.shape(0), T = q.shape(1);
    KvView keys, values;
    const int64_t S = cache_views(k_obj, v_obj, B, T, s.kv_heads, s.head_dim, &keys, &values);
    const MaskView mask = mask_view(mask_obj, B, T, S);
    py::array out = out_array(out_obj, "out", {B, T, s.hidden});
    std::vector<float> ctx(static_cast<size_t>(B * T * width));
    AttendCall call(*layer_, static_cast<const float*>(q.data()), B, T, keys, values, S, mask, ctx.data(),
                    static_cast<float*>(out.mutable_data()));
    run_call(call, [&] { layer_->submit(call); });
  }

  void step(const py::object& x_obj, const py::object& cos_obj, const py::object& sin_obj, const py::object& k_obj,
            const py::object& v_obj, int64_t n_past, const py::object& mask_obj, const py::object& out_obj) {
    const AttentionSpec& s = layer_->spec();
    const py::array x = checked_array(x_obj, "x", py::dtype::of<float>(), "float32", {-1, -1, s.hidden});
    const int64_t B = x.shape(0), T = x.shape(1);
    py::array out = out_array(out_obj, "out", {B, T, s.hidden});
    const Rotary r(cos_obj, sin_obj, B * T, s.head_dim);
    KvView keys, values;
    step_buffers(k_obj, v_obj, B, T, s.kv_heads, s.head_dim, n_past, &keys, &values);
    const MaskView mask = mask_view(mask_obj, B, T, n_past + T);
    AttentionStepCall call(*layer_, static_cast<const float*>(x.data()), B, T, r.cos, r.sin, r.rot, keys, values,
                           n_past, mask, static_cast<float*>(out.mutable_data()));
    run_call(call, [&] { layer_->submit(call); });
  }

  AttentionLayer& layer() { return *layer_; }

 private:
  py::object projections_[4];  // keeps the linear layers alive
  std::unique_ptr<AttentionLayer> layer_;
};

}  // namespace bind
}  // namespace ktinject
