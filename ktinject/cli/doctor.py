"""``ktinject doctor``: what this machine offers ktinject (ISA, NUMA, extension, torch, CUDA)."""

from __future__ import annotations

import platform
from pathlib import Path

from ktinject.messages import format_ranges


def register(sub) -> None:
    p = sub.add_parser("doctor", help="report CPU features, NUMA topology, the native build and the GPU")
    p.set_defaults(run=run)


def _read(path: str) -> str:
    try:
        return Path(path).read_text().strip()
    except OSError:
        return "n/a"


def report() -> list[tuple[str, str]]:
    """(label, value) rows; never raises, so it works on a half-broken install or environment too.

    Each probe that can fail (a bad ``KTINJECT_ISA``, a missing extension, an odd topology) becomes a row
    saying what went wrong, and the other rows are still shown.
    """
    rows: list[tuple[str, str]] = []
    for probe in (_versions, _native_rows):
        try:
            probe(rows)
        except Exception as exc:  # doctor must report, not fail
            rows.append((probe.__name__.strip("_").replace("_rows", ""), f"ERROR: {type(exc).__name__}: {exc}"))
    return rows


def _versions(rows: list[tuple[str, str]]) -> None:
    import torch
    import transformers

    from ktinject import __version__

    rows += [
        ("ktinject", __version__),
        ("python", platform.python_version()),
        ("torch", torch.__version__),
        ("transformers", transformers.__version__),
    ]
    cuda = torch.cuda.is_available()
    rows.append(
        ("cuda", f"{torch.cuda.device_count()} device(s): {torch.cuda.get_device_name(0)}" if cuda else "not available")
    )


def _row(rows: list[tuple[str, str]], label: str, probe) -> None:
    """Append ``(label, probe())``, or the error ``probe`` raised."""
    try:
        rows.append((label, probe()))
    except Exception as exc:  # one broken probe must not hide the others
        rows.append((label, f"ERROR: {exc}"))


def _native_rows(rows: list[tuple[str, str]]) -> None:
    from ktinject.native import native

    try:
        ext = native()
    except Exception as exc:  # doctor must report, not fail
        rows.append(("native extension", f"NOT AVAILABLE: {exc}"))
        return
    rows.append(("native extension", getattr(ext, "__file__", "?")))
    features = ext.cpu_features()
    isa = [
        name
        for name in (
            "avx2",
            "fma",
            "f16c",
            "avx512f",
            "avx512bw",
            "avx512vl",
            "avx512_vnni",
            "avx512_bf16",
            "avx_vnni",
            "amx_tile",
            "amx_int8",
            "amx_bf16",
        )
        if features.get(name)
    ]
    rows.append(("cpu", platform.processor() or platform.machine()))
    rows.append(("isa", " ".join(isa) or "baseline x86-64 only"))
    if hasattr(ext, "best_isa"):
        _row(rows, "kernel path", lambda: ext.best_isa() + " (force with KTINJECT_ISA=scalar|avx2|avx512)")
    nodes = ext.numa_topology()
    rows.append(("numa nodes", str(len(nodes))))
    for node in nodes:
        rows.append((f"  node {node['node']} cpus", format_ranges(node["cpus"])))
    balancing = _read("/proc/sys/kernel/numa_balancing")
    hint = " (set to 0 for pinned experts: sysctl kernel.numa_balancing=0)" if balancing not in ("0", "n/a") else ""
    rows.append(("numa_balancing", balancing + hint))
    rows.append(
        (
            "built with NUMA",
            "yes (libnuma)" if ext.built_with_numa else "no (libnuma-dev was missing at build time; one node)",
        )
    )
    if hasattr(ext, "pool_layout"):
        _row(rows, "cpu operators default", lambda: _pool_default(ext))
    _row(rows, "torch threads", _torch_threads)


def _torch_threads() -> str:
    """Who gets the cores: the CPU operators' pool, and torch's intra-op threads beside it (core_sharing)."""
    from ktinject import core_sharing

    env = core_sharing.ENV_VAR
    return (
        f"{core_sharing.decision()}; building a CPU operator sets torch's intra-op threads to 1 so its OpenMP "
        f"workers do not spin on the pool's cores (${env}=N keeps N)"
    )


def _pool_default(ext) -> str:
    try:
        groups, memory_nodes = ext.pool_layout(0, 0)
    except ValueError as exc:
        return f"cannot place workers: {exc}"
    desc = "; ".join(
        f"node {mem if mem >= 0 else '?'}: cpus {format_ranges(cpus)}" for cpus, mem in zip(groups, memory_nodes)
    )
    return (
        f"{sum(len(g) for g in groups)} pinned threads in {len(groups)} node group(s) ({desc}); "
        "kwargs threads= / numa_nodes= change it"
    )


def run(args) -> int:
    rows = report()
    width = max(len(label) for label, _ in rows)
    for label, value in rows:
        print(f"{label.ljust(width)}  {value}")
    return 0
