#!/usr/bin/env bash
# marlin_linear on a GPU machine, in one command (from the repository root or anywhere):
#
#     benchmarks/run_gpu.sh            # build csrc/cuda, run the marlin tests (GPU ones included), print the table
#     benchmarks/run_gpu.sh --quick    # the same with one shape and M = 1, 16 in the benchmark
#
# Needs a CUDA build of torch and a GPU; nvcc + cmake build our kernel (without them the CUDA-kernel tests skip
# with a reason and the table has no "ours (cuda)" column: the run says so). Installs only what is missing:
# the Python dependencies of the tests, and triton when torch did not bring it. Nothing outside build/cuda is
# written; the C++ CPU extension is not needed for these tests and is not built.
set -euo pipefail
cd "$(dirname "$0")/.."
export PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_ROOT_USER_ACTION=ignore

python - <<'PY'
import sys, torch
if not torch.cuda.is_available():
    sys.exit(f"run_gpu.sh: torch {torch.__version__} sees no CUDA device; install the CUDA build of torch on a GPU machine")
p = torch.cuda.get_device_properties(0)
print(f"run_gpu.sh: {p.name}, compute capability {p.major}.{p.minor}, torch {torch.__version__}, CUDA {torch.version.cuda}")
PY
python -c "import transformers, omegaconf, yaml, gguf, safetensors, pytest" 2>/dev/null ||
  python -m pip install -q "transformers>=5" accelerate omegaconf pyyaml gguf safetensors numpy tqdm pytest
python -c "import triton" 2>/dev/null || python -m pip install -q triton

# Our CUDA kernel: sm_80 + sm_90 machine code and compute_90 PTX (csrc/cuda/CMakeLists.txt).
if command -v nvcc >/dev/null && command -v cmake >/dev/null; then
  cmake -S csrc/cuda -B build/cuda -DCMAKE_BUILD_TYPE=Release >/dev/null
  cmake --build build/cuda -j "$(nproc)"
  export KTINJECT_MARLIN_LIB="$PWD/build/cuda/libktinject_marlin.so"
else
  echo "run_gpu.sh: WARNING: nvcc or cmake missing; our CUDA kernel is not built (its tests skip, no 'ours' column)" >&2
fi

python -m pytest -q -rs -p no:cacheprovider tests/operators/test_marlin_format.py tests/operators/test_marlin_triton.py \
  tests/operators/test_marlin_linear.py tests/operators/test_marlin_whole_model.py tests/operators/test_marlin_cuda.py

if [ "${1:-}" = "--quick" ]; then
  python benchmarks/bench_marlin.py --shapes 4096x4096 --batches 1,16
else
  python benchmarks/bench_marlin.py
fi
