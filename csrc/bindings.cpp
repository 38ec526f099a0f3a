// The ktinject._native module. Each concept registers its own bindings (bind_*.cpp) so that kernel
// work can add files without touching the others.
#include <pybind11/pybind11.h>

namespace ktinject {
void bind_system(pybind11::module_& m);
void bind_quant(pybind11::module_& m);
void bind_moe(pybind11::module_& m);
void bind_linear(pybind11::module_& m);
void bind_attention(pybind11::module_& m);
void bind_router_norm(pybind11::module_& m);
void bind_decoder_layer(pybind11::module_& m);
}  // namespace ktinject

PYBIND11_MODULE(_native, m) {
  m.doc() = "ktinject native kernels (CPU features, NUMA topology, CPU MoE and linear layers)";
  ktinject::bind_system(m);
  ktinject::bind_quant(m);
  ktinject::bind_moe(m);
  ktinject::bind_linear(m);
  ktinject::bind_attention(m);
  ktinject::bind_router_norm(m);
  ktinject::bind_decoder_layer(m);
}
