"""Who runs on which CPU cores: our pinned pool or torch's own intra-op threads.

The CPU operators run on a pool of workers pinned one per CPU. torch runs its own OpenMP workers on the same
CPUs, and after every parallel region they keep spinning for milliseconds (libgomp's default wait policy,
fixed when the library loads, so it cannot be changed once torch is imported). A torch op right before or
after an experts call then made that call 3.5-9x slower. So when the first CPU operator is built, torch is
given one intra-op thread (the calling thread; it has no workers left to spin), and everything heavy runs on
the pool. ``KTINJECT_TORCH_THREADS=N`` keeps N torch threads instead (e.g. for long prompts whose attention
runs in torch), and the decision is logged and shown by ``ktinject doctor``.
"""

from __future__ import annotations

import logging
import os
import threading

import torch

from ktinject.messages import format_ranges

logger = logging.getLogger("ktinject")

ENV_VAR = "KTINJECT_TORCH_THREADS"

_lock = threading.Lock()
_decision: str | None = None


def share_cores_with_pool(pool_cpus: list[int]) -> None:
    """Called when a CPU operator creates its native layer on ``pool_cpus``: leave those cores to the pool.

    Sets torch's intra-op threads once per process (to 1, or to ``$KTINJECT_TORCH_THREADS``) and logs why.
    """
    global _decision
    with _lock:
        if _decision is not None:
            return
        before = torch.get_num_threads()
        requested = os.environ.get(ENV_VAR, "").strip()
        if requested:
            try:
                wanted = int(requested)
                if wanted < 1:
                    raise ValueError
            except ValueError:
                logger.warning("%s=%r is not a positive integer; using 1", ENV_VAR, requested)
                wanted = 1
            reason = f"{ENV_VAR}={requested}"
        else:
            wanted = 1
            reason = (
                f"the CPU operators' pool is pinned to CPUs {format_ranges(pool_cpus)} and torch's idle OpenMP "
                f"workers would spin on them (set {ENV_VAR}=N to keep N)"
            )
        if wanted != before:
            torch.set_num_threads(wanted)
            logger.info("torch intra-op threads %d -> %d: %s", before, wanted, reason)
        _decision = f"torch intra-op threads {wanted} (was {before}): {reason}"


def decision() -> str:
    """What ``share_cores_with_pool`` decided in this process, for ``ktinject doctor``."""
    return _decision or f"no CPU operator built yet; torch uses {torch.get_num_threads()} intra-op threads"
