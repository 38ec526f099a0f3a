"""One build for every x86-64 CPU: the extension, run on emulated older CPUs (qemu user mode), picks the
kernels that CPU has and never executes an instruction it lacks.

Under qemu a Nehalem (SSE4.2, no AVX) must run the scalar kernels and a Haswell (AVX2+FMA, no AVX-512) the
AVX2 ones, both giving correct results: a stray AVX-512 instruction anywhere on those paths (an ISA-specific
inline function merged by the linker, a vectorized loop in shared code) would kill the process with SIGILL.
Skipped when qemu-x86_64 is not installed (.ci/run installs Debian's qemu-user).
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
import textwrap

import pytest

from ktinject.native import native_available

if not native_available():
    pytest.skip("ktinject._native is not built", allow_module_level=True)

QEMU = shutil.which("qemu-x86_64")

# Imports only the extension and numpy (not torch, which would take minutes to load under emulation).
PROBE = textwrap.dedent(
    """
    import importlib.util, sys
    import numpy as np
    spec = importlib.util.spec_from_file_location("ktinject._native", sys.argv[1])
    m = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(m)
    print("best", m.best_isa(), "available", ",".join(m.available_isas()))
    rng = np.random.default_rng(0)
    for name, tid in m.supported_weight_types().items():
        w = m.quantize(tid, rng.standard_normal((20, 256)).astype(np.float32))
        x = rng.standard_normal((2, 256)).astype(np.float32)
        ref = x.astype(np.float64) @ m.dequantize(tid, w, 256).astype(np.float64).T
        for isa in m.available_isas():
            err = np.abs(m.gemm(tid, isa, w, x) - ref).max() / np.abs(ref).max()
            assert err < 3e-2, (name, isa, err)
    E, H, I = 4, 256, 256
    blocks = lambda t, rows, cols: m.quantize(t, rng.standard_normal((E * rows, cols)).astype(np.float32)).reshape(E, rows, -1)
    moe = m.MoE(E, H, I, gate_type=12, up_type=12, down_type=14, threads=2, numa_nodes=1)
    moe.load(0, blocks(12, I, H), blocks(12, I, H), blocks(14, H, I))
    x = rng.standard_normal((3, H)).astype(np.float32)
    out = np.zeros_like(x)
    moe.submit(x, np.array([[0, 1], [2, 3], [1, 1]], np.int64), np.ones((3, 2), np.float32), out)
    moe.sync()
    assert np.isfinite(out).all() and np.abs(out).max() > 0
    print("ok")
    """
)


@pytest.mark.skipif(QEMU is None, reason="qemu-x86_64 (Debian qemu-user) is not installed")
@pytest.mark.parametrize("cpu, best", [("Nehalem", "scalar"), ("Haswell", "avx2")])
def test_extension_runs_on_older_cpus(cpu: str, best: str) -> None:
    extension = importlib.util.find_spec("ktinject._native").origin
    result = subprocess.run(
        [QEMU, "-cpu", cpu, sys.executable, "-c", PROBE, extension],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "KTINJECT_SPIN_US": "0"},
    )
    assert result.returncode == 0, f"{cpu}: exit {result.returncode}\n{result.stdout}\n{result.stderr[-2000:]}"
    assert f"best {best} " in result.stdout and result.stdout.strip().endswith("ok"), result.stdout
