"""Marlin int4 weights for ``marlin_linear`` (the operator itself is ``operators/marlin_linear.py``).

- ``format``: the packed layout in pure torch (quantize, pack/unpack, GPTQ repacking, padding, reference GEMM);
  the bit-exact definition every kernel is tested against.
- ``backends``: the ways to multiply by a packed weight and the logged fallback order between them.
- ``cuda_kernel`` (our CUDA kernel, ``csrc/cuda``, through ctypes), ``triton_kernel``, ``torch_int4``
  (torch's tinygemm after a one-time conversion): the kernels the backends call, each imported lazily.
"""
