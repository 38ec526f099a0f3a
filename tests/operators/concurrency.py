"""Running one check from several threads at once, for the operators' concurrency tests."""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence


def run_in_threads(check: Callable[[int], None], count: int) -> None:
    """Run ``check(i)`` for i < count, each in its own thread, all at once; re-raise the first failure."""
    errors: list[BaseException] = []

    def worker(i: int) -> None:
        try:
            check(i)
        except BaseException as exc:  # noqa: BLE001 (re-raised below, in the test's thread)
            errors.append(exc)

    threads: Sequence[threading.Thread] = [threading.Thread(target=worker, args=(i,)) for i in range(count)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
