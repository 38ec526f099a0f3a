"""Our CUDA Marlin kernel (``csrc/cuda/marlin_gemm.cu``), loaded with ctypes.

The library is plain C on raw device pointers (``csrc/cuda/marlin_gemm.h``), so nothing here compiles at import
time and no torch headers are involved: the build is CMake's (the top-level build when nvcc and a CUDA torch
are present, or ``benchmarks/run_gpu.sh``), and this module only finds, checks and calls it. The library is
looked up at ``$KTINJECT_MARLIN_LIB``, else next to this file (where the wheel installs it) and at
``build/cuda/`` in the source tree (where ``run_gpu.sh`` builds it); see :func:`library_candidates`.
"""

from __future__ import annotations

import ctypes
import functools
import os
import sys
import threading
from pathlib import Path

import torch

LIBRARY_NAME = "libktinject_marlin.so"
ENV_VAR = "KTINJECT_MARLIN_LIB"
ABI_VERSION = 1  # KTINJECT_MARLIN_ABI_VERSION in marlin_gemm.h
_DTYPES = {torch.float16: 0, torch.bfloat16: 1}


def library_candidates() -> list[Path]:
    """Where the library is looked for, first match wins (``$KTINJECT_MARLIN_LIB`` alone when it is set).

    Next to this file (a wheel), ``ktinject/operators/marlin/`` under each ``sys.path`` entry (an editable install keeps
    built files in site-packages while this file stays in the source tree), then ``build/cuda`` of the tree.
    """
    override = os.environ.get(ENV_VAR)
    if override:
        return [Path(override)]
    here = Path(__file__).resolve().parent
    candidates = [here / LIBRARY_NAME]
    candidates += [Path(entry) / "ktinject" / "operators" / "marlin" / LIBRARY_NAME for entry in sys.path if entry]
    candidates.append(here.parents[1] / "build" / "cuda" / LIBRARY_NAME)
    return list(dict.fromkeys(candidates))


class MarlinCudaLibrary:
    """The loaded library: argument checking on the Python side, one zeroed workspace per (device, stream)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        lib = ctypes.CDLL(str(path))
        lib.ktinject_marlin_abi_version.restype = ctypes.c_int
        lib.ktinject_marlin_abi_version.argtypes = []
        lib.ktinject_marlin_workspace_bytes.restype = ctypes.c_int
        lib.ktinject_marlin_workspace_bytes.argtypes = [ctypes.c_int] * 4 + [ctypes.POINTER(ctypes.c_size_t)]
        lib.ktinject_marlin_gemm.restype = ctypes.c_int
        # x, qweight, scales, bias, y, workspace; workspace_bytes; m, n, k, n_out, scale_groups, dtype, sm_count; stream
        lib.ktinject_marlin_gemm.argtypes = (
            [ctypes.c_void_p] * 6 + [ctypes.c_size_t] + [ctypes.c_int] * 7 + [ctypes.c_void_p]
        )
        lib.ktinject_marlin_status_string.restype = ctypes.c_char_p
        lib.ktinject_marlin_status_string.argtypes = [ctypes.c_int]
        version = lib.ktinject_marlin_abi_version()
        if version != ABI_VERSION:
            raise RuntimeError(
                f"{path} has ABI version {version}, this ktinject expects {ABI_VERSION}; rebuild csrc/cuda"
            )
        self._lib = lib
        self._workspaces: dict[tuple[int, int], torch.Tensor] = {}
        self._lock = threading.Lock()

    def status_string(self, status: int) -> str:
        return self._lib.ktinject_marlin_status_string(status).decode()

    def workspace_bytes(self, m: int, n: int, k: int, sm_count: int) -> int:
        """Bytes of workspace a call with these sizes needs."""
        out = ctypes.c_size_t(0)
        status = self._lib.ktinject_marlin_workspace_bytes(m, n, k, sm_count, ctypes.byref(out))
        if status:
            raise ValueError(f"marlin CUDA kernel: M={m}, N={n}, K={k}: {self.status_string(status)}")
        return out.value

    def _workspace(self, device: torch.device, stream: torch.cuda.Stream, nbytes: int) -> torch.Tensor:
        # Zeroed once; the kernel leaves its counters at zero again. Kept per stream because two kernels running
        # concurrently must not share counters; grown (never shrunk) when a larger call needs more.
        key = (device.index or 0, stream.cuda_stream)
        with self._lock:
            ws = self._workspaces.get(key)
            if ws is None or ws.numel() < nbytes:
                ws = torch.zeros(max(nbytes, 1 << 20), dtype=torch.uint8, device=device)
                self._workspaces[key] = ws
            return ws

    def gemm(
        self, x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None, n_out: int
    ) -> torch.Tensor:
        """``x [M, K] @ W.T + bias -> [M, n_out]`` on x's device and current stream, in x's dtype."""
        if x.dtype not in _DTYPES or scales.dtype != x.dtype or (bias is not None and bias.dtype != x.dtype):
            raise ValueError(
                f"marlin CUDA kernel: x, scales and bias must share fp16 or bf16, got x {x.dtype}, scales {scales.dtype}"
                + (f", bias {bias.dtype}" if bias is not None else "")
            )
        if x.dim() != 2 or not x.is_contiguous() or not qweight.is_contiguous() or not scales.is_contiguous():
            raise ValueError("marlin CUDA kernel: x must be 2-D and x, qweight, scales contiguous")
        m, k = x.shape
        n = scales.shape[1]
        if qweight.dtype != torch.int32 or tuple(qweight.shape) != (k // 16, 2 * n):
            raise ValueError(
                f"marlin CUDA kernel: qweight must be int32 [{k // 16}, {2 * n}], got {qweight.dtype} {tuple(qweight.shape)}"
            )
        if bias is not None and (tuple(bias.shape) != (n_out,) or not bias.is_contiguous()):
            raise ValueError(f"marlin CUDA kernel: bias must be a contiguous [{n_out}], got {tuple(bias.shape)}")
        device = x.device
        y = torch.empty(m, n_out, dtype=x.dtype, device=device)
        if m == 0:
            return y
        with torch.cuda.device(device):
            sm_count = _sm_count(device.index or 0)
            stream = torch.cuda.current_stream(device)
            need = self.workspace_bytes(m, n, k, sm_count)
            ws = self._workspace(device, stream, need) if need else None
            status = self._lib.ktinject_marlin_gemm(
                x.data_ptr(),
                qweight.data_ptr(),
                scales.data_ptr(),
                bias.data_ptr() if bias is not None else None,
                y.data_ptr(),
                ws.data_ptr() if ws is not None else None,
                ws.numel() if ws is not None else 0,
                m,
                n,
                k,
                n_out,
                scales.shape[0],
                _DTYPES[x.dtype],
                sm_count,
                stream.cuda_stream,
            )
        if status:
            raise RuntimeError(
                f"marlin CUDA kernel failed for x [{m}, {k}], W [{n}, {k}] ({scales.shape[0]} scale groups, {x.dtype}): "
                f"{self.status_string(status)}"
            )
        return y


@functools.lru_cache(maxsize=None)
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


@functools.lru_cache(maxsize=1)
def load_library() -> MarlinCudaLibrary:
    """The library, loaded once; RuntimeError saying where it was looked for when it cannot be loaded."""
    candidates = library_candidates()
    failures = []
    for path in candidates:
        if not path.is_file():
            continue
        try:
            return MarlinCudaLibrary(path)
        except (OSError, RuntimeError) as exc:
            failures.append(f"{path}: {exc}")
    if failures:
        found = "; ".join(failures)
    elif os.environ.get(ENV_VAR):
        found = f"{candidates[0]} (${ENV_VAR}) not found"
    else:
        found = f"{LIBRARY_NAME} not found in {candidates[0].parent} and {candidates[-1].parent}, or on sys.path"
    raise RuntimeError(
        f"CUDA Marlin library not available ({found}); build it with benchmarks/run_gpu.sh or "
        f"`cmake -S csrc/cuda -B build/cuda && cmake --build build/cuda`, or point ${ENV_VAR} at it"
    )
