"""The shipped operators' kwargs are checked to what they can really use when the rule file is loaded."""

import os

import pytest
from ktinject.operators.cpu_experts import CpuExpertsConfig
from ktinject.operators.marlin_linear import MarlinLinearConfig

import ktinject
from ktinject import RuleError

CPUS = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


def rule_error(op: str, kwargs: str) -> str:
    with pytest.raises(RuleError) as info:
        ktinject.load_rules(
            f"rules:\n  - match: {{name: x}}\n    replace:\n      op: {op}\n      device: cpu\n      kwargs:\n{kwargs}"
        )
    return str(info.value)


@pytest.mark.parametrize(
    "kwargs, line, key, fragment",
    [
        (
            "        threads: 100000000000\n",
            7,
            "threads",
            f"threads must be >= 0 and <= {CPUS} (0 = every CPU; this process may run on {CPUS})",
        ),
        ("        threads: 1.0e+11\n", 7, "threads", "kwarg 'threads' must be an integer (64-bit), got 100000000000.0"),
        ("        threads: '1e11'\n", 7, "threads", "must be an integer (64-bit), got '1e11'"),
        ("        threads: true\n", 7, "threads", "got True"),
        ("        threads: -1\n", 7, "threads", "threads must be >= 0"),
        (
            "        weight_type: q4_k\n        numa_nodes: 100000\n",
            8,
            "numa_nodes",
            f"numa_nodes must be >= 0 and <= {CPUS}",
        ),
        ("        numa_nodes: 99999999999999999999999\n", 7, "numa_nodes", "must be an integer (64-bit)"),
    ],
)
def test_cpu_experts_kwargs(kwargs, line, key, fragment):
    message = rule_error("cpu_experts", kwargs)
    assert message.startswith(f"<string>:{line}: rules[0].replace.kwargs.{key}: "), message
    assert fragment in message, message


@pytest.mark.skipif(CPUS < 2, reason="needs two CPUs this process may run on")
def test_cpu_experts_needs_a_thread_per_node():
    message = rule_error("cpu_experts", "        threads: 1\n        numa_nodes: 2\n")
    assert message.startswith(
        "<string>:8: rules[0].replace.kwargs.numa_nodes: numa_nodes=2 needs at least as many threads, got threads=1"
    )
    assert CpuExpertsConfig(threads=CPUS, numa_nodes=CPUS).threads == CPUS


def test_cpu_experts_config_checks_direct_construction_too():
    with pytest.raises(ktinject.OperatorError, match="threads must be an integer, got 1.5"):
        CpuExpertsConfig(threads=1.5)


@pytest.mark.parametrize(
    "kwargs, key, fragment",
    [
        ("        group_size: 99999999999999\n", "group_size", "group_size must be >= -1 and <= 2147483647"),
        ("        group_size: 100\n", "group_size", "a positive multiple of 16, got 100"),
        ("        bits: 4.0\n", "bits", "must be an integer (64-bit), got 4.0"),
        ("        bits: 8\n", "bits", "marlin_linear supports bits=4 only, got bits=8"),
    ],
)
def test_marlin_linear_kwargs(kwargs, key, fragment):
    message = rule_error("marlin_linear", kwargs)
    assert message.startswith(f"<string>:7: rules[0].replace.kwargs.{key}: "), message
    assert fragment in message, message
    with pytest.raises(ktinject.OperatorError, match="bits=4 only"):
        MarlinLinearConfig(bits=True)


@pytest.mark.parametrize("op", ["cpu_linear", "linear"])
def test_cpu_linear_threads_share_the_pool_limits(op):
    message = rule_error(op, "        threads: 100000000000\n")
    assert message.startswith(f"<string>:7: rules[0].replace.kwargs.threads: threads must be >= 0 and <= {CPUS}"), (
        message
    )
