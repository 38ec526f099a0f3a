"""The build's ISA flags match the run-time check, and the system bindings (bandwidth among them)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from ktinject.native import native, native_available

CSRC = Path(__file__).resolve().parents[2] / "csrc"


def _unit_flags(unit: str) -> set[str]:
    text = (CSRC / "CMakeLists.txt").read_text()
    m = re.search(rf"set_source_files_properties\({unit}\.cpp PROPERTIES COMPILE_OPTIONS\s*\"([^\"]*)\"", text)
    assert m, f"no compile options for {unit}.cpp in csrc/CMakeLists.txt"
    return {f[2:] for f in m.group(1).split(";") if f.startswith("-m")}


def _checked_features(isa: str) -> set[str]:
    text = (CSRC / "quant" / "kernels.cpp").read_text()
    function = re.search(r"bool isa_available\(Isa isa\) \{(.*?)\n\}", text, re.S)
    assert function, "no isa_available in quant/kernels.cpp"
    body = re.search(rf"case Isa::{isa}:\s*return ([^;]*);", function.group(1))
    assert body, f"isa_available has no case for {isa}"
    return set(re.findall(r"f\.(\w+)", body.group(1)))


@pytest.mark.parametrize(
    "unit, isa",
    [
        ("quant/kernels_avx2", "Avx2"),
        ("quant/kernels_avx512", "Avx512"),
        ("attention/attention_kernels_avx2", "Avx2"),
        ("attention/attention_kernels_avx512", "Avx512"),
    ],
)
def test_every_target_flag_of_an_isa_unit_is_checked_at_run_time(unit, isa):
    """A -m flag the run-time check does not cover lets the compiler emit instructions a CPU that passes the check
    lacks (SIGILL); e.g. -mavx512bf16 without avx512_bf16 in isa_available(Isa::Avx512)."""
    flag_to_feature = {
        "avx2": "avx2",
        "fma": "fma",
        "f16c": "f16c",
        "avx512f": "avx512f",
        "avx512bw": "avx512bw",
        "avx512vl": "avx512vl",
        "avx512dq": "avx512dq",
        "avx512vnni": "avx512_vnni",
        "avx512bf16": "avx512_bf16",
    }
    flags = _unit_flags(unit)
    unknown = flags - set(flag_to_feature) - {"no-lto"}
    assert not unknown, f"map these flags to a CpuFeatures field: {unknown}"
    missing = {flag for flag in flags & set(flag_to_feature) if flag_to_feature[flag] not in _checked_features(isa)}
    assert not missing, f"{unit}.cpp is compiled with {missing} but isa_available(Isa::{isa}) does not check them"


@pytest.mark.skipif(not native_available(), reason="ktinject._native is not built")
def test_measure_read_bandwidth_is_a_system_binding():
    m = native()
    assert m.measure_read_bandwidth(1 << 20, 1, 1) > 0
    assert "benchmark" in m.measure_read_bandwidth.__doc__
    with pytest.raises(ValueError):
        m.measure_read_bandwidth(1 << 20, 10**6, 1)  # more threads than CPUs


@pytest.mark.skipif(not native_available(), reason="ktinject._native is not built")
def test_the_kernels_types_are_the_ones_python_names():
    """operators/cpu_weights.py (ids from gguf-py) and csrc/quant/weight_types.h (the table) agree on every type."""
    from ktinject.operators.cpu_weights import GGML_TYPES

    assert native().supported_weight_types() == GGML_TYPES


def _switch_bodies(text: str):
    """The body of every `switch (...) { ... }` in C++ source text (braces matched)."""
    for match in re.finditer(r"\bswitch\s*\(", text):
        start = text.index("{", match.end())
        depth, i = 0, start
        while True:
            depth += {"{": 1, "}": -1}.get(text[i], 0)
            if depth == 0:
                break
            i += 1
        yield text[start : i + 1]


def test_weight_type_switches_are_complete_without_a_default():
    """A switch over WeightType or ActFormat has no `default`, so -Wswitch names every switch a new type's code is
    missing from (the facts themselves are the table in quant/weight_types.h, not switches)."""
    sources = sorted(CSRC.glob("quant/*.[ch]*")) + sorted(CSRC.glob("*.[ch]*"))
    switches = 0
    for path in sources:
        for body in _switch_bodies(path.read_text()):
            if "case WeightType::" in body or "case ActFormat::" in body:
                switches += 1
                assert "default:" not in body, f"{path.relative_to(CSRC)}: a switch over weight types has a default"
    assert switches >= 6  # the dot products of every ISA, quantize, dequantize, the activation formats
